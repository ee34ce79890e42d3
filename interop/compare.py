"""`interop.compare`: run two models on the same inputs and compare them layer by layer.

Where `interop.verify` says *whether* a conversion's outputs match, `compare` says *where*
they stop matching. Each side may be a framework model (a source model, or one emitted by
`to_torch` / `to_keras` / `to_flax`), an `interop.Graph` or an ONNX file. Every side
computes its own numbers: a Graph runs on ONNX Runtime with each layer's return values
exposed as extra outputs; a framework model runs in its own framework with the outputs
of its layers recorded as they are called (`interop.compare_native`), so a bug of an
emitter shows in the layer it emitted wrongly instead of being hidden by a re-trace.

Layers are matched by path: the source's layer paths are the graph's, and the emitters
name each native layer after the source layer it stands for (``blocks.0.fc``), so the
paths both sides know are compared, in the reference's topological order, then the final
outputs. ``report.first_divergence`` is the first layer whose outputs are beyond
``atol + rtol * |reference|`` somewhere.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InteropError
from .verify import OutputCheck
from .verify import compare as compare_arrays

OUTPUTS = "<outputs>"  # the row of the final outputs


@dataclass(frozen=True)
class LayerCheck:
    """The comparison of one layer's return values (`outputs`, one check per value)."""

    path: str
    class_name: str
    outputs: tuple[OutputCheck, ...]
    note: str = ""

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "class": self.class_name,
            "ok": self.ok,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "outputs": [
                {
                    "name": o.name,
                    "shape": list(o.shape),
                    "max_abs_error": o.max_abs_error,
                    "max_rel_error": o.max_rel_error,
                    "ok": o.ok,
                    "note": o.note,
                }
                for o in self.outputs
            ],  # fmt: skip
            "note": self.note,
        }


@dataclass
class CompareReport:
    """Per-layer errors of `candidate` against `reference`, in topological order.

    >>> report = interop.compare(model, interop.to_keras(g), (x,))   # doctest: +SKIP
    >>> report.first_divergence.path                                  # doctest: +SKIP
    'blocks.1.fc'
    """

    reference: str
    candidate: str
    layers: list[LayerCheck] = field(default_factory=list)
    rtol: float = 1e-4
    atol: float = 1e-5
    device: tuple[str, str] = ("cpu", "cpu")
    reference_only: list[str] = field(default_factory=list)  # layers without a counterpart
    candidate_only: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.layers) and all(row.ok for row in self.layers)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def first_divergence(self) -> LayerCheck | None:
        """The first layer (topological order) with an output beyond tolerance, or None."""
        return next((row for row in self.layers if not row.ok), None)

    def layer(self, path: str) -> LayerCheck:
        for row in self.layers:
            if row.path == path:
                return row
        raise KeyError(f"no layer '{path}' was compared; see [r.path for r in report.layers]")

    def _header(self) -> str:
        first = self.first_divergence
        verdict = "OK" if self.ok else f"first divergence: {first.path if first else '?'}"
        devices = self.device[0] if self.device[0] == self.device[1] else " vs ".join(self.device)
        return (
            f"compare {self.reference} vs {self.candidate} ({devices}, rtol={self.rtol:g}, "
            f"atol={self.atol:g}): {len(self.layers)} layers compared, {verdict}"
        )

    def __str__(self) -> str:
        width = max([len(r.path) for r in self.layers] + [5])
        cls = max([len(r.class_name) for r in self.layers] + [5])
        lines = [
            self._header(),
            f"{'layer':<{width}}  {'class':<{cls}}  {'shape':<18} {'max abs err':>12} "
            f"{'max rel err':>12}  ok",
        ]
        for row in self.layers:
            shape = str(row.outputs[0].shape) if row.outputs else "-"
            mark = "yes" if row.ok else "NO"
            if row is self.first_divergence:
                mark += "  <- first divergence"
            note = "; ".join(n for n in [row.note] + [o.note for o in row.outputs] if n)
            lines.append(
                f"{row.path:<{width}}  {row.class_name:<{cls}}  {shape:<18} "
                f"{row.max_abs_error:>12.3g} {row.max_rel_error:>12.3g}  {mark}"
                + (f"  ({note})" if note else "")
            )
        for label, paths in (
            ("reference", self.reference_only),
            ("candidate", self.candidate_only),
        ):
            if paths:
                shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
                lines.append(f"{len(paths)} layers only the {label} computes: {shown}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        first = self.first_divergence
        rows = []
        for row in self.layers:
            style = "" if row.ok else " style='background:#fde2e1'"
            if row is first:
                style = " style='background:#f8b4b0;font-weight:bold'"
            shape = str(row.outputs[0].shape) if row.outputs else "-"
            rows.append(
                f"<tr{style}><td style='text-align:left'>{html.escape(row.path)}</td>"
                f"<td style='text-align:left'>{html.escape(row.class_name)}</td>"
                f"<td>{html.escape(shape)}</td><td>{row.max_abs_error:.3g}</td>"
                f"<td>{row.max_rel_error:.3g}</td><td>{'yes' if row.ok else 'NO'}</td></tr>"
            )
        return (
            f"<div><p><b>{html.escape(self._header())}</b></p><table><thead><tr>"
            "<th>layer</th><th>class</th><th>shape</th><th>max abs err</th>"
            "<th>max rel err</th><th>ok</th></tr></thead><tbody>"
            + "".join(rows)
            + "</tbody></table></div>"
        )

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "rtol": self.rtol,
            "atol": self.atol,
            "device": list(self.device),
            "ok": self.ok,
            "first_divergence": first.path if first else None,
            "layers": [row.to_dict() for row in self.layers],
            "reference_only": list(self.reference_only),
            "candidate_only": list(self.candidate_only),
        }


