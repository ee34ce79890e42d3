"""ONNX files from other tools: weights listed as graph inputs, weights computed from constants.

Files of IR version 3 (the model zoo's, opsets 7-9) list every initializer as a graph input
too, and exporters of any age compute some weights with small constant subgraphs
(ConstantOfShape of a shape initializer, Reshape / Transpose / Cast of a weight, Identity
chains, Constant nodes). Both are weights, not inputs:

- `data_inputs` / `weight_inputs` split a graph's inputs into the ones a caller feeds and
  the initializer-backed ones, which `Graph.inputs`, `Graph.run` and every emitted model
  leave out (`Graph.run` still takes them by name, as overrides);
- `prepare` (part of normalization, on the emitter's private copy) removes the
  initializer-backed inputs, drops initializers that no node reads (one warning with
  their count) and, for files without interop's parameter table, folds every constant
  subgraph into initializers with interop's reference semantics and lifts Constant nodes
  (onnx_ir's `LiftConstantsToInitializersPass`), so Conv / Gemm / BatchNormalization read
  initializers and emitters build native layers; `static_reshapes` turns a Reshape target
  computed from the data's own dims (`x.view(x.size(0), -1)`) into a constant.

>>> prepared = prepare(model)    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import onnx_ir as ir

from . import provenance
from .quantized import is_quantized_op, quantized_fix

# graph metadata of the emitter's private copy: "<producer_name> <producer_version>" of a
# file from another tool, for error messages
PRODUCER = provenance.PRODUCER
FILE_OPSET = provenance.FILE_OPSET


def weight_inputs(graph: ir.Graph) -> list[ir.Value]:
    """Graph inputs that are initializers too (an old-style input with a default)."""
    inits = graph.initializers
    return [v for v in graph.inputs if v.name is not None and inits.get(v.name) is v]


def data_inputs(graph: ir.Graph) -> list[ir.Value]:
    """Graph inputs a caller must feed: those without an initializer behind them."""
    weights = set(weight_inputs(graph))
    return [v for v in graph.inputs if v not in weights]


def is_foreign(model: ir.Model) -> bool:
    """A file from another tool: no interop parameter table (an empty one is a model without weights)."""
    return provenance.PARAMETERS not in model.metadata_props


def needs_preparing(model: ir.Model) -> bool:
    return bool(weight_inputs(model.graph)) or is_foreign(model)


def prepare(model: ir.Model, file_opset: int | None = None) -> ir.Model:
    """Weights become initializers only, constant subgraphs fold (in place; returns the model)."""
    graph = model.graph
    if is_foreign(model):
        name = " ".join(p for p in (model.producer_name, model.producer_version) if p)
        graph.metadata_props[PRODUCER] = name or "an unnamed producer"
        if file_opset is not None:
            graph.metadata_props[FILE_OPSET] = str(file_opset)
    for value in weight_inputs(graph):
        graph.inputs.remove(value)
    unused = [
        name for name, v in graph.initializers.items() if not v.uses() and not v.is_graph_output()
    ]
    for name in unused:
        del graph.initializers[name]
    if unused:
        shown = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        warnings.warn(
            f"{len(unused)} initializer(s) that no node reads were dropped before emission ({shown})",
            stacklevel=4,
        )
    if is_foreign(model):
        fold_constants(model)  # a weight's DequantizeLinear too: dequantized weights
        if any(n.op_type == "QuantizeLinear" for n in graph):
            from .quantized import fake_quantize_pairs

            fake_quantize_pairs(model)  # activations: fake-quant with a gradient
        if any(n.op_type == "Reshape" for n in graph):
            from .simplify import infer_missing_shapes

            infer_missing_shapes(model)  # the data's symbolic dims, for static_reshapes
            if static_reshapes(model, _opset(model)):
                from onnx_ir.passes.common import RemoveUnusedNodesPass

                RemoveUnusedNodesPass()(model)
    return model


def _opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


# ops whose value is not a function of their inputs, or that hold graphs: never folded;
# nor Identity: an exporter shares one weight between layers through Identity nodes, and the
# emitters resolve those to the one weight (a folded copy per reader would untie it)
_NOT_FOLDED = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceMap", "Identity",
}  # fmt: skip


def fold_constants(model: ir.Model) -> None:
    """Every node computing from constants only becomes an initializer (in place).

    The values come from interop's own reference semantics (`interpret.fold_on_host`, the
    numpy backend the conformance suite checks), so a folded weight is exactly what every
    emitter would compute. onnxscript's folder was measured first and rejected: its
    rewrites are not value-preserving on the ONNX node tests (CastLike -> Cast drops
    `saturate`, batched Scan-8 and SplitToSequence fail to fold).
    """
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

    from .interpret import fold_on_host  # interpret imports this module

    quiet = logging.getLogger("onnx_ir.passes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # Constant nodes first: a folded node's inputs must be initializers
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    finally:
        quiet.setLevel(level)
    graph, version = model.graph, _opset(model)
    outputs_of_graph = {id(v) for v in graph.outputs}
    for node in list(graph):  # topological order: a folded result feeds the next node
        if not _foldable(node, outputs_of_graph):
            continue
        arrays = [None if v is None else v.const_value.numpy() for v in node.inputs]  # type: ignore[union-attr]
        try:
            results = fold_on_host(graph, version, node, arrays)
        except Exception:  # noqa: BLE001 (left to the emitter, which reports it with context)
            continue
        if results is None:
            continue
        replacements = []
        for value, array in zip(node.outputs, results):
            folded = ir.Value(
                shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.tensor(array),
            )
            value.replace_all_uses_with(folded)
            replacements.append((value.name, folded))
        graph.remove(node, safe=True)
        for name, folded in replacements:  # the node's output names, now initializers
            folded.name = name
            graph.register_initializer(folded)
    RemoveUnusedNodesPass()(model)


def _foldable(node: ir.Node, outputs_of_graph: set[int]) -> bool:
    """A standard, deterministic node without subgraphs whose inputs are all initializers and
    whose outputs are not graph outputs (those keep their producer)."""
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return False
    if node.op_type == "Identity":
        return _uniform_copy(node)
    if node.op_type in _NOT_FOLDED:
        return False
    if any(isinstance(a.value, (ir.Graph, list)) and a.type in _GRAPH_ATTRIBUTES
           for a in node.attributes.values()):  # fmt: skip
        return False
    if any(id(v) in outputs_of_graph for v in node.outputs):
        return False
    return all(v is None or (v.is_initializer() and v.const_value is not None) for v in node.inputs)


_GRAPH_ATTRIBUTES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _uniform_copy(identity: ir.Node) -> bool:
    """An Identity of an initializer whose entries are all equal (zeros, ones).

    The TorchScript exporter keeps one copy of equal tensors and reads it through Identity
    nodes: the zero biases of BatchNorm-folded convolutions and the unit scales of fresh
    LayerNorms come out shared. Such a tie is the exporter's, not the model's; folded, each
    reader has its own constant, and hosts that cannot share one variable between layers
    (Keras, Flax) build native layers for all of them. Other shared weights stay tied.
    """
    source = identity.inputs[0] if identity.inputs else None
    if source is None or not source.is_initializer() or source.const_value is None:
        return False
    if identity.outputs[0].is_graph_output():
        return False
    array = source.const_value.numpy()
    return array.size > 0 and array.dtype.kind == "f" and bool(np.all(array == array.flat[0]))


def unsupported_detail(
    graph: ir.Graph, node: ir.Node, op: str, version: int
) -> tuple[str, str | None]:
    """(detail, fix) of the error for a node nothing can emit: its name and opset, and for a
    file of another tool the opset it was written at and the producer the file names."""
    producer = graph.metadata_props.get(PRODUCER)
    written = graph.metadata_props.get(FILE_OPSET)
    detail = f"node '{node.name}', opset {version}"
    if written is not None and written != str(version):
        detail = f"node '{node.name}', opset {written} (converted to {version})"
    if is_quantized_op(node.op_type, node.domain):
        fix = quantized_fix(op)
        return (detail if producer is None else f"{detail}, file written by {producer}"), fix
    if producer is None:
        return detail, None
    fix = (
        f"re-export the model from its source without '{op}' (exporters can often "
        "decompose an op into standard ones), or register semantics for it (docs/emit.md)"
    )
    return f"{detail}, file written by {producer}", fix


# ops a Reshape's target shape may be computed with for `static_reshapes` to resolve it
_SHAPE_ARITHMETIC = frozenset(
    {"Shape", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"}
)
# stand-ins for symbolic dims, one per dim name and run (two runs must agree on constants)
_PROBES = (1_000_003, 2_000_029)


def _shape_cone(value: ir.Value) -> list[ir.Node] | None:
    """The nodes computing a shape from recorded shapes and constants (topological), or None."""
    nodes: list[ir.Node] = []
    seen: set[ir.Node] = set()

    def visit(v: ir.Value | None) -> bool:
        if v is None or v.const_value is not None:
            return True
        node = v.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node in seen:
            return True
        if node.op_type not in _SHAPE_ARITHMETIC or len(nodes) > 64:
            return False
        seen.add(node)
        if node.op_type == "Shape":
            source = node.inputs[0]
            if source is None or source.shape is None:
                return False
        elif not all(visit(u) for u in node.inputs):
            return False
        nodes.append(node)
        return True

    return nodes if visit(value) else None


def _probe_shape(
    graph: ir.Graph, version: int, nodes: list[ir.Node], value: ir.Value, run: int
) -> tuple[np.ndarray, dict[str, int]] | None:
    """The shape `value` computes with symbolic dim number i (first seen) as _PROBES[run] + i,
    and that numbering."""
    from .interpret import fold_on_host  # interpret imports this module

    results: dict[ir.Value, np.ndarray] = {}
    names: dict[str, int] = {}
    for node in nodes:
        if node.op_type == "Shape":
            source = node.inputs[0]
            assert source is not None and source.shape is not None
            dims = []
            for dim in source.shape:
                if isinstance(dim, int):
                    dims.append(dim)
                elif isinstance(dim, ir.SymbolicDim) and dim.value:
                    dims.append(_PROBES[run] + names.setdefault(dim.value, len(names)))
                else:
                    return None  # an anonymous dim: nothing to match it with
            stand_in = np.lib.stride_tricks.as_strided(
                np.zeros(1, np.float32), dims, [0] * len(dims)
            )
            inputs: list[Any] = [stand_in]
        else:
            inputs = [
                None if v is None else results[v] if v in results else v.const_value.numpy()  # type: ignore[union-attr]
                for v in node.inputs
            ]
        outputs = fold_on_host(graph, version, node, inputs)
        if outputs is None:
            return None
        results.update(zip(node.outputs, outputs))
    return (results[value], names) if value in results else None


def static_reshapes(model: ir.Model, version: int) -> int:
    """Reshapes to a shape computed from the data's own dims become constant shapes (in place).

    `x.view(x.size(0), -1)` exports as Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))
    (tf2onnx's Flatten likewise): a shape known only when the graph runs, which a symbolic
    host (Keras) cannot build a layer for. Evaluated with stand-ins for the symbolic dims,
    each entry is either constant or the data's dim at the same position (the same symbol),
    which Reshape's 0 copies: the target becomes the constant [0, -1]. Returns the count.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        data, target = node.inputs[0], node.inputs[1]
        if data is None or data.shape is None or target is None or target.const_value is not None:
            continue
        allowzero = node.attributes.get("allowzero")
        if allowzero is not None and allowzero.as_int():
            continue
        cone = _shape_cone(target)
        if not cone:
            continue
        runs = [_probe_shape(model.graph, version, cone, target, run) for run in (0, 1)]
        if runs[0] is None or runs[1] is None:
            continue
        (first, names), (second, _) = runs[0], runs[1]
        if first.shape != second.shape or first.ndim != 1:
            continue
        shape = [int(v) for v in first]
        for k, (a, b) in enumerate(zip(first, second)):
            if a == b:
                continue
            dim = data.shape[k] if k < len(data.shape) else None
            if not (
                isinstance(dim, ir.SymbolicDim)
                and dim.value in names
                and a == _PROBES[0] + names[dim.value]
                and b == _PROBES[1] + names[dim.value]
            ):
                break
            shape[k] = 0  # Reshape's 0: the data's dim at k
        else:
            name = f"{node.name or 'reshape'}_static_shape"
            while name in model.graph.initializers:
                name += "_"
            constant = ir.Value(
                name=name, const_value=ir.tensor(np.array(shape, np.int64), name=name)
            )
            constant.shape, constant.dtype = ir.Shape([len(shape)]), ir.DataType.INT64
            model.graph.register_initializer(constant)
            node.replace_input_with(1, constant)
            # a shape on record from before ([N, unk]) is weaker than what is known now
            node.outputs[0].shape = _reshaped(data.shape, shape)
            count += 1
    return count


def _reshaped(data: ir.Shape, shape: list[int]) -> ir.Shape | None:
    """Reshape's output shape for a constant target (0 copies, -1 infers), when knowable."""
    rest = 1
    for k, dim in enumerate(data):
        if k < len(shape) and shape[k] == 0:
            continue  # copied as is, symbolic or not
        if not isinstance(dim, int):
            return None
        rest *= dim
    if any(v == 0 and k >= len(data) for k, v in enumerate(shape)):
        return None
    known = int(np.prod([v for v in shape if v > 0]))
    if -1 in shape and (known == 0 or rest % known):
        return None
    return ir.Shape(
        [data[k] if v == 0 else v if v > 0 else rest // known for k, v in enumerate(shape)]
    )
