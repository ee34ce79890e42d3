"""Keras layers no converter or symbolic call can open, captured by the backend's tracer.

A layer that calls its backend directly (``tf.*`` on TensorFlow, ``jax.*`` on JAX,
``torch.*`` on torch) cannot run on KerasTensors; capture_tracer.py traces it with the
backend's own tracer. Checked against ``model(x)`` at the traced batch and another one,
with the Keras parameter names, the layer tree and parameter counts intact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

keras = pytest.importorskip("keras")
from keras import layers, ops  # noqa: E402

import interop  # noqa: E402
from interop.errors import UnsupportedOpError  # noqa: E402

# the layer and checks, run on the TensorFlow backend here and on JAX / torch in subprocesses
SCRIPT = r'''
import warnings
import numpy as np
import keras
from keras import layers
import interop
from interop import provenance

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

    def direct(x):
        return tf.nn.softplus(x) * tf.cast(tf.shape(x)[1], x.dtype)
elif BACKEND == "jax":
    import jax

    def direct(x):
        return jax.nn.softplus(x) * x.shape[1]
else:
    import torch

    def direct(x):
        return torch.nn.functional.softplus(x) * x.shape[1]


class Direct(layers.Layer):
    """Calls the backend directly between two Keras sub-layers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(4, name="inner_dense")
        self.norm = layers.LayerNormalization(name="inner_norm")
        self.dropout = layers.Dropout(0.5)  # a seed generator: state, not a weight

    def call(self, x, training=None):
        return self.norm(self.dropout(direct(self.dense(x)), training=training))


def build():
    inputs = keras.Input((5, 3))
    outputs = layers.Dense(2, name="head")(Direct(name="direct")(inputs))
    return keras.Model(inputs, outputs)


