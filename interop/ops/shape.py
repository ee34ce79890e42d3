"""Shape and indexing ONNX ops: reshape, slice, gather/scatter, pad, constants, ranges."""

from __future__ import annotations

import numpy as np

from . import normalize_axes, normalize_axis, op


def ints(xp, value) -> list[int]:
    """A shape-like input (tensor or sequence) as Python ints."""
    return [int(v) for v in np.asarray(xp.to_numpy(value)).reshape(-1)]


def concrete(xp, value) -> bool:
    """Whether a shape-like input is known now (always, except in graph-mode tracing).

    Backends that trace graphs with unknown dims (Keras on TensorFlow inside
    ``tf.function``) return symbolic scalars from ``shape`` and answer False here for
    tensors computed from them; the shape ops then pass the tensor on instead of ints.
    """
    return getattr(xp, "is_concrete", None) is None or xp.is_concrete(value)


def _known(dims) -> bool:
    return all(isinstance(d, (int, np.integer)) for d in dims)


@op("Shape")
def shape(xp, x, start=0, end=None):
    dims = xp.shape(x)
    start = max(0, min(len(dims), normalize_axis(start, len(dims))))
    end = len(dims) if end is None else max(0, min(len(dims), normalize_axis(end, len(dims))))
    if not _known(dims[start:end]):
        return xp.shape_vector(dims[start:end])  # a graph-mode backend: dims known at run time
    return xp.asarray(np.array(dims[start:end], np.int64), like=x)


@op("Size")
def size(xp, x):
    return xp.asarray(np.array(int(np.prod(xp.shape(x))), np.int64), like=x)


@op("Reshape")
def reshape(xp, x, target, allowzero=0):
    if not concrete(xp, target):
        return xp.reshape(x, target)  # a run-time shape (0 entries are not supported there)
    dims = ints(xp, target)
    if not allowzero:  # a 0 copies the input's dim
        dims = [xp.shape(x)[i] if d == 0 else d for i, d in enumerate(dims)]
    return xp.reshape(x, dims)


@op("Flatten")
def flatten(xp, x, axis=1):
    dims = xp.shape(x)
    axis = normalize_axis(axis, len(dims))
    if not _known(dims[axis:]):  # a dim known only at run time: let reshape infer one side
        return xp.reshape(x, [int(np.prod(dims[:axis])), -1])
    if not _known(dims[:axis]):
        return xp.reshape(x, [-1, int(np.prod(dims[axis:]))])
    return xp.reshape(x, [int(np.prod(dims[:axis])), int(np.prod(dims[axis:]))])


@op("Transpose")
def transpose(xp, x, perm=None):
    rank = len(xp.shape(x))
    return xp.permute_dims(x, list(perm) if perm is not None else list(range(rank))[::-1])


@op("Squeeze")
def squeeze(xp, x, axes=None):
    dims = xp.shape(x)
    axes = (
        normalize_axes(ints(xp, axes), len(dims))
        if axes is not None
        else [i for i, d in enumerate(dims) if d == 1]
    )
    return xp.reshape(x, [d for i, d in enumerate(dims) if i not in axes])


@op("Unsqueeze")
def unsqueeze(xp, x, axes):
    dims = list(xp.shape(x))
    for axis in normalize_axes(ints(xp, axes), len(dims) + len(ints(xp, axes))):
        dims.insert(axis, 1)
    return xp.reshape(x, dims)


@op("Concat")
def concat(xp, *xs, axis):
    return xp.concat(xs, normalize_axis(axis, len(xp.shape(xs[0]))))


