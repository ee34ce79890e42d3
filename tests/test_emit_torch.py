"""Torch models traced to the IR and emitted back as torch modules: numerics, names, training."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from emit_models import MLP, Block, ResidualCNN, Tagger  # noqa: E402,F401
from interop.adapters.torch.emitter import TorchEmitter  # noqa: E402

import interop  # noqa: E402
from interop.emit import to_torch  # noqa: E402
from interop.errors import UnsupportedOpError  # noqa: E402
from interop.interpret import evaluate  # noqa: E402


def _encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)


CASES = {
    "residual_cnn": (ResidualCNN, lambda b: torch.randn(b, 3, 16, 16)),
    "mlp": (MLP, lambda b: torch.randn(b, 6)),
    "transformer_encoder": (_encoder, lambda b: torch.randn(b, 7, 16)),
    "lstm_tagger": (Tagger, lambda b: torch.randint(0, 20, (b, 9))),
}


@pytest.fixture(scope="module")
def traced():
    """Each model (eval mode) with its traced graph, built once for the module."""
    out = {}
    for name, (factory, make_input) in CASES.items():
        torch.manual_seed(0)
        model = factory().eval()
        graph = interop.trace(model, (make_input(2),))
        out[name] = (model, graph, make_input)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_emitted_module_matches_source(traced, name):
    model, graph, make_input = traced[name]
    module = to_torch(graph).eval()
    for batch in (2, 5):  # the traced batch and another: the batch dim stays dynamic
        x = make_input(batch)
        with torch.no_grad():
            expected, actual = model(x), module(x)
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_parameters_keep_source_names(traced, name):
    model, graph, _ = traced[name]
    module = to_torch(graph)
    emitted = {k: v for k, v in module.named_parameters()}
    source = dict(model.named_parameters())
    # every weight the exporter kept under its source name is a parameter of the same name
    kept = {k for k in source if k in graph.parameter_kinds}
    assert kept, "the trace kept no source names"
    assert kept <= set(emitted)
    for key in kept:
        values = emitted[key].detach().numpy()
        reference = source[key].detach().numpy()
        assert values.shape == reference.shape or values.T.shape == reference.shape
        np.testing.assert_allclose(
            values if values.shape == reference.shape else values.T, reference
        )


def test_native_layers_are_host_layers(traced):
    _, graph, _ = traced["residual_cnn"]
    module = to_torch(graph)
    layers = dict(module.named_modules())
    assert isinstance(layers["stem"], nn.Conv2d)
    assert isinstance(layers["blocks.0.conv"], nn.Conv2d)
    assert isinstance(layers["blocks.0.bn"], nn.BatchNorm2d)
    assert isinstance(layers["head"], nn.Linear)
    assert "blocks.0.conv.weight" in dict(module.named_parameters())
    _, graph, _ = traced["lstm_tagger"]
    assert isinstance(dict(to_torch(graph).named_modules())["embed"], nn.Embedding)


@pytest.mark.parametrize("name", ["residual_cnn", "mlp", "transformer_encoder"])
def test_one_optimizer_step_lowers_the_loss(traced, name):
    _, graph, make_input = traced[name]
    module = to_torch(graph).train()
    torch.manual_seed(1)
    x = make_input(8)
    target = module(x).detach() * 0.5 + 0.1
    module.eval()  # deterministic loss (no dropout noise) while comparing
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-2)
    loss = torch.nn.functional.mse_loss(module(x), target)
    loss.backward()
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    optimizer.step()
    with torch.no_grad():
        after_loss = torch.nn.functional.mse_loss(module(x), target)
    assert after_loss < loss
    assert any(not torch.equal(before[k], v) for k, v in module.named_parameters())


def test_train_mode_batchnorm_uses_batch_statistics(traced):
    model, graph, make_input = traced["residual_cnn"]
    module = to_torch(graph).train()
    bn = dict(module.named_modules())["blocks.0.bn"]
    before = bn.running_mean.clone()
    x = make_input(4) * 3 + 1
    module(x)
    assert not torch.allclose(bn.running_mean, before)
    reference = ResidualCNN()
    reference.load_state_dict(model.state_dict())
    reference.train()
    np.testing.assert_allclose(
        module(x).detach().numpy(), reference(x).detach().numpy(), rtol=1e-4, atol=1e-5
    )


def test_dropout_drops_in_train_and_not_in_eval(traced):
    _, graph, make_input = traced["mlp"]
    module = to_torch(graph)
    x = make_input(64)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    torch.manual_seed(0)
    first = module(x)
    assert not torch.equal(first, module(x))


def test_source_weights_are_the_trainable_parameters(traced):
    _, graph, _ = traced["transformer_encoder"]
    module = to_torch(graph)
    trainable = {k for k, v in graph.parameter_kinds.items() if v == "trainable"}
    assert set(dict(module.named_parameters())) == trainable
    assert all(p.requires_grad for p in module.parameters())
    assert not dict(module.named_buffers())  # the encoder holds no buffer and no constant


class _WithConstants(nn.Module):
    """A source buffer, BatchNorm running statistics and a literal tensor in forward."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("scale", torch.tensor([0.5, -1.0, 2.0]))
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x)) * self.scale + torch.tensor([1.0, 2.0, 3.0])


