"""Keras capture keeps the math that layers do on their own weights in the graph.

A layer that transforms a weight before using it (PReLU's ``-alpha``, GroupNormalization's
reshape of gamma, a LoRA-merged kernel, an adapted Normalization's broadcast statistics)
must be captured as nodes reading the Keras variable: a constant folded from the weight
at trace time computes the same outputs, but leaves the variable an unread initializer,
and a model emitted from the graph has nothing to train. For each layer, in a small
functional model:

- outputs match Keras (`interop.verify`: rtol 1e-4, atol 1e-5);
- every variable the inference call uses (trainable or not) is an initializer named
  after its Keras path and read by a node, and no other float initializer holds a variable's values (up to sign, layout or
  scale: sorted magnitudes over their maximum within 1e-6);
- `interop.to_torch` gives exactly as many trainable parameter elements as the Keras
  model has trainable weight elements.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("torch")
from keras import layers, ops  # noqa: E402
from keras.src import backend as native  # noqa: E402

import interop  # noqa: E402


# ---------------------------------------------------------------------------- custom layers
class ExpScale(layers.Layer):
    """Ops on variables alone: exp of a log-scale, a double transpose of a kernel."""

    def build(self, shape):
        self.log_scale = self.add_weight(shape=(shape[-1],), initializer="random_normal")
        self.w = self.add_weight(shape=(shape[-1], 3), initializer="random_normal")

    def call(self, x):
        kernel = ops.transpose(ops.transpose(self.w)) * 2.0
        return ops.matmul(x * ops.exp(self.log_scale), kernel)


class TiedHead(layers.Layer):
    """An output head tied to a sub-layer's embeddings (read through the sub-layer)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.embed = layers.Embedding(10, 4)
        self.dense = layers.Dense(4)

    def call(self, ids):
        return ops.matmul(self.dense(self.embed(ids)), ops.transpose(self.embed.embeddings))


class WeightList(layers.Layer):
    """Variables kept in a list, multiplied together before use."""

    def build(self, shape):
        self.ws = [
            self.add_weight(shape=(shape[-1], shape[-1]), initializer="random_normal")
            for _ in range(2)
        ]

    def call(self, x):
        return ops.matmul(x, ops.matmul(self.ws[0], self.ws[1]))


