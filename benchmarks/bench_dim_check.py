"""Cost of the declared-dynamic-dim check (interop.dim_check, issue 22) per trace.

Each model is traced with and without the check (``check_dims=False``), alternating,
after one warm-up trace of each; the median of ``--repeats`` traces is reported, with
the extra seconds and the ratio. Small models, random init (nothing downloaded).

    python benchmarks/bench_dim_check.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np


def small_cnn():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()  # fmt: skip
    return model, (torch.randn(2, 3, 32, 32),), {}


def bert_like():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512,
    )  # fmt: skip
    ids = torch.randint(0, 1000, (2, 16))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dims = {"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}
    return transformers.BertModel(config).eval(), inputs, {"dynamic_dims": dims}


def nnx_transformer():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, dim, heads, rngs):
            self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
            self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
            self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

        def __call__(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.down(nnx.gelu(self.up(self.ln2(x))))

    class Encoder(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(1000, 128, rngs=rngs)
            self.blocks = nnx.List([Block(128, 4, rngs) for _ in range(4)])
            self.head = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.head(x[:, 0])

    ids = np.random.RandomState(0).randint(0, 1000, (2, 16)).astype("int32")
    return Encoder(nnx.Rngs(0)), (ids,), {"dynamic_dims": {"tokens": {1: "seq"}}}


MODELS = {"torch small CNN": small_cnn, "HF BERT-like (4 layers, 128)": bert_like,
          "nnx transformer (4 layers, 128)": nnx_transformer}  # fmt: skip


def main() -> None:
    import interop

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print("| model | trace, check off (s) | trace, check on (s) | check (s) | ratio |")
    print("|---|---|---|---|---|")
    for label, build in MODELS.items():
        model, inputs, options = build()
        times: dict[bool, list[float]] = {False: [], True: []}
        for check in (False, True):  # warm-up: first-call costs of each path
            interop.trace(model, inputs, check_dims=check, **options)
        for _ in range(args.repeats):
            for check in (False, True):
                start = time.perf_counter()
                graph = interop.trace(model, inputs, check_dims=check, **options)
                times[check].append(time.perf_counter() - start)
        assert all(isinstance(d, str) for d in graph.inputs[0].shape[:1])  # still dynamic
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {label} | {off:.2f} | {on:.2f} | {on - off:+.2f} | {on / off:.2f}x |")


if __name__ == "__main__":
    main()
