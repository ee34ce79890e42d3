"""Weights that stay on disk: safetensors checkpoints as lazy initializers (issue 20).

A model larger than memory is traced without its weights (built on torch's meta device)
and given them as a *source*: a ``.safetensors`` file, a folder of shards with its
``*.safetensors.index.json``, or a mapping of names to array-likes. `open_weights` reads
only the headers (names, dtypes, shapes, byte ranges) and checks every shard is long
enough; `WeightSource.tensor` gives an initializer for each name that reads nothing until
someone asks for its bytes:

- a safetensors tensor is an `onnx_ir.ExternalTensor` pointing at its byte range in the
  shard (a safetensors file is a JSON header and raw little-endian tensors, which is
  exactly ONNX external data with an offset), so `save` copies it file to file
  (``copy_file_range``), or references the shard itself when it lies beside the model;
- an array-like is an `onnx_ir.LazyTensor` converted on read.

`host_array` is how emitters take a weight: a copy-on-write memory map of its byte range
for external data (no copy, pages read from the file when touched and dropped when the
host lets go of the array), a copy otherwise.

>>> source = open_weights("checkpoint/")                      # doctest: +SKIP
>>> source.specs["model.embed_tokens.weight"].shape           # doctest: +SKIP
(32000, 4096)
"""

from __future__ import annotations

import contextvars
import json
import logging
import mmap
import os
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from .errors import WeightsError, close_matches

__all__ = [
    "WeightSpec",
    "WeightSource",
    "open_weights",
    "host_array",
    "is_mapped",
    "dtype_name",
    "Wanted",
    "match_weights",
    "placeholder",
    "Placeholder",
    "WEIGHTS_APART",
    "serialize_without_placeholders",
    "ir_dtype",
]

# https://github.com/huggingface/safetensors (format: u64 header size, JSON header, data)
SAFETENSORS_DTYPES = {
    "BOOL": ir.DataType.BOOL,
    "BF16": ir.DataType.BFLOAT16,
    "F16": ir.DataType.FLOAT16,
    "F32": ir.DataType.FLOAT,
    "F64": ir.DataType.DOUBLE,
    "I8": ir.DataType.INT8,
    "I16": ir.DataType.INT16,
    "I32": ir.DataType.INT32,
    "I64": ir.DataType.INT64,
    "U8": ir.DataType.UINT8,
    "U16": ir.DataType.UINT16,
    "U32": ir.DataType.UINT32,
    "U64": ir.DataType.UINT64,
    "F8_E4M3": ir.DataType.FLOAT8E4M3FN,
    "F8_E5M2": ir.DataType.FLOAT8E5M2,
}
_HEADER_LIMIT = 100 << 20  # the safetensors library refuses larger headers too


def dtype_name(dtype: ir.DataType) -> str:
    """``bfloat16``, ``float32``: how users spell a dtype in torch and numpy."""
    return {ir.DataType.BFLOAT16: "bfloat16", ir.DataType.FLOAT: "float32"}.get(
        dtype, str(np.dtype(dtype.numpy())) if dtype.bitwidth >= 8 else dtype.name.lower()
    )


@dataclass(frozen=True)
class WeightSpec:
    """What a source holds under one name, known without reading the data."""

    name: str
    dtype: ir.DataType
    shape: tuple[int, ...]
    file: Path | None = None  # the shard (None: an in-memory array-like)
    offset: int = 0  # bytes from the start of the file
    length: int = 0

    @property
    def where(self) -> str:
        return f"'{self.file}'" if self.file is not None else "the weights mapping"


class WeightSource:
    """Named weights that are read only when asked for (see the module docstring)."""

    def __init__(self, specs: dict[str, WeightSpec], arrays: Mapping[str, Any] | None, origin: str):
        self.specs = specs
        self.arrays = arrays
        self.origin = origin  # what the user passed, for messages

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def nbytes(self) -> int:
        return sum(s.length for s in self.specs.values())

    def tensor(self, name: str, dtype: ir.DataType | None = None) -> ir.TensorProtocol:
        """A lazy initializer for `name`; with `dtype`, converted to it when read."""
        spec = self.specs[name]
        if spec.file is not None:
            tensor: ir.TensorProtocol = ir.ExternalTensor(
                spec.file.name,
                spec.offset,
                spec.length,
                spec.dtype,
                shape=ir.Shape(spec.shape),
                name=name,
                base_dir=str(spec.file.parent),
            )
        else:
            assert self.arrays is not None
            obj = self.arrays[name]
            tensor = ir.LazyTensor(
                lambda: ir.Tensor(_to_numpy(obj, spec.dtype), dtype=spec.dtype),
                dtype=spec.dtype,
                shape=ir.Shape(spec.shape),
                name=name,
            )
        if dtype is None or dtype == spec.dtype:
            return tensor
        source = tensor
        return ir.LazyTensor(
            lambda: ir.Tensor(np.asarray(source.numpy()).astype(dtype.numpy()), dtype=dtype),
            dtype=dtype,
            shape=ir.Shape(spec.shape),
            name=name,
        )


