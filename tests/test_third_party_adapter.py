"""The example third-party adapter is found by interop.trace once its package is installed.

The package is installed with pip into a private target folder (not the shared venv,
so tests running beside this one never see a half-installed plug-in) and used from a
fresh interpreter, where only the ``interop.adapters`` entry point can register it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import numpy as np
import interop
from interop.tracing import load_adapters

names = [name for name, _ in load_adapters().items()]
from numpy_mlp_adapter import NumpyMLP   # only to build the toy model

mlp = NumpyMLP.random([6, 16, 8, 3], seed=1)
x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
graph = interop.trace(mlp, x[:2])
text = graph.summary(print_fn=None)
print(json.dumps({
    "adapters": names,
    "framework": graph.source.get("framework"),
    "max_error": float(np.abs(graph.run(x) - mlp(x)).max()),
    "params": graph.count_params(),
    "expected_params": sum(w.size + b.size for w, b in mlp.layers),
    "layers": [(layer.path, layer.param_count) for layer in graph.layers],
    "total_line": [line for line in text.splitlines() if line.startswith("Total params")],
    "verify_ok": interop.verify(mlp, graph, (x,)).ok,
    "batch": graph.inputs[0].shape[0],
}))
"""


def test_entry_point_adapter_is_picked_up(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT / "examples" / "third_party_adapter", source)  # builds write here
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    assert any(p.name.startswith("numpy_mlp_adapter") for p in target.glob("*.dist-info"))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert "numpy_mlp" in result["adapters"]
    assert result["framework"] == "numpy_mlp"
    assert result["max_error"] < 1e-5
    assert result["params"] == result["expected_params"] == 6 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3
    assert result["layers"] == [["layers.0", 112], ["layers.1", 136], ["layers.2", 27]]
    assert result["total_line"][0].startswith(f"Total params: {result['params']:,}")
    assert result["verify_ok"] is True
    assert result["batch"] == "batch"


def test_adapter_is_absent_without_the_package():
    # the plug-in is not part of interop: a plain interpreter does not know the toy model
    script = "from interop.tracing import load_adapters; print(sorted(n for n, _ in load_adapters().items()))"
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "numpy_mlp" not in proc.stdout and "torch" in proc.stdout
