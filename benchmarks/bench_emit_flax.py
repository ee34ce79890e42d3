"""Benchmark of the Flax emitter: emitted nnx module vs the native nnx module, both jitted.

Native models (an MLP and a small NHWC CNN written in flax.nnx) are captured with
``interop.trace`` and re-emitted with ``interop.to_flax``; both run under ``jax.jit`` and
the median forward time is compared (target: emitted <= 1.10x native). Emission time is
measured on a ResNet50-sized graph (torchvision layout built by hand in
bench_emit_torch.py, traced from torch; target: under 2 s).

    python benchmarks/bench_emit_flax.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import interop  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, 256, rngs=rngs)
        self.fc2 = nnx.Linear(256, 256, rngs=rngs)
        self.fc3 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn2 = nnx.BatchNorm(32, use_running_average=True, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.relu(self.bn2(self.conv2(x)))
        return self.head(jnp.mean(x, axis=(1, 2)))


def median_ms(function, *args, repeats: int = 50) -> float:
    jax.block_until_ready(function(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*args))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def compare(name: str, native: nnx.Module, make_input, batches=(1, 32)) -> list[str]:
    native.eval()
    graph = interop.trace(native, (make_input(2),))
    emitted = interop.to_flax(graph)
    rows = []
    for batch in batches:
        x = make_input(batch)
        run_native = nnx.jit(lambda m, v: m(v))
        run_emitted = nnx.jit(lambda m, v: m(v))
        error = float(
            np.max(np.abs(np.asarray(run_native(native, x)) - np.asarray(run_emitted(emitted, x))))
        )
        # interleave the two measurements so machine load hits both alike
        pairs = [
            (
                median_ms(run_native, native, x, repeats=20),
                median_ms(run_emitted, emitted, x, repeats=20),
            )
            for _ in range(3)
        ]
        native_ms = min(p[0] for p in pairs)
        emitted_ms = min(p[1] for p in pairs)
        rows.append(
            f"| {name} | {batch} | {native_ms:.3f} | {emitted_ms:.3f} | {emitted_ms / native_ms:.2f} | {error:.1e} |"
        )
    return rows


def emission_time() -> str:
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_emit_torch import ResNet50

    torch.manual_seed(0)
    model = ResNet50().eval()
    graph = interop.trace(model, (torch.randn(1, 3, 112, 112),))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        module = interop.to_flax(graph)
        times.append(time.perf_counter() - start)
    nodes = len(list(graph.model.graph))
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module)))
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        expected = model(x).numpy()
    out = np.asarray(jax.jit(lambda v: module(v))(x.numpy()))
    error = float(np.max(np.abs(out - expected)))
    return (
        f"ResNet50-sized graph ({nodes} nodes, {count / 1e6:.1f}M values in the state): "
        f"emission {statistics.median(times):.2f} s median of 3; jitted output max abs error "
        f"vs torch {error:.1e}"
    )


def main() -> None:
    rng = np.random.default_rng(0)
    print("| model | batch | native nnx jit ms | emitted jit ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for row in compare(
        "mlp", MLP(nnx.Rngs(0)), lambda b: rng.standard_normal((b, 64)).astype(np.float32)
    ):
        print(row)
    for row in compare(
        "cnn (NHWC)",
        CNN(nnx.Rngs(0)),
        lambda b: rng.standard_normal((b, 32, 32, 3)).astype(np.float32),
    ):
        print(row)
    print()
    print(emission_time())


if __name__ == "__main__":
    main()
