"""Sweep: every Flax model class of Hugging Face transformers 4.x that builds from a tiny
random config -> interop.trace -> ONNX Runtime vs the Flax call -> to_torch / to_keras /
to_flax vs the Flax call.

transformers 5 dropped its Flax models, so this runs in its own environment (the main
venv keeps 5.x); .ci/run makes it the same way for its sample:

    python3.11 -m venv /tmp/hf4venv
    grep -v '^transformers==' .ci/constraints.txt > /tmp/constraints-hf4.txt
    /tmp/hf4venv/bin/pip install -c /tmp/constraints-hf4.txt torch==2.13.0
    /tmp/hf4venv/bin/pip install -c /tmp/constraints-hf4.txt -e '.[all]' "transformers==4.57.*"
    JAX_PLATFORMS=cpu /tmp/hf4venv/bin/python tools/sweep_hf_flax.py [--out results.json] \
        [--only BERT Llama ...] [--emit torch,keras,flax] [--check]

Per model: capture (and the capture-time ONNX checks), the layer-tree size, ONNX Runtime
against the model's own call (rtol 1e-4, atol 1e-4) at batch 2 and batch 3 (the graph is
traced with a dynamic batch), and each emitter (`interop.to_torch`, `to_keras`, `to_flax`)
against the model's own call at batch 3 (same tolerance). Weights are random (no
download). `--check` exits 1 when any model fails any of these (CI).

transformers 4.57's Flax T5 family calls ``jnp.clip(a_max=...)``, a spelling jax 0.10
removed; `_jax_compat` restores it for the sweep so that those models build at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

RTOL = ATOL = 1e-4
TEXT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)  # fmt: skip
DECODER = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64)  # fmt: skip
SEQ2SEQ = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
               decoder_ffn_dim=37, max_position_embeddings=64)  # fmt: skip
IMAGE = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=37)  # fmt: skip


def ids(batch, seq=7, seed=0):
    return np.random.default_rng(batch + seed).integers(1, 99, (batch, seq)).astype(np.int32)


def pixels(batch, size=32):
    return np.random.default_rng(batch).standard_normal((batch, 3, size, size)).astype(np.float32)


def text(batch):
    return {"input_ids": ids(batch)}


def seq2seq(batch):
    return {"input_ids": ids(batch), "decoder_input_ids": ids(batch, 5, seed=10)}


def image(batch):
    return {"pixel_values": pixels(batch)}


def text_image(batch):
    return {"input_ids": ids(batch), "pixel_values": pixels(batch)}


# name -> (config class, model class, config kwargs, inputs(batch))
CASES = {
    "BERT": ("BertConfig", "FlaxBertModel", TEXT, text),
    "RoBERTa": ("RobertaConfig", "FlaxRobertaModel", TEXT, text),
    "XLM-RoBERTa": ("XLMRobertaConfig", "FlaxXLMRobertaModel", TEXT, text),
    "ELECTRA": ("ElectraConfig", "FlaxElectraModel", {**TEXT, "embedding_size": 16}, text),
    "ALBERT": ("AlbertConfig", "FlaxAlbertModel", {**TEXT, "embedding_size": 16}, text),
    "DistilBERT": ("DistilBertConfig", "FlaxDistilBertModel",
                   dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37), text),
    "RoFormer": ("RoFormerConfig", "FlaxRoFormerModel", TEXT, text),
    "BigBird": ("BigBirdConfig", "FlaxBigBirdModel", {**TEXT, "attention_type": "original_full"}, text),
    "GPT-2": ("GPT2Config", "FlaxGPT2Model", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64), text),
    "GPT-Neo": ("GPTNeoConfig", "FlaxGPTNeoModel",
                dict(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4,
                     attention_types=[[["global", "local"], 1]], max_position_embeddings=64), text),
    "GPT-J": ("GPTJConfig", "FlaxGPTJModel", dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64), text),
    "OPT": ("OPTConfig", "FlaxOPTModel", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=37, max_position_embeddings=64, word_embed_proj_dim=32), text),
    "XGLM": ("XGLMConfig", "FlaxXGLMModel", dict(vocab_size=99, d_model=32, num_layers=2, attention_heads=4, ffn_dim=37, max_position_embeddings=64), text),
    "Llama": ("LlamaConfig", "FlaxLlamaModel", DECODER, text),
    "Mistral": ("MistralConfig", "FlaxMistralModel", DECODER, text),
    "Gemma": ("GemmaConfig", "FlaxGemmaModel", {**DECODER, "head_dim": 8}, text),
    "T5": ("T5Config", "FlaxT5Model", dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4), seq2seq),
    "T5 encoder": ("T5Config", "FlaxT5EncoderModel", dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4), text),
    "mT5": ("MT5Config", "FlaxMT5Model", dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4), seq2seq),
    "LongT5": ("LongT5Config", "FlaxLongT5Model", dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4), seq2seq),
    "BART": ("BartConfig", "FlaxBartModel", SEQ2SEQ, seq2seq),
    "mBART": ("MBartConfig", "FlaxMBartModel", SEQ2SEQ, seq2seq),
    "Pegasus": ("PegasusConfig", "FlaxPegasusModel", SEQ2SEQ, seq2seq),
    "Marian": ("MarianConfig", "FlaxMarianModel", {**SEQ2SEQ, "decoder_vocab_size": 99}, seq2seq),
    "Blenderbot": ("BlenderbotConfig", "FlaxBlenderbotModel", SEQ2SEQ, seq2seq),
    "BlenderbotSmall": ("BlenderbotSmallConfig", "FlaxBlenderbotSmallModel", SEQ2SEQ, seq2seq),
    "Whisper": ("WhisperConfig", "FlaxWhisperModel",
                dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                     decoder_ffn_dim=37, num_mel_bins=8, max_source_positions=16,
                     max_target_positions=16),
                lambda b: {"input_features": np.random.default_rng(b).standard_normal((b, 8, 32)).astype(np.float32),
                           "decoder_input_ids": ids(b, 5, seed=10)}),
    "Wav2Vec2": ("Wav2Vec2Config", "FlaxWav2Vec2Model",
                 dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, conv_dim=(8, 8), conv_stride=(4, 4), conv_kernel=(8, 8),
                      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, do_stable_layer_norm=True,
                      feat_extract_norm="layer"),
                 lambda b: {"input_values": np.random.default_rng(b).standard_normal((b, 400)).astype(np.float32)}),
    "ViT": ("ViTConfig", "FlaxViTModel", IMAGE, image),
    "BEiT": ("BeitConfig", "FlaxBeitModel", {**IMAGE, "use_relative_position_bias": True}, image),
    "DINOv2": ("Dinov2Config", "FlaxDinov2Model", IMAGE, image),
    "CLIP text": ("CLIPTextConfig", "FlaxCLIPTextModel", dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64), text),
    "CLIP vision": ("CLIPVisionConfig", "FlaxCLIPVisionModel", IMAGE, image),
    "BLOOM": ("BloomConfig", "FlaxBloomModel", dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4), text),
    "RoBERTa-PreLayerNorm": ("RobertaPreLayerNormConfig", "FlaxRobertaPreLayerNormModel", TEXT, text),
    "CLIP": ("CLIPConfig", "FlaxCLIPModel",
             dict(text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64),
                  vision_config=IMAGE, projection_dim=16), text_image),
    "VisionTextDualEncoder": ("VisionTextDualEncoderConfig", "FlaxVisionTextDualEncoderModel",
                              dict(vision_config={"model_type": "vit", **IMAGE},
                                   text_config={"model_type": "bert", **TEXT}, projection_dim=16),
                              text_image),
    "RegNet": ("RegNetConfig", "FlaxRegNetModel",
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8), image),
    "ResNet": ("ResNetConfig", "FlaxResNetModel",
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"), image),
}  # fmt: skip


CHECKS = ("torch", "keras", "flax")  # emitters, each against the Flax call


def _jax_compat() -> None:
    """transformers 4.57's Flax T5 / mT5 / LongT5 call ``jnp.clip(x, a_max=...)``; jax 0.10
    removed the ``a_min`` / ``a_max`` spellings (TypeError inside transformers, before any
    capture). The sweep maps them to ``min`` / ``max`` so that those models build: the
    computation is the same ``clamp``, and nothing of interop is patched."""
    import inspect

    import jax.numpy as jnp

    if "a_max" in inspect.signature(jnp.clip).parameters:
        return
    clip = jnp.clip

    def compat(arr=None, /, min=None, max=None, *, a_min=None, a_max=None, **kwargs):
        low = min if a_min is None else a_min
        high = max if a_max is None else a_max
        return clip(arr, low, high, **kwargs)

    jnp.clip = compat


def _flat(outputs):
    from interop.structure import flatten_outputs

    return [np.asarray(v) for _, v in flatten_outputs(outputs, lambda x: hasattr(x, "shape"))]


def _close(got, want):
    if len(got) != len(want):
        return False, f"{len(got)} outputs vs {len(want)}"
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return False, f"shape {a.shape} vs {b.shape}"
        if not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            return False, f"max abs diff {np.max(np.abs(a - b)):.2e}"
        worst = max(worst, float(np.max(np.abs(a - b))) if a.size else 0.0)
    return True, f"max abs diff {worst:.1e}"


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


def _emitted_outputs(framework, g, feed):
    """Emit the capture to `framework` and call it on `feed` (in the graph's input order)."""
    import interop

    inputs = [np.asarray(feed[i.name]) for i in g.inputs]
    if framework == "torch":
        import torch

        module = interop.to_torch(g)
        with torch.no_grad():
            return _flat(module(*[torch.from_numpy(a) for a in inputs]))
    if framework == "keras":
        model = interop.to_keras(g)
        return _flat(model(inputs[0] if len(inputs) == 1 else inputs))
    module = interop.to_flax(g)
    return _flat(module(*inputs))


def run_case(name, checks=CHECKS):
    import transformers

    import interop

    config_cls, model_cls, kwargs, make = CASES[name]
    row = {"model": name, "class": model_cls}
    config = getattr(transformers, config_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config, seed=0)
    inputs = make(2)
    start = time.perf_counter()
    batches = (2, 3)
    try:
        g = interop.trace(model, inputs)
    except interop.TraceError as err:
        if "dynamic_batch=False" not in str(err):
            row["capture"] = _reason(err)
            return row
        # the model fixes its batch size while tracing (a Python branch on a shape)
        try:
            g = interop.trace(model, inputs, dynamic_batch=False)
        except Exception as err2:
            row["capture"] = _reason(err2)
            return row
        row["batch"], batches = "static", (2,)
    except Exception as err:
        row["capture"] = _reason(err)
        return row
    row["capture"] = "ok"
    row["trace_s"] = round(time.perf_counter() - start, 2)
    row["layers"] = len(g.layers)
    row["nodes"] = len(list(g.model.graph))
    want = {}
    for batch in batches:
        feed = make(batch)
        want[batch] = _flat(model(**feed))
        try:
            got = g.run(**feed)
            got = got if isinstance(got, list | tuple) else [got]
            ok, detail = _close(got, want[batch])
        except Exception as err:
            ok, detail = False, _reason(err)
        row[f"ort_batch{batch}"] = "ok" if ok else detail
        row.setdefault("ort_detail", detail)
    # each emitter against the model's own call at the last batch size
    feed = make(batches[-1])
    for framework in checks:
        start = time.perf_counter()
        try:
            ok, detail = _close(_emitted_outputs(framework, g, feed), want[batches[-1]])
            row[framework] = "ok" if ok else detail
        except Exception as err:
            row[framework] = _reason(err)
        row[framework + "_s"] = round(time.perf_counter() - start, 1)
    return row


def failures(row, checks=CHECKS) -> list[str]:
    """The checks of one row that did not pass (empty: the model is fine)."""
    if row.get("capture") != "ok":
        return ["capture"]
    bad = [f"ort_batch{b}" for b in (2, 3) if row.get(f"ort_batch{b}", "ok") != "ok"]
    return bad + [c for c in checks if row.get(c) != "ok"]


def markdown(rows, checks=CHECKS) -> str:
    """The results as the table in docs/capture-flax.md."""
    head = "| model | capture | layers | nodes | ORT batch 2 / 3 (rtol 1e-4) |"
    lines = [head + "".join(f" to_{c} |" for c in checks), "|---" * (5 + len(checks)) + "|"]
    for r in rows:
        capture = r.get("capture", "")
        if capture != "ok":
            lines.append(f"| {r['model']} | {capture[:160]} |" + " |" * (3 + len(checks)))
            continue
        if r.get("batch") == "static":
            ort = f"{r['ort_batch2']} (static batch)"
        else:
            ort = f"{r['ort_batch2']} / {r['ort_batch3']}"
        emitted = "".join(f" {r.get(c, '')[:100]} |" for c in checks)
        lines.append(
            f"| {r['model']} | ok ({r['trace_s']} s) | {r['layers']} | {r['nodes']} | {ort} |"
            + emitted
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models to run (default: all)")
    parser.add_argument("--only", nargs="+", default=[], help="models to run (as the names)")
    parser.add_argument("--out", default="hf_flax_sweep.json")
    parser.add_argument(
        "--emit", default=",".join(CHECKS), help="emitters to check, comma-separated"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when any model fails any check (CI)"
    )
    args = parser.parse_args()
    names = args.names + args.only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(CASES)}")
    checks = tuple(c for c in args.emit.split(",") if c)
    _jax_compat()
    rows = []
    start = time.perf_counter()
    for name in names:
        try:
            row = run_case(name, checks)
        except Exception as err:  # the model itself does not build from the config
            row = {"model": name, "capture": f"build: {_reason(err)}"}
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows, checks))
    captured = sum(r.get("capture") == "ok" for r in rows)
    matched = sum(r.get("ort_batch2") == "ok" and r.get("ort_batch3", "ok") == "ok" for r in rows)
    emitted = ", ".join(f"{sum(r.get(c) == 'ok' for r in rows)} to_{c}" for c in checks)
    print(
        f"{captured}/{len(rows)} capture, {matched} match ORT at batch 2 and 3, {emitted} "
        f"({time.perf_counter() - start:.0f} s)"
    )
    failed = {r["model"]: failures(r, checks) for r in rows if failures(r, checks)}
    if args.check and failed:
        print(f"FAILED: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
