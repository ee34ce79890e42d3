"""``keras.ops`` math converters: elementwise functions, reductions, sorting and
cumulative ops, activations and normalizations (those layers such as PReLU,
RMSNormalization and GroupNormalization record when opened by a symbolic call).

Same conventions as `capture_ops.py`: each converter receives the recorded Operation
(its static arguments as attributes) and the call's arguments (Tensors for symbolic
values, Python values or Keras variables otherwise).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from . import CAPTURE_OPS, register_op
from .capture_layers import activation, relu
from .capture_lowering import Builder, Tensor, onnx_dtype
from .capture_ops import dtype_of, flat, static_axes, value


def _f(b: Builder, x: float) -> ir.Value:
    return b.const(np.float32(x))


def _rank(x: Any) -> int:
    return x.rank if isinstance(x, Tensor) else len(np.shape(x))


# ---------------------------------------------------------------------------- elementwise
for _name, _op in {"Tan": "Tan", "Sinh": "Sinh", "Cosh": "Cosh", "Arcsin": "Asin",
                   "Arccos": "Acos", "Arctan": "Atan", "Arcsinh": "Asinh", "Arccosh": "Acosh",
                   "Arctanh": "Atanh", "Isnan": "IsNaN", "Trunc": "Identity",
                   "StopGradient": "Identity", "Copy": "Identity", "HardSwish": "HardSwish",
                   "HardSilu": "HardSwish", "Softsign": "Softsign", "Selu": "Selu"}.items():  # fmt: skip

    def _make(op_type: str) -> Any:
        def convert(b: Builder, op: Any, x: Any) -> ir.Value:
            if op_type == "Identity" and type(op).__name__ == "Trunc":
                v = value(b, x)  # trunc: floor towards zero
                return b.op("Where", [b.op("Less", [v, _f(b, 0)]), b.op("Ceil", [v]), b.op("Floor", [v])])  # fmt: skip
            return b.op(op_type, [value(b, x)])

        return convert

    CAPTURE_OPS.register(_name, _make(_op))


def _unary(fn: Any) -> Any:
    def convert(b: Builder, op: Any, x: Any) -> ir.Value:
        return fn(b, op, value(b, x))

    return convert


_SIMPLE = {
    "Log1p": lambda b, op, v: b.op("Log", [b.op("Add", [v, _f(b, 1)])]),
    "Expm1": lambda b, op, v: b.op("Sub", [b.op("Exp", [v]), _f(b, 1)]),
    "Log2": lambda b, op, v: b.op("Div", [b.op("Log", [v]), _f(b, math.log(2))]),
    "Log10": lambda b, op, v: b.op("Div", [b.op("Log", [v]), _f(b, math.log(10))]),
    "Exp2": lambda b, op, v: b.op("Pow", [_f(b, 2), v]),
    "Erfc": lambda b, op, v: b.op("Sub", [_f(b, 1), b.op("Erf", [v])]),
    "Isinf": lambda b, op, v: b.op("IsInf", [v]),
    "Isfinite": lambda b, op, v: b.op(
        "Not", [b.op("Or", [b.op("IsInf", [v]), b.op("IsNaN", [v])])]
    ),
    "Round": lambda b, op, v: _round(b, v, int(op.decimals)),
    "LeakyRelu": lambda b, op, v: b.op("LeakyRelu", [v], {"alpha": float(op.negative_slope)}),
    "Elu": lambda b, op, v: b.op("Elu", [v], {"alpha": float(op.alpha)}),
    "Celu": lambda b, op, v: b.op("Celu", [v], {"alpha": float(op.alpha)}),
    "HardSigmoid": lambda b, op, v: activation(b, v, "hard_sigmoid"),
    "HardTanh": lambda b, op, v: b.op("Clip", [v, _f(b, -1), _f(b, 1)]),
    "LogSigmoid": lambda b, op, v: b.op("Neg", [b.op("Softplus", [b.op("Neg", [v])])]),
    "Mish": lambda b, op, v: activation(b, v, "mish"),
    "TanhShrink": lambda b, op, v: b.op("Sub", [v, b.op("Tanh", [v])]),
    "HardShrink": lambda b, op, v: b.op("Shrink", [v], {"lambd": float(op.threshold), "bias": 0.0}),
    "SoftShrink": lambda b, op, v: b.op(
        "Shrink", [v], {"lambd": float(op.threshold), "bias": float(op.threshold)}
    ),  # fmt: skip
    "Squareplus": lambda b, op, v: b.op(
        "Div",
        [
            b.op(
                "Add", [v, b.op("Sqrt", [b.op("Add", [b.op("Mul", [v, v]), _f(b, float(op.b))])])]
            ),
            _f(b, 2),
        ],
    ),  # fmt: skip
    "SparsePlus": lambda b, op, v: _sparse_plus(b, v),
    "SparseSigmoid": lambda b, op, v: b.op(
        "Clip", [b.op("Mul", [b.op("Add", [v, _f(b, 1)]), _f(b, 0.5)]), _f(b, 0), _f(b, 1)]
    ),  # fmt: skip
    "Threshold": lambda b, op, v: b.op(
        "Where",
        [b.op("Greater", [v, _f(b, float(op.threshold))]), v, _f(b, float(op.default_value))],
    ),  # fmt: skip
    "Ravel": lambda b, op, v: flat(b, v),
    "ZerosLike": lambda b, op, v: _like(b, op, v, 0),
    "OnesLike": lambda b, op, v: _like(b, op, v, 1),
}
for _name, _fn in _SIMPLE.items():
    CAPTURE_OPS.register(_name, _unary(_fn))


def _round(b: Builder, v: ir.Value, decimals: int) -> ir.Value:
    if not decimals:
        return b.op("Round", [v])  # half to even, as numpy
    scale = _f(b, 10.0**decimals)
    return b.op("Div", [b.op("Round", [b.op("Mul", [v, scale])]), scale])


def _sparse_plus(b: Builder, v: ir.Value) -> ir.Value:
    quad = b.op("Mul", [b.op("Mul", [b.op("Add", [v, _f(b, 1)]), b.op("Add", [v, _f(b, 1)])]), _f(b, 0.25)])  # fmt: skip
    mid = b.op("Where", [b.op("LessOrEqual", [v, _f(b, -1)]), _f(b, 0), quad])
    return b.op("Where", [b.op("GreaterOrEqual", [v, _f(b, 1)]), v, mid])


def _like(b: Builder, op: Any, v: ir.Value, fill: float) -> ir.Value:
    return _filled(b, op, v, b.const(np.float32(fill)))


def _filled(b: Builder, op: Any, v: ir.Value, fill: ir.Value) -> ir.Value:
    """A tensor of v's shape holding `fill` (in op.dtype, else v's type)."""
    dtype = getattr(op, "dtype", None)
    fill = (
        b.op("CastLike", [fill, v])
        if dtype is None
        else b.op("Cast", [fill], {"to": onnx_dtype(dtype)})
    )
    return b.op("Expand", [fill, b.op("Shape", [v])])


@register_op("FullLike")
def import_full_like(b: Builder, op: Any, x: Any, fill_value: Any) -> ir.Value:
    """ops.full_like: x's shape, filled with fill_value."""
    return _filled(b, op, value(b, x), value(b, fill_value))


