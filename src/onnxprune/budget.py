"""Global allocation: parameter/MAC counting per channel class, comparable scores, bisection to the target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import BudgetError
from onnxprune.graph import to_graph
from onnxprune.latency import channel_latency
from onnxprune.passes.basis import BasisPair
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import ChannelGraph
from onnxprune.rules import layouts
from onnxprune.shapes import fix_input_shapes

TARGETS = ("params", "flops", "latency")
COUNT_INDEX = {"params": 0, "flops": 1, "latency": 2}  # a target's entry in `CostModel.count`


@dataclass
class _Term:
    numel: int
    macs_per_elem: int
    axes: list[tuple[int, str]]  # (full length along the axis, tracked tensor whose kept channels select it)
    weight: bool = True  # False: MACs of a product of two computed tensors, no parameters


class CostModel:
    """Counts parameters and MACs of a graph for any choice of alive channel classes.

    A basis pair counts as what will be written: the split, or the single op it merges back into when that is
    smaller (``merge_unprofitable``). MACs are counted at the graph's inferred shapes, or at `shapes` (tensor name
    -> dims, e.g. ``shapes.concrete_shapes`` at a concrete input shape) where given.
    """

    def __init__(
        self,
        graph: gs.Graph,
        analysis: ChannelGraph | None = None,
        pairs: list[BasisPair] = (),
        limits: dict[str, int] | None = None,
        shapes: dict[str, list] | None = None,
    ) -> None:
        self.analysis = analysis
        self.terms: list[_Term] = []
        # (basis term, scaling term, merged term, mid tensor, full rank, largest rank kept split or None)
        self.pairs: list[tuple[int, int, _Term, str, int, int | None]] = []
        where: dict[tuple[str, int], int] = {}
        seen: set[str] = set()
        term_of: dict[str, int] = {}
        for node in graph.nodes:
            step = analysis.steps.get(node.name) if analysis is not None else None
            slices = {ps.index: ps for ps in step.params} if step is not None else {}
            out_shape = _shape(node.outputs[0], shapes) if node.outputs else None
            for i, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant) and tensor.name in term_of and i in layouts.weight_inputs(node):
                    self.terms[term_of[tensor.name]].macs_per_elem += layouts.macs_per_weight(node, out_shape)
                    continue  # a shared weight: stored once, multiplied at every use
                if not isinstance(tensor, gs.Constant) or tensor.name in seen:
                    continue
                values = tensor.values
                if values.dtype.kind != "f" or values.size == 0:
                    continue
                seen.add(tensor.name)
                macs = layouts.macs_per_weight(node, out_shape) if i in layouts.weight_inputs(node) else 0
                axes = []
                for axis, name in slices[i].axes if i in slices else ():
                    full = len(analysis.flows[name].ids)
                    if values.ndim and slices[i].positions(values.shape[axis], full, np.arange(full)) is not None:
                        axes.append((full, name))
                where[(node.name, i)] = term_of[tensor.name] = len(self.terms)
                self.terms.append(_Term(int(values.size), macs, axes))
            product = layouts.product_macs(node, _shape(node.inputs[0], shapes), out_shape) if node.inputs else 0
            if product:  # attention's products: they shrink with the heads (the channels on a batch axis)
                self.terms.append(_Term(product, 1, self._product_axes(node), weight=False))
        for pair in pairs:
            b, sc = where.get((pair.basis, 1)), where.get((pair.scaling, 1))
            if b is None or sc is None:
                continue
            bt, st = self.terms[b], self.terms[sc]
            rank = next((full for full, name in bt.axes if name == pair.mid), None)
            if rank is None:
                continue
            outer = [a for a in bt.axes + st.axes if a[1] != pair.mid]
            merged = _Term(bt.numel * st.numel // rank // rank, bt.macs_per_elem, outer)
            self.pairs.append((b, sc, merged, pair.mid, rank, (limits or {}).get(pair.basis)))
        self._paired = {i for pair in self.pairs for i in pair[:2]}

    def _product_axes(self, node: gs.Node) -> list[tuple[int, str]]:
        """The tracked axis that scales a product's MACs: its output's channels, else the contracted ones."""
        if self.analysis is None:
            return []
        for name in (node.outputs[0].name, node.inputs[0].name):
            if name in self.analysis.flows:
                return [(len(self.analysis.flows[name].ids), name)]
        return []

    timing: LatencyModel | None = None  # the matrix layers' measured seconds (channel knapsack, latency target)

    def count(self, alive: np.ndarray | None = None) -> tuple[int, int, float]:
        """(parameters, MACs per sample, seconds) with only the `alive` classes kept (all when None).

        Each weight counts its size times the kept share along every axis it is sliced on. A basis pair counts as
        split where that holds fewer parameters than the merged op and its kept rank is within its limit, else as
        the merged op.

        Args:
            alive: ``[n_classes]`` bool, True for a kept class; None: every class kept.

        Returns:
            (parameters, MACs per sample), each rounded to an int, and the predicted seconds of the measured layers
            (`timing`; 0.0 without it).
        """
        kept: dict[str, float] = {}

        def kept_of(name: str, full: int) -> float:
            if alive is None:
                return full
            if name not in kept:
                kept[name] = float(alive[self.analysis.classes(name)].sum())
            return kept[name]

        def size(term: _Term) -> tuple[float, float]:
            frac = 1.0
            for full, name in term.axes:
                frac *= kept_of(name, full) / full
            return term.numel * frac * term.weight, term.numel * term.macs_per_elem * frac

        params = macs = 0.0
        for i, term in enumerate(self.terms):
            if i not in self._paired:
                p, m = size(term)
                params, macs = params + p, macs + m
        for b, sc, merged, mid, full_rank, limit in self.pairs:
            (bp, bm), (sp, sm), (mp, mm) = size(self.terms[b]), size(self.terms[sc]), size(merged)
            split = bp + sp < mp and (limit is None or kept_of(mid, full_rank) <= limit)
            p, m = (bp + sp, bm + sm) if split else (mp, mm)
            params, macs = params + p, macs + m
        return int(round(params)), int(round(macs)), self.timing.seconds(alive) if self.timing is not None else 0.0

    def fraction(self, term: _Term, alive: np.ndarray | None, skip: str | None = None) -> float:
        """Kept share of `term` under `alive` (1 when None), leaving out the axis selected by tensor `skip`.

        Args:
            term: One weight's term (an entry of ``terms``, or a pair's merged term).
            alive: ``[n_classes]`` bool, True for a kept class; None: every class kept.
            skip: Name of the tracked tensor whose axis is left out (e.g. a pair's mid tensor), or None.

        Returns:
            The product over the term's other sliced axes of the kept share of each: a fraction in [0, 1].
        """
        if alive is None:
            return 1.0
        frac = 1.0
        for full, name in term.axes:
            if name != skip:
                frac *= float(alive[self.analysis.classes(name)].sum()) / full
        return frac

    def savings(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Parameters and MACs each class alone frees at full size (first-order, for ranking).

        Args:
            n_classes: Number of channel classes (``analysis.n_classes``).

        Returns:
            (parameters, MACs per sample), each ``[n_classes]`` float64: per class, summed over the weights and
            each of their sliced axes, the weight's size times the share of that axis's positions the class holds
            (every axis alone, basis pairs as split).
        """
        params = np.zeros(n_classes)
        macs = np.zeros(n_classes)
        for term in self.terms:
            for full, name in term.axes:
                share = np.bincount(self.analysis.classes(name), minlength=n_classes) / full
                params += term.numel * share * term.weight
                macs += term.numel * term.macs_per_elem * share
        return params, macs


TIMED_SHARES = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8)  # channel counts timed, as shares of the layer's


