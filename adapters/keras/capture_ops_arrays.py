"""``keras.ops`` array converters: shapes (broadcast, tile, repeat, axes moves, flips,
triangles, unstack, pad), indexing (one_hot, take, take_along_axis, scatter_update) and construction
(arange, convert_to_tensor).

Same conventions as `capture_ops.py`: each converter receives the recorded Operation
(its static arguments as attributes) and the call's arguments (Tensors for symbolic
values, Python values or Keras variables otherwise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from . import register_op
from .capture_lowering import Builder, onnx_dtype
from .capture_ops import flat, static_axes, value

_BIG = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------- shapes
@register_op("BroadcastTo")
def import_broadcast_to(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.broadcast_to with a static target shape (None keeps the input's size)."""
    shape = [1 if d is None else int(d) for d in op.shape]
    return b.op("Expand", [value(b, x), b.ints(shape)])


@register_op("Tile")
def import_tile(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.tile; shorter repeats apply to the trailing axes, as numpy."""
    reps = [int(r) for r in (op.repeats if isinstance(op.repeats, list | tuple) else [op.repeats])]
    v = value(b, x)
    if len(reps) < x.rank:
        reps = [1] * (x.rank - len(reps)) + reps
    elif len(reps) > x.rank:
        v = b.op("Unsqueeze", [v, b.ints(list(range(len(reps) - x.rank)))])
    return b.op("Tile", [v, b.ints(reps)])


@register_op("Repeat")
def import_repeat(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.repeat with an int count (each element repeated in place)."""
    if not isinstance(op.repeats, int):
        raise ValueError("ops.repeat is supported with an int count only")
    v = value(b, x)
    if op.axis is None:
        v, axis, rank = flat(b, v), 0, 1
    else:
        axis, rank = int(op.axis) % x.rank, x.rank
    y = b.op("Unsqueeze", [v, b.ints([axis + 1])])
    reps = [1] * (rank + 1)
    reps[axis + 1] = int(op.repeats)
    y = b.op("Tile", [y, b.ints(reps)])
    shape = b.op("Shape", [v])
    size = b.op("Mul", [b.op("Gather", [shape, b.ints([axis])]), b.ints([int(op.repeats)])])
    new = b.op("Concat", [b.op("Slice", [shape, b.ints([0]), b.ints([axis])]), size,
                          b.op("Slice", [shape, b.ints([axis + 1]), b.ints([_BIG])])], {"axis": 0})  # fmt: skip
    return b.op("Reshape", [y, new])


@register_op("Swapaxes")
def import_swapaxes(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.swapaxes."""
    perm = list(range(x.rank))
    a1, a2 = int(op.axis1) % x.rank, int(op.axis2) % x.rank
    perm[a1], perm[a2] = perm[a2], perm[a1]
    return b.op("Transpose", [value(b, x)], {"perm": perm})


@register_op("Moveaxis")
def import_moveaxis(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.moveaxis."""
    src = [int(s) % x.rank for s in static_axes(op.source)]
    dst = [int(d) % x.rank for d in static_axes(op.destination)]
    order = [a for a in range(x.rank) if a not in src]
    for d, s in sorted(zip(dst, src, strict=False)):
        order.insert(d, s)
    return b.op("Transpose", [value(b, x)], {"perm": order})


@register_op("Flip")
def import_flip(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.flip along the given axes (all when None)."""
    axes = static_axes(op.axis) or list(range(x.rank))
    n = len(axes)
    return b.op("Slice", [value(b, x), b.ints([-1] * n), b.ints([-_BIG] * n), b.ints(axes), b.ints([-1] * n)])  # fmt: skip


@register_op("Tril")
@register_op("Triu")
def import_tril(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.tril / ops.triu with offset k."""
    upper = int(type(op).__name__ == "Triu")
    return b.op("Trilu", [value(b, x), b.const(np.int64(int(op.k)))], {"upper": upper})


@register_op("Unstack")
def import_unstack(b: Builder, op: Any, x: Any) -> list[ir.Value]:
    """ops.unstack along a static axis."""
    axis = int(op.axis) % x.rank
    n = x.shape[axis] if op.num is None else int(op.num)
    parts = b.op("Split", [value(b, x)], {"axis": axis, "num_outputs": n}, num_outputs=n)
    parts = parts if isinstance(parts, tuple) else (parts,)
    return [b.op("Squeeze", [p, b.ints([axis])]) for p in parts]


@register_op("Pad")
def import_pad(b: Builder, op: Any, x: Any, constant_values: Any = None) -> ir.Value:
    """ops.pad in constant, reflect or symmetric-free edge modes."""
    width = op.pad_width
    pairs = [tuple(int(p) for p in w) for w in width] if isinstance(width[0], list | tuple) else [tuple(int(p) for p in width)] * x.rank  # fmt: skip
    pads = [p[0] for p in pairs] + [p[1] for p in pairs]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "edge"}.get(op.mode)
    if mode is None:
        raise ValueError(f"ops.pad mode '{op.mode}' is not supported")
    inputs = [value(b, x), b.ints(pads)]
    if constant_values is not None and mode == "constant":
        inputs.append(b.op("CastLike", [value(b, constant_values), inputs[0]]))
    return b.op("Pad", inputs, {"mode": mode})


@register_op("OneHot")
def import_one_hot(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.one_hot (negative or out-of-range indices give all zeros, as Keras)."""
    indices = b.op("Cast", [value(b, x)], {"to": ir.DataType.INT64})
    n = int(op.num_classes)
    dtype = onnx_dtype(getattr(op, "dtype", None) or "float32")
    classes = b.op("Range", [b.const(np.int64(0)), b.const(np.int64(n)), b.const(np.int64(1))])
    axis = int(op.axis)
    hot = b.op("Equal", [b.op("Unsqueeze", [indices, b.ints([-1])]), classes])
    out = b.op("Cast", [hot], {"to": dtype})
    if axis != -1 and axis != x.rank:
        perm = list(range(x.rank))
        perm.insert(axis % (x.rank + 1), x.rank)
        out = b.op("Transpose", [out], {"perm": perm})
    return out


@register_op("Take")
def import_take(b: Builder, op: Any, x: Any, indices: Any) -> ir.Value:
    """ops.take (negative indices wrap, as numpy)."""
    v = value(b, x)
    axis = 0 if op.axis is None else int(op.axis)
    if op.axis is None:
        v = flat(b, v)
    idx = b.op("Cast", [value(b, indices, "int64")], {"to": ir.DataType.INT64})
    return b.op("Gather", [v, idx], {"axis": axis})


@register_op("TakeAlongAxis")
def import_take_along_axis(b: Builder, op: Any, x: Any, indices: Any) -> ir.Value:
    """ops.take_along_axis (indices broadcast against x except along the axis)."""
    v = value(b, x)
    idx = b.op("Cast", [value(b, indices, "int64")], {"to": ir.DataType.INT64})
    if op.axis is None:
        return b.op("GatherElements", [flat(b, v), flat(b, idx)], {"axis": 0})
    axis = int(op.axis) % x.rank
    # Broadcast x and indices to a common shape, keeping each one's own size on `axis`.
    vs, ids = b.op("Shape", [v]), b.op("Shape", [idx])
    ones = b.op("Mul", [vs, b.ints([0])])
    common = b.op("Max", [b.op("Add", [ones, vs]), b.op("Add", [ones, ids])])
    pick = np.zeros(x.rank, np.int64)
    pick[axis] = 1
    at = b.const(pick.astype(bool))
    v = b.op("Expand", [v, b.op("Where", [at, vs, common])])
    idx = b.op("Expand", [idx, b.op("Where", [at, ids, common])])
    size = b.op("Gather", [vs, b.ints([axis])])
    idx = b.op("Where", [b.op("Less", [idx, b.const(np.int64(0))]), b.op("Add", [idx, size]), idx])
    return b.op("GatherElements", [v, idx], {"axis": axis})


@register_op("ScatterUpdate")
def import_scatter_update(b: Builder, op: Any, x: Any, indices: Any, updates: Any) -> ir.Value:
    """ops.scatter_update: ``x`` with the ``(n, k)`` index rows replaced by ``updates``
    (keras_hub Gemma4's centroid logits)."""
    idx = b.op("Cast", [value(b, indices, "int64")], {"to": ir.DataType.INT64})
    v = value(b, x)
    new = b.op("CastLike", [value(b, updates), v])
    return b.op("ScatterND", [v, idx, new])


@register_op("Arange")
def import_arange(b: Builder, op: Any, start: Any, stop: Any = None, step: Any = None) -> ir.Value:
    """ops.arange, with symbolic start/stop/step (e.g. ops.shape(x)[1]) at run time."""
    if stop is None:
        start, stop = 0, start
    step = 1 if step is None else step
    dtype = getattr(op, "dtype", None) or (
        "float32" if any(isinstance(a, float) for a in (start, stop, step)) else "int32"
    )
    to = onnx_dtype(dtype)
    parts = [b.op("Cast", [b.op("Reshape", [value(b, a, str(dtype)), b.ints([])])], {"to": to}) for a in (start, stop, step)]  # fmt: skip
    return b.op("Range", parts)


@register_op("ConvertToTensor")
def import_convert_to_tensor(b: Builder, op: Any, x: Any) -> ir.Value:
    """ops.convert_to_tensor of a symbolic value: a cast when a dtype is given."""
    v = value(b, x)
    dtype = getattr(op, "dtype", None)
    return v if dtype is None else b.op("Cast", [v], {"to": onnx_dtype(dtype)})
