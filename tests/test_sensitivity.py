"""--sensitivity: a layer whose removals move the outputs more is weighed up, and gives up fewer channels."""

import numpy as np
import pytest
from models import Builder

from onnxprune import prune
from onnxprune.calibration.sensitivity import layer_sensitivity
from onnxprune.errors import OnnxPruneError
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.groups import find_channel_groups


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
