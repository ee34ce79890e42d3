"""Sweep every keras_hub backbone (and a few task models) through ``interop.trace``.

Each entry of ``CONFIGS`` builds a TINY model offline (random init, never
``from_preset``) and returns ``(model, example_inputs)``. Each entry runs in its
own subprocess (timeout 300 s) which builds the model, computes
``expected = model(x)``, traces it with ``interop.trace(model, x)``, runs the
graph on ONNX Runtime and compares numerics (rtol/atol 1e-4), parameter counts,
node and layer counts. Results go to JSON lines (``--out``) and a Markdown table
(``--markdown``).

    python tools/sweep_keras_hub.py --backend tensorflow \
        --out /tmp/sweep_keras_hub.jsonl --markdown docs/keras-hub.md
    python tools/sweep_keras_hub.py --only Bert GPT2      # a subset
    python tools/sweep_keras_hub.py --list                # names only

An entry that cannot be built offline raises ``Unbuildable(reason)``; the
reason is reported in the table instead of the model being skipped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, VOCAB, IMG = 2, 8, 64, 32
RTOL = ATOL = 1e-4


class Unbuildable(Exception):
    """A config that cannot be built offline; the message is the reason."""


# ---------------------------------------------------------------- helpers


def _kh():
    import keras_hub

    return keras_hub


def _m(name):
    return getattr(_kh().models, name)


def _rng():
    import numpy as np

    return np.random.default_rng(0)


def auto_inputs(model, overrides=None):
    """Example inputs from the functional inputs of ``model``.

    Unknown dims: batch -> 2, image-like inputs -> 32, everything else -> 8.
    Integer inputs named ``*mask*`` get ones, ``*segment*`` zeros, other
    integer inputs token ids in ``[0, VOCAB)``; float inputs standard normal
    (masks: ones).
    """
    import numpy as np

    overrides = overrides or {}
    rng = _rng()
    out = {}
    if isinstance(model.input, dict):
        items = list(model.input.items())
    else:
        ts = model.inputs if isinstance(model.inputs, (list, tuple)) else [model.inputs]
        items = [(t._keras_history.operation.name, t) for t in ts]
    for name, t in items:
        if name in overrides:
            out[name] = overrides[name]
            continue
        imagey = any(k in name for k in ("image", "pixel", "video", "latent"))
        shape = []
        for d, s in enumerate(t.shape):
            if s is None:
                s = BATCH if d == 0 else (IMG if imagey else SEQ)
            shape.append(int(s))
        dt = str(t.dtype)
        if "int" in dt or "bool" in dt:
            if "position" in name:  # MaskedLM's mask_positions: indices into the sequence
                a = rng.integers(0, SEQ, size=shape).astype("int32")
            elif "mask" in name:
                a = np.ones(shape, "int32")
            elif "segment" in name:
                a = np.zeros(shape, "int32")
            else:
                a = rng.integers(1, VOCAB, size=shape).astype("int32")
            if "bool" in dt:
                a = a.astype(bool)
        else:
            a = (
                np.ones(shape, "float32")
                if "mask" in name
                else rng.standard_normal(shape).astype("float32")
            )
        out[name] = a
    if not isinstance(model.input, dict) and len(out) == 1:
        return next(iter(out.values()))
    return out


def _fix_ids(x, vocab):
    """Clamp integer token-id inputs to ``vocab``."""
    if not isinstance(x, dict):
        return x
    for k, v in x.items():
        if v.dtype.kind == "i" and "mask" not in k and "segment" not in k:
            x[k] = (v % vocab).astype(v.dtype)
    return x


def backbone(name, **kw):
    """Build ``keras_hub.models.<name>`` and its auto inputs."""
    overrides = kw.pop("_inputs", None)
    vocab = kw.pop("_vocab", VOCAB)
    model = _m(name)(**kw)
    return model, _fix_ids(auto_inputs(model, overrides), vocab)


# ---------------------------------------------------------------- tiny sub-models


def tiny_resnet(**kw):
    return _m("ResNetBackbone")(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 64, 64, 64],
        stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block",
        **kw,
    )


def tiny_vit(image=IMG, **kw):
    return _m("ViTBackbone")(
        image_shape=(image, image, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        **kw,
    )


def tiny_vitdet(image=IMG):
    return _m("ViTDetBackbone")(
        hidden_size=16,
        num_layers=2,
        intermediate_dim=32,
        num_heads=2,
        global_attention_layer_indices=[1],
        patch_size=16,
        num_output_channels=8,
        window_size=2,
        image_shape=(image, image, 3),
    )


def tiny_mit():
    return _m("MiTBackbone")(
        layerwise_depths=[1, 1],
        num_layers=2,
        layerwise_num_heads=[1, 2],
        layerwise_sr_ratios=[8, 4],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[7, 3],
        layerwise_strides=[4, 2],
        hidden_dims=[16, 32],
        image_shape=(IMG, IMG, 3),
    )


def tiny_hgnetv2(out_features=("stage3", "stage4")):
    return _m("HGNetV2Backbone")(
        stem_channels=[3, 8, 8],
        stackwise_stage_filters=[
            [8, 8, 16, 1, 2, 3],
            [16, 8, 32, 1, 2, 3],
            [32, 16, 32, 1, 2, 3],
            [32, 16, 32, 1, 2, 3],
        ],
        apply_downsample=[False, True, True, True],
        use_lightweight_conv_block=[False, False, True, True],
        depths=[1, 1, 1, 1],
        hidden_sizes=[16, 32, 32, 32],
        embedding_size=8,
        use_learnable_affine_block=True,
        hidden_act="relu",
        image_shape=(None, None, 3),
        out_features=list(out_features),
    )


def clip_encoders(kind="CLIP"):
    kh = _kh()
    V = getattr(kh.models, f"{kind}VisionEncoder", None) or getattr(
        kh.layers, f"{kind}VisionEncoder"
    )
    T = getattr(kh.models, f"{kind}TextEncoder", None) or getattr(kh.layers, f"{kind}TextEncoder")
    v = V(8, 16, 2, 2, 32, image_shape=(IMG, IMG, 3), name="vision_encoder")
    t = T(VOCAB, 16, 16, 2, 2, 32, max_sequence_length=SEQ, name="text_encoder")
    return v, t


LLM = dict(vocabulary_size=VOCAB, num_layers=2, hidden_dim=16, intermediate_dim=32)
GQA = dict(LLM, num_query_heads=2, num_key_value_heads=1)
ENC = dict(LLM, num_heads=2, max_sequence_length=32)


# ---------------------------------------------------------------- configs


def _smollm(name):
    return backbone(
        name,
        vocabulary_size=VOCAB,
        hidden_dim=16,
        intermediate_dim=32,
        num_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=False,
        attention_dropout=0.0,
        rope_layer_enabled_list=[True, False],
        layer_types=["attention", "attention"],
        mlp_bias=False,
        layer_norm_epsilon=1e-6,
        max_position_embeddings=64,
        rope_theta=10000.0,
        partial_rotary_factor=1.0,
    )


def _t5gemma(name, **extra):
    return backbone(
        name,
        vocabulary_size=VOCAB,
        encoder_hidden_dim=16,
        encoder_intermediate_dim=32,
        encoder_num_layers=2,
        encoder_num_attention_heads=2,
        encoder_num_key_value_heads=1,
        encoder_head_dim=8,
        encoder_layer_types=["full_attention"] * 2,
        decoder_hidden_dim=16,
        decoder_intermediate_dim=32,
        decoder_num_layers=2,
        decoder_num_attention_heads=2,
        decoder_num_key_value_heads=1,
        decoder_head_dim=8,
        decoder_layer_types=["full_attention"] * 2,
        **extra,
    )


def _sam():
    kh = _kh()
    pe = kh.layers.SAMPromptEncoder(
        hidden_size=8,
        image_embedding_size=(2, 2),
        input_image_size=(IMG, IMG),
        mask_in_channels=16,
    )
    md = kh.layers.SAMMaskDecoder(
        num_layers=2,
        hidden_size=8,
        intermediate_dim=16,
        num_heads=2,
        embedding_dim=8,
        num_multimask_outputs=3,
        iou_head_depth=2,
        iou_head_hidden_dim=8,
    )
    import numpy as np

    return backbone(
        "SAMBackbone",
        image_encoder=tiny_vitdet(),
        prompt_encoder=pe,
        mask_decoder=md,
        _inputs={
            "points": np.ones((BATCH, 1, 2), "float32"),
            "labels": np.ones((BATCH, 1), "float32"),
            "boxes": np.ones((BATCH, 1, 2, 2), "float32"),
            "masks": np.zeros((BATCH, 0, IMG, IMG, 1), "float32"),
        },
    )


def _dfine():
    return backbone(
        "DFineBackbone",
        backbone=tiny_hgnetv2(),
        decoder_in_channels=[16, 16],
        encoder_hidden_dim=16,
        num_labels=4,
        num_denoising=0,
        learn_initial_query=False,
        num_queries=4,
        anchor_image_size=(IMG, IMG),
        feat_strides=[16, 32],
        num_feature_levels=2,
        hidden_dim=16,
        encoder_in_channels=[32, 32],
        encode_proj_layers=[1],
        num_attention_heads=2,
        encoder_ffn_dim=32,
        num_encoder_layers=1,
        hidden_expansion=0.5,
        depth_multiplier=0.5,
        eval_idx=-1,
        num_decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        decoder_n_points=[2, 2],
        lqe_hidden_dim=8,
        num_lqe_layers=2,
        out_features=["stage3", "stage4"],
        image_shape=(IMG, IMG, 3),
        seed=0,
    )


def _sd3():
    from keras_hub.src.models.clip.clip_text_encoder import CLIPTextEncoder
    from keras_hub.src.models.vae.vae_backbone import VAEBackbone

    vae = VAEBackbone([32, 32], [1, 1], [32, 32], [1, 1], sampler_method="mode", name="vae")
    clip_l = CLIPTextEncoder(
        VOCAB, 16, 16, 2, 2, 32, "quick_gelu", -2, max_sequence_length=SEQ, name="clip_l"
    )
    clip_g = CLIPTextEncoder(
        VOCAB, 32, 32, 2, 2, 64, "gelu", -2, max_sequence_length=SEQ, name="clip_g"
    )
    return backbone(
        "StableDiffusion3Backbone",
        mmdit_patch_size=2,
        mmdit_hidden_dim=32,
        mmdit_num_layers=2,
        mmdit_num_heads=2,
        mmdit_position_size=32,
        mmdit_qk_norm=None,
        mmdit_dual_attention_indices=None,
        vae=vae,
        clip_l=clip_l,
        clip_g=clip_g,
        image_shape=(IMG, IMG, 3),
    )


def _blip2():
    from keras_hub.src.models.blip2.blip2_custom_opt import BLIP2CustomOPT
    from keras_hub.src.models.blip2.blip2_qformer import BLIP2QFormer
    from keras_hub.src.models.blip2.blip2_vision_encoder import BLIP2VisionEncoder

    vision = BLIP2VisionEncoder(
        image_size=IMG,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        use_patch_bias=True,
        use_class_token=True,
        use_mha_bias=True,
        use_mlp_bias=True,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        initializer_range=0.02,
    )
    qformer = BLIP2QFormer(
        num_query_tokens=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        vision_dim=16,
        cross_attention_frequency=1,
        dropout=0.0,
        layer_norm_epsilon=1e-6,
    )
    lm = BLIP2CustomOPT(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_query_tokens=4,
        dropout=0.0,
        max_sequence_length=32,
        qformer_hidden_dim=16,
    )
    return backbone("BLIP2Backbone", vision_encoder=vision, qformer=qformer, language_model=lm)


def _sam3(image=56):
    import numpy as np

    L = _kh().layers
    vision = L.SAM3VisionEncoder(
        image_shape=(image, image, 3),
        patch_size=14,
        num_layers=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        fpn_hidden_dim=16,
        fpn_scale_factors=[4.0, 2.0, 1.0, 0.5],
        pretrain_image_shape=(28, 28, 3),
        window_size=2,
        global_attn_indexes=[1],
    )
    text = L.SAM3TextEncoder(
        vocabulary_size=VOCAB,
        embedding_dim=16,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        intermediate_dim=32,
    )
    geometry = L.SAM3GeometryEncoder(
        num_layers=2, hidden_dim=16, intermediate_dim=32, num_heads=2, roi_size=7
    )
    detr_enc = L.SAM3DetrEncoder(num_layers=2, hidden_dim=16, intermediate_dim=32, num_heads=2)
    detr_dec = L.SAM3DetrDecoder(
        image_shape=(image, image, 3),
        patch_size=14,
        num_layers=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        num_queries=8,
    )
    mask_dec = L.SAM3MaskDecoder(num_upsampling_stages=3, hidden_dim=16, num_heads=2)
    return backbone(
        "SAM3PromptableConceptBackbone",
        vision_encoder=vision,
        text_encoder=text,
        geometry_encoder=geometry,
        detr_encoder=detr_enc,
        detr_decoder=detr_dec,
        mask_decoder=mask_dec,
        _inputs={
            "boxes": np.zeros((BATCH, 1, 5), "float32"),
            "box_labels": np.zeros((BATCH, 1), "int32"),
        },
    )


CONFIGS = {
    "AlbertBackbone": lambda: backbone("AlbertBackbone", **ENC, embedding_dim=16),
    "BASNetBackbone": lambda: backbone(
        "BASNetBackbone",
        image_encoder=tiny_resnet(),
        num_classes=2,
        image_shape=(IMG, IMG, 3),
        projection_filters=64,
    ),
    "BLIP2Backbone": _blip2,
    "BartBackbone": lambda: backbone("BartBackbone", **ENC),
    "BertBackbone": lambda: backbone("BertBackbone", **ENC),
    "BloomBackbone": lambda: backbone("BloomBackbone", **LLM, num_heads=2),
    "CLIPBackbone": lambda: backbone(
        "CLIPBackbone",
        **dict(zip(("vision_encoder", "text_encoder"), clip_encoders("CLIP"))),
        projection_dim=16,
    ),
    "CSPNetBackbone": lambda: backbone(
        "CSPNetBackbone",
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=2,
        stackwise_depth=[1, 1],
        stackwise_strides=[1, 2],
        stackwise_num_filters=[8, 16],
        block_type="dark_block",
        stage_type="dark",
        image_shape=(IMG, IMG, 3),
    ),
    "DFineBackbone": _dfine,
    "DINOV2Backbone": lambda: backbone(
        "DINOV2Backbone",
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(IMG, IMG, 3),
        position_embedding_shape=(IMG, IMG, 3),
    ),
    "DINOV3Backbone": lambda: backbone(
        "DINOV3Backbone",
        patch_size=8,
        num_layers=2,
        hidden_dim=16,
        num_heads=2,
        intermediate_dim=32,
        image_shape=(IMG, IMG, 3),
    ),
    "DebertaV3Backbone": lambda: backbone("DebertaV3Backbone", **ENC, bucket_size=4),
    "DeepLabV3Backbone": lambda: backbone(
        "DeepLabV3Backbone",
        image_encoder=tiny_resnet(),
        spatial_pyramid_pooling_key="P4",
        upsampling_size=4,
        dilation_rates=[1, 2],
        low_level_feature_key="P2",
        projection_filters=8,
        image_shape=(IMG, IMG, 3),
    ),
    "DeiTBackbone": lambda: backbone(
        "DeiTBackbone",
        image_shape=(IMG, IMG, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
    ),
    "DenseNetBackbone": lambda: backbone(
        "DenseNetBackbone", stackwise_num_repeats=[1, 1], image_shape=(IMG, IMG, 3), growth_rate=8
    ),
    "DepthAnythingBackbone": lambda: backbone(
        "DepthAnythingBackbone",
        image_encoder=_m("DINOV2Backbone")(
            patch_size=14,
            num_layers=4,
            hidden_dim=16,
            num_heads=2,
            intermediate_dim=32,
            image_shape=(140, 140, 3),
            position_embedding_shape=(140, 140, 3),
        ),
        reassemble_factors=[4, 2, 1, 0.5],
        neck_hidden_dims=[8, 8, 8, 8],
        fusion_hidden_dim=8,
        head_hidden_dim=8,
        head_in_index=-1,
        feature_keys=["stage1", "stage2", "stage3", "stage4"],
    ),
    "DistilBertBackbone": lambda: backbone("DistilBertBackbone", **ENC),
    "ESM2Backbone": lambda: backbone("ESM2Backbone", **ENC),
    "ESMBackbone": lambda: backbone("ESMBackbone", **ENC),
    "EdRecBackbone": lambda: backbone(
        "EdRecBackbone",
        vocab_size=VOCAB,
        num_layers_enc=2,
        num_layers_dec=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
    ),
    "EfficientNetBackbone": lambda: backbone(
        "EfficientNetBackbone",
        stackwise_width_coefficients=[1.0, 1.0],
        stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 2],
        stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"],
        stackwise_force_input_filters=[0, 0],
        stackwise_nores_option=[False, False],
        input_shape=(IMG, IMG, 3),
        num_features=32,
    ),
    "ElectraBackbone": lambda: backbone(
        "ElectraBackbone",
        vocab_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        embedding_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    ),
    "FNetBackbone": lambda: backbone("FNetBackbone", **LLM, max_sequence_length=32),
    "FalconBackbone": lambda: backbone("FalconBackbone", **LLM, num_attention_heads=2),
    "FluxBackbone": lambda: backbone(
        "FluxBackbone",
        input_channels=16,
        hidden_size=32,
        mlp_ratio=2.0,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        axes_dim=[4, 6, 6],
        theta=10000,
        use_bias=True,
        image_shape=(SEQ, 16),
        text_shape=(SEQ, 16),
        image_ids_shape=(SEQ, 3),
        text_ids_shape=(SEQ, 3),
        y_shape=(16,),
    ),
    "GPT2Backbone": lambda: backbone("GPT2Backbone", **ENC),
    "GPTNeoXBackbone": lambda: backbone("GPTNeoXBackbone", **ENC),
    "Gemma3Backbone": lambda: backbone("Gemma3Backbone", **GQA, image_size=IMG, head_dim=8),
    "Gemma3nBackbone": lambda: backbone(
        "Gemma3nBackbone",
        text_vocab_size=VOCAB,
        text_hidden_size=16,
        num_hidden_layers=2,
        pad_token_id=0,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=[32, 32],
        hidden_activation="gelu_approximate",
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
        rope_theta=10000.0,
        max_position_embeddings=64,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=4,
        altup_num_inputs=2,
        laurel_rank=2,
    ),
    "Gemma4Backbone": lambda: backbone(
        "Gemma4Backbone",
        **GQA,
        image_size=IMG,
        head_dim=8,
        sliding_window_size=4,
        sliding_window_pattern=2,
    ),
    "GemmaBackbone": lambda: backbone("GemmaBackbone", **GQA, head_dim=8),
    "GptOssBackbone": lambda: backbone("GptOssBackbone", **GQA, num_experts=4, top_k=2, head_dim=8),
    "HGNetV2Backbone": lambda: (lambda m: (m, auto_inputs(m)))(tiny_hgnetv2()),
    "Llama3Backbone": lambda: backbone("Llama3Backbone", **GQA),
    "LlamaBackbone": lambda: backbone("LlamaBackbone", **GQA),
    "MetaCLIP2Backbone": lambda: backbone(
        "MetaCLIP2Backbone",
        **dict(zip(("vision_encoder", "text_encoder"), clip_encoders("MetaCLIP2"))),
        projection_dim=16,
    ),
    "MiTBackbone": lambda: (lambda m: (m, auto_inputs(m)))(tiny_mit()),
    "MistralBackbone": lambda: backbone("MistralBackbone", **GQA, sliding_window=4),
    "MixtralBackbone": lambda: backbone(
        "MixtralBackbone", **GQA, num_experts=4, top_k=2, sliding_window=4
    ),
    "MobileNetBackbone": lambda: backbone(
        "MobileNetBackbone",
        stackwise_expansion=[[1], [2]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[8], [16]],
        stackwise_kernel_size=[[3], [3]],
        stackwise_num_strides=[[2], [2]],
        stackwise_se_ratio=[[None], [0.25]],
        stackwise_activation=[["relu"], ["hard_swish"]],
        stackwise_padding=[[1], [1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=1,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=None,
        image_shape=(IMG, IMG, 3),
        input_num_filters=8,
    ),
    "MobileNetV5Backbone": lambda: backbone(
        "MobileNetV5Backbone",
        stackwise_block_types=[["er"], ["uir"]],
        stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[16], [32]],
        stackwise_strides=[[2], [2]],
        stackwise_act_layers=[["relu"], ["gelu"]],
        stackwise_exp_ratios=[[2.0], [2.0]],
        stackwise_se_ratios=[[0.0], [0.0]],
        stackwise_dw_kernel_sizes=[[0], [0]],
        stackwise_dw_start_kernel_sizes=[[0], [3]],
        stackwise_dw_end_kernel_sizes=[[0], [0]],
        stackwise_exp_kernel_sizes=[[3], [0]],
        stackwise_pw_kernel_sizes=[[1], [0]],
        stackwise_num_heads=[[0], [0]],
        stackwise_key_dims=[[0], [0]],
        stackwise_value_dims=[[0], [0]],
        stackwise_kv_strides=[[0], [0]],
        stackwise_use_cpe=[[False], [False]],
        stem_size=8,
        num_features=32,
        msfa_indices=(0, 1),
        msfa_output_resolution=4,
        image_shape=(IMG, IMG, 3),
    ),
    "MoonshineBackbone": lambda: backbone(
        "MoonshineBackbone",
        vocabulary_size=VOCAB,
        filter_dim=16,
        encoder_num_layers=2,
        decoder_num_layers=2,
        hidden_dim=16,
        intermediate_dim=32,
        encoder_num_heads=2,
        decoder_num_heads=2,
        _inputs={
            "encoder_input_values": _rng().standard_normal((BATCH, 1600, 1)).astype("float32"),
            "encoder_padding_mask": __import__("numpy").ones((BATCH, 1600), bool),
        },
    ),
    "OPTBackbone": lambda: backbone("OPTBackbone", **ENC),
    "PARSeqBackbone": lambda: backbone(
        "PARSeqBackbone",
        image_encoder=_m("ViTBackbone")(
            image_shape=(IMG, IMG * 2, 3),
            patch_size=(8, 8),
            num_layers=2,
            num_heads=2,
            hidden_dim=16,
            mlp_dim=32,
            use_class_token=False,
        ),
        vocabulary_size=VOCAB,
        max_label_length=SEQ,
        decoder_hidden_dim=16,
        num_decoder_layers=1,
        num_decoder_heads=2,
        decoder_mlp_dim=32,
    ),
    "PaliGemmaBackbone": lambda: backbone(
        "PaliGemmaBackbone",
        **GQA,
        image_size=16,
        head_dim=8,
        vit_patch_size=8,
        vit_num_heads=2,
        vit_hidden_dim=16,
        vit_num_layers=2,
        vit_intermediate_dim=32,
    ),
    "Phi3Backbone": lambda: backbone("Phi3Backbone", **GQA),
    "Qwen2Backbone": lambda: backbone("Qwen2Backbone", **GQA),
    "Qwen3Backbone": lambda: backbone("Qwen3Backbone", **GQA, head_dim=8),
    "Qwen3MoeBackbone": lambda: backbone(
        "Qwen3MoeBackbone", **GQA, moe_intermediate_dim=16, num_experts=4, top_k=2, head_dim=8
    ),
    "Qwen3_5Backbone": lambda: backbone(
        "Qwen3_5Backbone",
        **GQA,
        head_dim=8,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    ),
    "Qwen3_5MoeBackbone": lambda: backbone(
        "Qwen3_5MoeBackbone",
        **{k: v for k, v in GQA.items() if k != "intermediate_dim"},
        head_dim=8,
        moe_intermediate_dim=16,
        shared_expert_intermediate_size=16,
        num_experts=4,
        top_k=2,
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
    ),
    "QwenBackbone": lambda: backbone("QwenBackbone", **GQA),
    "QwenMoeBackbone": lambda: backbone(
        "QwenMoeBackbone",
        **GQA,
        moe_intermediate_dim=16,
        shared_expert_intermediate_dim=16,
        num_experts=4,
        top_k=2,
    ),
    "RWKV7Backbone": lambda: backbone(
        "RWKV7Backbone",
        hidden_size=16,
        head_size=8,
        num_layers=2,
        vocabulary_size=VOCAB,
        intermediate_dim=32,
        gate_lora=8,
        mv_lora=8,
        aaa_lora=8,
        decay_lora=8,
    ),
    "ResNetBackbone": lambda: (lambda m: (m, auto_inputs(m)))(
        tiny_resnet(image_shape=(IMG, IMG, 3))
    ),
    "RetinaNetBackbone": lambda: backbone(
        "RetinaNetBackbone",
        image_encoder=tiny_resnet(),
        min_level=3,
        max_level=4,
        use_p5=False,
        image_shape=(IMG, IMG, 3),
    ),
    "RobertaBackbone": lambda: backbone("RobertaBackbone", **ENC),
    "RoformerV2Backbone": lambda: backbone(
        "RoformerV2Backbone",
        **{k: v for k, v in ENC.items() if k != "max_sequence_length"},
        head_size=8,
    ),
    "SAM3PromptableConceptBackbone": _sam3,
    "SAMBackbone": _sam,
    "SegFormerBackbone": lambda: backbone(
        "SegFormerBackbone", image_encoder=tiny_mit(), projection_filters=8
    ),
    "SigLIPBackbone": lambda: backbone(
        "SigLIPBackbone", **dict(zip(("vision_encoder", "text_encoder"), clip_encoders("SigLIP")))
    ),
    "SmolLM3Backbone": lambda: _smollm("SmolLM3Backbone"),
    "SmolLMBackbone": lambda: _smollm("SmolLMBackbone"),
    "StableDiffusion3Backbone": _sd3,
    "SwinTransformerBackbone": lambda: backbone(
        "SwinTransformerBackbone",
        image_shape=(IMG, IMG, 3),
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        window_size=4,
        patch_size=4,
        drop_path=0.0,
    ),
    "T5Backbone": lambda: backbone(
        "T5Backbone", **{k: v for k, v in ENC.items() if k != "max_sequence_length"}
    ),
    "T5Gemma2Backbone": lambda: _t5gemma("T5Gemma2Backbone"),
    "T5GemmaBackbone": lambda: _t5gemma("T5GemmaBackbone"),
    "VGGBackbone": lambda: backbone(
        "VGGBackbone",
        stackwise_num_repeats=[1, 1],
        stackwise_num_filters=[8, 16],
        image_shape=(IMG, IMG, 3),
    ),
    "ViTBackbone": lambda: (lambda m: (m, auto_inputs(m)))(tiny_vit()),
    "ViTDetBackbone": lambda: (lambda m: (m, auto_inputs(m)))(tiny_vitdet()),
    "VideoPrismBackbone": lambda: backbone(
        "VideoPrismBackbone",
        num_frames=2,
        patch_size=8,
        hidden_dim=16,
        intermediate_dim=32,
        num_heads=2,
        num_spatial_layers=1,
        num_temporal_layers=1,
        num_auxiliary_layers=0,
        image_shape=(IMG, IMG, 3),
    ),
    "WhisperBackbone": lambda: backbone(
        "WhisperBackbone",
        **ENC_NOLEN,
        num_mels=8,
        max_encoder_sequence_length=16,
        max_decoder_sequence_length=SEQ,
    ),
    "XLMRobertaBackbone": lambda: backbone("XLMRobertaBackbone", **ENC),
    "XLNetBackbone": lambda: backbone(
        "XLNetBackbone", **{k: v for k, v in ENC.items() if k != "max_sequence_length"}
    ),
    "XceptionBackbone": lambda: backbone(
        "XceptionBackbone",
        stackwise_conv_filters=[[8, 16], [32, 32], [32, 32]],
        stackwise_pooling=[True, True, False],
        image_shape=(IMG, IMG, 3),
    ),
}
ENC_NOLEN = {k: v for k, v in ENC.items() if k != "max_sequence_length"}


# ---------------------------------------------------------------- task models


# task kinds built on a backbone with ``preprocessor=None``, and the arguments they need
TASK_KINDS = {
    "CausalLM": {},
    "TextClassifier": {"num_classes": 3},
    "ImageClassifier": {"num_classes": 3},
    "Seq2SeqLM": {},
    "MaskedLM": {},
    "MaskedPLM": {},
    "ProteinClassifier": {"num_classes": 3},
    "TextEmbedder": {},
    "ObjectDetector": {"num_classes": 3},
    "ImageSegmenter": {"num_classes": 3},
    "DepthEstimator": {"depth_estimation_type": "relative"},
    "AudioToText": {},
}


def _task(task, bb_entry, **kw):
    """``keras_hub.models.<task>`` on the tiny backbone of CONFIGS[bb_entry]; its inputs are
    the backbone's where the names agree (``mask_positions`` and the like made anew)."""
    bb, x = CONFIGS[bb_entry]()
    cls = _m(task)
    params = __import__("inspect").signature(cls.__init__).parameters
    if "preprocessor" not in params:
        kw.pop("preprocessor", None)
    else:
        kw["preprocessor"] = None
    if "num_classes" in kw and "num_classes" not in params:
        kw.pop("num_classes")
    model = cls(backbone=bb, **kw)
    if not isinstance(x, dict):
        ts = model.inputs if isinstance(model.inputs, (list, tuple)) else [model.inputs]
        if not isinstance(model.input, dict) and len(ts) == 1:
            return model, x
        x = {}
    return model, _fix_ids(auto_inputs(model, x), _vocab_of(bb))


