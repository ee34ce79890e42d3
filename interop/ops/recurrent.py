"""Recurrent ONNX ops (RNN, GRU, LSTM) as loops over time of backend matmuls.

Gate orders follow the spec: LSTM i, o, f, c; GRU z, r, h. Weights stay in ONNX layout;
the torch emitter maps them onto nn.LSTM / nn.GRU where it can.
"""

from __future__ import annotations

import numpy as np

from . import SEMANTICS, op


def _activation(xp, name, x, alpha=None, beta=None):
    kwargs = {}
    if name in ("LeakyRelu", "ThresholdedRelu", "Elu") and alpha is not None:
        kwargs["alpha"] = alpha
    if name in ("HardSigmoid", "ScaledTanh", "Affine"):
        if name == "ScaledTanh":
            return xp.multiply(
                xp.asarray(alpha, xp.dtype(x), like=x),
                xp.unary("tanh", xp.multiply(x, xp.asarray(beta, xp.dtype(x), like=x))),
            )
        if name == "Affine":
            return xp.add(
                xp.multiply(x, xp.asarray(alpha, xp.dtype(x), like=x)),
                xp.asarray(beta, xp.dtype(x), like=x),
            )
        # an attribute left out keeps HardSigmoid's own default (alpha 0.2, beta 0.5)
        kwargs = {k: v for k, v in (("alpha", alpha), ("beta", beta)) if v is not None}
    return SEMANTICS.lookup(name)(xp, x, **kwargs)


def _activations(names, alphas, betas, per_direction, directions):
    names = list(names) if names else None
    alphas, betas = list(alphas or []), list(betas or [])
    result = []
    for d in range(directions):
        chosen = (
            names[d * per_direction : (d + 1) * per_direction]
            if names and len(names) >= (d + 1) * per_direction
            else (names[:per_direction] if names else None)
        )
        a = (
            alphas[d * per_direction : (d + 1) * per_direction]
            if alphas
            else [None] * per_direction
        )
        b = betas[d * per_direction : (d + 1) * per_direction] if betas else [None] * per_direction
        a = a + [None] * (per_direction - len(a))
        b = b + [None] * (per_direction - len(b))
        result.append(list(zip(chosen, a, b, strict=False)) if chosen else None)
    return result