class LatencyModel:
    """Predicted seconds of a graph's matrix layers for any choice of alive channel classes, from measured timings.

    Each Conv, Gemm or MatMul with a constant weight and a concrete input shape is timed whole, with fewer input
    channels and with fewer output channels (``latency.channel_latency``: onnxruntime on this machine, at the batch
    of `shapes`, cached); with both cut its time is taken as the product of the two shares, interpolated between
    the counts timed (`TIMED_SHARES` of its channels, multiples of 8 where the count is). A grouped Conv is timed
    whole and scales with its kept outputs. Layers whose channels no group tracks, and every other op, are left
    out: the whole model's measured time is what a latency search judges (``pipeline._channel_for_latency``).
    """

    def __init__(
        self,
        graph: gs.Graph,
        analysis: ChannelGraph,
        shapes: dict[str, list],
        *,
        threads: int = 0,
        measure=None,
    ) -> None:
        """Time the layers (`measure`: ``latency.channel_latency`` unless a stand-in is given, as tests do)."""
        measure = measure or channel_latency
        self.analysis = analysis
        # per layer: seconds whole, and per tracked side (None: fixed) its tensor and (counts, seconds) to interpolate
        self.layers: list[tuple[float, tuple | None, tuple | None]] = []
        for node in graph.nodes:
            layout = layouts.layout_of(node)
            spec = layout.channel_timing(node) if layout is not None and node.inputs else None
            x_shape = shapes.get(node.inputs[0].name) if spec is not None else None
            if x_shape is None or any(not isinstance(d, int) or d <= 0 for d in x_shape):
                continue
            op, w_shape, attrs, n_in, n_out = spec
            grouped = n_in is None  # a grouped Conv: timed whole, scaled with its outputs
            in_name = node.inputs[0].name if not grouped and node.inputs[0].name in analysis.flows else None
            out_name = node.outputs[0].name if node.outputs[0].name in analysis.flows else None
            if in_name is None and out_name is None:
                continue
            whole, ins, outs = measure(
                op=op,
                x_shape=list(x_shape),
                weight_shape=list(w_shape),
                attrs=attrs,
                kept_in=_timed_counts(n_in) if in_name else [],
                kept_out=_timed_counts(n_out) if out_name and not grouped else [],
                threads=threads,
            )
            out_side = _side(out_name, n_out, {} if grouped else outs, whole)
            self.layers.append((whole, _side(in_name, n_in, ins, whole), out_side))

    def seconds(self, alive: np.ndarray | None = None) -> float:
        """Predicted seconds of the timed layers with only the `alive` classes kept (all when None)."""
        total = 0.0
        for whole, *sides in self.layers:
            share = 1.0
            for side in sides:
                if side is None or alive is None:
                    continue
                name, n, counts, times = side
                classes = self.analysis.classes(name)
                kept = n * float(alive[classes].sum()) / len(classes)
                share *= float(np.interp(kept, counts, times)) / whole if whole > 0 else 1.0
            total += whole * share
        return total


def _side(name: str | None, n: int, times: dict[int, float], whole: float) -> tuple | None:
    """One tracked side of a timed layer: (tensor, channels, counts, seconds), from 0 to the whole; None if fixed."""
    if name is None:
        return None
    counts = sorted(times)
    return name, n, np.array([0, *counts, n], dtype=float), np.array([0.0, *[times[k] for k in counts], whole])


def _timed_counts(n: int) -> list[int]:
    """Channel counts below `n` to time: `TIMED_SHARES` of it, multiples of 8 where `n` is one."""
    step = 8 if n % 8 == 0 and n >= 16 else 1
    return sorted({max(step, int(round(n * f / step)) * step) for f in TIMED_SHARES} - {n})


def _shape(tensor: gs.Tensor, shapes: dict[str, list] | None = None) -> list | None:
    if shapes and tensor.name in shapes:
        return [d if isinstance(d, int) and d >= 0 else None for d in shapes[tensor.name]]
    if tensor.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape]


@dataclass
class Allocation:
    """The plan that reaches the target, and what it reaches."""

    plan: dict[str, np.ndarray]
    alive: np.ndarray
    achieved: float
    reachable: float
    latency: float | None = None  # predicted seconds of the layers allocated by measured latency


