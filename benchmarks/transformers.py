"""The default command on a trained vision transformer, as a user types it, beside the unpruned model and per method.

    python -m benchmarks.transformers [--ratios 0.3,0.5] [--methods channel,basis] [--exporters torchscript,dynamo]

The model is the suite's ViT (`benchmarks.nets.ViT`: patch 4, width 128, 6 blocks, 4 heads, MLP 256, timm's packed
qkv; AdamW, `EPOCHS` epochs on the rendered characters, trained once and cached under $ONNXPRUNE_BENCH_CACHE),
exported with torch's TorchScript exporter (opset 17; head reshapes computed from `Shape`) and, where onnxscript is
installed, its dynamo exporter (opset 18). For each exporter and ratio: `onnxprune IN OUT --ratio R --calib
calib.npy` with 256 unlabelled calibration images (default flags; when the guard refuses, the same with `--force`
so the refused model's accuracy is known), then one ablation row per method (`--method M`: heads and MLP units,
or low rank alone), and the peers on the same model and calibration images (Torch-Pruning's MetaPruner with its
head pruning on the torch model; plain truncated SVD of every layer on the ONNX graph). Test accuracy in
onnxruntime on 2400 images, parameters removed, and latency of every written model against the unpruned one at
batch 1 and 32 (alternating blocks, onnxruntime's default threads). Writes results/transformers.json and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np
import onnx

from benchmarks.cases import accuracy, run_cli
from onnxprune.bench import time_models
from onnxprune.budget import count

ROOT = pathlib.Path(__file__).resolve().parent
EPOCHS = 25
CALIB = 256  # the transformer issue's calibration set


def export(model, path: pathlib.Path, shape: tuple[int, ...], exporter: str) -> bool:
    """Write `model` with torch's `exporter` (torchscript or dynamo); False when that exporter is not installed."""
    import torch

    from benchmarks import nets

    if exporter == "torchscript":
        nets.export(model, path, shape)
        return True
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter's dependency
    except ImportError:
        return False
    torch.onnx.export(
        model.eval(),
        (torch.zeros(2, *shape),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        opset_version=18,
        dynamo=True,
    )
    return True


def _tp(model, onnx_model, calib, ratio):
    from benchmarks import peers

    return peers.torch_pruning_vit(model, calib, ratio)


def _svd(model, onnx_model, calib, ratio):
    from benchmarks.cases import plain_svd

    return plain_svd(onnx_model, ratio)


PEERS = {  # the same trained model and calibration images, no fine-tuning
    "peer: Torch-Pruning (heads, MLP units, width; L2)": _tp,
    "peer: plain SVD (every MatMul/Gemm/Conv at one rank fraction, data-free)": _svd,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--methods", default="channel,basis", help="ablation rows, one per method (empty: none)")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="leave the peers' rows out")
    parser.add_argument("--out", default=str(ROOT / "results" / "transformers.json"))
    args = parser.parse_args(argv)
    from benchmarks import data
    from benchmarks.run import trained

    dataset = data.load("chars", n_calib=512)  # the suite's split; the first CALIB of its calibration images
    model, _ = trained(dataset, "vit", {}, EPOCHS, data.CACHE)
    x, y = dataset.test
    tmp = pathlib.Path(tempfile.mkdtemp())
    calib = tmp / "calib.npy"
    np.save(calib, dataset.calib[0][:CALIB])
    rows = []
    for exporter in args.exporters.split(","):
        path = tmp / f"vit_{exporter}.onnx"
        if not export(model, path, dataset.shape, exporter):
            print(f"{exporter}: exporter not installed, skipped", flush=True)
            continue
        found = [{"model": f"vit ({exporter})", "row": "unpruned", "ratio": 0.0, "path": str(path)}]
        ratios = [float(r) for r in args.ratios.split(",")]
        runs = [("default flags + --calib", r, []) for r in ratios]
        runs += [(f"ablation: --method {m}", r, ["--method", m]) for m in args.methods.split(",") if m for r in ratios]
        for ratio in ratios if args.peers and exporter == "torchscript" else ():  # the peers, on the same model
            for name, make in PEERS.items():
                out = tmp / f"{exporter}_{len(found)}.onnx"
                try:
                    pruned, knob = make(model, onnx.load(path), dataset.calib[0][:CALIB], ratio)
                except Exception as e:  # noqa: BLE001 - a peer failing is a row of the table, not the end of the run
                    found.append({"model": f"vit ({exporter})", "row": name, "ratio": ratio, "error": repr(e)[:200]})
                    continue
                onnx.save(pruned, out)
                row = {"model": f"vit ({exporter})", "row": name, "ratio": ratio, "knob": knob, "path": str(out)}
                found.append(row)
                print(f"{exporter} {name} {ratio}: made", flush=True)
        for name, ratio, extra in runs:
            out = tmp / f"{exporter}_{len(found)}.onnx"
            cmd = [str(path), str(out), "--ratio", str(ratio), "--calib", str(calib), *extra]
            report = out.with_suffix(".json")
            run = run_cli([*cmd, "--report", str(report)])
            row = {"model": f"vit ({exporter})", "row": name, "ratio": ratio, **run}
            if report.exists():
                facts = json.loads(report.read_text())
                row["method"] = facts.get("method")
                row["fidelity"] = facts.get("fidelity")
            if run["exit"] == 1:  # the guard refused: measure what it refused, say so
                row["forced_exit"] = run_cli([*cmd, "--force"])["exit"]
            if out.exists():
                row["path"] = str(out)
            found.append(row)
            print(f"{exporter} {name} {ratio}: exit {run['exit']}, {run['seconds']:.0f} s", flush=True)
        timings = time_models([r["path"] for r in found if r.get("path")], batches=[1, 32], runs=50)
        by = {(t.model, t.batch): t for t in timings}
        base = count(onnx.load(path))[0]
        for r in found:
            if not r.get("path"):
                continue
            r["accuracy"] = accuracy(r["path"], x, y)
            r["removed"] = 1 - count(onnx.load(r["path"]))[0] / base
            for b in (1, 32):
                t = by[(pathlib.Path(r["path"]).name, b)]
                r[f"ms_b{b}"], r[f"speedup_b{b}"] = t.median_ms, t.speedup
            r.pop("stdout", None)
        rows += found
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"epochs": EPOCHS, "calib": CALIB, "rows": rows}, indent=1))
    print("| model | row | ratio | written | test acc. | params removed | b1 ms (×) | b32 ms (×) | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else r.get("error", "—")
        if r.get("exit") == 1:
            acc = f"refused (forced: {acc})"
        elif r.get("exit") not in (None, 0):
            acc = f"exit {r['exit']}: {r['stderr'][:80]}"
        timing = (
            f"{r['ms_b1']:.3f} ({r['speedup_b1']:.2f}×) | {r['ms_b32']:.2f} ({r['speedup_b32']:.2f}×)"
            if "ms_b1" in r
            else " | "
        )
        print(
            f"| {r['model']} | {r['row']} | {r['ratio']} | {r.get('method') or ''} | {acc} | "
            f"{100 * r.get('removed', 0):.1f} % | {timing} | {r.get('seconds', 0):.0f} |"
        )


if __name__ == "__main__":
    main()