def _recurrence(
    xp,
    kind,
    x,
    w,
    r,
    b,
    sequence_lens,
    initial_h,
    initial_c,
    p,
    *,
    activations,
    activation_alpha,
    activation_beta,
    clip,
    direction,
    hidden_size,
    layout,
    input_forget=0,
    linear_before_reset=0,
):
    if layout:  # batch-major: work in time-major, transpose back at the end
        x = xp.permute_dims(x, [1, 0, 2])
        initial_h = None if initial_h is None else xp.permute_dims(initial_h, [1, 0, 2])
        initial_c = None if initial_c is None else xp.permute_dims(initial_c, [1, 0, 2])
    steps, batch = xp.shape(x)[:2]
    hidden = hidden_size or xp.shape(r)[-1]
    directions = 2 if direction == "bidirectional" else 1
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[kind]
    defaults = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}[
        kind
    ]
    chosen = _activations(activations, activation_alpha, activation_beta, len(defaults), directions)
    lengths = (
        None if sequence_lens is None else np.asarray(xp.to_numpy(sequence_lens)).astype(np.int64)
    )
    dtype = xp.dtype(x)
    zeros = xp.full([batch, hidden], 0, dtype, like=x)
    outputs, last_h, last_c = [], [], []
    for d in range(directions):
        acts = chosen[d] or [(name, None, None) for name in defaults]

        def act(i, value, acts=acts):
            return _activation(xp, acts[i][0], value, acts[i][1], acts[i][2])

        w_t = xp.permute_dims(xp.getitem(w, d), [1, 0])
        r_t = xp.permute_dims(xp.getitem(r, d), [1, 0])
        bias = (
            xp.getitem(b, d) if b is not None else xp.full([2 * gates * hidden], 0, dtype, like=x)
        )
        wb = xp.getitem(bias, slice(0, gates * hidden))
        rb = xp.getitem(bias, slice(gates * hidden, 2 * gates * hidden))
        h = xp.getitem(initial_h, d) if initial_h is not None else zeros
        c = xp.getitem(initial_c, d) if initial_c is not None else zeros
        peep = xp.getitem(p, d) if p is not None else None
        reverse = direction == "reverse" or d == 1
        per_step = [None] * steps
        for step in range(steps):
            t = steps - 1 - step if reverse else step
            projected = xp.add(xp.matmul(xp.getitem(x, t), w_t), wb)
            if kind == "RNN":
                new_h = act(0, xp.add(xp.add(projected, xp.matmul(h, r_t)), rb))
                new_c = c
            elif kind == "GRU":
                z_x, r_x, h_x = (
                    xp.getitem(projected, (slice(None), slice(i * hidden, (i + 1) * hidden)))
                    for i in range(3)
                )
                r_h = xp.add(xp.matmul(h, r_t), rb)
                z_h, r_hh, h_h = (
                    xp.getitem(r_h, (slice(None), slice(i * hidden, (i + 1) * hidden)))
                    for i in range(3)
                )
                z = act(0, _clip(xp, xp.add(z_x, z_h), clip))
                reset = act(0, _clip(xp, xp.add(r_x, r_hh), clip))
                if linear_before_reset:
                    candidate = xp.add(h_x, xp.multiply(reset, h_h))
                else:
                    r_rows = xp.getitem(r_t, (slice(None), slice(2 * hidden, 3 * hidden)))
                    rb_h = xp.getitem(rb, slice(2 * hidden, 3 * hidden))
                    candidate = xp.add(h_x, xp.add(xp.matmul(xp.multiply(reset, h), r_rows), rb_h))
                candidate = act(1, _clip(xp, candidate, clip))
                one = xp.asarray(1, dtype, like=x)
                new_h = xp.add(xp.multiply(xp.subtract(one, z), candidate), xp.multiply(z, h))
                new_c = c
            else:
                total = xp.add(xp.add(projected, xp.matmul(h, r_t)), rb)
                i_g, o_g, f_g, c_g = (
                    xp.getitem(total, (slice(None), slice(k * hidden, (k + 1) * hidden)))
                    for k in range(4)
                )
                if peep is not None:
                    p_i, p_o, p_f = (
                        xp.getitem(peep, slice(k * hidden, (k + 1) * hidden)) for k in range(3)
                    )
                    i_g, f_g = xp.add(i_g, xp.multiply(p_i, c)), xp.add(f_g, xp.multiply(p_f, c))
                i_g = act(0, _clip(xp, i_g, clip))
                f_g = act(0, _clip(xp, f_g, clip))
                if input_forget:
                    f_g = xp.subtract(xp.asarray(1, dtype, like=x), i_g)
                c_g = act(1, _clip(xp, c_g, clip))
                new_c = xp.add(xp.multiply(f_g, c), xp.multiply(i_g, c_g))
                if peep is not None:
                    o_g = xp.add(o_g, xp.multiply(p_o, new_c))
                o_g = act(0, _clip(xp, o_g, clip))
                new_h = xp.multiply(o_g, act(2, new_c))
            if lengths is not None:  # past a row's length: keep the state, output zeros
                alive = xp.asarray((t < lengths).reshape(-1, 1), like=x)
                new_h = xp.where(alive, new_h, h)
                new_c = xp.where(alive, new_c, c)
                per_step[t] = xp.where(alive, new_h, zeros)
            else:
                per_step[t] = new_h
            h, c = new_h, new_c
        outputs.append(xp.stack(per_step, 0))
        last_h.append(h)
        last_c.append(c)
    y = xp.stack(outputs, 1)  # seq, directions, batch, hidden
    y_h, y_c = xp.stack(last_h, 0), xp.stack(last_c, 0)
    if layout:
        y = xp.permute_dims(y, [2, 0, 1, 3])
        y_h, y_c = xp.permute_dims(y_h, [1, 0, 2]), xp.permute_dims(y_c, [1, 0, 2])
    return (y, y_h, y_c) if kind == "LSTM" else (y, y_h)


def _clip(xp, value, clip):
    return value if clip is None else xp.clip(value, -clip, clip)


@op("LSTM")
def lstm(
    xp,
    x,
    w,
    r,
    b=None,
    sequence_lens=None,
    initial_h=None,
    initial_c=None,
    p=None,
    activation_alpha=None,
    activation_beta=None,
    activations=None,
    clip=None,
    direction="forward",
    hidden_size=None,
    input_forget=0,
    layout=0,
):
    return _recurrence(
        xp,
        "LSTM",
        x,
        w,
        r,
        b,
        sequence_lens,
        initial_h,
        initial_c,
        p,
        activations=activations,
        activation_alpha=activation_alpha,
        activation_beta=activation_beta,
        clip=clip,
        direction=direction,
        hidden_size=hidden_size,
        layout=layout,
        input_forget=input_forget,
    )


@op("GRU")
def gru(
    xp,
    x,
    w,
    r,
    b=None,
    sequence_lens=None,
    initial_h=None,
    activation_alpha=None,
    activation_beta=None,
    activations=None,
    clip=None,
    direction="forward",
    hidden_size=None,
    layout=0,
    linear_before_reset=0,
):
    return _recurrence(
        xp,
        "GRU",
        x,
        w,
        r,
        b,
        sequence_lens,
        initial_h,
        None,
        None,
        activations=activations,
        activation_alpha=activation_alpha,
        activation_beta=activation_beta,
        clip=clip,
        direction=direction,
        hidden_size=hidden_size,
        layout=layout,
        linear_before_reset=linear_before_reset,
    )


@op("RNN")
def rnn(
    xp,
    x,
    w,
    r,
    b=None,
    sequence_lens=None,
    initial_h=None,
    activation_alpha=None,
    activation_beta=None,
    activations=None,
    clip=None,
    direction="forward",
    hidden_size=None,
    layout=0,
):
    return _recurrence(
        xp,
        "RNN",
        x,
        w,
        r,
        b,
        sequence_lens,
        initial_h,
        None,
        None,
        activations=activations,
        activation_alpha=activation_alpha,
        activation_beta=activation_beta,
        clip=clip,
        direction=direction,
        hidden_size=hidden_size,
        layout=layout,
    )
