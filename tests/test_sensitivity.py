"""--sensitivity: a layer whose removals move the outputs more is weighed up, and gives up fewer channels."""

import numpy as np
import pytest
from models import Builder

from onnxprune.calibration.sensitivity import layer_sensitivity
from onnxprune.errors import OnnxPruneError
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.groups import find_channel_groups
from onnxprune.pipeline import prune


def _loud_and_quiet():
    """Two branches x -> Conv(12 -> 8) -> Relu -> Conv(8 -> 4), summed; the quiet branch's last Conv is scaled by
    0.01, so its hidden channels barely reach the output (filter norms alone cannot tell)."""
    b = Builder(44)
    loud = b.conv(b.relu(b.conv("x", 12, 8, 1)), 8, 4, 1)
    quiet = b.conv(b.relu(b.conv("x", 12, 8, 1)), 8, 4, 1)
    model = b.model([("x", [12, 4, 4])], [b.node("Add", [loud, quiet])])
    for init in model.graph.initializer:
        if init.name == "w12":  # the quiet branch's last weight
            w = np.frombuffer(init.raw_data, np.float32) * 0.01
            init.raw_data = w.astype(np.float32).tobytes()
    return model


def _data(n=96, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 12, 4, 4)).astype(np.float32)}


def _hidden_groups(graph):
    analysis = find_channel_groups(graph)
    by_producer = {g.producers[0]: g for g in analysis.groups if len(g.producers) == 1}
    return analysis, by_producer["conv3"], by_producer["conv10"]


def test_the_branch_that_reaches_the_output_weighs_more():
    model = _loud_and_quiet()
    graph = to_graph(model)
    analysis, loud, quiet = _hidden_groups(graph)
    before = to_model(graph, model).SerializeToString()
    weights = layer_sensitivity(graph, model, [loud, quiet], np.ones(analysis.n_classes), _data())
    assert weights[loud.name] > 3.9 * weights[quiet.name]  # far apart: clipped to [0.5, 2] x the median
    assert to_model(graph, model).SerializeToString() == before  # probes work on copies


def test_sensitivity_moves_the_removals_to_the_quiet_branch():
    model = _loud_and_quiet()
    kept = {}
    for sensitivity in (False, True):
        pruned, report = prune(
            model, remove_ratio=0.25, method="channel", criterion="l2", calib=_data(), compensate=False,
            sensitivity=sensitivity,
        )  # fmt: skip
        kept[sensitivity] = report
        removed = {k: v["removed"] for k, v in report.facts["removed"].items()}
        _, loud, quiet = _hidden_groups(to_graph(model))
        kept[sensitivity] = (removed.get(loud.name, 0), removed.get(quiet.name, 0))
    assert kept[True][0] < kept[False][0] and kept[True][1] > kept[False][1]
    assert kept[True][0] == 0  # the loud branch keeps everything: the quiet one has enough to give


def test_sensitivity_needs_calibration():
    with pytest.raises(OnnxPruneError, match="--sensitivity needs calibration data"):
        prune(_loud_and_quiet(), remove_ratio=0.3, sensitivity=True)


def _split_example():
    import onnx

    from onnxprune.passes.basis import decompose_basis, find_basis_pairs

    model = onnx.load("examples/digits_resnet.onnx")
    graph = to_graph(model)
    decompose_basis(graph, min_channels=4)
    graph = to_graph(to_model(graph, model))
    bases = {p.basis for p in find_basis_pairs(graph)}
    groups = [g for g in find_channel_groups(graph).groups if len(g.producers) == 1 and g.producers[0] in bases]
    return model, graph, groups


def _removal_change(graph, model, name, keep, data):
    """The old probe, by removal: the group cut on a copy, the relative change of the outputs."""
    from onnxprune.passes.remove import remove_channels
    from onnxprune.testing import ort_run

    ref = ort_run(to_model(graph, model), data)
    probe = to_graph(to_model(graph, model))
    remove_channels(probe, plan={name: keep}, analysis=find_channel_groups(probe))
    out = ort_run(to_model(probe, model), data)
    moved = sum(float(np.sum((out[k].astype(np.float64) - r) ** 2)) for k, r in ref.items())
    return moved / sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref.values())


