"""A PyTorch backbone inside a Keras functional model, trained for a few steps.

The backbone's weights become Keras variables, checked against PyTorch at definition,
trained by model.fit, and saved with the model: the .keras file loads without torch.

    python examples/torch_backbone_in_keras.py [--steps 5]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import interop  # noqa: E402


class Backbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default="backbone_in_keras.keras", help="where to save the model")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 16, 16)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int64")

    backbone = Backbone().eval()
    layer = interop.keras.Layer(
        backbone, example_inputs=(torch.from_numpy(x[:2]),), name="backbone"
    )
    with torch.no_grad():
        error = np.abs(
            keras.ops.convert_to_numpy(layer(x[:4])) - backbone(torch.from_numpy(x[:4])).numpy()
        )
    print(f"guest vs PyTorch: max abs error {error.max():.2e}")
    inputs = keras.Input((3, 16, 16))
    features = layer(inputs)  # shapes checked here: an NHWC input would raise ShapeError
    model = keras.Model(inputs, keras.layers.Dense(2)(features))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.summary()
    before = [keras.ops.convert_to_numpy(w).copy() for w in layer.trainable_weights]
    history = model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=args.steps, verbose=0)
    print("loss:", history.history["loss"])
    if all(
        np.array_equal(b, keras.ops.convert_to_numpy(a))
        for b, a in zip(before, layer.trainable_weights)
    ):
        raise SystemExit("the PyTorch backbone's weights did not train")
    model.save(args.out)
    reloaded = keras.models.load_model(args.out)  # needs interop, not torch
    drift = np.abs(reloaded.predict(x[:4], verbose=0) - model.predict(x[:4], verbose=0)).max()
    print(f"saved to {args.out}; reloaded model differs by {drift:.1e}")


if __name__ == "__main__":
    main()
