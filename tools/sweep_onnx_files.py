"""Sweep ONNX files of other exporters through interop: load/run and the three emitters.

    python tools/sweep_onnx_files.py                      # every case, writes docs/onnx-files.md
    python tools/sweep_onnx_files.py --only gpt2 --only dynamo   # cases whose id has both
    python tools/sweep_onnx_files.py --render-only        # the docs page from the saved results

Every file is made here with random weights (no downloads): torch modules through the
TorchScript exporter (`torch.onnx.export(..., dynamo=False)`, opsets 9 / 11 / 13 / 17) and
the dynamo exporter, Keras models (keras.applications with `weights=None` at a small input
among them) through tf2onnx (opsets 13 / 15 / 18), Flax nnx modules through jax2onnx, and
hand-built IR-version-3 files (opsets 7 / 8 / 9: weights listed as graph inputs, a weight
computed by ConstantOfShape). For each file: ONNX Runtime on the file's bytes is the
reference; `interop.load(f).run`, `to_torch`, `to_keras` and `to_flax` must equal it within
rtol 1e-4 and atol 1e-4. A cell holds `ok` (with the largest difference) or why it failed.

Results go to a JSON file (each case written as it finishes, so an interrupted sweep
resumes) and the table to docs/onnx-files.md between its two markers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "onnx-files.md"
RESULTS = ROOT / "tools" / "sweep_onnx_files.json"
BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"
RTOL = ATOL = 1e-4
CHECKS = ("run", "torch", "keras", "flax")
TORCH_EXPORTS = [("torchscript", 9), ("torchscript", 11), ("torchscript", 13),
                 ("torchscript", 17), ("dynamo", None)]  # fmt: skip
KERAS_EXPORTS = [("tf2onnx", 13), ("tf2onnx", 15), ("tf2onnx", 18)]


# ------------------------------------------------------------------ torch architectures
def _torch_models() -> dict[str, tuple[Callable[[], Any], Callable[[], list[np.ndarray]]]]:
    """{name: (module factory, example inputs)}; modules are built lazily (imports torch)."""
    import torch
    from torch import nn

    def image(*shape):
        return lambda: [np.random.default_rng(1).standard_normal(shape).astype(np.float32)]

    def tokens(vocab=96, length=12):
        return lambda: [np.random.default_rng(1).integers(0, vocab, (2, length)).astype(np.int64)]

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
            )  # fmt: skip
            self.fc = nn.Linear(16 * 3 * 3, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout else nn.Identity()
            )  # fmt: skip

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.down(x))

    class ResNetTiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU())
            self.blocks = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            y = self.blocks(self.stem(x))
            return self.head(torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1))

    def separable(cin, cout, stride):
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
            nn.ReLU6(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
        )  # fmt: skip

    class MobileNetTiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, 2, 1), nn.Hardswish(), separable(8, 16, 1), separable(16, 24, 2)
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(24, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.body(x)), 1))

    class UNetTiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU())
            self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU())
            self.up = nn.ConvTranspose2d(16, 8, 2, 2)
            self.resize = nn.Upsample(scale_factor=2, mode="nearest")
            self.out = nn.Conv2d(24, 2, 1)

        def forward(self, x):
            skip = self.down(x)
            mid = self.mid(skip)
            merged = torch.cat([self.up(mid), skip, self.resize(mid)[:, :8]], 1)
            return self.out(merged)

    class Norms(nn.Module):
        """GroupNorm, InstanceNorm, bilinear resize, PixelShuffle, a Conv1d over rows."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.group = nn.GroupNorm(2, 8)
            self.instance = nn.InstanceNorm2d(8, affine=True)
            self.shuffle = nn.PixelShuffle(2)
            self.line = nn.Conv1d(2, 4, 3, padding=1)

        def forward(self, x):
            y = torch.nn.functional.leaky_relu(self.instance(self.group(self.conv(x))), 0.1)
            y = torch.nn.functional.interpolate(y, scale_factor=0.5, mode="bilinear")
            y = self.shuffle(y)  # [N, 2, 16, 16]
            return self.line(y.mean(-1)).sigmoid()

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(16, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 32), nn.SiLU(),
                nn.Dropout(0.1), nn.Linear(32, 4),
            )  # fmt: skip

        def forward(self, x):
            return torch.softmax(self.net(x), -1)

    class Recurrent(nn.Module):
        def __init__(self, kind):
            super().__init__()
            layer = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
            self.rnn = layer(8, 16, batch_first=True, bidirectional=kind == "gru")
            self.fc = nn.Linear(16 * (2 if kind == "gru" else 1), 4)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.fc = nn.Linear(32, 8)

        def forward(self, x):
            return self.fc(self.encoder(x))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x + self.attn(x, x, x, need_weights=False)[0])

    class HuggingFace(nn.Module):
        """A transformers model from a tiny config, returning one tensor."""

        def __init__(self, kind):
            super().__init__()
            import transformers as tr

            common = dict(attn_implementation="eager")
            if kind == "gpt2":
                config = tr.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2,
                                       n_head=2, use_cache=False, **common)  # fmt: skip
                self.model, self.key = tr.GPT2LMHeadModel(config), "logits"
            elif kind == "bert":
                config = tr.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=32, **common)  # fmt: skip
                self.model, self.key = tr.BertModel(config, add_pooling_layer=False), None
            else:
                config = tr.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, **common)  # fmt: skip
                self.model, self.key = tr.ViTModel(config, add_pooling_layer=False), None
            self.model.eval()

        def forward(self, x):
            # GPT-2 without a mask looks for packed sequences in its position ids (aten::diff,
            # which the TorchScript exporter lacks); an all-ones mask is the same model
            mask = {"attention_mask": torch.ones_like(x)} if self.key == "logits" else {}
            out = self.model(x, return_dict=True, **mask)
            return out[self.key] if self.key else out["last_hidden_state"]

    return {
        "cnn": (SmallCNN, image(2, 3, 16, 16)),
        "resnet_blocks": (ResNetTiny, image(2, 3, 16, 16)),
        "mobilenet_depthwise": (MobileNetTiny, image(2, 3, 16, 16)),
        "unet_upsample": (UNetTiny, image(2, 3, 16, 16)),
        "norms_resize_shuffle": (Norms, image(2, 3, 16, 16)),
        "mlp_gelu_layernorm": (MLP, image(2, 16)),
        "lstm": (lambda: Recurrent("lstm"), image(2, 5, 8)),
        "gru_bidirectional": (lambda: Recurrent("gru"), image(2, 5, 8)),
        "transformer_encoder": (Encoder, image(2, 6, 32)),
        "multihead_attention": (Attention, image(2, 6, 16)),
        "gpt2_tiny": (lambda: HuggingFace("gpt2"), tokens()),
        "bert_tiny": (lambda: HuggingFace("bert"), tokens()),
        "vit_tiny": (lambda: HuggingFace("vit"), image(2, 3, 32, 32)),
    }


