"""The backend protocol of interop.backend on jax.numpy / jax.lax (see there for the contract).

Host-first: a call whose array arguments are all numpy (constants, shapes read with
``shape``, values folded at emission) is answered by the numpy backend, so shape
arithmetic (Shape -> Gather -> Concat -> Reshape) stays concrete under ``jax.jit`` and
the semantics can read it with ``to_numpy``. Only calls touching a ``jax.Array`` (a
tracer under jit) run in JAX. What cannot be dynamic under jit: any value the semantics
read with ``to_numpy`` (Reshape's shape, Slice's starts, TopK's k, Tile's repeats,
Expand's shape, the indices of ScatterND, If's condition, Loop's trip count) must not
depend on the *values* of the graph inputs; it may depend on their shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from interop.backend import numpy_backend

_UNARY = {
    "asin": jnp.arcsin,
    "acos": jnp.arccos,
    "atan": jnp.arctan,
    "asinh": jnp.arcsinh,
    "acosh": jnp.arccosh,
    "atanh": jnp.arctanh,
    "bitwise_invert": jnp.invert,
    "erf": jax.scipy.special.erf,
    "sigmoid": jax.nn.sigmoid,
    "round": jnp.round,
}
_COMPARE = {"bitwise_left_shift": jnp.left_shift, "bitwise_right_shift": jnp.right_shift}
_REDUCE = {"sum": jnp.sum, "prod": jnp.prod, "max": jnp.max, "min": jnp.min, "mean": jnp.mean}
_CONV_SPECS = {1: ("NCH", "OIH"), 2: ("NCHW", "OIHW"), 3: ("NCDHW", "OIDHW")}


def is_traced(x) -> bool:
    return isinstance(x, jax.Array)


def _is_tracer(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_tracer(v) for v in value)
    return isinstance(value, jax.core.Tracer)


def _to_host(value):
    if isinstance(value, (list, tuple)):
        return [_to_host(v) for v in value]
    return np.asarray(value) if isinstance(value, jax.Array) else value


def _host(*values) -> bool:
    """True when no argument is a JAX array: the numpy backend answers (static values)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            if not _host(*value):
                return False
        elif isinstance(value, jax.Array):
            return False
    return True


class StaticValueError(ValueError):
    """A shape-like input depends on traced values; it must be static under jax.jit."""


