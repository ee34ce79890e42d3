"""Guests for the nesting matrix: a small CNN and a small transformer in each framework."""

from __future__ import annotations

import numpy as np
import torch
from models import Encoder, ResNetish, randomize_batchnorm

CLASSES = 6


def torch_cnn():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNetish(channels=4, classes=CLASSES)).eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)

    def run(a):
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()

    return model, x, run


def torch_transformer():
    torch.manual_seed(0)
    model = Encoder(dim=16).eval()  # output (batch, seq, 2)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)

    def run(a):
        with torch.no_grad():
            return model(torch.from_numpy(a)).numpy()

    return model, x, run


def keras_cnn():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(4, 3, padding="same", name="conv"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(CLASSES, name="head"),
        ],
        name="keras_cnn",
    )
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    return model, x, lambda a: keras.ops.convert_to_numpy(model(a, training=False))


def keras_transformer():
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 16))
    y = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(inp, inp)
    y = keras.layers.LayerNormalization(name="ln")(inp + y)
    out = keras.layers.Dense(2, name="proj")(y)
    model = keras.Model(inp, out, name="keras_transformer")
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    return model, x, lambda a: keras.ops.convert_to_numpy(model(a, training=False))


def flax_cnn():
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.Linear(4, CLASSES, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.bn(self.conv(x))).mean(axis=(1, 2)))

    model = CNN(nnx.Rngs(0))
    model.eval()
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    return model, x, lambda a: np.asarray(model(a))


def flax_transformer():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = nnx.MultiHeadAttention(
                num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs
            )
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.proj = nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x):
            return self.proj(self.norm(x + self.attn(x)))

    model = Block(nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    return model, x, lambda a: np.asarray(model(a))


GUESTS = {
    "torch_cnn": torch_cnn,
    "keras_cnn": keras_cnn,
    "flax_cnn": flax_cnn,
    "torch_transformer": torch_transformer,
    "keras_transformer": keras_transformer,
    "flax_transformer": flax_transformer,
}
