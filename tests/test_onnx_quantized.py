"""Quantized and mixed-precision ONNX files (issue 17 part 4), made here with real tools.

A small float CNN / MLP exported by torch.onnx (TorchScript exporter, opset 13) is quantized
by onnxruntime's quantizer on random calibration data: QDQ (per tensor uint8, per channel
int8), QOperator restricted to Conv (QLinearConv), QOperator in full (onnxruntime's
com.microsoft QGemm) and dynamic (ConvInteger, MatMulInteger, DynamicQuantizeLinear). fp16
files come from `.half()` before export and from onnxconverter-common's float16 conversion.

Tolerances: quantized files within 1e-4 of ONNX Runtime, or one quantization step of the
output where a rounding tie breaks the other way (measured: equal bit for bit); fp16 files
within two fp16 ulps of the output's magnitude (fp16 keeps 11 bits: 1e-4 is below one ulp).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import interop
from interop.errors import UnsupportedOpError

torch = pytest.importorskip("torch")
quantization = pytest.importorskip("onnxruntime.quantization")

EMITTERS = ("torch", "keras", "flax")


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x)) + x
        return self.fc(torch.nn.functional.max_pool2d(x, 2).flatten(1))


class SmallMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


SHAPES = {"cnn": (2, 3, 8, 8), "mlp": (2, 16)}


class _Calibration(quantization.CalibrationDataReader):
    def __init__(self, shape):
        rng = np.random.default_rng(0)
        self.batches = iter(
            [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(4)]
        )

    def get_next(self):
        return next(self.batches, None)


def _export(module, shape, path, half=False):
    module = module.eval()
    x = torch.randn(shape)
    if half:
        module, x = module.half(), x.half()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), str(path), dynamo=False, opset_version=13, input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{kind: path} of the quantized and fp16 files."""
    folder = tmp_path_factory.mktemp("quantized")
    torch.manual_seed(0)
    float_files = {}
    for name, module in (("cnn", SmallCNN()), ("mlp", SmallMLP())):
        float_files[name] = folder / f"{name}.onnx"
        _export(module, SHAPES[name], float_files[name])
    q = quantization
    made = {}

    def static(kind, name, **options):
        made[kind] = folder / f"{kind}.onnx"
        q.quantize_static(
            str(float_files[name]), str(made[kind]), _Calibration(SHAPES[name]), **options
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        static("qdq", "cnn", quant_format=q.QuantFormat.QDQ)
        static("qdq_per_channel", "cnn", quant_format=q.QuantFormat.QDQ, per_channel=True,
               activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8)  # fmt: skip
        static("qlinearconv", "cnn", quant_format=q.QuantFormat.QOperator,
               op_types_to_quantize=["Conv"], per_channel=True)  # fmt: skip
        static("qoperator", "mlp", quant_format=q.QuantFormat.QOperator)
        for name in ("cnn", "mlp"):
            made[f"dynamic_{name}"] = folder / f"dynamic_{name}.onnx"
            q.quantize_dynamic(str(float_files[name]), str(made[f"dynamic_{name}"]))
    made["half"] = folder / "half.onnx"
    torch.manual_seed(0)
    _export(SmallCNN(), SHAPES["cnn"], made["half"], half=True)
    made["float"] = float_files["cnn"]
    return made


def _ort(path, x):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _input(kind, dtype=np.float32):
    shape = SHAPES["mlp" if "mlp" in kind or kind == "qoperator" else "cnn"]
    return np.random.default_rng(1).standard_normal(shape).astype(dtype)


def _emit(framework, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(interop, f"to_{framework}")(path if isinstance(path, bytes) else str(path))


def _call(framework, model, x, train=False):
    if framework == "torch":
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return np.asarray(model(x))


def _output_step(path) -> float:
    """The scale of the quantized output (the last DequantizeLinear's), else 0."""
    model = onnx.load(str(path))
    scales = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    last = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    return float(np.max(scales.get(last[-1].input[1], 0.0))) if last else 0.0


def assert_within_a_step(got, expected, step):
    """Within 1e-4; entries where a rounding tie broke the other way: one step, at most 1%."""
    off = np.abs(np.asarray(got, np.float64) - expected) > 1e-4 + 1e-4 * np.abs(expected)
    assert got.shape == expected.shape
    assert off.mean() <= 0.01, f"{off.sum()} of {off.size} entries differ"
    np.testing.assert_allclose(got, expected, atol=1e-4 + step * 1.001, rtol=1e-4)


# ------------------------------------------------------------------ QDQ
@pytest.mark.parametrize("kind", ["qdq", "qdq_per_channel"])
def test_qdq_file_runs_and_emits_as_onnxruntime(files, kind):
    path, x = files[kind], _input(kind)
    expected = _ort(path, x)
    np.testing.assert_allclose(interop.load(path).run(x), expected, rtol=1e-4, atol=1e-4)
    model = onnx.load(str(path))
    activations = sum(
        n.op_type == "QuantizeLinear" and not any(i.name == n.input[0] for i in model.graph.initializer)
        for n in model.graph.node
    )  # fmt: skip
    assert activations >= 5
    step = _output_step(path)
    for framework in EMITTERS:
        emitted = _emit(framework, path)
        assert_within_a_step(_call(framework, emitted, x), expected, step)
        if framework == "torch":
            # dequantized weights in native layers; one fake-quant per activation pair
            convs = [m for m in emitted.modules() if isinstance(m, torch.nn.Conv2d)]
            assert len(convs) == 2 and all(c.weight.dtype == torch.float32 for c in convs)
            assert any(isinstance(m, torch.nn.Linear) for m in emitted.modules())
            assert emitted.code.count("QuantizeDequantize") == activations
            assert "DequantizeLinear(" not in emitted.code
        elif framework == "keras":
            names = {type(layer).__name__ for layer in emitted.layers}
            assert {"Conv2D", "DepthwiseConv2D", "Dense"} <= names
        else:
            from flax import nnx

            assert nnx.Conv in {type(m) for _, m in nnx.iter_modules(emitted)}


def test_qdq_weights_are_the_dequantized_file_weights(files):
    """The first conv's weight is DequantizeLinear of the file's int8 weight, exactly."""
    model = onnx.load(str(files["qdq_per_channel"]))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4
    )  # fmt: skip
    w, scale, zero = (inits[name] for name in dq.input)
    expected = (w.astype(np.float32) - zero.reshape(-1, 1, 1, 1)) * scale.reshape(-1, 1, 1, 1)
    module = _emit("torch", files["qdq_per_channel"])
    weights = [
        m.weight.detach().numpy() for m in module.modules() if isinstance(m, torch.nn.Conv2d)
    ]
    assert any(np.array_equal(wt, expected) for wt in weights)


def _fake_quant_file():
    """x -> QuantizeLinear -> DequantizeLinear -> y, as a quantizer writes it (foreign)."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(128, np.uint8), "z")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])], [scale, zero],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.producer_name = "onnx.quantize"
    return model.SerializeToString()


@pytest.mark.parametrize("framework", EMITTERS)
def test_fake_quant_has_a_straight_through_gradient(framework):
    """Gradient 1 where the value is inside uint8's range (scale 0.1, zero point 128:
    -12.8..12.7), 0 where it saturates: what torch.fake_quantize_per_tensor_affine gives."""
    data = _fake_quant_file()
    x = np.array(
        [[-20.0, -12.8, -1.26, 0.04, 12.7, 30.0], [-np.inf, -12.8, -1.26, 0.04, 12.7, np.inf]],
        np.float32,
    )  # infinities saturate (no NaN from the gradient path)
    expected = _ort(data, x)
    finite = torch.from_numpy(x[:1])
    torch_reference = torch.fake_quantize_per_tensor_affine(finite, 0.1, 128, 0, 255)
    np.testing.assert_allclose(expected[:1], torch_reference.numpy(), atol=1e-6)
    mask = np.array([[0, 1, 1, 1, 1, 0]] * 2, np.float32)
    emitted = _emit(framework, data)
    if framework == "torch":
        tensor = torch.from_numpy(x).requires_grad_()
        y = emitted(tensor)
        y.sum().backward()
        values, grad = y.detach().numpy(), tensor.grad.numpy()
    elif framework == "keras":
        import tensorflow as tf

        tensor = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            y = emitted(tensor)
            total = tf.reduce_sum(y)
        values, grad = np.asarray(y), tape.gradient(total, tensor).numpy()
    else:
        import jax
        import jax.numpy as jnp

        values = np.asarray(emitted(x))
        grad = np.asarray(jax.grad(lambda v: jnp.sum(emitted(v)))(jnp.asarray(x)))
    np.testing.assert_array_equal(values, expected)
    np.testing.assert_array_equal(grad, mask)


def test_emitted_qdq_model_trains(files):
    """Every parameter of the emitted torch model gets a gradient through the fake-quants."""
    module = _emit("torch", files["qdq"]).train()
    module(torch.from_numpy(_input("qdq"))).square().mean().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    assert len(grads) == 6 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


# ------------------------------------------------------------------ QOperator and dynamic
@pytest.mark.parametrize("kind", ["qlinearconv", "dynamic_cnn", "dynamic_mlp"])
def test_integer_ops_emit_as_onnxruntime(files, kind):
    path, x = files[kind], _input(kind)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops & {"QLinearConv", "ConvInteger", "MatMulInteger"}
    expected = _ort(path, x)
    np.testing.assert_allclose(interop.load(path).run(x), expected, rtol=1e-4, atol=1e-4)
    for framework in EMITTERS:
        got = _call(framework, _emit(framework, path), x)
        assert_within_a_step(got, expected, 0.0)


def test_contrib_quantized_op_names_node_opset_producer_and_fix(files):
    for framework in EMITTERS:
        with pytest.raises(UnsupportedOpError) as info:
            _emit(framework, files["qoperator"])
        message = str(info.value)
        for part in ("com.microsoft::QGemm", "node '/a/Gemm_quant'", "opset 13",
                     "onnx.quantize", "QuantFormat.QDQ", framework):  # fmt: skip
            assert part in message, (part, message)


# ------------------------------------------------------------------ fp16
def _half_files(files):
    made = [files["half"]]
    try:
        from onnxconverter_common import float16
    except ImportError:  # optional: the .half() export covers fp16 files without it
        return made
    for keep_io in (False, True):
        converted = float16.convert_float_to_float16(
            onnx.load(str(files["float"])), keep_io_types=keep_io
        )
        made.append(files["float"].with_name(f"converted_keep_io_{keep_io}.onnx"))
        onnx.save(converted, str(made[-1]))
    return made


def test_fp16_files_emit_with_fp16_parameters(files):
    from flax import nnx

    for path in _half_files(files):
        half_input = onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == 10
        x = _input("cnn", np.float16 if half_input else np.float32)
        expected = _ort(path, x).astype(np.float32)
        np.testing.assert_allclose(interop.load(path).run(x), expected, rtol=1e-4, atol=1e-4)
        # fp16 keeps 11 bits: two ulps at the output's magnitude
        atol = 2 * float(np.spacing(np.float16(np.abs(expected).max())))
        module = _emit("torch", path)
        assert {p.dtype for p in module.parameters()} == {torch.float16}
        keras_model = _emit("keras", path)
        assert {str(v.dtype) for v in keras_model.weights} == {"float16"}
        flax_module = _emit("flax", path)
        params = nnx.state(flax_module, nnx.Param)
        assert {str(v.dtype) for v in __import__("jax").tree_util.tree_leaves(params)} == {
            "float16"
        }
        for framework, emitted in (("torch", module), ("keras", keras_model),
                                   ("flax", flax_module)):  # fmt: skip
            got = _call(framework, emitted, x).astype(np.float32)
            np.testing.assert_allclose(got, expected, atol=atol, rtol=1e-3, err_msg=framework)
