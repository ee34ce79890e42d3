"""ONNX files of other exporters: interop's emitters against onnx2torch and onnx2tf.

    python benchmarks/bench_onnx_files.py                 # writes its section of performance.md
    python benchmarks/bench_onnx_files.py --rounds 5 --calls 10 --no-write

For each file (made by tools/sweep_onnx_files.py's generators: TorchScript exporter, dynamo
exporter, tf2onnx, hand-built IR 3) the anchors convert it too: `interop.to_torch` against
onnx2torch (`onnx2torch.convert`) and `interop.to_keras` against onnx2tf (`onnx2tf.convert`,
a tf_keras model, inputs kept NCHW with `keep_ncw_or_nchw_or_ncdhw_input_names`). Each
conversion is checked against ONNX Runtime on the file (rtol/atol 1e-4). Forward time of
the converted modules is measured in one process, interleaved: each round times every module
(median of `--calls` calls, the order rotating each round), the ratios ours / theirs are
taken per round and their medians reported with the 25-75% range. torch and TensorFlow run
on one thread each. An anchor that is not installed is skipped and the report says so.

onnx2tf is not a dependency of interop; it and what it imports were installed into the
venv with --no-deps (onnx2tf, tf-keras, onnx-graphsurgeon, ai-edge-litert, sng4onnx,
simple-onnx-processing-tools), since its pinned requirements (TensorFlow 2.19, onnx 1.19)
conflict with the project's.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tools"), str(ROOT)]

FILES = [  # (architecture, exporter, opset): files both anchors are expected to read
    ("cnn", "torchscript", 13),
    ("resnet_blocks", "torchscript", 17),
    ("mobilenet_depthwise", "torchscript", 17),
    ("unet_upsample", "torchscript", 11),
    ("mlp_gelu_layernorm", "torchscript", 17),
    ("lstm", "torchscript", 13),
    ("bert_tiny", "torchscript", 17),
    ("vit_tiny", "torchscript", 17),
    ("gpt2_tiny", "dynamo", None),
    ("keras_mobilenet_v2", "tf2onnx", 13),
    ("zoo_cnn", "ir3", 9),
]


def _quiet():
    from sweep_onnx_files import _quiet as quiet

    return quiet()


def _numpy(value: Any) -> list[np.ndarray]:
    from sweep_onnx_files import _outputs

    return _outputs(value)


def _close(got: list[np.ndarray], expected: list[np.ndarray]) -> str:
    from sweep_onnx_files import _compare

    return _compare(got, expected)


def convert_all(data: bytes, inputs: list[np.ndarray], names: list[str], folder: Path) -> dict:
    """{converter: (callable taking the inputs, check cell, conversion seconds)}."""
    import torch

    import interop

    converters: dict[str, Any] = {}
    path = folder / "model.onnx"
    path.write_bytes(data)

    def ours_torch():
        module = interop.to_torch(data)
        return lambda *a: module(*[torch.from_numpy(x) for x in a])

    def ours_keras():
        model = interop.to_keras(data)
        return lambda *a: model(a[0] if len(a) == 1 else list(a))

    def theirs_torch():
        from bench_emit_torch import load_onnx2torch

        convert = load_onnx2torch()
        module = convert(str(path)).eval()
        return lambda *a: module(*[torch.from_numpy(x) for x in a])

    def theirs_tf():
        import onnx2tf

        # channels-first inputs stay as they are (onnx2tf would transpose them to NHWC);
        # the option refuses 2-D inputs, which it leaves alone anyway
        keep = [n for n, x in zip(names, inputs) if 3 <= x.ndim <= 5] or None
        options = dict(
            input_onnx_file_path=str(path), output_folder_path=str(folder / "onnx2tf"),
            not_use_onnxsim=True, disable_model_save=True, non_verbose=True,
            keep_ncw_or_nchw_or_ncdhw_input_names=keep,
        )  # fmt: skip
        try:
            model = onnx2tf.convert(**options)
        except Exception:  # noqa: BLE001
            # onnx2tf works best on static shapes: what its users do next is fix the batch
            model = onnx2tf.convert(**options, batch_size=len(inputs[0]))
            STATIC_BATCH.add(str(path))
        return lambda *a: model(a[0] if len(a) == 1 else list(a))

    makers = {"interop to_torch": ours_torch, "onnx2torch": theirs_torch,
              "interop to_keras": ours_keras, "onnx2tf": theirs_tf}  # fmt: skip
    from sweep_onnx_files import onnxruntime_outputs

    expected = onnxruntime_outputs(data, inputs)
    for name, make in makers.items():
        if name in SKIPPED:
            continue
        start = time.perf_counter()
        try:
            with _quiet(), torch.no_grad():
                call = make()
                got = _numpy(call(*inputs))
            cell = _close(got, expected)
        except Exception as err:  # noqa: BLE001 (a converter that fails is a result)
            text = str(err).strip().splitlines()
            call, cell = None, f"FAIL: {type(err).__name__}: {(text[0] if text else '')[:100]}"
        if name == "onnx2tf" and str(path) in STATIC_BATCH and cell.startswith("ok"):
            cell += " with batch_size fixed"
        converters[name] = (call, cell.replace("|", "/"), time.perf_counter() - start)
    return converters


def time_calls(call: Any, inputs: list[np.ndarray], calls: int) -> float:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(calls):
            start = time.perf_counter()
            _numpy(call(*inputs))  # results brought to numpy: the work is done, not queued
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(converters: dict, inputs: list[np.ndarray], rounds: int, calls: int) -> dict:
    """{pair: (median ratio, q25, q75)} of ours / theirs, and the median milliseconds."""
    runnable = {
        k: v[0] for k, v in converters.items() if v[0] is not None and v[1].startswith("ok")
    }
    names = list(runnable)
    for name in names:  # warm up (first calls build kernels and caches)
        time_calls(runnable[name], inputs, 2)
    samples: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {"torch": [], "tf": []}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        this = {name: time_calls(runnable[name], inputs, calls) for name in order}
        for name, value in this.items():
            samples[name].append(value)
        if {"interop to_torch", "onnx2torch"} <= this.keys():
            ratios["torch"].append(this["interop to_torch"] / this["onnx2torch"])
        if {"interop to_keras", "onnx2tf"} <= this.keys():
            ratios["tf"].append(this["interop to_keras"] / this["onnx2tf"])
    result: dict[str, Any] = {name: statistics.median(v) * 1e3 for name, v in samples.items()}
    for pair, values in ratios.items():
        if values:
            q = np.percentile(values, [25, 50, 75])
            result[pair] = (q[1], q[0], q[2])
    return result


SKIPPED: dict[str, str] = {}
STATIC_BATCH: set[str] = set()  # files onnx2tf converted only with the batch size fixed


def summary(rows: list[list[str]]) -> str:
    """Which converters convert how many files, and the spread of the speed ratios."""

    def converted(column: int) -> str:
        cells = [row[column] for row in rows if row[column] != "not installed"]
        if not cells:
            return "not installed"
        return f"{sum(c.startswith('ok') for c in cells)} of {len(cells)}"

    def spread(column: int) -> str:
        values = sorted(float(row[column].split("x")[0]) for row in rows if row[column])
        if not values:
            return "no file both convert"
        return (
            f"median {statistics.median(values):.2f}x over {len(values)} files "
            f"({values[0]:.2f}x to {values[-1]:.2f}x)"
        )

    return (
        f"Converted and equal to ONNX Runtime: to_torch {converted(1)}, onnx2torch "
        f"{converted(2)}, to_keras {converted(6)}, onnx2tf {converted(7)}. Forward time where "
        f"both convert: to_torch / onnx2torch {spread(5)}; to_keras / onnx2tf {spread(10)}."
    )


def _ms(timing: dict, name: str) -> str:
    return f"{timing[name]:.2f}" if name in timing else ""


def _ratio(timing: dict, pair: str) -> str:
    if pair not in timing:
        return ""
    median, low, high = timing[pair]
    return f"{median:.2f}x ({low:.2f}-{high:.2f})"


def _cell(converters: dict, name: str) -> str:
    if name in SKIPPED:
        return "not installed"
    _, check, seconds = converters[name]
    return f"{check}, {seconds:.1f} s" if check.startswith("ok") else check


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--only", default="")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if importlib.util.find_spec("onnx2torch") is None:
        SKIPPED["onnx2torch"] = "onnx2torch is not installed (pip install onnx2torch)"
    if importlib.util.find_spec("onnx2tf") is None:
        SKIPPED["onnx2tf"] = "onnx2tf is not installed (see this script's docstring)"
    from report import machine, table, write_section
    from sweep_onnx_files import _case_id, make_file

    import interop

    rows, load = [], os.getloadavg()[0]
    for arch, exporter, opset in FILES:
        case = _case_id(arch, exporter, opset)
        if args.only and args.only not in case:
            continue
        data, inputs = make_file(arch, exporter, opset)
        names = [s.name for s in interop.load(data).inputs]
        with tempfile.TemporaryDirectory() as folder:
            converters = convert_all(data, inputs, names, Path(folder))
        timing = interleaved(converters, inputs, args.rounds, args.calls)

        rows.append([
            case, _cell(converters, "interop to_torch"), _cell(converters, "onnx2torch"),
            _ms(timing, "interop to_torch"), _ms(timing, "onnx2torch"), _ratio(timing, "torch"),
            _cell(converters, "interop to_keras"), _cell(converters, "onnx2tf"),
            _ms(timing, "interop to_keras"), _ms(timing, "onnx2tf"), _ratio(timing, "tf"),
        ])  # fmt: skip
        print(" | ".join(rows[-1]), flush=True)
    versions = f"torch {torch.__version__}, TensorFlow {tf.__version__}"
    for package in ("onnx2torch", "onnx2tf"):
        if package not in SKIPPED:
            from importlib.metadata import version

            versions += f", {package} {version(package)}"
    skipped = "".join(f" Skipped: {reason}." for reason in SKIPPED.values())
    header = (
        "### ONNX files of other exporters: emitted vs onnx2torch and onnx2tf "
        "(benchmarks/bench_onnx_files.py)\n\n"
        f"CPU eager, {versions}, one thread each, {machine()}; 1-minute load average "
        f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (the machine is shared: "
        "read the ratios, not the milliseconds). Files from tools/sweep_onnx_files.py's "
        "generators. Each converter's module is checked against ONNX Runtime on the file "
        "(rtol/atol 1e-4; the cell gives the largest difference and the conversion time); "
        f"forward times are medians of {args.calls} calls, {args.rounds} interleaved rounds "
        "(the order rotates each round), batch 2; ratios are medians of per-round ratios "
        "(ours / theirs, below 1: ours is faster) with their 25-75% range. onnx2tf's model is "
        "a tf_keras model with channels-first inputs kept (where onnx2tf fails on the dynamic "
        "batch, it is retried with `batch_size` fixed, as its users do, and the cell says so); "
        "both Keras-side models are called eagerly."
        f"{skipped}\n\n"
    )
    headers = ["file", "to_torch", "onnx2torch", "to_torch ms", "onnx2torch ms",
               "to_torch / onnx2torch", "to_keras", "onnx2tf", "to_keras ms", "onnx2tf ms",
               "to_keras / onnx2tf"]  # fmt: skip
    markdown = header + table(headers, rows) + "\n\n" + summary(rows)
    print(markdown)
    if not args.no_write:
        write_section("onnx-files", markdown)


if __name__ == "__main__":
    main()
