"""Torch-free helpers every benchmark shares: matching a peer's knob to a removal target, paired timing, peak memory."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

TOLERANCE = 0.01  # a peer is "matched" when within one point of the target


def bisect(
    make: Callable[[float], tuple[object, float]],
    target: float,
    lo: float = 0.0,
    hi: float = 0.98,
    steps: int = 12,
    *,
    end_first: bool = False,
):
    """Knob in [lo, hi] (removal grows with it) for removal within TOLERANCE of target; the closest found wins.

    With `end_first` the knob's end is tried first, so a target the peer cannot reach costs one step instead of
    twelve (for peers whose removal is monotonic up to the end; Torch-Pruning's is not near 0.98).
    """
    best = None
    if end_first:
        result, removed = make(hi)  # the most the knob can remove: when that is short of the target, stop there
        best = (result, removed, hi)
        if removed < target - TOLERANCE:
            return best
    for _ in range(steps):
        mid = (lo + hi) / 2
        result, removed = make(mid)
        if best is None or abs(removed - target) < abs(best[1] - target):
            best = (result, removed, mid)
        if abs(removed - target) <= TOLERANCE / 2:
            break
        lo, hi = (mid, hi) if removed < target else (lo, mid)
    return best


def paired_timings(
    paths: list[str], *, batches: list[int], runs: int, threads: int = 0
) -> dict[tuple[str, int], tuple]:
    """Each model of `paths[1:]` timed against the first alone, in its own alternation (`onnxprune.bench`).

    Timing every file of a model in one alternation (up to 16 sessions) lets each run with caches the others cooled,
    the larger original most: a sub-millisecond pruned file read 1.15x faster there, 0.91x beside the original alone
    (session 19). Two models at a time is what the tool's own speed checks and `onnxprune bench IN OUT` do.

    Args:
        paths: Model files; the first is the reference.
        batches: Batch sizes.
        runs: Least timed runs per model and batch size.
        threads: Intra-op threads (0: onnxruntime's default).

    Returns:
        (file name, batch) -> (median ms, speed-up over the reference in the same pair); the reference's own row
        holds the median of its medians over the pairs and a speed-up of 1.
    """
    from onnxprune.bench import time_models

    found: dict[tuple[str, int], tuple] = {}
    reference: dict[int, list[float]] = {b: [] for b in batches}
    first = pathlib.Path(paths[0]).name
    for path in paths[1:] or paths[:1]:
        pair = [paths[0], path] if path != paths[0] else [path]
        for t in time_models(pair, batches=batches, threads=threads, runs=runs):
            if t.model == first:
                reference[t.batch].append(t.median_ms)
            else:
                found[(t.model, t.batch)] = (t.median_ms, t.speedup)
    for b, times in reference.items():
        found[(first, b)] = (sorted(times)[len(times) // 2], 1.0)
    return found


def peak_rss_reset() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux); later reads give the peak since now."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB since the last reset (Linux), else since it started."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
