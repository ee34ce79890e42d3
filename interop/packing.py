"""Fold layer weights that a graph computes from its parameters into initializers.

ONNX LSTM/GRU/RNN take their weights packed: W [directions, gates * hidden, input] with
ONNX's gate order. Exporters compute that packing from the source parameters with ONNX
nodes: torch.onnx slices each `lstm.weight_ih_l0` into gates, reorders and concatenates
them (Slice/Concat/Unsqueeze), the Keras capture transposes and splits `lstm/kernel`.
That keeps the source parameters in the graph, but an emitter sees a computed W, not an
initializer, so it could not build the host's own LSTM layer.

`pack_weights` evaluates such weight expressions once, with numpy, and gives
the recurrent node initializers instead (`lstm.W`, `lstm.R`, `lstm.B`), listed in the
parameter table with their sources' kind and recording their sources' names under
``interop.packed_from`` (JSON list) so an emitter can name its layer after them. The
rewrite happens on a clone: the caller's model is never changed. An expression is only
folded when its parameters feed nothing else (a weight tied to another op keeps the
computed path, which is correct and trainable, just not a native layer).

The same holds for the weights of Conv, ConvTranspose, Gemm, MatMul, the normalizations and
Gather when they are one parameter laid out anew: the Keras and Flax captures read an HWIO
kernel through Transpose (and a depthwise one through Reshape). Only layout ops fold there
(Transpose, Reshape, Squeeze, Unsqueeze, Flatten, Identity: each element kept once), and the
folded initializer keeps the parameter's name: training moves the same numbers. Arithmetic
on parameters (weight normalization) keeps its own parametrisation.

>>> packed = pack_weights(graph.model)      # doctest: +SKIP
>>> [n.inputs[1].name for n in packed.graph if n.op_type == "LSTM"]   # doctest: +SKIP
['lstm.W']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from . import provenance

PACKED_FROM = provenance.PACKED_FROM

# the weight inputs of each recurrent op (W, R, B; LSTM's peepholes P)
RECURRENT_WEIGHTS = {"LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3), "RNN": (1, 2, 3)}
# the weight inputs of the ops that emitters turn into layers: a weight laid out for ONNX
# from one source parameter (the Keras and Flax captures transpose HWIO kernels to OIHW
# in the graph) folds into an initializer of that parameter's name
LAYER_WEIGHTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2, 3, 4),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "Gather": (0,),
}
# ops that only lay a tensor out (every element kept once): folding them keeps the
# parameter itself, in the layout the op reads, so training moves the same numbers
_LAYOUT_OPS = frozenset({"Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
# ops a weight expression may use: pure functions of their inputs, no subgraphs, no randomness
_EXPRESSION_OPS = frozenset(
    {
        "Cast",
        "CastLike",
        "Concat",
        "Constant",
        "Div",
        "Add",
        "Sub",
        "Mul",
        "Expand",
        "Flatten",
        "Gather",
        "Identity",
        "Reshape",
        "Shape",
        "Size",
        "Slice",
        "Split",
        "Squeeze",
        "Transpose",
        "Unsqueeze",
        "Range",
        "Tile",
        "ConstantOfShape",
    }
)
_SHAPE_READERS = ("Shape", "Size")


def _weight_slots(node: ir.Node) -> tuple[int, ...]:
    if node.domain not in ("", "ai.onnx"):
        return ()
    return RECURRENT_WEIGHTS.get(node.op_type) or LAYER_WEIGHTS.get(node.op_type, ())


def _candidates(graph: ir.Graph) -> list[tuple[ir.Node, int, ir.Value]]:
    found = []
    for node in graph:
        for index in _weight_slots(node):
            value = node.inputs[index] if index < len(node.inputs) else None
            if value is not None and value.producer() is not None:
                found.append((node, index, value))
    return found


class _Expression:
    """The nodes and parameters one computed weight depends on, if all are constants."""

    def __init__(self, graph: ir.Graph, kinds: dict[str, str]):
        self.graph, self.kinds = graph, kinds
        self._static: dict[ir.Value, bool] = {}

    def is_static(self, value: ir.Value) -> bool:
        if value in self._static:
            return self._static[value]
        self._static[value] = False  # guards against cycles while deciding
        node = value.producer()
        if value.is_graph_input():
            static = False
        elif node is None:
            static = value.const_value is not None
        elif node.op_type in _SHAPE_READERS and node.domain in ("", "ai.onnx"):
            # a shape is static where it is recorded; unknown dims get a probe value
            source = node.inputs[0]
            static = source is not None and (source.shape is not None or self.is_static(source))
        else:
            static = (
                node.domain in ("", "ai.onnx")
                and node.op_type in _EXPRESSION_OPS
                and all(v is None or self.is_static(v) for v in node.inputs)
            )
        self._static[value] = static
        return static

    def cone(self, value: ir.Value) -> tuple[list[ir.Node], list[ir.Value]]:
        """The producing nodes (topological order) and the parameters under a static value."""
        nodes: list[ir.Node] = []
        parameters: list[ir.Value] = []
        seen: set[Any] = set()

        def visit(v: ir.Value) -> None:
            if v in seen:
                return
            seen.add(v)
            node = v.producer()
            if node is None:
                if v.name in self.kinds:
                    parameters.append(v)
                return
            if node in seen:
                return
            seen.add(node)
            first = node.inputs[0] if node.inputs else None
            if (
                node.op_type not in _SHAPE_READERS
                or first is None
                or _recorded_shape(first) is None
            ):
                for u in node.inputs:
                    if u is not None:
                        visit(u)
            nodes.append(node)

        visit(value)
        return nodes, parameters


def _recorded_shape(value: ir.Value) -> tuple[Any, ...] | None:
    """A value's shape when it is only needed through Shape/Size (a weight, or dims on record)."""
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    if value.shape is None or value.producer() is None and not value.is_graph_input():
        return None
    return tuple(value.shape)


