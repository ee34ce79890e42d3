"""The ``interop`` command: inspect, plot and run ONNX model files.

interop inspect model.onnx [--depth N]
interop plot model.onnx -o model.svg [--depth N]
interop run model.onnx --random [--dim batch=4] [--repeat 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from .errors import InteropError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interop",
        description="Inspect, plot and run models saved by interop (or any ONNX file).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="print the layer summary of a model file")
    inspect.add_argument("file", help="an .onnx file")
    inspect.add_argument("--depth", type=int, default=None, help="collapse layers below this depth")

    plot = commands.add_parser("plot", help="draw the graph with graphviz (.svg, .png, .pdf, .dot)")
    plot.add_argument("file", help="an .onnx file")
    plot.add_argument(
        "-o", "--output", required=True, help="output path; the suffix picks the format"
    )
    plot.add_argument(
        "--depth", type=int, default=None, help="draw layers at this depth as single boxes"
    )

    run = commands.add_parser(
        "run", help="run a model on ONNX Runtime and report shapes and timing"
    )
    run.add_argument("file", help="an .onnx file")
    run.add_argument("--random", action="store_true", required=True,
                     help="feed random inputs that follow the model's signature")  # fmt: skip
    run.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                     help="size of a symbolic dim (default 1), e.g. --dim batch=8")  # fmt: skip
    run.add_argument(
        "--repeat", type=int, default=10, help="timed runs after one warm-up (default 10)"
    )
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    run.add_argument("--seed", type=int, default=0)
    return parser


def random_inputs(graph, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random arrays for every graph input; symbolic dims take `sizes` or 1."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in graph.inputs:
        if spec.shape is None:
            raise InteropError(
                f"Input '{spec.name}' has no known shape", fix="use a model with typed inputs"
            )
        shape = tuple(d if isinstance(d, int) else sizes.get(str(d), 1) for d in spec.shape)
        dtype = spec.dtype if spec.dtype is not None else np.dtype("float32")
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        else:  # integer inputs are usually indices: keep them small and valid
            feeds[spec.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .serialization import load

    try:
        graph = load(args.file)
        if args.command == "inspect":
            graph.summary(depth=args.depth)
        elif args.command == "plot":
            path = graph.plot(args.output, depth=args.depth)
            print(f"wrote {path}")
        else:
            sizes = {}
            for item in args.dim:
                name, _, size = item.partition("=")
                if not size.isdigit():
                    raise InteropError(f"--dim '{item}' is malformed", "NAME=SIZE, e.g. batch=8")
                sizes[name] = int(size)
            feeds = random_inputs(graph, sizes, args.seed)
            start = time.perf_counter()
            outputs = graph.run(feeds, device=args.device, as_dict=True)
            first = time.perf_counter() - start
            times = []
            for _ in range(max(args.repeat, 0)):
                start = time.perf_counter()
                graph.run(feeds, device=args.device)
                times.append(time.perf_counter() - start)
            for name, array in feeds.items():
                print(f"input  {name}: {array.dtype}{list(array.shape)}")
            for name, array in outputs.items():
                print(f"output {name}: {array.dtype}{list(array.shape)}")
            print(f"first run (with session creation): {first * 1000:.2f} ms")
            if times:
                print(
                    f"median of {len(times)} runs: {np.median(times) * 1000:.3f} ms on {args.device}"
                )
    except InteropError as err:
        print(f"interop: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
