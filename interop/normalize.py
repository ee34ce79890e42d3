"""ONNX semantics at one opset: what every emitter and the reference evaluator read.

`normalize` brings a model to `TARGET_OPSET`: models older than opset 13 (where Softmax,
Split, Squeeze, Reduce* changed meaning) go through onnx's version converter (plus
interop's own upgrades, `interop.upgrade`); newer ones already mean what the semantics
implement, which accept both the attribute and the input forms. A file from another tool
that lists its weights as graph inputs or computes constants in the graph is prepared on a
copy (`interop.legacy`). `schema_defaults` gives each op's default attributes, and
`check_supported` names the first node nothing can emit.

>>> opset_of(normalize(as_model("net.onnx")))   # doctest: +SKIP
23
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import onnx
import onnx_ir as ir

from . import provenance
from .errors import UnsupportedOpError
from .ops import SEMANTICS, semantics_key

TARGET_OPSET = onnx.defs.onnx_opset_version()
# before opset 13 several ops changed meaning (Softmax axis coercion, attribute-to-input moves)
CONVERT_BELOW_OPSET = 13
DEFAULT_DOMAINS = ("", "ai.onnx")


def as_model(source: Any) -> ir.Model:
    """An `onnx_ir.Model` from an interop.Graph, an onnx_ir.Model, a ModelProto or a path."""
    if isinstance(source, ir.Model):
        return source
    if hasattr(source, "model") and isinstance(source.model, ir.Model):
        return source.model
    if isinstance(source, onnx.ModelProto):
        return ir.serde.deserialize_model(source)
    from .serialization import load

    return load(source).model


def normalize(model: ir.Model) -> ir.Model:
    """The model with ONNX semantics at `TARGET_OPSET` (a converted copy when too old).

    Weights a file lists as graph inputs become initializers only, and a file from another
    tool has its constant subgraphs folded (`interop.legacy`), on a copy.
    """
    from .legacy import needs_preparing, prepare

    converted = _converted(model)
    if not needs_preparing(converted):
        return converted
    return prepare(converted if converted is not model else model.clone(), opset_of(model))


def _converted(model: ir.Model) -> ir.Model:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", TARGET_OPSET))
    if version >= CONVERT_BELOW_OPSET:
        return model
    from .upgrade import upgrade

    return upgrade(model, version, TARGET_OPSET)


def opset_of(graph_or_function: Any, domain: str = "") -> int:
    imports = graph_or_function.opset_imports
    return imports.get(domain, imports.get("ai.onnx" if domain == "" else domain, TARGET_OPSET))


@functools.lru_cache(maxsize=4096)
def schema_defaults(op_type: str, domain: str, version: int) -> dict[str, Any]:
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return {}
    defaults = {}
    for name, attribute in schema.attributes.items():
        if attribute.default_value.type != onnx.AttributeProto.UNDEFINED:
            defaults[name] = onnx.helper.get_attribute_value(attribute.default_value)
    return {k: _decoded(v) for k, v in defaults.items()}


def _decoded(value: Any) -> Any:
    # schema defaults hold STRING(S) as bytes; node attributes arrive as str
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def has_function_body(op_type: str, domain: str, version: int) -> bool:
    schema: Any  # onnx's stubs lack OpSchema's function accessors
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        return False
    return schema.has_function or schema.has_context_dependent_function


def is_supported(node: ir.Node, version: int) -> bool:
    return semantics_key(node.op_type, node.domain) in SEMANTICS or has_function_body(
        node.op_type, node.domain, version
    )


def check_supported(
    graph: ir.Graph, version: int, adapter: str, extra: Callable[[ir.Node], bool] | None = None
) -> None:
    """Raise `UnsupportedOpError` for the first node (subgraphs included) nothing can emit.

    The error names the node, the op, the opset and, for a file of another tool, its
    producer and the fix (`interop.legacy.unsupported_detail`).
    """
    from .legacy import unsupported_detail

    for node in ir.traversal.RecursiveGraphIterator(graph):
        if not is_supported(node, version) and not (extra and extra(node)):
            op = f"{node.domain + '::' if node.domain else ''}{node.op_type}"
            detail, fix = unsupported_detail(graph, node, op, version)
            raise UnsupportedOpError(
                op,
                direction="emit",
                adapter=adapter,
                layer=provenance.node_scope(node),
                location=provenance.node_location(node),
                close_matches=SEMANTICS.close_matches(node.op_type),
                detail=detail,
                fix=fix,
            )


def check_supported_node(node: ir.Node, version: int, adapter: str) -> None:
    if not is_supported(node, version):
        raise UnsupportedOpError(
            node.op_type,
            direction="emit",
            adapter=adapter,
            layer=provenance.node_scope(node),
            location=provenance.node_location(node),
            close_matches=SEMANTICS.close_matches(node.op_type),
            detail=f"node '{node.name}'",
        )
