"""refit(): least-squares refit of every pruned layer to the original model's outputs.

The layers are each split pair's scaling op, and each Conv/Gemm/MatMul whose input lost channels (its im2col patches
are the regressors); with ``downstream`` (channel removal), every Conv/Gemm/MatMul after one of those too.

Sequential, in topological order: layer L is fitted on the inputs z that the already-compressed layers before it
produce, against the original model's output y of the same layer, so errors do not pile up through depth:
``S, b = argmin E||S z + b - y||^2 + lambda ||S||^2``, from sums of z z^T and y z^T over sub-sampled patch rows. The
inputs come from a `Frontier` per model and sample set: every node runs once per sample, when a later layer first
needs its output, so a layer refitted before that runs with its new weights (memory: the live activations times
the samples, up to `frontier.CACHE_BYTES`). A refit that makes the layer's error on the held-out samples worse is
not kept.

Two refinements of the target y (``Target``):
* residual sum: a layer whose only consumer is a two-input Add is fitted so that the *sum* matches the original's,
  ``y = original(sum) - current(other branch)``, so the last layer of a block absorbs the skip path's error;
* activation-aware: when the fitted tensor feeds only a Relu or a Clip, an error both models' activations clip away
  costs nothing. One majorize-minimize step: fit plainly, then refit with the target, where the original is clipped,
  set to that first fit's output pushed to the clip bound (``min(p, lo)`` below ``lo``, ``max(p, hi)`` above ``hi``).
  That surrogate is above the error after the activation and equal to it at the first fit, so the second fit's
  error after the activation is no larger than the first's (on the fit samples). Errors are measured after the
  activation.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from scipy import linalg

from onnxprune import rules
from onnxprune.calibration.frontier import Frontier
from onnxprune.calibration.runner import row_budget
from onnxprune.graph import to_graph, unique_name
from onnxprune.passes.basis import BasisPair
from onnxprune.passes.tucker import PROJECTION
from onnxprune.progress import steps
from onnxprune.result import PassResult, Report
from onnxprune.rules import const, layouts
from onnxprune.rules.layouts import channels_last

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
    seed: int = 0,
    low_rank: bool = True,
    reference: gs.Graph | None = None,
    downstream: bool = False,
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
        seed: Seed of the positions sub-sampled per batch.
        low_rank: Refit both factors of a split pair (the best rank-r layer in the data norm) rather than its
            scaling op alone.
        reference: `original` cleaned up as `graph` was (`Runs.of`); its tensors are the targets.
        downstream: Refit too every layer (Conv group 1 / Gemm / MatMul, constant weight) that runs after one of
            those: its inputs carry the error of the layers before it, which a fit to the original's output can
            take out. Channel removal uses it: its cut residual streams change every later input (chars ResNet-20,
            channels at 0.55 of the layers' time: held-out agreement 0.902 -> 0.931, test accuracy 96.62 ->
            97.58 %; 0.6: 93.46 -> 94.54 %).
    """
    report = Report()
    original_names = _names(original, reference)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    nodes = {n.name: n for n in graph.nodes}
    split = {p.scaling: nodes[p.basis] for p in pairs if _still_split(p, nodes)}
    split_basis = {n.name for n in split.values()}  # fitted with their scaling op
    # a Tucker projection (passes/tucker.py) has no tensor of the original to fit to: its pair is fitted after it
    projections = {
        n.inputs[0].inputs[0].name
        for n in split.values()
        if n.inputs[0].inputs and n.inputs[0].inputs[0].name.endswith(PROJECTION)
    }
    layers = {p.scaling for p in pairs if p.scaling in order}
    shrunk = set(kept or {})
    layers |= {
        n.name
        for n in graph.nodes
        if n.inputs and n.inputs[0].name in shrunk and _rows_of(n) is not None and n.name not in projections
    }
    if downstream:
        layers |= {
            n.name
            for n in _after(graph, layers)
            if _rows_of(n) is not None and n.name not in projections and n.name not in split_basis
        }
    ordered = sorted(layers, key=order.get)
    runs = Runs.of(graph, template, original, fit, held, batch_size=batch_size, reference=reference)
    for i, name in enumerate(steps(ordered, "refit")):
        node = nodes[name]
        later = {id(nodes[n]) for n in ordered[i:]}
        first = split.get(name, node)
        if name in split and low_rank:
            if _refit_low_rank(graph, split[name], node, runs, original_names, kept or {}, later, ridge, report, seed):
                continue
        rows = _rows_of(node)
        target = _target_of(node, graph, original_names, kept or {}, later - {id(first), id(node)})
        if target is None or rows is None:
            report.skip(node, "no matching tensor in the original model to fit to, or an input layout not handled")
            continue
        old_w, old_b = layouts.affine(node)
        axis = layouts.output_channel_axis(node)
        with_bias = layouts.bias_input(node) is not None
        source = node.inputs[0].name
        r = old_w.shape[1]
        batches = runs.fit(source, target)
        solved = zz = None
        kept_rows = _KeptRows() if target.clip else None
        for _ in range(2 if target.clip else 1):  # with an activation: one majorize-minimize step from the plain fit
            last = None if solved is None else (solved,)
            zz, yz = _accumulate(batches, source, target, rows, axis, with_bias, last, zz, seed=seed, kept=kept_rows)
            step = _solve(zz, yz, r, ridge)
            if step is None:
                break
            solved = step
        if solved is None:
            report.skip(node, "least-squares system is singular")
            continue
        new_w, new_b = solved[:, :r], (solved[:, r] if with_bias else None)
        before, after = _held_errors(
            runs.held(source, target), source, target, rows, axis, ((old_w,), old_b), ((new_w,), new_b), seed=seed
        )
        if after >= before:
            report.skip(node, f"refit kept out: held-out error {after:.4g} >= {before:.4g}")
            report.counts["refits_rejected"] += 1
            continue
        _write(graph, node, new_w, new_b)
        report.counts["refitted"] += 1
        report.counts["refit_residual_sums"] += target.offset is not None
        report.counts["refit_clipped_targets"] += target.clip is not None
        report.layers[name] = {"refit_error_before": before, "refit_error_after": after}
        log.debug("refit %s: held-out layer error %.4g -> %.4g", name, before, after)
    report.counts["refit_segments"] += runs.segments
    return PassResult(graph, modified=bool(report.counts.get("refitted")), report=report)


