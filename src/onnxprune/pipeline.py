"""run_passes() composes passes with error context; prune() is the whole job on a ModelProto."""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxprune import progress
from onnxprune.budget import (
    TARGETS,
    Allocation,
    CostModel,
    LatencyModel,
    allocate,
    allocate_channels,
    allocate_ranks,
    channel_choices,
    count,
    rank_choices,
)
from onnxprune.calibration import criteria
from onnxprune.calibration.data import (
    Samples,
    as_samples,
    batch_axes,
    check_sample_axis,
    fixed_batch,
    model_inputs,
)
from onnxprune.calibration.refit import TrainEnd, refit, refit_tensor_trains
from onnxprune.calibration.runner import (
    channel_covariances,
    channel_statistics,
    fidelity,
    patch_covariances,
    predicted,
    sequence_outputs,
    split_calibration,
)
from onnxprune.calibration.sensitivity import CUT_WEIGHT_RANGE, CutProbe, layer_sensitivity
from onnxprune.errors import BudgetError, GuardError, InvalidModelError, OnnxPruneError, PassError, PruneBug
from onnxprune.graph import (
    refresh_shapes,
    session,
    subgraph_weights,
    to_graph,
    to_model,
    validate,
    without_negative_dims,
)
from onnxprune.latency import (
    compare_latency,
    layer_latency,
    model_latency,
    simd_width,
    split_rank_limit,
    tucker_no_slower,
)
from onnxprune.passes.basis import (
    decompose_basis,
    find_basis_pairs,
    merge_unprofitable,
    pair_sizes,
    param_breakeven,
    whitenable,
)
from onnxprune.passes.cleanup import cleanup
from onnxprune.passes.groups import ChannelGraph, find_channel_groups
from onnxprune.passes.remove import remove_channels
from onnxprune.passes.tt import TT_MIN_WEIGHTS, allocate_bonds, decompose_tt, tt_layers
from onnxprune.passes.tucker import PROJECTION, to_tucker
from onnxprune.progress import steps
from onnxprune.result import PassResult, Report, Skip
from onnxprune.rules import QUANTIZED, QUANTIZED_REASON, layouts
from onnxprune.shapes import choose_shapes, concrete_shapes, format_shapes
from onnxprune.testing import random_feeds

log = logging.getLogger(__name__)

METHODS = ("best", "basis", "channel", "auto", "double", "tt")
SYNTHETIC_SAMPLES = 8  # random inputs the outputs are compared on when there is no calibration data
DOUBLE_CHANNEL_SHARE = 0.5  # --method double: the part of the request taken by channels before bases


_warned: set[str] = set()  # kinds of warning given during the outermost `prune` / `prune_guarded` call
_calls = [0]  # how deep in those calls we are (the guard's bisection and method best call `prune` again)


