"""Flax nnx capture: built-in layers, small models, nnx.scan and RNNs, round trips.

Numerics are checked against the jit-compiled Flax call (the adapter's run_source)
with rtol 1e-4 / atol 1e-5, on the example batch and on a batch of another size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interop

nnx = pytest.importorskip("flax.nnx")

RTOL, ATOL = 1e-4, 1e-5
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def ids(*shape, high=10):
    return rng.integers(0, high, shape).astype(np.int32)


def state_count(model, kind=None) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, kind or nnx.Param)))


def check(model, example, other, **options):
    """Trace on `example`, verify on it and on `other` (another batch size)."""
    g = interop.trace(model, example, **options)
    for inputs in (example, other):
        report = interop.verify(model, g, inputs, rtol=RTOL, atol=ATOL)
        assert report.ok, str(report)
    assert g.inputs[0].shape[0] == "batch"
    assert g.count_params() == state_count(model)
    return g


BUILTINS = {
    "linear": (lambda r: nnx.Linear(4, 3, rngs=r), (4,)),
    "conv_same_stride2": (
        lambda r: nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=r),
        (9, 9, 3),
    ),
    "conv_valid": (lambda r: nnx.Conv(3, 4, (3, 3), padding="VALID", rngs=r), (8, 8, 3)),
    "conv_circular": (lambda r: nnx.Conv(3, 4, (3, 3), padding="CIRCULAR", rngs=r), (8, 8, 3)),
    "conv_causal_1d": (lambda r: nnx.Conv(3, 4, (3,), padding="CAUSAL", rngs=r), (8, 3)),
    "conv_explicit_dilated": (
        lambda r: nnx.Conv(3, 4, (3, 3), padding=((1, 2), (0, 1)), kernel_dilation=2, rngs=r),
        (8, 8, 3),
    ),
    "conv_groups": (lambda r: nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=r), (8, 8, 4)),
    "conv_transpose": (lambda r: nnx.ConvTranspose(3, 4, (3, 3), rngs=r), (8, 8, 3)),
    "conv_transpose_stride2": (
        lambda r: nnx.ConvTranspose(3, 4, (3, 3), strides=2, rngs=r),
        (5, 6, 3),
    ),
    "conv_transpose_stride2_valid": (
        lambda r: nnx.ConvTranspose(3, 4, (4,), strides=3, padding="VALID", rngs=r),
        (5, 3),
    ),
    "conv_reflect": (lambda r: nnx.Conv(3, 4, (3, 3), padding="REFLECT", rngs=r), (8, 8, 3)),
    "linear_general": (
        lambda r: nnx.LinearGeneral((4, 3), (2, 5), axis=(-2, -1), rngs=r),
        (4, 3),
    ),
    "einsum": (lambda r: nnx.Einsum("bi,io->bo", (4, 3), (3,), rngs=r), (4,)),
    "lora": (lambda r: nnx.LoRA(4, 2, 3, rngs=r), (4,)),
    "batchnorm": (lambda r: nnx.BatchNorm(4, rngs=r), (5, 4)),
    "batchnorm_4d": (lambda r: nnx.BatchNorm(3, rngs=r), (4, 4, 3)),
    "layernorm": (lambda r: nnx.LayerNorm(4, rngs=r), (4,)),
    "rmsnorm": (lambda r: nnx.RMSNorm(4, rngs=r), (4,)),
    "groupnorm": (lambda r: nnx.GroupNorm(4, num_groups=2, rngs=r), (3, 4)),
    "mha": (lambda r: nnx.MultiHeadAttention(2, 8, decode=False, rngs=r), (5, 8)),
    "dropout": (lambda r: nnx.Dropout(0.5, rngs=r), (4,)),
    "lstm_rnn": (lambda r: nnx.RNN(nnx.LSTMCell(3, 5, rngs=r)), (6, 3)),
    "gru_rnn": (lambda r: nnx.RNN(nnx.GRUCell(3, 5, rngs=r)), (6, 3)),
}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_builtin_layer(name):
    make, shape = BUILTINS[name]
    model = make(nnx.Rngs(0))
    check(model, (f32(2, *shape),), (f32(5, *shape),))


def test_embed_gathers_rows_by_id():
    model = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
    g = check(model, (ids(2, 3),), (ids(4, 3),))
    assert "Gather" in {n.op_type for n in g.model.graph}
    assert list(g.get_weights()) == ["embedding"]


def test_batchnorm_uses_running_averages_and_leaves_model_alone():
    model = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    model.mean.value = jnp.arange(4.0)
    model.var.value = jnp.arange(1.0, 5.0)
    assert model.use_running_average is False  # training mode, as constructed
    x = f32(3, 4)
    g = interop.trace(model, x)
    assert model.use_running_average is False
    expected = (x - np.arange(4.0)) / np.sqrt(np.arange(1.0, 5.0) + model.epsilon)
    np.testing.assert_allclose(g.run(x), expected, rtol=RTOL, atol=ATOL)
    assert g.parameter_kinds == {
        "scale": "trainable",
        "bias": "trainable",
        "mean": "buffer",
        "var": "buffer",
    }


def test_dropout_is_recorded_as_onnx_dropout_in_its_layer():
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.Dropout(0.25, rngs=nnx.Rngs(1)))
    g = interop.trace(model, f32(2, 4))
    (drop,) = [n for n in g.model.graph if n.op_type == "Dropout"]
    assert drop.metadata_props["interop.scope"] == "layers.1"
    assert float(drop.inputs[1].producer().attributes["value"].value.numpy()) == 0.25
    model.eval()  # the graph has inference semantics: dropout is the identity
    np.testing.assert_allclose(
        g.run(np.ones((3, 4), np.float32)), model(jnp.ones((3, 4))), rtol=RTOL, atol=ATOL
    )


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), padding="VALID", rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv1(x)))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        x = nnx.avg_pool(x, (3, 3), padding="SAME").mean(axis=(1, 2))
        return self.head(self.drop(x))


def test_small_cnn_hierarchy_names_and_numerics():
    model = CNN(nnx.Rngs(0))
    g = check(model, (f32(2, 16, 16, 3),), (f32(7, 16, 16, 3),))
    assert [la.path for la in g.layers] == ["conv1", "bn", "conv2", "drop", "head"]
    assert g.layer("conv1").class_name == "Conv"
    assert g.layer("conv1").param_count == 3 * 3 * 3 * 8 + 8
    assert set(g.get_weights()) == {
        "conv1.kernel", "conv1.bias", "bn.scale", "bn.bias", "bn.mean", "bn.var",
        "conv2.kernel", "conv2.bias", "head.kernel", "head.bias",
    }  # fmt: skip
    assert g.get_weights()["conv1.kernel"].shape == (3, 3, 3, 8)  # Flax layout, as in the state
    # Every Conv node belongs to its layer and points at the Flax source line.
    convs = [n for n in g.model.graph if n.op_type == "Conv"]
    assert [n.metadata_props["interop.scope"] for n in convs] == ["conv1", "conv2"]
    assert all("linear.py" in n.metadata_props["interop.location"] for n in convs)
    assert g.source["framework"] == "flax" and g.source["api"] == "nnx"


class Block(nnx.Module):
    def __init__(self, dim, heads, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(dim, 4 * dim, rngs=rngs), nnx.gelu, nnx.Linear(4 * dim, dim, rngs=rngs)
        )

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Encoder(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(50, 16, rngs=rngs)
        self.layers = nnx.List([Block(16, 4, rngs) for _ in range(2)])
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return {"logits": self.head(x[:, 0]), "hidden": x}


def test_small_transformer_with_dict_outputs_and_dynamic_sequence():
    model = Encoder(nnx.Rngs(0))
    g = interop.trace(model, (ids(2, 7, high=50),), dynamic_dims={"tokens": {1: "seq"}})
    assert [o.name for o in g.outputs] == ["logits", "hidden"]
    assert g.inputs[0].shape == ("batch", "seq")
    for tokens in (ids(2, 7, high=50), ids(3, 11, high=50)):
        report = interop.verify(model, g, (tokens,), rtol=RTOL, atol=ATOL)
        assert report.ok, str(report)
    assert g.count_params() == state_count(model)
    assert g.layer("layers.1.attn.query").class_name == "LinearGeneral"
    assert g.layer("layers.0.mlp.layers.0").param_count == 16 * 64 + 64
    assert "layers.0.attn.query.kernel" in g.get_weights()


class ScannedMLP(nnx.Module):
    """Four stacked layers created with nnx.vmap and applied with nnx.scan."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=4)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.Linear(8, 8, rngs=rngs)

        self.stack = make(rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, layer):
            return jnp.tanh(layer(h))

        return self.out(step(x, self.stack))


