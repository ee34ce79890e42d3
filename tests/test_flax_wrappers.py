"""Module trees of wrapped models: a FlaxPreTrainedModel-shaped wrapper (a real linen module,
its params dict and a ``__call__`` that runs ``module.apply``, as Hugging Face's Flax models
are built), equinox modules through the built-in `register_module_tree` hook, a hook of
our own, and emission to torch of a capture whose output is a transposed activation (the
RegNet case). Numerics: ONNX Runtime against the model's call, rtol 1e-5 / atol 1e-5."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interop.adapters.flax import register_module_tree

import interop

nn = pytest.importorskip("flax.linen")
RTOL, ATOL = 1e-5, 1e-5
rng = np.random.default_rng(3)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(16, name="dense")(x)
        return nn.LayerNorm(name="norm")(x + nn.Dense(8, name="out")(jax.nn.gelu(h)))


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, ids, mask):
        h = nn.Embed(20, 8, name="embed")(ids)
        for i in range(2):
            h = Block(name=f"layer_{i}")(h)
        return h * mask[..., None], h[:, 0] @ jnp.ones((8, 3))


class PreTrainedLike:
    """Shaped like transformers' FlaxPreTrainedModel: ``module``, ``params``, ``__call__``."""

    def __init__(self):
        self.module = Encoder()
        example = (jnp.ones((1, 3), jnp.int32), jnp.ones((1, 3)))
        self.params = self.module.init(jax.random.key(0), *example)["params"]

    def __call__(self, input_ids, attention_mask=None, params=None, train=False):
        if attention_mask is None:  # input preparation stays the wrapper's own
            attention_mask = jnp.ones_like(input_ids)
        hidden, pooled = self.module.apply(
            {"params": params or self.params}, jnp.asarray(input_ids, "i4"),
            jnp.asarray(attention_mask, "f4"),
        )  # fmt: skip
        return {"last_hidden_state": hidden, "pooler_output": pooled}


def ids(batch):
    return rng.integers(0, 20, (batch, 5)).astype(np.int32)


def test_pretrained_shaped_wrapper_keeps_its_module_tree():
    model = PreTrainedLike()
    g = interop.trace(model, ids(2))
    assert [la.path for la in g.layers] == [
        "embed", "layer_0", "layer_0.dense", "layer_0.out", "layer_0.norm",
        "layer_1", "layer_1.dense", "layer_1.out", "layer_1.norm",
    ]  # fmt: skip
    assert g.source["class"].endswith("PreTrainedLike") and g.source["api"] == "linen"
    assert "layer_1.dense.kernel" in g.get_weights()
    n_params = sum(np.size(p) for p in jax.tree_util.tree_leaves(model.params))
    assert g.count_params() == n_params
    assert [o.name for o in g.outputs] == ["last_hidden_state", "pooler_output"]
    assert g.inputs[0].name == "input_ids" and g.inputs[0].shape[0] == "batch"
    scopes = {n.metadata_props.get("interop.scope") for n in g.model.graph}
    assert {"layer_0.dense", "layer_1.norm", "embed"} <= scopes
    run = jax.jit(lambda x: model(x))  # eager calls dispatch op by op: slow
    for batch in (2, 4):
        x = ids(batch)
        want = run(x)
        got = g.run(x)
        np.testing.assert_allclose(got[0], want["last_hidden_state"], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got[1], want["pooler_output"], rtol=RTOL, atol=ATOL)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        h = nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(h))
        return h


class WithBatchStats:
    """A wrapper whose ``params`` are collections and whose ``__call__`` takes no params
    argument (the weights are swapped in), taking and returning NCHW like HF's RegNet."""

    def __init__(self):
        self.module = ConvNet()
        self.params = dict(self.module.init(jax.random.key(1), jnp.ones((1, 6, 6, 3))))

    def __call__(self, pixel_values):
        out = self.module.apply(self.params, jnp.transpose(pixel_values, (0, 2, 3, 1)))
        return {"last_hidden_state": jnp.transpose(out, (0, 3, 1, 2))}


