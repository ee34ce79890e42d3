"""Saving and loading graphs: atomic writes, safe reads, external data kept in its folder.

Loading parses the protobuf and checks it before anything else touches it: no code is
ever executed (ONNX files hold no pickles, and custom op domains are only recorded),
external-data locations must be relative paths that stay inside the model's folder,
and every external tensor must fit in its file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import ModelLoadError

if TYPE_CHECKING:
    from .graph import Graph

# Above this many bytes of weights a save uses external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
PROTO_LIMIT = (1 << 31) - (1 << 24)
MAX_SUBGRAPH_DEPTH = 64


def save(graph: Graph, path: str | Path, *, external_data: bool | None = None) -> Path:
    """Write `graph` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = weight_bytes(graph.model) > EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        data_name = path.name + ".data"
        if external_data:
            ir.save(graph.model, staged, external_data=data_name)
            os.replace(Path(tmp) / data_name, folder / data_name)
        else:
            proto = ir.serde.serialize_model(graph.model)
            staged.write_bytes(proto.SerializeToString())
        os.replace(staged, path)
    return path


def load(source: Any) -> Graph:
    """Load a graph from a path, bytes, or an `onnx.ModelProto`; never executes code.

    >>> g = interop.load("net.onnx")                     # doctest: +SKIP
    >>> g = interop.load(open("net.onnx", "rb").read())   # doctest: +SKIP
    """
    from .graph import Graph

    if isinstance(source, Graph):
        return source
    if isinstance(source, onnx.ModelProto):
        return deserialize(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return deserialize(_parse(bytes(source), "<bytes>"))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(
                f"No model file at '{path}'", "a path to an existing .onnx file", "check the path"
            )
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ModelLoadError(f"Cannot read '{path}': {err}") from err
        return deserialize(_parse(data, str(path)), base_dir=path.resolve().parent)
    raise ModelLoadError(
        f"Cannot load a model from an object of type {type(source).__name__}",
        "a path, bytes, an onnx.ModelProto or an interop.Graph",
        "for a framework model use interop.trace(model, example_inputs)",
    )


def _parse(data: bytes, origin: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise ModelLoadError(
            f"'{origin}' is not a valid ONNX model: protobuf parsing failed ({err})",
            "a complete, uncorrupted .onnx file",
            "re-export or re-download the model; the file may be truncated",
        ) from err
    return proto


def deserialize(proto: onnx.ModelProto, *, base_dir: str | Path | None = None) -> Graph:
    """Check a parsed proto and wrap it in a Graph."""
    from .graph import Graph

    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise ModelLoadError(
            "The model has no graph (empty or truncated data)",
            "an ONNX ModelProto with a graph",
            "check that the bytes are an ONNX model and complete",
        )
    if base_dir is not None:
        check_external_data(proto, Path(base_dir))
    elif _has_external_data(proto.graph):
        raise ModelLoadError(
            "The model refers to external data but was given without a folder",
            "a model with its weights inline, or a path to the .onnx file",
            "load it from its path with interop.load('model.onnx')",
        )
    from .validation import check_proto, validate

    check_proto(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # onnx_ir raises many types on malformed protos
        raise ModelLoadError(f"The model is malformed: {err}") from err
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    validate(model)
    return Graph(model, base_dir=base_dir)


def _iter_tensors(graph: onnx.GraphProto, depth: int = 0):
    if depth > MAX_SUBGRAPH_DEPTH:
        raise ModelLoadError(
            f"Subgraphs are nested more than {MAX_SUBGRAPH_DEPTH} levels deep",
            "a model with a reasonable nesting of If/Loop/Scan bodies",
            "check the file's origin; this looks like a hostile or corrupt model",
        )
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(
                attr.graphs
            ):
                yield from _iter_tensors(sub, depth + 1)


def _has_external_data(graph: onnx.GraphProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _iter_tensors(graph))


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse locations outside `base_dir` and external tensors their file cannot hold."""
    root = base_dir.resolve()
    for tensor in _iter_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        name = tensor.name or "<unnamed>"
        if (
            not location
            or os.path.isabs(location)
            or ".." in Path(location).parts
            or location.startswith(("/", "\\"))
        ):
            raise ModelLoadError(
                f"Tensor '{name}' has external data at '{location}', outside the model's folder",
                "a relative path inside the model's folder, without '..'",
                "only load models from trusted sources; re-save the model with its data beside it",
            )
        target = (root / location).resolve()
        if root != target and root not in target.parents:
            raise ModelLoadError(
                f"Tensor '{name}' has external data '{location}' that resolves outside the model's folder ({target})",
                "a file inside the model's folder (symbolic links may not leave it)",
                "copy the data file next to the model instead of linking it",
            )
        if not target.is_file():
            raise ModelLoadError(
                f"External data file '{location}' of tensor '{name}' is missing",
                f"the file next to the model in {root}",
                "copy the .data file together with the .onnx file",
            )
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info["length"]) if info.get("length") else None
        except ValueError as err:
            raise ModelLoadError(
                f"Tensor '{name}' has a malformed external-data offset/length"
            ) from err
        needed = _expected_bytes(tensor)
        if length is not None and needed is not None and length < needed:
            raise ModelLoadError(
                f"Tensor '{name}' declares {length} bytes of external data but its shape needs {needed}"
            )
        end = offset + (length if length is not None else (needed or 0))
        size = target.stat().st_size
        if offset < 0 or end > size:
            raise ModelLoadError(
                f"External data file '{location}' is too short for tensor '{name}' "
                f"(needs bytes {offset}..{end}, file has {size})",
                "the complete data file written with the model",
                "the file is truncated; copy it again",
            )


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


def weight_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total
