"""Native torch layers for ONNX nodes with constant weights (registered in emitter.LAYERS).

Each builder gets the emitter and the node and returns ``(layer, {layer attribute:
source initializer}, indices of the node inputs the layer is called with)``, or None to
let the generic op emit the node (weights that are not constants, unusual attributes).
Weight orientation (Gemm's transB, MatMul's [in, out]) and ONNX->torch conventions
(BatchNorm momentum) are handled here only.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import torch
from torch import _VF, nn

from interop.emitter import is_constant_fill
from interop.normalize import schema_defaults
from interop.packing import PACKED_FROM

from .emitter import LAYERS


def _attributes(emitter: Any, node: Any) -> dict[str, Any]:
    values, _ = emitter.attributes(node)
    return values


def _empty(layer_class: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """A layer with uninitialised storage: its weights are assigned right after.

    Initialising first would touch every page of every weight only to overwrite it,
    which for a 2 GB model is a second copy of the weights in memory.
    """
    layer = torch.nn.utils.skip_init(layer_class, *args, **kwargs)
    for name, buffer in layer.named_buffers():
        if name.endswith("num_batches_tracked"):
            buffer.zero_()
    return layer


def _assign(layer: nn.Module, **tensors: torch.Tensor | None) -> nn.Module:
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        current = getattr(layer, name)
        if isinstance(current, nn.Parameter):
            setattr(layer, name, nn.Parameter(tensor.to(current.dtype).reshape(current.shape)))
        else:
            current.copy_(tensor.reshape(current.shape))
    return layer


def _symmetric_pads(pads: Any, count: int) -> list[int] | None:
    if not pads:
        return [0] * count
    begins, ends = list(pads[:count]), list(pads[count:])
    return begins if begins == ends else None


def _zero_constant(emitter: Any, value: Any) -> bool:
    static = emitter.static.get(value) if value is not None else None
    return static is not None and not np.any(static)


@LAYERS.register("Conv")
def conv_layer(emitter: Any, node: Any) -> Any:
    weight = emitter.weight(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if _zero_constant(emitter, bias_value):  # exporters spell "no bias" as a zero constant
        bias_value = None
    bias = emitter.weight(bias_value) if bias_value is not None else None
    if weight is None or (bias_value is not None and bias is None) or not 3 <= weight.dim() <= 5:
        return None
    attrs = _attributes(emitter, node)
    spatial = weight.dim() - 2
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    pads = list(attrs.get("pads") or [0] * (2 * spatial))
    padding = [min(lo, hi) for lo, hi in zip(pads[:spatial], pads[spatial:])]
    # what torch's symmetric padding leaves: TensorFlow's SAME at stride 2 pads (0, 1)
    extra = [
        (lo - both, hi - both) for lo, hi, both in zip(pads[:spatial], pads[spatial:], padding)
    ]
    group = attrs.get("group", 1)
    if any(lo or hi for lo, hi in extra):
        layer_class = (PaddedConv1d, PaddedConv2d, PaddedConv3d)[spatial - 1]
    else:
        layer_class = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial - 1]
    layer = _empty(
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
    return _assign(layer, weight=weight, bias=bias), sources, [0]


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


@LAYERS.register("ConvTranspose")
def conv_transpose_layer(emitter: Any, node: Any) -> Any:
    weight = emitter.weight(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = emitter.weight(bias_value) if bias_value is not None else None
    if weight is None or (bias_value is not None and bias is None) or not 3 <= weight.dim() <= 5:
        return None
    attrs = _attributes(emitter, node)
    spatial = weight.dim() - 2
    padding = _symmetric_pads(attrs.get("pads"), spatial)
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
    layer = _empty(
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
    return _assign(layer, weight=weight, bias=bias), sources, [0]


@LAYERS.register("Gemm")
def gemm_layer(emitter: Any, node: Any) -> Any:
    attrs = _attributes(emitter, node)
    # nn.Linear holds Gemm's B as is under transB=1, else its transpose (then not shared)
    weight = emitter.weight(node.inputs[1], shared=bool(attrs.get("transB", 0)))
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
    layer = _empty(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    sources = {"weight": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return _assign(layer, weight=weight, bias=bias), sources, [0]


@LAYERS.register("MatMul")
def matmul_layer(emitter: Any, node: Any) -> Any:
    weight = emitter.weight(node.inputs[1], shared=False)  # nn.Linear holds its transpose
    if weight is None or weight.dim() != 2:
        return None
    sources = {"weight": node.inputs[1]}
    # the exporters' MatMul + Add of a bias weight is one nn.Linear (one addmm kernel)
    add, bias_value = _bias_add(emitter, node, weight.shape[1]) or (None, None)
    bias = emitter.weight(bias_value) if bias_value is not None else None
    layer = _empty(nn.Linear, weight.shape[0], weight.shape[1], bias=bias is not None)
    if bias is not None:
        sources["bias"] = bias_value
        emitter.absorbed[node] = [add]
    return _assign(layer, weight=weight.t().contiguous(), bias=bias), sources, [0]


def _bias_add(emitter: Any, node: Any, features: int) -> tuple[Any, Any] | None:
    """(Add node, bias value) when a matmul's only reader adds a constant [features] vector."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    bias = add.inputs[1 - index]
    array = emitter.static.get(bias) if bias is not None else None
    if array is None and bias is not None and bias.const_value is not None:
        array = bias.const_value.numpy()
    if (
        array is None
        or array.ndim != 1
        or array.shape[0] != features
        or bias.dtype != node.inputs[0].dtype
        or bias in emitter.graph.inputs
    ):
        return None
    return add, bias


