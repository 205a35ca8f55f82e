"""run_passes() composes passes with error context; prune() is the whole job on a ModelProto."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.budget import TARGETS, CostModel, allocate
from onnxprune.calibration import criteria
from onnxprune.errors import OnnxPruneError, PassError
from onnxprune.graph import to_graph, to_model, validate
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.result import PassResult, Report

log = logging.getLogger(__name__)

METHODS = ("channel",)


def run_passes(graph: gs.Graph, passes: Sequence[Callable[[gs.Graph], PassResult]]) -> PassResult:
    """Run `passes` in order on `graph` (in place); merge their reports; name the failing pass on error."""
    report = Report()
    modified = False
    done: list[str] = []
    for fn in passes:
        name = getattr(fn, "func", fn).__name__
        try:
            result = fn(graph)
        except OnnxPruneError:
            raise
        except Exception as err:
            raise PassError(f"{name} failed after {done}: {type(err).__name__}: {err}") from err
        report.merge(result.report)
        modified |= result.modified
        graph = result.graph
        done.append(name)
    return PassResult(graph, modified, report)


def count(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, MACs per sample) of a model as written."""
    return CostModel(to_graph(model)).count()


def prune(model: onnx.ModelProto, *, remove_ratio: float, target: str = "params", method: str = "channel",
          criterion: str = "l2", exclude: Sequence[str] = ()) -> tuple[onnx.ModelProto, Report]:
    """Remove `remove_ratio` of the model's parameters (or MACs) and return the new model and its report.

    The input model is not modified.
    """
    if not 0.0 <= remove_ratio < 1.0:
        raise OnnxPruneError(f"--ratio must be in [0, 1), got {remove_ratio}")
    if target not in TARGETS:
        raise OnnxPruneError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if method not in METHODS:
        raise OnnxPruneError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if criterion not in criteria.names():
        raise OnnxPruneError(f"--criterion must be one of {', '.join(criteria.names())}, got {criterion!r}")
    start = time.perf_counter()
    params_before, macs_before = count(model)
    graph = to_graph(model)
    bn_gamma = criteria.collect_bn_gamma(graph)
    report = run_passes(graph, [cleanup]).report
    analysis = find_channel_groups(graph)
    protected = frozenset(
        g.name for g in analysis.groups if any(fnmatch.fnmatch(p, pat) for p in g.producers for pat in exclude))
    for group in analysis.groups:
        if group.blocked and len(group.blocked) == len(group.classes):
            report.facts.setdefault("blocked", {})[group.name] = next(iter(group.blocked.values()))
        elif group.name in protected:
            report.facts.setdefault("blocked", {})[group.name] = "excluded by --exclude"
    total = params_before if target == "params" else macs_before
    plan: dict[str, np.ndarray] = {}
    if remove_ratio > 0:
        cost = CostModel(graph, analysis)
        scores = criteria.importance(criterion, criteria.Context(graph, analysis, bn_gamma))
        allocation = allocate(analysis, cost, scores, remove_ratio=remove_ratio, target=target,
                              total_before=total, protected=protected)
        plan = allocation.plan
        report.facts["reachable"] = allocation.reachable
    result = run_passes(graph, [partial(remove_channels, plan=plan, analysis=analysis), cleanup])
    report.merge(result.report)
    out = to_model(result.graph, model)
    validate(out)
    params_after, macs_after = count(out)
    report.facts.update({
        "params_before": params_before, "params_after": params_after,
        "macs_before": macs_before, "macs_after": macs_after,
        "ratio_achieved": 1 - (params_after / params_before if target == "params" else macs_after / macs_before),
        "params_removed": 1 - params_after / params_before if params_before else 0.0,
        "macs_removed": 1 - macs_after / macs_before if macs_before else 0.0,
        "ratio_requested": remove_ratio, "target": target, "method": method, "criterion": criterion,
        "groups": len(analysis.groups), "groups_pruned": len(plan),
        "seconds": time.perf_counter() - start,
    })
    report.facts.setdefault("blocked", {})
    return out, report
