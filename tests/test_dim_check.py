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
    assert "shape inference: Reshape of layer 'flat' makes it 2" in text, text
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


def test_symbolic_findings_name_the_layer_of_a_baked_reshape():
    definite = dim_check.symbolic_findings(_reshape_graph([2, 4]).model, {"batch": 2})
    [finding] = definite["batch"]  # its output's 2 is the Reshape's, not news
    assert finding.text == "Reshape of layer 'flat' makes it 2" and finding.definite
    # a -1 takes the batch's elements: a likely cause, made a proof by the graph output
    # that is declared 'batch' and comes out 2
    hidden = _reshape_graph([2, -1])
    [finding] = dim_check.symbolic_findings(hidden.model, {"batch": 2})["batch"]
    assert finding.text == "Reshape of layer 'flat' makes it 2" and finding.definite
    hidden.model.graph.outputs[0].shape = ir.Shape([None, 4])  # declares nothing: likely only
    [finding] = dim_check.symbolic_findings(hidden.model, {"batch": 2})["batch"]
    assert not finding.definite
    assert dim_check.symbolic_findings(_reshape_graph([0, -1]).model, {"batch": 2}) == {}
    assert dim_check.symbolic_findings(_reshape_graph([2, 4]).model, {"batch": 3}) == {}


def test_a_proof_decides_where_the_source_runs_no_other_size(recwarn):
    x = RS.rand(2, 4).astype("float32")

    def example_only(feeds):  # a source that runs at the example's size alone
        if feeds["x"].shape != (2, 4):
            raise ValueError("a position table of 2 rows")
        return _flatten_rows(feeds)

    with pytest.warns(UserWarning, match="'batch' does not hold") as record:
        g = dim_check.check_dims(_reshape_graph([2, 4]), example_only, {"x": x}, source="m")
    assert "Reshape of layer 'flat' makes it 2" in str(record[0].message)
    assert g.inputs[0].shape == (2, 4)
    # a likely cause alone (a -1 in the target) declares nothing: there is no proof
    likely = _reshape_graph([2, -1])
    likely.model.graph.outputs[0].shape = ir.Shape([None, 4])
    assert dim_check.check_dims(likely, example_only, {"x": x}, source="m") is likely
    assert likely.inputs[0].shape == ("batch", 4)
    assert not [w for w in recwarn if "does not hold" in str(w.message)]


