"""Exporter variety and odd graphs: subgraphs, custom domains, quantized weights, float16, cycles, nothing to prune."""

import numpy as np
import onnx
import pytest
from models import Builder, chain
from onnx import TensorProto, helper, numpy_helper

from onnxprune import BudgetError
from onnxprune.errors import InvalidModelError
from onnxprune.graph import load, to_graph
from onnxprune.passes.groups import find_channel_groups
from onnxprune.pipeline import prune
from onnxprune.testing import ort_run, random_feeds


def _groups(model):
    return find_channel_groups(to_graph(model))


def test_custom_domain_op_blocks_and_is_named():
    b = Builder(61)
    x = b.cbr("x", 3, 8)
    b.nodes.append(helper.make_node("Frobnicate", [x], ["fro"], name="fro_node", domain="com.example"))
    out = b.head(b.cbr("fro", 8, 6), 6)
    graph = helper.make_graph(
        b.nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", 6])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    group = _groups(model).groups[0]
    assert "custom-domain op com.example::Frobnicate" in next(iter(group.blocked.values()))


def test_if_subgraph_reading_a_tensor_blocks_it():
    b = Builder(62)
    x = b.cbr("x", 3, 8)
    then = helper.make_graph(
        [helper.make_node("Identity", [x], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", [x], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)],
    )
    cond = b.const(np.array(True), "cond")
    b.nodes.append(helper.make_node("If", [cond], ["if_out"], name="branch", then_branch=then, else_branch=other))
    out = b.head(b.cbr("if_out", 8, 6), 6)
    model = b.model([("x", [3, 8, 8])], [out])
    group = _groups(model).groups[0]
    assert "If has subgraphs" in next(iter(group.blocked.values()))


def test_quantized_weights_block_their_layer_and_the_float_parts_are_pruned():
    b = Builder(63)
    x = b.cbr("x", 3, 8)
    wq = b.const(np.random.default_rng(0).integers(-100, 100, (6, 8, 3, 3)).astype(np.int8), "wq")
    w = b.node("DequantizeLinear", [wq, b.const(np.float32(0.01), "sc"), b.const(np.int8(0), "zp")])
    y = b.relu(b.node("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    z = b.cbr(y, 6, 10)
    model = b.model([("x", [3, 8, 8])], [b.head(z, 10)])
    analysis = _groups(model)
    blocked = [g for g in analysis.groups if g.blocked]
    assert any("is computed in the graph" in r for g in blocked for r in g.blocked.values())
    pruned, report = prune(model, remove_ratio=0.2, method="channel")
    feeds = random_feeds(model, batch=2)
    assert ort_run(pruned, feeds)[model.graph.output[0].name].shape == (2, 5)
    assert [n for n in pruned.graph.node if n.op_type == "DequantizeLinear"]


def test_float16_model_is_pruned_and_stays_float16():
    model = chain()
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    for method in ("channel", "basis"):
        pruned, report = prune(model, remove_ratio=0.3, method=method, min_rank=2)
        assert {t.data_type for t in pruned.graph.initializer if t.data_type in (1, 10)} == {TensorProto.FLOAT16}
        out = ort_run(pruned, random_feeds(model, batch=2))
        assert next(iter(out.values())).dtype == np.float16


def test_cycle_is_refused(tmp_path):
    a = helper.make_node("Relu", ["y"], ["z"], name="a")
    c = helper.make_node("Add", ["x", "z"], ["y"], name="c")
    graph = helper.make_graph(
        [a, c],
        "cyc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "cycle.onnx"
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(InvalidModelError, match="fails the ONNX checker"):
        load(path)


def test_nothing_prunable_is_refused_with_the_reason():
    b = Builder(64)
    y = b.node("Softmax", [b.conv("x", 3, 4, 1)], axis=1)
    model = b.model([("x", [3, 4, 4])], [y])
    with pytest.raises(BudgetError, match="cannot be reached"):
        prune(model, remove_ratio=0.3, method="channel")
    same, report = prune(model, remove_ratio=0.0, method="channel")
    assert report.facts["params_after"] == report.facts["params_before"]


@pytest.mark.parametrize("opset", range(9, onnx.defs.onnx_opset_version() + 1))
def test_every_opset_from_9_to_the_newest(opset):
    model = chain()
    model.opset_import[0].version = opset
    model.ir_version = 4 if opset < 13 else 8 if opset < 19 else 9
    onnx.checker.check_model(model, full_check=True)
    for method in ("channel", "basis"):
        pruned, report = prune(model, remove_ratio=0.4, method=method, min_rank=2)
        assert report.facts["params_removed"] >= 0.4
        assert pruned.opset_import[0].version == opset
        assert ort_run(pruned, random_feeds(model, batch=2))[model.graph.output[0].name].shape == (2, 5)


@pytest.mark.parametrize("method", ["channel", "basis"])
def test_symbolic_spatial_dims_are_kept(method):
    from models import basic_residual

    model = basic_residual()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"]))
    pruned, report = prune(model, remove_ratio=0.3, method=method, min_rank=2)
    dims = [d.dim_param or d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "h", "w"] and report.facts["params_removed"] >= 0.3
    for size in (8, 12):
        out = ort_run(pruned, random_feeds(model, batch=2, dims={"h": size, "w": size}))
        assert next(iter(out.values())).shape == (2, 5)


def _old_exporter(opset: int, *, constants_as_nodes: bool = False) -> onnx.ModelProto:
    """What old exporters wrote: auto_pad, Clip with attributes, Upsample, Sum, Reshape 0/-1, Gemm alpha/beta/transB,
    weights also listed as graph inputs (or held by Constant nodes)."""
    b = Builder(70 + opset)
    x = b.node(
        "Conv", ["x", b.const(b.rng.standard_normal((8, 3, 3, 3)) / 5)], kernel_shape=[3, 3], auto_pad="SAME_UPPER"
    )
    x = b.bn(x, 8)
    x = (
        b.node("Clip", [x], min=0.0, max=6.0)
        if opset < 11
        else b.node("Clip", [x, b.const(np.float32(0.0), "lo"), b.const(np.float32(6.0), "hi")])
    )
    if opset < 10:
        x = b.node("Upsample", [x, b.const(np.array([1, 1, 2, 2], np.float32), "sc")], mode="nearest")
    else:
        x = b.node(
            "Resize",
            [x, b.const(np.zeros(0, np.float32), "roi"), b.const(np.array([1, 1, 2, 2], np.float32), "sc")]
            if opset >= 11
            else [x, b.const(np.array([1, 1, 2, 2], np.float32), "sc")],
            mode="nearest",
        )
    left, right = b.conv(x, 8, 12, stride=2), b.conv(x, 8, 12, 1, stride=2, pad=0)
    x = b.relu(b.node("Sum", [left, right]))
    flat = b.node("Reshape", [b.conv(x, 12, 6, stride=2), b.const(np.array([0, -1], np.int64), "shape")])
    w = b.rng.standard_normal((6 * 4 * 4, 5)).astype(np.float32) / 10  # transB=0: weight is [in, out]
    out = b.node("Gemm", [flat, b.const(w), b.const(np.full(5, 0.1, np.float32), "b")], alpha=0.5, beta=2.0)
    model = b.model([("x", [3, 8, 8])], [out], opset=opset)
    model.ir_version = 4 if opset < 13 else 7
    if constants_as_nodes:
        consts = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
        model.graph.ClearField("initializer")
        nodes = consts + list(model.graph.node)
        model.graph.ClearField("node")
        model.graph.node.extend(nodes)
    else:  # IR 3 style: every initializer is also a graph input
        model.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer
        )
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("constants_as_nodes", [False, True], ids=["inits-as-inputs", "constant-nodes"])
@pytest.mark.parametrize("opset", [9, 10, 11, 13])
def test_old_exporter_graphs_prune_exactly(opset, constants_as_nodes):
    """Clip attrs (opset < 11), Upsample (opset 9), auto_pad, Sum, Reshape [0, -1], Gemm transB=0 alpha/beta."""
    from onnxprune.passes.cleanup import cleanup
    from onnxprune.passes.remove import remove_channels
    from onnxprune.testing import apply_pass, assert_outputs_close, every_other_channel, mask_channels

    model = _old_exporter(opset, constants_as_nodes=constants_as_nodes)
    clean = apply_pass(model, cleanup)[0]
    analysis = find_channel_groups(to_graph(clean))
    plan = every_other_channel(analysis)
    assert len(plan) == 3, analysis.groups  # conv after BN+Clip+Upsample, the Sum pair, the conv before Reshape
    pruned, _ = apply_pass(clean, remove_channels, plan=plan)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_feeds(model, batch=3)
    assert_outputs_close(ort_run(pruned, feeds), ort_run(mask_channels(clean, plan), feeds), rtol=1e-4, atol=1e-5)
    for method in ("channel", "basis"):
        out, report = prune(model, remove_ratio=0.4, method=method, min_rank=2)
        assert report.facts["params_removed"] >= 0.39
        assert out.opset_import[0].version == opset
        assert ort_run(out, feeds)[model.graph.output[0].name].shape == (3, 5)


@pytest.mark.parametrize("op", ["Loop", "Scan"])
def test_loop_and_scan_bodies_reading_a_tensor_block_it(op):
    b = Builder(64)
    x = b.cbr("x", 3, 8)
    if op == "Loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Relu", [x], ["body_out"])],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("body_out", TensorProto.FLOAT, None),
            ],
        )
        trips, cond = b.const(np.array(2, np.int64), "n"), b.const(np.array(True), "c")
        b.nodes.append(helper.make_node("Loop", [trips, cond], ["stacked"], name="loop", body=body))
        y = b.node("ReduceMax", ["stacked"], axes=[0], keepdims=0)
    else:
        body = helper.make_graph(
            [helper.make_node("Add", ["state", "row"], ["next"]), helper.make_node("Identity", ["next"], ["scan_out"])],
            "body",
            [
                helper.make_tensor_value_info("state", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("row", TensorProto.FLOAT, None),
            ],
            [
                helper.make_tensor_value_info("next", TensorProto.FLOAT, None),
                helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, None),
            ],
        )
        init = b.node("ReduceMean", [x], axes=[0], keepdims=0)
        b.nodes.append(
            helper.make_node("Scan", [init, x], ["final", "rows"], name="scan", body=body, num_scan_inputs=1)
        )
        y = "rows"
    out = b.head(b.cbr(y, 8, 6), 6)
    model = b.model([("x", [3, 8, 8])], [out])
    groups = _groups(model).groups
    assert f"{op} has subgraphs" in next(iter(groups[0].blocked.values()))
    pruned, report = prune(model, remove_ratio=0.16, method="channel")  # one channel of the last cbr: 16.2 %
    assert [n for n in pruned.graph.node if n.op_type == op]
    assert ort_run(pruned, random_feeds(model, batch=2))[out].shape == (2, 5)


def test_matmul_with_the_weight_on_the_left_is_left_alone_and_named():
    b = Builder(65)
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.cbr("x", 3, 8)])], axis=1)  # [batch, 8]
    xt = b.node("Transpose", [x], perm=[1, 0])  # [8, batch]
    y = b.node("MatMul", [b.const(b.rng.standard_normal((5, 8)).astype(np.float32)), xt])  # W @ x: [5, batch]
    out = b.node(
        "Transpose", [b.node("MatMul", [b.const(b.rng.standard_normal((6, 5)).astype(np.float32)), y])], perm=[1, 0]
    )
    model = b.model([("x", [3, 8, 8])], [out])
    reasons = [r for g in _groups(model).groups for r in g.blocked.values()]
    assert reasons, "the group feeding a left-hand weight is blocked"
    pruned, report = prune(model, remove_ratio=0.0, method="channel")
    assert ort_run(pruned, random_feeds(model, batch=2))[out].shape == (2, 6)


