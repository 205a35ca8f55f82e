"""refit_scaling(): least-squares refit of each pruned basis pair's scaling op to the original model's outputs.

Sequential, in topological order: layer L is fitted on the basis responses z that the already-compressed layers
before it produce, against the original model's output y of the same layer, so errors do not pile up through depth:
``S, b = argmin E||S z + b - y||^2 + lambda ||S||^2``, from streamed sums of z z^T and y z^T (memory does not grow
with the number of samples). A refit that makes the layer's error on the held-out samples worse is not kept.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune import rules
from onnxprune.calibration.runner import channels_last, stream
from onnxprune.graph import to_model, unique_name
from onnxprune.passes.basis import BasisPair
from onnxprune.result import PassResult, Report
from onnxprune.rules import const

log = logging.getLogger(__name__)


def refit_scaling(
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
    """Refit the scaling op (weights and bias) of every split pair still in `graph`, in place.

    Args:
        graph: Pruned graph; edited in place.
        template: Model whose opsets and metadata exports of `graph` take.
        original: The unpruned model; its tensor of the scaling op's output name is the target.
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
    for pair in sorted((p for p in pairs if p.scaling in order), key=lambda p: order[p.scaling]):
        node = next(n for n in graph.nodes if n.name == pair.scaling)
        target = node.outputs[0].name
        if node.inputs[0].name != pair.mid or target not in original_names:
            report.skip(node, "no matching tensor in the original model to fit to")
            continue
        current = to_model(graph, template)
        old_w, old_b = rules.affine(node)
        axis = rules.output_channel_axis(node)
        with_bias = node.op in rules.BIAS_INPUT
        select = (kept or {}).get(target)
        zz, yz = _accumulate(current, original, fit, pair.mid, target, axis, with_bias, batch_size, select)
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
            current, original, held, pair.mid, target, axis, (old_w, old_b), (new_w, new_b), batch_size, select
        )
        if after >= before:
            report.skip(node, f"refit kept out: held-out error {after:.4g} >= {before:.4g}")
            report.counts["refits_rejected"] += 1
            continue
        _write(graph, node, new_w, new_b)
        report.counts["refitted"] += 1
        report.layers[pair.scaling] = {"refit_error_before": before, "refit_error_after": after}
        log.debug("refit %s: held-out layer error %.4g -> %.4g", pair.scaling, before, after)
    return PassResult(graph, modified=bool(report.counts.get("refitted")), report=report)


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


def _accumulate(current, original, data, mid, target, axis, with_bias, batch_size, select):
    zz = yz = None
    for zb, yb in _pairs_of(current, original, data, mid, target, batch_size):
        z = channels_last(zb[mid], axis)
        y = _targets(yb[target], axis, select)
        if with_bias:
            z = np.hstack([z, np.ones((len(z), 1))])
        zz = z.T @ z if zz is None else zz + z.T @ z
        yz = y.T @ z if yz is None else yz + y.T @ z
    return zz, yz


def _targets(y: np.ndarray, axis: int, select: np.ndarray | None) -> np.ndarray:
    y = channels_last(y, axis)
    return y if select is None else y[:, select]


def _held_errors(current, original, held, mid, target, axis, old, new, batch_size, select) -> tuple[float, float]:
    errors = np.zeros(2)
    for zb, yb in _pairs_of(current, original, held, mid, target, batch_size):
        z = channels_last(zb[mid], axis)
        y = _targets(yb[target], axis, select)
        for i, (w, b) in enumerate((old, new)):
            pred = z @ w.T + (0 if b is None else b)
            errors[i] += float(np.sum((pred - y) ** 2))
    return float(errors[0]), float(errors[1])
