"""Structural checks run on every loaded model, in time linear in its size.

They turn a hostile or corrupt file into a `ModelLoadError` that names the problem
instead of a crash or hang later in ONNX Runtime or an emitter.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .errors import ModelLoadError

_TYPED_FIELDS = (
    "float_data",
    "int32_data",
    "string_data",
    "int64_data",
    "double_data",
    "uint64_data",
)


def check_proto(proto: onnx.ModelProto) -> None:
    """Checks on the raw proto, before onnx_ir builds anything from it."""
    producers: dict[str, str] = {}
    for node in proto.graph.node:
        for name in node.output:
            if name and name in producers:
                raise ModelLoadError(
                    f"Value '{name}' is produced twice (by '{producers[name]}' and '{node.name}')",
                    "every value name produced once (SSA form)",
                    "the file is corrupt; re-export it",
                )
            producers[name] = node.name
    check_inline_tensors(proto)


def check_inline_tensors(proto: onnx.ModelProto) -> None:
    """Initializers must carry the bytes their dtype and shape declare."""
    for tensor in proto.graph.initializer:
        if (
            tensor.data_location == onnx.TensorProto.EXTERNAL
            or tensor.data_type == onnx.TensorProto.STRING
        ):
            continue
        if any(d < 0 for d in tensor.dims):
            raise ModelLoadError(
                f"Initializer '{tensor.name}' has a negative dimension {list(tensor.dims)}"
            )
        count = 1
        for dim in tensor.dims:
            count *= dim
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            continue  # sub-byte and exotic types: left to the runtime
        if tensor.HasField("raw_data"):
            if len(tensor.raw_data) != count * itemsize:
                raise ModelLoadError(
                    f"Initializer '{tensor.name}' declares shape {list(tensor.dims)} "
                    f"({count * itemsize} bytes) but holds {len(tensor.raw_data)} bytes",
                    "raw data matching the declared shape and dtype",
                    "the file is corrupt or truncated; re-export it",
                )
        elif count > 0 and not any(len(getattr(tensor, f)) for f in _TYPED_FIELDS):
            raise ModelLoadError(
                f"Initializer '{tensor.name}' declares {count} elements but carries no data",
                "tensor data inline or as external data",
                "the file is corrupt or hostile; re-export it",
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
            raise ModelLoadError(f"Graph output '{value.name}' is not produced by any node")
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
