"""keras.ops used in Lambda layers and custom layers, checked against Keras (rtol 1e-4)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

keras = pytest.importorskip("keras")
from keras import layers, ops  # noqa: E402

import interop  # noqa: E402

# Each case maps x of shape (batch, 5, 6), values in [-2, 2), to one float32 tensor.
CASES = {
    "trig": lambda x: ops.tan(x * 0.5) + ops.sinh(x) + ops.cosh(x) + ops.arctan(x) + ops.arcsinh(x),
    "inverse_trig": lambda x: ops.arcsin(x * 0.4) + ops.arccos(x * 0.4) + ops.arctanh(x * 0.4),
    "logs": lambda x: ops.log1p(ops.abs(x)) + ops.expm1(x) + ops.log2(ops.abs(x) + 1) + ops.log10(ops.abs(x) + 1),
    "rounding": lambda x: ops.round(x * 3) + ops.trunc(x) + ops.round(x, 1) + ops.floor(x) + ops.ceil(x) + ops.sign(x),
    "activations": lambda x: ops.leaky_relu(x) + ops.elu(x) + ops.selu(x) + ops.celu(x) + ops.softsign(x)
    + ops.hard_sigmoid(x) + ops.hard_silu(x) + ops.hard_tanh(x) + ops.log_sigmoid(x),
    "shrink_plus": lambda x: ops.hard_shrink(x) + ops.soft_shrink(x) + ops.squareplus(x) + ops.sparse_plus(x)
    + ops.tanh_shrink(x) + ops.threshold(x, 0.5, -1.0) + ops.sparse_sigmoid(x),
    "gelu_silu": lambda x: ops.gelu(x) + ops.gelu(x, approximate=False) + ops.silu(x) + ops.relu6(x * 4),
    "glu": lambda x: ops.glu(x),
    "binary": lambda x: ops.floor_divide(x, 0.7) + ops.mod(x, 0.7) + ops.arctan2(x, x[..., ::-1] + 0.1)
    + ops.logaddexp(x, -x) + ops.hypot(x, 2 * x) + ops.divide_no_nan(x, ops.round(x)),
    "reductions": lambda x: ops.var(x, axis=1) + ops.std(x, axis=1) + ops.logsumexp(x, axis=1)
    + ops.amax(x, axis=1) + ops.amin(x, axis=1) + ops.average(x, axis=1),
    "reduce_keepdims": lambda x: x - ops.mean(x, axis=-1, keepdims=True) + ops.max(x, axis=(1, 2), keepdims=True)
    + ops.std(x, axis=-1, keepdims=True) + ops.prod(x, axis=-1, keepdims=True) + ops.sum(x, axis=-1, keepdims=True),
    "weighted_average": lambda x: ops.average(x, axis=2, weights=ops.abs(x) + 0.1),
    "arg_sort": lambda x: ops.cast(ops.argmax(x, axis=-1) + ops.argmin(x, axis=1)[:, :5], "float32")
    + ops.sort(x, axis=1)[:, :, 0] + ops.cast(ops.argsort(x)[..., 0], "float32"),
    "top_k": lambda x: ops.top_k(x, 3)[0][..., 0] + ops.cast(ops.top_k(x, 2)[1][..., 1], "float32"),
    "cumsum_flip": lambda x: ops.cumsum(x, axis=1) + ops.flip(x, axis=1) + ops.flip(x, axis=(1, 2)),
    "shape_ops": lambda x: ops.swapaxes(x, 1, 2)[:, :, :5] + ops.moveaxis(x, 1, 2)
    + ops.transpose(x, (0, 2, 1))[:, :, 0:5] + ops.moveaxis(x, [1, 2], [2, 1])[:, :, :5],
    "tile_repeat": lambda x: ops.tile(x, (1, 2, 1))[:, 3:8] + ops.repeat(x, 2, axis=1)[:, ::2],
    "broadcast_expand": lambda x: ops.broadcast_to(ops.expand_dims(x[:, 0], 1), (2, 5, 6)) * x,
    "tril_triu": lambda x: ops.tril(x[:, :, :5]) + ops.triu(x[:, :, :5], k=1) + ops.tril(x[:, :, :5], -1),
    "unstack_stack": lambda x: ops.stack(ops.unstack(x, axis=1)[::-1], axis=1),
    "split_concat": lambda x: ops.concatenate(ops.split(x, 3, axis=-1)[::-1], axis=-1),
    "pad": lambda x: ops.pad(x, ((0, 0), (1, 2), (0, 1))) + ops.pad(x, ((0, 0), (1, 2), (0, 1)), constant_values=3.0)
    + ops.pad(x, ((0, 0), (1, 2), (1, 0)), mode="reflect"),
    "one_hot": lambda x: ops.one_hot(ops.cast(ops.abs(x[:, :, 0]) * 2, "int32"), 5)
    + ops.one_hot(ops.cast(ops.abs(x[:, :, 0]) * 2, "int32"), 5, axis=1),
    "take": lambda x: ops.take(x, [0, 3, -1], axis=1) + ops.take(x, ops.array([1, 2, 3]), axis=1),
    "take_along_axis": lambda x: ops.take_along_axis(x, ops.argsort(x, axis=-1), axis=-1)
    + ops.take_along_axis(x, ops.cast(ops.argmax(x, axis=1, keepdims=True), "int32"), axis=1),
    "like": lambda x: ops.zeros_like(x) + ops.ones_like(x) + ops.full_like(x, 2.5) + x,
    "where_clip": lambda x: ops.where(x > 0, x, ops.clip(x, -1.0, 0.5)) + ops.maximum(x, 0.1) - ops.minimum(x, 0.2),
    "normalize": lambda x: ops.normalize(x) + ops.normalize(x, axis=1, order=1),
    "einsum_matmul": lambda x: ops.einsum("btd,bsd->bts", x, x) + ops.matmul(x, ops.swapaxes(x, 1, 2)),
    "tensordot": lambda x: ops.tensordot(x, ops.ones((6, 3)), axes=1) + ops.tensordot(x, ops.ones((6, 3)), axes=([2], [0])),
    "softmax": lambda x: ops.softmax(x, axis=1) + ops.log_softmax(x, axis=-1) + ops.sigmoid(x) + ops.tanh(x),
    "math": lambda x: ops.erf(x) + ops.sqrt(ops.abs(x)) + ops.rsqrt(ops.abs(x) + 1) + ops.square(x) + ops.abs(x),
    "dynamic_reshape": lambda x: ops.reshape(x, (ops.shape(x)[0], ops.shape(x)[1] * 2, 3)),
    "arange_dynamic": lambda x: x + ops.cast(ops.reshape(ops.arange(ops.shape(x)[1]), (1, -1, 1)), "float32"),
    "getitem": lambda x: x[:, 1:-1, ::2] + x[:, None, 0, :3] + x[:, 2:3, -1:] + x[..., 1, 2:5][:, None],
    "logical": lambda x: ops.cast(ops.logical_xor(x > 0, x > 1) | ops.isnan(x) | ~ops.isfinite(x) | ops.isinf(x), "float32"),
    "nan_to_num": lambda x: ops.nan_to_num(ops.log(x)),
    "count": lambda x: ops.cast(ops.count_nonzero(ops.round(x), axis=-1), "float32"),
    "outer_dot": lambda x: ops.outer(x[0, 0, :5], x[1, 1]) + ops.dot(x[0], ops.ones((6, 6))),
    "constants": lambda x: x * ops.convert_to_tensor([1.0, 2, 3, 4, 5, 6]) + ops.convert_to_tensor(0.5),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_ops_in_lambda_match_keras(name):
    fn = CASES[name]
    i = keras.Input((5, 6))
    model = keras.Model(i, layers.Lambda(fn, name="fn")(i))
    x = (np.random.RandomState(0).rand(2, 5, 6) * 4 - 2).astype("float32")
    g = interop.trace(model, x, dynamic_batch=False)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)


class PatchMerge(layers.Layer):
    """Swin-style custom layer: dynamic reshape from ops.shape, slicing, concat, Dense."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.proj = layers.Dense(8, use_bias=False)

    def call(self, x):
        # -1 (not ops.shape(x)[1] // 2): symbolic shapes are None on a dynamic axis
        pairs = ops.reshape(x, (ops.shape(x)[0], -1, 2, x.shape[-1]))
        merged = ops.concatenate([pairs[:, :, 0], pairs[:, :, 1]], axis=-1)
        return self.proj(merged)


