"""Latency-aware merging: measured split-vs-merged limits, cached; pairs above their limit are merged back."""

import json
import time
import types

import numpy as np
import onnx
from models import Builder

from onnxprune import latency, pipeline
from onnxprune.budget import CostModel
from onnxprune.graph import to_graph
from onnxprune.latency import cache_path, split_rank_limit
from onnxprune.passes.basis import decompose_basis, find_basis_pairs, merge_unprofitable, param_breakeven
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.pipeline import prune
from onnxprune.testing import apply_pass, ort_run, random_feeds

EXAMPLE = "examples/digits_resnet.onnx"


def test_limit_is_within_bounds_and_cached(monkeypatch):
    args = dict(
        op="Conv",
        x_shape=[1, 16, 8, 8],
        weight_shape=[32, 16, 3, 3],
        attrs={"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]},
        max_rank=param_breakeven(144, 32),
        runs=5,
    )
    limit = split_rank_limit(**args)
    assert 0 <= limit <= param_breakeven(144, 32)
    assert list(json.loads(cache_path().read_text()).values()) == [limit]

    def no_timing(*a, **k):
        raise AssertionError("a cached measurement was taken again")

    monkeypatch.setattr(latency, "_time", no_timing)
    assert split_rank_limit(**args) == limit


def test_param_breakeven():
    assert param_breakeven(144, 32) == 26  # 26 * 176 = 4576 < 4608 = 32 * 144; 27 * 176 = 4752
    assert param_breakeven(9, 24) == 6


def _split_single_conv():
    b = Builder(50)
    model = b.model([("x", [12, 6, 6])], [b.conv("x", 12, 20, 3)])
    return model, apply_pass(model, decompose_basis, min_channels=2)[0]


def test_pair_above_its_limit_is_merged_and_counted_merged():
    model, split = _split_single_conv()
    graph = to_graph(split)
    pairs = find_basis_pairs(graph)
    analysis = find_channel_groups(graph)
    group = analysis.groups[0]
    alive = np.ones(analysis.n_classes, dtype=bool)
    alive[group.classes[6:]] = False  # keep rank 6
    merged_params = 20 * 12 * 9 + 20
    assert CostModel(graph, analysis, pairs).count(alive)[0] < merged_params
    assert CostModel(graph, analysis, pairs, {pairs[0].basis: 5}).count(alive)[0] == merged_params
    pruned, _ = apply_pass(split, remove_channels, plan={group.name: np.arange(6)})
    kept, report = apply_pass(pruned, merge_unprofitable, pairs=pairs, limits={pairs[0].basis: 5})
    assert report.counts["merged_back"] == 1 and len(kept.graph.node) == 1
    feeds = random_feeds(model, batch=2)
    out = model.graph.output[0].name
    np.testing.assert_allclose(ort_run(kept, feeds)[out], ort_run(pruned, feeds)[out], rtol=1e-4, atol=1e-4)


def test_prune_with_measured_latency_keeps_the_split_layers_no_slower_and_hits_the_target(monkeypatch):
    # measured timings vary from run to run; fixed ones keep this test deterministic (the measurement has its own):
    # a split is faster than its dense op below 3/4 of the timed ranks
    monkeypatch.setattr(
        pipeline, "layer_latency", lambda *, ranks, **kw: (1.0, {r: 4.0 * r / (3.0 * max(ranks)) for r in ranks})
    )
    # the plan chosen by error alone measures slower as a whole model (both batch sizes), the budget's plans do not:
    # the allocation falls back to the budget
    checks = []

    def fake_compare(first, second, feeds, **kw):
        checks.append(1)
        return (1.0, 1.5) if len(checks) <= 2 else (1.0, 0.9)

    monkeypatch.setattr(pipeline, "compare_latency", fake_compare)
    pruned, report = prune(onnx.load(EXAMPLE), remove_ratio=0.5, latency_batch=1)
    assert set(report.facts["speed_check"]) == {1, 32}
    timed = report.facts["layer_latency"]
    assert timed["before"] == 16 and timed["after"] <= timed["before"]
    ranks = [n for n in pruned.graph.node if n.name.endswith("_basis")]
    assert ranks, "some layers stay split"
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01
    onnx.checker.check_model(pruned, full_check=True)


def test_when_the_strict_budget_measures_slower_a_tighter_one_is_searched(monkeypatch):
    # a split is faster than its dense op per layer below 3/4 of the timed ranks, but as a whole model each split
    # layer costs 0.1 of the original's time and the cut saves 0.35: more than three split layers measure slower
    monkeypatch.setattr(
        pipeline, "layer_latency", lambda *, ranks, **kw: (1.0, {r: 4.0 * r / (3.0 * max(ranks)) for r in ranks})
    )
    splits = []

    def fake_compare(first, second, feeds, **kw):
        n = sum(node.op_type == "Conv" for node in second.graph.node) - sum(
            node.op_type == "Conv" for node in first.graph.node
        )
        splits.append(n)
        return 1.0, 0.65 + 0.1 * n

    monkeypatch.setattr(pipeline, "compare_latency", fake_compare)
    pruned, report = prune(onnx.load(EXAMPLE), remove_ratio=0.5, latency_batch=1)
    assert max(splits) > 3, "the plans by error and at the strict budget split more layers"
    f = report.facts
    assert f["plan_source"] == "per-layer latency budget"
    assert not pipeline._slower(f["speed_check"]) and f["speed_check"][1][1] <= 1.0
    assert f["layer_latency"]["after"] < 0.99 * f["layer_latency"]["before"]  # tighter than the dense ops' sum
    assert abs(f["params_removed"] - 0.5) <= 0.01
    onnx.checker.check_model(pruned, full_check=True)


def test_a_plan_that_measures_no_slower_is_kept_without_the_latency_budget(monkeypatch):
    monkeypatch.setattr(pipeline, "layer_latency", lambda *, ranks, **kw: (1.0, {r: 10.0 for r in ranks}))
    monkeypatch.setattr(pipeline, "compare_latency", lambda first, second, feeds, **kw: (1.0, 0.9))
    pruned, report = prune(onnx.load(EXAMPLE), remove_ratio=0.5, latency_batch=1)
    assert report.facts["speed_check"] == {1: (1.0, 0.9), 32: (1.0, 0.9)}
    assert "layer_latency" not in report.facts  # every split is "slower" per layer, yet the model is not
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01


def test_sessions_are_timed_alone_in_alternating_blocks(monkeypatch):
    """Each session runs in whole blocks (warm runs first, untimed), the blocks alternate, every count is met."""
    monkeypatch.setattr(latency, "BLOCK_SECONDS", 0.002)
    ticks = iter(range(10**9))  # a clock of 10 us a reading: a loaded machine cannot cut the warm runs short
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-5))
    calls: list[str] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feeds):
            calls.append(self.name)

    times = latency.alternate([Fake("a"), Fake("b")], [{}, {}], runs=50, blocks=4)
    segments = []
    for name in calls:
        if not segments or segments[-1][0] != name:
            segments.append([name, 0])
        segments[-1][1] += 1
    assert [s[0] for s in segments] == ["a", "b"] * (len(segments) // 2) and len(segments) >= 8
    assert all(n > latency.BLOCK_WARM for _, n in segments)
    timed = [sum(n - latency.BLOCK_WARM for s, n in segments if s == name) for name in "ab"]
    assert timed == [len(t) for t in times] and min(timed) >= 50
    assert all((t >= 0).all() for t in times)


def test_long_runs_get_no_warm_runs_after_the_first_block(monkeypatch):
    monkeypatch.setattr(latency, "BLOCK_SECONDS", 0.002)
    calls: list[str] = []

    class Slow:
        def run(self, outputs, feeds):
            calls.append("run")
            time.sleep(0.004)  # longer than a block

    times = latency.alternate([Slow()], [{}], runs=5, blocks=5)
    # the first block: one warm run (it outlasts the block) and one timed; later blocks: one timed run each
    assert len(times[0]) == 5 and len(calls) == 6


def test_a_channel_result_is_timed_and_a_slower_one_said_so(monkeypatch, capsys):
    """Fewer MACs are not always faster (odd channel counts cost the blocked layout's reorders): `--method channel`
    times what it writes at the latency batch and 32, and the summary's `speed` line says when it is slower."""
    from pathlib import Path

    from models import basic_residual

    from onnxprune.cli import _print_summary

    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 1.2))
    model = basic_residual()
    data = {"x": np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)}
    _, report = prune(model, remove_ratio=0.3, method="channel", calib=data, latency_batch=1, max_drop=0.99)
    assert set(report.facts["speed_check"]) == {1, 32}
    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    assert "speed   measured slower than the original (speed-up 0.83x at batch 1, 0.83x at batch 32" in (
        capsys.readouterr().out
    )
    _, report = prune(model, remove_ratio=0.3, method="channel", calib=data, latency_batch=0, max_drop=0.99)
    assert "speed_check" not in report.facts  # --latency-batch 0: nothing timed