# stand-ins for dims unknown at emission (batch, sequence): a weight expression that reads
# them must give the same result for both, or it is not a weight
_PROBES = (1_000_003, 1_000_033)


def _evaluate(
    graph: ir.Graph, version: int, nodes: Iterable[ir.Node], value: ir.Value
) -> np.ndarray | None:
    results = [_evaluate_once(graph, version, nodes, value, probe) for probe in _PROBES]
    first, second = results
    if first is None or second is None or first.shape != second.shape:
        return None
    return first if np.array_equal(first, second) else None


def _evaluate_once(
    graph: ir.Graph, version: int, nodes: Iterable[ir.Node], value: ir.Value, probe: int
) -> np.ndarray | None:
    from .interpret import fold_on_host  # interpret imports this module

    results: dict[ir.Value, np.ndarray] = {}

    def get(v: ir.Value | None) -> Any:
        if v is None:
            return None
        if v in results:
            return results[v]
        if v.const_value is not None:
            return v.const_value.numpy()
        shape = _recorded_shape(v)  # only read through Shape/Size: an array of that shape
        assert shape is not None
        dims = [d if isinstance(d, int) else probe for d in shape]
        return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), dims, [0] * len(dims))

    for node in nodes:
        inputs = [get(v) for v in node.inputs]
        outputs = fold_on_host(graph, version, node, inputs)
        if outputs is None:
            return None
        results.update(zip(node.outputs, outputs))
    return results.get(value)


def _common_prefix(names: list[str]) -> str:
    for separator in (".", "/"):
        parts = os.path.commonprefix([n.split(separator)[:-1] for n in names])
        if parts:
            return separator.join(parts)
    return ""


def _kind(kinds: dict[str, str], parameters: list[ir.Value]) -> str:
    found = {kinds[str(p.name)] for p in parameters}
    for kind in (provenance.TRAINABLE, provenance.FROZEN):
        if kind in found:
            return kind
    return provenance.BUFFER


