"""Gathering interpolation for ``keras.ops.image.map_coordinates`` and ``affine_transform``.

Orders 0 (nearest) and 1 (linear) as in Keras: per axis, the neighbour indices and
weights of each coordinate, each index mapped into the input by the fill mode, one
``GatherND`` per combination of neighbours, weighted and summed; with
``fill_mode="constant"`` a combination with an index outside reads the fill value. The
rules follow the backend that runs the model: Keras's TensorFlow ``map_coordinates``
rounds half to even and folds mirror / reflect indices with ``abs`` and a modulo; JAX's
and Keras's torch one fold with a triangular wave (JAX rounds half away from zero,
torch half to even). TensorFlow's ``affine_transform`` (ImageProjectiveTransformV3) maps the
continuous coordinate into the image first (``MapCoordinate`` of image_ops.h) and then
reads the neighbours with the constant fill.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import keras
import numpy as np
import onnx_ir as ir

from interop.errors import UnsupportedOpError

from . import register_op
from .capture_lowering import Builder, Tensor, onnx_dtype
from .capture_ops import value

FILL_MODES = ("constant", "nearest", "wrap", "mirror", "reflect")
_I64, _F32 = ir.DataType.INT64, ir.DataType.FLOAT


def _i(b: Builder, v: int) -> ir.Value:
    return b.const(np.asarray(v, np.int64))


def _f(b: Builder, v: float) -> ir.Value:
    return b.const(np.asarray(v, np.float32))


def _mod(b: Builder, a: ir.Value, n: ir.Value) -> ir.Value:
    return b.op("Mod", [a, n], {"fmod": 0})  # sign of the divisor, as Python's %


def _mirror_fix(b: Builder, index: ir.Value, size: int) -> ir.Value:
    """JAX's |(index + s) % 2s - s|, s = size - 1: the triangular wave of period 2s."""
    s = size - 1
    if s <= 0:
        return b.op("Mul", [index, _i(b, 0)])
    shifted = _mod(b, b.op("Add", [index, _i(b, s)]), _i(b, 2 * s))
    return b.op("Abs", [b.op("Sub", [shifted, _i(b, s)])])


def _fixed(b: Builder, index: ir.Value, size: int, mode: str, tf_rules: bool) -> tuple:
    """(index inside the input, validity or None) for one neighbour's int64 index."""
    last = size - 1
    if mode == "constant":
        valid = b.op("And", [b.op("GreaterOrEqual", [index, _i(b, 0)]),
                             b.op("Less", [index, _i(b, size)])])  # fmt: skip
        return b.op("Clip", [index, _i(b, 0), _i(b, last)]), valid
    if mode == "nearest":
        return b.op("Clip", [index, _i(b, 0), _i(b, last)]), None
    if mode == "wrap":
        return _mod(b, index, _i(b, size)), None
    if tf_rules:  # keras/src/backend/tensorflow/image.py process_coordinates
        folded = _mod(b, b.op("Abs", [index]), _i(b, 2 * size))
        under = b.op("Less", [folded, _i(b, size)])
        out = b.op("Where", [under, folded, b.op("Sub", [_i(b, 2 * size), folded])])
        if mode == "reflect":
            out = b.op("Where", [under, out, b.op("Sub", [out, _i(b, 1)])])
    elif mode == "mirror":
        out = _mirror_fix(b, index, size)
    else:  # reflect: (mirror(2 i + 1, 2 size + 1) - 1) // 2
        twice = b.op("Add", [b.op("Mul", [index, _i(b, 2)]), _i(b, 1)])
        odd = b.op("Sub", [_mirror_fix(b, twice, 2 * size + 1), _i(b, 1)])
        out = b.op("Div", [b.op("Sub", [odd, _mod(b, odd, _i(b, 2))]), _i(b, 2)])
    # an index TensorFlow would refuse (its mirror at a multiple of the size) stays inside
    return b.op("Clip", [out, _i(b, 0), _i(b, last)]), None


def _rounded(b: Builder, c: ir.Value, half_even: bool) -> ir.Value:
    if half_even:
        return b.op("Round", [c])
    away = b.op("Floor", [b.op("Add", [b.op("Abs", [c]), _f(b, 0.5)])])
    return b.op("Mul", [b.op("Sign", [c]), away])


def sample(
    b: Builder,
    data: ir.Value,
    sizes: list[int],
    coords: list[ir.Value],
    order: int,
    mode: str,
    fill: float,
    *,
    batch_dims: int = 0,
    trailing: int = 0,
    half_even: bool = False,
    tf_rules: bool = False,
) -> ir.Value:
    """Interpolate `data` at float32 `coords` (one per leading axis of `data` after the
    `batch_dims`, each of the same shape Q): a float32 value of shape Q + the
    `trailing` axes of `data`."""
    per_axis = []
    for c, size in zip(coords, sizes, strict=True):
        if order == 0:
            nodes = [(b.op("Cast", [_rounded(b, c, half_even)], {"to": _I64}), None)]
        else:
            lower = b.op("Floor", [c])
            upper_weight = b.op("Sub", [c, lower])
            index = b.op("Cast", [lower], {"to": _I64})
            nodes = [(index, b.op("Sub", [_f(b, 1.0), upper_weight])),
                     (b.op("Add", [index, _i(b, 1)]), upper_weight)]  # fmt: skip
        per_axis.append([(*_fixed(b, i, size, mode, tf_rules), w) for i, w in nodes])
    spread = b.ints(list(range(-trailing, 0))) if trailing else None
    total = None
    for combo in itertools.product(*per_axis):
        indices = b.op("Concat", [b.op("Unsqueeze", [i, b.ints([-1])]) for i, _, _ in combo],
                       {"axis": -1})  # fmt: skip
        got = b.op("GatherND", [data, indices], {"batch_dims": batch_dims})
        got = b.op("Cast", [got], {"to": _F32})
        valids = [v for _, v, _ in combo if v is not None]
        if valids:
            valid = functools.reduce(lambda p, q: b.op("And", [p, q]), valids)
            valid = b.op("Unsqueeze", [valid, spread]) if spread is not None else valid
            got = b.op("Where", [valid, got, _f(b, fill)])
        weights = [w for _, _, w in combo if w is not None]
        if weights:
            weight = functools.reduce(lambda p, q: b.op("Mul", [p, q]), weights)
            weight = b.op("Unsqueeze", [weight, spread]) if spread is not None else weight
            got = b.op("Mul", [got, weight])
        total = got if total is None else b.op("Add", [total, got])
    assert total is not None
    return total