@dataclass(frozen=True)
class Wanted:
    """A weight a model computes with, as the capture names it (for `match_weights`)."""

    name: str
    shape: tuple[int, ...]
    dtype: ir.DataType
    abstract: bool = True  # the source must have it (False: else the model's own value)
    aliases: tuple[str, ...] = ()  # other names a checkpoint may give it


def match_weights(
    source: WeightSource,
    wanted: list[Wanted],
    *,
    model: str,
    spelled: str,
    dtype_fix: str,
    convert: bool = False,
) -> dict[str, str]:
    """Check `source` against the weights a model wants; returns capture name -> source name.

    Raises `WeightsError` naming the tensor and its file for a tensor the model does not
    have (with the closest name it has), an abstract weight the source lacks, a shape or
    a dtype mismatch (`convert`: floating dtypes may differ, converted when read). Only
    the headers are looked at (the Flax and Keras captures; torch has its own check)."""
    names = {w.name for w in wanted} | {a for w in wanted for a in w.aliases}
    extra = sorted(set(source.specs) - names)
    if extra:
        spec = source.specs[extra[0]]
        close = close_matches(extra[0], names, n=1)
        raise WeightsError(
            f"{len(extra)} tensor(s) of the weights are not weights of {model}: "
            f"'{extra[0]}' in {spec.where}" + (f" ('{close[0]}' exists)" if close else ""),
            f"names as {spelled}",
            "load the checkpoint of this architecture, or rename its tensors (a mapping of "
            "name -> array passed as weights=)",
        )
    found: dict[str, str] = {}
    for want in wanted:
        name = next((n for n in (want.name, *want.aliases) if n in source), None)
        if name is None:
            if want.abstract:
                close = close_matches(want.name, source.specs, n=1)
                raise WeightsError(
                    f"The weights have no tensor '{want.name}', a weight of {model}; looked "
                    f"in {source.origin}" + (f" (it has '{close[0]}')" if close else ""),
                    f"every weight of {model}, named as {spelled}",
                    "pass the complete checkpoint (every shard and its index json)",
                )
            continue  # a value the model holds itself
        spec = source.specs[name]
        if spec.shape != want.shape:
            raise WeightsError(
                f"Tensor '{name}' in {spec.where} has shape {list(spec.shape)}, "
                f"{model}.{want.name} has {list(want.shape)}",
                "the checkpoint of this model's configuration",
                "build the model from the checkpoint's config (hidden size, layers, vocab)",
            )
        floats = spec.dtype.is_floating_point() and want.dtype.is_floating_point()
        if spec.dtype != want.dtype and not (convert and floats):
            raise WeightsError(
                f"Tensor '{name}' in {spec.where} is {dtype_name(spec.dtype)}, "
                f"{model}.{want.name} is {dtype_name(want.dtype)}",
                "the model built in the checkpoint's dtype",
                dtype_fix.format(dtype=dtype_name(spec.dtype)),
            )
        found[want.name] = name
    return found


def attach_weights(
    model: ir.Model, source: WeightSource, found: Mapping[str, str], convert: bool
) -> None:
    """Each initializer `match_weights` found becomes a lazy tensor of `source` (read when
    saved, run or emitted; `convert`: read into the initializer's own dtype)."""
    for value in model.graph.initializers.values():
        name = str(value.name)
        if name in found:
            value.const_value = source.tensor(found[name], value.dtype if convert else None)


# set while a capture traces an abstract model whose weights a source gives (the Flax and
# Keras capture_weights.py); an abstract weight met without it is an error, not zeros
WEIGHTS_APART: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "interop_weights_apart", default=False
)


class Placeholder(ir.LazyTensor):
    """Zeros made only if read: a weight's initializer while an abstract model is traced
    (shapes are all the trace needs), replaced by the source's tensor after it."""


def placeholder(shape: tuple[int, ...], dtype: ir.DataType, name: str) -> ir.TensorProtocol:
    """A `Placeholder` of `shape` and `dtype`."""
    return Placeholder(
        lambda: ir.Tensor(np.zeros(shape, dtype.numpy()), dtype=dtype),
        dtype=dtype,
        shape=ir.Shape(shape),
        name=name,
    )