class JaxBackend:
    name = "jax"
    float_dtype = np.dtype("float32")

    def __getattribute__(self, name):
        # every protocol function falls back to numpy when all its arrays are host arrays
        attribute = object.__getattribute__(self, name)
        if name.startswith("_") or name in _ALWAYS_JAX or not callable(attribute):
            return attribute

        def dispatch(*args, **kwargs):
            if _host(*args, *kwargs.values()):
                return getattr(numpy_backend, name)(*args, **kwargs)
            return attribute(*args, **kwargs)

        return dispatch

    def __getattr__(self, name):
        # a protocol function this backend lacks (added to numpy later): host values only
        function = getattr(numpy_backend, name)

        def host_only(*args, **kwargs):
            if not _host(*args, *kwargs.values()) and _is_tracer(args):
                raise NotImplementedError(f"jax backend: {name} on traced values")
            return function(*[_to_host(a) for a in args], **kwargs)

        return host_only

    def bitcast(self, x, dtype):
        dtype = np.dtype(dtype)
        if dtype == np.bool_ or np.dtype(x.dtype) == np.bool_:
            return jnp.asarray(x).view(dtype) if dtype.itemsize == 1 else None
        return lax.bitcast_convert_type(x, dtype)

    def asarray(self, value, dtype=None, like=None):
        if isinstance(value, jax.Array):
            return value if dtype is None else value.astype(dtype)
        return np.asarray(value, dtype=dtype)

    def to_numpy(self, x):
        try:
            return np.asarray(x)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as err:
            raise StaticValueError(
                "a shape-like input (shape, starts, indices, condition, count) depends on "
                "traced values; under jax.jit it must come from constants or input shapes"
            ) from err

    def shape(self, x):
        return tuple(int(d) for d in np.shape(x))

    def dtype(self, x):
        return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype

    def astype(self, x, dtype):
        dtype = np.dtype(dtype)
        if dtype.name.startswith(("float8", "int2", "int4", "uint2", "uint4", "float4")):
            if not _is_tracer(x):  # XLA rounds/saturates these differently: numpy's rules
                return jnp.asarray(numpy_backend.astype(np.asarray(x), dtype))
        return jnp.asarray(x).astype(dtype)

    def add(self, a, b):
        return jnp.add(a, b)

    def subtract(self, a, b):
        return jnp.subtract(a, b)

    def multiply(self, a, b):
        return jnp.multiply(a, b)

    def divide(self, a, b):
        if jnp.issubdtype(self.dtype(a), jnp.integer):  # ONNX integer division truncates
            a, b = jnp.broadcast_arrays(jnp.asarray(a), jnp.asarray(b, self.dtype(a)))
            return lax.div(a, b)
        # XLA turns a division by a broadcast or constant divisor into a multiplication by its
        # reciprocal, up to an ulp off IEEE division (QuantizeLinear's round(x / scale) then
        # lands on the other side of a half): the divisor, at full shape, goes behind a barrier
        dtype = jnp.result_type(a, b)
        shape = jnp.broadcast_shapes(jnp.shape(a), jnp.shape(b))
        b = lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(b, dtype), shape))
        return jnp.divide(jnp.asarray(a, dtype), b)

    def remainder(self, a, b):
        return jnp.remainder(a, b)

    def fmod(self, a, b):
        return jnp.fmod(a, b)

    def pow(self, a, b):
        return jnp.power(a, b).astype(self.dtype(a))

    def maximum(self, a, b):
        return jnp.maximum(a, b)

    def minimum(self, a, b):
        return jnp.minimum(a, b)

    def unary(self, name, x):
        return (_UNARY.get(name) or getattr(jnp, name))(x)

    def where(self, condition, a, b):
        return jnp.where(condition, a, b)

    def compare(self, name, a, b):
        return (_COMPARE.get(name) or getattr(jnp, name))(a, b)

    def isnan(self, x):
        return jnp.isnan(x)

    def isinf(self, x):
        return jnp.isinf(x)

    def clip(self, x, low, high):
        return jnp.clip(x, low, high)

    def reshape(self, x, shape):
        return jnp.reshape(x, tuple(int(s) for s in shape))

    def permute_dims(self, x, axes):
        return jnp.transpose(x, tuple(axes))

    def broadcast_to(self, x, shape):
        return jnp.broadcast_to(x, tuple(int(s) for s in shape))

    def concat(self, arrays, axis):
        return jnp.concatenate(list(arrays), axis=axis)

    def stack(self, arrays, axis):
        return jnp.stack(list(arrays), axis=axis)

    def getitem(self, x, key):
        return jnp.asarray(x)[key]

    def setitem(self, x, key, value, reduction="none"):
        at = jnp.asarray(x).at[key]
        method = {"none": "set", "add": "add", "mul": "multiply", "max": "max", "min": "min"}
        return getattr(at, method[reduction])(value)

    def take(self, x, indices, axis):
        return jnp.take(x, indices, axis=axis)

    def take_along_axis(self, x, indices, axis):
        return jnp.take_along_axis(x, indices, axis=axis)

    def flip(self, x, axes):
        return jnp.flip(x, axis=tuple(axes))

    def tile(self, x, repeats):
        return jnp.tile(x, tuple(int(r) for r in repeats))

    def pad(self, x, pad_width, mode="constant", value=0):
        if mode == "constant":
            return jnp.pad(x, pad_width, mode="constant", constant_values=value)
        return jnp.pad(x, pad_width, mode=mode)

    def reduce(self, name, x, axes, keepdims):
        out = _REDUCE[name](x, axis=tuple(axes), keepdims=keepdims)
        return (
            out if name == "mean" and jnp.issubdtype(x.dtype, jnp.floating) else out.astype(x.dtype)
        )

    def argmax(self, x, axis, keepdims):
        return jnp.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64)

    def argmin(self, x, axis, keepdims):
        return jnp.argmin(x, axis=axis, keepdims=keepdims).astype(np.int64)

    def cumulative(self, name, x, axis):
        return getattr(jnp, name)(x, axis=axis).astype(x.dtype)

    def argsort(self, x, axis, descending):
        if descending:  # negate rather than reverse, so ties keep the lower index first
            x = -(x.astype(jnp.float32) if x.dtype.kind in "ub" else x)
        return jnp.argsort(x, axis=axis, stable=True)

    def matmul(self, a, b):
        return jnp.matmul(a, b)

    def einsum(self, equation, *operands):
        return jnp.einsum(equation, *operands)

    def det(self, x):
        return jnp.linalg.det(x)

    def softmax(self, x, axis):
        return jax.nn.softmax(x, axis=axis)

    def log_softmax(self, x, axis):
        return jax.nn.log_softmax(x, axis=axis)

    def conv(self, x, w, b, strides, pads, dilations, groups):
        lhs, rhs = _CONV_SPECS[np.ndim(w) - 2]
        out = lax.conv_general_dilated(
            x,
            w,
            tuple(strides),
            [tuple(p) for p in pads],
            rhs_dilation=tuple(dilations),
            dimension_numbers=(lhs, rhs, lhs),
            feature_group_count=groups,
        )
        return out if b is None else out + jnp.reshape(b, (1, -1) + (1,) * (out.ndim - 2))

    def conv_transpose(self, x, w, b, strides, pads, dilations, groups, output_padding):
        # the gradient of a convolution: dilate the input, flip the kernel, swap its I/O per group
        spatial = np.ndim(w) - 2
        c, m_per_group, *kernel = np.shape(w)
        w = jnp.reshape(w, (groups, c // groups, m_per_group, *kernel))
        w = jnp.swapaxes(w, 1, 2).reshape(groups * m_per_group, c // groups, *kernel)
        w = jnp.flip(w, axis=tuple(range(2, 2 + spatial)))
        padding = [
            (d * (k - 1) - lo, d * (k - 1) - hi + extra)
            for (lo, hi), k, d, extra in zip(pads, kernel, dilations, output_padding)
        ]
        lhs, rhs = _CONV_SPECS[spatial]
        out = lax.conv_general_dilated(
            x,
            w,
            (1,) * spatial,
            padding,
            lhs_dilation=tuple(strides),
            rhs_dilation=tuple(dilations),
            dimension_numbers=(lhs, rhs, lhs),
            feature_group_count=groups,
        )
        return out if b is None else out + jnp.reshape(b, (1, -1) + (1,) * spatial)

    def pool(
        self, kind, x, kernel, strides, pads, dilations, ceil_mode, count_include_pad=False, p=2
    ):
        spatial = np.shape(x)[2:]
        declared = [tuple(pad) for pad in pads]
        pads = list(declared)
        if ceil_mode:  # extend the end padding so the last partial window counts
            for axis, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
                lo, hi = pads[axis]
                effective = (k - 1) * d + 1
                out_floor = (size + lo + hi - effective) // s + 1
                out_ceil = -(-(size + lo + hi - effective) // s) + 1
                if (out_ceil - 1) * s >= size + lo:
                    out_ceil -= 1
                pads[axis] = (lo, hi + (out_ceil - out_floor) * s)
        window = (1, 1, *kernel)
        window_strides = (1, 1, *strides)
        padding = ((0, 0), (0, 0), *pads)
        dilation = (1, 1, *dilations)

        def window_sum(values):
            return lax.reduce_window(
                values, 0.0, lax.add, window, window_strides, padding, window_dilation=dilation
            )

        if kind == "max":
            dtype = np.dtype(x.dtype)
            low = -np.inf if dtype.kind == "f" else np.iinfo(dtype).min
            # a numpy scalar, not jnp.array: under jit the latter is a tracer, and JAX then
            # falls back to a generic reduce_window that it cannot differentiate
            return lax.reduce_window(
                x, np.array(low, dtype)[()], lax.max, window, window_strides, padding,
                window_dilation=dilation,
            )  # fmt: skip
        if kind == "lp":
            return (window_sum(jnp.abs(x) ** p) ** (1.0 / p)).astype(x.dtype)
        ones = np.ones((1, 1, *spatial), np.float32)
        ones = np.pad(ones, [(0, 0), (0, 0), *declared], constant_values=float(count_include_pad))
        ones = np.pad(
            ones, [(0, 0), (0, 0), *[(0, h - dh) for (_, h), (_, dh) in zip(pads, declared)]]
        )
        counts = lax.reduce_window(
            jnp.asarray(ones), 0.0, lax.add, window, window_strides, "VALID",
            window_dilation=dilation,
        )  # fmt: skip
        return (window_sum(x) / counts).astype(x.dtype)


# creation functions take no arrays: they always answer on the host (static values)
_ALWAYS_JAX = {"asarray", "to_numpy", "shape", "dtype", "name", "float_dtype"}

jax_backend = JaxBackend()
for _name in ("arange", "full"):
    setattr(jax_backend, _name, getattr(numpy_backend, _name))
