"""Converters for convolution and pooling layers (channels-last Keras -> channels-first ONNX).

"same" padding is written as explicit pads when the spatial size is known at trace
time (TensorFlow puts the odd pixel at the end, as ONNX's SAME_UPPER does) and as
``auto_pad="SAME_UPPER"`` when it is not.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import onnx_ir as ir

from . import CAPTURE_LAYERS, CAPTURE_OPS
from .capture_layers import activation
from .capture_layers import weight as kernel_weight
from .capture_lowering import Builder, Tensor


def _tuple(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)] * n


def padding_attrs(
    x: Tensor, padding: str, kernel: list[int], strides: list[int], dilation: list[int]
) -> dict:
    spatial = list(x.shape[1:-1])
    if padding == "valid":
        return {"pads": [0] * (2 * len(kernel))}
    if any(s is None for s in spatial):
        return {"auto_pad": "SAME_UPPER"}
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilation, strict=False):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return {"pads": begin + end}


def _channels_first(b: Builder, x: Tensor) -> ir.Value:
    if getattr(b, "_data_format", None) == "channels_first":
        return x.value
    return b.to_channels_first(x.value, x.rank)


def _check_format(layer: Any) -> None:
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"data_format='{layer.data_format}' is not supported, only channels_last")


def _causal_pad(
    b: Builder, y: ir.Value, layer: Any, kernel: list[int], dilation: list[int]
) -> ir.Value:
    left = (kernel[0] - 1) * dilation[0]
    return b.op("Pad", [y, b.ints([0, 0, left, 0, 0, 0])])


def import_conv(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    """Conv1D/2D/3D, including grouped convolution (``groups``) and causal padding."""
    _check_format(layer)
    n = x.rank - 2
    kernel, strides = _tuple(layer.kernel_size, n), _tuple(layer.strides, n)
    dilation = _tuple(layer.dilation_rate, n)
    perm = [n + 1, n, *range(n)]  # (k..., in, out) -> (out, in, k...)
    weight = b.transpose(kernel_weight(b, layer, "kernel"), perm)
    y = _channels_first(b, x)
    padding = layer.padding
    if padding == "causal":
        y, padding = _causal_pad(b, y, layer, kernel, dilation), "valid"
    attrs = {"strides": strides, "dilations": dilation, "group": int(getattr(layer, "groups", 1)),
             **padding_attrs(x, padding, kernel, strides, dilation)}  # fmt: skip
    inputs = [y, weight] + ([b.variable(layer.bias)] if layer.use_bias else [])
    y = b.op("Conv", inputs, attrs)
    return activation(b, b.to_channels_last(y, x.rank), layer.activation)


def _depthwise_weight(b: Builder, kernel_var: Any, n: int) -> ir.Value:
    # (k..., in, mult) -> (in, mult, k...) -> (in * mult, 1, k...): output channel i*mult+m, as in TF
    shape = tuple(kernel_var.shape)
    w = b.transpose(b.variable(kernel_var), [n, n + 1, *range(n)])
    return b.op("Reshape", [w, b.ints([shape[n] * shape[n + 1], 1, *shape[:n]])])


def import_depthwise_conv(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    _check_format(layer)
    n = x.rank - 2
    kernel, strides = _tuple(layer.kernel_size, n), _tuple(layer.strides, n)
    dilation = _tuple(layer.dilation_rate, n)
    channels = int(x.shape[-1])
    attrs = {"strides": strides, "dilations": dilation, "group": channels,
             **padding_attrs(x, layer.padding, kernel, strides, dilation)}  # fmt: skip
    inputs = [_channels_first(b, x), _depthwise_weight(b, layer.kernel, n)]
    if layer.use_bias:
        inputs.append(b.variable(layer.bias))
    y = b.op("Conv", inputs, attrs)
    return activation(b, b.to_channels_last(y, x.rank), layer.activation)


def import_separable_conv(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    _check_format(layer)
    n = x.rank - 2
    kernel, strides = _tuple(layer.kernel_size, n), _tuple(layer.strides, n)
    dilation = _tuple(layer.dilation_rate, n)
    channels = int(x.shape[-1])
    attrs = {"strides": strides, "dilations": dilation, "group": channels,
             **padding_attrs(x, layer.padding, kernel, strides, dilation)}  # fmt: skip
    y = b.op(
        "Conv", [_channels_first(b, x), _depthwise_weight(b, layer.depthwise_kernel, n)], attrs
    )
    pointwise = b.transpose(b.variable(layer.pointwise_kernel), [n + 1, n, *range(n)])
    inputs = [y, pointwise] + ([b.variable(layer.bias)] if layer.use_bias else [])
    y = b.op("Conv", inputs, {"strides": [1] * n})
    return activation(b, b.to_channels_last(y, x.rank), layer.activation)


def import_conv_transpose(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
    _check_format(layer)
    n = x.rank - 2
    kernel, strides = _tuple(layer.kernel_size, n), _tuple(layer.strides, n)
    dilation = _tuple(layer.dilation_rate, n)
    if getattr(layer, "output_padding", None) is not None or any(d != 1 for d in dilation):
        raise ValueError(
            "output_padding and dilation are not supported for transposed convolutions"
        )
    # Keras kernel (k..., out, in) -> ONNX ConvTranspose (in, out, k...)
    weight = b.transpose(b.variable(layer.kernel), [n + 1, n, *range(n)])
    attrs: dict[str, Any] = {"strides": strides}
    if layer.padding == "same":
        attrs["auto_pad"] = "SAME_UPPER"
        attrs["output_shape"] = (
            [int(s) * st for s, st in zip(x.shape[1:-1], strides, strict=False)]
            if None not in x.shape[1:-1]
            else None
        )
        if attrs["output_shape"] is not None:
            del attrs["auto_pad"]
            attrs["pads"] = _transpose_same_pads(kernel, strides)
            del attrs["output_shape"]
    inputs = [_channels_first(b, x), weight] + ([b.variable(layer.bias)] if layer.use_bias else [])
    y = b.op("ConvTranspose", inputs, attrs)
    return activation(b, b.to_channels_last(y, x.rank), layer.activation)


def _transpose_same_pads(kernel: list[int], strides: list[int]) -> list[int]:
    begin, end = [], []
    for k, s in zip(kernel, strides, strict=False):
        total = max(k - s, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return begin + end


for _n in (1, 2, 3):
    CAPTURE_LAYERS.register(f"Conv{_n}D", import_conv)
    CAPTURE_LAYERS.register(f"Conv{_n}DTranspose", import_conv_transpose)
for _n in (1, 2):
    CAPTURE_LAYERS.register(f"DepthwiseConv{_n}D", import_depthwise_conv)
    CAPTURE_LAYERS.register(f"SeparableConv{_n}D", import_separable_conv)


# ---------------------------------------------------------------------------- pooling
def _pool(op_type: str):
    def convert(b: Builder, layer: Any, x: Tensor, **_: Any) -> ir.Value:
        _check_format(layer)
        n = x.rank - 2
        kernel, strides = _tuple(layer.pool_size, n), _tuple(layer.strides or layer.pool_size, n)
        attrs = {"kernel_shape": kernel, "strides": strides,
                 **padding_attrs(x, layer.padding, kernel, strides, [1] * n)}  # fmt: skip
        if op_type == "AveragePool":
            attrs["count_include_pad"] = 0  # TF averages over the valid pixels only
        y = b.op(op_type, [_channels_first(b, x)], attrs)
        return b.to_channels_last(y, x.rank)

    return convert


def _pool_op(op_type: str):
    """``keras.ops.max_pool`` / ``average_pool`` (MobileNetV5's multi-scale fusion): the
    layers' conversion; ``data_format=None`` is Keras's image data format."""
    convert_layer = _pool(op_type)

    def convert(b: Builder, op: Any, x: Tensor, **_: Any) -> ir.Value:
        import keras

        fmt = op.data_format or keras.config.image_data_format()
        layer = types.SimpleNamespace(pool_size=op.pool_size, strides=op.strides,
                                      padding=op.padding, data_format=fmt)  # fmt: skip
        return convert_layer(b, layer, x)

    return convert


CAPTURE_OPS.register("MaxPool", _pool_op("MaxPool"))
CAPTURE_OPS.register("AveragePool", _pool_op("AveragePool"))


def _global_pool(reduce: str):
    def convert(b: Builder, layer: Any, x: Tensor, mask: Any = None, **_: Any) -> ir.Value:
        _check_format(layer)
        axes = list(range(1, x.rank - 1))
        keep = int(bool(layer.keepdims))
        if mask is not None and reduce == "ReduceMean":  # mean over unmasked steps (1D pooling)
            weights = b.op(
                "Cast", [b.op("Unsqueeze", [mask.value, b.ints([-1])])], {"to": ir.DataType.FLOAT}
            )
            total = b.op("ReduceSum", [b.op("Mul", [x, weights]), b.ints(axes)], {"keepdims": keep})
            return b.op(
                "Div", [total, b.op("ReduceSum", [weights, b.ints(axes)], {"keepdims": keep})]
            )
        return b.op(reduce, [x, b.ints(axes)], {"keepdims": keep})

    return convert


for _n in (1, 2, 3):
    CAPTURE_LAYERS.register(f"MaxPooling{_n}D", _pool("MaxPool"))
    CAPTURE_LAYERS.register(f"AveragePooling{_n}D", _pool("AveragePool"))
    CAPTURE_LAYERS.register(f"GlobalAveragePooling{_n}D", _global_pool("ReduceMean"))
    CAPTURE_LAYERS.register(f"GlobalMaxPooling{_n}D", _global_pool("ReduceMax"))

_ = np  # numpy is used by the helpers above through b.ints
