"""The backend protocol of interop.backend on ``keras.ops`` (see there for the contract).

Only ``keras.ops`` is used, so one backend serves TensorFlow, JAX and torch Keras. Values
that are still host (numpy) arrays stay on the host: shape arithmetic (Shape -> Gather ->
Concat -> Reshape) is computed with numpy even inside ``jax.jit`` or ``tf.function``,
where ``to_numpy`` of a traced tensor is impossible.
"""

from __future__ import annotations

import functools
import math

import keras
import ml_dtypes
import numpy as np
from keras import ops

from interop.backend import ceil_mode_pads, numpy_backend

from .backend_dtypes import (  # noqa: F401  (re-exported: the emit side imports them from here)
    CARRIERS,
    as_dtype,
    emulated,
    from_carrier,
    is_host,
    keras_dtype,
    to_carrier,
)
from .backend_windows import (
    pad_channels_first,
    to_channels_first,
    to_channels_last,
    window_reduce,
    window_sum,
)

_UNARY = {
    "asin": ops.arcsin,
    "acos": ops.arccos,
    "atan": ops.arctan,
    "asinh": ops.arcsinh,
    "acosh": ops.arccosh,
    "atanh": ops.arctanh,
    "bitwise_invert": ops.bitwise_invert,
    "erf": ops.erf,
    "sigmoid": ops.sigmoid,
}
_COMPARE = {"bitwise_left_shift": ops.left_shift, "bitwise_right_shift": ops.right_shift}
_REDUCE = {"sum": ops.sum, "prod": ops.prod, "max": ops.max, "min": ops.min, "mean": ops.mean}


def _on_host_when_possible(method):
    """Run the numpy backend's function when every array argument is still a host array."""
    name = method.__name__

    @functools.wraps(method)
    def dispatch(self, *args, **kwargs):
        arrays = [a for a in args if not isinstance(a, (str, type, np.dtype))]  # not dtypes
        if all(a is None or is_host(a) for a in arrays):
            return getattr(numpy_backend, name)(*args, **kwargs)
        return method(self, *args, **kwargs)

    return dispatch


def _int_or_none(d, keep=False):
    try:
        return int(d)
    except TypeError:  # None (static shape) or a symbolic scalar (graph mode)
        return d if keep and d is not None else None


def _float(x):
    return ops.cast(x, "float64" if keras_dtype(_dtype(x)) == "float64" else "float32")


def _dtype(x):
    return np.dtype(keras.backend.standardize_dtype(x.dtype)) if hasattr(x, "dtype") else None


def _is_float(x) -> bool:
    return _dtype(x).kind in "fc" or _dtype(x).name == "bfloat16"