def torch_file(arch: str, exporter: str, opset: int | None) -> tuple[bytes, list[np.ndarray]]:
    import torch

    factory, example = _torch_models()[arch]
    torch.manual_seed(0)
    module = factory().eval()
    inputs = example()
    args = tuple(torch.from_numpy(a) for a in inputs)
    buffer = io.BytesIO()
    # not under torch.no_grad: eval nn.TransformerEncoderLayer would take its fused fast path
    # (aten::_transformer_encoder_layer_fwd), which no exporter translates
    with _quiet():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=64)
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=["x"],
                dynamic_shapes=({0: batch},), verbose=False,
            )  # fmt: skip
            return program.model_proto.SerializeToString(), inputs
        torch.onnx.export(
            module, args, buffer, dynamo=False, opset_version=opset, input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    return buffer.getvalue(), inputs


def quantized_file(arch: str, exporter: str, opset: int | None) -> tuple[bytes, list[np.ndarray]]:
    """The TorchScript exporter's opset-17 file through onnxruntime's quantizer: static QDQ
    (per channel, random calibration batches) or dynamic (MatMulInteger / ConvInteger)."""
    import tempfile

    from onnxruntime import quantization as q

    data, inputs = torch_file(arch, "torchscript", 17)
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "float.onnx", Path(folder) / "quantized.onnx"
        source.write_bytes(data)
        with _quiet():
            if exporter == "ort-qdq":
                rng = np.random.default_rng(3)

                class Batches(q.CalibrationDataReader):
                    def __init__(self):
                        self.batches = iter([
                            {"x": (rng.standard_normal(inputs[0].shape).astype(np.float32)
                                   if inputs[0].dtype.kind == "f" else inputs[0])}
                            for _ in range(4)
                        ])  # fmt: skip

                    def get_next(self):
                        return next(self.batches, None)

                q.quantize_static(str(source), str(target), Batches(),
                                  quant_format=q.QuantFormat.QDQ, per_channel=True)  # fmt: skip
            else:
                q.quantize_dynamic(str(source), str(target))
        return target.read_bytes(), inputs


# ------------------------------------------------------------------ Keras architectures
def _keras_models() -> dict[str, tuple[Callable[[], Any], tuple[int, ...]]]:
    import keras

    def cnn():
        return keras.Sequential([
            keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, padding="same"),
            keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.MaxPooling2D(),
            keras.layers.SeparableConv2D(16, 3), keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, activation="softmax"),
        ])  # fmt: skip

    def lstm():
        return keras.Sequential([keras.Input((6, 8)), keras.layers.LSTM(16),
                                 keras.layers.Dense(4)])  # fmt: skip

    def applications(name, **options):
        return lambda: getattr(keras.applications, name)(
            input_shape=(32, 32, 3),
            weights=None,
            classes=10,
            classifier_activation=None,
            **options,
        )

    return {
        "keras_cnn_separable": (cnn, (2, 16, 16, 3)),
        "keras_lstm": (lstm, (2, 6, 8)),
        "keras_mobilenet_v2": (applications("MobileNetV2", alpha=0.35), (2, 32, 32, 3)),
        "keras_mobilenet_v3_small": (
            applications("MobileNetV3Small", minimalistic=False),
            (2, 32, 32, 3),
        ),
        "keras_resnet50": (applications("ResNet50"), (2, 32, 32, 3)),
        "keras_densenet121": (applications("DenseNet121"), (2, 32, 32, 3)),
        "keras_efficientnet_b0": (applications("EfficientNetB0"), (2, 32, 32, 3)),
    }