@op("Split")
def split(xp, x, split=None, axis=0, num_outputs=None, _outputs=None):
    dims = xp.shape(x)
    axis = normalize_axis(axis, len(dims))
    if split is not None:
        sizes = ints(xp, split)
    else:
        count = num_outputs or _outputs
        chunk = -(-dims[axis] // count)
        sizes = [chunk] * (dims[axis] // chunk) + (
            [dims[axis] % chunk] if dims[axis] % chunk else []
        )
        sizes += [0] * (count - len(sizes))
    offsets = np.cumsum([0] + sizes)
    return tuple(
        xp.getitem(x, (slice(None),) * axis + (slice(int(lo), int(hi)),))
        for lo, hi in zip(offsets[:-1], offsets[1:])
    )


@op("Slice")
def slice_(xp, x, starts, ends, axes=None, steps=None):
    dims = xp.shape(x)
    starts, ends = ints(xp, starts), ints(xp, ends)
    axes = (
        [normalize_axis(a, len(dims)) for a in ints(xp, axes)]
        if axes is not None
        else list(range(len(starts)))
    )
    steps = ints(xp, steps) if steps is not None else [1] * len(starts)
    key = [slice(None)] * len(dims)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        # clamp like the spec so huge sentinels (INT64_MAX) and negative ends behave
        size = dims[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), size), min(max(end, 0), size)
        else:
            start, end = min(max(start, -1), size - 1), min(max(end, -1), size - 1)
        key[axis] = slice(start, None if end < 0 else end, step)
    return xp.getitem(x, tuple(key))


@op("Gather")
def gather(xp, data, indices, axis=0):
    axis = normalize_axis(axis, len(xp.shape(data)))
    size = xp.shape(data)[axis]
    indices = xp.where(
        xp.compare("less", indices, xp.asarray(0, xp.dtype(indices), like=indices)),
        xp.add(indices, xp.asarray(size, xp.dtype(indices), like=indices)),
        indices,
    )
    return xp.take(data, indices, axis)


def _wrap_negative(xp, indices, size):
    zero = xp.asarray(0, xp.dtype(indices), like=indices)
    return xp.where(
        xp.compare("less", indices, zero),
        xp.add(indices, xp.asarray(size, xp.dtype(indices), like=indices)),
        indices,
    )


@op("GatherElements")
def gather_elements(xp, data, indices, axis=0):
    axis = normalize_axis(axis, len(xp.shape(data)))
    return xp.take_along_axis(
        data, xp.astype(_wrap_negative(xp, indices, xp.shape(data)[axis]), np.int64), axis
    )


@op("GatherND")
def gather_nd(xp, data, indices, batch_dims=0):
    index = np.asarray(xp.to_numpy(indices)).astype(np.int64)
    dims = xp.shape(data)
    batch_shape = dims[:batch_dims]
    depth = index.shape[-1]
    batch_count = int(np.prod(batch_shape)) if batch_dims else 1
    flat = xp.reshape(data, [batch_count, *dims[batch_dims:]])
    index = index.reshape(batch_count, -1, depth)
    index = np.where(index < 0, index + np.array(dims[batch_dims : batch_dims + depth]), index)
    batch = np.broadcast_to(np.arange(batch_count)[:, None], index.shape[:2])
    gathered = xp.getitem(flat, (batch, *[index[..., i] for i in range(depth)]))
    out_shape = list(np.asarray(xp.to_numpy(indices)).shape[:-1]) + list(dims[batch_dims + depth :])
    return xp.reshape(gathered, out_shape)


@op("ScatterElements", "Scatter")
def scatter_elements(xp, data, indices, updates, axis=0, reduction="none"):
    dims = xp.shape(data)
    axis = normalize_axis(axis, len(dims))
    index = np.asarray(xp.to_numpy(indices)).astype(np.int64)
    index = np.where(index < 0, index + dims[axis], index)
    key = list(np.indices(index.shape, sparse=True))
    key[axis] = index
    key = tuple(np.broadcast_to(k, index.shape) for k in key)
    return xp.setitem(data, key, updates, reduction)


@op("ScatterND")
def scatter_nd(xp, data, indices, updates, reduction="none"):
    index = np.asarray(xp.to_numpy(indices)).astype(np.int64)
    dims = xp.shape(data)
    depth = index.shape[-1]
    index = np.where(index < 0, index + np.array(dims[:depth]), index)
    key = tuple(index[..., i] for i in range(depth))
    return xp.setitem(data, key, updates, reduction)


@op("Expand")
def expand(xp, x, target):
    if not concrete(xp, target):  # bidirectional broadcast against a run-time shape
        return xp.multiply(x, xp.full(target, 1, xp.dtype(x), like=x))
    dims = list(xp.shape(x))
    target = ints(xp, target)
    rank = max(len(dims), len(target))
    dims = [1] * (rank - len(dims)) + dims
    target = [1] * (rank - len(target)) + target
    return xp.broadcast_to(
        xp.reshape(x, dims), [max(d, t) if 1 in (d, t) else d for d, t in zip(dims, target)]
    )


