"""layer_sensitivity(): how much the model's outputs move when one group alone loses its least important channels.

Scores are normalised within each group, which treats every layer as equally fragile. `--sensitivity` measures
instead: each group alone is pruned at a few levels (its lowest-scored classes first), the pruned copy runs in
onnxruntime on calibration samples, and the relative change of the outputs (``sum ||out - ref||^2 / sum ||ref||^2``)
is recorded. Its mean over the levels, divided by the median over the groups, weighs that group's scores in the
allocation: a layer whose removals move the outputs more gives up fewer channels.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.calibration.data import Samples, as_samples
from onnxprune.calibration.runner import stream
from onnxprune.graph import to_graph, to_model
from onnxprune.passes.groups import Group, find_channel_groups
from onnxprune.passes.remove import remove_channels

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
    for group in groups:
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
CUT_WEIGHT_RANGE = (0.2, 5.0)


def cut_sensitivity(
    graph: gs.Graph,
    template: onnx.ModelProto,
    cuts: dict[str, tuple[np.ndarray, float]],
    data: Samples | dict[str, np.ndarray],
    *,
    batch_size: int = 32,
) -> dict[str, float]:
    """Measured weight of each layer's predicted error, at the cut the allocation actually planned (DESIGN §4).

    The allocation predicts each layer's error locally (its relative output error). How much of it reaches the
    model's outputs depends on what follows the layer. Each group in `cuts` alone is pruned to its planned kept
    classes on a copy, the copy runs in onnxruntime on `CUT_SAMPLES` samples, and the relative change of the outputs
    (``sum ||out - ref||^2 / sum ||ref||^2``) over the predicted local error is that layer's weight, divided by the
    median over the layers and clipped to `CUT_WEIGHT_RANGE`. One probe per layer; `graph` is not modified.

    Args:
        graph: The graph the plan was made on (split, not yet pruned).
        template: Model whose opsets and metadata exports of `graph` take.
        cuts: Group name -> (kept positions of the group, predicted relative error of that layer at that cut).
        data: Calibration samples (the first `CUT_SAMPLES` are used).
        batch_size: Samples per onnxruntime run.

    Returns:
        Group name -> weight (1 for the median layer); layers with no predicted error are left out.
    """
    data = as_samples(data).head(CUT_SAMPLES)
    reference = to_model(graph, template)
    ref = _outputs(reference, data, batch_size)
    energy = max(sum(float(np.sum(r**2)) for r in ref), 1e-30)
    ratio = {}
    for name, (keep, predicted) in cuts.items():
        if predicted <= 0:
            continue
        probe = to_graph(reference)
        analysis = find_channel_groups(probe)
        if not any(g.name == name for g in analysis.groups):
            continue
        remove_channels(probe, plan={name: keep}, analysis=analysis)
        out = _outputs(to_model(probe, template), data, batch_size)
        moved = sum(float(np.sum((o - r) ** 2)) for o, r in zip(out, ref)) / energy
        ratio[name] = moved / predicted
    if not ratio:
        return {}
    median = max(float(np.median(list(ratio.values()))), 1e-30)
    weights = {name: float(np.clip(value / median, *CUT_WEIGHT_RANGE)) for name, value in ratio.items()}
    for name, value in sorted(weights.items(), key=lambda kv: -kv[1])[:3]:
        log.info("most sensitive at the planned cut: %s (weight %.2f)", name, value)
    return weights
