"""remove_channels on the zoo: removal equals masking, the result is valid with dynamic batch, blockers report."""

import numpy as np
import onnx
import pytest
from models import ZOO, Builder, attention_block, attention_sequence, channel_shuffle, grouped_conv, sigmoid_consumers
from onnx import numpy_helper

from onnxprune.budget import count
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.testing import (
    apply_pass,
    assert_outputs_close,
    every_other_channel,
    mask_channels,
    ort_run,
    random_feeds,
)


def cleaned(model: onnx.ModelProto) -> onnx.ModelProto:
    return apply_pass(model, cleanup)[0]


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
def test_remove_equals_mask(build):
    model = cleaned(build())
    plan = every_other_channel(find_channel_groups(to_graph(model)))
    assert plan, "the zoo graph has something to prune"
    pruned, report = apply_pass(model, remove_channels, plan=plan)
    assert report.counts["channels_removed"] > 0
    onnx.checker.check_model(pruned, full_check=True)
    reference = mask_channels(model, plan)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        # float32 through a few convs; folded biases reassociate sums: rtol 1e-4, atol 1e-5 as the style guide says
        assert_outputs_close(ort_run(pruned, feeds), ort_run(reference, feeds), rtol=1e-4, atol=1e-5)
    assert [i.name for i in pruned.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert sum(t.ByteSize() for t in pruned.graph.initializer) < sum(t.ByteSize() for t in model.graph.initializer)


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
def test_removing_nothing_changes_nothing(build):
    model = cleaned(build())
    pruned, report = apply_pass(model, remove_channels, plan={})
    assert not report.counts
    feeds = random_feeds(model, batch=2)
    assert_outputs_close(ort_run(pruned, feeds), ort_run(model, feeds), rtol=0, atol=0)


@pytest.mark.parametrize("build", ZOO, ids=lambda b: b.__name__)
def test_cleanup_is_exact_and_idempotent(build):
    model = build()
    graph = to_graph(model)
    first = cleanup(graph)
    once = to_model(first.graph, model)
    feeds = random_feeds(model, batch=3)
    assert_outputs_close(ort_run(once, feeds), ort_run(model, feeds), rtol=1e-4, atol=1e-5)
    again = cleanup(to_graph(once))
    assert again.modified is False


def test_bn_is_folded():
    model = cleaned(ZOO[0]())
    assert not [n for n in model.graph.node if n.op_type == "BatchNormalization"]


@pytest.mark.parametrize(
    "build, producer, reason",
    [
        (grouped_conv, "conv2", "grouped Conv (group=2) is not supported"),
        (channel_shuffle, "conv2", "Reshape splits the channel axis"),
    ],
)
def test_blockers_are_reported(build, producer, reason):
    analysis = find_channel_groups(to_graph(cleaned(build())))
    group = next(g for g in analysis.groups if g.producers == [producer])
    assert len(group.blocked) == len(group.classes)
    assert reason in next(iter(group.blocked.values()))


def test_graph_output_blocks_its_producer():
    analysis = find_channel_groups(to_graph(cleaned(ZOO[0]())))
    last = analysis.groups[-1]
    assert "reaches graph output" in next(iter(last.blocked.values()))


def test_sigmoid_constant_is_folded_where_exact_and_reported_where_not():
    model = cleaned(sigmoid_consumers())
    plan = every_other_channel(find_channel_groups(to_graph(model)))
    pruned, report = apply_pass(model, remove_channels, plan=plan)
    assert report.counts["biases_folded"] == 1
    assert report.counts["folds_skipped"] == 1
    assert any("padded Conv" in s.reason for s in report.skipped)


def test_shared_weight_is_not_sliced_under_another_node():
    b = Builder(20)
    x = b.relu(b.conv("x", 3, 8))
    w = b.const(np.random.default_rng(0).standard_normal((6, 8, 1, 1)).astype(np.float32))
    y = b.node("Conv", [x, w], kernel_shape=[1, 1])
    z = b.node("Conv", [b.relu(b.conv("x", 3, 8)), w], kernel_shape=[1, 1])
    model = b.model([("x", [3, 8, 8])], [b.node("Add", [y, z])])
    analysis = find_channel_groups(to_graph(model))
    plan = every_other_channel(analysis)
    # the two convs feeding the shared 1x1 weight form one group: its input axis is sliced once for both readers
    plan = {k: v for k, v in plan.items() if len(next(g for g in analysis.groups if g.name == k).producers) == 2}
    assert len(plan) == 1 and len(next(iter(plan.values()))) < 8, "the test removes channels under the shared weight"
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    feeds = random_feeds(model, batch=2)
    assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_hidden_units_and_inputs_are_removed(op):
    """A recurrent layer's hidden units are a group (the same unit in both directions), its input width follows the
    conv channels before it, every gate block is sliced alike, and a zero-fill initial state becomes the default."""
    from models import recurrent_head

    model = cleaned(recurrent_head(op))
    analysis = find_channel_groups(to_graph(model))
    node = next(n for n in model.graph.node if n.op_type == op)
    units = next(g for g in analysis.groups if g.producers == [node.name])
    assert len(units.classes) == 12 and not units.blocked
    plan = every_other_channel(analysis)
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    after = next(n for n in pruned.graph.node if n.op_type == op)
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    assert next(a.i for a in after.attribute if a.name == "hidden_size") == 6
    assert weights[after.input[1]].shape == (2, gates * 6, 8)  # 16 conv channels -> 8, 12 units -> 6
    assert weights[after.input[2]].shape == (2, gates * 6, 6)
    assert weights[after.input[3]].shape == (2, 2 * gates * 6)
    assert all(name == "" for name in after.input[5:])  # the ConstantOfShape zero state: the op's own default
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_feeds(model, batch=2, seed=3)
    assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


def test_recurrent_layer_with_a_state_it_cannot_follow_blocks_with_the_reason():
    """An initial state that is not a zero fill blocks the units, with the reason: a removed unit would not stay 0."""
    from models import recurrent_head

    model = recurrent_head("LSTM")
    fill = next(n for n in model.graph.node if n.op_type == "ConstantOfShape")
    fill.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.ones(1, np.float32))))
    analysis = find_channel_groups(to_graph(model))
    assert any("initial state" in why and "not a zero fill" in why for _, why in analysis.blockers)
    lstm = next(n.name for n in model.graph.node if n.op_type == "LSTM")
    assert all(g.blocked for g in analysis.groups if g.producers == [lstm])


