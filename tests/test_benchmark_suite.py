"""The benchmark suite's --quick code path on a tiny configuration, so it cannot rot silently (needs .[bench])."""

import json

import pytest

for module in ("torch", "torch_pruning", "onnxsim", "sklearn", "matplotlib"):
    pytest.importorskip(module, reason=f"the benchmark suite needs {module}: pip install '.[bench]'")


def test_tiny_suite_runs_every_tool_and_writes_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXPRUNE_BENCH_CACHE", str(tmp_path / "cache"))
    from benchmarks import data, run
    from onnxprune import pipeline

    monkeypatch.setattr(data, "CACHE", tmp_path / "cache")
    # the suite runs onnxprune as the CLI does (split layers kept only where measured faster); timing is not
    # deterministic, so here every split is taken as paying off up to full rank
    monkeypatch.setattr(pipeline, "split_rank_limit", lambda *, max_rank, **kwargs: max_rank)
    summary = run.main(["--tiny", "--out", str(tmp_path / "out")])
    (model,) = summary["models"]
    rows = model["rows"]
    assert {r["tool"] for r in rows} == {"onnxprune", "tp", "svd", "onnxsim"}
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    for row in rows:
        # every tool aims at the same target; in a 4-channel-wide net one channel is several points of the
        # parameters, too coarse for the suite's 1 point (real rows off by more are marked "off target")
        assert abs(row["params_removed"] - 0.3) <= 0.05, row
        assert row["matched"] == (abs(row["params_removed"] - 0.3) <= 0.01)
        assert 0 <= row["accuracy"] <= 1 and row["speedup_b1"] > 0 and row["speedup_b32"] > 0
        assert row["wall_s"] >= 0 and row["peak_rss_mb"] > 0
    written = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert written["models"][0]["rows"] == rows
    table = (tmp_path / "out" / "suite.md").read_text()
    assert "| onnxprune | auto+calib+refit | 0.3 |" in table and "Largest parameter removal" in table
    assert (tmp_path / "out" / "latency_vs_macs.png").stat().st_size > 1000
    assert (tmp_path / "out" / "digits-resnet20_accuracy.png").stat().st_size > 1000


def test_paired_timings_time_each_file_against_the_reference_alone(tmp_path, monkeypatch):
    """Every pruned file is timed in its own alternation with the reference (not all files in one)."""
    import shutil

    from benchmarks import measure
    from onnxprune import bench

    example = "examples/digits_resnet.onnx"
    paths = [example] + [shutil.copy(example, tmp_path / f"copy{i}.onnx") for i in range(2)]
    calls = []
    real = bench.time_models
    monkeypatch.setattr(bench, "time_models", lambda p, **kw: calls.append([str(x) for x in p]) or real(p, **kw))
    found = measure.paired_timings([str(p) for p in paths], batches=[1, 2], runs=3)
    assert calls == [[example, str(paths[1])], [example, str(paths[2])]]
    assert set(found) == {(n, b) for n in ("digits_resnet.onnx", "copy0.onnx", "copy1.onnx") for b in (1, 2)}
    assert all(ms > 0 and speed > 0 for ms, speed in found.values())
    assert found[("digits_resnet.onnx", 1)][1] == 1.0
