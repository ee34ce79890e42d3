"""One registry class for everything keyed by name: adapters, hosts, converters, builders.

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

import threading
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


class PluginRegistry(Registry[T]):
    """A registry filled once, on first use, from an entry-point group plus built-ins.

    Adapters (``interop.adapters``) and hosts (``interop.hosts``) are found this way: an
    installed package declares its object under the group; the built-in ones are listed
    in `builtin` too, so a source tree without package metadata finds them. A built-in
    this installation does not ship is skipped, and a third-party plug-in that fails to
    load warns instead of breaking the others.
    """

    def __init__(self, direction: str, *, group: str, builtin: dict[str, str], kind: str):
        super().__init__(direction)
        self.group, self.builtin, self.kind = group, builtin, kind
        self._loaded = False
        self._lock = threading.Lock()

    def load(self) -> PluginRegistry[T]:
        """Load every entry point of the group once; returns the registry."""
        if self._loaded:
            return self
        with self._lock:
            if not self._loaded:
                self._load_entry_points()
                self._loaded = True
        return self

    def _load_entry_points(self) -> None:
        from importlib import metadata

        targets = {ep.name: ep for ep in metadata.entry_points(group=self.group)}
        for name, target in self.builtin.items():
            targets.setdefault(name, metadata.EntryPoint(name, target, self.group))
        for name, entry_point in targets.items():
            if name in self:
                continue
            try:
                entry = entry_point.load()
            except ModuleNotFoundError as err:
                if (
                    entry_point.value.startswith("interop.adapters.")
                    and err.name
                    and err.name.startswith("interop")
                ):
                    continue  # a built-in this installation does not ship
                raise
            except Exception as err:  # a broken third-party plug-in must not break the rest
                import warnings

                warnings.warn(f"interop: {self.kind} '{name}' failed to load: {err}", stacklevel=3)
                continue
            self.register(name, entry)
