"""interop.convert: every source framework to every target, verified against the source."""

from __future__ import annotations

import numpy as np
import onnxruntime
import pytest
from nesting_guests import GUESTS

import interop
from interop.conversion import run_native

pytest.importorskip("keras")
pytest.importorskip("flax")

PAIRS = [
    (g, t)
    for g in ("torch_cnn", "keras_cnn", "flax_cnn")
    for t in ("torch", "keras", "flax", "onnx")
]


@pytest.mark.parametrize(("guest", "target"), PAIRS, ids=[f"{g}-to-{t}" for g, t in PAIRS])
def test_convert_matches_source(guest, target, tmp_path):
    model, x, run_source = GUESTS[guest]()
    result = interop.convert(
        model, to=target, example_inputs=(x,), verify=True, path=tmp_path / "m.onnx"
    )
    batch = np.random.default_rng(3).standard_normal((3, *x.shape[1:])).astype(np.float32)
    if target == "onnx":
        session = onnxruntime.InferenceSession(str(result))
        got = session.run(None, {session.get_inputs()[0].name: batch})[0]
    else:
        got = run_native(result, target, [batch])[0]
    np.testing.assert_allclose(got, run_source(batch), rtol=1e-4, atol=1e-5)


def test_convert_reports_mismatch_and_bad_target():
    model, x, _ = GUESTS["torch_cnn"]()
    graph = interop.trace(model, (x,))
    with pytest.raises(interop.InteropError, match="Unknown conversion target"):
        interop.convert(graph, to="tensorflow")
    # a different model's weights: the verify report must name the mismatching output
    other, _, _ = GUESTS["torch_cnn"]()
    for p in other.parameters():
        p.data.add_(0.5)
    from interop.conversion import check_conversion

    report = check_conversion(
        other, graph, interop.to_torch(graph), "torch", (x,), rtol=1e-4, atol=1e-5
    )
    assert not report.ok and "MISMATCH" in str(report) and report.outputs[0].name == "output"
    with pytest.raises(interop.InteropError, match="verify=True needs example_inputs"):
        interop.convert(graph, to="torch", verify=True)