def test_a_batch_written_as_dim_value_minus_one_is_dynamic(tmp_path):
    """paddle2onnx writes a dynamic batch as ``dim_value: -1`` (PP-OCR's text-angle classifier, ``[-1, 3, ?, ?]``):
    onnxruntime runs it, and onnxprune made random inputs of -1 samples (exit 3, "negative dimensions are not
    allowed"). Read as an unknown dim, on both the file and the API path; the result runs at any batch."""
    model = chain()
    for info in (model.graph.input[0], model.graph.output[0]):
        dim = info.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = -1
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load(tmp_path / "m.onnx")
    assert not loaded.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1  # the caller's model is not modified
    calib = {"x": random_feeds(loaded, batch=20)["x"]}
    for given in (model, loaded):
        out, _ = prune(given, remove_ratio=0.3, calib=calib, latency_batch=0)
        onnx.checker.check_model(out, full_check=True)
        for batch in (1, 5):
            (y,) = ort_run(out, random_feeds(out, batch=batch)).values()
            assert y.shape[0] == batch


def test_weights_in_constant_nodes_fold_without_printing_them(monkeypatch):
    """Constant nodes become initializers and are dropped by `cleanup` itself: graphsurgeon's own cleanup formats
    every node it removes, a Constant's whole value with it (25 s of numpy printing in one prune of PP-OCRv4's
    recogniser, whose 2.7 M weights sit in Constant nodes). The folded graph computes what the model did."""
    import onnx_graphsurgeon as gs

    from onnxprune.passes.cleanup import cleanup
    from onnxprune.testing import apply_pass, assert_outputs_close, ort_run, random_feeds

    model = _old_exporter(13, constants_as_nodes=True)
    printed = []
    monkeypatch.setattr(gs.Node, "__str__", lambda node: printed.append(node.op) or node.op)
    clean = apply_pass(model, cleanup)[0]
    assert "Constant" not in printed
    assert not any(n.op_type == "Constant" for n in clean.graph.node)
    feeds = random_feeds(model, batch=2)
    assert_outputs_close(ort_run(clean, feeds), ort_run(model, feeds), rtol=1e-4, atol=1e-5)


