"""Attention layers and transformer blocks traced from Keras, checked against model(x)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers, ops  # noqa: E402

import interop  # noqa: E402


def _check(model, x, other=None):
    """Trace on `x`, verify against Keras; optionally run the graph on `other` inputs too."""
    g = interop.trace(model, x)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)
    assert g.count_params() == model.count_params()
    if other is not None:  # another batch and sequence length through the same graph
        report = interop.verify(model, g, other)
        assert report.ok, str(report)
    return g


def _rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype("float32")


MHA_CASES = {
    "self": lambda q, m: layers.MultiHeadAttention(4, 8, name="mha")(q, q),
    "causal": lambda q, m: layers.MultiHeadAttention(2, 8)(q, q, use_causal_mask=True),
    "value_dim_output_shape": lambda q, m: layers.MultiHeadAttention(
        2, 8, value_dim=6, output_shape=5
    )(q, q),
    "attention_mask": lambda q, m: layers.MultiHeadAttention(2, 4)(q, q, attention_mask=m),
    "mask_and_causal": lambda q, m: layers.MultiHeadAttention(2, 4)(
        q, q, attention_mask=m, use_causal_mask=True
    ),
    "scores": lambda q, m: layers.Concatenate()(
        [
            layers.Flatten()(t)
            for t in layers.MultiHeadAttention(2, 4)(
                q, q, return_attention_scores=True, use_causal_mask=True
            )
        ]
    ),
    "dropout_no_bias": lambda q, m: layers.MultiHeadAttention(2, 4, dropout=0.3, use_bias=False)(
        q, q
    ),
}


@pytest.mark.parametrize("name", list(MHA_CASES))
def test_multi_head_attention(name):
    keras.utils.set_random_seed(0)
    q = keras.Input((None, 12), name="q")
    m = keras.Input((None, None), dtype="bool", name="m")
    out = MHA_CASES[name](q, m)
    uses_mask = "mask" in name and name != "causal"
    model = keras.Model([q, m] if uses_mask else q, out)
    rs = np.random.RandomState(1)

    def inputs(batch, length):
        x = _rand(batch, length, 12, seed=batch)
        if not uses_mask:
            return x
        mask = rs.rand(batch, length, length) > 0.3
        mask[:, :, 0] = True  # every query attends somewhere
        return [x, mask]

    other = None if name == "scores" else inputs(3, 9)  # scores flatten a (T, T) map
    _check(model, inputs(2, 5), other)


def test_multi_head_attention_cross_4d_and_key():
    keras.utils.set_random_seed(0)
    q, v = keras.Input((3, 4, 6)), keras.Input((3, 4, 6))
    k = keras.Input((5, 8))
    a = layers.MultiHeadAttention(2, 4, attention_axes=(1, 2))(q, v)
    qs, ks = keras.Input((None, 6)), keras.Input((None, 8))
    c = layers.MultiHeadAttention(2, 4, name="cross")(qs, k, key=k)
    model = keras.Model([q, v, k, qs, ks], [a, c, layers.Dense(2)(ks)])
    x = [_rand(2, 3, 4, 6, seed=1), _rand(2, 3, 4, 6, seed=2), _rand(2, 5, 8, seed=3),
         _rand(2, 7, 6, seed=4), _rand(2, 3, 8, seed=5)]  # fmt: skip
    _check(model, x)


def test_multi_head_attention_keras_masks_from_embedding():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32")
    e = layers.Embedding(20, 8, mask_zero=True)(tokens)
    y = layers.MultiHeadAttention(2, 4)(e, e)
    model = keras.Model(tokens, layers.GlobalAveragePooling1D()(y))
    x = np.array([[3, 4, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6]], np.int32)
    other = np.array([[7, 8, 0], [1, 0, 0], [2, 3, 4]], np.int32)
    _check(model, x, other)


def _encoder_block(x, heads=4, dim=16, causal=False, name="block"):
    h = layers.MultiHeadAttention(heads, dim // heads, name=f"{name}_mha")(
        x, x, use_causal_mask=causal
    )
    x = layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(layers.Add()([x, h]))
    f = layers.Dense(dim * 2, activation="gelu", name=f"{name}_ff1")(x)
    f = layers.Dropout(0.1)(layers.Dense(dim, name=f"{name}_ff2")(f))
    return layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(layers.Add()([x, f]))


def test_transformer_encoder_classifier_dynamic_length():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = layers.Embedding(50, 16)(tokens)
    x = _encoder_block(_encoder_block(x, name="b1"), name="b2")
    out = layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling1D()(x))
    model = keras.Model(tokens, out)
    rs = np.random.RandomState(0)
    g = _check(model, rs.randint(1, 50, (2, 7)).astype("int32"),
               rs.randint(1, 50, (4, 11)).astype("int32"))  # fmt: skip
    # The projections are sub-layers with nodes of their own, as in Keras.
    assert g.layer("b1_mha/query").direct_nodes
    assert g.layer("b2_mha/attention_output").direct_nodes


class PositionalEmbedding(layers.Layer):
    """Token + learned position embedding, keras_hub style (positions from ops.shape)."""

    def __init__(self, vocab, length, dim, **kwargs):
        super().__init__(**kwargs)
        self.tokens = layers.Embedding(vocab, dim)
        self.positions = layers.Embedding(length, dim)

    def call(self, x):
        positions = ops.arange(0, ops.shape(x)[-1], 1)
        return self.tokens(x) + self.positions(positions)


class DecoderBlock(layers.Layer):
    """Pre-norm causal decoder block written with sub-layers and keras.ops."""

    def __init__(self, heads, dim, **kwargs):
        super().__init__(**kwargs)
        self.norm1 = layers.LayerNormalization(epsilon=1e-5)
        self.attn = layers.MultiHeadAttention(heads, dim // heads, name="attn")
        self.norm2 = layers.LayerNormalization(epsilon=1e-5)
        self.up = layers.Dense(dim * 4)
        self.down = layers.Dense(dim)

    def call(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, use_causal_mask=True)
        h = self.up(self.norm2(x))
        return x + self.down(ops.gelu(h, approximate=True))


def test_causal_decoder_subclassed_blocks():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((8,), dtype="int32")
    x = PositionalEmbedding(40, 8, 16, name="embed")(tokens)
    x = DecoderBlock(2, 16, name="dec_0")(x)
    x = DecoderBlock(2, 16, name="dec_1")(x)
    model = keras.Model(tokens, layers.Dense(40, name="lm_head")(x))
    x = np.random.RandomState(0).randint(0, 40, (2, 8)).astype("int32")
    g = _check(model, x)
    assert g.layer("dec_0/attn/query").direct_nodes
    assert g.layer("dec_1/attn").direct_nodes  # the softmax and einsums of the attention


class SelfAttention(layers.Layer):
    """Custom attention with keras.ops.dot_product_attention (bias, mask, causal, scale)."""

    def __init__(self, heads, head_dim, kv_heads=None, **kwargs):
        super().__init__(**kwargs)
        self.heads, self.head_dim = heads, head_dim
        self.kv_heads = kv_heads or heads
        self.q = layers.Dense(heads * head_dim)
        self.kv = layers.Dense(2 * self.kv_heads * head_dim)

    def call(self, x, bias, mask):
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        q = ops.reshape(self.q(x), (b, t, self.heads, self.head_dim))
        k, v = ops.split(ops.reshape(self.kv(x), (b, t, 2 * self.kv_heads, self.head_dim)), 2, 2)
        a = ops.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=True, scale=0.3)
        c = ops.dot_product_attention(q, k, v)
        return ops.reshape(a + c, (b, t, self.heads * self.head_dim))


@pytest.mark.parametrize("kv_heads", [None, 2])  # TF cannot broadcast 1 kv head
def test_ops_dot_product_attention(kv_heads):
    keras.utils.set_random_seed(0)
    x = keras.Input((6, 8))
    bias = keras.Input((4, 6, 6))
    mask = keras.Input((1, 6, 6), dtype="bool")
    model = keras.Model([x, bias, mask], SelfAttention(4, 4, kv_heads, name="attn")(x, bias, mask))
    rs = np.random.RandomState(0)
    m = rs.rand(2, 1, 6, 6) > 0.4
    m[..., 0] = True
    _check(model, [_rand(2, 6, 8), _rand(2, 4, 6, 6, seed=1), m])


def test_grouped_query_attention():
    keras.utils.set_random_seed(0)
    q = keras.Input((None, 12))
    a = layers.GroupQueryAttention(8, 4, 2)(q, q, use_causal_mask=True)
    b, scores = layers.GroupQueryAttention(4, 2, 2, name="gqa_scores")(
        q, q, return_attention_scores=True
    )
    model = keras.Model(q, [a, b])
    _check(model, _rand(2, 5, 12))


ATTENTION_CASES = {
    "dot": lambda q, v: layers.Attention()([q, v]),
    "dot_scaled_causal": lambda q, v: layers.Attention(use_scale=True)(
        [q, v], use_causal_mask=True
    ),
    "concat": lambda q, v: layers.Attention(score_mode="concat", use_scale=True)([q, v, v]),
    "additive": lambda q, v: layers.AdditiveAttention()([q, v]),
    "additive_scores": lambda q, v: layers.Concatenate()(
        list(layers.AdditiveAttention(use_scale=False)([q, v], return_attention_scores=True))
    ),
}


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
def test_attention_layers(name):
    keras.utils.set_random_seed(0)
    q, v = keras.Input((4, 6)), keras.Input((4, 6))
    model = keras.Model([q, v], ATTENTION_CASES[name](q, v))
    _check(model, [_rand(2, 4, 6), _rand(2, 4, 6, seed=1)])


def test_attention_with_keras_masks():
    keras.utils.set_random_seed(0)
    a, c = keras.Input((None,), dtype="int32"), keras.Input((None,), dtype="int32")
    ea = layers.Embedding(10, 6, mask_zero=True)(a)
    ec = layers.Embedding(10, 6, mask_zero=True)(c)
    model = keras.Model([a, c], layers.Attention()([ea, ec]))
    x = [np.array([[1, 2, 0, 0], [3, 4, 5, 6]], np.int32),
         np.array([[5, 0, 0, 0, 0], [1, 2, 3, 0, 0]], np.int32)]  # fmt: skip
    _check(model, x)
