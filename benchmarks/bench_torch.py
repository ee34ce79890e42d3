"""PyTorch capture benchmarks, each measured side by side with its alternative in one run.

1. interop.trace vs a bare torch.onnx.export(dynamo=True) of the same model (ratio).
2. summary() and the layer tree on a graph of about 2,000 nodes (seconds).
3. ONNX Runtime CPU inference of the traced graph vs the module in torch eager mode,
   batch 1 and 32 (ratio).

    python benchmarks/bench_torch.py [--quick]     # writes docs/performance.md
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import Encoder, ResNetish, randomize_batchnorm  # noqa: E402
from report import machine, table, write_section  # noqa: E402

import interop  # noqa: E402

warnings.filterwarnings("ignore")


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_medians(first, second, repeat: int) -> tuple[float, float]:
    """Median times of two callables run alternately, so load on the machine hits both alike."""
    a, b = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        first()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        second()
        b.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def bare_export(model, inputs):
    with contextlib.redirect_stdout(io.StringIO()):
        dims = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs)
        return torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=dims, verbose=False)


class DeepMLP(nn.Module):
    """Residual MLP blocks: about 4 nodes each, so 670 blocks give ~2,000 nodes."""

    def __init__(self, blocks: int, width: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(blocks)
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    args = parser.parse_args()
    repeat = 1 if args.quick else 3
    torch.manual_seed(0)
    models = {
        "ResNetish (subclassed CNN, BatchNorm)": (
            randomize_batchnorm(ResNetish(channels=32)).eval(),
            (3, 32, 32),
        ),
        "TransformerEncoder (2 layers)": (Encoder(dim=64).eval(), (16, 64)),
    }
    bare_export(*next((m, (torch.randn(2, *s),)) for m, s in models.values()))  # warm both paths up
    interop.trace(*next((m, (torch.randn(2, *s),)) for m, s in models.values()))

    trace_rows, run_rows = [], []
    for name, (model, shape) in models.items():
        example = (torch.randn(2, *shape),)
        bare, ours = paired_medians(
            lambda m=model, e=example: bare_export(m, e),
            lambda m=model, e=example: interop.trace(m, e),
            repeat,
        )
        trace_rows.append([name, f"{bare:.2f} s", f"{ours:.2f} s", f"{ours / bare:.2f}x"])
        graph = interop.trace(model, example)
        for batch in (1, 32):
            x = torch.randn(batch, *shape)
            graph.run(x)
            with torch.inference_mode():
                model(x)
                eager, ort = paired_medians(
                    lambda m=model, x=x: m(x),
                    lambda g=graph, x=x: g.run(x),
                    30 if not args.quick else 3,
                )
            run_rows.append(
                [
                    name,
                    str(batch),
                    f"{eager * 1e3:.2f} ms",
                    f"{ort * 1e3:.2f} ms",
                    f"{ort / eager:.2f}x",
                ]
            )

    deep = DeepMLP(670).eval()
    graph = interop.trace(deep, (torch.randn(2, 16),))
    nodes = len(graph.model.graph)
    fresh = lambda: interop.Graph(graph.model)  # noqa: E731 - no cached layer tree
    layers_time = median_time(lambda: fresh().layers, repeat)
    summary_time = median_time(lambda: fresh().summary(print_fn=None), repeat)
    plot_time = median_time(lambda: fresh().plot(None, depth=1).source, repeat)

    markdown = "\n\n".join([
        "## PyTorch capture\n\nMeasured by `benchmarks/bench_torch.py` on " + machine() + ".",
        "### Trace time vs a bare `torch.onnx.export(dynamo=True)` (target: at most 1.1x)\n\n"
        + table(["model", "torch.onnx.export", "interop.trace", "ratio"], trace_rows)
        + "\n\ninterop.trace runs torch.export and torch.onnx with `optimize=False` (keeps BatchNorm "
        "unfused) and then rewrites provenance; the bare export runs the default optimizer.",
        f"### Inspection of a {nodes:,}-node graph (target: under 1 s)\n\n"
        + table(["operation", "time"], [
            ["`graph.layers` (builds the layer tree)", f"{layers_time * 1e3:.0f} ms"],
            ["`graph.summary()` (tree + table)", f"{summary_time * 1e3:.0f} ms"],
            ["`graph.plot(depth=1)` (graphviz source)", f"{plot_time * 1e3:.0f} ms"],
        ]),  # fmt: skip
        "### ONNX Runtime CPU vs torch eager (ratio < 1: ONNX Runtime is faster)\n\n"
        + table(["model", "batch", "torch eager", "ONNX Runtime", "ratio"], run_rows),
    ])  # fmt: skip
    print(markdown)
    write_section("torch", markdown)


if __name__ == "__main__":
    main()