def _constant_if_with_two_outputs(shadowed: bool = False) -> onnx.ModelProto:
    """x -> Relu -> If(cond=true) whose taken branch returns both outputs of one Split; their Add -> Gemm.

    `shadowed`: the branch first makes a tensor named as one of the outer graph ('s'; the checker allows it).
    """
    inner = [helper.make_node("Relu", ["h"], ["s"], name="inner_relu")] if shadowed else []
    then_split = helper.make_node("Split", ["s" if shadowed else "h"], ["a", "b"], axis=1, name="then_split")
    then_branch = helper.make_graph(
        [*inner, then_split],
        "then",
        [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("a", "b")],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], ["n"], name="neg"), helper.make_node("Split", ["n"], ["c", "d"], axis=1)],
        "else",
        [],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "d")],
    )
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cond_value")),
        helper.make_node("If", ["cond"], ["p", "q"], then_branch=then_branch, else_branch=else_branch, name="if"),
        helper.make_node("Add", ["p", "q"], ["s"], name="add"),
        helper.make_node("Gemm", ["s", "w"], ["y"], name="gemm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("shadowed", [False, True], ids=["plain", "branch-name-shadows-outer"])
def test_an_if_on_a_constant_condition_is_replaced_by_its_branch_every_output_bound(shadowed):
    """torch exports of silero-vad hold an If whose condition folds, returning two outputs of its branch.
    graphsurgeon's flattening rebinds every second output only (the model written failed the ONNX checker); the
    taken branch now replaces the If with each output bound, and the model computes what it did."""
    from onnxprune.passes.cleanup import cleanup
    from onnxprune.testing import apply_pass, assert_outputs_close, ort_run

    model = _constant_if_with_two_outputs(shadowed)
    clean = apply_pass(model, cleanup)[0]
    onnx.checker.check_model(clean, full_check=True)
    assert not any(n.op_type == "If" for n in clean.graph.node)
    feeds = {"x": np.random.default_rng(6).standard_normal((3, 16)).astype(np.float32)}
    assert_outputs_close(ort_run(clean, feeds), ort_run(model, feeds), rtol=1e-5, atol=1e-5)
