"""ONNX LSTM / GRU / RNN nodes with initializer weights -> keras.layers.LSTM / GRU / SimpleRNN.

Registered in `EMIT_LAYERS` like the other native builders: each returns a `Native` whose
call gives the node's outputs (Y [seq, directions, batch, hidden], Y_h, Y_c in the node's
layout) or None to leave the node to the generic recurrence (sequence_lens, peepholes, clip, input_forget,
activations Keras's layers do not have). Gate orders go from ONNX's (LSTM i,o,f,c; GRU
z,r,h) to Keras's (LSTM i,f,c,o; GRU z,r,h), kernels are transposed ([in, gates*hidden])
and ONNX's two biases Wb + Rb become Keras's one bias, except for GRU with
linear_before_reset=1 (Keras ``reset_after=True``, bias [2, 3*hidden]: Rb_h sits inside
the reset product there). "bidirectional" is a ``keras.layers.Bidirectional``,
"reverse" a layer with ``go_backwards`` whose outputs are flipped back in time.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import keras
import numpy as np
from keras import ops

from interop.emitter import Native, optional_weight, packed_sources

from . import EMIT_LAYERS
from .emit_layers import assign, keras_tensor

# ONNX gate blocks in Keras's order: LSTM iofc -> ifco; GRU zrh is Keras's order already
_GATE_ORDER = {"LSTM": [0, 2, 3, 1], "GRU": [0, 1, 2], "RNN": [0]}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}
_RNN_ACTIVATIONS = {"Tanh": "tanh", "Relu": "relu", "Sigmoid": "sigmoid"}
_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


@keras.saving.register_keras_serializable("interop")
class RecurrentState(keras.layers.Layer):
    """One direction's [batch, hidden] initial state out of ONNX's [directions, batch, hidden]
    ([batch, directions, hidden] with layout=1)."""

    def __init__(self, direction: int, layout: int, **kwargs):
        super().__init__(**kwargs)
        self.direction, self.layout = int(direction), int(layout)

    def call(self, state):
        return ops.take(state, self.direction, axis=1 if self.layout else 0)

    def compute_output_shape(self, shape):
        axis = 1 if self.layout else 0
        return tuple(d for i, d in enumerate(shape) if i != axis)

    def get_config(self):
        return {**super().get_config(), "direction": self.direction, "layout": self.layout}


@keras.saving.register_keras_serializable("interop")
class RecurrentOutputs(keras.layers.Layer):
    """Keras's per-direction outputs ([batch, seq, hidden] sequences, then [batch, hidden]
    states grouped by kind) stacked into the ONNX node's Y, Y_h[, Y_c]."""

    def __init__(self, directions: int, layout: int, reverse: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.directions, self.layout, self.reverse = int(directions), int(layout), bool(reverse)

    def call(self, inputs):
        count = self.directions
        sequences = list(inputs[:count])
        if self.reverse:  # go_backwards gives the steps in processing order: back to time order
            sequences = [ops.flip(s, axis=1) for s in sequences]
        y = ops.stack(sequences, axis=2)  # batch, seq, directions, hidden
        outputs = [y if self.layout else ops.transpose(y, (1, 2, 0, 3))]
        states = list(inputs[count:])
        for start in range(0, len(states), count):
            s = ops.stack(states[start : start + count], axis=1)  # batch, directions, hidden
            outputs.append(s if self.layout else ops.transpose(s, (1, 0, 2)))
        return outputs

    def compute_output_shape(self, shapes):
        count = self.directions
        batch, seq, hidden = shapes[0]
        y = (batch, seq, count, hidden) if self.layout else (seq, count, batch, hidden)
        state = (batch, count, hidden) if self.layout else (count, batch, hidden)
        return [y] + [state] * ((len(shapes) - count) // count)

    def get_config(self):
        return {**super().get_config(), "directions": self.directions, "layout": self.layout,
                "reverse": self.reverse}  # fmt: skip


def _absent(node, index: int) -> bool:
    return len(node.inputs) <= index or node.inputs[index] is None


def _gates(array: np.ndarray, op_type: str) -> np.ndarray:
    """[gates*hidden, ...] blocks reordered from ONNX's gate order to Keras's."""
    order = _GATE_ORDER[op_type]
    blocks = array.reshape(len(order), -1, *array.shape[1:])
    return blocks[order].reshape(array.shape)


def _expressible(emitter, node, attrs) -> bool:
    """Whether Keras's layers compute exactly what the node's attributes ask for."""
    op_type = node.op_type
    activations = list(attrs.get("activations") or [])
    if op_type == "RNN":
        if any(a not in _RNN_ACTIVATIONS for a in activations) or len(set(activations)) > 1:
            return False
    elif activations not in ([], _DEFAULT_ACTIVATIONS[op_type], _DEFAULT_ACTIVATIONS[op_type] * 2):
        return False
    peepholes = None if _absent(node, 7) or op_type != "LSTM" else optional_weight(emitter, node, 7)
    return not (
        not _absent(node, 4)  # sequence_lens: per-row lengths Keras's layers cannot take
        or (peepholes is not None and peepholes[0] is not None)  # zero peepholes are none
        or attrs.get("activation_alpha")
        or attrs.get("activation_beta")
        or attrs.get("clip") is not None
        or attrs.get("input_forget", 0)
    )


def _keras_weights(op_type, w, r, bias, reset_after) -> dict[str, np.ndarray]:
    """One direction's ONNX W [G*H, in], R [G*H, H], B [2*G*H] as Keras cell variables."""
    weights = {"kernel": _gates(w, op_type).T, "recurrent_kernel": _gates(r, op_type).T}
    if bias is not None:
        rows = w.shape[0]
        input_bias, recurrent_bias = _gates(bias[:rows], op_type), _gates(bias[rows:], op_type)
        # Keras keeps the recurrent bias apart only where ONNX applies it inside the reset gate
        weights["bias"] = (
            np.stack([input_bias, recurrent_bias]) if reset_after else input_bias + recurrent_bias
        )
    return weights


def _layer(op_type, hidden, attrs, use_bias, dtype, name, go_backwards=False):
    common = dict(use_bias=use_bias, return_sequences=True, return_state=True,
                  go_backwards=go_backwards, dtype=dtype, name=name)  # fmt: skip
    if op_type == "LSTM":
        return keras.layers.LSTM(hidden, unit_forget_bias=False, **common)
    if op_type == "GRU":
        return keras.layers.GRU(hidden, reset_after=bool(attrs.get("linear_before_reset", 0)),
                                **common)  # fmt: skip
    activation = _RNN_ACTIVATIONS[(list(attrs.get("activations") or []) or ["Tanh"])[0]]
    return keras.layers.SimpleRNN(hidden, activation=activation, **common)


def _initial_states(emitter, node, args, directions, layout):
    """Keras's initial_state list (per direction, then per state kind); [] for zeros; None if
    the node gives only one of an LSTM's two states (Keras needs both)."""
    given = []
    for index in _STATE_INPUTS[node.op_type]:
        value = node.inputs[index] if len(node.inputs) > index else None
        static = emitter.static.get(value) if value is not None else None
        given.append(None if value is None or (static is not None and not np.any(static))
                     else emitter.runtime(args[index]))  # fmt: skip
    if all(g is None for g in given):
        return []
    if any(g is None for g in given):
        return None
    per_direction = []
    for d in range(directions):
        for tensor in given:
            per_direction.append(
                RecurrentState(d, layout, name=emitter.unique(f"{node.name or 'state'}_state"))(
                    tensor
                )
            )
    return per_direction


def recurrent_layer(emitter, node, args):
    """LSTM / GRU / RNN with initializer weights -> keras.layers.LSTM / GRU / SimpleRNN."""
    op_type = node.op_type
    attrs = emitter.node_attributes(node)
    w, r = emitter.weight(node.inputs[1]), emitter.weight(node.inputs[2])
    bias_value, bias, usable = optional_weight(emitter, node, 3)
    if w is None or r is None or not usable or not keras_tensor(args[0]):
        return None
    if not _expressible(emitter, node, attrs) or w.ndim != 3 or r.ndim != 3:
        return None
    direction = attrs.get("direction", "forward")
    directions, layout = w.shape[0], int(attrs.get("layout", 0))
    features = tuple(args[0].shape)[-1] if len(args[0].shape) == 3 else -1
    if directions != (2 if direction == "bidirectional" else 1) or features not in (
        None,
        w.shape[-1],
    ):
        return None
    states = _initial_states(emitter, node, args, directions, layout)
    if states is None:
        return None
    hidden = r.shape[-1]
    reset_after = op_type == "GRU" and bool(attrs.get("linear_before_reset", 0))
    values = dict(zip(("kernel", "recurrent_kernel", "bias"), (node.inputs[1], node.inputs[2],
                                                               bias_value)))  # fmt: skip
    dtype = str(w.dtype)
    if direction == "bidirectional":
        inner = _layer(op_type, hidden, attrs, bias is not None, dtype, op_type.lower())
        layer: Any = keras.layers.Bidirectional(inner, merge_mode=None)
        cells = ["forward_layer.cell", "backward_layer.cell"]
    else:
        layer = _layer(op_type, hidden, attrs, bias is not None, dtype, None,
                       go_backwards=direction == "reverse")  # fmt: skip
        cells = ["cell"]
    sources, names = {}, {}
    for d, cell in enumerate(cells):
        for attribute, value in values.items():
            if value is not None:
                root = _root(emitter, value)
                sources[f"{cell}.{attribute}"] = value
                names[f"{cell}.{attribute}"] = "+".join(packed_sources(root, d, directions))

    def call(layer, x):
        name = layer.name
        x = x if layout else emitter.transpose(x, (1, 0, 2))  # batch-first for Keras
        if features is None:  # computed upstream (torch's reshapes): Keras sizes the kernel
            x = keras.layers.Reshape((-1, w.shape[-1]), name=emitter.unique(f"{name}_input"))(x)
        results = layer(x, initial_state=states) if states else layer(x)
        for d, cell in enumerate(cells):
            weights = _keras_weights(op_type, w[d], r[d], None if bias is None else bias[d],
                                     reset_after)  # fmt: skip
            assign(functools.reduce(getattr, cell.split("."), layer), **weights)
        kinds = 2 if op_type == "LSTM" else 1
        if directions == 2:  # Bidirectional: y_f, y_b, then each direction's states
            sequences = list(results[:2])
            per_direction = [results[2 : 2 + kinds], results[2 + kinds :]]
        else:
            sequences, per_direction = [results[0]], [results[1:]]
        grouped = [per_direction[d][k] for k in range(kinds) for d in range(directions)]
        outputs = RecurrentOutputs(
            directions, layout, reverse=direction == "reverse",
            name=emitter.unique(f"{name}_outputs"),
        )([*sequences, *grouped])  # fmt: skip
        results = list(outputs[: len(node.outputs)])
        results += [None] * (len(node.outputs) - len(results))
        return results if len(results) > 1 else results[0]  # one value: Native.outputs == 1

    path = _keras_path(emitter, [node.inputs[1], node.inputs[2], bias_value])
    return Native(layer, sources, [0], call=call, outputs=len(node.outputs), names=names,
                  path=path)  # fmt: skip


def _root(emitter, value):
    """The initializer a weight input reads (through a Transpose / Identity), else itself."""
    found = emitter.weight_source(value)
    return found[0] if found is not None else value


def _keras_path(emitter, sources) -> str | None:
    """A Keras source's layer path (``bi_lstm`` for ``bi_lstm/forward_lstm/lstm_cell/kernel``);
    None leaves the emitter's rule (``lstm`` for torch's ``lstm.W`` packed from
    ``lstm.weight_ih_l0``)."""
    names = [n for v in sources if v is not None
             for n in packed_sources(_root(emitter, v), 0, 1)]  # fmt: skip
    if names and all("/" in n for n in names):
        parts = os.path.commonprefix([n.split("/")[:-1] for n in names])
        if parts and parts[-1].endswith("_cell"):  # the cell is part of the Keras layer
            parts = parts[:-1]
        if parts:
            return "/".join(parts)
    return None


for _op_type in _GATE_ORDER:
    EMIT_LAYERS.register(_op_type, recurrent_layer)
