"""`interop.verify`: run the source model and the graph on the same inputs and compare.

The report has one row per output with the largest absolute and relative error;
``report.ok`` is True when every output is within tolerance (numpy's allclose rule:
``|a - b| <= atol + rtol * |b|``, NaN matching NaN and Inf matching Inf of the same sign).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InteropError


@dataclass(frozen=True)
class OutputCheck:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    ok: bool
    note: str = ""


@dataclass
class VerifyReport:
    """Per-output comparison of a source model and its graph."""

    outputs: list[OutputCheck] = field(default_factory=list)
    rtol: float = 1e-4
    atol: float = 1e-5
    device: str = "cpu"

    @property
    def ok(self) -> bool:
        return bool(self.outputs) and all(o.ok for o in self.outputs)

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        width = max([len(o.name) for o in self.outputs] + [6])
        lines = [
            f"verify ({self.device}, rtol={self.rtol:g}, atol={self.atol:g}): {'OK' if self.ok else 'MISMATCH'}",
            f"{'output':<{width}}  {'shape':<18} {'max abs err':>12} {'max rel err':>12}  ok",
        ]
        for o in self.outputs:
            lines.append(
                f"{o.name:<{width}}  {str(o.shape):<18} {o.max_abs_error:>12.3g} {o.max_rel_error:>12.3g}  "
                f"{'yes' if o.ok else 'NO'}{'  ' + o.note if o.note else ''}"
            )
        return "\n".join(lines)

    def raise_for_mismatch(self) -> VerifyReport:
        if not self.ok:
            raise InteropError("The graph's outputs differ from the source model's:\n" + str(self))
        return self


def compare(
    name: str, expected: np.ndarray, actual: np.ndarray, rtol: float, atol: float
) -> OutputCheck:
    expected, actual = np.asarray(expected), np.asarray(actual)
    if expected.shape != actual.shape:
        return OutputCheck(name, tuple(actual.shape), float("inf"), float("inf"), False,
                           f"shape {actual.shape} != source {expected.shape}")  # fmt: skip
    if expected.dtype.kind not in "fc":
        equal = bool(np.array_equal(expected, actual))
        diff = (
            0.0
            if equal
            else float(np.max(np.abs(expected.astype(np.float64) - actual.astype(np.float64))))
        )
        return OutputCheck(name, tuple(actual.shape), diff, diff, equal)
    e, a = expected.astype(np.float64), actual.astype(np.float64)
    same_special = (np.isnan(e) & np.isnan(a)) | (np.isinf(e) & (e == a))
    finite = ~same_special
    abs_err = np.where(finite, np.abs(e - a), 0.0)
    abs_err = np.nan_to_num(abs_err, nan=np.inf)
    rel_err = abs_err / np.maximum(np.abs(e), np.finfo(np.float64).tiny)
    ok = bool(np.all(abs_err <= atol + rtol * np.abs(np.where(finite, e, 0.0))))
    max_abs = float(abs_err.max()) if abs_err.size else 0.0
    max_rel = float(rel_err.max()) if rel_err.size else 0.0
    return OutputCheck(name, tuple(actual.shape), max_abs, max_rel, ok)


def verify(
    model: Any,
    graph: Any,
    example_inputs: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    device: str = "cpu",
) -> VerifyReport:
    """Compare `model` run in its own framework with `graph` run on ONNX Runtime.

    >>> report = interop.verify(module, g, (x,))   # doctest: +SKIP
    >>> report.ok, report.outputs[0].max_abs_error  # doctest: +SKIP
    (True, 2.4e-07)
    """
    from .graph import Graph
    from .serialization import load
    from .tracing import adapter_for

    graph = graph if isinstance(graph, Graph) else load(graph)
    adapter = adapter_for(model)
    expected = adapter.run_source(model, example_inputs)
    feeds = getattr(adapter, "input_feeds", None)  # adapters that can name nested inputs
    wanted = {spec.name for spec in graph.inputs}
    named = feeds(model, example_inputs) if feeds is not None else {}
    if named and wanted <= set(named):
        actual = graph.run(
            {k: v for k, v in named.items() if k in wanted}, device=device, as_dict=True
        )
    elif isinstance(example_inputs, Mapping):
        actual = graph.run(dict(example_inputs), device=device, as_dict=True)
    else:
        args = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
        arrays = [a for a in args if hasattr(a, "shape")]
        actual = graph.run(*arrays, device=device, as_dict=True)
    report = VerifyReport(rtol=rtol, atol=atol, device=device)
    names = list(actual)
    if len(names) != len(expected):
        raise InteropError(
            f"The source model returned {len(expected)} tensors but the graph has {len(names)} outputs",
            "the same outputs from both",
            "trace the model again with the same example inputs",
        )
    for (name, ref), got_name in zip(expected, names):
        report.outputs.append(compare(name, ref, actual[got_name], rtol, atol))
    return report
