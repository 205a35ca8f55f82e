"""layer_sensitivity(): how much the model's outputs move when one group alone loses its least important channels.

Scores are normalised within each group, which treats every layer as equally fragile. `--sensitivity` measures
instead: each group alone is pruned at a few levels (its lowest-scored classes first), the pruned copy runs in
onnxruntime on calibration samples, and the relative change of the outputs (``sum ||out - ref||^2 / sum ||ref||^2``)
is recorded. Its mean over the levels, divided by the median over the groups, weighs that group's scores in the
allocation: a layer whose removals move the outputs more gives up fewer channels.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.calibration.data import Samples, as_samples
from onnxprune.calibration.runner import stream
from onnxprune.graph import Namer, session, to_graph, to_model
from onnxprune.passes.groups import Group, find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.progress import steps

log = logging.getLogger(__name__)

LEVELS = (0.25, 0.5)  # parts of a group's removable classes taken away, one probe each
SAMPLES = 64  # calibration samples per probe
WEIGHT_RANGE = (0.5, 2.0)  # measured: (0.1, 10) let layers go almost whole (MobileNetV2 at 0.7: 7.7 %)


def layer_sensitivity(
    graph: gs.Graph,
    template: onnx.ModelProto,
    groups: Iterable[Group],
    scores: np.ndarray,
    data: Samples | dict[str, np.ndarray],
    *,
    levels: tuple[float, ...] = LEVELS,
    batch_size: int = 32,
    local: np.ndarray | None = None,
) -> dict[str, float]:
    """Group name -> weight of its scores (1 = the median group's sensitivity); `graph` is not modified.

    Probes use the first `SAMPLES` samples, fewer (at least `CUT_MIN_SAMPLES`) when all of them would take longer
    than `CUT_BUDGET_S` at the speed the reference pass measured (a 416x416 detector: 60 probes of 26 samples took
    6 minutes).

    Args:
        graph: The graph the groups belong to; not modified.
        template: Model whose opsets and metadata exports of `graph` take.
        groups: The groups to probe; those with fewer than two removable classes are skipped.
        scores: ``[n_classes]`` importance per class (larger means keep); each probe removes a group's lowest first.
        data: Calibration samples.
        levels: Shares of a group's removable classes removed, one probe each (at least one class, never all).
        batch_size: Samples per onnxruntime run when the model's batch dim is dynamic.
        local: ``[n_classes]`` output energy each class feeds the layers reading it (``criteria.consumer_energy``):
            when given, each probe's change is divided by the share of its group's that the probe removes, the
            relative error of those layers, so the weight is how much a group's local error grows by the model's
            outputs (what a knapsack over local errors needs: ``criteria.reconstruction_curves``), clipped to
            `CUT_WEIGHT_RANGE`.

    Returns:
        Group name -> the mean relative change of its probes (over the local error, with `local`) divided by the
        median of those means over the groups, clipped to `WEIGHT_RANGE` (`CUT_WEIGHT_RANGE` with `local`); a group
        that a fresh analysis of the exported graph does not find is left out.
    """
    data = as_samples(data).head(SAMPLES)
    reference = to_model(graph, template)
    groups = [g for g in groups if len(g.removable) >= 2]
    key = _probe_key(reference, groups, scores, data, levels, batch_size, local)
    if key in _REMEMBERED:
        _REMEMBERED.move_to_end(key)
        return dict(_REMEMBERED[key])
    started = time.perf_counter()
    ref = _outputs(reference, data, batch_size)
    per_pass = time.perf_counter() - started
    passes = len(groups) * len(levels)
    if per_pass * passes > CUT_BUDGET_S and len(data) > CUT_MIN_SAMPLES:
        n = max(CUT_MIN_SAMPLES, int(len(data) * CUT_BUDGET_S / (per_pass * passes)))
        if n < len(data):
            data = data.head(n)
            ref = _outputs(reference, data, batch_size)
    change = {}
    for group in steps(groups, "sensitivity probes"):
        removable = group.removable
        ranked = removable[np.argsort(scores[removable], kind="stable")]
        moved = []
        for level in levels:
            k = min(max(int(round(level * len(ranked))), 1), len(ranked) - 1)
            probe = to_graph(reference)  # a fresh copy of the graph as it stands
            analysis = find_channel_groups(probe)
            same = next((g for g in analysis.groups if g.name == group.name), None)
            if same is None:
                break
            keep = np.flatnonzero(~np.isin(same.classes, ranked[:k]))
            remove_channels(probe, plan={group.name: keep}, analysis=analysis)
            out = _outputs(to_model(probe, template), data, batch_size)
            moved.append(
                sum(float(np.sum((o - r) ** 2)) for o, r in zip(out, ref))
                / max(sum(float(np.sum(r**2)) for r in ref), 1e-30)
            )
            if local is not None:
                share = float(local[ranked[:k]].sum()) / max(float(local[removable].sum()), 1e-300)
                moved[-1] = moved[-1] / share if share > 0 else np.nan
        moved = [m for m in moved if np.isfinite(m)]
        if moved:
            change[group.name] = float(np.mean(moved))
    weights = _relative_to_median(change, WEIGHT_RANGE if local is None else CUT_WEIGHT_RANGE, "most sensitive")
    _REMEMBERED[key] = dict(weights)
    while len(_REMEMBERED) > REMEMBERED_PROBES:
        _REMEMBERED.popitem(last=False)
    return weights


REMEMBERED_PROBES = 8  # `layer_sensitivity` results kept: the guard's bisection prunes the same graph again


_REMEMBERED: OrderedDict[bytes, dict[str, float]] = OrderedDict()


def _probe_key(
    reference: onnx.ModelProto,
    groups: list[Group],
    scores: np.ndarray,
    data: Samples,
    levels,
    batch_size: int,
    local: np.ndarray | None = None,
) -> bytes:
    """What `layer_sensitivity` measures depends on: the graph, the groups and their scores, the samples, the levels.

    Its probes cut each group of the unpruned graph alone, so every prune of one model with one calibration set
    measures the same (the guard's bisection on a refused ratio makes up to four more; PP-OCRv4's recogniser spent
    33 s in each).
    """
    key = hashlib.sha1(reference.SerializeToString(deterministic=True))
    key.update(np.ascontiguousarray(scores, dtype=np.float64).tobytes())
    if local is not None:
        key.update(b"local" + np.ascontiguousarray(local, dtype=np.float64).tobytes())
    key.update(repr(([(g.name, g.removable.tolist()) for g in groups], tuple(levels), batch_size)).encode())
    for index, arrays in data.groups:
        key.update(np.ascontiguousarray(index).tobytes())
        for name in sorted(arrays):
            key.update(name.encode() + str(arrays[name].dtype).encode() + str(arrays[name].shape).encode())
            key.update(np.ascontiguousarray(arrays[name]).view(np.uint8).reshape(-1))
    return key.digest()


def _relative_to_median(values: dict[str, float], bounds: tuple[float, float], what: str) -> dict[str, float]:
    """Each value over the median of all, clipped to `bounds`; the largest three logged as `what`."""
    if not values:
        return {}
    median = max(float(np.median(list(values.values()))), 1e-30)
    weights = {name: float(np.clip(value / median, *bounds)) for name, value in values.items()}
    for name, value in sorted(weights.items(), key=lambda kv: -kv[1])[:3]:
        log.info("%s: %s (weight %.2f)", what, name, value)
    return weights


def _outputs(model: onnx.ModelProto, data: Samples, batch_size: int) -> list[np.ndarray]:
    """Every graph output of every batch, flattened per batch, in a fixed order (batches may differ in shape)."""
    names = [o.name for o in model.graph.output]
    return [
        batch[n].astype(np.float64).ravel()
        for batch in stream(model, data, names, batch_size=batch_size)
        for n in names
    ]


CUT_SAMPLES = 32  # calibration samples per probe at the planned cut
CUT_MIN_SAMPLES = 4  # ... and the fewest a probe uses when the time budget below cuts them
CUT_BUDGET_S = 20.0  # probes x samples are cut to about this many seconds (measured: the reference pass)
CUT_WEIGHT_RANGE = (0.2, 5.0)


class CutProbe:
    """The split graph's outputs with some of its basis groups cut, measured in one onnxruntime session (DESIGN §4).

    Each probed group's producer output gets a ``Mul`` by a mask fed as an input; a cut is a mask with zeros at the
    removed channels. Zeroing a basis op's output channel is exactly removing it (its only consumer is the scaling
    op), so every probe equals pruning a copy, without copying, re-analysing or exporting anything per probe.
    Probes use the first `CUT_SAMPLES` samples, fewer (at least `CUT_MIN_SAMPLES`) when `passes` passes would take
    longer than `budget_s` at the speed the reference pass measured. `graph` is not modified.

    Args:
        graph: The graph the plans are made on (split, not yet pruned).
        template: Model whose opsets and metadata exports of `graph` take.
        groups: Names of the groups that cuts may touch (others, and groups without one producer, stay whole).
        data: Calibration samples.
        batch_size: Samples per onnxruntime run.
        passes: How many probes are expected, for the time budget.
        budget_s: Seconds the expected probes may take, about.
    """

    def __init__(
        self,
        graph: gs.Graph,
        template: onnx.ModelProto,
        groups: list[str],
        data: Samples | dict[str, np.ndarray],
        *,
        batch_size: int = 32,
        passes: int = 1,
        budget_s: float = CUT_BUDGET_S,
    ) -> None:
        self.analysis = find_channel_groups(graph)
        probe, self.masks = _masked_copy(graph, self.analysis, groups)
        self.batch_size = batch_size
        self.probes = 0
        if not self.masks:
            return
        model = to_model(probe, template)
        self.sess = session(model, calibration=True)
        self.names = [o.name for o in model.graph.output]
        self.ones = {m: np.ones(shape, np.float32) for m, (_, _, shape) in self.masks.items()}
        self.data = as_samples(data).head(CUT_SAMPLES)
        started = time.perf_counter()
        self.ref = self._outputs(self.ones)
        per_pass = time.perf_counter() - started
        if per_pass * passes > budget_s and len(self.data) > CUT_MIN_SAMPLES:
            n = max(CUT_MIN_SAMPLES, int(len(self.data) * budget_s / (per_pass * passes)))
            if n < len(self.data):
                self.data = self.data.head(n)
                self.ref = self._outputs(self.ones)
        self.energy = max(sum(float(np.sum(r**2)) for r in self.ref), 1e-30)

    @property
    def samples(self) -> int:
        """Samples each probe runs on."""
        return len(self.data) if self.masks else 0

    def change(self, plan: dict[str, np.ndarray]) -> float:
        """Relative change of the outputs, ``sum ||out - ref||^2 / sum ||ref||^2``, with every group of `plan` cut.

        Args:
            plan: Group name -> kept positions of its classes (groups without a mask stay whole).

        Returns:
            The relative squared change (0 when nothing is cut).

        Raises:
            ValueError: `plan` removes a blocked class of a group.
        """
        if not self.masks:  # no group of `plan` could be masked: nothing is cut
            return 0.0
        feeds = dict(self.ones)
        by_group = {group: mask for mask, (group, _, _) in self.masks.items()}
        for group, keep in plan.items():
            if group not in by_group:
                continue
            mask = by_group[group]
            _, tensor, shape = self.masks[mask]
            kept = self.analysis.keep(tensor, self.analysis.alive({group: keep}))
            cut = np.zeros(shape, np.float32)
            cut.reshape(-1)[kept] = 1.0
            feeds[mask] = cut
        self.probes += 1
        out = self._outputs(feeds)
        return sum(float(np.sum((o - r) ** 2)) for o, r in zip(out, self.ref, strict=True)) / self.energy

    def weights(self, cuts: dict[str, tuple[np.ndarray, float]]) -> dict[str, float]:
        """Measured weight of each layer's predicted error, at the cut the allocation planned.

        Each layer in `cuts` alone is cut to its planned kept classes; its measured `change` over its predicted
        local error, divided by the median over the layers and clipped to `CUT_WEIGHT_RANGE`, is its weight.

        Args:
            cuts: Group name -> (kept positions of the group, predicted relative error of that layer at that cut).

        Returns:
            Group name -> weight (1 for the median layer); layers with no predicted error or no mask are left out.
        """
        return _relative_to_median(self.ratios(cuts), CUT_WEIGHT_RANGE, "most sensitive at the planned cut")

    def ratios(self, cuts: dict[str, tuple[np.ndarray, float]]) -> dict[str, float]:
        """Measured `change` of each layer in `cuts` cut alone, over its predicted local error (see `weights`).

        Args:
            cuts: Group name -> (kept positions of the group, predicted relative error of that layer at that cut).

        Returns:
            Group name -> measured change over predicted error, for the groups with a positive prediction and a mask.
        """
        masked = {group for group, _, _ in self.masks.values()}
        todo = [(g, keep, predicted) for g, (keep, predicted) in cuts.items() if predicted > 0 and g in masked]
        return {g: self.change({g: keep}) / predicted for g, keep, predicted in steps(todo, "sensitivity probes")}

    def _outputs(self, masks: dict) -> list[np.ndarray]:
        """Every output of every batch, flattened per batch, with the mask inputs fed."""
        return [
            out.astype(np.float64).ravel()
            for feed in self.data.batches(self.batch_size)
            for out in self.sess.run(self.names, {**feed, **masks})
        ]


def cut_sensitivity(
    graph: gs.Graph,
    template: onnx.ModelProto,
    cuts: dict[str, tuple[np.ndarray, float]],
    data: Samples | dict[str, np.ndarray],
    *,
    batch_size: int = 32,
    budget_s: float = CUT_BUDGET_S,
    facts: dict | None = None,
) -> dict[str, float]:
    """`CutProbe.weights` for `cuts` on a probe built for them alone (see `CutProbe`).

    Args:
        graph: The graph the plan was made on (split, not yet pruned).
        template: Model whose opsets and metadata exports of `graph` take.
        cuts: Group name -> (kept positions of the group, predicted relative error of that layer at that cut).
        data: Calibration samples.
        batch_size: Samples per onnxruntime run.
        budget_s: Seconds the probes may take, about.
        facts: When given, receives ``samples`` (per probe) and ``probes``.

    Returns:
        Group name -> weight (1 for the median layer).
    """
    probe = CutProbe(graph, template, list(cuts), data, batch_size=batch_size, passes=len(cuts), budget_s=budget_s)
    weights = probe.weights(cuts)
    if facts is not None:
        facts.update({"samples": probe.samples, "probes": probe.probes})
    return weights


def _masked_copy(
    graph: gs.Graph, analysis, groups: list[str]
) -> tuple[gs.Graph, dict[str, tuple[str, str, list[int]]]]:
    """A copy of `graph` whose probed groups' producer outputs are multiplied by mask inputs.

    Returns:
        (the copy, mask input name -> (group name, masked tensor, mask shape)).
    """
    by_name = {g.name: g for g in analysis.groups}
    probe = graph.copy()
    nodes = {n.name: n for n in probe.nodes}
    namer = Namer(probe)
    masks = {}
    for name in groups:
        group = by_name.get(name)
        if group is None or len(group.producers) != 1 or group.producers[0] not in nodes:
            continue
        node = nodes[group.producers[0]]
        out = node.outputs[0]
        if out.name not in analysis.flows or out in probe.outputs or out.shape is None or out.dtype != np.float32:
            continue
        rank = len(out.shape)
        axis = analysis.flows[out.name].at_rank(rank)
        shape = [1] * rank
        shape[axis] = len(analysis.flows[out.name].ids)
        mask = gs.Variable(namer.fresh_name(f"{node.name}/cut_mask"), dtype=np.float32, shape=shape)
        masked = gs.Variable(namer.fresh_name(f"{out.name}/masked"), dtype=out.dtype)
        for consumer in list(out.outputs):
            for i, t in enumerate(list(consumer.inputs)):
                if t is out:
                    consumer.inputs[i] = masked
        probe.nodes.append(gs.Node("Mul", namer.fresh_name(f"{node.name}/cut"), inputs=[out, mask], outputs=[masked]))
        probe.inputs.append(mask)
        masks[mask.name] = (name, out.name, shape)
    probe.toposort()
    return probe, masks
