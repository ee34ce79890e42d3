"""Elementwise ONNX ops: arithmetic, math, comparisons, logic, activations, casts."""

from __future__ import annotations

from functools import reduce as fold

import ml_dtypes
import numpy as np
import onnx

from . import op

_UNARY = {
    "Abs": "abs",
    "Neg": "negative",
    "Exp": "exp",
    "Log": "log",
    "Sqrt": "sqrt",
    "Sin": "sin",
    "Cos": "cos",
    "Tan": "tan",
    "Asin": "asin",
    "Acos": "acos",
    "Atan": "atan",
    "Sinh": "sinh",
    "Cosh": "cosh",
    "Tanh": "tanh",
    "Asinh": "asinh",
    "Acosh": "acosh",
    "Atanh": "atanh",
    "Floor": "floor",
    "Ceil": "ceil",
    "Round": "round",
    "Sign": "sign",
    "Erf": "erf",
    "Sigmoid": "sigmoid",
    "Not": "logical_not",
    "BitwiseNot": "bitwise_invert",
}
_BINARY = {
    "Add": "add",
    "Sub": "subtract",
    "Mul": "multiply",
    "Div": "divide",
    "Pow": "pow",
}
_COMPARE = {
    "Equal": "equal",
    "Less": "less",
    "LessOrEqual": "less_equal",
    "Greater": "greater",
    "GreaterOrEqual": "greater_equal",
    "And": "logical_and",
    "Or": "logical_or",
    "Xor": "logical_xor",
    "BitwiseAnd": "bitwise_and",
    "BitwiseOr": "bitwise_or",
    "BitwiseXor": "bitwise_xor",
}


def _register_unary(op_type: str, name: str) -> None:
    op(op_type)(lambda xp, x: xp.unary(name, x))


def _register_binary(op_type: str, name: str) -> None:
    op(op_type)(lambda xp, a, b: getattr(xp, name)(a, b))


def _register_compare(op_type: str, name: str) -> None:
    op(op_type)(lambda xp, a, b: xp.compare(name, a, b))


for _op_type, _name in _UNARY.items():
    _register_unary(_op_type, _name)
for _op_type, _name in _BINARY.items():
    _register_binary(_op_type, _name)
for _op_type, _name in _COMPARE.items():
    _register_compare(_op_type, _name)


@op("Reciprocal")
def reciprocal(xp, x):
    return xp.divide(xp.asarray(1, xp.dtype(x), like=x), x)


@op("Mod")
def mod(xp, a, b, fmod=0):
    # integer Mod with fmod=0 takes the divisor's sign (Python's %); fmod=1 the dividend's (C's fmod)
    return xp.fmod(a, b) if fmod else xp.remainder(a, b)


@op("BitShift")
def bit_shift(xp, x, shift, direction="LEFT"):
    name = "bitwise_left_shift" if direction == "LEFT" else "bitwise_right_shift"
    return xp.compare(name, x, shift)


@op("IsNaN")
def is_nan(xp, x):
    return xp.isnan(x)


@op("IsInf")
def is_inf(xp, x, detect_negative=1, detect_positive=1):
    infinite = xp.isinf(x)
    zero = xp.asarray(0, xp.dtype(x), like=x)
    if not detect_negative:
        infinite = xp.compare("logical_and", infinite, xp.compare("greater", x, zero))
    if not detect_positive:
        infinite = xp.compare("logical_and", infinite, xp.compare("less", x, zero))
    return infinite


@op("Where")
def where(xp, condition, a, b):
    return xp.where(condition, a, b)


def _variadic(name: str):
    return lambda xp, *xs: fold(getattr(xp, name), xs)


op("Max")(_variadic("maximum"))
op("Min")(_variadic("minimum"))
op("Sum")(_variadic("add"))


@op("Mean")
def mean(xp, *xs):
    total = fold(xp.add, xs)
    return xp.divide(total, xp.asarray(len(xs), xp.dtype(total), like=total))


