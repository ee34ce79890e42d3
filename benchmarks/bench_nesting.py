"""Forward + backward through a nested guest vs the same architecture written in the host.

    KERAS_BACKEND=tensorflow python benchmarks/bench_nesting.py [--scale S] [--no-write]

Hosts: torch with a Keras guest (interop.torch.Module), Keras on TensorFlow with a torch
guest (interop.keras.Layer, train_on_batch), Flax nnx with a torch guest (interop.flax.Module,
nnx.jit of value_and_grad). Guests: an MLP and a small CNN. Each pair runs interleaved in
one process (one step of each per round); the table gives medians and the median per-round
ratio with its 25-75% range (target <= 1.2). Weights are not copied between the pair: the
timing does not depend on their values. Writes the section "nesting" of docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402

import interop.flax  # noqa: E402
import interop.keras  # noqa: E402
import interop.torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

BATCH = 32


def torch_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def torch_cnn(channels_last: bool = False) -> nn.Module:
    layers = [
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    ]  # fmt: skip
    if channels_last:  # the Keras guest takes NHWC
        layers.insert(0, _ToNCHW())
    return nn.Sequential(*layers)


class _ToNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def keras_mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((256,)),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def keras_cnn(channels_first: bool = False) -> keras.Model:
    layers = [keras.Input((3, 32, 32) if channels_first else (32, 32, 3))]
    if channels_first:  # same semantics as the torch guest; TF's CPU conv wants NHWC
        layers.append(keras.layers.Permute((2, 3, 1)))
    layers += [
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Flatten(), keras.layers.Dense(10),
    ]  # fmt: skip
    return keras.Sequential(layers)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(256, 512, rngs=rngs), nnx.Linear(512, 512, rngs=rngs)
        self.c = nnx.Linear(512, 10, rngs=rngs)

    def __call__(self, x):
        return self.c(jax.nn.relu(self.b(jax.nn.relu(self.a(x)))))


class NnxCNN(nnx.Module):
    """NCHW in, as the torch guest; NHWC inside, as nnx.Conv computes."""

    def __init__(self, rngs):
        self.a = nnx.Conv(3, 32, (3, 3), padding="SAME", rngs=rngs)
        self.b = nnx.Conv(32, 64, (3, 3), padding="SAME", rngs=rngs)
        self.fc = nnx.Linear(64 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = jax.numpy.transpose(x, (0, 2, 3, 1))
        x = nnx.max_pool(jax.nn.relu(self.a(x)), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.b(x)), (2, 2), (2, 2))
        return self.fc(jax.numpy.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1))


class Wrapped(nnx.Module):
    def __init__(self, guest):
        self.guest = guest

    def __call__(self, x):
        return self.guest(x)


def torch_step(module):
    def step(x):
        module.zero_grad(set_to_none=True)
        module(x).sum().backward()

    return step


def keras_step(model, x, y):
    model.compile(optimizer="sgd", loss="mse")
    return lambda _: model.train_on_batch(x, y)


def flax_step(module):
    @nnx.jit
    def step(model, x):
        loss, grads = nnx.value_and_grad(lambda m: m(x).sum())(model)
        return loss, grads

    return lambda x: jax.block_until_ready(step(module, x))


def interleaved(steps, inputs, rounds):
    for step, x in zip(steps, inputs):
        for _ in range(3):
            step(x)
    times = [[] for _ in steps]
    for _ in range(rounds):
        for step, x, row in zip(steps, inputs, times):
            start = time.perf_counter()
            step(x)
            row.append(time.perf_counter() - start)
    return times


def cases():
    rng = np.random.default_rng(0)
    mlp_x = rng.standard_normal((BATCH, 256), dtype=np.float32)
    nchw = rng.standard_normal((BATCH, 3, 32, 32), dtype=np.float32)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    y = np.zeros((BATCH, 10), np.float32)
    for name, keras_guest, native, x in (
        ("mlp", keras_mlp, torch_mlp(), mlp_x),
        ("cnn", keras_cnn, torch_cnn(channels_last=True), nhwc),
    ):
        guest = keras_guest()
        nested = nn.Sequential(interop.torch.Module(guest, example_inputs=(x[:2],)))
        t = torch.from_numpy(x)
        yield "torch", f"keras {name}", (torch_step(nested), torch_step(native)), (t, t)
    for name, guest, native, x in (
        ("mlp", torch_mlp(), keras_mlp(), mlp_x),
        ("cnn", torch_cnn(), keras_cnn(channels_first=True), nchw),
    ):
        inp = keras.Input(x.shape[1:])
        nested = keras.Model(
            inp, interop.keras.Layer(guest, example_inputs=(torch.from_numpy(x[:2]),))(inp)
        )
        yield (
            "keras (tensorflow)",
            f"torch {name}",
            (keras_step(nested, x, y), keras_step(native, x, y)),
            (x, x),
        )
    for name, guest, native_class, x in (
        ("mlp", torch_mlp(), NnxMLP, mlp_x),
        ("cnn", torch_cnn(), NnxCNN, nchw),
    ):
        nested = Wrapped(interop.flax.Module(guest, example_inputs=(torch.from_numpy(x[:2]),)))
        native = native_class(nnx.Rngs(0))
        j = jax.numpy.asarray(x)
        yield "flax nnx (jit)", f"torch {name}", (flax_step(nested), flax_step(native)), (j, j)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the round count")
    parser.add_argument("--no-write", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for host, guest, steps, inputs in cases():
        try:
            times = interleaved(steps, inputs, max(5, int(40 * options.scale)))
        except Exception as error:  # noqa: BLE001  (an emitter's bug, reported in the table)
            rows.append([host, guest, "-", "-", f"fails: {str(error).splitlines()[0][:80]}"])
            print(" | ".join(rows[-1]), flush=True)
            continue
        ratios = statistics.quantiles([n / w for n, w in zip(times[0], times[1])], n=4)
        row = [host, guest, f"{statistics.median(times[0]) * 1e3:.2f}"]
        row += [f"{statistics.median(times[1]) * 1e3:.2f}"]
        row += [
            f"{statistics.median([n / w for n, w in zip(*times)]):.2f} ({ratios[0]:.2f}-{ratios[2]:.2f})"
        ]
        rows.append(row)
        print(" | ".join(row), flush=True)
    headers = ["host", "guest", "nested ms", "native ms", "nested / native (IQR)"]
    markdown = "\n".join(
        [
            "### Nested guest vs native host, forward + backward (benchmarks/bench_nesting.py)",
            "",
            f"CPU, batch {BATCH}, torch 1 thread, {report.machine()}; one training step "
            "(torch: forward, sum, backward; Keras: train_on_batch; nnx: jit of value_and_grad) "
            "of each per round, interleaved; medians and the median per-round ratio with its "
            "25-75% range. Target <= 1.2.",
            "",
            report.table(headers, rows),
        ]
    )
    print(markdown)
    if not options.no_write:
        report.write_section("nesting", markdown)


if __name__ == "__main__":
    main()