def _input_rank(value: Any) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


@LAYERS.register("BatchNormalization")
def batch_norm_layer(emitter: Any, node: Any) -> Any:
    attrs = _attributes(emitter, node)
    tensors = [emitter.weight(v) for v in node.inputs[1:5]]
    rank = _input_rank(node.inputs[0])
    # constant ones and zeros for scale and bias (a source BN without them): affine=False
    affine = not (
        _constant_fill(emitter, node.inputs[1], 1) and _constant_fill(emitter, node.inputs[2], 0)
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
    layer = _empty(
        layer_class,
        mean.numel(),
        eps=attrs.get("epsilon", 1e-5),
        # the float32 attribute's 0.9 is 0.89999998: torch's 0.1, not 0.10000002
        momentum=round(1.0 - attrs.get("momentum", 0.9), 6),
        affine=affine,
    )
    if not affine:
        _assign(layer, running_mean=mean, running_var=var)
        return layer, {"running_mean": node.inputs[3], "running_var": node.inputs[4]}, [0]
    _assign(layer, weight=scale, bias=bias, running_mean=mean, running_var=var)
    names = ("weight", "bias", "running_mean", "running_var")
    return layer, dict(zip(names, node.inputs[1:5], strict=True)), [0]


def _constant_fill(emitter: Any, value: Any, fill: float) -> bool:
    """A constant (not a weight) input whose every element is `fill`."""
    return emitter.weight(value) is None and is_constant_fill(value, fill, emitter.static)


@LAYERS.register("LayerNormalization")
def layer_norm_layer(emitter: Any, node: Any) -> Any:
    attrs = _attributes(emitter, node)
    scale = emitter.weight(node.inputs[1])
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = emitter.weight(bias_value) if bias_value is not None else None
    rank = _input_rank(node.inputs[0])
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
    layer = _empty(nn.LayerNorm, tuple(dims), eps=attrs.get("epsilon", 1e-5), bias=bias is not None)
    sources = {"weight": node.inputs[1]} | ({"bias": bias_value} if bias is not None else {})
    return _assign(layer, weight=scale, bias=bias), sources, [0]


@LAYERS.register("Gather")
def embedding_layer(emitter: Any, node: Any) -> Any:
    attrs = _attributes(emitter, node)
    table = emitter.weight(node.inputs[0])
    if (
        table is None
        or table.dim() != 2
        or attrs.get("axis", 0) != 0
        or not table.is_floating_point()
    ):
        return None
    layer = _assign(_empty(nn.Embedding, table.shape[0], table.shape[1]), weight=table)
    return layer, {"weight": node.inputs[0]}, [1]


@LAYERS.register("Dropout")
def dropout_layer(emitter: Any, node: Any) -> Any:
    # nn.Dropout drops in train() and is the identity in eval(): the mask output is not emitted
    if len(node.outputs) > 1 and (node.outputs[1].uses() or node.outputs[1].is_graph_output()):
        return None
    ratio_value = node.inputs[1] if len(node.inputs) > 1 else None
    if ratio_value is not None and ratio_value not in emitter.static:
        return None
    ratio = (
        0.5
        if ratio_value is None
        else float(np.asarray(emitter.static[ratio_value]).reshape(-1)[0])
    )
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return None  # an explicit training_mode input: keep ONNX's meaning
    return nn.Dropout(ratio), {}, [0]


# ------------------------------------------------------------------ direct torch calls
_GATE_ORDER = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}
_TORCH_RECURRENT = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


