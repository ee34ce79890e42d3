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
