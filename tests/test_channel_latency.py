"""Channel removal under a latency target: measured per-layer timings cost the channel knapsack's options."""

import types

import numpy as np
import pytest
from models import chain

from onnxprune import budget, latency, pipeline
from onnxprune.budget import CostModel, LatencyModel, allocate_channels, channel_choices
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import find_channel_groups
from onnxprune.result import Report
from onnxprune.shapes import concrete_shapes


def _graph():
    model = chain()  # convs 3 -> 8 -> 16 -> 12, then the head (pooling, Gemm 12 -> 10)
    graph = cleanup(to_graph(model)).graph
    return model, graph, find_channel_groups(graph), concrete_shapes(to_model(graph, model), {"x": [4, 3, 8, 8]})


def _flat(ins: float, outs: float):
    """A stand-in for `latency.channel_latency`: every layer 1 s whole, any cut input side `ins`, output `outs`."""

    def measure(*, kept_in, kept_out, **_):
        return 1.0, dict.fromkeys(kept_in, ins), dict.fromkeys(kept_out, outs)

    return measure


def _group_of(analysis, width):
    return next(g for g in analysis.groups if len(g.classes) == width and len(g.producers) == 1)


def test_channel_latency_times_fewer_inputs_and_outputs_and_caches(monkeypatch):
    args = dict(
        op="Conv",
        x_shape=[2, 8, 6, 6],
        weight_shape=[16, 8, 3, 3],
        attrs={"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]},
        kept_in=[4],
        kept_out=[8, 16],
    )
    whole, ins, outs = latency.channel_latency(**args)
    assert whole > 0 and set(ins) == {4} and set(outs) == {8}  # the whole count is not timed twice
    assert all(t > 0 for t in [*ins.values(), *outs.values()])

    def no_timing(*a, **k):
        raise AssertionError("a cached measurement was taken again")

    monkeypatch.setattr(latency, "_time", no_timing)
    assert latency.channel_latency(**args) == (whole, ins, outs)


def test_a_grouped_conv_is_timed_whole_only():
    whole, ins, outs = latency.channel_latency(
        op="Conv",
        x_shape=[1, 8, 6, 6],
        weight_shape=[8, 1, 3, 3],
        attrs={"pads": [1, 1, 1, 1], "group": 8},
        kept_in=[4],
        kept_out=[4],
    )
    assert whole > 0 and ins == {} and outs == {}


def test_the_latency_model_multiplies_the_shares_of_both_sides_and_interpolates():
    _, graph, analysis, shapes = _graph()
    model = LatencyModel(graph, analysis, shapes, measure=_flat(ins=0.5, outs=0.25))
    layers = len(model.layers)
    assert layers >= 3 and model.seconds() == pytest.approx(layers)  # each layer 1 s whole
    group = _group_of(analysis, 16)  # one producer (the second conv), one reader (the third)
    alive = np.ones(analysis.n_classes, dtype=bool)
    alive[group.classes[8:]] = False  # 8 of 16: a count timed on both sides
    assert model.seconds(alive) == pytest.approx(layers - 2 + 0.25 + 0.5)
    alive[group.classes[:12]] = True  # 12 of 16: between the counts timed (8 and the whole 16)
    assert model.seconds(alive) == pytest.approx(layers - 2 + (0.25 + 1.0) / 2 + (0.5 + 1.0) / 2)


def test_latency_option_costs_are_exact_changes_of_the_predicted_time():
    _, graph, analysis, shapes = _graph()
    cost = CostModel(graph, analysis)
    cost.timing = LatencyModel(graph, analysis, shapes, measure=_flat(ins=0.5, outs=0.25))
    saliency = np.random.default_rng(0).random(analysis.n_classes) + 0.1
    groups = [g.name for g in analysis.groups if len(g.producers) == 1 and not len(g.blocked)]
    state = np.ones(analysis.n_classes, dtype=bool)
    state[_group_of(analysis, 16).classes[12:]] = False  # costs taken at a plan with channels already gone
    choices = channel_choices(analysis, cost, saliency, target="latency", groups=groups, alive=state)
    assert choices
    for c in choices:
        for k in np.flatnonzero(np.isfinite(c.error)):
            trial = state.copy()
            trial[c.classes] = False
            trial[c.classes[: k or len(c.classes)]] = True
            assert cost.count(trial)[2] - cost.count(state)[2] == pytest.approx(c.cost[k])


def test_the_latency_knapsack_cuts_where_time_is_saved_not_where_macs_are(monkeypatch):
    """Equal saliency everywhere: by MACs the wide group goes first; by time, the one whose layers get faster."""
    _, graph, analysis, shapes = _graph()
    wide, narrow = _group_of(analysis, 16), _group_of(analysis, 8)

    def measure(*, x_shape, weight_shape, kept_in, kept_out, **_):  # only the 8-channel group's layers speed up
        reads_narrow, makes_narrow = x_shape[1] == 8, weight_shape[0] == 8
        return (
            1.0,
            {k: k / x_shape[1] if reads_narrow else 1.0 for k in kept_in},
            {k: k / weight_shape[0] if makes_narrow else 1.0 for k in kept_out},
        )

    cost = CostModel(graph, analysis)
    cost.timing = LatencyModel(graph, analysis, shapes, measure=measure)
    saliency = np.ones(analysis.n_classes)
    groups = [wide.name, narrow.name]
    plan = allocate_channels(
        analysis, cost, saliency, remove_ratio=0.1, target="latency", total_before=cost.count()[2], groups=groups
    ).plan
    assert narrow.name in plan and wide.name not in plan
    macs = CostModel(graph, analysis, shapes=shapes)
    by_macs = allocate_channels(
        analysis, macs, saliency, remove_ratio=0.1, target="flops", total_before=macs.count()[1], groups=groups
    ).plan
    assert wide.name in by_macs


def test_the_latency_search_lands_near_the_depth_needed_and_offers_its_other_depths(monkeypatch):
    """A safeguarded secant search: time saved 0.8 x depth, 0.5 asked (0.52 with the margin): depth 0.65."""
    made = []

    def fake_prune(model, *, remove_ratio, **options):
        made.append(remove_ratio)
        return types.SimpleNamespace(depth=remove_ratio), Report()

    monkeypatch.setattr(pipeline, "prune_one", fake_prune)
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 1.0 - 0.8 * b.depth))
    best, reached, others = pipeline._channel_for_latency(None, 0.5, {}, {}, 0, by="latency")
    goal = 0.5 + pipeline.LATENCY_SEARCH_MARGIN
    assert reached and 0.8 * best[0].depth >= goal - 1e-9
    assert best[0].depth - goal / 0.8 <= 0.01  # plain bisection from 0 stopped up to 0.06 deeper
    assert len(made) == 1 + pipeline.LATENCY_STEPS
    # the other depths that saved the time asked (within a point) come back to be compared, nearest first, and
    # among them the shallower one that missed only the margin
    assert 1 <= len(others) <= pipeline.LATENCY_OTHERS and best not in others
    assert all(0.8 * o[0].depth >= 0.49 and o[1].facts["latency_edge"] for o in others)
    gaps = [abs(o[0].depth - best[0].depth) for o in others]
    assert gaps == sorted(gaps)
    assert any(0.8 * o[0].depth < goal and o[0].depth < best[0].depth for o in others)
    assert best[1].facts["latency_by"] == "latency" and best[1].facts["latency_fast"]


