"""The nesting matrix: guests {torch, keras, flax} x hosts {torch, keras, flax}.

Each combination checks numerics against the guest's own framework, and one training
step in the host that lowers the loss and changes the guest's weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nesting_guests import GUESTS

import interop

keras = pytest.importorskip("keras")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
MATRIX = [
    (g, h) for g in ("torch_cnn", "keras_cnn", "flax_cnn") for h in ("torch", "keras", "flax")
]
MATRIX += [
    (g, h)
    for g in ("torch_transformer", "keras_transformer", "flax_transformer")
    for h in ("torch", "keras", "flax")
]


def _other_batch(x, batch=3):
    return np.random.default_rng(1).standard_normal((batch, *x.shape[1:])).astype(np.float32)


def _torch_host(model, x):
    guest = interop.torch.Module(model, example_inputs=(x,))
    head = torch.nn.Linear(guest.graph.outputs[0].shape[-1], 1)
    host = torch.nn.Sequential(guest, head)
    xb = torch.from_numpy(_other_batch(x))
    with torch.no_grad():
        out = guest.eval()(xb).numpy()  # inference semantics, as the source ran
    host.train()
    before = [p.detach().clone() for p in guest.parameters()]
    optimizer = torch.optim.SGD(host.parameters(), lr=0.05)
    loss = host(xb).pow(2).mean()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = host(xb).pow(2).mean()
    loss = loss.detach()
    changed = any(not torch.equal(a, b) for a, b in zip(before, guest.parameters()))
    return out, float(loss), float(after), changed


def _keras_host(model, x):
    layer = interop.keras.Layer(model, example_inputs=(x,), name="guest")
    inp = keras.Input(x.shape[1:])
    out = keras.layers.Dense(1, name="head")(layer(inp))
    host = keras.Model(inp, out)
    xb = _other_batch(x)
    guest_out = keras.ops.convert_to_numpy(layer(xb))
    before = [keras.ops.convert_to_numpy(w).copy() for w in layer.trainable_weights]
    host.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    target = np.zeros((xb.shape[0], *out.shape[1:]), np.float32)
    loss = host.train_on_batch(xb, target)
    after = host.train_on_batch(xb, target)
    changed = any(
        not np.array_equal(b, keras.ops.convert_to_numpy(w))
        for b, w in zip(before, layer.trainable_weights)
    )
    return guest_out, float(loss), float(after), changed


def _flax_host(model, x):
    class Host(nnx.Module):
        def __init__(self):
            self.guest = interop.flax.Module(model, example_inputs=(x,))
            self.head = nnx.Linear(self.guest.graph.outputs[0].shape[-1], 1, rngs=nnx.Rngs(0))

        def __call__(self, a):
            return self.head(self.guest(a))

    host = Host()
    xb = _other_batch(x)
    guest_out = np.asarray(host.guest(xb))
    before = nnx.state(host.guest, nnx.Param)
    before = [np.asarray(v) for v in __import__("jax").tree_util.tree_leaves(before)]
    optimizer = nnx.Optimizer(host, optax.sgd(0.05), wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean(m(xb) ** 2)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    loss = step(host, optimizer)
    after = loss_fn(host)
    now = [
        np.asarray(v)
        for v in __import__("jax").tree_util.tree_leaves(nnx.state(host.guest, nnx.Param))
    ]
    changed = any(not np.array_equal(a, b) for a, b in zip(before, now))
    return guest_out, float(loss), float(after), changed


HOSTS = {"torch": _torch_host, "keras": _keras_host, "flax": _flax_host}


@pytest.mark.parametrize(("guest", "host"), MATRIX, ids=[f"{g}-in-{h}" for g, h in MATRIX])
def test_guest_in_host(guest, host):
    model, x, run_source = GUESTS[guest]()
    guest_out, loss, after, changed = HOSTS[host](model, x)
    np.testing.assert_allclose(guest_out, run_source(_other_batch(x)), rtol=RTOL, atol=ATOL)
    assert after < loss, (loss, after)
    assert changed, "the guest's weights did not train"


def test_keras_definition_time_checks():
    model, x, _ = GUESTS["torch_cnn"]()
    layer = interop.keras.Layer(model, example_inputs=(x,))
    assert tuple(layer(keras.Input((3, 16, 16))).shape) == (None, 6)
    with pytest.raises(
        interop.ShapeError, match=r"Input 'x' of guest 'ResNetish' got shape \(None, 16, 16, 3\)"
    ):
        layer(keras.Input((16, 16, 3)))  # NHWC given to an NCHW guest
    with pytest.raises(interop.ShapeError, match="rank|shape"):
        layer(keras.Input((3, 16)))
    with pytest.raises(interop.ShapeError, match="dtype"):
        layer(keras.Input((3, 16, 16), dtype="int32"))


def test_torch_and_flax_hosts_check_inputs():
    model, x, _ = GUESTS["keras_cnn"]()
    with pytest.raises(interop.ShapeError, match="got shape"):
        interop.torch.Module(model, example_inputs=(x,))(torch.randn(2, 3, 16, 16))
    with pytest.raises(interop.ShapeError, match="got shape"):
        interop.flax.Module(model, example_inputs=(x,))(np.zeros((2, 3, 16, 16), np.float32))


def test_flax_host_split_merge():
    model, x, run_source = GUESTS["torch_cnn"]()
    guest = interop.flax.Module(model, example_inputs=(x,))
    graphdef, state = nnx.split(guest)
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(guest(x)))
    np.testing.assert_allclose(np.asarray(again(x)), run_source(x), rtol=RTOL, atol=ATOL)


def test_flax_host_trains_through_pooling_under_jit():
    """Max and average pooling must be differentiable inside nnx.jit (a torch CNN guest)."""
    torch.manual_seed(0)
    guest = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
    ).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 10, 10)).astype(np.float32)
    module = interop.flax.Module(guest, example_inputs=(x,))
    optimizer = nnx.Optimizer(module, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(m)
        opt.update(m, grads)
        return loss

    first = float(step(module, optimizer))
    assert float(jnp.mean(module(x) ** 2)) < first