class _NodeOutputs:
    """Mixin: forward takes the ONNX node's (X, initial_h[, initial_c]) and returns its outputs.

    ONNX Y is [seq, directions, batch, hidden] ([batch, seq, directions, hidden] with
    layout=1), torch's output [seq, batch, directions * hidden]; states are [directions,
    batch, hidden] ([batch, directions, hidden] with layout=1) in both.
    """

    returns_node_outputs = True
    onnx_layout = 0
    onnx_outputs = 2

    def forward(self, x, initial_h=None, initial_c=None, layer=None):
        if self.onnx_layout:
            x = x.transpose(0, 1)
            initial_h = None if initial_h is None else initial_h.transpose(0, 1)
            initial_c = None if initial_c is None else initial_c.transpose(0, 1)
        directions = 2 if self.bidirectional else 1
        if layer is not None and initial_h is None:  # _VF needs explicit states
            initial_h = x.new_zeros(directions, x.shape[1], self.hidden_size)
        if isinstance(self, nn.LSTM) and (initial_h is not None or initial_c is not None):
            zeros = torch.zeros_like(initial_h if initial_c is None else initial_c)
            state = (
                zeros if initial_h is None else initial_h,
                zeros if initial_c is None else initial_c,
            )
        else:
            state = initial_h
        if layer is None:
            y, states = super().forward(x, state)  # type: ignore[misc]
        else:
            y, states = self._run_layer(x, state, layer)
        states = states if isinstance(states, tuple) else (states,)
        y = y.reshape(y.shape[0], y.shape[1], directions, self.hidden_size)
        y = y.permute(1, 0, 2, 3) if self.onnx_layout else y.permute(0, 2, 1, 3)
        if self.onnx_layout:
            states = tuple(s.transpose(0, 1) for s in states)
        return (y, *states)[: self.onnx_outputs]

    def _run_layer(self, x, state, layer):
        """One layer of a stack: an ONNX node holds one layer of the source's nn.LSTM."""
        per_layer = (4 if self.bias else 2) * (2 if self.bidirectional else 1)
        weights = self._flat_weights[layer * per_layer : (layer + 1) * per_layer]
        args = (weights, self.bias, 1, 0.0, self.training, self.bidirectional, False)
        if isinstance(self, nn.LSTM):
            y, h, c = _VF.lstm(x, state, *args)
            return y, (h, c)
        if isinstance(self, nn.GRU):
            return _VF.gru(x, state, *args)
        run = _VF.rnn_tanh if self.nonlinearity == "tanh" else _VF.rnn_relu
        return run(x, state, *args)


class OnnxLSTM(_NodeOutputs, nn.LSTM):
    """nn.LSTM called and answering like an ONNX LSTM node."""


class OnnxGRU(_NodeOutputs, nn.GRU):
    """nn.GRU called and answering like an ONNX GRU node (linear_before_reset=1)."""


class OnnxRNN(_NodeOutputs, nn.RNN):
    """nn.RNN called and answering like an ONNX RNN node."""


_ONNX_RECURRENT = {"LSTM": OnnxLSTM, "GRU": OnnxGRU, "RNN": OnnxRNN}


def _absent(node: Any, index: int) -> bool:
    return len(node.inputs) <= index or node.inputs[index] is None


def _gates(tensor: torch.Tensor, op_type: str) -> torch.Tensor:
    """A direction's stacked gate blocks reordered from ONNX's to torch's gate order."""
    order = _GATE_ORDER[op_type]
    blocks = tensor.reshape(len(order), -1, *tensor.shape[1:])
    return blocks[order].reshape(tensor.shape)


