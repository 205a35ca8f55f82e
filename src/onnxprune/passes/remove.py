"""remove_channels(): slice every member of each group to the same `keep`; fold constants that stay exact."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.graph import Namer, reset_shapes
from onnxprune.passes.groups import ChannelGraph, find_channel_groups
from onnxprune.result import PassResult, Report
from onnxprune.rules import const


def remove_channels(
    graph: gs.Graph, *, plan: dict[str, np.ndarray], analysis: ChannelGraph | None = None
) -> PassResult:
    """Remove the channels `plan` drops (group name -> kept indices), in place, through the whole graph.

    Args:
        graph: Topologically sorted graph; edited in place.
        plan: For each group to shrink, the sorted indices of its channels that stay.
        analysis: The result of `find_channel_groups(graph)`, if already computed.
    """
    analysis = analysis or find_channel_groups(graph)
    report = Report()
    alive = analysis.alive(plan)
    if alive.all():
        return PassResult(graph, modified=False, report=report)
    keeps = {name: analysis.keep(name, alive) for name in analysis.flows}
    shrunk = {name for name, keep in keeps.items() if len(keep) < len(analysis.flows[name].ids)}
    empty = sorted(name for name in shrunk if len(keeps[name]) == 0)
    if empty:
        raise ValueError(f"plan removes every channel of tensor '{empty[0]}'")
    namer = Namer(graph)
    shared: dict[str, list[gs.Constant]] = {}  # original constant -> its sliced versions: a shared weight stays shared
    for node in graph.nodes:
        step = analysis.steps.get(node.name)
        touched = {t.name for t in node.inputs} | {t.name for t in node.outputs}
        if step is None or not touched & shrunk:
            continue
        before = _weight_shape(node)
        if step.fold is not None and step.fold.tensor in shrunk:
            _fold(node, step.fold, analysis, keeps, namer, report)
        for ps in step.params:
            if ps.index >= len(node.inputs) or const(node.inputs[ps.index]) is None:
                continue
            values = const(node.inputs[ps.index])
            sliced = values
            for axis, tensor in ps.axes:
                full = len(analysis.flows[tensor].ids)
                at = ps.positions(values.shape[axis], full, keeps[tensor]) if values.ndim else None
                if tensor in shrunk and at is not None:
                    sliced = np.take(sliced, at, axis=axis)
            if sliced is not values:
                original = node.inputs[ps.index].name
                done = shared.setdefault(original, [])
                same = next(
                    (c for c in done if c.values.shape == sliced.shape and np.array_equal(c.values, sliced)), None
                )
                if same is None:
                    base = f"{node.name}/{original.rsplit('/', 1)[-1]}"
                    same = gs.Constant(namer.fresh_name(base), np.ascontiguousarray(sliced))
                    done.append(same)
                node.inputs[ps.index] = same
        if step.rewrite is not None:
            step.rewrite(node, keeps, namer)
        if step.approximate:
            report.skip(node, f"not exact: {step.approximate}")
            report.counts["approximate"] += 1
        report.layers[node.name] = {"op": node.op, "before": before, "after": _weight_shape(node)}
        report.counts["nodes_changed"] += 1
    report.counts["channels_removed"] += int((~alive).sum())
    report.facts["kept"] = {name: keeps[name] for name in shrunk}  # positions that stay, per shrunk tensor
    reset_shapes(graph)
    return PassResult(graph, modified=True, report=report)


def _fold(
    node: gs.Node, fold, analysis: ChannelGraph, keeps: dict[str, np.ndarray], namer: Namer, report: Report
) -> None:
    flow = analysis.flows[fold.tensor]
    removed = np.setdiff1d(np.arange(len(flow.ids)), keeps[fold.tensor])
    values = flow.zero[removed]
    if np.all(values == 0):
        return
    if fold.apply is None or not np.all(np.isfinite(values)):
        why = fold.why_not if fold.apply is None else "the removed channels are not constant there"
        report.skip(node, f"constant of removed input channels not folded into the bias: {why}")
        report.counts["folds_skipped"] += 1
        return
    fold.apply(node, removed, values, namer)
    report.counts["biases_folded"] += 1


def _weight_shape(node: gs.Node) -> list[int] | None:
    for tensor in node.inputs[1:2]:
        if isinstance(tensor, gs.Constant):
            return list(tensor.values.shape)
    return None