def _after(graph: gs.Graph, names: set[str]) -> list[gs.Node]:
    """The nodes of `graph` that consume, directly or not, an output of a node named in `names`."""
    found: dict[int, gs.Node] = {}
    stack = [t for n in graph.nodes if n.name in names for t in n.outputs]
    while stack:
        for consumer in stack.pop().outputs:
            if id(consumer) not in found:
                found[id(consumer)] = consumer
                stack.extend(consumer.outputs)
    return list(found.values())


def _names(original: onnx.ModelProto, reference: gs.Graph | None) -> set[str]:
    """The tensors of the original model that a layer can be fitted to."""
    if reference is not None:
        return {t.name for n in reference.nodes for t in n.outputs if t.name}
    return {t for n in original.graph.node for t in n.output}


def _solve(zz: np.ndarray, yz: np.ndarray, r: int, ridge: float) -> np.ndarray | None:
    """[Co, r(+1)] minimising the squared error plus `ridge` (relative to the mean of diag z z^T) on the weights."""
    reg = np.zeros_like(zz)
    reg[:r, :r] = np.eye(r) * ridge * max(np.trace(zz[:r, :r]) / r, 1e-12)
    try:
        solved = np.linalg.solve(zz + reg, yz.T).T
    except np.linalg.LinAlgError:
        return None
    return solved if np.all(np.isfinite(solved)) else None


def _rows_of(node: gs.Node) -> layouts.Rows | None:
    """The map x -> [positions, in] rows that the [out, in] weight matrix multiplies; None for other layouts."""
    layout = layouts.layout_of(node)
    return None if layout is None else layout.patches(node)


def _write(graph: gs.Graph, node: gs.Node, w: np.ndarray, b: np.ndarray | None) -> None:
    dtype = const(node.inputs[1]).dtype
    weight, attrs = layouts.layout_of(node).from_matrix(node, w)
    node.attrs.update(attrs)
    node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}/weight_refit"), weight.astype(dtype))
    if b is not None:
        bias = gs.Constant(unique_name(graph, f"{node.name}/bias_refit"), b.astype(dtype))
        index = layouts.bias_input(node)
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = bias


@dataclasses.dataclass(frozen=True)
class Target:
    """What a layer is fitted to.

    The original model's tensor `name` (its channels `select`), minus the current model's tensor `offset` (a residual
    sum's other branch), compared after clipping to `clip` (the activation that follows). `classes`: its channels
    are class scores that reach the outputs unchanged (`_class_scores`).
    """

    name: str
    offset: str | None = None
    clip: tuple[float, float] | None = None
    select: np.ndarray | None = None
    classes: bool = False


