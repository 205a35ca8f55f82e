"""Time models side by side in onnxruntime: warm-up, alternating blocks of runs (`latency.alternate`), spread."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.calibration.data import batch_axes, model_inputs
from onnxprune.errors import OnnxPruneError
from onnxprune.graph import load, session
from onnxprune.latency import alternate
from onnxprune.shapes import format_shapes
from onnxprune.shapes import parse_shapes as _parse_shapes

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

BLOCKS = 5  # least blocks of runs per model and batch size (each about latency.BLOCK_SECONDS)


@dataclass
class Timing:
    """One model at one batch size: latency in milliseconds per run, and what the model holds."""

    model: str
    batch: int
    params: int
    macs: int | None  # None: a symbolic dim nothing resolves (give --shape)
    file_mb: float
    median_ms: float
    min_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    speedup: float = 1.0

    def as_dict(self) -> dict:
        """Plain dict for JSON."""
        return asdict(self)


def parse_shapes(specs: tuple[str, ...]) -> dict[str, list[int]]:
    """`name=1x3x224x224` (or `name:1x3x224x224`) -> {name: [1, 3, 224, 224]}; one OnnxPruneError line if bad.

    Args:
        specs: One spec per input.

    Returns:
        Input name -> dims.

    Raises:
        OnnxPruneError: A malformed spec.
    """
    return _parse_shapes(specs)


def _at_batch(model: onnx.ModelProto, shapes: dict[str, list[int]], batch: int) -> dict[str, list[int]]:
    """`shapes` with the batch dim (`batch_axes`) set to `batch` where the model's is dynamic."""
    inputs, axes = model_inputs(model), batch_axes(model)
    found = {}
    for name, dims in shapes.items():
        known = inputs[name][0] if name in inputs else []
        axis = axes.get(name, 0)
        dynamic = axis is not None and len(dims) > axis and len(known) > axis and known[axis] is None
        found[name] = [batch if i == axis else d for i, d in enumerate(dims)] if dynamic else dims
    return found


