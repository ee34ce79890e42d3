"""Native Keras layers of emitted models: the builders of `EMIT_LAYERS`, one per weighted op.

Each builder gets the emitter, the node and its arguments (KerasTensors or `Const`s) and
returns an `interop.emitter.Native` (the layer, the source weights it holds, how to call
it) or None to let the generic `OnnxOp` emit the node (non-constant weights, unusual
attributes). `KerasEmitter.call_native` names the layer at its weights' common source
prefix, calls it and records its variables' source names. Weight orientation (Gemm's
transB, Conv's OIHW -> HWIO) and the channels-last layout of convolution / pooling /
normalization (a ``call`` around the layer) are handled here only; LSTM / GRU / RNN are
in `emit_recurrent`.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from interop.emitter import (
    Native,
    constant_fill,
    conv_weights,
    dropout_ratio,
    following_activation,
    following_bias_add,
    onnx_pads,
    optional_weight,
)
from interop.weights import is_mapped

from . import EMIT_LAYERS


# ---------------------------------------------------------------------- helpers
def rank_of(value, arg=None) -> int | None:
    """The rank of a node input: its KerasTensor's, else the value's recorded shape's."""
    if arg is not None and hasattr(arg, "shape") and not hasattr(arg, "array"):
        return len(arg.shape)
    return len(value.shape) if value is not None and value.shape is not None else None


def keras_tensor(arg) -> bool:
    """Whether an argument is a run-time value (a KerasTensor), not a `Const`."""
    return arg is not None and not hasattr(arg, "array")


def assign(layer, **arrays):
    """Source arrays into a built layer's variables (reshaped to theirs)."""
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
        array = self.array.reshape(shape)
        if dtype is None or keras.backend.standardize_dtype(dtype) == str(array.dtype):
            return host_tensor(array)
        return ops.convert_to_tensor(array, dtype=dtype)


