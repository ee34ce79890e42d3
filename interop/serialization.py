"""Saving and loading graphs: atomic writes, safe reads, external data kept in its folder.

Loading parses the protobuf and checks it before anything else touches it. No code is
ever executed: ONNX files hold no pickles, nothing is `eval`ed, and nodes of a custom op
domain (which could only run through native code the user loads into ONNX Runtime) are
refused unless their domain is registered with `register_domain`. External-data
locations must be relative paths that stay inside the model's folder, and every external
tensor must fit in its file.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import ModelLoadError
from .registry import Registry
from .validation import MAX_SUBGRAPH_DEPTH, iter_nodes, iter_tensors

if TYPE_CHECKING:
    from .graph import Graph

__all__ = [
    "save",
    "load",
    "deserialize",
    "register_domain",
    "STANDARD_DOMAINS",
    "MAX_SUBGRAPH_DEPTH",
]

# Above this many bytes of weights a save uses external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1 << 30
PROTO_LIMIT = (1 << 31) - (1 << 24)

# Op domains a model may use without registration, and why each is safe: ONNX Runtime
# implements all of them natively, they are specified publicly, and none runs user code.
STANDARD_DOMAINS = {
    "": "the ONNX standard operators",
    "ai.onnx": "the ONNX standard operators (explicit spelling)",
    "ai.onnx.ml": "the ONNX-ML standard operators (trees, encoders, ...)",
    "com.microsoft": "ONNX Runtime's contrib operators (fused attention, quantization)",
}
# Refused even though a runtime might accept them: 'ai.onnx.contrib' (onnxruntime-extensions,
# whose PyOp runs Python code), 'ai.onnx.preview.training' (training builds only), and any
# other domain, which needs a native custom-op library to run at all.


@dataclass
class DomainConverter:
    """What makes a custom op domain loadable: the ONNX functions that define its ops.

    With `functions`, each node of the domain whose op has a function is given that
    function's body (added to the model), so ONNX Runtime and the emitters run it as
    standard ONNX. Without, the domain is only allowed: the model loads and can be
    inspected, and running it is up to the runtime (e.g. a custom-op library the user
    registers with ONNX Runtime themselves).
    """

    domain: str
    functions: dict[str, onnx.FunctionProto] = field(default_factory=dict)


CUSTOM_DOMAINS: Registry[DomainConverter] = Registry("load", adapter="custom-domain")


def register_domain(
    domain: str, functions: Iterable[onnx.FunctionProto] = (), *, replace: bool = False
) -> DomainConverter:
    """Allow nodes of a custom op `domain` in loaded models.

    >>> from onnx import helper
    >>> double = helper.make_function("my.ops", "Double", ["x"], ["y"],
    ...     [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 18)])
    >>> register_domain("my.ops", [double]).functions["Double"].name
    'Double'
    >>> _ = CUSTOM_DOMAINS._entries.pop("my.ops")
    """
    if domain in STANDARD_DOMAINS:
        raise ValueError(f"'{domain}' is a standard domain; it needs no registration")
    table = {}
    for function in functions:
        if function.domain != domain:
            raise ValueError(
                f"Function '{function.name}' is in domain '{function.domain}', not '{domain}'"
            )
        table[function.name] = function
    return CUSTOM_DOMAINS.register(domain, DomainConverter(domain, table), replace=replace)


def save(
    graph: Graph,
    path: str | Path,
    *,
    external_data: bool | None = None,
    optimize: bool = False,
) -> Path:
    """Write `graph` to `path` atomically (temp file in the same folder, then rename).

    With external data, the weights go to ``<name>.data``; when the model already at
    `path` uses that file, they go to ``<name>.data.1`` instead (and back on the next
    save). The model is renamed into place last, so an interrupted save leaves the old
    model with its old data, never the old model reading new weights; the data file
    the new model no longer uses is removed afterwards.

    With `optimize`, the file holds the inference-optimized copy ONNX Runtime runs
    (`interop.runtime.optimized_model`): for deployment on ONNX Runtime. It may use ONNX
    Runtime's contrib ops (domain ``com.microsoft``) and folded weights, so it is not
    the captured graph: inspection and emission want the file saved without it.
    """
    if optimize:
        from .runtime import optimized_model

        return save_model(optimized_model(graph), path, external_data=external_data)
    return save_model(graph.model, path, external_data=external_data)


def save_model(model: ir.Model, path: str | Path, *, external_data: bool | None = None) -> Path:
    """`save` for a bare `onnx_ir.Model`.

    Weights that already live in a file inside the destination folder (the shards of a
    safetensors checkpoint the model was traced with, `interop.weights`) are referenced
    where they are, not copied. Other external weights are copied file to file
    (``copy_file_range``) and lazy ones written one at a time, so a save holds one tensor
    at most, whatever the model's size.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    in_use = _data_files_of(path)
    ours = {path.name + ".data", path.name + ".data.1"}
    values = [v for g in model.graphs() for v in g.initializers.values()]
    originals = {v: v.const_value for v in values if v.const_value is not None}
    kept = _referenced(originals, folder, ours) if external_data else {}
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.") as tmp:
        staged = Path(tmp) / path.name
        written = [
            v
            for v, t in originals.items()
            if v not in kept and t.nbytes >= _INLINE_BYTES and external_data
        ]
        data_name = None
        if written:
            data_name = path.name + ".data"
            if data_name in in_use:
                data_name += ".1"
            # large tensors at 64 KiB offsets: ONNX Runtime memory-maps aligned external data
            # instead of reading it into buffers of its own
            externals = ir.external_data.convert_tensors_to_external(
                [originals[v] for v in written],
                base_dir=tmp,
                relative_path=data_name,
                alignment=1 << 16,
            )
        try:
            for value, ref in kept.items():
                value.const_value = ref
            if written:
                for value, ref in zip(written, externals, strict=True):
                    value.const_value = ref
            done = set(written)
            for value, tensor in originals.items():  # other files' small tensors: inline
                if isinstance(tensor, ir.ExternalTensor) and value not in kept:
                    if value not in done:
                        value.const_value = ir.Tensor(tensor.numpy(), dtype=tensor.dtype)
            proto = ir.serde.serialize_model(model)
        finally:
            for value, tensor in originals.items():
                value.const_value = tensor
        staged.write_bytes(proto.SerializeToString())
        if data_name is not None:
            os.replace(Path(tmp) / data_name, folder / data_name)
        os.replace(staged, path)
    referenced = {str(t.location) for t in kept.values()}
    for old in in_use - {data_name} - referenced:
        if old in ours:  # only files we wrote
            (folder / old).unlink(missing_ok=True)
    return path


