"""Every error of interop.errors, raised on real bad input with an actionable message."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import interop
from interop.errors import DeviceError, LayerNotFoundError, ModelLoadError, ShapeError, TraceError


class CumMaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cummax(self.proj(x), dim=1)[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), CumMaxHead())

    def forward(self, x):
        return self.body(x)


def test_unsupported_op_names_op_layer_location_and_fix():
    with pytest.raises(interop.UnsupportedOpError) as info:
        interop.trace(Net(), (torch.randn(2, 4),))
    err = info.value
    assert err.op == "aten::cummax"
    assert err.layer == "body.1"
    assert err.location is not None and err.location.startswith(__file__)
    assert int(err.location.rsplit(":", 1)[1]) == 24  # the torch.cummax line above
    text = str(err)
    assert "register_op(torch.ops.aten.cummax.default)" in text and "body.1" in text
    assert "Traceback" not in text


class BesselI0(nn.Module):
    def forward(self, x):
        return torch.i0(x)  # decomposes into prims::bessel_i0, which torch.onnx lacks


def bessel_i0(x):
    """I0(x) = sum_k ((x/2)^2k / (k!)^2): 30 terms are exact in float32 for |x| < 10."""
    from onnxscript import opset18 as op

    quarter_square = op.Mul(op.Mul(x, x), op.CastLike(op.Constant(value_float=0.25), x))
    term = op.CastLike(op.Constant(value_float=1.0), x)
    total = term
    for k in range(1, 30):
        term = op.Mul(
            term, op.Div(quarter_square, op.CastLike(op.Constant(value_float=float(k * k)), x))
        )
        total = op.Add(total, term)
    return total


def test_unsupported_op_can_be_registered():
    from interop.adapters.torch import CAPTURE_OPS, register_op

    x = torch.randn(3, 4) * 2
    with pytest.raises(interop.UnsupportedOpError, match="prims::bessel_i0"):
        interop.trace(BesselI0(), (x,))
    register_op(torch.ops.prims.bessel_i0.default, bessel_i0)
    try:
        graph = interop.trace(BesselI0(), (x,))
        np.testing.assert_allclose(graph.run(x), torch.i0(x).numpy(), rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="already registered"):
            register_op(torch.ops.prims.bessel_i0.default, bessel_i0)
    finally:
        CAPTURE_OPS._entries.pop("prims::bessel_i0")


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_data_dependent_branch_is_a_trace_error_with_a_fix(sign):
    """torch.export stops at the branch; the TorchScript fallback is refused: its tracer
    turned a tensor into a Python bool, so inputs of the example's shape with other values
    (negated among them) are checked too, and one takes the other branch."""
    with pytest.raises(TraceError) as info:
        interop.trace(DataDependent(), (sign * torch.ones(2, 3),))
    text = str(info.value)
    assert "DataDependent" in text and "torch.cond" in text
    assert "TorchScript exporter: refused" in text and "does not reproduce" in text
    assert "test_errors.py:87" in text  # the line of the branch
    assert info.value.__suppress_context__  # no torch traceback chained in the report


class FixedBatch(nn.Module):
    def forward(self, x):
        return x.reshape(2, -1)


def test_specialised_dynamic_dim_is_explained():
    """The batch torch.export fixes is declared static with a warning naming the line
    (the declared-dim check); with the check off it is an error naming the fix."""
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"'batch'.*does not hold.*test_errors.py:\d+"):
        graph = interop.trace(FixedBatch(), (x,))
    assert graph.inputs[0].shape == (2, 3)
    np.testing.assert_allclose(graph.run(x.numpy()), FixedBatch()(x).numpy(), rtol=1e-6)
    with pytest.raises(TraceError, match="dynamic_batch=False"):
        interop.trace(FixedBatch(), (x,), check_dims=False)
    graph = interop.trace(FixedBatch(), (x,), dynamic_batch=False)
    assert graph.inputs[0].shape == (2, 3)


def test_bad_example_inputs():
    with pytest.raises(TraceError, match="do not fit"):
        interop.trace(nn.Linear(3, 2), (torch.randn(2, 3), torch.randn(2, 3)))
    with pytest.raises(TraceError, match="not tensor arguments"):
        interop.trace(nn.Linear(3, 2), (torch.randn(2, 3),), dynamic_dims={"y": {1: "n"}})
    with pytest.raises(interop.InteropError, match="example inputs"):
        interop.trace(nn.Linear(3, 2))


class Unflattenable(nn.Module):
    def forward(self, x):
        return {"x": x, "note": object()}


def test_unflattenable_output_is_a_trace_error():
    with pytest.raises(TraceError, match="note"):
        interop.trace(Unflattenable(), (torch.randn(2, 3),))


def test_unknown_model_type_lists_supported():
    with pytest.raises(TypeError) as info:
        interop.trace(object(), (np.zeros(3),))
    assert isinstance(info.value, interop.UnsupportedModelError)
    assert "torch.nn.Module" in str(info.value) and "builtins.object" in str(info.value)


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory):
    torch.manual_seed(0)
    graph = interop.trace(
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), (torch.randn(2, 4),)
    )
    path = tmp_path_factory.mktemp("model") / "mlp.onnx"
    graph.save(path)
    return graph, path


def test_corrupt_and_truncated_files(graph_file, tmp_path):
    _, path = graph_file
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    for cut in (len(data) // 2, len(data) - 7, 10, 1):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError):
            interop.load(bad)
    with pytest.raises(ModelLoadError, match="not a valid ONNX model|no graph"):
        interop.load(rng.bytes(4096))
    with pytest.raises(ModelLoadError, match="No model file"):
        interop.load(tmp_path / "missing.onnx")
    with pytest.raises(ModelLoadError, match="Cannot load"):
        interop.load(12345)


def _external_model(location: str) -> onnx.ModelProto:
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[weight],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(_external_model(location).SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        interop.load(folder / "m.onnx")


def test_external_data_symlink_escape_missing_and_short(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    folder = tmp_path / "model"
    folder.mkdir()
    os.symlink(tmp_path / "secret.bin", folder / "link.bin")
    (folder / "m.onnx").write_bytes(_external_model("link.bin").SerializeToString())
    with pytest.raises(ModelLoadError, match="resolves outside"):
        interop.load(folder / "m.onnx")
    (folder / "m.onnx").write_bytes(_external_model("weights.bin").SerializeToString())
    with pytest.raises(ModelLoadError, match="'w' is missing"):
        interop.load(folder / "m.onnx")
    (folder / "weights.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="too short for tensor 'w'"):
        interop.load(folder / "m.onnx")
    (folder / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    graph = interop.load(folder / "m.onnx")
    np.testing.assert_array_equal(graph.run(np.ones(4, np.float32)), [1, 2, 3, 4])
    with pytest.raises(ModelLoadError, match="external data"):
        interop.load((folder / "m.onnx").read_bytes())  # bytes have no folder to resolve against


def test_hostile_structure(graph_file):
    graph, _ = graph_file
    proto = graph.to_proto()
    dangling = onnx.ModelProto()
    dangling.CopyFrom(proto)
    dangling.graph.node[0].input[0] = "nowhere"
    with pytest.raises(ModelLoadError, match="nowhere"):
        interop.load(dangling)
    huge = onnx.ModelProto()
    huge.CopyFrom(proto)
    huge.graph.initializer[0].ClearField("raw_data")
    del huge.graph.initializer[0].dims[:]
    huge.graph.initializer[0].dims.extend([1 << 20, 1 << 20])
    with pytest.raises(ModelLoadError, match="carries no data"):
        interop.load(huge)
    duplicate = onnx.ModelProto()
    duplicate.CopyFrom(proto)
    duplicate.graph.node[1].output[0] = duplicate.graph.node[0].output[0]
    with pytest.raises(ModelLoadError, match="produced twice"):
        interop.load(duplicate)
    cyclic = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])],
            "cycle",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        )  # fmt: skip
    )
    with pytest.raises(ModelLoadError, match="cycle"):
        interop.load(cyclic)


def test_run_checks_inputs(graph_file):
    graph, _ = graph_file
    with pytest.raises(ShapeError, match="rank 1"):
        graph.run(np.zeros(4, np.float32))
    with pytest.raises(ShapeError, match="size 5 on axis 1"):
        graph.run(np.zeros((2, 5), np.float32))
    with pytest.raises(ShapeError, match="dtype"):
        graph.run(np.array([["a"] * 4]))
    with pytest.raises(ShapeError, match="Missing input"):
        graph.run()
    with pytest.raises(ShapeError, match="Unknown input"):
        graph.run(nope=np.zeros((1, 4), np.float32))
    assert graph.run(np.zeros((3, 4), np.float64)).dtype == np.float32  # same family: cast


def test_cuda_without_gpu_is_a_clear_error(graph_file):
    graph, _ = graph_file
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a CUDA execution provider is present here")
    with pytest.raises(DeviceError, match="onnxruntime-gpu"):
        graph.run(np.zeros((1, 4), np.float32), device="cuda")
    assert graph.run(np.zeros((1, 4), np.float32), device="auto").shape == (1, 2)
    with pytest.raises(DeviceError, match="Unknown device"):
        graph.run(np.zeros((1, 4), np.float32), device="tpu")


def test_missing_layer_is_a_key_error(graph_file):
    graph, _ = graph_file
    with pytest.raises(KeyError):
        graph.layer("nope")
    with pytest.raises(LayerNotFoundError, match="neither a layer"):
        graph.submodel(outputs=["nope"])


def test_from_config_rejects_other_dicts():
    with pytest.raises(ModelLoadError, match="not an interop graph config"):
        interop.Graph.from_config({"format": "keras"})
