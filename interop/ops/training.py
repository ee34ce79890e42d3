"""ai.onnx.preview.training optimizer ops: Adagrad, Adam, Momentum (one update step).

Registered as ``"ai.onnx.preview.training::<Op>"`` (ops outside the default domain are
keyed with their domain). Inputs are R (learning rate), T (step count), then the
tensors grouped by role: X1..Xn, G1..Gn, and one or two state groups; outputs are the
updated groups in the same order.
"""

from __future__ import annotations

import numpy as np

from . import op

DOMAIN = "ai.onnx.preview.training"


def _host_scalar(xp, value) -> float:
    # the learning rate and step count are scalars read once per step, like Slice's starts
    return float(np.asarray(xp.to_numpy(value)).reshape(-1)[0])


def _groups(tensors, count):
    """tensors split into `count` equal role groups (X..., G..., V..., H...)."""
    n = len(tensors) // count
    return [tensors[i * n : (i + 1) * n] for i in range(count)]


def _scalar(xp, value, like):
    return xp.asarray(value, xp.dtype(like), like=like)


def _regularized(xp, x, g, norm_coefficient):
    if not norm_coefficient:
        return g
    return xp.add(xp.multiply(_scalar(xp, norm_coefficient, x), x), g)


@op(f"{DOMAIN}::Adagrad")
def adagrad(xp, r, t, *tensors, decay_factor=0.0, epsilon=0.0, norm_coefficient=0.0):
    """Adagrad: H += g^2; X -= r / (1 + T decay) * g / (sqrt(H) + epsilon)."""
    rate = _host_scalar(xp, r) / (1.0 + _host_scalar(xp, t) * decay_factor)
    xs, gs, hs = _groups(tensors, 3)
    new_x, new_h = [], []
    for x, g, h in zip(xs, gs, hs):
        g = _regularized(xp, x, g, norm_coefficient)
        h = xp.add(h, xp.multiply(g, g))
        root = xp.add(xp.unary("sqrt", h), _scalar(xp, epsilon, h))
        step = xp.multiply(_scalar(xp, rate, g), xp.divide(g, root))
        new_x.append(xp.subtract(x, step))
        new_h.append(h)
    return (*new_x, *new_h)


@op(f"{DOMAIN}::Adam")
def adam(
    xp,
    r,
    t,
    *tensors,
    alpha=0.9,
    beta=0.999,
    epsilon=0.0,
    norm_coefficient=0.0,
    norm_coefficient_post=0.0,
):
    """Adam with bias correction from step T > 0 and optional pre/post L2 terms."""
    rate, step_count = _host_scalar(xp, r), _host_scalar(xp, t)
    if step_count > 0:
        rate = rate * np.sqrt(1 - beta**step_count) / (1 - alpha**step_count)
    xs, gs, vs, hs = _groups(tensors, 4)
    new_x, new_v, new_h = [], [], []
    for x, g, v, h in zip(xs, gs, vs, hs):
        g = _regularized(xp, x, g, norm_coefficient)
        v = xp.add(xp.multiply(_scalar(xp, alpha, v), v), xp.multiply(_scalar(xp, 1 - alpha, g), g))
        h = xp.add(
            xp.multiply(_scalar(xp, beta, h), h),
            xp.multiply(_scalar(xp, 1 - beta, g), xp.multiply(g, g)),
        )
        root = xp.add(xp.unary("sqrt", h), _scalar(xp, epsilon, h))
        x = xp.subtract(x, xp.multiply(_scalar(xp, rate, v), xp.divide(v, root)))
        if norm_coefficient_post:
            x = xp.multiply(_scalar(xp, 1 - norm_coefficient_post, x), x)
        new_x.append(x)
        new_v.append(v)
        new_h.append(h)
    return (*new_x, *new_v, *new_h)


@op(f"{DOMAIN}::Momentum")
def momentum(xp, r, t, *tensors, alpha, beta, mode, norm_coefficient):
    """Momentum (standard or Nesterov); the first step (T = 0) takes the full gradient."""
    rate = _host_scalar(xp, r)
    gain = beta if _host_scalar(xp, t) > 0 else 1.0
    xs, gs, vs = _groups(tensors, 3)
    new_x, new_v = [], []
    for x, g, v in zip(xs, gs, vs):
        g = _regularized(xp, x, g, norm_coefficient)
        v = xp.add(xp.multiply(_scalar(xp, alpha, v), v), xp.multiply(_scalar(xp, gain, g), g))
        direction = v if mode == "standard" else xp.add(g, xp.multiply(_scalar(xp, alpha, v), v))
        new_x.append(xp.subtract(x, xp.multiply(_scalar(xp, rate, direction), direction)))
        new_v.append(v)
    return (*new_x, *new_v)
