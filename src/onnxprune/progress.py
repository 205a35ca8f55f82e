"""Progress of the long steps of a prune: a bar on an interactive terminal, the step's time in the log.

Every step that can take more than a few seconds (calibration passes, sensitivity probes, latency measurements,
the sequential refit) iterates through `steps`. On a terminal with progress lines on (the CLI's default; ``-q`` turns
them off) click draws a bar on stderr; the step's wall time is logged at INFO when it ends (``-v`` shows it when
stderr is not a terminal).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

import click

log = logging.getLogger("onnxprune.progress")

T = TypeVar("T")
SHOW_AFTER_S = 1.0  # steps shorter than this leave no line in the log
_spent: list[dict[str, float]] = []  # the open `timed` collections, innermost last


@contextlib.contextmanager
def timed() -> Iterator[dict[str, float]]:
    """Collect the wall seconds of every `steps` step run inside, summed by label.

    Yields:
        Label -> seconds, filled as the steps end (a run's ``step_seconds`` in its report); a step's seconds leave
        out those of the steps run inside it, so the values add up to at most the wall time.
    """
    spent: dict[str, float] = {}
    _spent.append(spent)
    try:
        yield spent
    finally:
        del _spent[next(i for i, d in enumerate(_spent) if d is spent)]  # by identity: equal dicts are not the same


def steps(items: Iterable[T], label: str, *, total: int | None = None) -> Iterator[T]:
    """`items`, one at a time, with a progress bar labelled `label` while they are worked on.

    Args:
        items: What the step iterates over.
        label: What the step does, as the user reads it ("refit", "sensitivity probes"...).
        total: How many items (default ``len(items)`` when it has one).

    Yields:
        The items, unchanged.
    """
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    with timing(label, total=total):
        if _interactive() and total != 0:  # nothing to do: no empty bar
            with click.progressbar(items, length=total, label=label, file=sys.stderr, show_pos=True) as bar:
                yield from bar
        else:
            yield from items


_inner: list[list[float]] = []  # per open step, the seconds of the steps run inside it (counted there, not here)


@contextlib.contextmanager
def timing(label: str, *, total: int | None = None) -> Iterator[None]:
    """Time the block as the step `label` (no bar): its seconds, less those of steps inside it, go to `timed`.

    Args:
        label: What the step does.
        total: How many items it did, for the log line.
    """
    started = time.perf_counter()
    _inner.append([0.0])
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        inner = _inner.pop()[0]
        if _inner:
            _inner[-1][0] += seconds
        for spent in _spent:
            spent[label] = spent.get(label, 0.0) + max(0.0, seconds - inner)
        if seconds >= SHOW_AFTER_S:
            log.info("%s: %s in %.1f s", label, f"{total} done" if total is not None else "done", seconds)


def _interactive() -> bool:
    root = logging.getLogger("onnxprune")
    return sys.stderr.isatty() and root.getEffectiveLevel() <= logging.INFO