def test_nnx_scan_over_stacked_layers_becomes_one_loop():
    model = ScannedMLP(nnx.Rngs(0))
    g = check(model, (f32(2, 8),), (f32(6, 8),))
    ops = [n.op_type for n in g.model.graph]
    assert ops.count("Loop") == 1
    assert ops.count("MatMul") == 1  # only the head; the four layers live in the Loop body
    loop = next(n for n in g.model.graph if n.op_type == "Loop")
    assert [n.op_type for n in loop.attributes["body"].value].count("MatMul") == 1
    assert g.get_weights()["stack.kernel"].shape == (4, 8, 8)
    # The layer rebuilt by nnx.scan inside the body is still attributed to "stack".
    body_scopes = [
        n.metadata_props["interop.scope"]
        for n in loop.attributes["body"].value
        if n.op_type == "MatMul"
    ]
    assert body_scopes == ["stack"]
    assert g.count_params() == 4 * (64 + 8) + 18


class LMBlock(nnx.Module):
    """A pre-norm transformer block (causal attention, RMSNorm, GELU MLP)."""

    def __init__(self, d, heads, rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, rngs=rngs)
        self.ln2 = nnx.RMSNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x), mask=nnx.make_causal_mask(x[..., 0]))
        return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class ScanLM(nnx.Module):
    """A language model in the style of flax's examples: the blocks are one stacked module
    made with nnx.vmap and applied with nnx.scan over its layer axis."""

    def __init__(self, rngs, vocab=50, d=32, heads=4, layers=3):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return LMBlock(d, heads, rngs)

        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = make(rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return block(h)

        return self.head(self.norm(step(self.embed(tokens), self.blocks)))


@pytest.mark.slow  # three emitters (Keras loads TensorFlow): about 20 s on a quiet machine
def test_scan_over_layers_language_model_keeps_its_block_tree_and_emits():
    import torch

    model = ScanLM(nnx.Rngs(0))
    g = interop.trace(model, (ids(2, 7, high=50),), dynamic_dims={"tokens": {1: "seq"}})
    assert g.inputs[0].shape == ("batch", "seq")
    x = ids(3, 11, high=50)
    for tokens in (ids(2, 7, high=50), x):
        report = interop.verify(model, g, (tokens,), rtol=RTOL, atol=ATOL)
        assert report.ok, str(report)
    assert g.count_params() == state_count(model)
    # one Loop over the three layers; the block's submodules are layers of the tree, with
    # the stacked weights (leading layer axis) and their nodes inside the Loop body
    ops = [n.op_type for n in g.model.graph]
    assert ops.count("Loop") == 1 and ops.count("MatMul") == 1  # the head's
    paths = {la.path: la.class_name for la in g.layers}
    assert paths["blocks"] == "LMBlock" and paths["blocks.attn.query"] == "LinearGeneral"
    assert paths["blocks.ln2"] == "RMSNorm" and paths["blocks.up"] == "Linear"
    assert g.get_weights()["blocks.up.kernel"].shape == (3, 32, 128)
    body = next(n for n in g.model.graph if n.op_type == "Loop").attributes["body"].value
    scopes = {n.metadata_props["interop.scope"] for n in body}
    assert {"blocks.attn.query", "blocks.up", "blocks.down", "blocks.ln1"} <= scopes
    want = np.asarray(nnx.jit(lambda m, t: m(t))(model, x))
    module = interop.to_torch(g)
    with torch.no_grad():
        np.testing.assert_allclose(module(torch.from_numpy(x)).numpy(), want, 1e-4, 1e-4)
    np.testing.assert_allclose(np.asarray(interop.to_flax(g)(x)), want, 1e-4, 1e-4)
    np.testing.assert_allclose(np.asarray(interop.to_keras(g)(x)), want, 1e-4, 1e-4)


def test_rnn_with_dynamic_time_axis_runs_any_length():
    model = nnx.RNN(nnx.LSTMCell(3, 5, rngs=nnx.Rngs(0)))
    g = interop.trace(model, (f32(2, 6, 3),), dynamic_dims={"inputs": {1: "time"}})
    assert g.inputs[0].shape == ("batch", "time", 3)
    for x in (f32(2, 6, 3), f32(4, 9, 3), f32(1, 1, 3)):
        assert interop.verify(model, g, (x,), rtol=RTOL, atol=ATOL).ok
    assert "LSTM" in {n.op_type for n in g.model.graph}  # one node, not a Loop
    assert "Loop" not in {n.op_type for n in g.model.graph}
    assert g.count_params() == state_count(model)


def _bias_everything(model):
    """Non-zero biases (Flax initializes them to zeros), so the bias mapping is tested."""
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param) and path[-1] == "bias":
            variable[...] = jax.random.normal(jax.random.key(len(path)), variable[...].shape)
    return model


