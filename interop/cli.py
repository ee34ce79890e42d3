"""The ``interop`` command: inspect, plot, run and convert models.

interop inspect model.onnx [--depth N]
interop plot model.onnx -o model.svg [--depth N]
interop run model.onnx --random [--dim batch=4] [--repeat 10] [--device cpu]
interop convert SRC --to onnx|torch|keras|flax|<installed host> -o OUT [--optimize]
interop compare REF candidate.onnx [--rtol R] [--atol A] [--dim batch=2] [--json]
interop view model.onnx [--compare reference.onnx] [--port P] [--no-browser]

SRC (and REF) is an .onnx file or a factory ``module:function`` (``path/to/file.py:function``
works too) whose function takes no arguments and returns ``(model, example_inputs)``,
the two arguments of `interop.trace`. `convert` documents the output formats.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InteropError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interop",
        description="Inspect, plot, run and convert models saved by interop (or any ONNX file).",
        epilog="Run 'interop COMMAND --help' for the options of one command.",
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
    _add_convert_parser(commands)
    _add_debug_parsers(commands)
    return parser


def _add_debug_parsers(commands: Any) -> None:
    compare = commands.add_parser(
        "compare",
        help="compare two models layer by layer on random inputs (interop.compare)",
        description="Run both files on the same random inputs (ONNX Runtime) and print the "
        "error of every layer both have, in topological order, and the first layer beyond "
        "tolerance. Exit status 1 when they differ.",
    )
    compare.add_argument(
        "reference",
        help="an .onnx file, or a factory module:function returning (model, example_inputs): "
        "the model then runs in its own framework on those inputs",
    )
    compare.add_argument("candidate", help="an .onnx file with the same inputs")
    compare.add_argument("--rtol", type=float, default=1e-4)
    compare.add_argument("--atol", type=float, default=1e-5)
    compare.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                         help="size of a symbolic dim (default 1), e.g. --dim batch=8")  # fmt: skip
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    compare.add_argument("--json", action="store_true", help="print the report as JSON")
    view = commands.add_parser(
        "view",
        help="open a model in Model Explorer (extra 'explorer'): layer tree, shapes, params",
        description="Serve the graph in Google's Model Explorer: layers as collapsible groups, "
        "shapes and dtypes on edges, parameter counts per layer. With --compare, the errors "
        "of interop.compare against a reference model are an overlay. Ctrl+C stops it.",
    )
    view.add_argument("file", help="an .onnx file")
    view.add_argument("--compare", metavar="REFERENCE", default=None,
                      help="an .onnx file to compare with on random inputs (error overlay)")  # fmt: skip
    view.add_argument("--host", default="localhost")
    view.add_argument("--port", type=int, default=None, help="default: a free port")
    view.add_argument("--no-browser", action="store_true", help="print the URL only")


def _sizes(items: Sequence[str]) -> dict[str, int]:
    sizes = {}
    for item in items:
        name, _, size = item.partition("=")
        if not size.isdigit():
            raise InteropError(f"--dim '{item}' is malformed", "NAME=SIZE, e.g. batch=8")
        sizes[name] = int(size)
    return sizes


def debug_command(args: argparse.Namespace) -> int:
    """`interop compare` and `interop view`."""
    import json

    from .compare import compare
    from .serialization import load

    if args.command == "compare":
        candidate = load(args.candidate)
        if args.reference.endswith(".onnx") or ":" not in args.reference:
            reference: Any = load(args.reference)
            inputs: Any = random_inputs(reference, _sizes(args.dim), args.seed)
        else:  # a factory: its model in its framework, on its example inputs
            reference, inputs = load_factory(args.reference)
        report = compare(reference, candidate, inputs, rtol=args.rtol, atol=args.atol,
                         device=args.device)  # fmt: skip
        print(json.dumps(report.to_dict(), indent=1) if args.json else report)
        return 0 if report.ok else 1
    from .explorer import serve

    graph = load(args.file)
    overlay = None
    if args.compare:
        base = load(args.compare)
        overlay = compare(base, graph, random_inputs(base, {}, 0))
        print(overlay)
    url = serve(graph, overlay, host=args.host, port=args.port)
    print(f"Model Explorer: {url}")
    if not args.no_browser:
        import webbrowser

        webbrowser.open_new_tab(url)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        return 0


CONVERT_HELP = """\
Convert a model into an ONNX file or a native PyTorch, Keras or Flax model (or the
model of any other installed host, see interop.hosts).

SRC is either an .onnx file or a factory "module:function" (or "path/to/file.py:function")
naming a function that takes no arguments and returns (model, example_inputs): the model
of any framework interop traces and the example inputs that interop.trace needs (a
tensor, a tuple of tensors or a dict of named tensors). The factory's module is imported,
so only name code you trust; .onnx files are parsed and checked, never executed.

