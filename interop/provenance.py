"""Where interop keeps what ONNX has no field for: the layer tree, parameter kinds, source.

Everything is stored in ONNX ``metadata_props`` so that it survives save/load and any
tool that round-trips ONNX files. The key scheme (documented in docs/design.md):

Per node (``node.metadata_props``):
    ``interop.scope``     path of the innermost source layer that produced the node
                          ("blocks.0.conv"; "" for the model itself)
    ``interop.location``  ``file:line`` of the user code that produced it, when known

Per model (``model.metadata_props``), JSON values:
    ``interop.layers``     list of ``{"path", "class", "parent"}`` in definition order,
                           every layer of the source, including those without nodes
    ``interop.parameters`` ``{initializer name: "trainable" | "frozen" | "buffer"}``;
                           initializers not listed are constants of the graph
    ``interop.source``     ``{"framework", "version", "class", ...}``
    ``interop.version``    version of this key scheme
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

SCOPE = "interop.scope"
LOCATION = "interop.location"
LAYERS = "interop.layers"
PARAMETERS = "interop.parameters"
SOURCE = "interop.source"
VERSION = "interop.version"
SCHEME_VERSION = "1"

# Kinds of initializers listed in PARAMETERS.
TRAINABLE, FROZEN, BUFFER = "trainable", "frozen", "buffer"


@dataclass(frozen=True)
class LayerRecord:
    """One layer of the source model as recorded in the graph."""

    path: str
    class_name: str  # fully qualified, e.g. "torch.nn.modules.conv.Conv2d"
    parent: str | None  # None for the root


def _get_json(model: ir.Model, key: str, default: Any) -> Any:
    raw = model.metadata_props.get(key)
    if not raw:
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return default


def read_layers(model: ir.Model) -> list[LayerRecord]:
    return [
        LayerRecord(str(item["path"]), str(item["class"]), item.get("parent"))
        for item in _get_json(model, LAYERS, [])
        if isinstance(item, dict) and "path" in item and "class" in item
    ]


def write_layers(model: ir.Model, layers: list[LayerRecord]) -> None:
    model.metadata_props[LAYERS] = json.dumps(
        [{"path": r.path, "class": r.class_name, "parent": r.parent} for r in layers]
    )


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
