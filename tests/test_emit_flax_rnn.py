"""ONNX LSTM / GRU / RNN nodes emitted as Flax's own recurrent layers (nnx.RNN over cells)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
ort = pytest.importorskip("onnxruntime")

import jax.numpy as jnp  # noqa: E402
import onnx  # noqa: E402
from interop.adapters.flax.emit_recurrent import GRUCellWithHiddenBias  # noqa: E402
from interop.adapters.flax.emitter import Frozen  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from interop.emit import to_flax, to_jax  # noqa: E402

SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
CELLS = {"LSTM": nnx.OptimizedLSTMCell, "GRU": nnx.GRUCell, "RNN": nnx.SimpleCell}


def _model(op_type, direction="forward", layout=0, bias=True, initial=False, attrs=None):
    """One recurrent node with initializer W/R/B, plus its feeds (X and maybe states)."""
    # the same weights and data for both layouts (onnxruntime computes layout 0 only)
    rng = np.random.default_rng(zlib.crc32(repr((op_type, direction, bias, initial)).encode()))
    dirs = 2 if direction == "bidirectional" else 1
    gates = GATES[op_type]
    weights = {
        "W": rng.normal(0, 0.5, (dirs, gates * HIDDEN, INPUT)),
        "R": rng.normal(0, 0.5, (dirs, gates * HIDDEN, HIDDEN)),
    }
    if bias:
        weights["B"] = rng.normal(0, 0.5, (dirs, 2 * gates * HIDDEN))
    state_shape = [BATCH, dirs, HIDDEN] if layout else [dirs, BATCH, HIDDEN]
    x_shape = [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT]
    y_shape = [BATCH, SEQ, dirs, HIDDEN] if layout else [SEQ, dirs, BATCH, HIDDEN]
    feeds = {"X": rng.normal(0, 1, (SEQ, BATCH, INPUT)).astype(np.float32)}
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    node_inputs = ["X", "W", "R", "B" if bias else ""]
    if initial:
        node_inputs += ["", "initial_h"] + (["initial_c"] if op_type == "LSTM" else [])
        for name in node_inputs[5:]:
            feeds[name] = rng.normal(0, 1, (dirs, BATCH, HIDDEN)).astype(np.float32)
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, state_shape))
    outputs = ["Y", "Y_h"] + (["Y_c"] if op_type == "LSTM" else [])
    attrs = ({"linear_before_reset": 1} if op_type == "GRU" else {}) | (attrs or {})
    node = helper.make_node(
        op_type,
        node_inputs,
        outputs,
        hidden_size=HIDDEN,
        direction=direction,
        layout=layout,
        **attrs,
    )
    graph = helper.make_graph(
        [node],
        "rnn",
        inputs,
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
            for name, shape in zip(outputs, [y_shape, state_shape, state_shape])
        ],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    if layout:
        feeds = {k: np.ascontiguousarray(np.swapaxes(v, 0, 1)) for k, v in feeds.items()}
    return model, feeds


def _reference(op_type, direction, layout, bias, initial, attrs=None):
    """onnxruntime's outputs; for layout 1 (which it rejects) those of the layout-0 node,
    whose weights and data are the same, moved to batch-major."""
    model, feeds = _model(op_type, direction, 0, bias, initial, attrs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, *states = session.run(None, feeds)
    if layout:
        y, states = np.transpose(y, (2, 0, 1, 3)), [np.swapaxes(s, 0, 1) for s in states]
    return [y, *states]


def _rnns(module):
    """The nnx.RNN layers held by an emitted module."""
    return [m for _, m in nnx.iter_graph(module) if isinstance(m, nnx.RNN)]


CASES = [
    (op, direction, layout, bias, initial)
    for op in ("LSTM", "GRU", "RNN")
    for direction in ("forward", "reverse", "bidirectional")
    for layout in (0, 1)
    for bias, initial in ((True, True), (False, False))
]


@pytest.mark.parametrize("op_type,direction,layout,bias,initial", CASES)
def test_native_layer_matches_onnxruntime(op_type, direction, layout, bias, initial):
    model, feeds = _model(op_type, direction, layout, bias, initial)
    expected = _reference(op_type, direction, layout, bias, initial)
    module = to_flax(model)
    rnns = _rnns(module)
    assert len(rnns) == (2 if direction == "bidirectional" else 1)
    assert sorted(r.reverse for r in rnns) == (
        [False, True] if direction == "bidirectional" else [direction == "reverse"]
    )
    for rnn in rnns:
        assert isinstance(rnn.cell, CELLS[op_type])
        assert rnn.time_major == (layout == 0)
    if op_type == "GRU":
        assert all(isinstance(r.cell, GRUCellWithHiddenBias) == bias for r in rnns)
    if direction == "bidirectional":
        assert isinstance(
            module.lstm if op_type == "LSTM" else getattr(module, op_type.lower()),
            nnx.Bidirectional,
        )
    eager = module(**feeds)
    jitted = nnx.jit(lambda m, f: m(**f))(module, feeds)
    assert len(eager) == len(expected)
    for want, got, got_jit in zip(expected, eager, jitted, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got_jit), want, rtol=1e-4, atol=1e-5)


def test_state_paths_and_source_names():
    model, _ = _model("GRU", "bidirectional", bias=True)
    module = to_flax(model)
    params = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    assert params == {
        f"gru.{d}_rnn.cell.{leaf}"
        for d in ("forward", "backward")
        for leaf in ("dense_i.kernel", "dense_i.bias", "dense_h.kernel", "dense_h.bias")
    }
    assert module.source_names["gru.backward_rnn.cell.dense_i.kernel"] == "W"
    assert module.source_names["gru.forward_rnn.cell.dense_h.kernel"] == "R"
    assert module.source_names["gru.forward_rnn.cell.dense_h.bias"] == "B"
    # kernels are [in, gates * hidden], the ONNX gate blocks z,r,h reordered to r,z,n
    w = numpy_helper.to_array(model.graph.initializer[0])
    kernel = np.asarray(module.gru.backward_rnn.cell.dense_i.kernel[...])
    assert kernel.shape == (INPUT, 3 * HIDDEN)
    np.testing.assert_array_equal(kernel[:, :HIDDEN], w[1, HIDDEN : 2 * HIDDEN].T)  # r
    np.testing.assert_array_equal(kernel[:, HIDDEN : 2 * HIDDEN], w[1, :HIDDEN].T)  # z
    # an LSTM's single bias is ONNX's Wb + Rb, gates i,o,f,c -> i,f,g,o
    model, _ = _model("LSTM", bias=True)
    module = to_flax(model)
    b = numpy_helper.to_array(model.graph.initializer[2])[0]
    summed = b[: 4 * HIDDEN] + b[4 * HIDDEN :]
    bias = np.asarray(module.lstm.cell.dense_h.bias[...])
    np.testing.assert_allclose(bias[HIDDEN : 2 * HIDDEN], summed[2 * HIDDEN : 3 * HIDDEN])  # f
    np.testing.assert_allclose(bias[3 * HIDDEN :], summed[HIDDEN : 2 * HIDDEN])  # o
    assert module.source_names["lstm.cell.dense_h.bias"] == "B"
    assert "lstm.cell.dense_i.bias" not in module.source_names


@pytest.mark.parametrize(
    "op_type,attrs",
    [
        ("RNN", {"activations": ["Relu"]}),
        ("GRU", {"activations": ["Sigmoid", "Relu"]}),
        ("LSTM", {"activations": ["Sigmoid", "Relu", "Relu"]}),
    ],
)
def test_expressible_activations_stay_native(op_type, attrs):
    model, feeds = _model(op_type, bias=True, initial=True, attrs=attrs)
    module = to_flax(model)
    assert len(_rnns(module)) == 1
    for want, got in zip(
        _reference(op_type, "forward", 0, True, True, attrs), module(**feeds), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "op_type,attrs,extra",
    [
        ("LSTM", {"clip": 0.5}, None),
        ("LSTM", {"input_forget": 1}, None),
        ("LSTM", {"activations": ["Sigmoid", "Tanh", "Relu"]}, None),  # g != h
        ("GRU", {"linear_before_reset": 0}, None),
        (
            "RNN",
            {"activations": ["HardSigmoid"], "activation_alpha": [0.3], "activation_beta": [0.4]},
            None,
        ),
        # alpha alone: beta keeps HardSigmoid's default 0.5
        ("RNN", {"activations": ["HardSigmoid"], "activation_alpha": [0.3]}, None),
        ("LSTM", {}, "sequence_lens"),
        ("LSTM", {}, "peepholes"),
    ],
)
def test_inexpressible_nodes_run_the_generic_recurrence(op_type, attrs, extra):
    model, feeds = _model(op_type, bias=True, initial=True, attrs=attrs)
    node = model.graph.node[0]
    if extra == "sequence_lens":
        node.input[4] = "lens"
        model.graph.initializer.append(
            numpy_helper.from_array(np.array([SEQ, SEQ - 2, 1], np.int32), "lens")
        )
    if extra == "peepholes":
        node.input.append("P")
        peep = np.random.default_rng(0).normal(0, 0.5, (1, 3 * HIDDEN)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(peep, "P"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    module = to_flax(model)
    assert _rnns(module) == []
    for want, got in zip(expected, module(**feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_jit_scans_instead_of_unrolling():
    model, feeds = _model("LSTM", "bidirectional", bias=True, initial=True)
    fn, params = to_jax(model)
    jaxpr = str(jax.make_jaxpr(fn)(params, *feeds.values()))
    assert jaxpr.count("scan[") == 2  # one per direction, whatever SEQ is
    assert jaxpr.count("dot_general") == 4  # the two cell matmuls per direction, once each


@pytest.mark.parametrize("op_type", ["LSTM", "GRU", "RNN"])
def test_one_optax_step_lowers_the_loss(op_type):
    model, feeds = _model(op_type, "bidirectional", bias=True, initial=True)
    module = to_flax(model)
    target = [o * 0.5 + 0.1 for o in module(**feeds)]
    optimizer = nnx.Optimizer(module, optax.sgd(0.1), wrt=nnx.Param)

    def loss_fn(m):
        return sum(jnp.mean((o - t) ** 2) for o, t in zip(m(**feeds), target))

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss, grads

    before, grads = step(module, optimizer)
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
    cell = f"{op_type.lower()}.backward_rnn.cell."
    assert float(jnp.abs(flat[cell + "dense_h.kernel"]).sum()) > 0
    assert float(jnp.abs(flat[cell + "dense_i.kernel"]).sum()) > 0
    assert float(loss_fn(module)) < float(before)


def test_to_jax_gradients_reach_the_cells():
    model, feeds = _model("GRU", "forward", bias=True, initial=True)
    fn, params = to_jax(model)
    assert sorted(params["gru"]["cell"]) == ["dense_h", "dense_i"]
    expected = _reference("GRU", "forward", 0, True, True)
    np.testing.assert_allclose(
        np.asarray(jax.jit(fn)(params, **feeds)[0]), expected[0], rtol=1e-4, atol=1e-5
    )
    grads = jax.grad(lambda p: jnp.sum(fn(p, **feeds)[1] ** 2))(params)
    for leaf in jax.tree.leaves(grads):
        assert float(jnp.abs(leaf).sum()) > 0
    assert jax.tree.structure(grads) == jax.tree.structure(params)


# ---------------------------------------------------------------- traced torch nn.LSTM / nn.GRU
def _torch_models():
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Bidirectional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 6, batch_first=True, bidirectional=True)
            self.gru = nn.GRU(12, 5, batch_first=True)

        def forward(self, x):
            y, _ = self.lstm(x)
            z, h = self.gru(y)
            return z, h

    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 6, num_layers=2)
            self.gru = nn.GRU(6, 5, bidirectional=True, bias=False)

        def forward(self, x, h0, c0):
            y, (h, c) = self.lstm(x, (h0, c0))
            z, hg = self.gru(y)
            return z, hg, h, c

    return torch, Bidirectional, Stacked


def test_traced_torch_lstm_gru_become_flax_layers():
    torch, Bidirectional, _ = _torch_models()
    torch.manual_seed(0)
    model = Bidirectional().eval()
    x = torch.randn(2, 7, 4)
    import interop

    module = to_flax(interop.trace(model, (x,)))
    assert isinstance(module.lstm, nnx.Bidirectional)
    assert isinstance(module.lstm.backward_rnn.cell, nnx.OptimizedLSTMCell)
    assert isinstance(module.gru, nnx.RNN)
    assert isinstance(module.gru.cell, GRUCellWithHiddenBias)
    assert module.source_names["lstm.backward_rnn.cell.dense_i.kernel"] == (
        "lstm.weight_ih_l0_reverse"
    )
    assert module.source_names["lstm.forward_rnn.cell.dense_h.bias"] == (
        "lstm.bias_ih_l0+lstm.bias_hh_l0"
    )
    assert module.source_names["gru.cell.dense_i.bias"] == "gru.bias_ih_l0"
    assert module.source_names["gru.cell.dense_h.bias"] == "gru.bias_hh_l0"
    named = {n for names in module.source_names.values() for n in names.split("+")}
    assert named == {name for name, _ in model.named_parameters()}
    # the torch gate order (i,f,g,o) is Flax's: the kernel is torch's weight transposed
    np.testing.assert_array_equal(
        np.asarray(module.lstm.forward_rnn.cell.dense_i.kernel[...]),
        model.lstm.weight_ih_l0.detach().numpy().T,
    )
    expected = [t.detach().numpy() for t in model(x)]
    for outputs in (module(x.numpy()), nnx.jit(lambda m, v: m(v))(module, x.numpy())):
        for want, got in zip(expected, outputs, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_traced_stacked_lstm_and_frozen_gru():
    torch, _, Stacked = _torch_models()
    torch.manual_seed(1)
    model = Stacked().eval()
    for name, parameter in model.gru.named_parameters():
        parameter.requires_grad_(not name.startswith("weight_hh"))
    args = (torch.randn(7, 2, 4), torch.randn(2, 2, 6), torch.randn(2, 2, 6))
    import interop

    graph = interop.trace(model, args, dynamic_batch=False)
    module = to_flax(graph)
    assert isinstance(module.lstm.cell, nnx.OptimizedLSTMCell)
    assert isinstance(module.lstm_l1.cell, nnx.OptimizedLSTMCell)  # layer 1 beside layer 0
    assert module.source_names["lstm_l1.cell.dense_h.kernel"] == "lstm.weight_hh_l1"
    gru = module.gru.forward_rnn.cell
    assert type(gru) is nnx.GRUCell  # bias=False: flax's own GRUCell, dense_i.bias zeros
    assert not np.any(np.asarray(gru.dense_i.bias[...]))
    assert "gru.forward_rnn.cell.dense_i.bias" not in module.source_names
    assert isinstance(gru.dense_h.kernel, Frozen) and isinstance(gru.dense_i.kernel, nnx.Param)
    expected = [t.detach().numpy() for t in model(*args)]
    jitted = nnx.jit(lambda m, *a: m(*a))(module, *_numpy(args))
    for outputs in (module(*_numpy(args)), jitted):
        for want, got in zip(expected, outputs, strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    fn, params = to_jax(graph)
    assert "dense_h" not in params["gru"]["forward_rnn"]["cell"]  # frozen: not a Param
    np.testing.assert_allclose(  # eager: no trace level to cross
        np.asarray(fn(params, *_numpy(args))[0]), expected[0], rtol=1e-4, atol=1e-5
    )


def test_to_jax_jit_with_frozen_recurrent_weights():
    torch, _, Stacked = _torch_models()
    model = Stacked().eval()
    model.gru.requires_grad_(False)
    args = (torch.randn(7, 2, 4), torch.randn(2, 2, 6), torch.randn(2, 2, 6))
    import interop

    fn, params = to_jax(interop.trace(model, args, dynamic_batch=False))
    expected = model(*args)[0].detach().numpy()
    got = jax.jit(fn)(params, *_numpy(args))[0]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def _numpy(args):
    return [a.numpy() for a in args]
