"""`Graph.summary()`: a Keras-style table of the layer tree with connectivity.

One row per layer down to `depth` (indented by depth), plus one row per op that a
shown layer runs itself outside any child layer (the functional calls in a
``forward``, which torchinfo does not list). A layer's output shapes are those of its
return values, then ``side:`` and the shapes of its side outputs (values it makes and
others read but it does not return, e.g. a KV-cache write). "Connected to" names the
rows that produce a row's inputs, or the graph inputs. Totals count parameters exactly as the
source framework does; buffers and constants are reported apart.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx_ir as ir

from . import provenance
from .hierarchy import Layer, format_shape, tensor_bytes, tensor_size

if TYPE_CHECKING:
    from .graph import Graph


@dataclass
class Row:
    name: str
    kind: str
    indent: int
    outputs: list[ir.Value]
    params: int | None
    inputs: list[ir.Value]
    connected: list[str]
    side_outputs: list[ir.Value] = field(default_factory=list)


def _rows(graph: Graph, depth: int | None) -> list[Row]:
    rows: list[Row] = []
    owner: dict[int, int] = {}  # id(node) -> index of the row that shows it
    position = {id(n): i for i, n in enumerate(graph.model.graph)}
    hidden = graph.tree.plumbing

    def order(node: ir.Node | None) -> int:
        return position.get(id(node), 1 << 61) if node is not None else -1

    def add_layer(layer: Layer, level: int) -> None:
        expand = bool(layer.children) and (depth is None or level < depth)
        if layer is not graph.root:
            rows.append(Row(layer.path, layer.class_name or "?", level - 1, layer.returns,
                            layer.param_count, layer.inputs, [], layer.side_outputs))  # fmt: skip
            for node in layer.nodes:
                owner[id(node)] = len(rows) - 1
        if not expand and layer is not graph.root:
            return
        # children and this layer's own ops, interleaved in graph order
        items: list[tuple[float, object]] = []
        for child in layer.children:
            if child.nodes:
                items.append((order(child.nodes[0]), child))
            else:  # an identity: right after what it passes through
                source = child.returns[0].producer() if child.returns else None
                items.append((order(source) + 0.5 if child.returns else 1 << 62, child))
        for node in layer.direct_nodes:
            if id(node) not in hidden:
                items.append((order(node), node))
        items.sort(key=lambda item: item[0])
        for _, item in items:
            if isinstance(item, Layer):
                add_layer(item, level + 1)
            else:
                node = item  # type: ignore[assignment]
                label = node.outputs[0].name or node.name or node.op_type  # type: ignore[attr-defined]
                inputs = [v for v in node.inputs if v is not None and not v.is_initializer()]  # type: ignore[attr-defined]
                rows.append(Row(label, node.op_type, level, list(node.outputs), None, inputs, []))  # type: ignore[attr-defined]
                owner[id(node)] = len(rows) - 1

    add_layer(graph.root, 0)
    graph_inputs = {id(v): v.name for v in graph.model.graph.inputs}
    for index, row in enumerate(rows):
        seen: list[str] = []
        for value in row.inputs:
            producer = value.producer()
            if producer is None:
                label = graph_inputs.get(id(value))
            elif id(producer) in hidden:
                label = None
            else:
                source = owner.get(id(producer))
                label = rows[source].name if source is not None and source != index else None
            if label and label not in seen:
                seen.append(label)
        row.connected = seen
    return rows


def _totals(graph: Graph) -> dict[str, tuple[int, int]]:
    counts = {kind: [0, 0] for kind in (provenance.TRAINABLE, provenance.FROZEN, provenance.BUFFER)}
    kinds = graph.parameter_kinds
    for name, value in graph.model.graph.initializers.items():
        kind = kinds.get(name)
        if kind in counts:
            counts[kind][0] += tensor_size(value)
            counts[kind][1] += tensor_bytes(value)
    constants = [v for n, v in graph.model.graph.initializers.items() if n not in kinds]
    result = {k: (c[0], c[1]) for k, c in counts.items()}
    result["constant"] = (
        sum(tensor_size(v) for v in constants),
        sum(tensor_bytes(v) for v in constants),
    )
    return result


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _shapes(row: Row) -> str:
    text = ", ".join(format_shape(v) for v in row.outputs) or "-"
    if row.side_outputs:
        text += " side: " + ", ".join(format_shape(v) for v in row.side_outputs)
    return text


def summarize(graph: Graph, depth: int | None = None, line_length: int = 120) -> str:
    rows = _rows(graph, depth)
    headers = ("Layer (type)", "Output Shape", "Param #", "Connected to")
    cells = [
        (
            "  " * r.indent + f"{r.name} ({r.kind})",
            _shapes(r),
            "-" if r.params is None else f"{r.params:,}",
            ", ".join(r.connected) or "-",
        )
        for r in rows
    ]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    widths[0] = min(widths[0], 100)
    widths[1] = min(widths[1], 60)

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(
            (c if len(c) <= w else c[: w - 1] + "…").ljust(w) if i != 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    rule = "=" * min(max(sum(widths) + 6, 60), max(line_length, 60))
    src = graph.source
    title = f'Model: "{graph.name}"' + (
        f"  (from {src.get('framework', '?')} {src.get('version', '')})" if src else ""
    )
    lines = [title, rule, fmt(headers), rule]
    lines += [fmt(row) for row in cells]
    totals = _totals(graph)
    trainable, frozen, buffers, constants = (
        totals[k] for k in (provenance.TRAINABLE, provenance.FROZEN, provenance.BUFFER, "constant")
    )
    lines += [
        rule,
        f"Total params: {trainable[0] + frozen[0]:,} ({_bytes(trainable[1] + frozen[1])})",
        f"Trainable params: {trainable[0]:,} ({_bytes(trainable[1])})",
        f"Non-trainable params: {frozen[0]:,} ({_bytes(frozen[1])})",
        f"Buffers: {buffers[0]:,} ({_bytes(buffers[1])})",
        f"Graph constants: {constants[0]:,} ({_bytes(constants[1])})",
    ]
    declared = src.get("parameters")
    if isinstance(declared, int) and declared != trainable[0] + frozen[0]:
        lines.append(f"Note: the source model has {declared:,} parameters; "
                     f"{declared - trainable[0] - frozen[0]:,} are not used by this graph.")  # fmt: skip
    lines.append(rule)
    return "\n".join(lines)


def summarize_html(graph: Graph, depth: int | None = 2) -> str:
    return "<pre>" + html.escape(summarize(graph, depth=depth)) + "</pre>"