@op("Clip")
def clip(xp, x, low=None, high=None, min=None, max=None):  # noqa: A002  (spec names, opset < 11)
    low = (
        low if low is not None else (None if min is None else xp.asarray(min, xp.dtype(x), like=x))
    )
    high = (
        high
        if high is not None
        else (None if max is None else xp.asarray(max, xp.dtype(x), like=x))
    )
    if low is not None:
        x = xp.maximum(x, low)
    if high is not None:
        x = xp.minimum(x, high)
    return x


def onnx_dtype(to: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(to)))


@op("Cast")
def cast(xp, x, to, saturate=1, round_mode="up"):
    target = onnx_dtype(to)
    if target == np.dtype(ml_dtypes.float8_e8m0fnu) and xp.dtype(x).kind == "f":
        return _to_e8m0(xp, x, saturate, round_mode)
    if saturate and target.name.startswith("float8") and xp.dtype(x).kind == "f":
        # saturate: out-of-range values clamp to ±max of the float8 type
        limit = float(ml_dtypes.finfo(target).max)
        # (the node tests saturate infinities too, E5M2 included; NaN stays NaN)
        x = xp.clip(x, -limit, limit)
    return xp.astype(x, target)


@op("CastLike")
def cast_like(xp, x, like, saturate=1, round_mode="up"):
    target = onnx.helper.np_dtype_to_tensor_dtype(xp.dtype(like))
    return cast(xp, x, target, saturate=saturate, round_mode=round_mode)


def _to_e8m0(xp, x, saturate, round_mode):
    """Float -> float8e8m0 as ONNX defines it (onnx.numpy_helper.to_float8e8m0): the float32
    exponent, rounded by round_mode on the significand; the sign is dropped, 0 is 2^-127,
    NaN and infinity are NaN, and saturate stops rounding up past 2^127 (else NaN). ml_dtypes'
    cast rounds to nearest and makes 0 NaN."""
    if round_mode not in ("up", "down", "nearest"):
        raise ValueError(f"Cast round_mode must be up, down or nearest, not {round_mode!r}")

    def bits_of(value, mask):
        return xp.compare("bitwise_and", value, xp.asarray(mask, np.int32, like=x))

    def nonzero(value):
        return xp.compare("not_equal", value, xp.asarray(0, np.int32, like=x))

    bits = xp.bitcast(xp.astype(x, np.float32), np.int32)
    shifted = xp.compare("bitwise_right_shift", bits, xp.asarray(23, np.int32, like=x))
    exponent = bits_of(shifted, 0xFF)
    finite = xp.compare("not_equal", exponent, xp.asarray(0xFF, np.int32, like=x))
    if round_mode == "up":
        up = nonzero(bits_of(bits, 0x7FFFFF))
    elif round_mode == "nearest":  # guard bit set, and round or sticky bits or a normal number
        low = xp.compare("logical_or", nonzero(bits_of(bits, 0x3FFFFF)), nonzero(exponent))
        up = xp.compare("logical_and", nonzero(bits_of(bits, 0x400000)), low)
    if round_mode != "down":
        up = xp.compare("logical_and", up, finite)
        if saturate:
            below_top = xp.compare("not_equal", exponent, xp.asarray(0xFE, np.int32, like=x))
            up = xp.compare("logical_and", up, below_top)
        exponent = xp.add(exponent, xp.astype(up, np.int32))
    exponent = xp.where(finite, exponent, xp.asarray(0xFF, np.int32, like=x))
    return xp.bitcast(xp.astype(exponent, np.uint8), ml_dtypes.float8_e8m0fnu)


# ------------------------------------------------------------------- activations
@op("Relu")
def relu(xp, x):
    return xp.maximum(x, xp.asarray(0, xp.dtype(x), like=x))


def _scalar(xp, value, like):
    return xp.asarray(value, xp.dtype(like), like=like)


@op("LeakyRelu")
def leaky_relu(xp, x, alpha=0.01):
    return xp.where(
        xp.compare("less", x, _scalar(xp, 0, x)), xp.multiply(x, _scalar(xp, alpha, x)), x
    )


@op("PRelu")
def prelu(xp, x, slope):
    return xp.where(xp.compare("less", x, _scalar(xp, 0, x)), xp.multiply(x, slope), x)


