"""Flax capture benchmark: trace time vs jax2onnx, ONNX Runtime vs jax.jit.

For each model, in one process:

* trace: median wall time of ``interop.trace`` and of ``jax2onnx.to_onnx`` (both with a
  dynamic batch) after one warm-up call each; the cold first call is reported too,
  since jax2onnx loads its plugin registry then. ``interop.trace`` is timed with
  ``check_dims=False`` (capture and its ONNX check, what ``to_onnx`` compares to) and
  with its default, which also runs the model and the graph at a second batch size;
* inference: median time of ``Graph.run`` (ONNX Runtime, CPU) and of the
  ``jax.jit``-compiled Flax call (``block_until_ready``), batch 32, after warm-up.

Run: ``python benchmarks/bench_flax.py [--repeats 5] [--only ViT LM MoE]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
from interop.adapters.flax.capture import capture  # noqa: E402

import interop  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2, self.l3 = (nnx.Linear(256, 256, rngs=rngs) for _ in range(3))

    def __call__(self, x):
        return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 32, (3, 3), strides=2, rngs=rngs)
        self.bn1 = nnx.BatchNorm(32, rngs=rngs)
        self.c2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
        self.bn2 = nnx.BatchNorm(64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.c1(x)))
        x = nnx.relu(self.bn2(self.c2(x)))
        return self.head(x.mean(axis=(1, 2)))


class Block(nnx.Module):
    def __init__(self, dim, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x))))


class Transformer(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Block(64, rngs) for _ in range(4)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=2)(x))
        return nn.Dense(10)(x.mean(axis=(1, 2)))


class ViT(nnx.Module):
    """The Flax-examples ViT of tests/test_flax_nnx.py: strided-conv patches, class token,
    position embeddings, two Blocks, a head."""

    def __init__(self, rngs, dim=64, patch=4, size=32):
        self.patches = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, (size // patch) ** 2 + 1, dim)))
        self.layers = nnx.List([Block(dim, rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, 10, rngs=rngs)

    def __call__(self, images):
        x = self.patches(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls.value, (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos.value
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x[:, 0]))


class ScanLM(nnx.Module):
    """The scan-over-layers language model of tests/test_flax_nnx.py: 4 stacked Blocks made
    with nnx.vmap, applied with nnx.scan."""

    def __init__(self, rngs, vocab=256, dim=64, layers=4):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return Block(dim, rngs)

        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = make(rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return block(h)

        return self.head(step(self.embed(tokens), self.blocks))


class MoE(nnx.Module):
    """A top-2 mixture-of-experts block (router, stacked expert weights, take_along_axis)."""

    def __init__(self, rngs, dim=64, hidden=128, experts=8):
        self.gate = nnx.Linear(dim, experts, rngs=rngs)
        self.up = nnx.Param(jax.random.normal(rngs.params(), (experts, dim, hidden)) * 0.1)
        self.down = nnx.Param(jax.random.normal(rngs.params(), (experts, hidden, dim)) * 0.1)

    def __call__(self, x):
        weights, chosen = jax.lax.top_k(jax.nn.softmax(self.gate(x)), 2)
        every = jnp.einsum("bsd,edh->bseh", x, self.up.value)
        every = jnp.einsum("bseh,ehd->bsed", jax.nn.gelu(every), self.down.value)
        picked = jnp.take_along_axis(every, chosen[..., None], axis=2)
        return (picked * weights[..., None]).sum(2)


def floats(*shape):
    return lambda b: np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32)


def tokens(length, vocab=256):
    return lambda b: np.random.default_rng(b).integers(0, vocab, (b, length)).astype(np.int32)


def models():
    """(name, model, inputs(batch)) for each benchmarked model."""
    rngs = nnx.Rngs(0)
    yield "nnx MLP 3x256", MLP(rngs), floats(256)
    cnn = CNN(rngs)
    cnn.eval()
    yield "nnx CNN 2 conv+BN", cnn, floats(32, 32, 3)
    yield "nnx transformer 4 blocks d64", Transformer(rngs), floats(16, 64)
    module = LinenCNN()
    variables = module.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    yield "linen CNN 2 conv", (module, variables), floats(32, 32, 3)
    # the nnx models of the Flax examples that issue 16's coverage names
    yield "nnx ViT 2 blocks d64 (32x32)", ViT(rngs), floats(32, 32, 3)
    yield "nnx scan LM 4 layers d64", ScanLM(rngs), tokens(16)
    yield "nnx MoE top-2 of 8 experts", MoE(rngs), floats(16, 64)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax2onnx_fn(model):
    if isinstance(model, tuple):
        module, variables = model
        return lambda x: module.apply(variables, x)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=[], help="models whose name contains one")
    args = parser.parse_args()
    from jax2onnx import to_onnx

    rows = []
    for name, model, make in models():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        x, xb = make(2), make(args.batch)
        spec = [jax.ShapeDtypeStruct(("B", *x.shape[1:]), x.dtype)]
        fn = jax2onnx_fn(model)
        # default trace (capture-time ONNX check, then issue 22's dim check: the model and the
        # graph run again at a second batch size), and the capture alone (check_dims=False),
        # which is what jax2onnx's to_onnx does
        cold_ours = median_time(lambda m=model, v=x: interop.trace(m, v, check_dims=False), 1)
        ours = median_time(lambda m=model, v=x: interop.trace(m, v, check_dims=False), args.repeats)
        checked = median_time(lambda m=model, v=x: interop.trace(m, v), args.repeats)
        try:
            cold_theirs = median_time(lambda f=fn, s=spec: to_onnx(f, s, return_mode="ir"), 1)
            theirs = median_time(lambda f=fn, s=spec: to_onnx(f, s, return_mode="ir"), args.repeats)
            other = interop.Graph(to_onnx(fn, spec, return_mode="ir"))
        except Exception as err:  # noqa: BLE001 (the row says jax2onnx could not)
            # nnx.scan over stacked nnx layers: jax2onnx 0.17.1 with flax 0.12.8 stops at
            # "Cannot extract graph node from different trace level" (also when the model is
            # merged inside the traced function)
            print(f"{name}: jax2onnx fails: {type(err).__name__}: {str(err)[:200]}")
            cold_theirs = theirs = other = None

        g = interop.trace(model, x)
        cap = capture(model)
        jitted = jax.jit(cap.fn)
        xj = jnp.asarray(xb)
        jax.block_until_ready(jitted(cap.params, xj))  # compile outside the timing
        g.run(xb)
        runs = args.repeats * 4
        ort = median_time(lambda t=g, v=xb: t.run(v), runs)
        jit = median_time(lambda f=jitted, p=cap.params, v=xj: jax.block_until_ready(f(p, v)), runs)
        np.testing.assert_allclose(
            g.run(xb), np.asarray(jitted(cap.params, xj)), rtol=1e-3, atol=1e-4
        )
        # The same runtime on jax2onnx's graph: separates graph quality from ORT vs XLA.
        ort_theirs = None
        if other is not None:
            feed = other.inputs[0].name
            other.run(**{feed: xb})
            ort_theirs = median_time(lambda t=other, f=feed, v=xb: t.run(**{f: v}), runs)
        rows.append((name, cold_ours, ours, checked, cold_theirs, theirs, ort, ort_theirs, jit))
        print(rows[-1], flush=True)

    print(
        f"jax {jax.__version__}, batch {args.batch}, median of {args.repeats} (trace) / {args.repeats * 4} (run)"
    )
    print()
    print("| model | interop.trace, check_dims=False, cold / warm (s) | interop.trace default, warm (s) "
          "| jax2onnx.to_onnx cold / warm (s) | trace ratio (warm, check_dims=False) "
          "| ORT run, ours (ms) | ORT run, jax2onnx graph (ms) | jax.jit call (ms) | ORT ours / jit |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, cold_ours, ours, checked, cold_theirs, theirs, ort, ort_theirs, jit in rows:
        if theirs is None:
            theirs_cell, ratio, ort_theirs_cell = "fails", "-", "-"
        else:
            theirs_cell = f"{cold_theirs:.3f} / {theirs:.3f}"
            ratio, ort_theirs_cell = f"{ours / theirs:.2f}", f"{ort_theirs * 1e3:.2f}"
        print(
            f"| {name} | {cold_ours:.3f} / {ours:.3f} | {checked:.3f} | {theirs_cell} | {ratio} | "
            f"{ort * 1e3:.2f} | {ort_theirs_cell} | {jit * 1e3:.2f} | {ort / jit:.2f} |"
        )


if __name__ == "__main__":
    main()