# tensors under this many bytes stay inline with external data (onnx_ir's default)
_INLINE_BYTES = 256


def _referenced(
    tensors: dict[ir.Value, Any], folder: Path, ours: set[str]
) -> dict[ir.Value, ir.ExternalTensor]:
    """External tensors whose file lies inside `folder`, as tensors located relative to it.

    Our own data files (``<name>.data``) are rewritten instead: a save replaces them.
    """
    root = os.path.abspath(folder)
    kept = {}
    for value, tensor in tensors.items():
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = os.path.relpath(os.path.abspath(tensor.path), root)
        if location.startswith("..") or os.path.isabs(location) or location in ours:
            continue
        kept[value] = ir.ExternalTensor(
            Path(location).as_posix(),
            tensor.offset,
            tensor.length,
            tensor.dtype,
            shape=tensor.shape,
            name=tensor.name or str(value.name),
            base_dir=root,
        )
    return kept


def _data_files_of(path: Path) -> set[str]:
    """External-data locations the model file at `path` uses (empty if none or unreadable)."""
    ours = (path.parent / (path.name + ".data"), path.parent / (path.name + ".data.1"))
    if not path.is_file() or not any(p.exists() for p in ours):
        return set()  # skip parsing a (possibly large, inline) old model when nothing is at stake
    try:
        proto = onnx.load(str(path), load_external_data=False)
        return {
            entry.value
            for tensor in iter_tensors(proto)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    except Exception:  # a corrupt old file is simply replaced
        return set()


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
    except (DecodeError, RuntimeError, ValueError, RecursionError) as err:
        if "depth" in str(err).lower() or isinstance(err, RecursionError):
            # protobuf stops at ~100 nested messages: deeply nested If/Loop bodies end here
            raise ModelLoadError(
                f"'{origin}' nests messages deeper than protobuf parses ({err})",
                "a model whose control-flow bodies nest a reasonable number of levels",
                "check the file's origin; this looks like a hostile or corrupt model",
            ) from None
        raise ModelLoadError(
            f"'{origin}' is not a valid ONNX model: protobuf parsing failed ({err})",
            "a complete, uncorrupted .onnx file",
            "re-export or re-download the model; the file may be truncated",
        ) from None
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
    from .validation import check_proto, validate

    check_proto(proto)  # first: bounds nesting depth for every later walk
    if base_dir is not None:
        check_external_data(proto, Path(base_dir))
    elif any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_tensors(proto)):
        raise ModelLoadError(
            "The model refers to external data but was given without a folder",
            "a model with its weights inline, or a path to the .onnx file",
            "load it from its path with interop.load('model.onnx')",
        )
    proto = check_domains(proto)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # onnx_ir raises many types on malformed protos
        raise ModelLoadError(
            f"The model is malformed: {type(err).__name__}: {err}",
            "a model that follows the ONNX protobuf schema",
            "the file is corrupt or was written by a broken exporter; re-export it",
        ) from err
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    validate(model)
    return Graph(model, base_dir=base_dir)


