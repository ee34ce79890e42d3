"""Hugging Face transformers models, built from tiny configs with random weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import interop

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")


def _ids(batch, seq, vocab=100, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_causal_lm_cache_is_flattened_to_named_outputs():
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    graph = interop.trace(model, (_ids(2, 7),), dynamic_dims={"input_ids": {1: "seq"}})
    assert [s.name for s in graph.outputs] == [
        "logits", "cache.0.key", "cache.0.value", "cache.1.key", "cache.1.value",
    ]  # fmt: skip
    assert graph.outputs[0].shape == ("batch", "seq", 100)
    assert graph.outputs[1].shape == ("batch", 2, "seq", 8)
    assert graph.count_params() == sum(p.numel() for p in model.parameters())
    for ids in (_ids(2, 7), _ids(3, 12, seed=1)):  # another batch and sequence length
        report = interop.verify(model, graph, (ids,), rtol=1e-4, atol=1e-5)
        assert report.ok, str(report)
        with torch.no_grad():
            expected = model(ids)
        np.testing.assert_allclose(graph.run(ids)[0], expected.logits.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            graph.run(ids, as_dict=True)["cache.1.value"],
            expected.past_key_values.layers[1].values.numpy(), rtol=1e-4, atol=1e-5,
        )  # fmt: skip
    attn = graph.layer("model.layers.0.self_attn")
    assert attn.class_name == "LlamaAttention"
    assert "model.layers.0.self_attn.q_proj.weight" in attn.all_parameters()


def test_bert_with_named_inputs_and_dynamic_sequence():
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {"input_ids": _ids(2, 7), "attention_mask": mask}
    graph = interop.trace(
        model, inputs, dynamic_dims={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    )
    assert [(s.name, s.shape) for s in graph.inputs] == [
        ("input_ids", ("batch", "seq")), ("attention_mask", ("batch", "seq")),
    ]  # fmt: skip
    assert [s.name for s in graph.outputs] == ["last_hidden_state", "pooler_output"]
    assert interop.verify(model, graph, inputs).ok
    longer = {
        "input_ids": _ids(3, 10, seed=2),
        "attention_mask": torch.ones(3, 10, dtype=torch.long),
    }
    assert interop.verify(model, graph, longer).ok
    assert graph.count_params() == sum(p.numel() for p in model.parameters())
    text = graph.summary(depth=2, print_fn=None)
    assert "encoder (BertEncoder)" in text and "embeddings.word_embeddings (Embedding)" in text
    sub = graph.submodel(outputs=["encoder.layer.0"])
    hooked = {}
    handle = model.encoder.layer[0].register_forward_hook(lambda m, i, o: hooked.setdefault("o", o))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    want = hooked["o"][0] if isinstance(hooked["o"], tuple) else hooked["o"]
    got = sub.run(**{k: v for k, v in inputs.items() if k in {s.name for s in sub.inputs}})
    got = got[0] if isinstance(got, tuple) else got
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)


def test_gpt2_tied_embeddings_count_once():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    graph = interop.trace(model, (_ids(2, 6),), dynamic_dims={"input_ids": {1: "seq"}})
    assert graph.count_params() == sum(p.numel() for p in model.parameters())
    assert interop.verify(model, graph, (_ids(1, 9, seed=3),)).ok


# a sample of tools/sweep_hf_torch.py (the full sweep: docs/capture-torch.md), one model of
# each kind the fallback matters for: an MoE through the experts rewrite, an MoE with
# complex rotary embeddings, an encoder-decoder with a dynamic decoder length
@pytest.mark.slow
@pytest.mark.parametrize("name", ["Qwen3-MoE", "DeepSeek-V2", "T5"])
def test_sweep_sample(name):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "tools"))
    try:
        import sweep_hf_torch
    finally:
        sys.path.pop(0)
    result = sweep_hf_torch.run_one(name)
    assert result["capture"], result.get("capture_error")
    assert result["numerics"], result.get("numerics_error")  # two batches and lengths
    assert result["layer_tree"] and result["layers"] > 10, result
    assert result["flax"], result.get("flax_error")
    assert result["keras"], result.get("keras_error")
    if name != "T5":  # MoE: the plain torch.onnx export fails where the rewrites succeed
        assert "rewrites" in result["path"] and not result["onnx_capture"]