def test_custom_layer_with_dynamic_shapes_runs_at_other_lengths():
    i = keras.Input((None, 6))
    model = keras.Model(i, PatchMerge(name="merge")(i))
    x = np.random.RandomState(0).rand(2, 4, 6).astype("float32")
    g = interop.trace(model, x)
    assert interop.verify(model, g, x).ok
    longer = np.random.RandomState(1).rand(3, 10, 6).astype("float32")
    assert interop.verify(model, g, longer).ok


def test_op_without_converter_in_lambda_goes_through_the_backend_tracer():
    """ops.cumprod has no converter: its Lambda layer is traced by the backend (tf2onnx on
    TensorFlow) with a warning naming the layer; a layer no tracer converts raises
    (tests/test_keras_tracer.py)."""
    i = keras.Input((5, 6))
    model = keras.Model(i, layers.Lambda(lambda x: ops.cumprod(x, axis=1), name="cp")(i))
    x = np.random.RandomState(0).rand(2, 5, 6).astype("float32") + 0.5
    with pytest.warns(UserWarning, match="'cp' .*backend's tracer"):
        graph = interop.trace(model, x)
    for batch in (x, np.concatenate([x, x + 1.0])):
        np.testing.assert_allclose(graph.run(batch), np.asarray(model(batch)), rtol=1e-5)


def test_where_between_bool_tensors_runs_on_onnx_runtime():
    """ops.where choosing between bool masks (keras_hub Gemma3n's multimodal mask): ONNX
    Runtime's CPU Where has no bool kernel, so the graph picks among uint8 and casts back."""
    i = keras.Input((6,))
    mask = layers.Lambda(
        lambda x: ops.cast(ops.where(x[:, :1] > 0, x > 0.5, x < -0.5), "float32"), name="pick"
    )(i)
    model = keras.Model(i, mask)
    x = np.random.RandomState(1).randn(3, 6).astype("float32")
    graph = interop.trace(model, x)
    wheres = [n for n in graph.model.graph if n.op_type == "Where"]
    assert wheres and all(n.outputs[0].dtype != ir.DataType.BOOL for n in wheres)
    for batch in (x, -x[:2]):
        expected = np.asarray(model(batch))
        assert expected.any() and not expected.all()
        np.testing.assert_array_equal(graph.run(batch), expected)
