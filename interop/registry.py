"""One registry class for everything keyed by name: adapters, op importers, op emitters.

Registering a key twice raises; a failed lookup raises `UnsupportedOpError` (or the
error the caller asks for) with close matches, so a typo or a missing converter is
reported the same way everywhere.

>>> ops = Registry("emit", adapter="numpy")
>>> @ops.register("Relu")
... def emit_relu(x):
...     return x
>>> ops.lookup("Relu") is emit_relu
True
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from .errors import UnsupportedOpError, close_matches

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> entry table; `direction` and `adapter` only label error messages."""

    def __init__(self, direction: str, adapter: str = ""):
        self.direction, self.adapter = direction, adapter
        self._entries: dict[str, T] = {}

    def register(self, key: str, entry: T | None = None, *, replace: bool = False) -> Any:
        """Register `entry` under `key`; without `entry`, return a decorator."""
        if entry is None:

            def decorator(obj: T) -> T:
                self.register(key, obj, replace=replace)
                return obj

            return decorator
        if key in self._entries and not replace:
            raise ValueError(
                f"{self.direction} entry '{key}' is already registered"
                f"{' for ' + self.adapter if self.adapter else ''}; pass replace=True to override it"
            )
        self._entries[key] = entry
        return entry

    def lookup(self, key: str, *, layer: str | None = None, location: str | None = None) -> T:
        """Return the entry for `key` or raise `UnsupportedOpError` with close matches."""
        try:
            return self._entries[key]
        except KeyError:
            raise UnsupportedOpError(
                key,
                direction=self.direction,
                adapter=self.adapter,
                layer=layer,
                location=location,
                close_matches=self.close_matches(key),
            ) from None

    def close_matches(self, key: str, n: int = 3) -> list[str]:
        """Registered keys similar to `key` (never `key` itself)."""
        return close_matches(key, self._entries, n=n)

    def get(self, key: str, default: T | None = None) -> T | None:
        return self._entries.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())
