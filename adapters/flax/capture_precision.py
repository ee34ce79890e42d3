"""bfloat16 arithmetic computed in float32, one equation at a time.

ONNX Runtime's CPU kernels take bfloat16 only for data movement and casts (measured on
onnxruntime 1.32: no Add, Tanh, Exp, Conv, ReduceSum... in bfloat16). XLA on CPU computes
bfloat16 elementwise math the same way: each operation in float32, its result rounded to
bfloat16. So an equation that reads or writes bfloat16 and does arithmetic is converted as
the same equation over float32 operands, with its bfloat16 results cast back: every
value the jaxpr declares bfloat16 stays bfloat16 in the graph (inputs, outputs, and what
one equation hands the next), and the rounding per equation is JAX's.

Data movement (reshape, slice, gather, concatenate...) and the primitives whose
converters already handle bfloat16 (convert_element_type, dot_general,
reduce_precision) stay in bfloat16; higher-order primitives (pjit, scan, cond...) are
never widened themselves, their inner equations are, one by one.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

try:  # ml_dtypes ships with jax
    from ml_dtypes import bfloat16 as _bf16

    BFLOAT16: np.dtype | None = np.dtype(_bf16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

# converted without arithmetic, or converters that handle bfloat16 themselves
_KEPT = {
    "convert_element_type", "bitcast_convert_type", "reduce_precision", "dot_general",
    "reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "concatenate",
    "slice", "dynamic_slice", "dynamic_update_slice", "gather", "pad", "rev", "copy",
    "copy_p", "device_put", "iota", "split", "stop_gradient", "optimization_barrier",
    "sharding_constraint", "tile", "stack",
}  # fmt: skip


def _higher_order(eqn: Any) -> bool:
    def holds_jaxpr(v: Any) -> bool:
        if isinstance(v, tuple | list):
            return any(holds_jaxpr(x) for x in v)
        return hasattr(v, "eqns") or hasattr(v, "jaxpr")

    return any(holds_jaxpr(v) for v in eqn.params.values())


def _bf16(var: Any) -> bool:
    return getattr(getattr(var, "aval", None), "dtype", None) == BFLOAT16


def widened(eqn: Any) -> Any | None:
    """A stand-in for `eqn` with every bfloat16 operand, result and dtype parameter in
    float32, or None when `eqn` is converted as it is.

    >>> widened(eqn).outvars[0].aval.dtype      # doctest: +SKIP
    dtype('float32')
    """
    if BFLOAT16 is None or eqn.primitive.name in _KEPT:
        return None
    if not any(_bf16(v) for v in (*eqn.invars, *eqn.outvars)) or _higher_order(eqn):
        return None

    def var(v: Any) -> Any:
        if not _bf16(v):
            return v
        return SimpleNamespace(aval=v.aval.update(dtype=np.dtype(np.float32)))

    params = {k: np.dtype(np.float32) if _is_bf16_dtype(p) else p for k, p in eqn.params.items()}
    return SimpleNamespace(
        primitive=eqn.primitive,
        params=params,
        invars=[var(v) for v in eqn.invars],
        outvars=[var(v) for v in eqn.outvars],
        source_info=eqn.source_info,
        ctx=getattr(eqn, "ctx", None),
        effects=getattr(eqn, "effects", None),
    )


def _is_bf16_dtype(p: Any) -> bool:
    try:
        return isinstance(p, np.dtype | type) and np.dtype(p) == BFLOAT16
    except TypeError:
        return False


def widen_inputs(low: Any, eqn: Any, inputs: list[Any]) -> list[Any]:
    """The equation's inputs with the bfloat16 ones cast to float32."""
    return [low.cast(x, np.float32) if _bf16(v) else x for v, x in zip(eqn.invars, inputs)]


def narrow_results(low: Any, eqn: Any, wide: Any, results: list[Any]) -> list[Any]:
    """The widened converter's results, the bfloat16 ones of `eqn` cast back."""
    out = []
    for var, w, value in zip(eqn.outvars, wide.outvars, results, strict=False):
        if _bf16(var):
            if value.dtype is None:
                low.type_value(value, w.aval)
            value = low.cast(value, BFLOAT16)
        out.append(value)
    return out
