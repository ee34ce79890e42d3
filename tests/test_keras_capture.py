"""Keras capture: hand-written models traced natively, checked against Keras on ONNX Runtime.

Tolerances: float32 outputs must match ``model(x)`` within rtol 1e-4 / atol 1e-5
(`interop.verify`'s defaults), and direct comparisons use the same bound.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers, ops  # noqa: E402

import interop  # noqa: E402
from interop.errors import UnsupportedOpError  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


def _keras(model, x):
    out = model(x, training=False) if not isinstance(model, keras.Sequential) else model(x)
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), out)


def _rand(*shape, seed=0):
    return np.random.RandomState(seed).rand(*shape).astype("float32")


@pytest.fixture()
def cnn():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw"),
            layers.SeparableConv2D(6, 3, padding="valid", name="sep"),
            layers.AveragePooling2D(2, padding="same", name="pool"),
            layers.Dropout(0.3, name="drop"),
            layers.Flatten(name="flat"),
            layers.Dense(4, activation="softmax", name="fc"),
        ],
        name="cnn",
    )


def test_sequential_cnn_numerics_params_and_names(cnn):
    x = _rand(2, 16, 16, 3)
    g = interop.trace(cnn, x)
    report = interop.verify(cnn, g, x)
    assert report.ok, str(report)
    np.testing.assert_allclose(g.run(x), _keras(cnn, x), rtol=RTOL, atol=ATOL)
    assert g.count_params() == cnn.count_params()
    assert [la.path for la in g.layers if la.parent is g.root] == [
        "conv",
        "bn",
        "dw",
        "sep",
        "pool",
        "drop",
        "flat",
        "fc",
    ]
    weights = g.get_weights()  # Keras variable paths, Keras layouts, same values
    for variable in cnn.weights:
        np.testing.assert_array_equal(weights[variable.path], keras.ops.convert_to_numpy(variable))
    kinds = g.parameter_kinds
    assert kinds["cnn/bn/moving_mean"] == "frozen" and kinds["cnn/conv/kernel"] == "trainable"
    assert any(n.op_type == "Dropout" for n in g.model.graph)  # recorded as an ONNX Dropout


def test_dynamic_batch_by_default(cnn):
    g = interop.trace(cnn, _rand(2, 16, 16, 3))
    assert g.inputs[0].shape[0] == "batch"
    x5 = _rand(5, 16, 16, 3, seed=1)
    np.testing.assert_allclose(g.run(x5), _keras(cnn, x5), rtol=RTOL, atol=ATOL)


def test_save_load_and_config_round_trips(cnn, tmp_path):
    x = _rand(3, 16, 16, 3)
    g = interop.trace(cnn, x)
    expected = g.run(x)
    loaded = interop.load(g.save(tmp_path / "cnn.onnx"))
    np.testing.assert_array_equal(loaded.run(x), expected)
    rebuilt = interop.Graph.from_config(g.get_config(), g.get_weights())
    np.testing.assert_array_equal(rebuilt.run(x), expected)
    assert [la.path for la in loaded.layers] == [la.path for la in g.layers]


def test_submodel_equals_keras_submodel(cnn):
    x = _rand(2, 16, 16, 3)
    g = interop.trace(cnn, x)
    feats = g.submodel(outputs=["sep"])
    reference = keras.Model(cnn.inputs, cnn.get_layer("sep").output)
    np.testing.assert_allclose(feats.run(x), _keras(reference, x), rtol=RTOL, atol=ATOL)


def test_functional_multi_input_output_shared_layer():
    keras.utils.set_random_seed(1)
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    shared = layers.Dense(5, activation="tanh", name="shared")
    ha, hb = shared(a), shared(b)  # one layer, two calls
    out1 = layers.Concatenate(name="cat")([ha, hb])
    out2 = layers.Add(name="add")([ha, hb]) * 2.0 - ops.mean(ha, axis=-1, keepdims=True)
    model = keras.Model([a, b], [out1, out2], name="two")
    xs = (_rand(3, 6), _rand(3, 6, seed=2))
    g = interop.trace(model, xs)
    assert [s.name for s in g.inputs] == ["a", "b"]
    assert interop.verify(model, g, xs).ok
    got, want = g.run(*xs), _keras(model, list(xs))
    for actual, expected in zip(got, want, strict=True):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)
    assert g.count_params() == model.count_params() == 35


def test_dict_inputs_and_outputs():
    a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    model = keras.Model(
        {"a": a, "b": b}, {"sum": layers.Dense(3)(a + b), "prod": layers.Multiply()([a, b])}
    )
    feed = {"a": _rand(2, 4), "b": _rand(2, 4, seed=3)}
    g = interop.trace(model, feed)
    assert sorted(s.name for s in g.outputs) == ["prod", "sum"]
    assert interop.verify(model, g, feed).ok
    got = g.run(**feed, as_dict=True)
    want = _keras(model, feed)
    for key in ("sum", "prod"):
        np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL)


class ScaledBlock(layers.Layer):
    """A custom layer mixing sub-layers, keras.ops and its own weight."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(units, name="inner")
        self.norm = layers.BatchNormalization(name="norm")

    def build(self, input_shape):
        self.scale = self.add_weight(
            shape=(self.dense.units,), initializer="random_normal", name="scale"
        )

    def call(self, x, training=False):
        y = self.norm(self.dense(x), training=training)
        return (
            ops.relu(y) * self.scale
            + ops.exp(self.scale)
            + ops.mean(y[:, 1:], axis=-1, keepdims=True)
        )


