"""Saving a host with a nested guest and loading it in a fresh process without the guest's framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nesting_guests import GUESTS

import interop

nnx = pytest.importorskip("flax.nnx")
serialization = pytest.importorskip("flax.serialization")

BLOCKER = """
import sys
BLOCKED = set(sys.argv[2].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""

TORCH_HOST = (
    BLOCKER
    + """
import numpy as np, torch, interop, interop.torch
folder = sys.argv[1]
host = torch.nn.Sequential(interop.torch.Module(interop.load(folder + "/guest.onnx")), torch.nn.Linear(6, 1))
host.load_state_dict(torch.load(folder + "/host.pt", weights_only=True))
host.eval()
with torch.no_grad():
    y = host(torch.from_numpy(np.load(folder + "/x.npy"))).numpy()
print(float(np.abs(y - np.load(folder + "/y.npy")).max()), sorted(m for m in sys.modules if m in BLOCKED))
"""
)

FLAX_HOST = (
    BLOCKER
    + """
import numpy as np, interop, interop.flax
from flax import nnx, serialization
folder = sys.argv[1]
class Host(nnx.Module):
    def __init__(self):
        self.guest = interop.flax.Module(interop.load(folder + "/guest.onnx"))
        self.head = nnx.Linear(6, 1, rngs=nnx.Rngs(1))
    def __call__(self, x):
        return self.head(self.guest(x))
host = Host()
state = nnx.state(host, nnx.Not(nnx.RngState))
pure = serialization.msgpack_restore(open(folder + "/host.msgpack", "rb").read())
nnx.replace_by_pure_dict(state, pure)
nnx.update(host, state)
y = np.asarray(host(np.load(folder + "/x.npy")))
print(float(np.abs(y - np.load(folder + "/y.npy")).max()), sorted(m for m in sys.modules if m in BLOCKED))
"""
)


def _fresh(script: str, folder: Path, blocked: str) -> tuple[float, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), blocked],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    error, loaded = done.stdout.strip().splitlines()[-1].split(" ", 1)
    return float(error), loaded


def test_torch_host_with_keras_guest_reloads_without_keras(tmp_path):
    model, x, _ = GUESTS["keras_cnn"]()
    guest = interop.torch.Module(model, example_inputs=(x,))
    host = torch.nn.Sequential(guest, torch.nn.Linear(6, 1))
    optimizer = torch.optim.SGD(host.parameters(), lr=0.05)
    host.train()
    host(torch.from_numpy(x)).pow(2).mean().backward()
    optimizer.step()  # saved weights differ from the traced ones
    guest.graph.save(tmp_path / "guest.onnx")
    torch.save(host.state_dict(), tmp_path / "host.pt")
    host.eval()
    with torch.no_grad():
        np.save(tmp_path / "y.npy", host(torch.from_numpy(x)).numpy())
    np.save(tmp_path / "x.npy", x)
    error, loaded = _fresh(TORCH_HOST, tmp_path, "keras,tensorflow,jax,flax")
    assert error < 1e-6 and json.loads(loaded.replace("'", '"')) == []


def test_flax_host_with_torch_guest_reloads_without_torch(tmp_path):
    model, x, _ = GUESTS["torch_cnn"]()

    class Host(nnx.Module):
        def __init__(self):
            self.guest = interop.flax.Module(model, example_inputs=(x,))
            self.head = nnx.Linear(6, 1, rngs=nnx.Rngs(0))

        def __call__(self, a):
            return self.head(self.guest(a))

    host = Host()
    host.guest.graph.save(tmp_path / "guest.onnx")
    state = nnx.state(host, nnx.Not(nnx.RngState))  # weights and statistics; rng keys are not data
    (tmp_path / "host.msgpack").write_bytes(
        serialization.msgpack_serialize(nnx.to_pure_dict(state))
    )
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.asarray(host(x)))
    error, loaded = _fresh(FLAX_HOST, tmp_path, "torch,keras,tensorflow")
    assert error < 1e-6 and json.loads(loaded.replace("'", '"')) == []
