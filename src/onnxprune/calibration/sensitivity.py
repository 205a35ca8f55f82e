"""layer_sensitivity(): how much the model's outputs move when one group alone loses its least important channels.

Scores are normalised within each group, which treats every layer as equally fragile. `--sensitivity` measures
instead: each group alone is pruned at a few levels (its lowest-scored classes first), the pruned copy runs in
onnxruntime on calibration samples, and the relative change of the outputs (``sum ||out - ref||^2 / sum ||ref||^2``)
is recorded. Its mean over the levels, divided by the median over the groups, weighs that group's scores in the
allocation: a layer whose removals move the outputs more gives up fewer channels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune import rules
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
) -> dict[str, float]:
    """Group name -> weight of its scores (1 = the median group's sensitivity); `graph` is not modified."""
    data = as_samples(data).head(SAMPLES)
    reference = to_model(graph, template)
    ref = _outputs(reference, data, batch_size)
    change = {}
    for group in steps(list(groups), "sensitivity probes"):
        removable = group.removable
        if len(removable) < 2:
            continue
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
        if moved:
            change[group.name] = float(np.mean(moved))
    if not change:
        return {}
    median = max(float(np.median(list(change.values()))), 1e-30)
    weights = {name: float(np.clip(value / median, *WEIGHT_RANGE)) for name, value in change.items()}
    for name, value in sorted(weights.items(), key=lambda kv: -kv[1])[:5]:
        log.info("most sensitive: %s (weight %.2f)", name, value)
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
    """Measured weight of each layer's predicted error, at the cut the allocation actually planned (DESIGN §4).

    The allocation predicts each layer's error locally (its relative output error). How much of it reaches the
    model's outputs depends on what follows the layer. Each layer in `cuts` alone is cut to its planned kept
    channels and the relative change of the outputs (``sum ||out - ref||^2 / sum ||ref||^2``) over the predicted
    local error is that layer's weight, divided by the median over the layers and clipped to `CUT_WEIGHT_RANGE`.

    The cut is a mask: each probed layer's output gets a ``Mul`` by a mask fed as an input, so one onnxruntime
    session serves every probe (ones everywhere but the probed layer's removed channels). Zeroing a basis op's
    output channel is exactly removing it (its only consumer is the scaling op). Probes use the first
    `CUT_SAMPLES` samples, fewer (at least `CUT_MIN_SAMPLES`) when probes x samples would take longer than
    `budget_s` at the speed the reference pass measured. `graph` is not modified.

    Args:
        graph: The graph the plan was made on (split, not yet pruned).
        template: Model whose opsets and metadata exports of `graph` take.
        cuts: Group name -> (kept positions of the group, predicted relative error of that layer at that cut).
        data: Calibration samples.
        batch_size: Samples per onnxruntime run.
        budget_s: Seconds the probes may take, about.
        facts: When given, receives ``samples`` (per probe) and ``probes``.

    Returns:
        Group name -> weight (1 for the median layer); layers with no predicted error, or whose group does not
        have one producer, are left out.
    """
    probe, masks = _masked_copy(graph, cuts)
    if not masks:
        return {}
    model = to_model(probe, template)
    sess = session(model, optimize=False)
    names = [o.name for o in model.graph.output if o.name not in masks]
    ones = {m: np.ones(shape, np.float32) for m, (_, shape, _) in masks.items()}
    data = as_samples(data).head(CUT_SAMPLES)
    started = time.perf_counter()
    ref = _masked_outputs(sess, names, data, batch_size, ones)
    per_pass = time.perf_counter() - started
    if per_pass * len(masks) > budget_s and len(data) > CUT_MIN_SAMPLES:
        n = max(CUT_MIN_SAMPLES, int(len(data) * budget_s / (per_pass * len(masks))))
        if n < len(data):
            data = data.head(n)
            ref = _masked_outputs(sess, names, data, batch_size, ones)
    energy = max(sum(float(np.sum(r**2)) for r in ref), 1e-30)
    ratio = {}
    for mask, (group, shape, keep) in steps(list(masks.items()), "sensitivity probes"):
        cut = np.zeros(shape, np.float32)
        cut.reshape(-1)[keep] = 1.0
        out = _masked_outputs(sess, names, data, batch_size, {**ones, mask: cut})
        moved = sum(float(np.sum((o - r) ** 2)) for o, r in zip(out, ref, strict=True)) / energy
        ratio[group] = moved / cuts[group][1]
    if facts is not None:
        facts.update({"samples": len(data), "probes": len(masks)})
    median = max(float(np.median(list(ratio.values()))), 1e-30)
    weights = {name: float(np.clip(value / median, *CUT_WEIGHT_RANGE)) for name, value in ratio.items()}
    for name, value in sorted(weights.items(), key=lambda kv: -kv[1])[:3]:
        log.info("most sensitive at the planned cut: %s (weight %.2f)", name, value)
    return weights


def _masked_copy(
    graph: gs.Graph, cuts: dict[str, tuple[np.ndarray, float]]
) -> tuple[gs.Graph, dict[str, tuple[str, list[int], np.ndarray]]]:
    """A copy of `graph` whose probed producers' outputs are multiplied by mask inputs.

    Returns:
        (the copy, mask input name -> (group name, mask shape, channel positions that stay)).
    """
    analysis = find_channel_groups(graph)
    by_name = {g.name: g for g in analysis.groups}
    probe = graph.copy()
    nodes = {n.name: n for n in probe.nodes}
    namer = Namer(probe)
    masks = {}
    for name, (keep, predicted) in cuts.items():
        group = by_name.get(name)
        if predicted <= 0 or group is None or len(group.producers) != 1 or group.producers[0] not in nodes:
            continue
        node = nodes[group.producers[0]]
        out = node.outputs[0]
        if out.name not in analysis.flows or out in probe.outputs or out.shape is None or out.dtype != np.float32:
            continue
        kept = analysis.keep(out.name, analysis.alive({name: keep}))
        rank, axis = len(out.shape), rules.output_channel_axis(node, len(out.shape))
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
        masks[mask.name] = (name, shape, kept)
    probe.toposort()
    return probe, masks


def _masked_outputs(sess, names: list[str], data: Samples, batch_size: int, masks: dict) -> list[np.ndarray]:
    """Every output in `names` of every batch, flattened per batch, with the mask inputs fed."""
    return [
        out.astype(np.float64).ravel()
        for feed in data.batches(batch_size)
        for out in sess.run(names, {**feed, **masks})
    ]
