"""Converters for ``keras.ops`` operations met inside subclassed models and custom layers.

When a ``call`` is run on symbolic KerasTensors, every ``keras.ops`` function records
an operation object (``keras.src.ops.numpy.Add`` ...) whose attributes hold the
static arguments (axis, shape). Each converter here maps one such class to ONNX.
Arguments that are not KerasTensors arrive as they were given: Keras variables
become named initializers, Python numbers and eager tensors become constants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from . import CAPTURE_OPS, register_op
from .capture_layers import activation
from .capture_lowering import Builder, Tensor, onnx_dtype, to_numpy


def value(b: Builder, arg: Any, dtype: str = "float32") -> ir.Value:
    """Any argument of an op -> an ir.Value (variables by path, the rest as constants)."""
    if isinstance(arg, Tensor):
        return arg.value
    if isinstance(arg, ir.Value):
        return arg
    if hasattr(arg, "path") and hasattr(arg, "assign"):  # keras.Variable
        return b.variable(arg)
    if isinstance(arg, bool | int | float) or np.isscalar(arg):
        kind = (
            np.dtype(dtype)
            if dtype in ("float32", "float64", "float16", "int32", "int64")
            else np.float32
        )
        return b.const(np.asarray(arg, dtype=kind))
    return b.const(np.asarray(to_numpy(arg)))


def dtype_of(*args: Any) -> str:
    """The dtype of the first Tensor among `args` (float32 when none is)."""
    for a in args:
        if isinstance(a, Tensor):
            return a.dtype
    return "float32"


def static_axes(axis: Any) -> list[int] | None:
    """An op's ``axis`` attribute (None, an int or a sequence) as a list of ints."""
    if axis is None:
        return None
    return [int(a) for a in axis] if isinstance(axis, list | tuple) else [int(axis)]


def flat(b: Builder, x: ir.Value) -> ir.Value:
    """`x` reshaped to one dimension."""
    return b.op("Reshape", [x, b.ints([-1])])


# ONNX Max / Min take no booleans; on them they are Or / And (keras_hub merges masks so)
_BOOLEAN = {"Max": "Or", "Min": "And"}


def _as_array(arg: Any) -> Any:
    """A concrete tensor operand (an eager constant the call made) as a numpy array."""
    if isinstance(arg, Tensor | ir.Value | np.ndarray) or not hasattr(arg, "dtype"):
        return arg
    if hasattr(arg, "path") and hasattr(arg, "assign"):  # a keras.Variable: a graph weight
        return arg
    return np.asarray(to_numpy(arg))


def promoted(b: Builder, *args: Any) -> tuple[list[ir.Value], str]:
    """The operands of a binary op in the dtype Keras computes it in: two tensors of
    different dtypes (an int32 mask and a bool one) meet at Keras's result type."""
    dtypes = {_real_dtype(a) for a in args if isinstance(a, Tensor)}
    args = tuple(_as_array(a) for a in args)
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    import keras

    if len(dtypes) < 2 and not any(a.dtype.name not in dtypes for a in arrays if dtypes):
        if not dtypes:
            dtype = dtype_of(*args)
            return [value(b, a, dtype) for a in args], dtype
        (real,) = dtypes  # Python scalars are weak: bool mask == 0.0 compares as float32
        scalars = [type(a) for a in args if isinstance(a, bool | int | float)]
        dtype = keras.backend.result_type(real, *scalars) if scalars else real
        values = [
            b.op("Cast", [a.value], {"to": onnx_dtype(dtype)})
            if isinstance(a, Tensor) and real != dtype
            else value(b, a, dtype)
            for a in args
        ]
        return values, dtype

    # an array constant of another dtype (a bool mask against an int one) counts too
    dtype = keras.backend.result_type(*sorted(dtypes | {a.dtype.name for a in arrays}))
    values = [
        b.op("Cast", [a.value], {"to": onnx_dtype(dtype)})
        if isinstance(a, Tensor) and _real_dtype(a) != dtype
        else b.const(a.astype(dtype))
        if isinstance(a, np.ndarray)
        else value(b, a, dtype)
        for a in args
    ]
    return values, dtype


