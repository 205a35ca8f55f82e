"""The default command on the trained models handed to the project (../shared/cases), beside the peers.

    python -m benchmarks.cases [--ratios 0.5,0.7,0.8,0.9] [--cases DIR] [--quick]

For each ratio: `onnxprune IN OUT --ratio R --calib calib.npy` exactly as a user types it (a subprocess: exit code,
wall time, peak RSS, the guard's one line when it refuses), then the same with `--force` when the guard refused (so
the accuracy of what was refused is known), and the ablation rows of `ABLATIONS` (each with `--force`). The peers,
matched to the same parameter target by bisection and run on the same calibration samples: onnxsim's structured
Wanda pruning, and plain truncated SVD of every Conv/Gemm at one rank
fraction for all layers (data-free; what a user writes by hand). Accuracy on the case's test set, parameters
removed, CPU latency of every row against the unpruned model at batch 1 and 32 (alternating blocks of runs,
onnxruntime's default threads: what the tool's speed check and a user's session use).
Writes results/cases.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.measure import bisect, paired_timings
from benchmarks.peers import onnxsim_wanda
from onnxprune.budget import count

ROOT = pathlib.Path(__file__).resolve().parent
CASES = ROOT.parent.parent / "shared" / "cases"
ABLATIONS = (  # (what the row changes, its flags), each row also with --force
    ("--latency-batch 0 (basis, decided by parameters alone; may be slower)", ["--latency-batch", "0", "--force"]),
    ("--method basis (the basis result alone)", ["--method", "basis", "--force"]),
    ("--no-tucker (split layers never written in Tucker-2 form)", ["--no-tucker", "--force"]),
    ("--criterion cmi (channel results by the criterion before session 28)", ["--criterion", "cmi", "--force"]),
)


def accuracy(path: str, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return float((sess.run(None, {name: x.astype(np.float32)})[0].argmax(1) == y).mean())


def run_cli(args: list[str]) -> dict:
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "onnxprune", *args], capture_output=True, text=True)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "exit": proc.returncode,
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": max(rss, before) / 1024,
        "stderr": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "",
        "stdout": proc.stdout,
    }


def plain_svd(model: onnx.ModelProto, target: float) -> tuple[onnx.ModelProto, float]:
    """Every Conv (group 1) / Gemm / MatMul with a constant weight split at one rank fraction, data-free."""
    from onnxprune.graph import to_graph, to_model
    from onnxprune.passes.basis import decompose_basis, find_basis_pairs
    from onnxprune.passes.groups import find_channel_groups
    from onnxprune.passes.remove import remove_channels

    before = count(model)[0]

    def make(fraction: float):
        graph = to_graph(model)
        decompose_basis(graph, min_channels=2)
        bases = {p.basis for p in find_basis_pairs(graph)}
        groups = [g for g in find_channel_groups(graph).groups if set(g.producers) <= bases and not g.blocked]
        plan = {g.name: np.arange(max(1, int(round(len(g.classes) * (1 - fraction))))) for g in groups}
        remove_channels(graph, plan=plan)
        out = to_model(graph, model)
        return out, 1 - count(out)[0] / before

    pruned, reached, _ = bisect(make, target, hi=0.99)
    return pruned, reached


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=str(CASES))
    parser.add_argument("--ratios", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--quick", action="store_true", help="one ratio (0.7), no ablation, no peers")
    parser.add_argument("--out", default=str(ROOT / "results" / "cases.json"))
    args = parser.parse_args(argv)
    ratios = [0.7] if args.quick else [float(r) for r in args.ratios.split(",")]
    folder = pathlib.Path(args.cases) / "digits"
    model_path, calib_path = folder / "resnet20_digits.onnx", folder / "calib.npy"
    test = np.load(folder / "test.npz")
    model, calib = onnx.load(model_path), np.load(calib_path)
    tmp = pathlib.Path(tempfile.mkdtemp())
    rows = [{"row": "unpruned", "ratio": 0.0, "path": str(model_path), "removed": 0.0}]
    for ratio in ratios:
        out = tmp / f"default_{ratio}.onnx"
        run = run_cli([str(model_path), str(out), "--ratio", str(ratio), "--calib", str(calib_path), "-q"])
        row = {"row": "onnxprune (default flags + --calib)", "ratio": ratio, **run}
        if run["exit"] == 1:  # the guard refused: measure what it refused, say so
            forced = run_cli(
                [str(model_path), str(out), "--ratio", str(ratio), "--calib", str(calib_path), "-q", "--force"]
            )
            row["forced_exit"] = forced["exit"]
        if out.exists():
            row["path"] = str(out)
        rows.append(row)
        if not args.quick:
            for label, flags in ABLATIONS:
                out_a = tmp / f"ablation_{len(rows)}_{ratio}.onnx"
                run_a = run_cli(
                    [str(model_path), str(out_a), "--ratio", str(ratio), "--calib", str(calib_path), "-q", *flags]
                )
                path_a = str(out_a) if out_a.exists() else None
                rows.append({"row": f"ablation: {label}", "ratio": ratio, **run_a, "path": path_a})
            for name, make in (
                ("peer: onnxsim structured Wanda", lambda r: onnxsim_wanda(model, calib, r)[0]),
                ("peer: plain SVD, one rank fraction", lambda r: plain_svd(model, r)[0]),
            ):
                start = time.perf_counter()
                try:
                    pruned = make(ratio)
                except Exception as err:  # a peer that cannot run gets a row saying why
                    rows.append({"row": name, "ratio": ratio, "error": f"{type(err).__name__}: {err}"})
                    continue
                path = tmp / f"{name.split()[1]}_{ratio}.onnx"
                onnx.save(pruned, path)
                rows.append({"row": name, "ratio": ratio, "path": str(path), "seconds": time.perf_counter() - start})
    paths = [r["path"] for r in rows if r.get("path")]
    by = paired_timings(paths, batches=[1, 32], threads=0, runs=100)  # onnxruntime's default threads, as the tool
    base = count(model)[0]
    for r in rows:
        if not r.get("path"):
            continue
        r["accuracy"] = accuracy(r["path"], test["x"], test["y"])
        r["removed"] = 1 - count(onnx.load(r["path"]))[0] / base
        for b in (1, 32):
            r[f"ms_b{b}"], r[f"speedup_b{b}"] = by[(os.path.basename(r["path"]), b)]
        r.pop("stdout", None)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"case": str(model_path.name), "rows": rows}, indent=1))
    print("| row | ratio | exit | test acc. | params removed | b1 ms (×) | b32 ms (×) | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['row']} | {r['ratio']} | | {r['error']} | | | | |")
            continue
        acc = f"{100 * r['accuracy']:.2f} %" if "accuracy" in r else "—"
        if r.get("exit") == 1:
            acc = f"refused: {r['stderr'][:90]}… (forced: {acc})"
        print(
            f"| {r['row']} | {r['ratio']} | {r.get('exit', '')} | {acc} | {100 * r.get('removed', 0):.1f} % | "
            + (
                f"{r['ms_b1']:.3f} ({r['speedup_b1']:.2f}×) | {r['ms_b32']:.2f} ({r['speedup_b32']:.2f}×) | "
                if "ms_b1" in r
                else "| | "
            )
            + f"{r.get('seconds', 0):.0f} |"
        )


if __name__ == "__main__":
    main()
