"""Fusions of the torch emitter (adapters/torch/fusions.py): they fire where they should,
keep numerics (source module and onnxruntime) and gradients, and stay off where they must."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402

import interop  # noqa: E402
from interop.emit import to_torch  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


def _onnxruntime(graph, x):
    session = ort.InferenceSession(
        graph.to_proto().SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _check(model, make_input, graph=None):
    """Emitted == source (no_grad and with autograd) == onnxruntime; gradients match."""
    torch.manual_seed(0)
    graph = graph or interop.trace(model, (make_input(2),))
    emitted = to_torch(graph).eval()
    for batch in (1, 3):  # not the traced batch size: dynamic dims stay dynamic
        x = make_input(batch)
        with torch.no_grad():
            expected = model(x)
            np.testing.assert_allclose(emitted(x).numpy(), expected.numpy(), RTOL, ATOL)
        np.testing.assert_allclose(_onnxruntime(graph, x)[0], expected.numpy(), RTOL, ATOL)
    x = make_input(3)
    model.zero_grad()
    model(x).square().sum().backward()
    emitted(x).square().sum().backward()
    source = dict(model.named_parameters())
    for name, parameter in emitted.named_parameters():
        assert parameter.grad is not None, name
        reference = source[emitted.source_names.get(name, name)].grad
        np.testing.assert_allclose(parameter.grad.numpy(), reference.numpy(), 1e-3, 1e-4)
    return emitted


class Attention(nn.Module):
    """Hand-written attention: softmax(q k^T * scale [+ mask]) v."""

    def __init__(self, scale=None, mask=False, return_weights=False, axis=-1):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.scale, self.axis, self.return_weights = scale, axis, return_weights
        self.register_buffer("mask", torch.randn(1, 1, 6, 6) if mask else None)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, 2, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-2, -1) * (self.scale or 8**-0.5)
        if self.mask is not None:
            scores = scores + self.mask
        weights = torch.softmax(scores, dim=self.axis)
        out = (weights @ v).transpose(1, 2).reshape(b, n, 16)
        return (out, weights) if self.return_weights else out


def _tokens(batch):
    return torch.randn(batch, 6, 16)


def test_transformer_encoder_layer_uses_sdpa_and_python_shapes():
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    emitted = _check(layer, lambda b: torch.randn(b, 10, 32))
    code = emitted.code
    assert "scaled_dot_product_attention" in code
    assert "Softmax" not in code and "onnx_shape" not in code  # no run-time shape tensors
    assert "size(0)" in code  # the batch dim is read at run time
    assert "relu = True" in code  # the feed-forward Relu runs in the linear's epilogue


@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_pattern_becomes_sdpa(mask, scale):
    emitted = _check(Attention(scale=scale, mask=mask).eval(), _tokens)
    assert "scaled_dot_product_attention" in emitted.code
    assert ("attn_mask" in emitted.code) == mask


@pytest.mark.parametrize(
    "options", [{"return_weights": True}, {"axis": -2}], ids=["softmax-read-twice", "axis-2"]
)
def test_attention_pattern_does_not_fire(options):
    model = Attention(**options).eval()
    graph = interop.trace(model, (_tokens(2),))
    emitted = to_torch(graph).eval()
    assert "scaled_dot_product_attention" not in emitted.code
    x = _tokens(3)
    with torch.no_grad():
        for got, expected in zip(emitted(x), model(x), strict=True):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), RTOL, ATOL)


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y = x.reshape(x.shape[0], x.shape[1] * x.shape[2], -1)
        return self.fc(y.reshape(y.shape[0], -1)) * (x.shape[-1] ** 0.5)


def test_shape_arithmetic_is_python_numbers():
    emitted = _check(Flatten().eval(), lambda b: torch.randn(b, 2, 3, 4))
    assert "onnx_shape" not in emitted.code and "torch.cat" not in emitted.code


def test_linear_relu_fused_and_differentiable():
    # 3-D input: MatMul + Add (a 2-D input exports as Gemm, an nn.Linear layer)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    emitted = _check(model, lambda b: torch.randn(b, 5, 8))
    assert "relu = True" in emitted.code
    x = torch.randn(2, 5, 8, requires_grad=True)
    emitted(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ---------------------------------------------------------------- shared weights, pools


class ConvNet(nn.Module):
    """Conv-BN-ReLU, MaxPool, a residual Conv-BN, global average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = torch.relu(self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(x))))) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _torchscript_opset17(model, x):
    """The TorchScript exporter's opset-17 file (one initializer per distinct tensor)."""
    import io
    import warnings

    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), buffer, dynamo=False, opset_version=17, do_constant_folding=False,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        )  # fmt: skip
    return onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()))


