"""Converters for the built-in Keras layers: one ``import_<layer>`` per class, in ONNX ops.

Keras is channels-last; ONNX's Conv, pooling and BatchNormalization are
channels-first. Each such converter transposes in and out, and the builder cancels
the back-to-back transposes between consecutive layers. Kernels stay in Keras's
layout under their Keras variable path; a Transpose node in the layer's scope turns
them into ONNX's (runtimes fold it once at session creation).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from . import CAPTURE_LAYERS, register_layer
from .capture_lowering import Builder, Tensor

# ---------------------------------------------------------------------------- activations
_SQRT_HALF = 1.0 / math.sqrt(2.0)


def activation(b: Builder, x: Any, fn: Any, **kwargs: Any) -> ir.Value:
    """Lower a Keras activation (a function or its name) applied to `x`."""
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", "")
    name = {"swish": "silu", "hard_swish": "hard_silu"}.get(name, name)
    x = x.value if isinstance(x, Tensor) else x
    simple = {
        "sigmoid": "Sigmoid", "tanh": "Tanh", "softplus": "Softplus", "softsign": "Softsign",
        "exponential": "Exp", "selu": "Selu",
    }  # fmt: skip
    if name in ("linear", "", None):
        return x
    if name in simple:
        return b.op(simple[name], [x])
    if name == "relu":
        return relu(b, x, **kwargs)
    if name == "relu6":
        return b.op("Clip", [x, b.const(np.float32(0)), b.const(np.float32(6))])
    if name == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x])])
    if name == "gelu":
        if kwargs.get("approximate", False):
            cube = b.op("Mul", [b.op("Mul", [x, x]), x])
            inner = b.op("Add", [x, b.op("Mul", [cube, b.const(np.float32(0.044715))])])
            inner = b.op("Mul", [inner, b.const(np.float32(math.sqrt(2 / math.pi)))])
            # 0.5 is applied last so the two gelu forms share no node: ONNX Runtime's
            # Gelu fusion breaks graphs where its pattern shares an intermediate.
            half = b.op("Mul", [x, b.op("Add", [b.const(np.float32(1)), b.op("Tanh", [inner])])])
            return b.op("Mul", [half, b.const(np.float32(0.5))])
        erf = b.op("Erf", [b.op("Mul", [x, b.const(np.float32(_SQRT_HALF))])])
        return b.op(
            "Mul",
            [
                b.op("Mul", [x, b.const(np.float32(0.5))]),
                b.op("Add", [erf, b.const(np.float32(1))]),
            ],
        )
    if name in ("softmax", "log_softmax"):
        return b.op(
            "Softmax" if name == "softmax" else "LogSoftmax", [x], {"axis": kwargs.get("axis", -1)}
        )
    if name == "elu":
        return b.op("Elu", [x], {"alpha": float(kwargs.get("alpha", 1.0))})
    if name == "leaky_relu":
        return b.op("LeakyRelu", [x], {"alpha": float(kwargs.get("negative_slope", 0.2))})
    if name == "hard_sigmoid":
        return b.op("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5})
    if name == "hard_silu":
        return b.op("HardSwish", [x])
    if name == "mish":
        return b.op("Mul", [x, b.op("Tanh", [b.op("Softplus", [x])])])
    if callable(fn) and b.lower_callable is not None:  # keras_hub's gelu_approximate...
        shape = tuple(d if isinstance(d, int) else None for d in (x.shape or ()))
        dtype = np.dtype(x.dtype.numpy()).name if x.dtype is not None else "float32"
        result = b.lower_callable(b, fn, b.scope, [Tensor(x, shape, dtype)], **kwargs)
        return result.value if isinstance(result, Tensor) else result
    from interop.errors import UnsupportedOpError

    raise UnsupportedOpError(f"activation '{name}'", adapter="keras", layer=b.scope,
                             fix="use a built-in Keras activation or register a converter for the layer")  # fmt: skip


def relu(
    b: Builder,
    x: ir.Value,
    negative_slope: float = 0.0,
    max_value: Any = None,
    threshold: float = 0.0,
) -> ir.Value:
    if threshold:
        x = b.op(
            "Where",
            [b.op("Greater", [x, b.const(np.float32(threshold))]), x, b.const(np.float32(0))],
        )
        return x if max_value is None else b.op("Min", [x, b.const(np.float32(max_value))])
    y = (
        b.op("LeakyRelu", [x], {"alpha": float(negative_slope)})
        if negative_slope
        else b.op("Relu", [x])
    )
    if max_value is not None:
        y = b.op("Min", [y, b.const(np.float32(max_value))])
    return y


@register_layer("Activation")
def import_activation(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    return activation(b, x, layer.activation)


@register_layer("ReLU")
def import_relu(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    return relu(b, x.value, float(layer.negative_slope), layer.max_value, float(layer.threshold))


@register_layer("LeakyReLU")
def import_leaky_relu(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    return b.op("LeakyRelu", [x], {"alpha": float(layer.negative_slope)})


@register_layer("ELU")
def import_elu(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    return b.op("Elu", [x], {"alpha": float(layer.alpha)})


@register_layer("Softmax")
def import_softmax(b: Builder, layer: Any, x: Tensor, mask: Any = None, **_: Any) -> ir.Value:
    axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
    if mask is not None:  # Keras adds (1 - mask) * -1e9: masks of any dtype (keras_hub: int32)
        on = b.op(
            "Cast", [mask.value if isinstance(mask, Tensor) else mask], {"to": ir.DataType.FLOAT}
        )
        off = b.op("Sub", [b.const(np.float32(1)), on])
        x = Tensor(b.op("Add", [x, b.op("Mul", [off, b.const(np.float32(-1e9))])]), x.shape)
    if len(axes) == 1:
        return b.op("Softmax", [x], {"axis": int(axes[0])})
    shifted = b.op("Sub", [x, b.op("ReduceMax", [x, b.ints(axes)], {"keepdims": 1})])
    exp = b.op("Exp", [shifted])
    return b.op("Div", [exp, b.op("ReduceSum", [exp, b.ints(axes)], {"keepdims": 1})])


# ---------------------------------------------------------------------------- core
def _bias_act(b: Builder, layer: Any, y: ir.Value) -> ir.Value:
    if getattr(layer, "use_bias", False) and getattr(layer, "bias", None) is not None:
        y = b.op("Add", [y, b.variable(layer.bias)])
    return y


def weight(b: Builder, layer: Any, name: str = "kernel") -> ir.Value:
    """A layer's `kernel` / `embeddings`. With LoRA enabled, Keras's merged weight
    ``w + (alpha / rank) * a @ b`` as nodes over the three variables: the property's
    eager value would be a constant, and the emitted model would have nothing to train."""
    if not getattr(layer, "lora_enabled", False):
        return b.variable(getattr(layer, name))
    base = b.variable(getattr(layer, f"_{name}"))
    low_a, low_b = (b.variable(getattr(layer, f"lora_{name}_{part}")) for part in "ab")
    scale = b.const(np.float32(layer.lora_alpha / layer.lora_rank))
    return b.op("Add", [base, b.op("Mul", [scale, b.op("MatMul", [low_a, low_b])])])


@register_layer("Dense")
def import_dense(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    if getattr(layer, "quantization_mode", None):
        raise ValueError("quantized Dense layers are not supported")
    y = b.op("MatMul", [x, weight(b, layer, "kernel")])
    y = _bias_act(b, layer, y)
    return activation(b, y, layer.activation)


@register_layer("EinsumDense")
def import_einsum_dense(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    y = b.op("Einsum", [x, weight(b, layer, "kernel")], {"equation": layer.equation})
    if getattr(layer, "bias", None) is not None:
        y = b.op("Add", [y, b.variable(layer.bias)])
    return activation(b, y, layer.activation)


@register_layer("Embedding")
def import_embedding(b: Builder, layer: Any, x: Tensor, **_: Any) -> Tensor:
    indices = b.op("Cast", [x], {"to": ir.DataType.INT64})
    y = b.op("Gather", [weight(b, layer, "embeddings"), indices], {"axis": 0})
    mask = None
    if layer.mask_zero:
        mask = Tensor(
            b.op("Not", [b.op("Equal", [indices, b.const(np.int64(0))])]), x.shape, "bool"
        )
    return Tensor(y, (*x.shape, layer.output_dim), "float32", mask)


@register_layer("Masking")
def import_masking(b: Builder, layer: Any, x: Tensor, **_: Any) -> Tensor:
    keep = b.op("Not", [b.op("Equal", [x, b.const(np.float32(layer.mask_value))])])
    keep = b.op("Cast", [keep], {"to": ir.DataType.FLOAT})
    any_kept = b.op(
        "Greater",
        [b.op("ReduceMax", [keep, b.ints([-1])], {"keepdims": 0}), b.const(np.float32(0))],
    )
    y = b.op(
        "Mul",
        [x, b.op("Cast", [b.op("Unsqueeze", [any_kept, b.ints([-1])])], {"to": ir.DataType.FLOAT})],
    )
    return Tensor(y, x.shape, x.dtype, Tensor(any_kept, x.shape[:-1], "bool"))


def _identity(b: Builder, layer: Any, x: Tensor, *args: Any, **_: Any) -> ir.Value:
    return b.op("Identity", [x])


for _name in (
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
    "Identity",
):
    CAPTURE_LAYERS.register(_name, _identity)


@register_layer("Dropout")
@register_layer("SpatialDropout1D")
@register_layer("SpatialDropout2D")
@register_layer("SpatialDropout3D")
def import_dropout(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    # An ONNX Dropout without training_mode is the identity, and keeps the layer visible.
    return b.op("Dropout", [x, b.const(np.float32(layer.rate))])


@register_layer("Rescaling")
def import_rescaling(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    y = b.op("Mul", [x, b.const(np.asarray(layer.scale, np.float32))])
    return b.op("Add", [y, b.const(np.asarray(layer.offset, np.float32))])


@register_layer("Normalization")
def import_normalization(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    import keras

    def statistic(variable: Any, fixed: Any) -> ir.Value:
        if variable is None:  # mean / variance given to the constructor: constants
            return b.const(np.asarray(keras.ops.convert_to_numpy(fixed), np.float32))
        # adapted: the (non-trainable) variables, broadcast as Keras's finalize_state does
        shape = [int(d) for d in layer._broadcast_shape]
        return b.op("Reshape", [b.variable(variable), b.ints(shape)])

    mean = statistic(getattr(layer, "adapt_mean", None), layer.mean)
    variance = statistic(getattr(layer, "adapt_variance", None), layer.variance)
    std = b.op("Max", [b.op("Sqrt", [variance]), b.const(np.float32(keras.config.epsilon()))])
    if layer.invert:
        return b.op("Add", [mean, b.op("Mul", [x, std])])
    return b.op("Div", [b.op("Sub", [x, mean]), std])


# ---------------------------------------------------------------------------- normalization
@register_layer("BatchNormalization")
def import_batch_norm(b: Builder, layer: Any, x: Tensor, mask: Any = None, **_: Any) -> ir.Value:
    rank = x.rank
    axis = layer.axis % rank
    channels = x.shape[axis]
    scale = b.variable(layer.gamma) if layer.scale else b.const(np.ones(channels, np.float32))
    bias = b.variable(layer.beta) if layer.center else b.const(np.zeros(channels, np.float32))
    mean, var = b.variable(layer.moving_mean), b.variable(layer.moving_variance)
    perm = [0, axis, *[i for i in range(1, rank) if i != axis]]
    inverse = list(np.argsort(perm))
    y = b.transpose(x.value, perm) if rank > 2 else x.value
    y = b.op("BatchNormalization", [y, scale, bias, mean, var], {"epsilon": float(layer.epsilon)})
    return b.transpose(y, inverse) if rank > 2 else y


@register_layer("LayerNormalization")
def import_layer_norm(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    axes = sorted(
        a % x.rank for a in (layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis])
    )
    rms = getattr(layer, "rms_scaling", False)
    if axes == list(range(axes[0], x.rank)) and not rms:
        shape = x.shape[axes[0] :]
        scale = b.variable(layer.gamma) if layer.scale else b.const(np.ones(shape, np.float32))
        bias = b.variable(layer.beta) if layer.center else b.const(np.zeros(shape, np.float32))
        return b.op(
            "LayerNormalization",
            [x, scale, bias],
            {"axis": axes[0], "epsilon": float(layer.epsilon)},
        )
    mean = b.op("ReduceMean", [x, b.ints(axes)], {"keepdims": 1})
    # Keras's (deprecated) rms_scaling divides the raw input by the standard deviation.
    centered = b.op("Sub", [x, mean])
    numerator = x.value if rms else centered
    var = b.op("ReduceMean", [b.op("Mul", [centered, centered]), b.ints(axes)], {"keepdims": 1})
    y = b.op(
        "Div", [numerator, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(layer.epsilon))])])]
    )
    if layer.scale:
        y = b.op("Mul", [y, b.variable(layer.gamma)])
    if layer.center and not rms:
        y = b.op("Add", [y, b.variable(layer.beta)])
    return y


# ---------------------------------------------------------------------------- merging
def _merge(op_type: str):
    def convert(b: Builder, layer: Any, inputs: list[Tensor], **_: Any) -> ir.Value:
        y = inputs[0].value
        for other in inputs[1:]:
            y = b.op(op_type, [y, other])
        return y

    return convert


for _name, _op in (("Add", "Add"), ("Multiply", "Mul"), ("Maximum", "Max"), ("Minimum", "Min")):
    CAPTURE_LAYERS.register(_name, _merge(_op))


@register_layer("Subtract")
def import_subtract(b: Builder, layer: Any, inputs: list[Tensor], **_: Any) -> ir.Value:
    return b.op("Sub", [inputs[0], inputs[1]])


@register_layer("Average")
def import_average(b: Builder, layer: Any, inputs: list[Tensor], **_: Any) -> ir.Value:
    total = _merge("Add")(b, layer, inputs)
    return b.op("Div", [total, b.const(np.float32(len(inputs)))])


@register_layer("Concatenate")
def import_concatenate(b: Builder, layer: Any, inputs: list[Tensor], **_: Any) -> ir.Value:
    return b.op("Concat", list(inputs), {"axis": int(layer.axis)})


@register_layer("Dot")
def import_dot(b: Builder, layer: Any, inputs: list[Tensor], **_: Any) -> ir.Value:
    x, y = inputs
    axes = layer.axes if isinstance(layer.axes, list | tuple) else [layer.axes, layer.axes]
    xa, ya = axes[0] % x.rank, axes[1] % y.rank
    xv, yv = x.value, y.value
    if layer.normalize:
        xv = b.op("LpNormalization", [xv], {"axis": xa, "p": 2})
        yv = b.op("LpNormalization", [yv], {"axis": ya, "p": 2})
    if x.rank == 2 and y.rank == 2:
        return b.op("ReduceSum", [b.op("Mul", [xv, yv]), b.ints([1])], {"keepdims": 1})
    letters = "abcdefgh"
    xs, ys = list(letters[: x.rank]), ["a"] + list(letters[x.rank : x.rank + y.rank - 1])
    ys[ya] = xs[xa]
    out = [c for c in xs if c != xs[xa]] + [c for i, c in enumerate(ys) if i not in (0, ya)]
    return b.op("Einsum", [xv, yv], {"equation": f"{''.join(xs)},{''.join(ys)}->{''.join(out)}"})


# ---------------------------------------------------------------------------- shapes
@register_layer("Flatten")
def import_flatten(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    return b.op("Reshape", [x, b.ints([0, -1])])


@register_layer("Reshape")
def import_reshape(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    return b.op("Reshape", [x, b.ints([0, *[int(d) for d in layer.target_shape]])])


@register_layer("Permute")
def import_permute(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    return b.op("Transpose", [x], {"perm": [0, *[int(d) for d in layer.dims]]})


@register_layer("RepeatVector")
def import_repeat_vector(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    y = b.op("Unsqueeze", [x, b.ints([1])])
    return b.op("Tile", [y, b.ints([1, int(layer.n), 1])])


def _pads(padding: Any, spatial: int) -> tuple[list[int], list[int]]:
    pairs = padding if isinstance(padding, list | tuple) else [padding] * spatial
    pairs = [p if isinstance(p, list | tuple) else (p, p) for p in pairs]
    return [int(p[0]) for p in pairs], [int(p[1]) for p in pairs]


def _zero_pad(b: Builder, layer: Any, x: Tensor, spatial: int) -> ir.Value:
    begin, end = _pads(layer.padding, spatial)
    pads = [0, *begin, 0] + [0, *end, 0]  # channels-last
    return b.op("Pad", [x, b.ints(pads)])


def _crop(b: Builder, layer: Any, x: Tensor, spatial: int) -> ir.Value:
    begin, end = _pads(layer.cropping, spatial)
    axes = list(range(1, spatial + 1))
    ends = [-e if e else np.iinfo(np.int64).max for e in end]
    return b.op("Slice", [x, b.ints(begin), b.ints(ends), b.ints(axes)])


for _n in (1, 2, 3):
    CAPTURE_LAYERS.register(
        f"ZeroPadding{_n}D", lambda b, layer, x, _s=_n, **_: _zero_pad(b, layer, x, _s)
    )
    CAPTURE_LAYERS.register(
        f"Cropping{_n}D", lambda b, layer, x, _s=_n, **_: _crop(b, layer, x, _s)
    )


@register_layer("UpSampling2D")
def import_upsampling2d(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    mode = "nearest" if layer.interpolation == "nearest" else "linear"
    scales = b.const(np.asarray([1, 1, *layer.size], np.float32))
    y = b.to_channels_first(x.value, 4)
    attrs = {"mode": mode, "nearest_mode": "floor", "coordinate_transformation_mode": "asymmetric"}
    if mode == "linear":
        attrs = {"mode": mode, "coordinate_transformation_mode": "half_pixel"}
    y = b.op("Resize", [y, None, scales], attrs)
    return b.to_channels_last(y, 4)