def pack_weights(model: ir.Model, version: int) -> ir.Model:
    """The model with computed layer weights folded into initializers (a clone), or itself.

    LSTM/GRU/RNN weights packed from several parameters get a name of their own
    (``lstm.W``); a weight that is one parameter laid out anew keeps that parameter's name.
    """
    kinds = provenance.read_parameters(model)
    if not kinds or not _candidates(model.graph):
        return model
    # torch parameters are in ONNX's layout already: one read through a Transpose belongs to
    # a module that is no layer of that kind (MultiheadAttention's in_proj_weight under
    # F.linear), and re-emitted in torch it stays the raw parameter it was
    relay = provenance.read_source(model).get("framework") != "torch"
    model = model.clone()
    graph = model.graph
    expression = _Expression(graph, kinds)
    plans = []
    for node, index, value in _candidates(graph):
        if not expression.is_static(value):
            continue
        nodes, parameters = expression.cone(value)
        if not parameters:
            continue  # a constant of the graph, not a weight: it folds anyway
        if node.op_type not in RECURRENT_WEIGHTS and (
            not relay
            or len(parameters) != 1
            or any(n.op_type not in _LAYOUT_OPS for n in _weight_dependent(nodes, parameters))
        ):
            continue  # arithmetic on weights (weight norm...) keeps its own parametrisation
        plans.append((node, index, value, nodes, parameters))
    if not plans:
        return model
    # a parameter read outside the recurrent weights (tied to another op) is left alone
    inside: set[ir.Node] = {n for *_, nodes, _ in plans for n in nodes}
    recurrent = {node for node, *_ in plans}
    folded: list[tuple[ir.Value, str]] = []
    used_names = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    for node, index, value, nodes, parameters in plans:
        readers = [
            use.node
            for p in parameters
            for use in p.uses()
            if use.node.op_type not in _SHAPE_READERS
        ]
        escapes = [
            use.node
            for n in _weight_dependent(nodes, parameters)
            for out in n.outputs
            for use in out.uses()
            if use.node not in inside and use.node not in recurrent
        ]
        if any(r not in inside for r in readers) or escapes:
            continue
        relaid = node.op_type not in RECURRENT_WEIGHTS
        if relaid and any(r not in nodes and r is not node for r in readers):
            continue  # a parameter tied to two layers stays one tensor
        array = _evaluate(graph, version, nodes, value)
        source = parameters[0].const_value
        if array is None or relaid and (source is None or array.size != source.size):
            continue
        names = [str(p.name) for p in parameters]
        if relaid:
            name = names[0]  # registered below, once the parameter it replaces is gone
        else:
            prefix = _common_prefix(names) or node.name or node.op_type.lower()
            leaf = {1: "W", 2: "R", 3: "B", 7: "P"}[index]
            suffix = "".join(sorted({_layer_tag(n) for n in names}))
            name = f"{prefix}.{leaf}{suffix}"
            while name in used_names:
                name += "_"
            used_names.add(name)
        packed = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        packed.shape = ir.Shape(array.shape)
        packed.dtype = ir.DataType.from_numpy(array.dtype)
        packed.metadata_props[PACKED_FROM] = json.dumps(names)
        node.replace_input_with(index, packed)
        folded.append((packed, _kind(kinds, parameters)))
    if not folded:
        return model
    for node in reversed(list(graph)):
        if node in inside and not any(out.uses() or out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)
    for name in [n for n, v in graph.initializers.items() if not v.uses() and n in kinds]:
        if not graph.initializers[name].is_graph_input():
            del graph.initializers[name]
    for packed, kind in folded:
        if packed.name in graph.initializers:  # the parameter is still read (by a Shape)
            packed.name = f"{packed.name}.relaid"
            assert packed.const_value is not None
            packed.const_value.name = packed.name
        graph.register_initializer(packed)
        kinds[str(packed.name)] = kind
    provenance.write_parameters(model, {k: v for k, v in kinds.items() if k in graph.initializers})
    return model


def _weight_dependent(nodes: list[ir.Node], parameters: list[ir.Value]) -> list[ir.Node]:
    """The nodes of a cone (topologically ordered) that read a parameter, directly or not."""
    tainted: set[ir.Value] = set(parameters)
    found = []
    for node in nodes:
        if node.op_type not in _SHAPE_READERS and any(v in tainted for v in node.inputs):
            tainted.update(node.outputs)
            found.append(node)
    return found


def _layer_tag(name: str) -> str:
    """``_l1`` for torch's layer-1 names (``weight_ih_l1``, ``..._l1_reverse``), else ""."""
    leaf = name.rsplit(".", 1)[-1]
    for part in leaf.split("_"):
        if part[:1] == "l" and part[1:].isdigit() and part != "l0":
            return "_" + part
    return ""