def _real_dtype(tensor: Tensor) -> str:
    """The dtype the graph computes, which a layer's declared output spec may misstate
    (keras_hub PaliGemma's mask: declared float32, computed bool)."""
    if tensor.value.dtype is None:
        return tensor.dtype
    return np.dtype(tensor.value.dtype.numpy()).name


def _as_bool(b: Builder, arg: Any) -> ir.Value:
    """A logical op's operand: Keras casts any dtype to bool first (ONNX And/Or/Not take bool only)."""
    if isinstance(arg, Tensor) and arg.dtype == "bool":
        return arg.value
    return b.op("Cast", [value(b, arg, "bool")], {"to": ir.DataType.BOOL})


def _binary(op_type: str):
    def convert(b: Builder, op: Any, x: Any, y: Any) -> ir.Value:
        if op_type in ("And", "Or", "Xor"):
            return b.op(op_type, [_as_bool(b, x), _as_bool(b, y)])
        values, dtype = promoted(b, x, y)
        onnx_op = _BOOLEAN.get(op_type, op_type) if dtype == "bool" else op_type
        return b.op(onnx_op, values)

    return convert


def _unary(op_type: str):
    def convert(b: Builder, op: Any, x: Any) -> ir.Value:
        if op_type == "Not":
            return b.op("Not", [_as_bool(b, x)])
        return b.op(op_type, [value(b, x)])

    return convert


for _name, _op in {
    "Add": "Add", "Subtract": "Sub", "Multiply": "Mul", "TrueDivide": "Div", "Divide": "Div",
    "Matmul": "MatMul", "Maximum": "Max", "Minimum": "Min", "Power": "Pow",
    "Greater": "Greater", "Less": "Less", "Equal": "Equal", "GreaterEqual": "GreaterOrEqual",
    "LessEqual": "LessOrEqual", "LogicalAnd": "And", "LogicalOr": "Or",
}.items():  # fmt: skip
    CAPTURE_OPS.register(_name, _binary(_op))

for _name, _op in {
    "Relu": "Relu", "Sigmoid": "Sigmoid", "Tanh": "Tanh", "Exp": "Exp", "Log": "Log", "Sqrt": "Sqrt",
    "Negative": "Neg", "Absolute": "Abs", "Abs": "Abs", "Erf": "Erf", "Floor": "Floor", "Ceil": "Ceil",
    "Softplus": "Softplus", "Sin": "Sin", "Cos": "Cos", "LogicalNot": "Not", "Sign": "Sign",
    "Reciprocal": "Reciprocal",
}.items():  # fmt: skip
    CAPTURE_OPS.register(_name, _unary(_op))


@register_op("NotEqual")
def import_not_equal(b: Builder, op: Any, x: Any, y: Any) -> ir.Value:
    dtype = dtype_of(x, y)
    return b.op("Not", [b.op("Equal", [value(b, x, dtype), value(b, y, dtype)])])


def _reduce_bool(op_type: str):
    def convert(b: Builder, op: Any, x: Any) -> ir.Value:
        as_int = b.op("Cast", [value(b, x)], {"to": ir.DataType.INT32})
        inputs = (
            [as_int]
            if op.axis is None
            else [as_int, b.ints(op.axis if isinstance(op.axis, list | tuple) else [op.axis])]
        )
        reduced = b.op(op_type, inputs, {"keepdims": int(bool(op.keepdims))})
        return b.op("Cast", [reduced], {"to": ir.DataType.BOOL})

    return convert


CAPTURE_OPS.register("Any", _reduce_bool("ReduceMax"))
CAPTURE_OPS.register("All", _reduce_bool("ReduceMin"))


