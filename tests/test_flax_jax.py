"""Plain JAX functions, control flow (scan / fori_loop / while_loop / cond), errors for
unsupported primitives, converter registration and adapter selection."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from interop.adapters.flax import ADAPTER, CAPTURE_PRIMITIVES, register_primitive

import interop

RTOL, ATOL = 1e-4, 1e-5
rng = np.random.default_rng(2)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


PARAMS = {"w": jnp.asarray(f32(4, 3)), "b": jnp.asarray(f32(3))}


def mlp(x):
    return jax.nn.softmax(jnp.tanh(x @ PARAMS["w"] + PARAMS["b"]), axis=-1)


def test_plain_function_with_closed_over_parameters():
    g = interop.trace(mlp, f32(2, 4))
    assert g.inputs[0].shape == ("batch", 4)
    for x in (f32(2, 4), f32(9, 4)):
        np.testing.assert_allclose(g.run(x), mlp(x), rtol=RTOL, atol=ATOL)
    assert set(g.get_weights()) == {"PARAMS.w", "PARAMS.b"}
    assert g.count_params() == 15
    assert g.source["api"] == "jax"


def test_partial_parameters_are_named_after_the_argument():
    def apply(params, x):
        return x @ params["kernel"]

    fn = functools.partial(apply, {"kernel": jnp.asarray(f32(4, 2))})
    g = interop.trace(fn, f32(3, 4))
    assert list(g.get_weights()) == ["args.0.kernel"]
    assert interop.verify(fn, g, (f32(5, 4),), rtol=RTOL, atol=ATOL).ok


def cumulative(xs):
    """A recurrence over the (dynamic) time axis with lax.scan."""

    def step(h, x):
        h = jnp.tanh(h * 0.5 + x)
        return h, h * 2.0

    return jax.lax.scan(step, jnp.zeros(xs.shape[1:]), xs)


def test_scan_over_a_dynamic_axis_is_a_loop_not_unrolled():
    g = interop.trace(cumulative, f32(5, 3), dynamic_batch=False, dynamic_dims={"xs": {0: "time"}})
    assert [n.op_type for n in g.model.graph].count("Loop") == 1
    assert [o.name for o in g.outputs] == ["output_0", "output_1"]
    for xs in (f32(5, 3), f32(12, 3), f32(1, 3)):
        report = interop.verify(cumulative, g, (xs,), rtol=RTOL, atol=ATOL)
        assert report.ok, str(report)


def test_reverse_scan():
    def rev(xs):
        return jax.lax.scan(lambda c, x: (c + x, c * x), jnp.zeros(xs.shape[1:]), xs, reverse=True)

    g = interop.trace(rev, f32(4, 2))
    assert interop.verify(rev, g, (f32(7, 2),), rtol=RTOL, atol=ATOL).ok


def fori(x, n):
    return jax.lax.fori_loop(0, n, lambda i, acc: acc * 0.9 + jnp.sin(acc + i), x)


def test_fori_loop_with_dynamic_trip_count_is_a_loop():
    g = interop.trace(fori, (f32(2, 3), np.int32(4)))
    assert "Loop" in {n.op_type for n in g.model.graph}
    for n in (0, 1, 4, 11):
        x = f32(6, 3)
        np.testing.assert_allclose(g.run(x, np.int32(n)), fori(x, n), rtol=RTOL, atol=ATOL)


def newton_sqrt(a):
    def body(state):
        x, i = state
        return 0.5 * (x + a / x), i + 1

    def cond(state):
        x, i = state
        return jnp.logical_and(jnp.max(jnp.abs(x * x - a)) > 1e-5, i < 50)

    x, steps = jax.lax.while_loop(cond, body, (jnp.ones_like(a), 0))
    return x, steps


def test_while_loop_is_a_loop():
    a = np.abs(f32(4)) + 1.0
    g = interop.trace(newton_sqrt, a)
    assert "Loop" in {n.op_type for n in g.model.graph}
    report = interop.verify(newton_sqrt, g, (np.abs(f32(7)) + 2.0,), rtol=RTOL, atol=ATOL)
    assert report.ok, str(report)


def branchy(x, k):
    return jax.lax.switch(k, [jnp.sin, jnp.cos, lambda v: v * 3.0], x), jax.lax.cond(
        x.sum() > 0, lambda v: v + 1.0, lambda v: v - 1.0, x
    )


def test_cond_and_switch_become_if():
    g = interop.trace(branchy, (f32(2, 3), np.int32(1)))
    assert [n.op_type for n in g.model.graph].count("If") >= 2
    for k in (0, 1, 2):
        for x in (np.abs(f32(3, 3)), -np.abs(f32(3, 3))):
            for got, want in zip(g.run(x, np.int32(k)), branchy(x, k), strict=True):
                np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def uses_reduce_xor(x):
    h = x > 0
    return jnp.bitwise_xor.reduce(h, axis=1)  # the line the error must point at


def test_unsupported_primitive_names_primitive_layer_and_line_and_can_be_registered():
    with pytest.raises(interop.UnsupportedOpError) as info:
        interop.trace(uses_reduce_xor, f32(2, 5))
    err = info.value
    assert err.op == "reduce_xor" and err.adapter == "flax"
    assert err.location.endswith(f"test_flax_jax.py:{uses_reduce_xor.__code__.co_firstlineno + 2}")
    assert "register_primitive('reduce_xor')" in str(err)
    assert "bool[batch,5]" in str(err) and "axes=(1,)" in str(err)  # operands and params

    def convert_reduce_xor(low, eqn, x):
        # parity of the number of True values along the axes
        count = low.op("ReduceSum", [low.cast(x, np.int32), low.ints(eqn.params["axes"])],
                       {"keepdims": 0})  # fmt: skip
        return low.cast(low.op("Mod", [count, low.const(np.int32(2))]), np.bool_)

    register_primitive("reduce_xor", convert_reduce_xor)
    try:
        g = interop.trace(uses_reduce_xor, f32(2, 5))
        assert interop.verify(uses_reduce_xor, g, (f32(3, 5),), rtol=RTOL, atol=ATOL).ok
    finally:
        CAPTURE_PRIMITIVES._entries.pop("reduce_xor")


def test_unsupported_primitive_inside_a_module_names_its_path():
    nnx = pytest.importorskip("flax.nnx")

    class Inner(nnx.Module):
        def __call__(self, x):
            return jnp.bitwise_xor.reduce(x > 0, axis=0)

    class Outer(nnx.Module):
        def __init__(self):
            self.inner = Inner()

        def __call__(self, x):
            return self.inner(x) | True

    with pytest.raises(interop.UnsupportedOpError, match="in layer 'inner'") as info:
        interop.trace(Outer(), f32(2, 3))
    assert info.value.layer == "inner" and "test_flax_jax.py" in info.value.location


def test_accepts_flax_and_jax_but_not_torch_or_keras():
    nnx = pytest.importorskip("flax.nnx")
    nn = pytest.importorskip("flax.linen")
    assert ADAPTER.accepts(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    assert ADAPTER.accepts((nn.Dense(2), {"params": {}}))
    assert not ADAPTER.accepts(nn.Dense(2))  # unbound: no variables to trace with
    assert ADAPTER.accepts(mlp)
    if "torch" in sys.modules or pytest.importorskip("torch"):
        import torch

        assert not ADAPTER.accepts(torch.nn.Linear(2, 2))
        assert interop.tracing.adapter_for(torch.nn.Linear(2, 2)).name == "torch"
    assert interop.tracing.adapter_for(mlp).name == "flax"


def test_keras_models_are_left_to_the_keras_adapter():
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert not ADAPTER.accepts(model)
    assert not ADAPTER.accepts(keras.layers.Dense(2))


def windowed_top3(x, start):
    # start arrives as a 1-element array: a traced index, clamped by JAX like the graph does.
    rows = jax.lax.dynamic_slice(x, (start[0], 0), (2, x.shape[1]))
    values, indices = jax.lax.top_k(jax.device_put(rows), 3)
    return values, indices


def test_dynamic_slice_clamps_and_top_k():
    x = f32(6, 5)
    g = interop.trace(windowed_top3, (x, np.array([1], np.int32)), dynamic_batch=False)
    for start in (0, 3, 5, 9, -2):
        idx = np.array([start], np.int32)
        for got, want in zip(g.run(x, idx), windowed_top3(x, idx), strict=True):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "fn, inputs, options",
    [
        (branchy, (f32(2, 3), np.int32(1)), {}),
        (newton_sqrt, (np.abs(f32(4)) + 1.0,), {}),
        (cumulative, (f32(5, 3),), {"dynamic_batch": False, "dynamic_dims": {"xs": {0: "time"}}}),
        (fori, (f32(2, 3), np.int32(4)), {}),
    ],
    ids=["cond", "while", "scan", "fori"],
)
def test_control_flow_graphs_pass_the_full_onnx_checker(fn, inputs, options):
    onnx = pytest.importorskip("onnx")
    g = interop.trace(fn, inputs, **options)
    onnx.checker.check_model(g.to_proto(), full_check=True)  # types and shapes of bodies too


def assorted(x):
    one_hot = jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1])
    return jnp.where(x > 0, jnp.clip(x, -0.5, 0.5), jnp.cumsum(x, -1)) + one_hot, x.max()


def causal_sdpa(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def pools(x):
    nn = pytest.importorskip("flax.linen")
    return (
        nn.avg_pool(x, (3, 3), padding="SAME", count_include_pad=False),
        nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME"),
    )


@pytest.mark.parametrize(
    "fn, shapes",
    [(assorted, [(5,)]), (causal_sdpa, [(5, 2, 4)] * 3), (pools, [(7, 7, 3)])],
    ids=["where_clip_cumsum_onehot", "causal_dot_product_attention", "pools_same_padding"],
)
def test_jax_functions_match_on_two_batch_sizes(fn, shapes):
    g = interop.trace(fn, tuple(f32(2, *s) for s in shapes))
    for batch in (2, 5):
        inputs = tuple(f32(batch, *s) for s in shapes)
        report = interop.verify(fn, g, inputs, rtol=RTOL, atol=ATOL)
        assert report.ok, str(report)


def test_accepts_does_not_import_jax():
    import subprocess

    code = (
        "import sys, interop\n"
        "from interop.adapters.flax import ADAPTER\n"
        "assert not ADAPTER.accepts(lambda x: x)\n"
        "assert not ADAPTER.accepts(object())\n"
        "assert 'jax' not in sys.modules and 'flax' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_invalid_graph_is_reported_at_capture_with_primitive_and_line():
    def bad_reduce_xor(low, eqn, x):
        # an ill-typed node: MatMul of a bool and a float, which ONNX rejects
        return low.op("MatMul", [x, low.const(np.ones((5, 1), np.float32))])

    register_primitive("reduce_xor", bad_reduce_xor)
    try:
        with pytest.raises(interop.TraceError) as info:
            interop.trace(uses_reduce_xor, f32(2, 5))
    finally:
        CAPTURE_PRIMITIVES._entries.pop("reduce_xor")
    text = str(info.value)
    line = uses_reduce_xor.__code__.co_firstlineno + 2
    assert "JAX primitive 'reduce_xor'" in text and f"test_flax_jax.py:{line}" in text
    assert "MatMul" in text and "register_primitive('reduce_xor', replace=True)" in text
    assert not isinstance(info.value, interop.ModelLoadError)