def recurrent_layer(emitter: Any, node: Any) -> Any:
    """ONNX LSTM/GRU/RNN with constant weights and torch-expressible attributes -> nn.LSTM/GRU/RNN."""
    op_type = node.op_type
    attrs = _attributes(emitter, node)
    # torch holds each direction's gates reordered: a weight read elsewhere stays generic
    weights = [emitter.weight(node.inputs[i], shared=False) for i in (1, 2)]
    bias = None if _absent(node, 3) else emitter.weight(node.inputs[3], shared=False)
    activations = list(attrs.get("activations") or [])
    nonlinearity = "tanh"
    if op_type == "RNN":
        nonlinearity = (activations or ["Tanh"])[0].lower()
        activations = []
    default_activations = _DEFAULT_ACTIVATIONS.get(op_type, [])
    direction = attrs.get("direction", "forward")
    if (
        any(w is None for w in weights)
        or (not _absent(node, 3) and bias is None)
        or not _absent(node, 4)  # sequence_lens: per-batch lengths torch's layers cannot take
        or (op_type == "LSTM" and not _absent(node, 7))  # peepholes
        or nonlinearity not in ("tanh", "relu")
        or activations not in ([], default_activations, default_activations * 2)
        or attrs.get("activation_alpha")
        or attrs.get("activation_beta")
        or attrs.get("clip") is not None
        or attrs.get("input_forget", 0)
        or (op_type == "GRU" and not attrs.get("linear_before_reset", 0))
        or direction not in ("forward", "bidirectional")
    ):
        return None
    w, r = weights
    directions, gate_rows, input_size = w.shape
    hidden = r.shape[-1]
    extra = {"nonlinearity": nonlinearity} if op_type == "RNN" else {}
    options = {"bias": bias is not None, "bidirectional": direction == "bidirectional", **extra}
    stack = _source_stack(emitter, node)
    index, path, kwargs = 0, None, {}
    if stack is not None:  # one layer of a multi-layer source module: one module for all
        path, index, layers = stack
        layer = emitter.recurrent_stacks.get(path)
        if layer is None:
            layer = _ONNX_RECURRENT[op_type](input_size, hidden, num_layers=layers, **options)
            emitter.recurrent_stacks[path] = layer
        elif layer.hidden_size != hidden or layer.bidirectional != options["bidirectional"]:
            return None  # not one module after all
        kwargs = {"layer": index} if layers > 1 else {}
    else:  # its subclass hides the device arg skip_init needs
        layer = _ONNX_RECURRENT[op_type](input_size, hidden, **options)
    layer.onnx_layout = attrs.get("layout", 0)
    layer.onnx_outputs = len(node.outputs)
    sources = {}
    for d, suffix in enumerate([f"_l{index}", f"_l{index}_reverse"][:directions]):
        tensors = {"weight_ih": w[d], "weight_hh": r[d]}
        if bias is not None:
            tensors |= {"bias_ih": bias[d, :gate_rows], "bias_hh": bias[d, gate_rows:]}
        for name, tensor in tensors.items():
            _assign(layer, **{name + suffix: _gates(tensor, op_type)})
            sources[name + suffix] = node.inputs[{"weight_ih": 1, "weight_hh": 2}.get(name, 3)]
    data_inputs = [i for i in (0, 5, 6)[: 3 if op_type == "LSTM" else 2] if i < len(node.inputs)]
    return layer, sources, data_inputs, {"path": path, "kwargs": kwargs}


# torch's names for one layer's weights: lstm.weight_ih_l1, lstm.bias_hh_l0_reverse
_TORCH_WEIGHT = re.compile(
    r"^(?P<path>.+)\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(?P<layer>\d+)(_reverse)?$"
)


def _packed_layer(node: Any) -> tuple[str, int] | None:
    """(module path, layer index) when the node's weights were packed from one torch layer."""
    names = []
    for index in (1, 2, 3):
        if not _absent(node, index):
            raw = node.inputs[index].metadata_props.get(PACKED_FROM)
            if raw is None:
                return None
            names += json.loads(raw)
    matches = [_TORCH_WEIGHT.match(name) for name in names]
    found = {(m["path"], int(m["layer"])) for m in matches if m is not None}
    return found.pop() if len(found) == 1 and all(matches) else None


def _source_stack(emitter: Any, node: Any) -> tuple[str, int, int] | None:
    """(path, layer index, layer count) when the node is one layer of a multi-layer module.

    A torch nn.LSTM(num_layers=2) exports one ONNX LSTM per layer; giving them one
    nn.LSTM(num_layers=2) keeps the source's parameter names (lstm.weight_ih_l1). Every
    layer of the source must be here, as a native-compatible node of the same op.
    """
    own = _packed_layer(node)
    if own is None:
        return None
    path = own[0]
    indices = sorted(
        found[1]
        for other in emitter.graph
        if other.op_type == node.op_type and (found := _packed_layer(other)) and found[0] == path
    )
    if indices != list(range(len(indices))):
        return None  # a layer is missing (not native): one module per node
    return path, own[1], len(indices)


for _op_type in _ONNX_RECURRENT:
    LAYERS.register(_op_type, recurrent_layer)


__all__ = ["schema_defaults"]
