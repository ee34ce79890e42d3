"""`Graph.submodel`: cut a graph at layer or value boundaries into a new Graph.

Works on a clone, so the original graph is never touched. A layer path stands for the
values the layer returned (`Layer.returns`, in return order; its side outputs only when
named as values). The new outputs are named after the layer (``"blocks.0"``, or
``"blocks.0:1"`` for a second return value) so results read naturally; dead nodes,
initializers and unused inputs are removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from . import provenance
from .errors import LayerNotFoundError, close_matches

if TYPE_CHECKING:
    from .graph import Graph


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


def _resolve(target: Graph, name: str, values: dict[str, ir.Value]) -> list[tuple[str, ir.Value]]:
    layer = target.tree.by_path.get(name)
    if layer is not None and layer.returns:
        return [(name if i == 0 else f"{name}:{i}", v) for i, v in enumerate(layer.returns)]
    if name in values:
        return [(name, values[name])]
    close = close_matches(name, list(target.tree.by_path) + list(values))
    suggestion = ": close matches " + ", ".join(map(repr, close)) if close else ""
    if layer is not None:
        raise LayerNotFoundError(
            f"Layer '{name}' of graph '{target.name}' has no outputs here: no value it "
            "returned is in the graph (it was not called, or nothing uses what it computed)",
            "a layer path whose outputs the graph computes, or a value name" + suggestion,
            "pick a child layer or a value; see graph.layer(path).outputs",
        )
    raise LayerNotFoundError(
        f"'{name}' is neither a layer with outputs nor a value of graph '{target.name}'",
        "a layer path or value name" + suggestion,
        "list layers with [l.path for l in graph.layers]",
    )


def extract(graph: Graph, outputs: Sequence[str], inputs: Sequence[str] | None = None) -> Graph:
    from .graph import Graph

    new = graph.clone()
    ir_graph = new.model.graph
    values = _values_by_name(ir_graph)
    chosen: list[tuple[str, ir.Value]] = []
    for name in outputs:
        chosen.extend(_resolve(new, name, values))
    if inputs is not None:
        _cut_inputs(new, [_resolve(new, n, values)[0][1] for n in inputs])
    taken = set(values) | set(ir_graph.initializers)
    ir_graph.outputs.clear()
    renamed: dict[str, str] = {}
    for label, value in chosen:
        if value in ir_graph.outputs:
            continue
        if label in taken and ":" not in label and value.name != label:  # e.g. named like an input
            label += ":0"
        if value.name != label and label not in taken:
            if value.is_graph_input() or value.is_initializer():
                # an identity layer returning a graph input or weight: a node names the output
                copy = ir.node("Identity", [value], name=f"{label}/Identity")
                copy.outputs[0].shape, copy.outputs[0].type = value.shape, value.type
                ir_graph.append(copy)
                value = copy.outputs[0]
            else:
                renamed[value.name or ""] = label
            value.name = label
            taken.add(label)
        ir_graph.outputs.append(value)
    RemoveUnusedNodesPass()(new.model)
    for value in list(ir_graph.inputs):
        if not value.uses() and value not in ir_graph.outputs:
            ir_graph.inputs.remove(value)
    for name in [n for n, v in ir_graph.initializers.items() if not v.uses()]:
        ir_graph.initializers.pop(name)
    kinds = provenance.read_parameters(new.model)
    provenance.write_parameters(
        new.model, {n: k for n, k in kinds.items() if n in ir_graph.initializers}
    )
    _prune_layers(new.model, renamed)
    return Graph(new.model, base_dir=graph._base_dir)


def _prune_layers(model: ir.Model, renamed: dict[str, str]) -> None:
    """Keep the layer records that still own nodes or weights, and their ancestors.

    Recorded return values follow the values renamed after the layers they are outputs of.
    """
    records = [
        replace(r, returns=tuple(renamed.get(n, n) for n in r.returns)) if r.returns else r
        for r in provenance.read_layers(model)
    ]
    by_path = {r.path: r for r in records}
    alive = {provenance.node_scope(n) for n in model.graph}
    for name in model.graph.initializers:
        alive.update(p for p in by_path if p and name.startswith(p + "."))
    keep: set[str] = {""}
    for start in alive:
        path: str | None = start
        while path is not None and path not in keep:
            keep.add(path)
            record = by_path.get(path)
            path = record.parent if record else None
    provenance.write_layers(model, [r for r in records if r.path in keep])


def _cut_inputs(new: Graph, cut: list[ir.Value]) -> None:
    """Make intermediate values graph inputs: their producers become dead and are removed."""
    ir_graph = new.model.graph
    for value in cut:
        if value.is_graph_input():
            continue
        fresh = ir.Value(name=value.name, shape=value.shape, type=value.type)
        value.name = f"{value.name}__cut"
        value.replace_all_uses_with(fresh, replace_graph_outputs=True)
        ir_graph.inputs.append(fresh)
