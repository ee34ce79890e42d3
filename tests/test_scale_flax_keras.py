"""Models larger than memory (issue 20), Flax and Keras: an abstract model traced with
``weights=`` (adapters/flax/capture_weights.py, adapters/keras/capture_weights.py).

Each model is built twice: with values (the reference, its weights written to safetensors
or given as a mapping) and abstract (nnx.eval_shape, linen variables from jax.eval_shape,
Keras under ``keras.StatelessScope(initialize_variables=False)``). The weights are never
read before `save`: a mapping of counting array-likes proves it, and a safetensors file
rewritten after the trace proves the graph reads the file, not a copy made at trace time.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
keras = pytest.importorskip("keras")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jax.numpy as jnp  # noqa: E402

import interop  # noqa: E402
from interop.errors import WeightsError  # noqa: E402

X = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)


class Counted:
    """An array-like that counts how often its data is read (shape and dtype are free)."""

    reads = 0

    def __init__(self, array):
        self._array = np.asarray(array)
        self.shape, self.dtype = self._array.shape, self._array.dtype

    def __array__(self, dtype=None, copy=None):
        Counted.reads += 1
        return self._array


def _save(tensors, path):
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
    return path


# ---------------------------------------------------------------------------- nnx
class Block(nnx.Module):
    def __init__(self, dim, rngs, dtype=jnp.float32):
        self.norm = nnx.LayerNorm(dim, rngs=rngs, param_dtype=dtype)
        self.up = nnx.Linear(dim, 2 * dim, rngs=rngs, param_dtype=dtype)
        self.down = nnx.Linear(2 * dim, dim, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        return x + self.down(nnx.gelu(self.up(self.norm(x))))


class Net(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.blocks = nnx.List([Block(8, rngs, dtype) for _ in range(2)])
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs, param_dtype=dtype)

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.drop(x))


def _nnx(seed=1, dtype=jnp.float32):
    model = Net(nnx.Rngs(seed), dtype)
    model.eval()
    state = nnx.state(model, nnx.Not(nnx.RngState))
    weights = {".".join(str(p) for p in path): np.asarray(var.get_value()) for path, var in
               nnx.to_flat_state(state)}  # fmt: skip
    return model, weights


def _abstract_nnx(dtype=jnp.float32):
    return nnx.eval_shape(lambda: Net(nnx.Rngs(0), dtype))


def test_nnx_weights_are_read_only_by_save(tmp_path):
    model, weights = _nnx()
    abstract = _abstract_nnx()
    assert all(
        isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(abstract))
    )
    counted = {name: Counted(array) for name, array in weights.items()}
    Counted.reads = 0
    graph = interop.trace(abstract, X, weights=counted)
    graph.summary(print_fn=None)
    assert Counted.reads == 0
    assert set(graph.model.graph.initializers) == set(weights)  # the Flax capture's names
    assert graph.count_params() == sum(a.size for a in weights.values())
    graph.save(tmp_path / "m.onnx", external_data=True)
    assert Counted.reads == len(weights)  # each once, streamed into the data file
    loaded = interop.load(tmp_path / "m.onnx")
    np.testing.assert_allclose(loaded.run(X), np.asarray(model(X)), atol=1e-5)


def test_nnx_safetensors_is_read_when_run_not_when_traced(tmp_path):
    first, weights = _nnx(seed=1)
    second, other = _nnx(seed=2)
    file = _save(weights, tmp_path / "model.safetensors")
    graph = interop.trace(_abstract_nnx(), X, weights=file)
    inits = graph.model.graph.initializers.values()
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in inits)
    assert {v.const_value.location for v in inits} == {"model.safetensors"}
    _save(other, file)  # same names and shapes, other values: the graph reads the file
    np.testing.assert_allclose(graph.run(X), np.asarray(second(X)), atol=1e-5)
    path = graph.save(tmp_path / "out" / "net.onnx", external_data=True)
    loaded = interop.load(path)
    np.testing.assert_allclose(loaded.run(X), np.asarray(second(X)), atol=1e-5)
    del first


def test_nnx_bfloat16_weights_stay_bfloat16(tmp_path):
    model, weights = _nnx(dtype=jnp.bfloat16)
    file = _save(weights, tmp_path / "bf16.safetensors")
    graph = interop.trace(_abstract_nnx(jnp.bfloat16), X, weights=file)
    assert {v.dtype for v in graph.model.graph.initializers.values()} == {ir.DataType.BFLOAT16}
    path = graph.save(tmp_path / "out" / "bf16.onnx", external_data=True)
    inits = interop.load(path).model.graph.initializers.values()
    assert {v.dtype for v in inits} == {ir.DataType.BFLOAT16}
    assert sum(v.const_value.nbytes for v in inits) == 2 * sum(a.size for a in weights.values())
    # float32 compute from the same bf16 file equals the model with its weights upcast
    wide = interop.trace(_abstract_nnx(), X, weights=file, compute_dtype="float32")
    upcast = Net(nnx.Rngs(0))
    upcast.eval()
    nnx.update(upcast, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(wide.run(X), np.asarray(upcast(X)), atol=1e-5)


# ---------------------------------------------------------------------------- linen
class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(4, name="head")(nn.relu(x))


def test_linen_shards_with_index(tmp_path):
    variables = Mlp().init(jax.random.key(3), X)
    variables = jax.tree.map(lambda a: a + 0.1, variables)  # batch stats not 0 / 1
    from flax import traverse_util

    flat = {".".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
    names = sorted(flat)  # 'batch_stats.BatchNorm_0.mean', 'params.Dense_0.kernel', ...
    shards = {"model-00001-of-00002.safetensors": names[:3]}
    shards["model-00002-of-00002.safetensors"] = names[3:]
    weight_map = {}
    for shard, members in shards.items():
        _save({n: flat[n] for n in members}, tmp_path / shard)
        weight_map.update(dict.fromkeys(members, shard))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    abstract = jax.eval_shape(Mlp().init, jax.random.key(0), X)
    graph = interop.trace((Mlp(), abstract), X, weights=tmp_path)
    assert {v.const_value.location for v in graph.model.graph.initializers.values()} == set(shards)
    reference = np.asarray(Mlp().apply(variables, X))
    np.testing.assert_allclose(graph.run(X), reference, atol=1e-5)
    loaded = interop.load(graph.save(tmp_path / "mlp.onnx", external_data=True))
    np.testing.assert_allclose(loaded.run(X), reference, atol=1e-5)


# ---------------------------------------------------------------------------- keras
def _keras(dtype=None):
    inputs = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="gelu", name="fc1", dtype=dtype)(inputs)
    h = keras.layers.LayerNormalization(name="ln", dtype=dtype)(h)
    h = keras.layers.BatchNormalization(name="bn", dtype=dtype)(h)
    outputs = keras.layers.Dense(4, name="fc2", dtype=dtype)(h)
    return keras.Model(inputs, outputs, name="mlp")


def _keras_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    for var in model.weights:
        var.assign(rng.uniform(0.5, 1.5, tuple(var.shape)).astype(var.dtype))
    return {var.path: np.asarray(keras.ops.convert_to_numpy(var.value)) for var in model.weights}


def test_keras_weights_are_read_only_by_save(tmp_path):
    reference = _keras()
    weights = _keras_weights(reference)
    with keras.StatelessScope(initialize_variables=False):
        abstract = _keras()
    assert all(var._value is None for var in abstract.weights)  # no storage
    counted = {name: Counted(array) for name, array in weights.items()}
    Counted.reads = 0
    graph = interop.trace(abstract, X, weights=counted)
    graph.summary(print_fn=None)
    assert Counted.reads == 0
    assert all(var._value is None for var in abstract.weights)  # still none
    assert set(graph.model.graph.initializers) >= set(weights)  # the Keras variable paths
    assert graph.count_params() == reference.count_params()
    graph.save(tmp_path / "m.onnx", external_data=True)
    assert Counted.reads == len(weights)
    loaded = interop.load(tmp_path / "m.onnx")
    np.testing.assert_allclose(loaded.run(X), np.asarray(reference(X)), atol=1e-5)


def test_keras_built_model_values_are_not_used(tmp_path):
    """A model built normally (its own random values) takes the file's weights; an
    unbuilt Sequential is built here without storage."""
    reference = _keras()
    file = _save(_keras_weights(reference), tmp_path / "model.safetensors")
    built = _keras()  # other (random) values
    graph = interop.trace(built, X, weights=file)
    np.testing.assert_allclose(graph.run(X), np.asarray(reference(X)), atol=1e-5)
    assert not np.allclose(np.asarray(built(X)), np.asarray(reference(X)), atol=1e-3)
    seq = keras.Sequential([keras.layers.Dense(4, name="a")], name="seq")
    kernel = np.arange(32, dtype=np.float32).reshape(8, 4) / 32
    graph = interop.trace(seq, X, weights={"seq/a/kernel": kernel, "seq/a/bias": np.ones(4, "f")})
    assert seq.built and all(var._value is None for var in seq.weights)
    np.testing.assert_allclose(graph.run(X), X @ kernel + 1, atol=1e-5)


def test_keras_bfloat16_weights_stay_bfloat16(tmp_path):
    reference = _keras("bfloat16")
    file = _save(_keras_weights(reference), tmp_path / "bf16.safetensors")
    with keras.StatelessScope(initialize_variables=False):
        abstract = _keras("bfloat16")
    graph = interop.trace(abstract, X, weights=file)
    kernel = graph.model.graph.initializers["fc1/kernel"]
    assert kernel.dtype == ir.DataType.BFLOAT16
    loaded = interop.load(graph.save(tmp_path / "out" / "bf16.onnx", external_data=True))
    assert loaded.model.graph.initializers["fc2/kernel"].dtype == ir.DataType.BFLOAT16
    # a float32 model given the bf16 file: each weight converted when read
    with keras.StatelessScope(initialize_variables=False):
        wide = _keras()
    graph = interop.trace(wide, X, weights=file, compute_dtype="float32")
    upcast = _keras()
    for var, ref in zip(upcast.weights, reference.weights, strict=True):
        var.assign(np.asarray(keras.ops.convert_to_numpy(ref.value)).astype(np.float32))
    np.testing.assert_allclose(graph.run(X), np.asarray(upcast(X)), atol=1e-5)


# ---------------------------------------------------------------------------- bad input
def _flax_cases(tmp_path):
    _, weights = _nnx()
    return lambda w: interop.trace(_abstract_nnx(), X, weights=w), weights, "blocks.1.up.kernel"


def _keras_cases(tmp_path):
    weights = _keras_weights(_keras())

    def trace(w):
        with keras.StatelessScope(initialize_variables=False):
            abstract = _keras()
        return interop.trace(abstract, X, weights=w)

    return trace, weights, "fc1/kernel"


@pytest.mark.parametrize("cases", [_flax_cases, _keras_cases], ids=["flax", "keras"])
def test_bad_weights_name_the_tensor_and_file(cases, tmp_path):
    trace, weights, name = cases(tmp_path)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    missing = dict(weights)
    del missing[name]
    file = _save(missing, folder / "model.safetensors")
    before = sorted(folder.iterdir())
    with pytest.raises(WeightsError, match=rf"no tensor '{name}'"):
        trace(file)
    assert sorted(folder.iterdir()) == before  # nothing written
    extra = {**weights, name + "_typo": weights[name]}
    with pytest.raises(WeightsError, match=rf"'{name}_typo' in '.*model.safetensors' \('{name}'"):
        trace(_save(extra, file))
    bad = {**weights, name: np.zeros((3, 3), np.float32)}
    with pytest.raises(
        WeightsError, match=rf"'{name}' in '.*model.safetensors' has shape \[3, 3\]"
    ):
        trace(_save(bad, file))
    half = {**weights, name: weights[name].astype(np.float16)}
    with pytest.raises(
        WeightsError, match=rf"'{name}' in '.*model.safetensors' is float16, .* is float32"
    ):
        trace(_save(half, file))
    truncated = _save(weights, file).read_bytes()[:-16]
    file.write_bytes(truncated)
    with pytest.raises(WeightsError, match=r"shard '.*model.safetensors' is truncated: tensor"):
        trace(file)
    assert sorted(folder.iterdir()) == before


def test_keras_hub_backbone_stays_without_storage(tmp_path):
    """keras_hub's layers are opened by symbolic calls, whose output-spec inference leaves
    a StatelessScope; the trace must not let that initialize the deferred variables."""
    keras_hub = pytest.importorskip("keras_hub")
    config = dict(vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                  hidden_dim=16, intermediate_dim=32)  # fmt: skip
    reference = keras_hub.models.LlamaBackbone(**config)
    file = _save(_keras_weights(reference), tmp_path / "model.safetensors")
    with keras.StatelessScope(initialize_variables=False):
        abstract = keras_hub.models.LlamaBackbone(**config)
    ids = (np.arange(8, dtype=np.int32) * 7 % 64).reshape(1, 8)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    graph = interop.trace(abstract, inputs, weights=file)
    assert all(var._value is None for var in abstract.weights)
    expected = np.asarray(reference(inputs))
    np.testing.assert_allclose(graph.run(inputs), expected, atol=1e-5)


def test_abstract_model_without_weights_is_an_error():
    """Not a graph of zeros or of random initial values: a TraceError saying to pass weights=."""
    flax_message = r"'blocks\.0\.down\.bias' has no value(?s:.*)pass weights="
    with pytest.raises(interop.errors.TraceError, match=flax_message):
        interop.trace(_abstract_nnx(), X)
    with keras.StatelessScope(initialize_variables=False):
        abstract = _keras()
    keras_message = r"have no value, e\.g\. 'fc1/kernel'(?s:.*)pass weights="
    with pytest.raises(interop.errors.TraceError, match=keras_message):
        interop.trace(abstract, X)


def test_compute_dtype_without_weights_is_an_error():
    model, _ = _nnx()
    with pytest.raises(WeightsError, match="compute_dtype= was given without weights="):
        interop.trace(model, X, compute_dtype="float32")
    with pytest.raises(WeightsError, match="compute_dtype= was given without weights="):
        interop.trace(_keras(), X, compute_dtype="float32")
