"""ONNX files from other tools (issue 17): old IR versions and opsets, weights as graph inputs,
weights computed by constant subgraphs, files of the TorchScript exporter and tf2onnx.

Every file is made here (no downloads). For each: `interop.load(f).run(x)` equals ONNX
Runtime on the original bytes, `to_torch` / `to_keras` / `to_flax` equal it too, their conv and
linear weights are native layers, and the emitted model takes exactly the real inputs.
"""

from __future__ import annotations

import inspect
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import interop
from interop.errors import UnsupportedOpError
from interop.interpret import evaluate

RTOL = ATOL = 1e-4
N = helper.make_node


def _ort(data: bytes, x: np.ndarray, **feeds: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x, **feeds})[0]


# ------------------------------------------------------------------ files
def legacy_cnn(opset: int, ir_version: int = 3) -> onnx.ModelProto:
    """A model-zoo style CNN: every initializer is a graph input too, one conv weight is
    computed from constants (ConstantOfShape or a Constant node, Shape, Reshape, Add,
    Identity), and one initializer is read by nothing."""
    rng = np.random.default_rng(opset)

    def f(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    inits = {
        "conv.W": f(4, 3, 3, 3),
        "conv.B": f(4),
        "bn.scale": 1 + f(4),
        "bn.bias": f(4),
        "bn.mean": f(4),
        "bn.var": np.abs(f(4)) + 0.5,
        "fc.W": f(10, 64),
        "fc.B": f(10),
        "w2_flat": f(16),
        "unused.W": f(3, 3),
    }
    half = np.full((4, 4, 1, 1), 0.5, np.float32)
    if opset >= 9:
        inits["w_shape"] = np.array(half.shape, np.int64)
        ones = N(
            "ConstantOfShape",
            ["w_shape"],
            ["ones"],
            value=numpy_helper.from_array(half[:1, 0, 0, 0]),
        )
    else:  # ConstantOfShape is opset 9
        ones = N("Constant", [], ["ones"], value=numpy_helper.from_array(half))
    nodes = [
        N("Conv", ["x", "conv.W", "conv.B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        N(
            "BatchNormalization",
            ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["b"],
            name="bn",
        ),
        N("Relu", ["b"], ["r"], name="relu"),
        ones,
        N("Shape", ["ones"], ["ones_shape"], name="shape"),
        N("Reshape", ["w2_flat", "ones_shape"], ["w2r"], name="reshape"),
        N("Add", ["w2r", "ones"], ["w2"], name="add_w"),
        N("Identity", ["w2"], ["w2i"], name="identity"),
        N("Conv", ["r", "w2i"], ["c2"], name="conv2"),
        N("MaxPool", ["c2"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        N("Flatten", ["p"], ["flat"], axis=1, name="flatten"),
        N("Gemm", ["flat", "fc.W", "fc.B"], ["y"], transB=1, name="fc"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])]
    inputs += [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for k, v in inits.items()
    ]
    graph = helper.make_graph(
        nodes,
        "legacy_cnn",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="handmade",
        producer_version="0.1",
    )
    model.ir_version = ir_version
    return model


def _torch_models():
    import torch

    class CNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4 * 4 * 4, 10)

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
            # the model zoo's flatten: Reshape to a shape computed from Shape(x)
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    cnn = CNN().eval()
    with torch.no_grad():
        cnn.bn.running_mean.uniform_(-0.5, 0.5)
        cnn.bn.running_var.uniform_(0.5, 1.5)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return {"cnn": (cnn, (2, 3, 8, 8)), "mlp": (mlp.eval(), (2, 6))}


def torchscript_file(kind: str, opset: int) -> bytes:
    import torch

    model, shape = _torch_models()[kind]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(*shape),),
            buffer,
            dynamo=False,
            opset_version=opset,
            keep_initializers_as_inputs=True,
            do_constant_folding=False,  # keeps BatchNormalization (folded into Conv otherwise)
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )
    return buffer.getvalue()


def tf2onnx_file() -> bytes:
    import keras
    import tensorflow as tf
    import tf2onnx

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    spec = (tf.TensorSpec((None, 8, 8, 3), tf.float32, name="x"),)
    # from_keras fails on Keras 3 models (tf2onnx 1.17: KeyError on the output names)
    function = tf.function(lambda x: model(x, training=False), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=13)
    return proto.SerializeToString()


