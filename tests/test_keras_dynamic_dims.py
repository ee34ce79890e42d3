"""Issue 22 part 1: shapes a Keras ``call`` reads at run time stay symbolic in the graph.

``ops.shape(x)[i]`` of a dynamic axis, and arithmetic on it, become graph values
(Shape / Gather / arithmetic) in reshape, broadcast_to, zeros / ones / full, arange,
split and slicing, so a traced model runs at batch sizes and lengths other than the
example's. A keras.io-style ViT and a text transformer are checked against Keras at
three batch sizes (and three lengths), and their torch / Flax emissions at a fourth.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from keras import layers, ops

import interop

RS = np.random.RandomState(0)


def _close(graph, model, x, tol=1e-4):
    want = ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(graph.run(x), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- op families
OPS = {
    "reshape_product": lambda x: ops.reshape(x, (ops.shape(x)[0] * ops.shape(x)[1], 6)),
    "reshape_moves_batch": lambda x: ops.reshape(x, (-1, ops.shape(x)[0], 6)),  # ONNX's 0 is wrong here
    "tile": lambda x: ops.tile(ops.ones((1, 1, 6)), (ops.shape(x)[0], ops.shape(x)[1], 1)) + x,
    "broadcast_to": lambda x: ops.concatenate(
        [ops.broadcast_to(ops.ones((1, 1, 6)), (ops.shape(x)[0], 1, 6)), x], axis=1
    ),
    "zeros_ones_full": lambda x: x + ops.zeros((ops.shape(x)[0], ops.shape(x)[1], 6))
    + ops.ones((ops.shape(x)[0], 1, 1)) * 2 + ops.full((ops.shape(x)[0], 1, 6), 3.0),
    "arange": lambda x: x + ops.cast(ops.reshape(ops.arange(ops.shape(x)[1]), (1, -1, 1)), "float32")
    + ops.cast(ops.reshape(ops.arange(1, ops.shape(x)[1] + 1, 1), (1, -1, 1)), "float32"),
    "slicing": lambda x: x[:, : ops.shape(x)[1] // 2] * 2 + x[:, ops.shape(x)[1] - ops.shape(x)[1] // 2 :],
    "index": lambda x: x[:, ops.shape(x)[1] - 1] + x[..., 0, :],
}  # fmt: skip


class _Split(keras.Model):  # Keras's TF backend cannot infer a Lambda of split by a tensor
    def call(self, x):
        head, tail = ops.split(x, [ops.shape(x)[1] // 2], axis=1)
        window = ops.slice(x, (0, 1, 0), (ops.shape(x)[0], ops.shape(x)[1] - 1, 6))
        return ops.concatenate([tail, head], axis=1)[:, 1:] + window


@pytest.mark.parametrize("name", [*OPS, "split_slice"])
def test_run_time_sizes_stay_symbolic(name):
    if name == "split_slice":
        model = _Split()
    else:
        i = keras.Input((None, 6), name="x")
        model = keras.Model(i, layers.Lambda(OPS[name], name="fn")(i))
    x = RS.rand(2, 4, 6).astype("float32")
    model(x)
    g = interop.trace(
        model, x, dynamic_dims={"input": {1: "seq"}} if name == "split_slice" else None
    )
    assert g.inputs[0].shape[:2] == (
        "batch",
        "seq" if name == "split_slice" else "x_dim1",
    )
    ops_used = {n.op_type for n in g.model.graph}
    assert "Shape" in ops_used, ops_used
    for shape in [(2, 4, 6), (1, 6, 6), (3, 2, 6), (5, 8, 6)]:
        _close(g, model, RS.rand(*shape).astype("float32"), tol=1e-6)


# ---------------------------------------------------------------------------- keras.io ViT
class Patches(layers.Layer):
    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, images):
        input_shape = ops.shape(images)
        batch_size, height, width, channels = input_shape
        p = self.patch_size
        x = ops.reshape(images, (batch_size * (height // p), p, width // p, p, channels))
        x = ops.transpose(x, (0, 2, 1, 3, 4))
        return ops.reshape(x, (batch_size, (height // p) * (width // p), p * p * channels))


class PatchEncoder(layers.Layer):
    def __init__(self, num_patches, dim, **kwargs):
        super().__init__(**kwargs)
        self.num_patches = num_patches
        self.projection = layers.Dense(dim)
        self.position_embedding = layers.Embedding(num_patches, dim)

    def call(self, patch):
        positions = ops.expand_dims(ops.arange(start=0, stop=self.num_patches, step=1), axis=0)
        return self.projection(patch) + self.position_embedding(positions)


class Block(layers.Layer):
    def __init__(self, dim, heads=2, **kwargs):
        super().__init__(**kwargs)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6)
        self.attention = layers.MultiHeadAttention(heads, dim // heads)
        self.norm2 = layers.LayerNormalization(epsilon=1e-6)
        self.mlp1 = layers.Dense(dim * 2, activation="gelu")
        self.mlp2 = layers.Dense(dim)

    def call(self, x, attention_mask=None):
        h = self.norm1(x)
        x = x + self.attention(h, h, attention_mask=attention_mask)
        return x + self.mlp2(self.mlp1(self.norm2(x)))


class ViT(keras.Model):
    def __init__(self):
        super().__init__()
        self.patches = Patches(4)
        self.encoder = PatchEncoder(16, 32)
        self.cls = self.add_weight((1, 1, 32), initializer="random_normal", name="cls")
        self.blocks = [Block(32) for _ in range(2)]
        self.norm = layers.LayerNormalization(epsilon=1e-6)
        self.head = layers.Dense(5)

    def call(self, images):
        x = self.encoder(self.patches(images))
        cls = ops.broadcast_to(self.cls, (ops.shape(images)[0], 1, 32))
        x = ops.concatenate([cls, x], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class TextTransformer(keras.Model):
    def __init__(self, vocab=50, dim=16, max_len=32):
        super().__init__()
        self.tokens = layers.Embedding(vocab, dim)
        self.positions = layers.Embedding(max_len, dim)
        self.blocks = [Block(dim) for _ in range(2)]
        self.head = layers.Dense(3)

    def call(self, ids):
        length = ops.shape(ids)[1]
        x = self.tokens(ids) + ops.expand_dims(self.positions(ops.arange(length)), 0)
        causal = ops.arange(length)[:, None] >= ops.arange(length)[None, :]
        mask = ops.broadcast_to(ops.expand_dims(causal, 0), (ops.shape(ids)[0], length, length))
        for block in self.blocks:
            x = block(x, attention_mask=mask)
        return self.head(ops.mean(x, axis=1))


def _emitted_close(graph, model, x):
    import torch

    want = ops.convert_to_numpy(model(x))
    module = interop.to_torch(graph)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), want, rtol=1e-4, atol=1e-4)
    flax_module = interop.to_flax(graph)
    np.testing.assert_allclose(np.asarray(flax_module(x)), want, rtol=1e-4, atol=1e-4)


def test_vit_runs_at_other_batch_sizes():
    model = ViT()
    x = RS.rand(2, 16, 16, 3).astype("float32")
    model(x)
    g = interop.trace(model, x)
    assert g.inputs[0].shape == ("batch", 16, 16, 3)
    for batch in (2, 1, 4):
        _close(g, model, RS.rand(batch, 16, 16, 3).astype("float32"))
    _emitted_close(g, model, RS.rand(3, 16, 16, 3).astype("float32"))


def test_text_transformer_runs_at_other_batches_and_lengths():
    model = TextTransformer()
    ids = RS.randint(0, 50, size=(2, 8)).astype("int32")
    model(ids)
    g = interop.trace(model, ids, dynamic_dims={"input": {1: "seq"}})
    assert g.inputs[0].shape == ("batch", "seq")
    for batch, length in [(2, 8), (1, 8), (4, 8), (2, 5), (3, 13)]:
        _close(g, model, RS.randint(0, 50, size=(batch, length)).astype("int32"))
    _emitted_close(g, model, RS.randint(0, 50, size=(5, 11)).astype("int32"))


# ---------------------------------------------------------------------------- other backends
SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, interop
    from keras import layers, ops
    assert keras.backend.backend() == BACKEND

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(6)
        def call(self, x):
            b, t = ops.shape(x)[0], ops.shape(x)[1]
            y = ops.reshape(self.dense(x), (b * t, 6)) + ops.ones((b * t, 1))
            y = ops.reshape(y, (b, t, 6)) + ops.cast(ops.arange(t)[None, :, None], "float32")
            head, tail = ops.split(y, [t // 2], axis=1)
            return ops.concatenate([tail, head], axis=1)[:, : t - 1] + ops.broadcast_to(x[:, :1], (b, t - 1, 6))

    rs = np.random.RandomState(0)
    net = Net(); x = rs.rand(2, 4, 6).astype("float32"); net(x)
    g = interop.trace(net, x, dynamic_dims={"input": {1: "seq"}})
    for shape in [(2, 4, 6), (1, 7, 6), (5, 3, 6)]:
        xx = rs.rand(*shape).astype("float32")
        np.testing.assert_allclose(g.run(xx), ops.convert_to_numpy(net(xx)), rtol=1e-5, atol=1e-5)
    print("OK")
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_run_time_sizes_on_other_backends(backend):
    pytest.importorskip(backend)
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    code = f"BACKEND = {backend!r}\n" + SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------- issue 22 part 2
class Flatten2(layers.Layer):
    """Flattens all but the batch axis; its registered converters below bake sizes."""

    def call(self, x):
        return ops.reshape(x, (ops.shape(x)[0], -1))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None)


def _flatten_model():
    i = keras.Input((None, 4), name="x")
    y = Flatten2(name="flat")(layers.Dense(4, name="fc")(i))
    return keras.Model(i, ops.sum(y, axis=-1, keepdims=True))


def _with_converter(shape):
    from interop.adapters.keras import register_layer

    def convert(b, layer, x):
        return b.op("Reshape", [x.value, b.ints(shape)])

    register_layer(Flatten2, convert, replace=True)


@pytest.mark.parametrize(
    "baked, static",
    [([2, -1], {"batch": 2}), ([-1, 12], {"x_dim1": 3}), ([0, -1], {})],
)
def test_a_dynamic_dim_that_does_not_hold_is_declared_static(baked, static):
    _with_converter(baked)
    model = _flatten_model()
    x = RS.rand(2, 3, 4).astype("float32")
    if static:
        with pytest.warns(UserWarning, match="does not hold") as record:
            g = interop.trace(model, x)
        text = " ".join(str(w.message) for w in record)
        assert all(f"'{name}'" in text for name in static) and "layer 'flat'" in text, text
    else:
        g = interop.trace(model, x)
    declared = dict(zip(("batch", "x_dim1"), g.inputs[0].shape[:2], strict=True))
    for name, size in declared.items():
        assert size == static.get(name, name)
    _close(g, model, x)
    if not static:
        _close(g, model, RS.rand(5, 7, 4).astype("float32"))


def test_the_check_can_be_turned_off_and_blames_no_dim_for_a_wrong_graph(recwarn):
    _with_converter([2, -1])
    model = _flatten_model()
    x = RS.rand(2, 3, 4).astype("float32")
    g = interop.trace(model, x, check_dynamic_dims=False)
    assert g.inputs[0].shape[:2] == ("batch", "x_dim1")
    _with_converter([0, -1])
    g = interop.trace(keras.Model(model.input, model.output * 2), x)  # wrong at every size
    assert g.inputs[0].shape[:2] == ("batch", "x_dim1")
    assert not [w for w in recwarn if "does not hold" in str(w.message)]


def test_pad_to_a_length_computed_from_a_run_time_size():
    """ops.pad whose widths come from ops.shape (keras_hub PaliGemma pads to a length)."""

    class PadTo(keras.layers.Layer):
        def call(self, x):
            n = keras.ops.shape(x)[1]
            return keras.ops.pad(x, [[0, 0], [0, 10 - n], [1, 1]], constant_values=0.5)

    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, PadTo()(inputs))
    x = np.random.RandomState(0).rand(2, 4, 3).astype("float32")
    graph = interop.trace(model, x)
    assert graph.inputs[0].shape[1] != 4  # the length stays dynamic
    for other in (x, np.random.RandomState(1).rand(3, 7, 3).astype("float32")):
        got = graph.run(other)
        assert got.shape == (len(other), 10, 5)
        np.testing.assert_allclose(got, np.asarray(model(other)), rtol=1e-6)