@op("Tile")
def tile(xp, x, repeats):
    return xp.tile(x, ints(xp, repeats))


@op("Pad")
def pad(xp, x, pads=None, constant_value=None, axes=None, mode="constant", value=0.0):
    rank = len(xp.shape(x))
    pads = ints(xp, pads)
    axes = (
        [normalize_axis(a, rank) for a in ints(xp, axes)] if axes is not None else list(range(rank))
    )
    width = [(0, 0)] * rank
    for i, axis in enumerate(axes):
        width[axis] = (pads[i], pads[i + len(axes)])
    fill = (
        value
        if constant_value is None
        else np.asarray(xp.to_numpy(constant_value)).reshape(-1)[0].item()
        if int(np.prod(xp.shape(constant_value)))
        else value
    )
    if any(lo < 0 or hi < 0 for lo, hi in width):  # negative pads crop
        x = xp.getitem(
            x,
            tuple(
                slice(max(-lo, 0), (xp.shape(x)[a] - max(-hi, 0)))
                for a, (lo, hi) in enumerate(width)
            ),
        )
        width = [(max(lo, 0), max(hi, 0)) for lo, hi in width]
    return xp.pad(x, width, mode, fill)


@op("Constant")
def constant(
    xp,
    value=None,
    value_float=None,
    value_floats=None,
    value_int=None,
    value_ints=None,
    value_string=None,
    value_strings=None,
    sparse_value=None,
):
    for candidate, dtype in (
        (value, None),
        (value_float, np.float32),
        (value_floats, np.float32),
        (value_int, np.int64),
        (value_ints, np.int64),
        (value_string, object),
        (value_strings, object),
    ):
        if candidate is not None:
            return xp.asarray(np.asarray(candidate, dtype=dtype))
    raise ValueError("Constant node has no value attribute")


@op("ConstantOfShape")
def constant_of_shape(xp, target, value=None):
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    dims = ints(xp, target) if concrete(xp, target) else target
    return xp.full(dims, fill[0].item(), fill.dtype, like=target)


@op("Range")
def range_(xp, start, limit, delta, stash_type=None):
    start_, limit_, delta_ = (np.asarray(xp.to_numpy(v)).item() for v in (start, limit, delta))
    count = max(int(np.ceil((limit_ - start_) / delta_)), 0)
    dtype = xp.dtype(start)
    values = np.asarray(start_, dtype) + np.arange(count, dtype=dtype) * np.asarray(delta_, dtype)
    return xp.asarray(values.astype(dtype), like=start)


@op("EyeLike")
def eye_like(xp, x, dtype=None, k=0):
    from .elementwise import onnx_dtype

    rows, cols = xp.shape(x)
    target = onnx_dtype(dtype) if dtype is not None else xp.dtype(x)
    return xp.asarray(np.eye(rows, cols, k, dtype=target), like=x)


@op("Trilu")
def trilu(xp, x, k=None, upper=1):
    rows, cols = xp.shape(x)[-2:]
    offset = int(np.asarray(xp.to_numpy(k)).item()) if k is not None else 0
    mask = (
        np.triu(np.ones((rows, cols), bool), offset)
        if upper
        else np.tril(np.ones((rows, cols), bool), offset)
    )
    return xp.where(xp.asarray(mask, like=x), x, xp.asarray(0, xp.dtype(x), like=x))


@op("OneHot")
def one_hot(xp, indices, depth, values, axis=-1):
    depth_ = int(np.asarray(xp.to_numpy(depth)).reshape(-1)[0])
    index = np.asarray(xp.to_numpy(indices)).astype(np.int64)
    index = np.where(index < 0, index + depth_, index)
    rank = index.ndim + 1
    axis = normalize_axis(axis, rank)
    hot = np.expand_dims(index, axis) == np.arange(depth_).reshape(
        [-1 if i == axis else 1 for i in range(rank)]
    )
    off, on = xp.getitem(values, 0), xp.getitem(values, 1)
    return xp.where(xp.asarray(hot, like=values), on, off)


@op("NonZero")
def non_zero(xp, x):
    return xp.asarray(np.array(np.nonzero(np.asarray(xp.to_numpy(x))), np.int64), like=x)