def _outermost_call(fn: Callable) -> Callable:
    """Per outermost call of `fn`: each kind of `_warn_once` warning once, and the seconds of each long step.

    The steps' own wall seconds (``progress.steps`` / ``progress.timing``, summed by label over every attempt the
    call made, those of steps run inside a step counted there only) go into the report's ``step_seconds``, also
    when the guard refuses the result.
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        outermost = not _calls[0]
        if outermost:
            _warned.clear()
        _calls[0] += 1
        report = None
        with progress.timed() as spent:
            try:
                result = fn(*args, **kwargs)
                report = result[1]
                return result
            except GuardError as e:
                report = e.report
                raise
            finally:
                _calls[0] -= 1
                if outermost and report is not None:
                    report.facts["step_seconds"] = {k: round(v, 3) for k, v in spent.items()}
                    for kind, message in report.facts.pop(DEFERRED, []):  # the warnings of the result returned
                        _warn_once(kind, message)

    return call


DEFERRED = "deferred_warnings"  # report fact: (kind, message) warnings about this result, given if it is the one
# returned (`--method best` makes several; a warning about one not written would send the user after nothing)


def _warn_once(kind: str, message: str) -> None:
    """Log `message` unless a warning of `kind` was already given during this call (`_outermost_call`)."""
    if kind not in _warned:
        _warned.add(kind)
        log.warning("%s", message)


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


@_outermost_call
def prune(
    model: onnx.ModelProto,
    *,
    remove_ratio: float,
    target: str = "params",
    method: str = "basis",
    **options,
) -> tuple[onnx.ModelProto, Report]:
    """Remove `remove_ratio` of the model's parameters (or MACs) and return the new model and its report.

    ``method="best"`` (the command line's default) makes the ``basis`` result (ranks at multiples of the vector
    width where that reaches the request, else free) and times it against the original at `latency_batch` and 32
    (the finished model). Unless it took over `CLEAR_AFTER_S` to make, measures at least `CLEAR_SPEEDUP` times
    faster at both and is faithful on the held-out samples (`_faithful_enough`), it makes ``channel`` results with
    channel counts rounded to the processor's vector width (`simd_width`; with and without measured layer
    sensitivity; rounded to 8 too when none of those keeps the guard's floor, `_holds`) and writes, of those
    measured no slower that keep that floor (else of those that keep it, else of all), the fastest of those that
    agree best with the original on the held-out samples (`_most_faithful`: agreement within a sample, 1 - cosine
    within 2x of the least or at most 0.01); when the basis result measured slower, a basis result whose knapsack
    offers whole channels beside the ranks (``channel_options``) is made too; when no result keeps the floor, the
    basis result planned by parameters alone is made too. Held-out, as the refit fitted the others: compared on
    those, a channel result of ddddocr's recogniser refitted on 51 crops agreed 0.961 against the basis result's
    0.922, and 0.077 on the 13 held out; the guard's figure is then the best of a few results made from one model.
    When no basis plan reaches the request (every split measured slower), the channel results alone. With
    ``target="latency"``: the basis result, and when it saves too little of the measured time, channel removal as
    deep as needed (`_channel_for_latency`); of the results that save enough, one that keeps the floor when any
    does, the most faithful (`_latency_pick`), else the fastest found, with a ``ratio_note``. It is ``basis`` alone
    without calibration data, with ``latency_batch=0`` or ``round_to`` > 1.
    Measured on the handed digits ResNet-20 (batch 1, 2 threads): at 0.7 the basis result was 1.36x slower than the
    original at 99.17 % test accuracy, channels rounded to 16 were 1.30x faster at 99.17 %. The report's
    ``alternatives`` rows give both measurements. ``method="channel"`` with ``target="latency"``: channel removal as
    deep as the measured time needs (`_channel_latency`). Every other method: see `prune_one`.
    """
    check_sample_axis(model, calibrated=options.get("calib") is not None)
    model = without_negative_dims(model)
    max_drop = options.pop("max_drop", MAX_DROP)  # the guard's, which `best` prefers results to keep
    holds_only = options.pop("holds_only", False)  # the guard's trials: only whether a result keeps its floor
    if method == "channel" and target == "latency":
        return _channel_latency(model, remove_ratio=remove_ratio, **options)
    if method != "best":
        out, report = _basis_or_joint(model, remove_ratio=remove_ratio, target=target, method=method, **options)
        if method in ("channel", "double", "auto") and "speed_check" not in report.facts and not holds_only:
            _time_finished(model, out, report, options)
        return out, report
    return _best_of(
        model, remove_ratio=remove_ratio, target=target, max_drop=max_drop, holds_only=holds_only, **options
    )


def _time_finished(model: onnx.ModelProto, out: onnx.ModelProto, report: Report, options: dict) -> None:
    """``speed_check`` of a finished result against `model` at `latency_batch` and 32 (the summary's `speed` line).

    For the methods that do not time what they write (channel, double, auto): fewer MACs are not always faster (the
    PP-OCR direction classifier at 0.3 by channels measured 0.85x at batch 1 with one thread, and nothing said so).
    Skipped with ``latency_batch=0`` or where no input shape is known to time at.
    """
    latency_batch = options.get("latency_batch", Options.latency_batch)
    if not latency_batch:
        return
    calib = options.get("calib")
    samples = as_samples(calib, model) if calib is not None else None
    shapes, _ = choose_shapes(model, given=options.get("shapes"), data=samples)
    if shapes is None:
        return
    started = time.perf_counter()
    report.facts["speed_check"] = _speed_of(
        model, out, shapes, latency_batch=latency_batch, seed=options.get("seed", 0), threads=options.get("threads", 0)
    )
    if "seconds" in report.facts:  # the summary's time line: the timing is part of the prune
        report.facts["seconds"] += time.perf_counter() - started


def _speed_of(
    model: onnx.ModelProto, out: onnx.ModelProto, shapes: dict, *, latency_batch: int, seed: int, threads: int
) -> dict[int, tuple[float, float]]:
    """`out` timed against `model` on synthetic inputs at `shapes`, at `latency_batch` and 32 (`_timed_batches`).

    Returns:
        Batch -> (original, result) seconds (`compare_latency`, alternating blocks).
    """
    return {
        b: compare_latency(model, out, _synthetic_feeds(model, shapes, batch=b, seed=seed), threads=threads)
        for b in _timed_batches(model, latency_batch)
    }


def _basis_or_joint(model: onnx.ModelProto, *, method: str, **options) -> tuple[onnx.ModelProto, Report]:
    """`prune_one`, and for ``basis`` with calibration data that ranks alone cannot reach, channels beside the ranks.

    The second try offers whole channels in the same knapsack (``channel_options``). Ranks only reach layers that
    split: a text recogniser whose bidirectional LSTM holds 31 % of the parameters
    (ddddocr's common.onnx) was refused at 0.7 ("at most 0.687"); its hidden units are channels. Where ranks reach,
    they stay the default (channel options did not beat them on the handed digits ResNet-20).
    """
    try:
        return prune_one(model, method=method, **options)
    except BudgetError as err:
        basis = method == "basis" and options.get("target") != "latency" and not options.get("channel_options")
        offer = err.reachable is not None and "left whole: " not in str(err)  # else nothing here has channels either
        if basis and options.get("calib") is None and offer:
            hint = "; --calib would also offer whole channels beside the ranks"
            raise BudgetError(
                str(err) + hint, reachable=err.reachable, head=err.head + hint, blocked=err.blocked
            ) from err
        if not basis or options.get("calib") is None:
            raise
        reach = f"at most {err.reachable:.3f}" if err.reachable is not None else "not that far"
        log.info(
            "ranks alone reach %s of the request %.2f; allocating again with whole channels beside them",
            reach,
            options.get("remove_ratio", 0.0),
        )
        try:
            out, report = prune_one(model, method=method, **{**options, "channel_options": True})
        except BudgetError:
            raise err from None
        report.facts["channel_options"] = "ranks alone could not reach the request: whole channels were offered too"
        return out, report


@dataclass(frozen=True)
class Options:
    """The options of one `prune_one` run (their meaning: `prune_one`), checked against the model and data.

    ``Options(**kwargs)`` raises TypeError for a name it does not know; `check` raises OnnxPruneError, one line, for
    a value out of range or one that does not fit the model or the calibration data.
    """

    remove_ratio: float
    target: str = "params"
    method: str = "basis"
    criterion: str | None = None
    exclude: Sequence[str] = ()
    min_rank: int = 8
    compensate: bool = True
    labels: np.ndarray | None = None
    batch_size: int = 32
    latency_batch: int = 0
    threads: int = 0
    whiten: bool | None = None
    round_to: int = 1
    sensitivity: bool | None = None
    sensitivity_rounds: int = 2
    seed: int = 0
    shapes: dict[str, list[int]] | None = None
    channel_options: bool = False
    tucker: bool = True

    def check(self, model: onnx.ModelProto, calib: Samples | None) -> None:
        """Raise OnnxPruneError naming the first option that cannot run on `model` with `calib` (None: no data).

        Raises:
            OnnxPruneError: The ratio is outside [0, 1), a name is not one of its choices, or an option needs what is
                not there (calibration data, a latency batch, labels for every sample, a node an --exclude matches).
        """
        criterion = self.criterion or default_criterion(self.method, calibrated=calib is not None)
        if not 0.0 <= self.remove_ratio < 1.0:
            raise OnnxPruneError(f"--ratio must be in [0, 1), got {self.remove_ratio}")
        if self.target not in TARGETS:
            raise OnnxPruneError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.method not in METHODS:
            raise OnnxPruneError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.target == "latency" and not self.latency_batch:
            raise OnnxPruneError(
                "--target latency needs --latency-batch of at least 1 (the batch the latency is timed at)"
            )
        if self.target == "latency" and self.method not in ("basis", "channel"):
            raise OnnxPruneError(
                f"--target latency is supported for --method best, basis and channel, not {self.method}"
            )
        if self.method == "tt" and self.target != "params":
            raise OnnxPruneError(f"--method tt removes parameters: use --target params, not {self.target}")
        if self.method == "auto" and criterion == "reconstruction":
            raise OnnxPruneError(
                "--criterion reconstruction scores channels by the error left after the refit, which does not compare "
                "with the bases' scores that --method auto ranks them against; use it with --method channel (or the "
                "default, whose channel results use it)"
            )
        if self.method == "tt" and criterion != "l2":
            raise OnnxPruneError(
                f"--method tt cuts bond dimensions by the weights' relative error (l2): --criterion {criterion} "
                "does not apply to it"
            )
        if self.sensitivity is True and calib is None:
            raise OnnxPruneError("--sensitivity needs calibration data (--calib) to measure the outputs on")
        if criterion in criteria.DATA_CRITERIA and calib is None:
            raise OnnxPruneError(f"--criterion {criterion} needs calibration data (--calib)")
        if criterion not in criteria.names():
            raise OnnxPruneError(f"--criterion must be one of {', '.join(criteria.names())}, got {criterion!r}")
        labels = self.labels
        if labels is not None and calib is not None and (np.ndim(labels) != 1 or len(labels) < calib.total):
            raise OnnxPruneError(
                f"labels: expected a 1-D array of {calib.total} labels, got shape {list(np.shape(labels))}"
            )
        classes = _static_classes(model)
        if labels is not None and classes and len(labels) and int(np.max(labels)) >= max(classes.values()):
            shown = ", ".join(f"'{name}' has {c}" for name, c in classes.items())
            raise OnnxPruneError(
                f"labels: class {int(np.max(labels))} is past the model's classes ({shown}; labels count from 0)"
            )
        _check_exclude(model, self.exclude)


def _static_classes(model: onnx.ModelProto) -> dict[str, int]:
    """Outputs declared [N, C] with a fixed C of 2 or more (how class scores are declared): name -> C."""
    found = {}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value >= 2:
            found[out.name] = dims[1].dim_value
    return found


STAGES = {"channel": ("channel",), "basis": ("basis",), "auto": ("auto",), "double": ("channel", "basis"), "tt": ()}


def prune_one(
    model: onnx.ModelProto, *, calib: dict[str, np.ndarray] | Samples | None = None, **options
) -> tuple[onnx.ModelProto, Report]:
    """Remove `remove_ratio` of the model's parameters (or MACs) and return the new model and its report.

    Methods: ``channel`` removes whole filters; ``basis`` splits each eligible layer by SVD and removes basis
    vectors; ``auto`` ranks channel and basis removals together by error per parameter saved; ``double`` removes
    channels first (half the request), then bases for the rest. A model that is already split (basis op feeding
    a scaling op) has its bases pruned in place. Layers whose kept rank does not pay are merged back. The input
    model is not modified.

    With calibration samples `calib` (a dict of arrays, or `Samples` grouped by shape), a seeded random 80 % drive
    the decisions (criterion ``energy`` by default) and the least-squares refit of each pruned basis pair
    (``compensate``); the other 20 %, stratified by the model's own top-1 for classifiers, measure fidelity.
    `seed` drives every random choice (the split, sub-sampled positions, the cmi sample). `labels` are in the
    order of `calib` as given. Conv layers can be split along a whitened basis (``whiten``): the rank-r layer with
    the least output error on that data. By default it is used only without the refit: measured on the bundled
    example, the sequential refit alone does as well as whitening + refit, while whitening alone is far better than
    plain SVD alone.

    MACs are counted at concrete input `shapes` (input name -> dims), else at the calibration data's shape, else
    at the model's fixed dims, else 224 for the symbolic H/W of an image input (``shapes.choose_shapes``); the
    report says which (``macs_shape``, ``macs_shape_source``). With a symbolic dim none of those resolves, the
    report's MACs are None and ``target="flops"`` raises OnnxPruneError.

    ``basis`` allocates ranks jointly (``budget.allocate_ranks``): per split layer, the dense op or a rank, chosen
    to remove the request at the least predicted output error. With calibration data, `sensitivity` (on unless
    False) measures how much of each layer's predicted error reaches the outputs at the planned cut and allocates
    again, `sensitivity_rounds` times (``calibration.sensitivity.CutProbe``). The plans made are then taken to the
    end one by one (merge-back and refit), in the order of their measured output change before the refit, while the
    next is expected to finish within `SELECT_BUDGET_S`; the one whose model agrees best with the original on the
    held-out samples is written (the refit fitted the others; see `prune`). Measured on the handed
    digits ResNet-20 at 0.9: the three plans gave 50-56 %, 97.5-98.3 % and 51-66 % after the refit, while their
    output changes before it (1.2-1.5) could not tell them apart. For the channel methods, ``sensitivity=True``
    weighs each group by probes at 25 % and 50 % (``layer_sensitivity``).

    With `latency_batch` > 0, every split layer is timed dense and split at several ranks at that batch size with
    `threads` threads (onnxruntime, CPU, this machine, cached) and the allocation keeps the summed latency of the
    split layers at or under that of their dense ops: the model is not made slower. ``target="latency"`` removes
    `remove_ratio` of the measured model latency instead (the report's ``latency`` entry has the measured figures).
    0 decides by parameters alone.

    `channel_options` (``basis`` with calibration data, not ``target="latency"``) offers, beside the ranks, keeping
    fewer whole channels of every group with one producer in the same knapsack (``budget.channel_choices``: error
    from ``criteria.consumer_energy``, costs re-taken at each plan). Off by default: measured on the handed digits
    ResNet-20 it does not yet beat ranks alone (benchmarks/README.md, "channel options").

    `tucker` (on by default) writes each split k x k Conv whose Tucker-2 form (1x1 projection, k x k core, 1x1
    scaling; `passes.tucker`) keeps more directions at no more weights and MACs, and is closer to the layer, in that
    form before the refit, which then fits the core and scaling on the projected inputs.

    `exclude` holds fnmatch patterns of node names whose output channels are never pruned (a split layer's
    ``X_basis`` / ``X_scaling`` also match as ``X``); a pattern that matches no node raises OnnxPruneError.
    """
    run = _Run(model, Options(**options), as_samples(calib, model) if calib is not None else None)
    run.prepare()
    if run.opts.method == "tt":
        run.tensor_trains()
    for i, stage in enumerate(STAGES[run.opts.method]):
        run.prune_stage(i, stage)
    run.finish_plan()
    return run.measure()


class _Run:
    """The state one `prune_one` call carries from stage to stage: the graph, its report, the data and the counts.

    The stages, in order: `prepare` (checks, calibration split, counts, clean-up), `tensor_trains` (``tt``), one
    `prune_stage` per stage of the method (split, statistics, allocation and removal), `finish_plan` (merge-back,
    clean-up and refit of the plan chosen), `measure` (validation, fidelity, counts, the ratio check).
    """

    def __init__(self, model: onnx.ModelProto, opts: Options, calib: Samples | None) -> None:
        opts.check(model, calib)
        self.model, self.opts, self.calib = model, opts, calib
        self.whiten = (not opts.compensate) if opts.whiten is None else opts.whiten
        self.criterion = opts.criterion or default_criterion(opts.method, calibrated=calib is not None)
        self.plans = 0
        self.curves: dict | None = None
        self.limits: dict[str, int] = {}
        self.ends: list[TrainEnd] = []
        self.reference: gs.Graph | None = None  # the refit's targets (`prepare`)
        self.finished: dict = {}  # plan key -> (finished graph, its report), for the candidates taken to the end

    def prepare(self) -> None:
        """Shapes to count at, the fit / held-out split, labels for the label criteria, counts before, clean-up."""
        model, opts, calib = self.model, self.opts, self.calib
        self.count_shapes, self.shape_source = choose_shapes(model, given=opts.shapes, data=calib)
        if self.count_shapes is None and opts.target == "flops":
            raise OnnxPruneError(f"--target flops: MACs cannot be counted: {self.shape_source}")
        untimed = self.count_shapes is None  # symbolic dims nothing resolves: random inputs take 8 for them
        if (untimed and calib is None) or (not untimed and "default" in self.shape_source):
            _runs_at_default_shapes(model, self.count_shapes, seed=opts.seed)
        if untimed and opts.latency_batch and opts.method in ("best", "basis"):
            _warn_once(  # every split would be left out unexplained (silero-vad: "no layer offers anything")
                "untimed",
                "warning: the split layers cannot be timed, so none is offered (a split must measure no slower at "
                f"--latency-batch): {self.shape_source} (--latency-batch 0 splits without timing)",
            )
        self.start = time.perf_counter()
        self.fit, self.held, self.split_facts = (
            split_calibration(model, calib, seed=opts.seed, batch_size=opts.batch_size)
            if calib is not None
            else (None, None, {})
        )
        self.fit_labels = None
        deferred: list[tuple[str, str]] = []  # warnings about this result (DEFERRED)
        if self.fit is not None and self.criterion in criteria.LABEL_CRITERIA:  # the labels, else the own top-1
            self.fit_labels = (
                opts.labels[self.fit.index]
                if opts.labels is not None
                else predicted(model, calib, self.fit, batch_size=opts.batch_size)
            )
            if self.fit_labels is None and opts.criterion is not None:
                raise OnnxPruneError(
                    f"--criterion {self.criterion} needs class labels: no output of the model is shaped like class "
                    "scores [N, classes]; give --labels, or use --criterion energy"
                )
            if self.fit_labels is None:  # a detector or a sequence model: no classes to be informative about
                why = (
                    "the model's scores are per position (a sequence, as a CTC recogniser's), not one class per sample"
                    if _per_position(model)
                    else "no output of the model reads as class scores on these samples (shaped [N, classes] and "
                    "peaked: a classifier's softmax on inputs of its task; flat scores come from embeddings, or from "
                    "inputs unlike its data)"
                )
                # named by method: under `best` the basis result ranks by energy anyway and may be the one written
                said = f"warning: criterion energy instead of {self.criterion} for {opts.method} removal: {why}"
                deferred.append(("criterion", said))  # given only if this result is the one returned
                self.criterion = "energy"
        self.params_before, self.macs_before = count(model, shapes=self.count_shapes)
        self.total = self.params_before if opts.target == "params" else self.macs_before
        self.latency_before = None
        # (a channel result for a latency target is timed by the depth search that asked for it, `_channel_for_latency`,
        # which would otherwise time the original twice more and the result once more at every depth tried)
        if opts.target == "latency" and opts.method != "channel":
            feeds = _synthetic_feeds(model, self.count_shapes, batch=opts.latency_batch, seed=opts.seed)
            self.latency_before = model_latency(model, feeds, threads=opts.threads)
            self.total = self.latency_before
        self.graph = to_graph(model)
        self.bn_gamma = criteria.collect_bn_gamma(self.graph)
        self.report = run_passes(self.graph, [cleanup]).report
        self.report.facts.setdefault(DEFERRED, []).extend(deferred)
        held, holders = subgraph_weights(self.graph)
        if held and held >= SUBGRAPH_SHARE * (held + self.params_before):
            _warn_once(
                "subgraphs",
                f"warning: {held:,} parameters sit inside the bodies of {', '.join(holders[:3])}"
                f"{' ...' if len(holders) > 3 else ''} (If / Loop / Scan), which onnxprune does not prune (outside "
                f"them: {self.params_before:,})",
            )
        # the refit's targets: the original cleaned up alike (BN folded), so the layers left alone are the same
        self.reference = self.graph.copy() if self.fit is not None and opts.compensate else None
        for node in [n for n in self.graph.nodes if n.op in QUANTIZED]:  # no method touches them: say why
            self.report.skip(node, QUANTIZED_REASON)
        self.cleaned = CostModel(self.graph).count()[0 if opts.target == "params" else 1]
        total = self.total
        self.report.facts["ratio_free"] = 1 - self.cleaned / total if total else 0.0  # what folding alone removes
        self.pairs = find_basis_pairs(self.graph)

    def tensor_trains(self) -> None:
        """``method="tt"``: the eligible large layers written as tensor trains (`_tensor_trains`)."""
        refresh_shapes(self.graph)
        remove = self.opts.remove_ratio * self.total - (self.total - self.cleaned)
        self.ends = _tensor_trains(self.graph, self.report, remove=remove, exclude=self.opts.exclude)
        self.plans = self.report.counts["tensor_trains"]  # lookups too (they have no end to refit)
        self.report.facts["groups"] = 0  # no channel groups are looked for

    def finish(self, graph: gs.Graph, kept: dict | None) -> tuple[gs.Graph, Report]:
        """Merge back the splits that do not pay, clean up and refit: the pruned graph as it will be written."""
        opts, model = self.opts, self.model
        tail = run_passes(graph, [partial(merge_unprofitable, pairs=self.pairs, limits=self.limits), cleanup]).report
        if opts.tucker and self.pairs:  # more directions in the same weights (passes/tucker.py); the refit fits them
            tucker = partial(
                to_tucker, pairs=self.pairs, kept=kept, round_to=opts.round_to, keeps_speed=self._tucker_timing(graph)
            )
            tail.merge(run_passes(graph, [tucker]).report)
        if self.fit is None or not opts.compensate:
            return graph, tail
        refresh_shapes(graph)
        refit_pass = partial(
            refit,
            template=model,
            original=model,
            fit=self.fit,
            held=self.held,
            pairs=self.pairs,
            kept=kept,
            batch_size=opts.batch_size,
            seed=opts.seed,
            reference=self.reference,
            downstream=bool(kept),  # channel removal changed the inputs of every layer after it
        )
        tail.merge(run_passes(graph, [refit_pass]).report)
        if self.ends:
            refresh_shapes(graph)
            cores = partial(
                refit_tensor_trains,
                template=model,
                original=model,
                fit=self.fit,
                held=self.held,
                ends=self.ends,
                batch_size=opts.batch_size,
                reference=self.reference,
            )
            tail.merge(run_passes(graph, [cores]).report)
        return graph, tail

    def _tucker_timing(self, graph: gs.Graph) -> Callable | None:
        """Under a latency budget (`latency_batch`), whether a layer's Tucker-2 form runs no slower than its split.

        The plan was timed with the splits; a rewritten layer has one more kernel, and on a small model at batch 1
        that is what decides (handed digits at 0.9: the basis result 0.64x at batch 1 with every layer rewritten).
        None (not asked) for a plan made by parameters alone or with dims no timing resolves.
        """
        opts = self.opts
        if not opts.latency_batch:
            return None
        concrete = _concrete_at(graph, self.model, self.count_shapes, opts.latency_batch, opts.seed)
        if concrete is None:
            return None

        def keeps_speed(basis: gs.Node, shape: tuple[int, ...], r: int, t: int) -> bool:
            x_shape = concrete.get(basis.inputs[0].name)
            if x_shape is None or any(not isinstance(d, int) for d in x_shape):
                return True
            attrs = dict(basis.attrs)
            return tucker_no_slower(
                x_shape=list(x_shape), weight_shape=list(shape), attrs=attrs, rank=r, t=t, threads=opts.threads
            )

        return keeps_speed

    def evaluate(self, graph: gs.Graph, candidates: list, order: list[int]) -> tuple[int, dict[int, list[float]]]:
        """The candidate plan whose finished model agrees best with the original on held-out samples (`prune_one`).

        Candidates are finished in `order` while the next is expected to end within `SELECT_BUDGET_S`; with only one
        finished nothing is measured and it is returned.
        """
        done: dict[int, gs.Graph] = {}
        seen: set = set()
        started = time.perf_counter()
        for i in order:
            key = _plan_key(candidates[i].plan)
            if key in seen:
                continue
            spent = time.perf_counter() - started
            if done and spent * (len(done) + 1) / len(done) > SELECT_BUDGET_S:
                log.info("candidate plans: %d of %d taken to the end within %.0f s", len(done), len(order), spent)
                break
            seen.add(key)
            copy = graph.copy()
            removal = remove_channels(copy, plan=candidates[i].plan, analysis=find_channel_groups(copy))
            # the refit reads the original's tensors at the channels that stay after every stage so far
            kept = Report(facts={"kept": dict(self.report.facts.get("kept") or {})}).merge(removal.report)
            done[i], tail = self.finish(copy, kept.facts["kept"] or None)
            self.finished[_plan_key(kept.facts["kept"])] = (done[i], tail)
        if len(done) < 2:
            return order[0], {}
        data, scores = self.held, {}  # the refit fitted the others (see `prune_one`)
        for i, g in done.items():
            batch = self.opts.batch_size
            found = fidelity(self.model, to_model(g, self.model), data, batch_size=batch, label="candidate plans")
            scores[i] = [_worst(found)[0], min(f["cosine"] for f in found.values())]
        return max(scores, key=lambda i: tuple(scores[i])), scores

    def prune_stage(self, i: int, stage: str) -> None:
        """One stage of the method: split (basis, auto), statistics on the fit samples, allocation and removal."""
        opts, model, fit = self.opts, self.model, self.fit
        wanted = opts.remove_ratio * (DOUBLE_CHANNEL_SHARE if opts.method == "double" and i == 0 else 1.0)
        if i > 0:
            refresh_shapes(self.graph)
        if stage in ("basis", "auto"):
            covs = None
            if fit is not None and self.whiten:
                refresh_shapes(self.graph)
                eligible = whitenable(self.graph, opts.min_rank)
                covs = patch_covariances(
                    to_model(self.graph, model), fit, eligible, batch_size=opts.batch_size, seed=opts.seed
                )
            decompose = partial(decompose_basis, min_channels=opts.min_rank, covariances=covs)
            split = run_passes(self.graph, [decompose]).report
            self.pairs = self.pairs + split.facts.pop("pairs", [])
            self.report.merge(split)
            if opts.latency_batch:
                concrete = _concrete_at(self.graph, model, self.count_shapes, opts.latency_batch, opts.seed)
                timing = dict(batch=opts.latency_batch, threads=opts.threads, concrete=concrete)
                if stage == "basis":
                    self.curves = _latency_curves(self.graph, self.pairs, **timing)
                else:
                    self.limits.update(_latency_limits(self.graph, self.pairs, **timing))
        energy, pooled, covariances = {}, {}, {}
        if fit is not None:
            refresh_shapes(self.graph)
            found = find_channel_groups(self.graph)
            axes = criteria.energy_tensors(found)
            axes.update({p.mid: _mid_axis(self.graph, p) for p in self.pairs})
            if opts.channel_options and stage == "basis" and opts.target != "latency":  # what their errors read
                axes.update(criteria.consumer_inputs(self.graph, found))
            if stage == "channel" and _by_output_energy(found):  # heads and units, one knapsack
                axes.update(criteria.consumer_inputs(self.graph, found))
            options_read = opts.channel_options and stage == "basis" and opts.target != "latency"
            if self.criterion == "reconstruction" or options_read:  # (any stage: its scores read them)
                axes.update(criteria.consumer_inputs(self.graph, found))
                covariances = channel_covariances(
                    to_model(self.graph, model),
                    fit,
                    criteria.consumer_inputs(self.graph, found),
                    batch_size=opts.batch_size,
                    seed=opts.seed,
                )
            energy, pooled = channel_statistics(
                to_model(self.graph, model),
                fit,
                axes,
                pooled=self.criterion in criteria.LABEL_CRITERIA,
                batch_size=opts.batch_size,
            )
        self.plans += _hinted(opts.method, opts.latency_batch, _prune_stage, opts.target, calibrated=fit is not None)(
            self.graph,
            self.report,
            stage=stage,
            remove_ratio=wanted,
            target=opts.target,
            total=self.total,
            criterion=self.criterion,
            exclude=opts.exclude,
            bn_gamma=self.bn_gamma,
            pairs=self.pairs,
            energy=energy,
            pooled=pooled,
            labels=self.fit_labels,
            limits=self.limits,
            round_to=opts.round_to,
            curves=self.curves,
            probe=(
                partial(layer_sensitivity, template=model, data=fit, batch_size=opts.batch_size)
                if opts.sensitivity is True and stage != "basis"
                else None
            ),
            cut_probe=(
                partial(CutProbe, template=model, data=fit, batch_size=opts.batch_size)
                if opts.sensitivity is not False and fit is not None and stage == "basis"
                else None
            ),
            speed_check=(
                partial(
                    _speed_check,
                    template=model,
                    feeds=[
                        _synthetic_feeds(model, self.count_shapes, batch=b, seed=opts.seed)
                        for b in _timed_batches(model, opts.latency_batch)
                    ],
                    threads=opts.threads,
                )
                if opts.latency_batch and stage == "basis" and opts.target != "latency"
                else None
            ),
            seed=opts.seed,
            shapes=self.count_shapes if opts.target in ("flops", "latency") else None,
            template=model,
            rounds=opts.sensitivity_rounds,
            channel_options=opts.channel_options,
            evaluate=self.evaluate if fit is not None and stage == "basis" else None,
            covariances=covariances,
            timing_shapes=(
                _concrete_at(self.graph, model, self.count_shapes, opts.latency_batch, opts.seed)
                if stage == "channel" and opts.target == "latency"
                else None
            ),
            threads=opts.threads,
        )

    def finish_plan(self) -> None:
        """The plan chosen taken to the end (merge-back, clean-up, refit), unless `evaluate` already did."""
        self.report.facts["split_rank_limits"] = self.limits
        kept = self.report.facts.get("kept") or {}
        if self.fit is not None and self.opts.compensate:
            refresh_shapes(self.graph)
            few = _few_samples(self.graph, self.pairs, kept, len(self.fit))
            if few:
                self.report.facts.setdefault(DEFERRED, []).append(("few samples", few))
        key = _plan_key(kept)
        self.graph, tail = self.finished[key] if key in self.finished else self.finish(self.graph, kept or None)
        self.report.merge(tail)

    def measure(self) -> tuple[onnx.ModelProto, Report]:
        """The model written and its report: validation, fidelity (or drift on random inputs), counts, ratio check."""
        opts, model, report, held = self.opts, self.model, self.report, self.held
        out = to_model(self.graph, model)
        _validate_made(out)
        _name_output_nodes(report, model, out)
        if held is None:
            axes = batch_axes(model)
            draws = [_synthetic_feeds(model, self.count_shapes, batch=SYNTHETIC_SAMPLES, seed=opts.seed)]
            while draws[0] and sum(_samples_in(d, axes) for d in draws) < SYNTHETIC_SAMPLES:  # fixed batches
                draws.append(_synthetic_feeds(model, self.count_shapes, batch=1, seed=opts.seed + len(draws)))
            feeds = {  # a per-run input (no samples) keeps its one value
                k: draws[0][k] if axes[k] is None else np.concatenate([d[k] for d in draws], axis=axes[k])
                for k in draws[0]
            }
            drift = fidelity(model, out, feeds, batch_size=opts.batch_size, label="drift on random inputs")
            # a fixed batch dim keeps its size; beside a symbolic dim it is no batch (a Gemm's [features, N]): runs
            inputs = model_inputs(model).items()
            feature_major = any(
                axes[k] is not None and d and d[axes[k]] is not None and d[axes[k]] > 1 and None in d
                for k, (d, _) in inputs
            )
            report.facts["synthetic_drift"] = {
                "samples": len(draws) if feature_major or not feeds else _samples_in(feeds, axes),
                "cosine": min(d["cosine"] for d in drift.values()),
                "relative_error": max(d["relative_error"] for d in drift.values()),
            }
        if held is not None and len(held):
            truth = None if opts.labels is None else opts.labels[held.index]
            report.facts["fidelity"] = fidelity(model, out, held, labels=truth, batch_size=opts.batch_size)
            report.facts["fidelity_samples"] = len(held)
            report.facts.update(self.split_facts)
        params_before, macs_before = self.params_before, self.macs_before
        params_after, macs_after = count(out, shapes=self.count_shapes)
        if self.count_shapes is None:  # a symbolic dim nothing resolves: no true MAC count
            macs_before = macs_after = None
        report.facts["macs_shape"] = self.count_shapes
        report.facts["macs_shape_source"] = self.shape_source
        if opts.target == "params":
            ratio_achieved = 1 - params_after / params_before
        else:
            ratio_achieved = 1 - macs_after / macs_before
        if self.latency_before is not None:
            feeds = _synthetic_feeds(model, self.count_shapes, batch=opts.latency_batch, seed=opts.seed)
            before, after = (model_latency(m, feeds, threads=opts.threads) for m in (model, out))
            ratio_achieved = 1 - after / before
            report.facts["latency"] = {"batch": opts.latency_batch, "before_s": before, "after_s": after}
        trains = report.counts.get("tensor_trains", 0)
        if opts.method == "tt" and trains and opts.latency_batch and self.count_shapes is not None:  # time them
            report.facts["speed_check"] = _speed_of(
                model, out, self.count_shapes, latency_batch=opts.latency_batch, seed=opts.seed, threads=opts.threads
            )
        report.facts.update(
            {
                "params_before": params_before,
                "params_after": params_after,
                "macs_before": macs_before,
                "macs_after": macs_after,
                "ratio_achieved": ratio_achieved,
                "params_removed": 1 - params_after / params_before if params_before else 0.0,
                "macs_removed": None if macs_before is None else 1 - macs_after / macs_before if macs_before else 0.0,
                "ratio_requested": opts.remove_ratio,
                "target": opts.target,
                "method": opts.method,
                "criterion": self.criterion,
                "groups_pruned": self.plans,
                "seconds": time.perf_counter() - self.start,
            }
        )
        report.facts.setdefault("blocked", {})
        report.facts.pop("kept", None)
        _check_ratio(report, method=opts.method, latency_batch=opts.latency_batch, round_to=opts.round_to)
        return out, report


def _tensor_trains(
    graph: gs.Graph,
    report: Report,
    *,
    remove: float,
    exclude: Sequence[str],
) -> list[TrainEnd]:
    """``method="tt"``: write the eligible large layers as tensor trains that remove `remove` weights (in place).

    The bonds are allocated over all layers by relative error per weight saved (``passes.tt.allocate_bonds``); the
    refit of the last cores (``calibration.refit.refit_tensor_trains``) is the data-aware step. (Taking each TT of
    W diag(rms of its inputs) instead was measured on the trained VGG-FC: no better, benchmarks/README.md.)

    Returns:
        The ends of the trains written, for the last-core refit.

    Raises:
        BudgetError: The eligible layers cannot remove `remove` weights even at bond dimension 1.
    """
    wanted = int(np.ceil(max(0.0, remove)))
    layers, found = tt_layers(graph, remove=wanted)
    report.merge(found)
    for layer in [t for t in layers if any(fnmatch.fnmatch(t.node, pat) for pat in exclude)]:
        report.skip(layer.node, "excluded (--exclude)")
        layers.remove(layer)
    if not layers:
        raise BudgetError(
            f"no layer can be written as a tensor train (Gemm/MatMul with a constant weight, or Gather of a table, "
            f"of at least {TT_MIN_WEIGHTS:,} weights whose sizes factor); use --method basis or channel"
        )
    try:
        ranks = allocate_bonds(layers, wanted)
    except BudgetError as e:
        dense = "; ".join(f"{s.node}: {s.reason}" for s in found.skipped[:3])
        raise BudgetError(f"{e}" + (f" (left dense: {dense})" if dense else "")) from None
    made = run_passes(graph, [partial(decompose_tt, layers=layers, ranks=ranks)]).report
    ends = [
        TrainEnd(made.layers[t.node]["last_core"], made.layers[t.node]["output"], t.linear.bias)
        for t in layers
        if t.node in made.layers and made.layers[t.node]["last_core"]
    ]
    for entry in made.layers.values():  # the refit's handles, not part of the report
        entry.pop("last_core", None)
        entry.pop("output", None)
    report.merge(made)
    return ends


def _best_of(
    model: onnx.ModelProto, *, remove_ratio: float, target: str, max_drop: float, holds_only: bool = False, **options
) -> tuple[onnx.ModelProto, Report]:
    """``method="best"`` (see `prune`): the basis result, and when it measures slower the rounded channel results.

    With `holds_only` (the guard's bisection, which asks only whether the result written at a ratio would keep the
    floor, ``1 - max_drop``): the first result that keeps it (for a latency target: that keeps it and saves the time
    asked) is returned, the others not made. The result
    written is chosen among those that keep the floor whenever one does (`_choice_pool`), so the answer is the same;
    whole-model timing was 440 of the 1020 s a refusal of PP-OCRv6's recogniser took (main run and trials).
    """
    started = time.perf_counter()
    calib, latency_batch = options.get("calib"), options.get("latency_batch", 0)
    widths = tuple(dict.fromkeys((simd_width(), 8)))  # channel results' rounding: the vector width, else 8
    if target == "latency" and options.get("round_to", 1) > 1:  # the user's width; the basis result rounds too
        widths = (options["round_to"],)
    compared = calib is not None and latency_batch and (options.get("round_to", 1) <= 1 or target == "latency")
    unreachable: BudgetError | None = None
    out = report = None
    for width in (*widths, 1) if compared and options.get("round_to", 1) <= 1 else (options.get("round_to", 1),):
        # ranks at multiples of the vector width where that reaches the request, else free: onnxruntime runs a CNN
        # in its blocked NCHWc layout, and a split layer whose rank is not a multiple of the block leaves it (reorders
        # before and after), which the per-layer timings, made on one layer alone, do not see. Chars ResNet-20 at
        # 0.7, ranks free: 1.10x / 1.22x at batch 1 / 32, 11 reorders in the optimised graph; rounded to 8: 1.31x /
        # 1.44x, one reorder as in the original; 98.67 / 98.71 % test accuracy (handed digits ResNet-20: 1.08x /
        # 1.29x against 1.06x / 1.39x, 99.44 % both; session 22)
        try:
            out, report = _basis_or_joint(
                model, remove_ratio=remove_ratio, target=target, method="basis", **{**options, "round_to": width}
            )
        except BudgetError as e:  # a finer rounding, or channel removal, may still get there
            log.info("basis (ranks rounded to %d): %s", width, e)
            unreachable = e
            continue
        if width > 1:
            report.facts["round_to"] = width
        unreachable = None
        break
    if out is None and not compared:
        raise unreachable
    if not compared:
        return out, report
    seed, batch_size, threads = options.get("seed", 0), options.get("batch_size", 32), options.get("threads", 0)
    calib = as_samples(calib, model)
    data = split_calibration(model, calib, seed=seed, batch_size=batch_size)[1]  # the refit fitted the others
    count_shapes, _ = choose_shapes(model, given=options.get("shapes"), data=calib)
    feeds = {b: _synthetic_feeds(model, count_shapes, batch=b, seed=seed) for b in _timed_batches(model, latency_batch)}
    at = latency_batch if latency_batch in feeds else next(iter(feeds))  # a fixed batch is timed at that batch

    def measured(candidate: onnx.ModelProto, facts: dict, speed: dict | None = None) -> dict:
        """The row of one result: its speed (`speed` when already timed) and its agreement on held-out samples."""
        found = fidelity(model, candidate, data, batch_size=batch_size, label=f"alternative: {facts['method']}")
        return {
            **(speed or timed(candidate, facts)),
            "held_agreement": _worst(found)[0],
            "held_measure": _worst(found)[1],
            "held_cosine": min(f["cosine"] for f in found.values()),
            "held_samples": len(data),
            "held_outputs": len(found),
        }

    def timed(candidate: onnx.ModelProto, facts: dict) -> dict:
        return {
            "method": facts["method"],
            "round_to": facts.get("round_to", 1),
            "sensitivity": "sensitivity" in facts,
            **({"edge": True} if facts.get("latency_edge") else {}),
            "params_removed": facts["params_removed"],
            "threads": threads,
            "speed_check": _pooled_speed(
                {b: compare_latency(model, candidate, f, threads=threads) for b, f in feeds.items()},
                facts.get("speed_check") or {},
            ),
            "written": False,
        }

    keeps = lambda found: "fidelity" in found.facts and _agreement(found)[0] >= 1.0 - max_drop  # noqa: E731
    if holds_only and target != "latency" and out is not None and keeps(report):
        return out, report
    results, rows = ([(out, report)], [timed(out, report.facts)]) if out is not None else ([], [])

    def compared() -> None:
        """With more than one result, the basis result's agreement too (one written unchallenged is not measured)."""
        if len(rows) > 1 and "held_agreement" not in rows[0]:
            rows[0] = measured(results[0][0], results[0][1].facts, rows[0])

    def saved(row: dict) -> float:
        """The share of the original's time at `latency_batch` that the result saves."""
        before, after = row["speed_check"][at]
        return 1.0 - after / before

    if target == "latency":
        by = _latency_by(count_shapes, options)
        if holds_only and rows and saved(rows[0]) >= remove_ratio - RATIO_TOLERANCE and keeps(report):
            return out, report  # the guard's trial (as below): the result written would keep the floor
        if not rows or saved(rows[0]) < remove_ratio - RATIO_TOLERANCE:  # basis fell short: channels, as deep as needed
            for width in widths:
                made, reached = len(rows), False
                # as for a parameter target: with and without measured sensitivity, each searched for its own depth
                # (chars ResNet-20 at 0.5, session 28: made at the depth the search without it found, 64.9 % test
                # accuracy forced; searched for, 95.7 % at 2.14x)
                given = options.get("sensitivity")
                for sensitivity in [given] if given is not None else [None, True]:
                    found, done, others = _channel_for_latency(
                        model,
                        remove_ratio,
                        {**options, "round_to": width, "sensitivity": sensitivity},
                        feeds[at],
                        threads,
                        by=by,
                    )
                    reached = reached or done
                    # the search's other depths that saved the time asked too: timed again below with the others,
                    # each is written only if it still saves enough and agrees best
                    for made_here in [found, *others] if found is not None else []:
                        made_here[1].facts["round_to"] = width
                        results.append(made_here)
                        rows.append(measured(made_here[0], made_here[1].facts))
                        if (
                            holds_only
                            and saved(rows[-1]) >= remove_ratio - RATIO_TOLERANCE
                            and _holds(rows[-1:], max_drop)
                        ):
                            return made_here  # the guard's trial: one that saves the time and holds answers it
                if reached and _holds(rows[made:], max_drop):  # else a finer rounding may save the time and keep it
                    break
        if not rows:
            raise unreachable
        compared()
        if len(rows) > 1:  # a more faithful result short of the time asked is timed again, longer, before it loses
            short = lambda row: [at] if saved(row) < remove_ratio - RATIO_TOLERANCE else []  # noqa: E731
            _confirm_slower(rows, results, model, feeds, threads, short)
        enough = [i for i, row in enumerate(rows) if saved(row) >= remove_ratio - RATIO_TOLERANCE]
        best = _latency_pick(rows, enough, max_drop) if enough else max(range(len(rows)), key=lambda i: saved(rows[i]))
        if len(rows) == 1:  # written unchallenged: say why no other result was made
            rows[0]["unchallenged"] = "it saves the time asked" if enough else "no channel result was found"
        rows[best]["written"] = True
        out, report = results[best]
        report.facts["alternatives"] = rows
        if unreachable is not None:  # the summary says why no basis result is compared
            report.facts["basis_not_made"] = unreachable.head
        _latency_facts(report, remove_ratio, latency_batch, rows[best]["speed_check"], bool(enough), started)
        return out, report
    given = options.get("sensitivity")
    # skipped only when the basis result took long to make (each channel result costs a run of its own: a light
    # ResNet-50 about twice the time), is clearly faster and is already faithful on the held-out samples (its own
    # fidelity, measured on them). A clearly faster one that lost some fidelity can lose to a channel result (chars
    # MobileNetV2 at 0.7, session 22: basis 1.14x / 1.15x, 97.67 % test accuracy, written alone; the channel result
    # made 98.25 %), and a faithful one to a faster channel result as faithful (handed digits ResNet-20 at 0.7: basis
    # 1.14x / 1.30x written alone, channel 1.58x / 1.91x before, both 99.44 %)
    clear = (
        bool(rows)
        and report.facts.get("seconds", 0.0) > CLEAR_AFTER_S
        and all(before >= after * CLEAR_SPEEDUP for before, after in rows[0]["speed_check"].values())
        and _faithful_enough(report.facts.get("fidelity") or {})
    )
    channel_errors: list[BudgetError] = []
    for width in dict.fromkeys((simd_width(), 8)) if not clear else ():
        # with and without measured layer sensitivity, as neither wins everywhere (digits ResNet-20 at 0.9, seeds
        # 0/1/2: 93.6 / 93.3 / 96.9 % without, 97.5 / 97.5 / 93.9 % with); the vector width, else 8 where 16
        # cannot reach
        try:
            found = [
                prune_one(
                    model,
                    remove_ratio=remove_ratio,
                    target=target,
                    method="channel",
                    **{**options, "round_to": width, "sensitivity": sensitivity},
                )
                for sensitivity in ([given] if given is not None else [None, True])
            ]
        except BudgetError as e:
            log.info("channel removal rounded to %d: %s", width, e)
            channel_errors.append(e)
            continue
        reached = [
            f
            for f in found
            if remove_ratio - RATIO_TOLERANCE <= f[1].facts["ratio_achieved"] <= remove_ratio + RATIO_FAR
        ]
        made = len(rows)
        for candidate, facts in reached:
            facts.facts["round_to"] = width
            if holds_only and keeps(facts):
                return candidate, facts
            results.append((candidate, facts))
            rows.append(measured(candidate, facts.facts))
        if reached and _holds(rows[made:], max_drop):  # else the finer rounding too (rounded to 16 on a narrow net)
            break
    if not rows:  # neither way reaches the request
        raise _neither(unreachable, channel_errors, latency_batch)
    if unreachable is None and not options.get("channel_options") and _slower(rows[0]["speed_check"]):
        # the basis result measured slower: ranks and whole channels in one knapsack (`_basis_or_joint`'s second
        # try), where a layer can lose channels rather than split into two smaller ops (chars ResNet-20 at 0.9,
        # batch 1: basis 0.79x at 0.971 held-out agreement, 97.25 % test accuracy; ranks beside channels 1.03x / 1.37x
        # at 0.951, 92.83 %; every channel result under 0.70)
        try:
            joint = prune_one(
                model,
                remove_ratio=remove_ratio,
                target=target,
                method="basis",
                **{**options, "round_to": report.facts.get("round_to", 1), "channel_options": True},
            )
        except BudgetError as e:
            log.info("basis with whole channels beside the ranks: %s", e)
        else:
            joint[1].facts["channel_options"] = "the basis result measured slower: whole channels were offered too"
            if holds_only and keeps(joint[1]):
                return joint
            results.append(joint)
            rows.append({**measured(joint[0], joint[1].facts), "channel_options": True})
    compared()
    if len(rows) == 1 and unreachable is None and not clear:  # the basis result alone: does it keep the floor?
        row = measured(results[0][0], results[0][1].facts, rows[0])
        fails = not _holds([row], max_drop)
        rows[0] = row if fails else rows[0]  # one that holds is written unchallenged, as before
    else:
        fails = len(rows) > 1 and unreachable is None and not _holds(rows, max_drop)
    if fails:
        # none keeps the guard's floor: the basis result planned by parameters alone too, whatever its speed (chars
        # ResNet-20 at 0.9, session 23: the basis plan under a latency budget agreed on 5.9 % of the held-out
        # samples in one run and 94 % in another, the channel results on 60 and 75 %; PP-OCRv4's recogniser at 0.3,
        # session 24, no channel result made: 3 % of the held-out strings read the same under the latency budget,
        # where every layer that measured no faster stayed whole and the CTC head took rank 16 of 120; 31 % planned
        # by parameters)
        try:
            free = _basis_or_joint(
                model, remove_ratio=remove_ratio, target=target, method="basis", **{**options, "latency_batch": 0}
            )
        except BudgetError as e:
            log.info("basis planned by parameters alone: %s", e)
        else:
            free[1].facts["speed_free"] = True
            if holds_only and keeps(free[1]):
                return free
            results.append(free)
            rows.append({**measured(free[0], free[1].facts), "speed_free": True})
    if len(rows) == 1:  # written unchallenged: say why no other result was made
        rows[0]["unchallenged"] = "clearly faster" if clear else "no channel result reached the request"
    _confirm_slower(rows, results, model, feeds, threads)
    pool = _choice_pool(rows, max_drop)
    best = max(_most_faithful(rows, pool), key=lambda i: (_speedup(rows[i]), rows[i].get("held_cosine", 0.0)))
    rows[best]["written"] = True
    out, report = results[best]
    report.facts["speed_check"] = rows[best]["speed_check"]  # the written model's own timing, refitted and cleaned
    report.facts["alternatives"] = rows
    if unreachable is not None:  # the summary says why no basis result is compared
        report.facts["basis_not_made"] = unreachable.head
    report.facts["seconds"] = time.perf_counter() - started
    return out, report


LATENCY_UNITS = {"flops": "MACs", "params": "parameters", "latency": "matrix layers' measured time"}


def _latency_facts(
    report: Report, remove_ratio: float, latency_batch: int, speed: dict, enough: bool, started: float
) -> None:
    """The facts of a result written for ``target="latency"``.

    The measured share of the time it saves at `latency_batch` (`speed`: batch -> (original, result) seconds) and,
    when it saves too little (not `enough`), why (``ratio_note``).
    """
    before, after = speed[latency_batch] if latency_batch in speed else next(iter(speed.values()))
    report.facts.pop("ratio_planned", None)  # a share of what the channel allocation counted, not of the time
    depth, of = report.facts.pop("latency_depth", None), report.facts.pop("latency_by", None)
    fast = report.facts.pop("latency_fast", False)
    report.facts.pop("latency_saved", None)
    report.facts.pop("latency_edge", None)
    latency = {"batch": latency_batch, "before_s": before, "after_s": after}
    report.facts.update(
        {
            "target": "latency",
            "ratio_requested": remove_ratio,
            "ratio_achieved": 1.0 - after / before,
            "latency": latency if depth is None else {**latency, "depth": depth, "depth_of": of},
            "speed_check": speed,
            "seconds": time.perf_counter() - started,
        }
    )
    report.facts.pop("ratio_note", None)
    if not enough:  # written all the same: the fastest result found, and the summary says how far it fell short
        unit = LATENCY_UNITS.get(of, "parameters")
        if depth is None:
            tried = "no channel removal was made"
        elif fast:  # the search's own timing passed it; this one did not
            tried = f"channel removal at {depth:.2f} of the {unit}, timed fast enough while searching: timings vary"
        else:
            tried = f"the deepest channel removal reachable, {depth:.2f} of the {unit}, was tried"
        report.facts["ratio_note"] = (
            f"--target latency --ratio {remove_ratio:g}: no result found saves that much of the time at batch "
            f"{latency_batch}; the fastest found saves {1.0 - after / before:.3f} ({before / after:.2f}x) and is "
            f"written ({tried})"
        )
    elif 1.0 - after / before > remove_ratio + RATIO_TOLERANCE:  # faster than asked: harmless, but said
        saved = 1.0 - after / before
        unit = LATENCY_UNITS.get(of, "parameters")
        report.facts["ratio_note"] = (
            f"--target latency --ratio {remove_ratio:g}: the result written saves {saved:.3f} of the time at batch "
            f"{latency_batch} ({100 * (saved - remove_ratio):.1f} points more than asked): the depth is searched in "
            f"steps of the {unit} removed, each depth timed, and timings vary from one check to the next"
        )


def _channel_latency(model: onnx.ModelProto, *, remove_ratio: float, **options) -> tuple[onnx.ModelProto, Report]:
    """``method="channel", target="latency"``: whole channels removed as deep as `remove_ratio` of the time needs.

    The time is measured at `latency_batch` on this machine (`_channel_for_latency`: a search on the share removed
    of the matrix layers' measured time, of the MACs or parameters without calibration data (`_latency_by`), each
    result timed against the original); channel counts are rounded to `round_to` when it is over 1, else to the
    processor's vector width, then 8 where that does not save the time, as ``method="best"`` rounds them. Whether
    the result saves enough is judged by a timing of its own at `latency_batch` and 32 (``ratio_note`` when it
    falls short).

    Raises:
        OnnxPruneError: The options do not fit (`Options.check`: no latency batch, no --calib for a criterion...).
        BudgetError: No channel removal could be made at any depth tried.
    """
    started = time.perf_counter()
    calib = options.get("calib")
    samples = as_samples(calib, model) if calib is not None else None
    given = {k: v for k, v in options.items() if k != "calib"}
    opts = Options(remove_ratio=remove_ratio, target="latency", method="channel", **given)
    opts.check(model, samples)
    count_shapes, _ = choose_shapes(model, given=opts.shapes, data=samples)
    feeds = _synthetic_feeds(model, count_shapes, batch=opts.latency_batch, seed=opts.seed)
    by = _latency_by(count_shapes, options)
    found = None
    for width in (opts.round_to,) if opts.round_to > 1 else dict.fromkeys((simd_width(), 8)):
        made, reached, _ = _channel_for_latency(
            model, remove_ratio, {**options, "round_to": width}, feeds, opts.threads, by=by
        )
        if made is not None:  # one that saves the time asked, else the fastest of the widths
            made[1].facts["round_to"] = width
            if found is None or reached or made[1].facts["latency_saved"] > found[1].facts["latency_saved"]:
                found = made
        if reached:  # a finer rounding when the vector width's counts cannot save it (16 channels stay 16)
            break
    if found is None:
        unit = LATENCY_UNITS.get(by, "parameters")
        raise BudgetError(
            f"--target latency --ratio {remove_ratio:g}: no channel removal could be made (tried "
            f"{', '.join(f'{d:.2f}' for d in LATENCY_DEPTHS)} of the {unit}, then the most the groups allow); "
            "--method basis"
        )
    out, report = found
    speed = _speed_of(model, out, count_shapes, latency_batch=opts.latency_batch, seed=opts.seed, threads=opts.threads)
    before, after = speed[opts.latency_batch] if opts.latency_batch in speed else next(iter(speed.values()))
    enough = 1.0 - after / before >= remove_ratio - RATIO_TOLERANCE  # as timed now, not as the search timed it
    _latency_facts(report, remove_ratio, opts.latency_batch, speed, enough, started)
    report.facts["method"] = "channel"
    return out, report


def _latency_by(count_shapes: dict | None, options: dict) -> str:
    """What the channel allocation of a latency search removes a share of (`_channel_for_latency`'s `by`).

    The matrix layers' measured time ("latency", ``budget.LatencyModel``) where the knapsack allocates (calibration
    data, the default criterion) at concrete shapes; else the MACs, which time follows only roughly (chars
    ResNet-20 at batch 32, session 29: removing 75 % of the MACs saved 48 % of the time, 80 % saved 47 %); else the
    parameters.
    """
    if count_shapes is None:
        return "params"
    calibrated = options.get("calib") is not None
    criterion = options.get("criterion") or default_criterion("channel", calibrated=calibrated)
    return "latency" if calibrated and criterion == "reconstruction" else "flops"


CONFIRM_SECONDS = 2.0  # per model: the longer timing of a more faithful result before "slower" turns it down


def _slow_batches(row: dict) -> list[int]:
    """The batches at which a result measured slower than the original (by more than `SPEED_MARGIN`)."""
    return [b for b, (before, after) in row["speed_check"].items() if after > before * (1 + SPEED_MARGIN)]


def _confirm_slower(
    rows: list[dict],
    results: list,
    model: onnx.ModelProto,
    feeds: dict,
    threads: int,
    short: Callable[[dict], list[int]] = _slow_batches,
) -> None:
    """Time again, longer, the most faithful result when "slower" would turn it down for a less faithful one.

    A check of `COMPARE_SECONDS` per model does not time a sub-millisecond model within 10 % on 2 cores: the chars
    ResNet-20's basis result (1.000 on fit samples against 0.984 for the channel result written) was timed 1.11x the
    original's time at batch 1 by this check, and timed alone in its own process it was not slower (0.528-0.544 ms
    against 0.544-0.586 ms, 2 000 runs each; session 19). Only the batches it fell short at (`short`: by default
    those it measured slower at; under a latency target, the batch whose time it did not save enough of) are timed
    again, `CONFIRM_SECONDS` per model, and that timing replaces the short ones (``speed_confirmed`` in its row).
    Nothing happens when the most faithful result is not short, or when every result is.
    """
    fine = [i for i, row in enumerate(rows) if not short(row)]
    faithful = _most_faithful(rows, range(len(rows)))
    if not fine or any(i in fine for i in faithful):
        return
    top = max(faithful, key=lambda i: rows[i].get("held_cosine", 0.0))
    check = rows[top]["speed_check"]
    for b in short(rows[top]):
        check[b] = compare_latency(model, results[top][0], feeds[b], threads=threads, seconds=CONFIRM_SECONDS)
    rows[top]["speed_confirmed"] = True
    log.info("the most faithful result timed again: %s", _times(check))


def _pooled_speed(timed: dict, earlier: dict) -> dict:
    """{batch: (original, result) seconds}: `timed`, averaged with an `earlier` check of the same plan if made.

    A plan made under the latency budget is the loosest that measured no slower, so it sits at the edge of
    `SPEED_MARGIN`; one more check of it alone says "slower" about half the time from noise (handed digits ResNet-20
    at batch 1: the original's own median moved from 0.27 to 0.47 ms within one run on 2 cores). Both checks time
    the same shapes (the refit changes no shape), so their mean is the better estimate.
    """
    return {
        b: tuple((x + y) / 2 for x, y in zip(pair, earlier[b], strict=True)) if earlier.get(b) else tuple(pair)
        for b, pair in timed.items()
    }


def _timed_batches(model: onnx.ModelProto, latency_batch: int) -> list[int]:
    """The batch sizes a finished model is timed at: `latency_batch` and 32, or the batch the model fixes."""
    fixed = fixed_batch(model)
    return [fixed] if fixed else sorted({latency_batch, 32})


def _neither(basis: BudgetError, channel: list[BudgetError], latency_batch: int) -> BudgetError:
    """The refusal of --method best when neither way reaches the request, in one line.

    Both limits, and no suggestion of a method just tried (a new user was sent to --method channel where it reached
    6.7 %).
    """
    if not channel:
        return basis
    reach = [e.reachable for e in channel if e.reachable is not None]
    said = f"at most {max(reach):.3f}" if reach else "not that much either"
    head = f"{basis.head}; channel removal, tried as well, reaches {said}"
    nothing = max([*reach, basis.reachable or 0.0]) <= 0.0  # no ratio helps (e.g. a quantized model)
    tail = "" if nothing else "; lower --ratio" + (" or --latency-batch 0" if latency_batch else "")
    blocked = {k: v for err in (basis, *channel) for k, v in err.blocked.items()}
    return BudgetError(head + tail, reachable=max([*reach, basis.reachable or 0.0]), head=head, blocked=blocked)


CLEAR_SPEEDUP = 1.10  # method best: a basis result this much faster at every batch compared is written unchallenged
CLEAR_AFTER_S = 60.0  # ... when making it took longer than this (seconds)
CLEAR_INFIDELITY = 0.01  # ... and whose held-out agreement is full and 1 - cosine at most this (`_faithful_enough`)


def _choice_pool(rows: list[dict], max_drop: float) -> list[int]:
    """The `best` rows (parameter target) the written result is chosen from (by `_most_faithful`, then speed).

    Those measured no slower that keep the guard's floor; when none is both, those that keep it whatever their
    speed, else all: fidelity before speed, as a faster result that the guard refuses is no model at all (chars
    ResNet-20 at 0.9, session 23: the channel results no slower agreed on 60 and 75 % of the held-out samples,
    the basis result, 0.81x at batch 1, on 94 %; the channel one at 75 % was written with --force, 75.38 % test
    accuracy).
    """
    faster = [i for i, row in enumerate(rows) if not _slower(row["speed_check"])]
    holding = [i for i, row in enumerate(rows) if _holds([row], max_drop)]
    return [i for i in faster if i in holding] or holding or list(range(len(rows)))


def _latency_pick(rows: list[dict], enough: list[int], max_drop: float) -> int:
    """The `best` row written for a latency target, of the rows `enough` (those that save the time asked).

    Of the most faithful (`_most_faithful`) among those that keep the guard's floor (else among all), the one of
    highest held-out cosine, then the fastest: each saves the time asked, and what one saves beyond it is not worth
    fidelity (handed digits ResNet-20 at 0.5 of the time, session 29: 1.98x at cosine 0.954 was written beside 1.97x
    at 0.976, 97.50 % test accuracy). As `_choice_pool` for a parameter target, a result within a held-out sample of
    the most faithful can fall under the floor (chars ResNet-20 at 0.5 of the time: 0.941 at 2.16x was chosen, and
    refused, beside one at 0.951 and 2.06x).
    """
    holding = [i for i in enough if _holds([rows[i]], max_drop)]
    return max(
        _most_faithful(rows, holding or enough), key=lambda i: (rows[i].get("held_cosine", 0.0), _speedup(rows[i]))
    )


def _holds(rows: list[dict], max_drop: float) -> bool:
    """Whether one of the `best` rows keeps the guard's floor, ``1 - max_drop``, on its held-out samples.

    Channel counts rounded to the vector width are tried first; when none of those results holds, counts rounded to
    8 are made too and compared beside them: on a processor with 16-float vectors, rounding to 16 leaves a narrow
    net's 16-wide layers whole. No measured case has changed by it yet: `--target latency --ratio 0.5` on the chars
    ResNet-20 (stages of 16, 32 and 64 channels) could not save half the time at batch 32 rounded to 16, and rounded
    to 8 (leaving onnxruntime's 16-wide blocked layout) it took 89.8 % of the parameters, refused by the guard at
    about 71-74 % test accuracy (session 23).
    """
    return any(row.get("held_agreement", 0.0) >= 1.0 - max_drop for row in rows)


def _faithful_enough(fidelity: dict[str, dict[str, float]]) -> bool:
    """Whether a clearly faster basis result is faithful enough to be written without channel results beside it.

    Every held-out sample agrees (for outputs that are not class scores: the cosine alone counts) and 1 - cosine is
    at most `CLEAR_INFIDELITY` on every output: little is left for another result to win on fidelity.
    """
    if not fidelity:
        return False
    value, measure = _worst(fidelity)
    cosine = min(f["cosine"] for f in fidelity.values())
    return cosine >= 1.0 - CLEAR_INFIDELITY and (measure == "cosine" or value >= 1.0)


AGREEMENT_SLACK = 1  # results whose held-out samples disagreeing with the original are at most this many more than
# the best's tie on agreement (`_most_faithful`)...
COSINE_SLACK = 2.0  # ... and of those, the ones whose 1 - cosine is within this factor of the least are as faithful


def _most_faithful(rows: list[dict], pool) -> list[int]:
    """Of the results `pool` (indices into `rows`), those as faithful as the best: `_best_of` writes the fastest.

    Faithful: held-out agreement within `AGREEMENT_SLACK` samples of the best (exactly the best where the row does
    not say on how many samples, or for outputs measured by cosine alone), then 1 - cosine (on the same samples)
    within `COSINE_SLACK` times the least among those, or at most `CLEAR_INFIDELITY` (faithful enough to be written
    alone: handed digits ResNet-20 at 0.7, basis 0.9976 and channel 0.9933 both made 99.44 %). Top-1 agreement on a
    hundred held-out samples resolves one sample, and one sample misleads: the chars MobileNetV2 at 0.7 (session 22)
    had its basis result agree on 102 of 102 at cosine 0.973 (97.67 % test accuracy) and its channel result on 101
    at cosine 0.982 (98.25 %); the chars ResNet-20 tied at 100 of 102 for its basis result (cosine 0.996; 98.75 %)
    and a channel result (cosine 0.956; 96.33 %). Differences under 2x in 1 - cosine did not order the test accuracy
    (handed digits ResNet-20 at 0.9: 0.951 basis, 98.33 %; 0.958 channel, 97.50 %), so between those the speed
    decides.
    """
    pool = list(pool)
    wrong = {i: _disagreeing(rows[i]) for i in pool}
    if all(n is not None for n in wrong.values()):
        fewest = min(wrong.values())
        near = [i for i in pool if wrong[i] <= fewest + AGREEMENT_SLACK]
    else:
        agreement = {i: round(rows[i].get("held_agreement", 0.0), 9) for i in pool}
        near = [i for i in pool if agreement[i] == max(agreement.values())]
    least = min(1.0 - rows[i].get("held_cosine", 0.0) for i in near)
    bound = max(COSINE_SLACK * least, CLEAR_INFIDELITY)
    return [i for i in near if 1.0 - rows[i].get("held_cosine", 0.0) <= bound]


def _disagreeing(row: dict) -> int | None:
    """Held-out samples on which a result's top-1 (or decoded sequence) differs from the original's; None unknown."""
    n = row.get("held_samples")
    if not n or row.get("held_measure") == "cosine" or "held_agreement" not in row:
        return None
    return round((1.0 - row["held_agreement"]) * n)


def _speedup(row: dict) -> float:
    """Geometric mean over the batches compared of the original's time over the result's."""
    return float(np.exp(np.mean([np.log(before / after) for before, after in row["speed_check"].values()])))


LATENCY_STEPS = 4  # --target latency, channel results: search steps on the share removed (time, MACs or parameters)
LATENCY_SAFEGUARD = 0.15  # ...each step at least this share of the bracket from either end
LATENCY_DEPTHS = (0.95, 0.85, 0.7)  # ...below the first of these shares that can be removed (else the most that can)
# the search keeps a depth only when it measures this much more than asked: it keeps the shallowest that passes, which
# passes partly by luck, and the final check times it again (handed digits case at 0.5: 0.74 of the MACs passed the
# search, then measured 0.462 of the time saved where 0.85 measured 0.55)
LATENCY_SEARCH_MARGIN = 0.02
LATENCY_OTHERS = 3  # ...and compares up to this many more of its depths that saved the time asked (within a point)


def _channel_for_latency(
    model: onnx.ModelProto,
    remove_ratio: float,
    options: dict,
    feeds: dict[str, np.ndarray],
    threads: int,
    *,
    by: str = "flops",
) -> tuple[tuple[onnx.ModelProto, Report] | None, bool, tuple[onnx.ModelProto, Report] | None]:
    """Channel removal saving `remove_ratio` of the measured time on `feeds`, at the least ratio of `by` that does.

    The deepest reachable of `LATENCY_DEPTHS` first: when it does not save enough nothing shallower is tried; else
    `LATENCY_STEPS` steps of a safeguarded secant search on the ratio of `by` below it (the next depth where the
    line through the nearest depths on either side saves the time asked, kept at least `LATENCY_SAFEGUARD` of the
    bracket from its ends), each result timed against the original (`compare_latency`). `by` is what the channel
    allocation removes (`_latency_by`): "latency" (the matrix layers' measured time), "flops" (multiply-accumulates)
    or "params". Plain bisection from 0 landed 0.05 of the MACs past the depth needed, and each point of depth is
    fidelity (chars ResNet-20 at 0.5 of the time, batch 32: 75 % of the MACs saved 0.476 of the time at 95.1 %
    held-out agreement; the search kept 85 %, 0.552 of the time at 60.8 %).

    Returns:
        (result, reached, others): the least deep result that saves `LATENCY_SEARCH_MARGIN` more than asked, with
        True; when the deepest saves the time asked but not the margin (time levels off with depth), the least
        deep that saves as much as it did, with False; when the deepest saves less, it alone, with False; (None,
        False, []) when no depth could be reached at all. `others`: up to `LATENCY_OTHERS` more results of the
        search that saved the time asked within `RATIO_TOLERANCE`, nearest in depth to `result` first, for a caller
        that times and compares results again (``latency_edge`` in their facts). The results' facts say the depth
        made at (``latency_depth``, of ``latency_by``), the share of the time this search measured it save
        (``latency_saved``) and whether that cleared the margin (``latency_fast``); `_latency_facts` takes them into
        the written report. When every depth listed is out of reach (counts rounded to 16 on a small model), the
        most the refusals say the groups can give is tried.
    """
    reachable: list[float] = []
    goal = remove_ratio + LATENCY_SEARCH_MARGIN
    made: list[tuple[float, float, tuple[onnx.ModelProto, Report]]] = []  # (depth, share saved, result)

    def attempt(ratio: float) -> float | None:
        """The share of the time the result at `ratio` saves (None: out of reach)."""
        try:
            found = prune_one(model, remove_ratio=ratio, target=by, method="channel", **options)
        except BudgetError as err:
            if err.reachable is not None:
                reachable.append(err.reachable)
            return None
        before, after = compare_latency(model, found[0], feeds, threads=threads)
        saved = 1 - after / before
        log.info("channel removal at %.3f of the %s saves %.3f of the time", ratio, by, saved)
        found[1].facts.update(
            {"latency_depth": ratio, "latency_by": by, "latency_saved": saved, "latency_fast": saved >= goal}
        )
        made.append((ratio, saved, found))
        return saved

    for deepest in LATENCY_DEPTHS:
        saved = attempt(deepest)
        if saved is not None:
            break
    else:  # rounded counts can stop short of every depth listed: the most the refusals said is reachable
        deepest = max(reachable, default=0.0) - RATIO_TOLERANCE
        saved = attempt(deepest) if deepest > RATIO_TOLERANCE else None
        if saved is None:
            return None, False, None
    if saved < remove_ratio - RATIO_TOLERANCE:
        return made[-1][2], False, []
    # the deepest saved the time asked but maybe not the margin (the time saved levels off with depth: chars
    # ResNet-20 at batch 32, 0.7 of the layers' time saved 0.517 where 0.57 saved 0.509): the search then aims at
    # what the deepest saved, as shallower depths that save as much keep more
    aim = min(goal, saved)
    (lo, lo_saved), (hi, hi_saved) = (0.0, 0.0), (deepest, saved)
    for _ in range(LATENCY_STEPS):
        span = hi - lo
        guess = lo + (aim - lo_saved) * span / max(hi_saved - lo_saved, 1e-9)
        mid = min(max(guess, lo + LATENCY_SAFEGUARD * span), hi - LATENCY_SAFEGUARD * span)
        saved = attempt(mid)
        if saved is None or saved < aim:
            lo, lo_saved = mid, max(lo_saved, saved or 0.0)
        else:
            hi, hi_saved = mid, saved
    best = min((m for m in made if m[1] >= aim), key=lambda m: m[0])
    # the other depths that saved the time asked (within a point): fidelity is not monotone in the depth (chars
    # ResNet-20 at 0.5 of the time, counts rounded to 8, with sensitivity: 0.55 of the layers' time agreed on 0.980
    # of the held-out samples, 0.6 on 0.892), so the nearest to the search's pick are compared too
    others = sorted(
        (m for m in made if m is not best and m[1] >= remove_ratio - RATIO_TOLERANCE),
        key=lambda m: abs(m[0] - best[0]),
    )[:LATENCY_OTHERS]
    for m in others:
        m[2][1].facts["latency_edge"] = True
    return best[2], best[1] >= goal, [m[2] for m in others]


MAX_DROP = 0.05  # default guard: held-out top-1 agreement may fall by at most this (cosine, for other outputs)
# bisection steps when the guard fails: the ratio halved until one holds, then the share kept (1 - ratio) bisected in
# log scale. Halving alone refused the handed digits at 0.95 with "about 0.83" (0.475, 0.71, 0.83 tried) where 0.93
# held: after 0.475 holds, kept shares 52.5 % and 5 % give 0.84, then 0.91.
GUARD_STEPS = 3
GUARD_MAX_STEPS = 6  # ...and more steps, up to this many, while they are cheap: the whole search projected within
GUARD_CHEAP_S = 30.0  # this many seconds (a channel prune of the handed digits: 2-4 s a try; named 0.84 where 0.90
# held after three steps, a new user found)
RATIO_TOLERANCE = 0.01  # the achieved ratio lands within 1 point of the request...
RATIO_FAR = 0.03  # ...or the report says why; beyond 3 points nothing is written (BudgetError, exit 2)


def _alternatives(
    method: str, latency_batch: int, *, lower: bool = True, target: str = "params", calibrated: bool = True
) -> str:
    """What else to try after a refusal: never the method just used (nor an untimed run for a latency target)."""
    options = ["lower --ratio"] if lower else []
    if target == "latency":  # best, basis and channel take it; best tries channel removal only with --calib
        options += ["--method channel"] if method != "channel" else ["--method basis"]
        if not calibrated and method != "channel":
            options.append("--calib (--method best then tries channel removal too)")
    else:
        options += [f"--method {m}" for m in ("channel", "basis") if m != method]
        if latency_batch and method != "channel":
            options.append("--latency-batch 0")
    return ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]


def _hinted(
    method: str, latency_batch: int, fn: Callable, target: str = "params", *, calibrated: bool = True
) -> Callable:
    """`fn`, whose BudgetError ends with suggestions that fit this run (not the method it already uses)."""

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BudgetError as err:
            head = str(err).split("; lower --ratio")[0]
            reach = err.reachable
            if target == "latency" and reach is not None:  # the share is of measured time; below 0 is slower
                head = (
                    f"--target latency --ratio {kwargs.get('remove_ratio', 0.0):g} cannot be reached by keeping "
                    f"fewer bases at batch {latency_batch}: "
                    + (
                        f"the split layers, timed one by one, save at most about {reach:.3f} of the model's time "
                        "(layer timings vary between runs)"
                        if reach > 0
                        else "splitting makes this model slower (the fastest plan, timed layer by layer, takes "
                        + (f"{1 - reach:.2f}x" if reach > -9 else "over 10x")
                        + " the original's time; layer timings vary between runs)"
                    )
                )
            report = args[1] if len(args) > 1 else kwargs.get("report")
            whole = report.counts.get("shared_left_whole", 0) if report is not None else 0
            if whole:
                head += f"; {whole} layers whose weight is shared by several nodes were left whole, not split"
            if reach is not None and reach <= 0 and report is not None and report.skipped:  # nothing to try
                by: dict[str, list[str]] = {}
                for skip in report.skipped:
                    by.setdefault(skip.reason, []).append(skip.node)
                left = "; ".join(
                    f"{names[0]}: {why}"
                    if len(names) == 1
                    else f"{len(names)} layers ({', '.join(names[:2])}, ...): {why}"
                    for why, names in list(by.items())[:3]
                )
                raise BudgetError(
                    f"{head}; left whole: {left}", reachable=reach, head=f"{head}; left whole: {left}"
                ) from err
            lower = "would be met" not in head  # the request was too low for the latency constraint, not too high
            lower = lower and not (target == "latency" and reach is not None and reach <= 0)
            hints = _alternatives(method, latency_batch, lower=lower, target=target, calibrated=calibrated)
            raise BudgetError(
                f"{head}; {hints}",
                reachable=err.reachable,
                head=head,
                blocked=err.blocked or (report.facts.get("blocked") if report is not None else None),
            ) from err

    return call


EXACT_TRAIN = 1e-4  # relative weight error of a tensor train below which it stands for the layer exactly


def _check_ratio(report: Report, *, method: str, latency_batch: int, round_to: int) -> None:
    """Within 1 point of the request, or say why in one line; far from it, refuse (nothing is written).

    With --round-to the overshoot of one rounding step is documented, so it is only noted; so is that of layers
    written in Tucker-2 form (each at most its split's weights).
    """
    facts = report.facts
    requested, achieved = facts["ratio_requested"], facts["ratio_achieved"]
    off = achieved - requested
    if abs(off) <= RATIO_TOLERANCE:
        return
    planned, free = facts.get("ratio_planned"), facts.get("ratio_free")
    trains = [v["relative_error"] for v in report.layers.values() if v.get("op") == "tensor-train"]
    if off > 0 and trains and max(trains) <= EXACT_TRAIN:  # low-rank weights: their exact trains save that much
        facts["ratio_note"] = (
            f"--ratio {requested:g}: reached {achieved:.3f} of the {facts['target']}: the tensor trains are exact "
            f"(weight error at most {max(trains):.1e}) at bond dimensions that already remove that much"
        )
        return
    if off > 0 and free is not None and free >= requested - RATIO_TOLERANCE and achieved - free <= RATIO_TOLERANCE:
        facts["ratio_note"] = (
            f"--ratio {requested:g}: reached {achieved:.3f} of the {facts['target']}: folding BatchNorm and "
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
    if off > 0 and facts.get("layer_latency"):
        why = (
            "the layers kept split must be cut this deep for the model to stay no slower than the original "
            "(--latency-batch 0 decides by parameters alone)"
        )
    if method == "tt" and off > 0:
        why = "a tensor train is cut at least as deep as doing no more MACs than its dense layer"
    if round_to > 1 and off > 0:
        counts = {"channel": "channel counts", "basis": "ranks"}.get(method, "channel counts and ranks")
        why = (
            f"{counts} are rounded to multiples of {round_to} (--round-to; --method best rounds its results to "
            "the processor's vector width, 8 or 16, which onnxruntime's kernels run fastest)"
        )
    tucker = report.counts.get("tucker", 0)
    if tucker and off > 0:  # each takes at most the weights of its split, in whole steps of t
        why += (
            f"; {tucker} split layer{'s' if tucker > 1 else ''} written in Tucker-2 form, which keeps more "
            "directions in no more weights than the split (--no-tucker keeps the splits)"
        )
    line = (
        f"--ratio {requested:g}: reached {achieved:.3f} of the {facts['target']} "
        f"({100 * abs(off):.1f} points {'over' if off > 0 else 'under'}): {why}"
    )
    if facts["target"] == "latency":  # a measured figure: the prediction is what was planned, the rest is noise
        why = f"the allocation planned {planned or 0.0:.3f} from per-layer timings; the model measured {achieved:.3f}"
        line = f"--ratio {requested:g} of the latency: {why}"
    elif abs(off) > RATIO_FAR and method == "tt" and off > 0:  # a lower ratio cuts no less: no ratio advice
        raise BudgetError(
            f"{line}; nothing written; --method basis splits these layers at the rank the request needs",
            blocked=facts.get("blocked"),
        )
    elif abs(off) > RATIO_FAR and not ((round_to > 1 or tucker) and off > 0):
        raise BudgetError(
            f"{line}; nothing written; {_alternatives(method, latency_batch)}", blocked=facts.get("blocked")
        )
    facts["ratio_note"] = line  # printed in the summary and written to the JSON report
    log.debug("%s", line)


@_outermost_call
def prune_guarded(
    model: onnx.ModelProto, *, remove_ratio: float, max_drop: float = MAX_DROP, force: bool = False, **options
) -> tuple[onnx.ModelProto, Report]:
    """`prune`, then refuse a result the held-out samples measure as broken (DESIGN §5).

    With calibration data, the pruned model's held-out top-1 agreement with the original (cosine similarity for
    outputs that are not class scores) must stay at or above ``1 - max_drop``. When it does not, the largest ratio
    that holds is found by bisection and `GuardError` says both; with `force` the result is returned anyway (the
    report's ``guard`` entry records the failure). Without calibration data nothing is checked here (`prune` reports
    the drift on synthetic inputs).

    Args:
        model: The model to prune (not modified).
        remove_ratio: Fraction of the target quantity to remove, in [0, 1).
        max_drop: Largest allowed fall of held-out agreement, in [0, 1).
        force: Return a result that fails the check instead of raising.
        **options: Passed to `prune`.

    Returns:
        (pruned model, report); the report's ``guard`` fact holds the floor, the measured agreement and whether it held.

    Raises:
        OnnxPruneError: Invalid options (see `prune`).
        GuardError: The result fails the check and `force` is off.
    """
    if not 0.0 <= max_drop < 1.0:
        raise OnnxPruneError(f"--max-drop must be in [0, 1), got {max_drop}")
    started = time.perf_counter()
    options = {**options, "max_drop": max_drop}  # `best` prefers the results that keep the floor
    out, report = prune(model, remove_ratio=remove_ratio, **options)
    if options.get("calib") is None or "fidelity" not in report.facts:
        return out, report
    floor = 1.0 - max_drop
    measured, what = _agreement(report)
    report.facts["guard"] = {"max_drop": max_drop, "floor": floor, "measured": measured, "measure": what}
    report.facts["guard"]["held"] = measured >= floor
    if measured >= floor:
        return out, report
    retry_rounds = (
        report.facts.get("method") == "basis"
        and options.get("sensitivity") is not False
        and len(report.facts.get("candidates") or []) < 2  # else the one-round plan was already compared
    )
    if retry_rounds and options.get("sensitivity_rounds", 2) > 1:
        # the allocation at a deep cut is sensitive to how it was weighed: one round of measured weights is the
        # other candidate (digits ResNet-20 at 0.9: 66 % with two rounds, 98 % with one; at 0.8 99 % against 85 %)
        retry, retried = prune(model, remove_ratio=remove_ratio, **{**options, "sensitivity_rounds": 1})
        value, _ = _agreement(retried)
        log.info("held-out %s %.3f; with one sensitivity round %.3f", what, measured, value)
        retried.facts["seconds"] = time.perf_counter() - started  # both attempts: what the user waited
        if value > measured:
            out, report, measured = retry, retried, value
            report.facts["guard"] = {"max_drop": max_drop, "floor": floor, "measured": measured, "measure": what}
            report.facts["guard"]["held"] = measured >= floor
            report.facts["guard"]["sensitivity_rounds"] = 1
            if measured >= floor:
                return out, report
    report.facts["seconds"] = time.perf_counter() - started
    if force:
        log.warning(
            "held-out %s %.3f is below %.3f (--max-drop %g); written anyway because of --force",
            what,
            measured,
            floor,
            max_drop,
        )
        return out, report
    lo, hi, best, tried, rows = 0.0, remove_ratio, None, [], []
    searching = time.perf_counter()
    for step in range(GUARD_MAX_STEPS):
        spent = time.perf_counter() - searching
        if step >= GUARD_STEPS and (
            best is None or hi - lo <= RATIO_TOLERANCE or spent * (step + 1) / step > GUARD_CHEAP_S
        ):
            break
        mid = (lo + hi) / 2 if best is None else 1.0 - float(np.sqrt((1.0 - lo) * (1.0 - hi)))  # (GUARD_STEPS)
        try:
            _, trial = prune(model, remove_ratio=mid, holds_only=True, **options)
        except BudgetError as e:  # out of reach, or (tensor trains) cut too far past it
            hi = mid
            why = str(e).split(";")[0].removeprefix(f"--ratio {mid:g}").lstrip(": ")
            why = why.split("): ")[0] + ")" if "): " in why else why  # what it reached, not the whole story
            why = why.replace(" (", ", ").replace(")", "")  # one level of parentheses in the line
            tried.append(f"{mid:.2f} not made ({why})")
            rows.append({"ratio": mid, "measured": None, "not_made": why})
            continue
        value, _ = _agreement(trial)
        tried.append(f"{mid:.2f}: {value:.3f}")
        rows.append({"ratio": mid, "measured": value})
        if value >= floor:
            lo, best = mid, value
        else:
            hi = mid
    unit = f" of the latency at batch {options.get('latency_batch', 1)}" if options.get("target") == "latency" else ""
    holds = (
        f"the largest ratio{unit} that holds is about {lo:.2f} ({what} {best:.3f})"
        if best is not None
        else f"no ratio tried holds ({what} at {', '.join(tried)})"
    )
    report.facts["seconds"] = time.perf_counter() - started
    report.facts["guard"]["largest_ratio_that_holds"] = lo if best is not None else None
    report.facts["guard"]["tried"] = rows
    samples = report.facts.get("fidelity_samples")
    on = f" (on {samples} sample{'s' if samples != 1 else ''})" if samples and samples < FEW_HELD_OUT else ""
    if on and what != "cosine":  # a new user could not tell whether to lower the ratio or give more samples
        on = f" (on {samples} samples, each {1 / samples:.3f} of it: give --calib more samples for a firmer check)"
    judged = ""
    for row in report.facts.get("alternatives", []):  # nothing is written: the report must not say otherwise
        if row["written"]:
            row["written"] = False
            others = len(report.facts["alternatives"]) - 1
            judged = f" of the {row['method']} result (chosen among {others + 1} made)" if others else ""
    raise GuardError(
        f"at --ratio {remove_ratio:g} the held-out {what}{judged}{on} with the original is {measured:.3f}, below "
        f"{floor:.3f} (--max-drop {max_drop:g}); {holds}; nothing written (--force writes it anyway)",
        report,
    )


SUBGRAPH_SHARE = 0.05  # weights inside If / Loop / Scan bodies past this share of the model's are said to stay
FEW_HELD_OUT = 50  # fewer held-out samples than this: the summary and a guard refusal say how many they rest on
SPEED_MARGIN = 0.02  # a result whose model measures this much slower than the original is "slower" (method best)
# the latency budget's search must measure this much faster: it keeps the loosest plan that passes, so that plan
# passes partly by luck (judged with SPEED_MARGIN, edge plans measured slower again in about half the checks: handed
# digits ResNet-20 at 0.9, 1.04-1.05x pooled at batch 1). Single checks of a plan not searched for (the first plan
# by error, a better candidate) use SPEED_MARGIN: with this margin there, a candidate that agreed 97.7 % on fit
# samples was turned down for one at 94.5 % (chars ResNet-20 at 0.9).
PLAN_MARGIN = -0.03


BUDGET_STEPS = 4  # bisection steps on the latency budget once the plan by error alone measured slower
BUDGET_SPAN = 2.0  # the loosest budget tried, as a multiple of the dense ops' summed latency


def _slower(measured: dict, margin: float = SPEED_MARGIN) -> bool:
    """Whether the planned model measured more than `margin` slower than the original at any batch compared."""
    return any(after > before * (1 + margin) for before, after in measured.values())


def _times(measured: dict) -> str:
    """'speed-up 0.87x at batch 1, 1.02x at batch 32': the original's time over the planned model's.

    A speed-up, as the summary's `chosen` line gives it (under 1: slower); a new user read a ratio of times beside
    it as one.
    """
    return "speed-up " + ", ".join(f"{before / after:.2f}x at batch {b}" for b, (before, after) in measured.items())


def _best_budgeted(
    first: tuple[int, Allocation, dict],
    others: dict[int, Callable],
    evaluate: Callable,
    graph: gs.Graph,
    report: Report,
) -> tuple[Allocation, dict]:
    """Of the plans made under one latency budget, the one whose finished model agrees best on held-out samples.

    `first` is (candidate, allocation, measured) that the budget search gave for the chosen candidate's sensitivity
    weights; `others` maps each other candidate to a callable running the same search with its weights (each plan
    gets its own budget: one candidate's budget and per-split overhead made another round's plan 82 % where its own
    made it 98 %), returning (allocation, measured); a plan is kept when it measures no slower than `PLAN_MARGIN`
    allows. Which weights make the best plan after the refit is not predicted well at a deep cut (handed digits
    ResNet-20 at 0.9: 68 % held-out agreement with the chosen weights, 98 % with the other round's), so each plan is
    taken to the end like the candidates planned without a budget (`_Run.evaluate`), and the report's
    ``candidates`` rows say so (``latency_budget``).

    Returns:
        (allocation, measured speeds) of the plan written.
    """
    found, keys = [first], {_plan_key(first[1].plan)}
    for candidate, make in others.items():
        try:
            allocation, measured = make()
        except BudgetError:
            continue
        if _plan_key(allocation.plan) in keys:
            continue
        if not _slower(measured, PLAN_MARGIN):
            keys.add(_plan_key(allocation.plan))
            found.append((candidate, allocation, measured))
    if len(found) < 2:
        return first[1], first[2]
    best, agreement = evaluate(graph, [a for _, a, _ in found], list(range(len(found))))
    report.facts["candidates"] = [
        {
            "candidate": found[i][0],
            "held_agreement": v[0],
            "held_cosine": v[1],
            "written": i == best,
            "latency_budget": True,
        }
        for i, v in sorted(agreement.items())
    ]
    return found[best][1], found[best][2]


def _per_position(model: onnx.ModelProto) -> bool:
    """Whether an output holds class scores per position of a sequence ([T, N, C] or [N, T, C]), not per sample."""
    ranks = {
        o.name: len(o.type.tensor_type.shape.dim) for o in model.graph.output if o.type.tensor_type.HasField("shape")
    }
    return any(ranks.get(name, 0) >= 3 for name in sequence_outputs(model))


def _candidate(k: int, n: int) -> str:
    """A plan among the sensitivity rounds' `n`, numbered as the report's ``candidates`` rows are (from 0)."""
    how = "planned by predictions alone" if k == 0 else f"after {k} round{'s' if k > 1 else ''} of measured sensitivity"
    return f"candidate {k} of {n}, {how}"


def _loosest_budget_not_slower(plan: Callable, budget: float, measure: Callable, *, overhead_span: float):
    """(plan, its measured speeds) under the loosest summed-layer-latency budget whose whole model measures no slower.

    Per-layer micro-benchmarks do not add up to the model's latency (fusions, threading, caches, one more kernel
    launch per split layer), so the budget is only a knob: the strict plan (the dense ops' summed latency) first;
    when it measures no slower, bisection between it and `BUDGET_SPAN` times that for the loosest that still does.
    When it measures slower, the layers' sum misses what each split costs the whole model: bisection on an overhead
    added to every split option's latency, between none and `overhead_span` seconds, for the least that measures no
    slower (at the strict budget, a larger overhead keeps fewer layers split). Each candidate is timed as a whole
    model; when nothing tried measures no slower the strict plan is returned (the caller says so).

    Args:
        plan: (budget seconds, overhead seconds per split layer) -> Allocation; raises BudgetError when unreachable.
        budget: The dense ops' summed latency, seconds.
        measure: Allocation -> {batch: (original, planned) seconds}.
        overhead_span: The largest per-split overhead tried, seconds.
    """
    strict = plan(budget)
    strict_measured = measure(strict)
    if _slower(strict_measured, PLAN_MARGIN):
        found = _bisect_no_slower(lambda o: plan(budget, o), measure, 0.0, overhead_span, None, larger_is_faster=True)
        return found or (strict, strict_measured)
    return _bisect_no_slower(
        lambda s: plan(budget * s), measure, 1.0, BUDGET_SPAN, (strict, strict_measured), larger_is_faster=False
    )


def _bisect_no_slower(make: Callable, measure: Callable, lo: float, hi: float, found, *, larger_is_faster: bool):
    """`BUDGET_STEPS` bisection steps on the knob of `make` for the value nearest the slower side still no slower.

    A knob value `make` cannot plan at (BudgetError) is too large. Returns the last (allocation, measured) found no
    slower, else `found`. Where a larger value is faster, the largest is timed first: when even it measures slower,
    no value is faster and the search stops there (a three-layer MLP, whose split layers all cost more than they save
    at batch 1, spent 16 of its 17 s timing plans, and a guard's retries five times that).
    """
    if larger_is_faster:
        try:
            trial = make(hi)
        except BudgetError:
            trial = None
        if trial is not None:
            measured = measure(trial)
            if _slower(measured, PLAN_MARGIN):
                return found
            found = (trial, measured)  # no slower: what the search falls back to if no smaller value is
    for _ in range(BUDGET_STEPS):
        mid = (lo + hi) / 2
        try:
            trial = make(mid)
        except BudgetError:
            hi = mid
            continue
        measured = measure(trial)
        slower = _slower(measured, PLAN_MARGIN)
        lo, hi = (mid, hi) if slower == larger_is_faster else (lo, mid)
        if not slower:
            found = (trial, measured)
    return found


def _with_overhead(curves: dict | None, overhead: float) -> dict | None:
    """Layer latency curves (`_latency_curves`) with `overhead` seconds added to every split option."""
    if not curves or not overhead:
        return curves
    return {mid: (dense, {r: t + overhead for r, t in split.items()}) for mid, (dense, split) in curves.items()}


def _speed_check(graph: gs.Graph, plan: dict, pairs: list, *, template, feeds: list, threads: int) -> dict:
    """Measured (original, planned) median seconds per batch size: the plan applied to a copy, merged back as written.

    The weights are not yet refitted, which changes no shape and so no latency.
    """
    probe = graph.copy()  # nodes and tensors copied, weight arrays shared: the passes below never write into them
    remove_channels(probe, plan=plan, analysis=find_channel_groups(probe))
    merge_unprofitable(probe, pairs=pairs)
    cleanup(probe, fold_bn=False)
    planned = to_model(probe, template)
    found = {}
    for batch_feeds in feeds:
        batch = _samples_in(batch_feeds, batch_axes(template))
        found[batch] = compare_latency(template, planned, batch_feeds, threads=threads)
    return found


ORT_REASON_CHARS = 240  # onnxruntime's reason in a one-line refusal: a Reshape's shapes come last (cut at 160)


def _runs_at_default_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]] | None, *, seed: int) -> None:
    """Run `model` once on random inputs at `shapes`, chosen by default for its symbolic dims (`choose_shapes`).

    With `shapes` None the random inputs take 8 for each symbolic dim (as the drift check without --calib does).
    Timing and the drift check run the model at these shapes; a model that takes only some sizes (PP-OCRv4's
    recogniser: height 48, its neck concatenates along the height; at 224 x 224 "Non concat axis dimensions must
    match", which ended in exit 3) is refused here in one line that names the option to give.

    Raises:
        OnnxPruneError: onnxruntime cannot run the model at `shapes`.
    """
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # the reason goes into the one line below, not onto the terminal as well
    feeds, runner = _synthetic_feeds(model, shapes, batch=1, seed=seed), session(model)
    shapes = {name: list(x.shape) for name, x in feeds.items()}
    try:
        runner.run(None, feeds, quiet)
    except Exception as err:  # onnxruntime's Fail / InvalidArgument / RuntimeException, whatever the op
        text = str(err) or type(err).__name__
        node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
        said = re.sub(r"^\S+\.(h|cc|cpp):\d+ .*?\) ", "", text.split("Status Message: ")[-1]).strip()
        said = said if len(said) <= ORT_REASON_CHARS else said[: ORT_REASON_CHARS - 3].rstrip() + "..."
        said = (f"{node[1]} '{node[2]}': " if node else "") + said
        raise OnnxPruneError(
            f"the model does not run at {format_shapes(shapes)}, the default for its symbolic dims (onnxruntime: "
            f"{said}); give --shape {next(iter(shapes))}:... with a size it takes, or --calib samples"
        ) from err