_ALIGN = 64  # TensorFlow's tensors must be 64-byte aligned (it aborts on others)
_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def host_tensor(array: np.ndarray) -> Any:
    """A weight mapped from disk (`interop.weights.host_array`) as the initial value of a
    Keras variable, without the copies of ``convert_to_tensor``.

    On TensorFlow, ``convert_to_tensor`` of a numpy array held 3x the tensor at once (the
    mapped pages and two copies). Here TensorFlow takes the bytes through DLPack, and the
    variable keeps that buffer: an aligned, contiguous map is the variable's storage (clean
    file pages, as torch's parameters; writes go to private pages, never to the file), any
    other weight is copied once into an aligned buffer first. Other backends and arrays:
    the array itself.
    """
    if keras.backend.backend() != "tensorflow" or not is_mapped(array):
        return array
    bits = _BITS.get(array.dtype.itemsize)
    if bits is None or not _floating(array.dtype):
        return array
    import tensorflow as tf

    try:
        dtype = tf.as_dtype(array.dtype)
    except TypeError:
        return array
    if not array.flags.c_contiguous or array.ctypes.data % _ALIGN:
        raw = np.empty(array.nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        copy = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
        np.copyto(copy, array)
        array = copy
    tensor = tf.experimental.dlpack.from_dlpack(array.view(bits).__dlpack__())
    return tf.bitcast(tensor, dtype)


def _floating(dtype: Any) -> bool:
    """A float dtype, bfloat16 included (numpy gives ml_dtypes' bfloat16 the kind 'V')."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype).name in ("bfloat16",)


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


def _weights(kernel_value, bias_value, kernel="kernel", bias="bias") -> dict[str, Any]:
    return {kernel: kernel_value} | ({bias: bias_value} if bias_value is not None else {})


def _channels_last(emitter, call=None):
    """A call of a layer over channels-last data, between the two permutations."""

    def run(layer, x):
        y = call(layer, emitter.channels_last(x)) if call else layer(emitter.channels_last(x))
        return emitter.channels_first(y)

    return run


# ONNX activations a Keras Dense / Conv layer applies itself (same formula, no attributes)
_ACTIVATIONS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hard_swish"}


def _activation(emitter, value) -> tuple[str | None, tuple[Any, ...]]:
    """(Keras activation name, absorbed nodes) when a layer output's only reader is a plain
    activation: the layer then applies it, one layer call fewer, as the source model did."""
    reader = following_activation(emitter, value, (*_ACTIVATIONS, "Clip"))
    if reader is not None and reader.op_type == "Clip":
        # Clip(0, 6) is ReLU6 (min(max(x, 0), 6), the same formula): MobileNets' activation
        bounds = [emitter.static.get(v) if v is not None else None for v in reader.inputs[1:3]]
        bounds = [b if b is not None or v is None else _constant_of(v)
                  for b, v in zip(bounds, reader.inputs[1:3])]  # fmt: skip
        if len(bounds) != 2 or any(b is None or np.size(b) != 1 for b in bounds):
            return None, ()
        if (float(np.ravel(bounds[0])[0]), float(np.ravel(bounds[1])[0])) != (0.0, 6.0):
            return None, ()
        return "relu6", (reader,)
    return (None, ()) if reader is None else (_ACTIVATIONS[reader.op_type], (reader,))


def _constant_of(value):
    return value.const_value.numpy() if value.const_value is not None else None


# ---------------------------------------------------------------------- weighted ops
@EMIT_LAYERS.register("Conv")
def conv_layer(emitter, node, args):
    """Conv -> keras ConvND / DepthwiseConvND, channels-last between two permutations."""
    conv = conv_weights(emitter, node)
    if conv is None or not keras_tensor(args[0]):
        return None
    weight, bias, bias_value, spatial = conv.weight, conv.bias, conv.bias_value, conv.spatial
    pads, group = conv.pads, conv.group
    strides, dilations = tuple(conv.strides), tuple(conv.dilations)
    depthwise = group > 1 and weight.shape[1] == 1 and spatial < 3
    if group > 1 and not depthwise:
        return None  # grouped convolutions have no CPU kernel in TensorFlow: generic op
    if any(s > 1 for s in strides) and any(d > 1 for d in dilations):
        return None
    kernel_size = tuple(weight.shape[2:])
    activation, absorbs = _activation(emitter, node.outputs[0])
    if depthwise:
        multiplier = weight.shape[0] // group
        layer = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)[spatial - 1](
            kernel_size, strides, depth_multiplier=multiplier, dilation_rate=dilations,
            use_bias=bias is not None, activation=activation, dtype=str(weight.dtype),
        )  # fmt: skip
        # ONNX (C*mult, 1, *K), out channel c*mult+m -> keras (*K, C, mult)
        kernel = weight.reshape(group, multiplier, *kernel_size)
        kernel = np.transpose(kernel, (*range(2, 2 + spatial), 0, 1))
    else:
        kernel = np.transpose(weight, (*range(2, 2 + spatial), 1, 0))  # OI* -> *IO
        layer = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)[spatial - 1](
            weight.shape[0], kernel_size, strides, dilation_rate=dilations,
            use_bias=bias is not None, kernel_initializer=_Given(kernel),
            bias_initializer=_given(bias), activation=activation, dtype=str(weight.dtype),
        )  # fmt: skip

    def call(layer, x):
        x = emitter.channels_last(x)
        if pads != [(0, 0)] * spatial and _same_padding(x, pads, kernel_size, strides, dilations):
            layer.padding = "same"  # padding inside the convolution: no padded copy of the input
        else:
            x = _zero_pad(emitter, x, pads)
        y = layer(x)
        if depthwise:  # DepthwiseConv takes no kernel_initializer of that name: assign
            assign(layer, kernel=kernel, bias=bias)
        return emitter.channels_first(y)

    sources = _weights(node.inputs[1], bias_value)
    return Native(layer, sources, [0], call=call, absorbs=absorbs)


@EMIT_LAYERS.register("ConvTranspose")
def conv_transpose_layer(emitter, node, args):
    """ConvTranspose -> keras ConvNDTranspose (groups 1), cropped to ONNX's pads."""
    conv = conv_weights(emitter, node)
    if conv is None or not keras_tensor(args[0]):
        return None
    weight, bias, bias_value, spatial = conv.weight, conv.bias, conv.bias_value, conv.spatial
    pads, strides, dilations = conv.pads, conv.strides, conv.dilations
    output_padding = list(conv.attrs.get("output_padding") or [0] * spatial)
    effective = [(k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilations)]
    if (
        conv.group != 1
        or conv.attrs.get("output_shape") is not None
        or any(p for p in output_padding)
        or any(k < s for k, s in zip(effective, strides))  # keras 'valid' pads those itself
        or (any(s > 1 for s in strides) and any(d > 1 for d in dilations))
    ):
        return None
    classes = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
               keras.layers.Conv3DTranspose)  # fmt: skip
    layer = classes[spatial - 1](
        weight.shape[1], tuple(weight.shape[2:]), tuple(strides), dilation_rate=tuple(dilations),
        use_bias=bias is not None, dtype=str(weight.dtype),
    )  # fmt: skip

    def call(layer, x):
        y = layer(emitter.channels_last(x))
        # ONNX (C_in, C_out, *K) -> keras (*K, C_out, C_in)
        assign(layer, kernel=np.transpose(weight, (*range(2, 2 + spatial), 1, 0)), bias=bias)
        if any(lo or hi for lo, hi in pads):
            cropping = (keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D)
            crop = pads[0] if spatial == 1 else tuple(pads)
            y = cropping[spatial - 1](crop, name=emitter.unique("crop"))(y)
        return emitter.channels_first(y)

    sources = _weights(node.inputs[1], bias_value)
    return Native(layer, sources, [0], call=call)