def _calibrate_batch_norms(keras: Any, model: Any, shape: tuple[int, ...]) -> None:
    """Moving statistics from one training-mode call on random data (momentum 0 for it).

    At random init a deep keras.applications network's BatchNormalization layers hold mean 0,
    variance 1: the signal shrinks layer after layer and the classifier sees zeros (every
    output 0.1), which any converter would match. With statistics of real activations the
    outputs spread, and a comparison means something.
    """
    norms = [layer for layer in model._flatten_layers() if isinstance(
        layer, keras.layers.BatchNormalization)]  # fmt: skip
    if not norms:
        return
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    batch = np.random.default_rng(2).standard_normal((8, *shape[1:])).astype(np.float32)
    model(batch, training=True)
    for layer, momentum in zip(norms, momenta):
        layer.momentum = momentum


def keras_file(arch: str, exporter: str, opset: int | None) -> tuple[bytes, list[np.ndarray]]:
    import keras
    import tensorflow as tf
    import tf2onnx

    factory, shape = _keras_models()[arch]
    keras.utils.set_random_seed(0)
    model = factory()
    _calibrate_batch_norms(keras, model, shape)
    spec = (tf.TensorSpec((None, *shape[1:]), tf.float32, name="x"),)
    # from_keras fails on Keras 3 models (tf2onnx 1.17: KeyError on the output names)
    function = tf.function(lambda x: model(x, training=False), input_signature=spec)
    with _quiet():
        proto, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=opset)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return proto.SerializeToString(), [x]


# ------------------------------------------------------------------ Flax architectures
def _flax_models() -> dict[str, tuple[Callable[[], Any], tuple[int, ...]]]:
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(16, 32, rngs=rngs)
            self.norm = nnx.LayerNorm(32, rngs=rngs)
            self.b = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.gelu(self.norm(self.a(x))))

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), rngs=rngs)
            self.fc = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            y = nnx.relu(self.conv(x))
            y = nnx.relu(self.conv2(y))
            return self.fc(y.mean(axis=(1, 2)))

    return {
        "flax_mlp": (lambda: MLP(nnx.Rngs(0)), (2, 16)),
        "flax_cnn": (lambda: CNN(nnx.Rngs(0)), (2, 16, 16, 3)),
    }


