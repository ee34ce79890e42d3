"""The exceptions of interop: each says what happened, what was expected and how to fix it.

Every error raised on purpose by the library derives from `InteropError`, so callers can
catch one class. Messages are built from three parts (what, expected, fix) so they read
the same everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = [
    "InteropError",
    "UnsupportedOpError",
    "UnsupportedModelError",
    "TraceError",
    "ModelLoadError",
    "ShapeError",
    "DeviceError",
    "MissingDependencyError",
    "LayerNotFoundError",
    "EmitError",
    "WeightsError",
    "close_matches",
]


def close_matches(
    word: str, candidates: Iterable[str], n: int = 3, cutoff: float = 0.6
) -> list[str]:
    """Up to `n` candidates similar to `word`, best first; never `word` itself.

    A name that exists but cannot serve (a layer without outputs) must not come back to
    the user as the suggested fix.
    """
    pool = list(dict.fromkeys(c for c in candidates if c != word))
    return difflib.get_close_matches(word, pool, n=n, cutoff=cutoff)


def _compose(what: str, expected: str | None = None, fix: str | None = None) -> str:
    parts = [what.rstrip(".") + "."]
    if expected:
        parts.append("Expected: " + expected.rstrip(".") + ".")
    if fix:
        parts.append("Fix: " + fix.rstrip(".") + ".")
    return "\n".join(parts)


class InteropError(Exception):
    """Base class of every error interop raises on purpose."""

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None):
        self.what, self.expected, self.fix = what, expected, fix
        super().__init__(_compose(what, expected, fix))


class UnsupportedOpError(InteropError):
    """An operator has no converter in the direction asked for.

    Carries the op name, the direction (``"import"`` or ``"emit"``), the adapter, the
    source layer path and ``file:line`` when known, and close matches among the
    registered converters.
    """

    def __init__(
        self,
        op: str,
        *,
        direction: str = "import",
        adapter: str = "",
        layer: str | None = None,
        location: str | None = None,
        close_matches: Sequence[str] = (),
        fix: str | None = None,
        detail: str | None = None,
    ):
        self.op, self.direction, self.adapter = op, direction, adapter
        self.layer, self.location = layer, location
        self.close_matches = [m for m in dict.fromkeys(close_matches) if m != op]
        where = []
        if layer is not None:
            where.append(f"in layer '{layer or '<root>'}'")
        if location:
            where.append(f"at {location}")
        what = f"No {adapter + ' ' if adapter else ''}{direction} converter for op '{op}'"
        if where:
            what += " " + " ".join(where)
        if detail:
            what += f" ({detail})"
        expected = None
        if self.close_matches:
            expected = "one of the registered ops; close matches: " + ", ".join(self.close_matches)
        super().__init__(what, expected, fix or "register a converter for it (see docs/design.md)")


class UnsupportedModelError(InteropError, TypeError):
    """`interop.trace` was given an object no adapter recognises (also a `TypeError`)."""

    def __init__(self, model: object, supported: Sequence[str]):
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        super().__init__(
            f"Cannot trace an object of type {kind}",
            "one of: " + "; ".join(supported),
            "pass a model of a supported framework, or install/register an adapter "
            "through the 'interop.adapters' entry-point group",
        )


class TraceError(InteropError):
    """The source framework could not turn the model into a graph."""


class ModelLoadError(InteropError):
    """A model file, byte string or proto is corrupt, unsafe or inconsistent."""


class ShapeError(InteropError, ValueError):
    """An input's rank, static dims or dtype do not match the graph's signature."""


class DeviceError(InteropError, RuntimeError):
    """The requested execution device is not available."""


class MissingDependencyError(InteropError, ImportError):
    """An optional framework or tool needed for this call is not installed."""

    def __init__(
        self, package: str, extra: str | None = None, purpose: str = "", fix: str | None = None
    ):
        if fix is None:
            fix = f"pip install 'interop-graph[{extra}]'" if extra else f"install {package}"
        super().__init__(
            f"{package} is not installed{' (needed to ' + purpose + ')' if purpose else ''}",
            None,
            fix,
        )


class LayerNotFoundError(InteropError, KeyError):
    """No layer or value of that name in the graph (also a `KeyError`)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return Exception.__str__(self)


class EmitError(InteropError, RuntimeError):
    """A node failed while being emitted or evaluated; the cause is chained."""


class WeightsError(InteropError, ValueError):
    """Weights given apart from the model (a safetensors checkpoint, a mapping) do not fit it:
    missing or extra tensors, a shape or dtype mismatch, a truncated shard."""
