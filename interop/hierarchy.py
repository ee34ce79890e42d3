"""The layer tree of a graph: source layers as scopes over the ONNX nodes.

Built once per `Graph` from the provenance metadata (see `interop.provenance`) in
O(nodes x depth): every node belongs to its innermost layer and to each ancestor.
A layer's inputs are the values its nodes read that are made outside it (weights
excluded). Its outputs are the values its calls returned, in return order (recorded by
the capture as ``returns``, see `interop.provenance`), then its side outputs: values
made inside it that are read outside it (or are graph outputs) but were not returned,
such as the key/value cache a Hugging Face attention layer writes. A layer without a
``returns`` record (a file from another tool) has every such value as a return. A layer
that emits no node (an identity, eval-mode dropout) returns the value it passes through.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import provenance

_CALL_SUFFIX = re.compile(r"@\d+$")  # torch marks the second call of a module "path@1"
_SEPARATORS = re.compile(r"[./]")


_METADATA_OPS = {"Constant", "Shape", "Size"}


def plumbing_nodes(graph: ir.Graph, weights: set[str] | None = None) -> set[int]:
    """ids of nodes that compute only from constants and shapes, not from data.

    Views hide them (Constant, Shape, and arithmetic on their results such as the
    shape tuple of a Reshape): runtimes fold them away and they carry no data flow.
    A node reading a weight (`weights`, or any float initializer when None) is data.
    """

    def constant(value: ir.Value) -> bool:
        if weights is not None:
            return value.name not in weights
        return value.dtype is None or not value.dtype.is_floating_point()

    hidden: set[int] = set()
    for node in graph:
        inputs = node.inputs[:1] if node.op_type == "CastLike" else node.inputs  # 2nd: dtype only
        if node.op_type in _METADATA_OPS or (
            node.inputs
            and all(
                value is None
                or (value.is_initializer() and constant(value))
                or (value.producer() is not None and id(value.producer()) in hidden)
                for value in inputs
            )
        ):
            hidden.add(id(node))
    return hidden


def short_class(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1] if qualified else ""


def format_shape(value: ir.Value | None) -> str:
    if value is None or value.shape is None:
        return "?"
    dims = [
        str(d) if not isinstance(d, ir.SymbolicDim) else str(d.value or "?") for d in value.shape
    ]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def tensor_size(value: ir.Value) -> int:
    """Number of elements of a value with a static shape (0 when unknown)."""
    if value.shape is None or not value.shape.is_static():
        if value.const_value is not None:
            return int(np.prod(value.const_value.shape.numpy(), dtype=np.int64))
        return 0
    return int(np.prod(value.shape.numpy(), dtype=np.int64))


def tensor_bytes(value: ir.Value) -> int:
    """Bytes of a tensor's data (strings: the bytes of their contents)."""
    if value.dtype == ir.DataType.STRING:
        tensor = value.const_value
        return (
            sum(len(s) for s in tensor.string_data()) if isinstance(tensor, ir.StringTensor) else 0
        )
    itemsize = value.dtype.itemsize if value.dtype is not None else 4
    return int(tensor_size(value) * itemsize)