def _vocab_of(bb):
    return int(getattr(bb, "vocabulary_size", None) or VOCAB)


def _task_entries():
    """Every ``keras_hub.models`` class ending in a TASK_KINDS kind (aliases once) whose
    backbone the sweep builds; those without one raise Unbuildable with the reason."""
    models = _kh().models
    entries, seen = {}, {}
    for name in sorted(dir(models)):
        kind = next((k for k in TASK_KINDS if name.endswith(k) and name != k), None)
        cls = getattr(models, name)
        if kind is None or not isinstance(cls, type) or cls in seen:
            continue
        seen[cls] = name
        prefix = name[: -len(kind)]
        bb_entry = next(
            (
                e
                for e in (f"{prefix}Backbone", f"{prefix}PromptableConceptBackbone")
                if e in CONFIGS
            ),
            None,
        )
        if bb_entry is None:
            bb_cls = getattr(getattr(cls, "backbone_cls", None), "__name__", None)
            bb_entry = bb_cls if bb_cls in CONFIGS else None
        if bb_entry is None and getattr(cls, "backbone_cls", None) is None:
            subs = ", ".join(sorted(c.__name__ for c in cls.__subclasses__()))
            reason = f"an abstract base class (no backbone_cls); its subclasses are swept: {subs}"
            entries[name] = lambda reason=reason: (_ for _ in ()).throw(Unbuildable(reason))
            continue
        if bb_entry is None:
            reason = f"no tiny {prefix}Backbone in this sweep (a base class or another backbone)"
            entries[name] = lambda reason=reason: (_ for _ in ()).throw(Unbuildable(reason))
            continue
        entries[name] = lambda n=name, e=bb_entry, k=kind: _task(n, e, **TASK_KINDS[k])
    return entries


