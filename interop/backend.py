"""The backend protocol the op semantics are written against, and its numpy implementation.

Every ONNX op of `interop.ops` is one function ``(xp, *inputs, **attributes)``; ``xp`` is
a backend namespace passed in explicitly. A backend is a small Array-API-like set of
functions (``add``, ``reshape``, ``sum``, ``take``...) plus a few NN extras (``conv``,
``max_pool``, ``erf``...). Each framework adapter maps it in one thin ``backend.py``
(``interop.adapters.torch.backend``); all framework quirks live there, so the op
semantics are written once.

Conventions of the protocol:

- dtypes are numpy dtypes (``np.dtype("float32")``); a backend maps them to its own;
- ``shape(x)`` returns a tuple of Python ints (dynamic dims are read at run time);
- ``to_numpy(x)`` copies a (small) array to the host: shape tensors, indices, counts;
- axes are non-negative ints or tuples of them (the ops normalise negative axes);
- ``pads`` of the NN extras are ``[(begin, end), ...]`` per spatial axis.

The numpy backend doubles as the reference evaluator:

>>> import numpy as np
>>> from interop.backend import numpy_backend as xp
>>> xp.add(np.ones(2, np.float32), np.ones(2, np.float32)).tolist()
[2.0, 2.0]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _array(value: Any) -> np.ndarray:
    # numpy reductions and ufuncs on 0-d arrays return numpy scalars; the IR wants arrays
    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf; math.erf per element is exact to float64 and fast enough for a reference
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype)


def ceil_mode_pads(spatial, kernel, strides, pads, dilations, ceil_mode) -> list:
    """Pooling pads ``[(begin, end)]`` with each end grown by ceil_mode's extra windows (ONNX:
    a window must start inside the input or the begin pad); the hosts' pools share it."""
    pads = [(int(lo), int(hi)) for lo, hi in pads]
    if not ceil_mode:
        return pads
    extended = []
    for size, k, s, d, (lo, hi) in zip(spatial, kernel, strides, dilations, pads):
        span = size + lo + hi - ((k - 1) * d + 1)
        out_floor, out_ceil = span // s + 1, -(-span // s) + 1
        if (out_ceil - 1) * s >= size + lo:  # the last window must start inside the input
            out_ceil -= 1
        extended.append((lo, hi + (out_ceil - out_floor) * s))
    return extended


def _window_view(x: np.ndarray, kernel, strides, dilations) -> np.ndarray:
    """(N, C, *out, *kernel) view of a padded N,C,spatial array."""
    spatial = len(kernel)
    effective = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    view = np.lib.stride_tricks.sliding_window_view(x, effective, axis=tuple(range(2, 2 + spatial)))
    index: tuple[slice, ...] = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    return view[index]