RECURRENT = {
    "lstm": (lambda r: nnx.RNN(nnx.LSTMCell(3, 5, rngs=r)), ["LSTM"]),
    "optimized_lstm_time_major": (
        lambda r: nnx.RNN(nnx.OptimizedLSTMCell(3, 5, rngs=r), time_major=True),
        ["LSTM"],
    ),
    "gru_reverse": (lambda r: nnx.RNN(nnx.GRUCell(3, 5, rngs=r), reverse=True), ["GRU"]),
    "simple_reverse_keep_order": (
        lambda r: nnx.RNN(nnx.SimpleCell(3, 5, rngs=r), reverse=True, keep_order=True),
        ["RNN"],
    ),
    "bidirectional": (
        lambda r: nnx.Bidirectional(
            nnx.RNN(nnx.LSTMCell(3, 5, rngs=r)), nnx.RNN(nnx.LSTMCell(3, 5, rngs=r))
        ),
        ["LSTM", "LSTM"],
    ),
}


@pytest.mark.parametrize("name", list(RECURRENT))
def test_rnn_of_standard_cells_is_one_onnx_recurrent_node(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    make, op_types = RECURRENT[name]
    model = _bias_everything(make(nnx.Rngs(0)))
    x = f32(2, 6, 3)
    g = interop.trace(model, (x,))
    ops = [n.op_type for n in g.model.graph]
    assert [op for op in ops if op in ("LSTM", "GRU", "RNN", "Loop", "Scan")] == op_types
    assert g.count_params() == state_count(model)  # the Flax parameters stay the graph's
    expected = np.asarray(model(jnp.asarray(x)))
    session = ort.InferenceSession(str(g.save(tmp_path / "rnn.onnx")))
    for batch in (x, f32(4, 6, 3)):
        want = np.asarray(model(jnp.asarray(batch)))
        got = session.run(None, {session.get_inputs()[0].name: batch})[0]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # emitted back: Flax's own recurrent layers; torch's for forward LSTM/GRU
    emitted = interop.to_flax(g)
    rnns = [m for _, m in nnx.iter_graph(emitted) if isinstance(m, nnx.RNN)]
    assert len(rnns) == len(op_types)
    np.testing.assert_allclose(np.asarray(emitted(x)), expected, rtol=RTOL, atol=ATOL)
    module = interop.to_torch(g)
    native = [m for m in module.modules() if isinstance(m, torch.nn.RNNBase)]
    forward = [  # torch's layers run forward only; reverse nodes stay generic there
        n
        for n in g.model.graph
        if n.op_type in op_types and n.attributes["direction"].value == "forward"
    ]
    assert len(native) == len(forward) == (0 if "reverse" in name else 1)
    out = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


def test_rnn_with_custom_gates_keeps_the_scan():
    model = nnx.RNN(nnx.GRUCell(3, 5, gate_fn=jax.nn.hard_sigmoid, rngs=nnx.Rngs(0)))
    g = check(model, (f32(2, 6, 3),), (f32(3, 6, 3),))
    assert "Loop" in {n.op_type for n in g.model.graph}
    assert "GRU" not in {n.op_type for n in g.model.graph}


@pytest.mark.parametrize("make", [CNN, ScannedMLP], ids=["cnn", "scan_loop"])
def test_round_trips_give_identical_outputs(tmp_path, make):
    model = make(nnx.Rngs(3))
    x = f32(3, 16, 16, 3) if make is CNN else f32(3, 8)
    g = interop.trace(model, x)
    reference = g.run(x)
    loaded = interop.load(g.save(tmp_path / "model.onnx"))
    rebuilt = interop.Graph.from_config(g.get_config(), g.get_weights())
    for other in (loaded, rebuilt, g.clone()):
        np.testing.assert_array_equal(other.run(x), reference)
        assert [la.path for la in other.layers] == [la.path for la in g.layers]
        assert other.count_params() == g.count_params()


def test_trace_rejects_model_that_fixes_the_batch_size():
    class Fixed(nnx.Module):
        def __call__(self, x):
            return x * 2 if x.shape[0] >= 2 else x  # Python branching on the batch size

    with pytest.raises(interop.errors.TraceError, match="dynamic_batch=False"):
        interop.trace(Fixed(), f32(2, 3, 4), check_dims=False)
    # with the dim check (the default) the batch is static, with a warning (issue 22)
    with pytest.warns(UserWarning, match="'batch' does not hold"):
        assert interop.trace(Fixed(), f32(2, 3, 4)).inputs[0].shape == (2, 3, 4)
    g = interop.trace(Fixed(), f32(2, 3, 4), dynamic_batch=False)
    assert g.inputs[0].shape == (2, 3, 4)
    np.testing.assert_array_equal(g.run(np.ones((2, 3, 4), np.float32)), np.full((2, 3, 4), 2.0))


class TwoInputs(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(20, 6, rngs=rngs)
        self.proj = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, ids, mask):
        h = self.embed(ids) * mask[..., None]
        return self.proj(h.sum(axis=1) / jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0))


