"""A declared dynamic dimension must hold (issue 22): interop.dim_check and its torch and
Flax hooks. A model that bakes the batch size comes out with a static dim and a warning
naming the source line; a normal model keeps its dynamic dims and passes the check."""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
import pytest

import interop
from interop import dim_check
from interop.errors import TraceError
from interop.graph import Graph

RS = np.random.RandomState(0)


def _reshape_graph(target: list[int]) -> Graph:
    """x: (batch, 4) -> Reshape(x, target): a graph whose shape constant may be baked."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array(target, np.int64), name="shape"))
    node = ir.node("Reshape", [x, shape], name="flatten")
    node.metadata_props[interop.provenance.SCOPE] = "flat"
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", x.type, ir.Shape(["batch", 4])
    graph = ir.Graph([x], [y], nodes=[node], initializers=[shape], opset_imports={"": 21})
    return Graph(ir.Model(graph, ir_version=10))


def _flatten_rows(feeds: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    x = feeds["x"]
    return [("y", x.reshape(len(x), -1))]


def test_core_check_declares_a_baked_dim_static_and_names_the_layer():
    x = RS.rand(2, 4).astype("float32")
    baked = _reshape_graph([2, -1])  # runs at batch 3 only as (2, 6): another shape
    with pytest.warns(UserWarning, match="'batch' does not hold") as record:
        g = dim_check.check_dims(baked, _flatten_rows, {"x": x}, source="test model")
    text = str(record[0].message)
    assert "at batch=3" in text and "layer 'flat'" in text and "of size 2" in text, text
    assert g.inputs[0].shape == (2, 4) and g.outputs[0].shape == (2, 4)
    np.testing.assert_array_equal(g.run(x), x)


def test_core_check_keeps_a_dim_that_holds(recwarn):
    g = _reshape_graph([0, -1])
    x = RS.rand(2, 4).astype("float32")
    assert dim_check.check_dims(g, _flatten_rows, {"x": x}, source="m") is g
    assert g.inputs[0].shape == ("batch", 4)
    assert not [w for w in recwarn if "does not hold" in str(w.message)]


def test_core_check_blames_no_dim_of_a_graph_wrong_at_the_example(recwarn):
    g = _reshape_graph([2, -1])

    def doubled(feeds):
        return [("y", 2 * feeds["x"])]

    x = RS.rand(2, 4).astype("float32")
    assert dim_check.check_dims(g, doubled, {"x": x}, source="m").inputs[0].shape[0] == "batch"
    assert not [w for w in recwarn if "does not hold" in str(w.message)]


def test_second_sizes_repeat_the_example_so_token_ids_stay_in_range():
    ids = np.array([[5, 9, 2]])
    assert dim_check._resized(ids, 1, 5).tolist() == [[5, 9, 2, 5, 9]]
    assert dim_check._resized(ids, 1, 2).tolist() == [[5, 9]]
    assert dim_check.second_sizes(1) == [2] and dim_check.second_sizes(4) == [5, 3]


# ---------------------------------------------------------------------------- torch
torch = pytest.importorskip("torch")


class _BakedTorch(torch.nn.Module):
    """Reshapes to a batch size held as a Python int (set from the example at build)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.batch = batch

    def forward(self, x):
        return self.fc(x).reshape(self.batch, -1) * torch.ones(self.batch, 1)


class _NormalTorch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc(y).reshape(x.shape[0], -1)


def test_torch_module_that_bakes_the_batch_gets_a_static_dim_and_a_warning():
    module = _BakedTorch(2).eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="'batch'.*does not hold") as record:
        g = interop.trace(module, (x,))
    text = " ".join(str(w.message) for w in record)
    assert "test_dim_check.py" in text and "reshape(self.batch" in text, text
    assert g.inputs[0].shape == (2, 8)
    with torch.no_grad():
        np.testing.assert_allclose(g.run(x.numpy()), module(x).numpy(), rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings(record=True) as off:  # the check off: no such warning
        warnings.simplefilter("always")
        try:
            interop.trace(module, (x,), check_dims=False)
        except TraceError:
            pass  # torch.export's own error (or the capture's fallback, where it has one)
    assert not [w for w in off if "does not hold" in str(w.message)]


def test_torch_module_that_holds_keeps_its_dynamic_dims(recwarn):
    module = _NormalTorch().eval()
    x = torch.randn(2, 3, 6, 6)
    g = interop.trace(module, (x,), dynamic_dims={"x": {2: "h", 3: "w"}})
    assert g.inputs[0].shape == ("batch", 3, "h", "w")
    assert not [w for w in recwarn if "does not hold" in str(w.message)]
    other = torch.randn(5, 3, 7, 4)
    with torch.no_grad():
        np.testing.assert_allclose(g.run(other.numpy()), module(other).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------- nnx
nnx = pytest.importorskip("flax.nnx")
jnp = pytest.importorskip("jax.numpy")


class _BakedNnx(nnx.Module):
    def __init__(self) -> None:
        self.fc = nnx.Linear(8, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        return self.fc(x) * jnp.arange(2.0)[:, None]  # a constant sized as the example batch


class _NormalNnx(nnx.Module):
    def __init__(self) -> None:
        self.fc = nnx.Linear(8, 4, rngs=nnx.Rngs(0))

    def __call__(self, x):
        b, s = x.shape[0], x.shape[1]
        return nnx.relu(self.fc(x)).reshape(b, s * 4) + jnp.arange(s * 4, dtype=x.dtype)


def test_nnx_module_that_bakes_the_batch_gets_a_static_dim_and_a_warning():
    module = _BakedNnx()
    x = RS.rand(2, 8).astype("float32")
    with pytest.warns(UserWarning, match="'batch' does not hold") as record:
        g = interop.trace(module, x)
    text = " ".join(str(w.message) for w in record)
    assert "test_dim_check.py" in text and "self.fc(x) * jnp.arange" in text, text
    assert g.inputs[0].shape == (2, 8)
    np.testing.assert_allclose(g.run(x), np.asarray(module(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(TraceError):
        interop.trace(module, x, check_dims=False)


def test_nnx_module_that_holds_keeps_its_dynamic_dims(recwarn):
    module = _NormalNnx()
    x = RS.rand(2, 3, 8).astype("float32")
    g = interop.trace(module, x, dynamic_dims={"x": {1: "seq"}})
    assert g.inputs[0].shape == ("batch", "seq", 8)
    assert not [w for w in recwarn if "does not hold" in str(w.message)]
    other = RS.rand(4, 5, 8).astype("float32")
    np.testing.assert_allclose(g.run(other), np.asarray(module(other)), rtol=1e-5, atol=1e-6)
