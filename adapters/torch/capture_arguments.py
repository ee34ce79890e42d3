"""A module call's arguments as torch.onnx names its graph inputs, leaf by leaf.

torch.onnx names the leaves of nested arguments ``<argument>_<key or index>`` (a dict
``batch`` gives ``batch_x``); the capture (feeding a second input, widening dims) and the
dim check (resized example inputs) both rebuild a call with each leaf replaced.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any


def map_leaves(name: str, value: Any, fn: Callable[[str, Any], Any]) -> Any:
    """The same structure with every leaf replaced by ``fn(leaf name, leaf)``."""
    if isinstance(value, Mapping):
        return {key: map_leaves(f"{name}_{key}", item, fn) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(map_leaves(f"{name}_{i}", item, fn) for i, item in enumerate(value))
    return fn(name, value)


def map_arguments(
    bound: inspect.BoundArguments, signature: inspect.Signature, fn: Callable[[str, Any], Any]
) -> dict[str, Any]:
    """Per argument, its structure with ``fn`` applied to the leaves (``*args`` leaves named
    ``args_0``..., ``**kwargs`` leaves by their keys)."""
    mapped: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            mapped[name] = tuple(map_leaves(f"{name}_{i}", v, fn) for i, v in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            mapped[name] = {k: map_leaves(k, v, fn) for k, v in value.items()}
        else:
            mapped[name] = map_leaves(name, value, fn)
    return mapped