class ReadsValue(layers.Layer):
    """Reads ``variable.value`` (the placeholder answers it) and returns a variable op."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * ops.negative(self.w.value), ops.square(self.w)


class BackendNativeOnWeights(layers.Layer):
    """Transforms its weight with a backend-native function (not ``keras.ops``), which a
    KerasTensor placeholder cannot enter."""

    def build(self, shape):
        self.w = self.add_weight(shape=(shape[-1],), initializer="random_normal")

    def call(self, x):
        return x * native.numpy.exp(self.w)


class WeightNorm(layers.Layer):
    """Normalizes its kernel with ``ops.linalg.norm``, an op the capture has no converter for."""

    def build(self, shape):
        self.v = self.add_weight(shape=(shape[-1], 3), initializer="random_normal")

    def call(self, x):
        return ops.matmul(x, self.v / ops.linalg.norm(self.v))


# ---------------------------------------------------------------------------- cases
def _lora(layer, shape, rank=2):
    layer.build(shape)
    layer.enable_lora(rank)
    for variable in layer.trainable_weights:  # LoRA's B starts at zero: make it count
        variable.assign(np.random.RandomState(3).normal(size=variable.shape) * 0.1)
    return layer


def _adapted(invert):
    layer = layers.Normalization(invert=invert)
    layer.adapt(np.random.RandomState(2).rand(16, 6).astype("float32") * 3 + 1)
    return layer


GQA = getattr(layers, "GroupQueryAttention", None)

CASES = {
    "prelu": ((5, 6), lambda i: layers.PReLU(alpha_initializer="random_uniform")(i)),
    "prelu_shared": ((4, 4, 3), lambda i: layers.PReLU("random_uniform", shared_axes=[1, 2])(i)),
    "group_norm": ((4, 4, 6), lambda i: layers.GroupNormalization(groups=3)(i)),
    "layer_norm_rms": ((4, 6), lambda i: layers.LayerNormalization(rms_scaling=True)(i)),
    "rms_norm": ((4, 6), lambda i: layers.RMSNormalization()(i)),
    "batch_norm": ((4, 4, 3), lambda i: layers.BatchNormalization()(i)),
    "einsum_dense": ((4, 3), lambda i: layers.EinsumDense("abc,cde->abde", (None, 2, 5), bias_axes="de")(i)),
    "multi_head_attention": ((4, 6), lambda i: layers.MultiHeadAttention(2, 3)(i, i)),
    "embedding": ((None,), lambda i: layers.Embedding(10, 4)(i)),
    "conv2d_bias": ((6, 6, 3), lambda i: layers.Conv2D(4, 3)(i)),
    "conv1d_transpose": ((6, 3), lambda i: layers.Conv1DTranspose(4, 3)(i)),
    "separable_conv": ((6, 6, 3), lambda i: layers.SeparableConv2D(4, 3)(i)),
    "dense_lora": ((6,), lambda i: _lora(layers.Dense(3), (None, 6))(i)),
    "einsum_dense_lora": ((4, 3), lambda i: _lora(layers.EinsumDense("abc,cd->abd", (None, 5), bias_axes="d"), (None, 4, 3))(i)),
    "embedding_lora": ((None,), lambda i: _lora(layers.Embedding(10, 4), (None, 7))(i)),
    "conv_lora": ((6, 6, 3), lambda i: _lora(layers.Conv2D(4, 3), (None, 6, 6, 3))(i)),
    "spectral_norm": ((6,), lambda i: layers.SpectralNormalization(layers.Dense(3))(i)),
    "attention_scale": ((4, 6), lambda i: layers.Attention(use_scale=True, score_mode="concat")([i, i])),
    "additive_attention": ((4, 6), lambda i: layers.AdditiveAttention()([i, i])),
    "normalization": ((6,), lambda i: _adapted(False)(i)),
    "normalization_invert": ((6,), lambda i: _adapted(True)(i)),
    "custom_exp_scale": ((6,), lambda i: ExpScale()(i)),
    "custom_tied_head": ((None,), lambda i: TiedHead()(i)),
    "custom_weight_list": ((6,), lambda i: WeightList()(i)),
    "custom_reads_value": ((6,), lambda i: ReadsValue()(i)),
}  # fmt: skip
if GQA is not None:
    CASES["group_query_attention"] = ((4, 8), lambda i: GQA(4, 4, 2)(i, i))


# weights the inference call does not read: Normalization's sample count, the power
# iteration vector SpectralNormalization updates in training only
UNUSED_IN_INFERENCE = ("/count", "/vector_u")


def _model(name):
    keras.utils.set_random_seed(0)
    shape, build = CASES[name]
    dtype = "int32" if shape == (None,) else "float32"
    i = keras.Input(shape, dtype=dtype)
    model = keras.Model(i, build(i))
    rs = np.random.RandomState(1)
    x = (
        rs.randint(0, 10, size=(2, 7)).astype("int32")
        if dtype == "int32"
        else (rs.rand(2, *shape) * 4 - 2).astype("float32")
    )
    return model, x


def _read_initializers(graph: ir.Graph) -> set[str]:
    """Names of the initializers some node (subgraphs included) reads."""
    return {
        v.name
        for node in ir.traversal.RecursiveGraphIterator(graph)
        for v in node.inputs
        if v is not None and v.is_initializer()
    }


def _profile(array: np.ndarray) -> np.ndarray:
    """Sorted magnitudes over their maximum: equal for -w, reshape(w), w.T, c * w."""
    flat = np.sort(np.abs(np.asarray(array, np.float64).ravel()))
    return flat / flat[-1] if flat[-1] else flat


def _folded(graph: ir.Graph, weights: list) -> list[str]:
    """Float initializers that are not variables but hold a (transformed) variable."""
    paths = {v.path for v in weights}
    profiles = [
        (v.path, _profile(keras.ops.convert_to_numpy(v)))
        for v in weights
        if np.prod(v.shape) >= 2 and "float" in str(v.dtype)
    ]
    found = []
    for name, init in graph.initializers.items():
        array = init.const_value.numpy() if init.const_value is not None else None
        if name in paths or array is None or array.dtype.kind != "f" or array.size < 2:
            continue
        profile = _profile(array)
        for path, weight in profiles:
            if weight.shape == profile.shape and np.allclose(profile, weight, atol=1e-6):
                found.append(f"{name} {array.shape} ~ {path}")
    return found


def _trainable_size(weights) -> int:
    return int(sum(np.prod(v.shape) for v in weights))


@pytest.mark.parametrize("name", list(CASES))
def test_weights_stay_in_the_graph(name):
    model, x = _model(name)
    g = interop.trace(model, x)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)

    graph = g.model.graph
    read = _read_initializers(graph)
    used = [v.path for v in model.weights if not v.path.endswith(UNUSED_IN_INFERENCE)]
    assert used, "the case must have weights to check"
    missing = [p for p in used if p not in graph.initializers]
    assert not missing, f"variables without an initializer: {missing}"
    unread = [p for p in used if p not in read]
    assert not unread, f"variables no node reads: {unread}"
    assert not _folded(graph, model.weights)

    module = interop.to_torch(g)
    emitted = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert emitted == _trainable_size(model.trainable_weights)


def test_variables_are_restored_after_the_trace():
    """The traced layers get their variables back, and Keras still runs them."""
    model, x = _model("custom_tied_head")
    layer = model.layers[1]
    before = keras.ops.convert_to_numpy(model(x))
    interop.trace(model, x)
    assert isinstance(layer.embed.embeddings, keras.Variable)
    assert all(isinstance(v, keras.Variable) for v in model.weights)
    assert "symbolic_call" not in vars(layer.embed) and "symbolic_call" not in vars(layer.dense)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), before)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [(BackendNativeOnWeights, "KerasTensor"), (WeightNorm, "No keras import converter")],
)
def test_variables_only_math_that_cannot_be_captured_folds_with_a_warning(cls, reason):
    """A call that cannot run on symbolic variables (backend code on them), or whose math
    on variables alone has no converter, is traced with the variables folded, and says so."""
    keras.utils.set_random_seed(0)
    i = keras.Input((6,))
    layer = cls(name="folding")
    model = keras.Model(i, layer(i))
    x = np.random.RandomState(1).rand(2, 6).astype("float32")
    with pytest.warns(UserWarning, match=f"'folding'.*{reason}.*folded into constants"):
        g = interop.trace(model, x)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)
    assert all(isinstance(v, keras.Variable) for v in vars(layer).values() if hasattr(v, "path"))
    assert "symbolic_call" not in vars(layer)