def _target_of(
    node: gs.Node,
    graph: gs.Graph,
    original_names: set[str],
    kept: dict[str, np.ndarray],
    pending: set[int] = frozenset(),
) -> Target | None:
    """The fit target of `node`: its own output, or the residual sum it feeds; with the activation that follows.

    The sum is the target only when its other branch depends on no layer in `pending` (ids of the layers refitted
    later): a branch is computed once, with the weights it has when it runs (``Frontier``). Of two layers that meet
    at one Add (a residual block's last layer and its projection shortcut), the first fits its own output and the
    second the sum.
    """
    out = node.outputs[0]
    if out.name not in original_names:
        return None
    fitted, offset = out, None
    if len(out.outputs) == 1 and out.outputs[0].op == "Add" and len(out.outputs[0].inputs) == 2:
        add = out.outputs[0]
        other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
        if (
            other is not out
            and not isinstance(other, gs.Constant)
            and other.shape is not None
            and list(other.shape) == list(out.shape or [])
            and add.outputs[0].name in original_names
            and not (pending and _depends_on(other, pending))
        ):
            fitted, offset = add.outputs[0], other.name
    clip = None if fitted in graph.outputs else _clip_bounds(fitted)
    classes = offset is None and clip is None and _class_scores(fitted, graph, layouts.output_channel_axis(node))
    return Target(fitted.name, offset, clip, kept.get(fitted.name), classes)


def _class_scores(tensor: gs.Variable, graph: gs.Graph, axis: int | None) -> bool:
    """Whether the channels of `tensor` (on `axis`, its last) are class scores.

    They are when the tensor is a graph output, or reaches one through ops that only move elements and keep them on
    the last axis, with at most a Softmax / LogSoftmax over them on the way (`rules.keeps_class_axis`): a
    classifier's or a CTC recogniser's last layer.
    """
    shape = tensor.shape
    if shape is None or axis is None or not len(shape) or axis % len(shape) != len(shape) - 1:
        return False
    return rules.scores_reach(tensor, graph.outputs, shape[-1])


def _depends_on(tensor: gs.Tensor, nodes: set[int]) -> bool:
    """Whether any node whose id is in `nodes` is an ancestor of `tensor`."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        for producer in t.inputs:
            if id(producer) in nodes:
                return True
            stack.extend(producer.inputs)
    return False


def _clip_bounds(tensor: gs.Variable) -> tuple[float, float] | None:
    """(lo, hi) of the Relu or constant-bound Clip that is the tensor's only consumer; None otherwise."""
    return rules.clip_bounds(tensor.outputs[0]) if len(tensor.outputs) == 1 else None


@dataclasses.dataclass(frozen=True)
class Runs:
    """The four frontiers a sequential refit reads: the current and the original model on the fit and held samples."""

    current_fit: Frontier
    original_fit: Frontier
    current_held: Frontier
    original_held: Frontier

    @classmethod
    def of(
        cls, graph: gs.Graph, template: onnx.ModelProto, original: onnx.ModelProto, fit, held, *, batch_size: int,
        reference: gs.Graph | None = None,
    ):  # fmt: skip
        """The four frontiers of `graph` (exported like `template`) and of `original` on `fit` and `held`.

        `reference`, when given, is `original` as a graph cleaned up as the pruned one was (BatchNormalization
        folded): the layers the pruning left alone are then the same in both, and computed once.
        """
        reference = to_graph(original) if reference is None else reference
        original_fit = Frontier(reference, original, fit, batch_size=batch_size)
        original_held = Frontier(reference, original, held, batch_size=batch_size)
        return cls(  # the current frontiers borrow what is computed before the first pruned layer
            current_fit=Frontier(graph, template, fit, batch_size=batch_size, source=original_fit),
            original_fit=original_fit,
            current_held=Frontier(graph, template, held, batch_size=batch_size, source=original_held),
            original_held=original_held,
        )

    def fit(self, source: str, target: Target) -> list[tuple[dict, dict]]:
        """Per fit batch: (the current model's input `source` and offset, the original model's target)."""
        return _pairs(self.current_fit, self.original_fit, source, target)

    def held(self, source: str, target: Target) -> list[tuple[dict, dict]]:
        """The same on the held-out samples."""
        return _pairs(self.current_held, self.original_held, source, target)

    @property
    def segments(self) -> int:
        """How many onnxruntime models the four frontiers built so far."""
        return sum(f.runs for f in (self.current_fit, self.original_fit, self.current_held, self.original_held))