@dataclass
class Recording:
    """What one side computed: each layer's return values by path, in completion order."""

    name: str
    layers: dict[str, list[np.ndarray]]
    classes: dict[str, str]
    outputs: list[np.ndarray]
    value_names: dict[str, list[str]] = field(default_factory=dict)  # a graph's value names
    # another reading of a layer's values (a Keras layer's output before the activation the
    # emitter let it absorb), accepted where the main one is beyond tolerance
    alternates: dict[str, list[np.ndarray]] = field(default_factory=dict)


def compare(
    reference: Any,
    candidate: Any,
    example_inputs: Any,
    *,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    device: str | tuple[str, str] = "cpu",
) -> CompareReport:
    """Run `reference` and `candidate` on `example_inputs` and compare every layer both have.

    Either side is a framework model (torch ``nn.Module``, Keras model, Flax nnx module;
    emitted models included), an `interop.Graph` or the path of an ONNX file. Layers are
    matched by their source paths; each layer's return values are compared with numpy's
    allclose rule, in the reference's topological order, then the final outputs.
    `device` is one device for both sides or a pair ``(reference, candidate)``: the
    device a graph runs on (ONNX Runtime: "cpu", "cuda"), or a torch model's inputs go to.

    >>> report = interop.compare(g, interop.to_torch(g), (x,), atol=1e-5)  # doctest: +SKIP
    >>> print(report)                                                      # doctest: +SKIP
    >>> report.first_divergence                                            # doctest: +SKIP
    """
    devices = (device, device) if isinstance(device, str) else (device[0], device[1])
    feeds = _named_feeds(reference, candidate, example_inputs)
    ref = record(reference, example_inputs, feeds, devices[0])
    cand = record(candidate, example_inputs, feeds, devices[1])
    report = CompareReport(ref.name, cand.name, rtol=rtol, atol=atol, device=devices)
    # a path as each framework can spell it: an emitted torch module of the Keras layer
    # "block/dense" is "block_dense", the Keras layer of torch's "blocks.0.fc" keeps its dots
    theirs = {canonical(p): p for p in cand.layers}
    matched = set()
    for path, ref_values in ref.layers.items():
        other = theirs.get(canonical(path)) or _by_suffix(theirs, canonical(path))
        got = cand.layers.get(other) if other is not None else None
        if got is None or other is None:
            report.reference_only.append(path)
            continue
        matched.add(other)
        if other != path:
            cand.value_names.setdefault(path, cand.value_names.get(other, []))
            cand.alternates.setdefault(path, cand.alternates.get(other, []))
            cand.classes.setdefault(path, cand.classes.get(other, ""))
        names = ref.value_names.get(path) or cand.value_names.get(path) or []
        cls = ref.classes.get(path) or cand.classes.get(path, "")
        row = _check(path, cls, ref_values, got, names, rtol, atol)
        alternate = cand.alternates.get(path)
        if not row.ok and alternate:
            before = _check(path, cls, ref_values, alternate, names, rtol, atol)
            if before.ok:
                row = replace(before, note="before the activation the layer absorbed")
        report.layers.append(row)
    report.candidate_only = [p for p in cand.layers if p not in matched]
    if len(ref.outputs) != len(cand.outputs):
        raise InteropError(
            f"The reference returned {len(ref.outputs)} tensors but the candidate "
            f"returned {len(cand.outputs)}",
            "two models with the same outputs",
            "compare a model with its own trace or emission, on the same example inputs",
        )
    names = ref.value_names.get(OUTPUTS) or cand.value_names.get(OUTPUTS) or []
    report.layers.append(_check(OUTPUTS, "", ref.outputs, cand.outputs, names, rtol, atol))
    return report


def _by_suffix(paths: dict[str, str], key: str) -> str | None:
    """The one path ending in ``_<key>``: an emitter that prefixed the model's name
    (a Flax module ``k_net_dense`` for the Keras layer ``dense`` of model ``k_net``)."""
    found = [p for k, p in paths.items() if k.endswith("_" + key)]
    return found[0] if len(found) == 1 else None


