"""Keras SimpleRNN / GRU / LSTM (and their Bidirectional) as one ONNX RNN / GRU / LSTM node.

Used where the layer's configuration is what the ONNX op computes: the default activations
(tanh, and sigmoid for the gates; SimpleRNN also relu / sigmoid), no mask, not stateful,
float32. Everything else keeps the Scan of `capture_recurrent.py`. The node's W / R / B are computed
from the Keras variables by ONNX nodes (Split / Concat / Transpose / Unsqueeze), so the
graph keeps the source variables with their names and kinds; `interop.packing` folds them
into initializers for the emitters. Gate orders: Keras LSTM i,f,c,o -> ONNX i,o,f,c; GRU
z,r,h is ONNX's order. Keras's one bias is ONNX's Wb with Rb = 0, except for GRU with
``reset_after`` (ONNX linear_before_reset=1), whose [2, 3*units] bias is exactly [Wb, Rb].
The node runs time-major (layout 0: onnxruntime has no batch-first recurrent kernels).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from .capture_lowering import Builder, Tensor

# cell class -> (ONNX op, gates, ONNX gate blocks as indices into Keras's blocks)
_CELLS = {
    "LSTMCell": ("LSTM", 4, [0, 3, 1, 2]),
    "GRUCell": ("GRU", 3, [0, 1, 2]),
    "SimpleRNNCell": ("RNN", 1, [0]),
}
_RNN_ACTIVATIONS = {"tanh": "Tanh", "relu": "Relu", "sigmoid": "Sigmoid"}
_LAYERS = ("LSTM", "GRU", "SimpleRNN", "RNN")


def _name(fn: Any) -> str:
    return fn if isinstance(fn, str) else getattr(fn, "__name__", "")


def expressible(layer: Any, mask: Any = None) -> bool:
    """Whether one ONNX LSTM / GRU / RNN node computes what the Keras layer does."""
    cell = getattr(layer, "cell", None)
    kind = type(cell).__name__
    if (
        type(layer).__name__ not in _LAYERS
        or kind not in _CELLS
        or mask is not None
        or getattr(layer, "stateful", False)
        or getattr(layer, "return_sequences", None) is None
        or any(str(v.dtype) != "float32" for v in cell.weights)
    ):
        return False
    if kind == "SimpleRNNCell":
        return _name(cell.activation) in _RNN_ACTIVATIONS
    return _name(cell.activation) == "tanh" and _name(cell.recurrent_activation) == "sigmoid"


def matching_pair(forward: Any, backward: Any) -> bool:
    """Whether a Bidirectional's two layers make one direction="bidirectional" node."""
    f, k = forward.cell, backward.cell
    return (
        type(f) is type(k)
        and int(f.units) == int(k.units)
        and not forward.go_backwards
        and backward.go_backwards
        and _name(f.activation) == _name(k.activation)
        and bool(getattr(f, "use_bias", True)) == bool(getattr(k, "use_bias", True))
        and bool(getattr(f, "reset_after", False)) == bool(getattr(k, "reset_after", False))
    )


def _reordered(b: Builder, value: ir.Value, cell: Any, axis: int) -> ir.Value:
    """A Keras weight's gate blocks (along ``axis``) in ONNX's gate order."""
    _, gates, order = _CELLS[type(cell).__name__]
    if order == list(range(gates)):
        return value
    units = int(cell.units)
    parts = b.op("Split", [value, b.ints([units] * gates)], {"axis": axis}, num_outputs=gates)
    return b.op("Concat", [parts[i] for i in order], {"axis": axis})


