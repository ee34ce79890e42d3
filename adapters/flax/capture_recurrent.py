"""nnx.RNN over Flax's standard cells captured as one ONNX LSTM / GRU / RNN node.

While a model is traced, a call of ``nnx.RNN`` whose cell is an ``nnx.LSTMCell``,
``OptimizedLSTMCell``, ``GRUCell`` or ``SimpleCell`` with default gates (sigmoid/tanh, no
residual, no custom carry init), one batch axis, float32 and no ``seq_lengths`` binds the
``interop_rnn`` primitive instead of running ``nnx.scan``; its converter emits the ONNX
recurrent node. The node's W/R/B are computed from the cell's parameters by ONNX nodes
(Split/Concat/Transpose/Unsqueeze), so the graph keeps the Flax parameters under their
own names (`rnn.cell.dense_i.kernel`) and emitters see them packed (`interop.packing`).
Anything else runs the original call, which the walk turns into a Loop.

Gate orders: Flax i,f,g,o (LSTM) / r,z,n (GRU) -> ONNX i,o,f,c / z,r,h. Flax's single
biases go where ONNX has them: LSTM's hidden bias -> Rb (Wb = 0), GRU's and the simple
cell's input bias -> Wb (Rb = 0); GRUCell's n gate has no hidden bias, which is ONNX's
linear_before_reset=1 with Rb_n = 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import register_primitive

rnn_p = Primitive("interop_rnn")
rnn_p.multiple_results = True

_KINDS = {"LSTMCell": "LSTM", "OptimizedLSTMCell": "LSTM", "GRUCell": "GRU", "SimpleCell": "RNN"}
_ONNX_ORDER = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}  # Flax blocks in ONNX order
_CALL_OPTIONS = {
    "initial_carry",
    "return_carry",
    "time_major",
    "reverse",
    "keep_order",
    "rngs",
    "seq_lengths",
}


@rnn_p.def_abstract_eval
def _abstract(x: Any, *operands: Any, kind: str, hidden: int, **_: Any) -> list[Any]:
    y = jax.core.ShapedArray((*x.shape[:-1], hidden), x.dtype)
    state = jax.core.ShapedArray((x.shape[1] if _["time_major"] else x.shape[0], hidden), x.dtype)
    return [state, state, y] if kind == "LSTM" else [state, y]


def _implementation(x: Any, *operands: Any, **p: Any) -> list[Any]:
    """What the primitive computes, in JAX (run when the capture function itself is run)."""
    kind, hidden = p["kind"], p["hidden"]
    count = 2 if kind == "LSTM" else 1
    carries = list(operands[:count]) if p["carried"] else []
    params = operands[len(carries) :]
    if p["cell"] == "LSTMCell":
        kernel_i, kernel_h = jnp.concatenate(params[:4], 1), jnp.concatenate(params[4:8], 1)
        bias = jnp.concatenate(params[8:], 0)
    else:
        kernel_i, kernel_h, bias = params
    xs = x if p["time_major"] else jnp.swapaxes(x, 0, 1)
    if not carries:
        carries = [jnp.zeros((xs.shape[1], hidden), x.dtype)] * count

    def step(carry: Any, xt: Any) -> Any:
        h = carry[-1]
        if kind == "LSTM":
            i, f, g, o = jnp.split(xt @ kernel_i + h @ kernel_h + bias, 4, axis=-1)
            c = jax.nn.sigmoid(f) * carry[0] + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (c, h), h
        if kind == "GRU":
            xr, xz, xn = jnp.split(xt @ kernel_i + bias, 3, axis=-1)
            hr, hz, hn = jnp.split(h @ kernel_h, 3, axis=-1)
            r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
            h = (1.0 - z) * jnp.tanh(xn + r * hn) + z * h
            return (h,), h
        h = jnp.tanh(xt @ kernel_i + bias + h @ kernel_h)
        return (h,), h

    final, ys = jax.lax.scan(step, tuple(carries), xs, reverse=p["reverse"])
    if p["reverse"] and not p["keep_order"]:
        ys = jnp.flip(ys, 0)
    return [*final, ys if p["time_major"] else jnp.swapaxes(ys, 0, 1)]


rnn_p.def_impl(_implementation)
mlir.register_lowering(rnn_p, mlir.lower_fun(_implementation, multiple_results=True))


def _cell_parameters(cell: Any, kind: str) -> list[Any] | None:
    """[input kernels..., hidden kernels..., bias...] of a cell, blocks in Flax's gate order."""
    name = type(cell).__name__
    if name == "LSTMCell":
        gates = ("i", "f", "g", "o")
        inputs = [getattr(cell, "if_" if g == "f" else "i" + g).kernel for g in gates]
        hidden = [getattr(cell, "h" + g) for g in gates]
        return [*inputs, *(h.kernel for h in hidden), *(h.bias for h in hidden)]
    if name == "OptimizedLSTMCell":
        return [cell.dense_i.kernel, cell.dense_h.kernel, cell.dense_h.bias]
    if getattr(cell.dense_h, "bias", None) is not None:
        return None  # a hidden bias Flax's cell does not have (a subclass): not standard
    return [cell.dense_i.kernel, cell.dense_h.kernel, cell.dense_i.bias]


