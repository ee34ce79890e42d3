"""Converters for recurrent layers: SimpleRNN, GRU, LSTM (and ``RNN`` of their cells), Bidirectional.

A layer whose configuration the ONNX LSTM / GRU / RNN op expresses (default activations,
no mask; `capture_recurrent_ops.expressible`) becomes one such node, a Bidirectional pair
one direction="bidirectional" node. Any other becomes one ONNX ``Scan`` over the time axis, so
any sequence length works, with the input projection ``x @ kernel + bias`` done once for
all steps outside the loop.
Masks follow Keras's backend ``rnn`` exactly: at a masked step the states keep their
previous value and the output repeats the previous output (or is zero when the
layer's ``zero_output_for_mask`` is set, as Bidirectional does for sequences). Masked
layers keep the Scan: the ONNX ops' ``sequence_lens`` only models right padding.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from . import CAPTURE_LAYERS
from .capture_layers import activation
from .capture_lowering import Builder, Tensor
from .capture_recurrent_ops import expressible, matching_pair, run_onnx_rnn

_FLOAT = ir.TensorType(ir.DataType.FLOAT)


def _cell_kind(cell: Any) -> str:
    for cls in type(cell).__mro__:
        if cls.__name__ in ("LSTMCell", "GRUCell", "SimpleRNNCell"):
            return cls.__name__
    raise ValueError(f"RNN cells of type {type(cell).__name__} are not supported")


def _zeros_state(b: Builder, x: ir.Value, units: int) -> ir.Value:
    batch = b.op("Shape", [x], {"start": 0, "end": 1})
    shape = b.op("Concat", [batch, b.ints([units])], {"axis": 0})
    return b.op("ConstantOfShape", [shape], {"value": ir.tensor(np.zeros(1, np.float32))})


def _step(
    b: Builder, kind: str, cell: Any, xt: ir.Value, states: list[ir.Value], recurrent: dict
) -> tuple:
    """One time step inside the Scan body: returns (output, new_states)."""
    u = int(cell.units)
    act = cell.activation
    if kind == "SimpleRNNCell":
        h = activation(b, b.op("Add", [xt, b.op("MatMul", [states[0], recurrent["kernel"]])]), act)
        return h, [h]
    rec_act = cell.recurrent_activation
    if kind == "LSTMCell":
        z = b.op("Add", [xt, b.op("MatMul", [states[0], recurrent["kernel"]])])
        i, f, c, o = b.op("Split", [z, b.ints([u] * 4)], {"axis": 1}, num_outputs=4)
        i, f, o = activation(b, i, rec_act), activation(b, f, rec_act), activation(b, o, rec_act)
        c_new = b.op("Add", [b.op("Mul", [f, states[1]]), b.op("Mul", [i, activation(b, c, act)])])
        h = b.op("Mul", [o, activation(b, c_new, act)])
        return h, [h, c_new]
    # GRUCell
    x_z, x_r, x_h = b.op("Split", [xt, b.ints([u] * 3)], {"axis": 1}, num_outputs=3)
    h_prev = states[0]
    if cell.reset_after:
        inner = b.op("MatMul", [h_prev, recurrent["kernel"]])
        if recurrent.get("bias") is not None:
            inner = b.op("Add", [inner, recurrent["bias"]])
        r_z, r_r, r_h = b.op("Split", [inner, b.ints([u] * 3)], {"axis": 1}, num_outputs=3)
        z = activation(b, b.op("Add", [x_z, r_z]), rec_act)
        r = activation(b, b.op("Add", [x_r, r_r]), rec_act)
        hh = activation(b, b.op("Add", [x_h, b.op("Mul", [r, r_h])]), act)
    else:
        u_zr, u_h = recurrent["kernel_zr"], recurrent["kernel_h"]
        r_z, r_r = b.op(
            "Split", [b.op("MatMul", [h_prev, u_zr]), b.ints([u, u])], {"axis": 1}, num_outputs=2
        )
        z = activation(b, b.op("Add", [x_z, r_z]), rec_act)
        r = activation(b, b.op("Add", [x_r, r_r]), rec_act)
        hh = activation(b, b.op("Add", [x_h, b.op("MatMul", [b.op("Mul", [r, h_prev]), u_h])]), act)
    one_minus_z = b.op("Sub", [b.const(np.float32(1)), z])
    h = b.op("Add", [b.op("Mul", [z, h_prev]), b.op("Mul", [one_minus_z, hh])])
    return h, [h]


def _projection(b: Builder, kind: str, cell: Any, x: ir.Value) -> tuple[ir.Value, dict]:
    """x @ kernel + input bias for all steps, and the weights the loop body reads."""
    y = b.op("MatMul", [x, b.variable(cell.kernel)])
    recurrent: dict[str, Any] = {"kernel": b.variable(cell.recurrent_kernel)}
    bias = (
        b.variable(cell.bias) if getattr(cell, "use_bias", True) and cell.bias is not None else None
    )
    if kind == "GRUCell" and bias is not None and cell.reset_after:
        y = b.op("Add", [y, b.op("Gather", [bias, b.const(np.int64(0))], {"axis": 0})])
        recurrent["bias"] = b.op("Gather", [bias, b.const(np.int64(1))], {"axis": 0})
    elif bias is not None:
        y = b.op("Add", [y, bias])
    if kind == "GRUCell" and not cell.reset_after:
        u = int(cell.units)
        kernel = recurrent["kernel"]
        recurrent["kernel_zr"] = b.op("Slice", [kernel, b.ints([0]), b.ints([2 * u]), b.ints([1])])
        recurrent["kernel_h"] = b.op(
            "Slice", [kernel, b.ints([2 * u]), b.ints([3 * u]), b.ints([1])]
        )
    return y, recurrent


def run_rnn(
    b: Builder, layer: Any, x: Tensor, mask: Tensor | None, initial_state: Any, zero_output: bool
) -> tuple:
    """Scan one RNN layer; returns (sequence output, last output, final states)."""
    if getattr(layer, "stateful", False):
        raise ValueError(
            "stateful RNN layers are not supported (their state lives outside the call)"
        )
    cell = layer.cell
    kind = _cell_kind(cell)
    units = int(cell.units)
    projected, recurrent = _projection(b, kind, cell, x.value)
    n_states = 2 if kind == "LSTMCell" else 1
    if initial_state is not None:
        states0 = [
            s.value
            for s in (initial_state if isinstance(initial_state, list | tuple) else [initial_state])
        ]
    else:
        states0 = [_zeros_state(b, x.value, units) for _ in range(n_states)]
    with_mask = mask is not None
    scan_inputs = [projected]
    if with_mask:
        scan_inputs.append(b.op("Unsqueeze", [mask.value, b.ints([-1])]))
        states0 = [*states0, _zeros_state(b, x.value, units)]  # the previous output

    # The body is built with the same builder, into its own node list.
    outer_nodes, b.nodes = b.nodes, []
    try:
        body_states = [
            ir.Value(name=b.fresh("state"), type=_FLOAT, shape=ir.Shape(["batch", units]))
            for _ in states0
        ]
        xt = ir.Value(
            name=b.fresh("x_t"),
            type=_FLOAT,
            shape=ir.Shape(["batch", projected.shape[-1] if projected.shape else None]),
        )
        body_inputs = [*body_states, xt]
        h, new_states = _step(b, kind, cell, xt, body_states[:n_states], recurrent)
        out = h
        if with_mask:
            mt = ir.Value(
                name=b.fresh("mask_t"),
                type=ir.TensorType(ir.DataType.BOOL),
                shape=ir.Shape(["batch", 1]),
            )
            body_inputs.append(mt)
            new_states = [
                b.op("Where", [mt, new, old])
                for new, old in zip(new_states, body_states, strict=False)
            ]
            fallback = (
                b.op("Mul", [body_states[-1], b.const(np.float32(0))])
                if zero_output
                else body_states[-1]
            )
            out = b.op("Where", [mt, h, fallback])
            new_states.append(out)
        body_outputs = [b.op("Identity", [s]) for s in new_states] + [b.op("Identity", [out])]
        body = ir.Graph(body_inputs, body_outputs, nodes=b.nodes, name=b.fresh("scan_body"))
    finally:
        b.nodes = outer_nodes
    direction = 1 if layer.go_backwards else 0
    results = b.op(
        "Scan",
        [*states0, *scan_inputs],
        {
            "body": body,
            "num_scan_inputs": len(scan_inputs),
            "scan_input_axes": [1] * len(scan_inputs),
            "scan_input_directions": [direction] * len(scan_inputs),
            "scan_output_axes": [1],
        },
        num_outputs=len(states0) + 1,
    )
    final_states, sequence = list(results[:-1]), results[-1]
    last = final_states[-1] if with_mask else final_states[0]
    return sequence, last, final_states[:n_states]


def _mask_of(x: Tensor, mask: Any) -> Tensor | None:
    if isinstance(mask, Tensor):
        return mask
    return x.mask


def import_rnn(
    b: Builder, layer: Any, x: Tensor, initial_state: Any = None, mask: Any = None, **_: Any
) -> Any:
    """SimpleRNN / GRU / LSTM / RNN(cell): outputs as Keras returns them (with states if asked)."""
    mask_t = _mask_of(x, mask)
    zero_output = bool(getattr(layer, "zero_output_for_mask", False))
    if expressible(layer, mask_t):
        ((sequence, last, states),), _ = run_onnx_rnn(b, [layer], x, [initial_state])
        if layer.go_backwards:  # Keras returns the steps in the order it processed them
            sequence = _flip_time(b, sequence)
    else:
        sequence, last, states = run_rnn(b, layer, x, mask_t, initial_state, zero_output)
    units = int(layer.cell.units)
    if layer.return_sequences:
        output = Tensor(sequence, (x.shape[0], x.shape[1], units), "float32", mask_t)
    else:
        output = Tensor(last, (x.shape[0], units), "float32", None)
    if layer.return_state:
        return [output, *[Tensor(s, (x.shape[0], units)) for s in states]]
    return output


for _name in ("SimpleRNN", "GRU", "LSTM", "RNN"):
    CAPTURE_LAYERS.register(_name, import_rnn)


def _flip_time(b: Builder, y: ir.Value) -> ir.Value:
    big = np.iinfo(np.int64).max
    return b.op("Slice", [y, b.ints([-1]), b.ints([-big]), b.ints([1]), b.ints([-1])])


@CAPTURE_LAYERS.register("Bidirectional")
def import_bidirectional(
    b: Builder, layer: Any, x: Tensor, initial_state: Any = None, mask: Any = None, **_: Any
) -> Any:
    mask_t = _mask_of(x, mask)
    forward_init = backward_init = None
    if initial_state is not None:
        half = len(initial_state) // 2
        forward_init, backward_init = initial_state[:half], initial_state[half:]
    subs = (layer.forward_layer, layer.backward_layer)
    side_by_side = None
    if all(expressible(sub, mask_t) for sub in subs) and matching_pair(*subs):
        results, side_by_side = run_onnx_rnn(b, list(subs), x, [forward_init, backward_init])
        (seq_f, last_f, states_f), (seq_b, last_b, states_b) = results  # both in time order
    else:
        results = []
        for sub, init in zip(subs, (forward_init, backward_init)):
            with b.scoped(f"{b.scope}/{sub.name}" if b.scope else sub.name):
                zero_output = bool(getattr(sub, "zero_output_for_mask", False))
                results.append(run_rnn(b, sub, x, mask_t, init, zero_output))
        (seq_f, last_f, states_f), (seq_b, last_b, states_b) = results
    if layer.return_sequences:  # the backward Scan's steps come in processing order
        y_f, y_b = seq_f, seq_b if side_by_side is not None else _flip_time(b, seq_b)
    else:
        y_f, y_b = last_f, last_b
    mode = layer.merge_mode
    if mode == "concat" and side_by_side is not None and layer.return_sequences:
        y: Any = side_by_side  # the node's directions are already side by side
    elif mode == "concat":
        y = b.op("Concat", [y_f, y_b], {"axis": -1})
    elif mode == "sum":
        y = b.op("Add", [y_f, y_b])
    elif mode == "mul":
        y = b.op("Mul", [y_f, y_b])
    elif mode == "ave":
        y = b.op("Mul", [b.op("Add", [y_f, y_b]), b.const(np.float32(0.5))])
    else:
        y = [y_f, y_b]
    out_mask = mask_t if layer.return_sequences else None
    units = int(layer.forward_layer.cell.units) * (2 if mode == "concat" else 1)
    shape = (x.shape[0], x.shape[1], units) if layer.return_sequences else (x.shape[0], units)
    outputs = [Tensor(v, shape, "float32", out_mask) for v in (y if isinstance(y, list) else [y])]
    if layer.return_state:
        return [*outputs, *[Tensor(s, (x.shape[0], units)) for s in (*states_f, *states_b)]]
    return outputs if isinstance(y, list) else outputs[0]
