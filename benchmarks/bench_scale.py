"""Models larger than memory (issue 20): a Llama checkpoint in safetensors shards, per stage.

The script writes a Llama-architecture checkpoint of random weights into safetensors shards
(streamed, one tensor at a time), then runs each stage in a fresh Python process so that
its peak resident memory (ru_maxrss, mapped weight pages included) is its own:

- trace + save: the model built on the meta device, ``interop.trace(..., weights=folder)``,
  ``save`` into another folder (the weights copied file to file into external data);
- load + to_torch / to_flax / to_keras + forward of 16 tokens (each its own process);
- a float32 model: the same trace + save next to a bare ``torch.onnx.export`` of the
  materialized model (which holds the weights, and more).

    python benchmarks/bench_scale.py --preset 7b     # ~14 GB of bf16 shards on disk
    python benchmarks/bench_scale.py --preset small  # a quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "7b": (4096, 11008, 32, 32, 32, 32000),
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "small": (1024, 2816, 8, 16, 4, 32000),
    "tiny": (256, 704, 2, 8, 4, 1024),
}

COMMON = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
work, dims, dtype = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def report(**extra):
    print("RESULT " + json.dumps(dict(peak=peak(), **extra)), flush=True)
def meta_model():
    import torch, transformers
    h, i, n, a, kv, v = dims
    config = transformers.LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
        num_attention_heads=a, num_key_value_heads=kv, vocab_size=v, max_position_embeddings=64)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
IDS = np.arange(16, dtype=np.int64).reshape(1, 16) * 7 % dims[5]
"""

STAGES = {
    "trace + save": """
        import torch, interop
        model = meta_model()
        baseline = peak()
        start = time.perf_counter()
        graph = interop.trace(model, {"input_ids": torch.from_numpy(IDS), "use_cache": False},
                              weights=work + "/ckpt")
        traced = time.perf_counter() - start
        graph.save(work + "/out/model.onnx", external_data=True)
        report(baseline=baseline, seconds=time.perf_counter() - start, trace_seconds=traced)
    """,
    "load + to_torch + forward (16 tokens)": """
        import torch, interop
        baseline = peak()
        start = time.perf_counter()
        module = interop.to_torch(interop.load(work + "/out/model.onnx"))
        built = time.perf_counter() - start
        with torch.no_grad():
            y = module(torch.from_numpy(IDS)).float().numpy()
        np.save(work + "/torch.npy", y)
        report(baseline=baseline, seconds=time.perf_counter() - start, build_seconds=built)
    """,
    "load + to_flax + forward (16 tokens)": """
        import interop, jax
        baseline = peak()
        start = time.perf_counter()
        module = interop.to_flax(interop.load(work + "/out/model.onnx"))
        built = time.perf_counter() - start
        y = np.asarray(module(IDS)).astype(np.float32)
        np.save(work + "/flax.npy", y)
        report(baseline=baseline, seconds=time.perf_counter() - start, build_seconds=built)
    """,
    "load + to_keras + forward (16 tokens)": """
        import os
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        import interop, keras
        baseline = peak()
        start = time.perf_counter()
        model = interop.to_keras(interop.load(work + "/out/model.onnx"))
        built = time.perf_counter() - start
        y = np.asarray(model(IDS)).astype(np.float32)
        np.save(work + "/keras.npy", y)
        report(baseline=baseline, seconds=time.perf_counter() - start, build_seconds=built)
    """,
    "bare torch.onnx.export (materialized model)": """
        import torch
        model = meta_model().to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        baseline = peak()
        start = time.perf_counter()
        program = torch.onnx.export(model, (torch.from_numpy(IDS),), kwargs={"use_cache": False},
                                    dynamo=True, optimize=False)
        program.save(work + "/bare/model.onnx", external_data=True)
        report(baseline=baseline, seconds=time.perf_counter() - start)
    """,
}