def flax_file(arch: str, exporter: str, opset: int | None) -> tuple[bytes, list[np.ndarray]]:
    from jax2onnx import to_onnx

    factory, shape = _flax_models()[arch]
    module = factory()
    with _quiet():
        proto = to_onnx(module, [("B", *shape[1:])], return_mode="proto")
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return proto.SerializeToString(), [x]


# ------------------------------------------------------------------ hand-built IR 3
def ir3_file(arch: str, exporter: str, opset: int | None) -> tuple[bytes, list[np.ndarray]]:
    """A model-zoo style file: IR version 3, every initializer also a graph input, a weight
    computed by ConstantOfShape (opset 9) or a Constant node, an unused initializer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    assert opset is not None
    rng = np.random.default_rng(opset)

    def f(*shape):
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    inits = {"conv.W": f(8, 3, 3, 3), "conv.B": f(8), "bn.scale": 1 + f(8), "bn.bias": f(8),
             "bn.mean": f(8), "bn.var": np.abs(f(8)) + 0.5, "fc.W": f(10, 8), "fc.B": f(10),
             "unused": f(3)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "conv.W", "conv.B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"]
        ),  # fmt: skip
        helper.make_node("Relu", ["b"], ["r"]),
    ]
    half = numpy_helper.from_array(np.full([1], 0.5, np.float32))
    if opset >= 9:
        inits["gate_shape"] = np.array([1, 8, 1, 1], np.int64)
        nodes.append(helper.make_node("ConstantOfShape", ["gate_shape"], ["gate"], value=half))
    else:
        gate = numpy_helper.from_array(np.full([1, 8, 1, 1], 0.5, np.float32))
        nodes.append(helper.make_node("Constant", [], ["gate"], value=gate))
    nodes += [
        helper.make_node("Mul", ["r", "gate"], ["m"]),
        helper.make_node("GlobalAveragePool", ["m"], ["p"]),
        helper.make_node("Flatten", ["p"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.W", "fc.B"], ["y"], transB=1),
    ]
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes, "zoo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])]
        + [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in tensors],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])], tensors,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version, model.producer_name, model.producer_version = 3, "zoo-era tool", "0.3"
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    return onnx.shape_inference.infer_shapes(model).SerializeToString(), [x]


# ------------------------------------------------------------------ cases
def cases() -> list[tuple[str, str, str, int | None]]:
    """(case id, architecture, exporter, opset) for every file of the sweep."""
    import importlib.util

    found = []
    torch_names = [
        "cnn", "resnet_blocks", "mobilenet_depthwise", "unet_upsample", "norms_resize_shuffle",
        "mlp_gelu_layernorm",
        "lstm", "gru_bidirectional", "transformer_encoder", "multihead_attention",
        "gpt2_tiny", "bert_tiny", "vit_tiny",
    ]  # fmt: skip
    for arch in torch_names:
        for exporter, opset in TORCH_EXPORTS:
            found.append((_case_id(arch, exporter, opset), arch, exporter, opset))
    for arch in ["cnn", "resnet_blocks", "mobilenet_depthwise", "lstm", "bert_tiny", "vit_tiny"]:
        for exporter in ("ort-qdq", "ort-dynamic"):
            found.append((_case_id(arch, exporter, None), arch, exporter, None))
    if importlib.util.find_spec("tf2onnx") is not None:
        for arch in ["keras_cnn_separable", "keras_lstm", "keras_mobilenet_v2",
                     "keras_mobilenet_v3_small", "keras_resnet50", "keras_densenet121",
                     "keras_efficientnet_b0"]:  # fmt: skip
            for exporter, opset in KERAS_EXPORTS:
                found.append((_case_id(arch, exporter, opset), arch, exporter, opset))
    if importlib.util.find_spec("jax2onnx") is not None:
        for arch in ["flax_mlp", "flax_cnn"]:
            found.append((_case_id(arch, "jax2onnx", None), arch, "jax2onnx", None))
    for opset in (7, 8, 9):
        found.append((_case_id("zoo_cnn", "ir3", opset), "zoo_cnn", "ir3", opset))
    return found


def _case_id(arch: str, exporter: str, opset: int | None) -> str:
    return f"{arch}/{exporter}" + (f"-{opset}" if opset is not None else "")


MAKERS = {"torchscript": torch_file, "dynamo": torch_file, "ort-qdq": quantized_file,
          "ort-dynamic": quantized_file, "tf2onnx": keras_file,
          "jax2onnx": flax_file, "ir3": ir3_file}  # fmt: skip


def make_file(arch: str, exporter: str, opset: int | None) -> tuple[bytes, list[np.ndarray]]:
    """(file bytes, example inputs) of one case."""
    return MAKERS[exporter](arch, exporter, opset)


# ------------------------------------------------------------------ checks
@contextlib.contextmanager
def _quiet():
    """Exporters print progress and warnings; the sweep's output is its table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


