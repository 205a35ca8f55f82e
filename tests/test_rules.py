"""One case per op of the table: a producer -> op -> 1x1 consumer; removal equals masking through the op."""

import numpy as np
import pytest
from models import Builder

from onnxprune import rules
from onnxprune.graph import to_graph
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

C = 8


def _unary(op, **attrs):
    def build(b, x):
        return b.node(op, [x], **attrs)

    return build


def _with_const(op, shape):
    def build(b, x):
        value = np.random.default_rng(1).uniform(0.5, 1.5, shape).astype(np.float32)
        return b.node(op, [x, b.const(value, "k")])

    return build


RULE_CASES = {
    "Relu": _unary("Relu"),
    "LeakyRelu": _unary("LeakyRelu", alpha=0.1),
    "Elu": _unary("Elu"),
    "Selu": _unary("Selu"),
    "Sigmoid": _unary("Sigmoid"),
    "HardSigmoid": _unary("HardSigmoid"),
    "HardSwish": _unary("HardSwish"),
    "Tanh": _unary("Tanh"),
    "Softplus": _unary("Softplus"),
    "Softsign": _unary("Softsign"),
    "Abs": _unary("Abs"),
    "Neg": _unary("Neg"),
    "Identity": _unary("Identity"),
    "Dropout": _unary("Dropout"),
    "Gelu": _unary("Gelu"),
    "Erf": _unary("Erf"),
    "Mish": _unary("Mish"),
    "Cast": _unary("Cast", to=1),
    "Clip": lambda b, x: b.node("Clip", [x, b.const(np.float32(-0.5), "lo"), b.const(np.float32(0.7), "hi")]),
    "MaxPool": _unary("MaxPool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "AveragePool": _unary("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
    "LpPool": _unary("LpPool", kernel_shape=[2, 2], strides=[2, 2]),
    "GlobalAveragePool": _unary("GlobalAveragePool"),
    "GlobalMaxPool": _unary("GlobalMaxPool"),
    "GlobalLpPool": _unary("GlobalLpPool"),
    "Add": _with_const("Add", (C, 1, 1)),
    "Sub": _with_const("Sub", (1, C, 1, 1)),
    "Mul": _with_const("Mul", (C, 1, 1)),
    "Div": _with_const("Div", (C, 1, 1)),
    "Max": _with_const("Max", (C, 1, 1)),
    "Min": _with_const("Min", (1,)),
    "Pow": _with_const("Pow", (1,)),
    "Sum": lambda b, x: b.node("Sum", [x, b.relu(x)]),
    "Mean": lambda b, x: b.node("Mean", [x, b.relu(x)]),
    "PRelu": _with_const("PRelu", (C, 1, 1)),
    "BatchNormalization": lambda b, x: b.bn(x, C),
    "InstanceNormalization": lambda b, x: b.node(
        "InstanceNormalization", [x, b.const(np.ones(C) * 1.5, "s"), b.const(np.ones(C) * 0.2, "b")]
    ),
    "Conv": lambda b, x: b.conv(x, C, C, 3, group=C),
    "ConvTranspose": lambda b, x: b.node("ConvTranspose", [x, b.const(np.ones((C, C, 1, 1)) * 0.1)]),
    "Resize": lambda b, x: b.node("Resize", [x, "", b.const(np.array([1, 1, 2, 2], np.float32), "sc")], mode="nearest"),
    "Upsample": None,  # deprecated since opset 10; same rule as Resize
    "Pad": lambda b, x: b.node("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "p")], mode="reflect"),
    "ReduceMean": lambda b, x: b.node("ReduceMean", [x], axes=[2, 3]),
    "ReduceMax": lambda b, x: b.node("ReduceMax", [x], axes=[3]),
    "ReduceMin": lambda b, x: b.node("ReduceMin", [x], axes=[2]),
    "ReduceSum": lambda b, x: b.node("ReduceSum", [x, b.const(np.array([2], np.int64), "ax")]),
    "Softmax": _unary("Softmax", axis=3),
    "LogSoftmax": _unary("LogSoftmax", axis=2),
    "Hardmax": _unary("Hardmax", axis=3),
    "Concat": lambda b, x: b.node("Concat", [b.conv(x, C, 3, 1), b.conv(x, C, 5, 1)], axis=1),
    "Split": lambda b, x: b.node(
        "Concat", b.node("Split", [x, b.const(np.array([3, 5], np.int64), "s")], n_out=2, axis=1)[::-1], axis=1
    ),
    "Slice": lambda b, x: b.node("Concat", [_slice(b, x, 5, 8), _slice(b, x, 0, 5)], axis=1),
    "Transpose": lambda b, x: b.node("Transpose", [b.node("Transpose", [x], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2]),
    "Squeeze": lambda b, x: b.node(
        "Unsqueeze",
        [
            b.node("Squeeze", [b.node("GlobalAveragePool", [x]), b.const(np.array([3], np.int64))]),
            b.const(np.array([3], np.int64)),
        ],
    ),
    "Unsqueeze": None,  # covered with Squeeze
    "Shape": lambda b, x: b.node(  # x * batch size: the Shape only reads the batch
        "Mul", [x, b.node("Cast", [b.node("Gather", [b.node("Shape", [x]), b.const(np.array(0), "i")], axis=0)], to=1)]
    ),
    "Size": None,  # blocks unless folded: test_blockers
    "DepthToSpace": lambda b, x: b.node("SpaceToDepth", [b.node("DepthToSpace", [x], blocksize=2)], blocksize=2),
    "SpaceToDepth": lambda b, x: b.node(  # CRD: DepthToSpace is then no inverse, the channels come back permuted
        "DepthToSpace", [b.node("SpaceToDepth", [x], blocksize=2)], blocksize=2, mode="CRD"
    ),
    "Flatten": lambda b, x: b.node("Reshape", [b.node("Flatten", [x]), b.const(np.array([-1, C, 8, 8], np.int64))]),
    "Reshape": None,  # covered with Flatten; targets computed from Shape: test_reshape_targets_...
    "Gemm": lambda b, x: b.node(  # pooled -> [N, C] -> Gemm (transB) -> [N, C, 1, 1]
        "Reshape",
        [
            b.node(
                "Gemm",
                [
                    b.node("Flatten", [b.node("GlobalAveragePool", [x])]),
                    b.const(b.rng.uniform(-1, 1, (C, C))),
                    b.const(b.rng.uniform(-1, 1, C)),
                ],
                transB=1,
            ),
            b.const(np.array([-1, C, 1, 1], np.int64)),
        ],
    ),
    "MatMul": lambda b, x: b.node(  # channels last -> MatMul [C, C] -> channels first
        "Transpose",
        [b.node("MatMul", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), b.const(b.rng.uniform(-1, 1, (C, C)))])],
        perm=[0, 3, 1, 2],
    ),
    "Gather": lambda b, x: b.node(  # rows picked (and reordered) by constant indices; a scalar index drops its axis
        "Unsqueeze",
        [
            b.node(
                "Gather",
                [
                    b.node("Gather", [x, b.const(np.array([7, 0, 3, 3, 5], np.int64), "i")], axis=2),
                    b.const(np.int64(1)),
                ],
                axis=3,
            ),
            b.const(np.array([3], np.int64), "ax"),
        ],
    ),
    "LRN": None,  # always blocks: test_lrn_blocks
    "LayerNormalization": None,  # over the channels of tokens: token_block and convnext_like in the zoo (test_remove)
    "com.microsoft::BiasGelu": lambda b, x: _channels_last(b, x, "BiasGelu", bias=True),
    "com.microsoft::FastGelu": lambda b, x: _channels_last(b, x, "FastGelu", bias=True),
    "com.microsoft::Gelu": lambda b, x: _channels_last(b, x, "Gelu"),
    "com.microsoft::QuickGelu": lambda b, x: _channels_last(b, x, "QuickGelu", alpha=1.5),
    "LSTM": lambda b, x: _recurrent_case(b, x, "LSTM"),  # also the zoo's recurrent_head (test_remove)
    "GRU": lambda b, x: _recurrent_case(b, x, "GRU"),
    "RNN": lambda b, x: _recurrent_case(b, x, "RNN"),
}


def _channels_last(b, x, op, *, bias=False, **attrs):
    """[N, C, 8, 8] -> NHWC -> an onnxruntime contrib op (bias [C] on the last axis) -> NCHW again."""
    inputs = [b.node("Transpose", [x], perm=[0, 2, 3, 1])]
    if bias:
        inputs.append(b.const(b.rng.uniform(-1, 1, C)))
    y = b.node(op, inputs, domain="com.microsoft", **attrs)
    return b.node("Transpose", [y], perm=[0, 3, 1, 2])


def _recurrent_case(b, x, op):
    """[N, C, 8, 8] -> rows averaged -> [8, N, C] sequence -> op with C hidden units -> [N, C, 8, 1] again."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    seq = b.node("Transpose", [b.node("ReduceMean", [x], axes=[2], keepdims=0)], perm=[2, 0, 1])
    w, r = (b.rng.uniform(-0.4, 0.4, (1, gates * C, C)) for _ in range(2))
    bias = b.rng.uniform(-0.4, 0.4, (1, 2 * gates * C))
    y = b.node(op, [seq, b.const(w), b.const(r), b.const(bias)], n_out=2, hidden_size=C)[0]  # [8, 1, N, C]
    back = b.node("Transpose", [b.node("Squeeze", [y, b.const(np.array([1], np.int64), "ax")])], perm=[1, 2, 0])
    return b.node("Unsqueeze", [back, b.const(np.array([3], np.int64), "ax")])


OPSETS = {"Gelu": 20, "Mish": 18}  # ops newer than the zoo's opset 17


def _slice(b, x, start, end):
    return b.node(
        "Slice",
        [
            x,
            b.const(np.array([start], np.int64), "st"),
            b.const(np.array([end], np.int64), "en"),
            b.const(np.array([1], np.int64), "ax"),
        ],
    )


def _model(op):
    b = Builder(3)
    x = b.relu(b.conv("x", 3, C))
    y = RULE_CASES[op](b, x)
    consumer = b.conv(y, C, 5, 1)
    return b.model([("x", [3, 8, 8])], [b.node("GlobalAveragePool", [consumer])], opset=OPSETS.get(op, 17))


def test_every_rule_has_a_case():
    assert set(rules.registered_ops()) <= set(RULE_CASES)


@pytest.mark.parametrize("op", [op for op, case in RULE_CASES.items() if case is not None])
def test_remove_equals_mask_through(op):
    model = _model(op)
    analysis = find_channel_groups(to_graph(model))
    plan = every_other_channel(analysis)
    first = analysis.groups[0].name
    assert first in plan, f"channels of {first} should be removable through {op}: {analysis.blockers}"
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "op, attrs, reason",
    [
        ("LRN", {"size": 3}, "LRN normalises across neighbouring channels"),
        ("Softmax", {"axis": 1}, "Softmax normalises over the channel axis"),
        ("ReduceMean", {"axes": [1]}, "ReduceMean reduces over the channel axis"),
        ("Einsum", {"equation": "nchw->nchw"}, "no channel rule for op 'Einsum'"),
    ],
)
def test_blockers(op, attrs, reason):
    b = Builder(4)
    x = b.relu(b.conv("x", 3, C))
    y = b.node(op, [x], **attrs)
    model = b.model(
        [("x", [3, 8, 8])], [b.node("ReduceMean", [b.conv(y, y and C, 5, 1) if op != "ReduceMean" else y], axes=[1])]
    )
    analysis = find_channel_groups(to_graph(model))
    group = analysis.groups[0]
    assert reason in next(iter(group.blocked.values()))


def test_clip_bounds_of_relu_and_clip():
    import onnx_graphsurgeon as gs

    from onnxprune.rules import clip_bounds

    x, y = gs.Variable("x", np.float32), gs.Variable("y", np.float32)
    lo, hi = gs.Constant("lo", np.array(0.0, np.float32)), gs.Constant("hi", np.array(6.0, np.float32))
    computed = gs.Variable("m", np.float32)
    assert clip_bounds(gs.Node("Relu", inputs=[x], outputs=[y])) == (0.0, np.inf)
    assert clip_bounds(gs.Node("Clip", inputs=[x, lo, hi], outputs=[y])) == (0.0, 6.0)  # opset >= 11
    assert clip_bounds(gs.Node("Clip", attrs={"min": -1.0, "max": 1.0}, inputs=[x], outputs=[y])) == (-1.0, 1.0)
    assert clip_bounds(gs.Node("Clip", inputs=[x, computed], outputs=[y])) is None  # bound known only at run time
    assert clip_bounds(gs.Node("Sigmoid", inputs=[x], outputs=[y])) is None


@pytest.mark.parametrize(
    "opset, parts, attrs",
    [(11, 2, {}), (13, 2, {}), (18, 2, {"num_outputs": 2}), (18, 3, {"num_outputs": 3})],  # 8 into 3: 3, 3, 2
    ids=["opset11-equal", "opset13-equal", "opset18-num_outputs", "opset18-uneven"],
)
def test_split_without_sizes(opset, parts, attrs):
    b = Builder(5)
    x = b.relu(b.conv("x", 3, C))
    halves = b.node("Split", [x], n_out=parts, axis=1, **attrs)
    y = b.node("Concat", [b.relu(h) for h in halves[::-1]], axis=1)
    model = b.model([("x", [3, 8, 8])], [b.node("GlobalAveragePool", [b.conv(y, C, 5, 1)])], opset=opset)
    analysis = find_channel_groups(to_graph(model))
    plan = every_other_channel(analysis)
    assert analysis.groups[0].name in plan, analysis.blockers
    pruned, report = apply_pass(model, remove_channels, plan=plan)
    assert report.counts["channels_removed"] > 0
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


def _shifted(act):
    """producer -> per-channel shift (a removed channel is then a non-zero constant) -> activation."""

    def build(b, x):
        shift = b.const(np.linspace(-1.5, 1.5, C).reshape(C, 1, 1).astype(np.float32), "shift")
        return act(b, b.node("Add", [x, shift]))

    return build


ACTIVATIONS = {
    "Sigmoid": _unary("Sigmoid"),
    "HardSigmoid": _unary("HardSigmoid", alpha=0.3, beta=0.4),
    "HardSwish": _unary("HardSwish"),
    "Tanh": _unary("Tanh"),
    "Softplus": _unary("Softplus"),
    "Mish": _unary("Mish"),
    "Erf": _unary("Erf"),
    "Gelu": _unary("Gelu"),
    "Gelu-tanh": _unary("Gelu", approximate="tanh"),
    "Elu": _unary("Elu"),
    "SiLU": lambda b, x: b.node("Mul", [x, b.node("Sigmoid", [x])]),
    "GELU-as-Erf": lambda b, x: b.node(
        "Mul",
        [
            b.node("Mul", [x, b.const(np.array(0.5, np.float32), "half")]),
            b.node(
                "Add",
                [
                    b.node("Erf", [b.node("Div", [x, b.const(np.array(np.sqrt(2), np.float32), "r2")])]),
                    b.const(np.array(1.0, np.float32), "one"),
                ],
            ),
        ],
    ),
    "HardSwish-as-Mul": lambda b, x: b.node("Mul", [x, b.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)]),
}


@pytest.mark.parametrize("consumer_k", [1, 3], ids=["1x1-folds", "3x3-padded-masks-input"])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_constant_of_a_removed_channel(name, consumer_k):
    """The constant act(shift) a removed channel carries: folded by a 1x1 consumer, masked at a padded 3x3 one."""
    b = Builder(6)
    x = b.conv("x", 3, C)
    y = _shifted(ACTIVATIONS[name])(b, x)
    out = b.node("GlobalAveragePool", [b.conv(y, C, 5, consumer_k)])
    model = b.model([("x", [3, 8, 8])], [out], opset=20 if "Gelu" in name else 18)
    analysis = find_channel_groups(to_graph(model))
    plan = every_other_channel(analysis)
    assert analysis.groups[0].name in plan, analysis.blockers
    pruned, report = apply_pass(model, remove_channels, plan=plan)
    assert report.counts["biases_folded" if consumer_k == 1 else "folds_skipped"] == 1
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda b, x: b.node("Size", [x]), "Size counts the channels and its value is used at run time"),
        (
            lambda b, x: b.node("Gather", [b.node("Shape", [x]), b.const(np.array(1), "i")], axis=0),
            "the channel count it reads reaches Gather",
        ),
    ],
    ids=["Size", "Shape-channel-count"],
)
def test_run_time_channel_count_blocks(make, reason):
    """x * f(channel count): removal would change the factor, so the producer is blocked, with the reason."""
    b = Builder(4)
    x = b.relu(b.conv("x", 3, C))
    y = b.node("Mul", [x, b.node("Cast", [make(b, x)], to=1)])
    model = b.model([("x", [3, 8, 8])], [b.node("GlobalAveragePool", [b.conv(y, C, 5, 1)])])
    analysis = find_channel_groups(to_graph(model))
    assert reason in next(iter(analysis.groups[0].blocked.values()))


def test_unknown_shape_blocks_with_a_reason_not_silently():
    """A producer whose output shape inference cannot resolve still forms a group: blocked, and it says why."""
    from onnx import TensorProto, helper

    b = Builder(7)
    x = b.relu(b.conv("x", 3, C))
    b.nodes.append(helper.make_node("Opaque", [x], ["opaque"], name="opaque", domain="custom.ops"))
    y = b.conv("opaque", C, 6, 1)
    graph = helper.make_graph(
        b.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom.ops", 1)])
    analysis = find_channel_groups(to_graph(model))
    reasons = {g.name: next(iter(g.blocked.values()), "") for g in analysis.groups}
    first, last = analysis.groups[0].name, y.rsplit("_", 1)[0]
    assert "custom-domain op custom.ops::Opaque" in reasons[first]
    assert reasons[last] == f"Conv '{last}': output shape is unknown (shape inference could not resolve it)"


@pytest.mark.parametrize("op", ["Mul", "Add", "Sum"])
def test_broadcast_gate(op):
    """[N,C,H,W] with a [N,1,H,W] gate (spatial attention): per channel for the C side, the gate's channel blocked."""
    b = Builder(8)
    x = b.relu(b.conv("x", 3, C))
    gate = b.node("Sigmoid", [b.conv(x, C, 1, 3)])
    if op == "Sum":  # the gate first, and a per-channel constant that slices with the C side
        y = b.node("Sum", [gate, x, b.const(np.linspace(0.5, 1.5, C).reshape(C, 1, 1), "k")])
    else:
        y = b.node(op, [x, gate])
    model = b.model([("x", [3, 8, 8])], [b.node("GlobalAveragePool", [b.conv(y, C, 5, 1)])])
    analysis = find_channel_groups(to_graph(model))
    groups = {g.name: g for g in analysis.groups}
    gate_group = next(g for g in analysis.groups if len(g.classes) == 1)
    assert f"{op} '" in gate_group.blocked[gate_group.classes[0]] and "broadcasts this single channel" in next(
        iter(gate_group.blocked.values())
    )
    plan = every_other_channel(analysis)
    assert analysis.groups[0].name in plan and len(groups) == 3
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


def test_mismatched_channels_name_the_op():
    b = Builder(9)
    x, z = b.conv("x", 3, C), b.node("Transpose", [b.conv("x", 3, C)], perm=[0, 2, 3, 1])  # [N, 8, 8, 8] both
    model = b.model([("x", [3, 8, 8])], [b.node("GlobalAveragePool", [b.node("Mul", [x, z])])])
    analysis = find_channel_groups(to_graph(model))
    reason = next(iter(analysis.groups[0].blocked.values()))
    assert "Mul 'mul" in reason and "Mul of tensors whose channels do not line up (axis 3 vs 1)" in reason


def test_reshape_targets_computed_from_shape_become_constants_of_the_same_meaning():
    """[W, N, 8, 4] -> [W, N, 32] -> [W*N, 32] with targets from Shape (opset 12, Constant indices): onnx's
    inference gives the flatten, the Gemm and everything after no shape; folded, they are [0, 0, 32] (copies) and
    [-1, 32] (one product of symbolic dims), the Gemm's group is tracked, and the model computes the same.
    """
    from models import sequence_head

    from onnxprune.graph import to_model
    from onnxprune.passes.cleanup import cleanup

    model = sequence_head()
    graph = to_graph(model)
    assert [n.outputs[0].shape for n in graph.nodes if n.op == "Gemm"][0] is None
    cleanup(graph)
    assert [n.inputs[1].values.tolist() for n in graph.nodes if n.op == "Reshape"] == [[0, 0, 32], [-1, 32]]
    assert all(len(n.outputs[0].shape) == 2 for n in graph.nodes if n.op == "Gemm")
    reasons = [why for g in find_channel_groups(graph).groups for why in g.blocked.values()]
    assert not any("unknown" in why for why in reasons), reasons
    out = to_model(graph, model)
    for batch, width in ((1, 5), (3, 9)):
        feeds = random_feeds(model, batch=batch, dims={"width": width})
        assert_outputs_close(ort_run(out, feeds), ort_run(model, feeds), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (lambda b, y: b.node("Softmax", [y], axis=1), True),
        (lambda b, y: b.node("Identity", [b.node("LogSoftmax", [y], axis=-1)]), True),
        (lambda b, y: b.node("Relu", [y]), False),
        (lambda b, y: b.node("Transpose", [y], perm=[1, 0]), False),
    ],
)
def test_a_last_layer_s_scores_are_class_scores_only_through_ops_that_keep_them(after, expected):
    from onnxprune.calibration.refit import _class_scores

    b = Builder(47)
    logits = b.gemm("x", 12, 10)
    graph = to_graph(b.model([("x", [12])], [after(b, logits)]))
    gemm = next(n for n in graph.nodes if n.op == "Gemm")
    assert _class_scores(gemm.outputs[0], graph, 1) is expected


