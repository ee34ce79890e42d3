"""Flax capture benchmark: trace time vs jax2onnx, ONNX Runtime vs jax.jit.

For each model, in one process:

* trace: median wall time of ``interop.trace`` and of ``jax2onnx.to_onnx`` (both with a
  dynamic batch) after one warm-up call each; the cold first call is reported too,
  since jax2onnx loads its plugin registry then;
* inference: median time of ``Graph.run`` (ONNX Runtime, CPU) and of the
  ``jax.jit``-compiled Flax call (``block_until_ready``), batch 32, after warm-up.

Run: ``python benchmarks/bench_flax.py [--repeats 5]``; prints a Markdown table.
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


def models():
    rngs = nnx.Rngs(0)
    yield "nnx MLP 3x256", MLP(rngs), (256,)
    cnn = CNN(rngs)
    cnn.eval()
    yield "nnx CNN 2 conv+BN", cnn, (32, 32, 3)
    yield "nnx transformer 4 blocks d64", Transformer(rngs), (16, 64)
    module = LinenCNN()
    variables = module.init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))
    yield "linen CNN 2 conv", (module, variables), (32, 32, 3)


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
    args = parser.parse_args()
    from jax2onnx import to_onnx

    rows = []
    for name, model, shape in models():
        x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
        spec = [("B", *shape)]
        fn = jax2onnx_fn(model)
        cold_ours = median_time(lambda m=model, v=x: interop.trace(m, v), 1)
        ours = median_time(lambda m=model, v=x: interop.trace(m, v), args.repeats)
        cold_theirs = median_time(lambda f=fn, s=spec: to_onnx(f, s, return_mode="ir"), 1)
        theirs = median_time(lambda f=fn, s=spec: to_onnx(f, s, return_mode="ir"), args.repeats)

        g = interop.trace(model, x)
        xb = np.random.default_rng(1).standard_normal((args.batch, *shape)).astype(np.float32)
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
        other = interop.Graph(to_onnx(fn, spec, return_mode="ir"))
        feed = other.inputs[0].name
        other.run(**{feed: xb})
        ort_theirs = median_time(lambda t=other, f=feed, v=xb: t.run(**{f: v}), runs)
        rows.append((name, cold_ours, ours, cold_theirs, theirs, ort, ort_theirs, jit))

    print(
        f"jax {jax.__version__}, batch {args.batch}, median of {args.repeats} (trace) / {args.repeats * 4} (run)"
    )
    print()
    print("| model | interop.trace cold / warm (s) | jax2onnx.to_onnx cold / warm (s) | trace ratio (warm) "
          "| ORT run, ours (ms) | ORT run, jax2onnx graph (ms) | jax.jit call (ms) | ORT ours / jit |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, cold_ours, ours, cold_theirs, theirs, ort, ort_theirs, jit in rows:
        print(
            f"| {name} | {cold_ours:.3f} / {ours:.3f} | {cold_theirs:.3f} / {theirs:.3f} | "
            f"{ours / theirs:.2f} | {ort * 1e3:.2f} | {ort_theirs * 1e3:.2f} | {jit * 1e3:.2f} | {ort / jit:.2f} |"
        )


if __name__ == "__main__":
    main()
