"""Torch models traced to the IR and emitted as flax.nnx modules: numerics, jit, names, training."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
nn = torch.nn

import jax.numpy as jnp  # noqa: E402
from emit_models import Block, ResidualCNN, Tagger  # noqa: E402,F401
from interop.adapters.flax.backend import StaticValueError  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import interop  # noqa: E402
from interop.emit import to_flax, to_jax  # noqa: E402
from interop.errors import UnsupportedOpError  # noqa: E402
from interop.interpret import evaluate  # noqa: E402


def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 3))


def _encoder():
    return nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)


def _randomize_batchnorm(model):
    for module in model.modules():  # non-trivial running statistics, so eval mode is tested
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model


CASES = {
    "residual_cnn": (
        lambda: _randomize_batchnorm(ResidualCNN()),
        lambda b: torch.randn(b, 3, 16, 16),
    ),
    "mlp": (_mlp, lambda b: torch.randn(b, 6)),
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
        out[name] = (model, interop.trace(model, (make_input(2),)), make_input)
    return out


def _run_torch(model, x):
    with torch.no_grad():
        return model(x).numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_emitted_module_matches_source_eager_and_jitted(traced, name):
    model, graph, make_input = traced[name]
    module = to_flax(graph)
    jitted = nnx.jit(lambda m, x: m(x))
    for batch in (2, 5):  # the traced batch and another
        x = make_input(batch)
        expected = _run_torch(model, x)
        np.testing.assert_allclose(np.asarray(module(x.numpy())), expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(jitted(module, x.numpy())), expected, rtol=1e-4, atol=1e-5
        )


def test_state_paths_follow_source_names(traced):
    _, graph, _ = traced["residual_cnn"]
    module = to_flax(graph)
    assert isinstance(module.stem, nnx.Conv)
    assert isinstance(module.blocks.__dict__["0"].conv, nnx.Conv)
    assert isinstance(module.blocks.__dict__["0"].bn, nnx.BatchNorm)
    assert isinstance(module.head, nnx.Linear)
    params = {
        ".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }
    stats = {
        ".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(module, nnx.BatchStat))
    }
    assert {
        "stem.kernel",
        "stem.bias",
        "blocks.0.conv.kernel",
        "blocks.0.bn.scale",
        "head.kernel",
    } <= params
    assert {"blocks.0.bn.mean", "blocks.1.bn.var"} <= stats
    assert module.source_names["blocks.0.conv.kernel"] == "blocks.0.conv.weight"
    assert module.source_names["blocks.0.bn.mean"] == "blocks.0.bn.running_mean"
    # every traced source parameter is reachable under some state path
    assert set(graph.parameter_kinds) == set(module.source_names.values())
    _, graph, _ = traced["lstm_tagger"]
    module = to_flax(graph)
    assert isinstance(module.embed, nnx.Embed)
    assert module.source_names["embed.embedding"] == "embed.weight"
    # the traced nn.LSTM (weights packed from its parameters) is Flax's own layer
    assert isinstance(module.rnn, nnx.RNN) and isinstance(module.rnn.cell, nnx.OptimizedLSTMCell)
    assert module.source_names["rnn.cell.dense_h.bias"] == "rnn.bias_ih_l0+rnn.bias_hh_l0"


@pytest.mark.parametrize("name", ["residual_cnn", "mlp", "transformer_encoder"])
def test_one_optax_step_lowers_the_loss(traced, name):
    _, graph, make_input = traced[name]
    module = to_flax(graph)
    torch.manual_seed(1)
    x = jnp.asarray(make_input(8).numpy())
    target = module(x) * 0.5 + 0.1
    optimizer = nnx.Optimizer(module, optax.sgd(1e-2), wrt=nnx.Param)

    def loss_fn(m):
        return jnp.mean((m(x) - target) ** 2)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss, grads

    before = nnx.state(module, nnx.Param)
    before = jax.tree.map(np.asarray, before)
    loss, grads = step(module, optimizer)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    after = float(loss_fn(module))
    assert after < float(loss)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)), before, nnx.state(module, nnx.Param)
    )
    assert any(jax.tree.leaves(changed))


def test_train_mode_batchnorm_uses_batch_statistics_and_updates_running_stats(traced):
    model, graph, make_input = traced["residual_cnn"]
    module = to_flax(graph)
    x = make_input(6)
    stats_before = jax.tree.map(np.asarray, nnx.state(module, nnx.BatchStat))
    module.train()
    out_train = nnx.jit(lambda m, v: m(v))(module, x.numpy())
    model.train()
    expected = _run_torch(model, x)  # torch train mode: batch statistics
    model.eval()
    np.testing.assert_allclose(np.asarray(out_train), expected, rtol=1e-4, atol=1e-4)
    bn = module.blocks.__dict__["0"].bn
    assert not np.allclose(np.asarray(bn.mean[...]), stats_before["blocks"]["0"]["bn"]["mean"])
    # ONNX momentum: running = momentum * running + (1 - momentum) * batch statistic
    stem = np.maximum(np.asarray(module.stem(jnp.moveaxis(jnp.asarray(x.numpy()), 1, -1))), 0)
    conv = np.asarray(module.blocks.__dict__["0"].conv(stem))
    batch_mean = conv.mean(axis=(0, 1, 2))
    expected_mean = 0.9 * stats_before["blocks"]["0"]["bn"]["mean"] + 0.1 * batch_mean
    np.testing.assert_allclose(np.asarray(bn.mean[...]), expected_mean, rtol=1e-4, atol=1e-5)
    module.eval()
    assert bn.use_running_average


def test_layers_of_one_configuration_hold_their_own_weights(traced):
    # blocks.0 and blocks.1 share a configuration, so they are assembled from one template
    model, graph, _ = traced["residual_cnn"]
    module = to_flax(graph)
    blocks = [module.blocks.__dict__[str(i)] for i in range(2)]
    assert blocks[0].conv is not blocks[1].conv and blocks[0].bn is not blocks[1].bn
    for i, block in enumerate(blocks):
        source = model.blocks[i]
        kernel = source.conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
        np.testing.assert_array_equal(np.asarray(block.conv.kernel[...]), kernel)
        np.testing.assert_array_equal(np.asarray(block.bn.var[...]), source.bn.running_var.numpy())
        assert type(block.conv.kernel) is nnx.Param and type(block.bn.var) is nnx.BatchStat
    blocks[0].conv.kernel[...] = jnp.zeros_like(blocks[0].conv.kernel[...])
    assert np.any(np.asarray(blocks[1].conv.kernel[...]))
    assert np.any(np.asarray(to_flax(graph).blocks.__dict__["0"].conv.kernel[...]))


def test_dropout_drops_in_train_mode_only(traced):
    _, graph, make_input = traced["mlp"]
    module = to_flax(graph, rngs=nnx.Rngs(dropout=3, params=0))
    assert isinstance(
        module.__dict__["2"] if "2" in module.__dict__ else None, (nnx.Dropout, type(None))
    )
    x = make_input(64).numpy()
    first = np.asarray(module(x))
    np.testing.assert_array_equal(first, np.asarray(module(x)))
    module.train()
    assert not np.allclose(np.asarray(module(x)), first)


def test_split_merge_round_trip(traced):
    _, graph, make_input = traced["residual_cnn"]
    module = to_flax(graph)
    graphdef, state = nnx.split(module)
    merged = nnx.merge(graphdef, state)
    x = make_input(3).numpy()
    np.testing.assert_array_equal(np.asarray(merged(x)), np.asarray(module(x)))

    @jax.jit
    def pure(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_allclose(
        np.asarray(pure(state, x)), np.asarray(module(x)), rtol=1e-5, atol=1e-6
    )


def test_to_jax_pure_function_jit_and_grad(traced):
    model, graph, make_input = traced["mlp"]
    fn, params = to_jax(graph)
    x = make_input(4).numpy()
    np.testing.assert_allclose(
        np.asarray(jax.jit(fn)(params, x)),
        _run_torch(model, torch.from_numpy(x)),
        rtol=1e-4,
        atol=1e-5,
    )
    grads = jax.grad(lambda p: jnp.sum(fn(p, x) ** 2))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))


def test_accepts_onnx_proto_and_framework_model(traced):
    model, graph, make_input = traced["mlp"]
    x = make_input(3)
    from_proto = to_flax(graph.to_onnx() if hasattr(graph, "to_onnx") else graph)
    from_model = to_flax(model, (make_input(2),))
    for module in (from_proto, from_model):
        np.testing.assert_allclose(
            np.asarray(module(x.numpy())), _run_torch(model, x), rtol=1e-4, atol=1e-5
        )


def _model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_if_and_loop_become_lax_control_flow_under_jit():
    scalar = [helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])],
    )
    if_node = helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)
    model = _model([if_node], scalar + [x_info], [y_info])
    module = to_flax(model)
    x = np.array([-1.0, 2.0, -3.0], np.float32)
    run = jax.jit(lambda c, v: module(c, v))  # the condition is traced: lax.cond
    outcomes = []
    for condition in (True, False):
        expected = _onnxruntime(model, np.array(condition), x)
        np.testing.assert_allclose(np.asarray(run(np.array(condition), x)), expected)
        np.testing.assert_allclose(np.asarray(module(np.array(condition), x)), expected)
        np.testing.assert_allclose(evaluate(model, np.array(condition), x)[0], expected)
        outcomes.append(expected)
    assert not np.allclose(*outcomes)  # the two branches differ, so each was taken
    # Loop with a run-time trip count: doubles x n times (lax.while_loop under jit)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["s", "s"], ["s_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]),
        ],
    )
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)
    model = _model(
        [loop], [helper.make_tensor_value_info("n", TensorProto.INT64, []), x_info], [y_info]
    )
    module = to_flax(model)
    for n in (0, 3):
        expected = _onnxruntime(model, np.array(n, np.int64), x)
        np.testing.assert_allclose(expected, x * 2**n)  # what the Loop means
        np.testing.assert_allclose(
            np.asarray(jax.jit(lambda k, v: module(k, v))(np.array(n), x)), expected
        )


def _onnxruntime(model, *inputs):
    """The first output of model on ONNX Runtime (CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs, strict=True)))[0]


def test_shape_arithmetic_stays_static_under_jit(traced):
    # the transformer reshapes with shapes computed from Shape(x): static under jit, any batch
    model, graph, make_input = traced["transformer_encoder"]
    module = to_flax(graph)
    for batch in (1, 3):
        x = make_input(batch)
        out = jax.jit(lambda v: module(v))(x.numpy())
        np.testing.assert_allclose(np.asarray(out), _run_torch(model, x), rtol=1e-4, atol=1e-5)


def test_unsupported_op_fails_at_emission():
    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")
    info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    model = _model([node], [info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(UnsupportedOpError, match="NoSuchOp"):
        to_flax(model)


def test_value_dependent_shape_under_jit_is_a_clear_error():
    shape_info = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], [x_info, shape_info], [y_info]
    )
    module = to_flax(model)
    x, shape = np.arange(6, dtype=np.float32), np.array([2, 3], np.int64)
    assert module(x, shape).shape == (2, 3)  # eager: concrete values
    with pytest.raises(StaticValueError, match="static|traced"):
        jax.jit(lambda a, b: module(a, b))(x, shape)