# The only library code outside `rules/` that may name an op: graph patterns, not per-op knowledge.
PATTERN_MATCHES = {
    ("passes/cleanup.py", "BatchNormalization"),  # folded into the producer before it
    ("calibration/criteria.py", "BatchNormalization"),  # its gammas, the bn_gamma criterion's scores
    ("passes/cleanup.py", "Constant"),  # Constant nodes become initializers
    ("passes/cleanup.py", "If"),  # an If on a constant condition is replaced by the branch it takes
    ("passes/cleanup.py", "Reshape"),  # Reshape -> Transpose -> Reshape round trips written as one Transpose
    ("graph.py", "Constant"),  # parameters held in Constant nodes are counted
    ("pipeline.py", "Constant"),  # likewise, for the weights' report
    ("calibration/refit.py", "Add"),  # a residual sum, the refit target of a block's last layer
}


def _op_names_compared(path):
    """(file, op name) for every comparison of a node's `op` / `op_type` with a string literal in `path`."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if not any(isinstance(s, ast.Attribute) and s.attr in ("op", "op_type") for s in sides):
            continue
        for side in sides:
            items = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            found |= {item.value for item in items if isinstance(item, ast.Constant) and isinstance(item.value, str)}
    return found


def test_only_the_op_registry_branches_on_op_names():
    """Per-op knowledge lives in `rules/` (channel rules and weight layouts); elsewhere only graph patterns."""
    import pathlib

    import onnxprune

    root = pathlib.Path(onnxprune.__file__).parent
    named = {
        (str(path.relative_to(root)), op)
        for path in root.rglob("*.py")
        if "rules" not in path.relative_to(root).parts
        for op in _op_names_compared(path)
    }
    assert named <= PATTERN_MATCHES, f"op names outside the registry: {sorted(named - PATTERN_MATCHES)}"
    assert _op_names_compared(root / "rules" / "layouts.py") == set(), "layouts dispatch through LAYOUTS only"


def test_removals_through_depth_to_space_are_counted_in_the_producer_s_filters():
    """A DepthToSpace output channel is 4 of the producer's filters (blocksize 2): the report counts filters, as the
    weight loses them (a new user read "removed 1 of 4" where conv1 had lost 4 of its 16 filters)."""
    from onnxprune.pipeline import prune

    b = Builder(8)
    x = b.node("DepthToSpace", [b.relu(b.conv("x", 3, 16))], blocksize=2)
    model = b.model([("x", [3, 8, 8])], [b.head(b.relu(b.conv(x, 4, 8)), 8)])
    pruned, report = prune(model, remove_ratio=0.46, method="channel")  # one of 4 classes: 0.466 (coarse)
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    row = report.facts["removed"][first.name]
    after = {t.name: t.dims[0] for t in pruned.graph.initializer}
    weight = next(t for t in model.graph.initializer if t.name == first.input[1])
    kept = next(n for n in pruned.graph.node if n.name == first.name)
    assert row["of"] == weight.dims[0] == 16 and row["removed"] % 4 == 0 and row["removed"] > 0
    assert after[kept.input[1]] == 16 - row["removed"]


def _gram_model(other_source: bool):
    """[N, C, 8, 8] -> A [N, 64, C] and B [N, C, 64] -> A @ B [N, 64, 64] -> [N, 64, 8, 8] -> 1x1 Conv.

    B comes from the same producer (the channels are contracted on both sides) or from the model's input (they meet
    channels no producer tracks).
    """
    b = Builder(5)
    x = b.relu(b.conv("x", C, C))
    rows = b.node("Reshape", [x, b.const(np.array([0, C, 64], np.int64), "s")])
    other = rows if not other_source else b.node("Reshape", ["x", b.const(np.array([0, C, 64], np.int64), "s")])
    gram = b.node("MatMul", [b.node("Transpose", [rows], perm=[0, 2, 1]), other])
    y = b.conv(b.node("Reshape", [gram, b.const(np.array([0, 64, 8, 8], np.int64), "s")]), 64, 5, 1)
    return b.model([("x", [C, 8, 8])], [b.node("GlobalAveragePool", [y])])


def test_product_of_computed_tensors_removes_contracted_channels_from_both_sides():
    model = _gram_model(other_source=False)
    analysis = find_channel_groups(to_graph(model))
    plan = every_other_channel(analysis)
    assert analysis.groups[0].name in plan, analysis.blockers
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    for batch in (1, 3):
        feeds = random_feeds(model, batch=batch, seed=batch)
        assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


def test_product_of_computed_tensors_blocks_where_channels_meet_untracked_ones():
    analysis = find_channel_groups(to_graph(_gram_model(other_source=True)))
    reasons = {r for g in analysis.groups for r in g.blocked.values()}
    assert any("do not line up" in r or "carries none" in r for r in reasons), reasons


def test_gather_along_the_channels_blocks():
    b = Builder(6)
    x = b.relu(b.conv("x", 3, C))
    y = b.node("Gather", [x, b.const(np.array([0, 2, 1], np.int64), "i")], axis=1)
    model = b.model([("x", [3, 8, 8])], [b.node("GlobalAveragePool", [b.conv(y, 3, 5, 1)])])
    group = find_channel_groups(to_graph(model)).groups[0]
    assert "Gather picks along the channel axis" in next(iter(group.blocked.values()))


def _width_reshape(target: list[int]):
    """x [N, 3, 1, W] -> 1x1 conv -> Relu -> Reshape(target) -> ..., W symbolic: a text recogniser's neck."""
    b = Builder(11)
    x = b.relu(b.conv("x", 3, C, 1))
    seq = b.node("Reshape", [x, b.const(np.array(target, np.int64), "s")])
    if len(target) == 3:  # [N, C, W] -> [N, W, C] -> per-position scores
        w = b.const(np.random.default_rng(2).standard_normal((C, 6)).astype(np.float32), "w")
        seq = b.node("MatMul", [b.node("Transpose", [seq], perm=[0, 2, 1]), w])
    return b.model([("x", [3, 1, "W"])], [seq])


def test_a_reshape_beside_a_symbolic_width_keeps_the_channels_removable():
    """PP-OCRv5's recogniser squeezes [N, 120, 1, W] -> [0, 120, -1]: with W symbolic it was blocked ("shape is not
    known") and with it every group behind its neck."""
    model = _width_reshape([0, C, -1])
    analysis = find_channel_groups(to_graph(model))
    plan = every_other_channel(analysis)
    assert analysis.groups[0].name in plan, analysis.blockers
    pruned, _ = apply_pass(model, remove_channels, plan=plan)
    for width in (5, 9):
        feeds = random_feeds(model, batch=2, seed=width, dims={"W": width})
        assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(model, plan), feeds), rtol=1e-4, atol=1e-5)


def test_a_reshape_that_merges_a_symbolic_width_into_the_channels_blocks():
    """[N, C, 1, W] -> [0, -1]: a channel's block is W wide, known only at run time."""
    analysis = find_channel_groups(to_graph(_width_reshape([0, -1])))
    reasons = [r for g in analysis.groups for r in g.blocked.values()]
    assert any("known only at run time into the channels" in r for r in reasons), reasons
