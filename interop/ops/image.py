"""Image ONNX ops: Resize (separable interpolation as per-axis weight matrices)."""

from __future__ import annotations

import itertools
import math

import numpy as np

from . import normalize_axis, op


def _nearest_coeffs(ratio, mode):
    if float(ratio).is_integer():
        return np.array([0.0, 1.0])
    if mode == "round_prefer_floor":
        return np.array([ratio <= 0.5, ratio > 0.5], np.float64)
    if mode == "round_prefer_ceil":
        return np.array([ratio < 0.5, ratio >= 0.5], np.float64)
    return np.array([1.0, 0.0]) if mode == "floor" else np.array([0.0, 1.0])


def _cubic_coeffs(ratio, a):
    r = ratio
    return np.array(
        [
            ((a * (r + 1) - 5 * a) * (r + 1) + 8 * a) * (r + 1) - 4 * a,
            ((a + 2) * r - (a + 3)) * r * r + 1,
            ((a + 2) * (1 - r) - (a + 3)) * (1 - r) * (1 - r) + 1,
            ((a * (2 - r) - 5 * a) * (2 - r) + 8 * a) * (2 - r) - 4 * a,
        ]
    )


def _cubic_antialias(ratio, scale, a):
    scale = min(scale, 1.0)
    start = int(np.floor(-2 / scale) + 1)

    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    coeffs = np.array([kernel(scale * (i - ratio)) for i in range(start, 2 - start)])
    return coeffs / coeffs.sum()


def _linear_antialias(ratio, scale):
    scale = min(scale, 1.0)
    start = int(np.floor(-1 / scale) + 1)
    coeffs = np.clip(1 - np.abs((np.arange(start, 2 - start) - ratio) * scale), 0, 1)
    return coeffs / coeffs.sum()


def _source_coordinate(x, mode, scale, in_len, out_len, roi):
    """The input coordinate an output index samples (the reference's per-mode formulas)."""
    out_width = scale * in_len
    if mode == "align_corners":
        return 0.0 if out_width == 1 else x * (in_len - 1) / (out_width - 1)
    if mode == "asymmetric":
        return x / scale
    if mode == "tf_crop_and_resize":
        start, end = roi
        if out_width == 1:
            return (end - start) * (in_len - 1) / 2 + start * (in_len - 1)
        return x * (end - start) * (in_len - 1) / (out_width - 1) + start * (in_len - 1)
    if mode == "pytorch_half_pixel":
        return -0.5 if out_width == 1 else (x + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / out_width)
        return offset + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel


def resize_weights(in_len, out_len, scale, roi, attrs):
    """(out_len, in_len) interpolation matrix of one axis, and the rows inside the input."""
    weights = np.zeros((out_len, in_len))
    inside = np.ones(out_len, bool)
    mode, antialias = attrs["mode"], attrs["antialias"] and scale < 1
    for o in range(out_len):
        x = _source_coordinate(
            o, attrs["coordinate_transformation_mode"], scale, in_len, out_len, roi
        )
        if attrs["coordinate_transformation_mode"] == "tf_crop_and_resize" and not (
            0 <= x <= in_len - 1
        ):
            inside[o] = False
            continue
        # ratio in (0, 1]: an integer coordinate prefers the pixel on its left
        ratio = 1.0 if float(x).is_integer() else x - math.floor(x)
        if mode == "nearest":
            coeffs = _nearest_coeffs(ratio, attrs["nearest_mode"])
        elif mode == "linear":
            coeffs = _linear_antialias(ratio, scale) if antialias else np.array([1 - ratio, ratio])
        else:
            a = attrs["cubic_coeff_a"]
            coeffs = _cubic_antialias(ratio, scale, a) if antialias else _cubic_coeffs(ratio, a)
        first = math.ceil(x) - len(coeffs) // 2
        taps = np.arange(first, first + len(coeffs))
        if attrs["exclude_outside"]:
            coeffs = np.where((taps >= 0) & (taps < in_len), coeffs, 0.0)
            coeffs = coeffs / coeffs.sum()
        np.add.at(weights[o], np.clip(taps, 0, in_len - 1), coeffs)  # outside taps read the edge
    return weights, inside