@register_op("Square")
def import_square(b: Builder, op: Any, x: Any) -> ir.Value:
    v = value(b, x)
    return b.op("Mul", [v, v])


@register_op("Rsqrt")
def import_rsqrt(b: Builder, op: Any, x: Any) -> ir.Value:
    return b.op("Reciprocal", [b.op("Sqrt", [value(b, x)])])


@register_op("Silu")
@register_op("Swish")
def import_silu(b: Builder, op: Any, x: Any) -> ir.Value:
    return activation(b, value(b, x), "silu")


@register_op("Gelu")
def import_gelu(b: Builder, op: Any, x: Any) -> ir.Value:
    return activation(b, value(b, x), "gelu", approximate=bool(op.approximate))


@register_op("Relu6")
def import_relu6(b: Builder, op: Any, x: Any) -> ir.Value:
    return activation(b, value(b, x), "relu6")


@register_op("Softmax")
@register_op("LogSoftmax")
def import_softmax(b: Builder, op: Any, x: Any) -> ir.Value:
    name = "softmax" if type(op).__name__ == "Softmax" else "log_softmax"
    return activation(b, value(b, x), name, axis=int(op.axis))


@register_op("Clip")
def import_clip(b: Builder, op: Any, x: Any) -> ir.Value:
    dtype = dtype_of(x)
    return b.op("Clip", [value(b, x), value(b, op.x_min, dtype), value(b, op.x_max, dtype)])


@register_op("Cast")
def import_cast(b: Builder, op: Any, x: Any) -> ir.Value:
    return b.op("Cast", [value(b, x)], {"to": onnx_dtype(op.dtype)})


@register_op("Where")
def import_where(b: Builder, op: Any, condition: Any, x: Any = None, y: Any = None) -> ir.Value:
    dtype = dtype_of(x, y)
    cond = b.op("Cast", [value(b, condition)], {"to": ir.DataType.BOOL})
    if dtype == "bool":  # ONNX Runtime's CPU Where has no bool kernel: choose among uint8
        picks = [b.op("Cast", [value(b, v, dtype)], {"to": ir.DataType.UINT8}) for v in (x, y)]
        return b.op("Cast", [b.op("Where", [cond, *picks])], {"to": ir.DataType.BOOL})
    return b.op("Where", [cond, value(b, x, dtype), value(b, y, dtype)])


def _reduce(op_type: str):
    def convert(b: Builder, op: Any, x: Any, *args: Any, **kwargs: Any) -> ir.Value:
        attrs = {"keepdims": int(bool(op.keepdims))}
        if op.axis is None:
            return b.op(op_type, [value(b, x)], attrs)
        axes = op.axis if isinstance(op.axis, list | tuple) else [op.axis]
        return b.op(op_type, [value(b, x), b.ints(axes)], attrs)

    return convert


for _name, _op in {"Mean": "ReduceMean", "Sum": "ReduceSum", "Max": "ReduceMax", "Min": "ReduceMin",
                   "Prod": "ReduceProd"}.items():  # fmt: skip
    CAPTURE_OPS.register(_name, _reduce(_op))


@register_op("Reshape")
def import_reshape(b: Builder, op: Any, x: Any, *_: Any) -> ir.Value:
    # None comes from ops.shape() of a dynamic axis; ONNX's 0 copies that input axis.
    shape = [0 if d is None else int(d) for d in op.newshape]
    return b.op("Reshape", [value(b, x), b.ints(shape)])


@register_op("Transpose")
def import_transpose(b: Builder, op: Any, x: Any) -> ir.Value:
    perm = list(op.axes) if op.axes is not None else list(reversed(range(x.rank)))
    return b.op("Transpose", [value(b, x)], {"perm": [int(p) % x.rank for p in perm]})