def test_cut_probes_by_mask_equal_probes_by_removal():
    """One session with a mask per layer measures what removing the planned bases on a copy measures."""
    from onnxprune.calibration.sensitivity import CUT_WEIGHT_RANGE, cut_sensitivity

    model, graph, groups = _split_example()
    data = {"image": np.load("examples/digits_calib.npy")[:16]}
    rng = np.random.default_rng(0)
    cuts = {}
    for g in groups[:6]:
        keep = np.sort(rng.choice(len(g.classes), max(1, len(g.classes) // 3), replace=False))
        cuts[g.name] = (keep, 0.01 * (1 + rng.random()))
    facts = {}
    weights = cut_sensitivity(graph, model, cuts, data, budget_s=1e9, facts=facts)
    ratio = {n: _removal_change(graph, model, n, keep, data) / predicted for n, (keep, predicted) in cuts.items()}
    median = np.median(list(ratio.values()))
    expected = {n: float(np.clip(r / median, *CUT_WEIGHT_RANGE)) for n, r in ratio.items()}
    assert facts == {"samples": 16, "probes": 6}
    assert weights.keys() == expected.keys()
    for name in weights:
        assert weights[name] == pytest.approx(expected[name], rel=1e-4), name


def test_cut_probes_take_fewer_samples_past_the_time_budget():
    from onnxprune.calibration.sensitivity import CUT_MIN_SAMPLES, cut_sensitivity

    model, graph, groups = _split_example()
    data = {"image": np.load("examples/digits_calib.npy")[:32]}
    cuts = {g.name: (np.arange(len(g.classes) // 2), 0.01) for g in groups[:4]}
    facts = {}
    weights = cut_sensitivity(graph, model, cuts, data, budget_s=0.0, facts=facts)
    assert facts["samples"] == CUT_MIN_SAMPLES and len(weights) == 4


def test_a_probe_with_nothing_to_mask_measures_no_change():
    """Its docstring promised 0 when nothing is cut; with no maskable group it raised AttributeError instead."""
    from onnxprune.calibration.sensitivity import CutProbe

    model, graph, _ = _split_example()
    probe = CutProbe(graph, model, [], {"image": np.load("examples/digits_calib.npy")[:4]})
    assert probe.samples == 0 and probe.change({"no such group": np.arange(1)}) == 0.0


def test_the_same_probes_are_measured_once(monkeypatch):
    """The guard's bisection prunes one graph with one calibration set up to four more times; the probes of the
    unpruned graph are the same each time (PP-OCRv4's recogniser: 33 s a prune). Measured again when the samples
    or the scores differ."""
    from onnxprune.calibration import sensitivity

    model = _loud_and_quiet()
    graph = to_graph(model)
    analysis, loud, quiet = _hidden_groups(graph)
    scores = np.ones(analysis.n_classes)
    removed = []
    real = sensitivity.remove_channels
    monkeypatch.setattr(sensitivity, "remove_channels", lambda *a, **k: removed.append(1) or real(*a, **k))
    first = layer_sensitivity(graph, model, [loud, quiet], scores, _data(seed=11))
    probes = len(removed)
    assert probes == 4  # two groups, two levels
    again = layer_sensitivity(to_graph(model), model, [loud, quiet], scores.copy(), _data(seed=11))
    assert again == first and len(removed) == probes
    layer_sensitivity(graph, model, [loud, quiet], scores, _data(seed=12))
    layer_sensitivity(graph, model, [loud, quiet], scores * np.arange(1, analysis.n_classes + 1), _data(seed=11))
    assert len(removed) == 3 * probes


def test_with_local_errors_the_weight_is_the_growth_of_a_groups_own_error():
    """Two branches alike but for one loud channel in A: a quiet channel of A is 1 % of A's readers' energy and 25 %
    of B's, and removing it moves the outputs as much. A knapsack over local errors (relative to each group's
    readers) needs A weighted about 25x B to see that; the plain output change weighs them alike."""
    from onnxprune.calibration import criteria
    from onnxprune.calibration.runner import channel_statistics

    b = Builder(0)
    reader = b.rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    ends = []
    for scale in ([10.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]):
        w = np.diag(scale).astype(np.float32)[:, :, None, None]
        y = b.relu(b.node("Conv", ["x", b.const(w), b.const(np.zeros(4, np.float32), "b")], kernel_shape=[1, 1]))
        ends.append(b.node("Conv", [y, b.const(reader), b.const(np.zeros(4, np.float32), "b")], kernel_shape=[1, 1]))
    model = b.model([("x", [4, 4, 4])], [b.head(b.node("Add", ends), 4, classes=3)])
    x = np.abs(np.random.default_rng(1).standard_normal((64, 4, 4, 4))).astype(np.float32)
    graph = to_graph(model)
    analysis = find_channel_groups(graph)
    energy, _ = channel_statistics(to_model(graph, model), {"x": x}, criteria.consumer_inputs(graph, analysis))
    local = criteria.consumer_energy(criteria.Context(graph, analysis, energy=energy))
    first = [n.name for n in graph.nodes if n.op == "Conv"][::2]
    groups = [next(g for g in analysis.groups if g.producers == [name]) for name in first]
    plain = layer_sensitivity(graph, model, groups, local, {"x": x}, levels=(0.25,))
    grown = layer_sensitivity(graph, model, groups, local, {"x": x}, levels=(0.25,), local=local)
    a, b_ = (g.name for g in groups)
    assert 0.67 < plain[a] / plain[b_] < 1.5
    assert grown[a] / grown[b_] > 5  # (two groups: each weight is over their mean, clipped to [0.2, 5])