def canonical(path: str) -> str:
    """A layer path with every separator and other non-word character as ``_``."""
    return re.sub(r"\W", "_", path)


def _check(
    path: str,
    class_name: str,
    expected: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    names: Sequence[str],
    rtol: float,
    atol: float,
) -> LayerCheck:
    checks = []
    for i, (e, a) in enumerate(zip(expected, actual)):
        name = names[i] if i < len(names) else (path if i == 0 else f"{path}:{i}")
        checks.append(compare_arrays(name, e, a, rtol, atol))
    note = ""
    if len(expected) != len(actual):
        note = f"{len(expected)} values vs {len(actual)}: the first {len(checks)} compared"
    return LayerCheck(path, class_name, tuple(checks), note)


# ----------------------------------------------------------------------- the sides
def record(model: Any, example_inputs: Any, feeds: dict[str, Any], device: str) -> Recording:
    """Run one side and record its layers' return values (a Graph, a file or a model)."""
    from .graph import Graph

    if isinstance(model, str | Path):
        from .serialization import load

        model = load(model)
    if isinstance(model, Graph):
        return record_graph(model, example_inputs, feeds, device)
    from . import compare_native

    return compare_native.record_model(model, example_inputs, device)


def _named_feeds(reference: Any, candidate: Any, example_inputs: Any) -> dict[str, Any]:
    """Graph inputs by name, as a framework model's adapter binds the example inputs
    (nested inputs of a torch model); empty when neither side is such a model."""
    from .graph import Graph

    for model in (reference, candidate):
        if isinstance(model, Graph | str | Path):
            continue
        from .tracing import adapter_for

        feeds = getattr(adapter_for(model), "input_feeds", None)
        if feeds is not None:
            return dict(feeds(model, example_inputs))
    return {}


def _graph_feeds(graph: Any, example_inputs: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    from .compare_native import to_numpy

    wanted = [spec.name for spec in graph.inputs]
    if feeds and set(wanted) <= set(feeds):
        return {k: to_numpy(feeds[k]) for k in wanted}
    if isinstance(example_inputs, Mapping):
        return {k: to_numpy(v) for k, v in example_inputs.items() if k in wanted}
    args = example_inputs if isinstance(example_inputs, tuple | list) else (example_inputs,)
    arrays = [to_numpy(a) for a in args if hasattr(a, "shape")]
    if len(arrays) != len(wanted):
        raise InteropError(
            f"Graph '{graph.name}' has {len(wanted)} inputs ({', '.join(wanted)}) but "
            f"{len(arrays)} example inputs were given",
            "one example input per graph input, positional or by name",
            "pass a tuple in the graph's input order or a dict of input names",
        )
    return dict(zip(wanted, arrays))


def layer_order(graph: Any) -> list[Any]:
    """The layers that return values, in topological order of their last return (the
    deeper layer first when a layer and its parent return the same value)."""
    position = {id(node): i for i, node in enumerate(graph.model.graph)}

    def key(layer: Any) -> tuple[int, int]:
        last = max((position.get(id(v.producer()), -1) for v in layer.returns), default=-1)
        return last, -layer.depth

    return sorted((layer for layer in graph.layers if layer.returns), key=key)


def record_graph(graph: Any, example_inputs: Any, feeds: dict[str, Any], device: str) -> Recording:
    """Run `graph` on ONNX Runtime with every layer's return values as extra outputs."""
    from .graph import Graph

    inputs = _graph_feeds(graph, example_inputs, feeds)
    layers = layer_order(graph)
    probe = graph.clone()
    ir_graph = probe.model.graph
    by_name = {v.name: v for node in ir_graph for v in node.outputs if v.name}
    wanted = [v.name for v in graph.model.graph.outputs]
    for layer in layers:
        for value in layer.returns:
            if value.name in by_name and value.name not in wanted:
                ir_graph.outputs.append(by_name[value.name])
                wanted.append(value.name)
    results = Graph(probe.model).run(inputs, device=device, as_dict=True)
    results.update({k: v for k, v in inputs.items() if k not in results})
    recording = Recording(
        name=f"Graph '{graph.name}' (onnxruntime)",
        layers={},
        classes={},
        outputs=[np.asarray(results[v.name]) for v in graph.model.graph.outputs],
        value_names={OUTPUTS: [str(v.name) for v in graph.model.graph.outputs]},
    )
    for layer in layers:
        names = [str(v.name) for v in layer.returns]
        if all(n in results for n in names):
            recording.layers[layer.path] = [np.asarray(results[n]) for n in names]
            recording.classes[layer.path] = layer.class_name
            recording.value_names[layer.path] = names
    return recording