def _in_float32(function, x, **kwargs):
    """function of a float16 / bfloat16 x in float32, rounded once (TensorFlow's CPU softmax
    runs exp and sum in the half type, most results an ulp off; torch accumulates in float32)."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype not in ("float16", "bfloat16"):
        return function(x, **kwargs)
    return ops.cast(function(ops.cast(x, "float32"), **kwargs), dtype)


def _add(a, b):
    """a + b. keras.ops.add on TensorFlow runs a b that squeezes to a vector as tf.nn.bias_add,
    along the last axis whenever a's last dim has the vector's length, wherever b's axis is:
    (3, 4, 4) + (1, 4, 1) added b along the last axis. Such a b goes in as a - (-b)."""
    if keras.backend.backend() == "tensorflow":
        sa, sb = list(getattr(a, "shape", ())), list(getattr(b, "shape", ()))
        big = [i - len(sb) + len(sa) for i, d in enumerate(sb) if d is None or d > 1]
        n = sb[big[0] + len(sb) - len(sa)] if len(big) == 1 else None
        if n is not None and len(sa) > 1 and n in (sa[1], sa[-1]):
            picked = len(sa) - 1 if sa[-1] == n else 1  # the axis bias_add would use
            if len(sb) > len(sa) or big[0] != picked:
                return ops.subtract(a, ops.negative(b))
    return ops.add(a, b)


def _trunc_divide(a, b):
    quotient = ops.floor_divide(a, b)
    rest = ops.subtract(a, ops.multiply(quotient, b))
    signs_differ = ops.not_equal(ops.less(a, 0), ops.less(b, 0))
    fix = ops.logical_and(ops.not_equal(rest, 0), signs_differ)
    return ops.add(quotient, ops.cast(fix, quotient.dtype))


def _linear_index(key, dims):
    """Row-major flat index into the leading ``len(key)`` dims for a tuple of index arrays."""
    arrays = np.broadcast_arrays(*[np.asarray(k, np.int64) for k in key])
    strides = np.cumprod((list(dims[1 : len(key)]) + [1])[::-1])[::-1]
    return sum(a * s for a, s in zip(arrays, strides)), arrays[0].shape


class KerasBackend:
    name = "keras"
    float_dtype = np.dtype("float32")

    def asarray(self, value, dtype=None, like=None):
        if is_host(value):
            return np.asarray(value, dtype=dtype)
        if dtype is not None:
            return ops.cast(value, keras_dtype(dtype))
        return ops.convert_to_tensor(value)

    def to_numpy(self, x):
        if is_host(x):
            return np.asarray(x)
        if keras.backend.standardize_dtype(x.dtype) == "bfloat16":  # numpy cannot take it directly
            return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32"))).astype(
                ml_dtypes.bfloat16
            )
        return np.asarray(ops.convert_to_numpy(x))

    def shape(self, x):
        # a dim unknown while tracing (tf.function over batches of any size) is a symbolic
        # scalar from ops.shape: ops that need only the rank or known dims work as usual,
        # and the shape ops carry it on as a tensor (interop.ops.shape.concrete)
        if is_host(x):
            return tuple(int(d) for d in np.shape(x))
        return tuple(d if isinstance(d, int) else _int_or_none(d, keep=True) for d in ops.shape(x))

    def is_concrete(self, value):
        if is_host(value):
            return True
        try:
            ops.convert_to_numpy(value)
        except Exception:  # a symbolic tensor of a graph being traced
            return False
        return True

    def shape_vector(self, dims):
        return ops.stack([ops.cast(d, "int64") for d in dims])

    def dtype(self, x):
        return np.asarray(x).dtype if is_host(x) else _dtype(x)

    @_on_host_when_possible
    def astype(self, x, dtype):
        target = np.dtype(dtype)
        if _is_float(x) and target.kind in "iu":
            x = ops.trunc(x)  # float -> int truncates toward zero on every backend
        return ops.cast(x, keras_dtype(target))

    @_on_host_when_possible
    def bitcast(self, x, dtype):
        # keras.ops has no bitcast: each backend's own (a framework quirk, kept here)
        target, backend = keras_dtype(dtype), keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            if _dtype(x) == np.bool_ or target == "bool":  # tf.bitcast refuses bool
                return ops.cast(tf.bitcast(ops.cast(x, "uint8"), "uint8"), target)
            return tf.bitcast(x, target)
        if backend == "jax":
            import jax

            return jax.lax.bitcast_convert_type(x, target)
        import torch

        return x.view(getattr(torch, target))

    @_on_host_when_possible
    def add(self, a, b):
        return _add(a, b)

    @_on_host_when_possible
    def subtract(self, a, b):
        return ops.subtract(a, b)

    @_on_host_when_possible
    def multiply(self, a, b):
        return ops.multiply(a, b)

    @_on_host_when_possible
    def divide(self, a, b):
        return ops.divide(a, b) if _is_float(ops.convert_to_tensor(a)) else _trunc_divide(a, b)

    @_on_host_when_possible
    def remainder(self, a, b):
        return ops.mod(a, b)

    @_on_host_when_possible
    def fmod(self, a, b):
        a, b = ops.convert_to_tensor(a), ops.convert_to_tensor(b)
        if _is_float(a):
            return ops.subtract(a, ops.multiply(b, ops.trunc(ops.divide(a, b))))
        return ops.subtract(a, ops.multiply(b, _trunc_divide(a, b)))

    @_on_host_when_possible
    def pow(self, a, b):
        a = ops.convert_to_tensor(a)
        if _is_float(a):
            return ops.power(a, ops.cast(b, a.dtype))
        return ops.cast(ops.power(ops.cast(a, "float64"), ops.cast(b, "float64")), a.dtype)

    @_on_host_when_possible
    def maximum(self, a, b):
        return ops.maximum(a, b)

    @_on_host_when_possible
    def minimum(self, a, b):
        return ops.minimum(a, b)

    @_on_host_when_possible
    def unary(self, name, x):
        return (_UNARY.get(name) or getattr(ops, name))(x)

    @_on_host_when_possible
    def where(self, condition, a, b):
        return ops.where(condition, a, b)

    @_on_host_when_possible
    def compare(self, name, a, b):
        result = (_COMPARE.get(name) or getattr(ops, name))(a, b)
        if name in _COMPARE:  # shifts by a negative count or by the width or more: all out
            a, b = ops.convert_to_tensor(a), ops.convert_to_tensor(b)
            bits = 8 * _dtype(a).itemsize
            out = ops.logical_or(ops.less(b, 0), ops.greater_equal(b, bits))
            spill = ops.zeros_like(result)
            if name == "bitwise_right_shift" and _dtype(a).kind == "i":
                spill = ops.where(ops.less(a, 0), ops.cast(-1, result.dtype), spill)
            result = ops.where(out, spill, result)
        return result

    @_on_host_when_possible
    def isnan(self, x):
        return ops.isnan(x)

    @_on_host_when_possible
    def isinf(self, x):
        return ops.isinf(x)

    @_on_host_when_possible
    def clip(self, x, low, high):
        x = ops.convert_to_tensor(x)
        low = x if low is None else ops.cast(low, x.dtype)
        high = x if high is None else ops.cast(high, x.dtype)
        return ops.minimum(ops.maximum(x, low), high)

    def arange(self, start, stop, step, dtype, like=None):
        return numpy_backend.arange(start, stop, step, dtype)

    def full(self, shape, value, dtype, like=None):
        if not is_host(shape):  # a run-time shape of a graph being traced
            return ops.full(ops.cast(shape, "int32"), value, dtype=keras_dtype(np.dtype(dtype)))
        return numpy_backend.full(shape, value, dtype)

    @_on_host_when_possible
    def reshape(self, x, shape):
        if not is_host(shape):  # a run-time shape of a graph being traced
            return ops.reshape(x, ops.cast(shape, "int32"))
        return ops.reshape(x, tuple(int(d) for d in shape))

    @_on_host_when_possible
    def permute_dims(self, x, axes):
        return ops.transpose(x, tuple(axes))

    @_on_host_when_possible
    def broadcast_to(self, x, shape):
        return ops.broadcast_to(x, tuple(int(d) for d in shape))

    def concat(self, arrays, axis):
        if is_host(list(arrays)):
            return numpy_backend.concat(arrays, axis)
        return ops.concatenate([ops.convert_to_tensor(a) for a in arrays], axis)

    def stack(self, arrays, axis):
        if is_host(list(arrays)):
            return numpy_backend.stack(arrays, axis)
        return ops.stack([ops.convert_to_tensor(a) for a in arrays], axis)

    def getitem(self, x, key):
        if is_host(x):
            return numpy_backend.getitem(x, key)
        key = key if isinstance(key, tuple) else (key,)
        dims = self.shape(x)
        ellipsis = [i for i, k in enumerate(key) if k is Ellipsis]
        if ellipsis:  # spell `...` out as full slices so each key entry names its axis
            i = ellipsis[0]
            key = key[:i] + (slice(None),) * (len(dims) - len(key) + 1) + key[i + 1 :]
        if any(isinstance(k, np.ndarray) for k in key):  # leading index arrays (GatherND)
            flat_index, index_shape = _linear_index(key, dims)
            flat = ops.reshape(x, (-1, *dims[len(key) :]))
            taken = ops.take(flat, flat_index.reshape(-1), axis=0)
            return ops.reshape(taken, (*index_shape, *dims[len(key) :]))
        # contiguous slices in one slice op, then strided ones and integers as takes
        starts, sizes, rest = [], [], []
        for axis, size in enumerate(dims):
            k = key[axis] if axis < len(key) else slice(None)
            if isinstance(k, slice) and k.step in (None, 1):
                start, stop, _ = k.indices(size)
                starts.append(start)
                sizes.append(max(stop - start, 0))
            else:
                starts.append(0)
                sizes.append(size)
                rest.append((axis, k))
        if list(sizes) != list(dims):
            x = ops.slice(x, starts, sizes)
        for axis, k in reversed(rest):  # from the last axis so integer keys keep axis numbers
            index = np.arange(dims[axis])[k]
            x = ops.take(x, np.asarray(index, np.int64), axis=axis)
        return x

    def setitem(self, x, key, value, reduction="none"):
        if is_host(x) and is_host(value):
            return numpy_backend.setitem(x, key, value, reduction)
        x = ops.convert_to_tensor(x)
        dims = self.shape(x)
        key = key if isinstance(key, tuple) else (key,)
        flat_index, _ = _linear_index(key, dims)
        inner = tuple(dims[len(key) :])
        flat = ops.reshape(x, (-1, *inner))
        updates = ops.reshape(ops.cast(value, x.dtype), (-1, *inner))
        indices = flat_index.reshape(-1, 1)
        if reduction == "none":
            return ops.reshape(ops.scatter_update(flat, indices, updates), dims)
        if reduction == "add":
            return ops.reshape(ops.add(flat, ops.scatter(indices, updates, flat.shape)), dims)
        count = int(np.prod(dims[: len(key)]))
        if reduction in ("max", "min"):
            sign = 1 if reduction == "max" else -1
            segment = ops.segment_max(
                ops.multiply(updates, sign), flat_index.reshape(-1), num_segments=count
            )
            hit = np.zeros(count, bool)
            hit[flat_index.reshape(-1)] = True
            mask = np.reshape(hit, (count,) + (1,) * len(inner))
            combined = ops.multiply(ops.maximum(ops.multiply(flat, sign), segment), sign)
            return ops.reshape(ops.where(mask, combined, flat), dims)
        # multiply: the product of the duplicates, one scatter per repetition
        out, order = flat, flat_index.reshape(-1)
        for position in range(len(order)):
            index = order[position : position + 1].reshape(1, 1)
            row = ops.take(out, order[position : position + 1], axis=0)
            product = ops.multiply(row, updates[position : position + 1])
            out = ops.scatter_update(out, index, product)
        return ops.reshape(out, dims)

    @_on_host_when_possible
    def take(self, x, indices, axis):
        return ops.take(x, indices, axis)

    @_on_host_when_possible
    def take_along_axis(self, x, indices, axis):
        return ops.take_along_axis(x, indices, axis)

    @_on_host_when_possible
    def flip(self, x, axes):
        return ops.flip(x, tuple(axes))

    @_on_host_when_possible
    def tile(self, x, repeats):
        return ops.tile(x, tuple(int(r) for r in repeats))

    def pad(self, x, pad_width, mode="constant", value=0):
        if is_host(x):
            return numpy_backend.pad(x, pad_width, mode, value)
        width = [(int(lo), int(hi)) for lo, hi in pad_width]
        if mode == "constant":
            return ops.pad(x, width, "constant", constant_values=value)
        if mode == "wrap":  # tile-free circular padding: concatenate the wrapped slices
            for axis, (lo, hi) in enumerate(width):
                size = self.shape(x)[axis]
                index = np.arange(-lo, size + hi) % size
                x = ops.take(x, index, axis=axis)
            return x
        if (
            mode == "edge"
        ):  # repeat the border: gather with clipped indices (keras.ops has no edge mode)
            for axis, (lo, hi) in enumerate(width):
                size = self.shape(x)[axis]
                x = ops.take(x, np.clip(np.arange(-lo, size + hi), 0, size - 1), axis=axis)
            return x
        return ops.pad(x, width, "reflect")

    @_on_host_when_possible
    def reduce(self, name, x, axes, keepdims):
        x = ops.convert_to_tensor(x)
        if name == "mean" and not _is_float(x):
            return ops.cast(ops.mean(ops.cast(x, "float64"), tuple(axes), keepdims), x.dtype)
        if name in ("max", "min") and _dtype(x) == np.bool_:
            found = _REDUCE[name](ops.cast(x, "uint8"), tuple(axes), keepdims)
            return ops.cast(found, "bool")
        return ops.cast(_REDUCE[name](x, tuple(axes), keepdims), x.dtype)

    @_on_host_when_possible
    def argmax(self, x, axis, keepdims):
        return ops.cast(ops.argmax(x, axis, keepdims=keepdims), "int64")

    @_on_host_when_possible
    def argmin(self, x, axis, keepdims):
        return ops.cast(ops.argmin(x, axis, keepdims=keepdims), "int64")

    @_on_host_when_possible
    def cumulative(self, name, x, axis):
        return ops.cast(getattr(ops, name)(x, axis), ops.convert_to_tensor(x).dtype)

    @_on_host_when_possible
    def argsort(self, x, axis, descending):
        # keras.ops.argsort is not stable everywhere: sort on (value, index) keys instead
        x = ops.convert_to_tensor(x)
        size = self.shape(x)[axis]
        values = ops.negative(_float(x)) if descending else _float(x)
        moved = ops.moveaxis(values, axis, -1)
        _, order = ops.top_k(ops.negative(moved), k=size, sorted=True)
        # top_k breaks ties by the lower index first, which is the stable order we want
        return ops.cast(ops.moveaxis(order, -1, axis), "int64")

    @_on_host_when_possible
    def matmul(self, a, b):
        return ops.matmul(a, b)

    def einsum(self, equation, *operands):
        if is_host(list(operands)):
            return numpy_backend.einsum(equation, *operands)
        return ops.einsum(equation, *operands)

    @_on_host_when_possible
    def det(self, x):
        return ops.det(x)

    @_on_host_when_possible
    def softmax(self, x, axis):
        return _in_float32(ops.softmax, x, axis=axis)

    @_on_host_when_possible
    def log_softmax(self, x, axis):
        return _in_float32(ops.log_softmax, x, axis=axis)

    # ---------------------------------------------------------------- NN extras, channels-last
    def conv(self, x, w, b, strides, pads, dilations, groups):
        x = ops.convert_to_tensor(x)
        w = ops.cast(w, x.dtype)
        rank = len(self.shape(w)) - 2
        x = to_channels_last(pad_channels_first(x, pads))
        kernel = ops.transpose(w, (*range(2, 2 + rank), 1, 0))  # spatial..., in/groups, out
        out_channels = self.shape(w)[0]
        if groups == 1:
            y = ops.conv(x, kernel, tuple(strides), "valid", dilation_rate=tuple(dilations))
        else:
            per_in, per_out = self.shape(x)[-1] // groups, out_channels // groups
            y = ops.concatenate(
                [
                    ops.conv(
                        x[..., g * per_in : (g + 1) * per_in],
                        kernel[..., g * per_out : (g + 1) * per_out],
                        tuple(strides),
                        "valid",
                        dilation_rate=tuple(dilations),
                    )
                    for g in range(groups)
                ],
                axis=-1,
            )
        y = to_channels_first(y)
        if b is not None:
            y = _add(y, ops.reshape(ops.cast(b, y.dtype), (1, -1) + (1,) * rank))
        return y

    def conv_transpose(self, x, w, b, strides, pads, dilations, groups, output_padding):
        x = ops.convert_to_tensor(x)
        w = ops.cast(w, x.dtype)
        rank = len(self.shape(w)) - 2
        x_last = to_channels_last(x)
        # ONNX (C, M/groups, *K) -> keras (*K, M/groups, C/groups) per group
        kernel = ops.transpose(w, (*range(2, 2 + rank), 1, 0))
        per_in = self.shape(w)[0] // groups

        def one(xs, ks):
            return ops.conv_transpose(
                xs,
                ks,
                tuple(strides),
                "valid",
                output_padding=(0,) * rank,
                dilation_rate=tuple(dilations),
            )

        if groups == 1:
            y = one(x_last, kernel)
        else:
            y = ops.concatenate(
                [
                    one(
                        x_last[..., g * per_in : (g + 1) * per_in],
                        kernel[..., g * per_in : (g + 1) * per_in],
                    )
                    for g in range(groups)
                ],
                axis=-1,
            )
        y = to_channels_first(y)
        y = ops.pad(y, [(0, 0), (0, 0)] + [(0, int(p)) for p in output_padding])
        dims = self.shape(y)
        crop = [(slice(None)), slice(None)] + [
            slice(lo, dims[2 + i] - hi) for i, (lo, hi) in enumerate(pads)
        ]
        y = self.getitem(y, tuple(crop))
        if b is not None:
            y = _add(y, ops.reshape(ops.cast(b, y.dtype), (1, -1) + (1,) * rank))
        return y

    def pool(
        self, kind, x, kernel, strides, pads, dilations, ceil_mode, count_include_pad=False, p=2
    ):
        if is_host(x):
            return numpy_backend.pool(
                kind, x, kernel, strides, pads, dilations, ceil_mode, count_include_pad, p
            )
        x = ops.convert_to_tensor(x)
        kernel, strides = tuple(int(k) for k in kernel), tuple(int(s) for s in strides)
        dilations = tuple(int(d) for d in dilations)
        declared = [tuple(int(v) for v in pad) for pad in pads]
        # pad explicitly, the end grown so that ceil_mode's extra windows are whole windows:
        # the reductions below then see no padding and no partial window
        pads = ceil_mode_pads(self.shape(x)[2:], kernel, strides, declared, dilations, ceil_mode)
        if kind == "max":
            dtype = np.dtype(_dtype(x))  # the lowest value of an integer pool: dtype's minimum
            low = -math.inf if dtype.kind == "f" else int(np.iinfo(dtype).min)
            padded = pad_channels_first(x, pads, low)
            if any(d != 1 for d in dilations):
                return window_reduce(ops.max, padded, kernel, strides, dilations)
            return to_channels_first(ops.max_pool(to_channels_last(padded), kernel, strides))
        if kind == "lp":
            # exponents in x's dtype: Keras's torch backend makes a Python float a float32
            exponents = [np.asarray(e, keras_dtype(_dtype(x))) for e in (p, 1.0 / p)]
            powered = pad_channels_first(ops.power(ops.abs(x), exponents[0]), pads)
            return ops.power(window_sum(powered, kernel, strides, dilations), exponents[1])
        summed = window_sum(pad_channels_first(x, pads), kernel, strides, dilations)
        # the count of each window (a constant, so computed on the host): real inputs plus the
        # declared (not the ceil-mode) padding when count_include_pad
        ones = np.ones((1, 1, *self.shape(x)[2:]), np.float32)
        fill = 1.0 if count_include_pad else 0.0
        ones = np.pad(ones, [(0, 0), (0, 0), *declared], constant_values=fill)
        extra = [(0, hi - d_hi) for (_, hi), (_, d_hi) in zip(pads, declared)]
        ones = np.pad(ones, [(0, 0), (0, 0), *extra])
        counts = numpy_backend.pool("avg", ones, kernel, strides, [(0, 0)] * len(kernel),
                                    dilations, False, True) * math.prod(kernel)  # fmt: skip
        return ops.divide(summed, counts.astype(keras_dtype(_dtype(x))))


keras_backend = KerasBackend()