def _outputs(value: Any) -> list[np.ndarray]:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in _outputs(v)]
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return [np.asarray(value)]


def onnxruntime_outputs(
    data: bytes, inputs: list[np.ndarray], optimized: bool = True
) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, inputs)))


def _relative(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """The largest difference over the largest magnitude of the outputs."""
    worst = 0.0
    for g, e in zip(got, expected):
        e64 = np.asarray(e, np.float64)
        if e64.size and np.isfinite(e64).all():
            scale = max(float(np.abs(e64).max()), 1e-30)
            worst = max(worst, float(np.abs(np.asarray(g, np.float64) - e64).max()) / scale)
    return worst


def _all_close(got: list[np.ndarray], expected: list[np.ndarray]) -> bool:
    return all(
        np.asarray(g).shape == e.shape
        and np.allclose(np.asarray(g, np.float64), e.astype(np.float64), rtol=RTOL, atol=ATOL)
        for g, e in zip(got, expected)
    )


def _compare(
    got: list[np.ndarray],
    expected: list[np.ndarray],
    noise: float = 0.0,
    unoptimized: list[np.ndarray] | None = None,
) -> str:
    """Cell text: "ok" within rtol/atol 1e-4 entry by entry; "ok~" within 1e-4 of the
    outputs' largest magnitude, for deep networks whose float32 rounding differs by more than
    that between ONNX Runtime's own optimized and unoptimized sessions (`noise`, shown);
    "ok=" within rtol/atol 1e-4 of ONNX Runtime without graph optimizations (the file's ops
    as written), where the optimized session's fused kernels compute otherwise (quantized
    files: QDQ groups become integer kernels that round differently); else FAIL."""
    if len(got) != len(expected):
        return f"FAIL: {len(got)} outputs, ONNX Runtime gives {len(expected)}"
    worst, close = 0.0, True
    for g, e in zip(got, expected):
        g = np.asarray(g)
        if g.shape != e.shape:
            return f"FAIL: shape {g.shape}, ONNX Runtime gives {e.shape}"
        g64, e64 = g.astype(np.float64), e.astype(np.float64)
        close = close and np.allclose(g64, e64, rtol=RTOL, atol=ATOL, equal_nan=True)
        if g.size:
            worst = max(worst, float(np.nanmax(np.abs(g64 - e64))))
    if close:
        return f"ok ({worst:.0e})"
    relative = _relative(got, expected)
    if unoptimized is not None and _all_close(got, unoptimized):
        return f"ok= (as ORT unoptimized; its optimized session differs by {noise:.0e})"
    if relative <= RTOL and noise > RTOL / 10:
        return f"ok~ ({relative:.0e} of the largest output; ORT itself {noise:.0e})"
    return f"FAIL: max abs diff {worst:.2e}, {relative:.0e} of the largest output (rtol/atol 1e-4)"


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    fix = next((line for line in text if line.startswith("Fix:")), "")
    message = f"{type(err).__name__}: {first}"[:220]
    return "FAIL: " + message.replace("|", "/") + (" " + fix[:120].replace("|", "/") if fix else "")


def run_emitted(framework: str, emitted: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    if framework == "torch":
        import torch

        with torch.no_grad():
            return _outputs(emitted(*[torch.from_numpy(a) for a in inputs]))
    if framework == "keras":
        return _outputs(emitted(inputs[0] if len(inputs) == 1 else list(inputs)))
    return _outputs(emitted(*inputs))


def emit(framework: str, data: bytes) -> Any:
    import interop

    with _quiet():
        return getattr(interop, f"to_{framework}")(data)


def check_file(
    data: bytes, inputs: list[np.ndarray], checks: tuple[str, ...] = CHECKS
) -> dict[str, str]:
    """{check: "ok (largest difference)", "ok~ (...)" (see `_compare`) or "FAIL: reason"}
    against ONNX Runtime."""
    import interop

    expected = onnxruntime_outputs(data, inputs)
    # how far ONNX Runtime's own fusions move the numbers: the float32 noise of the network
    unoptimized = onnxruntime_outputs(data, inputs, optimized=False)
    noise = _relative(unoptimized, expected)
    cells: dict[str, str] = {}
    for check in checks:
        start = time.perf_counter()
        try:
            if check == "run":
                with _quiet():
                    got = _outputs(interop.load(data).run(*inputs))
            else:
                got = run_emitted(check, emit(check, data), inputs)
            cells[check] = _compare(got, expected, noise, unoptimized)
        except Exception as err:  # noqa: BLE001 (the reason is the result)
            cells[check] = _reason(err)
        cells[check + "_s"] = f"{time.perf_counter() - start:.1f}"
    return cells


# ------------------------------------------------------------------ the docs table
def render(results: dict[str, dict[str, str]]) -> str:
    rows = ["| file | exporter | ORT | load().run | to_torch | to_keras | to_flax |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    counts = dict.fromkeys(CHECKS, 0)
    noisy = dict.fromkeys(CHECKS, 0)
    checked = unwritten = refused = 0
    for case_id, cells in results.items():
        arch, exporter = case_id.split("/", 1)
        if "export" in cells:
            unwritten += 1
            rows.append(f"| {arch} | {exporter} | {cells['export'][:160]} | | | | |")
            continue
        if cells.get("ort", "ok") != "ok":
            refused += 1
            rows.append(f"| {arch} | {exporter} | {cells['ort'][:160]} | | | | |")
            continue
        checked += 1
        for check in CHECKS:
            counts[check] += cells.get(check, "").startswith("ok")
            noisy[check] += cells.get(check, "").startswith(("ok~", "ok="))
        shown = [cells.get(check, "not run") for check in CHECKS]
        rows.append(f"| {arch} | {exporter} | ok | " + " | ".join(shown) + " |")
    total = ", ".join(
        f"{name} {counts[name]}/{checked}" + (f" ({noisy[name]} ok~ or ok=)" if noisy[name] else "")
        for name in CHECKS
    )
    summary = (
        f"{len(results)} cases: {unwritten} files their exporter could not write, {refused} "
        f"that ONNX Runtime refuses, {checked} checked. Equal to ONNX Runtime: {total}."
    )
    return "\n".join([summary, "", *rows])


def write_doc(results: dict[str, dict[str, str]], doc: Path = DOC) -> None:
    text = doc.read_text() if doc.exists() else f"# ONNX files from other tools\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{BEGIN}\n{render(results)}\n{END}{tail}")


def sweep_case(arch: str, exporter: str, opset: int | None) -> dict[str, str]:
    try:
        data, inputs = make_file(arch, exporter, opset)
    except Exception as err:  # noqa: BLE001 (an exporter that cannot write the file)
        return {"export": "export " + _reason(err).replace("FAIL: ", "failed: ", 1)}
    try:
        onnxruntime_outputs(data, inputs)
    except Exception as err:  # noqa: BLE001
        return {"ort": "ORT " + _reason(err)}
    return {"ort": "ok", **check_file(data, inputs)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="substring(s) of case ids")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--rerun", action="store_true", help="rerun cases already in results")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    results: dict[str, dict[str, str]] = (
        json.loads(args.results.read_text()) if args.results.exists() else {}
    )
    if not args.render_only:
        order = [c[0] for c in cases()]
        for case_id, arch, exporter, opset in cases():
            if not all(part in case_id for part in args.only):
                continue
            if case_id in results and not args.rerun:
                continue
            start = time.perf_counter()
            try:
                results[case_id] = sweep_case(arch, exporter, opset)
            except Exception:  # noqa: BLE001 (a crash in the sweep itself: recorded, go on)
                results[case_id] = {
                    "export": "sweep error: " + traceback.format_exc(limit=1)[-200:]
                }
            results = {k: results[k] for k in order if k in results}
            args.results.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{case_id}: {time.perf_counter() - start:.0f}s {results[case_id]}", flush=True)
    write_doc(results)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
