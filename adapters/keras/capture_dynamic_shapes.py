"""Shapes read at run time stay symbolic while a ``call`` runs on KerasTensors.

A subclassed model is opened up by calling its ``call`` on KerasTensors whose dynamic
axes (the batch, a declared sequence axis) are ``None``. Keras's own ``ops.shape`` then
answers ``None`` for those axes, which only works where a shape is passed on untouched
(a reshape keeps an input axis); ``b * n``, ``ops.zeros((b, n))``, ``ops.arange(t)``,
``x[:, : t // 2]`` or a reshape that moves the batch axis fail or go wrong.

While `DynamicShapes` is active, the public ``keras.ops.shape`` of a KerasTensor gives
every dynamic axis as a scalar int32 KerasTensor made by a `InteropDim` operation, so
arithmetic on it is recorded as ``keras.ops`` nodes (``Multiply``, ``FloorDivide``...).
The ``keras.ops`` functions that take a shape or bounds (reshape, broadcast_to,
zeros / ones / full / empty, arange, tile, split, slice) and ``KerasTensor.__getitem__``
record an `InteropShaped` operation when such a value is among their arguments; its
converter builds the shape from ONNX ``Shape`` / ``Gather`` / arithmetic, never from the
example's sizes. Without such values, the functions are Keras's own. Only the public
``keras.ops`` namespace is patched (the functions user code calls); Keras's internal
layers keep their behaviour.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import onnx_ir as ir
from keras.src.ops.operation import Operation

from . import register_op
from .capture_lowering import Builder, Tensor, onnx_dtype
from .capture_ops import value
from .capture_ops_arrays import import_arange

KerasTensor = keras.KerasTensor
_BIG = np.iinfo(np.int64).max
_lock = threading.RLock()
_depth = 0


class InteropDim(Operation):
    """``ops.shape(x)[axis]`` of a dynamic axis, as a scalar int32 graph value."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis

    def compute_output_spec(self, x: Any) -> Any:
        return KerasTensor((), dtype="int32")

    def call(self, x: Any) -> Any:
        return keras.ops.convert_to_tensor(_ORIGINAL["shape"](x)[self.axis], "int32")


@dataclass(frozen=True)
class _Slot:
    index: int


class InteropShaped(Operation):
    """A ``keras.ops`` function called with run-time sizes (`kind` names it).

    `layout` is its (args, kwargs) with each KerasTensor replaced by a `_Slot`; the
    operation's inputs are those KerasTensors, in order.
    """

    def __init__(self, kind: str, layout: Any, spec: Any, dtype: str | None = None) -> None:
        super().__init__()
        self.kind, self.layout, self.spec, self.dtype = kind, layout, spec, dtype

    def compute_output_spec(self, *tensors: Any) -> Any:
        return self.spec

    def call(self, *tensors: Any) -> Any:
        args, kwargs = _fill(self.layout, tensors)
        if self.kind == "get_item":
            return args[0][args[1]]
        return _ORIGINAL[self.kind](*args, **kwargs)


def _dims(obj: Any) -> bool:
    """Whether `obj` (a structure with slices) holds a symbolic scalar, e.g. a run-time size."""
    if isinstance(obj, KerasTensor):
        return obj.shape == ()
    if isinstance(obj, slice):
        return any(_dims(v) for v in (obj.start, obj.stop, obj.step))
    if isinstance(obj, list | tuple):
        return any(_dims(v) for v in obj)
    return False


def _hollow(obj: Any, found: list[Any]) -> Any:
    """`obj` with every KerasTensor replaced by a `_Slot` (appended to `found`)."""
    if isinstance(obj, KerasTensor):
        found.append(obj)
        return _Slot(len(found) - 1)
    if isinstance(obj, slice):
        return slice(*(_hollow(v, found) for v in (obj.start, obj.stop, obj.step)))
    if isinstance(obj, list | tuple):
        return type(obj)(_hollow(v, found) for v in obj)
    if isinstance(obj, dict):
        return {k: _hollow(v, found) for k, v in obj.items()}
    return obj


def _fill(obj: Any, values: Any) -> Any:
    if isinstance(obj, _Slot):
        return values[obj.index]
    if isinstance(obj, slice):
        return slice(*(_fill(v, values) for v in (obj.start, obj.stop, obj.step)))
    if isinstance(obj, list | tuple):
        return type(obj)(_fill(v, values) for v in obj)
    if isinstance(obj, dict):
        return {k: _fill(v, values) for k, v in obj.items()}
    return obj