def _binary(fn: Any) -> Any:
    def convert(b: Builder, op: Any, x1: Any, x2: Any) -> ir.Value:
        dtype = dtype_of(x1, x2)
        return fn(b, value(b, x1, dtype), value(b, x2, dtype), dtype)

    return convert


def _floor_divide(b: Builder, x: ir.Value, y: ir.Value, dtype: str) -> ir.Value:
    if dtype.startswith("int"):  # integer Div truncates; numpy floors
        xf, yf = (b.op("Cast", [v], {"to": ir.DataType.DOUBLE}) for v in (x, y))
        return b.op("Cast", [b.op("Floor", [b.op("Div", [xf, yf])])], {"to": onnx_dtype(dtype)})
    return b.op("Floor", [b.op("Div", [x, y])])


def _mod(b: Builder, x: ir.Value, y: ir.Value, dtype: str) -> ir.Value:
    return (
        b.op("Mod", [x, y], {"fmod": 0 if dtype.startswith("int") else 1})
        if dtype.startswith("int")
        else b.op("Sub", [x, b.op("Mul", [y, b.op("Floor", [b.op("Div", [x, y])])])])
    )


for _name, _fn in {
    "FloorDivide": _floor_divide,
    "Mod": _mod,
    "LogicalXor": lambda b, x, y, d: b.op("Xor", [b.op("Cast", [x], {"to": ir.DataType.BOOL}),
                                                  b.op("Cast", [y], {"to": ir.DataType.BOOL})]),
    "DivideNoNan": lambda b, x, y, d: b.op("Where", [b.op("Equal", [y, b.op("CastLike", [b.const(np.float32(0)), y])]),
                                                     b.op("CastLike", [b.const(np.float32(0)), x]), b.op("Div", [x, y])]),
    "Arctan2": lambda b, x, y, d: _atan2(b, x, y),
    "Logaddexp": lambda b, x, y, d: _logaddexp(b, x, y),
    "Hypot": lambda b, x, y, d: b.op("Sqrt", [b.op("Add", [b.op("Mul", [x, x]), b.op("Mul", [y, y])])]),
    "Outer": lambda b, x, y, d: b.op("Mul", [b.op("Unsqueeze", [flat(b, x), b.ints([1])]),
                                            b.op("Unsqueeze", [flat(b, y), b.ints([0])])]),
    "Dot": lambda b, x, y, d: b.op("MatMul", [x, y]),
    "Fmod": lambda b, x, y, d: b.op("Mod", [x, y], {"fmod": 1}),
}.items():  # fmt: skip
    CAPTURE_OPS.register(_name, _binary(_fn))


