"""The README's figures for the bundled example, regenerated in one run: accuracy per method and ratio, data-free and
with calibration data, and CPU latency at 0.7 against the original (interleaved, same run).

Usage: python -m benchmarks.example_table   (after `pip install .`; about eight minutes on 2 cores)
Prints markdown tables and writes benchmarks/results/example.json. Peers (Torch-Pruning, plain SVD, onnxsim) are not
in this run: they belong to the benchmark suite of issue 5.
"""

from __future__ import annotations

import json
import pathlib
import platform
import tempfile

import numpy as np
import onnx

from onnxprune.bench import time_models
from onnxprune.calibration import criteria
from onnxprune.calibration.runner import run_batches, split_calibration
from onnxprune.pipeline import prune

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples"
RATIOS = (0.3, 0.5, 0.7, 0.9)
METHODS = ("channel", "basis", "double", "auto")
CRITERIA_RATIOS = (0.5, 0.7, 0.9)


def main() -> None:
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    images, labels = np.load(EXAMPLE / "digits_calib.npy"), np.load(EXAMPLE / "digits_labels.npy")
    results: dict = {"machine": platform.platform(), "data_free": {}, "calibrated": {}, "latency": []}

    print("Data-free (no calibration data), accuracy on all 500 samples (params / MACs removed, %):\n")
    print("| method | " + " | ".join(map(str, RATIOS)) + " |\n|---|" + "---|" * len(RATIOS))
    for method in METHODS:
        cells = []
        for ratio in RATIOS:
            pruned, report = prune(model, remove_ratio=ratio, method=method)
            acc = float(np.mean(run_batches(pruned, {"image": images})["logits"].argmax(1) == labels))
            f = report.facts
            results["data_free"][f"{method}@{ratio}"] = {
                "accuracy": acc,
                "params_removed": f["params_removed"],
                "macs_removed": f["macs_removed"],
            }
            cells.append(f"{100 * acc:.1f} % ({100 * f['params_removed']:.1f} / {100 * f['macs_removed']:.1f})")
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)

    print(
        "\nWith --calib and --labels (400 fit, 100 held out; default criterion: cmi for channel and auto, energy for"
        " basis and double; refit), accuracy on the held-out 100:\n"
    )
    print("| method | " + " | ".join(map(str, RATIOS)) + " |\n|---|" + "---|" * len(RATIOS))
    at_07 = {}
    for method in METHODS:
        cells = []
        for ratio in RATIOS:
            pruned, report = prune(model, remove_ratio=ratio, method=method, calib={"image": images}, labels=labels)
            fid = report.facts["fidelity"]["logits"]
            results["calibrated"][f"{method}@{ratio}"] = fid
            cells.append(f"{100 * fid['accuracy_pruned']:.0f} %")
            if ratio == 0.7:
                at_07[method] = pruned
        print(f"| {method} | " + " | ".join(cells) + " |", flush=True)

    print("\nAblation, --method basis with --calib, top-1 agreement on the held-out 100 (refit, whitened bases):\n")
    print("| refit | whiten | 0.7 | 0.8 | 0.9 |\n|---|---|---|---|---|")
    results["ablation"] = {}
    for refit, whiten in ((False, False), (False, True), (True, False), (True, True)):
        cells = []
        for ratio in (0.7, 0.8, 0.9):
            report = prune(model, remove_ratio=ratio, calib={"image": images}, compensate=refit, whiten=whiten)[1]
            fid = report.facts["fidelity"]["logits"]
            results["ablation"][f"refit={refit},whiten={whiten}@{ratio}"] = fid
            cells.append(f"{100 * fid['top1_agreement']:.0f} % (rel. err. {fid['relative_error']:.3f})")
        print(f"| {'yes' if refit else 'no'} | {'yes' if whiten else 'no'} | " + " | ".join(cells) + " |", flush=True)

    print(
        "\nCriteria, --method channel with --calib and no labels (the model's own top-1 stands in), accuracy on the"
        " held-out 100 without / with the refit:\n"
    )
    print("| criterion | " + " | ".join(map(str, CRITERIA_RATIOS)) + " |\n|---|" + "---|" * len(CRITERIA_RATIOS))
    results["criteria"] = {}
    held = split_calibration(model, {"image": images}, seed=0)[1]  # the samples prune() holds out (seed 0)
    held_images, held_labels = images[held.index], labels[held.index]
    for criterion in criteria.names():
        cells = []
        for ratio in CRITERIA_RATIOS:
            accs = []
            for refit in (False, True):
                pruned, _ = prune(
                    model, remove_ratio=ratio, method="channel", criterion=criterion, calib={"image": images},
                    compensate=refit,
                )  # fmt: skip
                logits = run_batches(pruned, {"image": held_images})["logits"]
                accs.append(float(np.mean(logits.argmax(1) == held_labels)))
                results["criteria"][f"{criterion}@{ratio},refit={refit}"] = accs[-1]
            cells.append(f"{100 * accs[0]:.0f} / {100 * accs[1]:.0f} %")
        print(f"| {criterion} | " + " | ".join(cells) + " |", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        paths = [str(EXAMPLE / "digits_resnet.onnx")]
        for method, pruned in at_07.items():
            paths.append(f"{tmp}/{method}_0.7.onnx")
            onnx.save(pruned, paths[-1])
        timings = time_models(paths, batches=[1, 32], threads=1, warmup=20, runs=300)
    print("\nCPU latency at 0.7 with --calib (1 thread, median of 300 interleaved runs):\n")
    print("| model | batch 1 | batch 32 |\n|---|---|---|")
    for name in dict.fromkeys(t.model for t in timings):
        row = {t.batch: t for t in timings if t.model == name}
        print(
            f"| {name} | {row[1].median_ms:.3f} ms ({row[1].speedup:.2f}×) | "
            f"{row[32].median_ms:.2f} ms ({row[32].speedup:.2f}×) |"
        )
    results["latency"] = [t.as_dict() for t in timings]
    out = ROOT / "benchmarks" / "results" / "example.json"
    out.write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
