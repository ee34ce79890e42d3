"""`interop convert`: factories and .onnx files to onnx / torch / keras / flax files that load back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import interop

ROOT = Path(__file__).resolve().parents[1]

FACTORY = """
import torch

def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return net.eval(), (torch.randn(2, 4),)

def broken():
    return "not a tuple"
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", KERAS_BACKEND="tensorflow")
    return subprocess.run(
        [sys.executable, "-m", "interop.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The factory traced once to .onnx (by module name, from the current folder)."""
    folder = tmp_path_factory.mktemp("convert")
    (folder / "mymodels.py").write_text(FACTORY)
    proc = cli("convert", "mymodels:build", "--to", "onnx", "-o", "out/net.onnx", cwd=folder)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar off a terminal
    assert "wrote" in proc.stdout and "67 params" in proc.stdout
    return folder


def reference(folder: Path, x: np.ndarray) -> np.ndarray:
    import torch

    sys.path.insert(0, str(folder))
    try:
        import mymodels
    finally:
        sys.path.remove(str(folder))
    net, _ = mymodels.build()
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


def test_factory_to_onnx(converted):
    graph = interop.load(converted / "out" / "net.onnx")
    assert graph.source["framework"] == "torch"
    assert graph.count_params() == 4 * 8 + 8 + 8 * 3 + 3
    np.testing.assert_allclose(graph.run(X), reference(converted, X), rtol=1e-5, atol=1e-6)


def test_factory_file_path_to_torch_loads_without_code(converted, tmp_path):
    import torch

    proc = cli("convert", f"{converted / 'mymodels.py'}:build", "--to", "torch",
               "-o", str(tmp_path / "net.pt"), "--quiet", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    module = interop.to_torch(interop.load(tmp_path / "net.onnx"))
    state = torch.load(tmp_path / "net.pt", weights_only=True)  # plain tensors only
    for parameter in module.parameters():  # prove the values come from the file
        torch.nn.init.zeros_(parameter)
    module.load_state_dict(state)
    with torch.no_grad():
        got = module(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, reference(converted, X), rtol=1e-5, atol=1e-6)


def test_onnx_file_to_flax(converted, tmp_path):
    from flax import nnx, serialization

    out = tmp_path / "net.msgpack"
    proc = cli("convert", str(converted / "out" / "net.onnx"), "--to", "flax", "-o", str(out),
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import jax

    module = interop.to_flax(interop.load(tmp_path / "net.onnx"))
    state = jax.tree.map(lambda leaf: leaf * 0, nnx.state(module))  # values must come from file
    restored = serialization.msgpack_restore(out.read_bytes())
    assert set(restored) == set(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(module, state)
    np.testing.assert_allclose(np.asarray(module(X)), reference(converted, X), rtol=1e-5, atol=1e-6)


def test_onnx_file_to_keras_weights(converted, tmp_path):
    out = tmp_path / "net.weights.h5"
    proc = cli("convert", str(converted / "out" / "net.onnx"), "--to", "keras", "-o", str(out),
               cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    model = interop.to_keras(interop.load(tmp_path / "net.onnx"))
    for variable in model.weights:  # prove the values come from the file
        variable.assign(np.zeros(variable.shape, variable.dtype))
    model.load_weights(out)
    got = np.asarray(model(X))
    np.testing.assert_allclose(got, reference(converted, X), rtol=1e-5, atol=1e-5)


def test_errors_are_one_line_with_a_fix(converted):
    proc = cli("convert", "mymodels:build", "--to", "torch", "-o", "net.onnx", cwd=converted)
    assert proc.returncode == 2 and "does not fit --to torch" in proc.stderr
    proc = cli("convert", "mymodels:broken", "--to", "onnx", "-o", "x.onnx", cwd=converted)
    assert proc.returncode == 2 and "(model, example_inputs)" in proc.stderr
    proc = cli("convert", "nosuchmodule:build", "--to", "onnx", "-o", "x.onnx", cwd=converted)
    assert proc.returncode == 2 and "Cannot import factory module" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_documents_the_factory_contract(tmp_path):
    proc = cli("convert", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    for text in ["(model, example_inputs)", "weights_only=True", "--to {flax,keras,onnx,torch}"]:
        assert text in proc.stdout
