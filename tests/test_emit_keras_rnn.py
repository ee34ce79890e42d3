"""ONNX LSTM / GRU / RNN nodes emitted as keras.layers.LSTM / GRU / SimpleRNN: numerics
against onnxruntime, layer classes, fallbacks to the generic recurrence, training, saving."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
ort = pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
from interop.adapters.keras.emit_generic import OnnxOp  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import interop  # noqa: E402

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
NATIVE = {"LSTM": keras.layers.LSTM, "GRU": keras.layers.GRU, "RNN": keras.layers.SimpleRNN}
SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6


def recurrent_model(op, direction="forward", layout=0, bias=True, initial=False, seed=0,
                    **attributes):  # fmt: skip
    """(model, feeds): one LSTM/GRU/RNN node with initializer weights, built with onnx.helper."""
    rng = np.random.default_rng(seed)
    dirs = 2 if direction == "bidirectional" else 1
    rows = GATES[op] * HIDDEN
    arrays = {
        "W": rng.standard_normal((dirs, rows, INPUT)),
        "R": rng.standard_normal((dirs, rows, HIDDEN)),
        "B": rng.standard_normal((dirs, 2 * rows)),
    }
    if not bias:
        del arrays["B"]
    inputs = ["X", "W", "R", "B" if bias else ""]
    x_shape = [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT]
    state_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    feeds = {"X": rng.standard_normal(x_shape)}
    if initial:
        inputs += ["", "h0"] + (["c0"] if op == "LSTM" else [])
        feeds |= {name: rng.standard_normal(state_shape) for name in inputs[5:]}
    while inputs[-1] == "":
        inputs.pop()
    outputs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    node = helper.make_node(
        op, inputs, outputs, name="rnn", hidden_size=HIDDEN, direction=direction, layout=layout,
        **attributes,
    )  # fmt: skip
    y_shape = [BATCH, SEQ, dirs, HIDDEN] if layout else [SEQ, dirs, BATCH, HIDDEN]
    graph = helper.make_graph(
        [node], "recurrent",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(np.shape(v)))
         for n, v in feeds.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)]
        + [helper.make_tensor_value_info(n, TensorProto.FLOAT, state_shape) for n in outputs[1:]],
        initializer=[numpy_helper.from_array((0.5 * a).astype(np.float32), n)
                     for n, a in arrays.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    onnx.checker.check_model(model)
    return model, {k: v.astype(np.float32) for k, v in feeds.items()}


def onnxruntime_outputs(model, feeds):
    """ORT's outputs; onnxruntime has no batch-first (layout=1) kernels, so those run as the
    time-major twin of the node on transposed inputs, transposed back."""
    layout = next(a.i for a in model.graph.node[0].attribute if a.name == "layout")
    if not layout:
        return ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for attribute in twin.graph.node[0].attribute:
        if attribute.name == "layout":
            attribute.i = 0
    for value in [*twin.graph.input, *twin.graph.output]:
        dims = value.type.tensor_type.shape.dim
        order = [1, 2, 0, 3] if len(dims) == 4 else [1, 0, 2]
        if value.name == "X":
            order = [1, 0, 2]
        values = [d.dim_value for d in dims]
        for d, i in zip(dims, order):
            d.dim_value = values[i]
    outputs = ort.InferenceSession(twin.SerializeToString()).run(
        None, {k: np.swapaxes(v, 0, 1) for k, v in feeds.items()}
    )
    return [np.transpose(outputs[0], (2, 0, 1, 3))] + [np.swapaxes(o, 0, 1) for o in outputs[1:]]


def call(model, feeds):
    outputs = model(list(feeds.values()) if len(feeds) > 1 else feeds["X"])
    return [np.asarray(o) for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])]


def recurrent_layers(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.Bidirectional):
            found += [layer.forward_layer, layer.backward_layer]
        elif isinstance(layer, keras.layers.RNN):
            found.append(layer)
    return found


CASES = [
    # op, direction, layout, bias, initial states, extra attributes
    ("LSTM", "forward", 0, True, False, {}),
    ("LSTM", "forward", 1, False, True, {}),
    ("LSTM", "reverse", 0, True, True, {}),
    ("LSTM", "bidirectional", 0, True, True, {}),
    ("LSTM", "bidirectional", 1, True, False, {}),
    ("GRU", "forward", 0, True, False, {"linear_before_reset": 1}),
    ("GRU", "forward", 0, True, True, {"linear_before_reset": 0}),
    ("GRU", "reverse", 1, True, True, {"linear_before_reset": 1}),
    ("GRU", "bidirectional", 0, False, True, {"linear_before_reset": 0}),
    ("GRU", "bidirectional", 1, True, True, {"linear_before_reset": 1}),
    ("RNN", "forward", 0, True, True, {}),
    ("RNN", "reverse", 0, False, False, {}),
    ("RNN", "bidirectional", 1, True, True, {}),
    ("RNN", "forward", 1, True, False, {"activations": ["Relu"]}),
]


@pytest.mark.parametrize(
    "op,direction,layout,bias,initial,attributes",
    CASES,
    ids=[f"{c[0]}-{c[1]}-layout{c[2]}-{'b' if c[3] else 'nob'}-{'h0' if c[4] else 'noh0'}"
         + "".join(f"-{k}{v}" for k, v in c[5].items()) for c in CASES],
)  # fmt: skip
def test_native_layer_matches_onnxruntime(op, direction, layout, bias, initial, attributes):
    model, feeds = recurrent_model(op, direction, layout, bias, initial, **attributes)
    emitted = interop.to_keras(model)
    layers = recurrent_layers(emitted)
    assert len(layers) == (2 if direction == "bidirectional" else 1)
    assert all(isinstance(layer, NATIVE[op]) for layer in layers)
    assert not any(isinstance(layer, OnnxOp) for layer in emitted.layers)  # no generic recurrence
    if op == "GRU":
        assert layers[0].cell.reset_after == bool(attributes["linear_before_reset"])
        lbr = attributes["linear_before_reset"]
        if bias:  # reset_after keeps ONNX's two biases apart, else they are summed
            assert tuple(layers[0].cell.bias.shape) == ((2, 3 * HIDDEN) if lbr else (3 * HIDDEN,))
    if not bias:
        assert all(layer.cell.bias is None for layer in layers)
    if direction == "reverse":
        assert layers[0].go_backwards
    expected = onnxruntime_outputs(model, feeds)
    actual = call(emitted, feeds)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_variables_keep_source_names_and_kernel_orientation():
    model, _ = recurrent_model("LSTM", "bidirectional")
    emitted = interop.to_keras(model)
    assert emitted.source_names == {
        f"rnn/{side}_lstm/lstm_cell/{name}": source
        for side in ("forward", "backward")
        for name, source in (("kernel", "W"), ("recurrent_kernel", "R"), ("bias", "B"))
    }
    w = numpy_helper.to_array(model.graph.initializer[0])
    forward = emitted.get_layer("rnn").forward_layer.cell
    kernel = np.asarray(forward.kernel)
    assert kernel.shape == (INPUT, 4 * HIDDEN)
    # ONNX iofc -> Keras ifco: Keras's forget block is ONNX's third, its output block the second
    np.testing.assert_array_equal(kernel[:, HIDDEN : 2 * HIDDEN], w[0, 2 * HIDDEN : 3 * HIDDEN].T)
    np.testing.assert_array_equal(kernel[:, 3 * HIDDEN :], w[0, HIDDEN : 2 * HIDDEN].T)


@pytest.mark.parametrize(
    "op,attributes,extra_input",
    [
        ("LSTM", {"clip": 0.5}, None),
        ("LSTM", {"input_forget": 1}, None),
        ("GRU", {"activations": ["HardSigmoid", "Tanh"], "linear_before_reset": 1}, None),
        ("RNN", {}, "sequence_lens"),
        ("LSTM", {}, "peepholes"),
    ],
)
def test_inexpressible_nodes_stay_generic_and_correct(op, attributes, extra_input):
    model, feeds = recurrent_model(op, **attributes)
    node = model.graph.node[0]
    if extra_input == "sequence_lens":
        node.input.extend([""] * (4 - len(node.input)) + ["lens"])
        model.graph.initializer.append(
            numpy_helper.from_array(np.array([5, 2, 4], np.int32), "lens")
        )
    if extra_input == "peepholes":
        node.input.extend([""] * (7 - len(node.input)) + ["P"])
        peep = np.random.default_rng(1).standard_normal((1, 3 * HIDDEN)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(peep, "P"))
    emitted = interop.to_keras(model)
    assert recurrent_layers(emitted) == []
    assert [layer.op_type for layer in emitted.layers if isinstance(layer, OnnxOp)] == [op]
    expected = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    for got, want in zip(call(emitted, feeds), expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_gradient_step_lowers_the_loss(op):
    attributes = {"linear_before_reset": 1} if op == "GRU" else {}
    # batch-first (layout=1) everywhere: fit slices batches along axis 0
    model, feeds = recurrent_model(op, "bidirectional", layout=1, initial=True, **attributes)
    emitted = interop.to_keras(model)
    inputs = list(feeds.values())
    target = np.zeros((BATCH, SEQ, 2, HIDDEN), np.float32)
    trained = keras.Model(emitted.inputs, emitted.outputs[0])  # Y only: fit needs every target
    trained.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = float(np.mean((call(emitted, feeds)[0] - target) ** 2))
    kernel = np.asarray(recurrent_layers(emitted)[0].cell.kernel).copy()
    trained.fit(inputs, target, epochs=3, batch_size=BATCH, verbose=0)
    after = float(np.mean((call(emitted, feeds)[0] - target) ** 2))
    assert after < before
    assert not np.allclose(np.asarray(recurrent_layers(emitted)[0].cell.kernel), kernel)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_save_and_load_round_trip(op, tmp_path):
    attributes = {"linear_before_reset": 0} if op == "GRU" else {}
    model, feeds = recurrent_model(op, "reverse", layout=1, initial=True, **attributes)
    emitted = interop.to_keras(model)
    path = tmp_path / "recurrent.keras"
    emitted.save(path)
    loaded = keras.saving.load_model(path)
    assert [type(layer) for layer in recurrent_layers(loaded)] == [NATIVE[op]]
    expected = onnxruntime_outputs(model, feeds)
    for got, want in zip(call(loaded, feeds), expected, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


class TorchRecurrent:
    """nn.LSTM (two layers, bidirectional) into nn.GRU: torch.onnx slices and concatenates
    their parameters into the nodes' W/R/B, which `interop.packing` folds into initializers."""

    @staticmethod
    def build():
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lstm = torch.nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True)
                self.gru = torch.nn.GRU(12, 5, batch_first=True)

            def forward(self, x):
                y, _ = self.lstm(x)
                z, h = self.gru(y)
                return z, h

        torch.manual_seed(0)
        return Model().eval()


