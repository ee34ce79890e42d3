"""keras_hub capture: interop.trace vs tf2onnx.convert.from_keras on three keras_hub models.

Tiny random configs (an encoder, a decoder LLM, a vision transformer; nothing downloaded),
TensorFlow backend, one process: the median trace time of each tool over `--repeat` runs
(tf2onnx's first call includes TensorFlow's tracing warm-up, as a user sees it), their
ratio, whether each result runs on ONNX Runtime and matches ``model(x)`` (rtol 1e-4).
Writes the section "keras-hub" of docs/performance.md.

    python benchmarks/bench_keras_hub.py [--repeat 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from report import write_section  # noqa: E402

import interop  # noqa: E402

RNG = np.random.default_rng(0)


def _tokens() -> dict[str, np.ndarray]:
    return {
        "token_ids": RNG.integers(1, 50, (2, 8)).astype("int32"),
        "padding_mask": np.ones((2, 8), "int32"),
    }


MODELS = {
    "BERT (2 layers, hidden 16)": lambda: (
        keras_hub.models.BertBackbone(
            vocabulary_size=50, num_layers=2, num_heads=2, hidden_dim=16,
            intermediate_dim=32, max_sequence_length=16,
        ),
        dict(_tokens(), segment_ids=np.zeros((2, 8), "int32")),
    ),
    "Llama (2 layers, GQA)": lambda: (
        keras_hub.models.LlamaBackbone(
            vocabulary_size=50, num_layers=2, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=16, intermediate_dim=32,
        ),
        _tokens(),
    ),
    "ViT (2 layers, 16x16 images)": lambda: (
        keras_hub.models.ViTBackbone(
            image_shape=(16, 16, 3), patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
            mlp_dim=32,
        ),
        RNG.random((2, 16, 16, 3)).astype("float32"),
    ),
}  # fmt: skip


def _median(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _expected(model, x) -> list[np.ndarray]:
    out = model(x)
    out = out if isinstance(out, dict) else {"output": out}
    return [keras.ops.convert_to_numpy(out[k]) for k in sorted(out)]


def _tf2onnx(model, x, repeat):
    import onnxruntime as ort
    import tf2onnx

    inputs = x if isinstance(x, dict) else {"images": x}
    specs = {
        n: tf.TensorSpec((None,) + a.shape[1:], tf.as_dtype(a.dtype), name=n)
        for n, a in inputs.items()
    }
    # a model called on a dict takes the dict as its one argument
    spec = (specs,) if isinstance(x, dict) else tuple(specs.values())

    def run():
        return tf2onnx.convert.from_keras(model, input_signature=spec, opset=18)

    try:
        seconds, (proto, _) = _median(run, repeat)
    except Exception as err:  # noqa: BLE001  (tf2onnx fails on some models: reported)
        return None, f"fails: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    try:
        session = ort.InferenceSession(
            proto.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        feeds = {i.name: inputs[i.name.split(":")[0]] for i in session.get_inputs()}
        got = session.run(None, feeds)
        expected = _expected(model, x)
        order = lambda arrays: sorted(arrays, key=np.shape)  # noqa: E731  (names differ)
        ok = len(got) == len(expected) and all(
            g.shape == e.shape and np.allclose(g, e, rtol=1e-4, atol=1e-4)
            for g, e in zip(order(got), order(expected), strict=True)
        )
        return seconds, "matches" if ok else "differs"
    except Exception as err:  # noqa: BLE001
        return seconds, f"does not run in ONNX Runtime ({type(err).__name__})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, build in MODELS.items():
        keras.utils.set_random_seed(0)
        model, x = build()
        model(x)
        seconds, graph = _median(lambda: interop.trace(model, x), args.repeat)  # noqa: B023
        ok = interop.verify(model, graph, x, rtol=1e-4, atol=1e-4).ok
        theirs, status = _tf2onnx(model, x, args.repeat)
        ratio = f"{seconds / theirs:.2f}" if theirs else "-"
        rows.append(
            f"| {name} | {seconds:.2f} | {'matches' if ok else 'differs'} | "
            f"{'-' if theirs is None else f'{theirs:.2f}'} | {status} | {ratio} |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "### keras_hub capture vs tf2onnx (benchmarks/bench_keras_hub.py)",
            "",
            f"TensorFlow backend, keras {keras.__version__}, keras_hub {keras_hub.__version__}; "
            f"tiny random configs, batch 2; median of {args.repeat} traces each, one process. "
            "*matches*: the ONNX graph run on ONNX Runtime equals `model(x)` within rtol 1e-4. "
            "Every keras_hub backbone is swept in [keras-hub.md](keras-hub.md).",
            "",
            "| model | interop.trace (s) | interop result | tf2onnx.from_keras (s) | tf2onnx result | ratio |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if not args.no_write:
        write_section("keras-hub", table)


if __name__ == "__main__":
    main()
