"""cleanup(): fold constant subgraphs, fold BatchNormalization into the op before it, drop dead nodes, toposort."""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune import rules
from onnxprune.graph import Namer, refresh_shapes, unique_name
from onnxprune.result import PassResult, Report
from onnxprune.rules import const, layouts

log = logging.getLogger(__name__)


def cleanup(graph: gs.Graph, *, fold_bn: bool = True) -> PassResult:
    """Fold constants (and BN when asked), remove dead nodes and sort, in place.

    Args:
        graph: Graph to edit in place.
        fold_bn: Fold each BatchNormalization into the Conv/ConvTranspose/Gemm that alone feeds it.
    """
    report = Report()
    signature = _signature(graph)
    if _fold_constants(graph):
        refresh_shapes(graph)  # shapes inferred before the fold: a Slice with computed bounds lost its other dims
    if _fold_shape_values(graph):
        report.counts["shape_values_folded"] += 1
    if merged := _merge_transpose_round_trips(graph):
        report.counts["transpose_round_trips_merged"] += merged
    if fold_bn:
        for node in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            if _fold_batch_norm(graph, node):
                report.counts["bn_folded"] += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    modified = _signature(graph) != signature
    return PassResult(graph, modified=modified, report=report)


def holds_constant_nodes(graph: gs.Graph) -> bool:
    """Whether `graph` holds Constant nodes (paddle2onnx keeps every weight in one): `cleanup` makes them constants."""
    return any(node.op == "Constant" for node in graph.nodes)


def _signature(graph: gs.Graph) -> tuple:
    return tuple((n.op, n.name, tuple(t.name for t in n.inputs)) for n in graph.nodes)


def _fold_constants(graph: gs.Graph) -> bool:
    """Evaluate every subgraph that depends on constants only (ConstantOfShape, Unsqueeze of weights...).

    Returns:
        Whether a node computed from constants was folded (Constant nodes becoming initializers do not count).
    """
    folded = set()
    for node in [n for n in graph.nodes if n.op == "Constant" and "value" in n.attrs]:
        value = node.attrs["value"]
        if isinstance(value, gs.Constant):
            out = node.outputs[0]
            out.to_constant(np.asarray(value.values))
            out.inputs.clear()
            folded.add(id(node))
    # dropped here, not left to graphsurgeon's cleanup: it formats every node it removes, a Constant's whole value
    # included (25 s of numpy printing in one 11-min prune of PP-OCRv4's recogniser, 2.7 M weights in Constant nodes)
    graph.nodes = [n for n in graph.nodes if id(n) not in folded]
    graph.cleanup().toposort()
    if any(all(isinstance(t, gs.Constant) or not t.name for t in n.inputs) and n.inputs for n in graph.nodes):
        before = len(graph.nodes)
        graph.fold_constants(
            error_ok=True, fold_shapes=True, flatten_subgraphs=False, should_exclude_node=_copies_a_shared_weight
        )
        _flatten_constant_ifs(graph)
        graph.cleanup().toposort()
        return len(graph.nodes) < before
    return False


def _flatten_constant_ifs(graph: gs.Graph) -> None:
    """Replace each If whose condition folded to a constant by the nodes of the branch it takes, in place.

    Each If output becomes an Identity of the branch's output (which may be a tensor of the outer graph). Not left
    to graphsurgeon (``fold_constants(flatten_subgraphs=True)``, 0.6.1): it rebinds the If's outputs while iterating
    over them, which drops each from that list, so every second output of an If with several stayed bound to the
    removed node (silero-vad's 16 kHz model, an If returning both LSTM states: the model written failed the ONNX
    checker). Nested Ifs come up with their branch and are flattened once their own condition folds. Moved nodes
    and the tensors they make are renamed where the graph already uses the name.
    """
    if not any(n.op == "If" and isinstance(n.inputs[0], gs.Constant) for n in graph.nodes):
        return
    namer = Namer(graph)
    flat = []
    for node in graph.nodes:
        if node.op != "If" or not isinstance(node.inputs[0], gs.Constant):
            flat.append(node)
            continue
        taken = node.attrs["then_branch" if bool(np.asarray(node.inputs[0].values).reshape(-1)[0]) else "else_branch"]
        outs = list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        for inner in taken.nodes:
            inner.name = namer.fresh_name(inner.name or f"{node.name}/{inner.op}")
            for t in inner.outputs:  # local to the branch until now: kept unless the outer graph uses the name
                t.name = namer.fresh_name(t.name)
            flat.append(inner)
        for out, result in zip(outs, taken.outputs, strict=True):
            flat.append(gs.Node("Identity", namer.fresh_name(f"{node.name}/taken"), inputs=[result], outputs=[out]))
    graph.nodes = flat


SHARED_FOLD_MIN = 1024  # values from which a weight read at run time is not folded into a second, transformed copy


def _copies_a_shared_weight(node: gs.Node) -> bool:
    """Whether folding `node` would store a second copy of a weight that a node computed at run time also reads.

    A tied embedding (Gather of E, and MatMul by Transpose(E)) folded would hold E and E^T: the model grows by the
    table, and every count of its weights with it.
    """
    for t in node.inputs:
        if not isinstance(t, gs.Constant) or int(np.prod(t.shape or [0])) < SHARED_FOLD_MIN:
            continue
        if any(c is not node and any(isinstance(i, gs.Variable) and i.name for i in c.inputs) for c in t.outputs):
            return True
    return False