def _atan2(b: Builder, y: ir.Value, x: ir.Value) -> ir.Value:
    base = b.op("Atan", [b.op("Div", [y, x])])
    pi = _f(b, math.pi)
    neg_x = b.op("Less", [x, _f(b, 0)])
    shift = b.op("Where", [b.op("Less", [y, _f(b, 0)]), b.op("Neg", [pi]), pi])
    out = b.op("Where", [neg_x, b.op("Add", [base, shift]), base])
    zero_x = b.op("Equal", [x, _f(b, 0)])
    half = b.op("Mul", [b.op("Sign", [y]), _f(b, math.pi / 2)])
    return b.op("Where", [zero_x, half, out])


def _logaddexp(b: Builder, x: ir.Value, y: ir.Value) -> ir.Value:
    high = b.op("Max", [x, y])
    diff = b.op("Neg", [b.op("Abs", [b.op("Sub", [x, y])])])
    return b.op("Add", [high, b.op("Softplus", [diff])])


# ---------------------------------------------------------------------------- reductions
def _reduce(fn: Any) -> Any:
    def convert(b: Builder, op: Any, x: Any, *_: Any) -> ir.Value:
        axes = static_axes(op.axis)
        keep = int(bool(getattr(op, "keepdims", False)))
        return fn(b, value(b, x), axes, keep)

    return convert


def _reduce_op(
    b: Builder, op_type: str, v: ir.Value, axes: list[int] | None, keep: int
) -> ir.Value:
    inputs = [v] if axes is None else [v, b.ints(axes)]
    return b.op(op_type, inputs, {"keepdims": keep})


def _var(b: Builder, v: ir.Value, axes: list[int] | None, keep: int) -> ir.Value:
    mean = _reduce_op(b, "ReduceMean", v, axes, 1)
    centered = b.op("Sub", [v, mean])
    return _reduce_op(b, "ReduceMean", b.op("Mul", [centered, centered]), axes, keep)


for _name, _fn in {
    "Var": _var,
    "Std": lambda b, v, a, k: b.op("Sqrt", [_var(b, v, a, k)]),
    "Logsumexp": lambda b, v, a, k: _reduce_op(b, "ReduceLogSumExp", v, a, k),
    "Amax": lambda b, v, a, k: _reduce_op(b, "ReduceMax", v, a, k),
    "Amin": lambda b, v, a, k: _reduce_op(b, "ReduceMin", v, a, k),
    "CountNonzero": lambda b, v, a, k: _reduce_op(
        b, "ReduceSum", b.op("Cast", [b.op("Not", [b.op("Equal", [v, b.op("CastLike", [b.const(np.float32(0)), v])])])],
                             {"to": ir.DataType.INT32}), a, 0),
}.items():  # fmt: skip
    CAPTURE_OPS.register(_name, _reduce(_fn))


@register_op("Average")
def import_average(b: Builder, op: Any, x: Any, weights: Any = None) -> ir.Value:
    """ops.average with optional weights."""
    v, axes = value(b, x), static_axes(op.axis)
    if weights is None:
        return _reduce_op(b, "ReduceMean", v, axes, 0)
    w = value(b, weights)
    if axes is not None and isinstance(weights, Tensor) and weights.rank == 1 and x.rank > 1:
        shape = [1] * x.rank
        shape[axes[0]] = -1
        w = b.op("Reshape", [w, b.ints(shape)])
    total = _reduce_op(b, "ReduceSum", b.op("Mul", [v, w]), axes, 0)
    full = b.op("Expand", [w, b.op("Shape", [v])])  # weights counted once per element of x
    return b.op("Div", [total, _reduce_op(b, "ReduceSum", full, axes, 0)])


