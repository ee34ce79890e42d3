"""interop.torch.Module: foreign and native guests as trainable submodules of a torch model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import ResNetish, randomize_batchnorm

import interop

keras = pytest.importorskip("keras")


def _keras_encoder():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="d1"),
            keras.layers.Dense(4, name="d2"),
        ]
    )


class Host(torch.nn.Module):
    def __init__(self, guest):
        super().__init__()
        self.guest = guest
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.guest(x))


def _train_step(host, x):
    optimizer = torch.optim.SGD(host.parameters(), lr=0.1)
    guest_before = [p.detach().clone() for p in host.guest.parameters()]
    loss = host(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = host(x).pow(2).mean()
    changed = [not torch.equal(a, b) for a, b in zip(guest_before, host.guest.parameters())]
    return float(loss), float(after), changed


def test_keras_guest_in_torch_host(tmp_path):
    encoder = _keras_encoder()
    guest = interop.torch.Module(encoder, example_inputs=(np.zeros((2, 8), np.float32),))
    host = Host(guest)
    x = torch.randn(5, 8)
    np.testing.assert_allclose(
        guest(x).detach().numpy(), encoder(x.numpy()).numpy(), rtol=1e-4, atol=1e-5
    )
    assert sum(p.numel() for p in guest.parameters()) == encoder.count_params()
    before, after, changed = _train_step(host, x)
    assert after < before and all(changed)
    with pytest.raises(interop.ShapeError, match="input_layer"):
        host(torch.randn(5, 9))
    # save through state_dict, rebuild from the saved graph
    guest.graph.save(tmp_path / "enc.onnx")
    torch.save(host.state_dict(), tmp_path / "host.pt")
    rebuilt = Host(interop.torch.Module(interop.load(tmp_path / "enc.onnx")))
    rebuilt.load_state_dict(torch.load(tmp_path / "host.pt"))
    with torch.no_grad():
        np.testing.assert_allclose(rebuilt(x).numpy(), host(x).numpy(), rtol=1e-6, atol=1e-6)


def test_torch_guest_in_torch_host():
    torch.manual_seed(0)
    source = randomize_batchnorm(ResNetish(channels=4, classes=4)).eval()
    guest = interop.torch.Module(source, example_inputs=(torch.randn(2, 3, 16, 16),)).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(guest(x).numpy(), source(x).numpy(), rtol=1e-4, atol=1e-5)
    names = {n for n, _ in guest.net.named_parameters()}
    assert "stem.0.weight" in names and "blocks.1.conv2.weight" in names
    before, after, changed = _train_step(Host(guest).train(), x)
    assert after < before and any(changed)