def _static(d: Any) -> int | None:
    return None if isinstance(d, KerasTensor) or d is None else int(d)


def _record(kind: str, args: tuple, kwargs: dict, spec: Any, dtype: str | None = None) -> Any:
    found: list[Any] = []
    layout = _hollow((args, kwargs), found)
    return InteropShaped(kind, layout, spec, dtype).symbolic_call(*found)


# ------------------------------------------------------------------ the patched functions
def _shape(x: Any) -> Any:
    if isinstance(x, KerasTensor) and any(d is None for d in x.shape):
        return tuple(
            InteropDim(axis).symbolic_call(x) if d is None else d for axis, d in enumerate(x.shape)
        )
    return _ORIGINAL["shape"](x)


def _reshape(x: Any, newshape: Any) -> Any:
    if not _dims(newshape):
        return _ORIGINAL["reshape"](x, newshape)
    newshape = tuple(newshape)
    # a run-time size among the dims: a -1 beside it is unknown until run time too
    spec = KerasTensor(
        tuple(None if _static(d) == -1 else _static(d) for d in newshape), dtype=x.dtype
    )
    return _record("reshape", (x, newshape), {}, spec)


def _broadcast_to(x: Any, shape: Any) -> Any:
    if not _dims(shape):
        return _ORIGINAL["broadcast_to"](x, shape)
    spec = KerasTensor(tuple(_static(d) for d in shape), dtype=getattr(x, "dtype", "float32"))
    return _record("broadcast_to", (x, tuple(shape)), {}, spec)


def _filler(kind: str) -> Callable[..., Any]:
    def make(shape: Any, *args: Any, **kwargs: Any) -> Any:
        if not _dims(shape):
            return _ORIGINAL[kind](shape, *args, **kwargs)
        dtype = kwargs.get("dtype", args[-1] if len(args) > (kind == "full") else None)
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        spec = KerasTensor(tuple(_static(d) for d in shape), dtype=dtype)
        return _record(kind, (tuple(shape), *args), kwargs, spec, dtype)

    return make


def _arange(start: Any, stop: Any = None, step: Any = None, dtype: Any = None) -> Any:
    if not _dims((start, stop, step)):
        return _ORIGINAL["arange"](start, stop, step, dtype)
    if dtype is None:
        floats = any(isinstance(a, float) or "float" in str(getattr(a, "dtype", "")) for a in (start, stop, step))  # fmt: skip
        dtype = keras.config.floatx() if floats else "int32"
    dtype = keras.backend.standardize_dtype(dtype)
    return _record("arange", (start, stop, step), {}, KerasTensor((None,), dtype=dtype), dtype)


def _tile(x: Any, repeats: Any) -> Any:
    if not _dims(repeats):
        return _ORIGINAL["tile"](x, repeats)
    repeats = list(repeats) if isinstance(repeats, list | tuple) else [repeats]
    shape = [None] * max(len(repeats), len(x.shape))
    return _record("tile", (x, repeats), {}, KerasTensor(tuple(shape), dtype=x.dtype))


def _split(x: Any, indices_or_sections: Any, axis: int = 0) -> Any:
    if not _dims(indices_or_sections):
        return _ORIGINAL["split"](x, indices_or_sections, axis)
    shape = list(x.shape)
    specs = []
    for _ in range(len(indices_or_sections) + 1):
        shape[axis] = None
        specs.append(KerasTensor(tuple(shape), dtype=x.dtype))
    return _record("split", (x, list(indices_or_sections), axis), {}, specs)


def _slice(x: Any, start_indices: Any, shape: Any) -> Any:
    if not _dims((start_indices, shape)):
        return _ORIGINAL["slice"](x, start_indices, shape)
    spec = KerasTensor(tuple(_static(d) for d in shape), dtype=x.dtype)
    return _record("slice", (x, tuple(start_indices), tuple(shape)), {}, spec)


def _pad_pairs(pad_width: Any, rank: int) -> list[tuple[Any, Any]]:
    if isinstance(pad_width, list | tuple) and isinstance(pad_width[0], list | tuple):
        return [tuple(w) for w in pad_width]  # type: ignore[misc]
    pair = tuple(pad_width) if isinstance(pad_width, list | tuple) else (pad_width, pad_width)
    return [pair if len(pair) == 2 else (pair[0], pair[0])] * rank  # type: ignore[list-item]