def test_named_inputs_given_as_a_dict():
    model = TwoInputs(nnx.Rngs(0))
    example = {"ids": rng.integers(0, 20, (2, 5)), "mask": (f32(2, 5) > 0).astype(np.float32)}
    g = interop.trace(model, example)
    assert [(s.name, s.shape) for s in g.inputs] == [("ids", ("batch", 5)), ("mask", ("batch", 5))]
    other = {"ids": rng.integers(0, 20, (4, 5)), "mask": (f32(4, 5) > 0).astype(np.float32)}
    for inputs in (example, other):  # int64 ids: JAX traces them as int32, Graph.run casts
        report = interop.verify(model, g, inputs, rtol=RTOL, atol=ATOL)
        assert report.ok, str(report)


class CausalAttention(nnx.Module):
    def __init__(self, rngs):
        self.mha = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)

    def __call__(self, x):
        return self.mha(x, mask=nnx.make_causal_mask(x[..., 0]))


def test_attention_with_a_causal_mask():
    model = CausalAttention(nnx.Rngs(0))
    check(model, (f32(2, 5, 8),), (f32(3, 5, 8),))


class Router(nnx.Module):
    def __init__(self, dim, experts, rngs):
        self.gate = nnx.Linear(dim, experts, use_bias=False, rngs=rngs)

    def __call__(self, x):
        weights, chosen = jax.lax.top_k(self.gate(x), 2)
        return jax.nn.softmax(weights, axis=-1), chosen


