"""Keras layers of emitted models: native layers for weighted ONNX nodes, and the generic op.

Each builder in `LAYERS` gets the emitter, the node and its arguments (KerasTensors or
`Const`s) and returns the node's outputs after calling a native Keras layer, or None to
let the generic `OnnxOp` emit the node (non-constant weights, unusual attributes). Weight
orientation (Gemm's transB, Conv's OIHW -> HWIO, LSTM gate order) and the channels-last
layout of convolution / pooling / normalization are handled here only.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from interop.emitter import is_constant_fill
from interop.registry import Registry

LAYERS: Registry[Any] = Registry("emit", adapter="keras layers")


from .generic import (  # noqa: E402,F401  (re-exported: the emitter's generic layer)
    MAX_INPUTS,
    OnnxOp,
    Transpose,
    control_function,
    op_class,
)


# ---------------------------------------------------------------------- helpers
def _attributes(emitter, node) -> dict[str, Any]:
    values, _ = emitter.attributes(node)
    return values


def _zero_constant(emitter, value) -> bool:
    static = emitter.static.get(value) if value is not None else None
    return static is not None and not np.any(static)


def _optional_weight(emitter, node, index):
    """(value, array) of an optional weight input; (None, None) if absent; False if not usable."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None or _zero_constant(emitter, value):  # exporters spell "no bias" as zeros
        return None, None
    array = emitter.weight(value)
    return (value, array) if array is not None else (False, False)


def _rank(value, arg=None) -> int | None:
    if arg is not None and hasattr(arg, "shape") and not hasattr(arg, "array"):
        return len(arg.shape)
    return len(value.shape) if value is not None and value.shape is not None else None


def _pads(attrs, spatial) -> list[tuple[int, int]] | None:
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    pads = list(attrs.get("pads") or [0] * 2 * spatial)
    return list(zip(pads[:spatial], pads[spatial:]))


def _keras_tensor(arg) -> bool:
    return arg is not None and not hasattr(arg, "array")


def _assign(layer, **arrays):
    for name, array in arrays.items():
        if array is not None:
            variable = getattr(layer, name)
            variable.assign(np.asarray(array, variable.dtype).reshape(variable.shape))
    return layer


_PADDING = {1: keras.layers.ZeroPadding1D, 2: keras.layers.ZeroPadding2D,
            3: keras.layers.ZeroPadding3D}  # fmt: skip


def _zero_pad(emitter, x, pads):
    if not any(lo or hi for lo, hi in pads):
        return x
    padding = pads[0] if len(pads) == 1 else tuple(pads)
    return _PADDING[len(pads)](padding, name=emitter.unique("pad"))(x)


class _Given(keras.initializers.Initializer):
    """The source's array as a layer's initial value (no random init to overwrite)."""

    def __init__(self, array):
        self.array = np.asarray(array)

    def __call__(self, shape, dtype=None):
        return ops.convert_to_tensor(self.array.reshape(shape), dtype=dtype)


def forget_initializers(layer) -> None:
    """Native initializers again once the variables exist, so the layer's config is plain Keras."""
    for name, value in list(vars(layer).items()):
        if isinstance(value, _Given):
            setattr(layer, name, keras.initializers.Zeros())


def _given(array, default="zeros"):
    return default if array is None else _Given(array)


