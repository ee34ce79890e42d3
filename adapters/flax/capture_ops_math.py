"""Converters for the primitives ONNX has no single op for: bit shifts and counts, erf_inv,
reduce_precision, sort (stable, any number of keys), cumulative max / min / product /
logsumexp, cbrt and atan2.

Each is written with ONNX ops whose results match XLA's to float rounding: erf_inv is
the same polynomial (Giles 2010) XLA evaluates; sort is ONNX TopK, whose ties keep index
order as the ONNX spec requires, which is JAX's stable sort; cumulative ops are a
log-step (Hillis-Steele) scan: unrolled over a static axis, one ONNX Loop over a
symbolic one.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from interop.errors import UnsupportedOpError

from . import register_primitive as reg
from .capture_lowering import is_static
from .capture_ops_basic import typed_op

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _unsupported(low, detail, fix):
    return UnsupportedOpError(
        low.primitive, adapter="flax", layer=low.scope, location=low.location, detail=detail,
        fix=fix,
    )  # fmt: skip


# ---------------------------------------------------------------------- bits
def _shift(direction: str, arithmetic: bool = False):
    def convert(low, eqn, x, amount):
        dtype = np.dtype(eqn.invars[0].aval.dtype)
        bits = dtype.itemsize * 8
        unsigned = _UNSIGNED[dtype.itemsize]
        if dtype.itemsize == 8:
            raise _unsupported(low, "a 64-bit shift", "shift 32-bit integers")
        # computed on 32 bits (ONNX Runtime's Where has no 16-bit kernels): sign-extended for
        # an arithmetic shift, zero-extended otherwise; the cast back keeps the low bits
        wide = low.cast(x, np.int32) if arithmetic else low.cast(x, unsigned)
        u = low.cast(wide, np.uint32) if dtype.itemsize < 4 else low.cast(x, unsigned)
        k = low.cast(amount, np.int64)
        in_range = low.op(
            "And",
            [
                low.op("GreaterOrEqual", [k, low.const(np.int64(0))]),
                low.op("Less", [k, low.const(np.int64(bits))]),
            ],
        )
        if arithmetic:  # x >> k rounds down: shift the complement of negative values
            negative = low.op("Less", [x, low.const(0, dtype)])
            u = low.op("Where", [negative, low.op("BitwiseNot", [u]), u])
            k = low.op("Min", [low.op("Max", [k, low.const(np.int64(0))]),
                               low.const(np.int64(bits - 1))])  # fmt: skip
        work = np.uint32 if dtype.itemsize < 4 else unsigned
        shifted = low.op("BitShift", [u, low.cast(k, work)], {"direction": direction})
        if arithmetic:
            shifted = low.op("Where", [negative, low.op("BitwiseNot", [shifted]), shifted])
        else:  # XLA shifts by >= the bit width (or < 0) give 0
            shifted = low.op("Where", [in_range, shifted, low.const(0, work)])
        return low.cast(low.cast(shifted, unsigned), dtype)

    return convert


reg("shift_left", _shift("LEFT"))
reg("shift_right_logical", _shift("RIGHT"))
reg("shift_right_arithmetic", _shift("RIGHT", arithmetic=True))


def _popcount(low, x, dtype):
    """Set bits of each element, as int64 (SWAR with divisions by powers of two)."""
    if np.dtype(dtype).itemsize > 4:
        raise _unsupported(low, "a 64-bit population count", "count bits of 32-bit integers")
    v = low.cast(low.cast(x, _UNSIGNED[np.dtype(dtype).itemsize]), np.int64)

    def c(n):
        return low.const(np.int64(n))

    def shr(value, k):
        return low.op("Div", [value, c(1 << k)])

    v = low.op("Sub", [v, low.op("BitwiseAnd", [shr(v, 1), c(0x55555555)])])
    v = low.op("Add", [low.op("BitwiseAnd", [v, c(0x33333333)]),
                       low.op("BitwiseAnd", [shr(v, 2), c(0x33333333)])])  # fmt: skip
    v = low.op("BitwiseAnd", [low.op("Add", [v, shr(v, 4)]), c(0x0F0F0F0F)])
    v = low.op("Add", [v, shr(v, 8)])
    v = low.op("Add", [v, shr(v, 16)])
    return low.op("BitwiseAnd", [v, c(0x3F)])


@reg("population_count")
def convert_population_count(low, eqn, x):
    dtype = eqn.invars[0].aval.dtype
    return low.cast(_popcount(low, x, dtype), dtype)


@reg("clz")
def convert_clz(low, eqn, x):
    dtype = np.dtype(eqn.invars[0].aval.dtype)
    bits = dtype.itemsize * 8
    v = low.cast(low.cast(x, _UNSIGNED[dtype.itemsize]), np.int64)
    for k in (1, 2, 4, 8, 16):  # smear the highest set bit downwards
        if k < bits:
            v = low.op("BitwiseOr", [v, low.op("Div", [v, low.const(np.int64(1 << k))])])
    count = low.op(
        "Sub", [low.const(np.int64(bits)), _popcount(low, v, np.int64 if bits > 32 else np.uint32)]
    )
    return low.cast(count, dtype)


# ---------------------------------------------------------------------- float specials
_ERFINV_SMALL = [2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06,
                 0.00021858087, -0.00125372503, -0.00417768164, 0.246640727, 1.50140941]  # fmt: skip
_ERFINV_LARGE = [-0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844,
                 0.00573950773, -0.0076224613, 0.00943887047, 1.00167406, 2.83297682]  # fmt: skip


@reg("erf_inv")
def convert_erf_inv(low, eqn, x):
    dtype = eqn.invars[0].aval.dtype

    def c(v):
        return low.const(v, dtype)

    one = c(1.0)
    w = low.op("Neg", [low.op("Log", [low.op("Mul", [low.op("Sub", [one, x]),
                                                     low.op("Add", [one, x])])])])  # fmt: skip

    def poly(t, coefficients):
        p = c(coefficients[0])
        for k in coefficients[1:]:
            p = low.op("Add", [c(k), low.op("Mul", [p, t])])
        return p

    small = poly(low.op("Sub", [w, c(2.5)]), _ERFINV_SMALL)
    large = poly(low.op("Sub", [low.op("Sqrt", [w]), c(3.0)]), _ERFINV_LARGE)
    p = low.op("Where", [low.op("Less", [w, c(5.0)]), small, large])
    y = low.op("Mul", [p, x])
    edge = low.op("Equal", [low.op("Abs", [x]), one])  # erf_inv(+-1) = +-inf
    return low.op("Where", [edge, low.op("Mul", [x, c(np.inf)]), y])


@reg("reduce_precision")
def convert_reduce_precision(low, eqn, x):
    dtype = np.dtype(eqn.invars[0].aval.dtype)
    e, m = int(eqn.params["exponent_bits"]), int(eqn.params["mantissa_bits"])
    info = np.finfo(dtype)
    if e >= info.nexp and m >= info.nmant:
        return low.op("Identity", [x])
    narrow = {(8, 7): "bfloat16", (5, 10): np.float16}.get((e, m))
    if narrow is None:
        raise _unsupported(low, f"rounding to {e} exponent / {m} mantissa bits",
                           "round to bfloat16 (8, 7) or float16 (5, 10)")  # fmt: skip
    import ml_dtypes

    target = ml_dtypes.bfloat16 if narrow == "bfloat16" else narrow
    return low.cast(low.cast(x, target), dtype)


@reg("cbrt")
def convert_cbrt(low, eqn, x):
    dtype = eqn.invars[0].aval.dtype
    root = low.op("Pow", [low.op("Abs", [x]), low.const(1.0 / 3.0, dtype)])
    return low.op("Mul", [low.op("Sign", [x]), root])


@reg("atan2")
def convert_atan2(low, eqn, y, x):
    dtype = eqn.invars[0].aval.dtype
    zero = low.const(0.0, dtype)
    base = low.op("Atan", [low.op("Div", [y, x])])
    # x < 0: add pi with the sign of y (y = +-0 follows its sign bit via Sign -> treat 0 as +)
    y_neg = low.op("Less", [y, zero])
    pi = low.op("Where", [y_neg, low.const(-np.pi, dtype), low.const(np.pi, dtype)])
    result = low.op("Where", [low.op("Less", [x, zero]), low.op("Add", [base, pi]), base])
    # x == 0: +-pi/2 by the sign of y (0 when y == 0)
    half = low.op("Mul", [low.op("Sign", [y]), low.const(np.pi / 2, dtype)])
    return low.op("Where", [low.op("Equal", [x, zero]), half, result])


# ---------------------------------------------------------------------- sort
def _ascending(low, key, dtype, axis, n):
    """Indices (int64) that sort `key` ascending along `axis`, ties in index order."""
    if np.dtype(dtype) == np.bool_:
        key, dtype = low.cast(key, np.uint8), np.uint8
    _, indices = typed_op(low, "TopK", [key, n], dtype, {"axis": axis, "largest": 0, "sorted": 1},
                          outputs=2, back=False, data=1)  # fmt: skip
    return indices


@reg("sort")
def convert_sort(low, eqn, *operands):
    axis = int(eqn.params["dimension"])
    num_keys = int(eqn.params.get("num_keys", 1))
    n = low.shape([eqn.invars[0].aval.shape[axis]])
    dtypes = [v.aval.dtype for v in eqn.invars]
    order = _ascending(low, operands[num_keys - 1], dtypes[num_keys - 1], axis, n)
    # lexicographic keys: stable sorts from the last key to the first
    for k in range(num_keys - 2, -1, -1):
        key = low.op("GatherElements", [operands[k], order], {"axis": axis})
        step = _ascending(low, key, dtypes[k], axis, n)
        order = low.op("GatherElements", [order, step], {"axis": axis})
    return [low.op("GatherElements", [x, order], {"axis": axis}) for x in operands]


# ---------------------------------------------------------------------- cumulative
def _identity(kind, dtype):
    dtype = np.dtype(dtype)
    if kind == "prod":
        return 1
    big = np.inf if dtype.kind == "f" else np.iinfo(dtype).max
    if kind == "logsumexp":
        return np.finfo(dtype).min  # finite: logaddexp of two of them stays finite
    return big if kind == "min" else (-big if dtype.kind == "f" else np.iinfo(dtype).min)


def _combine(low, kind, a, b, dtype):
    if kind == "logsumexp":
        hi = low.op("Max", [a, b])
        lo = low.op("Min", [a, b])
        return low.op("Add", [hi, low.op("Log", [low.op("Add", [
            low.const(1.0, dtype), low.op("Exp", [low.op("Sub", [lo, hi])])])])])  # fmt: skip
    op_type = {"prod": "Mul", "max": "Max", "min": "Min"}[kind]
    return typed_op(low, op_type, [a, b], dtype)


def _shift_combine(low, kind, y, step, n, axis, rank, work):
    """One log-step: y combined with y shifted by `step` along `axis` (identity fill)."""
    pads = low.op("Concat", [low.ints([0] * axis), step, low.ints([0] * (2 * rank - axis - 1))],
                  {"axis": 0}) if not isinstance(step, int) else None  # fmt: skip
    if pads is None:
        pads = [0] * (2 * rank)
        pads[axis] = step
        pads, end = low.ints(pads), low.ints([int(n) - step])
    else:
        end = low.op("Sub", [low.dim(n), step])
    head = low.op("Slice", [y, low.ints([0]), end, low.ints([axis])])
    fill = low.const(_identity(kind, work), work)
    shifted = low.op("Pad", [head, pads, fill], {"mode": "constant"})
    return _combine(low, kind, y, shifted, work)


def _symbolic_scan(low, kind, y, aval, axis, n, work):
    """The log-step scan over a symbolic axis: one ONNX Loop carrying (step, y) while
    step < n, doubling step (the same combination order as the static unrolled scan)."""
    rank = len(aval.shape)
    size = low.dim(n)
    one = low.ints([1])
    first = low.op("Squeeze", [low.op("Less", [one, size]), low.ints([0])])
    iteration = ir.Value(
        name=low.fresh("iter"), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
    )
    cond_in = ir.Value(
        name=low.fresh("cond"), type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([])
    )
    step_in = ir.Value(
        name=low.fresh("step"), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1])
    )
    y_in = low.new_input(aval.update(dtype=np.dtype(work)), "cumulative")
    scope = low.scope

    def body():
        low.scope = scope
        out = _shift_combine(low, kind, y_in, step_in, n, axis, rank, work)
        step = low.op("Mul", [step_in, low.ints([2])])
        again = low.op("Squeeze", [low.op("Less", [step, size]), low.ints([0])])
        return [again, step, out]

    graph = low.subgraph(low.fresh("cumulative_body"), [iteration, cond_in, step_in, y_in], body)
    return low.op("Loop", [None, first, one, y], {"body": graph}, outputs=2)[1]


def _cumulative(kind):
    def convert(low, eqn, x):
        axis = int(eqn.params["axis"])
        reverse = bool(eqn.params.get("reverse"))
        aval = eqn.invars[0].aval
        shape, dtype = aval.shape, aval.dtype
        n = shape[axis]
        big = np.iinfo(np.int64).max
        flip = [low.ints([-1]), low.ints([-big]), low.ints([axis]), low.ints([-1])]
        y = low.op("Slice", [x, *flip]) if reverse else x
        if np.dtype(dtype) == np.bool_:
            y, work = low.cast(y, np.uint8), np.uint8
        else:
            work = dtype
        if not is_static(n):  # a sequence axis: the same scan as a Loop of ceil(log2 n) steps
            y = _symbolic_scan(low, kind, y, aval, axis, n, work)
        step = 1
        while is_static(n) and step < int(n):
            y = _shift_combine(low, kind, y, step, n, axis, len(shape), work)
            step *= 2
        if np.dtype(dtype) == np.bool_:
            y = low.cast(y, np.bool_)
        return low.op("Slice", [y, *flip]) if reverse else low.op("Identity", [y])

    return convert


reg("cumprod", _cumulative("prod"))
reg("cummax", _cumulative("max"))
reg("cummin", _cumulative("min"))
reg("cumlogsumexp", _cumulative("logsumexp"))
