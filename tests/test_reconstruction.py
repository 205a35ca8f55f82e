"""Channel choice by reconstruction: the error left once the readers are refitted, proven against least squares."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import Builder, basic_residual

from onnxprune.calibration import criteria, runner
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.groups import find_channel_groups
from onnxprune.pipeline import prune


def _two_layers(mix: np.ndarray, seed: int = 0):
    """x [3, 4, 4] -> 1x1 Conv (3 -> len(mix)) whose output channels are mix @ x, -> 1x1 Conv (-> 4) -> head."""
    b = Builder(seed)
    w1 = mix.astype(np.float32)[:, :, None, None]
    y = b.node("Conv", ["x", b.const(w1), b.const(np.zeros(len(mix), np.float32), "b")], kernel_shape=[1, 1])
    w2 = b.rng.standard_normal((4, len(mix), 1, 1)).astype(np.float32)
    z = b.node("Conv", [y, b.const(w2), b.const(np.zeros(4, np.float32), "b")], kernel_shape=[1, 1])
    return b.model([("x", [3, 4, 4])], [b.head(b.relu(z), 4, classes=3)])


def _curves(model, data):
    graph = to_graph(model)
    analysis = find_channel_groups(graph)
    axes = criteria.consumer_inputs(graph, analysis)
    covariances = runner.channel_covariances(to_model(graph, model), data, axes)
    context = criteria.Context(graph, analysis, covariances=covariances)
    first = next(n.name for n in graph.nodes if n.op == "Conv")
    group = next(g for g in analysis.groups if g.producers == [first])
    return graph, group, axes, criteria.reconstruction_curves(context)[group.name]


def test_a_channel_its_neighbours_predict_goes_free_however_loud():
    # channel 3 is 5 x (channel 0 + channel 1): the loudest; of channels 0, 1 and 3 any one is free to remove once
    # the reader is refitted, channel 2 (as quiet as 0 and 1) is not
    mix = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [5, 5, 0]], float)
    model = _two_layers(mix)
    data = {"x": np.random.default_rng(1).standard_normal((64, 3, 4, 4)).astype(np.float32)}
    _, group, _, (order, error) = _curves(model, data)
    assert order[-1] in group.classes[[0, 1, 3]]
    assert error[3] < 1e-6 and error[2] > 1e3 * error[3]  # three kept: exact; two kept: a direction lost
    assert np.all(np.diff(error[1:]) <= 1e-12)  # keeping more never predicts more error


def test_the_error_is_the_least_squares_residual_of_the_reader():
    # 6 correlated channels from 3 inputs plus noise: for every k, the curve equals the relative residual of the
    # best affine map from the first k channels kept to the reader's output, computed here from the tensors
    rng = np.random.default_rng(2)
    mix = rng.standard_normal((6, 3))
    model = _two_layers(mix)
    x = rng.standard_normal((48, 3, 4, 4)).astype(np.float32)
    x += 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    graph, group, axes, (order, error) = _curves(model, {"x": x})
    tensor = next(n.outputs[0].name for n in graph.nodes if n.op == "Conv")
    sess = ort.InferenceSession(runner.with_outputs(model, [tensor]).SerializeToString())
    h = np.moveaxis(sess.run([tensor], {"x": x})[0], 1, -1).reshape(-1, 6).astype(np.float64)
    reader = next(n for n in graph.nodes if n.inputs[0].name == tensor)
    w = reader.inputs[1].values.reshape(4, 6).astype(np.float64)
    y = h @ w.T
    total = np.sum((y - y.mean(0)) ** 2)
    position = {int(c): i for i, c in enumerate(group.classes)}
    for k in range(1, 6):
        kept = [position[int(c)] for c in order[:k]]
        design = np.c_[h[:, kept], np.ones(len(h))]
        fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        assert error[k] == pytest.approx(np.sum((y - fit) ** 2) / total, rel=1e-4, abs=1e-6)


def test_covariances_computed_in_the_session_equal_those_of_the_whole_tensors(monkeypatch):
    model = basic_residual()
    graph = to_graph(model)
    axes = criteria.consumer_inputs(graph, find_channel_groups(graph))
    data = {model.graph.input[0].name: np.random.default_rng(3).standard_normal((10, 3, 8, 8)).astype(np.float32)}
    inside = runner.channel_covariances(model, data, axes, batch_size=4)
    monkeypatch.setattr(runner, "_COVARIANCES", {})  # not the remembered ones
    monkeypatch.setattr(runner, "_with_grams", lambda m, a: (m, {}))  # every tensor comes out whole
    monkeypatch.setattr(runner, "row_budget", lambda n: 10**9)  # and no position is left out
    whole = runner.channel_covariances(model, data, axes, batch_size=4)
    assert set(inside) == set(whole) == set(axes)
    for name in axes:
        np.testing.assert_allclose(inside[name], whole[name], rtol=1e-4, atol=1e-5 * np.abs(whole[name]).max())


def test_channel_removal_by_reconstruction_is_the_default_and_keeps_the_model_valid():
    model = basic_residual()
    name = model.graph.input[0].name
    data = {name: np.random.default_rng(4).standard_normal((96, 3, 8, 8)).astype(np.float32)}
    out, report = prune(model, remove_ratio=0.5, method="channel", calib=data, max_drop=1.0, latency_batch=0)
    assert report.facts["criterion"] == "reconstruction"
    assert report.facts["plan_source"].startswith("knapsack over channels, by the error their readers keep")
    assert 0.5 <= report.facts["ratio_achieved"] <= 0.53  # a stream channel of 8 is 2 points here
    onnx.checker.check_model(out, full_check=True)
    sess = ort.InferenceSession(out.SerializeToString())
    for batch in (1, 3):
        assert sess.run(None, {name: data[name][:batch]})[0].shape[0] == batch


def test_covariances_are_remembered_by_content(monkeypatch):
    # `best` makes up to four channel results from one graph and one data set: one pass serves them
    monkeypatch.setattr(runner, "_COVARIANCES", {})
    model = basic_residual()
    graph = to_graph(model)
    axes = criteria.consumer_inputs(graph, find_channel_groups(graph))
    x = np.random.default_rng(5).standard_normal((6, 3, 8, 8)).astype(np.float32)
    first = runner.channel_covariances(model, {"x": x}, axes)

    def no_pass(*args, **kwargs):
        raise AssertionError("ran the model again")

    monkeypatch.setattr(runner, "stream", no_pass)
    again = runner.channel_covariances(model, {"x": x.copy()}, axes)
    assert all(np.array_equal(first[k], again[k]) for k in axes)
    with pytest.raises(AssertionError, match="ran the model again"):  # other samples: computed anew
        runner.channel_covariances(model, {"x": x + 1}, axes)


@pytest.mark.parametrize("method", ["channel", "basis", "double"])
def test_the_methods_take_the_criterion_with_calibration_data(method):
    model = basic_residual()
    name = model.graph.input[0].name
    data = {name: np.random.default_rng(6).standard_normal((48, 3, 8, 8)).astype(np.float32)}
    out, report = prune(
        model, remove_ratio=0.3, method=method, criterion="reconstruction", calib=data, max_drop=0.99, latency_batch=0
    )
    assert report.facts["criterion"] == "reconstruction"
    onnx.checker.check_model(out, full_check=True)


def test_the_criterion_without_calibration_data_or_with_auto_is_a_one_line_error():
    # auto ranks channels against bases: the error left after the refit made every channel look cheap (a new user
    # saw 0 basis vectors removed and a model 1.4x slower)
    from onnxprune.errors import OnnxPruneError

    with pytest.raises(OnnxPruneError, match="--criterion reconstruction needs calibration data"):
        prune(basic_residual(), remove_ratio=0.3, method="channel", criterion="reconstruction")
    data = {"x": np.zeros((8, 3, 8, 8), np.float32)}
    with pytest.raises(OnnxPruneError, match="does not compare with the bases' scores that --method auto"):
        prune(basic_residual(), remove_ratio=0.3, method="auto", criterion="reconstruction", calib=data)