def _same_padding(x, pads, kernel, strides, dilations) -> bool:
    """Whether explicit pads equal Keras's "same" padding for this (static) input size."""
    for size, (lo, hi), k, s, d in zip(tuple(x.shape)[1:-1], pads, kernel, strides, dilations):
        if size is None and s != 1:
            return False
        effective = (k - 1) * d + 1
        total = effective - 1 if s == 1 else max((-(-size // s) - 1) * s + effective - size, 0)
        if (lo, hi) != (total // 2, total - total // 2):
            return False
    return True


# ---------------------------------------------------------------------- weighted ops
@LAYERS.register("Conv")
def conv_layer(emitter, node, args):
    """Conv -> keras ConvND / DepthwiseConvND, channels-last between two permutations."""
    weight = emitter.weight(node.inputs[1])
    bias_value, bias = _optional_weight(emitter, node, 2)
    if weight is None or bias is False or not 3 <= weight.ndim <= 5 or not _keras_tensor(args[0]):
        return None
    attrs = _attributes(emitter, node)
    spatial = weight.ndim - 2
    pads, group = _pads(attrs, spatial), attrs.get("group", 1)
    strides = tuple(attrs.get("strides") or [1] * spatial)
    dilations = tuple(attrs.get("dilations") or [1] * spatial)
    depthwise = group > 1 and weight.shape[1] == 1 and spatial < 3
    if pads is None or (group > 1 and not depthwise):
        return None  # grouped convolutions have no CPU kernel in TensorFlow: generic op
    if any(s > 1 for s in strides) and any(d > 1 for d in dilations):
        return None
    name = emitter.layer_name(node, [node.inputs[1], bias_value])
    kernel_size = tuple(weight.shape[2:])
    activation, activation_node = _following_activation(emitter, node.outputs[0])
    if depthwise:
        multiplier = weight.shape[0] // group
        layer = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)[spatial - 1](
            kernel_size, strides, depth_multiplier=multiplier, dilation_rate=dilations,
            use_bias=bias is not None, name=name, activation=activation,
        )  # fmt: skip
        # ONNX (C*mult, 1, *K), out channel c*mult+m -> keras (*K, C, mult)
        kernel = weight.reshape(group, multiplier, *kernel_size)
        kernel = np.transpose(kernel, (*range(2, 2 + spatial), 0, 1))
        kernel_attribute = "kernel"
    else:
        kernel = np.transpose(weight, (*range(2, 2 + spatial), 1, 0))  # OI* -> *IO
        layer = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)[spatial - 1](
            weight.shape[0], kernel_size, strides, dilation_rate=dilations,
            use_bias=bias is not None, name=name, kernel_initializer=_Given(kernel),
            bias_initializer=_given(bias), activation=activation,
        )  # fmt: skip
        kernel_attribute = "kernel"
    x = emitter.channels_last(args[0])
    if pads != [(0, 0)] * spatial and _same_padding(x, pads, kernel_size, strides, dilations):
        layer.padding = "same"  # padding inside the convolution: no padded copy of the input
    else:
        x = _zero_pad(emitter, x, pads)
    y = layer(x)
    if depthwise:  # DepthwiseConv takes no kernel_initializer of that name: assign
        _assign(layer, kernel=kernel, bias=bias)
    emitter.adopt(
        layer,
        {kernel_attribute: node.inputs[1]} | ({"bias": bias_value} if bias is not None else {}),
    )
    outputs = [emitter.channels_first(y)]
    if activation_node is not None:  # the activation is the layer's own now
        emitter.fused[activation_node] = outputs
    return outputs


@LAYERS.register("ConvTranspose")
def conv_transpose_layer(emitter, node, args):
    """ConvTranspose -> keras ConvNDTranspose (groups 1), cropped to ONNX's pads."""
    weight = emitter.weight(node.inputs[1])
    bias_value, bias = _optional_weight(emitter, node, 2)
    if weight is None or bias is False or not 3 <= weight.ndim <= 5 or not _keras_tensor(args[0]):
        return None
    attrs = _attributes(emitter, node)
    spatial = weight.ndim - 2
    pads = _pads(attrs, spatial)
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    output_padding = list(attrs.get("output_padding") or [0] * spatial)
    effective = [(k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilations)]
    if (
        pads is None
        or attrs.get("group", 1) != 1
        or attrs.get("output_shape") is not None
        or any(p for p in output_padding)
        or any(k < s for k, s in zip(effective, strides))  # keras 'valid' pads those itself
        or (any(s > 1 for s in strides) and any(d > 1 for d in dilations))
    ):
        return None
    classes = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
               keras.layers.Conv3DTranspose)  # fmt: skip
    layer = classes[spatial - 1](
        weight.shape[1], tuple(weight.shape[2:]), tuple(strides), dilation_rate=tuple(dilations),
        use_bias=bias is not None, name=emitter.layer_name(node, [node.inputs[1], bias_value]),
    )  # fmt: skip
    y = layer(emitter.channels_last(args[0]))
    # ONNX (C_in, C_out, *K) -> keras (*K, C_out, C_in)
    _assign(layer, kernel=np.transpose(weight, (*range(2, 2 + spatial), 1, 0)), bias=bias)
    emitter.adopt(
        layer, {"kernel": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    )
    if any(lo or hi for lo, hi in pads):
        cropping = (keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D)
        crop = pads[0] if spatial == 1 else tuple(pads)
        y = cropping[spatial - 1](crop, name=emitter.unique("crop"))(y)
    return [emitter.channels_first(y)]


@LAYERS.register("Gemm")
def gemm_layer(emitter, node, args):
    """Gemm with a constant B -> keras.layers.Dense (kernel [in, out])."""
    attrs = _attributes(emitter, node)
    weight = emitter.weight(node.inputs[1])
    bias_value, bias = _optional_weight(emitter, node, 2)
    if (
        weight is None
        or weight.ndim != 2
        or bias is False
        or attrs.get("transA", 0)
        or attrs.get("alpha", 1.0) != 1.0
        or not _keras_tensor(args[0])
    ):
        return None
    kernel = weight.T if attrs.get("transB", 0) else weight
    if bias is not None and (attrs.get("beta", 1.0) != 1.0 or bias.size != kernel.shape[1]):
        return None
    activation, activation_node = _following_activation(emitter, node.outputs[0])
    outputs = _dense(emitter, node, args[0], kernel, bias, node.inputs[1], bias_value, activation)
    if activation_node is not None:
        emitter.fused[activation_node] = outputs
    return outputs


@LAYERS.register("MatMul")
def matmul_layer(emitter, node, args):
    """MatMul by a constant 2-D weight -> keras.layers.Dense without bias."""
    weight = emitter.weight(node.inputs[1])
    if (
        weight is None
        or weight.ndim != 2
        or not _keras_tensor(args[0])
        or _rank(node.inputs[0]) == 1
    ):
        return None
    bias_value, bias, add = _following_bias(emitter, node, weight.shape[1])
    last = add if add is not None else node
    activation, activation_node = _following_activation(emitter, last.outputs[0])
    outputs = _dense(emitter, node, args[0], weight, bias, node.inputs[1], bias_value, activation)
    for fused in (add, activation_node):  # the bias Add and activation are the Dense's now
        if fused is not None:
            emitter.fused[fused] = outputs
    return outputs


# ONNX activations a Keras Dense / Conv layer applies itself (same formula, no attributes)
_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}


def _following_activation(emitter, value):
    """(Keras activation name, node) when a layer output's only reader is a plain activation;
    the layer then applies it, one layer call fewer, as the source Keras model did."""
    uses = list(value.uses())
    if len(uses) != 1 or value in emitter.graph.outputs:
        return None, None
    reader = uses[0].node
    if reader.domain not in ("", "ai.onnx") or reader.op_type not in _ACTIVATIONS:
        return None, None
    if reader.outputs[0].dtype != value.dtype:
        return None, None
    return _ACTIVATIONS[reader.op_type], reader


def _following_bias(emitter, node, size):
    """(bias value, array, Add node) when the MatMul's only reader adds a constant [size] bias."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0] in emitter.graph.outputs:
        return None, None, None
    add = uses[0].node
    other = [v for v in add.inputs if v is not node.outputs[0]]
    if len(other) != 1:
        return None, None, None
    array = emitter.weight(other[0])
    if array is None or array.shape != (size,):
        return None, None, None
    return other[0], array, add


def _dense(emitter, node, x, kernel, bias, kernel_value, bias_value, activation=None):
    layer = keras.layers.Dense(
        kernel.shape[1], use_bias=bias is not None, name=emitter.layer_name(node, [kernel_value, bias_value]),
        dtype=str(kernel.dtype), kernel_initializer=_Given(kernel), bias_initializer=_given(bias),
        activation=activation,
    )  # fmt: skip
    y = layer(x)
    emitter.adopt(
        layer, {"kernel": kernel_value} | ({"bias": bias_value} if bias is not None else {})
    )
    return [y]


@LAYERS.register("BatchNormalization")
def batch_norm_layer(emitter, node, args):
    """BatchNormalization -> keras.layers.BatchNormalization over channels-last data."""
    attrs = _attributes(emitter, node)
    arrays = [emitter.weight(v) for v in node.inputs[1:5]]
    rank = _rank(node.inputs[0], args[0])
    # constant ones / zeros for scale / bias (a source BN without them): scale / center off
    scaled = not _constant_fill(emitter, node.inputs[1], 1.0)
    centered = not _constant_fill(emitter, node.inputs[2], 0.0)
    if (
        any(a is None for a, used in zip(arrays, (scaled, centered, True, True)) if used)
        or attrs.get("training_mode", 0)
        or len(node.outputs) > 1
        or rank not in (2, 3, 4, 5)
        or not _keras_tensor(args[0])
    ):
        return None
    scale, bias, mean, var = arrays
    # ONNX momentum weighs the running value, as Keras's does
    layer = keras.layers.BatchNormalization(
        axis=-1, momentum=attrs.get("momentum", 0.9), epsilon=attrs.get("epsilon", 1e-5),
        name=emitter.layer_name(node, node.inputs[1:5]), scale=scaled, center=centered,
        gamma_initializer=_given(scale, "ones"), beta_initializer=_given(bias),
        moving_mean_initializer=_Given(mean), moving_variance_initializer=_Given(var),
    )  # fmt: skip
    x = emitter.channels_last(args[0]) if rank > 2 else args[0]
    y = layer(x)
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    used = (scaled, centered, True, True)
    emitter.adopt(layer, {n: v for n, v, u in zip(names, node.inputs[1:5], used) if u})
    return [emitter.channels_first(y) if rank > 2 else y]


def _constant_fill(emitter, value, fill) -> bool:
    """A constant (not a weight) input whose every element is `fill`."""
    return emitter.weight(value) is None and is_constant_fill(value, fill, emitter.static)


@LAYERS.register("LayerNormalization")
def layer_norm_layer(emitter, node, args):
    """LayerNormalization with weights of the normalized shape -> keras.layers.LayerNormalization."""
    attrs = _attributes(emitter, node)
    scale = emitter.weight(node.inputs[1])
    bias_value, bias = _optional_weight(emitter, node, 2)
    rank = _rank(node.inputs[0], args[0])
    if scale is None or bias is False or len(node.outputs) > 1 or rank is None:
        return None
    if not _keras_tensor(args[0]):
        return None
    axis = attrs.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    dims = tuple(args[0].shape)[axis:]
    if not all(isinstance(d, int) for d in dims) or tuple(dims) != scale.shape:
        return None
    layer = keras.layers.LayerNormalization(
        axis=list(range(axis, rank)) if axis < rank - 1 else -1,
        epsilon=attrs.get("epsilon", 1e-5), center=bias is not None,
        name=emitter.layer_name(node, [node.inputs[1], bias_value]),
    )  # fmt: skip
    y = layer(args[0])
    _assign(layer, gamma=scale, beta=bias)
    emitter.adopt(
        layer, {"gamma": node.inputs[1]} | ({"beta": bias_value} if bias is not None else {})
    )
    return [y]


@LAYERS.register("Gather")
def embedding_layer(emitter, node, args):
    """Gather on a constant float table along axis 0 -> keras.layers.Embedding."""
    attrs = _attributes(emitter, node)
    table = emitter.weight(node.inputs[0])
    if (
        table is None
        or table.ndim != 2
        or attrs.get("axis", 0) != 0
        or table.dtype.kind != "f"
        or not _keras_tensor(args[1])
    ):
        return None
    layer = keras.layers.Embedding(
        table.shape[0], table.shape[1], name=emitter.layer_name(node, [node.inputs[0]])
    )
    y = layer(args[1])
    _assign(layer, embeddings=table)
    emitter.adopt(layer, {"embeddings": node.inputs[0]})
    return [y]


@LAYERS.register("Dropout")
def dropout_layer(emitter, node, args):
    """Dropout (mask unused, constant ratio) -> keras.layers.Dropout: drops only in training."""
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        return None  # the mask is read: the generic op computes it
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return None  # an explicit training_mode input: keep ONNX's meaning
    ratio_value = node.inputs[1] if len(node.inputs) > 1 else None
    if (ratio_value is not None and ratio_value not in emitter.static) or not _keras_tensor(
        args[0]
    ):
        return None
    ratio = (
        0.5
        if ratio_value is None
        else float(np.asarray(emitter.static[ratio_value]).reshape(-1)[0])
    )
    layer = keras.layers.Dropout(ratio, name=emitter.unique(node.name or "dropout"))
    x = args[0]
    if id(x) in emitter.origin:  # elementwise: drop in the layout the input came out of
        source, perm = emitter.origin[id(x)]
        return [emitter.transpose(layer(source), perm)] + [None] * (len(node.outputs) - 1)
    return [layer(x)] + [None] * (len(node.outputs) - 1)


_POOLS = {
    "MaxPool": (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D),
    "AveragePool": (
        keras.layers.AveragePooling1D,
        keras.layers.AveragePooling2D,
        keras.layers.AveragePooling3D,
    ),
}


@LAYERS.register("MaxPool")
@LAYERS.register("AveragePool")
def pool_layer(emitter, node, args):
    """Unpadded MaxPool / AveragePool -> keras pooling layers over channels-last data."""
    attrs = _attributes(emitter, node)
    rank = _rank(node.inputs[0], args[0])
    if rank not in (3, 4, 5) or len(node.outputs) > 1 or not _keras_tensor(args[0]):
        return None
    spatial = rank - 2
    kernel = tuple(attrs.get("kernel_shape") or ())
    pads = _pads(attrs, spatial)
    if (
        len(kernel) != spatial
        or pads is None
        or any(lo or hi for lo, hi in pads)
        or attrs.get("ceil_mode", 0)
        or any(d != 1 for d in attrs.get("dilations") or [1])
        or attrs.get("storage_order", 0)
    ):
        return None
    strides = tuple(attrs.get("strides") or [1] * spatial)
    layer = _POOLS[node.op_type][spatial - 1](
        kernel, strides, name=emitter.unique(node.name or node.op_type.lower())
    )
    return [emitter.channels_first(layer(emitter.channels_last(args[0])))]


@LAYERS.register("GlobalAveragePool")
@LAYERS.register("GlobalMaxPool")
def global_pool_layer(emitter, node, args):
    """GlobalAverage/MaxPool -> keras global pooling (keepdims) over channels-last data."""
    rank = _rank(node.inputs[0], args[0])
    if rank not in (3, 4, 5) or not _keras_tensor(args[0]):
        return None
    average = node.op_type == "GlobalAveragePool"
    classes = (
        (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
         keras.layers.GlobalAveragePooling3D) if average else
        (keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
         keras.layers.GlobalMaxPooling3D)
    )  # fmt: skip
    layer = classes[rank - 3](keepdims=True, name=emitter.unique(node.name or "global_pool"))
    return [emitter.channels_first(layer(emitter.channels_last(args[0])))]


# recurrent builders register themselves in LAYERS (kept apart: this module's size)
from . import native_recurrent  # noqa: E402,F401