class NumpyBackend:
    """The backend protocol on numpy; also the documentation of each protocol function."""

    name = "numpy"
    float_dtype = np.dtype("float32")

    # ---------------------------------------------------------------- host and dtypes
    def asarray(self, value: Any, dtype: Any = None, like: Any = None) -> np.ndarray:
        return np.asarray(value, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in np.shape(x))

    def dtype(self, x: Any) -> np.dtype:
        return np.asarray(x).dtype

    def astype(self, x: Any, dtype: Any) -> np.ndarray:
        return np.asarray(x).astype(dtype)

    def bitcast(self, x: Any, dtype: Any) -> np.ndarray:
        """The same bits read as another dtype of the same width (ONNX BitCast)."""
        return np.asarray(x).view(dtype)

    # ---------------------------------------------------------------- elementwise
    def add(self, a, b):
        return _array(np.add(a, b))

    def subtract(self, a, b):
        return _array(np.subtract(a, b))

    def multiply(self, a, b):
        return _array(np.multiply(a, b))

    def divide(self, a, b):
        if np.issubdtype(np.asarray(a).dtype, np.integer):
            return _array(np.trunc(np.divide(a, b)).astype(np.asarray(a).dtype))
        return _array(np.divide(a, b))

    def remainder(self, a, b):
        return _array(np.mod(a, b))

    def fmod(self, a, b):
        return _array(np.fmod(a, b))

    def pow(self, a, b):
        # ONNX Pow keeps the base's type whatever the exponent's
        return _array(np.power(a, b)).astype(np.asarray(a).dtype)

    def maximum(self, a, b):
        return _array(np.maximum(a, b))

    def minimum(self, a, b):
        return _array(np.minimum(a, b))

    def unary(self, name: str, x):
        """Elementwise math by Array-API name: exp, log, sqrt, sin, asin, tanh, floor, round..."""
        if name == "erf":
            return _erf(np.asarray(x))
        if name == "sigmoid":
            x = np.asarray(x)
            return _array((1.0 / (1.0 + np.exp(-x))).astype(x.dtype))
        function = {
            "asin": np.arcsin,
            "acos": np.arccos,
            "atan": np.arctan,
            "asinh": np.arcsinh,
            "acosh": np.arccosh,
            "atanh": np.arctanh,
            "round": np.rint,
            "bitwise_invert": np.invert,
        }.get(name) or getattr(np, name)
        return _array(function(x))

    def where(self, condition, a, b):
        return _array(np.where(condition, a, b))

    def compare(self, name: str, a, b):
        """equal, not_equal, less, less_equal, greater, greater_equal, logical_and/or/xor, bitwise_*."""
        function = {"bitwise_left_shift": np.left_shift, "bitwise_right_shift": np.right_shift}.get(
            name
        ) or getattr(np, name)
        return _array(function(a, b))

    def isnan(self, x):
        return _array(np.isnan(x))

    def isinf(self, x):
        return _array(np.isinf(x))

    def clip(self, x, low, high):
        return _array(np.clip(x, low, high))

    # ---------------------------------------------------------------- creation
    def arange(self, start, stop, step, dtype, like=None):
        return np.arange(start, stop, step, dtype=dtype)

    def full(self, shape, value, dtype, like=None):
        return np.full(tuple(shape), value, dtype=dtype)

    # ---------------------------------------------------------------- shape and indexing
    def reshape(self, x, shape):
        return np.reshape(x, tuple(shape))

    def permute_dims(self, x, axes):
        return np.transpose(x, tuple(axes))

    def broadcast_to(self, x, shape):
        return np.broadcast_to(x, tuple(shape)).copy()

    def concat(self, arrays, axis):
        return np.concatenate(list(arrays), axis=axis)

    def stack(self, arrays, axis):
        return np.stack(list(arrays), axis=axis)

    def getitem(self, x, key):
        return _array(np.asarray(x)[key])

    def setitem(self, x, key, value, reduction: str = "none"):
        """Functional update: a copy of ``x`` with ``x[key] (op)= value`` (key: tuple of index arrays)."""
        out = np.array(x, copy=True)
        if reduction == "none":
            out[key] = value
        else:
            ufunc = {"add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}[
                reduction
            ]
            ufunc.at(out, key, value)
        return out

    def take(self, x, indices, axis):
        return _array(np.take(x, indices, axis=axis))

    def take_along_axis(self, x, indices, axis):
        return np.take_along_axis(x, indices, axis=axis)

    def flip(self, x, axes):
        return np.flip(x, axis=tuple(axes))

    def tile(self, x, repeats):
        return np.tile(x, tuple(repeats))

    def pad(self, x, pad_width, mode="constant", value=0):
        if mode == "constant":
            return np.pad(x, pad_width, mode="constant", constant_values=value)
        return np.pad(
            x, pad_width, mode={"edge": "edge", "reflect": "reflect", "wrap": "wrap"}[mode]
        )

    # ---------------------------------------------------------------- reductions and scans
    def reduce(self, name: str, x, axes, keepdims: bool):
        """sum, prod, max, min, mean over ``axes`` (a tuple)."""
        x = np.asarray(x)
        out = getattr(np, {"max": "amax", "min": "amin"}.get(name, name))(
            x, axis=tuple(axes), keepdims=keepdims
        )
        return _array(out).astype(x.dtype) if name != "mean" or x.dtype.kind == "f" else _array(out)

    def argmax(self, x, axis, keepdims):
        return _array(np.argmax(x, axis=axis, keepdims=keepdims)).astype(np.int64)

    def argmin(self, x, axis, keepdims):
        return _array(np.argmin(x, axis=axis, keepdims=keepdims)).astype(np.int64)

    def cumulative(self, name: str, x, axis):
        """cumsum or cumprod along ``axis``."""
        return getattr(np, name)(x, axis=axis).astype(np.asarray(x).dtype)

    def argsort(self, x, axis, descending: bool):
        """Stable sort order (ties keep the lower index first)."""
        x = np.asarray(x)
        if descending:
            x = -(x.astype(np.float64) if x.dtype.kind in "ub" else x)
        return np.argsort(x, axis=axis, kind="stable")

    # ---------------------------------------------------------------- linear algebra
    def matmul(self, a, b):
        dtype = np.result_type(a, b)
        # ml_dtypes' matmul loops (bfloat16, float8) answer float32: round back to ONNX's type
        return _array(np.matmul(a, b)).astype(dtype, copy=False)

    def einsum(self, equation, *operands):
        dtype = np.result_type(*operands)
        if dtype.name == "bfloat16":  # numpy's einsum has no bfloat16 loop: float32, rounded back
            operands = tuple(np.asarray(o, np.float32) for o in operands)
            return _array(np.einsum(equation, *operands)).astype(dtype)
        return _array(np.einsum(equation, *operands))

    def det(self, x):
        return _array(np.linalg.det(x)).astype(np.asarray(x).dtype)

    # ---------------------------------------------------------------- NN extras
    def softmax(self, x, axis):
        shifted = x - np.max(x, axis=axis, keepdims=True)
        exp = np.exp(shifted)
        return _array(exp / np.sum(exp, axis=axis, keepdims=True))

    def log_softmax(self, x, axis):
        shifted = x - np.max(x, axis=axis, keepdims=True)
        return _array(shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True)))

    def conv(self, x, w, b, strides, pads, dilations, groups):
        """N-d cross-correlation (ONNX Conv) of x (N, C, *S) with w (M, C/groups, *K)."""
        kernel = w.shape[2:]
        x = np.pad(x, [(0, 0), (0, 0), *pads])
        windows = _window_view(x, kernel, strides, dilations)  # N, C, *out, *K
        n, c = x.shape[:2]
        out_spatial = windows.shape[2 : 2 + len(kernel)]
        m = w.shape[0]
        windows = windows.reshape(n, groups, c // groups, *out_spatial, *kernel)
        weight = w.reshape(groups, m // groups, c // groups, *kernel)
        letters = "abcdefgh"[: len(kernel)]
        spatial = "pqrstuvw"[: len(kernel)]
        out = np.einsum(f"ngc{spatial}{letters},gmc{letters}->ngm{spatial}", windows, weight)
        out = out.reshape(n, m, *out_spatial).astype(x.dtype)
        if b is not None:
            out = out + np.reshape(b, (1, m) + (1,) * len(kernel))
        return out

    def conv_transpose(self, x, w, b, strides, pads, dilations, groups, output_padding):
        """N-d transposed convolution (ONNX ConvTranspose) with w (C, M/groups, *K)."""
        n, c = x.shape[:2]
        spatial_in = x.shape[2:]
        kernel = w.shape[2:]
        m_per_group = w.shape[1]
        full = [
            (i - 1) * s + (k - 1) * d + 1
            for i, s, k, d in zip(spatial_in, strides, kernel, dilations)
        ]
        out = np.zeros(
            (n, groups * m_per_group, *[f + op for f, op in zip(full, output_padding)]), x.dtype
        )
        xg = x.reshape(n, groups, c // groups, *spatial_in)
        wg = w.reshape(groups, c // groups, m_per_group, *kernel)
        for offsets in np.ndindex(*kernel):
            contribution = np.einsum("ngc...,gcm->ngm...", xg, wg[(slice(None),) * 3 + offsets])
            contribution = contribution.reshape(n, groups * m_per_group, *spatial_in)
            index = (slice(None), slice(None)) + tuple(
                slice(o * d, o * d + (i - 1) * s + 1, s)
                for o, d, i, s in zip(offsets, dilations, spatial_in, strides)
            )
            out[index] += contribution
        crop = (slice(None), slice(None)) + tuple(
            slice(lo, out.shape[2 + axis] - hi) for axis, (lo, hi) in enumerate(pads)
        )
        out = out[crop]
        if b is not None:
            out = out + np.reshape(b, (1, -1) + (1,) * len(kernel))
        return out

    def pool(
        self,
        kind: str,
        x,
        kernel,
        strides,
        pads,
        dilations,
        ceil_mode,
        count_include_pad=False,
        p=2,
    ):
        """max / avg / lp pooling; pads are ``(begin, end)`` and may be extended for ceil_mode."""
        spatial = x.shape[2:]
        declared = list(pads)
        pads = ceil_mode_pads(spatial, kernel, strides, pads, dilations, ceil_mode)
        fill = -np.inf if kind == "max" else 0.0
        padded = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *pads], constant_values=fill)
        windows = _window_view(padded, kernel, strides, dilations)
        axes = tuple(range(-len(kernel), 0))
        if kind == "max":
            return windows.max(axis=axes).astype(x.dtype)
        if kind == "lp":
            return (np.sum(np.abs(windows) ** p, axis=axes) ** (1.0 / p)).astype(x.dtype)
        total = windows.sum(axis=axes)
        # count the real inputs of each window, plus the declared (not the ceil-mode) padding
        ones = np.ones((1, 1, *spatial))
        ones = np.pad(
            ones, [(0, 0), (0, 0), *declared], constant_values=1.0 if count_include_pad else 0.0
        )
        extra = [(0, hi - declared_hi) for (_, hi), (_, declared_hi) in zip(pads, declared)]
        ones = np.pad(ones, [(0, 0), (0, 0), *extra], constant_values=0.0)
        counts = _window_view(ones, kernel, strides, dilations).sum(axis=axes)
        return (total / counts).astype(x.dtype)


numpy_backend = NumpyBackend()