MAX_SHAPE_ROUNDS = 64  # a folded value lets inference resolve the next; an old export folds about a round per block


def _fold_shape_values(graph: gs.Graph) -> bool:
    """Write values computed from `Shape` of static dims (Reshape targets, Slice bounds) as constants.

    A Reshape target that copies its input's symbolic dims gets 0 there, and -1 for one unknown entry
    (`rules.reshape_target`). Shapes are inferred again after each round, so values behind a resolved Reshape fold
    in the next.
    """
    folded = False
    for _ in range(MAX_SHAPE_ROUNDS):
        cache: dict = {}
        changed = False
        for node in graph.nodes:
            for i, tensor in enumerate(node.inputs):
                if not isinstance(tensor, gs.Variable) or not tensor.name or len(tensor.inputs) != 1:
                    continue
                value = rules.shape_value(tensor, cache)
                if value is None:
                    continue
                dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else np.dtype(np.int64)
                dtype = dtype if dtype.kind in "iu" else np.dtype(np.int64)
                if rules.known(value):
                    array = value.astype(dtype)
                elif i == 1 and (target := rules.reshape_target(node, value)) is not None:
                    array = target
                    if np.any(target == 0) and "allowzero" in node.attrs:
                        node.attrs["allowzero"] = 0  # its 0s copy dims now; the same output either way
                else:
                    continue
                node.inputs[i] = gs.Constant(unique_name(graph, f"{tensor.name}/folded"), np.asarray(array))
                changed = True
        if not changed:
            break
        folded = True
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        refresh_shapes(graph)
    return folded


def _merge_transpose_round_trips(graph: gs.Graph) -> int:
    """Write Reshape -> Transpose -> Reshape that only transposes trailing dims as one Transpose; returns the count.

    The first Reshape merges the leading dims, the Transpose moves the trailing ones, the second splits the leading
    dims back. torch's dynamo exporter writes ``k.transpose(-2, -1)`` inside scaled dot-product attention that way,
    with both targets computed from `Shape` at run time (a dynamic sequence keeps them from folding), which hides the
    head axis from the channel rules. The rewrite is exact when the trailing dims come through unchanged, the
    Transpose keeps the merged axis first and the second Reshape restores the leading dims; shapes are compared as
    inferred, a symbolic dim equal only to itself.
    """
    merged = 0
    for second in [n for n in graph.nodes if n.op == "Reshape"]:
        turn = _only_producer(second.inputs[0], "Transpose")
        first = _only_producer(turn.inputs[0], "Reshape") if turn is not None else None
        if first is None:
            continue
        x = first.inputs[0]
        shapes = [x.shape, first.outputs[0].shape, second.outputs[0].shape]
        if any(s is None or any(d is None or d == "" for d in s) for s in shapes):
            continue
        xs, flat, ys = (list(s) for s in shapes)
        perm = [int(p) for p in turn.attrs.get("perm", reversed(range(len(flat))))]
        lead = len(xs) - (len(flat) - 1)
        if lead < 1 or perm[0] != 0 or flat[1:] != xs[lead:] or len(ys) != len(xs) or ys[:lead] != xs[:lead]:
            continue
        if ys[lead:] != [flat[p] for p in perm[1:]]:
            continue
        second.op, second.attrs = "Transpose", {"perm": list(range(lead)) + [lead - 1 + p for p in perm[1:]]}
        second.inputs.clear()
        second.inputs.append(x)
        merged += 1
    if merged:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return merged


def _only_producer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    """The node of type `op` that produces `tensor` when `tensor` feeds nothing else, or None."""
    if len(tensor.inputs) != 1 or len(tensor.outputs) != 1 or tensor.inputs[0].op != op:
        return None
    return tensor.inputs[0]


def _fold_batch_norm(graph: gs.Graph, bn: gs.Node) -> bool:
    x = bn.inputs[0]
    params = [const(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params) or len(x.inputs) != 1 or len(x.outputs) != 1 or x in graph.outputs:
        return False
    producer = x.inputs[0]
    weight = const(producer.inputs[1]) if len(producer.inputs) > 1 else None
    axis = layouts.weight_out_axis(producer)
    if weight is None or axis is None or layouts.bias_input(producer) != 2:
        return False
    if float(producer.attrs.get("beta", 1.0)) != 1.0:  # Gemm: the new bias is written for beta = 1
        return False
    scale, shift, mean, var = (p.astype(np.float64) for p in params)
    factor = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    if weight.shape[axis] != factor.size:
        return False
    shape = [1] * weight.ndim
    shape[axis] = factor.size
    new_w = weight.astype(np.float64) * factor.reshape(shape)
    has_bias = len(producer.inputs) > 2 and producer.inputs[2].name
    bias = const(producer.inputs[2]).astype(np.float64) if has_bias else np.zeros(factor.size)
    if bias is None or bias.size not in (1, factor.size):
        return False
    new_b = (bias.reshape(-1) - mean) * factor + shift
    dtype = weight.dtype
    producer.inputs[1] = gs.Constant(unique_name(graph, f"{producer.name}/weight_bn"), new_w.astype(dtype))
    b = gs.Constant(unique_name(graph, f"{producer.name}/bias_bn"), new_b.astype(dtype))
    while len(producer.inputs) < 3:
        producer.inputs.append(gs.Variable.empty())
    producer.inputs[2] = b
    y = bn.outputs[0]
    producer.outputs[0] = y
    bn.outputs.clear()
    bn.inputs.clear()
    log.debug("folded %s into %s", bn.name, producer.name)
    return True
