"""ONNX Loops with scan outputs become the hosts' own scans when traced.

A Loop whose body hands its condition back unchanged runs its whole trip count, so its scan
outputs have a known length: under ``jax.jit`` the Flax emitter runs it as one ``lax.scan``
(not a Python loop unrolled per step). The Flax capture writes every ``lax.scan`` as such a
Loop, so a Flax model with a scan round-trips into a scan. Outputs are compared with ONNX
Runtime (rtol 1e-5, atol 1e-6; the project's numpy evaluator must agree too, as an extra)
and with the source model (rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402

import interop  # noqa: E402
from interop.emitter import loop_condition_holds  # noqa: E402
from interop.interpret import evaluate  # noqa: E402

ort = pytest.importorskip("onnxruntime")

STEPS = 5
RTOL, ATOL = 1e-5, 1e-6


def _reference(model, *arrays) -> list[np.ndarray]:
    """ONNX Runtime's outputs for inputs in graph order; the numpy evaluator, an extra
    check, must agree with them."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = session.run(None, dict(zip(names, arrays, strict=True)))
    for want, generic in zip(outputs, evaluate(model, *arrays), strict=True):
        np.testing.assert_allclose(np.asarray(generic), want, rtol=RTOL, atol=ATOL)
    return outputs


def _check(got, expected) -> None:
    got = list(got) if isinstance(got, (list, tuple)) else [got]
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert np.shape(have) == want.shape
        np.testing.assert_allclose(np.asarray(have), want, rtol=RTOL, atol=ATOL)


def _loop_model(condition_from_body: str = "Identity", trip_as_input: bool = False):
    """y = Loop(n, true, s): s <- s * 0.9 + i per step, scanning out s * 2 (shape [STEPS, 3])."""
    body_nodes = [
        helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["s", "decay"], ["scaled"]),
        helper.make_node("Add", ["scaled", "i_f"], ["s_out"]),
        helper.make_node("Add", ["s_out", "s_out"], ["y_out"]),
    ]
    if condition_from_body == "Identity":
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    else:  # the condition depends on the state: the length is only known after running
        body_nodes += [
            helper.make_node("ReduceSum", ["s_out"], ["total"], keepdims=0),
            helper.make_node("Less", ["total", "limit"], ["cond_out"]),
        ]
    body = helper.make_graph(
        body_nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, [3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [3]),
        ],
    )
    initializers = [
        numpy_helper.from_array(np.array(0.9, np.float32), "decay"),
        numpy_helper.from_array(np.array(10.0, np.float32), "limit"),
        numpy_helper.from_array(np.array(True), "go"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])]
    if trip_as_input:
        inputs.insert(0, helper.make_tensor_value_info("n", TensorProto.INT64, []))
    else:
        initializers.append(numpy_helper.from_array(np.array(STEPS, np.int64), "n"))
    loop = helper.make_node("Loop", ["n", "go", "x"], ["final", "ys"], body=body)
    graph = helper.make_graph(
        [loop],
        "g",
        inputs,
        [
            helper.make_tensor_value_info("final", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("ys", TensorProto.FLOAT, None),
        ],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_condition_analysis():
    import onnx_ir as ir

    def body_of(model):
        return ir.serde.deserialize_model(model).graph.node(0).attributes["body"].value

    assert loop_condition_holds(body_of(_loop_model("Identity")))
    assert not loop_condition_holds(body_of(_loop_model("data")))


def test_flax_loop_with_scan_outputs_is_one_lax_scan_under_jit():
    model = _loop_model()
    x = np.array([1.0, -2.0, 0.5], np.float32)
    expected = _reference(model, x)
    assert expected[1].shape == (STEPS, 3)
    module = interop.to_flax(model)
    jitted = jax.jit(lambda v: module(v))
    for got in (module(x), jitted(x)):
        _check(got, expected)
    jaxpr = str(jax.make_jaxpr(lambda v: module(v))(x))
    assert jaxpr.count("scan[") == 1 and "while[" not in jaxpr
    # the body runs once in the jaxpr: one Mul by the decay, not STEPS unrolled copies
    assert jaxpr.count("mul ") == 1, jaxpr


def test_flax_loop_that_may_stop_early_runs_eagerly_and_refuses_jit_clearly():
    from interop.adapters.flax.backend import StaticValueError

    model = _loop_model("data")
    x = np.array([1.0, 2.0, 0.5], np.float32)
    expected = _reference(model, x)
    assert 0 < expected[1].shape[0] < STEPS  # it did stop early
    module = interop.to_flax(model)
    _check(module(x), expected)  # eager: the loop stops where the data says
    # under jit the number of scan outputs would depend on traced data: no XLA shape for it
    with pytest.raises(StaticValueError, match="depends on traced values"):
        jax.jit(lambda v: module(v))(x)


def test_flax_model_with_a_scan_round_trips_into_a_scan():
    class Cumulative(nnx.Module):
        """A recurrence written with jax.lax.scan that returns every step's output."""

        def __init__(self, rngs):
            self.cell = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, xs):  # xs: [time, batch, 4]
            def step(h, x):
                h = jnp.tanh(self.cell(h) + x)
                return h, h * 2.0

            _, ys = jax.lax.scan(step, jnp.zeros_like(xs[0]), xs)
            return ys

    source = Cumulative(nnx.Rngs(0))
    xs = np.random.default_rng(0).standard_normal((6, 2, 4)).astype(np.float32)
    graph = interop.trace(source, (xs,), dynamic_batch=False)
    assert [n.op_type for n in graph.model.graph].count("Loop") == 1
    module = interop.to_flax(graph)
    fn = jax.jit(lambda v: module(v))
    got = fn(xs)
    got = got[0] if isinstance(got, (list, tuple)) else got
    np.testing.assert_allclose(np.asarray(got), np.asarray(source(xs)), rtol=1e-4, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda v: module(v))(xs))
    assert jaxpr.count("scan[") == 1
    assert jaxpr.count("tanh") == 1  # one step body, not six