def _output_geometry(xp, x, roi, scales, sizes, axes, keep_aspect_ratio_policy):
    dims = xp.shape(x)
    rank = len(dims)
    axes = [normalize_axis(int(a), rank) for a in axes] if axes else list(range(rank))
    full_scales, out_dims = [1.0] * rank, list(dims)
    roi_np = np.asarray(xp.to_numpy(roi), np.float64) if roi is not None else None
    full_roi = [(0.0, 1.0)] * rank
    if roi_np is not None and roi_np.size:
        for i, axis in enumerate(axes):
            full_roi[axis] = (roi_np[i], roi_np[i + len(axes)])
    if sizes is not None and xp.shape(sizes)[0]:
        sizes_np = np.asarray(xp.to_numpy(sizes), np.int64)
        ratios = [sizes_np[i] / dims[axis] for i, axis in enumerate(axes)]
        if keep_aspect_ratio_policy != "stretch":
            pick = min if keep_aspect_ratio_policy == "not_larger" else max
            common = pick(ratios)
            ratios = [common] * len(axes)
            sizes_np = [int(common * dims[axis] + 0.5) for axis in axes]  # round half up
        for i, axis in enumerate(axes):
            full_scales[axis], out_dims[axis] = float(ratios[i]), int(sizes_np[i])
    else:
        scales_np = np.asarray(xp.to_numpy(scales), np.float64)
        for i, axis in enumerate(axes):
            full_scales[axis] = float(scales_np[i])
            out_dims[axis] = int(math.floor(scales_np[i] * dims[axis] + 1e-9))
    return dims, full_scales, out_dims, full_roi


@op("Resize")
def resize(
    xp,
    x,
    roi=None,
    scales=None,
    sizes=None,
    antialias=0,
    axes=None,
    coordinate_transformation_mode="half_pixel",
    cubic_coeff_a=-0.75,
    exclude_outside=0,
    extrapolation_value=0.0,
    keep_aspect_ratio_policy="stretch",
    mode="nearest",
    nearest_mode="round_prefer_floor",
):
    attrs = dict(
        mode=mode,
        antialias=antialias,
        coordinate_transformation_mode=coordinate_transformation_mode,
        cubic_coeff_a=cubic_coeff_a,
        exclude_outside=exclude_outside,
        nearest_mode=nearest_mode,
    )
    dims, scales_, out_dims, roi_ = _output_geometry(
        xp, x, roi, scales, sizes, axes, keep_aspect_ratio_policy
    )
    dtype = xp.dtype(x)
    rank = len(dims)
    valid = None
    for axis in range(rank):
        if scales_[axis] == 1.0 and out_dims[axis] == dims[axis] and roi_[axis] == (0.0, 1.0):
            continue  # identity under every coordinate mode
        weights, inside = resize_weights(
            dims[axis], out_dims[axis], scales_[axis], roi_[axis], attrs
        )
        if mode == "nearest":
            x = xp.take(x, xp.asarray(weights.argmax(axis=1), np.int64, like=x), axis)
        else:
            # contract the axis with the weight matrix: move it last, matmul, move it back
            order = [a for a in range(rank) if a != axis] + [axis]
            moved = xp.permute_dims(x, order)
            w = xp.asarray(weights.T.astype(dtype), dtype, like=x)
            moved = xp.matmul(moved, w)
            x = xp.permute_dims(moved, list(np.argsort(order)))
        if not inside.all():
            shape = [1] * rank
            shape[axis] = len(inside)
            mask = inside.reshape(shape)
            valid = mask if valid is None else valid & mask
    if valid is not None:
        fill = xp.asarray(np.asarray(extrapolation_value, dtype), dtype, like=x)
        x = xp.where(xp.asarray(np.broadcast_to(valid, xp.shape(x)).copy(), like=x), x, fill)
    return x


@op("Upsample")
def upsample(xp, x, scales, mode="nearest"):
    return resize(
        xp,
        x,
        None,
        scales,
        mode=mode,
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    )


def _reflect(xp, c, lo, hi, k):
    """Reflect coordinates by the near border until inside [lo, hi] (ONNX GridSample)."""
    span = hi - lo
    if span <= 0:
        return xp.full(xp.shape(c), lo, xp.dtype(c), like=c)

    def fold(distance):
        turns = xp.unary("floor", xp.divide(distance, k(span)))
        rest = xp.subtract(distance, xp.multiply(turns, k(span)))
        even = xp.compare("equal", xp.remainder(turns, k(2.0)), k(0.0))
        return even, rest

    even_b, rest_b = fold(xp.subtract(k(lo), c))
    below = xp.where(even_b, xp.add(k(lo), rest_b), xp.subtract(k(hi), rest_b))
    even_a, rest_a = fold(xp.subtract(c, k(hi)))
    above = xp.where(even_a, xp.subtract(k(hi), rest_a), xp.add(k(lo), rest_a))
    return xp.where(
        xp.compare("less", c, k(lo)), below, xp.where(xp.compare("greater", c, k(hi)), above, c)
    )