def serialize_without_placeholders(model: ir.Model) -> Any:
    """The model as a proto whose `Placeholder` initializers are data-less graph inputs
    (same names, types and shapes): for shape inference during a capture with weights
    apart, which would otherwise write the whole model's zeros into the proto."""
    graph = model.graph
    held = {
        name: value.const_value
        for name, value in graph.initializers.items()
        if isinstance(value.const_value, Placeholder)
    }
    if not held:
        return ir.serde.serialize_model(model)
    for name in held:
        graph.initializers[name].const_value = None
    logger = logging.getLogger(ir.serde.__name__)  # it warns about each data-less initializer
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)
        proto = ir.serde.serialize_model(model)
    finally:
        logger.setLevel(level)
        for name, tensor in held.items():
            graph.initializers[name].const_value = tensor
    for name in held:
        value = graph.initializers[name]
        proto.graph.input.append(ir.serde.serialize_value(value))
    kept = [info for info in proto.graph.value_info if info.name not in held]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    kept_inits = [t for t in proto.graph.initializer if t.name not in held]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept_inits)
    return proto


def open_weights(weights: Any) -> WeightSource:
    """A `WeightSource` for a safetensors file, a folder of shards or an index json, or a
    mapping name -> array-like; reads headers only and checks every shard is complete."""
    if weights is None:  # an adapter's trace came here for compute_dtype= alone
        raise WeightsError(
            "compute_dtype= was given without weights=",
            "compute_dtype only with weights apart from the model",
            "pass weights= (a safetensors file or folder, or a mapping), or drop compute_dtype",
        )
    if isinstance(weights, WeightSource):
        return weights
    if isinstance(weights, Mapping):
        return _from_mapping(weights)
    if not isinstance(weights, str | os.PathLike):
        raise WeightsError(
            f"weights= got an object of type {type(weights).__name__}",
            "a .safetensors file, a folder of safetensors shards (with its "
            "model.safetensors.index.json), an index json, or a dict of name -> array",
            "pass the checkpoint's path",
        )
    path = Path(weights)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _from_index(indexes[0], str(weights))
        shards = sorted(path.glob("*.safetensors"))
        if len(indexes) > 1 or not shards:
            found = ", ".join(p.name for p in indexes) or "no .safetensors files"
            raise WeightsError(
                f"The folder '{path}' has {found}",
                "one model.safetensors, or shards with one *.safetensors.index.json",
                "pass the index json or the .safetensors file itself",
            )
        return _merge([_read_header(p) for p in shards], str(weights))
    if not path.is_file():
        raise WeightsError(
            f"No weights at '{path}'", "an existing .safetensors file or folder", "check the path"
        )
    if path.name.endswith(".json"):
        return _from_index(path, str(weights))
    return _merge([_read_header(path)], str(weights))


def _from_index(index: Path, origin: str) -> WeightSource:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise WeightsError(
            f"The index '{index}' is not a safetensors index ({type(err).__name__}: {err})",
            'a JSON object with a "weight_map" of tensor name -> shard file',
            "re-download the index json with the shards",
        ) from None
    headers = {}
    for shard in dict.fromkeys(weight_map.values()):
        file = index.parent / str(shard)
        if "/" in str(shard) or "\\" in str(shard) or not file.is_file():
            names = [n for n, s in weight_map.items() if s == shard]
            raise WeightsError(
                f"The shard '{shard}' named by '{index}' is missing (it holds "
                f"{len(names)} tensors, e.g. '{names[0]}')",
                f"the shard beside the index in '{index.parent}'",
                "download every shard the index lists",
            )
        headers[shard] = _read_header(file)
    specs = {}
    for name, shard in weight_map.items():
        spec = headers[shard].get(name)
        if spec is None:
            raise WeightsError(
                f"The index '{index}' puts tensor '{name}' in '{shard}', which does not hold it",
                "an index that matches its shards",
                "re-download the index json and shards of one checkpoint",
            )
        specs[name] = spec
    return _merge([specs], origin)


def _merge(parts: list[dict[str, WeightSpec]], origin: str) -> WeightSource:
    specs: dict[str, WeightSpec] = {}
    for part in parts:
        for name, spec in part.items():
            if name in specs and specs[name].file != spec.file:
                raise WeightsError(
                    f"Tensor '{name}' is in both {specs[name].where} and {spec.where}",
                    "each tensor in one shard",
                    "pass the index json, which says which shard holds it",
                )
            specs[name] = spec
    return WeightSource(specs, None, origin)