def parameter_shapes(dims: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The state dict of LlamaForCausalLM (names and shapes), in its order."""
    hidden, inter, layers, heads, kv, vocab = dims
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv * head_dim, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_checkpoint(folder: Path, dims: tuple[int, ...], dtype: str, shard_bytes: int) -> int:
    """Random weights in safetensors shards with an index, one tensor in memory at a time."""
    folder.mkdir(parents=True)
    itemsize = 2 if dtype == "bfloat16" else 4
    code = "BF16" if dtype == "bfloat16" else "F32"
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in parameter_shapes(dims).items():
        nbytes = int(np.prod(shape)) * itemsize
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    for index, members in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in members:
            nbytes = int(np.prod(shape)) * itemsize
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in members:
                count = int(np.prod(shape))
                norm = name.endswith("norm.weight")
                for begin in range(0, count, 1 << 24):  # 64 MB of float32 at a time
                    n = min(1 << 24, count - begin)
                    chunk = np.ones(n, np.float32) if norm else rng.standard_normal(n, np.float32)
                    chunk *= 1.0 if norm else 0.02
                    if dtype == "bfloat16":
                        out.write((chunk.view(np.uint32) >> 16).astype(np.uint16).tobytes())
                    else:
                        out.write(chunk.tobytes())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def run_stage(name: str, work: Path, dims: tuple[int, ...], dtype: str) -> dict:
    code = COMMON.format(root=str(ROOT)) + textwrap.dedent(STAGES[name])
    done = subprocess.run(
        [sys.executable, "-c", code, str(work), json.dumps(list(dims)), dtype],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout)[-600:].strip().splitlines()[-1:]}
    return json.loads(lines[-1][len("RESULT ") :])


def measure(preset: str, dtype: str, stages: list[str], keep: str | None) -> tuple[list, dict]:
    dims = PRESETS[preset]
    rows, extra = [], {}
    with tempfile.TemporaryDirectory(prefix="interop-scale-", dir=keep) as tmp:
        work = Path(tmp)
        (work / "out").mkdir()
        (work / "bare").mkdir()
        start = time.perf_counter()
        weights = write_checkpoint(work / "ckpt", dims, dtype, 2 << 30)
        extra["write_seconds"] = time.perf_counter() - start
        extra["weights"] = weights
        for name in stages:
            result = run_stage(name, work, dims, dtype)
            label = f"{preset} {dtype}: {name}"
            if "error" in result:
                rows.append([label, "failed", "", "", "", str(result["error"])[:200]])
            else:
                rows.append(
                    [
                        label,
                        f"{result['peak'] / 2**30:.2f} GiB",
                        f"{result['baseline'] / 2**30:.2f} GiB",
                        f"{result['peak'] / weights:.2f}x",
                        f"{(result['peak'] - result['baseline']) / weights:.2f}x",
                        f"{result['seconds']:.1f} s",
                    ]
                )
            print(rows[-1], flush=True)
        if (work / "torch.npy").exists():
            reference = np.load(work / "torch.npy")
            extra["logit_scale"] = float(np.abs(reference).max())
            for host in ("flax", "keras"):
                if (work / f"{host}.npy").exists():
                    other = np.load(work / f"{host}.npy")
                    extra[f"torch_vs_{host}"] = float(np.abs(reference - other).max())
        shutil.rmtree(work / "ckpt", ignore_errors=True)
    return rows, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--f32-preset", default=None, choices=sorted(PRESETS))
    parser.add_argument("--keep", help="work folder (default: the system's temp folder)")
    parser.add_argument(
        "--stages",
        default="trace,torch,flax,keras",
        help="of the main preset: trace, torch, flax, keras (torch, flax and keras read the "
        "model trace saved: keep trace in the list)",
    )
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    keys = {
        "trace": "trace + save",
        "torch": "load + to_torch",
        "flax": "load + to_flax",
        "keras": "load + to_keras",
    }
    wanted = [keys[k.strip()] for k in args.stages.split(",")]
    stages = [s for s in STAGES if any(s.startswith(w) for w in wanted)]
    rows, extra = measure(args.preset, "bfloat16", stages, args.keep)
    notes = [
        f"{args.preset} bfloat16: {extra['weights'] / 1e9:.2f} GB of weights "
        f"({extra['weights'] / 2 / 1e9:.2f}B parameters), shards written in "
        f"{extra['write_seconds']:.0f} s"
    ]
    for host in ("flax", "keras"):
        if f"torch_vs_{host}" in extra:
            notes.append(
                f"largest |torch - {host}| logit difference {extra[f'torch_vs_{host}']:.3g} "
                f"(logits up to {extra['logit_scale']:.3g}; both compute in bfloat16)"
            )
    if args.f32_preset:
        pair = ["trace + save", "bare torch.onnx.export (materialized model)"]
        f32_rows, f32 = measure(args.f32_preset, "float32", pair, args.keep)
        rows += f32_rows
        notes.append(f"{args.f32_preset} float32: {f32['weights'] / 1e9:.2f} GB of weights")
    markdown = "\n\n".join(
        [
            "## Models larger than memory (issue 20)",
            f"Measured by `benchmarks/bench_scale.py` on {machine()}, 24 GB of RAM shared with "
            "other work: a Llama-architecture model (transformers' `LlamaForCausalLM`) built on "
            "the meta device, random weights written by the script into safetensors shards "
            "(2 GB each, with `model.safetensors.index.json`). Every stage runs in a fresh "
            "process; *peak* is its maximum resident set (ru_maxrss, mapped weight pages "
            "included), *imports* the resident set before the stage's work began; *peak / "
            "weights* divides by the checkpoint's size.",
            table(
                [
                    "stage",
                    "peak RSS",
                    "imports",
                    "peak / weights",
                    "(peak - imports) / weights",
                    "time",
                ],
                rows,
            ),
            "; ".join(notes) + ".",
        ]
    )
    print(markdown)
    if not args.no_write:
        write_section("scale", markdown)


if __name__ == "__main__":
    main()
