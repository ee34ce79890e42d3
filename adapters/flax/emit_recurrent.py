"""ONNX LSTM / GRU / RNN nodes with constant weights -> flax's own recurrent layers.

An LSTM becomes ``nnx.RNN(nnx.OptimizedLSTMCell)``, a GRU (linear_before_reset=1)
``nnx.RNN(nnx.GRUCell)``, an RNN ``nnx.RNN(nnx.SimpleCell)``; direction="reverse" is
``nnx.RNN(reverse=True, keep_order=True)`` and "bidirectional" ``nnx.Bidirectional`` of
two of them. They run ``lax.scan`` (through ``nnx.scan``), so jit does not unroll time.

Weights: ONNX stacks the gates of one direction as W ``[gates*hidden, in]`` in the order
LSTM i,o,f,c / GRU z,r,h; Flax's cells hold ``[in, gates*hidden]`` kernels in the order
i,f,g,o / r,z,n, so each direction's blocks are reordered and transposed once here.
Biases: ONNX B is ``[Wb, Rb]``. Flax's LSTM cell has one bias (on its hidden Linear) and
the simple cell one (on its input Linear): it holds ``Wb + Rb`` (same forward and the
same gradient for the sum). GRU keeps both: ``dense_i.bias = Wb``, ``dense_h.bias = Rb``
(`GRUCellWithHiddenBias`, since ``nnx.GRUCell``'s hidden Linear has no bias, so its n gate
has no ``b_hn``). Without B, the cells' bias is zeros and has no source name.

``module.source_names`` maps each cell variable to the node input it is built from
(``lstm.cell.dense_h.bias -> B``; with two directions ``...forward_rnn.cell...`` and
``...backward_rnn.cell...`` map to the same W/R/B, each holding its direction's slice).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from interop.emitter import Native, optional_weight, packed_sources

from . import EMIT_LAYERS
from .emit_layers import assemble, floating

# ONNX gate blocks in Flax's order: LSTM i,o,f,c -> i,f,c(g),o; GRU z,r,h -> r,z,h(n)
_GATE_ORDER = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}
_DEFAULT_ACTIVATIONS["RNN"] = ["Tanh"]
_FUNCTIONS = {"Sigmoid": nnx.sigmoid, "Tanh": nnx.tanh, "Relu": nnx.relu}
_DIRECTIONS = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}


class GRUCellWithHiddenBias(nnx.GRUCell):
    """nnx.GRUCell whose hidden Linear has a bias (ONNX Rb, torch's bias_hh).

    ``nnx.GRUCell`` computes ``n = tanh(W_in x + b_in + r * (W_hn h))``: no ``b_hn``, which
    ONNX (linear_before_reset=1) and torch have and which cannot be folded elsewhere
    because r multiplies it. Everything else, the call included, is GRUCell's.
    """

    def __init__(self, in_features: int, hidden_features: int, **kwargs: Any):
        super().__init__(in_features, hidden_features, **kwargs)
        self.dense_h = nnx.Linear(
            hidden_features,
            3 * hidden_features,
            use_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            promote_dtype=self.promote_dtype,
            rngs=kwargs["rngs"],
        )


def _stack_directions(forward: Any, backward: Any) -> Any:
    # nnx.Bidirectional's merge: keep the directions apart ([..., 2, hidden]) as ONNX does
    return jnp.stack([forward, backward], axis=-2)


def _direction_activations(names: list[str], per: int, directions: int) -> list[list[str]]:
    """Each direction's activation names, read as interop/ops/recurrent.py reads them."""
    return [
        names[d * per : (d + 1) * per] if len(names) >= (d + 1) * per else names[:per]
        for d in range(directions)
    ]


def _cell(op_type: str, size: tuple[int, int], acts: list[str], biased: bool, dtype: Any) -> Any:
    """The cell constructor call of one direction (run abstractly by `assemble`)."""
    in_features, hidden = size
    functions = [_FUNCTIONS[a] for a in acts]
    common = {"dtype": None, "param_dtype": dtype, "rngs": nnx.Rngs(0)}
    if op_type == "LSTM":
        return nnx.OptimizedLSTMCell(
            in_features, hidden, gate_fn=functions[0], activation_fn=functions[1], **common
        )
    if op_type == "GRU":
        cls = GRUCellWithHiddenBias if biased else nnx.GRUCell
        return cls(in_features, hidden, gate_fn=functions[0], activation_fn=functions[1], **common)
    return nnx.SimpleCell(in_features, hidden, activation_fn=functions[0], **common)


def _blocks(tensor: np.ndarray, op_type: str) -> np.ndarray:
    """One direction's stacked gate blocks (leading axis) in Flax's gate order."""
    order = _GATE_ORDER[op_type]
    blocks = tensor.reshape(len(order), -1, *tensor.shape[1:])
    return blocks[order].reshape(tensor.shape)


def _cell_arrays(op_type: str, w: np.ndarray, r: np.ndarray, b: np.ndarray | None) -> dict:
    """One direction's cell variables (dotted paths under ``cell``) from its W, R, B slices."""
    kernel_i = np.ascontiguousarray(_blocks(w, op_type).T)
    kernel_h = np.ascontiguousarray(_blocks(r, op_type).T)
    rows = w.shape[0]
    wb = np.zeros(rows, w.dtype) if b is None else _blocks(b[:rows], op_type)
    rb = np.zeros(rows, w.dtype) if b is None else _blocks(b[rows:], op_type)
    arrays = {"cell.dense_i.kernel": kernel_i, "cell.dense_h.kernel": kernel_h}
    if op_type == "LSTM":
        return arrays | {"cell.dense_h.bias": wb + rb}
    if op_type == "GRU":
        return (
            arrays
            | {"cell.dense_i.bias": wb}
            | ({"cell.dense_h.bias": rb} if b is not None else {})
        )
    return arrays | {"cell.dense_i.bias": wb + rb}


def _expressible(emitter: Any, node: Any, attrs: dict[str, Any]) -> bool:
    """Whether Flax's cells compute exactly this node (else the generic recurrence runs)."""

    def absent(index: int) -> bool:
        return len(node.inputs) <= index or node.inputs[index] is None

    return (
        absent(4)  # sequence_lens: per-batch lengths (nnx.RNN's seq_lengths differs for Y)
        and (node.op_type != "LSTM" or absent(7))  # peepholes
        and not attrs.get("activation_alpha")
        and not attrs.get("activation_beta")
        and attrs.get("clip") is None
        and not attrs.get("input_forget", 0)
        and (node.op_type != "GRU" or attrs.get("linear_before_reset", 0) == 1)
        and attrs.get("direction", "forward") in _DIRECTIONS
        and attrs.get("layout", 0) in (0, 1)
    )


def recurrent_layer(emitter: Any, node: Any, args: list[Any]) -> Native | None:
    """ONNX LSTM/GRU/RNN with constant weights -> nnx.RNN (or nnx.Bidirectional) of Flax cells."""
    op_type = node.op_type
    attrs = emitter.node_attributes(node)
    w, r = (emitter.weight(node.inputs[i]) for i in (1, 2))
    bias_value, bias, ok = optional_weight(emitter, node, 3)
    if w is None or r is None or not ok or not floating(w.dtype) or w.ndim != 3:
        return None
    if not _expressible(emitter, node, attrs):
        return None
    reverses = _DIRECTIONS[attrs.get("direction", "forward")]
    if w.shape[0] != len(reverses):
        return None
    default = _DEFAULT_ACTIVATIONS[op_type]
    names = list(attrs.get("activations") or default * len(reverses))
    activations = _direction_activations(names, len(default), len(reverses))
    for acts in activations:
        if len(acts) != len(default) or any(a not in _FUNCTIONS for a in acts):
            return None
        if op_type == "LSTM" and acts[1] != acts[2]:  # Flax's cell uses one g for c and h
            return None
    layout = attrs.get("layout", 0)
    size = (w.shape[2], r.shape[2])
    prefixes = ["forward_rnn.", "backward_rnn."] if len(reverses) == 2 else [""]
    arrays: dict[str, np.ndarray] = {}
    for d, prefix in enumerate(prefixes):
        direction = _cell_arrays(op_type, w[d], r[d], None if bias is None else bias[d])
        arrays |= {prefix + k: v for k, v in direction.items()}

    def build() -> Any:
        made = [
            nnx.RNN(
                _cell(op_type, size, activations[d], bias is not None, w.dtype),
                time_major=not layout,
                reverse=reverse,
                keep_order=reverse,
                rngs=False,  # the carry is always given: no rng state in the module
            )
            for d, reverse in enumerate(reverses)
        ]
        if len(made) == 1:
            return made[0]
        return nnx.Bidirectional(
            *made, merge_fn=_stack_directions, time_major=not layout, rngs=False
        )

    key = repr((op_type, size, activations, bias is not None, str(w.dtype), reverses, layout))
    layer = assemble("recurrent " + key, build, arrays)
    inputs = {"dense_i.kernel": node.inputs[1], "dense_h.kernel": node.inputs[2]}
    sources, names = {}, {}
    for name in arrays:
        leaf = name.split("cell.", 1)[1]
        value = inputs.get(leaf, bias_value)
        if value is not None:
            sources[name] = value
            direction = int(name.startswith("backward_rnn."))
            halves = op_type == "GRU" and leaf.endswith("bias")  # GRU keeps Wb and Rb apart
            root = emitter.initializer_of(value) or value
            names[name] = source_names(root, direction, len(prefixes), leaf if halves else "")
    data_inputs = [0, 5, 6] if op_type == "LSTM" else [0, 5]
    outputs = min(len(node.outputs), len(data_inputs))
    run = partial(_run, layout=layout, lstm=op_type == "LSTM", outputs=outputs)
    # layer k > 0 of a packed multi-layer source (lstm.W_l1) sits beside layer 0: lstm_l1
    stacked = re.match(r"^(.+)\.W(_l\d+)$", emitter.source_name(node.inputs[1]))
    path = stacked[1] + stacked[2] if stacked else None
    return Native(layer, sources, data_inputs, run, outputs=outputs, names=names, path=path)


def source_names(value: Any, direction: int, directions: int, bias_half: str) -> str:
    """The source parameters behind one direction's variable, joined by ``+``.

    A weight packed from source parameters (`interop.packing`, a traced nn.LSTM) lists them
    (`interop.emitter.packed_sources`: the direction's ones, ``lstm.weight_ih_l0`` /
    ``..._reverse``); a summed LSTM/RNN bias names both (``lstm.bias_ih_l0+lstm.bias_hh_l0``),
    a GRU bias half its own (``dense_i.bias`` the ``_ih`` one). Otherwise the node input.
    """
    names = packed_sources(value, direction, directions)
    if bias_half:
        tag = "_ih" if bias_half.startswith("dense_i") else "_hh"
        own = [n for n in names if tag in n.rsplit(".", 1)[-1]]
        names = own if len(own) == 1 else names
    return "+".join(names)


def _run(
    layer: Any,
    x: Any,
    initial_h: Any = None,
    initial_c: Any = None,
    *,
    layout: int,
    lstm: bool,
    outputs: int,
) -> Any:
    """Call the Flax layer with the node's inputs and answer with the node's outputs.

    ONNX (layout 0): X ``[seq, batch, in]``, states ``[directions, batch, hidden]``, Y
    ``[seq, directions, batch, hidden]``; layout 1: X ``[batch, seq, in]``, states
    ``[batch, directions, hidden]``, Y ``[batch, seq, directions, hidden]``. Flax's carry
    is ``(c, h)`` for an LSTM; it is always given, so no rng is read for a zero carry.
    """
    x = jnp.asarray(x)
    bidirectional = isinstance(layer, nnx.Bidirectional)
    rnns = [layer.forward_rnn, layer.backward_rnn] if bidirectional else [layer]
    hidden = rnns[0].cell.hidden_features
    batch = x.shape[1 - layout]

    def state(value: Any, d: int) -> Any:
        if value is None:
            return jnp.zeros((batch, hidden), x.dtype)
        value = jnp.asarray(value)
        return value[:, d] if layout else value[d]

    carries = [
        (state(initial_c, d), state(initial_h, d)) if lstm else state(initial_h, d)
        for d in range(len(rnns))
    ]
    if bidirectional:
        final, y = layer(x, initial_carry=tuple(carries), return_carry=True)
    else:
        final, y = layer(x, initial_carry=carries[0], return_carry=True)
        final, y = (final,), y[..., None, :]
    # y: [seq, batch, dirs, hidden] (time-major) or [batch, seq, dirs, hidden]
    y = y if layout else jnp.swapaxes(y, 1, 2)
    results = [y, jnp.stack([f[1] if lstm else f for f in final], axis=layout)]
    if lstm:
        results.append(jnp.stack([f[0] for f in final], axis=layout))
    return tuple(results[:outputs]) if outputs > 1 else y


for _op_type in _GATE_ORDER:
    EMIT_LAYERS.register(_op_type, recurrent_layer)