@op("Elu")
def elu(xp, x, alpha=1.0):
    negative = xp.multiply(
        _scalar(xp, alpha, x), xp.subtract(xp.unary("exp", x), _scalar(xp, 1, x))
    )
    return xp.where(xp.compare("less", x, _scalar(xp, 0, x)), negative, x)


@op("Selu")
def selu(xp, x, alpha=1.67326319217681884765625, gamma=1.05070102214813232421875):
    return xp.multiply(_scalar(xp, gamma, x), elu(xp, x, alpha))


@op("Celu")
def celu(xp, x, alpha=1.0):
    scaled = xp.divide(x, _scalar(xp, alpha, x))
    negative = xp.multiply(
        _scalar(xp, alpha, x), xp.subtract(xp.unary("exp", scaled), _scalar(xp, 1, x))
    )
    return xp.add(xp.maximum(x, _scalar(xp, 0, x)), xp.minimum(_scalar(xp, 0, x), negative))


@op("ThresholdedRelu")
def thresholded_relu(xp, x, alpha=1.0):
    return xp.where(xp.compare("greater", x, _scalar(xp, alpha, x)), x, _scalar(xp, 0, x))


@op("HardSigmoid")
def hard_sigmoid(xp, x, alpha=0.2, beta=0.5):
    linear = xp.add(xp.multiply(x, _scalar(xp, alpha, x)), _scalar(xp, beta, x))
    return xp.clip(linear, 0.0, 1.0)


@op("HardSwish")
def hard_swish(xp, x):
    return xp.multiply(x, hard_sigmoid(xp, x, alpha=1 / 6, beta=0.5))


@op("Softplus")
def softplus(xp, x):
    # log(1 + exp(x)) without overflow: x + log1p(exp(-x)) for x > 0, log1p(exp(x)) otherwise.
    # Branches by `where` (not max(x, 0) + log1p(exp(-|x|)), whose two kinks at 0 cancel only
    # in exact arithmetic: each framework's subgradient of max/abs at 0 gave another slope);
    # each branch sees a clamped x so neither overflows, and the slope at 0 is sigmoid(0).
    zero = _scalar(xp, 0, x)
    positive = xp.compare("greater", x, zero)
    above, below = xp.where(positive, x, zero), xp.where(positive, zero, x)

    def log1p_exp(t):
        return xp.unary("log1p", xp.unary("exp", t))

    return xp.where(
        positive, xp.add(above, log1p_exp(xp.unary("negative", above))), log1p_exp(below)
    )


@op("Softsign")
def softsign(xp, x):
    return xp.divide(x, xp.add(_scalar(xp, 1, x), xp.unary("abs", x)))


@op("Mish")
def mish(xp, x):
    return xp.multiply(x, xp.unary("tanh", softplus(xp, x)))


@op("Swish")
def swish(xp, x, alpha=1.0):
    return xp.multiply(x, xp.unary("sigmoid", xp.multiply(x, _scalar(xp, alpha, x))))


@op("Gelu")
def gelu(xp, x, approximate="none"):
    half, one = _scalar(xp, 0.5, x), _scalar(xp, 1, x)
    if approximate == "tanh":
        inner = xp.multiply(
            _scalar(xp, np.sqrt(2 / np.pi), x),
            xp.add(x, xp.multiply(_scalar(xp, 0.044715, x), xp.pow(x, _scalar(xp, 3, x)))),
        )
        return xp.multiply(xp.multiply(half, x), xp.add(one, xp.unary("tanh", inner)))
    erf = xp.unary("erf", xp.multiply(x, _scalar(xp, 1 / np.sqrt(2), x)))
    return xp.multiply(xp.multiply(half, x), xp.add(one, erf))


@op("Shrink")
def shrink(xp, x, bias=0.0, lambd=0.5):
    below = xp.compare("less", x, _scalar(xp, -lambd, x))
    above = xp.compare("greater", x, _scalar(xp, lambd, x))
    zero = _scalar(xp, 0, x)
    return xp.where(
        below,
        xp.add(x, _scalar(xp, bias, x)),
        xp.where(above, xp.subtract(x, _scalar(xp, bias, x)), zero),
    )


@op("Identity")
def identity(xp, x):
    return x


@op("BitCast")
def bit_cast(xp, x, to):
    return xp.bitcast(x, onnx_dtype(to))
