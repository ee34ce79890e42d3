"""Flax linen capture: (module, variables) tuples and bound modules, CNN and transformer,
nn.scan over layers. Numerics against ``module.apply`` (rtol 1e-4, atol 1e-5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interop

nn = pytest.importorskip("flax.linen")

RTOL, ATOL = 1e-4, 1e-5
rng = np.random.default_rng(1)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(16, (3, 3), padding="VALID", name="features")(x)
        x = nn.Dropout(0.2, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(10)(x)


def test_linen_cnn_tuple_and_bound_module():
    module, x = CNN(), f32(2, 16, 16, 3)
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(
            lambda v: v + 0.5, variables["batch_stats"]
        ),  # non-trivial stats
    }
    # Traced with train left at its default (True): the graph still has inference
    # semantics, so the reference is apply(..., train=False).
    g = interop.trace((module, variables), x)
    for inputs in (x, f32(5, 16, 16, 3)):
        expected = module.apply(variables, inputs, train=False)
        np.testing.assert_allclose(g.run(inputs), expected, rtol=RTOL, atol=ATOL)
    assert [la.path for la in g.layers] == [
        "Conv_0",
        "BatchNorm_0",
        "features",
        "Dropout_0",
        "Dense_0",
    ]
    assert g.count_params() == count(variables["params"])
    assert g.parameter_kinds["BatchNorm_0.mean"] == "buffer"
    assert g.parameter_kinds["features.kernel"] == "trainable"
    assert g.source["api"] == "linen"
    (drop,) = [n for n in g.model.graph if n.op_type == "Dropout"]
    assert drop.metadata_props["interop.scope"] == "Dropout_0"
    bound = module.bind(variables)
    g2 = interop.trace(bound, x)
    np.testing.assert_array_equal(g2.run(x), g.run(x))
    assert interop.verify((module, variables), g, (x,), rtol=RTOL, atol=ATOL).ok


class MLPBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(y, y)
        x = x + y
        y = nn.Dense(4 * self.dim)(nn.LayerNorm()(x))
        return x + nn.Dense(self.dim)(nn.gelu(y))


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(30, 8)(tokens)
        for i in range(2):
            x = MLPBlock(8, name=f"block_{i}")(x)
        return nn.Dense(2)(x.mean(axis=1))


def test_linen_transformer_block_hierarchy_and_numerics():
    module = Transformer()
    tokens = rng.integers(0, 30, (2, 5)).astype(np.int32)
    variables = module.init(jax.random.key(0), tokens)
    g = interop.trace((module, variables), tokens, dynamic_dims={"tokens": {1: "seq"}})
    for t in (tokens, rng.integers(0, 30, (4, 9)).astype(np.int32)):
        report = interop.verify((module, variables), g, (t,), rtol=RTOL, atol=ATOL)
        assert report.ok, str(report)
    paths = [la.path for la in g.layers]
    assert (
        "block_1.attn.query" in paths
        and g.layer("block_1.attn").class_name == "MultiHeadDotProductAttention"
    )
    assert g.layer("block_0").parent.path == ""
    assert g.count_params() == count(variables["params"])
    assert "block_0.attn.query.kernel" in g.get_weights()


class ScanStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        layer = nn.scan(_Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
            name="layers"
        )
        x, _ = layer(x, None)
        return x


class _Step(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(6)(h)), None


def test_linen_scan_over_layers_is_a_loop():
    module, x = ScanStack(), f32(2, 6)
    variables = module.init(jax.random.key(0), x)
    g = interop.trace((module, variables), x)
    assert [n.op_type for n in g.model.graph].count("Loop") == 1
    assert "MatMul" not in [n.op_type for n in g.model.graph]
    for inputs in (x, f32(7, 6)):
        assert interop.verify((module, variables), g, (inputs,), rtol=RTOL, atol=ATOL).ok
    assert g.get_weights()["layers.Dense_0.kernel"].shape == (3, 6, 6)
    assert g.count_params() == count(variables["params"])


class SetupMLP(nn.Module):
    def setup(self):
        self.hidden = nn.Dense(4)
        self.out = nn.Dense(2)

    def __call__(self, x):
        return self.out(nn.relu(self.hidden(x)))


def test_linen_setup_style_module_names_its_submodules():
    module, x = SetupMLP(), f32(2, 3)
    variables = module.init(jax.random.key(0), x)
    g = interop.trace((module, variables), x)
    assert [la.path for la in g.layers] == ["hidden", "out"]
    for inputs in (x, f32(6, 3)):
        np.testing.assert_allclose(
            g.run(inputs), module.apply(variables, inputs), rtol=RTOL, atol=ATOL
        )


class _Sorts(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.bitwise_xor.reduce(nn.Dense(3, name="proj")(x) > 0, axis=1)


class _Outer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Sorts(name="inner")(x)


def test_unsupported_primitive_in_linen_names_the_module_path():
    module, x = _Outer(), f32(2, 3)
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(interop.UnsupportedOpError, match="in layer 'inner'") as info:
        interop.trace((module, variables), x)
    assert info.value.op == "reduce_xor" and "test_flax_linen.py" in info.value.location
