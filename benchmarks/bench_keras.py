"""Keras capture benchmark: interop.trace vs tf2onnx.convert.from_keras, ORT vs Keras.

For ResNet50 and EfficientNetB0 (weights=None, 224x224, batch 1) in one process:
trace time of interop's native walk and of tf2onnx (median of `--repeat` runs; the
first tf2onnx call includes TensorFlow's tracing warm-up, as a user sees it), their
ratio, and inference time of the traced graph on ONNX Runtime vs ``model(x)``
(median of 20 calls after warm-up).

    python benchmarks/bench_keras.py [--size 224] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import interop  # noqa: E402


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, size: int, repeat: int) -> dict:
    import tf2onnx

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3))
    x = np.random.RandomState(0).rand(1, size, size, 3).astype("float32")
    model(x)  # build; both tracers start from a built model
    t_interop = _median_time(lambda: interop.trace(model, x), repeat)
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="input"),)
    t_tf2onnx = _median_time(
        lambda: tf2onnx.convert.from_keras(model, input_signature=spec, opset=18), repeat
    )

    g = interop.trace(model, x)
    ok = interop.verify(model, g, x).ok
    g.run(x)  # session creation and warm-up
    model(x)
    t_ort = _median_time(lambda: g.run(x), 20)
    t_keras = _median_time(lambda: model(x, training=False), 20)
    return {"model": name, "interop_s": t_interop, "tf2onnx_s": t_tf2onnx, "trace_ratio": t_interop / t_tf2onnx,
            "ort_ms": 1e3 * t_ort, "keras_ms": 1e3 * t_keras, "ort_ratio": t_ort / t_keras, "verify_ok": ok}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["ResNet50", "EfficientNetB0"])
    args = parser.parse_args()
    print(
        f"keras {keras.__version__} (tensorflow {tf.__version__}), input {args.size}x{args.size}, batch 1, CPU"
    )
    print(
        "| model | interop.trace (s) | tf2onnx.from_keras (s) | ratio | ORT (ms) | model(x) (ms) | ratio | verify |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        r = bench(name, args.size, args.repeat)
        print(f"| {r['model']} | {r['interop_s']:.2f} | {r['tf2onnx_s']:.2f} | {r['trace_ratio']:.3f} | "
              f"{r['ort_ms']:.1f} | {r['keras_ms']:.1f} | {r['ort_ratio']:.2f} | {'ok' if r['verify_ok'] else 'MISMATCH'} |")  # fmt: skip


if __name__ == "__main__":
    main()