class MoE(nnx.Module):
    """A mixture-of-experts block: top-2 routing, stacked expert weights, take_along_axis,
    a scatter-add of the routing weights (the load-balancing counts)."""

    def __init__(self, dim=8, hidden=16, experts=4):
        rngs = nnx.Rngs(0)
        self.router = Router(dim, experts, rngs)
        self.up = nnx.Param(jax.random.normal(rngs.params(), (experts, dim, hidden)) * 0.3)
        self.down = nnx.Param(jax.random.normal(rngs.params(), (experts, hidden, dim)) * 0.3)
        self.experts = experts

    def __call__(self, x):
        weights, chosen = self.router(x)
        every = jnp.einsum("bsd,edh->bseh", x, self.up.value)
        every = jnp.einsum("bseh,ehd->bsed", jax.nn.gelu(every), self.down.value)
        picked = jnp.take_along_axis(every, chosen[..., None], axis=2)
        load = jnp.zeros((self.experts,)).at[chosen.reshape(-1)].add(weights.reshape(-1))
        return (picked * weights[..., None]).sum(2), load


def test_mixture_of_experts_router_with_top_k_gather_and_scatter():
    model = MoE()
    g = check(model, (f32(2, 5, 8),), (f32(3, 5, 8),))
    assert [la.path for la in g.layers] == ["router", "router.gate"]
    assert g.count_params() == state_count(model)
    ops = {n.op_type for n in g.model.graph}
    assert {"TopK", "GatherND", "ScatterND"} <= ops


