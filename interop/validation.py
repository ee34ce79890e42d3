"""Structural checks run on every loaded model, in time linear in its size.

They turn a hostile or corrupt file into a `ModelLoadError` that names the problem
instead of a crash or hang later in ONNX Runtime or an emitter. Every walk here is
iterative (an explicit stack), so no model, however deeply nested, can exhaust the
Python stack; nesting beyond `MAX_SUBGRAPH_DEPTH` is refused before onnx_ir, whose
deserializer recurses, ever sees it.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

from .errors import ModelLoadError

# If/Loop/Scan bodies nested deeper than this are refused. Real models nest a handful of
# levels; protobuf's own parser stops at about 100 nested messages (~30 graph levels).
MAX_SUBGRAPH_DEPTH = 64

_CORRUPT = "the file is corrupt or hostile; re-export it"

# (element type) -> (typed field that holds it, entries per element)
_TYPED_STORAGE = {
    onnx.TensorProto.FLOAT: ("float_data", 1),
    onnx.TensorProto.DOUBLE: ("double_data", 1),
    onnx.TensorProto.INT64: ("int64_data", 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1),
    onnx.TensorProto.UINT32: ("uint64_data", 1),
    onnx.TensorProto.INT32: ("int32_data", 1),
    onnx.TensorProto.INT16: ("int32_data", 1),
    onnx.TensorProto.INT8: ("int32_data", 1),
    onnx.TensorProto.UINT16: ("int32_data", 1),
    onnx.TensorProto.UINT8: ("int32_data", 1),
    onnx.TensorProto.BOOL: ("int32_data", 1),
    onnx.TensorProto.FLOAT16: ("int32_data", 1),
    onnx.TensorProto.BFLOAT16: ("int32_data", 1),
    onnx.TensorProto.COMPLEX64: ("float_data", 2),
    onnx.TensorProto.COMPLEX128: ("double_data", 2),
    onnx.TensorProto.STRING: ("string_data", 1),
}


def _graph_attributes(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        yield from attr.graphs


def walk_graphs(proto: onnx.ModelProto) -> Iterator[tuple[onnx.GraphProto, int]]:
    """Every graph of the model (main graph, function bodies' subgraphs, nested bodies)
    with its nesting depth; raises once a graph is nested deeper than allowed."""
    stack: list[tuple[onnx.GraphProto, int]] = [(proto.graph, 0)]
    for function in proto.functions:
        stack += [(g, 1) for node in function.node for g in _graph_attributes(node)]
    while stack:
        graph, depth = stack.pop()
        if depth > MAX_SUBGRAPH_DEPTH:
            raise ModelLoadError(
                f"Subgraphs (If/Loop/Scan bodies) are nested more than {MAX_SUBGRAPH_DEPTH} levels deep",
                "a model with a reasonable nesting of control-flow bodies",
                "check the file's origin; this looks like a hostile or corrupt model",
            )
        yield graph, depth
        stack += [(g, depth + 1) for node in graph.node for g in _graph_attributes(node)]


def iter_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: of all graphs and of the model-local functions."""
    for graph, _ in walk_graphs(proto):
        yield from graph.node
    for function in proto.functions:
        yield from function.node


def iter_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor that carries data: initializers (dense and sparse) and attributes."""
    for graph, _ in walk_graphs(proto):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
    for node in iter_nodes(proto):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield from (attr.sparse_tensor.values, attr.sparse_tensor.indices)


def check_proto(proto: onnx.ModelProto) -> None:
    """Checks on the raw proto, before onnx_ir builds anything from it."""
    for graph, _ in walk_graphs(proto):  # also enforces the nesting limit
        _check_single_assignment(graph)
    for node in iter_nodes(proto):
        names = [attr.name for attr in node.attribute]
        if len(names) != len(set(names)):
            duplicated = sorted({n for n in names if names.count(n) > 1})[:5]
            raise ModelLoadError(
                f"Node '{node.name}' ({node.op_type}) has attribute(s) {duplicated} more than once",
                "each attribute of a node given once",
                _CORRUPT,
            )
    _check_text(proto)
    _check_provenance(proto)
    check_inline_tensors(proto)


def _check_provenance(proto: onnx.ModelProto) -> None:
    """Our own metadata, when present, must have the documented shape (docs/design.md):
    summaries and repr read it, so a corrupted value is refused here, once."""
    import json

    for entry in proto.metadata_props:
        if entry.key != "interop.source" or _not_text(entry.value):
            continue
        try:
            source = json.loads(entry.value)
        except ValueError:
            source = None
        if not isinstance(source, dict) or not isinstance(source.get("framework"), str):
            raise ModelLoadError(
                f"Metadata 'interop.source' is not a JSON object with a 'framework' "
                f"({entry.value[:60]!r})",
                '{"framework": ..., "version": ..., "class": ...} as interop writes it',
                "the file is corrupt; re-export it, or delete that metadata entry",
            )


def _not_text(value: object) -> bool:
    # protobuf hands back bytes, not str, for a string field that is not valid UTF-8
    return isinstance(value, bytes)


def _check_text(proto: onnx.ModelProto) -> None:
    """Names and metadata must be UTF-8 text: everything downstream treats them as str."""
    places: list[tuple[str, object]] = []
    for entry in proto.metadata_props:
        places += [("model metadata", entry.key), (f"metadata '{entry.key}'", entry.value)]
    for graph, _ in walk_graphs(proto):
        places += [("graph name", graph.name)]
        places += [("value name", v.name) for v in (*graph.input, *graph.output)]
        places += [("initializer name", t.name) for t in graph.initializer]
    for node in iter_nodes(proto):
        places += [("node name", node.name), ("op type", node.op_type), ("domain", node.domain)]
        places += [("value name", name) for name in (*node.input, *node.output)]
        for entry in node.metadata_props:
            places += [("node metadata", entry.key), ("node metadata", entry.value)]
    for where, value in places:
        if _not_text(value):
            raise ModelLoadError(
                f"A {where} is not valid UTF-8 text ({value!r:.60}...)",
                "UTF-8 strings in every name and metadata field",
                _CORRUPT,
            )


def _check_single_assignment(graph: onnx.GraphProto) -> None:
    sources: dict[str, str] = {}
    for value in graph.input:
        if value.name in sources:
            raise ModelLoadError(
                f"Graph '{graph.name}' has two inputs named '{value.name}'",
                "distinct input names",
                _CORRUPT,
            )
        sources[value.name] = "a graph input"
    for node in graph.node:
        for name in node.output:
            if name and name in sources:
                raise ModelLoadError(
                    f"Value '{name}' is produced twice (by {sources[name]} and node '{node.name}')",
                    "every value name produced once (SSA form)",
                    "the file is corrupt; re-export it",
                )
            sources[name] = f"node '{node.name}'"


def check_inline_tensors(proto: onnx.ModelProto) -> None:
    """Every tensor must carry the data its dtype and shape declare.

    This is what refuses a 2^40-element initializer declared without data before
    anything tries to allocate it.
    """
    for tensor in iter_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against its file in serialization.check_external_data
        name = tensor.name or "<unnamed>"
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(
                f"Tensor '{name}' has a negative dimension {list(tensor.dims)}",
                "non-negative dimensions",
                _CORRUPT,
            )
        count = 1
        for dim in tensor.dims:
            count *= dim
        if tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING:
            try:
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (KeyError, ValueError, TypeError):
                continue  # sub-byte and exotic types: left to the runtime
            if len(tensor.raw_data) != count * itemsize:
                raise ModelLoadError(
                    f"Tensor '{name}' declares shape {list(tensor.dims)} "
                    f"({count * itemsize} bytes) but holds {len(tensor.raw_data)} bytes",
                    "raw data matching the declared shape and dtype",
                    "the file is corrupt or truncated; re-export it",
                )
            continue
        storage = _TYPED_STORAGE.get(tensor.data_type)  # type: ignore[call-overload]
        if storage is None:
            continue
        field, per_element = storage
        held = len(getattr(tensor, field))
        if held != count * per_element:
            what = "carries no data" if held == 0 else f"holds {held} entries in {field}"
            raise ModelLoadError(
                f"Tensor '{name}' declares {count} elements (shape {list(tensor.dims)}) but {what}",
                "tensor data inline (matching the shape) or as external data",
                _CORRUPT,
            )


def validate(model: ir.Model) -> None:
    """Dangling inputs and cycles in the main graph."""
    graph = model.graph
    known = {id(v) for v in graph.inputs} | {id(v) for v in graph.initializers.values()}
    position = {id(node): index for index, node in enumerate(graph)}
    needs_sort = False
    for node in graph:
        for value in node.inputs:
            if value is None or id(value) in known:
                continue
            producer = value.producer()
            if producer is None:
                if _from_outer_scope(value, graph):
                    continue
                raise ModelLoadError(
                    f"Node '{node.name}' ({node.op_type}) reads '{value.name}', which nothing produces",
                    "every node input to be a graph input, an initializer or another node's output",
                    "the file is corrupt or truncated; re-export it",
                )
            if producer.graph is graph and position.get(id(producer), -1) >= position[id(node)]:
                needs_sort = True
    for value in graph.outputs:
        if value.producer() is None and id(value) not in known:
            raise ModelLoadError(
                f"Graph output '{value.name}' is not produced by any node",
                "every graph output to be a graph input, an initializer or a node's output",
                "the file is corrupt or truncated; re-export it",
            )
    if needs_sort:
        _sort_or_raise(graph)


def _from_outer_scope(value: ir.Value, graph: ir.Graph) -> bool:
    return value.graph is not None and value.graph is not graph


def _sort_or_raise(graph: ir.Graph) -> None:
    """Order nodes topologically (Kahn); a cycle is an error."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    pending = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in index:
                pending[i] += 1
                users[index[id(producer)]].append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    order: list[int] = []
    while ready:
        i = ready.pop()
        order.append(i)
        for j in users[i]:
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if len(order) != len(nodes):
        stuck = [str(nodes[i].name) for i, count in enumerate(pending) if count > 0][:5]
        raise ModelLoadError(
            f"The graph has a cycle through nodes {', '.join(stuck)}",
            "a directed acyclic graph (loops belong in Loop/Scan bodies)",
            "the file is corrupt or hostile; re-export it",
        )
    graph.sort()