def allocate(
    analysis: ChannelGraph,
    cost: CostModel,
    importance: np.ndarray,
    *,
    remove_ratio: float,
    target: str,
    total_before: int,
    protected: frozenset[str] = frozenset(),
    round_to: int = 1,
    weights: dict[str, float] | None = None,
) -> Allocation:
    """Remove the classes of least error per parameter (or MAC) saved until `remove_ratio` of `total_before` is gone.

    Importance is normalised by its mean within each group, so scores compare across layers, then multiplied by the
    group's measured sensitivity `weights` (default 1); each tracked tensor keeps at least one channel. The cut in
    the ranked list is found by bisection on exact counts.

    Args:
        analysis: Channel groups of the graph.
        cost: Its cost model.
        importance: ``[n_classes]`` score per class (larger means keep).
        remove_ratio: Fraction of `total_before` to remove, in [0, 1).
        target: "params" (rank and count by parameters) or "flops" (by MACs).
        total_before: The original model's parameters, or MACs per sample: the ratio's base.
        protected: Names of groups never pruned.
        round_to: Each pruned group's kept count is rounded up to a multiple of this (1: no rounding).
        weights: Sensitivity weight per group name (default 1); a larger weight makes its classes costlier to remove.

    Returns:
        The allocation: ``plan`` (group name -> sorted kept indices, int64, for each group that loses channels),
        ``alive``, ``achieved`` (the fraction of `total_before` removed: the shortest prefix of the ranking that
        reaches the request, moved closer when it overshoots by more than `TOLERANCE`; with rounding, by giving
        groups back whole steps of their last-removed classes while the request is still met),
        ``reachable`` (the fraction removed when every ranked class goes); ``latency`` None.

    Raises:
        BudgetError: `remove_ratio` is more than 0.01 above the reachable fraction (``reachable`` set).
    """
    n = analysis.n_classes
    saved_params, saved_macs = cost.savings(n)
    saving = saved_params if target == "params" else saved_macs
    score = np.full(n, np.inf)
    candidates = [c for g in analysis.groups if g.name not in protected for c in g.removable.tolist()]
    scale = max(float(saving[candidates].mean()), 1e-12) if candidates else 1.0
    for group in analysis.groups:
        if group.name in protected:
            continue
        cand = group.removable
        if len(cand) == 0:
            continue
        mean = float(np.mean(importance[cand]))
        norm = importance[cand] / mean if mean > 0 else np.ones(len(cand))
        weight = (weights or {}).get(group.name, 1.0)
        score[cand] = weight * norm**2 / np.maximum(saving[cand] / scale, 1e-12)
        if round_to > 1 and group.unit != "head":  # removed a step at a time: a step ranks by its mean harm
            score[cand] = _stepped(score[cand], saving[cand], round_to)
    order = _feasible_order(analysis, score)
    index = 1 if target == "flops" else 0

    rounding = _Rounding(analysis, order, round_to) if round_to > 1 else None

    def achieved(k: int) -> tuple[float, np.ndarray]:
        alive = np.ones(n, dtype=bool)
        alive[order[:k]] = False
        if rounding is not None:
            rounding.apply(alive)
        left = cost.count(alive)[index]
        return 1.0 - left / total_before if total_before else 0.0, alive

    reachable, _ = achieved(len(order))
    if remove_ratio > reachable + 0.01:
        raise BudgetError(
            f"--ratio {remove_ratio:g} cannot be reached: at most {reachable:.3f} of the {target} can be removed "
            f"({_plural(sum(bool(g.blocked) for g in analysis.groups), 'group')} blocked"
            + (", and split layers stay split only where that is smaller and measured faster" if cost.pairs else "")
            + "); lower --ratio",
            reachable=reachable,
        )
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if achieved(mid)[0] >= remove_ratio - 1e-9:
            hi = mid
        else:
            lo = mid + 1
    ratio, alive = achieved(lo)
    left = lambda a: cost.count(a)[index]  # noqa: E731
    if lo > 0 and ratio > remove_ratio + TOLERANCE and rounding is None:
        ratio, alive = _land_closer(order, lo, alive, ratio, remove_ratio, left, total_before)
    elif lo > 0 and ratio > remove_ratio + 1e-9 and rounding is not None:
        harm = np.where(np.isfinite(score), score, 0.0) * saving / scale  # each class's error, as ranked
        ratio, alive = rounding.give_back(alive, ratio, remove_ratio, lambda a: 1.0 - left(a) / total_before, harm)
    plan = {}
    for group in analysis.groups:
        keep = np.flatnonzero(alive[group.classes])
        if len(keep) < len(group.classes):
            plan[group.name] = keep.astype(np.int64)
    return Allocation(plan, alive, ratio, reachable)


def _stepped(score: np.ndarray, saving: np.ndarray, step: int) -> np.ndarray:
    """A group's class scores (error per saving) for removal in steps of `step`, the unit rounding makes.

    Its classes, lowest score first, are taken `step` at a time, and each step is scored by its summed error over
    its summed saving (the exchange rate of removing the step whole), so a step is not ranked by its costliest
    class alone. Scores stay ascending in the group's own order.
    """
    ranked = np.argsort(score, kind="stable")
    out = np.empty_like(score)
    for start in range(0, len(ranked), step):
        block = ranked[start : start + step]
        out[block] = float(np.sum(score[block] * saving[block])) / max(float(np.sum(saving[block])), 1e-300)
    return np.maximum.accumulate(out[ranked])[np.argsort(ranked)]


TOLERANCE = 0.01  # how far above the request the achieved ratio may land
FAR = 0.03  # further than this from the request, nothing is written


def _land_closer(
    order: np.ndarray, k: int, alive: np.ndarray, ratio: float, wanted: float, left, total: int, *, tries: int = 256
) -> tuple[float, np.ndarray]:
    """The k-th class overshot: swap it for one of the next-ranked classes that lands within the tolerance.

    Failing that, fill up from the next-ranked classes, skipping each that would overshoot (a greedy knapsack fill),
    and keep that fill if it ends within the tolerance below the request.
    """
    base = alive.copy()
    base[order[k - 1]] = True
    for c in order[k : k + tries].tolist():
        trial = base.copy()
        trial[c] = False
        r = 1.0 - left(trial) / total
        if wanted - 1e-9 <= r <= wanted + TOLERANCE:
            return r, trial
    current = base.copy()
    for c in order[k : k + tries].tolist():
        trial = current.copy()
        trial[c] = False
        r = 1.0 - left(trial) / total
        if r <= wanted + TOLERANCE:
            current = trial
            if r >= wanted - 1e-9:
                return r, current
    r = 1.0 - left(current) / total
    if r >= wanted - TOLERANCE:  # just under the request, but within the tolerance: closer than the overshoot
        return r, current
    return ratio, alive


