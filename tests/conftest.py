import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _latency_cache(tmp_path_factory, monkeypatch):
    """Latency measurements go to a per-test cache in its own folder, never to the user's home."""
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path_factory.mktemp("cache") / "latency.json"))


@pytest.fixture(autouse=True)
def _channel_timings(monkeypatch):
    """The channel knapsack's per-layer timings (``budget.LatencyModel``) in proportion to the layer's MACs.

    Measured timings would make the channels a latency target removes vary from run to run; tests stay
    deterministic. ``latency.channel_latency`` itself is tested on its own (tests/test_channel_latency.py).
    """
    from onnxprune import budget

    def proportional(*, op, x_shape, weight_shape, attrs, kept_in, kept_out, threads=0):
        n_in, n_out = (weight_shape[1], weight_shape[0]) if op == "Conv" else (weight_shape[0], weight_shape[1])
        taps = int(np.prod(weight_shape[2:])) if op == "Conv" else 1
        whole = 1e-9 * float(np.prod(x_shape)) * n_out * taps
        return whole, {k: whole * k / n_in for k in kept_in}, {k: whole * k / n_out for k in kept_out}

    monkeypatch.setattr(budget, "channel_latency", proportional)
