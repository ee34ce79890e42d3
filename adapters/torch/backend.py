"""The backend protocol of interop.backend on torch (see there for the contract)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from interop.backend import ceil_mode_pads, numpy_backend

_TO_TORCH = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.uint32): torch.uint32,
    np.dtype(np.uint64): torch.uint64,
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.complex64): torch.complex64,
    np.dtype(np.complex128): torch.complex128,
    np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
    np.dtype(ml_dtypes.float8_e4m3fn): torch.float8_e4m3fn,
    np.dtype(ml_dtypes.float8_e5m2): torch.float8_e5m2,
    np.dtype(ml_dtypes.float8_e4m3fnuz): torch.float8_e4m3fnuz,
    np.dtype(ml_dtypes.float8_e5m2fnuz): torch.float8_e5m2fnuz,
}
_TO_NUMPY = {v: k for k, v in _TO_TORCH.items()}
_BITS_VIEW = {1: torch.uint8, 2: torch.uint16}  # how sub-32-bit types numpy lacks cross over
_UNARY = {"negative": torch.neg, "round": torch.round, "bitwise_invert": torch.bitwise_not}
_POOL = {
    1: (F.max_pool1d, F.avg_pool1d),
    2: (F.max_pool2d, F.avg_pool2d),
    3: (F.max_pool3d, F.avg_pool3d),
}
_REDUCE = {"sum": torch.sum, "prod": None, "max": torch.amax, "min": torch.amin, "mean": torch.mean}


# ONNX dtypes torch lacks (sub-byte, e8m0, float4) or has without CPU kernels (uint16-64):
# held in a wider carrier dtype whose values are exact, tagged with the ONNX dtype
_CARRIER = {
    np.dtype(np.uint16): torch.int32,
    np.dtype(np.uint32): torch.int64,
    np.dtype(np.uint64): torch.int64,  # values above 2**63 keep their bits (two's complement)
    np.dtype(ml_dtypes.int4): torch.int8,
    np.dtype(ml_dtypes.int2): torch.int8,
    np.dtype(ml_dtypes.uint4): torch.uint8,
    np.dtype(ml_dtypes.uint2): torch.uint8,
    np.dtype(ml_dtypes.float4_e2m1fn): torch.float32,
    np.dtype(ml_dtypes.float8_e8m0fnu): torch.float32,
}
_INDEX_FUNCTIONS = {"argmax", "argmin", "argsort", "nonzero", "topk", "sort"}


class OnnxTyped(torch.Tensor):
    """A carrier tensor tagged with the ONNX dtype it stands for; results of the carrier
    dtype computed from it keep the tag, so outputs convert back to the ONNX dtype."""

    onnx_dtype: np.dtype

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        tag = next((a.onnx_dtype for a in _flat(args) if isinstance(a, OnnxTyped)), None)
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **(kwargs or {}))
        if tag is None or getattr(func, "__name__", "") in _INDEX_FUNCTIONS:
            return result
        return _retag(result, tag)


def _flat(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _retag(value, tag):
    if isinstance(value, torch.Tensor) and value.dtype == _CARRIER[tag]:
        return tagged(value, tag)
    if isinstance(value, (list, tuple)):
        return type(value)(_retag(v, tag) for v in value)
    return value


def tagged(carrier: torch.Tensor, dtype) -> torch.Tensor:
    """carrier (values already in range) as an OnnxTyped of the ONNX dtype."""
    with torch._C.DisableTorchFunctionSubclass():
        out = carrier.as_subclass(OnnxTyped)
    out.onnx_dtype = np.dtype(dtype)
    return out


def _plain(x):
    if isinstance(x, OnnxTyped):
        with torch._C.DisableTorchFunctionSubclass():
            return x.as_subclass(torch.Tensor)
    return x


def torch_dtype(dtype) -> torch.dtype:
    dtype = np.dtype(dtype)
    return _CARRIER.get(dtype) or _TO_TORCH[dtype]


def _symmetric(pads):
    return all(lo == hi for lo, hi in pads)


def _pad_spatial(x, pads, value=0.0):
    flat = [p for lo_hi in reversed(pads) for p in lo_hi]
    return F.pad(x, flat, value=value) if any(flat) else x


class TorchBackend:
    name = "torch"
    float_dtype = np.dtype("float32")

    def asarray(self, value, dtype=None, like=None):
        if isinstance(value, torch.Tensor):
            return value if dtype is None else self.astype(value, dtype)
        array = np.asarray(value, dtype=dtype)
        device = like.device if isinstance(like, torch.Tensor) else None
        if array.dtype in _CARRIER:
            carrier = np.dtype(_TO_NUMPY[_CARRIER[array.dtype]])
            return tagged(torch.as_tensor(array.astype(carrier), device=device), array.dtype)
        if array.dtype.name.startswith(
            ("bfloat", "float8")
        ):  # numpy cannot hand these to torch directly
            bits = torch.from_numpy(
                array.view(np.uint8 if array.itemsize == 1 else np.uint16).copy()
            )
            return bits.view(_TO_TORCH[array.dtype]).to(device)
        if array.dtype == object:
            return array
        return torch.as_tensor(array, device=device)

    def to_numpy(self, x):
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        x = x.detach().cpu()
        if isinstance(x, OnnxTyped):
            return _plain(x).numpy().astype(x.onnx_dtype)
        target = _TO_NUMPY[x.dtype]
        if x.dtype in (
            torch.bfloat16,
            torch.float8_e4m3fn,
            torch.float8_e5m2,
            torch.float8_e4m3fnuz,
            torch.float8_e5m2fnuz,
        ):
            return x.view(_BITS_VIEW[x.element_size()]).numpy().view(target)
        return x.numpy()

    def shape(self, x):
        return tuple(x.shape)

    def dtype(self, x):
        if isinstance(x, OnnxTyped):
            return x.onnx_dtype
        return _TO_NUMPY[x.dtype] if isinstance(x, torch.Tensor) else np.asarray(x).dtype

    def astype(self, x, dtype):
        dtype = np.dtype(dtype)
        if dtype in _CARRIER or (isinstance(x, OnnxTyped) and x.onnx_dtype.kind == "V"):
            # rounding/saturation/wrapping of the emulated types: numpy's (ml_dtypes) rules
            return self.asarray(self.to_numpy(x).astype(dtype), like=x)
        x = _plain(x)
        target = torch_dtype(dtype)
        if target == torch.float8_e4m3fn and x.is_floating_point():
            # torch saturates to ±448; ml_dtypes and ONNX (saturate=0) make what rounds past
            # it NaN (464, the midpoint to the next step, rounds to even: 448)
            x = torch.where(x.abs() > 464, torch.nan, x)
        if x.is_floating_point() and not target.is_floating_point and target != torch.bool:
            x = torch.trunc(
                x
            )  # float -> int truncates toward zero, whatever torch's kernel does on overflow
        return x.to(target)

    def bitcast(self, x, dtype):
        if isinstance(x, OnnxTyped) or np.dtype(dtype) in _CARRIER:
            return self.asarray(self.to_numpy(x).view(dtype), like=x)
        return x.view(torch_dtype(dtype))

    def add(self, a, b):
        return torch.add(a, b)

    def subtract(self, a, b):
        return torch.sub(a, b)

    def multiply(self, a, b):
        return torch.mul(a, b)

    def divide(self, a, b):
        return (
            torch.div(a, b, rounding_mode="trunc") if not a.is_floating_point() else torch.div(a, b)
        )

    def remainder(self, a, b):
        return torch.remainder(a, b)

    def fmod(self, a, b):
        return torch.fmod(a, b)

    def pow(self, a, b):
        return torch.pow(a, b).to(a.dtype)

    def maximum(self, a, b):
        return torch.maximum(a, b)

    def minimum(self, a, b):
        return torch.minimum(a, b)

    def unary(self, name, x):
        if name == "erf":
            return torch.special.erf(x)
        return (_UNARY.get(name) or getattr(torch, name))(x)

    def where(self, condition, a, b):
        return torch.where(condition, a, b)

    def compare(self, name, a, b):
        if any(isinstance(v, np.ndarray) and v.dtype.kind in "OSU" for v in (a, b)):
            return numpy_backend.compare(name, a, b)  # strings stay host arrays (asarray)
        return (torch.eq if name == "equal" else getattr(torch, name))(a, b)

    def isnan(self, x):
        return torch.isnan(x)

    def isinf(self, x):
        return torch.isinf(x)

    def clip(self, x, low, high):
        return torch.clamp(x, low, high)

    def arange(self, start, stop, step, dtype, like=None):
        return torch.arange(
            start, stop, step, dtype=torch_dtype(dtype), device=getattr(like, "device", None)
        )

    def full(self, shape, value, dtype, like=None):
        return torch.full(
            tuple(shape), value, dtype=torch_dtype(dtype), device=getattr(like, "device", None)
        )

    def reshape(self, x, shape):
        return torch.reshape(x, tuple(shape))

    def permute_dims(self, x, axes):
        return x.permute(*axes)

    def broadcast_to(self, x, shape):
        return x.expand(*shape)

    def concat(self, arrays, axis):
        return torch.cat(list(arrays), axis)

    def stack(self, arrays, axis):
        return torch.stack(list(arrays), axis)

    def getitem(self, x, key):
        if isinstance(key, tuple) and any(
            isinstance(k, slice) and k.step is not None and k.step < 0 for k in key
        ):
            return self._negative_step(x, key)
        return x[_as_index(key, x)]

    def _negative_step(self, x, key):
        # torch slicing rejects negative steps: flip the axis and slice the mirrored range
        for axis, k in enumerate(key):
            if isinstance(k, slice) and k.step is not None and k.step < 0:
                size = x.shape[axis]
                start = size - 1 if k.start is None else k.start
                stop = -1 if k.stop is None else k.stop
                x = torch.flip(x, [axis])
                index = [slice(None)] * x.dim()
                index[axis] = slice(size - 1 - start, size - 1 - stop, -k.step)
                x = x[tuple(index)]
            elif k != slice(None):
                index = [slice(None)] * x.dim()
                index[axis] = k
                x = x[tuple(index)]
        return x

    def setitem(self, x, key, value, reduction="none"):
        key = _as_index(key, x)
        if reduction == "none":
            return x.index_put(key, value)
        if reduction == "add":
            return x.index_put(key, value, accumulate=True)
        out = x.clone()
        flat = torch.stack([k.reshape(-1) for k in key]) if key else None
        strides = torch.tensor(x.stride()[: len(key)], device=x.device)
        linear = (flat * strides[:, None]).sum(0)
        inner = int(np.prod(x.shape[len(key) :]))
        target = out.reshape(-1, inner) if inner > 1 else out.reshape(-1)
        linear = linear // (inner if inner > 1 else 1)
        src = value.reshape(-1, inner) if inner > 1 else value.reshape(-1)
        mode = {"mul": "prod", "max": "amax", "min": "amin"}[reduction]
        index = linear[:, None].expand_as(src) if inner > 1 else linear
        return target.scatter_reduce(0, index, src, mode).reshape(x.shape)

    def take(self, x, indices, axis):
        indices = torch.as_tensor(indices, device=x.device)
        return torch.index_select(x, axis, indices.reshape(-1).long()).reshape(
            (*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])
        )

    def take_along_axis(self, x, indices, axis):
        return torch.gather(x, axis, torch.as_tensor(indices, device=x.device).long())

    def flip(self, x, axes):
        return torch.flip(x, list(axes))

    def tile(self, x, repeats):
        return x.repeat(*repeats)

    def pad(self, x, pad_width, mode="constant", value=0):
        flat = [p for lo_hi in reversed(pad_width) for p in lo_hi]
        if mode == "constant":
            return F.pad(x, flat, value=value)
        return _pad_non_constant(x, pad_width, mode)

    def reduce(self, name, x, axes, keepdims):
        if name == "prod":
            for axis in sorted(axes, reverse=True):
                x = torch.prod(x, axis, keepdim=keepdims)
            return x
        if name == "mean" and not x.is_floating_point():
            return torch.mean(x.double(), dim=tuple(axes), keepdim=keepdims).to(x.dtype)
        if name in ("max", "min") and x.dtype == torch.bool:
            return _REDUCE[name](x.to(torch.uint8), dim=tuple(axes), keepdim=keepdims).bool()
        return _REDUCE[name](x, dim=tuple(axes), keepdim=keepdims).to(x.dtype)

    def argmax(self, x, axis, keepdims):
        return torch.argmax(x, axis, keepdim=keepdims)

    def argmin(self, x, axis, keepdims):
        return torch.argmin(x, axis, keepdim=keepdims)

    def cumulative(self, name, x, axis):
        return getattr(torch, name)(x, axis).to(x.dtype)

    def argsort(self, x, axis, descending):
        return torch.sort(x, dim=axis, descending=descending, stable=True).indices

    def matmul(self, a, b):
        return torch.matmul(a, b)

    def einsum(self, equation, *operands):
        return torch.einsum(equation, *operands)

    def det(self, x):
        return torch.linalg.det(x)

    def softmax(self, x, axis):
        return torch.softmax(x, axis)

    def log_softmax(self, x, axis):
        return torch.log_softmax(x, axis)

    def conv(self, x, w, b, strides, pads, dilations, groups):
        convolve = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
        if _symmetric(pads):
            return convolve(x, w, b, strides, [lo for lo, _ in pads], dilations, groups)
        return convolve(_pad_spatial(x, pads), w, b, strides, 0, dilations, groups)

    def conv_transpose(self, x, w, b, strides, pads, dilations, groups, output_padding):
        convolve = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[w.dim() - 3]
        if _symmetric(pads) and all(
            p < s or p < d for p, s, d in zip(output_padding, strides, dilations)
        ):
            return convolve(
                x, w, b, strides, [lo for lo, _ in pads], output_padding, groups, dilations
            )
        out = convolve(x, w, None, strides, 0, 0, groups, dilations)
        out = F.pad(out, [p for extra in reversed(output_padding) for p in (0, extra)])
        out = out[
            (slice(None), slice(None))
            + tuple(slice(lo, out.shape[2 + i] - hi) for i, (lo, hi) in enumerate(pads))
        ]
        return out if b is None else out + b.reshape(1, -1, *([1] * (out.dim() - 2)))

    def pool(
        self, kind, x, kernel, strides, pads, dilations, ceil_mode, count_include_pad=False, p=2
    ):
        rank = len(kernel)
        # torch's pools take symmetric pads of at most kernel // 2 (and avg_pool no dilations)
        native = _symmetric(pads) and all(lo <= k // 2 for (lo, _), k in zip(pads, kernel))
        if kind == "max" and native:
            return _POOL[rank][0](x, kernel, strides, [lo for lo, _ in pads], dilations, ceil_mode)
        # (avg_pool3d also refuses an input smaller than the kernel before padding it)
        whole = all(size >= k for size, k in zip(x.shape[2:], kernel))
        if kind == "avg" and native and whole and all(d == 1 for d in dilations):
            return _POOL[rank][1](
                x, kernel, strides, [lo for lo, _ in pads], ceil_mode, count_include_pad
            )
        # otherwise pad explicitly, the end grown so that ceil_mode's extra windows are whole
        # windows, and reduce each window with no padding: every op here is differentiable
        extended = ceil_mode_pads(x.shape[2:], kernel, strides, pads, dilations, ceil_mode)
        if kind == "max":
            low = -math.inf if x.is_floating_point() else torch.iinfo(x.dtype).min
            padded = _pad_spatial(x, extended, low)
            return _POOL[rank][0](padded, kernel, strides, 0, dilations, False)
        if kind == "lp":
            summed = _window_sum(_pad_spatial(x.abs() ** p, extended), kernel, strides, dilations)
            return summed ** (1.0 / p)
        summed = _window_sum(_pad_spatial(x, extended), kernel, strides, dilations)
        # each window's count: its real inputs, plus the declared pads when count_include_pad
        # (never the ceil-mode extension, as ONNX and torch count it)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        ones = _pad_spatial(ones, pads, 1.0 if count_include_pad else 0.0)
        ones = _pad_spatial(ones, [(0, hi - d_hi) for (_, hi), (_, d_hi) in zip(extended, pads)])
        return summed / _window_sum(ones, kernel, strides, dilations)


def _window_sum(x, kernel, strides, dilations):
    """The sum of each (dilated) window of x, which has no padding left to apply."""
    rank = len(kernel)
    if all(d == 1 for d in dilations):  # every window is whole: mean * size is the sum
        return _POOL[rank][1](x, kernel, strides, 0, False, True) * math.prod(kernel)
    # torch's pools have no dilated sum: a dilated all-ones depthwise convolution is one
    planes = x.reshape(-1, 1, *x.shape[2:])
    ones = torch.ones((1, 1, *kernel), dtype=x.dtype, device=x.device)
    summed = (F.conv1d, F.conv2d, F.conv3d)[rank - 1](planes, ones, None, strides, 0, dilations)
    return summed.reshape(*x.shape[:2], *summed.shape[2:])


def _as_index(key, x):
    if isinstance(key, tuple):
        return tuple(
            torch.as_tensor(k, device=x.device) if isinstance(k, np.ndarray) else k for k in key
        )
    return torch.as_tensor(key, device=x.device) if isinstance(key, np.ndarray) else key


torch_backend = TorchBackend()


def _pad_non_constant(x, pad_width, mode):
    """edge / reflect / wrap padding of any axes: torch's F.pad pads at most the 3 trailing
    axes of a (batch, channel, ...) tensor in these modes, so the padded axes go last, in
    groups of up to three, on a (1, rest, *group) view."""
    padded = [axis for axis, width in enumerate(pad_width) if any(width)]
    if not padded:
        return x  # F.pad refuses an empty pad list in these modes
    torch_mode = {"edge": "replicate", "reflect": "reflect", "wrap": "circular"}[mode]
    for start in range(0, len(padded), 3):
        axes = padded[start : start + 3]
        rest = [axis for axis in range(x.dim()) if axis not in axes]
        order = rest + axes
        moved = x.permute(order)
        kept = moved.shape[: len(rest)]
        flat = moved.reshape(1, -1, *moved.shape[len(rest) :])
        out = F.pad(flat, [p for axis in reversed(axes) for p in pad_width[axis]], mode=torch_mode)
        out = out.reshape(*kept, *out.shape[2:])
        x = out.permute([order.index(axis) for axis in range(x.dim())])
    return x
