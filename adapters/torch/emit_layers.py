"""Native torch layers for ONNX nodes with constant weights (registered in `EMIT_LAYERS`).

Each builder is ``builder(emitter, node, args)`` and returns an `interop.emitter.Native`
(the layer, ``{layer attribute: source initializer}``, the node inputs the layer is
called with), or None to let the generic op emit the node (weights that are not
constants, unusual attributes). Weight orientation (Gemm's transB, MatMul's [in, out])
and ONNX->torch conventions (BatchNorm momentum) are handled here only. The recurrent
layers are in emit_recurrent.py.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from interop.emitter import (
    Native,
    constant_fill,
    dropout_ratio,
    following_bias_add,
    onnx_pads,
    optional_weight,
)

from . import EMIT_LAYERS


def empty_layer(layer_class: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """A layer with uninitialised storage: its weights are assigned right after.

    Initialising first would touch every page of every weight only to overwrite it,
    which for a 2 GB model is a second copy of the weights in memory.
    """
    layer = torch.nn.utils.skip_init(layer_class, *args, **kwargs)
    for name, buffer in layer.named_buffers():
        if name.endswith("num_batches_tracked"):
            buffer.zero_()
    return layer


_HALF = (torch.float16, torch.bfloat16)


def assign(layer: nn.Module, **tensors: torch.Tensor | None) -> nn.Module:
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        current = getattr(layer, name)
        # half-precision weights (an fp16 file) stay half: the layer computes in their dtype
        dtype = tensor.dtype if tensor.dtype in _HALF else current.dtype
        if isinstance(current, nn.Parameter):
            setattr(layer, name, nn.Parameter(tensor.to(dtype).reshape(current.shape)))
        elif dtype != current.dtype:
            setattr(layer, name, tensor.reshape(current.shape).clone())  # the buffer, replaced
        else:
            current.copy_(tensor.reshape(current.shape))
    return layer


def symmetric_pads(pads: Any, count: int) -> list[int] | None:
    """torch's `padding` for ONNX ``pads``: the begins, where they equal the ends; else None."""
    if not pads:
        return [0] * count
    begins, ends = list(pads[:count]), list(pads[count:])
    return begins if begins == ends else None


@EMIT_LAYERS.register("Conv")
def conv_layer(emitter: Any, node: Any, args: list) -> Native | None:
    weight = emitter.weight(node.inputs[1])
    # absent, or a zero constant (how exporters spell "no bias"): no bias
    bias_value, bias, usable = optional_weight(emitter, node, 2)
    if weight is None or not usable or not 3 <= weight.dim() <= 5:
        return None
    attrs = emitter.node_attributes(node)
    spatial = weight.dim() - 2
    pairs = onnx_pads(attrs, spatial)
    if pairs is None:
        return None
    padding = [min(lo, hi) for lo, hi in pairs]
    # what torch's symmetric padding leaves: TensorFlow's SAME at stride 2 pads (0, 1)
    extra = [(lo - both, hi - both) for (lo, hi), both in zip(pairs, padding)]
    group = attrs.get("group", 1)
    if any(lo or hi for lo, hi in extra):
        layer_class = (PaddedConv1d, PaddedConv2d, PaddedConv3d)[spatial - 1]
    else:
        layer_class = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]
    layer = empty_layer(
        layer_class,
        weight.shape[1] * group,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=tuple(attrs.get("strides") or [1] * spatial),
        padding=tuple(padding),
        dilation=tuple(attrs.get("dilations") or [1] * spatial),
        groups=group,
        bias=bias is not None,
    )
    if isinstance(layer, _ExtraPads):
        # F.pad takes the last dim first: (w_lo, w_hi, h_lo, h_hi, ...)
        layer.extra_pads = tuple(p for lo_hi in reversed(extra) for p in lo_hi)
    sources = {"weight": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return Native(assign(layer, weight=weight, bias=bias), sources)


class _ExtraPads:
    """A convolution that zero-pads one side more than the other first (asymmetric ONNX pads,
    which torch's `padding` cannot say); weights and state dict are the plain layer's."""

    extra_pads: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.pad(x, self.extra_pads))  # type: ignore[misc]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, extra_pads={self.extra_pads}"  # type: ignore[misc]


class PaddedConv1d(_ExtraPads, nn.Conv1d):
    pass


class PaddedConv2d(_ExtraPads, nn.Conv2d):
    pass


class PaddedConv3d(_ExtraPads, nn.Conv3d):
    pass