@register_op("ExpandDims")
def import_expand_dims(b: Builder, op: Any, x: Any) -> ir.Value:
    axes = op.axis if isinstance(op.axis, list | tuple) else [op.axis]
    return b.op("Unsqueeze", [value(b, x), b.ints(axes)])


@register_op("Squeeze")
def import_squeeze(b: Builder, op: Any, x: Any) -> ir.Value:
    if op.axis is None:
        return b.op("Squeeze", [value(b, x)])
    axes = op.axis if isinstance(op.axis, list | tuple) else [op.axis]
    return b.op("Squeeze", [value(b, x), b.ints(axes)])


@register_op("Concatenate")
def import_concatenate(b: Builder, op: Any, xs: Any) -> ir.Value:
    dtype = dtype_of(*xs)
    return b.op("Concat", [value(b, x, dtype) for x in xs], {"axis": int(op.axis)})


@register_op("Stack")
def import_stack(b: Builder, op: Any, xs: Any) -> ir.Value:
    axis = int(op.axis)
    return b.op(
        "Concat", [b.op("Unsqueeze", [value(b, x), b.ints([axis])]) for x in xs], {"axis": axis}
    )


@register_op("Einsum")
def import_einsum(b: Builder, op: Any, *xs: Any) -> ir.Value:
    return b.op("Einsum", [value(b, x) for x in xs], {"equation": op.subscripts})


@register_op("Split")
def import_split(b: Builder, op: Any, x: Any) -> Any:
    axis = int(op.axis) % x.rank
    sections = op.indices_or_sections
    size = x.shape[axis]
    if isinstance(sections, int):
        if size is None:
            split = b.op(
                "Split",
                [value(b, x)],
                {"axis": axis, "num_outputs": sections},
                num_outputs=sections,
            )
            return list(split)
        sizes = [size // sections] * sections
    else:
        bounds = [0, *[int(i) for i in sections], size]
        sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:], strict=False)]
    return list(b.op("Split", [value(b, x), b.ints(sizes)], {"axis": axis}, num_outputs=len(sizes)))


@register_op("GetItem")
def import_get_item(b: Builder, op: Any, x: Any, key: Any) -> ir.Value:
    """x[key] with ints, slices, None and Ellipsis (no tensor indices)."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is Ellipsis for k in key):
        at = next(i for i, k in enumerate(key) if k is Ellipsis)
        fill = x.rank - (len(key) - 1 - sum(k is None for k in key))
        key = key[:at] + (slice(None),) * fill + key[at + 1 :]
    starts, ends, axes, steps, squeeze, unsqueeze = [], [], [], [], [], []
    axis, out_axis = 0, 0  # input axis, and axis of the result (ints remove one, None adds one)
    for k in key:
        if k is None:
            unsqueeze.append(out_axis)
            out_axis += 1
            continue
        out_axis += 0 if isinstance(k, int | np.integer) else 1
        if isinstance(k, int | np.integer):
            starts.append(int(k))
            ends.append(int(k) + 1 if int(k) != -1 else np.iinfo(np.int64).max)
            axes.append(axis)
            steps.append(1)
            squeeze.append(axis)
        elif isinstance(k, slice):
            if k != slice(None):
                step = 1 if k.step is None else int(k.step)
                big = np.iinfo(np.int64).max
                starts.append(int(k.start) if k.start is not None else (0 if step > 0 else big))
                ends.append(int(k.stop) if k.stop is not None else (big if step > 0 else -big))
                axes.append(axis)
                steps.append(step)
        else:
            raise ValueError(f"indexing with {type(k).__name__} is not supported")
        axis += 1
    y = value(b, x)
    if axes:
        y = b.op("Slice", [y, b.ints(starts), b.ints(ends), b.ints(axes), b.ints(steps)])
    if squeeze:
        y = b.op("Squeeze", [y, b.ints(squeeze)])
    if unsqueeze:
        y = b.op("Unsqueeze", [y, b.ints(unsqueeze)])
    return y
