"""Where interop keeps what ONNX has no field for: the layer tree, parameter kinds, source.

Everything is stored in ONNX ``metadata_props`` so that it survives save/load and any
tool that round-trips ONNX files. The key scheme (documented in docs/design.md):

Per node (``node.metadata_props``):
    ``interop.scope``     path of the innermost source layer that produced the node
                          ("blocks.0.conv"; "" for the model itself)
    ``interop.location``  ``file:line`` of the user code that produced it, when known

Per model (``model.metadata_props``), JSON values:
    ``interop.layers``     list of ``{"path", "class", "parent"[, "returns"]}`` in
                           definition order, every layer of the source, including those
                           without nodes; ``returns`` names the values the layer's call
                           returned, in return order (every call's, in call order), when
                           the capture knows them
    ``interop.parameters`` ``{initializer name: "trainable" | "frozen" | "buffer"}``;
                           initializers not listed are constants of the graph
    ``interop.source``     ``{"framework", "version", "class", ...}``
    ``interop.version``    version of this key scheme

Per initializer (``value.metadata_props``):
    ``interop.packed_from`` JSON list of the source parameters a computed weight was
                           packed from (`interop.packing`: an LSTM's W from a torch
                           layer's ``weight_ih_l0``), so emitters name them

Per graph, on the prepared copy of another tool's file (`interop.legacy`):
    ``interop.producer``   the producer that wrote the file
    ``interop.file_opset`` the opset it was written at, before conversion
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import onnx_ir as ir

SCOPE = "interop.scope"
LOCATION = "interop.location"
LAYERS = "interop.layers"
PARAMETERS = "interop.parameters"
SOURCE = "interop.source"
VERSION = "interop.version"
# on the graph of a prepared copy of another tool's file (`interop.legacy`): who wrote it, at
# which opset (before conversion), so an unsupported-op error can say
PRODUCER = "interop.producer"
FILE_OPSET = "interop.file_opset"
# on an initializer computed from source weights (`interop.packing`): JSON list of their names
PACKED_FROM = "interop.packed_from"
SCHEME_VERSION = "1"

# Kinds of initializers listed in PARAMETERS.
TRAINABLE, FROZEN, BUFFER = "trainable", "frozen", "buffer"


@dataclass(frozen=True)
class LayerRecord:
    """One layer of the source model as recorded in the graph."""

    path: str
    class_name: str  # fully qualified, e.g. "torch.nn.modules.conv.Conv2d"
    parent: str | None  # None for the root
    returns: tuple[str, ...] | None = None  # names of the values its calls returned; None: unknown


def _get_json(model: ir.Model, key: str, default: Any) -> Any:
    raw = model.metadata_props.get(key)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return default


def _returns(item: dict[str, Any]) -> tuple[str, ...] | None:
    raw = item.get("returns")
    return tuple(str(name) for name in raw) if isinstance(raw, list) else None


def read_layers(model: ir.Model) -> list[LayerRecord]:
    return [
        LayerRecord(str(item["path"]), str(item["class"]), item.get("parent"), _returns(item))
        for item in _get_json(model, LAYERS, [])
        if isinstance(item, dict) and "path" in item and "class" in item
    ]


def write_layers(model: ir.Model, layers: list[LayerRecord]) -> None:
    items = []
    for r in layers:
        item: dict[str, Any] = {"path": r.path, "class": r.class_name, "parent": r.parent}
        if r.returns is not None:
            item["returns"] = list(r.returns)
        items.append(item)
    model.metadata_props[LAYERS] = json.dumps(items)


def with_returns(
    layers: list[LayerRecord], returns: Mapping[str, Sequence[ir.Value | str | None]]
) -> list[LayerRecord]:
    """`layers` with ``returns`` set from ``{path: values each call returned, in order}``.

    Values are named by their current name (captures record `ir.Value`s while tracing and
    write them once names are final); unnamed or missing ones are skipped, and a layer
    none of whose returns is known keeps ``returns=None``. Paths the table lacks (a second
    call ``blocks.0@1`` of a layer, kept as its own record by some captures) are left out.
    """
    result = []
    for record in layers:
        found = [v if isinstance(v, str) else v.name for v in returns.get(record.path, ()) if v]
        names = [name for name in found if name]
        result.append(replace(record, returns=tuple(names)) if names else record)
    return result


def read_parameters(model: ir.Model) -> dict[str, str]:
    table = _get_json(model, PARAMETERS, {})
    return {str(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {}


def write_parameters(model: ir.Model, kinds: dict[str, str]) -> None:
    model.metadata_props[PARAMETERS] = json.dumps(kinds)


def read_source(model: ir.Model) -> dict[str, Any]:
    source = _get_json(model, SOURCE, {})
    return source if isinstance(source, dict) else {}


def write_source(model: ir.Model, source: dict[str, Any]) -> None:
    model.metadata_props[SOURCE] = json.dumps(source)
    model.metadata_props[VERSION] = SCHEME_VERSION


def node_scope(node: ir.Node) -> str:
    return node.metadata_props.get(SCOPE, "")


def node_location(node: ir.Node) -> str | None:
    return node.metadata_props.get(LOCATION)
