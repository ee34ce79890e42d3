"""Native nnx layers for ONNX nodes with constant weights (registered in `EMIT_LAYERS`).

Each builder is ``builder(emitter, node, args) -> interop.emitter.Native | None``: the
layer, its ``{layer attribute: node input}`` (the source weights it holds), the node
inputs it is called with, and the call adapting ONNX layout to Flax's; None lets the
generic op emit the node. Layout: ONNX convolutions are NCHW with OIHW kernels, Flax's
NHWC with HWIO kernels; the kernel is transposed once here and the activations around
each call, so the emitted module keeps the source's NCHW at its inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from interop.emitter import (
    ConvWeights,
    Native,
    constant_fill,
    conv_weights,
    dropout_ratio,
    following_bias_add,
    optional_weight,
    output_read,
)
from interop.weights import is_mapped

from . import EMIT_LAYERS

# (layer class, configuration) -> (graphdef, abstract state) of an abstract instance
_TEMPLATES: dict[str, tuple[Any, Any]] = {}


def _assemble(cls: type, arrays: dict[str, np.ndarray], **config: Any) -> Any:
    """``cls(**config)`` holding ``arrays`` as its variables, without its constructor per layer."""
    key = repr((cls.__qualname__, sorted(config.items())))
    return assemble(key, lambda: cls(**config, rngs=nnx.Rngs(0)), arrays)


def floating(dtype: Any) -> bool:
    """A float dtype, bfloat16 included (numpy gives ml_dtypes' bfloat16 the kind 'V')."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def owned(array: np.ndarray) -> np.ndarray:
    """A weight for ``jax.device_put`` that costs one copy at most, and none of a map.

    A weight mapped from disk (`interop.weights.host_array`, copy-on-write) is given to JAX as
    it is when contiguous: ``device_put`` on the CPU aliases a 64-byte aligned array (the
    buffer *is* the map, whose clean pages the kernel may drop and read again, as torch's
    parameters do) and copies any other once, and the map goes with the numpy array. A
    relaid weight (a kernel read through a Transpose) is copied here into a 64-byte aligned
    buffer that ``device_put`` aliases: one copy, not a staging copy and JAX's own, whose
    churn left ~0.2x of the weights in the heap at 1B parameters.
    """
    if not is_mapped(array) or array.flags.c_contiguous:
        return array
    raw = np.empty(array.nbytes + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


_ALIGN = 64  # what XLA's CPU client needs to alias a host buffer


def assemble(key: str, factory: Callable[[], Any], arrays: dict[str, np.ndarray]) -> Any:
    """``factory()`` holding ``arrays`` (by dotted state path) as its variables.

    The constructor runs once per configuration ``key``, abstractly (``nnx.eval_shape``: no
    random init, no arrays), and each layer is ``nnx.merge`` of that graphdef with the
    source arrays: ~3x cheaper than a constructor, whose per-attribute checks were most of
    a ResNet50's emission time. Variable types and paths are the constructor's. Arrays go
    through ``jax.device_put``, ~10x faster than ``jnp.asarray`` (which stages a primitive)
    with the same dtype canonicalization (float64 -> float32 without x64); they are fresh
    copies, never aliased by the graph.
    """
    if key not in _TEMPLATES:
        _TEMPLATES[key] = nnx.split(nnx.eval_shape(factory))
    graphdef, abstract_state = _TEMPLATES[key]
    state = jax.tree.map(lambda leaf: leaf, abstract_state)  # a copy to fill
    nested: dict[str, Any] = {}
    for path, expected in nnx.to_flat_state(abstract_state):
        name = ".".join(str(p) for p in path)
        array = arrays[name]
        if array.shape != expected.shape:
            raise ValueError(f"{key}: {name} {array.shape} != {expected.shape}")
        parent = nested
        for part in path[:-1]:
            parent = parent.setdefault(part, {})
        parent[path[-1]] = jax.device_put(owned(array))
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


def _channels_last(layer: Any, x: Any) -> Any:
    # NCHW in and out; the nnx layer runs NHWC (XLA cancels adjacent transposes)
    return jnp.moveaxis(layer(jnp.moveaxis(x, 1, -1)), -1, 1)


def _sources(node: Any, conv: ConvWeights) -> dict[str, Any]:
    return {"kernel": node.inputs[1]} | ({"bias": conv.bias_value} if conv.bias is not None else {})


@EMIT_LAYERS.register("Conv")
def conv_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """ONNX Conv with a constant kernel -> nnx.Conv (NHWC inside)."""
    conv = conv_weights(emitter, node)
    if conv is None:
        return None
    weight, bias = conv.weight, conv.bias
    kernel = np.transpose(weight, (*range(2, weight.ndim), 1, 0))
    layer = _assemble(
        nnx.Conv,
        {"kernel": kernel} | ({"bias": bias} if bias is not None else {}),
        in_features=weight.shape[1] * conv.group,
        out_features=weight.shape[0],
        kernel_size=tuple(weight.shape[2:]),
        strides=tuple(conv.strides),
        padding=tuple(conv.pads),
        kernel_dilation=tuple(conv.dilations),
        feature_group_count=conv.group,
        use_bias=bias is not None,
        param_dtype=weight.dtype,
    )
    return Native(layer, _sources(node, conv), [0], _channels_last)


@EMIT_LAYERS.register("ConvTranspose")
def conv_transpose_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """ONNX ConvTranspose (one group) -> nnx.ConvTranspose with transpose_kernel (NHWC inside)."""
    conv = conv_weights(emitter, node)
    if conv is None or conv.group != 1 or conv.attrs.get("output_shape") is not None:
        return None
    weight, bias = conv.weight, conv.bias
    kernel = weight.shape[2:]
    extra = list(conv.attrs.get("output_padding") or [0] * conv.spatial)
    # the padding of the equivalent dilated convolution (what lax.conv_transpose takes)
    padding = [
        (d * (k - 1) - lo, d * (k - 1) - hi + e)
        for (lo, hi), k, d, e in zip(conv.pads, kernel, conv.dilations, extra)
    ]
    layer = _assemble(
        nnx.ConvTranspose,
        {"kernel": np.transpose(weight, (*range(2, weight.ndim), 1, 0))}
        | ({"bias": bias} if bias is not None else {}),
        in_features=weight.shape[0],
        out_features=weight.shape[1],
        kernel_size=tuple(kernel),
        strides=tuple(conv.strides),
        padding=tuple(padding),
        kernel_dilation=tuple(conv.dilations),
        use_bias=bias is not None,
        transpose_kernel=True,
        param_dtype=weight.dtype,
    )
    return Native(layer, _sources(node, conv), [0], _channels_last)


def _linear(emitter: Any, kernel: np.ndarray, bias: np.ndarray | None) -> nnx.Linear:
    return _assemble(
        nnx.Linear,
        {"kernel": kernel} | ({"bias": bias} if bias is not None else {}),
        in_features=kernel.shape[0],
        out_features=kernel.shape[1],
        use_bias=bias is not None,
        param_dtype=kernel.dtype,
    )


# XLA's CPU dot computes half precision in float32: it converts the whole kernel first, a
# transient of 2x the kernel (0.25 GB for a 1B Llama's lm_head, 0.12x of its weights)
_BLOCK = 32 << 20  # bytes of float32 kernel converted at a time


def _linear_call(kernel: np.ndarray) -> Any:
    """``layer(x)``, or for a large half-precision kernel on the CPU, column blocks of it."""
    if kernel.dtype.itemsize != 2 or kernel.size * 4 <= _BLOCK or kernel.ndim != 2:
        return None
    return _blocked_linear


def _blocked_linear(layer: nnx.Linear, x: Any) -> Any:
    """``layer(x)`` over column blocks of the kernel: each output column is the same dot
    (bitwise), and the float32 copy XLA makes is one block's, not the kernel's."""
    kernel = layer.kernel[...]
    if jax.default_backend() != "cpu" or x.dtype != kernel.dtype or layer.dtype is not None:
        return layer(x)
    step = max(1, _BLOCK // (4 * kernel.shape[0]))
    blocks = [
        layer.dot_general(
            x, kernel[:, i : i + step], (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision
        )
        for i in range(0, kernel.shape[1], step)
    ]
    y = jnp.concatenate(blocks, axis=-1)
    return y if layer.bias is None else y + layer.bias[...]


@EMIT_LAYERS.register("Gemm")
def gemm_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """ONNX Gemm with a constant B -> nnx.Linear (kernel [in, out], i.e. B or B^T)."""
    attrs = emitter.node_attributes(node)
    weight = emitter.weight(node.inputs[1])
    bias_value, bias, ok = optional_weight(emitter, node, 2)
    if weight is None or weight.ndim != 2 or not floating(weight.dtype) or not ok:
        return None
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        return None
    kernel = weight.T if attrs.get("transB", 0) else weight
    if bias is not None and (attrs.get("beta", 1.0) != 1.0 or bias.shape != (kernel.shape[1],)):
        return None
    sources = {"kernel": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return Native(_linear(emitter, kernel, bias), sources, [0], _linear_call(kernel))


@EMIT_LAYERS.register("MatMul")
def matmul_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """ONNX MatMul with a constant 2-D right operand -> nnx.Linear; a bias the exporter adds
    right after it (MatMul -> Add of a [out] weight) is the layer's bias."""
    weight = emitter.weight(node.inputs[1])
    if weight is None or weight.ndim != 2 or not floating(weight.dtype):
        return None
    add, bias_value = following_bias_add(emitter, node, weight.shape[1])
    bias = emitter.weight(bias_value) if bias_value is not None else None
    if bias is None or bias.dtype != weight.dtype:
        call = _linear_call(weight)
        return Native(_linear(emitter, weight, None), {"kernel": node.inputs[1]}, [0], call)
    sources = {"kernel": node.inputs[1], "bias": bias_value}
    return Native(_linear(emitter, weight, bias), sources, [0], _linear_call(weight), absorbs=[add])


@EMIT_LAYERS.register("BatchNormalization")
def batch_norm_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """Inference-form BatchNormalization -> nnx.BatchNorm on axis 1 (ONNX momentum = Flax's)."""
    attrs = emitter.node_attributes(node)
    tensors = [emitter.weight(v) for v in node.inputs[1:5]]
    # constant ones / zeros for scale / bias (a source BN without them): use_scale / use_bias off
    used = (
        not constant_fill(emitter, node.inputs[1], 1.0),
        not constant_fill(emitter, node.inputs[2], 0.0),
        True,
        True,
    )
    if attrs.get("training_mode", 0) or any(
        t is None or t.ndim != 1 for t, u in zip(tensors, used) if u
    ):
        return None
    if len(node.outputs) > 1 or not floating(tensors[2].dtype):
        return None
    names = ("scale", "bias", "mean", "var")
    arrays = {n: t for n, t, u in zip(names, tensors, used) if u}
    layer = _assemble(
        nnx.BatchNorm,
        arrays,
        num_features=tensors[2].shape[0],
        use_running_average=True,
        use_scale=used[0],
        use_bias=used[1],
        axis=1,
        momentum=attrs.get("momentum", 0.9),
        epsilon=attrs.get("epsilon", 1e-5),
        use_fast_variance=False,
        param_dtype=tensors[2].dtype,
    )
    sources = {n: v for n, v, u in zip(names, node.inputs[1:5], used) if u}
    return Native(layer, sources, [0])


@EMIT_LAYERS.register("LayerNormalization")
def layer_norm_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """LayerNormalization over the last axis -> nnx.LayerNorm."""
    attrs = emitter.node_attributes(node)
    scale = emitter.weight(node.inputs[1])
    bias_value, bias, ok = optional_weight(emitter, node, 2)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    axis = attrs.get("axis", -1)
    if scale is None or not ok or scale.ndim != 1 or rank is None or axis not in (-1, rank - 1):
        return None
    if any(output_read(v) for v in node.outputs[1:]):
        return None
    layer = _assemble(
        nnx.LayerNorm,
        {"scale": scale} | ({"bias": bias} if bias is not None else {}),
        num_features=scale.shape[0],
        epsilon=attrs.get("epsilon", 1e-5),
        use_bias=bias is not None,
        use_fast_variance=False,
        param_dtype=scale.dtype,
    )
    sources = {"scale": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return Native(layer, sources, [0])


@EMIT_LAYERS.register("Gather")
def embedding_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """Gather (axis 0) on a constant float table -> nnx.Embed."""
    table = emitter.weight(node.inputs[0])
    if table is None or table.ndim != 2 or not floating(table.dtype):
        return None
    if emitter.node_attributes(node).get("axis", 0) != 0:
        return None
    layer = _assemble(
        nnx.Embed,
        {"embedding": table},
        num_embeddings=table.shape[0],
        features=table.shape[1],
        param_dtype=table.dtype,
    )
    return Native(layer, {"embedding": node.inputs[0]}, [1], _embed)


def _embed(layer: Any, indices: Any) -> Any:
    # ONNX allows negative indices; nnx.Embed expects integer indices in range
    indices = jnp.asarray(indices)
    return layer(jnp.where(indices < 0, indices + layer.num_embeddings, indices))


@EMIT_LAYERS.register("Dropout")
def dropout_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """Dropout without a mask output -> nnx.Dropout (drops in train(), identity in eval())."""
    ratio = dropout_ratio(emitter, node)
    if ratio is None:
        return None
    return Native(nnx.Dropout(ratio, deterministic=True, rngs=emitter.rngs), {}, [0])
