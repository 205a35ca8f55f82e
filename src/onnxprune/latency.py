"""Measured latency of a split layer against the single op it came from, on this machine, cached.

Fewer MACs do not make onnxruntime faster by themselves: a basis pair is two kernels launched instead of one. For
each pair, `split_rank_limit` finds (by bisection over micro-benchmarks at the model's shapes) the largest kept rank
at which the pair still runs faster than the merged op; above it the pair is merged back. Results are cached in a
JSON file keyed by shapes, attributes, batch, threads, onnxruntime version and processor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import platform
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import OnnxPruneError
from onnxprune.graph import atomic_write, session
from onnxprune.progress import timing

log = logging.getLogger(__name__)

CACHE_ENV = "ONNXPRUNE_CACHE"
MARGIN = 0.02  # a split must be this much faster: noise should tip the decision toward merging, never slower


def cache_path() -> pathlib.Path:
    """Where measurements are kept: $ONNXPRUNE_CACHE, else ~/.cache/onnxprune/latency.json.

    Returns:
        The JSON file's path (the file may not exist yet).
    """
    default = pathlib.Path.home() / ".cache" / "onnxprune" / "latency.json"
    return pathlib.Path(os.environ.get(CACHE_ENV, default))


def _load_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def clear_cache() -> int | None:
    """Delete the measurement cache at `cache_path()`: the number of entries it held, or None when there was none.

    Returns:
        The number of entries the file held (0 when it was not readable JSON), or None when there was no file.

    Raises:
        OnnxPruneError: The file exists but cannot be removed.
    """
    path = cache_path()
    if not path.exists():
        return None
    entries = len(_load_cache())
    try:
        path.unlink()
        path.with_suffix(".tmp").unlink(missing_ok=True)  # left by a writer that was killed mid-way
    except OSError as err:
        raise OnnxPruneError(f"latency cache {path}: cannot be removed: {err.strerror or err}") from err
    return entries


def _store_cache(cache: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(cache)

        def write(target: pathlib.Path) -> None:
            target.write_text(text)

        atomic_write(path, write)
    except (OSError, OnnxPruneError) as err:  # a read-only home is no reason to fail the job
        log.debug("latency cache not written: %s", err)


def _layer_model(op: str, x_shape: list[int], weights: list[np.ndarray], attrs: list[dict]) -> onnx.ModelProto:
    """A chain of `op` nodes (Conv or MatMul) with the given weights: the thing to time."""
    nodes, inits, name = [], [], "x"
    for i, (w, a) in enumerate(zip(weights, attrs, strict=True)):
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node(op, [name, f"w{i}"], [f"y{i}"], **a))
        name = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _time(model: onnx.ModelProto, x: np.ndarray, threads: int, runs: int) -> float:
    sess = session(model, optimize=True, threads=threads)
    for _ in range(3):
        sess.run(None, {"x": x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return float(np.min(times))  # the least disturbed run: micro-benchmarks on a shared machine


def split_rank_limit(
    *,
    op: str,
    x_shape: list[int],
    weight_shape: list[int],
    attrs: dict,
    max_rank: int,
    threads: int = 0,
    runs: int = 30,
) -> int:
    """Largest rank r <= max_rank at which basis + scaling runs faster than one op (0: never).

    Args:
        op: "Conv" (weight [Co, Ci, k...]) or "MatMul" (weight [K, N]).
        x_shape: The layer's input shape, batch included.
        weight_shape: The original (merged) weight's shape.
        attrs: The Conv's attributes (strides, pads, dilations), ignored for MatMul.
        max_rank: Upper bound (the rank below which the split saves parameters).
        threads: Intra-op threads, as the model will run.
        runs: Timed runs per measurement (the minimum is kept).

    Returns:
        The rank r in [0, max_rank] that bisection lands on (each step times one rank): split at r, the pair ran
        more than `MARGIN` (2 %) faster than the merged op (r = 0 trivially) and at r + 1 it did not (or r =
        max_rank). Read from the cache when this layer was measured on this machine before; a cache that cannot be
        written is only logged.
    """
    key = hashlib.sha1(
        json.dumps(
            [
                op,
                x_shape,
                weight_shape,
                sorted(attrs.items()),
                max_rank,
                threads,
                ort.__version__,
                platform.processor(),
                platform.machine(),
                os.cpu_count(),
            ],
            default=str,
        ).encode()
    ).hexdigest()
    cache = _load_cache()
    if key in cache:
        return int(cache[key])
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    conv_attrs = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")}

    def split(r: int) -> onnx.ModelProto:
        if op == "Conv":
            basis = rng.standard_normal((r, *weight_shape[1:])).astype(np.float32)
            scale = rng.standard_normal((weight_shape[0], r) + (1,) * (len(weight_shape) - 2)).astype(np.float32)
            return _layer_model("Conv", x_shape, [basis, scale], [conv_attrs, {}])
        basis = rng.standard_normal((weight_shape[0], r)).astype(np.float32)
        return _layer_model(
            "MatMul", x_shape, [basis, rng.standard_normal((r, weight_shape[1])).astype(np.float32)], [{}, {}]
        )

    merged = _time(_layer_model(op, x_shape, [w], [conv_attrs if op == "Conv" else {}]), x, threads, runs)
    lo, hi = 0, max_rank  # invariant: rank lo is faster split (0 trivially), ranks above hi are not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _time(split(mid), x, threads, runs) < merged * (1 - MARGIN):
            lo = mid
        else:
            hi = mid - 1
    cache[key] = lo
    _store_cache(cache)
    return lo


def _cache_key(*parts) -> str:
    machine = [ort.__version__, platform.processor(), platform.machine(), os.cpu_count()]
    return hashlib.sha1(json.dumps([*parts, *machine], default=str).encode()).hexdigest()


MEASURE_SECONDS = 0.05  # wall time one latency figure may take (runs are cut to fit, at least 5)


def layer_latency(
    *,
    op: str,
    x_shape: list[int],
    weight_shape: list[int],
    attrs: dict,
    ranks: list[int],
    threads: int = 0,
) -> tuple[float, dict[int, float]]:
    """Measured seconds of one layer as the dense op and as a basis + scaling pair at each rank of `ranks`.

    The figures are the fastest of several onnxruntime runs (CPU, all graph optimisations, `threads` intra-op
    threads) at the layer's real input shape, cached like `split_rank_limit`. The joint allocation
    (``budget.allocate_ranks``) interpolates between them.

    Args:
        op: "Conv" (weight [Co, Ci, k...]) or "MatMul" (weight [K, N]).
        x_shape: The layer's input shape, batch included.
        weight_shape: The dense weight's shape.
        attrs: The Conv's attributes (strides, pads, dilations), ignored for MatMul.
        ranks: Ranks of the split to time.
        threads: Intra-op threads, as the model will run (0: onnxruntime's default).

    Returns:
        (dense seconds, {rank: split seconds}).
    """
    ranks = sorted(set(int(r) for r in ranks if r >= 1))
    key = _cache_key("curve", op, x_shape, weight_shape, sorted(attrs.items()), ranks, threads)
    cache = _load_cache()
    if key in cache:
        dense, times = cache[key]
        return float(dense), {int(r): float(t) for r, t in times.items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    conv_attrs = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")}

    def timed(model: onnx.ModelProto) -> float:
        first = _time(model, x, threads, 3)
        runs = int(min(30, max(5, MEASURE_SECONDS / max(first, 1e-6))))
        return min(first, _time(model, x, threads, runs))

    w = rng.standard_normal(weight_shape).astype(np.float32)
    dense = timed(_layer_model(op, x_shape, [w], [conv_attrs if op == "Conv" else {}]))
    times = {}
    for r in ranks:
        if op == "Conv":
            basis = rng.standard_normal((r, *weight_shape[1:])).astype(np.float32)
            scale = rng.standard_normal((weight_shape[0], r) + (1,) * (len(weight_shape) - 2)).astype(np.float32)
            model = _layer_model("Conv", x_shape, [basis, scale], [conv_attrs, {}])
        else:
            basis = rng.standard_normal((weight_shape[0], r)).astype(np.float32)
            model = _layer_model(
                "MatMul", x_shape, [basis, rng.standard_normal((r, weight_shape[1])).astype(np.float32)], [{}, {}]
            )
        times[r] = timed(model)
    cache[key] = [dense, {str(r): t for r, t in times.items()}]
    _store_cache(cache)
    return dense, times


def tucker_no_slower(
    *, x_shape: list[int], weight_shape: list[int], attrs: dict, rank: int, t: int, threads: int = 0
) -> bool:
    """Whether a Conv's Tucker-2 form at rank `t` runs no slower than its split at `rank` (``passes.tucker``).

    Times, like `layer_latency` (the fastest of several onnxruntime runs at the layer's real input shape, cached),
    the split (k x k basis op to `rank`, 1 x 1 scaling op) against the Tucker-2 chain (1 x 1 projection to `t`, k x k
    core t -> t, 1 x 1 scaling op): one more kernel, and channel counts off the vector width leave onnxruntime's
    blocked layout through reorders.

    Args:
        x_shape: The layer's input shape, batch included.
        weight_shape: The dense weight's shape [Co, Ci, k...].
        attrs: The Conv's attributes (pads, dilations; stride 1).
        rank: The split's kept rank.
        t: The Tucker rank.
        threads: Intra-op threads, as the model will run (0: onnxruntime's default).

    Returns:
        True when the chain measured at most `MARGIN` slower than the split.
    """
    key = _cache_key("tucker", x_shape, weight_shape, sorted(attrs.items()), rank, t, threads)
    cache = _load_cache()
    if key in cache:
        return bool(cache[key])
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    conv_attrs = {k: v for k, v in attrs.items() if k in ("strides", "pads", "dilations", "auto_pad", "kernel_shape")}
    co, ci, taps = weight_shape[0], weight_shape[1], list(weight_shape[2:])
    ones = (1,) * len(taps)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    split = _layer_model("Conv", x_shape, [draw(rank, ci, *taps), draw(co, rank, *ones)], [conv_attrs, {}])
    chain = _layer_model(
        "Conv", x_shape, [draw(t, ci, *ones), draw(t, t, *taps), draw(co, t, *ones)], [{}, conv_attrs, {}]
    )

    def timed(model: onnx.ModelProto) -> float:
        first = _time(model, x, threads, 3)
        return min(first, _time(model, x, threads, int(min(30, max(5, MEASURE_SECONDS / max(first, 1e-6))))))

    found = timed(chain) <= timed(split) * (1 + MARGIN)
    cache[key] = found
    _store_cache(cache)
    return found


def channel_latency(
    *,
    op: str,
    x_shape: list[int],
    weight_shape: list[int],
    attrs: dict,
    kept_in: list[int],
    kept_out: list[int],
    threads: int = 0,
) -> tuple[float, dict[int, float], dict[int, float]]:
    """Measured seconds of one dense layer whole, with fewer input channels, and with fewer output channels.

    The channel knapsack under a latency target (``budget.LatencyModel``) costs each option by these, as fewer
    MACs are not the same saving everywhere: at batch 32 on this machine, halving the channels inside a chain of
    3 x 3 convolutions saved 9 % of its time at 16 channels and 32 x 32 (onnxruntime's blocked layout pads to 16)
    and 43 % at 64 channels and 8 x 8. Timed like `layer_latency` (the fastest of several onnxruntime runs at the
    layer's real input shape, cached).

    Args:
        op: "Conv" (weight [Co, Ci / group, k...]; a grouped Conv keeps ``group`` and is timed whole only) or
            "MatMul" (weight [K, N], input [..., K]).
        x_shape: The layer's input shape, batch included.
        weight_shape: The dense weight's shape.
        attrs: The Conv's attributes (strides, pads, dilations, group), ignored for MatMul.
        kept_in: Input channel counts to time (the output whole); ignored for a grouped Conv.
        kept_out: Output channel counts to time (the input whole); ignored for a grouped Conv.
        threads: Intra-op threads, as the model will run (0: onnxruntime's default).

    Returns:
        (seconds whole, {kept inputs: seconds}, {kept outputs: seconds}).
    """
    grouped = op == "Conv" and int(attrs.get("group", 1)) != 1
    kept_in, kept_out = ([], []) if grouped else (sorted(set(kept_in)), sorted(set(kept_out)))
    key = _cache_key("channels", op, x_shape, weight_shape, sorted(attrs.items()), kept_in, kept_out, threads)
    cache = _load_cache()
    if key in cache:
        whole, ins, outs = cache[key]
        return float(whole), {int(k): float(t) for k, t in ins.items()}, {int(k): float(t) for k, t in outs.items()}
    rng = np.random.default_rng(0)
    keys = ("strides", "pads", "dilations", "auto_pad", "kernel_shape") + (("group",) if grouped else ())
    conv_attrs = {k: v for k, v in attrs.items() if k in keys} if op == "Conv" else {}
    in_axis, x_axis = (1, 1) if op == "Conv" else (0, len(x_shape) - 1)  # the weight's and the input's channel axes
    out_axis = 0 if op == "Conv" else 1

    def timed(x_dims: list[int], w_dims: list[int]) -> float:
        x = rng.standard_normal(x_dims).astype(np.float32)
        model = _layer_model(op, x_dims, [rng.standard_normal(w_dims).astype(np.float32)], [conv_attrs])
        first = _time(model, x, threads, 3)
        return min(first, _time(model, x, threads, int(min(30, max(5, MEASURE_SECONDS / max(first, 1e-6))))))

    def narrowed(dims: list[int], axis: int, k: int) -> list[int]:
        return [k if i == axis else d for i, d in enumerate(dims)]

    whole = timed(list(x_shape), list(weight_shape))
    ins = {
        k: timed(narrowed(x_shape, x_axis, k), narrowed(weight_shape, in_axis, k))
        for k in kept_in
        if 0 < k < weight_shape[in_axis]
    }
    outs = {
        k: timed(list(x_shape), narrowed(weight_shape, out_axis, k)) for k in kept_out if 0 < k < weight_shape[out_axis]
    }
    cache[key] = [whole, {str(k): t for k, t in ins.items()}, {str(k): t for k, t in outs.items()}]
    _store_cache(cache)
    return whole, ins, outs


def model_latency(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, threads: int = 0) -> float:
    """Fastest of several onnxruntime runs of the whole model on `feeds` (CPU, all optimisations), in seconds.

    Three untimed runs, one to gauge the speed, then between 5 and 50 timed runs: as many as fit in about 0.5 s.

    Args:
        model: The model.
        feeds: Input name -> array: one batch.
        threads: Intra-op threads (0: onnxruntime's default).

    Returns:
        The fastest timed run, in seconds.
    """
    sess = session(model, optimize=True, threads=threads)
    for _ in range(3):
        sess.run(None, feeds)
    start = time.perf_counter()
    sess.run(None, feeds)
    first = time.perf_counter() - start
    times = []
    for _ in range(int(min(50, max(5, 0.5 / max(first, 1e-6))))):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.min(times))


BLOCK_SECONDS = 0.1  # each session runs alone this long before the next takes over...
BLOCK_WARM = 3  # ...after this many untimed runs that let the other sessions' thread pools go quiet


def alternate(sessions: list, feeds: list[dict[str, np.ndarray]], *, runs: int, blocks: int = 3) -> list[np.ndarray]:
    """Seconds per run of each session, timed in alternating blocks (A A A... B B B... A A A...).

    Runs interleaved one by one (A B A B) are biased on a machine with few cores: onnxruntime's intra-op threads
    spin for a while after each run, so every run competes with the other session's spinning pool. Measured on 2
    cores (digits ResNet-20, two 0.9 plans, batch 1, 2 threads): alone, they were 1.26-1.34x and 1.17-1.26x slower
    than the original; run by run they read 1.11-1.33x and 1.01-1.04x; in blocks of 0.1 s, 1.23-1.32x and
    1.17-1.22x (benchmarks/README.md, "Timing run by run was biased"). So each session runs alone for
    `BLOCK_SECONDS` (at least one run), after up to `BLOCK_WARM` untimed runs (fewer when they take longer than a
    block; none once the session's runs are known to), and the blocks alternate so drift of the machine still hits
    every session alike.

    Args:
        sessions: onnxruntime sessions (already warmed or not).
        feeds: One feed dict per session.
        runs: Least timed runs per session.
        blocks: Least blocks per session.

    Returns:
        One array of run times in seconds per session.
    """
    times: list[list[float]] = [[] for _ in sessions]
    done = 0
    while done < blocks or min(len(t) for t in times) < runs:
        for sess, feed, found in zip(sessions, feeds, times):
            # a run longer than a block is not disturbed by a spinning pool: no warm runs once one is known to be
            # (light ResNet-50 at batch 32 takes seconds a run: three warm runs a block made a comparison 2 min)
            warm_until = time.perf_counter() + BLOCK_SECONDS
            for _ in range(BLOCK_WARM if not found or np.median(found) < BLOCK_SECONDS else 0):
                sess.run(None, feed)
                if time.perf_counter() >= warm_until:
                    break
            stop = time.perf_counter() + BLOCK_SECONDS
            while True:
                begin = time.perf_counter()
                sess.run(None, feed)
                found.append(time.perf_counter() - begin)
                if begin + found[-1] >= stop:
                    break
        done += 1
    return [np.array(t) for t in times]


COMPARE_SECONDS = 0.5  # timing per model in one comparison, in blocks of BLOCK_SECONDS


def compare_latency(
    first: onnx.ModelProto,
    second: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    threads: int = 0,
    seconds: float = COMPARE_SECONDS,
) -> tuple[float, float]:
    """Median seconds of two models on the same `feeds`, timed in alternating blocks (`alternate`).

    CPU, all graph optimisations, `threads` intra-op threads, about `seconds` per model: with blocks, the
    ratio of the two medians moved by about ±2 % from one check to the next on the 2-core machine (±10 % run by run).

    Args:
        first: One model.
        second: The other model, run on the same feeds.
        feeds: Input name -> array: one batch, fed to both.
        threads: Intra-op threads of each session (0: onnxruntime's default).
        seconds: Timing per model, in blocks of `BLOCK_SECONDS`.

    Returns:
        (median seconds per run of `first`, median seconds per run of `second`).
    """
    with timing("whole-model speed checks"):
        sessions = [session(m, optimize=True, threads=threads) for m in (first, second)]
        times = alternate(sessions, [feeds, feeds], runs=5, blocks=max(1, round(seconds / BLOCK_SECONDS)))
    return float(np.median(times[0])), float(np.median(times[1]))


def simd_width() -> int:
    """Channels per block of onnxruntime's NCHWc convolution kernels on this processor: 16 with AVX-512, else 8.

    Channel counts that are not multiples of the block leave a convolution on the plain NCHW kernels: a plan with
    odd counts measured 0.89x at batch 1 where counts rounded to 16 measured 1.30x (handed digits ResNet-20, 0.7,
    2 cores with AVX-512). Read from /proc/cpuinfo; 8 where that file does not exist (the AVX2 block, and a
    harmless granularity elsewhere).

    Returns:
        16 or 8.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return 16 if " avx512f" in f.read() else 8
    except OSError:
        return 8