Output formats (weights are always saved next to the graph they belong to, in files
that load without executing code):
  --to onnx   OUT.onnx: the traced graph with interop's layer metadata; with --optimize,
              the inference-optimized graph interop runs on ONNX Runtime (may use
              ONNX Runtime's com.microsoft ops: for deployment, not for emission).
  --to torch  OUT.pt: the emitted module's state_dict (torch.save), and OUT.onnx beside it.
              Load: m = interop.to_torch(interop.load("OUT.onnx"))
                    m.load_state_dict(torch.load("OUT.pt", weights_only=True))
  --to keras  OUT.keras: model.save() of the emitted Keras model, when Keras can serialise
              every layer; or OUT.weights.h5: model.save_weights(), and OUT.onnx beside it.
              Load: m = interop.to_keras(interop.load("OUT.onnx")); m.load_weights("OUT.weights.h5")
  --to flax   OUT.msgpack: the nnx state as a pure dict (flax.serialization), and OUT.onnx.
              Load: m = interop.to_flax(interop.load("OUT.onnx"))
                    state = nnx.state(m); nnx.replace_by_pure_dict(state,
                        flax.serialization.msgpack_restore(open("OUT.msgpack", "rb").read()))
                    nnx.update(m, state)
  --to NAME   any other installed host (entry-point group "interop.hosts"): OUT in the
              host's own format (its suffixes are listed below), and OUT.onnx beside it.
"""


def _suffixes(target: str) -> tuple[str, ...]:
    """The output file endings --to `target` accepts (the host's ``suffixes``)."""
    if target == "onnx":
        return (".onnx",)
    from .hosts import host_for

    return tuple(host_for(target).suffixes)


def _add_convert_parser(commands: Any) -> None:
    from .hosts import load_hosts

    hosts = load_hosts()
    installed = "\n".join(
        f"  {name:<10}  {', '.join(host.suffixes) or '(no native file format)'}: {host.description}"
        for name, host in sorted(hosts.items())
    )
    convert = commands.add_parser(
        "convert",
        help="convert a model (factory or .onnx file) to onnx, torch, keras, flax or another host",
        description=CONVERT_HELP + "\nInstalled hosts (--to NAME: OUT suffixes):\n" + installed,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("source", metavar="SRC", help="an .onnx file or module:function")
    convert.add_argument(
        "--to", required=True, choices=sorted(["onnx", *hosts]), help="target format"
    )
    convert.add_argument("-o", "--output", required=True, metavar="OUT",
                         help="output file; its suffix must match --to (see above)")  # fmt: skip
    convert.add_argument(
        "--optimize",
        action="store_true",
        help="--to onnx: write the inference-optimized graph ONNX Runtime runs (folded "
        "constants and BatchNorms, fused attention / LayerNorm / GELU) for deployment, "
        "instead of the graph as captured",
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bar or summary line")


def load_factory(spec: str) -> tuple[Any, Any]:
    """Call the factory named by ``module:function`` and return ``(model, example_inputs)``.

    The module is a dotted import path (the current folder is importable, as with
    ``python -m``) or a ``.py`` file path.
    """
    import importlib
    import importlib.util

    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name.isidentifier():
        raise InteropError(
            f"'{spec}' is neither an .onnx file nor a factory",
            "an .onnx file or module:function, e.g. mymodels:build or models.py:build",
        )
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise InteropError(f"Factory file '{path}' does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module  # so that classes it defines pickle and repr well
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            raise InteropError(
                f"Cannot import factory module '{module_name}': {err}",
                fix="run from the folder that holds it, set PYTHONPATH, or give a .py path",
            ) from err
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise InteropError(f"'{module_name}' has no function '{function_name}'")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise InteropError(
            f"Factory '{spec}' returned {type(result).__name__}",
            "a tuple (model, example_inputs), e.g. return net, (torch.randn(2, 3),)",
        )
    return result


def _save_native(target: str, native: Any, out: Path) -> list[Path]:
    """Write the emitted model's weights (the host's ``save``); returns the paths written."""
    from .hosts import host_for

    return list(host_for(target).save(native, out))


def convert_command(args: argparse.Namespace) -> int:
    """Run ``interop convert``: trace or load, emit, save; exit code 2 on a known error."""
    from .progress import progress
    from .serialization import load
    from .tracing import trace

    out = Path(args.output)
    verbose = False if args.quiet else None
    try:
        suffixes = _suffixes(args.to)
        if not suffixes:
            raise InteropError(
                f"The host '{args.to}' has no native file format",
                fix="convert --to onnx and build the model from the .onnx file",
            )
        if not out.name.endswith(suffixes):
            raise InteropError(
                f"Output '{out}' does not fit --to {args.to}",
                f"a file name ending in {' or '.join(suffixes)}",
            )
        native_target = args.to != "onnx"
        if args.optimize and native_target:
            raise InteropError(
                f"--optimize writes an ONNX file for ONNX Runtime; --to {args.to} emits a model",
                "--optimize only with --to onnx",
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        steps = ["read", "emit", "save"] if native_target else ["read", "save"]
        graph = native = None
        for step in progress(steps, desc=f"convert to {args.to}", verbose=verbose):
            if step == "read":
                if Path(args.source).suffix == ".onnx":
                    graph = load(args.source)
                else:
                    model, example_inputs = load_factory(args.source)
                    graph = trace(model, example_inputs)
            elif step == "emit":
                from .emit import to_host

                native = to_host(args.to, graph)
            else:
                assert graph is not None
                onnx_path = out if args.to == "onnx" else _graph_path(out, suffixes)
                written.append(graph.save(onnx_path, optimize=args.optimize))
                if native is not None:
                    written[:0] = _save_native(args.to, native, out)
    except InteropError as err:
        print(f"interop: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"{graph!r}\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _graph_path(out: Path, suffixes: Sequence[str]) -> Path:
    """OUT.onnx beside the native file: `out` without the host's suffix (longest first)."""
    name = out.name
    for suffix in sorted(suffixes, key=len, reverse=True):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out.with_name(name + ".onnx")


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

    if args.command == "convert":
        return convert_command(args)
    if args.command in ("compare", "view"):
        try:
            return debug_command(args)
        except InteropError as err:
            print(f"interop: error: {err}", file=sys.stderr)
            return 2
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