def test_wrapper_with_batch_stats_and_transposed_output_emits_to_torch():
    torch = pytest.importorskip("torch")
    model = WithBatchStats()
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    g = interop.trace(model, x)
    assert [la.path for la in g.layers] == ["conv", "bn"]
    assert (
        g.parameter_kinds["bn.mean"] == "buffer" and g.parameter_kinds["conv.kernel"] == "trainable"
    )
    assert g.count_params() == 3 * 3 * 3 * 4 + 4 + 4 + 4  # conv kernel + bias, bn scale + bias
    want = jax.jit(lambda x: model(x))(x)["last_hidden_state"]
    np.testing.assert_allclose(g.run(x), want, rtol=RTOL, atol=ATOL)
    # the graph output is a Transpose of an activation region: simplify must keep it
    module = interop.to_torch(g)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_equinox_modules_through_the_builtin_hook():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.key(0))
    x = rng.standard_normal(4).astype(np.float32)
    g = interop.trace(mlp, x, dynamic_batch=False)
    assert [la.path for la in g.layers] == ["layers.0", "layers.1", "layers.2"]
    assert list(g.get_weights())[:2] == ["layers.0.weight", "layers.0.bias"]
    assert g.count_params() == 4 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2
    assert g.source["api"] == "equinox"
    assert {"layers.0", "layers.2"} <= {
        n.metadata_props.get("interop.scope") for n in g.model.graph
    }
    np.testing.assert_allclose(g.run(x), mlp(x), rtol=RTOL, atol=ATOL)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Affine:
    w: jax.Array
    b: jax.Array

    def __call__(self, x):
        return x @ self.w + self.b


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TwoLayers:
    first: Affine
    second: Affine

    def __call__(self, x):
        return self.second(jnp.tanh(self.first(x)))


def test_a_library_registers_its_module_tree():
    from interop.adapters.flax.capture_wrappers import MODULE_TREES, walk_fields

    model = TwoLayers(
        Affine(jnp.asarray(rng.standard_normal((3, 5)), jnp.float32), jnp.zeros(5)),
        Affine(jnp.asarray(rng.standard_normal((5, 2)), jnp.float32), jnp.ones(2)),
    )
    hook = register_module_tree(
        "pytree-dataclasses",
        lambda m: isinstance(m, TwoLayers | Affine),
        lambda m: (m, lambda params: params),  # the model is its own weight pytree
        lambda m: walk_fields(m, lambda x: isinstance(x, TwoLayers | Affine)),
    )
    try:
        x = rng.standard_normal((4, 3)).astype(np.float32)
        g = interop.trace(model, x)
        assert [la.path for la in g.layers] == ["first", "second"]
        assert sorted(g.get_weights()) == ["first.b", "first.w", "second.b", "second.w"]
        assert {"first", "second"} <= {n.metadata_props.get("interop.scope") for n in g.model.graph}
        np.testing.assert_allclose(g.run(x), model(x), rtol=RTOL, atol=ATOL)
    finally:
        MODULE_TREES.remove(hook)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


def test_linen_modules_called_through_apply_keep_their_tree():
    import functools

    net = Net()
    x = rng.standard_normal((2, 4)).astype(np.float32)
    variables = net.init(jax.random.key(0), x)
    # partial(module.apply, variables): the weights are the variables, named by path
    g = interop.trace(functools.partial(net.apply, variables), x)
    assert [la.path for la in g.layers] == ["hidden", "out"]
    assert sorted(g.get_weights()) == ["hidden.bias", "hidden.kernel", "out.bias", "out.kernel"]
    np.testing.assert_allclose(g.run(x), net.apply(variables, x), rtol=RTOL, atol=ATOL)

    # a function that calls apply: its closed-over weights, the modules' scopes and layers
    def fn(x):
        return net.apply(variables, x) * 2

    g = interop.trace(fn, x)
    assert [la.path for la in g.layers] == ["hidden", "out"]
    assert "variables.params.hidden.kernel" in g.get_weights() and g.count_params() == 67
    assert {"hidden", "out"} <= {n.metadata_props.get("interop.scope") for n in g.model.graph}
    x5 = rng.standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(g.run(x5), fn(x5), rtol=RTOL, atol=ATOL)
