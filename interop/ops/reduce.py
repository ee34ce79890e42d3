"""Reductions and scans: Reduce*, ArgMax/ArgMin, CumSum/CumProd."""

from __future__ import annotations

import numpy as np

from . import normalize_axes, normalize_axis, op
from .shape import ints

# value of a reduction over an empty set, per base reduction
_EMPTY = {"sum": 0.0, "prod": 1.0, "max": -np.inf, "min": np.inf, "mean": np.nan}


def _axes(xp, x, axes, noop_with_empty_axes):
    rank = len(xp.shape(x))
    axes = ints(xp, axes) if axes is not None else []
    if not axes:
        return () if noop_with_empty_axes else tuple(range(rank))
    return normalize_axes(axes, rank)


def _reduce(xp, name, x, axes, keepdims):
    dims = xp.shape(x)
    if any(dims[a] == 0 for a in axes):
        out = (
            [1 if i in axes else d for i, d in enumerate(dims)]
            if keepdims
            else [d for i, d in enumerate(dims) if i not in axes]
        )
        value = _EMPTY[name]
        if xp.dtype(x).kind == "b":  # -inf / inf cast to bool are both True: use False / True
            value = name == "min"
        elif xp.dtype(x).kind in "iu" and not np.isfinite(value):
            info = np.iinfo(xp.dtype(x))
            value = info.min if value < 0 else info.max
        return xp.full(out, value, xp.dtype(x), like=x)
    return xp.reduce(name, x, axes, bool(keepdims))


def _reduction(op_type: str, base: str, before=None, after=None):
    def reduce_op(xp, x, axes=None, keepdims=1, noop_with_empty_axes=0):
        chosen = _axes(xp, x, axes, noop_with_empty_axes)
        value = before(xp, x) if before else x
        if not chosen:
            return after(xp, value) if after else value
        out = _reduce(xp, base, value, chosen, keepdims)
        return after(xp, out) if after else out

    reduce_op.__name__ = f"reduce_{base}_{op_type}"
    op(op_type)(reduce_op)


_reduction("ReduceSum", "sum")
_reduction("ReduceMean", "mean")
_reduction("ReduceMax", "max")
_reduction("ReduceMin", "min")
_reduction("ReduceProd", "prod")
_reduction("ReduceL1", "sum", before=lambda xp, x: xp.unary("abs", x))
_reduction(
    "ReduceL2",
    "sum",
    before=lambda xp, x: xp.multiply(x, x),
    after=lambda xp, x: xp.unary("sqrt", x),
)
_reduction("ReduceSumSquare", "sum", before=lambda xp, x: xp.multiply(x, x))
_reduction("ReduceLogSum", "sum", after=lambda xp, x: xp.unary("log", x))


@op("ReduceLogSumExp")
def reduce_log_sum_exp(xp, x, axes=None, keepdims=1, noop_with_empty_axes=0):
    chosen = _axes(xp, x, axes, noop_with_empty_axes)
    if not chosen:
        return x
    if any(xp.shape(x)[a] == 0 for a in chosen):
        return xp.unary("log", _reduce(xp, "sum", x, chosen, keepdims))
    # subtract the max first so exp cannot overflow
    peak = xp.reduce("max", x, chosen, True)
    total = xp.reduce("sum", xp.unary("exp", xp.subtract(x, peak)), chosen, True)
    out = xp.add(xp.unary("log", total), peak)
    if not keepdims:
        out = xp.reshape(out, [d for i, d in enumerate(xp.shape(x)) if i not in chosen])
    return out


def _arg(name):
    def arg_op(xp, x, axis=0, keepdims=1, select_last_index=0):
        axis = normalize_axis(axis, len(xp.shape(x)))
        if select_last_index:  # search the reversed axis, then map the index back
            size = xp.shape(x)[axis]
            found = getattr(xp, name)(xp.flip(x, [axis]), axis, bool(keepdims))
            return xp.subtract(xp.asarray(size - 1, np.int64, like=found), found)
        return getattr(xp, name)(x, axis, bool(keepdims))

    return arg_op


op("ArgMax")(_arg("argmax"))
op("ArgMin")(_arg("argmin"))


def _cumulative(name):
    def cumulative_op(xp, x, axis, exclusive=0, reverse=0):
        axis_ = normalize_axis(int(np.asarray(xp.to_numpy(axis)).reshape(-1)[0]), len(xp.shape(x)))
        if reverse:
            x = xp.flip(x, [axis_])
        out = xp.cumulative(name, x, axis_)
        if exclusive:  # shift by one along the axis, starting from the identity
            identity = xp.full(
                [1 if i == axis_ else d for i, d in enumerate(xp.shape(x))],
                0 if name == "cumsum" else 1,
                xp.dtype(x),
                like=x,
            )
            body = xp.getitem(out, (slice(None),) * axis_ + (slice(0, xp.shape(x)[axis_] - 1),))
            out = xp.concat([identity, body], axis_)
        return xp.flip(out, [axis_]) if reverse else out

    return cumulative_op


op("CumSum")(_cumulative("cumsum"))
op("CumProd")(_cumulative("cumprod"))