def _macs_per_sample(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> int | None:
    """MACs of one sample at concrete shapes; None where a symbolic dim is left that nothing resolves.

    The shapes are `--shape` at batch 1, else the model's own dims or a default image side (`choose_shapes`): a
    symbolic dim is never counted as 1.
    """
    from onnxprune.budget import count  # local: the counter imports the passes, bench does not need them otherwise
    from onnxprune.shapes import choose_shapes

    concrete, _ = choose_shapes(model, given=_at_batch(model, shapes, 1))
    return None if concrete is None else count(model, shapes=concrete)[1]


def parse_values(specs: tuple[str, ...]) -> dict[str, float]:
    """`name=16000` -> {name: 16000.0}: an input's value in every run; one OnnxPruneError line if bad.

    Raises:
        OnnxPruneError: A spec without ``=`` or whose value is not a number.
    """
    found = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        try:
            found[name.strip()] = float(value)
        except ValueError:
            raise OnnxPruneError(f"--value {spec!r}: expected NAME=NUMBER, such as sr=16000") from None
        if not name.strip():
            raise OnnxPruneError(f"--value {spec!r}: expected NAME=NUMBER, such as sr=16000")
    return found


def _feeds(
    model: onnx.ModelProto,
    batch: int,
    shapes: dict[str, list[int]],
    rng: np.random.Generator,
    values: dict[str, float] | None = None,
) -> dict:
    feeds = {}
    values = values or {}
    inputs = model_inputs(model)
    unknown = sorted(set(values) - set(inputs))
    if unknown:
        raise OnnxPruneError(f"--value {unknown[0]}: the model has no such input (inputs: {', '.join(inputs)})")
    shapes = _at_batch(model, shapes, batch)
    axes = batch_axes(model)
    for name, (dims, dtype) in inputs.items():
        if name in shapes:
            shape = shapes[name]
        else:
            if any(d is None for i, d in enumerate(dims) if i != axes[name]):
                declared = next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim
                names = [d.dim_param or (str(d.dim_value) if d.dim_value > 0 else "?") for d in declared]
                template = "x".join(
                    "1" if i == axes[name] else (n if n.isdigit() else f"<{n}>") for i, n in enumerate(names)
                )
                raise OnnxPruneError(
                    f"input '{name}' has dynamic dims [{', '.join(names)}]; give them with --shape {name}:{template} "
                    "(numbers; a dynamic batch dim follows each --batch)"
                )
            shape = [batch if i == axes[name] else d for i, d in enumerate(dims)]
        dtype = dtype or np.float32
        if name in values:  # a value the model branches on (a sample rate), not data: the user's
            feeds[name] = np.full(shape, values[name], dtype=dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = rng.integers(1, 10, size=shape).astype(dtype)
    return feeds


def _session(path: str, provider: str, opt_level: str, threads: int) -> ort.InferenceSession:
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise OnnxPruneError(
            f"--provider {provider}: {wanted} is not available in this onnxruntime "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
            "on a machine with the device"
        )
    providers = (wanted,) if provider == "cpu" else (wanted, "CPUExecutionProvider")
    return session(path, threads=threads, providers=providers, level=OPT_LEVELS[opt_level])


def time_models(
    paths: list[str],
    *,
    batches: list[int],
    provider: str = "cpu",
    opt_level: str = "all",
    threads: int = 0,
    shapes: dict[str, list[int]] | None = None,
    values: dict[str, float] | None = None,
    warmup: int = 5,
    runs: int = 30,
    seed: int = 0,
) -> list[Timing]:
    """Time every model at every batch size, in alternating blocks of runs so drift hits all alike (`alternate`).

    Per batch size, each model gets random feeds (standard normal for float inputs, integers in [1, 10) otherwise,
    `values` where given) and `warmup` untimed runs, then all are timed together: at least `runs` runs and `BLOCKS`
    blocks each.

    Args:
        paths: Model files; the first is the reference of every ``speedup``.
        batches: Batch sizes; each replaces the first dim of every input not named in `shapes`.
        provider: A key of `PROVIDERS`: "cpu", "cuda" or "tensorrt" (a GPU provider with CPU as fallback).
        opt_level: A key of `OPT_LEVELS`: "disable", "basic", "extended" or "all".
        threads: Intra-op threads (0: onnxruntime's default).
        shapes: Input name -> full dims (for inputs with dynamic dims after the first); where the model's first dim
            is dynamic it is set to each batch size, as for the inputs not named.
        values: Input name -> the value of all its elements in every run (a scalar such as a sample rate, which a
            model may branch on: random integers would time another branch).
        warmup: Untimed runs per model and batch size.
        runs: Least timed runs per model and batch size.
        seed: Seed of the random feeds.

    Returns:
        One `Timing` per batch size and model, batch by batch, models in `paths` order: times in ms, ``macs`` the
        MACs per sample (at `shapes`, else the model's dims or a default image side; None where a symbolic dim is
        left) times the batch size, ``file_mb`` the size of the .onnx file alone in MiB (2^20 bytes),
        ``speedup`` the first model's median over this one's at the same batch size.

    Raises:
        InvalidModelError: A file is not a valid ONNX model (`graph.load`).
        UnsupportedModelError: A model's default-domain opset is below 7 (counting its parameters and MACs).
        OnnxPruneError: `provider` is not available in this onnxruntime, an input has a dynamic dim after the
            first that `shapes` does not give, `values` names no input of a model, or a model does not run on the
            feeds (shapes that do not fit it).
    """
    from onnxprune.budget import count  # local: the counter imports the passes, bench does not need them otherwise

    models = [load(p) for p in paths]
    sizes = [(count(m)[0], _macs_per_sample(m, shapes or {})) for m in models]
    sessions = [_session(p, provider, opt_level, threads) for p in paths]
    rng = np.random.default_rng(seed)
    found: list[Timing] = []
    seen: dict[tuple, int] = {}
    for batch in batches:
        feeds = [_feeds(m, batch, shapes or {}, rng, values) for m in models]
        key = tuple(tuple(v.shape) for feed in feeds for v in feed.values())
        if key in seen:  # no input has a dynamic first dim: every row would run the same inputs
            shown = format_shapes({k: v.shape for k, v in feeds[0].items()})
            raise OnnxPruneError(
                f"--batch {seen[key]} and {batch} run the same inputs ({shown}): no input's first dim is a dynamic "
                "batch; time one --shape at a time"
            )
        seen[key] = batch
        for path, sess, feed in zip(paths, sessions, feeds):
            try:
                sess.run(None, feed)
            except Exception as err:  # noqa: BLE001 - onnxruntime's own classes: the inputs do not fit the model
                given = format_shapes({k: v.shape for k, v in feed.items()})
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise OnnxPruneError(
                    f"{os.path.basename(path)} does not run on inputs {given} (batch {batch}; check --shape and "
                    f"--batch): {first}"
                ) from err
            for _ in range(warmup):
                sess.run(None, feed)
        samples = [t * 1e3 for t in alternate(sessions, feeds, runs=runs, blocks=BLOCKS)]
        rows = []
        for path, (params, macs), times in zip(paths, sizes, samples):
            t = np.array(times)
            rows.append(
                Timing(
                    os.path.basename(path),
                    batch,
                    params,
                    None if macs is None else macs * batch,
                    os.path.getsize(path) / 2**20,
                    float(np.median(t)),
                    float(t.min()),
                    float(np.percentile(t, 10)),
                    float(np.percentile(t, 90)),
                    len(t),
                )
            )
        for row in rows:
            row.speedup = rows[0].median_ms / row.median_ms
        found += rows
    return found


def table(timings: list[Timing]) -> str:
    """The timings as an aligned text table.

    Args:
        timings: The rows, as `time_models` returns them.

    Returns:
        A header line, a rule and one line per timing (model names cut to 28 characters, times in ms, speed-up as
        ``1.30x``), joined by newlines, with no newline at the end.
    """
    head = (
        f"{'model':<28} {'batch':>5} {'params':>12} {'MACs':>15} {'MB':>7} {'median ms':>10} {'p10':>8} "
        f"{'p90':>8} {'speed-up':>8}"
    )
    lines = [head, "-" * len(head)]
    for t in timings:
        lines.append(
            f"{t.model[:28]:<28} {t.batch:>5} {t.params:>12,} {'?' if t.macs is None else f'{t.macs:,}':>15} "
            f"{t.file_mb:>7.2f} "
            f"{t.median_ms:>10.3f} {t.p10_ms:>8.3f} {t.p90_ms:>8.3f} "
            + (f"{t.speedup:>7.2f}x" if t.speedup >= 0.1 else f"{t.speedup:>7.2g}x")
        )
    return "\n".join(lines)
