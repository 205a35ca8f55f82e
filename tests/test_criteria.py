"""Criteria on constructed cases with a known answer: a quiet channel that carries the label, a loud one of noise."""

import numpy as np
import pytest
from models import Builder

from onnxprune.calibration import criteria
from onnxprune.calibration.runner import channel_statistics
from onnxprune.errors import OnnxPruneError
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.groups import find_channel_groups
from onnxprune.pipeline import prune


def _informative_vs_loud(n=400, seed=0):
    """Input channel 0 carries the class (+-0.3), channel 1 is loud noise (std 5), channel 2 a copy of 1.

    A 1x1 Conv passes them on with weights 1, 3, 3: norm criteria favour the loud channels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = np.zeros((n, 3, 4, 4), np.float32)
    x[:, 0] = (labels * 0.6 - 0.3)[:, None, None] + rng.normal(0, 0.05, (n, 4, 4))
    x[:, 1] = rng.normal(0, 5, (n, 1, 1)) + rng.normal(0, 0.1, (n, 4, 4))
    x[:, 2] = x[:, 1] + rng.normal(0, 0.5, (n, 4, 4))
    b = Builder(3)
    w = np.diag([1.0, 3.0, 3.0]).astype(np.float32)[:, :, None, None]
    y = b.relu(b.node("Conv", ["x", b.const(w)], kernel_shape=[1, 1]))
    model = b.model([("x", [3, 4, 4])], [b.head(y, 3, classes=2)])
    return model, {"x": x}, labels


def _scores(name, model, data, labels):
    graph = to_graph(model)
    analysis = find_channel_groups(graph)
    axes = criteria.energy_tensors(analysis)
    energy, pooled = channel_statistics(to_model(graph, model), data, axes, pooled=True)
    context = criteria.Context(graph, analysis, {}, [], energy, pooled, labels)
    group = next(g for g in analysis.groups if g.producers == ["conv2"])
    return criteria.importance(name, context)[group.classes]


@pytest.mark.parametrize("name", ["cmi", "discriminant"])
def test_label_criteria_keep_the_informative_channel(name):
    scores = _scores(name, *_informative_vs_loud())
    assert scores.argmax() == 0, scores


def test_the_cmi_search_is_a_step_of_its_own():
    # it can be the longest part of a prune (89 of 150 s on a real classifier): the time line must be able to name it
    from onnxprune.progress import timed

    with timed() as spent:
        _scores("cmi", *_informative_vs_loud())
    assert "channel scores (cmi)" in spent


@pytest.mark.parametrize("name", ["l1", "l2", "energy"])
def test_norm_criteria_prefer_the_loud_channels(name):
    scores = _scores(name, *_informative_vs_loud())
    assert scores[0] < scores[1:].min(), scores


def test_cmi_ranks_a_redundant_copy_below_new_information():
    model, data, labels = _informative_vs_loud()
    # channel 2 is channel 1 plus noise: after 0 and one of {1, 2}, the other adds little; both stay below 0
    scores = _scores("cmi", model, data, labels)
    assert scores[0] == 3 and sorted(scores) == [1, 2, 3]


@pytest.mark.parametrize("name", ["cmi", "discriminant"])
def test_label_criteria_prune_end_to_end_with_and_without_labels(name):
    model, data, labels = _informative_vs_loud(n=200)
    for given in (labels, None):
        pruned, report = prune(model, remove_ratio=0.3, method="channel", criterion=name, calib=data, labels=given)
        assert report.facts["criterion"] == name and report.facts["params_removed"] >= 0.29


def test_label_criteria_need_calibration_data():
    model, _, _ = _informative_vs_loud(n=10)
    with pytest.raises(OnnxPruneError, match="--criterion cmi needs calibration data"):
        prune(model, remove_ratio=0.3, method="channel", criterion="cmi")


@pytest.mark.parametrize(
    "method, calibrated, expected",
    [
        ("channel", True, "reconstruction"),
        ("auto", True, "cmi"),
        ("basis", True, "energy"),
        ("double", True, "energy"),
        ("channel", False, "l2"),
    ],
)
def test_default_criterion(method, calibrated, expected):
    model, data, _ = _informative_vs_loud(n=100)
    report = prune(model, remove_ratio=0.0, method=method, calib=data if calibrated else None)[1]
    assert report.facts["criterion"] == expected


def test_the_greedy_cmi_order_is_remembered_by_content(monkeypatch):
    from onnxprune.calibration import criteria

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((5, 12))
    grams = np.stack([np.outer(f, f) / (f @ f) for f in feats])
    y = np.eye(12) / 12
    monkeypatch.setattr(criteria, "_CMI_ORDERS", {})
    first = criteria._greedy_cmi(grams, y)
    assert sorted(first) == list(range(5)) and first == criteria._greedy_cmi_search(grams, y)
    calls = []
    monkeypatch.setattr(criteria, "_greedy_cmi_search", lambda g, t: calls.append(1) or [])
    assert criteria._greedy_cmi(grams.copy(), y) == first and not calls  # same content: not searched again
    criteria._greedy_cmi(grams[::-1].copy(), y)
    assert calls == [1]  # other content: searched


def test_a_label_criterion_on_a_model_without_class_scores(caplog):
    """A sequence head ([W*N, classes] rows, not one row a sample): the default cmi becomes energy with one
    warning; cmi asked for by name is a one-line error (was an internal broadcasting error, exit 3)."""
    from models import sequence_head

    model = sequence_head()
    calib = {"x": np.random.default_rng(0).standard_normal((40, 3, 4, 12)).astype(np.float32)}
    options = dict(remove_ratio=0.2, method="auto", calib=calib, batch_size=8)
    with caplog.at_level("WARNING"):
        _, report = prune(model, **options)
    assert report.facts["criterion"] == "energy"
    assert sum("criterion energy instead of cmi" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(OnnxPruneError, match="--criterion cmi needs class labels"):
        prune(model, criterion="cmi", **options)


def _grams_and_labels(channels=40, n=128, seed=0):
    """Gram matrices of `channels` pooled features on `n` samples: channel 0 constant, the rest noisy mixtures."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, n)
    x = rng.standard_normal((n, 6)) @ rng.standard_normal((6, channels)) + 0.3 * rng.standard_normal((n, channels))
    x[:, 1:4] += labels[:, None]
    x[:, 0] = 1.0  # carries nothing
    y = (labels[:, None] == labels[None, :]).astype(np.float64)
    return np.stack([criteria._gram(x[:, c]) for c in range(channels)]), y / np.trace(y)