def _pairs(current: Frontier, original: Frontier, source: str, target: Target) -> list[tuple[dict, dict]]:
    ours = [source, *([target.offset] if target.offset else [])]
    return list(zip(current.get(ours), original.get([target.name]), strict=True))


def _batch_rows(zb, yb, source: str, target: Target, rows, axis: int, rng):
    """One batch as rows: inputs z, the original target y and the offset (0 without one).

    The same positions are sub-sampled in all (memory bound per batch).
    """
    x = zb[source]
    total, limit = rows.count(x), row_budget(len(x))
    pick = rng.choice(total, limit, replace=False) if total > limit else None
    z = rows(x, pick)
    y = channels_last(yb[target.name], axis, pick)
    y = y if target.select is None else y[:, target.select]
    off = channels_last(zb[target.offset], axis, pick) if target.offset else np.zeros((len(y), 1))
    return z, y, off


def _fit_target(target: Target, y: np.ndarray, off: np.ndarray, pred: np.ndarray | None) -> np.ndarray:
    """The layer's regression target, the other branch of a sum taken off.

    Where the original is clipped, the previous fit's output `pred` (offset included) pushed to the bound.
    """
    if target.clip is not None and pred is not None:
        lo, hi = target.clip
        y = np.where(y <= lo, np.minimum(pred, lo), np.where(y >= hi, np.maximum(pred, hi), y))
    return y - off


GEMM_ROWS = 8192  # rows gathered across batches before one z^T z product (a fixed batch of 1 gives 128 per batch)
KEPT_ROWS_BYTES = 512 << 20  # a layer's sub-sampled rows kept for its second majorize-minimize step, at most