def _synthetic_feeds(model: onnx.ModelProto, shapes: dict | None, *, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Normal random inputs of `batch` samples at the counting `shapes` (a fixed batch dim is kept)."""
    feeds = random_feeds(model, batch=batch, seed=seed)
    rng = np.random.default_rng(seed)
    axes = batch_axes(model)
    for name, dims in (shapes or {}).items():
        if name in feeds and feeds[name].ndim == len(dims) and feeds[name].ndim > 1 and axes[name] is not None:
            shape = list(dims)
            shape[axes[name]] = feeds[name].shape[axes[name]]
            feeds[name] = rng.standard_normal(shape).astype(feeds[name].dtype)
    return feeds


def _samples_in(feeds: dict[str, np.ndarray], axes: dict[str, int]) -> int:
    """How many samples a feed holds: the size of the batch axis (`batch_axes`) of its first input that has one."""
    for name, value in feeds.items():
        if axes.get(name, 0) is not None and value.ndim:
            return int(value.shape[axes.get(name, 0)])
    return 1


def default_criterion(method: str, *, calibrated: bool) -> str:
    """The criterion used when none is given.

    With calibration data: reconstruction for --method channel (session 28, test accuracy with --method channel
    --force, cmi -> reconstruction: chars ResNet-20 at 0.8 87.0 -> 94.5 %, at 0.9 52.7 -> 67.9 %, VGG at 0.9
    97.6 -> 98.3 %, MobileNetV2 at 0.8 55.5 -> 98.8 %, handed digits ResNet-20 at 0.95 45.8 -> 68.9 %); cmi for
    auto (suite's ResNet-20 at 0.7: 97.5 % vs 76.5 with energy); energy for double (97.6 vs 95.5 with cmi) and for
    basis, whose bases score by s_k^2 E[z_k^2] whatever the criterion. Without, and for tt: l2.
    """
    if not calibrated or method == "tt":  # a train's bonds fall by the weights' relative error
        return "l2"
    if method == "channel":
        return "reconstruction"
    return "cmi" if method == "auto" else "energy"


def _agreement(report: Report) -> tuple[float, str]:
    """The worst held-out top-1 agreement over the classifier-like outputs, else the worst cosine: (value, name)."""
    return _worst(report.facts["fidelity"])


def _worst(fidelity: dict[str, dict[str, float]]) -> tuple[float, str]:
    """The worst agreement over the class-score outputs of `fidelity`, else the worst cosine: (value, name).

    Agreement is top-1 per sample for classifiers, the whole decoded sequence per sample for per-position class
    scores (a CTC recogniser: 97.9 % of its frames agreed where 64 % of the strings read the same).
    """
    fids = list(fidelity.values())
    found = [(f[key], name) for f in fids for key, name in AGREEMENTS.items() if key in f]
    if found:
        return min(found)
    return min(f["cosine"] for f in fids), "cosine"


AGREEMENTS = {"top1_agreement": "top-1 agreement", "sequence_agreement": "sequence agreement"}


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
    curves: dict | None = None,
    probe: Callable | None = None,
    cut_probe: Callable | None = None,
    speed_check: Callable | None = None,
    seed: int = 0,
    shapes: dict[str, list[int]] | None = None,
    template: onnx.ModelProto | None = None,
    rounds: int = 2,
    channel_options: bool = False,
    evaluate: Callable | None = None,
    covariances: dict[str, np.ndarray] | None = None,
    timing_shapes: dict[str, list] | None = None,
    threads: int = 0,
) -> int:
    """One allocation + removal on `graph` (in place); returns the number of groups it shrank.

    With input `shapes` (and the `template` to export with), MACs are counted at those concrete dims. A channel
    stage with ``target="latency"`` removes `remove_ratio` of the matrix layers' time as measured at
    `timing_shapes` (every tensor's dims at the latency batch) with `threads` threads (``budget.LatencyModel``),
    by the knapsack over its groups; without calibration statistics (no knapsack), of the MACs.
    """
    analysis = find_channel_groups(graph)
    basis_groups = {
        g.name for g in analysis.groups if len(g.producers) == 1 and g.producers[0] in {p.basis for p in pairs}
    }
    protected_by_user = {
        g.name
        for g in analysis.groups
        if any(fnmatch.fnmatch(_original_name(p), pat) for p in g.producers for pat in exclude)
    }
    protected = set(protected_by_user)
    if stage == "channel":
        protected |= basis_groups
    elif stage == "basis":
        protected |= {g.name for g in analysis.groups} - basis_groups
    blocked = report.facts.setdefault("blocked", {})
    for group in analysis.groups:  # named by the model's own layers, not the split's basis/scaling ops
        shown = "+".join(dict.fromkeys(_original_name(part) for part in group.name.split("+")))
        if group.blocked and len(group.blocked) == len(group.classes):
            blocked[shown] = next(iter(group.blocked.values()))
        elif any(fnmatch.fnmatch(_original_name(p), pat) for p in group.producers for pat in exclude):
            blocked[shown] = "excluded by --exclude"
    report.facts["groups"] = len(analysis.groups)
    heads = sum(len(g.classes) for g in analysis.groups if g.unit == "head")
    if heads:
        report.facts["attention_heads"] = int(heads)
    if remove_ratio <= 0:
        return 0
    concrete = concrete_shapes(to_model(graph, template), shapes) if shapes and template is not None else None
    cost = CostModel(graph, analysis, pairs, limits, shapes=concrete)
    context = criteria.Context(
        graph, analysis, bn_gamma, pairs, energy, pooled, labels, seed=seed, covariances=covariances or {}
    )
    scores = criteria.importance(criterion, context)
    # (graphs with attention heads keep the knapsack by output energy measured on the ViT and the text encoder:
    # a head has no curve, and units' errors after the refit would sit beside heads' errors without it)
    by_curves = stage == "channel" and criterion == "reconstruction" and not _by_output_energy(analysis)
    reconstruction = criteria.reconstruction_curves(context) if by_curves else {}
    knapsack = stage == "channel" and (_by_output_energy(analysis) or reconstruction) and energy
    if stage == "channel" and target == "latency":  # the layers' measured time where the knapsack takes it
        timing = LatencyModel(graph, analysis, timing_shapes, threads=threads) if knapsack and timing_shapes else None
        if timing is not None and timing.layers:
            cost.timing = timing
            total = cost.count()[2]
        else:  # no layer could be timed (no concrete shape reached them): the MACs, which time follows roughly
            target, total = "flops", cost.count()[1]
    if reconstruction:
        pass  # the criterion's scores: the curves' steps, and consumer energy for the groups without one
    elif knapsack:  # heads and units ranked by what they feed the layers reading them (the probes remove those first)
        scores = criteria.consumer_energy(
            criteria.Context(graph, analysis, bn_gamma, pairs, energy, pooled, labels, seed=seed)
        )
        knapsack = bool(np.any(scores > 0))
    weights = None
    if probe is not None:
        local = criteria.consumer_energy(context) if reconstruction else None  # then weights of local errors
        probed = [g for g in analysis.groups if g.name not in protected]
        weights = probe(graph, groups=probed, scores=scores, local=local)
        report.facts.setdefault("sensitivity", {}).update(weights)
    if stage == "basis":
        index = 1 if target == "flops" else 0
        # whole channels beside the ranks: groups of one producer that a matrix op reads, measured on calibration data
        offered, option_curves = [], {}
        if channel_options and energy and target != "latency":
            saliency = criteria.consumer_energy(context)
            option_curves = criteria.reconstruction_curves(context) if covariances else {}
            offered = [
                g.name
                for g in analysis.groups
                if g.name not in protected_by_user and g.name not in basis_groups and len(g.producers) == 1
            ]

        knobs = {"split_overhead": 0.0}  # seconds added to every split option's measured latency

        def ranks_only(weights: dict | None, alive: np.ndarray | None = None) -> list:
            return rank_choices(
                analysis,
                cost,
                scores,
                target=target,
                protected=frozenset(protected),
                weights=weights,
                latencies=_with_overhead(curves, knobs["split_overhead"]),
                alive=alive,
                round_to=round_to,
            )

        def options(weights: dict | None, alive: np.ndarray | None = None, with_channels: bool = channel_options):
            ranks = ranks_only(weights, alive)
            if not offered or not with_channels:
                return ranks
            return ranks + channel_choices(
                analysis,
                cost,
                saliency,
                target=target,
                groups=offered,
                weights=weights,
                alive=alive,
                round_to=round_to,
                curves=option_curves,
            )

        def plan(weights: dict | None, seconds: float | None, with_channels: bool = channel_options):
            """The allocation of least predicted error.

            With channel options, costs are linear only around a state. The first plan is by ranks alone; each later
            one takes its costs at the plan before, keeps the whole channels that plan removes, and allocates the
            ranks again with those channels gone, where the rank costs are exact. Of the plans made, the one of least
            predicted error within a point of the request is kept.
            """

            def solve(choices: list, alive: np.ndarray | None):
                """The knapsack over `choices`, with what lies outside them counted at `alive`."""
                if target == "latency":
                    fixed = max(0.0, total - sum(float(c.latency[0]) for c in choices))
                else:
                    fixed = cost.count(alive)[index] - sum(float(c.cost[c.option_at(alive)]) for c in choices)
                return allocate_ranks(
                    analysis,
                    cost,
                    choices,
                    remove_ratio=remove_ratio,
                    total_before=total,
                    fixed=fixed,
                    latency_budget=seconds,
                )

            def ranks_at(alive: np.ndarray | None):
                allocation = solve(ranks_only(weights, alive), alive)
                if alive is not None:
                    allocation.alive &= alive
                    allocation.plan = _plan_of(analysis, allocation.alive)
                if target != "latency":
                    allocation.achieved = 1.0 - cost.count(allocation.alive)[index] / total if total else 0.0
                return allocation

            try:
                made = [ranks_at(None)]
            except BudgetError:  # ranks alone fall short (layers no split reaches): whole channels first
                if not (offered and with_channels):
                    raise
                seed = solve(options(weights, None, with_channels), None)
                if target != "latency":  # its count was linear around the unpruned state: the exact one ranks it
                    seed.achieved = 1.0 - cost.count(seed.alive)[index] / total if total else 0.0
                made = [seed]
            alive = made[0].alive
            for _ in range(LINEARIZE_STEPS if offered and with_channels else 0):
                choices = options(weights, alive, with_channels)
                try:
                    joint = solve(choices, alive)
                except BudgetError:
                    break
                channels = joint.alive.copy()  # the channel cuts of the joint plan, every basis kept
                for c in choices:
                    if c.kind == "rank":
                        channels[c.classes] = True
                try:
                    made.append(ranks_at(channels))
                except BudgetError:
                    break
                alive = made[-1].alive
            everything = options(weights, None, with_channels)
            scored = [(a, _predicted_error(everything, a.alive)) for a in made]
            for i, (a, e) in enumerate(scored):
                log.debug("plan %d: removes %.3f, predicted error %.4g", i, a.achieved, e)
            near = [m for m in scored if abs(m[0].achieved - remove_ratio) <= RATIO_TOLERANCE]
            if near:
                return min(near, key=lambda m: m[1])[0]
            return min(scored, key=lambda m: abs(m[0].achieved - remove_ratio))[0]

        choices = options(weights)
        budget = sum(float(c.latency[0]) for c in choices) if curves and target != "latency" else None
        # first by error alone; the whole model's measured speed decides below whether the per-layer budget is needed
        first_budget = None if speed_check is not None else budget
        allocation = plan(weights, first_budget)
        candidates, order, weights_of = [allocation], [0], [weights]
        if cut_probe is not None and allocation.plan:
            started = time.perf_counter()
            probe = cut_probe(graph, groups=[c.group for c in choices], passes=rounds * (len(choices) + 1))
            weights, weights_of = {}, [{}]
            for _ in range(rounds):  # measure at the planned cut, allocate again; the cut moves, again
                choices_now = options(weights)
                by_group = {c.group: c for c in choices_now}
                cuts = {  # the unweighted predicted error of each planned cut
                    g: (keep, _error_at(by_group[g], len(keep)) / weights.get(g, 1.0))
                    for g, keep in allocation.plan.items()
                    if g in by_group
                }
                found = _kind_weights(probe.ratios(cuts), {c.group: c.kind for c in choices_now})
                # damped: a layer measured again gets the geometric mean of its weights (one cut's measure is noisy)
                weights = {**weights, **{g: float(np.sqrt(weights.get(g, w) * w)) for g, w in found.items()}}
                allocation = plan(weights, first_budget)
                candidates.append(allocation)
                weights_of.append(weights)
            # predictions made the candidates; the measured output change of each whole cut orders them
            changes = [probe.change(a.plan) for a in candidates]
            order = [int(i) for i in np.argsort(changes, kind="stable")]
            report.facts["sensitivity"] = {
                "weights": weights,
                "probes": probe.probes,
                "samples": probe.samples,
                "rounds": rounds,
                "candidate_changes": changes,
                "seconds": time.perf_counter() - started,
            }
        chosen = order[0]
        timed = speed_check is not None and budget is not None
        measured = speed_check(graph, candidates[chosen].plan, pairs) if timed else None
        first_slower = timed and _slower(measured)
        allocation, source = None, f"candidate {chosen} of {len(candidates)}"
        note = ""
        if first_slower:  # under the summed layer latency, with the weights the chosen plan was made with

            def planned(seconds: float, overhead: float = 0.0, of: int = chosen) -> Allocation:
                knobs["split_overhead"] = overhead
                try:
                    return plan(weights_of[of], seconds)
                finally:
                    knobs["split_overhead"] = 0.0

            budgeted, budget_measured = _loosest_budget_not_slower(
                planned, budget, lambda a: speed_check(graph, a.plan, pairs), overhead_span=budget / len(curves)
            )
            report.facts["speed_check_budget"] = budgeted.latency
            if not _slower(budget_measured):
                allocation, measured, source = budgeted, budget_measured, "per-layer latency budget"
                if evaluate is not None and len(order) > 1:  # each other round's weights: own search
                    allocation, measured = _best_budgeted(
                        (chosen, budgeted, budget_measured),
                        {
                            i: partial(
                                _loosest_budget_not_slower,
                                partial(planned, of=i),
                                budget,
                                lambda a: speed_check(graph, a.plan, pairs),
                                overhead_span=budget / len(curves),
                            )
                            for i in order
                            if i != chosen
                        },
                        evaluate,
                        graph,
                        report,
                    )
                first = _candidate(chosen, len(candidates))
                report.facts["plan_note"] = (
                    f"per-layer latency budget: the plan of least predicted error ({first}) measured slower than "
                    "the original as a whole model, so the plan was made again under the layers' measured latency "
                    "(with a cost per split layer, found by timing the whole model, where their sum alone still "
                    "measured slower)"
                )
            else:  # the budget buys no speed here, only error: the plan of best fidelity is written, and said slower
                report.facts["speed_check_strictest"] = budget_measured
                slow = [str(b) for b, (before, after) in budget_measured.items() if after > before * (1 + SPEED_MARGIN)]
                at = f" at batch {', '.join(slow)}" if slow else ""
                first = _candidate(chosen, len(candidates))
                note = (
                    f"the plan of least predicted error ({first}) and every per-layer latency budget measured slower "
                    f"than the original{at} (the strictest: {_times(budget_measured)}): a budget buys no speed here, "
                    "so of the candidate plans the one that agreed best with the original on the held-out samples "
                    "after the refit (not always the one predicted best before it) was written"
                )
        if allocation is None:
            if evaluate is not None and len(order) > 1:
                best, agreement = evaluate(graph, candidates, order)
                report.facts["candidates"] = [
                    {"candidate": i, "held_agreement": v[0], "held_cosine": v[1], "written": False}
                    for i, v in sorted(agreement.items())
                ]
                if best != chosen and timed:  # a better plan must be no slower, unless the first was slower too
                    other = speed_check(graph, candidates[best].plan, pairs)
                    best, measured = (chosen, measured) if _slower(other) and not first_slower else (best, other)
                chosen = best
            allocation, source = candidates[chosen], f"candidate {chosen} of {len(candidates)}"
            for row in report.facts.get("candidates", []):
                row["written"] = row["candidate"] == chosen
            if note:  # the plan written is named once it is known
                report.facts["plan_note"] = f"{note} ({_candidate(chosen, len(candidates))})"
        report.facts["plan_source"] = source
        if timed:
            report.facts["speed_check"] = measured
        if allocation.latency is not None:
            report.facts["layer_latency"] = {"before": budget, "after": allocation.latency}
    elif knapsack:
        allocation = allocate_channels(
            analysis,
            cost,
            scores,
            remove_ratio=remove_ratio,
            target=target,
            total_before=total,
            groups=[g.name for g in analysis.groups if g.name not in protected],
            weights=weights,
            round_to=round_to,
            curves=reconstruction,
        )
        report.facts["plan_source"] = (
            "knapsack over channels, by the error their readers keep once refitted"
            if reconstruction
            else "knapsack over heads and channels, by the output energy they feed their readers"
        )
    else:
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
    nodes = {n.name: n for n in graph.nodes}
    for name, keep in allocation.plan.items():
        group = next(g for g in analysis.groups if g.name == name)
        of, removed = len(group.classes), len(group.classes) - len(keep)
        out = nodes[group.producers[0]].outputs[0].name if group.producers else None
        # counted on the producer's output, as a class may hold several of its channels; a head in heads, though,
        # not in the Q, K and V columns it holds
        if group.unit != "head" and out in analysis.flows:
            of = len(analysis.flows[out].ids)  # (DepthToSpace unites the b^2 channels one output channel reads)
            removed = of - len(analysis.keep(out, analysis.alive({name: keep})))
        kind = "basis" if name in basis_groups else group.unit
        kinds[name] = {"kind": kind, "removed": int(removed), "of": int(of)}
    removal = run_passes(graph, [partial(remove_channels, plan=allocation.plan, analysis=analysis)]).report
    bases = sum(kinds[name]["removed"] for name in allocation.plan if name in basis_groups)
    if bases:  # remove_channels counts every index it drops; on a basis edge those are basis vectors, not channels
        removal.counts["channels_removed"] -= bases
        removal.counts["bases_removed"] += bases
    report.merge(removal)
    return len(allocation.plan)


SELECT_BUDGET_S = 30.0  # ... while the next one is expected to end within this many seconds of the first start
LINEARIZE_STEPS = 3  # allocations with channel options, each with costs re-taken at the plan before


def _by_output_energy(analysis: ChannelGraph) -> bool:
    """Whether a channel stage allocates by the knapsack of `budget.channel_choices` rather than by ranking.

    For graphs with attention heads (whatever the target): a head is a quarter of its layer where a unit is a
    256th, so scores normalised within each group (`budget.allocate`) rank an average head 64 times cheaper to lose
    than an average MLP unit. The knapsack compares the share of its readers' output energy each option loses, the
    relative error of those layers, as the ranks' knapsack does.
    """
    return any(g.unit == "head" for g in analysis.groups)


def _error_at(choice, kept: int) -> float:
    """Predicted error of `choice` keeping `kept` of its classes (0 when that is the whole layer)."""
    return float(choice.error[kept]) if 0 < kept <= choice.max_rank else 0.0


def _kind_weights(ratios: dict[str, float], kinds: dict[str, str]) -> dict[str, float]:
    """Sensitivity weights from measured / predicted error ratios, normalised within each kind of option.

    Within a kind (ranks, channels) a weight is the ratio over that kind's median, clipped to `CUT_WEIGHT_RANGE`
    (one cut's measure is noisy); the channel kind's median over the rank kind's median then scales all its weights,
    unclipped: the two kinds' predicted errors are on scales of their own (a rank's is its layer's exact output error,
    a channel's is that of the layers reading it, with channels taken as uncorrelated).
    """
    by_kind: dict[str, dict[str, float]] = {}
    for group, ratio in ratios.items():
        by_kind.setdefault(kinds.get(group, "rank"), {})[group] = ratio
    medians = {k: max(float(np.median(list(v.values()))), 1e-30) for k, v in by_kind.items()}
    base = medians.get("rank", 1.0)
    log.debug("measured over predicted error, median by kind: %s", medians)
    weights = {}
    for kind, values in by_kind.items():
        scale = medians[kind] / base if kind != "rank" and "rank" in medians else 1.0
        for group, ratio in values.items():
            weights[group] = float(np.clip(ratio / medians[kind], *CUT_WEIGHT_RANGE)) * scale
    for group, value in sorted(weights.items(), key=lambda kv: -kv[1])[:3]:
        log.info("most sensitive at the planned cut: %s (weight %.2f)", group, value)
    return weights


def _plan_key(kept: dict[str, np.ndarray]) -> tuple:
    """A hashable form of a plan (group or tensor name -> kept positions)."""
    return tuple(sorted((name, tuple(np.asarray(keep).tolist())) for name, keep in kept.items()))


def _plan_of(analysis, alive: np.ndarray) -> dict[str, np.ndarray]:
    """Group name -> kept positions, for the groups `alive` shrinks."""
    plan = {}
    for group in analysis.groups:
        keep = np.flatnonzero(alive[group.classes])
        if len(keep) < len(group.classes):
            plan[group.name] = keep.astype(np.int64)
    return plan


def _predicted_error(choices: list, alive: np.ndarray) -> float:
    """Summed predicted error of the options `alive` stands for."""
    return sum(_error_at(c, int(alive[c.classes].sum())) for c in choices)


SAMPLES_PER_INPUT_WIDTH = 0.25  # fewer fit samples than this times a refitted layer's input width K: warn


def _few_samples(graph: gs.Graph, pairs: list, kept: dict, n_fit: int) -> str | None:
    """The warning when the fit samples are few for the widest layer the refit solves for, else None.

    The layers are the refit's (each pair's scaling op, each matrix op whose input lost channels); a layer's input
    width is K = Ci*kh*kw columns of its weight matrix. Spatial positions of one sample are strongly correlated, so
    they do not count as rows: the samples themselves must be at least ``SAMPLES_PER_INPUT_WIDTH * K``.
    """
    scaling = {p.scaling for p in pairs}
    widths, why = {}, {}
    for node in graph.nodes:
        if node.name in scaling or (node.inputs and node.inputs[0].name in kept):
            w = layouts.weight_matrix(node)
            if w is not None:
                widths[node.name] = w.shape[1]
                # a layer whose own channels are blocked is still refitted when its input lost channels: say which
                why[node.name] = "its basis was cut" if node.name in scaling else "its input lost channels"
    if not widths:
        return None
    name, k = max(widths.items(), key=lambda kv: kv[1])
    if n_fit >= SAMPLES_PER_INPUT_WIDTH * k:
        return None
    return (
        f"warning: {n_fit} fit samples are few for refitting layer '{name}' ({why[name]}; input width K={k}, the "
        "columns of its "
        f"weight matrix; want at least {int(np.ceil(SAMPLES_PER_INPUT_WIDTH * k))} = K/"
        f"{round(1 / SAMPLES_PER_INPUT_WIDTH)} samples): the refit may not hold on new data; give more --calib "
        "samples or --no-compensate"
    )


def _timing_spec(
    graph: gs.Graph, nodes: dict, pair, batch: int, concrete: dict | None
) -> tuple[str, list, list, int] | None:
    """(op, input shape, dense weight shape, largest rank worth splitting) of a pair to time at `batch`.

    The input shape is the one `concrete` (tensor -> dims with the model's inputs at `batch`) gives, else the
    graph's with its first dim set to `batch`. None where a dim stays symbolic, or for a basis op with no timing
    model (ConvTranspose: such a layer stays dense).
    """
    basis = nodes.get(pair.basis)
    layout = None if basis is None else layouts.layout_of(basis)
    if layout is None:
        return None
    x_shape = (concrete or {}).get(basis.inputs[0].name)
    if x_shape is None and basis.inputs[0].shape is not None:
        x_shape = [batch, *basis.inputs[0].shape[1:]]
    if x_shape is None or any(not isinstance(d, int) for d in x_shape):
        return None
    r, k, co = pair_sizes(graph, pair)
    dense = layout.timing(basis, k, co)
    if dense is None:
        return None
    return dense[0], list(x_shape), dense[1], min(r, param_breakeven(k, co))


def _concrete_at(graph: gs.Graph, model: onnx.ModelProto, count_shapes: dict | None, batch: int, seed: int):
    """Every tensor's dims in `graph` with the model's inputs at the counting shape and `batch` (None: unknown)."""
    if count_shapes is None:
        return None
    feeds = _synthetic_feeds(model, count_shapes, batch=batch, seed=seed)
    return concrete_shapes(to_model(graph, model), {name: list(x.shape) for name, x in feeds.items()})


def _latency_limits(
    graph: gs.Graph, pairs: list, *, batch: int, threads: int, concrete: dict | None = None
) -> dict[str, int]:
    """Per pair, the largest kept rank that still measures faster split than merged (static shapes only)."""
    nodes = {n.name: n for n in graph.nodes}
    limits = {}
    for pair in pairs:
        spec = _timing_spec(graph, nodes, pair, batch, concrete)
        if spec is None:
            continue
        op, x_shape, shape, bound = spec
        limits[pair.basis] = split_rank_limit(
            op=op,
            x_shape=x_shape,
            weight_shape=shape,
            attrs=dict(nodes[pair.basis].attrs),
            max_rank=bound,
            threads=threads,
        )
    return limits


LATENCY_POINTS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)  # ranks timed, as fractions of the largest useful one


def _latency_curves(
    graph: gs.Graph, pairs: list, *, batch: int, threads: int, concrete: dict | None = None
) -> dict[str, tuple]:
    """Per pair's mid tensor: measured (dense seconds, {rank: split seconds}) at `batch` (static shapes only)."""
    nodes = {n.name: n for n in graph.nodes}
    curves = {}
    for pair in steps(pairs, "layer latency"):
        spec = _timing_spec(graph, nodes, pair, batch, concrete)
        if spec is None:
            continue
        op, x_shape, shape, bound = spec
        curves[pair.mid] = layer_latency(
            op=op,
            x_shape=x_shape,
            weight_shape=shape,
            attrs=dict(nodes[pair.basis].attrs),
            ranks=sorted({max(1, round(max(bound, 1) * f)) for f in LATENCY_POINTS}),
            threads=threads,
        )
    return curves


def _mid_axis(graph: gs.Graph, pair) -> int:
    basis = next(n for n in graph.nodes if n.name == pair.basis)
    return layouts.output_channel_axis(basis)


def _name_output_nodes(report: Report, model: onnx.ModelProto, out: onnx.ModelProto) -> None:
    """Make the report's layers and notes name nodes of the written model `out` only, in place.

    A pair merged back whose halves changed is listed once, under the merged node: its weight shape in the input
    `model` (or as the channel stage left it), as written, its rank and ``merged_from``; notes on its halves move
    to it. A node split and kept split is listed through its halves, each with ``split_from`` (the node's name and
    its weight shape before and when it was split). Entries of any other node no longer in `out` are dropped. The
    ``removed`` entries of basis groups merged back get ``merged_into``: their rank cut is in the merged weight, but
    saves nothing.
    """
    merged = report.facts.pop("merged", {})
    half_of = {half: name for name, pair in merged.items() for half in (pair["basis"], pair["scaling"])}
    before, after = _weights(model), _weights(out)
    layers: dict[str, dict] = {}
    for name, change in report.layers.items():
        if name in after and name not in half_of:
            layers[name] = dict(change)
    for name in report.layers:
        if name in half_of and half_of[name] in after:
            target = half_of[name]
            op, shape = after[target]
            entry = layers.setdefault(target, {"op": op, "before": before.get(target, (None, None))[1]})
            entry.update(after=shape, rank=merged[target]["rank"])
            entry["merged_from"] = [merged[target]["basis"], merged[target]["scaling"]]
    for name, entry in layers.items():
        source = _original_name(name)
        if source != name and source in before and source not in after:
            change, shape = report.layers.get(source, {}), before[source][1]
            entry["split_from"] = {
                "name": source,
                "before": change.get("before", shape),
                "after": change.get("after", shape),
            }
    report.layers = layers
    notes = []
    for skip in report.skipped:
        if skip.node in after:
            notes.append(skip)
        elif skip.node in half_of and half_of[skip.node] in after:
            notes.append(Skip(half_of[skip.node], f"{skip.reason} (in its split form '{skip.node}')"))
        elif f"{skip.node}_basis" in after:
            notes.append(Skip(f"{skip.node}_basis", f"{skip.reason} (as '{skip.node}', before it was split)"))
    report.skipped = notes
    for name, entry in report.facts.get("removed", {}).items():
        if entry["kind"] == "basis" and name in half_of:
            entry["merged_into"] = half_of[name]


def _weights(model: onnx.ModelProto) -> dict[str, tuple[str, list[int] | None]]:
    """Node name -> (op, dims of its constant second input, the weight, or None) for a model's top-level nodes."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    dims.update(
        {
            n.output[0]: list(a.t.dims)
            for n in model.graph.node
            if n.op_type == "Constant"
            for a in n.attribute
            if a.name == "value"
        }
    )
    return {n.name: (n.op_type, dims.get(n.input[1]) if len(n.input) > 1 else None) for n in model.graph.node}


def _check_exclude(model: onnx.ModelProto, exclude: Sequence[str]) -> None:
    """Every --exclude pattern must match a node of the model (by name, or by the name a split layer came from)."""
    names = {n.name for n in model.graph.node if n.name}
    names |= {_original_name(n) for n in names}
    for pattern in exclude:
        if not any(fnmatch.fnmatch(name, pattern) for name in names):
            example = f"names such as {min(names)!r}" if names else "no named nodes"
            raise OnnxPruneError(
                f"--exclude {pattern!r} matches no node of the model ({example}; fnmatch patterns): "
                "fix or drop the pattern"
            )


def _validate_made(out: onnx.ModelProto) -> None:
    """`validate` a model this tool made: a model it rejects is a bug here (exit 3), not a problem with the input.

    Raises:
        PruneBug: The full checker or onnxruntime rejects `out` (the input passed both when it was loaded).
    """
    try:
        validate(out)
    except InvalidModelError as err:
        raise PruneBug(str(err)) from err


def _original_name(node_name: str) -> str:
    for suffix in ("_basis", "_scaling", PROJECTION):
        if node_name.endswith(suffix):
            return node_name[: -len(suffix)]
    return node_name


def decompose(model: onnx.ModelProto, *, min_rank: int = 8) -> tuple[onnx.ModelProto, Report]:
    """The full-rank split of every eligible layer: a basis op (orthonormal filters) and a scaling op."""
    graph = to_graph(model)
    report = run_passes(graph, [cleanup, partial(decompose_basis, min_channels=min_rank)]).report
    out = to_model(graph, model)
    _validate_made(out)
    return out, report
