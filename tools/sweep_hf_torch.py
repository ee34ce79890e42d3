"""Sweep: Hugging Face transformers 5 architectures from tiny random configs -> interop.trace,
next to a bare ``torch.onnx.export(dynamo=True)`` of the same model.

    nice -n 10 python tools/sweep_hf_torch.py [--out /tmp/sweep.jsonl] [--timeout 300] [names...]
    python tools/sweep_hf_torch.py --table /tmp/sweep.jsonl     # the markdown table of a run

Each model runs in its own process (forked after the frameworks are imported, killed at
the timeout). Per model:

- capture: ``interop.trace`` with a dynamic batch and the sequence axes named dynamic, and
  which path captured it (torch.export, torch.export with rewrites, TorchScript);
- numerics: ONNX Runtime against the eager model (rtol 1e-4, atol 1e-4) on the example
  input (batch 2) and on a second input of another batch (3) and sequence length;
- the layer tree: the graph's layers include the model's top-level submodules and its
  parameter count equals the model's;
- emission: ``interop.to_flax`` and ``interop.to_keras`` of the graph against eager on the
  example input (same tolerance);
- bare torch.onnx: ``torch.onnx.export(dynamo=True)`` with the same dynamic axes, then
  ONNX Runtime against eager on both inputs.

Weights are random (no download). Results: one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RTOL = ATOL = 1e-4
DEC = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64,
           head_dim=8, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
MOE = dict(intermediate_size=48, num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=20, n_routed_experts=4, n_shared_experts=1,
           first_k_dense_replace=1, moe_k=2, moe_num_experts=4, num_experts_per_token=2,
           n_group=1, topk_group=1, norm_topk_prob=True, decoder_sparse_step=1)  # fmt: skip
MLA = dict(kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, qk_head_dim=16, head_dim=8)  # fmt: skip
ENC = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)  # fmt: skip
S2S = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
           decoder_ffn_dim=37, max_position_embeddings=64, use_cache=False, pad_token_id=0,
           bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)  # fmt: skip
T5 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2,
          num_heads=4, use_cache=False, decoder_start_token_id=0)  # fmt: skip
VIS = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=4, intermediate_size=37)  # fmt: skip
CNN = dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
AUDIO = dict(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, conv_dim=(16, 16), conv_stride=(4, 4), conv_kernel=(8, 8),
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=False,
             feat_extract_norm="group")  # fmt: skip


# ------------------------------------------------------------------------------ inputs
def _ids(batch, seq, seed=0, high=99):
    import torch

    g = torch.Generator().manual_seed(1000 * batch + seq + seed)
    return torch.randint(3, high, (batch, seq), generator=g)


def _floats(*shape, seed=0):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + seed))


def text(batch, seq):
    return {"input_ids": _ids(batch, seq)}, {"input_ids": {1: "seq"}}


def text_mask(batch, seq):
    import torch

    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # a padded row
    return {"input_ids": _ids(batch, seq), "attention_mask": mask}, {
        "input_ids": {1: "seq"},
        "attention_mask": {1: "seq"},
    }


def seq2seq(batch, seq):
    return {"input_ids": _ids(batch, seq), "decoder_input_ids": _ids(batch, seq - 2, seed=5)}, {
        "input_ids": {1: "seq"},
        "decoder_input_ids": {1: "decoder_seq"},
    }


def image(batch, seq, size=32):
    return {"pixel_values": _floats(batch, 3, size, size)}, {}


def image64(batch, seq):
    return image(batch, seq, 64)


def wave(batch, seq):
    return {"input_values": _floats(batch, 40 * seq)}, {"input_values": {1: "samples"}}


def whisper(batch, seq):
    return {
        "input_features": _floats(batch, 16, 60),
        "decoder_input_ids": _ids(batch, seq - 2, seed=5),
    }, {"decoder_input_ids": {1: "decoder_seq"}}


def speech2text(batch, seq):
    return {
        "input_features": _floats(batch, 4 * seq, 16),
        "decoder_input_ids": _ids(batch, seq - 2, seed=5),
    }, {"input_features": {1: "frames"}, "decoder_input_ids": {1: "decoder_seq"}}


def ast_spec(batch, seq):
    return {"input_values": _floats(batch, 32, 16)}, {}


def text_image(batch, seq):
    ids, dims = text(batch, seq)
    return {**ids, "pixel_values": _floats(batch, 3, 32, 32)}, dims


def seq2seq_mask(batch, seq):
    import torch

    inputs, dims = seq2seq(batch, seq)
    inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
    return inputs, {**dims, "attention_mask": {1: "seq"}}


def vision2text(batch, seq):
    return {
        "pixel_values": _floats(batch, 3, 32, 32),
        "decoder_input_ids": _ids(batch, seq - 2, seed=5),
    }, {"decoder_input_ids": {1: "decoder_seq"}}


# ------------------------------------------------------------------------------- cases
def _clip(config_name, text_config=None, vision_config=None, **extra):
    def make(T):
        tc = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=37, max_position_embeddings=64, projection_dim=16)  # fmt: skip
        vc = dict(VIS, projection_dim=16)
        return getattr(T, config_name)(
            text_config={**tc, **(text_config or {})},
            vision_config={**vc, **(vision_config or {})},
            projection_dim=16,
            **extra,
        )

    return make


def _vision_encoder_decoder(T):
    return T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        T.ViTConfig(**VIS),
        T.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False
        ),
    )


# name -> (family, config class or factory, model class, config kwargs, inputs)
CASES: dict[str, tuple] = {
    # mixture of experts
    "Mixtral": ("moe", "MixtralConfig", "MixtralForCausalLM", {**DEC, **MOE}, text),
    "Qwen2-MoE": ("moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**DEC, **MOE}, text),
    "Qwen3-MoE": ("moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**DEC, **MOE}, text),
    "OLMoE": ("moe", "OlmoeConfig", "OlmoeForCausalLM", {**DEC, **MOE}, text),
    "DeepSeek-V2": (
        "moe",
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {**DEC, **MOE, **MLA, "num_key_value_heads": 4},
        text,
    ),
    "DeepSeek-V3": (
        "moe",
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {**DEC, **MOE, **MLA, "num_key_value_heads": 4},
        text,
    ),
    "GPT-OSS": (
        "moe",
        "GptOssConfig",
        "GptOssForCausalLM",
        {**DEC, **MOE, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4},
        text,
    ),  # fmt: skip
    "PhiMoE": ("moe", "PhimoeConfig", "PhimoeForCausalLM", {**DEC, **MOE}, text),
    "GraniteMoE": ("moe", "GraniteMoeConfig", "GraniteMoeForCausalLM", {**DEC, **MOE}, text),
    "GraniteMoE-shared": (
        "moe",
        "GraniteMoeSharedConfig",
        "GraniteMoeSharedForCausalLM",
        {**DEC, **MOE},
        text,
    ),  # fmt: skip
    "HunYuan-MoE": ("moe", "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", {**DEC, **MOE}, text),
    "Ernie-4.5-MoE": (
        "moe",
        "Ernie4_5_MoeConfig",
        "Ernie4_5_MoeForCausalLM",
        {**DEC, **MOE, "moe_layer_start_index": 0},
        text,
    ),  # fmt: skip
    "GLM-4-MoE": ("moe", "Glm4MoeConfig", "Glm4MoeForCausalLM", {**DEC, **MOE}, text),
    "dots1": ("moe", "Dots1Config", "Dots1ForCausalLM", {**DEC, **MOE}, text),
    "FlexOlmo": ("moe", "FlexOlmoConfig", "FlexOlmoForCausalLM", {**DEC, **MOE}, text),
    "Llama4": (
        "moe",
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            **DEC,
            **MOE,
            "intermediate_size_mlp": 48,
            "interleave_moe_layer_step": 1,
            "attention_chunk_size": 64,
            "num_key_value_heads": 4,
        },
        text,
    ),  # fmt: skip
    "DBRX": (
        "moe",
        "DbrxConfig",
        "DbrxForCausalLM",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=2,
            max_seq_len=64,
            vocab_size=99,
            use_cache=False,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 2},
        ),
        text,
    ),  # fmt: skip
    "JetMoE": (
        "moe",
        "JetMoeConfig",
        "JetMoeForCausalLM",
        {**DEC, **MOE, "kv_channels": 8, "num_key_value_heads": 4},
        text,
    ),  # fmt: skip
    # encoder-decoders
    "T5": ("encoder-decoder", "T5Config", "T5ForConditionalGeneration", T5, seq2seq),
    "MT5": ("encoder-decoder", "MT5Config", "MT5ForConditionalGeneration", T5, seq2seq),
    "UMT5": ("encoder-decoder", "UMT5Config", "UMT5ForConditionalGeneration", T5, seq2seq),
    "LongT5": ("encoder-decoder", "LongT5Config", "LongT5ForConditionalGeneration", T5, seq2seq),
    "BART": ("encoder-decoder", "BartConfig", "BartForConditionalGeneration", S2S, seq2seq),
    "mBART": ("encoder-decoder", "MBartConfig", "MBartForConditionalGeneration", S2S, seq2seq),
    "Marian": ("encoder-decoder", "MarianConfig", "MarianMTModel", S2S, seq2seq),
    "Pegasus": (
        "encoder-decoder",
        "PegasusConfig",
        "PegasusForConditionalGeneration",
        S2S,
        seq2seq,
    ),
    "PLBart": ("encoder-decoder", "PLBartConfig", "PLBartForConditionalGeneration", S2S, seq2seq),
    "BlenderbotSmall": (
        "encoder-decoder",
        "BlenderbotSmallConfig",
        "BlenderbotSmallForConditionalGeneration",
        S2S,
        seq2seq,
    ),  # fmt: skip
    "M2M100": ("encoder-decoder", "M2M100Config", "M2M100ForConditionalGeneration", S2S, seq2seq),
    "NLLB-MoE": (
        "encoder-decoder",
        "NllbMoeConfig",
        "NllbMoeForConditionalGeneration",
        {**S2S, "num_experts": 4, "expert_capacity": 8, "sparse_step": 1},
        seq2seq,
    ),  # fmt: skip
    "SwitchTransformers": (
        "encoder-decoder",
        "SwitchTransformersConfig",
        "SwitchTransformersForConditionalGeneration",
        {
            **T5,
            "num_experts": 4,
            "expert_capacity": 8,
            "num_sparse_encoder_layers": 1,
            "num_sparse_decoder_layers": 1,
        },
        seq2seq_mask,
    ),  # fmt: skip
    "Whisper": (
        "encoder-decoder",
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        {**S2S, "num_mel_bins": 16, "max_source_positions": 30, "max_target_positions": 64},
        whisper,
    ),  # fmt: skip
    "Speech2Text": (
        "encoder-decoder",
        "Speech2TextConfig",
        "Speech2TextForConditionalGeneration",
        {
            **S2S,
            "input_feat_per_channel": 16,
            "conv_channels": 16,
            "max_source_positions": 64,
            "max_target_positions": 64,
        },
        speech2text,
    ),  # fmt: skip
    # decoders
    "Llama": ("decoder", "LlamaConfig", "LlamaForCausalLM", DEC, text),
    "Mistral": ("decoder", "MistralConfig", "MistralForCausalLM", DEC, text),
    "Qwen2": ("decoder", "Qwen2Config", "Qwen2ForCausalLM", DEC, text),
    "Qwen3": ("decoder", "Qwen3Config", "Qwen3ForCausalLM", DEC, text),
    "Gemma": ("decoder", "GemmaConfig", "GemmaForCausalLM", DEC, text),
    "Gemma2": ("decoder", "Gemma2Config", "Gemma2ForCausalLM", DEC, text),
    "Gemma3": ("decoder", "Gemma3TextConfig", "Gemma3ForCausalLM", DEC, text),
    "Phi": ("decoder", "PhiConfig", "PhiForCausalLM", DEC, text),
    "Phi3": ("decoder", "Phi3Config", "Phi3ForCausalLM", DEC, text),
    "GPT-2": (
        "decoder",
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False),
        text,
    ),  # fmt: skip
    "GPT-Neo": (
        "decoder",
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            vocab_size=99,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            use_cache=False,
            attention_types=[[["global", "local"], 1]],
            max_position_embeddings=64,
        ),
        text,
    ),  # fmt: skip
    "GPT-NeoX": ("decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM", DEC, text),
    "GPT-J": (
        "decoder",
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=64,
            use_cache=False,
        ),
        text,
    ),  # fmt: skip
    "OPT": ("decoder", "OPTConfig", "OPTForCausalLM", {**DEC, "ffn_dim": 37}, text),
    "BLOOM": (
        "decoder",
        "BloomConfig",
        "BloomForCausalLM",
        dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4, use_cache=False),
        text_mask,
    ),  # fmt: skip
    "Falcon": (
        "decoder",
        "FalconConfig",
        "FalconForCausalLM",
        {k: v for k, v in DEC.items() if k != "head_dim"},
        text,
    ),
    "StableLM": ("decoder", "StableLmConfig", "StableLmForCausalLM", DEC, text),
    "Starcoder2": ("decoder", "Starcoder2Config", "Starcoder2ForCausalLM", DEC, text),
    "OLMo2": ("decoder", "Olmo2Config", "Olmo2ForCausalLM", DEC, text),
    "Cohere": ("decoder", "CohereConfig", "CohereForCausalLM", DEC, text),
    "Granite": ("decoder", "GraniteConfig", "GraniteForCausalLM", DEC, text),
    "CodeGen": (
        "decoder",
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(
            vocab_size=99,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=64,
            use_cache=False,
        ),
        text,
    ),  # fmt: skip
    "GPTBigCode": (
        "decoder",
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False),
        text,
    ),  # fmt: skip
    "SmolLM3": ("decoder", "SmolLM3Config", "SmolLM3ForCausalLM", DEC, text),
    # encoders
    "BERT": ("encoder", "BertConfig", "BertModel", ENC, text_mask),
    "RoBERTa": ("encoder", "RobertaConfig", "RobertaModel", ENC, text_mask),
    "DistilBERT": (
        "encoder",
        "DistilBertConfig",
        "DistilBertModel",
        dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37),
        text_mask,
    ),  # fmt: skip
    "ALBERT": ("encoder", "AlbertConfig", "AlbertModel", {**ENC, "embedding_size": 16}, text_mask),
    "ELECTRA": (
        "encoder",
        "ElectraConfig",
        "ElectraModel",
        {**ENC, "embedding_size": 16},
        text_mask,
    ),
    "DeBERTa": ("encoder", "DebertaConfig", "DebertaModel", ENC, text_mask),
    "DeBERTa-v2": ("encoder", "DebertaV2Config", "DebertaV2Model", ENC, text_mask),
    "XLM-RoBERTa": ("encoder", "XLMRobertaConfig", "XLMRobertaModel", ENC, text_mask),
    "MPNet": ("encoder", "MPNetConfig", "MPNetModel", ENC, text_mask),
    "ModernBERT": (
        "encoder",
        "ModernBertConfig",
        "ModernBertModel",
        {**ENC, "global_attn_every_n_layers": 1, "local_attention": 4},
        text_mask,
    ),  # fmt: skip
    "RoFormer": ("encoder", "RoFormerConfig", "RoFormerModel", ENC, text_mask),
    # vision
    "ViT": ("vision", "ViTConfig", "ViTModel", VIS, image),
    "DeiT": ("vision", "DeiTConfig", "DeiTModel", VIS, image),
    "BEiT": ("vision", "BeitConfig", "BeitModel", VIS, image),
    "DINOv2": ("vision", "Dinov2Config", "Dinov2Model", VIS, image),
    "Swin": (
        "vision",
        "SwinConfig",
        "SwinModel",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        ),
        image,
    ),  # fmt: skip
    "ConvNeXt": (
        "vision",
        "ConvNextConfig",
        "ConvNextModel",
        {**CNN, "depths": [1, 1, 1, 1], "hidden_sizes": [8, 8, 16, 16]},
        image,
    ),
    "ResNet": ("vision", "ResNetConfig", "ResNetModel", CNN, image),
    "RegNet": ("vision", "RegNetConfig", "RegNetModel", {**CNN, "groups_width": 8}, image),
    "MobileNetV2": (
        "vision",
        "MobileNetV2Config",
        "MobileNetV2Model",
        dict(image_size=32, depth_multiplier=0.25),
        image,
    ),  # fmt: skip
    "SegFormer": (
        "vision",
        "SegformerConfig",
        "SegformerModel",
        dict(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            num_attention_heads=[1, 2],
            patch_sizes=[7, 3],
            strides=[4, 2],
            mlp_ratios=[2, 2],
        ),
        image,
    ),  # fmt: skip
    "PoolFormer": (
        "vision",
        "PoolFormerConfig",
        "PoolFormerModel",
        dict(
            depths=[1, 1],
            hidden_sizes=[16, 32],
            num_encoder_blocks=2,
            patch_sizes=[7, 3],
            strides=[4, 2],
            padding=[2, 1],
        ),
        image,
    ),  # fmt: skip
    "YOLOS": (
        "vision",
        "YolosConfig",
        "YolosModel",
        {**VIS, "image_size": [32, 32], "num_detection_tokens": 5},
        image,
    ),
    # audio
    "Wav2Vec2": ("audio", "Wav2Vec2Config", "Wav2Vec2Model", AUDIO, wave),
    "HuBERT": ("audio", "HubertConfig", "HubertModel", AUDIO, wave),
    "WavLM": ("audio", "WavLMConfig", "WavLMModel", AUDIO, wave),
    "Data2VecAudio": ("audio", "Data2VecAudioConfig", "Data2VecAudioModel", AUDIO, wave),
    "AST": (
        "audio",
        "ASTConfig",
        "ASTModel",
        {
            **VIS,
            "max_length": 32,
            "num_mel_bins": 16,
            "frequency_stride": 4,
            "time_stride": 4,
            "patch_size": 8,
        },
        ast_spec,
    ),  # fmt: skip
    # multimodal
    "CLIP": ("multimodal", _clip("CLIPConfig"), "CLIPModel", {}, text_image),
    "SigLIP": ("multimodal", _clip("SiglipConfig"), "SiglipModel", {}, text_image),
    "ChineseCLIP": (
        "multimodal",
        _clip("ChineseCLIPConfig", {"type_vocab_size": 2}),
        "ChineseCLIPModel",
        {},
        text_image,
    ),  # fmt: skip
    "VisionEncoderDecoder": (
        "multimodal",
        _vision_encoder_decoder,
        "VisionEncoderDecoderModel",
        {},
        vision2text,
    ),  # fmt: skip
}


# the default run (63 architectures, 20 min to an hour on two shared cores); --all adds these
EXTRA = {"GPT-Neo", "GPT-J", "StableLM", "Starcoder2", "OLMo2", "Cohere", "Granite", "CodeGen",
         "GPTBigCode", "SmolLM3", "Gemma2", "Qwen2", "Phi3", "GPT-NeoX", "MobileNetV2", "SegFormer", "RoFormer", "XLM-RoBERTa", "MPNet", "BEiT",
         "DINOv2", "RegNet", "PoolFormer", "Data2VecAudio", "UMT5", "PLBart"}  # fmt: skip
DEFAULT = [name for name in CASES if name not in EXTRA]


# ------------------------------------------------------------------------------ one model
def build(name):
    import torch
    import transformers as T

    family, config_cls, model_cls, kwargs, inputs = CASES[name]
    config = config_cls(T) if callable(config_cls) else getattr(T, config_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(T, model_cls)(config).eval()
    return model, inputs


def _flat(outputs):
    from interop.adapters.torch.capture import flatten_module_outputs

    return [t.detach().numpy() for _, t in flatten_module_outputs(outputs)]


def _close(got, want):
    import numpy as np

    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    worst = 0.0
    for a, b in zip(got, want):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return f"shape {a.shape} instead of {b.shape}"
        if not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            return f"max abs error {float(np.max(np.abs(a.astype(float) - b.astype(float)))):.3g}"
        if a.size and a.dtype.kind == "f":
            worst = max(worst, float(np.max(np.abs(a.astype(float) - b.astype(float)))))
    return None


def _short(err):
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text[:300]


def run_one(name):
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import torch

    import interop
    from interop.conversion import run_native
    from interop.runtime import prepare_inputs

    family = CASES[name][0]
    result = {"name": name, "family": family}
    model, make = build(name)
    result["class"] = type(model).__name__
    first, dims = make(2, 7)
    second, _ = make(3, 10)
    with torch.no_grad():
        want = [_flat(model(**first)), _flat(model(**second))]
    # interop
    t0 = time.time()
    try:
        graph = interop.trace(model, first, dynamic_dims=dims)
        result["capture"] = True
        result["path"] = graph.source.get("capture") if hasattr(graph, "source") else None
    except Exception as err:
        result["capture"], result["capture_error"] = False, _short(err)
        graph = None
    result["trace_s"] = round(time.time() - t0, 1)
    if graph is not None:
        from interop import provenance

        result["path"] = provenance.read_source(graph.model).get("capture")
        problems = []
        for label, feeds, expected in (("batch 2", first, want[0]), ("batch 3", second, want[1])):
            try:
                got = graph.run({k: v.numpy() for k, v in feeds.items() if k in _names(graph)})
                got = list(got) if isinstance(got, tuple) else [got]
                problem = _close(got, expected)
            except Exception as err:
                problem = _short(err)
            if problem:
                problems.append(f"{label}: {problem}")
        result["numerics"] = not problems
        if problems:
            result["numerics_error"] = "; ".join(problems)
        tops = {p.split(".")[0] for p, _ in model.named_modules() if p}
        layers = {layer.path for layer in graph.layers}
        inits = set(graph.model.graph.initializers)
        aliases = {}  # tied weights: one tensor, several names; the graph keeps one of them
        for n, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), (p, []))[1].append(n)
        kept = sum(p.numel() for p, names in aliases.values() if inits & set(names))
        # parameters forward never reads (Wav2Vec2's masked_spec_embed) are not in any graph
        result["unused_params"] = sorted(
            names[0] for _, names in aliases.values() if not inits & set(names)
        )
        result["layers"] = len(layers)
        result["layer_tree"] = bool(tops & layers) and graph.count_params() == kept
        if not result["layer_tree"]:
            result["layer_tree_error"] = f"params {graph.count_params()} vs {kept} named"
        arrays = list(prepare_inputs(graph, (), {k: v.numpy() for k, v in first.items()}).values())
        for target in ("flax", "keras"):
            try:
                native = getattr(interop, f"to_{target}")(graph)
                got = [np.asarray(a) for a in run_native(native, target, arrays)]
                problem = _close(got, want[0])
            except Exception as err:
                problem = _short(err)
            result[target] = not problem
            if problem:
                result[f"{target}_error"] = problem
    # bare torch.onnx
    result.update(_bare(model, first, second, dims, want))
    return result


def _names(graph):
    return {spec.name for spec in graph.inputs}


def _bare(model, first, second, dims, want):
    import warnings

    import onnxruntime as ort
    import torch

    out = {}
    t0 = time.time()
    shapes = {
        k: {0: torch.export.Dim.DYNAMIC, **{a: torch.export.Dim.DYNAMIC for a in dims.get(k, {})}}
        for k in first
    }
    try:
        from interop.adapters.torch.capture import _cached_torchlib_registry

        with warnings.catch_warnings(), _cached_torchlib_registry():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (), kwargs=dict(first), dynamo=True, dynamic_shapes=shapes, verbose=False
            )
        out["onnx_capture"] = True
    except Exception as err:
        cause = err
        while cause.__cause__ is not None:  # torch.onnx wraps the exporter's own error
            cause = cause.__cause__
        out["onnx_capture"] = False
        out["onnx_error"] = _short(err)[:120] + (" <- " + _short(cause) if cause is not err else "")
        return out
    finally:
        out["onnx_s"] = round(time.time() - t0, 1)
    try:
        session = ort.InferenceSession(
            program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in session.get_inputs()]
        problems = []
        for feeds, expected in ((first, want[0]), (second, want[1])):
            got = session.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})
            problem = _close(got, expected)
            if problem:
                problems.append(problem)
        out["onnx_numerics"] = not problems
        if problems:
            out["onnx_numerics_error"] = "; ".join(problems)
    except Exception as err:
        out["onnx_numerics"], out["onnx_numerics_error"] = False, _short(err)
    return out


# ---------------------------------------------------------------------------------- driver
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="cases to run (default: all)")
    parser.add_argument("--out", default="/tmp/sweep_hf_torch.jsonl")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--all", action="store_true", help="every case, not only the default set")
    parser.add_argument("--one", help="run one case in this process and print its result")
    parser.add_argument("--table", help="print the markdown tables of a results file")
    args = parser.parse_args()
    if args.table:
        print(table([json.loads(line) for line in open(args.table)]))
        return
    if args.one:
        try:
            result = run_one(args.one)
        except Exception as err:
            result = {"name": args.one, "family": CASES[args.one][0], "capture": False,
                      "capture_error": "build: " + _short(err), "trace": traceback.format_exc()[-800:]}  # fmt: skip
        print("RESULT " + json.dumps(result))
        return
    names = args.names or (list(CASES) if args.all else DEFAULT)
    _preload(names)
    for name in names:
        t0 = time.time()
        result = _forked(name, args.timeout)
        result["total_s"] = round(time.time() - t0, 1)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(_line(result), flush=True)


def _preload(names):
    """Import the frameworks once; each model then runs in a forked child (own process,
    killed at the timeout) without paying about 20 s of imports on a loaded machine."""
    import flax.nnx  # noqa: F401
    import jax  # noqa: F401
    import keras  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch  # noqa: F401
    import transformers as T

    # torch.onnx's aten->ONNX registry, built once here for every child (interop's cache,
    # which the bare export below uses too: the same registry, without rebuilding it from
    # torchlib on every export, about 5 s each on a loaded machine)
    from interop.adapters.torch import capture

    import interop  # noqa: F401
    from interop.conversion import run_native  # noqa: F401

    with capture._cached_torchlib_registry():
        from torch.onnx._internal.exporter import _registration

        _registration.ONNXRegistry.from_torchlib()
    for name in names:
        config_cls, model_cls = CASES[name][1], CASES[name][2]
        getattr(T, model_cls)
        if isinstance(config_cls, str):
            getattr(T, config_cls)


def _forked(name, timeout, run=None, family=None):
    """`run(name)` (default `run_one`) in a forked child killed at `timeout`; its result dict.
    `run` and `family` let other sweeps (tools/sweep_optimize.py) reuse the fork."""
    run = run or run_one
    family = family or CASES[name][0]
    import signal
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    pid = os.fork()
    if pid == 0:  # the child: one model, its result in a file
        try:
            result = run(name)
        except BaseException as err:
            result = {"name": name, "family": family, "capture": False,
                      "capture_error": "build: " + _short(err)}  # fmt: skip
        with open(path, "w") as f:
            json.dump(result, f)
        os._exit(0)
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.5)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.unlink(path)
        return {"name": name, "family": family, "capture": False,
                "capture_error": f"timeout after {timeout} s"}  # fmt: skip
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"name": name, "family": family, "capture": False,
                "capture_error": f"the child process died (status {status})"}  # fmt: skip
    finally:
        os.unlink(path)


def _ok(result, key):
    return "yes" if result.get(key) else ("no" if key in result else "-")


def _line(r):
    return (
        f"{r['name']:<22} capture={_ok(r, 'capture')} path={r.get('path')} "
        f"numerics={_ok(r, 'numerics')} tree={_ok(r, 'layer_tree')} flax={_ok(r, 'flax')} "
        f"keras={_ok(r, 'keras')} onnx={_ok(r, 'onnx_capture')}/{_ok(r, 'onnx_numerics')} "
        f"{r.get('total_s')}s {r.get('capture_error', '')[:200]}"
    )


def _onnx_stage(error):
    """Which step of torch.onnx.export failed, from its message."""
    if "step 1/3" in error:
        return "torch.export failed"
    if "step 2/3" in error:
        return "decomposition failed"
    if "step 3/3" in error:
        return "ONNX translation failed"
    if "timeout" in error:
        return "timeout"
    return error[:80] or "not run"


def table(results):
    """Per-family counts, then one row per model (markdown); a model run twice counts once,
    its last result."""
    results = list({r["name"]: r for r in results}.values())
    families = list(dict.fromkeys(r["family"] for r in results))
    keys = ("capture", "numerics", "layer_tree", "flax", "keras", "onnx_capture", "onnx_numerics")
    rows = ["| family | models | interop capture | interop numerics (2 inputs) | layer tree "
            "| to_flax | to_keras | torch.onnx capture | torch.onnx numerics (2 inputs) |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for family in [*families, "all"]:
        group = [r for r in results if family in ("all", r["family"])]
        counts = [sum(1 for r in group if r.get(k)) for k in keys]
        label = f"**{family}**" if family == "all" else family
        rows.append(f"| {label} | {len(group)} | " + " | ".join(map(str, counts)) + " |")
    rows += ["", "| model | family | interop path | numerics | tree | flax | keras "
             "| torch.onnx | note |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        notes = [r[k] for k in ("capture_error", "numerics_error", "flax_error", "keras_error")
                 if k in r]  # fmt: skip
        if r.get("unused_params"):
            notes.append("unused by forward: " + ", ".join(r["unused_params"]))
        onnx = (
            "yes" if r.get("onnx_numerics") else ("export only" if r.get("onnx_capture") else "no")
        )
        if not r.get("onnx_capture"):
            onnx += " (" + _onnx_stage(r.get("onnx_error", "")) + ")"
        elif not r.get("onnx_numerics") and r.get("onnx_numerics_error"):
            notes.append("torch.onnx: " + r["onnx_numerics_error"])
        note = "; ".join(notes)
        rows.append(
            f"| {r['name']} | {r['family']} | {r.get('path') or 'failed'} | {_ok(r, 'numerics')} "
            f"| {_ok(r, 'layer_tree')} | {_ok(r, 'flax')} | {_ok(r, 'keras')} | {onnx} "
            f"| {note[:200].replace('|', '/')} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