def _pad(x: Any, pad_width: Any, mode: str = "constant", constant_values: Any = None) -> Any:
    if not _dims(pad_width):
        return _ORIGINAL["pad"](x, pad_width, mode=mode, constant_values=constant_values)
    pairs = _pad_pairs(pad_width, len(x.shape))
    shape = [
        None if d is None or _static(lo) is None or _static(hi) is None else d + int(lo) + int(hi)
        for d, (lo, hi) in zip(x.shape, pairs, strict=True)
    ]
    spec = KerasTensor(tuple(shape), dtype=x.dtype)
    return _record("pad", (x, pairs, mode, constant_values), {}, spec)


def _getitem(self: Any, key: Any) -> Any:
    if not _dims(key):
        return _ORIGINAL["getitem"](self, key)
    key = _expand_ellipsis(key if isinstance(key, tuple) else (key,), len(self.shape))
    out: list[int | None] = []
    axis = 0
    for k in key:
        if k is None:
            out.append(1)
            continue
        if isinstance(k, slice):
            static = all(_static(v) is not None or v is None for v in (k.start, k.stop, k.step))
            size = self.shape[axis]
            out.append(len(range(*k.indices(size))) if static and size is not None else None)
        axis += 1
    out.extend(self.shape[axis:])
    return _record("get_item", (self, key), {}, KerasTensor(tuple(out), dtype=self.dtype))


def _expand_ellipsis(key: tuple, rank: int) -> tuple:
    if not any(k is Ellipsis for k in key):
        return key
    at = next(i for i, k in enumerate(key) if k is Ellipsis)
    fill = rank - (len(key) - 1 - sum(k is None for k in key))
    return key[:at] + (slice(None),) * fill + key[at + 1 :]


_PATCHES: dict[str, Any] = {
    "shape": _shape, "reshape": _reshape, "broadcast_to": _broadcast_to, "zeros": _filler("zeros"),
    "ones": _filler("ones"), "empty": _filler("empty"), "full": _filler("full"), "arange": _arange,
    "tile": _tile, "split": _split, "slice": _slice, "pad": _pad,
}  # fmt: skip
_ORIGINAL: dict[str, Any] = {name: getattr(keras.ops, name) for name in _PATCHES}
_ORIGINAL["getitem"] = KerasTensor.__getitem__


@contextmanager
def dynamic_shapes() -> Iterator[None]:
    """Patch the public ``keras.ops`` shape functions for the duration (re-entrant)."""
    global _depth
    with _lock:
        if _depth == 0:
            for name, patched in _PATCHES.items():
                setattr(keras.ops, name, patched)
            KerasTensor.__getitem__ = _getitem  # type: ignore[method-assign]
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for name in _PATCHES:
                    setattr(keras.ops, name, _ORIGINAL[name])
                KerasTensor.__getitem__ = _ORIGINAL["getitem"]  # type: ignore[method-assign]


# ------------------------------------------------------------------ converters
def _int64(b: Builder, v: Any) -> ir.Value:
    return b.op("Cast", [value(b, v, "int64")], {"to": ir.DataType.INT64})


def vector(b: Builder, entries: Any) -> ir.Value:
    """A 1-D int64 value from Python ints and scalar Tensors (run-time sizes)."""
    parts: list[ir.Value] = []
    run: list[int] = []
    for e in entries:
        if isinstance(e, Tensor | ir.Value):
            if run:
                parts.append(b.ints(run))
                run = []
            parts.append(b.op("Reshape", [_int64(b, e), b.ints([1])]))
        else:
            run.append(int(e))
    if run or not parts:
        parts.append(b.ints(run))
    return parts[0] if len(parts) == 1 else b.op("Concat", parts, {"axis": 0})


@register_op("InteropDim")
def import_dim(b: Builder, op: Any, x: Any) -> ir.Value:
    size = b.op("Gather", [b.op("Shape", [value(b, x)]), b.const(np.int64(op.axis))])
    return b.op("Cast", [size], {"to": ir.DataType.INT32})