def check():
    keras.utils.set_random_seed(0)
    model = build()
    x = np.random.RandomState(0).rand(2, 5, 3).astype("float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = interop.trace(model, x)
    said = [str(w.message) for w in caught if "backend's tracer" in str(w.message)]
    assert len(said) == 1 and "'direct' (Direct)" in said[0] and BACKEND in said[0], said
    assert not any("does not hold" in str(w.message) for w in caught)
    assert graph.inputs[0].shape == ("batch", 5, 3)
    for batch in (2, 5):
        xb = np.random.RandomState(batch).rand(batch, 5, 3).astype("float32")
        expected = keras.ops.convert_to_numpy(model(xb, training=False))
        np.testing.assert_allclose(graph.run(xb), expected, rtol=1e-4, atol=1e-5)
    assert graph.count_params() == model.count_params() == 34
    names = set(graph.model.graph.initializers)
    assert {"direct/inner_dense/kernel", "direct/inner_dense/bias", "direct/inner_norm/gamma",
            "direct/inner_norm/beta", "head/kernel"} <= names, names
    scopes = {n.metadata_props.get(provenance.SCOPE) for n in graph.model.graph}
    assert "direct" in scopes or "direct/inner_dense" in scopes, scopes
    if BACKEND != "torch":  # torch.export sees no module calls inside a Keras layer
        assert {"direct/inner_dense", "direct/inner_norm"} <= scopes, scopes
    return graph, model, x


if __name__ == "__main__":
    check()
    print("OK")
'''


def _script_namespace():
    namespace: dict = {"__name__": "tracer_script"}
    exec(compile(SCRIPT, "tracer_script", "exec"), namespace)
    return namespace


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")
def test_layer_calling_tensorflow_directly_is_traced_by_tf_function():
    graph, model, x = _script_namespace()["check"]()
    # downstream: the capture emits to torch within 1e-4 and its weights train
    torch = pytest.importorskip("torch")
    module = interop.to_torch(graph)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    got = module(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    params = dict(module.named_parameters())
    assert sum(p.numel() for p in params.values()) == model.count_params()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = {k: v.detach().clone() for k, v in params.items()}
    module(torch.tensor(x)).square().mean().backward()
    optimizer.step()
    moved = [k for k, v in params.items() if not torch.equal(v.detach(), before[k])]
    assert len(moved) == len(params), sorted(set(params) - set(moved))


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_layer_calling_its_backend_directly_on_jax_and_torch(backend):
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")
def test_layer_no_tracer_can_convert_names_layer_source_and_fix():
    import tensorflow as tf

    class PythonCallback(layers.Layer):
        def call(self, x):
            return tf.numpy_function(lambda a: a * 2, [x], tf.float32)

        def compute_output_shape(self, shape):
            return shape

    inputs = keras.Input((3,))
    model = keras.Model(inputs, PythonCallback(name="callback")(inputs))
    with pytest.raises(UnsupportedOpError) as caught:
        interop.trace(model, np.ones((2, 3), "float32"))
    message = str(caught.value)
    assert caught.value.layer == "callback"
    assert "PythonCallback" in message and "tensorflow backend's tracer" in message
    assert "test_keras_tracer.py:" in (caught.value.location or ""), caught.value.location
    assert "register_layer('PythonCallback')" in message


@pytest.mark.parametrize("fft", ["fft", "fft2", "ifft2"])
def test_fourier_transforms(fft):
    """keras.ops.fft / fft2 / ifft2 on (real, imaginary) pairs, as keras_hub's FNet uses."""

    class Mix(layers.Layer):
        def call(self, x):
            real, imag = getattr(ops, fft)((x, ops.sin(x)))
            return real + 2 * imag

    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, Mix()(inputs))
    x = np.random.RandomState(0).rand(3, 6, 8).astype("float32")
    graph = interop.trace(model, x)
    assert [n.op_type for n in graph.model.graph].count("DFT") == (1 if fft == "fft" else 2)
    for batch in (x, x[:1]):
        np.testing.assert_allclose(graph.run(batch), np.asarray(model(batch)), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")
def test_model_whose_layer_declares_a_wrong_shape_is_retraced_by_the_backend():
    """A layer declaring one position less than it returns (keras_hub PARSeq, XLNet), and a
    layer computing with the declared length: the symbolic graph fails at the example, so
    the custom layers are traced by the backend, which sees the real shapes."""

    class AppendsOne(layers.Layer):
        def call(self, x):
            return ops.concatenate([x, x[:, :1]], axis=1)

        def compute_output_shape(self, shape):
            return shape  # wrong: the length grows by one

    class AddsPositions(layers.Layer):
        def call(self, x):
            positions = ops.arange(x.shape[1], dtype="float32")  # Python on the length
            return x + positions[None, :, None]

    inputs = keras.Input((5, 3))
    model = keras.Model(inputs, AddsPositions(name="positions")(AppendsOne(name="append")(inputs)))
    x = np.random.RandomState(0).rand(2, 5, 3).astype("float32")
    with pytest.warns(UserWarning, match="traced by the tensorflow backend instead"):
        graph = interop.trace(model, x)
    for batch in (x, np.random.RandomState(1).rand(4, 5, 3).astype("float32")):
        expected = np.asarray(model(batch))
        assert expected.shape == (len(batch), 6, 3)
        np.testing.assert_allclose(graph.run(batch), expected, rtol=1e-6)


def test_nested_functional_fed_one_rank_less_than_its_input():
    """A nested Functional whose ``Input((1,))`` is fed a vector gets the trailing axis
    Keras's Functional call adds (keras_hub Stable Diffusion 3's diffuser timestep)."""
    inner_in = keras.Input((1,), name="timestep")
    inner = keras.Model(inner_in, layers.Dense(4, name="embed")(inner_in), name="inner")
    inputs = keras.Input((), name="t")
    model = keras.Model(inputs, inner(inputs))
    x = np.random.RandomState(0).rand(3).astype("float32")
    graph = interop.trace(model, x)
    for batch in (x, x[:2]):
        np.testing.assert_allclose(graph.run(batch), np.asarray(model(batch)), rtol=1e-5)


def test_vector_output_axis_is_not_named_batch():
    """A layer returning the positions of the sequence (rank 1, its length, not the batch:
    keras_hub Moonshine's ``Arange``) keeps an unnamed axis, so ONNX Runtime does not take
    it for the batch."""

    class Positions(layers.Layer):
        def call(self, x):
            return ops.arange(ops.shape(x)[1], dtype="float32")

    inputs = keras.Input((None, 3))
    positions = Positions(name="positions")(inputs)
    model = keras.Model(inputs, inputs * positions[None, :, None])
    x = np.random.RandomState(0).rand(2, 7, 3).astype("float32")
    graph = interop.trace(model, x)
    shapes = [v.shape for n in graph.model.graph for v in n.outputs if n.op_type == "Range"]
    assert shapes and all(s is None or s[0] != "batch" for s in shapes), shapes
    for batch in (x, x[:1, :4]):
        np.testing.assert_allclose(graph.run(batch), np.asarray(model(batch)), rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")
def test_branch_on_a_size_folds_at_the_example_sizes_with_a_dynamic_batch(monkeypatch):
    """``ops.cond`` on the number of masks (keras_hub SAM's prompt encoder): at run-time
    dims tf2onnx writes an ``If`` whose untaken conv branch ONNX cannot type; traced again
    with the batch dynamic and the other dims at the example's, the branch folds. The
    run-time graph is never converted by tf2onnx (half of keras_hub SAM3's trace time)."""
    from interop.adapters.keras import capture_tf2onnx

    converted = []
    original = capture_tf2onnx._converted

    def counted(traced, signature):
        converted.append([s.shape.as_list() for s in signature])
        return original(traced, signature)

    monkeypatch.setattr(capture_tf2onnx, "_converted", counted)

    class MaybeMasks(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = layers.Conv2D(4, 2, strides=2, name="conv")
            self.none = layers.Embedding(1, 4, name="none")

        def build(self, x_shape, masks_shape):
            self.conv.build((None, 8, 8, 1))
            self.none.build((1,))

        def call(self, x, masks):
            batch = ops.shape(x)[0]

            def no_mask():
                vector = ops.reshape(self.none(ops.arange(1)), (1, 1, 1, 4))
                return ops.broadcast_to(vector, (batch, 4, 4, 4))

            def with_mask():
                if masks.shape[1] == 0:
                    return no_mask()
                s = ops.shape(masks)
                return self.conv(ops.reshape(masks, (s[0] * s[1], s[2], s[3], s[4])))

            embedded = ops.cond(ops.equal(ops.shape(masks)[1], 0), no_mask, with_mask)
            return embedded + ops.mean(x)

        def compute_output_shape(self, x_shape, masks_shape):
            return (None, 4, 4, 4)

    x_in, masks_in = keras.Input((3,)), keras.Input((None, 8, 8, 1))
    model = keras.Model([x_in, masks_in], MaybeMasks(name="maybe")(x_in, masks_in))
    rng = np.random.RandomState(0)
    x, masks = rng.rand(2, 3).astype("float32"), np.zeros((2, 0, 8, 8, 1), "float32")
    with pytest.warns(UserWarning, match="backend's tracer"):
        graph = interop.trace(model, [x, masks])
    assert "If" not in [n.op_type for n in graph.model.graph]
    assert len(converted) == 1 and converted[0][-1] == [None, 0, 8, 8, 1], converted
    assert graph.inputs[0].shape[0] == "batch"
    assert graph.count_params() == model.count_params()
    for batch in (2, 5):
        xs, ms = rng.rand(batch, 3).astype("float32"), np.zeros((batch, 0, 8, 8, 1), "float32")
        np.testing.assert_allclose(graph.run(xs, ms), np.asarray(model([xs, ms])), rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")
def test_tensor_array_of_a_python_loop_is_lowered():
    """A recurrence unrolled by a Python loop over the length into a ``tf.TensorArray``
    (keras_hub RWKV7's time mix): tf2onnx leaves its TensorList ops unconverted; interop
    lowers them to ScatterND on a ``(length, *item)`` tensor, the batch kept dynamic."""
    import tensorflow as tf

    class Recurrence(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(4, name="proj")

        def call(self, x):
            h = self.dense(x)
            state = ops.zeros((ops.shape(x)[0], 4))
            out = tf.TensorArray(h.dtype, size=ops.shape(x)[1])
            for t in range(ops.shape(x)[1]):
                state = ops.tanh(state * 0.5 + h[:, t])
                out = out.write(t, state)
            return ops.transpose(out.stack(), [1, 0, 2])

        def compute_output_shape(self, shape):
            return (*shape[:2], 4)

    inputs = keras.Input((None, 3))
    model = keras.Model(inputs, Recurrence(name="rec")(inputs))
    rng = np.random.RandomState(0)
    x = rng.rand(2, 5, 3).astype("float32")
    with pytest.warns(UserWarning, match="backend's tracer"):
        graph = interop.trace(model, x)
    assert [n.op_type for n in graph.model.graph].count("ScatterND") == 5
    assert graph.inputs[0].shape == ("batch", 5, 3)  # the length is the example's
    assert graph.count_params() == model.count_params()
    for batch in (x, rng.rand(3, 5, 3).astype("float32")):
        np.testing.assert_allclose(graph.run(batch), np.asarray(model(batch)), rtol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow backend")
def test_map_over_the_batch_writes_a_loop_with_scan_outputs():
    """``ops.map`` over the batch (keras_hub D-FINE's query generator gathering each
    sample's top-k rows) is a ``tf.while_loop`` writing a TensorArray: tf2onnx turns its
    writes into the ``Loop``'s scan outputs. interop's own TensorList lowering (for Python
    loops, above) must leave such lists to tf2onnx, or the loop body's ScatterND on the
    list's int32 length stand-in makes a Loop ONNX Runtime refuses."""
    import tensorflow as tf

    class TopRows(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = layers.Dense(4, name="proj")

        def call(self, x):
            h = self.dense(x)
            top = tf.math.top_k(ops.max(h, axis=-1), k=2)[1]
            return ops.map(lambda e: ops.take(e[0], e[1], axis=0), (h, top))

        def compute_output_shape(self, shape):
            return (shape[0], 2, 4)

    inputs = keras.Input((6, 3))
    model = keras.Model(inputs, TopRows(name="top")(inputs))
    rng = np.random.RandomState(0)
    x = rng.rand(2, 6, 3).astype("float32")
    with pytest.warns(UserWarning, match="backend's tracer"):
        graph = interop.trace(model, x)
    assert "Loop" in [n.op_type for n in graph.model.graph]
    assert graph.count_params() == model.count_params()
    for batch in (x, rng.rand(3, 6, 3).astype("float32")):
        np.testing.assert_allclose(graph.run(batch), np.asarray(model(batch)), rtol=1e-6)


def test_flattened_rows_are_not_named_batch():
    """A reshape to ``(-1, hidden)`` inside a layer (keras_hub Qwen3.5-MoE's router) has
    batch * length rows: its unknown first axis must not be named the batch, or making the
    batch static later declares the wrong size there and ONNX Runtime refuses the graph."""

    class Route(layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.gate = layers.Dense(3, name="gate")

        def call(self, x):
            rows = ops.reshape(x, (-1, 4))
            logits = self.gate(rows)
            weights = ops.sum(ops.softmax(logits), -1, keepdims=True)
            return ops.reshape(rows * weights, ops.shape(x)), logits

    inputs = keras.Input((None, 4))
    model = keras.Model(inputs, Route(name="route")(inputs))
    rng = np.random.RandomState(0)
    x = rng.rand(2, 5, 4).astype("float32")
    graph = interop.trace(model, x)
    nodes = list(graph.model.graph)
    rows = [n.outputs[0].shape for n in nodes if n.op_type == "Reshape"][:-1]
    rows += [n.outputs[0].shape for n in nodes if "gate" in (n.name or "")]  # a Dense on rows
    assert len(rows) > 1 and all(s is None or s[0] != "batch" for s in rows), rows
    for batch in (x, rng.rand(3, 2, 4).astype("float32")):
        for got, expected in zip(graph.run(batch), model(batch), strict=True):
            np.testing.assert_allclose(got, np.asarray(expected), rtol=1e-5, atol=1e-6)


TORCH_OPSET20 = r"""
import numpy as np, keras, torch, interop
from keras import layers

class Spectral(layers.Layer):
    '''Calls torch directly: an FFT (DFT-20 with its axis as an input) and the exact and
    tanh GELUs (Gelu-20) in the torch capture's opset-20 graph (keras_hub FNet, SigLIP).'''
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = layers.Dense(6, name="proj")
    def call(self, x):
        h = self.dense(x)
        spectrum = torch.fft.fft2(torch.complex(h, torch.zeros_like(h)))
        mixed = torch.nn.functional.gelu(spectrum.real)
        return torch.nn.functional.gelu(mixed + spectrum.imag, approximate="tanh")

inputs = keras.Input((4, 3))
model = keras.Model(inputs, Spectral(name="spectral")(inputs))
x = np.random.RandomState(0).rand(2, 4, 3).astype("float32")
graph = interop.trace(model, x)
ops = [n.op_type for n in graph.model.graph]
assert "Gelu" not in ops and ops.count("DFT") == 2 and "Erf" in ops and "Tanh" in ops, ops
np.testing.assert_allclose(graph.run(x), np.asarray(model(x).detach()), rtol=1e-4, atol=1e-5)
assert graph.count_params() == model.count_params()
print("OK")
"""


@pytest.mark.slow
def test_torch_traced_opset_20_ops_are_written_at_the_graphs_opset():
    """The torch capture writes opset 20; the Keras graph is opset 18: DFT's axis input
    becomes its attribute and Gelu its function body when the layer is spliced."""
    pytest.importorskip("torch")
    env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", TORCH_OPSET20], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_example_shapes_of_a_constant_and_of_a_computed_value():
    """A layer input the walk made as a constant (keras_hub D-FINE's decoder on torch) and
    one computed from the example input both get their example shapes."""
    from interop.adapters.keras.capture_concrete import example_shapes
    from interop.adapters.keras.capture_lowering import Builder, Tensor

    b = Builder()
    x = ir.Value(name="x", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    b.examples = {"x": np.ones((3, 4), "float32")}
    constant = Tensor(b.const(np.zeros((5, 4, 2), "float32")), (None, 4, 2))
    computed = Tensor(b.op("Concat", [x, x], {"axis": 1}), (None, None))
    shapes = example_shapes(b, [constant, computed], every=True)
    assert shapes == {id(constant): (5, 4, 2), id(computed): (3, 8)}


def test_nested_functional_fed_a_dict_beside_keyword_options_matches_inputs_by_name():
    """A dict passed to a nested Functional together with a keyword option (keras_hub's
    Gemma3n CausalLM calls its backbone with ``mask=``) is matched to the inner inputs by
    name, not flattened in sorted key order (that swapped 'token_ids' and 'padding_mask')."""
    ids = keras.Input((5,), dtype="int32", name="token_ids")
    mask = keras.Input((5,), dtype="bool", name="padding_mask")
    table = keras.layers.Embedding(10, 3, name="embed")(ids)
    keep = keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1)
    inner = keras.Model([ids, mask], table * keep, name="inner")  # inputs not in key order
    feeds = {
        "token_ids": keras.Input((5,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input((5,), dtype="bool", name="padding_mask"),
    }
    outer = keras.Model(feeds, inner(feeds, mask=None, training=False), name="outer")
    rng = np.random.RandomState(0)
    x = {
        "token_ids": rng.randint(1, 10, (2, 5)).astype("int32"),
        "padding_mask": rng.rand(2, 5) > 0.3,
    }
    graph = interop.trace(outer, x)
    assert [v.name for v in graph.model.graph.inputs] == ["padding_mask", "token_ids"]
    expected = np.asarray(outer(x))
    assert np.abs(expected).max() > 0.01 and (expected == 0).any()  # the mask matters
    np.testing.assert_allclose(graph.run(**x), expected, rtol=1e-6, atol=1e-6)


def test_scatter_update_is_converted_without_the_tracer():
    """``ops.scatter_update`` (keras_hub Gemma4's centroid logits) has a converter: the
    layer opens symbolically, with no backend tracer."""

    class Scatter(layers.Layer):
        def call(self, x, idx):
            rows = ops.reshape(ops.arange(ops.shape(x)[0], dtype="int32"), (-1, 1))
            coords = ops.concatenate([rows, idx], axis=1)
            return ops.scatter_update(ops.zeros_like(x), coords, ops.sum(x, axis=1))

    x_in, i_in = keras.Input((5,)), keras.Input((1,), dtype="int32")
    model = keras.Model([x_in, i_in], Scatter(name="scatter")(x_in, i_in))
    rng = np.random.RandomState(0)
    x, idx = rng.rand(3, 5).astype("float32"), np.array([[4], [0], [2]], "int32")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = interop.trace(model, [x, idx])
    assert not any("backend's tracer" in str(w.message) for w in caught)
    assert "ScatterND" in [n.op_type for n in graph.model.graph]
    np.testing.assert_allclose(graph.run(x, idx), np.asarray(model([x, idx])), rtol=1e-6)
