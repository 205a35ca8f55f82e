"""A model over protobuf's 2 GB limit, end to end through the CLI: external data in, external data out.

Opt-in (ONNXPRUNE_LARGE_TEST=1): it writes about 4 GB to the temp folder and peaks near 20 GB of memory, more than a
CI runner should be asked for on every push. Measured on the 2-core dev machine: see the README's limits section.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.graph import TWO_GB, session

pytestmark = pytest.mark.skipif(
    os.environ.get("ONNXPRUNE_LARGE_TEST") != "1", reason="set ONNXPRUNE_LARGE_TEST=1 (writes ~4 GB, ~20 GB of memory)"
)

WIDTH, LAYERS = 8192, 9  # 9 x 8192^2 float32 = 2.4 GB of weights


def _gemm_stack(path):
    rng = np.random.default_rng(0)
    block = rng.standard_normal((WIDTH, 512), dtype=np.float32) / np.sqrt(WIDTH)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = np.roll(np.tile(block, (1, WIDTH // 512)), i, axis=0) * rng.uniform(0.5, 1.5, (WIDTH, 1)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], name=f"gemm{i}", transB=1))
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Relu", [f"g{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info(f"g{LAYERS - 1}", TensorProto.FLOAT, ["batch", WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, path, save_as_external_data=True, location=path.name + ".data")


def test_model_over_2_gb_is_pruned_with_external_data(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    model_path = src / "large.onnx"
    _gemm_stack(model_path)
    data = src / "large.onnx.data"
    assert data.stat().st_size > TWO_GB
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(src.iterdir())]
    try:
        proc = subprocess.run(  # its own process: the test's copy of the model must not add to its peak memory
            [
                sys.executable,
                "-m",
                "onnxprune",
                str(model_path),
                str(dst / "small.onnx"),
                "--ratio",
                "0.3",
                "--method",
                "channel",
                "-q",
            ],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(src.iterdir())] == stamp
        written = sorted(p.name for p in dst.iterdir())
        assert written in (["small.onnx"], ["small.onnx", "small.onnx.data"])  # next to the output, nowhere else
        shutil.rmtree(src)  # the input's data must not be needed by the output
        x = np.random.default_rng(1).standard_normal((2, WIDTH)).astype(np.float32)
        out = session(str(dst / "small.onnx")).run(None, {"x": x})[0]
        assert out.shape == (2, WIDTH) and np.isfinite(out).all()
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
