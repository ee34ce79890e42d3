"""A small progress bar for long work (tracing or emitting large graphs, fuzz runs).

Drawn on stderr only when stderr is a terminal and ``verbose`` is not False, so logs,
pipes, CI and notebooks' captured output stay clean. Written here rather than taken
from tqdm to keep ``import interop`` at its four dependencies.

>>> from interop.progress import progress
>>> total = 0
>>> for node in progress(range(3), desc="emit", verbose=False):
...     total += node
>>> total
3
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

__all__ = ["progress", "enabled"]

_WIDTH = 24  # bar cells; the whole line stays under 80 columns
_INTERVAL = 0.1  # seconds between redraws: drawing every item would slow tight loops


def enabled(verbose: bool | None = None, stream: IO[str] | None = None) -> bool:
    """Whether a bar would be drawn: ``verbose`` True forces it, False silences it,
    None (the default) draws only when `stream` (stderr) is a terminal."""
    if verbose is not None:
        return verbose
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _line(desc: str, done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        filled = min(_WIDTH, int(_WIDTH * done / total))
        bar = "#" * filled + "-" * (_WIDTH - filled)
        left = f", {(total - done) / rate:.0f}s left" if rate and done < total else ""
        body = f"[{bar}] {done}/{total} ({elapsed:.0f}s{left})"
    else:
        body = f"{done} ({rate:.1f}/s, {elapsed:.0f}s)"
    return f"\r{desc + ': ' if desc else ''}{body}"


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    verbose: bool | None = None,
    *,
    stream: IO[str] | None = None,
) -> Iterator[T]:
    """Yield the items of `iterable`, drawing a bar on stderr while it runs.

    `total` defaults to ``len(iterable)`` when it has one. ``verbose=True`` draws even
    when stderr is not a terminal; ``verbose=False`` never draws.

    >>> list(progress(["a", "b"], desc="fuzz", verbose=False))
    ['a', 'b']
    """
    out = stream if stream is not None else sys.stderr
    if not enabled(verbose, out):
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    start = last = time.perf_counter()
    done = 0
    out.write(_line(desc, 0, total, 0.0))
    out.flush()
    try:
        for item in iterable:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= _INTERVAL or done == total:
                last = now
                out.write(_line(desc, done, total, now - start))
                out.flush()
    finally:  # also when the loop is left early: end the line so later output starts clean
        out.write(_line(desc, done, total, time.perf_counter() - start) + "\n")
        out.flush()
