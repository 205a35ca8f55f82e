"""Accuracy of onnxprune's calibrated methods on the suite's character models at high ratios, onnxprune only.

Usage: python -m benchmarks.recipe [--models resnet20,mobilenetv2] [--ratios 0.7,0.8,0.9] [--variants basis,...]
(after `pip install .[bench]`). A variant is METHOD or METHOD/CRITERION, `+sens` appended for --sensitivity. Every
row: 512 calibration samples, no labels (the criteria that need labels use the model's own predictions), refit on,
decisions by parameters alone (no latency merges; `benchmarks.run` measures those, beside the peers). Test accuracy in
onnxruntime. Writes benchmarks/results/recipe.json and prints a markdown table. The peers' figures for the same models
are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import onnx

from onnxprune.pipeline import prune

HERE = pathlib.Path(__file__).resolve().parent
EPOCHS = {"resnet20": 8, "vgg": 5, "mobilenetv2": 5}  # the cached suite models (full config / lite config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vgg,mobilenetv2")
    parser.add_argument("--ratios", default="0.7,0.8,0.9")
    parser.add_argument("--variants", default="basis,double,auto,channel/cmi")
    parser.add_argument(
        "--peers", default="", help="peers of benchmarks.run to measure beside (e.g. tp-bn-uniform+bn), same data"
    )
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "recipe.json")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    args = parser.parse_args(argv)
    from benchmarks import data, nets
    from benchmarks.run import accuracy, run_peer, trained
    from onnxprune.budget import count

    dataset = data.load("chars")
    ratios = [float(r) for r in args.ratios.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    peer_names = [v for v in args.peers.split(",") if v]
    results = {"calibration_samples": 512, "models": {}}
    if args.append and args.out.exists():
        results = json.loads(args.out.read_text())
    print("| model | variant | " + " | ".join(map(str, ratios)) + " |\n|---|---|" + "---|" * len(ratios))
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            torch_model, _ = trained(dataset, arch, {}, EPOCHS[arch], data.CACHE)
            path = pathlib.Path(tmp) / f"{arch}.onnx"
            nets.export(torch_model, path, dataset.shape)
            model = onnx.load(path)
            x, y = dataset.test
            entry = results["models"].setdefault(f"chars-{arch}", {"accuracy": accuracy(model, x, y), "rows": []})
            params = count(model)[0]
            for variant in variants + peer_names:
                cells = []
                for ratio in ratios:
                    start = time.perf_counter()
                    if variant in peer_names:  # no fine-tuning, the same 512 calibration samples
                        pruned, _ = run_peer(variant, torch_model, model, dataset.calib[0][:512], ratio)
                        criterion = None
                    else:
                        name, sens = variant.removesuffix("+sens"), variant.endswith("+sens")
                        method, _, criterion = name.partition("/")
                        pruned, report = prune(
                            model,
                            remove_ratio=ratio,
                            method=method,
                            criterion=criterion or None,
                            sensitivity=sens,
                            calib={"image": dataset.calib[0][:512]},
                        )
                        criterion = report.facts["criterion"]
                    acc = accuracy(pruned, x, y)
                    entry["rows"].append(
                        {
                            "variant": variant,
                            "ratio": ratio,
                            "accuracy": acc,
                            "params_removed": 1 - count(pruned)[0] / params,
                            "criterion": criterion,
                            "seconds": time.perf_counter() - start,
                        }
                    )
                    cells.append(f"{100 * acc:.1f} %")
                    args.out.write_text(json.dumps(results, indent=1))
                print(f"| chars-{arch} ({100 * entry['accuracy']:.1f} %) | {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