FILES = {
    "legacy7": (lambda: legacy_cnn(7).SerializeToString(), (2, 3, 8, 8)),
    "legacy8": (lambda: legacy_cnn(8).SerializeToString(), (2, 3, 8, 8)),
    "legacy9": (lambda: legacy_cnn(9).SerializeToString(), (2, 3, 8, 8)),
    **{
        f"torch_{kind}{v}": ((lambda k=kind, o=v: torchscript_file(k, o)), shape)
        for kind, shape in (("cnn", (2, 3, 8, 8)), ("mlp", (2, 6)))
        for v in (9, 11, 13, 17)
    },
    "tf2onnx13": (tf2onnx_file, (2, 8, 8, 3)),
}
SLOW = {"torch_cnn11", "torch_cnn13", "torch_mlp11", "torch_mlp13", "legacy8", "tf2onnx13"}
PARAMS = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in FILES]
_CACHE: dict[str, tuple[bytes, np.ndarray, np.ndarray]] = {}


def case(name: str) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(file bytes, input, ONNX Runtime's output on the original bytes)."""
    if name not in _CACHE:
        make, shape = FILES[name]
        data = make()
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        _CACHE[name] = (data, x, _ort(data, x))
    return _CACHE[name]


# ------------------------------------------------------------------ load and run
@pytest.mark.parametrize("name", PARAMS)
def test_load_run_matches_onnxruntime(name, tmp_path):
    data, x, expected = case(name)
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    graph = interop.load(path)
    assert [s.name for s in graph.inputs] == ["x"]
    np.testing.assert_allclose(graph.run(x), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(graph.run({"x": x}), expected, rtol=RTOL, atol=ATOL)
    if name.startswith(("legacy", "torch")):  # keep_initializers_as_inputs: weights listed
        assert len(graph.weight_inputs) >= 4


@pytest.mark.parametrize("name", PARAMS)
def test_emitters_match_onnxruntime_with_native_layers(name):
    import torch
    from flax import nnx

    data, x, expected = case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy files' unused initializer
        module = interop.to_torch(data)
        keras_model = interop.to_keras(data)
        flax_module = interop.to_flax(data)
    assert list(inspect.signature(module.forward).parameters) == ["x"]
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    kinds = {type(m) for m in module.modules()}
    assert torch.nn.Linear in kinds
    if "mlp" not in name:
        assert torch.nn.Conv2d in kinds
    if name.startswith(("legacy", "torch_cnn")):
        assert torch.nn.BatchNorm2d in kinds

    assert list(keras_model.input_names) == ["x"]
    np.testing.assert_allclose(np.asarray(keras_model(x)), expected, rtol=RTOL, atol=ATOL)
    # a functional model (the computed Flatten shapes of tf2onnx and x.view(x.size(0), -1)
    # resolved to constants by interop.legacy.static_reshapes), with native layers
    assert len(keras_model.inputs) == 1
    layers = {type(layer).__name__ for layer in keras_model.layers}
    assert "Dense" in layers and ("mlp" in name or "Conv2D" in layers)

    assert tuple(flax_module.input_names) == ("x",)
    np.testing.assert_allclose(np.asarray(flax_module(x)), expected, rtol=RTOL, atol=ATOL)
    modules = {type(m) for _, m in nnx.iter_modules(flax_module)}
    assert nnx.Linear in modules and ("mlp" in name or nnx.Conv in modules)


def test_legacy_weights_are_not_inputs_but_overridable(tmp_path):
    proto = legacy_cnn(9)
    data = proto.SerializeToString()
    graph = interop.load(data)
    x = np.random.default_rng(2).standard_normal((3, 3, 8, 8)).astype(np.float32)
    names = {s.name for s in graph.weight_inputs}
    assert {"conv.W", "fc.W", "fc.B", "unused.W"} <= names and "x" not in names
    assert "x" in repr(graph) and "fc.W" not in repr(graph)
    # a weight given by name overrides the stored one (ONNX Runtime reads the file as IR 4)
    fc_b = np.full(10, 3.0, np.float32)
    overridden = graph.run(x, **{"fc.B": fc_b})
    as_ir4 = onnx.ModelProto.FromString(data)
    as_ir4.ir_version = 4
    expected = _ort(as_ir4.SerializeToString(), x, **{"fc.B": fc_b})
    np.testing.assert_allclose(overridden, expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(overridden - graph.run(x), expected - _ort(data, x), atol=1e-4)
    with pytest.raises(interop.errors.ShapeError, match="fc.B"):
        graph.run(x, **{"fc.B": np.zeros(3, np.float32)})
    with pytest.raises(interop.errors.ShapeError, match="Got 2 positional"):
        graph.run(x, x)
    # saving keeps the file as it was: weights still listed as inputs, IR version 3
    saved = onnx.load(str(graph.save(tmp_path / "again.onnx")))
    assert saved.ir_version == 3
    assert [v.name for v in saved.graph.input] == [v.name for v in proto.graph.input]


def test_unused_initializers_dropped_with_one_warning():
    with pytest.warns(UserWarning, match=r"1 initializer\(s\) that no node reads.*unused\.W"):
        module = interop.to_torch(legacy_cnn(9).SerializeToString())
    assert not any("unused" in name for name, _ in module.named_buffers())
    assert not any("unused" in name for name, _ in module.named_parameters())


def test_computed_flatten_shape_becomes_constant():
    from interop.normalize import as_model, normalize

    data, _, _ = case("torch_cnn17")
    reshapes = [n for n in normalize(as_model(data)).graph if n.op_type == "Reshape"]
    assert len(reshapes) == 1 and reshapes[0].inputs[1].const_value.numpy().tolist() == [0, -1]
    assert not [n for n in normalize(as_model(data)).graph if n.op_type == "Shape"]


# ------------------------------------------------------------------ the version converter's gaps
def _single(opset: int, nodes, x, inits=()):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4
    return model


X4 = np.random.default_rng(3).standard_normal((2, 3, 4, 4)).astype(np.float32)


def _scales(*values):
    return numpy_helper.from_array(np.array(values, np.float32), "s")


# measured with onnx 1.23's converter: Hardmax kept its axis across the 2-D coercion change
# of opset 13; Upsample / Resize-10 became Resize with half_pixel coordinates
CONVERTER_CASES = {
    "hardmax9_axis1": (9, [N("Hardmax", ["x"], ["y"], axis=1)], ()),
    "hardmax11_default": (11, [N("Hardmax", ["x"], ["y"])], ()),
    "upsample9_linear": (
        9,
        [N("Upsample", ["x", "s"], ["y"], mode="linear")],
        [_scales(1, 1, 1.5, 2.5)],
    ),
    "upsample7_linear": (
        7,
        [N("Upsample", ["x"], ["y"], scales=[1.0, 1.0, 2.0, 1.5], mode="linear")],
        (),
    ),
    "upsample9_nearest": (9, [N("Upsample", ["x", "s"], ["y"])], [_scales(1, 1, 1.5, 2.5)]),
    "resize10_linear": (
        10,
        [N("Resize", ["x", "s"], ["y"], mode="linear")],
        [_scales(1, 1, 1.5, 0.75)],
    ),
    "resize10_nearest_down": (10, [N("Resize", ["x", "s"], ["y"])], [_scales(1, 1, 0.6, 0.5)]),
    "softmax9_axis1": (9, [N("Softmax", ["x"], ["y"], axis=1)], ()),
    "logsoftmax9_axis2": (9, [N("LogSoftmax", ["x"], ["y"], axis=2)], ()),
    "pad2_reflect": (
        7,
        [N("Pad", ["x"], ["y"], pads=[0, 0, 1, 2, 0, 0, 2, 1], mode="reflect")],
        (),
    ),
    "slice1": (7, [N("Slice", ["x"], ["y"], starts=[1, 0], ends=[3, 100], axes=[2, 3])], ()),
    "clip6": (7, [N("Clip", ["x"], ["y"], min=-0.5, max=0.5)], ()),
    "split2": (9, [N("Split", ["x"], ["a", "y"], axis=1, split=[1, 2])], ()),
    "squeeze1": (
        9,
        [N("Unsqueeze", ["x"], ["u"], axes=[0]), N("Squeeze", ["u"], ["y"], axes=[0])],
        (),
    ),
    "reducemean1": (9, [N("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)], ()),
    "topk1": (9, [N("TopK", ["x"], ["y", "i"], k=2, axis=-1)], ()),
    "averagepool7": (
        7,
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        (),
    ),
    "dropout7": (7, [N("Dropout", ["x"], ["y"], ratio=0.3)], ()),
    "convtranspose1": (
        7,
        [N("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], output_padding=[1, 1])],
        [
            numpy_helper.from_array(
                np.linspace(-1, 1, 54, dtype=np.float32).reshape(3, 2, 3, 3), "w"
            )
        ],
    ),
    "gemm7_broadcast": (
        7,
        [
            N("Flatten", ["x"], ["f"]),
            N("Gemm", ["f", "w", "c"], ["y"], transB=1, alpha=0.5, beta=2.0),
        ],
        [
            numpy_helper.from_array(np.linspace(-1, 1, 192, dtype=np.float32).reshape(4, 48), "w"),
            numpy_helper.from_array(np.arange(4, dtype=np.float32), "c"),
        ],
    ),
    "batchnorm7": (
        7,
        [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
        [numpy_helper.from_array(np.linspace(0.5, 1.5, 3, dtype=np.float32), n) for n in "sbmv"],
    ),
}


@pytest.mark.parametrize("name", list(CONVERTER_CASES))
def test_old_opsets_mean_what_onnxruntime_computes(name):
    opset, nodes, inits = CONVERTER_CASES[name]
    model = _single(opset, nodes, X4, inits)
    expected = _ort(model.SerializeToString(), X4)
    np.testing.assert_allclose(evaluate(model, X4)[0], expected, rtol=RTOL, atol=ATOL)


def test_old_resize_rounding_per_axis_is_refused():
    model = _single(
        10, [N("Resize", ["x", "s"], ["y"], name="up_down")], X4, [_scales(1, 1, 1.7, 0.6)]
    )
    with pytest.raises(UnsupportedOpError, match=r"(?s)Resize.*up_down.*opset 11 or newer"):
        evaluate(model, X4)


# ------------------------------------------------------------------ bad input
def test_unemittable_file_names_node_op_opset_and_producer():
    graph = helper.make_graph(
        [
            N("Relu", ["x"], ["r"], name="relu"),
            N(
                "TfIdfVectorizer",
                ["r"],
                ["y"],
                name="tfidf",
                mode="TF",
                min_gram_length=1,
                max_gram_length=1,
                max_skip_count=0,
                ngram_counts=[0],
                ngram_indexes=[0],
                pool_int64s=[1],
            ),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 9)],
        producer_name="oldtool",
        producer_version="2.1",
    )
    with pytest.raises(UnsupportedOpError) as info:
        interop.to_torch(model.SerializeToString())
    message = str(info.value)
    for part in ("'TfIdfVectorizer'", "node 'tfidf'", "opset 9", "oldtool 2.1", "Fix: re-export"):
        assert part in message, message


# ------------------------------------------------------------------ the exporter sweep, sampled
def _sweep():
    """tools/sweep_onnx_files.py as a module (tools/ is not a package)."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "sweep_onnx_files.py"
    if "sweep_onnx_files" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sweep_onnx_files", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sweep_onnx_files"] = module
        spec.loader.exec_module(module)
    return sys.modules["sweep_onnx_files"]


# cases of the sweep (the full sweep: the script); the dynamo exporter and jax2onnx take
# 10-30 s to load their registries on a first call, so their cases are slow ones
SWEEP_SAMPLE = [
    ("mobilenet_depthwise", "torchscript", 9),
    ("gru_bidirectional", "torchscript", 13),
    ("keras_cnn_separable", "tf2onnx", 15),
    ("zoo_cnn", "ir3", 8),
]
SWEEP_SLOW = [
    ("bert_tiny", "torchscript", 13),
    ("gpt2_tiny", "dynamo", None),
    ("resnet_blocks", "dynamo", None),
    ("flax_cnn", "jax2onnx", None),
]


def _sweep_case(arch, exporter, opset):
    sweep = _sweep()
    data, inputs = sweep.make_file(arch, exporter, opset)
    cells = sweep.check_file(data, inputs)
    failed = {k: v for k, v in cells.items() if k in sweep.CHECKS and not v.startswith("ok")}
    assert not failed, failed
    assert set(sweep.CHECKS) <= cells.keys()


@pytest.mark.parametrize(("arch", "exporter", "opset"), SWEEP_SAMPLE)
def test_sweep_sample_matches_onnxruntime(arch, exporter, opset):
    """load().run and the three emitters equal ONNX Runtime within rtol/atol 1e-4."""
    _sweep_case(arch, exporter, opset)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter", "opset"), SWEEP_SLOW)
def test_sweep_slow_cases_match_onnxruntime(arch, exporter, opset):
    """A TorchScript BERT (its untyped mask chain once made to_torch exponential), a dynamo
    GPT-2 and ResNet, a jax2onnx CNN."""
    _sweep_case(arch, exporter, opset)


# ------------------------------------------------------------------ torch direct calls
def _resize_file(scales, **attributes):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 6, 8])
    nodes = [
        N("Slice", ["x", "starts", "ends", "axes", "steps"], ["s"], name="slice"),
        N("Resize", ["s", "", "scales"], ["y"], name="resize", **attributes),
    ]
    inits = [
        numpy_helper.from_array(np.array(v, dtype), name)
        for name, v, dtype in [("starts", [0, -7], np.int64), ("ends", [2, 2**62], np.int64),
                               ("axes", [1, 3], np.int64), ("steps", [1, 2], np.int64),
                               ("scales", scales, np.float32)]
    ]  # fmt: skip
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return model.SerializeToString()


@pytest.mark.parametrize(
    ("scales", "attributes", "direct"),
    [
        ([1, 1, 2, 2], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                        "nearest_mode": "floor"}, True),
        ([1, 1, 2, 4], {"mode": "linear"}, True),
        ([1, 1, 0.5, 0.5], {"mode": "linear"}, True),
        ([1, 1, 2, 2], {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, True),
        ([1, 1, 0.5, 0.5], {"mode": "linear",
                            "coordinate_transformation_mode": "pytorch_half_pixel"}, False),
        ([1, 1, 3, 3], {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                        "nearest_mode": "floor"}, False),
        ([1, 1, 2, 2], {"mode": "nearest"}, False),
    ],
)  # fmt: skip
def test_torch_slice_and_resize_are_direct_calls(scales, attributes, direct):
    """Constant Slice -> x[a:b:c]; Resize by power-of-two scales -> F.interpolate (what
    onnx2torch emits); other Resizes stay the generic op. All equal ONNX Runtime."""
    import torch

    data = _resize_file(scales, **attributes)
    x = np.random.default_rng(3).standard_normal((2, 3, 6, 8)).astype(np.float32)
    module = interop.to_torch(data)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _ort(data, x), rtol=1e-5, atol=1e-6)
    assert "interop_interpret_onnx_Slice" not in module.code
    assert ("interpolate" in module.code) == direct
    assert ("interop_interpret_onnx_Resize" in module.code) != direct


def test_keras_builds_native_layers_for_a_torchscript_mobilenet():
    """The TorchScript exporter shares equal tensors through Identity (the zero biases of
    BatchNorm-folded convolutions): folded per reader, every conv is a native Keras layer,
    and Clip(0, 6) / HardSwish ride on the convolutions as relu6 / hard_swish."""
    sweep = _sweep()
    data, inputs = sweep.make_file("mobilenet_depthwise", "torchscript", 17)
    assert any(n.op_type == "Identity" for n in onnx.load_from_string(data).graph.node)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = interop.to_keras(data)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Conv2D") == 3 and kinds.count("DepthwiseConv2D") == 2
    activations = [
        layer.activation.__name__ for layer in model.layers if "Conv" in type(layer).__name__
    ]
    assert activations == ["hard_silu", "relu6", "relu6", "relu6", "relu6"]  # Keras: hard_swish
    ops = [getattr(layer, "op_type", None) for layer in model.layers]
    assert "Conv" not in ops and "Clip" not in ops and "HardSwish" not in ops
    expected = sweep.onnxruntime_outputs(data, inputs)[0]
    np.testing.assert_allclose(np.asarray(model(inputs[0])), expected, rtol=RTOL, atol=ATOL)
