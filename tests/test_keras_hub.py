"""keras_hub models and the Keras patterns they use, traced and checked against model(x).

The patterns are tested on plain Keras first (no keras_hub needed), then on tiny
keras_hub backbones built from random configs (weights=None, nothing downloaded); the
whole family is swept by tools/sweep_keras_hub.py (docs/keras-hub.md).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers, ops  # noqa: E402

import interop  # noqa: E402


def _check(model, x, other=None):
    """Trace on `x`; the graph matches model(x) (rtol 1e-4, atol 1e-5) with equal params."""
    graph = interop.trace(model, x)
    report = interop.verify(model, graph, x, rtol=1e-4, atol=1e-5)
    assert report.ok, str(report)
    assert graph.count_params() == model.count_params()
    if other is not None:  # another batch / length through the same graph
        report = interop.verify(model, graph, other, rtol=1e-4, atol=1e-5)
        assert report.ok, str(report)
    return graph


def _rand(*shape, seed=0):
    return np.random.RandomState(seed).randn(*shape).astype("float32")


def gelu_approximate(x):
    """A custom activation written with keras.ops, as keras_hub's is."""
    return keras.activations.gelu(x, approximate=True)


def test_custom_activation_function_is_recorded():
    inp = keras.Input((5,))
    out = layers.Dense(4, activation=gelu_approximate, name="ffn")(inp)
    graph = _check(keras.Model(inp, out), _rand(2, 5), _rand(3, 5, seed=1))
    ops_in_ffn = [n.op_type for n in graph.model.graph if n.name.startswith("ffn/")]
    assert "Tanh" in ops_in_ffn  # the approximate form, not the exact Erf one
    assert "Erf" not in ops_in_ffn


class _MixedMask(layers.Layer):
    """An int32 padding mask and a bool causal mask merged with ops.minimum (keras_hub)."""

    def call(self, x, padding_mask):
        length = ops.shape(x)[1]
        causal = ops.arange(length)[:, None] >= ops.arange(length)[None, :]
        mask = ops.minimum(ops.expand_dims(padding_mask, 1), causal)  # int32 and bool
        return layers.Softmax()(ops.matmul(x, ops.transpose(x, (0, 2, 1))), mask=mask)


def test_mixed_dtype_minimum_and_int_softmax_mask():
    x = keras.Input((None, 4))
    padding = keras.Input((None,), dtype="int32")
    model = keras.Model([x, padding], _MixedMask()(x, padding))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], "int32")
    other = [_rand(3, 7, 4, seed=2), np.ones((3, 7), "int32")]
    _check(model, [_rand(2, 5, 4), mask], other)


class _CachedAttention(layers.MultiHeadAttention):
    """A subclass whose call takes a keyword its inherited compute_output_spec does not."""

    def call(self, query, value, key=None, cache=None, training=None):
        return super().call(query, value, key=key, training=training)


class _Decoder(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = _CachedAttention(2, 4, name="self_attention")
        self.norm = layers.LayerNormalization(name="norm")

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)
        self.norm.build(input_shape)

    def call(self, x):
        return self.norm(x + self.attention(x, x, cache=None))


def test_sublayer_with_keyword_its_output_spec_rejects():
    inp = keras.Input((None, 8))
    model = keras.Model(inp, _Decoder(name="decoder")(inp))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = _check(model, _rand(2, 5, 8), _rand(3, 6, 8, seed=1))
    # traced with symbolic variables: no weight computation folded into constants
    assert not [w for w in caught if "symbolic variables" in str(w.message)]
    paths = {layer.path for layer in graph.layers}
    assert {"decoder", "decoder/self_attention", "decoder/norm"} <= paths


class _OptionalCache(layers.Layer):
    """Returns (output, None) and a constant it makes, as keras_hub attention layers do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, name="proj")

    def call(self, x, cache=None):
        return self.dense(x), None, ops.convert_to_tensor(np.arange(3, dtype="float32"))


class _Block(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = _OptionalCache(name="attention")

    def call(self, x, training=None):
        y, cache, positions = self.attention(x)
        assert cache is None
        return y * ops.sum(positions)


def test_sublayer_returning_none_and_a_constant():
    inp = keras.Input((None, 4))
    model = keras.Model(inp, _Block(name="block")(inp))
    graph = _check(model, _rand(2, 3, 4), _rand(3, 5, 4, seed=1))
    assert "block/attention/proj" in {layer.path for layer in graph.layers}


class _Rotary(layers.Layer):
    """Declares one output (compute_output_shape) but returns two, as keras_hub's do."""

    def call(self, q, k):
        return q * 2.0, k * 3.0

    def compute_output_shape(self, q_shape, k_shape=None):
        return q_shape