@op("Compress")
def compress(xp, x, condition, axis=None):
    keep = np.nonzero(np.asarray(xp.to_numpy(condition)).astype(bool))[0]
    if axis is None:
        return xp.take(xp.reshape(x, [-1]), xp.asarray(keep, like=x), 0)
    return xp.take(x, xp.asarray(keep, like=x), normalize_axis(axis, len(xp.shape(x))))


@op("DepthToSpace")
def depth_to_space(xp, x, blocksize, mode="DCR"):
    n, c, h, w = xp.shape(x)
    b = blocksize
    if mode == "DCR":
        y = xp.permute_dims(xp.reshape(x, [n, b, b, c // b**2, h, w]), [0, 3, 4, 1, 5, 2])
    else:
        y = xp.permute_dims(xp.reshape(x, [n, c // b**2, b, b, h, w]), [0, 1, 4, 2, 5, 3])
    return xp.reshape(y, [n, c // b**2, h * b, w * b])


@op("SpaceToDepth")
def space_to_depth(xp, x, blocksize, mode="DCR"):
    n, c, h, w = xp.shape(x)
    b = blocksize
    # DCR: output channels ordered (block row, block column, channel); CRD: channel first
    order = [0, 3, 5, 1, 2, 4] if mode == "DCR" else [0, 1, 3, 5, 2, 4]
    y = xp.permute_dims(xp.reshape(x, [n, c, h // b, b, w // b, b]), order)
    return xp.reshape(y, [n, c * b * b, h // b, w // b])


@op("ReverseSequence")
def reverse_sequence(xp, x, lengths, batch_axis=1, time_axis=0):
    dims = xp.shape(x)
    lengths_ = np.asarray(xp.to_numpy(lengths)).astype(np.int64)
    time = np.arange(dims[time_axis])
    # per batch row: reversed positions inside the sequence, unchanged after it
    order = np.where(
        time[None, :] < lengths_[:, None], lengths_[:, None] - 1 - time[None, :], time[None, :]
    )
    shape = [1] * len(dims)
    shape[batch_axis], shape[time_axis] = dims[batch_axis], dims[time_axis]
    order = order if batch_axis < time_axis else order.T
    index = np.broadcast_to(order.reshape(shape), dims)
    return xp.take_along_axis(x, xp.asarray(np.ascontiguousarray(index), like=x), time_axis)


@op("TopK")
def top_k(xp, x, k=None, axis=-1, largest=1, sorted=1):  # noqa: A002  (spec name)
    axis = normalize_axis(axis, len(xp.shape(x)))
    count = int(np.asarray(xp.to_numpy(k)).reshape(-1)[0])
    order = xp.argsort(x, axis, bool(largest))
    order = xp.getitem(order, (slice(None),) * axis + (slice(0, count),))
    return xp.take_along_axis(x, order, axis), xp.astype(order, np.int64)


@op("Unique")
def unique(xp, x, axis=None, sorted=1):  # noqa: A002  (spec name)
    host = np.asarray(xp.to_numpy(x))
    values, first, inverse, counts = np.unique(
        host, return_index=True, return_inverse=True, return_counts=True, axis=axis
    )
    inverse = inverse.reshape(-1)
    if not sorted:  # order of first occurrence
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        values = np.take(values, order, axis=0 if axis is None else axis)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    return tuple(
        xp.asarray(v, like=x)
        for v in (values, first.astype(np.int64), inverse.astype(np.int64), counts.astype(np.int64))
    )


@op("CenterCropPad")
def center_crop_pad(xp, x, target, axes=None):
    dims = list(xp.shape(x))
    target = ints(xp, target)
    axes = [normalize_axis(a, len(dims)) for a in (axes if axes is not None else range(len(dims)))]
    for axis, size in zip(axes, target):
        if dims[axis] > size:  # crop, the extra element on the end side
            start = (dims[axis] - size) // 2
            x = xp.getitem(x, (slice(None),) * axis + (slice(start, start + size),))
        elif dims[axis] < size:
            lo = (size - dims[axis]) // 2
            width = [(0, 0)] * len(dims)
            width[axis] = (lo, size - dims[axis] - lo)
            x = xp.pad(x, width, "constant", 0)
        dims[axis] = size
    return x
