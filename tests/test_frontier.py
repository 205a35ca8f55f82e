"""Frontier: tensors computed segment by segment equal those of the whole model, and edits ahead of it take effect."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from light_zoo import load

from onnxprune.calibration.data import Samples
from onnxprune.calibration.frontier import Frontier, shared_tensors
from onnxprune.calibration.runner import run_batches, with_outputs
from onnxprune.graph import to_graph, to_model

EXAMPLE = "examples/digits_resnet.onnx"


def _samples(model, n, seed=0, batch=None):
    inp = model.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    x = np.random.default_rng(seed).standard_normal((n, *dims)).astype(np.float32)
    return Samples.from_arrays({inp.name: x}, batch=batch)


def _whole(model, data, names):
    """The tensors `names` from one run of the whole model per batch, concatenated."""
    found = run_batches(with_outputs(model, names), data, batch_size=4)
    return {n: found[n] for n in names}


@pytest.mark.parametrize("cache_bytes", [1 << 30, 0], ids=["kept", "replayed"])
def test_layer_inputs_in_order_then_outputs_equal_the_whole_model(cache_bytes):
    model = onnx.load(EXAMPLE)
    data = _samples(model, 10)
    graph = to_graph(model)
    frontier = Frontier(graph, model, data, batch_size=4, cache_bytes=cache_bytes)
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm", "MatMul")]
    names = [n.inputs[0].name for n in layers] + [o.name for o in model.graph.output]
    whole = _whole(model, data, names)
    for name in names:
        got = np.concatenate([b[name] for b in frontier.get([name])])
        np.testing.assert_allclose(got, whole[name], rtol=1e-5, atol=1e-5)
    assert len(frontier) == 3  # 10 samples in batches of 4
    if cache_bytes:
        assert not frontier.replaying and frontier.runs <= len(names)
        assert frontier._bytes() < sum(v.nbytes for v in whole.values())  # only the live frontier is kept
    else:
        assert frontier.replaying


def test_a_weight_written_before_its_node_runs_is_the_one_used():
    """The contract a sequential refit relies on: edits ahead of the frontier count, the past is not re-run."""
    model = onnx.load(EXAMPLE)
    data = _samples(model, 6)
    graph = to_graph(model)
    frontier = Frontier(graph, model, data, batch_size=4)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    first, later = convs[0], convs[len(convs) // 2]
    frontier.get([later.inputs[0].name])  # runs everything up to `later`, `first` included
    for node in (first, later):
        w = node.inputs[1].values
        node.inputs[1] = gs.Constant(node.inputs[1].name + "_edited", (w * 0.5).astype(w.dtype))
    out = model.graph.output[0].name
    got = np.concatenate([b[out] for b in frontier.get([out])])
    edited = to_graph(model)
    node = next(n for n in edited.nodes if n.name == later.name)
    node.inputs[1] = gs.Constant(node.inputs[1].name + "_edited", (node.inputs[1].values * 0.5).astype(np.float32))
    expected = _whole(to_model(edited, model), data, [out])[out]  # only `later` edited: `first` had already run
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fixed_batch_real_architecture_runs_in_segments():
    """The onnx package's SqueezeNet (fixed batch 1, concats of parallel branches) through Conv inputs in order."""
    model = load("squeezenet")
    data = _samples(model, 3, batch=1)
    graph = to_graph(model)
    frontier = Frontier(graph, model, data, batch_size=8)
    convs = [n for n in graph.nodes if n.op == "Conv"]
    out = model.graph.output[0].name
    for conv in convs[::5]:
        frontier.get([conv.inputs[0].name])
    got = np.concatenate([b[out] for b in frontier.get([out])])
    np.testing.assert_allclose(got, _whole(model, data, [out])[out], rtol=1e-4, atol=1e-5)
    assert len(frontier) == 3 and not frontier.replaying


def test_an_unknown_tensor_is_a_key_error():
    model = onnx.load(EXAMPLE)
    frontier = Frontier(to_graph(model), model, _samples(model, 2), batch_size=4)
    with pytest.raises(KeyError, match="no node produces 'nowhere'"):
        frontier.get(["nowhere"])