def _weights(b: Builder, cell: Any) -> list[ir.Value | None]:
    """[W [1, G*u, in], R [1, G*u, u], B [1, 2*G*u] or None] for one direction."""
    _, gates, _ = _CELLS[type(cell).__name__]
    units = int(cell.units)
    packed = []
    for variable in (cell.kernel, cell.recurrent_kernel):
        value = _reordered(b, b.variable(variable), cell, axis=1)
        value = b.op("Transpose", [value], {"perm": [1, 0]})  # [in, G*u] -> [G*u, in]
        packed.append(b.op("Unsqueeze", [value, b.ints([0])]))
    if not getattr(cell, "use_bias", True) or cell.bias is None:
        return [*packed, None]
    bias = b.variable(cell.bias)
    if getattr(cell, "reset_after", False):  # [2, 3u]: rows are ONNX's Wb and Rb
        packed.append(b.op("Reshape", [bias, b.ints([1, 2 * gates * units])]))
    else:  # one bias: ONNX's Wb, and Rb zero
        zeros = b.const(np.zeros(gates * units, np.float32))
        both = b.op("Concat", [_reordered(b, bias, cell, axis=0), zeros], {"axis": 0})
        packed.append(b.op("Unsqueeze", [both, b.ints([0])]))
    return packed


def _stacked(b: Builder, values: list[ir.Value]) -> ir.Value:
    values = [b.op("Unsqueeze", [v, b.ints([0])]) for v in values]  # [batch, u] -> [1, batch, u]
    return values[0] if len(values) == 1 else b.op("Concat", values, {"axis": 0})


def run_onnx_rnn(
    b: Builder, layers: list[Any], x: Tensor, initial_states: list[Any]
) -> tuple[list[tuple], ir.Value]:
    """One ONNX node for one layer or a Bidirectional pair (forward, backward).

    Returns, per direction, (sequence in time order [batch, seq, u], last output, states),
    and the [batch, seq, directions*u] sequences side by side (a concat merge).
    """
    cell = layers[0].cell
    op_type, _, _ = _CELLS[type(cell).__name__]
    units = int(cell.units)
    directions = len(layers)
    per_layer = [_weights(b, layer.cell) for layer in layers]
    weights = [
        None if parts[0] is None else b.op("Concat", list(parts), {"axis": 0})
        if directions > 1 else parts[0]
        for parts in zip(*per_layer)
    ]  # fmt: skip
    states: list[ir.Value | None] = [None, None]
    if all(s is not None for s in initial_states):
        given = [
            [t.value for t in (s if isinstance(s, list | tuple) else [s])] for s in initial_states
        ]
        for k in range(len(given[0])):
            states[k] = _stacked(b, [g[k] for g in given])
    attributes: dict[str, Any] = {"hidden_size": units, "layout": 0}
    if directions == 2:
        attributes["direction"] = "bidirectional"
    elif layers[0].go_backwards:
        attributes["direction"] = "reverse"
    if op_type == "GRU":
        attributes["linear_before_reset"] = int(bool(cell.reset_after))
    if op_type == "RNN":
        attributes["activations"] = [_RNN_ACTIVATIONS[_name(cell.activation)]] * directions
    time_major = b.op("Transpose", [x.value], {"perm": [1, 0, 2]})
    inputs = [time_major, *weights, None, states[0], states[1] if op_type == "LSTM" else None]
    while inputs[-1] is None:
        inputs.pop()
    count = 3 if op_type == "LSTM" else 2
    outputs = b.op(op_type, inputs, attributes, num_outputs=count)
    y, finals = outputs[0], list(outputs[1:])
    batch_major = b.op("Transpose", [y], {"perm": [2, 0, 1, 3]})  # batch, seq, directions, u
    side_by_side = b.op("Reshape", [batch_major, b.ints([0, 0, directions * units])])
    results = []
    for d in range(directions):
        index = b.const(np.int64(d))
        sequence = (
            side_by_side if directions == 1 else b.op("Gather", [batch_major, index], {"axis": 2})
        )
        last_states = [b.op("Gather", [s, index], {"axis": 0}) for s in finals]
        results.append((sequence, last_states[0], last_states))
    return results, side_by_side
