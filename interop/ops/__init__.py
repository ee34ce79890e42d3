"""ONNX op semantics, written once against a backend namespace ``xp``.

Each op is a function ``(xp, *inputs, **attributes)`` registered under its ONNX op type
in `SEMANTICS`; missing optional inputs arrive as ``None``, attributes keep their spec
names, and an op with several outputs returns a tuple. The families live in their own
modules (elementwise, linalg, nn, shape, reduce, control, ...). Ops outside the default
domain are registered as ``"<domain>::<op type>"`` (see `semantics_key`).

>>> import numpy as np
>>> from interop.backend import numpy_backend
>>> SEMANTICS.lookup("Relu")(numpy_backend, np.array([-1.0, 2.0])).tolist()
[0.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from interop.registry import Registry

SEMANTICS: Registry[Callable[..., Any]] = Registry("emit", adapter="semantics")


def op(*op_types: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register one function as the semantics of one or more ONNX op types."""

    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        for op_type in op_types:
            SEMANTICS.register(op_type, function)
        return function

    return decorator


def semantics_key(op_type: str, domain: str = "") -> str:
    """The SEMANTICS key of an op: its type in the default domain, "domain::type" elsewhere."""
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def unsupported(op_type: str, detail: str, fix: str) -> Exception:
    """The error for an input or attribute case the semantics refuse instead of computing it."""
    from interop.errors import UnsupportedOpError

    return UnsupportedOpError(op_type, direction="emit", detail=detail, fix=fix)


def normalize_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def normalize_axes(axes: Any, rank: int) -> tuple[int, ...]:
    return tuple(sorted(normalize_axis(int(a), rank) for a in axes))


from . import (  # noqa: E402,F401  (registers the ops)
    control,
    elementwise,
    image,
    linalg,
    nn,
    quantized,
    recurrent,
    reduce,
    shape,
    signal,
    spatial,
    training,
)