def test_weights_shared_through_identity_are_one_parameter_of_native_layers():
    """Fresh BatchNorms hold equal ones / zeros: the exporter keeps one initializer of each
    and reads it through Identity nodes. Every BatchNorm still becomes nn.BatchNorm2d; the
    uniform tensor the exporter merged is one Parameter per reader again (the source
    model's BatchNorms train apart; interop/legacy.py folds such Identity copies), named
    after the source; outputs match the source and onnxruntime."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    proto = _torchscript_opset17(model, torch.randn(2, 3, 16, 16))
    shared = {i.name for i in proto.graph.initializer if "bn" in i.name}
    assert len(shared) < 6 and any(n.op_type == "Identity" for n in proto.graph.node)
    emitted = to_torch(proto).eval()
    norms = [m for m in emitted.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 3 and "interop_interpret" not in emitted.code  # no generic op
    assert norms[0].weight is not norms[1].weight  # as in the source model
    assert all(torch.equal(n.weight, torch.ones(8)) for n in norms)
    assert norms[0].running_var is not norms[1].running_var  # buffers: one per layer
    assert {"bn2.weight", "bn3.bias"} <= set(emitted.source_names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            got = emitted(x).numpy()
            np.testing.assert_allclose(got, model(x).numpy(), RTOL, ATOL)
        np.testing.assert_allclose(got, session.run(None, {"x": x.numpy()})[0], RTOL, ATOL)
    # every Relu overwrites its conv / batch norm / add input, which no backward reads
    assert emitted.code.count("torch.relu_(") == 3 and "torch.relu(" not in emitted.code
    for mode in ("eval", "train"):  # train: batch statistics, the same in both
        model.zero_grad()
        emitted.zero_grad()
        getattr(model, mode)(), getattr(emitted, mode)()
        x = torch.randn(3, 3, 16, 16)
        model(x).square().sum().backward()
        emitted(x).square().sum().backward()
        source = dict(model.named_parameters())
        expected: dict[int, torch.Tensor] = {}
        for name, source_name in emitted.source_names.items():
            if name.rsplit(".", 1)[-1] in ("weight", "bias") and source_name in source:
                parameter = emitted.get_parameter(name)
                total = expected.get(id(parameter), 0)
                expected[id(parameter)] = total + source[source_name].grad
        for parameter in emitted.parameters():
            np.testing.assert_allclose(parameter.grad, expected[id(parameter)], 1e-3, 1e-4)
        assert len(expected) == len(list(emitted.parameters())) == len(source)


class ReluReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        z = torch.sigmoid(y)
        return torch.relu(y) + torch.relu(z) * z  # y read twice; sigmoid's backward reads z


def test_relu_keeps_an_input_another_op_or_a_backward_reads():
    emitted = _check(ReluReadTwice().eval(), lambda b: torch.randn(b, 3, 8, 8))
    assert "relu_(" not in emitted.code and emitted.code.count("torch.relu(") == 2


class TiedConv(nn.Module):
    """A conv weight also read by a generic op (its sum), after or before the conv runs;
    with ``scale`` the conv module also holds a buffer only a generic op reads."""

    def __init__(self, first=False, scale=False):
        super().__init__()
        self.conv, self.first = nn.Conv2d(3, 4, 3), first
        self.conv.register_buffer("scale", torch.tensor(2.0) if scale else None)

    def forward(self, x):
        total = self.conv.weight.abs().sum()
        if self.conv.scale is not None:
            x = x * self.conv.scale
        return self.conv(x + total if self.first else x) * total


@pytest.mark.parametrize("options", [{}, {"first": True}, {"first": True, "scale": True}], ids=str)
def test_weight_of_a_native_layer_also_read_by_a_generic_op_is_one_parameter(options):
    emitted = _check(TiedConv(**options).eval(), lambda b: torch.randn(b, 3, 8, 8))
    convs = [m for m in emitted.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and len(list(emitted.parameters())) == 2
    names = {emitted.source_names.get(n, n) for n, _ in emitted.named_parameters()}
    assert names == {"conv.weight", "conv.bias"}
    if not options.get("scale"):  # else a module "conv" holds the buffer: the layer moves
        assert emitted.conv is convs[0]


class Pools(nn.Module):
    def __init__(self, ceil_mode=False):
        super().__init__()
        self.conv, self.ceil_mode = nn.Conv2d(3, 4, 1), ceil_mode

    def forward(self, x):
        y = nn.functional.max_pool2d(self.conv(x), 3, 2, 1, ceil_mode=self.ceil_mode)
        return y.mean(dim=(2, 3), keepdim=True) + y.amax(dim=-1).sum(dim=-1)[..., None, None]


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_pools_and_reductions_are_direct_torch_calls(ceil_mode):
    emitted = _check(Pools(ceil_mode).eval(), lambda b: torch.randn(b, 3, 9, 9))
    assert ("functional.max_pool2d" in emitted.code) != ceil_mode  # ceil_mode: generic op
    assert "torch.mean" in emitted.code and "torch.sum" in emitted.code


class ErfGelu(nn.Module):
    """GELU written out (the opset < 20 spelling); with ``share`` its Erf is read twice."""

    def __init__(self, share=False):
        super().__init__()
        self.fc, self.share = nn.Linear(6, 6), share

    def forward(self, x):
        x = self.fc(x)
        erf = torch.erf(x / 2**0.5)
        y = x * (1 + erf) * 0.5
        return y + erf if self.share else y


@pytest.mark.parametrize(
    "model", [nn.Sequential(nn.Linear(6, 6), nn.GELU()), ErfGelu(), ErfGelu(share=True)]
)
def test_erf_gelu_pattern_is_one_gelu_unless_a_step_is_read_elsewhere(model):
    torch.manual_seed(0)
    model = model.eval()
    proto = _torchscript_opset17(model, torch.randn(2, 6))
    assert not any(n.op_type == "Gelu" for n in proto.graph.node)
    emitted = to_torch(proto)
    fused = not getattr(model, "share", False)
    assert ("gelu" in emitted.code) == fused and ("erf" in emitted.code) != fused
    assert "_Constant_" not in emitted.code  # scalar constants are Python floats
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 6)
    got = emitted(x)
    np.testing.assert_allclose(got.detach().numpy(), model(x).detach().numpy(), RTOL, ATOL)
    np.testing.assert_allclose(
        got.detach().numpy(), session.run(None, {"x": x.numpy()})[0], RTOL, ATOL
    )
    got.square().sum().backward()
    model(x).square().sum().backward()
    source = dict(model.named_parameters())
    for name, parameter in emitted.named_parameters():
        reference = source[emitted.source_names.get(name, name)].grad
        np.testing.assert_allclose(parameter.grad.numpy(), reference.numpy(), 1e-3, 1e-5)
