"""refit(): least-squares refit of every pruned layer to the original model's outputs.

The layers are each split pair's scaling op, and each Conv/Gemm/MatMul whose input lost channels (its im2col patches
are the regressors).

Sequential, in topological order: layer L is fitted on the inputs z that the already-compressed layers before it
produce, against the original model's output y of the same layer, so errors do not pile up through depth:
``S, b = argmin E||S z + b - y||^2 + lambda ||S||^2``, from streamed sums of z z^T and y z^T (memory does not grow
with the number of samples). A refit that makes the layer's error on the held-out samples worse is not kept.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune import rules
from onnxprune.calibration.runner import MAX_POSITIONS, channels_last, im2col, stream
from onnxprune.graph import to_model, unique_name
from onnxprune.passes.basis import BasisPair
from onnxprune.result import PassResult, Report
from onnxprune.rules import const

log = logging.getLogger(__name__)


def refit(
    graph: gs.Graph,
    *,
    template: onnx.ModelProto,
    original: onnx.ModelProto,
    fit: dict[str, np.ndarray],
    held: dict[str, np.ndarray],
    pairs: list[BasisPair],
    kept: dict[str, np.ndarray] | None = None,
    ridge: float = 1e-4,
    batch_size: int = 64,
) -> PassResult:
    """Refit, in place, every layer whose input lost channels or bases.

    Those are each split pair's scaling op, and each Conv (group 1) / Gemm / MatMul consuming a tensor that channel
    removal shrank.

    Args:
        graph: Pruned graph; edited in place.
        template: Model whose opsets and metadata exports of `graph` take.
        original: The unpruned model; its tensor of the layer's output name is the target.
        fit: Calibration samples to fit on.
        held: Held-out samples on which a refit must not be worse than the weights it replaces.
        pairs: Basis pairs recorded when the layers were split.
        kept: For tensors whose channels were removed, the original positions that stay (their targets).
        ridge: Regularisation, relative to the mean diagonal of E[z z^T].
        batch_size: Samples per onnxruntime run.
    """
    report = Report()
    original_names = {t for n in original.graph.node for t in n.output}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = {n.name: n for n in graph.nodes}
    layers = {p.scaling for p in pairs if p.scaling in order}
    shrunk = set(kept or {})
    layers |= {n.name for n in graph.nodes if n.inputs and n.inputs[0].name in shrunk and _rows_of(n) is not None}
    for name in sorted(layers, key=order.get):
        node = nodes[name]
        target = node.outputs[0].name
        rows = _rows_of(node)
        if target not in original_names or rows is None:
            report.skip(node, "no matching tensor in the original model to fit to, or an input layout not handled")
            continue
        current = to_model(graph, template)
        old_w, old_b = rules.affine(node)
        axis = rules.output_channel_axis(node)
        with_bias = node.op in rules.BIAS_INPUT
        select = (kept or {}).get(target)
        source = node.inputs[0].name
        zz, yz = _accumulate(current, original, fit, source, target, rows, axis, with_bias, batch_size, select)
        r = old_w.shape[1]
        reg = np.zeros_like(zz)
        reg[:r, :r] = np.eye(r) * ridge * max(np.trace(zz[:r, :r]) / r, 1e-12)
        try:
            solved = np.linalg.solve(zz + reg, yz.T).T  # [Co, r(+1)]
        except np.linalg.LinAlgError:
            report.skip(node, "least-squares system is singular")
            continue
        new_w, new_b = solved[:, :r], (solved[:, r] if with_bias else None)
        before, after = _held_errors(
            current, original, held, source, target, rows, axis, (old_w, old_b), (new_w, new_b), batch_size, select
        )
        if after >= before:
            report.skip(node, f"refit kept out: held-out error {after:.4g} >= {before:.4g}")
            report.counts["refits_rejected"] += 1
            continue
        _write(graph, node, new_w, new_b)
        report.counts["refitted"] += 1
        report.layers[name] = {"refit_error_before": before, "refit_error_after": after}
        log.debug("refit %s: held-out layer error %.4g -> %.4g", name, before, after)
    return PassResult(graph, modified=bool(report.counts.get("refitted")), report=report)


def _rows_of(node: gs.Node):
    """The map x -> [positions, in] rows that the [out, in] weight matrix multiplies; None for other layouts."""
    w = rules.weight_matrix(node)
    if w is None:
        return None
    if node.op != "Conv":
        return lambda x: channels_last(x, 1 if node.op == "Gemm" else x.ndim - 1)
    weight = const(node.inputs[1])
    if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    if weight.ndim == 4:
        kernel = list(weight.shape[2:])
        pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
        strides = list(node.attrs.get("strides", [1, 1]))
        dilations = list(node.attrs.get("dilations", [1, 1]))
        return lambda x: im2col(x.astype(np.float64), kernel, strides=strides, pads=pads, dilations=dilations)
    plain = all(k == 1 for k in weight.shape[2:]) and not any(node.attrs.get("pads", []))
    plain = plain and all(v == 1 for v in node.attrs.get("strides", []))
    return (lambda x: channels_last(x, 1)) if plain else None


def _write(graph: gs.Graph, node: gs.Node, w: np.ndarray, b: np.ndarray | None) -> None:
    dtype = const(node.inputs[1]).dtype
    weight, attrs = rules.weight_from_matrix(node, w)
    node.attrs.update(attrs)
    node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}/weight_refit"), weight.astype(dtype))
    if b is not None:
        bias = gs.Constant(unique_name(graph, f"{node.name}/bias_refit"), b.astype(dtype))
        index = rules.BIAS_INPUT[node.op]
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = bias


def _pairs_of(current: onnx.ModelProto, original: onnx.ModelProto, data: dict, mid: str, target: str, batch_size: int):
    return zip(
        stream(current, data, [mid], batch_size=batch_size),
        stream(original, data, [target], batch_size=batch_size),
        strict=True,
    )


def _batch_rows(zb, yb, source, target, rows, axis, select, rng):
    """Input rows and target rows of one batch, the same positions sub-sampled in both (memory bound per batch)."""
    z = rows(zb[source])
    y = _targets(yb[target], axis, select)
    if len(z) > MAX_POSITIONS:
        pick = rng.choice(len(z), MAX_POSITIONS, replace=False)
        z, y = z[pick], y[pick]
    return z, y


def _accumulate(current, original, data, source, target, rows, axis, with_bias, batch_size, select):
    zz = yz = None
    rng = np.random.default_rng(0)
    for zb, yb in _pairs_of(current, original, data, source, target, batch_size):
        z, y = _batch_rows(zb, yb, source, target, rows, axis, select, rng)
        if with_bias:
            z = np.hstack([z, np.ones((len(z), 1))])
        zz = z.T @ z if zz is None else zz + z.T @ z
        yz = y.T @ z if yz is None else yz + y.T @ z
    return zz, yz


def _targets(y: np.ndarray, axis: int, select: np.ndarray | None) -> np.ndarray:
    y = channels_last(y, axis)
    return y if select is None else y[:, select]


def _held_errors(current, original, held, source, target, rows, axis, old, new, batch_size, select):
    errors = np.zeros(2)
    rng = np.random.default_rng(1)
    for zb, yb in _pairs_of(current, original, held, source, target, batch_size):
        z, y = _batch_rows(zb, yb, source, target, rows, axis, select, rng)
        for i, (w, b) in enumerate((old, new)):
            pred = z @ w.T + (0 if b is None else b)
            errors[i] += float(np.sum((pred - y) ** 2))
    return float(errors[0]), float(errors[1])