def test_keras_loop_with_scan_outputs_is_one_scan_in_tf_function():
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    model = _loop_model()
    x = np.array([1.0, -2.0, 0.5], np.float32)
    expected = _reference(model, x)
    emitted = interop.to_keras(model)
    traced = tf.function(lambda v: emitted(v))
    for got in (emitted(x), traced(tf.constant(x))):
        _check(got, expected)
    graph = traced.get_concrete_function(tf.TensorSpec([3], tf.float32)).graph
    ops = [op.type for op in graph.get_operations()]
    # one While (keras.ops.scan on TensorFlow), the body inside it: no unrolled Muls outside
    assert ops.count("While") + ops.count("StatelessWhile") == 1, ops
    assert ops.count("Mul") == 0, ops


def _if_model():
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [3])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [3])],
    )
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_graph, else_branch=else_graph)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_keras_models_with_subgraphs_save_and_load(tmp_path):
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    x = np.array([1.0, -2.0, 0.5], np.float32)
    # both branches read the outer x: one value again after loading
    emitted = interop.to_keras(_if_model())
    emitted.save(tmp_path / "if.keras")
    loaded = keras.models.load_model(tmp_path / "if.keras")
    results = []
    for condition in (True, False):
        expected = _reference(_if_model(), np.array(condition), x)
        _check(emitted([np.array(condition), x]), expected)
        _check(loaded([np.array(condition), x]), expected)
        results.append(expected[0])
    assert not np.allclose(*results)  # the two branches differ: the condition was obeyed
    emitted = interop.to_keras(_loop_model())
    emitted.save(tmp_path / "loop.keras")
    loaded = keras.models.load_model(tmp_path / "loop.keras")
    traced = tf.function(lambda v: loaded(v))
    _check(traced(tf.constant(x)), _reference(_loop_model(), x))
    graph = traced.get_concrete_function(tf.TensorSpec([3], tf.float32)).graph
    ops = [op.type for op in graph.get_operations()]
    assert ops.count("While") + ops.count("StatelessWhile") == 1  # still a scan after loading