def _gemma4_assistant():
    """The MTP draft model's one step (``call_with_cache``; its ``call`` refuses to run
    standalone) on the KV cache and hidden state of a tiny Gemma4 target: the step
    ``Gemma4CausalLM.generate(..., assistant_model=...)`` runs, wrapped in a Keras Model.
    Its centroid head routes to ``num_centroids=8`` groups of the 64 tokens in a random
    order (``token_ordering``, loaded from a preset in real use)."""
    import keras
    import numpy as np

    kh, rng = _kh(), _rng()
    text = dict(GQA, image_size=None, head_dim=8, sliding_window_size=4, sliding_window_pattern=2)
    target = kh.models.Gemma4CausalLM(backbone=_m("Gemma4Backbone")(**text), preprocessor=None)
    ids = rng.integers(1, VOCAB, (BATCH, SEQ)).astype("int32")
    hidden, cache = target._build_cache(ids, None, None, np.ones_like(ids), None)
    assistant = _m("Gemma4AssistantCausalLM")(
        backbone=_m("Gemma4Backbone")(**text, num_kv_shared_layers=2),
        backbone_hidden_size=target.backbone.hidden_dim,
        num_centroids=8,
        centroid_intermediate_top_k=2,
        use_ordered_embeddings=True,
        preprocessor=None,
    )
    assistant.token_ordering.assign(rng.permutation(VOCAB).astype("float32"))

    class DraftStep(keras.Model):
        def __init__(self, assistant, index, **kw):
            super().__init__(**kw)
            self.assistant, self.index = assistant, index

        def call(self, inputs):
            return self.assistant.call_with_cache(
                inputs["last_token_embedding"],
                inputs["last_hidden_state"],
                inputs["target_cache"],
                self.index,
            )

    scale = np.sqrt(target.backbone.hidden_dim).astype("float32")  # as the target's generate
    x = {
        "last_token_embedding": np.asarray(target.backbone.token_embedding(ids[:, -1:])) * scale,
        "last_hidden_state": np.asarray(hidden[:, -1:]),
        "target_cache": np.asarray(cache),
    }
    step = DraftStep(assistant, SEQ - 1, name="gemma4_assistant_step")
    step(x)  # builds it (a subclassed Model)
    return step, x


