"""JAX primitives in their general forms: each case is a plain JAX function, traced and run
on ONNX Runtime, against the jitted function (float: rtol 1e-5 / atol 1e-6; integers and
booleans: exact). `trace` itself checks every graph with the ONNX checker (full type
inference) and an ONNX Runtime session, so a case that captures is also a valid graph."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import interop

RTOL, ATOL = 1e-5, 1e-6
rng = np.random.default_rng(7)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def ints(high, *shape, dtype=np.int32, low=0):
    return rng.integers(low, high, shape).astype(dtype)


def check(fn, *inputs, dynamic_batch=False, rtol=RTOL, atol=ATOL, again=None):
    g = interop.trace(fn, inputs, dynamic_batch=dynamic_batch)
    for args in [inputs] + ([again] if again else []):
        want = jax.tree_util.tree_leaves(jax.jit(fn)(*args))
        got = g.run(*args)
        got = got if isinstance(got, list | tuple) else [got]
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            b = np.asarray(b)
            assert a.shape == b.shape, (a.shape, b.shape)
            if b.dtype.kind in "fc":
                np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
            else:
                np.testing.assert_array_equal(a, b)
    return g


# ---------------------------------------------------------------------- gather
GATHERS = {
    "take_along_axis_last": (lambda x, i: jnp.take_along_axis(x, i, axis=-1),
                             (f32(3, 5), ints(5, 3, 2))),
    "take_along_axis_0": (lambda x, i: jnp.take_along_axis(x, i, axis=0),
                          (f32(4, 3), ints(4, 2, 3))),
    "take_along_axis_3d_mid": (lambda x, i: jnp.take_along_axis(x, i, axis=1),
                               (f32(2, 5, 3), ints(5, 2, 4, 1))),
    "adv_two_arrays": (lambda x, i, j: x[i, j], (f32(4, 5, 2), ints(4, 3), ints(5, 3))),
    "adv_middle_axis": (lambda x, i: x[:, i], (f32(3, 6, 2), ints(6, 2, 2))),
    "adv_split_axes": (lambda x, i, j: x[i, :, j], (f32(4, 3, 5), ints(4, 2), ints(5, 2))),
    "adv_last_axis": (lambda x, i: x[..., i], (f32(2, 3, 6), ints(6, 4))),
    "adv_negative_indices": (lambda x, i: x[i], (f32(5, 3), ints(0, 4, low=-5))),
    "take_clip": (lambda x, i: jnp.take(x, i, axis=1, mode="clip"), (f32(3, 4), ints(9, 5, low=-4))),
    "take_fill": (lambda x, i: jnp.take(x, i, axis=0, mode="fill", fill_value=-1.0),
                  (f32(4, 3), ints(8, 6, low=-6))),
    "scalar_index": (lambda x, i: x[i[0], 1:3], (f32(5, 4), ints(5, 1))),
    "embedding_int64_ids": (lambda t, i: t[i], (f32(10, 4), ints(10, 2, 3))),
    "gather_ints": (lambda x, i: jnp.take_along_axis(x, i, axis=1), (ints(9, 3, 4), ints(4, 3, 2))),
    "gather_bool": (lambda x, i: x[i], (ints(2, 5, 2).astype(bool), ints(5, 3))),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(GATHERS))
def test_gather(case):
    fn, inputs = GATHERS[case]
    check(fn, *inputs)


def test_gather_with_dynamic_batch():
    fn = lambda x, i: jnp.take_along_axis(x, i, axis=-1)  # noqa: E731
    check(fn, f32(3, 5), ints(5, 3, 2), dynamic_batch=True, again=(f32(7, 5), ints(5, 7, 2)))


def test_general_lax_gather_with_partial_slices():
    # rows of 2 elements from a 2-D array at (row, col) starts: offset dims and slice sizes
    dn = lax.GatherDimensionNumbers(
        offset_dims=(1,), collapsed_slice_dims=(0,), start_index_map=(0, 1)
    )

    def fn(x, idx):
        return lax.gather(x, idx, dn, slice_sizes=(1, 2), mode="clip")

    check(fn, f32(5, 6), ints(6, 4, 2))


def test_batched_gather_from_vmap():
    fn = jax.vmap(lambda row, i: row[i])
    check(fn, f32(3, 7), ints(7, 3, 4))


# ---------------------------------------------------------------------- scatter
SCATTERS = {
    "set": lambda x, i, u: x.at[i].set(u),
    "add": lambda x, i, u: x.at[i].add(u),
    "mul": lambda x, i, u: x.at[i].multiply(u),
    "min": lambda x, i, u: x.at[i].min(u),
    "max": lambda x, i, u: x.at[i].max(u),
}


@pytest.mark.parametrize("mode", sorted(SCATTERS))
def test_scatter_rows(mode):
    i = np.array([4, 0, 2], np.int32)
    check(SCATTERS[mode], f32(6, 3), i, f32(3, 3))


@pytest.mark.parametrize("mode", ["add", "max"])
def test_scatter_with_duplicate_indices(mode):
    check(SCATTERS[mode], f32(5, 2), np.array([1, 3, 1, 1], np.int32), f32(4, 2))


def test_scatter_into_a_middle_axis_and_elements():
    check(lambda x, i, u: x.at[:, i].set(u), f32(3, 6, 2), np.array([5, 1], np.int32), f32(3, 2, 2))
    check(
        lambda x, i, j, u: x.at[i, j].add(u),
        f32(4, 5),
        np.array([0, 3, 3], np.int32),
        np.array([4, 1, 1], np.int32),
        f32(3),
    )


def test_scatter_integer_and_out_of_bounds_indices_are_dropped():
    # jnp's default scatter mode drops updates whose indices fall outside the operand
    check(lambda x, i, u: x.at[i].add(u), ints(9, 6), np.array([2, 9, -1, 5], np.int32),
          ints(5, 4))  # fmt: skip


def test_segment_sum_and_dynamic_update_slice():
    check(
        lambda d, s: jax.ops.segment_sum(d, s, num_segments=4),
        f32(7, 3),
        np.array([0, 0, 1, 3, 3, 3, 2], np.int32),
    )
    check(lambda c, u, p: lax.dynamic_update_slice(c, u, (0, p[0], 0)),
          f32(2, 8, 3), f32(2, 2, 3), np.array([3], np.int32))  # fmt: skip
    # out-of-range start indices are clamped as JAX does
    fn = lambda c, u, p: lax.dynamic_update_slice(c, u, (p[0], 0))  # noqa: E731
    g = interop.trace(fn, (f32(5, 3), f32(2, 3), np.array([1], np.int32)), dynamic_batch=False)
    for p in (-3, 0, 4, 9):
        args = (f32(5, 3), f32(2, 3), np.array([p], np.int32))
        np.testing.assert_allclose(g.run(*args), fn(*args), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- dot_general
def test_dot_general_batch_dims_anywhere_and_mixed_dtypes():
    dn = (((2,), (0,)), ((1,), (2,)))
    check(lambda a, b: lax.dot_general(a, b, dn), f32(3, 4, 5), f32(5, 2, 4), rtol=1e-5)
    check(lambda a, b: jnp.einsum("bhqd,bkhd->bhqk", a, b), f32(2, 3, 4, 5), f32(2, 6, 3, 5))
    check(
        lambda a, b: lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        ),
        ints(100, 3, 4, dtype=np.int8, low=-100),
        ints(100, 4, 2, dtype=np.int8, low=-100),
    )
    check(lambda a, b: lax.dot(a, b, preferred_element_type=jnp.float32), ints(5, 3, 4), f32(4, 2))
    check(lambda a, b: a @ b, ints(5, 3, 4), ints(5, 4, 2))
    check(lambda a, b: lax.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                               preferred_element_type=jnp.float32), f32(3, 4), f32(4, 2))  # fmt: skip


# ---------------------------------------------------------------------- elementwise
def _int_and_bool_ops(a, b):
    return (a & b, a | b, a ^ b, ~a, a == b, a != b, a < b, a <= b, a > b, a >= b, a % 3,
            jnp.sign(a), a << 2, a >> 1, lax.shift_right_logical(a, a.dtype.type(1)), jnp.maximum(a, b),
            a + b, a * b, -a, abs(a), a.sum(0), a.max(1), a.min(0), jnp.argmax(a, 1), jnp.cumsum(a, 1))  # fmt: skip


@pytest.mark.parametrize("dtype", [np.int32, np.int8, np.uint8, np.int16, np.uint32])
def test_integer_bitwise_comparison_ops(dtype):
    low = 0 if np.dtype(dtype).kind == "u" else -50
    check(
        _int_and_bool_ops,
        ints(50, 4, 5, dtype=dtype, low=low),
        ints(50, 4, 5, dtype=dtype, low=low),
    )


def test_bool_logical_and_comparison_ops():
    a, b = ints(2, 3, 4).astype(bool), ints(2, 3, 4).astype(bool)
    check(lambda a, b: (a & b, a | b, a ^ b, ~a, a == b, a != b, a < b, a >= b,
                        jnp.where(a, b, ~b), a.astype(jnp.float32), jnp.argmax(a, -1),
                        a.sum(-1), jnp.maximum(a, b)), a, b)  # fmt: skip


def test_population_count_and_clz():
    check(lambda x: (lax.population_count(x), lax.clz(x)), ints(1 << 30, 4, 5))


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_rem_sign_clamp_integer_pow(dtype):
    a = (f32(4, 5) * 5).astype(dtype)
    b = np.where(np.abs(a) < 1, 3, a).astype(dtype)[::-1]
    check(lambda a, b: (lax.rem(a, b), jnp.sign(a), jnp.clip(a, -2, 2), lax.clamp(dtype(-1), a, dtype(3)),
                        lax.integer_pow(a, 3), a % b), a, b)  # fmt: skip


def test_float_unary_specials():
    x = np.clip(f32(3, 4) * 0.4, -0.95, 0.95)
    check(lambda x: (lax.erf_inv(x), lax.integer_pow(x + 2, -2), jnp.round(x * 3),
                     lax.round(x * 3, lax.RoundingMethod.TO_NEAREST_EVEN),
                     jnp.log1p(x + 1), jnp.expm1(x), lax.is_finite(x / (x > 0)), lax.cbrt(x),
                     jnp.arctan2(x, x[::-1]), jnp.arctan2(x, -x)), x, rtol=1e-5, atol=1e-5)  # fmt: skip


def test_reduce_precision_rounds_like_bfloat16_and_float16():
    x = f32(4, 6) * 100
    check(lambda x: (lax.reduce_precision(x, 8, 7), lax.reduce_precision(x, 5, 10) / 100,
                     lax.reduce_precision(x, 8, 23)), x)  # fmt: skip


CASTS = [np.float32, np.float16, jnp.bfloat16, np.int32, np.int8, np.uint8, np.int16, np.bool_,
         np.uint32]  # fmt: skip


@pytest.mark.parametrize("src", CASTS, ids=lambda d: np.dtype(d).name)
def test_convert_element_type_to_every_dtype(src):
    # non-negative values: XLA leaves negative floats -> unsigned ints implementation-defined
    x = np.abs((f32(4, 6) * 3).clip(-3, 3))
    signed = np.dtype(src).kind in "fi" or src is jnp.bfloat16
    x = (x * np.where(rng.random(x.shape) < 0.5, -1, 1) if signed else x).astype(np.float32)
    feed = x if src is jnp.bfloat16 else x.astype(src)  # ORT takes no bfloat16 arrays

    def fn(x):
        x = x.astype(src)
        outs = []
        for d in CASTS:
            if d is jnp.bfloat16:  # ORT returns no bfloat16 arrays: round-trip it
                outs.append(x.astype(d).astype(np.float32))
            elif signed and np.dtype(d).kind == "u":  # negative -> unsigned is undefined
                outs.append(jnp.abs(x).astype(d))
            else:
                outs.append(x.astype(d))
        return tuple(outs)

    check(fn, feed)


def test_select_n_clamp_and_argmax_on_ints_with_ties():
    check(
        lambda w, a, b, c: lax.select_n(w, a, b, c), ints(3, 3, 4), f32(3, 4), f32(3, 4), f32(3, 4)
    )
    check(
        lambda w, a, b: lax.select_n(w, a, b),
        ints(2, 3, 4).astype(bool),
        ints(9, 3, 4),
        ints(9, 3, 4),
    )
    x = ints(3, 4, 6)
    check(lambda x: (jnp.argmax(x, 1), jnp.argmin(x, 0), jnp.argmax(x.astype(np.float32), 1)), x)


# ---------------------------------------------------------------------- sort and scans
def test_sort_argsort_and_top_k():
    x = f32(3, 6)
    check(lambda x: (jnp.sort(x, -1), jnp.sort(x, 0), jnp.argsort(x, -1), jnp.argsort(-x, 0),
                     jnp.sort(x, -1, descending=True)), x)  # fmt: skip
    xi = ints(4, 3, 6)  # ties: argsort is stable, as in JAX
    check(lambda x: (jnp.argsort(x, -1), jnp.sort(x, 0)), xi)
    check(lambda k, v: lax.sort((k, v), num_keys=1), xi, f32(3, 6))
    check(lambda x: lax.top_k(x, 3), x)
    check(lambda x: lax.top_k(jnp.swapaxes(x, 0, 1), 2), f32(3, 6))


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_cumulative_ops(dtype):
    x = (f32(3, 5) * 3).astype(dtype)
    check(lambda x: (jnp.cumsum(x, 1), jnp.cumprod(x, 0), lax.cummax(x, 1), lax.cummin(x, 0),
                     lax.cummax(x, 1, reverse=True), lax.cumsum(x, 0, reverse=True)), x)  # fmt: skip
    if dtype == np.float32:
        check(lambda x: lax.cumlogsumexp(x, 1), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int8])
def test_cumulative_ops_over_a_symbolic_axis(dtype):
    # the batch axis is symbolic: the log-step scan is one ONNX Loop, run at 1, 5 and 9 rows
    def make(n):
        return (f32(n, 4) * 3).astype(dtype)

    def fn(x):
        return (jnp.cumprod(x, 0), lax.cummax(x, 0), lax.cummin(x, 0, reverse=True),
                jnp.cumsum(x, 0))  # fmt: skip

    g = check(fn, make(5), dynamic_batch=True, again=(make(9),))
    assert g.inputs[0].shape[0] == "batch"
    assert "Loop" in [n.op_type for n in g.model.graph]
    check(fn, make(5), dynamic_batch=True, again=(make(1),))
    if dtype == np.float32:
        check(lambda x: lax.cumlogsumexp(x, 0, reverse=True), make(5), dynamic_batch=True,
              again=(make(7),), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_iota_in_several_dtypes_and_axes():
    check(lambda x: (x + lax.broadcasted_iota(jnp.float32, (3, 4), 1),
                     lax.broadcasted_iota(jnp.int8, (2, 3, 4), 2), jnp.arange(5, dtype=jnp.uint8),
                     jnp.tril(jnp.ones((4, 4), bool))), f32(3, 4))  # fmt: skip


# ---------------------------------------------------------------------- calls and control
@jax.custom_vjp
def clipped_identity(x):
    return x


clipped_identity.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1, 1),))


@jax.custom_jvp
def softplus(x):
    return jnp.logaddexp(x, 0.0)


softplus.defjvp(lambda p, t: (softplus(p[0]), t[0] * jax.nn.sigmoid(p[0])))


def test_custom_jvp_vjp_pjit_and_remat_are_inlined():
    inner = jax.jit(lambda x: jnp.sin(x) * 2)

    def fn(x):
        y = jax.checkpoint(lambda z: jnp.tanh(z) ** 2)(x)
        return softplus(x) + clipped_identity(x) + inner(x) + y + jax.nn.gelu(x) + jax.nn.relu(x)

    check(fn, f32(3, 4), rtol=1e-5, atol=1e-5)


def test_switch_with_int_index_and_while_with_int_carry():
    def fn(x, i):
        y = lax.switch(i[0], [jnp.sin, jnp.cos, lambda v: -v], x)
        n = lax.while_loop(lambda c: c[0] < 10, lambda c: (c[0] + 3, c[1] + 1.0), (i[0], x))
        return y, n[0], n[1]

    g = interop.trace(fn, (f32(3), np.array([1], np.int32)), dynamic_batch=False)
    for i in (-1, 0, 1, 2, 5):
        args = (f32(3), np.array([i], np.int32))
        for a, b in zip(g.run(*args), fn(*args), strict=True):
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- FFT
def test_fft_rfft_irfft_and_complex_parts():
    x = f32(2, 16)
    check(lambda x: (jnp.abs(jnp.fft.rfft(x)), jnp.fft.irfft(jnp.fft.rfft(x), n=16)), x,
          rtol=1e-4, atol=1e-4)  # fmt: skip
    check(lambda x: (jnp.fft.fft(x).real, jnp.fft.ifft(x).imag, jnp.angle(jnp.fft.fft(x))), x,
          rtol=1e-4, atol=1e-4)  # fmt: skip
    check(lambda x: (jnp.fft.irfft(jnp.fft.rfft(x) * jnp.conj(jnp.fft.rfft(x)), n=15),
                     jnp.abs(jnp.fft.fft2(x)), jnp.fft.irfft2(jnp.fft.rfft2(x), s=(2, 16))),
          f32(2, 15), rtol=1e-4, atol=1e-4)  # fmt: skip


def test_a_complex_graph_output_is_refused_at_capture():
    with pytest.raises(interop.TraceError, match="Output 'output' is complex64"):
        interop.trace(lambda x: jnp.fft.fft(x), f32(2, 8))


def test_scatter_clip_mode_and_a_dynamic_batch():
    i = np.array([7, 1, -9], np.int32)  # clip mode clamps out-of-range indices
    check(lambda x, u: x.at[:, i].set(u, mode="clip"), f32(2, 5), f32(2, 3))
    fn = lambda x, u: x.at[:, np.array([4, 0, 4])].add(u)  # noqa: E731
    check(fn, f32(2, 5), f32(2, 3), dynamic_batch=True, again=(f32(6, 5), f32(6, 3)))
    kv = lambda c, u, p: lax.dynamic_update_slice(c, u, (0, p, 0))  # noqa: E731
    check(kv, f32(2, 8, 4), f32(2, 1, 4), np.int32(5), dynamic_batch=True,
          again=(f32(3, 8, 4), f32(3, 1, 4), np.int32(7)))  # fmt: skip


# ---------------------------------------------------------------------- half precision
def half_program(x, w):
    h = jnp.tanh(x) * 2 + jnp.exp(-x * x) / (1 + jnp.abs(x)) - jnp.sqrt(jnp.abs(x) + 1)
    h = jax.nn.gelu(h) + jnp.maximum(x, 0.1) + jnp.where(x > 0, x, -x) ** 2
    h = jax.nn.softmax(h @ w, axis=-1) + jnp.cumsum(h, 1)[:, :6]
    mean = h.mean(-1, keepdims=True)
    return (h - mean) * lax.rsqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-5), h.max(0)


def ort_outputs_as_float32(g, *inputs):
    """ONNX Runtime's outputs of `g` (numpy has no bfloat16: ORT's Python API takes and
    gives none, so bfloat16 inputs go in as OrtValues and outputs come out cast)."""
    import onnx
    import onnxruntime as ort

    proto = g.to_proto()
    for out in proto.graph.output:
        if out.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16:
            cast = onnx.helper.make_node("Cast", [out.name], [out.name + "_f32"], to=1)
            proto.graph.node.append(cast)
            out.name, out.type.tensor_type.elem_type = out.name + "_f32", onnx.TensorProto.FLOAT
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {}
    for spec, x in zip(session.get_inputs(), inputs, strict=True):
        if x.dtype == jnp.bfloat16:
            x = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.view(np.uint16), 16)
        feed[spec.name] = x
    if any(isinstance(v, ort.OrtValue) for v in feed.values()):
        return [v.numpy() for v in session.run_with_ort_values(None, feed)]
    return session.run(None, feed)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16])
def test_half_precision_elementwise_programs_keep_their_dtype(dtype):
    # bfloat16 arithmetic runs in float32 per equation, rounded back (as XLA on CPU does);
    # float16 runs in ONNX Runtime's own float16 kernels
    x, w = f32(4, 8).astype(dtype), (f32(8, 6) / 3).astype(dtype)
    g = interop.trace(half_program, (x, w), dynamic_batch=False, dynamic_dims={"x": {0: "batch"}})
    assert [i.dtype for i in g.inputs] == [np.dtype(dtype)] * 2
    assert [o.dtype for o in g.outputs] == [np.dtype(dtype)] * 2
    tol = 2e-2 if dtype == jnp.bfloat16 else 4e-3  # a few ulps of the dtype (2^-8, 2^-11)
    for batch in (4, 7):
        xb = f32(batch, 8).astype(dtype)
        got = ort_outputs_as_float32(g, xb, w)
        want = [np.asarray(a, np.float32) for a in jax.jit(half_program)(xb, w)]
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol)