def _tf_mapped(b: Builder, c: ir.Value, size: int, mode: str) -> ir.Value:
    """image_ops.h MapCoordinate: a continuous coordinate mapped into [0, size - 1]."""
    last = float(size - 1)
    if mode == "constant":
        return c
    if size <= 1:
        return b.op("Mul", [c, _f(b, 0.0)])
    if mode == "nearest":
        return b.op("Clip", [c, _f(b, 0.0), _f(b, last)])
    if mode == "reflect":
        sz2 = _f(b, 2.0 * size)
        neg = b.op("Add", [b.op("Mul", [sz2, b.op("Floor", [b.op("Div", [b.op("Neg", [c]), sz2])])]), c])  # fmt: skip
        neg = b.op("Where", [b.op("Less", [neg, _f(b, -float(size))]), b.op("Add", [neg, sz2]),
                             b.op("Sub", [b.op("Neg", [neg]), _f(b, 1.0)])])  # fmt: skip
        pos = b.op("Sub", [c, b.op("Mul", [sz2, b.op("Floor", [b.op("Div", [c, sz2])])])])
        pos = b.op("Where", [b.op("GreaterOrEqual", [pos, _f(b, float(size))]),
                             b.op("Sub", [b.op("Sub", [sz2, pos]), _f(b, 1.0)]), pos])  # fmt: skip
    else:  # wrap
        sz, length = _f(b, last), _f(b, float(size))
        turns = b.op("Add", [b.op("Floor", [b.op("Div", [b.op("Neg", [c]), sz])]), _f(b, 1.0)])
        neg = b.op("Add", [c, b.op("Mul", [length, turns])])
        pos = b.op("Sub", [c, b.op("Mul", [length, b.op("Floor", [b.op("Div", [c, sz])])])])
    out = b.op("Where", [b.op("Less", [c, _f(b, 0.0)]), neg,
                         b.op("Where", [b.op("Greater", [c, _f(b, last)]), pos, c])])  # fmt: skip
    return b.op("Clip", [out, _f(b, 0.0), _f(b, last)])


def affine_gather(
    b: Builder, x: Tensor, coords: ir.Value, interpolation: str, mode: str, fill: float
) -> ir.Value:
    """The NHWC images `x` read at `coords` ``(batch, 2, h * w)`` (x, y in pixels)."""
    if mode not in FILL_MODES:
        raise ValueError(f"fill_mode={mode!r} is not converted")
    height, width = int(x.shape[1]), int(x.shape[2])
    cx = b.op("Gather", [coords, _i(b, 0)], {"axis": 1})
    cy = b.op("Gather", [coords, _i(b, 1)], {"axis": 1})
    order = 0 if interpolation == "nearest" else 1
    if keras.backend.backend() == "tensorflow":  # (Keras refuses fill_mode="mirror" here)
        cy, cx = _tf_mapped(b, cy, height, mode), _tf_mapped(b, cx, width, mode)
        mode = "constant"
    torch_rules = keras.backend.backend() == "torch"  # torch.round: half to even
    y = sample(b, x.value, [height, width], [cy, cx], order, mode, fill,
               batch_dims=1, trailing=1, half_even=torch_rules)  # fmt: skip
    return b.op("Reshape", [y, b.ints([-1, height, width, int(x.shape[3])])])


def _unsupported(detail: str) -> UnsupportedOpError:
    return UnsupportedOpError("keras.ops.image.MapCoordinates", adapter="keras", detail=detail)


@register_op("MapCoordinates")
def import_map_coordinates(b: Builder, op: Any, inputs: Any, coordinates: Any) -> ir.Value:
    order, mode = int(op.order), str(op.fill_mode)
    if order not in (0, 1):
        raise _unsupported(f"order={order}: Keras itself computes orders 0 and 1 only")
    if mode not in FILL_MODES:
        raise _unsupported(f"fill_mode={mode!r} is not converted")
    if not isinstance(inputs, Tensor) or any(d is None for d in inputs.shape):
        raise _unsupported("only inputs with a static shape (the fill modes fold by its sizes)")
    if np.dtype(inputs.dtype).kind not in "fiu":
        raise _unsupported(f"inputs of dtype {inputs.dtype}")
    sizes = [int(d) for d in inputs.shape]
    coords = b.op("Cast", [value(b, coordinates)], {"to": _F32})
    per_axis = [b.op("Gather", [coords, _i(b, axis)], {"axis": 0}) for axis in range(len(sizes))]
    backend = keras.backend.backend()
    y = sample(b, inputs.value, sizes, per_axis, order, mode, float(op.fill_value),
               half_even=backend != "jax", tf_rules=backend == "tensorflow")  # fmt: skip
    if np.dtype(inputs.dtype).kind in "iu":
        y = b.op("Round", [y])  # as Keras: integer inputs round the interpolated value
    if inputs.dtype != "float32":
        y = b.op("Cast", [y], {"to": onnx_dtype(inputs.dtype)})
    return y