@EMIT_LAYERS.register("ConvTranspose")
def conv_transpose_layer(emitter: Any, node: Any, args: list) -> Native | None:
    weight = emitter.weight(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = emitter.weight(bias_value) if bias_value is not None else None
    if weight is None or (bias_value is not None and bias is None) or not 3 <= weight.dim() <= 5:
        return None
    attrs = emitter.node_attributes(node)
    spatial = weight.dim() - 2
    padding = symmetric_pads(attrs.get("pads"), spatial)
    if (
        attrs.get("auto_pad", "NOTSET") != "NOTSET"
        or padding is None
        or attrs.get("output_shape") is not None
    ):
        return None
    group = attrs.get("group", 1)
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    output_padding = list(attrs.get("output_padding") or [0] * spatial)
    if any(p >= s and p >= d for p, s, d in zip(output_padding, strides, dilations, strict=False)):
        return None
    layer_class = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial - 1]
    layer = empty_layer(
        layer_class,
        weight.shape[0],
        weight.shape[1] * group,
        tuple(weight.shape[2:]),
        stride=tuple(strides),
        padding=tuple(padding),
        output_padding=tuple(output_padding),
        groups=group,
        bias=bias is not None,
        dilation=tuple(dilations),
    )
    sources = {"weight": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return Native(assign(layer, weight=weight, bias=bias), sources)


@EMIT_LAYERS.register("Gemm")
def gemm_layer(emitter: Any, node: Any, args: list) -> Native | None:
    attrs = emitter.node_attributes(node)
    # nn.Linear holds Gemm's B as is under transB=1, else its transpose (then not shared)
    weight = emitter.weight(node.inputs[1], relaid=not attrs.get("transB", 0))
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = emitter.weight(bias_value) if bias_value is not None else None
    if (
        weight is None
        or weight.dim() != 2
        or attrs.get("transA", 0)
        or attrs.get("alpha", 1.0) != 1.0
    ):
        return None
    if bias_value is not None and (
        bias is None
        or attrs.get("beta", 1.0) != 1.0
        or bias.numel() != weight.shape[0 if attrs.get("transB", 0) else 1]
    ):
        return None
    # nn.Linear keeps weight as [out, in], which is Gemm's B under transB=1
    weight = weight if attrs.get("transB", 0) else weight.t().contiguous()
    layer = empty_layer(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    sources = {"weight": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return Native(assign(layer, weight=weight, bias=bias), sources)


@EMIT_LAYERS.register("MatMul")
def matmul_layer(emitter: Any, node: Any, args: list) -> Native | None:
    weight = emitter.weight(node.inputs[1], relaid=True)  # nn.Linear holds its transpose
    if weight is None or weight.dim() != 2:
        return None
    sources = {"weight": node.inputs[1]}
    # the exporters' MatMul + Add of a bias weight is one nn.Linear (one addmm kernel)
    add, bias_value = following_bias_add(emitter, node, weight.shape[1])
    bias = emitter.weight(bias_value) if bias_value is not None else None
    layer = empty_layer(nn.Linear, weight.shape[0], weight.shape[1], bias=bias is not None)
    absorbs = []
    if bias is not None:
        sources["bias"] = bias_value
        absorbs = [add]
    layer = assign(layer, weight=weight.t().contiguous(), bias=bias)
    return Native(layer, sources, absorbs=absorbs)


def input_rank(value: Any) -> int | None:
    """The rank of a value's declared shape; None when unknown."""
    return len(value.shape) if value is not None and value.shape is not None else None


@EMIT_LAYERS.register("BatchNormalization")
def batch_norm_layer(emitter: Any, node: Any, args: list) -> Native | None:
    attrs = emitter.node_attributes(node)
    tensors = [emitter.weight(v) for v in node.inputs[1:5]]
    rank = input_rank(node.inputs[0])
    # constant ones and zeros for scale and bias (a source BN without them): affine=False
    affine = not (
        constant_fill(emitter, node.inputs[1], 1) and constant_fill(emitter, node.inputs[2], 0)
    )
    if not affine:
        tensors[:2] = [torch.ones(0), torch.zeros(0)]
    if (
        any(t is None for t in tensors)
        or attrs.get("training_mode", 0)
        or len(node.outputs) > 1
        or rank not in (2, 3, 4, 5)
    ):
        return None
    scale, bias, mean, var = tensors
    layer_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    # ONNX keeps `momentum` of the running value; torch the weight of the new batch statistic
    layer = empty_layer(
        layer_class,
        mean.numel(),
        eps=attrs.get("epsilon", 1e-5),
        # the float32 attribute's 0.9 is 0.89999998: torch's 0.1, not 0.10000002
        momentum=round(1.0 - attrs.get("momentum", 0.9), 6),
        affine=affine,
    )
    if not affine:
        assign(layer, running_mean=mean, running_var=var)
        return Native(layer, {"running_mean": node.inputs[3], "running_var": node.inputs[4]})
    assign(layer, weight=scale, bias=bias, running_mean=mean, running_var=var)
    names = ("weight", "bias", "running_mean", "running_var")
    return Native(layer, dict(zip(names, node.inputs[1:5], strict=True)))


@EMIT_LAYERS.register("LayerNormalization")
def layer_norm_layer(emitter: Any, node: Any, args: list) -> Native | None:
    attrs = emitter.node_attributes(node)
    scale = emitter.weight(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = emitter.weight(bias_value) if bias_value is not None else None
    rank = input_rank(node.inputs[0])
    if (
        scale is None
        or (bias_value is not None and bias is None)
        or len(node.outputs) > 1
        or rank is None
    ):
        return None
    axis = attrs.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    dims = node.inputs[0].shape[axis:]
    if not all(isinstance(d, int) for d in dims) or tuple(dims) != tuple(scale.shape):
        return None
    layer = empty_layer(
        nn.LayerNorm, tuple(dims), eps=attrs.get("epsilon", 1e-5), bias=bias is not None
    )
    sources = {"weight": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return Native(assign(layer, weight=scale, bias=bias), sources)


@EMIT_LAYERS.register("Gather")
def embedding_layer(emitter: Any, node: Any, args: list) -> Native | None:
    attrs = emitter.node_attributes(node)
    table = emitter.weight(node.inputs[0])
    if (
        table is None
        or table.dim() != 2
        or attrs.get("axis", 0) != 0
        or not table.is_floating_point()
    ):
        return None
    layer = assign(empty_layer(nn.Embedding, table.shape[0], table.shape[1]), weight=table)
    return Native(layer, {"weight": node.inputs[0]}, [1])


@EMIT_LAYERS.register("Dropout")
def dropout_layer(emitter: Any, node: Any, args: list) -> Native | None:
    # nn.Dropout drops in train() and is the identity in eval(): the mask output is not emitted
    ratio = dropout_ratio(emitter, node)
    return None if ratio is None else Native(nn.Dropout(ratio), {})