@register_op("InteropShaped")
def import_shaped(b: Builder, op: Any, *tensors: Any) -> Any:
    args, kwargs = _fill(op.layout, tensors)
    kind = op.kind
    if kind == "reshape":
        return b.op("Reshape", [value(b, args[0]), vector(b, args[1])])
    if kind == "broadcast_to":
        return b.op("Expand", [value(b, args[0]), vector(b, args[1])])
    if kind in ("zeros", "ones", "empty", "full"):
        fill = args[1] if kind == "full" and len(args) > 1 else float(kind == "ones")
        fill = kwargs.get("fill_value", fill)
        cast = b.op("Cast", [value(b, fill)], {"to": _onnx(op.dtype)})
        return b.op("Expand", [cast, vector(b, args[0])])
    if kind == "arange":
        return import_arange(b, op, *args)
    if kind == "tile":
        x, reps = args
        v, rank = value(b, x), len(x.shape)
        if len(reps) > rank:
            v = b.op("Unsqueeze", [v, b.ints(range(len(reps) - rank))])
        return b.op("Tile", [v, vector(b, [1] * (rank - len(reps)) + reps)])
    if kind == "split":
        return _split_at(b, *args)
    if kind == "slice":
        x, starts, sizes = args
        starts_v = vector(b, starts)
        ends = b.op("Add", [starts_v, vector(b, sizes)])
        return b.op("Slice", [value(b, x), starts_v, ends, b.ints(range(len(starts)))])
    if kind == "get_item":
        return _get_item(b, *args)
    if kind == "pad":
        return _pad_op(b, *args)
    raise ValueError(f"unknown run-time shape operation {kind}")


def _pad_op(b: Builder, x: Tensor, pairs: list, mode: str, constant_values: Any) -> ir.Value:
    """ops.pad with run-time widths (keras_hub's PaliGemma pads to a computed length)."""
    onnx_mode = {"constant": "constant", "reflect": "reflect", "edge": "edge"}.get(mode)
    if onnx_mode is None:
        raise ValueError(f"ops.pad mode '{mode}' is not supported")
    pads = vector(b, [lo for lo, _ in pairs] + [hi for _, hi in pairs])
    inputs = [value(b, x), pads]
    if constant_values is not None and onnx_mode == "constant":
        inputs.append(b.op("CastLike", [value(b, constant_values), inputs[0]]))
    return b.op("Pad", inputs, {"mode": onnx_mode})


def _onnx(dtype: str) -> ir.DataType:
    return onnx_dtype(dtype)


def _split_at(b: Builder, x: Tensor, indices: list[Any], axis: int) -> list[ir.Value]:
    axis = axis % len(x.shape)
    size = b.op("Gather", [b.op("Shape", [value(b, x)]), b.ints([axis])])
    starts = vector(b, [0, *indices])
    ends = b.op("Concat", [vector(b, indices), size], {"axis": 0})
    sizes = b.op("Sub", [ends, starts])
    split = b.op("Split", [value(b, x), sizes], {"axis": axis}, num_outputs=len(indices) + 1)
    return list(split)


def _get_item(b: Builder, x: Tensor, key: tuple) -> ir.Value:
    """x[key] with ints, slices (bounds may be run-time sizes) and None."""
    starts: list[Any] = []
    ends: list[Any] = []
    axes, steps, squeeze, unsqueeze = [], [], [], []
    axis = out_axis = 0
    for k in key:
        if k is None:
            unsqueeze.append(out_axis)
            out_axis += 1
            continue
        if isinstance(k, slice):
            out_axis += 1
            if k != slice(None):
                step = 1 if k.step is None else int(k.step)
                starts.append(k.start if k.start is not None else (0 if step > 0 else _BIG))
                ends.append(k.stop if k.stop is not None else (_BIG if step > 0 else -_BIG))
                axes.append(axis)
                steps.append(step)
        else:  # an index, static or a run-time size
            starts.append(k)
            if isinstance(k, Tensor):
                ends.append(b.op("Add", [_int64(b, k), b.const(np.int64(1))]))
            else:
                ends.append(int(k) + 1 if int(k) != -1 else _BIG)
            axes.append(axis)
            steps.append(1)
            squeeze.append(axis)
        axis += 1
    y = value(b, x)
    if axes:
        y = b.op("Slice", [y, vector(b, starts), vector(b, ends), b.ints(axes), b.ints(steps)])
    if squeeze:
        y = b.op("Squeeze", [y, b.ints(squeeze)])
    if unsqueeze:
        y = b.op("Unsqueeze", [y, b.ints(unsqueeze)])
    return y