def _read_header(file: Path) -> dict[str, WeightSpec]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = file.stat().st_size

    def corrupt(what: str) -> WeightsError:
        return WeightsError(
            f"'{file}' is not a complete safetensors file: {what}",
            "a safetensors file as written by safetensors.save_file",
            "the file is truncated or corrupt; download or write it again",
        )

    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise corrupt(f"it has {size} bytes")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > min(_HEADER_LIMIT, size - 8):
            raise corrupt(f"its header claims {header_size} bytes")
        try:
            header = json.loads(handle.read(header_size))
        except ValueError as err:
            raise corrupt(f"its header is not JSON ({err})") from None
    start = 8 + header_size
    specs = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"tensor '{name}' has a malformed entry {entry!r}") from None
        needed = int(np.prod(shape, dtype=np.int64)) * (dtype.bitwidth // 8)
        if end - begin != needed or begin < 0:
            raise corrupt(f"tensor '{name}' has {end - begin} bytes for shape {list(shape)}")
        if start + end > size:
            raise WeightsError(
                f"The shard '{file}' is truncated: tensor '{name}' needs bytes "
                f"{start + begin}..{start + end} and the file has {size}",
                "the complete shard",
                "download or write the shard again",
            )
        specs[name] = WeightSpec(name, dtype, shape, file, start + begin, end - begin)
    return specs


def _from_mapping(weights: Mapping[str, Any]) -> WeightSource:
    specs = {}
    for name, obj in weights.items():
        shape = getattr(obj, "shape", None)
        dtype = _ir_dtype(getattr(obj, "dtype", None))
        if shape is None or dtype is None:
            raise WeightsError(
                f"weights['{name}'] is a {type(obj).__name__} without a known shape and dtype",
                "array-likes with .shape and .dtype (numpy, torch, jax arrays)",
                "convert the value to a numpy array or a torch tensor",
            )
        shape = tuple(int(d) for d in shape)
        count = int(np.prod(shape, dtype=np.int64))
        specs[str(name)] = WeightSpec(str(name), dtype, shape, None, 0, count * dtype.bitwidth // 8)
    return WeightSource(specs, weights, "the weights mapping")


def ir_dtype(dtype: Any) -> ir.DataType | None:
    """The ONNX dtype of a numpy / torch / JAX / Keras dtype (or its name); None if none."""
    return _ir_dtype(dtype)


def _ir_dtype(dtype: Any) -> ir.DataType | None:
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.")
    if text == "bfloat16":
        return ir.DataType.BFLOAT16
    try:
        return ir.DataType.from_numpy(np.dtype(text))
    except (TypeError, ValueError):
        return None


def _to_numpy(obj: Any, dtype: ir.DataType) -> np.ndarray:
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # a torch tensor, without importing torch
        tensor = obj.detach().cpu()
        if dtype == ir.DataType.BFLOAT16:  # numpy has no bfloat16: through its bits
            import torch

            return tensor.contiguous().view(torch.int16).numpy().view(dtype.numpy())
        return tensor.numpy()
    return np.asarray(obj)


def host_array(tensor: ir.TensorProtocol, *, copy: bool = True) -> np.ndarray:
    """A weight's array for a host to hold, writable and not shared with the graph.

    External data is mapped copy-on-write (``MAP_PRIVATE``): nothing is read until the
    host touches a page, writes (training) go to private pages and never to the file, and
    the mapping is released when the host drops the array, so a host that copies weights
    into its own buffers (JAX) holds one tensor's pages at a time and a host that keeps
    the array (torch) holds the file's pages, not a second copy. Other tensors give a
    copy, or with ``copy=False`` their own array (for a host that copies it anyway).
    """
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth >= 8 and tensor.size:
        tensor._check_path_containment()  # onnx_ir's own check before it maps a file
        offset = tensor.offset or 0
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(tensor.path, "rb") as handle:
            mapped = mmap.mmap(
                handle.fileno(),
                offset + tensor.nbytes - start,
                access=mmap.ACCESS_COPY,
                offset=start,
            )
        dtype = np.dtype(tensor.dtype.numpy())
        if sys.byteorder != "little":  # external data is little-endian (the ONNX spec)
            dtype = dtype.newbyteorder("<")
        array = np.frombuffer(mapped, dtype, count=tensor.size, offset=offset - start)
        return array.reshape(tensor.shape.numpy())
    return np.array(tensor.numpy()) if copy else tensor.numpy()


def is_mapped(array: Any) -> bool:
    """Whether `array` views a `host_array` mapping (already private to whoever holds it)."""
    base = array
    while isinstance(base, np.ndarray | memoryview):
        base = base.obj if isinstance(base, memoryview) else base.base
    return isinstance(base, mmap.mmap)
