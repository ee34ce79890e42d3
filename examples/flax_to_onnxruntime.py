"""Trace a Flax NNX model and run it on ONNX Runtime (CPU, or CUDA when present).

python examples/flax_to_onnxruntime.py [--out DIR] [--device cpu|cuda|auto]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import interop  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, features: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(features, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.norm(self.up(x))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="folder for the .onnx file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = MLP(16, 64, 4, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 16)).astype("float32")

    graph = interop.trace(model, (x,))  # module paths become layers: up, norm, down
    print(graph)
    graph.summary()

    path = graph.save(args.out / "flax_mlp.onnx")
    reloaded = interop.load(path)
    batch = np.random.default_rng(1).standard_normal((32, 16)).astype("float32")
    logits = reloaded.run(batch, device=args.device)  # the batch dim is dynamic
    expected = np.asarray(model(jnp.asarray(batch)))
    error = float(np.abs(logits - expected).max())
    print(f"wrote {path}; ONNX Runtime on {args.device}: {logits.shape}, max error {error:.2e}")
    report = interop.verify(model, reloaded, (batch,))
    print(report)
    if not report.ok:
        raise SystemExit("ONNX Runtime and JAX disagree")


if __name__ == "__main__":
    main()
