"""Neural-network ONNX ops: convolution, pooling, normalization, softmax, dropout."""

from __future__ import annotations

import numpy as np

from . import normalize_axes, normalize_axis, op
from .elementwise import onnx_dtype


def spatial_pads(auto_pad, pads, spatial, kernel, strides, dilations):
    """ONNX pads / auto_pad as ``[(begin, end), ...]`` per spatial axis."""
    count = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        result = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            result.append(
                (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            )
        return result
    if auto_pad == "VALID" or not pads:
        return [(0, 0)] * count
    return [(int(pads[i]), int(pads[i + count])) for i in range(count)]


def _geometry(xp, x, kernel_shape, strides, dilations):
    spatial = xp.shape(x)[2:]
    count = len(kernel_shape) if kernel_shape else len(spatial)
    return spatial, list(strides or [1] * count), list(dilations or [1] * count)


@op("Conv")
def conv(
    xp,
    x,
    w,
    b=None,
    auto_pad="NOTSET",
    dilations=None,
    group=1,
    kernel_shape=None,
    pads=None,
    strides=None,
):
    kernel = list(kernel_shape or xp.shape(w)[2:])
    spatial, strides, dilations = _geometry(xp, x, kernel, strides, dilations)
    padding = spatial_pads(auto_pad, pads, spatial, kernel, strides, dilations)
    return xp.conv(x, w, b, strides, padding, dilations, group)


@op("ConvTranspose")
def conv_transpose(
    xp,
    x,
    w,
    b=None,
    auto_pad="NOTSET",
    dilations=None,
    group=1,
    kernel_shape=None,
    output_padding=None,
    output_shape=None,
    pads=None,
    strides=None,
):
    kernel = list(kernel_shape or xp.shape(w)[2:])
    spatial, strides, dilations = _geometry(xp, x, kernel, strides, dilations)
    extra = list(output_padding or [0] * len(kernel))
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = (
            list(output_shape)[-len(kernel) :]
            if output_shape is not None
            else [i * s for i, s in zip(spatial, strides)]
        )
        padding = []
        for i, (size, s, k, d) in enumerate(zip(spatial, strides, kernel, dilations)):
            total = s * (size - 1) + extra[i] + (k - 1) * d + 1 - wanted[i]
            if total < 0:  # the wanted output is larger: grow the end instead of padding
                extra[i] -= total
                total = 0
            small = total // 2
            padding.append(
                (small, total - small) if auto_pad == "SAME_UPPER" else (total - small, small)
            )
    else:
        padding = spatial_pads("NOTSET", pads, spatial, kernel, strides, dilations)
    return xp.conv_transpose(x, w, b, strides, padding, dilations, group, extra)


def _pool(kind):
    def pool_op(
        xp,
        x,
        auto_pad="NOTSET",
        ceil_mode=0,
        dilations=None,
        kernel_shape=None,
        pads=None,
        storage_order=0,
        strides=None,
        count_include_pad=0,
        p=2,
        _outputs=1,
    ):
        spatial, strides, dilations = _geometry(xp, x, kernel_shape, strides, dilations)
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            padding = spatial_pads(auto_pad, None, spatial, kernel_shape, strides, dilations)
        else:
            padding = spatial_pads(auto_pad, pads, spatial, kernel_shape, strides, dilations)
        if kind == "max" and _outputs > 1:  # the Indices output
            from .spatial import max_pool_with_indices

            return max_pool_with_indices(
                xp, x, list(kernel_shape), strides, padding, dilations, ceil_mode, storage_order
            )
        return xp.pool(
            kind,
            x,
            list(kernel_shape),
            strides,
            padding,
            dilations,
            bool(ceil_mode),
            bool(count_include_pad),
            p,
        )

    return pool_op


op("MaxPool")(_pool("max"))
op("AveragePool")(_pool("avg"))
op("LpPool")(_pool("lp"))


@op("GlobalAveragePool")
def global_average_pool(xp, x):
    return xp.reduce("mean", x, tuple(range(2, len(xp.shape(x)))), True)


@op("GlobalMaxPool")
def global_max_pool(xp, x):
    return xp.reduce("max", x, tuple(range(2, len(xp.shape(x)))), True)


@op("GlobalLpPool")
def global_lp_pool(xp, x, p=2):
    axes = tuple(range(2, len(xp.shape(x))))
    powered = xp.pow(xp.unary("abs", x), xp.asarray(p, xp.dtype(x), like=x))
    return xp.pow(xp.reduce("sum", powered, axes, True), xp.asarray(1.0 / p, xp.dtype(x), like=x))


def _channel_shape(xp, x):
    return [1, -1] + [1] * (len(xp.shape(x)) - 2)


@op("BatchNormalization")
def batch_normalization(
    xp, x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1
):
    shape = _channel_shape(xp, x)
    eps = xp.asarray(epsilon, xp.dtype(x), like=x)
    if training_mode:
        axes = (0,) + tuple(range(2, len(xp.shape(x))))
        batch_mean = xp.reduce("mean", x, axes, False)
        centered = xp.subtract(x, xp.reshape(batch_mean, shape))
        batch_var = xp.reduce("mean", xp.multiply(centered, centered), axes, False)
        keep = xp.asarray(momentum, xp.dtype(x), like=x)
        rest = xp.asarray(1 - momentum, xp.dtype(x), like=x)
        running_mean = xp.add(xp.multiply(mean, keep), xp.multiply(batch_mean, rest))
        running_var = xp.add(xp.multiply(var, keep), xp.multiply(batch_var, rest))
        y = xp.divide(centered, xp.unary("sqrt", xp.add(xp.reshape(batch_var, shape), eps)))
        y = xp.add(xp.multiply(y, xp.reshape(scale, shape)), xp.reshape(bias, shape))
        return y, running_mean, running_var
    inv = xp.divide(xp.reshape(scale, shape), xp.unary("sqrt", xp.add(xp.reshape(var, shape), eps)))
    return xp.add(
        xp.multiply(xp.subtract(x, xp.reshape(mean, shape)), inv), xp.reshape(bias, shape)
    )


def _normalize(xp, x, axes, epsilon, stash_type=1):
    """(x - mean) / sqrt(var + eps) over axes, computed in the stash type; also mean and 1/std."""
    original = xp.dtype(x)
    work = xp.astype(x, onnx_dtype(stash_type)) if stash_type else x
    mean = xp.reduce("mean", work, axes, True)
    centered = xp.subtract(work, mean)
    var = xp.reduce("mean", xp.multiply(centered, centered), axes, True)
    inv_std = xp.divide(
        xp.asarray(1, xp.dtype(work), like=x),
        xp.unary("sqrt", xp.add(var, xp.asarray(epsilon, xp.dtype(work), like=x))),
    )
    return xp.astype(xp.multiply(centered, inv_std), original), mean, inv_std


@op("LayerNormalization")
def layer_normalization(xp, x, scale, bias=None, axis=-1, epsilon=1e-5, stash_type=1):
    rank = len(xp.shape(x))
    axes = tuple(range(normalize_axis(axis, rank), rank))
    y, mean, inv_std = _normalize(xp, x, axes, epsilon, stash_type)
    y = xp.multiply(y, scale)
    if bias is not None:
        y = xp.add(y, bias)
    return y, mean, inv_std


@op("RMSNormalization")
def rms_normalization(xp, x, scale, axis=-1, epsilon=1e-5, stash_type=1):
    rank = len(xp.shape(x))
    axes = tuple(range(normalize_axis(axis, rank), rank))
    work = xp.astype(x, onnx_dtype(stash_type))
    mean_square = xp.reduce("mean", xp.multiply(work, work), axes, True)
    rms = xp.unary("sqrt", xp.add(mean_square, xp.asarray(epsilon, xp.dtype(work), like=x)))
    return xp.multiply(xp.astype(xp.divide(work, rms), xp.dtype(x)), scale)


@op("InstanceNormalization")
def instance_normalization(xp, x, scale, bias, epsilon=1e-5):
    shape = _channel_shape(xp, x)
    y, _, _ = _normalize(xp, x, tuple(range(2, len(xp.shape(x)))), epsilon, 0)
    return xp.add(xp.multiply(y, xp.reshape(scale, shape)), xp.reshape(bias, shape))


@op("GroupNormalization")
def group_normalization(xp, x, scale, bias, num_groups, epsilon=1e-5, stash_type=1):
    dims = xp.shape(x)
    grouped = xp.reshape(x, [dims[0], num_groups, -1])
    y, _, _ = _normalize(xp, grouped, (2,), epsilon, stash_type)
    channels = dims[1]
    if xp.shape(scale)[0] != channels:  # opset 18: one scale per group
        scale = xp.take(
            scale, xp.asarray(np.repeat(np.arange(num_groups), channels // num_groups), like=x), 0
        )
        bias = xp.take(
            bias, xp.asarray(np.repeat(np.arange(num_groups), channels // num_groups), like=x), 0
        )
    y = xp.reshape(y, dims)
    shape = _channel_shape(xp, x)
    return xp.add(xp.multiply(y, xp.reshape(scale, shape)), xp.reshape(bias, shape))


@op("MeanVarianceNormalization")
def mean_variance_normalization(xp, x, axes=(0, 2, 3)):
    y, _, _ = _normalize(xp, x, normalize_axes(axes, len(xp.shape(x))), 1e-9, 0)
    return y


@op("LpNormalization")
def lp_normalization(xp, x, axis=-1, p=2):
    axis = normalize_axis(axis, len(xp.shape(x)))
    if p == 1:
        norm = xp.reduce("sum", xp.unary("abs", x), (axis,), True)
    else:
        norm = xp.unary("sqrt", xp.reduce("sum", xp.multiply(x, x), (axis,), True))
    zero = xp.asarray(0, xp.dtype(x), like=x)
    safe = xp.where(xp.compare("equal", norm, zero), xp.asarray(1, xp.dtype(x), like=x), norm)
    return xp.where(xp.compare("equal", norm, zero), zero, xp.divide(x, safe))


@op("LRN")
def lrn(xp, x, size, alpha=0.0001, beta=0.75, bias=1.0):
    channels = xp.shape(x)[1]
    square = xp.multiply(x, x)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    width = [(0, 0)] * len(xp.shape(x))
    width[1] = (before, after)
    padded = xp.pad(square, width, "constant", 0)
    total = None
    for offset in range(size):
        window = xp.getitem(padded, (slice(None), slice(offset, offset + channels)))
        total = window if total is None else xp.add(total, window)
    scale = xp.add(
        xp.asarray(bias, xp.dtype(x), like=x),
        xp.multiply(total, xp.asarray(alpha / size, xp.dtype(x), like=x)),
    )
    return xp.divide(x, xp.pow(scale, xp.asarray(beta, xp.dtype(x), like=x)))


@op("Softmax")
def softmax(xp, x, axis=-1):
    return xp.softmax(x, normalize_axis(axis, len(xp.shape(x))))


@op("LogSoftmax")
def log_softmax(xp, x, axis=-1):
    return xp.log_softmax(x, normalize_axis(axis, len(xp.shape(x))))


@op("Hardmax")
def hardmax(xp, x, axis=-1):
    axis = normalize_axis(axis, len(xp.shape(x)))
    winner = xp.argmax(x, axis, True)
    positions = np.arange(xp.shape(x)[axis]).reshape(
        [-1 if i == axis else 1 for i in range(len(xp.shape(x)))]
    )
    hot = xp.compare("equal", winner, xp.asarray(positions, np.int64, like=x))
    return xp.astype(hot, xp.dtype(x))


@op("Dropout")
def dropout(xp, x, ratio=None, training_mode=None, seed=None):
    training = training_mode is not None and bool(np.asarray(xp.to_numpy(training_mode)).item())
    rate = 0.5 if ratio is None else float(np.asarray(xp.to_numpy(ratio)).reshape(-1)[0])
    if not training or rate == 0.0:
        return x, xp.full(xp.shape(x), True, np.dtype(bool), like=x)
    keep = np.random.default_rng(seed).uniform(size=xp.shape(x)) >= rate
    mask = xp.asarray(keep, like=x)
    scaled = xp.multiply(x, xp.asarray(1.0 / (1.0 - rate), xp.dtype(x), like=x))
    return xp.where(mask, scaled, xp.asarray(0, xp.dtype(x), like=x)), mask


# half types whose Attention runs in float32 (see `attention`)
_HALF_FLOATS = ("float16", "bfloat16")
# (backend, inputs given, output count, attributes) -> interop.interpret.FunctionBody
_ATTENTION_BODIES: dict = {}


@op("Attention")
def attention(
    xp, q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None,
    _outputs=1, **attributes,
):  # fmt: skip
    """ONNX's own Attention function body; float16 / bfloat16 inputs run it in float32 and
    round each output once. In the half type the body rounds the scores and probabilities at
    every step, and how a backend's half softmax rounds inside (torch and XLA in float32,
    TensorFlow in the half type) moves outputs by an ulp or two, beyond the node tests'
    rtol 1e-3; in float32 every backend lands within it, and closer to the exact result."""
    inputs = [q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen]
    given = [None if x is None else xp.dtype(x) for x in inputs]
    half = any(d is not None and d.name in _HALF_FLOATS for d in given[:3])
    if half:  # a bool mask and the int64 lengths keep their type
        inputs = [
            x if d is None or d.kind in "biu" else xp.astype(x, np.float32)
            for x, d in zip(inputs, given)
        ]
    body = _attention_body(xp, tuple(x is not None for x in inputs), _outputs, attributes)
    outputs = body(*inputs)
    if half:  # Y and qk_matmul_output are Q's type, present_key K's, present_value V's
        types = [given[0], given[1], given[2], given[0]]
        outputs = tuple(None if y is None else xp.astype(y, d) for y, d in zip(outputs, types))
    return outputs


def _attention_body(xp, present, outputs, attributes):
    """The interpreter of Attention's function body for these inputs and attributes (cached)."""
    key = (id(xp), present, outputs, tuple(sorted(attributes.items())))
    if key not in _ATTENTION_BODIES:
        import onnx_ir as ir

        from interop.interpret import FunctionBody
        from interop.normalize import TARGET_OPSET

        # the latest body: Attention 24 and 25 only added inputs and attributes whose
        # defaults keep the meaning of 23's (the reference runs one implementation for all)
        node = ir.Node(
            "",
            "Attention",
            [ir.Value(name=f"input_{i}") if p else None for i, p in enumerate(present)],
            attributes=ir.convenience.convert_attributes(attributes),
            num_outputs=outputs,
        )
        for i, value in enumerate(node.outputs):  # the body builder skips unnamed outputs
            value.name = f"output_{i}"
        _ATTENTION_BODIES[key] = FunctionBody(node, dict(attributes), xp, TARGET_OPSET)
    return _ATTENTION_BODIES[key]