def test_traced_torch_lstm_and_gru_become_native_layers():
    torch = pytest.importorskip("torch")
    source = TorchRecurrent.build()
    graph = interop.trace(source, (torch.randn(2, 7, 4),))
    emitted = interop.to_keras(graph)
    layers = {layer.name: layer for layer in emitted.layers}
    assert [type(layers[n]) for n in ("lstm", "lstm_1", "gru")] == [
        keras.layers.Bidirectional, keras.layers.Bidirectional, keras.layers.GRU
    ]  # fmt: skip
    assert isinstance(layers["lstm"].forward_layer, keras.layers.LSTM)
    assert layers["gru"].cell.reset_after  # torch's GRU is ONNX linear_before_reset=1
    assert not [layer.op_type for layer in emitted.layers
                if isinstance(layer, OnnxOp) and layer.op_type in GATES]  # fmt: skip
    names = emitted.source_names
    assert names["lstm_1/backward_lstm/lstm_cell/kernel"] == "lstm.weight_ih_l1_reverse"
    assert names["gru/gru_cell/bias"] == "gru.bias_ih_l0+gru.bias_hh_l0"
    for batch in (2, 5):
        x = torch.randn(batch, 7, 4)
        with torch.no_grad():
            expected = [t.numpy() for t in source(x)]
        actual = emitted(x.numpy())
        for got, want in zip(actual, expected, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