class _Rounding:
    """Round each group's kept count up to a multiple of `step` (kernels like multiples of 8).

    Rounding restores the group's removals that the ranking made last.
    """

    def __init__(self, analysis: ChannelGraph, order: np.ndarray, step: int) -> None:
        self.step = step
        position = np.full(analysis.n_classes, -1)
        position[order] = np.arange(len(order))
        # per group: its removable classes, latest-ranked first
        self.groups = [
            g.classes[np.argsort(-position[g.classes])] for g in analysis.groups if np.any(position[g.classes] >= 0)
        ]
        self.sizes = [len(g.classes) for g in analysis.groups if np.any(position[g.classes] >= 0)]
        # attention heads are not rounded: each is a head dim wide already
        self.steps = [1 if g.unit == "head" else step for g in analysis.groups if np.any(position[g.classes] >= 0)]

    def give_back(self, alive: np.ndarray, ratio: float, wanted: float, ratio_of, harm: np.ndarray):
        """Past the request, whole steps of removed classes given back while the request is still met.

        A step of a wide group removes many parameters at once (MobileNetV2's expansions: 8 channels of 960 are
        about 4 % of a 0.23 M model), so the shortest rounded prefix of the ranking can overshoot by points, each
        of them fidelity lost. Each round gives back, of the steps that keep the ratio at or above `wanted`, the one
        whose classes carry the most `harm` (each group's last-removed classes: the ranking's own order).

        Args:
            alive: ``[n_classes]`` the rounded allocation (not modified).
            ratio: Its achieved ratio.
            wanted: The request.
            ratio_of: alive -> achieved ratio.
            harm: ``[n_classes]`` error of removing each class (larger: costlier to lose).

        Returns:
            (ratio, alive) after the steps given back.
        """
        alive = alive.copy()
        while True:
            best = None
            for classes, size, step in zip(self.groups, self.sizes, self.steps):
                removed = classes[~alive[classes]]  # last-removed first
                if not len(removed):
                    continue
                kept = size - len(removed)
                back = removed[: min(size, (kept // step + 1) * step) - kept]
                trial = alive.copy()
                trial[back] = True
                found = ratio_of(trial)
                gain = float(harm[back].sum())
                if found >= wanted - 1e-9 and (best is None or gain > best[0]):
                    best = (gain, found, trial)
            if best is None:
                return ratio, alive
            _, ratio, alive = best

    def apply(self, alive: np.ndarray) -> None:
        for classes, size, step in zip(self.groups, self.sizes, self.steps):
            kept = int(alive[classes].sum())
            if kept == size:
                continue
            wanted = min(size, -(-kept // step) * step)
            for cls in classes:
                if kept >= wanted:
                    break
                if not alive[cls]:
                    alive[cls] = True
                    kept += 1


def _feasible_order(analysis: ChannelGraph, score: np.ndarray) -> np.ndarray:
    """Classes by ascending score, skipping any whose removal would leave a tracked tensor without channels."""
    tensors_of: dict[int, list[str]] = {}
    remaining: dict[str, int] = {}
    for name in analysis.flows:
        classes = np.unique(analysis.classes(name))
        remaining[name] = len(classes)
        for c in classes.tolist():
            tensors_of.setdefault(c, []).append(name)
    order = []
    for c in np.argsort(score, kind="stable").tolist():
        if not np.isfinite(score[c]):
            break
        names = tensors_of.get(c, [])
        if all(remaining[t] > 1 for t in names):
            for t in names:
                remaining[t] -= 1
            order.append(c)
    return np.array(order, dtype=np.int64)


@dataclass
class Choice:
    """One layer's options for `allocate_ranks`; option 0 keeps it whole, option k keeps its top k classes.

    ``kind`` "rank": a split layer, whose option 0 is the dense op and option r keeps the top r bases split.
    ``kind`` "channel": a channel group, whose option 0 keeps every channel and option k the top k.
    Arrays run over the options 0 .. max_rank: ``error`` is the predicted output error (the relative output error of
    that layer alone, times its sensitivity weight; 0 for option 0), ``cost`` the parameters, MACs or seconds of
    the `--target` (for channels: the change from the state the costs were taken at), ``latency`` the measured
    seconds at the requested batch (zeros when not measured, and for channel options, which add no kernel).
    """

    group: str
    classes: np.ndarray  # class ids, highest score first
    error: np.ndarray
    cost: np.ndarray
    latency: np.ndarray
    kind: str = "rank"

    @property
    def max_rank(self) -> int:
        """Largest number of classes an option other than 0 keeps."""
        return len(self.error) - 1

    def option_at(self, alive: np.ndarray | None) -> int:
        """The option `alive` stands for (0 when this layer is whole, or split at a rank that does not pay).

        Args:
            alive: ``[n_classes]`` bool, True for a kept class; None: every class kept.

        Returns:
            The number of this layer's classes kept when it is between 1 and `max_rank`, else 0.
        """
        if alive is None:
            return 0
        kept = int(alive[self.classes].sum())
        return kept if 0 < kept <= self.max_rank else 0


def rank_choices(
    analysis: ChannelGraph,
    cost: CostModel,
    importance: np.ndarray,
    *,
    target: str,
    protected: frozenset[str] = frozenset(),
    weights: dict[str, float] | None = None,
    latencies: dict[str, tuple[float, dict[int, float]]] | None = None,
    alive: np.ndarray | None = None,
    round_to: int = 1,
) -> list[Choice]:
    """The options of every split layer whose basis group may be pruned (see `Choice`).

    A basis k of a split layer scores s_k sqrt(E[z_k^2]) (``criteria.importance``); removing a set of bases changes the
    layer output by exactly the sum of their squared scores, so the error of a rank is the tail sum of the sorted
    squared scores over their total (the relative output error of that layer alone). A split is offered only at ranks
    where it holds fewer parameters than the dense op.

    Args:
        analysis: Channel groups of the split graph.
        cost: Its cost model (pairs with their dense alternative).
        importance: ``[n_classes]`` score per class (larger means keep).
        target: "params", "flops" or "latency" (then `latencies` must cover every pair).
        protected: Groups never pruned.
        weights: Sensitivity weight per group (default 1).
        latencies: Per pair's mid tensor: (dense seconds, {rank: split seconds}) from ``latency.layer_latency``.
        alive: The channels the costs are taken at (None: all); a layer's costs shrink with its kept inputs and
            outputs.
        round_to: Only ranks that are multiples of this are offered (beside the dense op): onnxruntime's blocked
            NCHWc kernels take channel counts in multiples of the vector width, and a rank off it adds reorders.

    Returns:
        One `Choice` of kind "rank" per split layer offered, in ``cost.pairs`` order, with options 0 .. max_rank
        (max_rank: the largest rank at which the split holds fewer parameters than the dense op, at most the full
        rank). Layers whose basis group is missing, protected, has a blocked class or does not hold exactly the
        classes of the pair's mid tensor, whose split never holds fewer parameters, or (with `latencies`) that were
        not timed are left out.
    """
    group_of = {int(c): g for g in analysis.groups for c in g.classes}
    choices = []
    for b, sc, merged, mid, rank, _ in cost.pairs:
        classes = np.unique(analysis.classes(mid))
        group = group_of.get(int(classes[0]))
        if (
            group is None
            or group.name in protected
            or group.blocked
            or len(classes) != rank
            or not np.array_equal(np.sort(group.classes), classes)
            or (latencies is not None and mid not in latencies)  # not timed: kept dense when latency counts
        ):
            continue
        bt, st = cost.terms[b], cost.terms[sc]
        fb, fs, fm = (cost.fraction(t, alive, skip=mid) for t in (bt, st, merged))
        per_rank_params = (bt.numel * fb + st.numel * fs) / rank
        if per_rank_params <= 0:
            continue
        max_rank = min(rank, int(np.ceil(merged.numel * fm / per_rank_params)) - 1)  # r * per_rank < dense
        if max_rank < 1:
            continue
        ranks = np.arange(max_rank + 1)
        if mid in (latencies or {}):
            dense_seconds, points = latencies[mid]
            xs = sorted(points)
            latency = np.interp(ranks, xs, [points[r] for r in xs])
            latency[0] = dense_seconds
        else:
            latency = np.zeros(max_rank + 1)
        if target == "params":
            costs = ranks * per_rank_params
            costs[0] = merged.numel * fm
        elif target == "flops":
            costs = ranks * (bt.numel * bt.macs_per_elem * fb + st.numel * st.macs_per_elem * fs) / rank
            costs[0] = merged.numel * merged.macs_per_elem * fm
        else:
            costs = latency.copy()
        order = group.classes[np.argsort(-importance[group.classes], kind="stable")]
        error = _tail_share(importance[order].astype(np.float64) ** 2)[: max_rank + 1]
        error *= (weights or {}).get(group.name, 1.0)
        error[(ranks % round_to != 0) & (ranks > 0)] = np.inf
        if not np.isfinite(error[1:]).any():  # no rounded rank pays: the layer stays dense
            continue
        choices.append(Choice(group.name, order, error, np.asarray(costs, float), np.asarray(latency, float)))
    return choices


def _tail_share(energy: np.ndarray) -> np.ndarray:
    """[n + 1]: the share of the total in `energy` (sorted, largest first) left out when the top k stay; 0 at k = 0.

    Option 0 keeps the layer whole, so its error is 0, not 1.
    """
    total = float(energy.sum())
    tail = total - np.concatenate([[0.0], np.cumsum(energy)])
    share = np.clip(tail / total, 0.0, 1.0) if total > 0 else np.zeros(len(energy) + 1)
    share[0] = 0.0
    return share


def channel_choices(
    analysis: ChannelGraph,
    cost: CostModel,
    saliency: np.ndarray,
    *,
    target: str,
    groups: list[str],
    weights: dict[str, float] | None = None,
    alive: np.ndarray | None = None,
    round_to: int = 1,
    curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> list[Choice]:
    """Keeping fewer whole channels of `groups` as options beside the split layers' ranks (see `Choice`).

    The error of keeping the top k channels is the share of the group's `saliency` (the output energy its channels
    contribute to the layers reading them, ``criteria.consumer_energy``) in the channels left out: the relative output
    error of those layers, as a rank's error is that of its layer. The cost of an option is the change of the whole
    model's parameters (or MACs) from the channels kept in `alive`, the other layers as they are there: the count is
    linear in one group's kept channels, so two exact counts give it (while no split layer flips to dense).
    Channel removal adds no kernel, so the options cost no measured latency.

    Args:
        analysis: Channel groups of the split graph.
        cost: Its cost model.
        saliency: ``[n_classes]`` output-energy contribution per class (larger means keep).
        target: "params" or "flops".
        groups: Names of the groups offered (each keeps at least one channel; blocked channels stay).
        weights: Sensitivity weight per group (default 1).
        alive: The state the costs are taken at (None: nothing removed).
        round_to: Only kept counts that are multiples of this are offered (kernels like multiples of 8); attention
            heads are not rounded (each is a head dim wide).
        curves: Group name -> (its classes, best kept first; ``[n + 1]`` error of keeping the first k), which
            replace the order and error from `saliency` for the groups they name
            (``criteria.reconstruction_curves``: the error left once the readers are refitted).

    Returns:
        One `Choice` of kind "channel" per group offered, in `groups` order, with options 0 .. n - 1 over its n
        removable classes ranked by saliency. A group with any blocked class, fewer than two classes, no positive
        saliency, or whose count does not fall as channels go is left out.
    """
    index = COUNT_INDEX[target]
    by_name = {g.name: g for g in analysis.groups}
    state = np.ones(analysis.n_classes, dtype=bool) if alive is None else alive
    choices = []
    for name in groups:
        group = by_name[name]
        removable = group.removable
        if len(group.blocked) or len(removable) < 2 or not np.any(saliency[removable] > 0):
            continue
        curve = (curves or {}).get(name)
        order = removable[np.argsort(-saliency[removable], kind="stable")] if curve is None else curve[0]
        full, one = state.copy(), state.copy()
        full[order] = True
        one[order[1:]] = False
        whole, least = cost.count(full)[index], cost.count(one)[index]
        n = len(order)
        per_channel = (whole - least) / (n - 1)
        kept_now = int(state[order].sum())
        if per_channel <= 0:
            continue
        options = np.arange(n)  # option 0: all n; option k: the top k
        kept = np.where(options == 0, n, options)
        error = _tail_share(saliency[order].astype(np.float64)) if curve is None else curve[1]
        error = error[:n] * (weights or {}).get(name, 1.0)
        step = 1 if group.unit == "head" else round_to
        error[(options % step != 0) & (options > 0)] = np.inf
        costs = per_channel * (kept - kept_now).astype(float)
        if target == "latency":  # measured time is not linear in the channels kept: each option counted exactly
            now = cost.count(state)[index]
            for k in np.flatnonzero(np.isfinite(error)):
                trial = state.copy()
                trial[order[kept[k] :]] = False
                trial[order[: kept[k]]] = True
                costs[k] = cost.count(trial)[index] - now
        choices.append(Choice(name, order, error, costs, np.zeros(n), kind="channel"))
    return choices


def allocate_ranks(
    analysis: ChannelGraph,
    cost: CostModel,
    choices: list[Choice],
    *,
    remove_ratio: float,
    total_before: float,
    fixed: float,
    latency_budget: float | None = None,
) -> Allocation:
    """Choose per split layer its kept rank, or the dense op, to remove `remove_ratio` at the least predicted error.

    A multiple-choice knapsack (DESIGN §4): each layer takes the option minimising
    ``error + lambda * cost + mu * latency``; bisection on lambda meets the request, an outer bisection on mu keeps
    the summed measured latency of the layers within `latency_budget` (the model is not slower than the original),
    then the slack left is filled back greedily by the option change of most error saved per unit of cost. A layer
    whose split does not pay keeps its dense option inside the optimisation, so the budget spreads by error over the
    layers that can give it.

    Args:
        analysis: Channel groups of the split graph.
        cost: Its cost model; `achieved` is counted by it for parameters and MACs.
        choices: The options of each layer (`rank_choices`).
        remove_ratio: Fraction of `total_before` to remove.
        total_before: The target quantity of the original model (parameters, MACs or seconds).
        fixed: What everything outside `choices` costs, in the same unit.
        latency_budget: Seconds the chosen options may take together (None: no latency constraint).

    Returns:
        The allocation; ``achieved`` is the removed fraction (predicted, for a latency target).

    Raises:
        BudgetError: The request is more than one point above what these layers can give (``reachable`` set); or,
            with `latency_budget`, no choice of options meets the request within it, or meeting it within the
            budget means removing more than `FAR` (3 points) above the request.
    """
    wanted = total_before * (1.0 - remove_ratio)
    cheapest = [int(np.argmin(np.where(np.isfinite(c.error), c.cost, np.inf))) for c in choices]  # of those offered

    def totals(picks: list[int]) -> tuple[float, float]:
        return (
            fixed + sum(float(c.cost[o]) for c, o in zip(choices, picks)),
            sum(float(c.latency[o]) for c, o in zip(choices, picks)),
        )

    def solve(lam: float, mu: float) -> list[int]:
        return [int(np.argmin(c.error + lam * c.cost + mu * c.latency)) for c in choices]

    def meet_cost(mu: float) -> list[int] | None:
        if totals(solve(0.0, mu))[0] <= wanted:
            return solve(0.0, mu)
        lo, hi = 0.0, 1.0 / max(max((float(np.abs(c.cost).max()) for c in choices), default=1.0), 1e-30)
        while totals(solve(hi, mu))[0] > wanted:
            hi *= 4
            if hi > 1e30:
                return None
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if totals(solve(mid, mu))[0] > wanted else (lo, mid)
        return solve(hi, mu)

    reachable = 1.0 - totals(cheapest)[0] / total_before if total_before else 0.0
    if remove_ratio > reachable + TOLERANCE and not choices:
        raise BudgetError(
            f"--ratio {remove_ratio:g} cannot be reached: no layer offers anything to remove "
            f"({_plural(sum(bool(g.blocked) for g in analysis.groups), 'group')} blocked); lower --ratio",
            reachable=0.0,
        )
    if remove_ratio > reachable + TOLERANCE and all(c.kind == "channel" for c in choices):
        raise BudgetError(
            f"--ratio {remove_ratio:g} cannot be reached: at most {reachable:.3f} can be removed by keeping fewer "
            f"channels or heads in the {_plural(len(choices), 'group')} that can lose them "
            f"({_plural(sum(bool(g.blocked) for g in analysis.groups), 'group')} blocked); lower --ratio",
            reachable=reachable,
        )
    if remove_ratio > reachable + TOLERANCE:
        raise BudgetError(
            f"--ratio {remove_ratio:g} cannot be reached: at most {reachable:.3f} can be removed by keeping fewer "
            f"bases in the {_plural(len(choices), 'layer')} whose split is smaller than the layer "
            f"({_plural(sum(bool(g.blocked) for g in analysis.groups), 'group')} blocked; when latency is measured, "
            "only layers that can be timed are split); lower --ratio",
            reachable=reachable,
        )
    picks = meet_cost(0.0) or cheapest
    if latency_budget is not None and totals(picks)[1] > latency_budget:
        scale = 1.0 / max(max((float(c.latency.max()) for c in choices), default=1.0), 1e-30)
        lo, hi, best = 0.0, scale, None
        while best is None and hi < 1e9 * scale:
            trial = meet_cost(hi)
            if trial is not None and totals(trial)[1] <= latency_budget:
                best = trial
            else:
                lo, hi = hi, hi * 4
        if best is None:
            raise BudgetError(
                f"--ratio {remove_ratio:g} cannot be reached without making the model slower than the original at "
                "the measured batch (split layers cost an extra kernel each); lower --ratio, or allow a slower model "
                "with --latency-batch 0"
            )
        for _ in range(30):
            mid = (lo + hi) / 2
            trial = meet_cost(mid)
            if trial is not None and totals(trial)[1] <= latency_budget:
                hi, best = mid, trial
            else:
                lo = mid
        picks = best
    if totals(picks)[0] > wanted:  # the request is within a point of the reachable figure
        picks = cheapest
    used, seconds = totals(picks)
    picks = _fill_slack(
        choices, picks, wanted - used, (latency_budget - seconds) if latency_budget is not None else np.inf
    )
    if total_before and (wanted - totals(picks)[0]) / total_before > TOLERANCE:
        picks = _exchange(choices, picks, totals, wanted, total_before, latency_budget)
    alive = np.ones(analysis.n_classes, dtype=bool)
    for c, o in zip(choices, picks):
        if o > 0:
            alive[c.classes[o:]] = False
    plan = {}
    groups = {g.name: g for g in analysis.groups}
    for c in choices:
        group = groups[c.group]
        keep = np.flatnonzero(alive[group.classes])
        if len(keep) < len(group.classes):
            plan[c.group] = keep.astype(np.int64)
    achieved = 1.0 - totals(picks)[0] / total_before if total_before else 0.0
    if latency_budget is not None and achieved > remove_ratio + FAR:
        raise BudgetError(
            f"--ratio {remove_ratio:g}: the model stays no slower than the original only when {achieved:.3f} is "
            f"removed (split layers cost an extra kernel each, so the ones kept split must be cut deep); "
            f"--ratio {achieved:.2f} would be met"
        )
    return Allocation(plan, alive, achieved, reachable, totals(picks)[1] if latency_budget is not None else None)


RELINEARIZE_STEPS = 3  # `allocate_channels`: plans after the first, each with its costs taken at the plan before


def allocate_channels(
    analysis: ChannelGraph,
    cost: CostModel,
    saliency: np.ndarray,
    *,
    remove_ratio: float,
    target: str,
    total_before: float,
    groups: list[str],
    weights: dict[str, float] | None = None,
    round_to: int = 1,
    steps: int = RELINEARIZE_STEPS,
    curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Allocation:
    """The knapsack over whole channels and heads (`channel_choices`, `allocate_ranks`), costs exact at the plan.

    An option costs what the model's count changes by when its group alone changes, so a weight between two groups
    that both lose channels (a convolution's in and out) is counted as saving what each loss alone saves: the plan
    over-counts. PP-OCRv4's recogniser (heads in its neck, so its channels go through this knapsack) at 0.15: planned
    0.150, written 0.129, and at 0.3 every channel result fell 3.6-4.3 points short and was refused. Each plan after
    the first takes the costs again at the one before (exact there); of the plans made, the one whose exact count
    lands within `TOLERANCE` of the request with the least predicted error is kept, else the closest.

    Args:
        analysis: Channel groups of the graph.
        cost: Its cost model.
        saliency: ``[n_classes]`` output-energy contribution per class (larger means keep).
        remove_ratio: Fraction of `total_before` to remove.
        target: "params" or "flops".
        total_before: The original model's parameters, or MACs per sample.
        groups: Names of the groups offered.
        weights: Sensitivity weight per group (default 1).
        round_to: Kept counts of channel groups (not heads) are multiples of this.
        steps: Plans made after the first at most (they stop once one lands within `TOLERANCE`).
        curves: Order and error per group that replace those from `saliency` (`channel_choices`).

    Returns:
        The allocation kept, its ``achieved`` counted exactly by `cost`.

    Raises:
        BudgetError: The first plan's request is out of reach (`allocate_ranks`).
    """
    index = COUNT_INDEX[target]
    made: list[tuple[Allocation, float]] = []
    alive = None
    for _ in range(1 + steps):
        choices = channel_choices(
            analysis,
            cost,
            saliency,
            target=target,
            groups=groups,
            weights=weights,
            alive=alive,
            round_to=round_to,
            curves=curves,
        )
        try:  # option costs are changes from `alive`: the count there is what lies outside them
            planned = allocate_ranks(
                analysis,
                cost,
                choices,
                remove_ratio=remove_ratio,
                total_before=total_before,
                fixed=cost.count(alive)[index],
            )
        except BudgetError:
            if not made:
                raise
            break
        planned.achieved = 1.0 - cost.count(planned.alive)[index] / total_before if total_before else 0.0
        made.append((planned, sum(float(c.error[c.option_at(planned.alive)]) for c in choices)))
        if abs(planned.achieved - remove_ratio) <= TOLERANCE:
            break
        alive = planned.alive
    near = [m for m in made if abs(m[0].achieved - remove_ratio) <= TOLERANCE]
    kept = min(near, key=lambda m: m[1])[0] if near else min(made, key=lambda m: abs(m[0].achieved - remove_ratio))[0]
    return _give_back(analysis, cost, choices, kept, remove_ratio, total_before, index)


def _give_back(
    analysis: ChannelGraph,
    cost: CostModel,
    choices: list[Choice],
    allocation: Allocation,
    remove_ratio: float,
    total_before: float,
    index: int,
) -> Allocation:
    """`allocation` with channels given back, a step at a time, while the exact count still meets the request.

    Rounded counts (steps of 8 or 16 channels) on a small model make the knapsack land several points past the
    request (the example ResNet at 0.5, steps of 16: 0.542); each round gives back the step of most predicted error
    saved per unit of cost among those that keep the request met, until none does.
    """
    alive = allocation.alive.copy()
    left = cost.count(alive)[index]
    achieved = 1.0 - left / total_before if total_before else 0.0
    while achieved > remove_ratio + 1e-9:
        best = None
        for c in choices:
            now = c.option_at(alive)
            if now == 0:
                continue
            up = next((o for o in range(now + 1, c.max_rank + 1) if np.isfinite(c.error[o])), 0)
            trial = alive.copy()
            trial[c.classes if up == 0 else c.classes[:up]] = True
            count = cost.count(trial)[index]
            ratio = 1.0 - count / total_before
            if ratio < remove_ratio - 1e-9:
                continue
            rate = (float(c.error[now]) - float(c.error[up])) / max(count - left, 1e-12)
            if best is None or rate > best[0]:
                best = (rate, trial, count, ratio)
        if best is None:
            break
        _, alive, left, achieved = best
    if achieved == allocation.achieved:
        return allocation
    plan = {}
    for c in choices:
        group = next(g for g in analysis.groups if g.name == c.group)
        keep = np.flatnonzero(alive[group.classes])
        if len(keep) < len(group.classes):
            plan[c.group] = keep.astype(np.int64)
    return Allocation(plan, alive, achieved, allocation.reachable)


EXCHANGE_OPTIONS = 16  # options tried per layer when the plan overshoots the request


def _exchange(choices: list[Choice], picks: list[int], totals, wanted: float, total_before: float, seconds):
    """Land within a point of the request when the plan removes more (coarse layers: dense and split far apart).

    For each layer, try giving it more (a higher rank or the dense op) and taking the difference back from the others
    at the least error per unit of cost; keep the trial within the tolerance with the least predicted error (or, if
    none is, the one closest to the request). The latency budget `seconds` (None: none) holds for every trial.
    """

    def error(p: list[int]) -> float:
        return sum(float(c.error[o]) for c, o in zip(choices, p))

    def over(p: list[int]) -> float:
        return (wanted - totals(p)[0]) / total_before

    best, best_key = picks, (over(picks) > TOLERANCE, over(picks) if over(picks) > TOLERANCE else error(picks))
    for i, c in enumerate(choices):
        if picks[i] == 0:
            continue
        higher = [k for k in range(picks[i] + 1, c.max_rank + 1) if np.isfinite(c.error[k])]
        step = max(1, len(higher) // EXCHANGE_OPTIONS)
        for new in [0, *higher[::step]]:
            trial = list(picks)
            trial[i] = new
            trial = _reduce(choices, trial, totals, wanted, keep=i)
            if trial is None or over(trial) < 0:
                continue
            if seconds is not None and totals(trial)[1] > seconds:
                continue
            key = (over(trial) > TOLERANCE, over(trial) if over(trial) > TOLERANCE else error(trial))
            if key < best_key:
                best, best_key = trial, key
    return best


def _reduce(choices: list[Choice], picks: list[int], totals, wanted: float, *, keep: int) -> list[int] | None:
    """Cut the other layers (not `keep`) at the least error per unit of cost until the total is at most `wanted`."""
    picks = list(picks)
    while totals(picks)[0] > wanted:
        best, best_rate = None, np.inf
        for j, (c, o) in enumerate(zip(choices, picks)):
            if j == keep:
                continue
            new = _next_option(c, o, down=True)
            if new is None or c.cost[new] >= c.cost[o]:
                continue
            rate = (c.error[new] - c.error[o]) / (c.cost[o] - c.cost[new])
            if rate < best_rate:
                best, best_rate = (j, new), rate
        if best is None:
            return None
        picks[best[0]] = best[1]
    return picks


def _next_option(choice: Choice, option: int, *, down: bool) -> int | None:
    """The nearest option below (or above) `option` that is offered (finite error), None when there is none.

    Below option 0 (the whole layer) comes the largest option; above the largest, none. Options with infinite
    error are not offered (channel counts rounded to a multiple, `channel_choices`).
    """
    if down:
        span = range(choice.max_rank, 0, -1) if option == 0 else range(option - 1, 0, -1)
    else:
        span = range(option + 1, choice.max_rank + 1) if option > 0 else range(0)
    return next((k for k in span if np.isfinite(choice.error[k])), None)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _fill_slack(choices: list[Choice], picks: list[int], slack: float, seconds: float) -> list[int]:
    """Spend `slack` (cost) and `seconds` (latency) on the option changes saving the most error per unit of cost."""
    picks = list(picks)
    while True:
        best, best_gain = None, 0.0
        for i, (c, o) in enumerate(zip(choices, picks)):
            if o == 0:
                continue
            for new in (_next_option(c, o, down=False), 0):
                if new is None:
                    continue
                extra, later = c.cost[new] - c.cost[o], c.latency[new] - c.latency[o]
                saved = c.error[o] - c.error[new]
                if extra <= slack and later <= seconds and saved > 0:
                    gain = saved / max(extra, 1e-30)
                    if gain > best_gain:
                        best, best_gain = (i, new, extra, later), gain
        if best is None:
            return picks
        i, new, extra, later = best
        picks[i] = new
        slack -= extra
        seconds -= later


def count(model: onnx.ModelProto, *, shapes: dict[str, list[int]] | None = None) -> tuple[int, int]:
    """(parameters, MACs per sample) of a model as written (weights in Constant nodes or constant subgraphs count).

    Parameters are counted on the model as it is: with its inputs fixed to `shapes`, a table read at run-time
    positions (a position embedding gathered by ``arange(seq)``) would fold to the rows one length reads.

    Args:
        model: The model (not modified).
        shapes: Input name -> concrete dims to count MACs at (``shapes.choose_shapes``); None: the model's own
            inferred shapes, where a symbolic dim counts as 1.

    Returns:
        (parameters, MACs per sample).

    Raises:
        UnsupportedModelError: The model's default-domain opset is below 7.
        InvalidModelError: The model cannot be read into a graph.
    """
    params, macs, _ = CostModel(cleanup(to_graph(model), fold_bn=False).graph).count()
    if shapes:
        macs = CostModel(cleanup(to_graph(fix_input_shapes(model, shapes)), fold_bn=False).graph).count()[1]
    return params, macs
