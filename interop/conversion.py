"""`interop.convert`: a model of one framework as a native model of another, checked.

>>> net = interop.convert(keras_model, to="torch", example_inputs=(x,), verify=True)  # doctest: +SKIP
>>> interop.convert(torch_model, to="onnx", example_inputs=(x,), path="net.onnx")    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .emit import as_graph
from .errors import InteropError
from .hosts import host_for, host_names
from .verify import VerifyReport, compare


def targets() -> tuple[str, ...]:
    """What ``convert(to=...)`` accepts: every registered host (`interop.hosts`) and "onnx"."""
    return (*host_names(), "onnx")


def __getattr__(name: str) -> Any:
    if name == "TARGETS":  # the former constant: now whatever hosts are installed
        return targets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def convert(
    model: Any,
    to: str,
    example_inputs: Any = None,
    *,
    verify: bool = False,
    path: str | Path | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> Any:
    """Convert `model` (any framework, an interop.Graph or an ONNX file) to `to`.

    ``to`` is "torch" (an ``nn.Module``), "keras" (a ``keras.Model``), "flax" (an
    ``nnx.Module``), any other registered host (`interop.hosts`) or "onnx" (writes
    ``path``, default ``<model name>.onnx``, and returns the path). With ``verify=True``
    the result is run on `example_inputs` (the host's ``run``) and compared with the
    source (its own framework, or ONNX Runtime for graphs and files); a mismatch raises
    `InteropError` carrying the per-output report.
    """
    if to not in targets():
        raise InteropError(
            f"Unknown conversion target '{to}'",
            "one of " + ", ".join(targets()),
            "install the package of that host (entry-point group 'interop.hosts')",
        )
    graph = as_graph(model, example_inputs)
    if to == "onnx":
        result: Any = graph.save(Path(path) if path is not None else Path(f"{graph.name}.onnx"))
        native = None
    else:
        from .emit import to_host

        native = result = to_host(to, graph)
    if verify:
        if example_inputs is None:
            raise InteropError(
                "verify=True needs example_inputs", fix="pass the inputs to compare on"
            )
        report = check_conversion(model, graph, native, to, example_inputs, rtol=rtol, atol=atol)
        report.raise_for_mismatch()
    return result


def check_conversion(
    source: Any, graph: Any, native: Any, to: str, example_inputs: Any, *, rtol: float, atol: float
) -> VerifyReport:
    """Per-output comparison of the converted model with the source."""
    from .graph import Graph
    from .runtime import prepare_inputs
    from .tracing import adapter_for

    arrays = list(prepare_inputs(graph, *_split(example_inputs)).values())
    if isinstance(source, Graph) or not _traceable(source):
        expected = list(graph.run(*arrays, as_dict=True).values())
    else:
        expected = [array for _, array in adapter_for(source).run_source(source, example_inputs)]
    if to == "onnx":
        from .serialization import load

        actual = list(load(graph.to_bytes()).run(*arrays, as_dict=True).values())
    else:
        actual = run_native(native, to, arrays)
    report = VerifyReport(rtol=rtol, atol=atol, device=f"{to} (native)")
    if len(actual) != len(expected):
        raise InteropError(
            f"The converted model returned {len(actual)} outputs, the source {len(expected)}",
            "the same outputs from both",
        )
    for spec, want, got in zip(graph.outputs, expected, actual):
        report.outputs.append(compare(spec.name, want, got, rtol, atol))
    return report


def run_native(native: Any, to: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Run an emitted model in inference mode (the host's ``run``); numpy outputs, in graph order."""
    return host_for(to).run(native, arrays)


def _split(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(a for a in example_inputs if hasattr(a, "shape")), {}
    return (example_inputs,), {}


def _traceable(source: Any) -> bool:
    import onnx

    return not isinstance(source, (onnx.ModelProto, str, bytes, bytearray, Path))
