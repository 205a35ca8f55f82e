"""Peak memory and wall time of calibrated pruning against the number of calibration samples.

Usage: python -m benchmarks.calib_memory [--samples 256,2048] [--model resnet20]   (after `pip install .[bench]`)
Each size runs in its own process (so peaks do not mix): `onnxprune --method basis --calib` on the suite's
character model, ratio 0.7. Statistics are streamed batch by batch, so the peak should follow the batch size and
the model, not the number of samples. Writes benchmarks/results/calib_memory.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="256,2048")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    from benchmarks import data, nets
    from benchmarks.run import trained

    dataset = data.load("chars")
    model, _ = trained(dataset, args.model, {}, args.epochs, data.CACHE)
    pool = np.concatenate([dataset.calib[0], dataset.train[0]])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        nets.export(model, tmp / "m.onnx", dataset.shape)
        for n in (int(v) for v in args.samples.split(",")):
            np.save(tmp / "calib.npy", pool[:n])
            cmd = [
                "/usr/bin/time", "-f", "%M", sys.executable, "-m", "onnxprune", str(tmp / "m.onnx"),
                str(tmp / "out.onnx"), "--ratio", "0.7", "--method", "basis", "--calib", str(tmp / "calib.npy"),
                "--batch-size", "32", "--overwrite", "-q",
            ]  # fmt: skip
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            peak = int(proc.stderr.strip().splitlines()[-1]) / 1024
            rows.append({"samples": n, "peak_rss_mb": peak, "wall_s": wall})
            print(f"{n:6d} samples: peak RSS {peak:7.0f} MB, wall {wall:6.1f} s", flush=True)
    out = HERE / "results" / "calib_memory.json"
    out.write_text(json.dumps({"model": f"chars-{args.model}", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
