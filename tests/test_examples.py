"""Every script in examples/ runs end to end (small sizes) and reports agreement.

Each script checks its own numerics and exits non-zero when the frameworks disagree,
so a passing test means the printed comparison held, not only that nothing crashed.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(script: str, *args: str, timeout: float = 240, path: str | None = None) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", KERAS_BACKEND="tensorflow", PYTHONPATH=str(ROOT))
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_examples_are_short():
    scripts = sorted(EXAMPLES.glob("*.py"))
    assert len(scripts) >= 4
    for script in scripts:
        lines = len(script.read_text().splitlines())
        assert lines < 80, f"{script.name} has {lines} lines; examples stay under 80"


def test_inspect_torch_model(tmp_path):
    # PATH holds only this venv's bin: no system Graphviz, as on a fresh machine after pip
    # install, so the plots come from the graphviz-pure renderer interop depends on
    out = run_example(
        "inspect_torch_model.py", "--out", str(tmp_path), path=str(Path(sys.executable).parent)
    )
    assert "verify" in out and "OK" in out
    assert (tmp_path / "small_resnet.onnx").stat().st_size > 0
    svg = (tmp_path / "small_resnet.svg").read_text()
    assert svg.lstrip().startswith(("<?xml", "<svg")) and "blocks.1" in svg
    png = (tmp_path / "small_resnet.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    assert 50 < width < 16_000 and 50 < height < 16_000


def test_keras_to_torch():
    out = run_example("keras_to_torch.py", "--steps", "15")
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if "loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0]  # the emitted module trains


def test_flax_to_onnxruntime(tmp_path):
    out = run_example("flax_to_onnxruntime.py", "--out", str(tmp_path))
    assert "(32, 4)" in out and "OK" in out
    assert (tmp_path / "flax_mlp.onnx").exists()


def test_extract_features(tmp_path):
    out = run_example("extract_features.py", "--out", str(tmp_path))
    for name, shape in [("stages.0", "(2, 8, 16, 16)"), ("stages.1", "(2, 16, 8, 8)")]:
        assert f"{name}: {shape}" in out
    import interop

    features = interop.load(tmp_path / "encoder_features.onnx")
    assert [spec.name for spec in features.outputs] == ["stages.0", "stages.1", "stages.2"]


def test_keras_encoder_in_torch():
    out = run_example("keras_encoder_in_torch.py", "--steps", "10")
    assert "encoder.net.proj.weight" in out  # Keras names survive as torch parameters
    losses = [float(line.split("loss")[1]) for line in out.splitlines() if "loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_torch_backbone_in_keras(tmp_path):
    out = run_example(
        "torch_backbone_in_keras.py", "--steps", "3", "--out", str(tmp_path / "m.keras")
    )
    assert "guest vs PyTorch: max abs error" in out and "reloaded model differs by" in out
    error = float(out.split("max abs error ")[1].split()[0])
    assert error < 1e-5
