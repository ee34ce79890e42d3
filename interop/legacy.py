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
  subgraph into initializers with onnxscript's constant folder and lifts Constant nodes
  (onnx_ir's `LiftConstantsToInitializersPass`), so Conv / Gemm / BatchNormalization read
  initializers and emitters build native layers.

>>> prepared = prepare(model)    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir

from . import provenance

# graph metadata of the emitter's private copy: "<producer_name> <producer_version>" of a
# file from another tool, for error messages
PRODUCER = "interop.producer"
FILE_OPSET = "interop.file_opset"  # the opset the file was written at (before conversion)


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
        fold_constants(model)
    return model


def fold_constants(model: ir.Model) -> None:
    """Every node computing from constants only becomes an initializer (in place)."""
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants as onnxscript_fold

    quiet = [logging.getLogger(n) for n in ("onnxscript.optimizer", "onnx_ir.passes")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        # Constant nodes first: a folded node's inputs must be initializers
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        # should_fold=True: sizes and the ConstantOfShape default exclusion do not apply, a
        # weight of any size folds (the folder still skips random ops and control flow)
        onnxscript_fold(model, should_fold=lambda node: True)
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        RemoveUnusedNodesPass()(model)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


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
    if producer is None:
        return detail, None
    fix = (
        f"re-export the model from its source without '{op}' (exporters can often "
        "decompose an op into standard ones), or register semantics for it (docs/emit.md)"
    )
    return f"{detail}, file written by {producer}", fix