class _KeptRows:
    """The (z, y, offset) rows of one layer's first `_accumulate`, for the next step on the same batches.

    Building the rows (im2col of the picked positions, the targets' layout) is most of a step once z z^T is known
    (light ResNet-50: about 10 s of its refit). Kept while they take at most `KEPT_ROWS_BYTES`; past that nothing is
    kept and the next step builds them again (memory stays bounded whatever the number of samples).
    """

    def __init__(self) -> None:
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = []
        self.complete = False
        self._bytes = 0

    def add(self, row: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        if self.rows is None:
            return
        self._bytes += sum(a.nbytes for a in row)
        if self._bytes > KEPT_ROWS_BYTES:
            self.rows = None
        else:
            self.rows.append(row)


def _accumulate(batches, source, target: Target, rows, axis, with_bias, previous=None, zz=None, *, seed=0, kept=None):
    """Sums over `batches` of z z^T and y z^T (z with a column of ones for the bias), in float64.

    `previous` is the fit the targets build on, as factors whose product is [Co, K + 1] (`_transposed`); `zz`, when
    given, is the z z^T of an earlier call on the same batches (same seed, same rows), returned as is: only the
    targets change between majorize-minimize steps.
    `kept` (a `_KeptRows`) is filled with the rows on the first call and read back on the next.
    Rows are gathered into blocks of `GEMM_ROWS` and multiplied in float32 (half the time of float64 on the K x K
    products that dominate a wide layer's refit); with a bias column the rows are first shifted by the mean of the
    first block, so the float32 sums hold the spread of z, not its mean (whose square would swamp the covariance),
    and the shift is put back exactly in float64: with z = z' + c, ``Z = Z' + 1 v^T`` for ``v = [c, 0]``.
    """
    known = zz is not None
    product = None if previous is None else _transposed(previous)
    zz_part = yz = None
    shift = None
    rng = np.random.default_rng(seed)
    zs: list[np.ndarray] = []
    ys: list[np.ndarray] = []

    def flush() -> None:
        nonlocal zz_part, yz, shift
        z, y = np.vstack(zs), np.vstack(ys).astype(np.float32)
        zs.clear()
        ys.clear()
        if with_bias:
            if shift is None:
                shift = z[:, :-1].mean(0)
            z[:, :-1] -= shift
        if not known:
            part = (z.T @ z).astype(np.float64)
            zz_part = part if zz_part is None else np.add(zz_part, part, out=zz_part)
        part = (y.T @ z).astype(np.float64)
        yz = part if yz is None else np.add(yz, part, out=yz)

    def built():
        for zb, yb in batches:
            z, y, off = _batch_rows(zb, yb, source, target, rows, axis, rng)
            z = z.astype(np.float32, copy=False)
            if with_bias:
                z = np.hstack([z, np.ones((len(z), 1), np.float32)])
            if kept is not None:
                kept.add((z, y, off))
            yield z, y, off
        if kept is not None:
            kept.complete = kept.rows is not None

    for z, y, off in kept.rows if kept is not None and kept.complete else built():
        zs.append(z)
        ys.append(_fit_target(target, y, off, None if product is None else _times(z, product) + off))
        if sum(len(b) for b in zs) >= GEMM_ROWS:
            flush()
    if zs:
        flush()
    if yz is None or shift is None:
        return (zz if known else zz_part), yz
    v = np.append(shift.astype(np.float64), 0.0)
    yz += np.outer(yz[:, -1], v)
    if not known:
        sums, n = zz_part[:, -1].copy(), zz_part[-1, -1]
        zz = zz_part + np.outer(sums, v) + np.outer(v, sums) + n * np.outer(v, v)
    return zz, yz


def _held_errors(batches, source, target: Target, rows, axis, old, new, *, seed=0, weights=None):
    """Squared error of the old and the new weights on the held-out `batches`, after the sum and the activation.

    `old` and `new` are (factors whose product is the weight [Co, K] (`_times`), bias [Co] or None). With `weights`
    (one per output channel), each channel's squared error is weighted.
    """
    errors = np.zeros(2)
    rng = np.random.default_rng(seed + 1)
    lo, hi = target.clip or (-np.inf, np.inf)
    scale = 1.0 if weights is None else weights
    pairs = [(_transposed(w), 0.0 if b is None else b) for w, b in (old, new)]
    for zb, yb in batches:
        z, y, off = _batch_rows(zb, yb, source, target, rows, axis, rng)
        z = z.astype(np.float32, copy=False)  # the product in float32, the errors summed in float64
        for i, (wt, b) in enumerate(pairs):
            pred = _times(z, wt) + b + off
            errors[i] += float(np.sum((np.clip(pred, lo, hi) - np.clip(y, lo, hi)) ** 2 * scale))
    return float(errors[0]), float(errors[1])


def _transposed(factors: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """What `_times` multiplies rows by for the weight ``W = F_1 F_2 ... F_n``: ``F_n^T, ..., F_1^T`` in float32.

    Multiplied one by one where that takes fewer multiply-adds per row than the product (a split layer's two
    factors at rank r: ``r (K + Co)`` against ``K Co``), else the product at once.
    """
    dims = [f.shape[0] for f in factors] + [factors[-1].shape[1]]
    chained = sum(a * b for a, b in zip(dims[:-1], dims[1:], strict=True))
    if len(factors) > 1 and chained >= dims[0] * dims[-1]:
        factors = (np.linalg.multi_dot(factors),)
    return [f.T.astype(np.float32) for f in reversed(factors)]


def _times(z: np.ndarray, transposed: list[np.ndarray]) -> np.ndarray:
    """``z W^T`` [rows, Co] for rows `z` [rows, K] and the matrices of `_transposed`."""
    for m in transposed:
        z = z @ m
    return z


CLASS_WEIGHT_FLOOR = 0.01  # times the mean class probability (1 / classes): added to every class's weight
CONFIDENT = 0.5  # mean top-1 probability of the original's rows under which they are not taken as class scores


def _class_weights(batches, target: Target, axis: int) -> np.ndarray | None:
    """Per class c, ``E[p_c] + CLASS_WEIGHT_FLOOR / C``, p the softmax of the original's rows.

    The KL divergence between the original's and the refitted layer's output distributions is, to second order in
    the logit error d, ``d^T (diag p - p p^T) d / 2`` (the Fisher information of the softmax); its diagonal part
    weights each class's squared error by its probability, so the rank goes to the classes the data predicts, not
    to thousands of logits that never come near the top (ddddocr's CTC head: 8210 classes, 63 in use). None when
    the rows are not confident class scores (mean top-1 probability under `CONFIDENT`, e.g. an embedding).
    """
    total, top, n = 0.0, 0.0, 0
    for _, yb in batches:
        y = channels_last(yb[target.name], axis)
        p = np.exp(y - y.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        total = total + p.sum(0)
        top += float(p.max(1).sum())
        n += len(p)
    if not n or top / n < CONFIDENT:
        return None
    mean = total / n
    return mean + CLASS_WEIGHT_FLOOR / len(mean)


MAX_LOW_RANK_INPUTS = 4608  # a basis op with wider patches (K) keeps its basis; only its scaling op is refitted


def _still_split(pair: BasisPair, nodes: dict[str, gs.Node]) -> bool:
    basis = nodes.get(pair.basis)
    return (
        basis is not None
        and pair.scaling in nodes
        and basis.outputs[0].name == pair.mid
        and layouts.weight_matrix(basis) is not None
    )


def _refit_low_rank(graph, basis, scaling, runs, original_names, kept, pending, ridge, report, seed) -> bool:
    """Refit a split pair as a whole: the best rank-r layer for its compressed inputs (DESIGN §3, Compensation).

    With centred input rows x (the basis op's patches on the already-compressed model) and targets y (the original
    model's layer output, or residual sum, clipped as the activation that follows does), ``W_ls = C_yx C^-1`` with
    ``C = E[x x^T] + ridge = L L^T``; the rank-r W minimising ``E||y - W x - b||^2`` is the truncated SVD of
    ``W_ls L`` mapped back by ``L^-1`` (the error is ``||(W_ls - W) L||_F^2`` plus a constant), and
    ``b = E[y] - W E[x]``. The two factors become the basis op ``V_r^T L^-1`` and the scaling op ``U_r S_r``.

    Returns:
        True when the pair was handled here (refitted, or kept after the held-out check); False to fall back to
        refitting the scaling op alone (input too wide, or no target).
    """
    rows = _rows_of(basis)
    target = _target_of(scaling, graph, original_names, kept, pending - {id(basis), id(scaling)})
    b_w, _ = layouts.affine(basis)
    s_w, s_b = layouts.affine(scaling)
    r, k = b_w.shape
    if rows is None or target is None or k > MAX_LOW_RANK_INPUTS or layouts.weight_matrix(scaling) is None:
        return False
    axis = layouts.output_channel_axis(scaling)
    with_bias = layouts.bias_input(scaling) is not None
    source = basis.inputs[0].name
    batches = runs.fit(source, target)
    weights = _class_weights(batches, target, axis) if target.classes else None
    solved = zz = moments = None
    kept_rows = _KeptRows() if target.clip else None
    for _ in range(2 if target.clip else 1):
        zz, yz = _accumulate(batches, source, target, rows, axis, True, solved, zz, seed=seed, kept=kept_rows)
        moments = moments or _InputMoments.of(zz, ridge, with_bias)  # the same inputs in every step
        factors = _solve_low_rank(moments, yz, r, weights)
        if factors is None:
            break
        new_s, new_b, new_bias = factors
        # [S, bias] [[B, 0], [0, 1]]: the fit on rows [x, 1], kept as factors (half the multiply-adds at rank r)
        bias_column = (new_bias if new_bias is not None else np.zeros(len(new_s)))[:, None]
        solved = (np.hstack([new_s, bias_column]), linalg.block_diag(new_b, np.ones((1, 1))))
    if solved is None:
        report.skip(scaling, "low-rank least-squares system is singular")
        return True
    old = ((s_w, b_w), s_b)
    new = ((new_s, new_b), new_bias)
    held = runs.held(source, target)
    before, after = _held_errors(held, source, target, rows, axis, old, new, seed=seed, weights=weights)
    if after >= before:
        report.skip(scaling, f"low-rank refit kept out: held-out error {after:.4g} >= {before:.4g}")
        report.counts["refits_rejected"] += 1
        return True
    _write(graph, basis, new_b, None)
    _write(graph, scaling, new_s, new_bias)
    report.counts["refitted"] += 1
    report.counts["refit_low_rank"] += 1
    report.counts["refit_residual_sums"] += target.offset is not None
    report.counts["refit_clipped_targets"] += target.clip is not None
    report.counts["refit_class_weighted"] += weights is not None
    report.layers[scaling.name] = {"refit_error_before": before, "refit_error_after": after, "rank": r}
    log.debug("low-rank refit %s (rank %d): held-out layer error %.4g -> %.4g", scaling.name, r, before, after)
    return True


@dataclasses.dataclass(frozen=True)
class _InputMoments:
    """What the low-rank refit needs of the inputs' second moments: ``C = L L^T`` (ridge added) and the mean.

    Attributes:
        low: The Cholesky factor L [K, K] of the covariance (centred when the layer has a bias), or None when
            ``C`` is not positive definite or there are no rows.
        mean: ``E[x]`` [K].
        n: The number of rows.
        centred: Whether C is centred (the layer has a bias).
    """

    low: np.ndarray | None
    mean: np.ndarray
    n: float
    centred: bool

    @classmethod
    def of(cls, zz: np.ndarray, ridge: float, with_bias: bool) -> _InputMoments:
        """From the sums over rows [x, 1] of z z^T (`_accumulate`); `ridge` relative to the mean diagonal of C."""
        n = zz[-1, -1]
        k = zz.shape[0] - 1
        mean = zz[:k, k] / max(n, 1e-300)
        if n <= 0:
            return cls(None, mean, n, with_bias)
        cov = zz[:k, :k] / n - np.outer(mean, mean) if with_bias else zz[:k, :k] / n
        cov = cov + np.eye(k) * ridge * max(np.trace(cov) / k, 1e-12)
        try:
            low = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            low = None
        return cls(low, mean, n, with_bias)


def _solve_low_rank(moments: _InputMoments, yz: np.ndarray, rank: int, weights: np.ndarray | None = None):
    """(scaling [Co, r], basis [r, K], bias [Co] or None) from the input moments and the sums of y z^T.

    Without a bias the rows are not centred (the layer must pass through the origin). With `weights` [Co], the
    error of output channel c counts `weights[c]` times: the truncated SVD is of ``diag(sqrt w) W_ls L``, and
    ``diag(1/sqrt w)`` maps its left factor back (the least-squares W_ls and the bias are per channel, unchanged).
    None when the system is singular.
    """
    low, sx, n = moments.low, moments.mean, moments.n
    if low is None:
        return None
    k = len(sx)
    sy = yz[:, k] / n
    cross = yz[:, :k] / n - np.outer(sy, sx) if moments.centred else yz[:, :k] / n
    root = 1.0 if weights is None else np.sqrt(weights)[:, None]
    try:
        # W_ls L = C_yx C^-1 L = C_yx L^-T: one triangular solve, no W_ls
        whitened = linalg.solve_triangular(low, cross.T, lower=True, check_finite=False).T
        scaling, vt = _top_factors(root * whitened, rank)
        basis = linalg.solve_triangular(low, vt.T, trans="T", lower=True, check_finite=False).T  # V_r^T L^-1
    except np.linalg.LinAlgError:  # scipy.linalg raises the same class
        return None
    scaling = scaling / root
    bias = sy - scaling @ (basis @ sx) if moments.centred else None
    if not (np.all(np.isfinite(scaling)) and np.all(np.isfinite(basis))):
        return None
    return scaling, basis, bias


def _top_factors(a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(U_r S_r [m, r], V_r^T [r, n]): the best rank-r approximation of `a` [m, n] as two factors.

    From the top `rank` eigenvectors of the smaller Gram matrix (scipy.linalg.eigh with ``subset_by_index``): a
    fraction of a dense SVD's time on the refit's [Co, K] matrices (K up to 4608). The product is the projection of
    `a` on those eigenvectors, exact whatever the conditioning; a direction whose singular value is numerically
    zero gets zero factors.
    """
    m, n = a.shape
    rank = max(1, min(rank, m, n))
    if m > n:
        _, v = linalg.eigh(a.T @ a, subset_by_index=[n - rank, n - 1], check_finite=False)
        v = v[:, ::-1]
        return a @ v, v.T
    _, u = linalg.eigh(a @ a.T, subset_by_index=[m - rank, m - 1], check_finite=False)
    u = u[:, ::-1]
    rows = u.T @ a  # [r, n], rows of norm s
    s = np.linalg.norm(rows, axis=1)
    alive = s > np.finfo(a.dtype).eps * max(float(s[0]), 1e-300) * max(m, n)
    vt = np.where(alive[:, None], rows / np.where(alive, s, 1.0)[:, None], 0.0)
    return u * np.where(alive, s, 0.0), vt


@dataclasses.dataclass(frozen=True)
class TrainEnd:
    """The end of a tensor train (``passes.tt.write_tt``) that `refit_tensor_trains` fits.

    Attributes:
        last_core: Name of the MatMul by the last core: input [..., rest, r n], output [..., rest, m].
        output: Name of the layer's output tensor ([..., M] = [..., rest * m], bias included), as in the original.
        bias: The layer's bias [M] (kept as it is), or None.
    """

    last_core: str
    output: str
    bias: np.ndarray | None


def refit_tensor_trains(
    graph: gs.Graph,
    *,
    template: onnx.ModelProto,
    original: onnx.ModelProto,
    fit: dict[str, np.ndarray],
    held: dict[str, np.ndarray],
    ends: list[TrainEnd],
    ridge: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    reference: gs.Graph | None = None,
) -> PassResult:
    """Refit, in place, the last core of each tensor train to the original layer's output, sequentially.

    Given the other cores, the layer is linear in its last core G_d: with z the rows [r_{d-1} n_d] that reach the
    last MatMul (on the already-compressed model) and y the original model's output of the layer (minus the bias,
    its rows [m_d] in the same order), ``G = argmin E||z G - y||^2 + ridge`` (one alternating-least-squares step of
    Oseledets & Dolgov 2012 on the core that sees the data last; DESIGN §3, Compensation). When the output feeds
    only a Relu or Clip, a second fit is made with the clipped targets pushed to the first fit's prediction, as
    `refit` does. A refit that is worse on the held-out samples is not kept.

    Args:
        graph: The graph with the tensor trains; edited in place.
        template: Model whose opsets and metadata exports of `graph` take.
        original: The unpruned model; its tensor named like each train's output is the target.
        fit: Calibration samples to fit on.
        held: Held-out samples on which a refit must not be worse than the core it replaces.
        ends: The trains (`TrainEnd`).
        ridge: Regularisation, relative to the mean diagonal of E[z z^T].
        batch_size: Samples per onnxruntime run.
        seed: Unused draws are seeded by it (kept for a uniform signature).
        reference: `original` cleaned up as `graph` was (`Runs.of`); its tensors are the targets.

    Returns:
        The result: ``report.counts["refitted_cores"]``, ``report.layers[last core]`` with the held-out errors.
    """
    del seed
    report = Report()
    original_names = _names(original, reference)
    nodes = {n.name: n for n in graph.nodes}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    todo = [e for e in ends if e.last_core in nodes and e.output in original_names]
    todo.sort(key=lambda e: order[e.last_core])
    runs = Runs.of(graph, template, original, fit, held, batch_size=batch_size, reference=reference)
    for end in steps(todo, "refit tensor trains"):
        node = nodes[end.last_core]
        old = const(node.inputs[1]).astype(np.float64)  # [r n, m]
        source = node.inputs[0].name
        out = next((t for n in graph.nodes for t in n.outputs if t.name == end.output), None)
        clip = None if out is None or out in graph.outputs else _clip_bounds(out)
        target = Target(end.output, clip=clip)
        solved = None
        for _ in range(2 if clip else 1):
            zz = yz = 0.0
            for zb, yb in runs.fit(source, target):
                z, y, bias = _core_rows(zb[source], yb[end.output], end.bias, old.shape)
                if solved is not None:  # where the original is clipped, aim at the first fit pushed to the bound
                    y = _fit_target(target, y + bias, np.zeros((1, 1)), z @ solved + bias) - bias
                zz, yz = zz + z.T @ z, yz + y.T @ z
            step = _solve(zz, yz, old.shape[0], ridge) if np.ndim(zz) == 2 else None
            if step is None:
                break
            solved = step.T  # [r n, m]
        if solved is None:
            report.skip(node, "least-squares system of the last core is singular")
            continue
        errors = np.zeros(2)
        lo, hi = clip or (-np.inf, np.inf)
        for zb, yb in runs.held(source, target):
            z, y, bias = _core_rows(zb[source], yb[end.output], end.bias, old.shape)
            for i, w in enumerate((old, solved)):
                errors[i] += float(np.sum((np.clip(z @ w + bias, lo, hi) - np.clip(y + bias, lo, hi)) ** 2))
        before, after = float(errors[0]), float(errors[1])
        if after >= before:
            report.skip(node, f"core refit kept out: held-out error {after:.4g} >= {before:.4g}")
            report.counts["refits_rejected"] += 1
            continue
        dtype = const(node.inputs[1]).dtype
        node.inputs[1] = gs.Constant(unique_name(graph, f"{node.name}/weight_refit"), solved.astype(dtype))
        report.counts["refitted_cores"] += 1
        report.layers[node.name] = {"refit_error_before": before, "refit_error_after": after}
        log.debug("tensor-train refit %s: held-out layer error %.4g -> %.4g", node.name, before, after)
    report.counts["refit_segments"] += runs.segments
    return PassResult(graph, modified=bool(report.counts.get("refitted_cores")), report=report)


def _core_rows(
    z: np.ndarray, y: np.ndarray, bias: np.ndarray | None, core: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | float]:
    """One batch as rows of the last core's product: inputs [rows, r n], targets less the bias [rows, m], the bias.

    `core` is the shape [r n, m] of the last core's matrix; the layer output [..., M] is [..., M / m, m] in rows.
    """
    k, m = core
    y = y.astype(np.float64).reshape(-1, m)
    tiled = 0.0 if bias is None else np.tile(bias.reshape(-1, m), (len(y) * m // bias.size, 1))
    return z.reshape(-1, k).astype(np.float64), y - tiled, tiled
