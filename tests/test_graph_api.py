"""Graph API around the IR: runtime sessions, saving, notebooks, CLI, import without frameworks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from models import ResNetish, randomize_batchnorm

import interop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    module = randomize_batchnorm(ResNetish()).eval()
    return module, interop.trace(module, (torch.randn(2, 3, 16, 16),))


def test_session_is_cached_per_device(resnet):
    _, graph = resnet
    x = np.random.rand(2, 3, 16, 16).astype(np.float32)
    graph.run(x)
    session = graph._sessions["cpu"]
    graph.run(torch.from_numpy(x))
    assert graph._sessions["cpu"] is session and list(graph._sessions) == ["cpu"]
    by_name = graph.run(x=x, as_dict=True)
    assert list(by_name) == ["output"]
    np.testing.assert_array_equal(by_name["output"], graph.run(x))


def test_run_from_many_threads(resnet):
    _, graph = resnet
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(8)]
    expected = [graph.run(x) for x in inputs]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for step in range(25):
                k = (index + step) % len(inputs)
                np.testing.assert_array_equal(graph.run(inputs[k]), expected[k])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_save_is_atomic(resnet, tmp_path, monkeypatch):
    _, graph = resnet
    path = graph.save(tmp_path / "model.onnx")
    before = path.read_bytes()
    original = Path.write_bytes

    def failing_write(self, data):
        original(self, data[: len(data) // 3])  # a partial write, then the disk "fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError):
        graph.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp files left
    assert interop.load(path).count_params() == graph.count_params()


def test_save_with_external_data(resnet, tmp_path):
    module, graph = resnet
    path = graph.save(tmp_path / "big" / "model.onnx", external_data=True)
    inline = graph.save(tmp_path / "inline.onnx")
    data_size = (tmp_path / "big" / "model.onnx.data").stat().st_size
    assert data_size > 10_000  # the weights (2,653 params + buffers) left the .onnx file
    assert path.stat().st_size < inline.stat().st_size - 8_000
    loaded = interop.load(path)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.run(x), module(x).numpy(), rtol=1e-5, atol=1e-5)
    assert interop.load(loaded.to_bytes()).count_params() == graph.count_params()


def test_same_model_gives_same_bytes(resnet):
    module, graph = resnet
    again = interop.trace(module, (torch.randn(2, 3, 16, 16),))
    assert again.to_bytes() == graph.to_bytes()


def test_notebook_views(resnet):
    _, graph = resnet
    html = graph._repr_html_()
    assert html.startswith("<pre>") and "blocks (ModuleList)" in html
    svg = graph._repr_svg_()
    assert svg is not None and "<svg" in svg and "stem" in svg
    assert repr(graph).startswith("<interop.Graph 'ResNetish' from torch: ")


def test_summary_depth_collapses(resnet):
    _, graph = resnet
    top = graph.summary(depth=1, print_fn=None)
    full = graph.summary(print_fn=None)
    assert "blocks (ModuleList)" in top and "blocks.0.conv1" not in top
    assert "blocks.0.conv1 (Conv2d)" in full
    assert "Total params: 2,653 " in top and "Total params: 2,653 " in full
    printed: list[str] = []
    assert graph.summary(print_fn=printed.append) is None and printed == [full]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "interop.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_cli(resnet, tmp_path):
    _, graph = resnet
    path = graph.save(tmp_path / "net.onnx")
    inspect = _cli("inspect", str(path), "--depth", "1", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    assert "stem (Sequential)" in inspect.stdout and "Total params: 2,653" in inspect.stdout
    plot = _cli("plot", str(path), "-o", str(tmp_path / "net.svg"), cwd=tmp_path)
    assert plot.returncode == 0 and "<svg" in (tmp_path / "net.svg").read_text()
    run = _cli("run", str(path), "--random", "--dim", "batch=4", "--repeat", "3", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "output output: float32[4, 5]" in run.stdout and "median of 3 runs" in run.stdout
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    failed = _cli("inspect", str(bad), cwd=tmp_path)
    assert (
        failed.returncode == 2
        and "interop: error:" in failed.stderr
        and "Traceback" not in failed.stderr
    )
    helptext = _cli("--help", cwd=tmp_path).stdout
    assert all(command in helptext for command in ("inspect", "plot", "run"))


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "tensorflow", "keras", "jax", "flax"}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import numpy as np, interop
g = interop.load(sys.argv[1])
y = g.run(np.zeros((2, 3, 16, 16), np.float32))
g.summary(depth=1)
assert y.shape == (2, 5)
assert not {"torch", "tensorflow", "keras", "jax", "flax"} & set(sys.modules), sorted(sys.modules)
print("ok without frameworks")
"""


def test_import_and_use_without_any_framework(resnet, tmp_path):
    _, graph = resnet
    path = graph.save(tmp_path / "net.onnx")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", BLOCKER, str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "ok without frameworks" in done.stdout
