"""A layer's outputs are what its call returned, in return order; side outputs come after.

Covers the ``returns`` entry of the ``interop.layers`` table for torch (forward hooks
during torch.export), Keras (the layer calls of the walk) and Flax (a marker primitive),
layers that emit no node (identities), `submodel` on a layer path and the close-match
suggestions of `LayerNotFoundError`.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import interop
from interop import provenance
from interop.errors import LayerNotFoundError, UnsupportedOpError, close_matches
from interop.registry import Registry

warnings.filterwarnings("ignore")


def _first(result):
    return result[0] if isinstance(result, tuple | list) else result


# ---------------------------------------------------------------------------- torch
torch = pytest.importorskip("torch")


class _Pair(torch.nn.Module):
    """Returns (b(x) * 2, a(x) + 1): the second-made value first."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)

    def forward(self, x):
        u = self.a(x)
        v = self.b(x)
        return v * 2, u + 1


class _Tagged(torch.nn.Module):
    """Returns a tensor among non-tensors: only the tensor is a return value."""

    def forward(self, x):
        return {"scale": 3, "value": x * 3.0, "none": None}


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.identity = torch.nn.Identity()
        self.pair = _Pair()
        self.tagged = _Tagged()
        self.relu = torch.nn.ReLU(inplace=True)
        self.drop = torch.nn.Dropout(0.1)
        self.act = torch.nn.GELU()  # called twice

    def forward(self, x):
        x = self.identity(x)
        a, b = self.pair(x)
        a = self.tagged(a)["value"]
        b = self.drop(self.relu(b))
        return self.act(a).sum(-1) + self.act(b).sum(-1)


@pytest.fixture(scope="module")
def torch_net():
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(2, 4)
    return net, x, interop.trace(net, x)


def test_torch_tuple_returns_in_return_order(torch_net):
    net, x, g = torch_net
    pair = g.layer("pair")
    assert [format(v.shape[1]) for v in pair.returns] == ["3", "4"]
    assert pair.outputs == pair.returns and not pair.side_outputs
    sub = g.submodel(outputs=["pair"])
    assert [o.name for o in sub.outputs] == ["pair", "pair:1"]
    with torch.no_grad():
        want = net.pair(x)
    for got, expected in zip(sub.run(x.numpy()), want, strict=True):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)
    # recorded as value names in the layer table
    record = {r.path: r for r in provenance.read_layers(g.model)}["pair"]
    assert list(record.returns) == [v.name for v in pair.returns]


def test_torch_layers_without_nodes_pass_their_value_through(torch_net):
    net, x, g = torch_net
    identity = g.layer("identity")
    assert not identity.nodes and [v.name for v in identity.outputs] == ["x"]
    assert identity.inputs == identity.outputs
    sub = g.submodel(outputs=["identity"])
    assert sub.outputs[0].name == "identity"
    np.testing.assert_array_equal(_first(sub.run(x.numpy())), x.numpy())
    # in-place ReLU and eval-mode Dropout: their results, not their inputs
    with torch.no_grad():
        a, b = net.pair(x)
        want = torch.relu(b)
    for path in ("relu", "drop"):
        got = _first(g.submodel(outputs=[path]).run(x.numpy()))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    tagged = g.submodel(outputs=["tagged"])
    np.testing.assert_allclose(_first(tagged.run(x.numpy())), a.numpy() * 3, rtol=1e-5, atol=1e-6)
    # a module called twice returns one value per call, in call order
    assert [v.shape[1] for v in g.layer("act").returns] == [3, 4]
    text = g.summary(print_fn=None)
    rows = [line.split()[0] for line in text.splitlines() if "(" in line]
    assert rows.index("identity") < rows.index("pair")  # shown where its value comes from


# ---------------------------------------------------------------------------- Hugging Face
def test_llama_decoder_layer_returns_hidden_state_then_cache_writes():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    g = interop.trace(model, (ids,))

    layer = g.layer("model.layers.1")
    assert layer.returns[0].shape[-1] == 32 and len(layer.returns) == 1
    assert [v.name for v in layer.side_outputs] == ["cache.1.key", "cache.1.value"]
    assert layer.outputs == layer.returns + layer.side_outputs
    # an uncalled container keeps its children's split
    container = g.layer("model.layers")
    assert container.returns == layer.returns
    assert [v.name for v in container.side_outputs][:2] == ["cache.0.key", "cache.0.value"]
    summary = g.summary(depth=3, print_fn=None)
    row = next(line for line in summary.splitlines() if "model.layers.1 (" in line)
    assert "(batch, 7, 32) side: (batch, 2, 7, 8), (batch, 2, 7, 8)" in row
    # the plot draws the cache writes as dashed "side" edges, the returns as plain ones
    source = g.plot(None, depth=3).source
    dashed = [line for line in source.splitlines() if "style=dashed" in line]
    assert len(dashed) == 4 and all("(side)" in line for line in dashed)  # 2 layers x key/value

    sub = g.submodel(outputs=["model.layers.1"])
    assert [o.name for o in sub.outputs] == ["model.layers.1"]
    hooked = {}
    handle = model.model.layers[1].register_forward_hook(lambda m, i, o: hooked.setdefault("o", o))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    want = hooked["o"][0] if isinstance(hooked["o"], tuple) else hooked["o"]
    np.testing.assert_allclose(_first(sub.run(ids.numpy())), want.numpy(), rtol=1e-5, atol=1e-5)
    # side outputs on request, by value name
    side = g.submodel(outputs=["model.layers.1", "cache.1.key"])
    assert [o.name for o in side.outputs] == ["model.layers.1", "cache.1.key"]