class _UsesRotary(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rotary = _Rotary(name="rotary")
        self.proj = layers.Dense(4, name="proj")

    def call(self, x):
        q, k = self.rotary(x, x)
        return self.proj(q + k)


def test_sublayer_whose_declared_spec_differs_from_its_call():
    inp = keras.Input((None, 4))
    model = keras.Model(inp, _UsesRotary(name="block")(inp))
    graph = _check(model, _rand(2, 3, 4), _rand(3, 5, 4, seed=1))  # dims stay run-time
    assert graph.inputs[0].shape[0] == "batch"


class _PythonOnSizes(layers.Layer):
    """Computes with Python on the sizes (an int slice bound), as some keras_hub layers do."""

    def call(self, x):
        length = int(x.shape[1])  # fails on an unknown length
        return x[:, : length - 1] * 2.0

    def compute_output_shape(self, shape):  # how Keras builds the model without a length
        return (shape[0], None if shape[1] is None else shape[1] - 1, shape[2])


def test_layer_computing_with_python_sizes_is_captured_at_the_example_shapes():
    inp = keras.Input((None, 4))
    model = keras.Model(inp, _PythonOnSizes(name="python_sizes")(inp))
    with pytest.warns(UserWarning, match="example's shapes"):
        graph = interop.trace(model, _rand(2, 6, 4))
    report = interop.verify(model, graph, _rand(2, 6, 4, seed=1), rtol=1e-4, atol=1e-5)
    assert report.ok, str(report)
    # the length is fixed by the layer: declared static (the dim check), never a wrong value
    assert graph.inputs[0].shape[1] == 6


class _IgnoresAnInput(layers.Layer):
    """Takes an input it never reads (an MoE block's unused routing hint)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, name="expert")

    def call(self, x, hint):
        return self.dense(x)


class _Outer(layers.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.block = _IgnoresAnInput(name="moe")

    def call(self, x):
        return self.block(x, x * 2.0)


def test_sublayer_ignoring_one_of_its_inputs():
    inp = keras.Input((None, 4))
    model = keras.Model(inp, _Outer(name="outer")(inp))
    graph = _check(model, _rand(2, 3, 4), _rand(3, 5, 4, seed=1))
    assert "outer/moe/expert" in {layer.path for layer in graph.layers}


def test_dict_inputs_to_a_model_with_list_inputs_match_by_name():
    """A dict fed to a model built on a list of inputs is matched by name, not by the
    dict's sorted key order (here the reverse of the model's)."""
    ids = keras.Input((3,), name="zeta", dtype="int32")
    seq = keras.Input((None, 2), name="alpha")
    total = ops.cast(ops.sum(ids, axis=1, keepdims=True), "float32")
    out = layers.Dense(2)(ops.mean(seq, axis=1)) * total
    model = keras.Model([ids, seq], out)
    x = {"zeta": np.arange(6, dtype="int32").reshape(2, 3), "alpha": _rand(2, 4, 2)}
    graph = _check(model, x, {"zeta": np.ones((3, 3), "int32"), "alpha": _rand(3, 5, 2, seed=1)})
    assert {spec.name: str(spec.dtype) for spec in graph.inputs} == {
        "zeta": "int32",
        "alpha": "float32",
    }


keras_hub = pytest.importorskip("keras_hub")


def _tokens(batch=2, length=8, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch, length)).astype("int32")
    mask = np.ones((batch, length), "int32")
    mask[0, length - 2 :] = 0
    return {"token_ids": ids, "padding_mask": mask}


HUB = {
    "bert": lambda: (
        keras_hub.models.BertBackbone(
            vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16,
            intermediate_dim=32, max_sequence_length=16,
        ),
        lambda **k: dict(_tokens(**k), segment_ids=np.zeros((k.get("batch", 2), k.get("length", 8)), "int32")),
    ),
    "gpt2": lambda: (
        keras_hub.models.GPT2Backbone(
            vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16,
            intermediate_dim=32, max_sequence_length=16,
        ),
        _tokens,
    ),
    "llama": lambda: (
        keras_hub.models.LlamaBackbone(
            vocabulary_size=50, num_layers=2, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=16, intermediate_dim=32,
        ),
        _tokens,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HUB))
def test_keras_hub_text_backbones(name):
    model, inputs = HUB[name]()
    graph = _check(model, inputs(), inputs(batch=3, length=6, seed=1))
    paths = {layer.path for layer in graph.layers}
    assert "transformer_layer_0" in paths and "transformer_layer_1" in paths
    assert graph.inputs[0].shape[0] == "batch"


def test_keras_hub_submodel_equals_keras_inner_model():
    """submodel of an inner layer computes what keras.Model(inputs, layer.output) does."""
    model, inputs = HUB["bert"]()
    x = inputs()
    graph = interop.trace(model, x)
    for path in ("embeddings_layer_norm", "transformer_layer_0", "transformer_layer_1"):
        sub = graph.submodel(outputs=[path])
        inner = keras.Model(model.inputs, model.get_layer(path).output)
        expected = keras.ops.convert_to_numpy(inner(x))
        got = sub.run(**{spec.name: x[spec.name] for spec in sub.inputs})
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_keras_hub_vit_backbone():
    model = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    _check(model, _rand(2, 16, 16, 3), _rand(3, 16, 16, 3, seed=1))


BACKEND_SCRIPT = """
import numpy as np, keras, keras_hub, interop
assert keras.backend.backend() == BACKEND, keras.backend.backend()
rs = np.random.default_rng(0)