def test_the_latency_search_goes_on_when_the_deepest_saves_the_time_but_not_the_margin(monkeypatch):
    """Time saved levels off with depth (chars ResNet-20: 0.7 of the layers' time saved 0.517, 0.57 saved 0.509):
    a deepest result within a point of the request is not the end of the search, as shallower ones keep more."""
    made = []

    def fake_prune(model, *, remove_ratio, **options):
        made.append(remove_ratio)
        return types.SimpleNamespace(depth=remove_ratio), Report()

    monkeypatch.setattr(pipeline, "prune_one", fake_prune)
    saved = lambda depth: min(0.515, 0.9 * depth)  # noqa: E731
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 1.0 - saved(b.depth)))
    best, reached, others = pipeline._channel_for_latency(None, 0.5, {}, {}, 0, by="latency")
    assert len(made) == 1 + pipeline.LATENCY_STEPS and not reached
    assert min(made) < max(pipeline.LATENCY_DEPTHS)
    found = [best, *others]
    assert all(saved(f[0].depth) >= 0.49 for f in found)
    assert min(f[0].depth for f in found) < 0.6  # shallower than the deepest, which saved as much


def test_a_calibrated_latency_search_removes_measured_time():
    assert pipeline._latency_by({"x": [1, 3, 8, 8]}, {"calib": object()}) == "latency"
    assert pipeline._latency_by({"x": [1, 3, 8, 8]}, {"calib": object(), "criterion": "cmi"}) == "flops"
    assert pipeline._latency_by({"x": [1, 3, 8, 8]}, {}) == "flops"
    assert pipeline._latency_by(None, {"calib": object()}) == "params"
    assert budget.COUNT_INDEX["latency"] == 2


def test_a_latency_target_writes_a_result_that_keeps_the_floor_when_one_does():
    """Within a held-out sample of the most faithful, the fastest was written and refused beside one that held."""

    def row(agreement, speedup):
        return {
            "held_agreement": agreement,
            "held_cosine": 0.95,
            "held_samples": 102,
            "speed_check": {32: (speedup, 1.0)},
        }

    rows = [row(0.941, 2.16), row(0.951, 2.06), row(0.931, 2.10)]
    assert pipeline._latency_pick(rows, [0, 1, 2], max_drop=0.05) == 1
    assert pipeline._latency_pick(rows, [0, 2], max_drop=0.05) == 0  # none holds: the most faithful
    # each saves the time asked: the higher cosine is written, not what saves more beyond the request
    rows = [row(0.99, 1.98), row(1.0, 1.97)]
    rows[0]["held_cosine"], rows[1]["held_cosine"] = 0.954, 0.976
    assert pipeline._latency_pick(rows, [0, 1], max_drop=0.05) == 1


@pytest.mark.parametrize("build", ["chain", "grouped_conv", "flatten_gemm"])
def test_each_timed_layer_names_the_channels_its_tensors_hold(build):
    """`Layout.channel_timing`: the input and output channel counts are those of the tensors read and written."""
    import models

    from onnxprune.rules import layouts

    model = getattr(models, build)()
    graph = cleanup(to_graph(model)).graph
    shapes = concrete_shapes(
        to_model(graph, model), {"x": [2, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]}
    )
    timed = 0
    for node in graph.nodes:
        layout = layouts.layout_of(node)
        spec = layout.channel_timing(node) if layout is not None else None
        if spec is None:
            continue
        op, _, attrs, ins, outs = spec
        x, y = shapes[node.inputs[0].name], shapes[node.outputs[0].name]
        channel = 1 if op == "Conv" else -1
        assert outs == y[channel]
        assert ins == (None if int(attrs.get("group", 1)) != 1 else x[channel])
        timed += 1
    assert timed >= 2
