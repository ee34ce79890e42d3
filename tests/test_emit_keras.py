"""Graphs traced from torch and Keras models, emitted as Keras models: numerics, names, training."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
nn = torch.nn

from models import ResNetish, TextLSTM, randomize_batchnorm  # noqa: E402

import interop  # noqa: E402
from interop.emit import to_keras  # noqa: E402
from interop.errors import UnsupportedOpError  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.layers(x)


def _resnet():
    return randomize_batchnorm(ResNetish())


def _encoder():
    return nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)


CASES = {
    "resnet_nchw": (_resnet, lambda b: torch.randn(b, 3, 16, 16)),
    "mlp": (MLP, lambda b: torch.randn(b, 6)),
    "transformer_encoder": (_encoder, lambda b: torch.randn(b, 7, 16)),
    "lstm_embedding": (TextLSTM, lambda b: torch.randint(0, 50, (b, 9))),
}


@pytest.fixture(scope="module")
def traced():
    """Each torch model (eval mode) with its traced graph, built once for the module."""
    out = {}
    for name, (factory, make_input) in CASES.items():
        torch.manual_seed(0)
        model = factory().eval()
        out[name] = (model, interop.trace(model, (make_input(2),)), make_input)
    return out


def _run(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x)))


@pytest.mark.parametrize("name", list(CASES))
def test_emitted_model_matches_torch_source(traced, name):
    model, graph, make_input = traced[name]
    emitted = to_keras(graph)
    assert isinstance(emitted, keras.Model)
    for batch in (2, 5):  # the traced batch and another: the batch dim stays dynamic
        x = make_input(batch)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_run(emitted, x.numpy()), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_variables_keep_source_names(traced, name):
    model, graph, _ = traced[name]
    emitted = to_keras(graph)
    variables = {v.path: v for v in emitted.weights}
    # a variable holding several source parameters (a recurrent bias: ih + hh) names them all
    by_source = {
        source: path for path, joined in emitted.source_names.items()
        for source in joined.split("+")
    }  # fmt: skip
    kept = {k for k in dict(model.named_parameters()) if k in graph.parameter_kinds}
    assert kept and kept <= set(by_source)
    state = model.state_dict()
    for key in kept:
        path = by_source[key]
        value = keras.ops.convert_to_numpy(variables[path])
        parts = emitted.source_names[path].split("+")
        reference = sum(state[part].numpy() for part in parts)
        # Dense / recurrent kernels are [in, out] (torch's ifgo gates are Keras's ifco), conv
        # kernels HWIO
        if path.endswith(("/kernel", "/recurrent_kernel")):
            rank = reference.ndim
            value = np.transpose(value, (rank - 1, rank - 2, *range(rank - 2)))
        np.testing.assert_allclose(value, reference, rtol=1e-6)


def test_native_layers_and_layout(traced):
    _, graph, make_input = traced["resnet_nchw"]
    emitted = to_keras(graph)
    layers = {layer.name: layer for layer in emitted.layers}
    assert isinstance(layers["blocks.0.conv1"], keras.layers.Conv2D)
    assert layers["blocks.0.conv1"].data_format == "channels_last"
    assert isinstance(layers["blocks.0.bn1"], keras.layers.BatchNormalization)
    assert isinstance(layers["head"], keras.layers.Dense)
    assert emitted.source_names["blocks.0.conv1/kernel"] == "blocks.0.conv1.weight"
    # NCHW at the edges, NHWC inside: the input stays (None, 3, 16, 16)
    assert tuple(emitted.inputs[0].shape) == (None, 3, 16, 16)
    # consecutive channels-last layers meet without transposes: few permutations in all
    transposes = [layer for layer in emitted.layers if type(layer).__name__ == "Transpose"]
    convolutions = [layer for layer in emitted.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(transposes) < len(convolutions)
    _, graph, _ = traced["lstm_embedding"]
    embedded = {layer.name: layer for layer in to_keras(graph).layers}
    assert isinstance(embedded["embed"], keras.layers.Embedding)
    # nn.LSTM(num_layers=2): one ONNX LSTM per layer, weights packed into initializers
    assert [type(embedded[n]) for n in ("lstm", "lstm_1")] == [keras.layers.LSTM] * 2


@pytest.mark.parametrize("name", ["resnet_nchw", "mlp", "transformer_encoder"])
def test_gradient_step_lowers_the_loss(traced, name):
    import tensorflow as tf

    _, graph, make_input = traced[name]
    emitted = to_keras(graph)
    torch.manual_seed(1)
    x = tf.constant(make_input(8).numpy())
    target = emitted(x) * 0.5 + 0.1
    before = [np.array(v.numpy()) for v in emitted.trainable_variables]
    optimizer = keras.optimizers.SGD(learning_rate=1e-2)
    with tf.GradientTape() as tape:
        loss = keras.ops.mean((emitted(x, training=False) - target) ** 2)
    gradients = tape.gradient(loss, emitted.trainable_variables)
    assert all(g is not None for g in gradients)
    optimizer.apply_gradients(zip(gradients, emitted.trainable_variables))
    after = keras.ops.mean((emitted(x, training=False) - target) ** 2)
    assert float(after) < float(loss)
    assert any(
        not np.array_equal(b, v.numpy()) for b, v in zip(before, emitted.trainable_variables)
    )


def _deterministic_training(emitted):
    # a fit step changes BatchNorm's moving statistics and dropout is random: freeze both so
    # that the inference-mode loss before and after one step is comparable
    for layer in emitted.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


def test_compiled_fit_step_on_tensorflow(traced):
    _, graph, make_input = traced["resnet_nchw"]
    emitted = to_keras(graph)
    _deterministic_training(emitted)
    x = make_input(8).numpy()
    y = np.asarray(emitted(x)) * 0.5
    emitted.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    first = emitted.evaluate(x, y, batch_size=8, verbose=0)
    emitted.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert emitted.evaluate(x, y, batch_size=8, verbose=0) < first


def test_training_batchnorm_uses_batch_statistics_and_updates_moving_stats(traced):
    model, graph, make_input = traced["resnet_nchw"]
    emitted = to_keras(graph)
    bn = emitted.get_layer("blocks.0.bn1")
    before = np.array(bn.moving_mean.numpy())
    x = make_input(4) * 3 + 1
    actual = _run_training(emitted, x.numpy())
    assert not np.allclose(bn.moving_mean.numpy(), before)
    reference = _resnet()
    reference.load_state_dict(model.state_dict())
    reference.train()
    for module in reference.modules():  # dropout is random in both: compare without it
        if isinstance(module, nn.Dropout):
            module.eval()
    with torch.no_grad():
        expected = reference(x).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def _run_training(emitted, x):
    # dropout off, batch norm in training: call the layers' training flag per layer type
    for layer in emitted.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return np.asarray(emitted(x, training=True))


def test_dropout_drops_in_training_only(traced):
    _, graph, make_input = traced["mlp"]
    emitted = to_keras(graph)
    x = make_input(64).numpy()
    np.testing.assert_array_equal(_run(emitted, x), _run(emitted, x))
    first, second = np.asarray(emitted(x, training=True)), np.asarray(emitted(x, training=True))
    assert not np.array_equal(first, second)


def test_constants_are_not_trainable(traced):
    _, graph, _ = traced["transformer_encoder"]
    emitted = to_keras(graph)
    trainable = {emitted.source_names.get(v.path) for v in emitted.trainable_variables}
    assert trainable <= set(graph.parameter_kinds)


@pytest.mark.parametrize("name", ["transformer_encoder", "resnet_nchw"])
def test_save_and_load_round_trip(traced, name, tmp_path):
    _, graph, make_input = traced[name]
    emitted = to_keras(graph)
    path = tmp_path / "emitted.keras"
    emitted.save(path)
    loaded = keras.saving.load_model(path)
    x = make_input(3).numpy()
    np.testing.assert_allclose(_run(loaded, x), _run(emitted, x), rtol=1e-6, atol=1e-6)
    assert {v.path for v in loaded.weights} == {v.path for v in emitted.weights}


def _keras_cnn():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Conv2D(4, 3, strides=2, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="dense")(x)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(0)
    bn.moving_mean.assign(rng.normal(size=8).astype("float32") * 0.1)
    bn.moving_variance.assign(rng.uniform(0.5, 1.5, size=8).astype("float32"))
    return model


def test_keras_round_trip_matches_and_trains():
    source = _keras_cnn()
    x = np.random.default_rng(1).normal(size=(2, 12, 12, 3)).astype("float32")
    emitted = to_keras(interop.trace(source, (x,)))
    for batch in (2, 5):
        xb = np.random.default_rng(batch).normal(size=(batch, 12, 12, 3)).astype("float32")
        np.testing.assert_allclose(_run(emitted, xb), _run(source, xb), rtol=1e-4, atol=1e-5)
    # Keras's own channels-last layout: the capture's transposes cancel, none are left
    assert not [layer for layer in emitted.layers if type(layer).__name__ == "Transpose"]
    assert set(emitted.source_names.values()) >= {"conv/kernel", "bn/moving_mean", "dense/bias"}
    _deterministic_training(emitted)
    emitted.compile(optimizer=keras.optimizers.SGD(1e-2), loss="categorical_crossentropy")
    y = np.eye(3, dtype="float32")[[0, 1]]
    first = emitted.evaluate(x, y, verbose=0)
    emitted.fit(x, y, epochs=1, verbose=0)
    assert emitted.evaluate(x, y, verbose=0) < first


def test_accepts_a_torch_model_and_an_onnx_proto(traced):
    model, graph, make_input = traced["mlp"]
    x = make_input(3)
    expected = model(x).detach().numpy()
    np.testing.assert_allclose(
        _run(to_keras(model, (x,)), x.numpy()), expected, rtol=1e-4, atol=1e-5
    )
    from_proto = to_keras(graph.to_proto())
    np.testing.assert_allclose(_run(from_proto, x.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_unsupported_op_fails_before_building():
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="first"), node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedOpError) as info:
        to_keras(onnx.ModelProto.FromString(proto.SerializeToString()))
    assert "NoSuchOp" in str(info.value) and "mystery" in str(info.value)


def test_if_becomes_keras_cond_under_tf_function():
    import tensorflow as tf
    from onnx import TensorProto, helper

    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [None, 3])],
    )  # fmt: skip
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None, 3])],
    )  # fmt: skip
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", 1, [], [0.0])),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph),
    ]
    graph = helper.make_graph(
        nodes, "g", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])]
    )
    model = to_keras(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    staged = tf.function(lambda x: model(x))  # the condition is symbolic here: keras.ops.cond
    positive = np.array([[1.0, -2.0, 3.0]], np.float32)
    negative = -positive
    np.testing.assert_allclose(staged(positive).numpy(), np.maximum(positive, 0))
    np.testing.assert_allclose(staged(negative).numpy(), -negative)
    np.testing.assert_allclose(_run(model, negative), -negative)


def _loop_model():
    """x <- 0.5 x + 1 until sum(x) >= 20, at most 10 times: a data-dependent termination."""
    from onnx import TensorProto, helper, numpy_helper

    def info(name, dtype, shape):
        return helper.make_tensor_value_info(name, dtype, shape)

    body = helper.make_graph(
        [helper.make_node("Mul", ["x_in", "half"], ["m"]),
         helper.make_node("Add", ["m", "one"], ["x_out"]),
         helper.make_node("ReduceSum", ["x_out"], ["s"], keepdims=0),
         helper.make_node("Less", ["s", "limit"], ["cond_out"])],
        "body",
        [info("i", TensorProto.INT64, []), info("cond_in", TensorProto.BOOL, []),
         info("x_in", TensorProto.FLOAT, [None, 3])],
        [info("cond_out", TensorProto.BOOL, []), info("x_out", TensorProto.FLOAT, [None, 3])],
        initializer=[numpy_helper.from_array(np.float32(0.5), "half"),
                     numpy_helper.from_array(np.float32(1.0), "one")],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "c0", "x"], ["y"], body=body)], "loop",
        [info("x", TensorProto.FLOAT, [None, 3])], [info("y", TensorProto.FLOAT, [None, 3])],
        initializer=[numpy_helper.from_array(np.int64(10), "M"),
                     numpy_helper.from_array(np.array(True), "c0"),
                     numpy_helper.from_array(np.float32(20.0), "limit")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _scan_model():
    """A running sum over axis 1 read backwards, its tanh stacked on the last axis."""
    from onnx import TensorProto, helper

    def info(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    body = helper.make_graph(
        [helper.make_node("Add", ["acc_in", "x_t"], ["acc_out"]),
         helper.make_node("Tanh", ["acc_out"], ["y_t"])],
        "body", [info("acc_in", [None, 3]), info("x_t", [None, 3])],
        [info("acc_out", [None, 3]), info("y_t", [None, 3])],
    )  # fmt: skip
    scan = helper.make_node(
        "Scan", ["acc0", "x"], ["acc", "ys"], body=body, num_scan_inputs=1,
        scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[-1],
    )  # fmt: skip
    graph = helper.make_graph(
        [scan], "scan", [info("acc0", [None, 3]), info("x", [None, 4, 3])],
        [info("acc", [None, 3]), info("ys", [None, 3, 4])],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _op_types(function, *args):
    return {op.type for op in function.get_concrete_function(*args).graph.get_operations()}


def test_loop_becomes_keras_while_loop_under_tf_function():
    import onnxruntime as ort
    import tensorflow as tf

    proto = _loop_model()
    model = to_keras(proto)
    session = ort.InferenceSession(proto.SerializeToString())
    staged = tf.function(lambda x: model(x))  # the condition is symbolic: keras.ops.while_loop
    for x in (np.array([[1.0, 2.0, 3.0], [0.1, 0.2, -5.0]], np.float32),
              np.full((1, 3), 30.0, np.float32)):  # fmt: skip
        expected = session.run(None, {"x": x})[0]
        np.testing.assert_allclose(staged(x).numpy(), expected, rtol=1e-5)
        np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5)  # eager: Python loop
    assert _op_types(staged, x) & {"While", "StatelessWhile"}


def test_scan_becomes_keras_scan_under_tf_function():
    import onnxruntime as ort
    import tensorflow as tf

    proto = _scan_model()
    model = to_keras(proto)
    rng = np.random.default_rng(0)
    acc0, x = rng.random((2, 3), np.float32), rng.random((2, 4, 3), np.float32)
    expected = ort.InferenceSession(proto.SerializeToString()).run(None, {"acc0": acc0, "x": x})
    staged = tf.function(lambda a, b: model([a, b]))
    for outputs in (staged(acc0, x), model([acc0, x])):
        for got, want in zip(outputs, expected):
            assert tuple(got.shape) == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    # one while loop in the graph, not four unrolled steps
    assert _op_types(staged, acc0, x) & {"While", "StatelessWhile"}


_BACKEND_SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch, keras, interop, sys
    sys.path.insert(0, {tests!r})
    from models import ResNetish, randomize_batchnorm
    torch.manual_seed(0)
    net = randomize_batchnorm(ResNetish()).eval()
    x = torch.randn(2, 3, 16, 16)
    emitted = interop.to_keras(interop.trace(net, (x,)))
    assert keras.backend.backend() == {backend!r}
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 16, 16)
        expected = net(xb).detach().numpy()
        actual = keras.ops.convert_to_numpy(emitted(xb.numpy()))
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
        predicted = emitted.predict(xb.numpy(), verbose=0, batch_size=batch)  # compiled path
        np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-5)
    xs = torch.randn(8, 3, 16, 16).numpy()
    y = keras.ops.convert_to_numpy(emitted(xs)) * 0.5
    for layer in emitted.layers:  # deterministic loss: frozen batch statistics, no dropout
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    emitted.compile(optimizer=keras.optimizers.SGD(1e-2), loss="mse")
    first = emitted.evaluate(xs, y, batch_size=8, verbose=0)
    emitted.fit(xs, y, batch_size=8, epochs=1, verbose=0)
    assert emitted.evaluate(xs, y, batch_size=8, verbose=0) < first
    print("ok", first)
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_other_keras_backends_in_subprocess(backend):
    tests = str(Path(__file__).parent)
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_PLATFORMS="cpu")
    script = _BACKEND_SCRIPT.format(tests=tests, backend=backend)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout


def test_activation_after_dense_or_conv_is_the_layers_own():
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x):
            h = torch.relu(self.conv(x)).mean(dim=(2, 3))
            h = torch.tanh(self.fc(h))
            y = self.out(h)
            return y, torch.sigmoid(y)  # y is read twice: the sigmoid stays its own op

    torch.manual_seed(0)
    source = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    model = to_keras(interop.trace(source, (x,)))
    activations = {
        type(layer).__name__ + ":" + layer.activation.__name__
        for layer in model.layers
        if hasattr(layer, "activation")
    }
    assert {"Conv2D:relu", "Dense:tanh", "Dense:linear"} <= activations
    assert "Dense:sigmoid" not in activations
    with torch.no_grad():
        expected = [t.numpy() for t in source(x)]
    got = model(x.numpy())
    for want, have in zip(expected, got):
        np.testing.assert_allclose(np.asarray(have), want, rtol=1e-5, atol=1e-6)
