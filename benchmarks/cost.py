"""What a prune costs: wall time and peak memory of the default command on large architectures.

    python -m benchmarks.cost [--models resnet50,vgg19,alexnet] [--samples 256] [--append]

Each row is `onnxprune IN OUT --ratio R [--calib calib.npy]` as a user types it, in its own process (`/usr/bin/time`
gives the peak RSS), with the report's own timings beside it (sensitivity probes, refit segments). The models are the
`onnx` package's light architectures with seeded random weights (tests/light_zoo.py): their accuracy means nothing,
their cost is real. With random weights the held-out agreement is not a test of anything, so `--force` keeps the
guard from bisecting (its retries would multiply the time; a refusing guard costs up to GUARD_STEPS more prunes).
Calibration samples are normal random images at the model's input size. Writes results/cost.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))  # the light-zoo loader is a test fixture: weights folded, randomised

from light_zoo import load  # noqa: E402

# (model, ratio, calibrated): the cost targets (ResNet-50 with 256 samples; the big fully connected layers
# of VGG-19 and AlexNet data-free)
ROWS = {
    "resnet50": (0.5, True),
    "vgg19": (0.5, False),
    "alexnet": (0.5, False),
}


def run_row(name: str, ratio: float, calibrated: bool, samples: int, tmp: pathlib.Path) -> dict:
    model = load(name)
    path = tmp / f"{name}.onnx"
    onnx.save(model, path)
    cmd = [
        "/usr/bin/time", "-f", "%M", sys.executable, "-m", "onnxprune", str(path), str(tmp / "out.onnx"),
        "--ratio", str(ratio), "--overwrite", "-q", "--report", str(tmp / "report.json"),
    ]  # fmt: skip
    if calibrated:
        dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
        x = np.random.default_rng(0).standard_normal((samples, *dims)).astype(np.float32)
        np.save(tmp / "calib.npy", x)
        cmd += ["--calib", str(tmp / "calib.npy"), "--force"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    row = {
        "model": name,
        "ratio": ratio,
        "calib_samples": samples if calibrated else 0,
        "exit": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(int(proc.stderr.strip().splitlines()[-1]) / 1024),
    }
    if proc.returncode == 0:
        report = json.loads((tmp / "report.json").read_text())
        facts = report
        sens = facts.get("sensitivity") or {}
        row.update(
            {
                "params_removed": facts.get("params_removed"),
                "sensitivity_s": sens.get("seconds"),
                "sensitivity_samples": sens.get("samples"),
                "refit_segments": report["counts"].get("refit_segments"),
                "plan_source": facts.get("plan_source"),
                "candidates_compared": len(facts.get("candidates") or []),
                "step_seconds": facts.get("step_seconds"),
            }
        )
    else:
        row["error"] = proc.stderr.strip().splitlines()[:-1][-1:] or [""]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ROWS))
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--append", action="store_true", help="keep the other models' rows of results/cost.json")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ratio, calibrated = ROWS[name]
            row = run_row(name, ratio, calibrated, args.samples, pathlib.Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| model | ratio | calib samples | exit | wall (s) | peak RSS (MB) | params removed | longest steps (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        removed = f"{100 * r['params_removed']:.1f} %" if r.get("params_removed") is not None else "-"
        spent = sorted((r.get("step_seconds") or {}).items(), key=lambda kv: -kv[1])
        longest = ", ".join(f"{label} {seconds:.0f}" for label, seconds in spent[:5] if seconds >= 1) or "-"
        print(
            f"| {r['model']} | {r['ratio']} | {r['calib_samples']} | {r['exit']} | {r['wall_s']} | "
            f"{r['peak_rss_mb']} | {removed} | {longest} |"
        )
    out = ROOT / "results" / "cost.json"
    if args.append and out.exists():  # the rows of models not run now stay, in their order
        ran = {r["model"] for r in rows}
        rows = [r for r in json.loads(out.read_text())["rows"] if r["model"] not in ran] + rows
    machine = {"machine": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