def _blip2_seq2seq():
    """BLIP2Seq2SeqLM needs the Flan-T5 language model (the backbone's default is OPT)."""
    bb, _ = _blip2()
    lm = _m("BLIP2FlanT5")(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        num_query_tokens=4,
        qformer_hidden_dim=16,
        dropout=0.0,
    )
    blip2 = _m("BLIP2Backbone")(
        vision_encoder=bb.vision_encoder, qformer=bb.qformer, language_model=lm
    )
    model = _m("BLIP2Seq2SeqLM")(backbone=blip2, preprocessor=None)
    return model, _fix_ids(auto_inputs(model), VOCAB)


def _parseq_causal_lm():
    """PARSeqCausalLM compiles with its tokenizer's pad id, so it gets a preprocessor: a
    tokenizer on a generated 61-character vocabulary (61 + [E], [B], [P] = the backbone's
    64 ids), no download. keras_hub's tokenizers need tensorflow-text, which keras-hub's
    --no-deps install leaves out (it pulls the full TensorFlow):
    ``pip install --no-deps tensorflow-text==2.21.1`` (or a ``--target`` on PYTHONPATH)."""
    import importlib.util
    import string

    if importlib.util.find_spec("tensorflow_text") is None:
        raise Unbuildable(
            "its tokenizer (read by compile) needs tensorflow-text: "
            "pip install --no-deps tensorflow-text"
        )
    bb, x = CONFIGS["PARSeqBackbone"]()
    chars = (string.digits + string.ascii_letters)[: VOCAB - 3]
    tokenizer = _m("PARSeqTokenizer")(vocabulary=list(chars), max_label_length=SEQ)
    preprocessor = _m("PARSeqCausalLMPreprocessor")(tokenizer=tokenizer, sequence_length=SEQ)
    return _m("PARSeqCausalLM")(backbone=bb, preprocessor=preprocessor), x