class Imperative(keras.Model):
    def __init__(self, inner=None):
        super().__init__(name="imperative")
        self.block_1 = ScaledBlock(8, name="block_1")
        self.inner = inner
        self.drop = layers.Dropout(0.5)
        self.head = layers.Dense(3, name="head")

    def call(self, x):
        h = self.block_1(x)
        if self.inner is not None:
            h = self.inner(h)
        return {"logits": self.head(self.drop(h)), "features": h}


def test_subclassed_model_with_custom_layer_hierarchy():
    keras.utils.set_random_seed(2)
    model = Imperative()
    x = _rand(4, 5)
    model(x)
    g = interop.trace(model, x)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)
    paths = {la.path: la.class_name for la in g.layers}
    assert paths["block_1"] == "ScaledBlock" and paths["block_1/inner"] == "Dense"
    assert "block_1/norm" in paths and paths["head"] == "Dense"
    assert g.layer("block_1/inner").param_count == 5 * 8 + 8
    assert g.count_params() == model.count_params()
    scopes = {n.metadata_props.get("interop.scope") for n in g.model.graph}
    assert {"block_1", "block_1/inner", "block_1/norm", "head"} <= scopes


def test_nesting_functional_in_subclassed_and_back():
    keras.utils.set_random_seed(3)
    inner = keras.Sequential(
        [keras.Input((8,)), layers.Dense(8, activation="gelu"), layers.LayerNormalization()],
        name="inner_seq",
    )
    outer = Imperative(inner)
    x = _rand(2, 5)
    outer(x)
    g = interop.trace(outer, x)
    assert interop.verify(outer, g, x).ok
    assert any(la.path.startswith("inner_seq/") for la in g.layers)
    # functional model around the subclassed one
    i = keras.Input((5,))
    wrapped = keras.Model(i, layers.Dense(2, name="top")(outer(i)["logits"]))
    g2 = interop.trace(wrapped, x)
    assert interop.verify(wrapped, g2, x).ok
    assert "imperative/block_1/inner" in {la.path for la in g2.layers}


def _sequence_model(kind, return_sequences, go_backwards=False):
    keras.utils.set_random_seed(4)
    i = keras.Input((None,), dtype="int32")
    e = layers.Embedding(20, 6, mask_zero=True, name="embed")(i)
    rnn = getattr(layers, kind)(
        7, return_sequences=return_sequences, go_backwards=go_backwards, name="rnn"
    )
    return keras.Model(i, rnn(e))


def _tokens(batch, length, seed):
    x = np.random.RandomState(seed).randint(1, 20, size=(batch, length))
    x[0, length - 3 :] = 0  # right padding
    x[1, :2] = 0  # left padding
    x[-1, length // 2] = 0  # a hole in the middle
    return x.astype("int32")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "SimpleRNN"])