class ViT(nnx.Module):
    """A vision transformer in the style of the Flax examples: a strided-conv patch
    embedding, a class token and position embeddings, the Blocks above, a head."""

    def __init__(self, rngs, dim=16, patch=4, size=16):
        self.patches = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, (size // patch) ** 2 + 1, dim)))
        self.layers = nnx.List([Block(dim, 4, rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, 5, rngs=rngs)

    def __call__(self, images):
        x = self.patches(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls.value, (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos.value
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, 0]))


def test_vision_transformer_captures_and_emits_to_torch():
    torch = pytest.importorskip("torch")
    model = ViT(nnx.Rngs(0))
    g = check(model, (f32(2, 16, 16, 3),), (f32(3, 16, 16, 3),))
    assert g.count_params() == state_count(model)
    assert {"patches", "layers.0.attn", "layers.1.mlp", "norm", "head"} <= {
        la.path for la in g.layers
    }
    x = f32(3, 16, 16, 3)
    module = interop.to_torch(g)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, g.run(x), rtol=RTOL, atol=ATOL)


@pytest.mark.slow  # Keras (TensorFlow) emission of three models
def test_example_style_models_emit_to_torch_keras_and_flax():
    torch = pytest.importorskip("torch")
    cases = [(CNN(nnx.Rngs(0)), f32(3, 16, 16, 3)), (ViT(nnx.Rngs(0)), f32(3, 16, 16, 3)),
             (MoE(), f32(3, 5, 8))]  # fmt: skip
    for model, x in cases:
        model.eval()  # the capture is the inference computation (BatchNorm averages, no dropout)
        g = interop.trace(model, x[:2])
        want = [np.asarray(a) for a in jax.tree.leaves(nnx.jit(lambda m, v: m(v))(model, x))]
        with torch.no_grad():
            emitted = {"torch": interop.to_torch(g)(torch.from_numpy(x))}
        emitted["keras"] = interop.to_keras(g)(x)
        emitted["flax"] = interop.to_flax(g)(x)
        for name, got in emitted.items():
            got = [np.asarray(a) for a in (got if isinstance(got, list | tuple) else [got])]
            assert len(got) == len(want), (type(model).__name__, name)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(
                    a, b, 1e-4, 1e-4, err_msg=f"{type(model).__name__} to_{name}"
                )
