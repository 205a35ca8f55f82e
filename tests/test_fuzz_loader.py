"""Mutated bytes of valid models: loading succeeds or fails with one InvalidModelError, never anything else."""

import numpy as np
import pytest
from models import chain, squeeze_excite

from onnxprune.errors import InvalidModelError, UnsupportedModelError
from onnxprune.graph import load, to_graph

N_INPUTS = 150  # bounded for the test suite; `FUZZ_N=20000 python -m pytest tests/test_fuzz_loader.py` runs longer


def _mutations(data: bytes, rng: np.random.Generator, n: int):
    for _ in range(n):
        buf = bytearray(data)
        kind = rng.integers(4)
        if kind == 0:  # flip bytes
            for i in rng.integers(0, len(buf), size=rng.integers(1, 8)):
                buf[i] = rng.integers(256)
        elif kind == 1:  # truncate
            buf = buf[: rng.integers(1, len(buf))]
        elif kind == 2:  # insert junk
            at = rng.integers(len(buf))
            buf[at:at] = rng.bytes(rng.integers(1, 32))
        else:  # duplicate a slice
            a, b = sorted(rng.integers(0, len(buf), size=2))
            buf[a:a] = buf[a:b]
        yield bytes(buf)


@pytest.mark.parametrize("build", [chain, squeeze_excite], ids=lambda b: b.__name__)
def test_mutated_models_fail_cleanly(build, tmp_path):
    import os

    n = int(os.environ.get("FUZZ_N", N_INPUTS))
    rng = np.random.default_rng(0)
    data = build().SerializeToString()
    path = tmp_path / "m.onnx"
    outcomes = {"loaded": 0, "refused": 0}
    for blob in _mutations(data, rng, n):
        path.write_bytes(blob)
        try:
            model = load(path)
            to_graph(model)
            outcomes["loaded"] += 1
        except (InvalidModelError, UnsupportedModelError) as err:
            assert "\n" not in str(err)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == n