def test_once_the_samples_are_told_apart_the_cmi_order_is_the_index_order():
    # a few channels tell the samples apart (H(S) = log2 n); every later gain is zero up to rounding, which chose
    # among the rest by noise: they follow in index order (other orders measured: `_greedy_cmi_search`)
    grams, y = _grams_and_labels()
    order = criteria._greedy_cmi_search(grams, y)
    head = next(i for i in range(len(order)) if order[i:] == sorted(order[i:]))
    assert sorted(order) == list(range(len(grams))) and 0 < head < len(order) // 2, order
    assert 0 not in order[:head]  # the constant channel is not among those the search chose


def _direct_cmi_order(grams, y):
    """The greedy order from the Hadamard products themselves: I(f; y | S) = H(f, S) + H(y, S) - H(f, y, S) - H(S)."""
    h = criteria._renyi
    kept, order = np.full_like(y, 1.0 / len(y)), []
    while len(order) < len(grams):
        gains = {
            c: h(criteria._joint(g, kept)) + h(criteria._joint(y, kept)) - h(criteria._joint(g * y, kept)) - h(kept)
            for c, g in enumerate(grams)
            if c not in order
        }
        best = max(gains, key=gains.get)
        if order and gains[best] < criteria.CMI_SATURATED:
            return order + sorted(gains)
        order.append(best)
        kept = criteria._joint(grams[best], kept)
    return order


def test_the_cmi_search_is_the_direct_greedy_search():
    # packed squares, one product for both entropies, rows dropped as channels are taken: the same order
    for seed in (1, 2):
        grams, y = _grams_and_labels(channels=14, n=40, seed=seed)
        assert criteria._greedy_cmi_search(grams, y) == _direct_cmi_order(grams, y)
