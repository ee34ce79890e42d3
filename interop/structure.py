"""Flattening structured model outputs (dicts, dataclasses, tuples) into named tensors.

The names follow the structure, in the order the model returns it: a dict's keys
(``logits``), dataclass fields, tuple positions (``output_0``), joined by dots for
nested structures (``cache.0.key``). A single tensor is named ``output``.

>>> flatten_outputs({"a": 1, "b": (2, 3)}, is_leaf=lambda x: isinstance(x, int))
[('a', 1), ('b.0', 2), ('b.1', 3)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from .errors import TraceError


def flatten_outputs(
    outputs: Any,
    is_leaf: Callable[[Any], bool],
    convert: Callable[[Any], Any] | None = None,
) -> list[tuple[str, Any]]:
    """Return ``(name, leaf)`` pairs; `convert` may turn framework objects into dicts first."""
    if is_leaf(outputs):
        return [("output", outputs)]
    flat: list[tuple[str, Any]] = []
    _flatten(outputs, "", is_leaf, convert, flat, top=True)
    return flat


def _flatten(obj: Any, prefix: str, is_leaf, convert, flat: list, top: bool = False) -> None:
    if convert is not None:
        obj = convert(obj)
    if obj is None:
        return  # optional outputs the model did not produce
    if is_leaf(obj):
        flat.append((prefix or "output", obj))
        return
    if isinstance(obj, Mapping):  # dicts and Hugging Face ModelOutput, in insertion order
        items = [(str(k), v) for k, v in obj.items()]
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        items = list(zip(obj._fields, obj))
    elif isinstance(obj, (tuple, list)):
        items = [(f"output_{i}" if top else str(i), v) for i, v in enumerate(obj)]
    else:
        raise TraceError(
            f"The model returned an object of type {type(obj).__qualname__} at "
            f"'{prefix or 'output'}', which interop cannot flatten into tensors",
            "tensors, or dicts / dataclasses / tuples / lists of them",
            "return tensors from forward (wrap the model in a small module that picks them)"
            + (
                ", or pass use_cache=False to leave the cache out"
                if "Cache" in type(obj).__name__
                else ""
            ),
        )
    for key, value in items:
        _flatten(value, f"{prefix}.{key}" if prefix else key, is_leaf, convert, flat)