TASKS = _task_entries()
# tasks the generic recipe (``preprocessor=None`` on the family's tiny backbone) cannot build
TASKS.update(
    {
        "Gemma4AssistantCausalLM": _gemma4_assistant,
        "BLIP2Seq2SeqLM": _blip2_seq2seq,
        "PARSeqCausalLM": _parseq_causal_lm,
    }
)
CONFIGS.update(TASKS)


# ---------------------------------------------------------------- one entry (child)


def _to_numpy_tree(y):
    import numpy as np
    from keras import ops

    if isinstance(y, dict):
        return {k: _to_numpy_tree(v) for k, v in y.items()}
    if isinstance(y, (list, tuple)):
        return [_to_numpy_tree(v) for v in y]
    return np.asarray(ops.convert_to_numpy(y))


def _flatten(y, prefix=""):
    if isinstance(y, dict):
        out = []
        for k in y:  # keras keeps dict outputs in insertion/sorted order; match by key below
            out += _flatten(y[k], f"{prefix}{k}/")
        return out
    if isinstance(y, (list, tuple)):
        out = []
        for i, v in enumerate(y):
            out += _flatten(v, f"{prefix}{i}/")
        return out
    return [(prefix.rstrip("/"), y)]


def _names_in(msg):
    """Layer paths / class names mentioned in an error message."""
    import re

    paths = re.findall(r"layer '([^']+)'", msg) + re.findall(r"[\w.-]+(?:/[\w.-]+)+", msg)
    classes = re.findall(
        r"\b([A-Z][A-Za-z0-9]+(?:Layer|Attention|Block|Encoder|Decoder|Embedding|Norm|Normalization|Head|Dense|Conv\w*|Pooling\w*))\b",
        msg,
    )
    paths = [p for p in dict.fromkeys(paths) if "onnxruntime" not in p and "site-packages" not in p]
    return paths[:5], sorted(set(classes))[:5]


