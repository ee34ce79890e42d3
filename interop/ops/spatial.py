"""Index-computed ONNX ops: Col2Im, MaxUnpool, TensorScatter, NonMaxSuppression.

Their index maps depend only on shapes (or, for NonMaxSuppression, on data the op
returns as indices), so they are built on the host with numpy and applied with the
backend's take / setitem, which keeps the values differentiable.
"""

from __future__ import annotations

import itertools

import numpy as np

from . import normalize_axis, op, unsupported


def _ints(xp, value):
    return [int(v) for v in np.asarray(xp.to_numpy(value)).reshape(-1)]


def _floats(xp, value):
    return [float(v) for v in np.asarray(xp.to_numpy(value), np.float64).reshape(-1)]


@op("Col2Im")
def col2im(xp, x, image_shape, block_shape, dilations=None, pads=None, strides=None):
    image, block = _ints(xp, image_shape), _ints(xp, block_shape)
    count = len(image)
    dilations = list(dilations or [1] * count)
    strides = list(strides or [1] * count)
    pads = list(pads or [0] * 2 * count)
    padded = [i + pads[a] + pads[a + count] for a, i in enumerate(image)]
    blocks = [
        (p - d * (k - 1) - 1) // s + 1 for p, k, d, s in zip(padded, block, dilations, strides)
    ]
    n, cols, _ = xp.shape(x)
    channels = cols // int(np.prod(block))
    # destination (flat, in the padded image) of every (kernel offset, block position) column entry
    kernel_pos = np.array(list(itertools.product(*[range(k) for k in block])))  # K, count
    block_pos = np.array(list(itertools.product(*[range(b) for b in blocks])))  # L, count
    coords = kernel_pos[:, None, :] * np.array(dilations) + block_pos[None, :, :] * np.array(
        strides
    )
    flat = np.ravel_multi_index(tuple(np.moveaxis(coords, -1, 0)), padded)  # K, L
    total = int(np.prod(padded))
    # positions first, so the key is one index array (scatter-add over the flat padded image)
    values = xp.reshape(
        xp.permute_dims(xp.reshape(x, [n, channels, -1]), [2, 0, 1]), [-1, n * channels]
    )
    out = xp.full([total, n * channels], 0, xp.dtype(x), like=x)
    index = (xp.asarray(flat.reshape(-1), np.int64, like=x),)
    out = xp.setitem(out, index, values, reduction="add")
    out = xp.reshape(xp.permute_dims(out, [1, 0]), [n, channels, total])
    out = xp.reshape(out, [n, channels, *padded])
    crop = (slice(None), slice(None)) + tuple(
        slice(pads[a], pads[a] + image[a]) for a in range(count)
    )
    return xp.getitem(out, crop)


@op("MaxUnpool")
def max_unpool(xp, x, indices, output_shape=None, kernel_shape=None, pads=None, strides=None):
    dims = xp.shape(x)
    count = len(dims) - 2
    strides = list(strides or [1] * count)
    pads = list(pads or [0] * 2 * count)
    spatial = [
        (d - 1) * s + k - pads[a] - pads[a + count]
        for a, (d, s, k) in enumerate(zip(dims[2:], strides, kernel_shape))
    ]
    inferred = list(dims[:2]) + spatial
    # MaxPool's indices are flat over the whole (N, C, *spatial) output of the unpool
    out = xp.full([int(np.prod(inferred))], 0, xp.dtype(x), like=x)
    out = xp.setitem(out, (xp.reshape(indices, [-1]),), xp.reshape(x, [-1]))
    out = xp.reshape(out, inferred)
    if output_shape is None:
        return out
    # as the reference: the indices stay flat over the inferred shape, the result is zero-padded
    # at the end of each axis up to output_shape
    wanted = _ints(xp, output_shape)
    if len(wanted) != len(inferred) or any(w < i for w, i in zip(wanted, inferred)):
        raise unsupported(
            "MaxUnpool",
            f"output_shape {wanted} is smaller than the unpooled shape {inferred}",
            "give an output_shape at least the unpooled shape (crop the result after)",
        )
    if wanted == inferred:
        return out
    return xp.pad(out, [(0, w - i) for w, i in zip(wanted, inferred)])


@op("TensorScatter")
def tensor_scatter(xp, past_cache, update, write_indices=None, axis=-2, mode="linear"):
    dims = xp.shape(past_cache)
    axis = normalize_axis(axis, len(dims))
    length, capacity = xp.shape(update)[axis], dims[axis]
    batch = dims[0]
    starts = _ints(xp, write_indices) if write_indices is not None else [0] * batch
    positions = np.array(starts)[:, None] + np.arange(length)[None, :]  # batch, length
    if mode == "circular":
        positions %= capacity
    # index arrays broadcasting over (batch, *dims[1:axis], length): batch and sequence vary
    lead = axis  # dims before the sequence axis, batch included
    shape = [batch] + [1] * (lead - 1) + [length]
    batch_index = np.arange(batch).reshape([batch] + [1] * lead)
    middle = [
        np.arange(dims[a]).reshape([1] * a + [dims[a]] + [1] * (lead - a)) for a in range(1, lead)
    ]
    sequence = positions.reshape(shape)
    key = tuple(xp.asarray(i, np.int64, like=past_cache) for i in [batch_index, *middle, sequence])
    return xp.setitem(past_cache, key, update)