# ---------------------------------------------------------------------------- Keras
def test_keras_convnext_identity_layer_submodel():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    model = keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3))
    x = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    g = interop.trace(model, x)
    name = "convnext_tiny_stage_0_block_0_identity"
    layer = g.layer(name)
    assert not layer.nodes and len(layer.outputs) == 1
    assert layer.outputs == g.layer("convnext_tiny_stage_0_block_0_layer_scale").returns
    sub = g.submodel(outputs=[name])
    assert [o.name for o in sub.outputs] == [name]
    reference = keras.Model(model.inputs, model.get_layer(name).output)
    want = keras.ops.convert_to_numpy(reference(x))
    np.testing.assert_allclose(_first(sub.run(x)), want, rtol=1e-4, atol=1e-5)


def test_keras_layer_returning_two_outputs():
    keras = pytest.importorskip("keras")

    class Split(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.small, self.big = keras.layers.Dense(2), keras.layers.Dense(5)

        def call(self, x):
            big = self.big(x)  # made first, returned second
            return self.small(x) * 3.0, keras.ops.tanh(big)

    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    a, b = Split(name="split")(inputs)
    model = keras.Model(inputs, keras.layers.Concatenate(name="cat")([b, a]))
    x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    g = interop.trace(model, x)
    assert [v.shape[-1] for v in g.layer("split").returns] == [2, 5]
    sub = g.submodel(outputs=["split"])
    assert [o.name for o in sub.outputs] == ["split", "split:1"]
    reference = keras.Model(model.inputs, model.get_layer("split").output)
    for got, want in zip(sub.run(x), reference(x), strict=True):
        np.testing.assert_allclose(got, keras.ops.convert_to_numpy(want), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- Flax
def test_flax_nnx_module_returning_a_tuple():
    pytest.importorskip("flax")
    from flax import nnx

    class Pair(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            u = self.a(x)
            return self.b(x) * 2, u + 1

    class Identity(nnx.Module):
        def __call__(self, x):
            return x

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.identity, self.pair = Identity(), Pair(rngs)

        def __call__(self, x):
            a, b = self.pair(self.identity(x))
            return a.sum(-1) + b.sum(-1)

    net = Net(nnx.Rngs(0))
    x = np.random.default_rng(0).random((2, 4), dtype=np.float32)
    g = interop.trace(net, x)
    assert [v.shape[1] for v in g.layer("pair").returns] == [3, 4]
    sub = g.submodel(outputs=["pair"])
    for got, want in zip(sub.run(x), net.pair(x), strict=True):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)
    assert [v.name for v in g.layer("identity").outputs] == [g.inputs[0].name]
    np.testing.assert_array_equal(_first(g.submodel(outputs=["identity"]).run(x)), x)
    np.testing.assert_allclose(g.run(x), np.asarray(net(x)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- messages
def test_close_matches_never_offer_the_name_typed():
    assert close_matches("layer1", ["layer1", "layer2", "layer1"]) == ["layer2"]
    registry = Registry("emit", adapter="numpy")
    registry.register("Relu", object())
    registry.register("Relux", object())
    assert registry.close_matches("Relu") == ["Relux"]
    error = UnsupportedOpError("Relu", close_matches=["Relu", "Relux"])
    assert error.close_matches == ["Relux"]


def test_layer_without_outputs_is_not_its_own_close_match(torch_net):
    _, _, g = torch_net
    with pytest.raises(LayerNotFoundError) as info:
        g.submodel(outputs=["pair.c"])
    assert "'pair.c'" not in str(info.value).split("Expected:")[1]
    g2 = g.clone()  # a layer whose values are all gone: it says so, without suggesting itself
    records = provenance.read_layers(g2.model)
    records.append(provenance.LayerRecord("unused", "torch.nn.Linear", ""))
    provenance.write_layers(g2.model, records)
    g2 = interop.Graph(g2.model)
    with pytest.raises(LayerNotFoundError, match="has no outputs here") as info:
        g2.submodel(outputs=["unused"])
    assert "'unused'" not in str(info.value).split("Expected:")[1]
    with pytest.raises(LayerNotFoundError) as info:
        g2.layer("pairs")
    assert "'pair'" in str(info.value) and "'pairs'" not in str(info.value).split("Expected:")[1]


def test_returns_survive_save_load_and_submodel(torch_net, tmp_path):
    _, x, g = torch_net
    loaded = interop.load(g.save(tmp_path / "net.onnx"))
    assert [v.name for v in loaded.layer("pair").returns] == [
        v.name for v in g.layer("pair").returns
    ]
    sub = g.submodel(outputs=["pair"])
    assert [v.name for v in sub.layer("pair").returns] == ["pair", "pair:1"]