def test_a_segment_fed_tensors_of_different_sizes_runs_optimised():
    """A squeeze-excite gate [N, C, 1, 1] and the features [N, C, H, W] it scales both feed one segment (a
    MobileNetV3 block: the orientation classifier's): its inputs' symbolic dims must not share names. onnxruntime's
    optimiser takes one name for one size; with shared names the refit failed in its NCHWc reorder ("Shape mismatch
    attempting to re-use buffer. {5,64,1,1} != {5,64,7,7}")."""
    from models import Builder

    b, c = Builder(6), 64
    s = b.node("HardSwish", [b.conv("x", 3, c, 3)])
    g = b.conv(b.relu(b.conv(b.node("GlobalAveragePool", [s]), c, 8, 1)), 8, c, 1)
    h = b.node("Mul", [s, b.node("HardSigmoid", [b.node("Add", [g, b.const(np.full((1, c, 1, 1), 0.5))])])])
    h = b.node("HardSwish", [b.conv(h, c, c, 1)])
    h = b.node("HardSwish", [b.conv(h, c, c, 3, group=c)])
    model = b.model([("x", [3, 7, 7])], [b.head(h, c)])
    data = Samples.from_arrays({"x": np.random.default_rng(3).standard_normal((5, 3, 7, 7)).astype(np.float32)})
    frontier = Frontier(to_graph(model), model, data, batch_size=5)
    frontier.get([g, s])  # both kept: the next segment starts from two tensors of different spatial sizes
    out = model.graph.output[0].name
    got = np.concatenate([b[out] for b in frontier.get([out])])
    np.testing.assert_allclose(got, _whole(model, data, [out])[out], rtol=1e-4, atol=1e-4)


def test_a_pruned_graph_borrows_the_unchanged_prefix_from_the_original():
    """Tensors before the first changed layer come from the original's frontier; every tensor still equals the
    pruned model's own (a later conv's weights halved: its input and all before it are shared, its output not)."""
    model = onnx.load(EXAMPLE)
    data = _samples(model, 10)
    reference = to_graph(model)
    graph = to_graph(model)
    conv = [n for n in graph.nodes if n.op == "Conv"][4]
    conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_edited", (conv.inputs[1].values * 0.5).astype(np.float32))
    pruned = to_model(graph, model)
    original = Frontier(reference, model, data, batch_size=4)
    frontier = Frontier(graph, model, data, batch_size=4, source=original)
    layers = [n for n in graph.nodes if n.op in ("Conv", "Gemm")]
    layers = layers[layers.index(conv) :]  # a refit asks for the inputs of changed layers, in order
    names = [n.inputs[0].name for n in layers] + [o.name for o in model.graph.output]
    whole = _whole(pruned, data, names)
    shared = shared_tensors(graph, reference)
    assert conv.inputs[0].name in shared and conv.outputs[0].name not in shared
    for name in names:
        got = np.concatenate([b[name] for b in frontier.get([name])])
        np.testing.assert_allclose(got, whole[name], rtol=1e-5, atol=1e-5)
        if name not in shared:
            original.get([name])  # the source moves on too, as the refit's original frontier does
    assert frontier.borrowed >= 1
    whole_original = _whole(model, data, [model.graph.output[0].name])
    assert not np.allclose(whole[model.graph.output[0].name], whole_original[model.graph.output[0].name])


def test_nothing_is_borrowed_once_the_source_has_dropped_it():
    model = onnx.load(EXAMPLE)
    data = _samples(model, 6)
    original = Frontier(to_graph(model), model, data, batch_size=4)
    out = model.graph.output[0].name
    original.get([out])  # ran to the end: the prefix is gone
    graph = to_graph(model)
    conv = [n for n in graph.nodes if n.op == "Conv"][4]
    conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_edited", (conv.inputs[1].values * 0.5).astype(np.float32))
    frontier = Frontier(graph, model, data, batch_size=4, source=original)
    got = np.concatenate([b[out] for b in frontier.get([out])])
    np.testing.assert_allclose(got, _whole(to_model(graph, model), data, [out])[out], rtol=1e-5, atol=1e-5)
    assert frontier.borrowed == 0