@EMIT_LAYERS.register("Gemm")
def gemm_layer(emitter, node, args):
    """Gemm with a constant B -> keras.layers.Dense (kernel [in, out])."""
    attrs = emitter.node_attributes(node)
    weight = emitter.weight(node.inputs[1])
    bias_value, bias, usable = optional_weight(emitter, node, 2)
    if (
        weight is None
        or weight.ndim != 2
        or not usable
        or attrs.get("transA", 0)
        or attrs.get("alpha", 1.0) != 1.0
        or not keras_tensor(args[0])
    ):
        return None
    kernel = weight.T if attrs.get("transB", 0) else weight
    if bias is not None and (attrs.get("beta", 1.0) != 1.0 or bias.size != kernel.shape[1]):
        return None
    activation, absorbs = _activation(emitter, node.outputs[0])
    return _dense(kernel, bias, node.inputs[1], bias_value, activation, absorbs)


@EMIT_LAYERS.register("MatMul")
def matmul_layer(emitter, node, args):
    """MatMul by a constant 2-D weight -> keras.layers.Dense, with the bias Add after it."""
    weight = emitter.weight(node.inputs[1])
    if (
        weight is None
        or weight.ndim != 2
        or not keras_tensor(args[0])
        or rank_of(node.inputs[0]) == 1
    ):
        return None
    add, bias_value = following_bias_add(emitter, node, weight.shape[1])
    bias = emitter.weight(bias_value) if bias_value is not None else None
    if bias is None or bias.shape != (weight.shape[1],):
        add = bias_value = bias = None  # a bias that is no weight stays an Add
    last = add if add is not None else node
    activation, absorbs = _activation(emitter, last.outputs[0])
    absorbs = ((add,) if add is not None else ()) + absorbs  # the Dense's now
    return _dense(weight, bias, node.inputs[1], bias_value, activation, absorbs)


def _dense(kernel, bias, kernel_value, bias_value, activation, absorbs):
    layer = keras.layers.Dense(
        kernel.shape[1], use_bias=bias is not None, dtype=str(kernel.dtype),
        kernel_initializer=_Given(kernel), bias_initializer=_given(bias), activation=activation,
    )  # fmt: skip
    sources = _weights(kernel_value, bias_value if bias is not None else None)
    return Native(layer, sources, [0], absorbs=absorbs)


@EMIT_LAYERS.register("BatchNormalization")
def batch_norm_layer(emitter, node, args):
    """BatchNormalization -> keras.layers.BatchNormalization over channels-last data."""
    attrs = emitter.node_attributes(node)
    arrays = [emitter.weight(v) for v in node.inputs[1:5]]
    rank = rank_of(node.inputs[0], args[0])
    # constant ones / zeros for scale / bias (a source BN without them): scale / center off
    scaled = not constant_fill(emitter, node.inputs[1], 1.0)
    centered = not constant_fill(emitter, node.inputs[2], 0.0)
    used = (scaled, centered, True, True)
    if (
        any(a is None for a, u in zip(arrays, used) if u)
        or attrs.get("training_mode", 0)
        or len(node.outputs) > 1
        or rank not in (2, 3, 4, 5)
        or not keras_tensor(args[0])
    ):
        return None
    scale, bias, mean, var = arrays
    # ONNX momentum weighs the running value, as Keras's does
    layer = keras.layers.BatchNormalization(
        axis=-1, momentum=attrs.get("momentum", 0.9), epsilon=attrs.get("epsilon", 1e-5),
        scale=scaled, center=centered,
        gamma_initializer=_given(scale, "ones"), beta_initializer=_given(bias),
        moving_mean_initializer=_Given(mean), moving_variance_initializer=_Given(var),
        dtype=str(mean.dtype),
    )  # fmt: skip
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    sources = {n: v for n, v, u in zip(names, node.inputs[1:5], used) if u}
    # placed by all four inputs, the constant ones / zeros too (as before the Native contract)
    path = emitter.source_prefix(node.inputs[1:5]) or emitter.scope_name(node)
    return Native(layer, sources, [0], call=_channels_last(emitter) if rank > 2 else None,
                  path=path)  # fmt: skip


