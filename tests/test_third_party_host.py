"""The example third-party host is found by interop.convert once its package is installed.

The package is installed with pip into a private target folder (not the shared venv,
so tests running beside this one never see a half-installed plug-in) and used from a
fresh interpreter, where only the ``interop.hosts`` entry point can register it. The
built-in hosts go through the same registry (`interop.hosts`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import interop
from interop.errors import InteropError

ROOT = Path(__file__).resolve().parents[1]

# the numpy host evaluates in float32 like ONNX Runtime, op by op: only rounding differs
TOLERANCE = 1e-5

SCRIPT = """
import json, sys
import numpy as np
import torch
import interop
from interop.emit import to_host
from interop.hosts import load_hosts, host_for

names = sorted(name for name, _ in load_hosts().items())
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
    torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5),
).eval()
x = torch.randn(2, 3, 6, 6)
model = interop.convert(net, to="numpy", example_inputs=(x,), verify=True)
graph = model.graph
x7 = np.random.default_rng(1).standard_normal((7, 3, 6, 6)).astype(np.float32)
out = host_for("numpy").run(model, [x7])
weights = host_for("numpy").save(model, __import__("pathlib").Path("w.npz"))
with np.load(weights[0]) as data:
    saved = sorted(data.files)
print(json.dumps({
    "hosts": names,
    "type": type(model).__name__,
    "max_error_vs_onnxruntime": float(np.abs(out[0] - graph.run(x7)).max()),
    "max_error_vs_torch": float(np.abs(out[0] - net(torch.from_numpy(x7)).detach().numpy()).max()),
    "outputs": len(out),
    "shape": list(out[0].shape),
    "saved": saved,
    # an onnx.ModelProto goes to the host's emit as is
    "from_proto": float(np.abs(to_host("numpy", graph.to_proto())(x7) - out[0]).max()),
}))
"""


def _install(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "third_party_host", source)  # builds write here
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert any(p.name.startswith("numpy_host") for p in target.glob("*.dist-info"))
    return target


def test_entry_point_host_is_picked_up(tmp_path):
    target = _install(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "numpy" in result["hosts"] and {"torch", "keras", "flax"} <= set(result["hosts"])
    assert result["type"] == "NumpyModel"
    assert result["outputs"] == 1 and result["shape"] == [7, 5]  # the batch stays dynamic
    assert result["max_error_vs_onnxruntime"] < TOLERANCE
    assert result["max_error_vs_torch"] < TOLERANCE
    assert result["from_proto"] < TOLERANCE
    assert result["saved"] == ["0.bias", "0.weight", "1.bias", "1.running_mean",
                               "1.running_var", "1.weight", "4.bias", "4.weight"]  # fmt: skip


def test_cli_converts_to_an_installed_host(tmp_path):
    target = _install(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    (tmp_path / "mymodels.py").write_text(
        "import torch\n\ndef build():\n    torch.manual_seed(0)\n"
        "    return torch.nn.Linear(4, 3).eval(), (torch.randn(2, 4),)\n"
    )

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "interop.cli", *args],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        )  # fmt: skip

    proc = cli("convert", "--help")
    assert proc.returncode == 0 and "onnx,torch}" in proc.stdout and "numpy" in proc.stdout
    assert ".npz" in proc.stdout  # the installed hosts and their suffixes are listed
    proc = cli("convert", "mymodels:build", "--to", "numpy", "-o", "out/net.npz", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "net.npz").is_file() and (tmp_path / "out" / "net.onnx").is_file()
    proc = cli("convert", "mymodels:build", "--to", "numpy", "-o", "net.pt")
    assert proc.returncode == 2 and "does not fit --to numpy" in proc.stderr
    assert "a file name ending in .npz" in proc.stderr


def test_host_is_absent_without_the_package():
    # the plug-in is not part of interop: a plain interpreter knows only the built-ins
    script = (
        "from interop.hosts import load_hosts; print(sorted(n for n, _ in load_hosts().items()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "numpy" not in proc.stdout and "'torch'" in proc.stdout


def test_unknown_target_lists_the_hosts():
    with pytest.raises(InteropError, match="Unknown conversion target 'nope'") as info:
        interop.convert(object(), to="nope")
    message = str(info.value)
    for name in ("torch", "keras", "flax", "onnx"):
        assert name in message
    with pytest.raises(InteropError, match=r"Unknown host 'torhc' \(did you mean 'torch'\?\)"):
        interop.hosts.host_for("torhc")


def test_builtin_hosts_name_their_nesting_wrappers():
    from interop.hosts import host_for

    assert host_for("torch").nesting is interop.torch.Module
    assert host_for("torch").suffixes == (".pt", ".pth")
    assert host_for("flax").requires == ("jax", "flax")
    assert host_for("keras").requires == ("keras",)


def test_looking_up_hosts_imports_no_framework():
    script = (
        "import sys, interop\n"
        "from interop.hosts import load_hosts\n"
        "load_hosts()\n"
        "print([m for m in ('torch', 'keras', 'tensorflow', 'jax', 'flax') if m in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