def test_a_passing_run_overrules_a_finding(recwarn):
    """A Reshape whose target 2 is not the batch's (4 features split 2 x 2): the -1 holds
    the batch, the run passes, the dim stays dynamic."""
    x = ir.Value(name="x", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    shape = ir.Value(name="s", const_value=ir.tensor(np.array([-1, 2, 2], np.int64), name="s"))
    node = ir.node("Reshape", [x, shape])
    y = node.outputs[0]
    y.name, y.type, y.shape = "y", x.type, ir.Shape(["batch", 2, 2])
    g = Graph(ir.Model(ir.Graph([x], [y], nodes=[node], initializers=[shape], opset_imports={"": 21}), ir_version=10))  # fmt: skip
    feeds = {"x": RS.rand(2, 4).astype("float32")}
    out = dim_check.check_dims(g, lambda f: [("y", f["x"].reshape(-1, 2, 2))], feeds, source="m")
    assert out is g and g.inputs[0].shape == ("batch", 4)
    assert not [w for w in recwarn if "does not hold" in str(w.message)]


def _assert_no_findings(g: Graph, feeds: dict[str, np.ndarray], telling: bool = True) -> None:
    """Shape inference runs on the graph, carries each declared dim of an output through
    from the inputs where `telling` (not blank), and finds nothing to warn about."""
    where = dim_check.dynamic_axes(g.model.graph)
    sizes = {name: feeds[i].shape[axis] for name, [(i, axis), *_] in where.items()}
    shapes = dim_check._inferred_shapes(g.model)
    assert shapes is not None
    checked = 0
    for out in g.model.graph.outputs:
        for declared, dim in zip(out.shape, shapes[str(out.name)], strict=True):
            for name in sizes:
                if isinstance(declared, ir.SymbolicDim) and dim_check._carries(declared.value, name):  # fmt: skip
                    # ONNX inference does no arithmetic: '4*seq' comes out unknown
                    exact = telling and declared.value == name
                    assert not exact or dim_check._carries(dim, name), (out, dim)
                    assert not isinstance(dim, int), (out, dim)  # unknown at worst
                    checked += 1
    assert checked
    assert dim_check.symbolic_findings(g.model, sizes) == {}


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
    _assert_no_findings(g, {"x": x.numpy()})
    other = torch.randn(5, 3, 7, 4)
    with torch.no_grad():
        np.testing.assert_allclose(g.run(other.numpy()), module(other).numpy(), atol=1e-5)


def test_tiny_hf_bert_keeps_its_dims_and_inference_finds_nothing(recwarn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    g = interop.trace(model, inputs, dynamic_dims=dims)
    assert g.inputs[0].shape == ("batch", "seq")
    assert not [w for w in recwarn if "does not hold" in str(w.message)]
    # ONNX inference loses the dims at the token-type embedding's Expand (an unknown
    # dim met in a broadcast is unknown after it): unknown dims, never numbers
    _assert_no_findings(g, {k: v.numpy() for k, v in inputs.items()}, telling=False)


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
    _assert_no_findings(g, {"x": x})
    other = RS.rand(4, 5, 8).astype("float32")
    np.testing.assert_allclose(g.run(other), np.asarray(module(other)), rtol=1e-5, atol=1e-6)


def test_nnx_mlp_inference_finds_nothing(recwarn):
    rngs = nnx.Rngs(0)
    mlp = nnx.Sequential(nnx.Linear(8, 16, rngs=rngs), nnx.relu, nnx.Linear(16, 4, rngs=rngs))
    x = RS.rand(2, 8).astype("float32")
    g = interop.trace(mlp, x)
    assert g.inputs[0].shape[0] == "batch"
    assert not [w for w in recwarn if "does not hold" in str(w.message)]
    _assert_no_findings(g, {str(g.model.graph.inputs[0].name): x})


# ---------------------------------------------------------------------------- keras
def test_keras_functional_model_inference_finds_nothing(recwarn):
    keras = pytest.importorskip("keras")
    inp = keras.Input((12, 8), name="x")
    h = keras.layers.Conv1D(16, 3, padding="same", activation="relu")(inp)
    h = keras.layers.Reshape((-1,))(h)
    out = keras.layers.Dense(4)(keras.layers.Dropout(0.1)(h))
    model = keras.Model(inp, out)
    x = RS.rand(2, 12, 8).astype("float32")
    g = interop.trace(model, x)
    assert g.inputs[0].shape[0] == "batch"
    assert not [w for w in recwarn if "does not hold" in str(w.message)]
    _assert_no_findings(g, {str(g.model.graph.inputs[0].name): x})


def _independent_leading_sizes(graph: Graph, run_source) -> None:
    """x (4, 16) beside a vector of 8: one "batch" name would claim the two sizes equal."""
    (x_spec, s_spec) = graph.inputs
    assert x_spec.shape == ("batch", 16)
    assert s_spec.shape == ("batch_scale",)
    x, s = RS.rand(3, 16).astype("float32"), RS.rand(5).astype("float32")
    np.testing.assert_allclose(graph.run(x, s), run_source(x, s), rtol=1e-5, atol=1e-5)


def test_torch_inputs_of_unequal_leading_sizes_get_their_own_dims(recwarn):
    import torch

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x, scale):
            return self.fc(x) * scale.sum()

    module = Scaled()
    graph = interop.trace(module, (torch.randn(4, 16), torch.randn(8)))
    with torch.no_grad():
        _independent_leading_sizes(
            graph, lambda x, s: module(torch.from_numpy(x), torch.from_numpy(s)).numpy()
        )


def test_nnx_inputs_of_unequal_leading_sizes_get_their_own_dims(recwarn):
    from flax import nnx

    class Scaled(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(16, 16, rngs=nnx.Rngs(0))

        def __call__(self, x, scale):
            return self.fc(x) * scale.sum()

    module = Scaled()
    graph = interop.trace(module, (RS.rand(4, 16).astype("float32"), RS.rand(8).astype("float32")))
    _independent_leading_sizes(graph, lambda x, s: np.asarray(module(x, s)))