@pytest.mark.parametrize("return_sequences", [True, False])
def test_recurrent_masking_and_dynamic_time(kind, return_sequences):
    model = _sequence_model(kind, return_sequences, go_backwards=not return_sequences)
    x = _tokens(3, 9, seed=5)
    g = interop.trace(model, x)
    assert interop.verify(model, g, x).ok
    for length in (4, 15):  # other sequence lengths than the example's
        other = _tokens(3, length, seed=length)
        np.testing.assert_allclose(g.run(other), _keras(model, other), rtol=RTOL, atol=ATOL)


def test_bidirectional_with_masking_layer_and_states():
    keras.utils.set_random_seed(6)
    i = keras.Input((None, 4))
    masked = layers.Masking(name="mask")(i)
    # the wrapped layers are named: Bidirectional's sub-layer paths are forward_<name> and
    # backward_<name>, and an auto-generated name ("lstm_12") depends on what ran before
    seq = layers.Bidirectional(layers.LSTM(5, return_sequences=True, name="lstm"), name="bi_lstm")(
        masked
    )
    last = layers.Bidirectional(
        layers.GRU(3, reset_after=False, name="gru"), merge_mode="ave", name="bi_gru"
    )(seq)
    out, h, c = layers.LSTM(4, return_state=True, name="lstm_state")(masked)
    model = keras.Model(i, [seq, last, out, h, c])
    x = _rand(3, 7, 4)
    x[0, 5:] = 0
    x[2, :2] = 0
    g = interop.trace(model, x)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)
    longer = _rand(2, 11, 4, seed=7)
    longer[1, 8:] = 0
    for got, want in zip(g.run(longer), _keras(model, longer), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert {"bi_lstm/forward_lstm", "bi_lstm/backward_lstm"} <= {la.path for la in g.layers}


def _unmasked_recurrent_model():
    """Every recurrent configuration the ONNX LSTM / GRU / RNN ops express, without a mask."""
    keras.utils.set_random_seed(3)
    i, h0, c0 = keras.Input((None, 4)), keras.Input((5,)), keras.Input((5,))
    a = layers.LSTM(5, return_sequences=True, name="lstm")(i, initial_state=[h0, c0])
    b = layers.GRU(6, return_sequences=True, go_backwards=True, name="gru")(a)
    c = layers.GRU(3, reset_after=False, name="gru_plain")(b)
    d = layers.Bidirectional(layers.LSTM(4, return_sequences=True), name="bi_lstm")(a)
    e, *states = layers.Bidirectional(layers.GRU(3, return_state=True), merge_mode="sum",
                                      name="bi_gru")(d)  # fmt: skip
    f = layers.SimpleRNN(2, activation="relu", name="rnn")(d)
    g, h = layers.SimpleRNN(3, return_sequences=True, return_state=True, go_backwards=True,
                            use_bias=False, name="rnn_back")(a)  # fmt: skip
    return keras.Model([i, h0, c0], [b, c, d, e, *states, f, g, h])


def _sequences(batch, length, seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype("float32")
            for shape in ((batch, length, 4), (batch, 5), (batch, 5))]  # fmt: skip


def test_unmasked_recurrent_layers_become_onnx_recurrent_ops():
    model = _unmasked_recurrent_model()
    x = _sequences(2, 7, seed=0)
    g = interop.trace(model, x)
    op_types = [n.op_type for n in g.model.graph]
    assert "Scan" not in op_types
    assert sorted(t for t in op_types if t in ("LSTM", "GRU", "RNN")) == [
        "GRU", "GRU", "GRU", "LSTM", "LSTM", "RNN", "RNN"
    ]  # fmt: skip
    bidirectional = [n for n in g.model.graph if n.attributes.get("direction") is not None
                     and n.attributes["direction"].value == "bidirectional"]  # fmt: skip
    assert sorted(n.op_type for n in bidirectional) == ["GRU", "LSTM"]
    # the weights stay the Keras variables, packed by ONNX nodes in the graph
    assert model.get_layer("bi_lstm").forward_layer.cell.kernel.path in g.parameter_kinds
    report = interop.verify(model, g, x)  # onnxruntime against Keras
    assert report.ok, str(report)
    other = _sequences(3, 11, seed=1)  # another batch and sequence length
    for got, want in zip(g.run(other), _keras(model, other), strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_captured_recurrent_layers_emit_as_native_layers():
    model = _unmasked_recurrent_model()
    x = _sequences(2, 7, seed=0)
    g = interop.trace(model, x)
    emitted = interop.to_keras(g)
    by_name = {layer.name: layer for layer in emitted.layers}
    expected = {"lstm": layers.LSTM, "gru": layers.GRU, "gru_plain": layers.GRU,
                "bi_lstm": layers.Bidirectional, "bi_gru": layers.Bidirectional,
                "rnn": layers.SimpleRNN, "rnn_back": layers.SimpleRNN}  # fmt: skip
    assert {name: type(by_name[name]) for name in expected} == expected
    assert by_name["gru"].go_backwards and not by_name["gru_plain"].cell.reset_after
    # Keras's own variable paths (backward_lstm_<n> when Keras numbered the layer) come back
    source = model.get_layer("bi_lstm").backward_layer.cell.kernel.path
    backward = by_name["bi_lstm"].backward_layer.cell.kernel.path
    assert emitted.source_names[backward] == source
    other = _sequences(3, 11, seed=1)
    want = _keras(model, other)
    for got, ref in zip(emitted(other), want, strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=RTOL, atol=ATOL)
    torch = pytest.importorskip("torch")
    module = interop.to_torch(g)
    # torch's own layers where nn.LSTM/GRU/RNN compute the node (forward or bidirectional,
    # GRU with reset_after); reverse-only and reset_after=False stay the generic recurrence
    native = sorted(type(m).__name__ for m in module.modules() if isinstance(m, torch.nn.RNNBase))
    assert native == ["OnnxGRU", "OnnxLSTM", "OnnxLSTM", "OnnxRNN"]
    with torch.no_grad():
        outputs = module(*[torch.from_numpy(v) for v in other])
    for got, ref in zip(outputs, want, strict=True):
        np.testing.assert_allclose(got.numpy(), ref, rtol=RTOL, atol=ATOL)


def test_masked_recurrent_layers_keep_the_scan():
    model = _sequence_model("LSTM", True)
    g = interop.trace(model, _tokens(3, 9, seed=5))
    op_types = {n.op_type for n in g.model.graph}
    assert "Scan" in op_types and "LSTM" not in op_types


class NeedsEagerValues(layers.Layer):
    def call(self, x):
        return x * float(np.asarray(x).sum())  # reads tensor values: not traceable


class Holder(keras.Model):
    def __init__(self):
        super().__init__()
        self.eager = NeedsEagerValues(name="eager")
        self.head = layers.Dense(2)

    def call(self, x):
        return self.head(self.eager(x))


def test_unsupported_layer_names_path_class_and_fix():
    model = Holder()
    model(_rand(2, 3))  # runs eagerly; only symbolic tracing fails
    with pytest.raises(UnsupportedOpError) as info:
        interop.trace(model, _rand(2, 3))
    message = str(info.value)
    assert "'eager'" in message and "NeedsEagerValues" in message and "register_layer" in message


class Doubler(layers.Layer):
    """Untraceable call; a registered converter (and an output shape) make it traceable."""

    def call(self, x):
        return x * float(np.asarray(x).size)

    def compute_output_shape(self, input_shape):
        return input_shape


def test_registered_converter_is_used():
    from interop.adapters.keras import register_layer

    @register_layer(Doubler, replace=True)
    def import_doubler(b, layer, x):
        return b.op("Mul", [x, b.const(np.float32(2.0))])

    i = keras.Input((3,))
    model = keras.Model(i, Doubler(name="twice")(i))
    x = _rand(2, 3)
    g = interop.trace(model, x)
    np.testing.assert_allclose(g.run(x), 2 * x, rtol=RTOL)
    assert {n.metadata_props.get("interop.scope") for n in g.model.graph} == {"twice"}


def test_keras_adapter_owns_keras_models_only(cnn):
    from interop.adapters.keras import ADAPTER

    assert ADAPTER.accepts(cnn) and ADAPTER.accepts(layers.Dense(2))
    assert not ADAPTER.accepts(np.zeros(3)) and not ADAPTER.accepts(object())
    assert interop.tracing.adapter_for(cnn) is ADAPTER