def _iou(box, others):
    lo = np.maximum(box[:2], others[:, :2])
    hi = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    return inter / np.maximum(area + areas - inter, 1e-12)


@op("NonMaxSuppression")
def non_max_suppression(
    xp,
    boxes,
    scores,
    max_output_boxes_per_class=None,
    iou_threshold=None,
    score_threshold=None,
    center_point_box=0,
):
    # the output is indices, so the greedy selection runs on the host
    boxes_np = np.asarray(xp.to_numpy(boxes), np.float64)
    scores_np = np.asarray(xp.to_numpy(scores), np.float64)
    limit = (
        _ints(xp, max_output_boxes_per_class)[0] if max_output_boxes_per_class is not None else 0
    )
    iou_limit = _floats(xp, iou_threshold)[0] if iou_threshold is not None else 0.0
    floor = _floats(xp, score_threshold)[0] if score_threshold is not None else None
    if center_point_box:
        center, size = boxes_np[..., :2], boxes_np[..., 2:]
        corners = np.concatenate([center - size / 2, center + size / 2], -1)
    else:  # corners may be given in either order
        y1, x1, y2, x2 = np.moveaxis(boxes_np, -1, 0)
        corners = np.stack(
            [np.minimum(y1, y2), np.minimum(x1, x2), np.maximum(y1, y2), np.maximum(x1, x2)], -1
        )
    selected = []
    for b, c in itertools.product(range(scores_np.shape[0]), range(scores_np.shape[1])):
        order = np.argsort(-scores_np[b, c], kind="stable")
        if floor is not None:
            order = order[scores_np[b, c, order] > floor]
        kept: list[int] = []
        for i in order:
            if len(kept) >= limit:
                break
            if not kept or (_iou(corners[b, i], corners[b, kept]) <= iou_limit).all():
                kept.append(int(i))
        selected += [[b, c, i] for i in kept]
    result = np.array(selected, np.int64).reshape(-1, 3)
    return xp.asarray(result, np.int64, like=boxes)


def max_pool_with_indices(xp, x, kernel, strides, pads, dilations, ceil_mode, storage_order):
    """MaxPool's (values, Indices): windows gathered by host-built indices, argmax per window.

    Indices are flat positions in the input (batch and channel included), row-major, or
    column-major over the spatial axes with storage_order=1.
    """
    shape = xp.shape(x)
    batch, channels, spatial = shape[0], shape[1], list(shape[2:])
    axes_coords, valid = [], True
    outputs = []
    for size, k, s, d, (lo, hi) in zip(spatial, kernel, strides, dilations, pads):
        span = size + lo + hi - ((k - 1) * d + 1)
        count = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (count - 1) * s >= size + lo:  # the last window must start inside
            count -= 1
        outputs.append(count)
    grids = np.meshgrid(
        *[np.arange(o) for o in outputs], *[np.arange(k) for k in kernel], indexing="ij"
    )
    rank = len(kernel)
    for axis in range(rank):
        coord = grids[axis] * strides[axis] - pads[axis][0] + grids[rank + axis] * dilations[axis]
        valid = valid & (coord >= 0) & (coord < spatial[axis])
        axes_coords.append(np.clip(coord, 0, spatial[axis] - 1))
    windows_shape = [int(np.prod(outputs)), int(np.prod(kernel))]
    gather = np.ravel_multi_index(axes_coords, spatial).reshape(windows_shape)
    reported = np.ravel_multi_index(axes_coords, spatial, order="F" if storage_order else "C")
    flat = xp.reshape(x, [batch, channels, int(np.prod(spatial))])
    windows = xp.reshape(
        xp.take(flat, xp.asarray(gather.reshape(-1), like=x), 2), [batch, channels, *windows_shape]
    )
    dtype = np.dtype(xp.dtype(x))
    floor = np.iinfo(dtype).min if dtype.kind in "iu" else -np.inf  # padding never wins
    lowest = xp.full([1], floor, dtype, like=x)
    windows = xp.where(xp.asarray(valid.reshape(windows_shape), like=x), windows, lowest)
    best = xp.argmax(windows, 3, True)
    values = xp.reshape(xp.take_along_axis(windows, best, 3), [batch, channels, *outputs])
    # offset of each (batch, channel) plane, plus the window's reported position
    planes = np.arange(batch * channels).reshape(batch, channels, 1, 1) * int(np.prod(spatial))
    positions = planes + reported.reshape(1, 1, *windows_shape)
    indices = xp.take_along_axis(xp.asarray(positions.astype(np.int64), like=x), best, 3)
    return values, xp.reshape(indices, [batch, channels, *outputs])