def tokens(batch, length):
    return {"token_ids": rs.integers(1, 50, (batch, length)).astype("int32"),
            "padding_mask": np.ones((batch, length), "int32")}

def check(model, x, other):
    g = interop.trace(model, x)
    for inputs in (x, other):
        report = interop.verify(model, g, inputs, rtol=1e-4, atol=1e-5)
        assert report.ok, str(report)
    assert g.count_params() == model.count_params()
    assert g.source["backend"] == BACKEND

encoder = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=2, num_heads=2,
    hidden_dim=16, intermediate_dim=32, max_sequence_length=16)
with_segments = lambda t: dict(t, segment_ids=np.zeros_like(t["token_ids"]))
check(encoder, with_segments(tokens(2, 8)), with_segments(tokens(3, 6)))
decoder = keras_hub.models.LlamaBackbone(vocabulary_size=50, num_layers=2, num_query_heads=2,
    num_key_value_heads=1, hidden_dim=16, intermediate_dim=32)
check(decoder, tokens(2, 8), tokens(3, 5))
vision = keras_hub.models.ViTBackbone(image_shape=(16, 16, 3), patch_size=4, num_layers=2,
    num_heads=2, hidden_dim=16, mlp_dim=32)
images = lambda b: rs.random((b, 16, 16, 3)).astype("float32")
check(vision, images(2), images(3))
print("OK")
"""


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_hub_on_other_backends(backend):
    """An encoder, a decoder LLM and a vision backbone on the JAX and torch backends."""
    import os
    import subprocess
    import sys

    pytest.importorskip(backend)
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    code = f"BACKEND = {backend!r}\n" + BACKEND_SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_keras_hub_backbone_emits_trains_and_nests_in_torch_and_flax():
    """A keras_hub encoder as a torch module and a Flax module: numerics within 1e-4 of
    model(x), one training step moves the weights, and it nests in a host model."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("flax")
    model, inputs = HUB["bert"]()
    x = inputs()
    graph = interop.trace(model, x)
    expected = {k: keras.ops.convert_to_numpy(v) for k, v in model(x).items()}
    args = [x[spec.name] for spec in graph.inputs]
    names = [spec.name for spec in graph.outputs]

    module = interop.to_torch(graph)
    outputs = module(*[torch.from_numpy(a) for a in args])
    for name, out in zip(names, outputs, strict=True):
        np.testing.assert_allclose(out.detach().numpy(), expected[name], rtol=1e-4, atol=1e-5)
    module.train()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = module(*[torch.from_numpy(a) for a in args])[0].pow(2).mean()
    loss.backward()
    optimizer.step()
    moved = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert any("pooled_dense" in n for n in moved), moved  # the head of the loss trained

    flax_module = interop.to_flax(graph)
    for name, out in zip(names, flax_module(*args), strict=True):
        np.testing.assert_allclose(np.asarray(out), expected[name], rtol=1e-4, atol=1e-5)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = interop.torch.Module(graph)
            self.classifier = torch.nn.Linear(16, 3)

        def forward(self, *tensors):
            return self.classifier(self.encoder(*tensors)[0])

    logits = Head()(*[torch.from_numpy(a) for a in args])
    assert tuple(logits.shape) == (2, 3)
    nested = interop.flax.Module(graph)
    np.testing.assert_allclose(
        np.asarray(nested(*args)[0]), expected[names[0]], rtol=1e-4, atol=1e-5
    )


def test_output_returning_an_input_under_its_name():
    """keras_hub SD3 returns its `images` input as the `images` output: the graph output
    gets another name (ONNX names each value once) and matches by position."""
    images, t = keras.Input((4,), name="images"), keras.Input((4,), name="t")
    model = keras.Model({"images": images, "t": t}, {"images": images, "out": layers.Dense(2)(t)})
    x = {"images": _rand(2, 4), "t": _rand(2, 4, seed=1)}
    graph = _check(model, x)
    assert [v.name for v in graph.model.graph.outputs] == ["images_output", "out"]
    assert [v.name for v in graph.model.graph.inputs] == ["images", "t"]