@op("GridSample")
def grid_sample(xp, x, grid, align_corners=0, mode="linear", padding_mode="zeros"):
    dims = xp.shape(x)
    n, channels, spatial = dims[0], dims[1], list(dims[2:])
    rank = len(spatial)
    out_spatial = list(xp.shape(grid)[1:-1])
    points = int(np.prod(out_spatial))
    dtype = xp.dtype(grid)

    def k(value):
        return xp.asarray(np.asarray(value, dtype), dtype, like=grid)

    flat_grid = xp.reshape(grid, [n, points, rank])
    coords, bounds = [], []
    for axis, size in enumerate(spatial):
        g = xp.getitem(flat_grid, (slice(None), slice(None), rank - 1 - axis))  # grid is (x, y, z)
        if align_corners:
            c, lo, hi = xp.multiply(xp.add(g, k(1.0)), k((size - 1) / 2)), 0.0, size - 1.0
        else:
            c = xp.divide(xp.subtract(xp.multiply(xp.add(g, k(1.0)), k(size)), k(1.0)), k(2.0))
            lo, hi = -0.5, size - 0.5
        if padding_mode == "border":
            c = xp.clip(c, 0.0, size - 1.0)
        elif padding_mode == "reflection":
            c = _reflect(xp, c, lo, hi, k)
        coords.append(c)
        bounds.append((lo, hi))
    if mode == "nearest":
        taps = [[(xp.unary("round", c), None)] for c in coords]  # round half to even
    else:
        taps = []
        for c in coords:
            base = xp.unary("floor", c)
            t = xp.subtract(c, base)
            if mode in ("linear", "bilinear"):
                weights, offsets = [xp.subtract(k(1.0), t), t], [0, 1]
            else:
                weights, offsets = _cubic_weights(xp, t, k), [-1, 0, 1, 2]
            taps.append([(xp.add(base, k(o)), w) for o, w in zip(offsets, weights)])
    source = xp.reshape(x, [n, channels, int(np.prod(spatial))])
    total = None
    for combination in itertools.product(*taps):
        flat = None
        inside = None
        weight = None
        for axis, (position, w) in enumerate(combination):
            size = spatial[axis]
            if padding_mode == "zeros":
                ok = xp.compare(
                    "logical_and",
                    xp.compare("greater_equal", position, k(0.0)),
                    xp.compare("less_equal", position, k(size - 1.0)),
                )
                inside = ok if inside is None else xp.compare("logical_and", inside, ok)
            elif padding_mode == "reflection" and mode not in ("nearest",):
                position = _reflect(xp, position, *bounds[axis], k)
            index = xp.astype(xp.clip(position, 0.0, size - 1.0), np.dtype(np.int64))
            flat = (
                index
                if flat is None
                else xp.add(xp.multiply(flat, xp.asarray(size, np.int64, like=index)), index)
            )
            weight = w if weight is None else (weight if w is None else xp.multiply(weight, w))
        gathered = xp.take_along_axis(
            source, xp.broadcast_to(xp.reshape(flat, [n, 1, points]), [n, channels, points]), 2
        )
        factor = weight
        if inside is not None:
            mask = xp.astype(inside, dtype)
            factor = mask if factor is None else xp.multiply(factor, mask)
        if factor is not None:
            gathered = xp.multiply(
                gathered, xp.reshape(xp.astype(factor, xp.dtype(x)), [n, 1, points])
            )
        total = gathered if total is None else xp.add(total, gathered)
    return xp.reshape(total, [n, channels, *out_spatial])


def _cubic_weights(xp, t, k, a=-0.75):
    one, two = xp.subtract(k(1.0), t), xp.subtract(k(2.0), t)
    t1 = xp.add(t, k(1.0))

    def far(d):  # |d| in [1, 2]
        return xp.subtract(
            xp.multiply(
                xp.add(xp.multiply(xp.subtract(xp.multiply(k(a), d), k(5 * a)), d), k(8 * a)), d
            ),
            k(4 * a),
        )

    def near(d):  # |d| in [0, 1]
        return xp.add(
            xp.multiply(xp.multiply(xp.subtract(xp.multiply(k(a + 2), d), k(a + 3)), d), d), k(1.0)
        )

    return [far(t1), near(t), near(one), far(two)]