def rnn_call(rnn: Any, args: tuple, kwargs: dict) -> Any:
    """The ``interop_rnn`` call standing for ``rnn(*args, **kwargs)``, or NotImplemented."""
    from flax import nnx

    cell = getattr(rnn, "cell", None)
    kind = _KINDS.get(type(cell).__name__)
    if type(rnn) is not nnx.RNN or type(cell) not in (
        nnx.LSTMCell,
        nnx.OptimizedLSTMCell,
        nnx.GRUCell,
        nnx.SimpleCell,
    ):
        return NotImplemented
    if len(args) != 1 or set(kwargs) - _CALL_OPTIONS or kwargs.get("seq_lengths") is not None:
        return NotImplemented
    x = args[0]
    default_gate = kind == "RNN" or cell.gate_fn is nnx.sigmoid
    if (
        not default_gate
        or cell.activation_fn is not nnx.tanh
        or getattr(cell, "residual", False)
        or cell.carry_init is not None
        or cell.num_feature_axes != 1
        or jnp.ndim(x) != 3
        or jnp.result_type(x) != jnp.float32
        or cell.param_dtype != jnp.float32
        or cell.dtype not in (None, jnp.float32)
    ):
        return NotImplemented
    parameters = _cell_parameters(cell, kind)
    if parameters is None or any(jnp.result_type(p[...]) != jnp.float32 for p in parameters):
        return NotImplemented
    option = {k: kwargs.get(k) for k in ("time_major", "reverse", "keep_order", "return_carry")}
    time_major = rnn.time_major if option["time_major"] is None else option["time_major"]
    reverse = rnn.reverse if option["reverse"] is None else option["reverse"]
    keep_order = rnn.keep_order if option["keep_order"] is None else option["keep_order"]
    return_carry = rnn.return_carry if option["return_carry"] is None else option["return_carry"]
    carry = kwargs.get("initial_carry")
    carries = [] if carry is None else list(carry) if kind == "LSTM" else [carry]
    results = rnn_p.bind(
        x,
        *carries,
        *(p[...] for p in parameters),
        kind=kind,
        cell=type(cell).__name__,
        hidden=cell.hidden_features,
        time_major=bool(time_major),
        reverse=bool(reverse),
        keep_order=bool(keep_order),
        carried=bool(carries),
    )
    *state, y = results
    final = tuple(state) if kind == "LSTM" else state[0]  # Flax's LSTM carry is (c, h)
    return (final, y) if return_carry else y


def _split(low: Any, value: Any, parts: int) -> list[Any]:
    return (
        low.op("Split", [value], {"axis": 1, "num_outputs": parts}, outputs=parts)
        if parts > 1
        else [value]
    )


@register_primitive("interop_rnn")
def convert_rnn(low: Any, eqn: Any, x: Any, *operands: Any) -> list[Any]:
    """interop_rnn -> ONNX LSTM / GRU / RNN (W, R, B computed from the Flax parameters)."""
    p = eqn.params
    kind, hidden = p["kind"], p["hidden"]
    carries = list(operands[: (2 if kind == "LSTM" else 1)]) if p["carried"] else []
    params = list(operands[len(carries) :])
    gates = len(_ONNX_ORDER[kind])
    order = _ONNX_ORDER[kind]
    if p["cell"] == "LSTMCell":  # eight Linears: four input kernels, four hidden, four biases
        blocks_i, blocks_h, blocks_b = params[:4], params[4:8], params[8:]
    else:
        blocks_i, blocks_h = _split(low, params[0], gates), _split(low, params[1], gates)
        blocks_b = params[2:]
        if blocks_b and gates > 1:
            flat = low.op("Unsqueeze", [blocks_b[0], low.ints([0])])
            blocks_b = [low.op("Squeeze", [b, low.ints([0])]) for b in _split(low, flat, gates)]

    def stacked(blocks: list[Any], axis: int) -> Any:
        ordered = [blocks[i] for i in order]
        return ordered[0] if len(ordered) == 1 else low.op("Concat", ordered, {"axis": axis})

    w = low.op(
        "Unsqueeze", [low.op("Transpose", [stacked(blocks_i, 1)], {"perm": [1, 0]}), low.ints([0])]
    )
    r = low.op(
        "Unsqueeze", [low.op("Transpose", [stacked(blocks_h, 1)], {"perm": [1, 0]}), low.ints([0])]
    )
    dtype = np.float32
    zeros = low.const(np.zeros(gates * hidden, dtype))
    bias = stacked(blocks_b, 0)
    halves = [zeros, bias] if kind == "LSTM" else [bias, zeros]  # LSTM: hidden bias; else input
    b = low.op("Unsqueeze", [low.op("Concat", halves, {"axis": 0}), low.ints([0])])
    if not p["time_major"]:
        x = low.op("Transpose", [x], {"perm": [1, 0, 2]})
    states = [low.op("Unsqueeze", [c, low.ints([0])]) for c in carries]
    if kind == "LSTM" and states:
        states = [states[1], states[0]]  # Flax (c, h) -> ONNX initial_h, initial_c
    attrs = {"hidden_size": hidden, "direction": "reverse" if p["reverse"] else "forward"}
    if kind == "GRU":
        attrs["linear_before_reset"] = 1
    outputs = 3 if kind == "LSTM" else 2
    y, y_h, *y_c = low.op(kind, [x, w, r, b, None, *states], attrs, outputs=outputs)
    y = low.op("Squeeze", [y, low.ints([1])])  # [seq, 1, batch, hidden] -> [seq, batch, hidden]
    if p["reverse"] and not p["keep_order"]:  # Flax then returns outputs in processing order
        y = low.op(
            "Slice", [y, low.ints([-1]), low.ints([-(2**63)]), low.ints([0]), low.ints([-1])]
        )
    if not p["time_major"]:
        y = low.op("Transpose", [y], {"perm": [1, 0, 2]})
    h = low.op("Squeeze", [y_h, low.ints([0])])
    if kind == "LSTM":
        return [low.op("Squeeze", [y_c[0], low.ints([0])]), h, y]
    return [h, y]
