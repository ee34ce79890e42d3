"""Convert a subclassed Keras model into a trainable PyTorch module.

Builds a small subclassed Keras classifier, traces it into an `interop.Graph`, emits
it as a `torch.nn.Module` with `interop.to_torch`, checks that both frameworks agree,
then fine-tunes the PyTorch copy for a few steps on generated data.

    python examples/keras_to_torch.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402


class Classifier(keras.Model):
    def __init__(self, hidden: int = 32, classes: int = 3):
        super().__init__()
        self.hidden = keras.layers.Dense(hidden, activation="relu")
        self.norm = keras.layers.LayerNormalization()
        self.out = keras.layers.Dense(classes)

    def call(self, x):
        return self.out(self.norm(self.hidden(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="PyTorch training steps")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64") + (x[:, 1] > 0).astype("int64")  # 3 classes

    source = Classifier()
    source(x[:2])  # build the weights
    graph = interop.trace(source, (x[:2],))
    graph.summary()

    module = interop.to_torch(graph)  # a torch.fx.GraphModule with native layers
    with torch.no_grad():
        error = np.abs(module(torch.from_numpy(x)).numpy() - source(x).numpy()).max()
    print(f"max |keras - torch| = {error:.2e}")
    if error > 1e-4:
        raise SystemExit("Keras and PyTorch disagree")

    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(module(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
