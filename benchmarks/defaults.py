"""The default command on the suite's chars models, as a user types it, with `--target latency` beside it.

    python -m benchmarks.defaults [--models resnet20,vgg,mobilenetv2] [--ratios 0.7,0.8,0.9] [--latency 0.5]

The models are the suite's (`benchmarks.run`'s full configuration: 8 epochs on the rendered characters, trained
once and cached under $ONNXPRUNE_BENCH_CACHE). For each model and ratio: `onnxprune IN OUT --ratio R --calib
calib.npy` in a subprocess (512 unlabelled calibration images; when the guard refuses, the same with `--force` so
the refused model's accuracy is known), then `--target latency --ratio L --latency-batch 32` (the issue's "2x
faster at batch 32"), and ablation rows per ratio (`--ablations`): `--method basis` (the default's basis result
alone), `--no-tucker` (split layers never written in Tucker-2 form) and `--criterion cmi` (channel results by the
label criterion that was the default before session 28, not by reconstruction). Test
accuracy in onnxruntime, parameters removed, latency of every row of a model against the unpruned one at batch 1
and 32 (alternating blocks, onnxruntime's default threads). Writes results/defaults.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np
import onnx

from benchmarks.cases import accuracy, run_cli
from benchmarks.measure import paired_timings
from onnxprune.budget import count
from onnxprune.testing import summary_item

ROOT = pathlib.Path(__file__).resolve().parent
EPOCHS = 8  # the full configuration's
ABLATIONS = {  # name -> (what the row changes, its flags)
    "basis": ("the default's basis result alone", ["--method", "basis"]),
    "no-tucker": ("split layers never written in Tucker-2 form", ["--no-tucker"]),
    "cmi": ("channel results by the criterion before session 28", ["--criterion", "cmi"]),
}


def suite_model(arch: str, folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, np.ndarray, np.ndarray]:
    """(model.onnx, calib.npy, test x, test y) of the suite's chars model `arch`, trained once and cached."""
    from benchmarks import data, nets
    from benchmarks.run import trained

    dataset = data.load("chars", n_calib=512)
    model, _ = trained(dataset, arch, {}, EPOCHS, data.CACHE)
    path, calib = folder / f"chars_{arch}.onnx", folder / "chars_calib.npy"
    nets.export(model, path, dataset.shape)
    np.save(calib, dataset.calib[0])
    return path, calib, *dataset.test


def measure_rows(found: list[dict], path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> list[dict]:
    """`found` with each written model's test accuracy, parameters removed against the unpruned `path` (the first
    row) and latency at batch 1 and 32, each model timed against the unpruned one alone (`paired_timings`)."""
    by = paired_timings([r["path"] for r in found if r.get("path")], batches=[1, 32], runs=50)
    base = count(onnx.load(path))[0]
    for r in found:
        if not r.get("path"):
            continue
        r["accuracy"] = accuracy(r["path"], x, y)
        r["removed"] = 1 - count(onnx.load(r["path"]))[0] / base
        for b in (1, 32):
            r[f"ms_b{b}"], r[f"speedup_b{b}"] = by[(pathlib.Path(r["path"]).name, b)]
        r.pop("stdout", None)
    return found


def print_table(rows: list[dict]) -> None:
    """The markdown table of accuracy rows (model, row, ratio, written method, accuracy or refusal, removal, speed)."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,vgg,mobilenetv2")
    parser.add_argument("--ratios", default="0.7,0.8,0.9")
    parser.add_argument("--latency", type=float, default=0.5, help="--target latency ratio (0: none)")
    parser.add_argument("--ablation-ratios", default=None, help="ratios of the ablation rows (default: --ratios)")
    parser.add_argument(
        "--ablations", default="basis,no-tucker", help=f"ablation rows, comma-separated, of: {', '.join(ABLATIONS)}"
    )
    parser.add_argument("--out", default=str(ROOT / "results" / "defaults.json"))
    args = parser.parse_args(argv)
    tmp = pathlib.Path(tempfile.mkdtemp())
    rows = []
    for arch in args.models.split(","):
        path, calib, x, y = suite_model(arch, tmp)
        found = [{"model": arch, "row": "unpruned", "ratio": 0.0, "path": str(path)}]
        runs = [("default flags + --calib", float(r), []) for r in args.ratios.split(",") if r]
        ablation = args.ratios if args.ablation_ratios is None else args.ablation_ratios
        for kind in filter(None, args.ablations.split(",")):
            what, flags = ABLATIONS[kind]
            runs += [(f"ablation: {' '.join(flags)} ({what})", float(r), flags) for r in ablation.split(",") if r]
        if args.latency:
            runs.append(
                ("--target latency --latency-batch 32", args.latency, ["--target", "latency", "--latency-batch", "32"])
            )
        for name, ratio, extra in runs:
            out = tmp / f"{arch}_{len(found)}.onnx"
            cmd = [str(path), str(out), "--ratio", str(ratio), "--calib", str(calib), *extra]
            report = out.with_suffix(".json")
            run = run_cli([*cmd, "--report", str(report)])
            row = {"model": arch, "row": name, "ratio": ratio, **run}
            if report.exists():  # what was written, and each result `best` made beside it
                facts = json.loads(report.read_text())
                row["method"] = facts.get("method")
                row["alternatives"] = facts.get("alternatives")
            if run["exit"] == 1:  # the guard refused: measure what it refused, say so
                row["forced_exit"] = run_cli([*cmd, "--force"])["exit"]
            row["summary"] = [
                summary_item(run["stdout"], item)
                for item in ("chosen", "speed", "plan")
                if f"\n  {item}  " in "\n" + run["stdout"]
            ]
            if out.exists():
                row["path"] = str(out)
            found.append(row)
        rows += measure_rows(found, path, x, y)
        print(f"{arch}: done", flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
