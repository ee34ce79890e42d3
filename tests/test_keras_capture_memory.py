"""Keras capture holds no second copy of the weights (issue 20, "Keras capture memory").

On the TensorFlow backend an initializer's array is a read of the variable's own buffer:

- it shares memory with the variable (no copy), and is read-only (nothing writes into the
  model through the graph);
- assigning the variable afterwards (assign, assign_add, a training step) leaves the graph
  as captured: TensorFlow copies the buffer on write while a read of it is alive, so the
  graph still computes the traced model's outputs (rtol 1e-5 against Keras at capture);
- the dynamic-dim check's ONNX Runtime session takes the large initializers as OrtValues
  over those same arrays (`interop.weightless.session`) and computes what the graph does;
- the shape correction's proto carries no weight bytes (`weightless.data_elided`).

Peak RSS is measured by tools/scale_flax_keras.py (docs/performance.md, "Keras capture
memory"), not here: a process's peak is not a unit test's to assert.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

keras = pytest.importorskip("keras")

import interop  # noqa: E402
from interop import weightless  # noqa: E402

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's copy-on-write reads"
)


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, name="up"), keras.layers.Dense(8, name="down")]
    )


def _kernel(g: interop.Graph) -> ir.Value:
    return next(v for n, v in g.model.graph.initializers.items() if n.endswith("up/kernel"))


def test_initializers_share_the_variables_buffers_read_only() -> None:
    model = _model()
    g = interop.trace(model, np.zeros((2, 64), np.float32))
    array = _kernel(g).const_value.numpy()
    read = np.asarray(model.layers[0].kernel.value.read_value())
    assert array.shape == (64, 128)
    assert np.shares_memory(array, read)  # one buffer: the variable's
    assert not array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        array[0, 0] = 1.0


def test_the_graph_keeps_the_traced_values_when_the_model_changes() -> None:
    model = _model()
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    g = interop.trace(model, x)
    want = np.asarray(model(x))
    kernel = model.layers[0].kernel
    kernel.assign_add(np.ones(kernel.shape, np.float32))
    model.layers[1].kernel.assign(np.zeros(model.layers[1].kernel.shape, np.float32))
    model.compile("sgd", "mse")
    model.fit(x, np.ones((3, 8), np.float32), epochs=1, verbose=0)
    assert not np.allclose(np.asarray(model(x)), want, atol=1e-3)  # the model moved on
    np.testing.assert_allclose(g.run(x), want, rtol=1e-5, atol=1e-5)  # the graph did not


def test_check_session_reads_the_graphs_arrays() -> None:
    model = _model()
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    g = interop.trace(model, x)
    session = weightless.session(g)
    shared = session._interop_shared
    name = str(_kernel(g).name)
    assert name in shared
    assert np.shares_memory(shared[name].numpy(), _kernel(g).const_value.numpy())
    [got] = session.run(None, {g.model.graph.inputs[0].name: x})
    np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-5, atol=1e-5)


def test_shape_inference_proto_carries_no_weights() -> None:
    g = interop.trace(_model(), np.zeros((1, 64), np.float32))
    with weightless.data_elided(g.model):
        proto = ir.serde.serialize_model(g.model)
    big = [t for t in proto.graph.initializer if np.prod(t.dims) > 1024]
    assert [t.name for t in big] == [str(_kernel(g).name)]
    assert all(not t.raw_data for t in big)
    assert _kernel(g).const_value.numpy().shape == (64, 128)  # restored after
