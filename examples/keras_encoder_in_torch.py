"""Nest a Keras encoder inside a PyTorch model with `interop.torch.Module`, and train both.

The Keras model is traced and emitted as torch layers whose parameters keep their
Keras names; gradients flow through it, so one optimizer trains guest and host.

    python examples/keras_encoder_in_torch.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402


def keras_encoder() -> keras.Model:
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(32, activation="relu", name="proj")(inputs)
    return keras.Model(inputs, keras.layers.Dense(16, name="embed")(hidden), name="encoder")


class Classifier(torch.nn.Module):
    def __init__(self, example: np.ndarray):
        super().__init__()
        self.encoder = interop.torch.Module(keras_encoder(), example_inputs=(example,))
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.head(torch.relu(self.encoder(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 12)).astype("float32")
    y = (x[:, :3].sum(axis=1) > 0).astype("int64")

    model = Classifier(x[:2])
    print(model.encoder)
    guest = [name for name, _ in model.named_parameters() if name.startswith("encoder.")]
    print("guest parameters:", guest)

    before = model.encoder(torch.from_numpy(x)).detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(args.steps):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")
    moved = (model.encoder(inputs) - before).abs().max().item()
    print(f"encoder output moved by {moved:.3f} (the Keras weights trained)")
    if moved == 0.0:
        raise SystemExit("the nested encoder did not train")


if __name__ == "__main__":
    main()
