"""Emitted Keras model vs the original Keras model: forward time and emission time.

    KERAS_BACKEND=tensorflow python benchmarks/bench_emit_keras.py [--size 112] [--repeats 5]

Prints a markdown table: per model and batch size, the original's and the emitted
model's median forward time (``model(x)``, eager, same backend) and their ratio; then
the time to emit a ResNet50-sized graph (keras.applications.ResNet50(weights=None)
traced with interop.trace) and the largest difference between the two models' outputs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import interop  # noqa: E402
from interop.emit import to_keras  # noqa: E402


def median_ms(function, repeats: int) -> float:
    function()  # warm-up (first call builds / traces)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def mlp() -> keras.Model:
    inputs = keras.Input((64,))
    x = keras.layers.Dense(256, activation="relu")(inputs)
    x = keras.layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="mlp")


def small_cnn(size: int) -> keras.Model:
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="small_cnn")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=112, help="image side of the CNNs")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    rng = np.random.default_rng(0)
    resnet = keras.applications.ResNet50(
        weights=None, input_shape=(options.size, options.size, 3), classes=1000
    )
    models = [
        (mlp(), (64,)),
        (small_cnn(options.size), (options.size, options.size, 3)),
        (resnet, (options.size, options.size, 3)),
    ]
    print(f"backend: {keras.backend.backend()}\n")
    print("| model | batch | original ms | emitted ms | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    emission = None
    for model, shape in models:
        example = rng.normal(size=(1, *shape)).astype("float32")
        graph = interop.trace(model, (example,))
        times = []
        for _ in range(3 if model is resnet else 1):
            start = time.perf_counter()
            emitted = to_keras(graph)
            times.append(time.perf_counter() - start)
        if model is resnet:
            emission = (statistics.median(times), len(list(graph.model.graph)))
        for batch in (1, 32):
            x = rng.normal(size=(batch, *shape)).astype("float32")
            original = median_ms(lambda m=model, x=x: m(x), options.repeats)
            ours = median_ms(lambda m=emitted, x=x: m(x), options.repeats)
            diff = np.abs(np.asarray(emitted(x)) - np.asarray(model(x))).max()
            print(
                f"| {model.name} | {batch} | {original:.2f} | {ours:.2f} | "
                f"{ours / original:.2f} | {diff:.1e} |"
            )
    seconds, nodes = emission
    print(f"\nemission of ResNet50 ({nodes} nodes): {seconds:.2f} s median of 3")


if __name__ == "__main__":
    main()