def _root_cause(e):
    """The innermost exception behind ``e`` (``__cause__``/``__context__``, even when
    suppressed with ``from None``), with Keras' "Exception encountered when calling"
    wrapper stripped: ``"Class: message"``."""
    import re

    seen, cur = set(), e
    while True:
        nxt = cur.__cause__ or cur.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        cur = nxt
    if cur is e:
        return None
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(cur))
    if "Exception encountered when calling" in msg:
        body = msg.split("\n\n", 1)[1] if "\n\n" in msg else msg
        msg = body.split("Arguments received by", 1)[0]
    msg = " ".join(msg.split())
    return f"{type(cur).__name__}: {msg[:300]}"


def build_only(name: str) -> dict:
    """Build the entry and call it, without tracing (a quick buildability pass)."""
    res = {"model": name, "backend": os.environ.get("KERAS_BACKEND"), "built": False}
    res["traced"] = False
    t0 = time.perf_counter()
    try:
        model, x = CONFIGS[name]()
        res["built"] = True
        res["model_params"] = int(model.count_params())
        try:
            model(x, training=False)
        except TypeError:
            model(x)
        res["failure_stage"] = "not traced"
        res["failure"] = "built and called; not traced in this run (build-only pass)"
    except Unbuildable as e:
        res["failure_stage"], res["failure"] = "build", f"unbuildable: {e}"
    except Exception as e:  # noqa: BLE001
        res["failure_stage"] = "call" if res["built"] else "build"
        res["failure"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["build_s"] = round(time.perf_counter() - t0, 2)
    return res


def run_one(name: str) -> dict:
    import numpy as np

    res = {
        "model": name,
        "backend": os.environ.get("KERAS_BACKEND"),
        "built": False,
        "traced": False,
        "ran": False,
        "numerics_ok": None,
        "params_equal": None,
    }
    t0 = time.perf_counter()
    try:
        model, x = CONFIGS[name]()
    except Unbuildable as e:
        res["failure_stage"] = "build"
        res["failure"] = f"unbuildable: {e}"
        return res
    except Exception as e:  # noqa: BLE001
        res["failure_stage"] = "build"
        res["failure"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["traceback_tail"] = traceback.format_exc()[-1500:]
        return res
    res["built"] = True
    res["build_s"] = round(time.perf_counter() - t0, 2)
    try:
        res["model_params"] = int(model.count_params())
        # inference mode, as interop captures it (SegFormer's model(x) without training=False
        # differs from its inference output)
        try:
            expected = _to_numpy_tree(model(x, training=False))
        except TypeError:
            expected = _to_numpy_tree(model(x))
    except Exception as e:  # noqa: BLE001
        res["failure_stage"] = "call"
        res["failure"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["traceback_tail"] = traceback.format_exc()[-1500:]
        return res

    import warnings

    import interop

    t = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph = interop.trace(model, x)
        res["how"] = _how_captured([str(w.message) for w in caught])
    except Exception as e:  # noqa: BLE001
        res["trace_s"] = round(time.perf_counter() - t, 2)
        msg = str(e)
        res["failure_stage"] = "trace"
        res["failure"] = f"{type(e).__name__}: {msg[:300]}"
        res["failure_paths"], res["failure_classes"] = _names_in(msg)
        res["failure_root"] = _root_cause(e)
        res["traceback_tail"] = traceback.format_exc()[-1500:]
        return res
    res["trace_s"] = round(time.perf_counter() - t, 2)
    res["traced"] = True
    try:
        res["graph_params"] = int(graph.count_params())
        res["params_equal"] = res["graph_params"] == res["model_params"]
    except Exception as e:  # noqa: BLE001
        res["params_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        g = graph.model.graph
        res["nodes"] = sum(1 for _ in g.all_nodes()) if hasattr(g, "all_nodes") else len(g)
    except Exception:  # noqa: BLE001
        res["nodes"] = None
    try:
        res["layers"] = len(list(graph.layers))
    except Exception:  # noqa: BLE001
        res["layers"] = None
    try:
        input_names = [s.name for s in graph.inputs]
        feeds = {}
        xs = (
            list(x.values())
            if isinstance(x, dict)
            else list(x if isinstance(x, (list, tuple)) else [x])
        )
        for i, n in enumerate(input_names):
            if isinstance(x, dict) and n in x:
                feeds[n] = x[n]
            else:
                feeds[n] = xs[i]
        got = graph.run(**feeds, as_dict=True)
        res["ran"] = True
    except Exception as e:  # noqa: BLE001
        res["failure_stage"] = "run"
        res["failure"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["traceback_tail"] = traceback.format_exc()[-1500:]
        return res
    try:
        import keras

        exp = _flatten(expected)
        leaf = lambda k: k.split("/")[-1]  # noqa: E731
        if all(k in got or leaf(k) in got for k, _ in exp) and len(got) == len(exp):
            res["matched_outputs_by"] = "name"
            pairs = [(k, v, got[k] if k in got else got[leaf(k)]) for k, v in exp]
        else:  # keras flattens dicts in sorted-key order
            res["matched_outputs_by"] = "order"
            flat = keras.tree.flatten(expected)
            pairs = [(str(i), e_, g) for i, (e_, g) in enumerate(zip(flat, got.values()))]
            res["graph_output_names"] = list(got)[:10]
        if len(pairs) != len(exp):
            raise ValueError(f"{len(exp)} expected outputs, graph gave {len(pairs)}")
        max_abs = max_rel = 0.0
        ok = True
        for k, e_, g in pairs:
            g = np.asarray(g)
            e_ = np.asarray(e_)
            if e_.shape != g.shape:
                raise ValueError(f"output {k}: shape {g.shape} != expected {e_.shape}")
            if e_.size == 0:
                continue
            ef, gf = e_.astype("float64"), g.astype("float64")
            d = np.abs(ef - gf)
            max_abs = max(max_abs, float(np.nanmax(d)))
            max_rel = max(max_rel, float(np.nanmax(d / (np.abs(ef) + 1e-12))))
            ok = ok and bool(np.allclose(gf, ef, rtol=RTOL, atol=ATOL, equal_nan=True))
        res["max_abs_err"] = max_abs
        res["max_rel_err"] = max_rel
        res["numerics_ok"] = ok
    except Exception as e:  # noqa: BLE001
        res["failure_stage"] = "compare"
        res["failure"] = f"{type(e).__name__}: {str(e)[:300]}"
    return res


# ---------------------------------------------------------------- driver (parent)


def _child(name, backend, timeout):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("CUDA_VISIBLE_DEVICES", "")
    t = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, __file__, "--child", name],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {
            "model": name,
            "backend": backend,
            "built": None,
            "traced": False,
            "failure_stage": "timeout",
            "failure": f"timeout after {timeout} s",
            "wall_s": round(time.perf_counter() - t, 1),
        }
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("@@RESULT ")), None)
    if line is None:
        return {
            "model": name,
            "backend": backend,
            "built": None,
            "traced": False,
            "failure_stage": "crash",
            "failure": f"child exit {p.returncode}: {p.stderr[-300:]}",
            "wall_s": round(time.perf_counter() - t, 1),
        }
    res = json.loads(line[len("@@RESULT ") :])
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


def _fmt_err(r):
    if r.get("max_abs_err") is None:
        return ""
    ok = "ok" if r.get("numerics_ok") else "FAIL"
    return f"{r['max_abs_err']:.1e} / {r['max_rel_err']:.1e} ({ok})"


def _yn(v):
    return {True: "yes", False: "no", None: "-"}.get(v, str(v))


def _how_captured(messages):
    """How interop captured the model, from the warnings its trace raised."""
    how = ["converters + symbolic calls"]
    if any("example's shapes" in m for m in messages):
        how.append("some layers at the example's shapes")
    tracers = sorted(
        {
            m.split(" backend's tracer")[0].rsplit(" ", 1)[-1]
            for m in messages
            if "backend's tracer" in m
        }
    )
    if tracers:
        how.append(f"some layers by the {'/'.join(tracers)} tracer")
    if any("symbolic variables" in m for m in messages):
        how.append("some weight computations folded")
    if any("does not hold" in m for m in messages):
        how.append("a dim made static")
    return "; ".join(how)


def markdown_table(results):
    rows = [
        "| model | backend | built | traced | how captured | max error (abs / rel) | params equal | trace s | failure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fail = (r.get("failure") or "").replace("|", "\\|").replace("\n", " ")
        if r.get("failure_stage") and fail:
            fail = f"[{r['failure_stage']}] {fail[:160]}"
            root = (r.get("failure_root") or "").replace("|", "\\|")
            if root and root not in fail:
                fail += f" — root cause: {root[:160]}"
        rows.append(
            f"| {r['model']} | {r.get('backend', '')} | {_yn(r.get('built'))} | {_yn(r.get('traced'))} "
            f"| {r.get('how', '')} "
            f"| {_fmt_err(r)} | {_yn(r.get('params_equal'))} | {r.get('trace_s', '') if r.get('traced') else ''} | {fail} |"
        )
    return "\n".join(rows)


def summary_counts(results):
    n = len(results)
    c = lambda k: sum(1 for r in results if r.get(k) is True)  # noqa: E731
    return (
        f"{n} models: {c('built')} built, {c('traced')} traced, "
        f"{c('numerics_ok')} numerically OK (rtol/atol {RTOL:g}), {c('params_equal')} with equal parameter counts"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="tensorflow", choices=["tensorflow", "jax", "torch"])
    ap.add_argument("--only", nargs="*", default=None, help="substrings of entry names")
    ap.add_argument("--out", default="/tmp/sweep_keras_hub.jsonl")
    ap.add_argument(
        "--markdown", default=None, help="write the table into this file (between markers)"
    )
    ap.add_argument(
        "--section",
        default="sweep",
        help="marker name in the markdown file (<!-- NAME:begin -->), one per backend",
    )
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--list", action="store_true")
    ap.add_argument(
        "--build-only",
        action="store_true",
        help="build and call each entry in this process, no trace (buildability, fast)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument(
        "--from-jsonl",
        nargs="*",
        default=None,
        help="render the table from existing JSONL files (a later line for a model wins)",
    )
    a = ap.parse_args(argv)

    if a.child:
        sys.path.insert(0, str(ROOT))
        r = run_one(a.child)
        print("@@RESULT " + json.dumps(r), flush=True)
        return 0

    names = sorted(CONFIGS, key=lambda n: (n in TASKS, n))
    if a.only:
        names = [n for n in names if any(s.lower() in n.lower() for s in a.only)]
    if a.list:
        print("\n".join(names))
        return 0

    if a.build_only:
        os.environ.setdefault("KERAS_BACKEND", a.backend)
        with open(a.out, "w") as f:
            for n in names:
                r = build_only(n)
                f.write(json.dumps(r) + "\n")
                f.flush()
                print(f"{n:32s} {r.get('failure', 'built and called')[:150]}", flush=True)
        return 0

    if a.from_jsonl:
        by_name = {}
        for fn in a.from_jsonl:
            for ln in Path(fn).read_text().splitlines():
                if ln.strip():
                    r = json.loads(ln)
                    by_name[(r["model"], r.get("backend"))] = r
        results = [r for r in by_name.values() if r["model"] in names]
        results.sort(key=lambda r: (r["model"] in TASKS, r["model"]))
    else:
        results = []
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "w") as f:
            if a.jobs > 1:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(a.jobs) as ex:
                    for r in ex.map(lambda n: _child(n, a.backend, a.timeout), names):
                        results.append(r)
                        f.write(json.dumps(r) + "\n")
                        f.flush()
                        print(f"{r['model']:32s} {r.get('failure_stage') or 'ok'}", flush=True)
            else:
                for n in names:
                    r = _child(n, a.backend, a.timeout)
                    results.append(r)
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                    print(
                        f"{n:32s} built={_yn(r.get('built'))} traced={_yn(r.get('traced'))} "
                        f"num={_yn(r.get('numerics_ok'))} params={_yn(r.get('params_equal'))} "
                        f"{r.get('wall_s')}s {r.get('failure', '')[:120]}",
                        flush=True,
                    )
    table = markdown_table(results)
    print(table)
    print(summary_counts(results))
    if a.markdown:
        p = Path(a.markdown)
        begin, end = f"<!-- {a.section}:begin -->", f"<!-- {a.section}:end -->"
        body = f"{begin}\n{summary_counts(results)}.\n\n{table}\n{end}"
        text = p.read_text() if p.exists() else ""
        if begin in text:
            pre, rest = text.split(begin, 1)
            post = rest.split(end, 1)[1] if end in rest else ""
            p.write_text(pre + body + post)
        else:  # a new section at the end, never over the page
            p.write_text(text + ("\n" if text else "") + body + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