def check_domains(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Refuse nodes of unregistered custom domains; add registered domains' functions.

    Nodes that call a function defined in the model itself (FunctionProto, as torch.onnx
    and onnxscript write them) are fine: their bodies are checked like the graph. Returns
    the proto, copied first if functions had to be added (the caller's proto is not changed).
    """
    local = {(f.domain, f.name) for f in proto.functions}
    missing: dict[tuple[str, str], onnx.FunctionProto] = {}
    for node in iter_nodes(proto):
        if node.domain in STANDARD_DOMAINS or (node.domain, node.op_type) in local:
            continue
        converter = CUSTOM_DOMAINS.get(node.domain)
        if converter is None:
            raise ModelLoadError(
                f"Node '{node.name}' uses op '{node.op_type}' of the custom domain "
                f"'{node.domain}', which has no registered converter",
                "ops of the standard domains ("
                + ", ".join(repr(d) for d in STANDARD_DOMAINS)
                + ") or of functions defined in the model",
                f"if you trust the model, register the domain first: "
                f"interop.serialization.register_domain('{node.domain}', functions=[...])",
            )
        function = converter.functions.get(node.op_type)
        if function is not None:
            missing[(node.domain, node.op_type)] = function
    if not missing:
        return proto
    extended = onnx.ModelProto()
    extended.CopyFrom(proto)
    extended.functions.extend(missing.values())
    imported = {entry.domain for entry in extended.opset_import}
    for domain in sorted({d for d, _ in missing} - imported):
        extended.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    for function in missing.values():  # the bodies' own opsets must be imported too
        for entry in function.opset_import:
            if entry.domain not in imported:
                extended.opset_import.append(entry)
                imported.add(entry.domain)
    check_domains(extended)  # the added bodies may not smuggle in other custom domains
    return extended


# Locations are POSIX paths relative to the model (the ONNX spec). Backslashes, drive
# letters ('C:') and NUL bytes would mean something else on another OS, so they are refused
# everywhere rather than interpreted.
_FOREIGN_PATH = re.compile(r"[\\\0]|^[A-Za-z]:")


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse locations outside `base_dir` and external tensors their file cannot hold."""
    root = base_dir.resolve()
    for tensor in iter_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        name = tensor.name or "<unnamed>"
        if (
            not location
            or _FOREIGN_PATH.search(location)
            or os.path.isabs(location)
            or ".." in Path(location).parts
        ):
            raise ModelLoadError(
                f"Tensor '{name}' has external data at {location!r}, outside the model's folder",
                "a relative POSIX path inside the model's folder, without '..', "
                "backslashes or drive letters",
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
                f"Tensor '{name}' has a malformed external-data offset/length "
                f"({info.get('offset')!r}, {info.get('length')!r})",
                "non-negative integers",
                "the file is corrupt; re-export it",
            ) from err
        if offset < 0 or (length is not None and length < 0):
            raise ModelLoadError(
                f"Tensor '{name}' has a negative external-data offset or length "
                f"({offset}, {length})",
                "non-negative integers",
                "the file is corrupt or hostile; re-export it",
            )
        needed = _expected_bytes(tensor)
        if length is not None and needed is not None and length < needed:
            raise ModelLoadError(
                f"Tensor '{name}' declares {length} bytes of external data but its shape "
                f"{list(tensor.dims)} needs {needed}",
                "at least the bytes the tensor's shape and dtype need",
                "the file is corrupt; re-export it",
            )
        end = offset + (length if length is not None else (needed or 0))
        size = target.stat().st_size
        if end > size:
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