def _arg(op_type: str) -> Any:
    def convert(b: Builder, op: Any, x: Any) -> ir.Value:
        v = value(b, x)
        if op.axis is None:
            v, axis = flat(b, v), 0
        else:
            axis = int(op.axis)
        keep = int(bool(getattr(op, "keepdims", False)))
        out = b.op(op_type, [v], {"axis": axis, "keepdims": keep, "select_last_index": 0})
        return b.op("Cast", [out], {"to": ir.DataType.INT32})

    return convert


CAPTURE_OPS.register("Argmax", _arg("ArgMax"))
CAPTURE_OPS.register("Argmin", _arg("ArgMin"))


def _axis_length(b: Builder, v: ir.Value, axis: int) -> ir.Value:
    return b.op("Shape", [v], {"start": axis, "end": axis + 1} if axis != -1 else {"start": -1})


def _topk(
    b: Builder, v: ir.Value, k: ir.Value, axis: int, largest: int
) -> tuple[ir.Value, ir.Value]:
    return b.op("TopK", [v, k], {"axis": axis, "largest": largest, "sorted": 1}, num_outputs=2)


@register_op("Sort")
@register_op("Argsort")
def import_sort(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.sort / ops.argsort (ascending) as a TopK over the whole axis."""
    v = value(b, x)
    axis = -1 if op.axis is None else int(op.axis)
    if op.axis is None:
        v = flat(b, v)
    values, indices = _topk(b, v, _axis_length(b, v, axis), axis, 0)
    if type(op).__name__ == "Sort":
        return values
    return b.op("Cast", [indices], {"to": ir.DataType.INT32})


@register_op("TopK")
def import_top_k(b: Builder, op: Any, x: Any) -> list[ir.Value]:
    """ops.top_k along the last axis: (values, int32 indices)."""
    values, indices = _topk(b, value(b, x), b.ints([int(op.k)]), -1, 1)
    return [values, b.op("Cast", [indices], {"to": ir.DataType.INT32})]


@register_op("Cumsum")
def import_cumsum(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.cumsum (flattened when axis is None)."""
    v = value(b, x)
    if op.axis is None:
        v, axis = flat(b, v), 0
    else:
        axis = int(op.axis)
    if getattr(op, "dtype", None):
        v = b.op("Cast", [v], {"to": onnx_dtype(op.dtype)})
    return b.op("CumSum", [v, b.const(np.int64(axis))])


@register_op("Normalize")
def import_normalize(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.normalize: x / max(||x||_p, epsilon) along axis."""
    v = value(b, x)
    order = int(op.order)
    reduce = {1: "ReduceL1", 2: "ReduceL2"}.get(order)
    if reduce is None:
        raise ValueError(f"ops.normalize order={order} is not supported")
    norm = b.op(reduce, [v, b.ints([int(op.axis)])], {"keepdims": 1})
    eps = op.epsilon if op.epsilon is not None else 1e-12
    if order == 2 and op.epsilon is None:  # Keras: x * rsqrt(max(sum(x^2), eps))
        square = b.op("ReduceSumSquare", [v, b.ints([int(op.axis)])], {"keepdims": 1})
        return b.op("Div", [v, b.op("Sqrt", [b.op("Max", [square, _f(b, 1e-12)])])])
    return b.op("Div", [v, b.op("Max", [norm, _f(b, float(eps))])])


@register_op("Glu")
def import_glu(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.glu: first half times sigmoid of the second half along axis."""
    a, c = b.op("Split", [value(b, x)], {"axis": int(op.axis), "num_outputs": 2}, num_outputs=2)
    return b.op("Mul", [a, b.op("Sigmoid", [c])])


@register_op("Tensordot")
def import_tensordot(b: Builder, op: Any, x1: Any, x2: Any) -> ir.Value:
    """ops.tensordot as an Einsum."""
    axes = op.axes
    if isinstance(axes, int):
        a = list(range(_rank(x1) - axes, _rank(x1)))
        c = list(range(axes))
    else:
        a, c = static_axes(axes[0]), static_axes(axes[1])
    r1, r2 = _rank(x1), _rank(x2)
    a, c = [i % r1 for i in a], [i % r2 for i in c]
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    left = [next(letters) for _ in range(r1)]
    right = [next(letters) for _ in range(r2)]
    for i, j in zip(a, c, strict=False):
        right[j] = left[i]
    out = [ch for i, ch in enumerate(left) if i not in a] + [
        ch for j, ch in enumerate(right) if j not in c
    ]
    eq = f"{''.join(left)},{''.join(right)}->{''.join(out)}"
    return b.op("Einsum", [value(b, x1), value(b, x2)], {"equation": eq})


@register_op("NanToNum")
def import_nan_to_num(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.nan_to_num."""
    v = value(b, x)
    big = float(np.finfo(np.float32).max)
    v = b.op("Where", [b.op("IsNaN", [v]), _f(b, float(op.nan)), v])
    v = b.op("Where", [b.op("IsInf", [v], {"detect_negative": 0}), _f(b, big if op.posinf is None else float(op.posinf)), v])  # fmt: skip
    return b.op("Where", [b.op("IsInf", [v], {"detect_positive": 0}), _f(b, -big if op.neginf is None else float(op.neginf)), v])  # fmt: skip


# ---------------------------------------------------------------------------- layers' ops
@register_op("ReLU")
def import_relu_op(b: Builder, op: Any, x: Any) -> ir.Value:
    """keras.activations.relu with negative_slope / max_value / threshold."""
    return relu(b, value(b, x), float(op.negative_slope), op.max_value, float(op.threshold))


@register_op("RMSNorm")
def import_rms_norm(b: Builder, op: Any, x: Any, scale: Any = None) -> ir.Value:
    """ops.rms_normalization: x * rsqrt(mean(x^2) + eps) * scale."""
    import keras

    v = value(b, x)
    axes = op.axis if isinstance(op.axis, list | tuple) else [op.axis]
    eps = keras.config.epsilon() if op.epsilon is None else float(op.epsilon)
    mean = b.op(
        "ReduceMean", [b.op("Mul", [v, v]), b.ints([int(a) for a in axes])], {"keepdims": 1}
    )
    y = b.op("Div", [v, b.op("Sqrt", [b.op("Add", [mean, b.const(np.float32(eps))])])])
    return y if scale is None else b.op("Mul", [y, value(b, scale)])


@register_op("Moments")
def import_moments(b: Builder, op: Any, x: Any) -> list[ir.Value]:
    """ops.moments: (mean, variance) over axes."""
    v = value(b, x)
    axes = b.ints([int(a) for a in (op.axes if isinstance(op.axes, list | tuple) else [op.axes])])
    keep = int(bool(op.keepdims))
    mean = b.op("ReduceMean", [v, axes], {"keepdims": 1})
    centered = b.op("Sub", [v, mean])
    var = b.op("ReduceMean", [b.op("Mul", [centered, centered]), axes], {"keepdims": keep})
    return [mean if keep else b.op("ReduceMean", [v, axes], {"keepdims": 0}), var]


# ---------------------------------------------------------------------------- Fourier
def _fourier(axes: tuple[int, ...], inverse: bool) -> Any:
    """``ops.fft`` / ``fft2`` / ``ifft2`` on a (real, imaginary) pair: one ONNX DFT per axis
    on the pair stacked in a trailing dimension of 2."""

    def convert(b: Builder, op: Any, x: Any) -> list[ir.Value]:
        real, imag = (value(b, part) for part in x)
        rank = _rank(x[0])
        pair = b.op(
            "Concat",
            [b.op("Unsqueeze", [real, b.ints([-1])]), b.op("Unsqueeze", [imag, b.ints([-1])])],
            {"axis": -1},
        )
        for axis in axes:
            pair = b.op("DFT", [pair], {"axis": rank + axis, "inverse": int(inverse)})
        return [
            b.op("Squeeze", [b.op("Slice", [pair, b.ints([i]), b.ints([i + 1]), b.ints([-1])]),
                             b.ints([-1])])
            for i in (0, 1)
        ]  # fmt: skip

    return convert


for _name, _axes, _inverse in [("FFT", (-1,), False), ("FFT2", (-2, -1), False),
                               ("IFFT2", (-2, -1), True)]:  # fmt: skip
    register_op(_name)(_fourier(_axes, _inverse))