@EMIT_LAYERS.register("LayerNormalization")
def layer_norm_layer(emitter, node, args):
    """LayerNormalization with weights of the normalized shape -> keras.layers.LayerNormalization."""
    attrs = emitter.node_attributes(node)
    scale = emitter.weight(node.inputs[1])
    bias_value, bias, usable = optional_weight(emitter, node, 2)
    rank = rank_of(node.inputs[0], args[0])
    if scale is None or not usable or len(node.outputs) > 1 or rank is None:
        return None
    if not keras_tensor(args[0]):
        return None
    axis = attrs.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    dims = tuple(args[0].shape)[axis:]
    if not all(isinstance(d, int) for d in dims) or tuple(dims) != scale.shape:
        return None
    layer = keras.layers.LayerNormalization(
        axis=list(range(axis, rank)) if axis < rank - 1 else -1,
        epsilon=attrs.get("epsilon", 1e-5), center=bias is not None, dtype=str(scale.dtype),
    )  # fmt: skip

    def call(layer, x):
        y = layer(x)
        assign(layer, gamma=scale, beta=bias)
        return y

    sources = _weights(node.inputs[1], bias_value, "gamma", "beta")
    return Native(layer, sources, [0], call=call)


@EMIT_LAYERS.register("Gather")
def embedding_layer(emitter, node, args):
    """Gather on a constant float table along axis 0 -> keras.layers.Embedding."""
    attrs = emitter.node_attributes(node)
    table = emitter.weight(node.inputs[0])
    if (
        table is None
        or table.ndim != 2
        or attrs.get("axis", 0) != 0
        or table.dtype.kind != "f"
        or not keras_tensor(args[1])
    ):
        return None
    layer = keras.layers.Embedding(table.shape[0], table.shape[1], dtype=str(table.dtype))

    def call(layer, indices):
        y = layer(indices)
        assign(layer, embeddings=table)
        return y

    return Native(layer, {"embeddings": node.inputs[0]}, [1], call=call)


@EMIT_LAYERS.register("Dropout")
def dropout_layer(emitter, node, args):
    """Dropout (mask unused, constant ratio) -> keras.layers.Dropout: drops only in training."""
    ratio = dropout_ratio(emitter, node)
    if ratio is None or not keras_tensor(args[0]):
        return None

    def call(layer, x):
        if id(x) in emitter.origin:  # elementwise: drop in the layout the input came out of
            source, perm = emitter.origin[id(x)]
            return emitter.transpose(layer(source), perm)
        return layer(x)

    layer = keras.layers.Dropout(ratio)
    return Native(layer, {}, [0], call=call, path=node.name or "dropout")


_POOLS = {
    "MaxPool": (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D),
    "AveragePool": (
        keras.layers.AveragePooling1D,
        keras.layers.AveragePooling2D,
        keras.layers.AveragePooling3D,
    ),
}


@EMIT_LAYERS.register("MaxPool")
@EMIT_LAYERS.register("AveragePool")
def pool_layer(emitter, node, args):
    """Unpadded MaxPool / AveragePool -> keras pooling layers over channels-last data."""
    attrs = emitter.node_attributes(node)
    rank = rank_of(node.inputs[0], args[0])
    if rank not in (3, 4, 5) or len(node.outputs) > 1 or not keras_tensor(args[0]):
        return None
    spatial = rank - 2
    kernel = tuple(attrs.get("kernel_shape") or ())
    pads = onnx_pads(attrs, spatial)
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
    layer = _POOLS[node.op_type][spatial - 1](kernel, strides)
    path = node.name or node.op_type.lower()
    return Native(layer, {}, [0], call=_channels_last(emitter), path=path)


@EMIT_LAYERS.register("GlobalAveragePool")
@EMIT_LAYERS.register("GlobalMaxPool")
def global_pool_layer(emitter, node, args):
    """GlobalAverage/MaxPool -> keras global pooling (keepdims) over channels-last data."""
    rank = rank_of(node.inputs[0], args[0])
    if rank not in (3, 4, 5) or not keras_tensor(args[0]):
        return None
    average = node.op_type == "GlobalAveragePool"
    classes = (
        (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
         keras.layers.GlobalAveragePooling3D) if average else
        (keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
         keras.layers.GlobalMaxPooling3D)
    )  # fmt: skip
    layer = classes[rank - 3](keepdims=True)
    path = node.name or "global_pool"
    return Native(layer, {}, [0], call=_channels_last(emitter), path=path)
