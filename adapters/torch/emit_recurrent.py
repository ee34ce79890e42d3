"""Native recurrent layers: ONNX LSTM / GRU / RNN nodes as nn.LSTM / nn.GRU / nn.RNN.

Registered in `EMIT_LAYERS` like the other layer builders (emit_layers.py). The layer
classes (`OnnxLSTM`, ...) are torch's own, called and answering like the ONNX node
(`NodeOutputs`), so their state dict is the source's; the layers of a multi-layer source
module (one ONNX node per layer) become one module again (`source_stack`).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from torch import _VF, nn

from interop import provenance
from interop.emitter import Native

from . import EMIT_LAYERS
from .emit_layers import assign

_GATE_ORDER = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}
_TORCH_RECURRENT = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}


class NodeOutputs:
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


class OnnxLSTM(NodeOutputs, nn.LSTM):
    """nn.LSTM called and answering like an ONNX LSTM node."""


class OnnxGRU(NodeOutputs, nn.GRU):
    """nn.GRU called and answering like an ONNX GRU node (linear_before_reset=1)."""


class OnnxRNN(NodeOutputs, nn.RNN):
    """nn.RNN called and answering like an ONNX RNN node."""


_ONNX_RECURRENT = {"LSTM": OnnxLSTM, "GRU": OnnxGRU, "RNN": OnnxRNN}


def _absent(node: Any, index: int) -> bool:
    return len(node.inputs) <= index or node.inputs[index] is None


def _gates(tensor: torch.Tensor, op_type: str) -> torch.Tensor:
    """A direction's stacked gate blocks reordered from ONNX's to torch's gate order."""
    order = _GATE_ORDER[op_type]
    blocks = tensor.reshape(len(order), -1, *tensor.shape[1:])
    return blocks[order].reshape(tensor.shape)


def recurrent_layer(emitter: Any, node: Any, args: list) -> Native | None:
    """ONNX LSTM/GRU/RNN with constant weights and torch-expressible attributes -> nn.LSTM/GRU/RNN."""
    op_type = node.op_type
    attrs = emitter.node_attributes(node)
    # torch holds each direction's gates reordered: a weight read elsewhere stays generic
    weights = [emitter.weight(node.inputs[i], relaid=True) for i in (1, 2)]
    bias = None if _absent(node, 3) else emitter.weight(node.inputs[3], relaid=True)
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
    stack = source_stack(emitter, node)
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
            assign(layer, **{name + suffix: _gates(tensor, op_type)})
            sources[name + suffix] = node.inputs[{"weight_ih": 1, "weight_hh": 2}.get(name, 3)]
    data_inputs = [i for i in (0, 5, 6)[: 3 if op_type == "LSTM" else 2] if i < len(node.inputs)]
    return Native(layer, sources, data_inputs, path=path, kwargs=kwargs)


# torch's names for one layer's weights: lstm.weight_ih_l1, lstm.bias_hh_l0_reverse
_TORCH_WEIGHT = re.compile(
    r"^(?P<path>.+)\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(?P<layer>\d+)(_reverse)?$"
)


def _packed_layer(node: Any) -> tuple[str, int] | None:
    """(module path, layer index) when the node's weights were packed from one torch layer."""
    names = []
    for index in (1, 2, 3):
        if not _absent(node, index):
            raw = node.inputs[index].metadata_props.get(provenance.PACKED_FROM)
            if raw is None:
                return None
            names += json.loads(raw)
    matches = [_TORCH_WEIGHT.match(name) for name in names]
    found = {(m["path"], int(m["layer"])) for m in matches if m is not None}
    return found.pop() if len(found) == 1 and all(matches) else None


def source_stack(emitter: Any, node: Any) -> tuple[str, int, int] | None:
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
    EMIT_LAYERS.register(_op_type, recurrent_layer)
