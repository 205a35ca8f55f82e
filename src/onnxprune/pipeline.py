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

from onnxprune import rules
from onnxprune.budget import TARGETS, CostModel, allocate
from onnxprune.calibration import criteria
from onnxprune.calibration.runner import (
    channel_statistics,
    fidelity,
    patch_covariances,
    run_batches,
    split_held_out,
)
from onnxprune.calibration.sensitivity import layer_sensitivity
from onnxprune.errors import BudgetError, OnnxPruneError, PassError
from onnxprune.graph import reinfer_shapes, to_graph, to_model, validate
from onnxprune.latency import split_rank_limit
from onnxprune.passes.basis import decompose_basis, find_basis_pairs, merge_unprofitable, pair_sizes, param_breakeven
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.compensate import refit
from onnxprune.passes.groups import find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.result import PassResult, Report
from onnxprune.rules import const

log = logging.getLogger(__name__)

METHODS = ("auto", "channel", "basis", "double")
DOUBLE_CHANNEL_SHARE = 0.5  # --method double: the part of the request taken by channels before bases


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
    """(parameters, MACs per sample) of a model as written (weights in Constant nodes or constant subgraphs count)."""
    return CostModel(cleanup(to_graph(model), fold_bn=False).graph).count()


def prune(
    model: onnx.ModelProto,
    *,
    remove_ratio: float,
    target: str = "params",
    method: str = "basis",
    criterion: str | None = None,
    exclude: Sequence[str] = (),
    min_rank: int = 8,
    calib: dict[str, np.ndarray] | None = None,
    compensate: bool = True,
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    latency_batch: int = 0,
    threads: int = 0,
    whiten: bool | None = None,
    round_to: int = 1,
    sensitivity: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Remove `remove_ratio` of the model's parameters (or MACs) and return the new model and its report.

    Methods: ``channel`` removes whole filters; ``basis`` splits each eligible layer by SVD and removes basis
    vectors; ``auto`` ranks channel and basis removals together by error per parameter saved; ``double`` removes
    channels first (half the request), then bases for the rest. A model that is already split (basis op feeding
    a scaling op) has its bases pruned in place. Layers whose kept rank does not pay are merged back. The input
    model is not modified.

    With calibration samples `calib`, 80 % drive the decisions (criterion ``energy`` by default) and the
    least-squares refit of each pruned basis pair (``compensate``); the other 20 % measure fidelity. Conv layers
    can be split along a whitened basis (``whiten``): the rank-r layer with the least output error on that data.
    By default it is used only without the refit: measured on the bundled example, the sequential refit alone
    does as well as whitening + refit, while whitening alone is far better than plain SVD alone.

    With `sensitivity` (needs ``calib``), each group's scores are weighed by how much the model's outputs move when
    that group alone is pruned (``calibration.sensitivity``).

    With `latency_batch` > 0, a pair stays split only up to the rank at which it measured faster than the single op
    at that batch size with `threads` threads (onnxruntime, CPU, this machine); 0 decides by parameters alone.
    """
    fit, held = split_held_out(calib) if calib is not None else (None, None)
    whiten = (not compensate) if whiten is None else whiten
    criterion = criterion or _default_criterion(method, calibrated=calib is not None)
    if not 0.0 <= remove_ratio < 1.0:
        raise OnnxPruneError(f"--ratio must be in [0, 1), got {remove_ratio}")
    if target not in TARGETS:
        raise OnnxPruneError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if method not in METHODS:
        raise OnnxPruneError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if sensitivity and calib is None:
        raise OnnxPruneError("--sensitivity needs calibration data (--calib) to measure the outputs on")
    if criterion in ("energy", *criteria.LABEL_CRITERIA) and calib is None:
        raise OnnxPruneError(f"--criterion {criterion} needs calibration data (--calib)")
    if criterion not in criteria.names():
        raise OnnxPruneError(f"--criterion must be one of {', '.join(criteria.names())}, got {criterion!r}")
    start = time.perf_counter()
    fit_labels = None
    if fit is not None and criterion in criteria.LABEL_CRITERIA:  # the user's labels, else the model's own top-1
        n_fit = len(next(iter(fit.values())))
        fit_labels = labels[:n_fit] if labels is not None else _predictions(model, fit, batch_size)
    params_before, macs_before = count(model)
    total = params_before if target == "params" else macs_before
    graph = to_graph(model)
    bn_gamma = criteria.collect_bn_gamma(graph)
    report = run_passes(graph, [cleanup]).report
    cleaned = CostModel(graph).count()[0 if target == "params" else 1]
    report.facts["ratio_free"] = 1 - cleaned / total if total else 0.0  # what folding BN and constants alone removes
    stages = {"channel": ["channel"], "basis": ["basis"], "auto": ["auto"], "double": ["channel", "basis"]}[method]
    plans = 0
    pairs = find_basis_pairs(graph)
    limits: dict[str, int] = {}
    for i, stage in enumerate(stages):
        wanted = remove_ratio * (DOUBLE_CHANNEL_SHARE if method == "double" and i == 0 else 1.0)
        if i > 0:
            graph = reinfer_shapes(graph, model)
        if stage in ("basis", "auto"):
            covs = None
            if fit is not None and whiten:
                graph = reinfer_shapes(graph, model)
                covs = patch_covariances(
                    to_model(graph, model), fit, _whitenable(graph, min_rank), batch_size=batch_size
                )
            split = run_passes(graph, [partial(decompose_basis, min_channels=min_rank, covariances=covs)]).report
            pairs = pairs + split.facts.pop("pairs", [])
            report.merge(split)
            if latency_batch:
                limits.update(_latency_limits(graph, pairs, batch=latency_batch, threads=threads))
        energy, pooled = {}, {}
        if fit is not None:
            graph = reinfer_shapes(graph, model)
            axes = criteria.energy_tensors(find_channel_groups(graph))
            axes.update({p.mid: _mid_axis(graph, p) for p in pairs})
            energy, pooled = channel_statistics(
                to_model(graph, model), fit, axes, pooled=criterion in criteria.LABEL_CRITERIA, batch_size=batch_size
            )
        plans += _hinted(method, latency_batch, _prune_stage)(
            graph,
            report,
            stage=stage,
            remove_ratio=wanted,
            target=target,
            total=total,
            criterion=criterion,
            exclude=exclude,
            bn_gamma=bn_gamma,
            pairs=pairs,
            energy=energy,
            pooled=pooled,
            labels=fit_labels,
            limits=limits,
            round_to=round_to,
            probe=partial(layer_sensitivity, template=model, data=fit, batch_size=batch_size) if sensitivity else None,
        )
    report.merge(run_passes(graph, [partial(merge_unprofitable, pairs=pairs, limits=limits), cleanup]).report)
    report.facts["split_rank_limits"] = limits
    if fit is not None and compensate:
        graph = reinfer_shapes(graph, model)
        refit_pass = partial(
            refit,
            template=model,
            original=model,
            fit=fit,
            held=held,
            pairs=pairs,
            kept=report.facts.get("kept"),
            batch_size=batch_size,
        )
        report.merge(run_passes(graph, [refit_pass]).report)
    out = to_model(graph, model)
    validate(out)
    if held is not None:
        n_fit = len(next(iter(fit.values())))
        truth = None if labels is None else labels[n_fit:]
        report.facts["fidelity"] = fidelity(model, out, held, labels=truth, batch_size=batch_size)
        report.facts["fidelity_samples"] = len(next(iter(held.values())))
    params_after, macs_after = count(out)
    report.facts.update(
        {
            "params_before": params_before,
            "params_after": params_after,
            "macs_before": macs_before,
            "macs_after": macs_after,
            "ratio_achieved": 1 - (params_after / params_before if target == "params" else macs_after / macs_before),
            "params_removed": 1 - params_after / params_before if params_before else 0.0,
            "macs_removed": 1 - macs_after / macs_before if macs_before else 0.0,
            "ratio_requested": remove_ratio,
            "target": target,
            "method": method,
            "criterion": criterion,
            "groups_pruned": plans,
            "seconds": time.perf_counter() - start,
        }
    )
    report.facts.setdefault("blocked", {})
    report.facts.pop("kept", None)
    _check_ratio(report, method=method, latency_batch=latency_batch, round_to=round_to)
    return out, report


RATIO_TOLERANCE = 0.01  # the achieved ratio lands within 1 point of the request...
RATIO_FAR = 0.03  # ...or the report says why; beyond 3 points nothing is written (BudgetError, exit 2)


def _alternatives(method: str, latency_batch: int) -> str:
    """What else to try after a refusal: never the method just used."""
    options = ["lower --ratio"]
    options += [f"--method {m}" for m in ("channel", "basis") if m != method]
    if latency_batch and method != "channel":
        options.append("--latency-batch 0")
    return ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]


def _hinted(method: str, latency_batch: int, fn: Callable) -> Callable:
    """`fn`, whose BudgetError ends with suggestions that fit this run (not the method it already uses)."""

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BudgetError as err:
            head = str(err).split("; lower --ratio")[0]
            report = args[1] if len(args) > 1 else kwargs.get("report")
            whole = report.counts.get("shared_left_whole", 0) if report is not None else 0
            if whole:
                head += f"; {whole} layers whose weight is shared by several nodes were left whole, not split"
            raise BudgetError(f"{head}; {_alternatives(method, latency_batch)}") from err

    return call


def _check_ratio(report: Report, *, method: str, latency_batch: int, round_to: int) -> None:
    """Within 1 point of the request, or say why in one line; far from it, refuse (nothing is written).

    With --round-to the overshoot of one rounding step is documented, so it is only noted.
    """
    facts = report.facts
    requested, achieved = facts["ratio_requested"], facts["ratio_achieved"]
    off = achieved - requested
    if abs(off) <= RATIO_TOLERANCE:
        return
    planned, free = facts.get("ratio_planned"), facts.get("ratio_free")
    if off > 0 and free is not None and free >= requested - RATIO_TOLERANCE:
        facts["ratio_note"] = (
            f"--ratio {requested:.2f}: reached {achieved:.3f} of the {facts['target']}: folding BatchNorm and "
            f"constants alone removes {free:.3f}"
        )
        return
    if (
        planned is not None
        and abs(planned - requested) > RATIO_TOLERANCE
        and any(facts.get("split_rank_limits", {}).values())
    ):
        why = "a split layer pays only below the rank measured faster than one op, so layers go in whole steps"
    elif planned is not None and abs(planned - requested) > RATIO_TOLERANCE:
        unit = "channels" if method == "channel" else "channels or bases"
        why = f"no set of whole {unit} lands closer here (coarse groups)"
    elif planned is not None:
        why = f"the plan counted {planned:.3f}, but merging split layers back and measured latency limits changed it"
    else:
        why = "nothing could be removed" if achieved <= 0 else "the allocation did not land closer"
    if round_to > 1 and off > 0:
        why = f"--round-to {round_to} rounds channel counts and ranks up to its multiples"
    line = (
        f"--ratio {requested:.2f}: reached {achieved:.3f} of the {facts['target']} "
        f"({100 * abs(off):.1f} points {'over' if off > 0 else 'under'}): {why}"
    )
    if abs(off) > RATIO_FAR and not (round_to > 1 and off > 0):
        raise BudgetError(f"{line}; nothing written; {_alternatives(method, latency_batch)}")
    facts["ratio_note"] = line  # printed in the summary and written to the JSON report
    log.debug("%s", line)


MAX_DROP_STEPS = 6  # bisection steps on the ratio for --max-drop: 1/64 of the request


def prune_within(
    model: onnx.ModelProto, *, remove_ratio: float, max_drop: float, **options
) -> tuple[onnx.ModelProto, Report]:
    """Like `prune`, but never let held-out top-1 agreement fall under ``1 - max_drop``.

    Prunes at `remove_ratio`; if agreement is too low, bisects the ratio down and returns the largest one that
    holds (the report's ``max_drop`` entry says what was asked and what was reached). Needs ``calib``.
    """
    if options.get("calib") is None:
        raise OnnxPruneError("--max-drop needs calibration data (--calib) to measure agreement on")
    if not 0.0 <= max_drop < 1.0:
        raise OnnxPruneError(f"--max-drop must be in [0, 1), got {max_drop}")

    def attempt(ratio: float) -> tuple[float, onnx.ModelProto, Report] | None:
        try:
            out, report = prune(model, remove_ratio=ratio, **options)
        except BudgetError:
            return None
        return _agreement(report), out, report

    floor = 1.0 - max_drop
    first = attempt(remove_ratio)
    if first is not None and first[0] >= floor:
        first[2].facts["max_drop"] = {"max_drop": max_drop, "requested": remove_ratio, "reached": remove_ratio}
        return first[1], first[2]
    lo, hi, best = 0.0, remove_ratio, attempt(0.0)
    for _ in range(MAX_DROP_STEPS):
        mid = (lo + hi) / 2
        tried = attempt(mid)
        if tried is not None and tried[0] >= floor:
            lo, best = mid, tried
        else:
            hi = mid
    agreement, out, report = best
    report.facts["max_drop"] = {
        "max_drop": max_drop,
        "requested": remove_ratio,
        "reached": lo,
        "agreement": agreement,
        "agreement_at_request": None if first is None else first[0],
    }
    log.warning(
        "--max-drop %.3f: stopped at ratio %.3f (top-1 agreement %.3f); %.2f would drop to %s",
        max_drop,
        lo,
        agreement,
        remove_ratio,
        "unreachable" if first is None else f"{first[0]:.3f}",
    )
    return out, report


def _default_criterion(method: str, *, calibrated: bool) -> str:
    """The criterion used when none is given.

    With calibration data: cmi for --method channel and auto (measured on the suite's ResNet-20 at 0.7: channel 96.7 %
    with cmi vs 10.6 % with energy, auto 97.5 vs 76.5); energy for double (97.6 vs 95.5 with cmi) and for basis, whose
    bases score by s_k^2 E[z_k^2] whatever the criterion. Without: l2.
    """
    if not calibrated:
        return "l2"
    return "cmi" if method in ("channel", "auto") else "energy"


def _agreement(report: Report) -> float:
    """Held-out top-1 agreement of the first classifier-like output (cosine similarity for others)."""
    fid = next(iter(report.facts["fidelity"].values()))
    return fid.get("top1_agreement", fid["cosine"])


def _prune_stage(
    graph: gs.Graph,
    report: Report,
    *,
    stage: str,
    remove_ratio: float,
    target: str,
    total: int,
    criterion: str,
    exclude: Sequence[str],
    bn_gamma: dict[str, np.ndarray],
    pairs: list,
    energy: dict[str, np.ndarray],
    pooled: dict[str, np.ndarray],
    labels: np.ndarray | None,
    limits: dict[str, int],
    round_to: int,
    probe: Callable | None = None,
) -> int:
    """One allocation + removal on `graph` (in place); returns the number of groups it shrank."""
    analysis = find_channel_groups(graph)
    basis_groups = {
        g.name for g in analysis.groups if len(g.producers) == 1 and g.producers[0] in {p.basis for p in pairs}
    }
    protected = {
        g.name
        for g in analysis.groups
        if any(fnmatch.fnmatch(_original_name(p), pat) for p in g.producers for pat in exclude)
    }
    if stage == "channel":
        protected |= basis_groups
    elif stage == "basis":
        protected |= {g.name for g in analysis.groups} - basis_groups
    blocked = report.facts.setdefault("blocked", {})
    for group in analysis.groups:
        if group.blocked and len(group.blocked) == len(group.classes):
            blocked[group.name] = next(iter(group.blocked.values()))
        elif any(fnmatch.fnmatch(_original_name(p), pat) for p in group.producers for pat in exclude):
            blocked[group.name] = "excluded by --exclude"
    report.facts["groups"] = len(analysis.groups)
    if remove_ratio <= 0:
        return 0
    cost = CostModel(graph, analysis, pairs, limits)
    scores = criteria.importance(criterion, criteria.Context(graph, analysis, bn_gamma, pairs, energy, pooled, labels))
    weights = None
    if probe is not None:
        weights = probe(graph, groups=[g for g in analysis.groups if g.name not in protected], scores=scores)
        report.facts.setdefault("sensitivity", {}).update(weights)
    allocation = allocate(
        analysis,
        cost,
        scores,
        remove_ratio=remove_ratio,
        target=target,
        total_before=total,
        protected=frozenset(protected),
        round_to=round_to,
        weights=weights,
    )
    report.facts["reachable"] = allocation.reachable
    report.facts["ratio_planned"] = allocation.achieved
    kinds = report.facts.setdefault("removed", {})
    for name, keep in allocation.plan.items():
        group = next(g for g in analysis.groups if g.name == name)
        kinds[name] = {
            "kind": "basis" if name in basis_groups else "channel",
            "removed": int(len(group.classes) - len(keep)),
            "of": int(len(group.classes)),
        }
    report.merge(run_passes(graph, [partial(remove_channels, plan=allocation.plan, analysis=analysis)]).report)
    return len(allocation.plan)


def _predictions(model: onnx.ModelProto, data: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """The model's own top-1 class on `data` (first output, classes on its last axis): labels without labels."""
    out = run_batches(model, data, batch_size=batch_size)[model.graph.output[0].name]
    return out.reshape(len(out), -1).argmax(1)


def _whitenable(graph: gs.Graph, min_rank: int) -> dict[str, tuple[str, dict]]:
    """2-D plain Convs worth splitting: node name -> (input tensor, attributes) for their patch covariances."""
    found = {}
    for node in graph.nodes:
        w = const(node.inputs[1]) if node.op == "Conv" and len(node.inputs) > 1 else None
        if (
            w is None
            or w.ndim != 4
            or int(node.attrs.get("group", 1)) != 1
            or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        ):
            continue
        if min(w.shape[0], int(np.prod(w.shape[1:]))) >= min_rank:
            attrs = {
                "kernel_shape": list(w.shape[2:]),
                **{k: list(node.attrs[k]) for k in ("strides", "pads", "dilations") if k in node.attrs},
            }
            found[node.name] = (node.inputs[0].name, attrs)
    return found


def _latency_limits(graph: gs.Graph, pairs: list, *, batch: int, threads: int) -> dict[str, int]:
    """Per pair, the largest kept rank that still measures faster split than merged (static shapes only)."""
    nodes = {n.name: n for n in graph.nodes}
    limits = {}
    for pair in pairs:
        basis = nodes[pair.basis]
        x_shape = basis.inputs[0].shape
        if x_shape is None or any(not isinstance(d, int) for d in x_shape[1:]):
            continue
        if basis.op not in ("Conv", "Gemm", "MatMul"):  # no latency probe for it (ConvTranspose): by parameters
            continue
        r, k, co = pair_sizes(graph, pair)
        bound = min(r, param_breakeven(k, co))
        w = const(basis.inputs[1])
        if basis.op == "Conv":
            shape, op = [co, *w.shape[1:]], "Conv"
        else:
            shape, op = [k, co], "MatMul"
        limits[pair.basis] = split_rank_limit(
            op=op,
            x_shape=[batch, *x_shape[1:]],
            weight_shape=shape,
            attrs=dict(basis.attrs),
            max_rank=bound,
            threads=threads,
        )
    return limits


def _mid_axis(graph: gs.Graph, pair) -> int:
    basis = next(n for n in graph.nodes if n.name == pair.basis)
    return rules.output_channel_axis(basis)


def _original_name(node_name: str) -> str:
    for suffix in ("_basis", "_scaling"):
        if node_name.endswith(suffix):
            return node_name[: -len(suffix)]
    return node_name


def decompose(model: onnx.ModelProto, *, min_rank: int = 8) -> tuple[onnx.ModelProto, Report]:
    """The full-rank split of every eligible layer: a basis op (orthonormal filters) and a scaling op."""
    graph = to_graph(model)
    report = run_passes(graph, [cleanup, partial(decompose_basis, min_channels=min_rank)]).report
    out = to_model(graph, model)
    validate(out)
    return out, report
