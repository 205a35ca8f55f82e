import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(autouse=True)
def _latency_cache(tmp_path, monkeypatch):
    """Latency measurements go to a per-test cache, never to the user's home."""
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path / "latency.json"))