@pytest.mark.parametrize("packed", [True, False], ids=["packed-qkv", "separate-qkv"])
def test_attention_heads_go_whole(packed):
    """A head is one channel: its Q, K and V columns and its rows of the output projection go together; the head
    count in the Reshape targets follows, and the attention products' MACs shrink with the heads."""
    model = cleaned(attention_block(packed=packed))
    analysis = find_channel_groups(to_graph(model))
    qkv = [g for g in analysis.groups if g.producers[0].startswith("matmul") and len(g.classes) == 4]
    assert len(qkv) == 1 and not qkv[0].blocked, [(g.producers, len(g.classes)) for g in analysis.groups]
    assert len(qkv[0].producers) == (1 if packed else 3)
    pruned, _ = apply_pass(model, remove_channels, plan={qkv[0].name: np.array([1, 3])})
    weights = {t.name: numpy_helper.to_array(t).shape for t in pruned.graph.initializer}
    shapes = {n.name: weights.get(n.input[1]) for n in pruned.graph.node if n.op_type == "MatMul"}
    assert [shapes[p] for p in qkv[0].producers] == ([(16, 24)] if packed else [(16, 8)] * 3), shapes
    feeds = random_feeds(model, batch=3, seed=0)
    reference = mask_channels(model, {qkv[0].name: np.array([1, 3])})
    assert_outputs_close(ort_run(pruned, feeds), ort_run(reference, feeds), rtol=1e-4, atol=1e-5)
    # MACs: patch Conv 16 x 16 x 12, qkv 16 x 16 x 48, projection 16 x 16 x 16, MLP 2 x 16 x 16 x 24, Gemm 16 x 4, and
    # the products Q K^T and softmax(.) V, heads x L x L x head dim each
    weights = 16 * 16 * 12 + 16 * 16 * 48 + 16 * 16 * 16 + 2 * 16 * 16 * 24 + 16 * 4
    assert count(model)[1] == weights + 2 * 4 * 16 * 16 * 4
    assert count(pruned)[1] == weights - 16 * 16 * 24 - 16 * 8 * 16 + 2 * 2 * 16 * 16 * 4


def test_attention_heads_over_a_dynamic_sequence():
    """BERT's layout over a dynamic sequence with a padding mask: heads go whole at every sequence length."""
    model = cleaned(attention_sequence())
    analysis = find_channel_groups(to_graph(model))
    heads = next(g for g in analysis.groups if len(g.producers) == 3)
    assert len(heads.classes) == 4 and not heads.blocked
    plan = {heads.name: np.array([0, 2, 3])}
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    onnx.checker.check_model(pruned, full_check=True)
    reference = mask_channels(model, plan)
    for batch, seq in ((1, 3), (2, 11)):
        feeds = random_feeds(model, batch=batch, seed=seq, dims={"seq": seq})
        feeds["mask"] = (feeds["mask"] > -0.5).astype(np.float32)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(reference, feeds), rtol=1e-4, atol=1e-5)