@dataclass(eq=False)
class Layer:
    """One layer of the source model, as seen in the graph.

    >>> layer = graph.layer("blocks.0")            # doctest: +SKIP
    >>> layer.class_name, layer.param_count         # doctest: +SKIP
    ('Block', 296)
    """

    path: str
    qualified_class: str
    parent: Layer | None = None
    children: list[Layer] = field(default_factory=list)
    nodes: list[ir.Node] = field(default_factory=list)  # own and descendants', graph order
    direct_nodes: list[ir.Node] = field(default_factory=list)
    parameters: dict[str, ir.Value] = field(default_factory=dict)  # owned directly
    parameter_kinds: dict[str, str] = field(default_factory=dict)
    inputs: list[ir.Value] = field(default_factory=list)
    returns: list[ir.Value] = field(default_factory=list)  # what its calls returned, in order
    side_outputs: list[ir.Value] = field(default_factory=list)  # read outside, not returned
    return_names: tuple[str, ...] | None = field(default=None, repr=False)  # as recorded

    @property
    def outputs(self) -> list[ir.Value]:
        """The return values, then the side outputs (`side_outputs`)."""
        return self.returns + self.side_outputs

    @property
    def class_name(self) -> str:
        return short_class(self.qualified_class)

    @property
    def depth(self) -> int:
        depth, layer = 0, self.parent
        while layer is not None:
            depth, layer = depth + 1, layer.parent
        return depth

    def walk(self) -> Iterable[Layer]:
        """This layer and all below it, depth first in definition order."""
        yield self
        for child in self.children:
            yield from child.walk()

    def all_parameters(self) -> dict[str, ir.Value]:
        """Parameters and buffers of this layer and its descendants."""
        out: dict[str, ir.Value] = {}
        for layer in self.walk():
            out.update(layer.parameters)
        return out

    def all_parameter_kinds(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for layer in self.walk():
            out.update(layer.parameter_kinds)
        return out

    def count(self, *kinds: str) -> int:
        """Elements of this subtree's weights of the given kinds."""
        kinds_of = self.all_parameter_kinds()
        return sum(
            tensor_size(v) for name, v in self.all_parameters().items() if kinds_of[name] in kinds
        )

    @property
    def param_count(self) -> int:
        """Trainable plus frozen parameters (buffers excluded), as torch/Keras count them."""
        return self.count(provenance.TRAINABLE, provenance.FROZEN)

    @property
    def input_shapes(self) -> list[str]:
        return [format_shape(v) for v in self.inputs]

    @property
    def output_shapes(self) -> list[str]:
        return [format_shape(v) for v in self.outputs]

    def __repr__(self) -> str:
        return (
            f"<Layer '{self.path or '<root>'}' ({self.class_name}): {len(self.children)} children, "
            f"{len(self.nodes)} nodes, {self.param_count:,} params, "
            f"in {', '.join(self.input_shapes) or '-'} -> out {', '.join(self.output_shapes) or '-'}>"
        )


class LayerTree:
    """All layers of a graph, indexed by path."""

    def __init__(self, model: ir.Model):
        self.root, self.by_path = _build_layers(model)
        _assign_nodes(model.graph, self)
        _assign_parameters(model, self)
        kinds = provenance.read_parameters(model)
        recorded = provenance.PARAMETERS in model.metadata_props
        self.plumbing = plumbing_nodes(model.graph, set(kinds) if recorded else None)
        values = _values_by_name(model.graph)
        for layer in reversed(list(self.root.walk())):  # children first: containers read them
            _compute_boundary(layer, model.graph, self.plumbing, values)

    def resolve(self, scope: str) -> Layer:
        """The layer for a node scope, creating layers for scopes the table lacks."""
        scope = _CALL_SUFFIX.sub("", scope)
        layer = self.by_path.get(scope)
        if layer is None:
            parent = self.resolve(_parent_path(scope, self.by_path)) if scope else self.root
            layer = Layer(scope, "", parent)
            parent.children.append(layer)
            self.by_path[scope] = layer
        return layer

    def owner_of(self, name: str) -> Layer | None:
        """The deepest layer whose path prefixes `name` at a separator."""
        cuts = [m.start() for m in _SEPARATORS.finditer(name)]
        for cut in reversed(cuts):
            layer = self.by_path.get(name[:cut])
            if layer is not None:
                return layer
        return None


def _parent_path(path: str, known: dict[str, Layer]) -> str:
    cuts = [m.start() for m in _SEPARATORS.finditer(path)]
    for cut in reversed(cuts):
        if path[:cut] in known:
            return path[:cut]
    return ""


def _build_layers(model: ir.Model) -> tuple[Layer, dict[str, Layer]]:
    records = provenance.read_layers(model)
    by_path: dict[str, Layer] = {}
    for record in records:
        by_path[record.path] = Layer(record.path, record.class_name, return_names=record.returns)
    root = by_path.get("")
    if root is None:
        root = by_path[""] = Layer("", model.graph.name or "Model")
    for record in records:
        layer = by_path[record.path]
        if layer is root:
            continue
        parent_path = (
            record.parent if record.parent in by_path else _parent_path(record.path, by_path)
        )
        layer.parent = by_path[parent_path]
        layer.parent.children.append(layer)
    return root, by_path


def _assign_nodes(graph: ir.Graph, tree: LayerTree) -> None:
    for node in graph:
        layer: Layer | None = tree.resolve(provenance.node_scope(node))
        assert layer is not None
        layer.direct_nodes.append(node)
        while layer is not None:
            layer.nodes.append(node)
            layer = layer.parent


def _assign_parameters(model: ir.Model, tree: LayerTree) -> None:
    kinds = provenance.read_parameters(model)
    # a file from another tool has no table: every initializer counts as a weight there
    foreign = provenance.PARAMETERS not in model.metadata_props
    for name, value in model.graph.initializers.items():
        kind = kinds.get(name) or (provenance.TRAINABLE if foreign else None)
        if kind is None:
            continue
        owner = tree.owner_of(name)
        if owner is None:
            users = [use.node for use in value.uses()]
            owner = tree.resolve(provenance.node_scope(users[0])) if users else tree.root
        owner.parameters[name] = value
        owner.parameter_kinds[name] = kind


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {v.name: v for v in graph.initializers.values() if v.name}
    values.update({v.name: v for v in graph.inputs if v.name})
    for node in graph:
        values.update({v.name: v for v in node.outputs if v.name})
    return values


def _compute_boundary(
    layer: Layer, graph: ir.Graph, plumbing: set[int], values: dict[str, ir.Value]
) -> None:
    inside = {id(n) for n in layer.nodes}
    graph_outputs = {id(v) for v in graph.outputs}
    seen: set[int] = set()
    for node in layer.nodes:
        for value in node.inputs:
            if value is None or id(value) in seen or value.is_initializer():
                continue
            producer = value.producer()
            if producer is not None and (id(producer) in inside or id(producer) in plumbing):
                continue
            seen.add(id(value))
            layer.inputs.append(value)
    escaping: list[ir.Value] = []
    for node in layer.nodes:
        if id(node) in plumbing and not any(id(v) in graph_outputs for v in node.outputs):
            continue
        for value in node.outputs:
            if id(value) in graph_outputs or any(
                id(use.node) not in inside for use in value.uses()
            ):
                escaping.append(value)
    returns = _recorded_returns(layer, graph, values)
    if returns is None:
        # not called itself (a ModuleList) or nothing recorded: what leaves it is returned,
        # except what its sub-layers wrote on the side (all of it when nothing is recorded)
        below = {id(v) for child in layer.children for v in child.returns}
        side = {id(v) for child in layer.children for v in child.side_outputs} - below
        layer.returns = [v for v in escaping if id(v) not in side]
        layer.side_outputs = [v for v in escaping if id(v) in side]
        return
    layer.returns = returns
    returned = {id(v) for v in returns}
    layer.side_outputs = [v for v in escaping if id(v) not in returned]
    for value in returns:  # passed through unchanged (an identity layer): an input too
        producer = value.producer()
        if id(value) not in seen and (producer is None or id(producer) not in inside):
            if not value.is_initializer():
                seen.add(id(value))
                layer.inputs.append(value)


def _recorded_returns(
    layer: Layer, graph: ir.Graph, values: dict[str, ir.Value]
) -> list[ir.Value] | None:
    """The recorded return values that are in the graph, each once; None when none are."""
    if layer.parent is None:  # the model itself returns the graph outputs
        return list(graph.outputs)
    if layer.return_names is None:
        return None
    found: dict[int, ir.Value] = {}
    for name in layer.return_names:
        value = values.get(name)
        if value is not None:
            found.setdefault(id(value), value)
    return list(found.values()) or None