def test_constants_are_buffers_not_parameters():
    from models import randomize_batchnorm

    torch.manual_seed(0)
    source = randomize_batchnorm(_WithConstants()).eval()
    x = torch.randn(2, 4)
    graph = interop.trace(source, (x,))
    module = to_torch(graph).eval()
    parameters, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    assert set(parameters) == {"fc.weight", "fc.bias", "bn.weight", "bn.bias"}
    assert not set(parameters) & set(buffers)
    # the source's buffers keep their names and values
    for name in ("scale", "bn.running_mean", "bn.running_var"):
        assert name in buffers and not isinstance(buffers[name], nn.Parameter)
        assert not buffers[name].requires_grad
        torch.testing.assert_close(buffers[name], source.get_buffer(name), rtol=0, atol=0)
    # the literal tensor of forward is a buffer too, with its value
    literal = [n for n, b in buffers.items() if b.shape == (3,) and b.tolist() == [1.0, 2.0, 3.0]]
    assert len(literal) == 1, sorted(buffers)
    # every tensor the forward reads from the module is a registered parameter or buffer
    reads = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    assert reads and reads <= set(parameters) | set(buffers), reads - set(buffers)
    assert {"scale", literal[0]} <= reads
    # buffers are in the state dict (with their values) and move with .to()
    state = module.state_dict()
    assert set(buffers) <= set(state)
    for name, value in buffers.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    with torch.no_grad():
        expected = source(x)
        torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
        moved = to_torch(graph).eval().to(torch.float64)
        for name, value in moved.named_buffers():
            if value.is_floating_point():
                assert value.dtype == torch.float64, name
        torch.testing.assert_close(  # no float32 constant left behind to promote from
            moved(x.double()), expected.double(), rtol=1e-5, atol=1e-6
        )
        meta = to_torch(graph).to("meta")
        assert all(b.device.type == "meta" for b in meta.buffers())
        assert all(p.device.type == "meta" for p in meta.parameters())
    # a state dict with other buffer values loads into the buffers and changes the output
    other = dict(state)
    other["scale"] = state["scale"] * 2
    other[literal[0]] = state[literal[0]] + 1
    module.load_state_dict(other)
    with torch.no_grad():
        got = module(x)
        want = source.bn(source.fc(x)) * source.scale * 2 + torch.tensor([2.0, 3.0, 4.0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_numpy_backend_matches_onnxruntime(traced, name):
    _, graph, make_input = traced[name]
    x = make_input(3).numpy()
    expected = graph.run(x)
    expected = expected[0] if isinstance(expected, (list, tuple)) else expected
    actual = evaluate(graph, x)[0]
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_accepts_a_torch_model_and_an_onnx_proto(traced):
    model, graph, make_input = traced["mlp"]
    x = make_input(3)
    from_model = to_torch(model, (x,)).eval()
    from_proto = to_torch(graph.to_proto()).eval()
    with torch.no_grad():
        np.testing.assert_allclose(from_model(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(from_proto(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_unsupported_op_fails_before_building(monkeypatch):
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("FancyOp", ["r"], ["y"], domain="custom"),
    ]
    nodes[1].metadata_props.add(key="interop.scope", value="blocks.3.fancy")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("custom", 1)]
    )
    before = model.SerializeToString()
    emitted = []  # nodes the emitter got to: none, the check runs before any is built
    original = TorchEmitter.run_node

    def recording(self, node, *args, **kwargs):
        emitted.append(node.op_type)
        return original(self, node, *args, **kwargs)

    monkeypatch.setattr(TorchEmitter, "run_node", recording)
    with pytest.raises(UnsupportedOpError) as info:
        to_torch(model)
    assert emitted == []  # not even the supported Relu ahead of the unsupported node
    error = info.value
    assert (error.op, error.direction, error.adapter) == ("custom::FancyOp", "emit", "torch")
    assert error.layer == "blocks.3.fancy"
    message = str(error)
    assert "FancyOp" in message and "blocks.3.fancy" in message
    assert model.SerializeToString() == before  # the caller's model is left as it was


def test_control_flow_if_becomes_python_control_flow():
    from onnx import TensorProto, helper

    def branch(name, op):
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [None])
        return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_out"])], name, [], [out])

    node = helper.make_node(
        "If", ["cond"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Neg")
    )
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [None]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    module = to_torch(model)
    x = torch.tensor([-1.0, 2.0], requires_grad=True)
    for condition in (True, False):
        want = _onnxruntime(model, {"cond": np.array(condition), "x": x.detach().numpy()})[0]
        np.testing.assert_array_equal(module(torch.tensor(condition), x).detach().numpy(), want)
    assert module(torch.tensor(True), x).tolist() == [0.0, 2.0]
    y = module(torch.tensor(False), x)
    assert y.tolist() == [1.0, -2.0]
    y.sum().backward()
    assert x.grad.tolist() == [-1.0, -1.0]


def _onnxruntime(model, feeds: dict) -> list[np.ndarray]:
    """ONNX Runtime's outputs (CPU). It has no batch-first (layout=1) LSTM / GRU kernels:
    such a node runs as its time-major twin on transposed inputs, its outputs transposed
    back (Y [seq, dirs, batch, hidden] -> [batch, seq, dirs, hidden], states swap 0 / 1)."""
    import onnx
    import onnxruntime as ort

    node = model.graph.node[0]
    layout = next((a.i for a in node.attribute if a.name == "layout"), 0)
    if layout:
        twin = onnx.ModelProto()
        twin.CopyFrom(model)
        for attribute in twin.graph.node[0].attribute:
            if attribute.name == "layout":
                attribute.i = 0
        for value in twin.graph.input:
            dims = value.type.tensor_type.shape.dim
            first, second = dims[0].dim_value, dims[1].dim_value
            dims[0].dim_value, dims[1].dim_value = second, first
        feeds = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in feeds.items()}
        model = twin
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    if layout:
        outputs = [np.transpose(outputs[0], (2, 0, 1, 3))] + [
            np.swapaxes(o, 0, 1) for o in outputs[1:]
        ]
    return outputs


def _recurrent_model(op_type, layout, bidirectional, with_initial_h):
    """One ONNX LSTM/GRU node with initializer weights (as a plain ONNX file has them)."""
    from onnx import TensorProto, helper, numpy_helper

    gates = {"LSTM": 4, "GRU": 3}[op_type]
    dirs, hidden, size, batch, seq = (2 if bidirectional else 1), 5, 3, 2, 4
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.standard_normal((dirs, gates * hidden, size)),
        "R": rng.standard_normal((dirs, gates * hidden, hidden)),
        "B": rng.standard_normal((dirs, 2 * gates * hidden)),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    x_shape = [batch, seq, size] if layout else [seq, batch, size]
    h_shape = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B"]
    if with_initial_h:
        names += ["", "H0"]
        inputs.append(helper.make_tensor_value_info("H0", TensorProto.FLOAT, h_shape))
    attrs = {"linear_before_reset": 1} if op_type == "GRU" else {}
    node = helper.make_node(
        op_type,
        names,
        ["Y", "Y_h"],
        hidden_size=hidden,
        layout=layout,
        direction="bidirectional" if bidirectional else "forward",
        **attrs,
    )
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y", "Y_h")]
    model = helper.make_model(helper.make_graph([node], "rnn", inputs, outputs, inits))
    feeds = [rng.standard_normal(x_shape).astype(np.float32)]
    if with_initial_h:
        feeds.append(rng.standard_normal(h_shape).astype(np.float32))
    return model, feeds


@pytest.mark.parametrize(
    "op_type, layout, bidirectional, with_initial_h",
    [
        ("LSTM", 0, True, False),
        ("LSTM", 1, False, True),
        ("GRU", 1, True, True),
        ("GRU", 0, False, False),
    ],
)
def test_recurrent_nodes_become_native_layers(op_type, layout, bidirectional, with_initial_h):
    model, feeds = _recurrent_model(op_type, layout, bidirectional, with_initial_h)
    module = to_torch(model)
    native = [m for m in module.modules() if isinstance(m, getattr(nn, op_type))]
    assert len(native) == 1 and native[0].bidirectional == bidirectional
    outputs = module(*[torch.from_numpy(f) for f in feeds])
    names = [i.name for i in model.graph.input]
    # the ONNX recurrence, gate order and layout as specified, run by ONNX Runtime
    reference = _onnxruntime(model, dict(zip(names, feeds)))
    assert len(outputs) == len(reference) == 2
    for actual, expected in zip(outputs, reference, strict=True):
        assert tuple(actual.shape) == expected.shape
        np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    # the project's evaluator agrees too (an extra, not the reference)
    for actual, generic in zip(outputs, evaluate(model, *feeds), strict=True):
        np.testing.assert_allclose(actual.detach().numpy(), generic, rtol=1e-4, atol=1e-5)


def test_gru_without_linear_before_reset_stays_generic():
    model, feeds = _recurrent_model("GRU", 0, False, False)
    (reset,) = [a for a in model.graph.node[0].attribute if a.name == "linear_before_reset"]
    reset.i = 0  # torch's GRU applies the reset gate after the linear map only
    module = to_torch(model)
    assert not any(isinstance(m, nn.GRU) for m in module.modules())
    outputs = module(*[torch.from_numpy(f) for f in feeds])
    reference = _onnxruntime(model, {"X": feeds[0]})
    assert len(outputs) == len(reference) == 2
    for actual, expected in zip(outputs, reference, strict=True):
        assert tuple(actual.shape) == expected.shape
        np.testing.assert_allclose(actual.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    # and the result differs from the linear_before_reset=1 recurrence it must not take
    reset.i = 1
    other = _onnxruntime(model, {"X": feeds[0]})[0]
    assert not np.allclose(outputs[0].detach().numpy(), other, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("net", [nn.LSTM(4, 6, num_layers=2, bidirectional=True), nn.GRU(4, 6)])
def test_traced_recurrent_modules_match_source(net):
    x = torch.randn(5, 3, 4)
    module = to_torch(interop.trace(net.eval(), (x,), dynamic_batch=False))
    expected = net(x)
    actual = module(x)
    flat = [expected[0], *(expected[1] if isinstance(expected[1], tuple) else [expected[1]])]
    for a, e in zip(actual, flat, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


class _Recurrent(nn.Module):
    """Stacked LSTM and bidirectional GRU: torch.onnx exports each layer as an ONNX node."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.gru = nn.GRU(16, 12, batch_first=True, bidirectional=True)
        self.head = nn.Linear(24, 3)

    def forward(self, tokens):
        hidden, _ = self.lstm(self.embed(tokens))
        hidden, _ = self.gru(hidden)
        return self.head(hidden.mean(1))


def test_traced_recurrent_modules_become_native_layers_with_source_names():
    torch.manual_seed(0)
    source = _Recurrent().eval()
    tokens = torch.randint(0, 30, (2, 7))
    graph = interop.trace(source, (tokens,))
    nodes_before = len(list(graph.model.graph))
    module = to_torch(graph)
    assert len(list(graph.model.graph)) == nodes_before  # the caller's graph is not rewritten
    # one module per source module: the two exported LSTM nodes share one nn.LSTM(num_layers=2)
    assert isinstance(module.lstm, nn.LSTM) and module.lstm.num_layers == 2
    assert isinstance(module.gru, nn.GRU) and module.gru.bidirectional
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in source.named_parameters()]
    assert module.source_names["lstm.weight_hh_l1"] == "lstm.weight_hh_l1"
    # weight orientation and gate order are the source's: its state dict loads as it is
    other = _Recurrent().eval()
    loaded = module.load_state_dict(other.state_dict(), strict=False)
    assert loaded.unexpected_keys == []  # (missing: the graph's own constants, kept as buffers)
    assert not set(loaded.missing_keys) & set(dict(module.named_parameters()))
    for batch, steps in ((2, 7), (3, 4)):
        x = torch.randint(0, 30, (batch, steps))
        torch.testing.assert_close(module(x), other(x), rtol=1e-4, atol=1e-5)
    # trains: one SGD step moves every recurrent weight and lowers the loss
    module.train()
    target = torch.randn(2, 3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = ((module(tokens) - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    for name in ("lstm.weight_ih_l1", "gru.weight_hh_l0_reverse", "gru.bias_ih_l0"):
        assert not torch.equal(before[name], dict(module.named_parameters())[name])


def test_recurrent_weights_tied_elsewhere_stay_generic():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 4, batch_first=True)

        def forward(self, x):
            y, _ = self.lstm(x)
            return y @ self.lstm.weight_hh_l0[:4]  # the weight also feeds a MatMul

    torch.manual_seed(1)
    source = Tied().eval()
    x = torch.randn(2, 5, 4)
    module = to_torch(interop.trace(source, (x,)))
    assert not any(isinstance(m, nn.LSTM) for m in module.modules())
    torch.testing.assert_close(module(x), source(x), rtol=1e-4, atol=1e-5)
