"""Global allocation: parameter/MAC counting per channel class, comparable scores, bisection to the target."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune import rules
from onnxprune.errors import BudgetError
from onnxprune.passes.basis import BasisPair
from onnxprune.passes.groups import ChannelGraph

TARGETS = ("params", "flops")


@dataclass
class _Term:
    numel: int
    macs_per_elem: int
    axes: list[tuple[int, str]]  # (full length along the axis, tracked tensor whose kept channels select it)


class CostModel:
    """Counts parameters and MACs of a graph for any choice of alive channel classes.

    A basis pair counts as what will be written: the split, or the single op it merges back into when that is
    smaller (``merge_unprofitable``).
    """

    def __init__(
        self,
        graph: gs.Graph,
        analysis: ChannelGraph | None = None,
        pairs: list[BasisPair] = (),
        limits: dict[str, int] | None = None,
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
            out_shape = _shape(node.outputs[0]) if node.outputs else None
            for i, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant) and tensor.name in term_of and rules.WEIGHT_INPUT.get(node.op) == i:
                    self.terms[term_of[tensor.name]].macs_per_elem += rules.macs_per_weight(node, out_shape)
                    continue  # a shared weight: stored once, multiplied at every use
                if not isinstance(tensor, gs.Constant) or tensor.name in seen:
                    continue
                values = tensor.values
                if values.dtype.kind != "f" or values.size == 0:
                    continue
                seen.add(tensor.name)
                macs = rules.macs_per_weight(node, out_shape) if rules.WEIGHT_INPUT.get(node.op) == i else 0
                axes = []
                for axis, name in slices[i].axes if i in slices else ():
                    full = len(analysis.flows[name].ids)
                    if values.ndim and values.shape[axis] == full:
                        axes.append((full, name))
                where[(node.name, i)] = term_of[tensor.name] = len(self.terms)
                self.terms.append(_Term(int(values.size), macs, axes))
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

    def count(self, alive: np.ndarray | None = None) -> tuple[int, int]:
        """(parameters, MACs per sample) with only the `alive` classes kept (all when None)."""
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
            return term.numel * frac, term.numel * term.macs_per_elem * frac

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
        return int(round(params)), int(round(macs))

    def savings(self, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """Parameters and MACs each class alone frees at full size (first-order, for ranking)."""
        params = np.zeros(n_classes)
        macs = np.zeros(n_classes)
        for term in self.terms:
            for full, name in term.axes:
                share = np.bincount(self.analysis.classes(name), minlength=n_classes) / full
                params += term.numel * share
                macs += term.numel * term.macs_per_elem * share
        return params, macs


def _shape(tensor: gs.Tensor) -> list | None:
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
            f"--ratio {remove_ratio:.2f} cannot be reached: at most {reachable:.3f} of the {target} can be removed "
            f"({sum(bool(g.blocked) for g in analysis.groups)} groups are blocked, and split layers stay split only "
            f"where that is smaller and measured faster); lower --ratio, or try --method channel or --latency-batch 0"
        )
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if achieved(mid)[0] >= remove_ratio - 1e-9:
            hi = mid
        else:
            lo = mid + 1
    ratio, alive = achieved(lo)
    if lo > 0 and ratio > remove_ratio + TOLERANCE and rounding is None:
        ratio, alive = _land_closer(order, lo, alive, ratio, remove_ratio, lambda a: cost.count(a)[index], total_before)
    plan = {}
    for group in analysis.groups:
        keep = np.flatnonzero(alive[group.classes])
        if len(keep) < len(group.classes):
            plan[group.name] = keep.astype(np.int64)
    return Allocation(plan, alive, ratio, reachable)


TOLERANCE = 0.01  # how far above the request the achieved ratio may land


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

    def apply(self, alive: np.ndarray) -> None:
        for classes, size in zip(self.groups, self.sizes):
            kept = int(alive[classes].sum())
            if kept == size:
                continue
            wanted = min(size, -(-kept // self.step) * self.step)
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
