"""Exporter variety and odd graphs: subgraphs, custom domains, quantized weights, float16, cycles, nothing to prune."""

import numpy as np
import onnx
import pytest
from models import Builder, chain
from onnx import TensorProto, helper, numpy_helper

from onnxprune import BudgetError, prune
from onnxprune.errors import InvalidModelError
from onnxprune.graph import load, to_graph
from onnxprune.passes.groups import find_channel_groups
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
