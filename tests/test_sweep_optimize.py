"""A CI sample of tools/sweep_optimize.py: the optimized copy `Graph.run` runs against the
faithful graph (a plain ONNX Runtime session of ``graph.to_bytes()``) within rtol = atol =
1e-5, on the example input and on one of another batch and length.

One model of each kind, through the sweep's own per-model functions (the whole families:
docs/performance.md, "The optimized copy across model families"): a Llama decoder, BERT,
ViT and Whisper from transformers configs, a keras_hub BERT backbone (TensorFlow backend).
"""

from __future__ import annotations

import pathlib
import sys

import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
    try:
        import sweep_optimize
    finally:
        sys.path.pop(0)
    return sweep_optimize


# model -> (the sweep's per-model function, the stage the runtime keeps, ops it must fuse)
CASES = {
    "Llama": ("hf", "fuse", {"SimplifiedLayerNormalization"}),
    "BERT": ("hf", "attention", {"Attention", "SkipLayerNormalization"}),
    "ViT": ("hf", "attention", {"Attention", "SkipLayerNormalization", "Conv"}),
    "BertBackbone": ("keras_hub", "fuse", {"LayerNormalization", "FastGelu"}),
    # onnxscript's shape rules wrote a Reshape to [-1, -1, 8] into its decoder, and ONNX
    # Runtime refused the fuse stage (the rules are now kept only where that stays valid)
    "Whisper": ("hf", "fuse", {"BiasGelu", "Conv"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_optimized_copy_matches_faithful_graph(sweep, name):
    family, stage, fused = CASES[name]
    if family == "keras_hub":
        pytest.importorskip("keras_hub")
    result = sweep.FAMILIES[family](name)
    assert result["capture"], result.get("capture_error")
    # both inputs compared: the example and another batch (and length)
    assert result["compared"] == 2, result["inputs"]
    shapes = [entry["shapes"] for entry in result["inputs"]]
    assert shapes[0] != shapes[1]
    assert result["ok"], sweep._note(result)
    assert result["max_abs"] <= 1e-5
    assert result["stage"] == stage, result["tried"]
    assert fused <= set(result["fused"]), result["fused"]
    assert result["nodes_optimized"] < result["nodes_faithful"]
