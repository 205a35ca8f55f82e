import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest


@pytest.fixture(autouse=True)
def _latency_cache(tmp_path_factory, monkeypatch):
    """Latency measurements go to a per-test cache in its own folder, never to the user's home."""
    monkeypatch.setenv("ONNXPRUNE_CACHE", str(tmp_path_factory.mktemp("cache") / "latency.json"))
