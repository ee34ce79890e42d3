"""Capture without weights: a meta-device module traced, its weights given apart (issue 20).

``interop.trace(model, example_inputs, weights=...)`` for a module built on torch's meta
device (``with torch.device("meta"): model = LlamaForCausalLM(config)``): every parameter
is a shape and a dtype, nothing more. The weights come from a safetensors checkpoint (a
file, a folder of shards with its index) or a mapping of names to arrays
(`interop.weights`). The steps:

1. the source's headers are checked against the module's parameters and persistent buffers
   (missing or extra names, shapes, dtypes) before anything is traced, so a wrong
   checkpoint fails in a second with a `WeightsError` naming the tensor and the file;
2. the module is traced as usual (`capture.trace_module`) with the example inputs moved
   to the meta device too: torch.export and torch.onnx only propagate shapes, so no
   weight is ever materialized (the trace of a 7B model holds no weight);
3. each initializer of the graph becomes a lazy tensor of the source (an
   `onnx_ir.ExternalTensor` over the shard's bytes): nothing is read until the graph is
   saved, run or emitted.

Tied parameters (``lm_head.weight`` is ``model.embed_tokens.weight``) are found under any of
their names. Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints: a meta one
is recomputed by building its owner again on the CPU when the owner holds no parameters
and takes its ``config`` (Hugging Face's rotary embeddings); otherwise the error names it.
With ``compute_dtype="float32"`` the graph computes in float32 from half-precision files
(each weight converted when read, so the saved file holds float32 weights).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import onnx_ir as ir
import torch
from torch._subclasses.fake_tensor import FakeTensor

from interop.errors import WeightsError, close_matches
from interop.graph import Graph
from interop.weights import WeightSource, dtype_name, open_weights

from .capture import normalize_inputs, trace_module

_DTYPES = {
    torch.float32: ir.DataType.FLOAT,
    torch.float16: ir.DataType.FLOAT16,
    torch.bfloat16: ir.DataType.BFLOAT16,
    torch.float64: ir.DataType.DOUBLE,
    torch.int64: ir.DataType.INT64,
    torch.int32: ir.DataType.INT32,
    torch.int8: ir.DataType.INT8,
    torch.uint8: ir.DataType.UINT8,
    torch.bool: ir.DataType.BOOL,
}


def trace_with_weights(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    weights: Any,
    compute_dtype: Any = None,
    **options: Any,
) -> Graph:
    """Trace `module` (meta device or not) with its weights read lazily from `weights`."""
    source = open_weights(weights)
    target = _torch_dtype(compute_dtype)
    tensors = _named_tensors(module)
    _check(module, source, tensors, target)
    device = next((t.device for t in tensors.values()), torch.device("cpu"))
    abstract = any(_abstract(t) for t in tensors.values())
    inputs = _to_device(example_inputs, device)
    with _cast(module, target):
        # check_dims stays on: torch.export's own specializations make dims static (a
        # re-export), and the run half finds that the module cannot run (no weights), so
        # it neither runs the graph nor decides; the shape-inference half runs below
        graph = trace_module(module, inputs, **options)
    aliases = _aliases(module)
    weights_of: list[ir.Value] = []  # the initializers read from `weights`
    for value in graph.model.graph.initializers.values():
        name = str(value.name)
        found = next((n for n in aliases.get(name, [name]) if n in source), None)
        dtype = value.dtype if target is not None else None
        if found is not None:
            value.const_value = source.tensor(found, dtype)
            weights_of.append(value)
        elif _is_meta(value.const_value):
            value.const_value = _rebuilt_buffer(module, name, source)
    if abstract and options.get("check_dims", True):
        graph = _proven_static(graph, module, inputs, weights_of)
    return graph


class _Unread(ir.ExternalTensor):
    """A weight's type and shape for shape inference: serialized as a reference, never
    read, and counted as no bytes (so a 7B graph is not 'over one protobuf' for it)."""

    @property
    def nbytes(self) -> int:
        return 0


def _proven_static(
    graph: Graph, module: torch.nn.Module, inputs: Any, weights: list[ir.Value]
) -> Graph:
    """The dims shape inference proves fixed (`interop.dim_check.symbolic_findings`), static
    with a warning each: the half of the dim check that needs no weights. (The other half
    runs the graph and the module at a second size: it needs the weights in memory, once
    in ONNX Runtime and once in the module, which a model larger than memory has not.)"""
    from interop import dim_check

    args, kwargs = normalize_inputs(inputs)
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return graph
    sizes: dict[str, int] = {}
    for name, where in dim_check.dynamic_axes(graph.model.graph).items():
        for input_name, axis in where:
            value = bound.get(input_name)
            if isinstance(value, torch.Tensor) and axis < value.dim():
                sizes[name] = int(value.shape[axis])
                break
    if not sizes:
        return graph
    kept = {}
    for value in weights:  # the graph's own constants (shape targets) keep their data
        tensor = value.const_value
        if tensor is not None:
            kept[value] = tensor
            value.const_value = _Unread(
                "interop-unread", 0, 0, tensor.dtype, shape=ir.Shape(tensor.shape.numpy()),
                name=str(value.name), base_dir="",
            )  # fmt: skip
    try:
        findings = dim_check.symbolic_findings(graph.model, sizes)
    finally:
        for value, tensor in kept.items():
            value.const_value = tensor
    source = f"torch module {type(module).__name__}"
    static = {}
    for name, found in findings.items():
        proofs = [f.text for f in found if f.definite]
        if proofs:
            static[name] = sizes[name]
            warnings.warn(
                f"interop: {source}: the dynamic dimension '{name}' does not hold (shape "
                f"inference: {'; '.join(proofs[:2])}); the graph declares it static, of size "
                f"{sizes[name]}",
                stacklevel=4,
            )
    return dim_check.made_static(graph, static)


def _torch_dtype(compute_dtype: Any) -> torch.dtype | None:
    if compute_dtype is None:
        return None
    dtype = getattr(torch, str(compute_dtype).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise WeightsError(
            f"compute_dtype={compute_dtype!r} is not a floating dtype",
            "'float32', 'float16' or 'bfloat16'",
            "pass compute_dtype='float32' to compute in float32 from half-precision weights",
        )
    return dtype


def _named_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, by every name (tied ones under each)."""
    named = dict(module.named_parameters(remove_duplicate=False))
    for owner_name, owner in module.named_modules(remove_duplicate=False):
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                named[f"{owner_name}.{name}" if owner_name else name] = buffer
    return named


def _aliases(module: torch.nn.Module) -> dict[str, list[str]]:
    """Name -> every name of the same tensor (itself first)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(tensor), []).append(name)
    for name, tensor in module.named_buffers(remove_duplicate=False):
        groups.setdefault(id(tensor), []).append(name)
    return {
        name: [name] + [n for n in group if n != name]
        for group in groups.values()
        for name in group
    }


def _check(
    module: torch.nn.Module,
    source: WeightSource,
    tensors: dict[str, torch.Tensor],
    target: torch.dtype | None,
) -> None:
    model = type(module).__name__
    extra = sorted(set(source.specs) - set(tensors))
    if extra:
        spec = source.specs[extra[0]]
        close = close_matches(extra[0], tensors, n=1)
        raise WeightsError(
            f"{len(extra)} tensor(s) of the weights are not parameters or buffers of {model}: "
            f"'{extra[0]}' in {spec.where}" + (f" ('{close[0]}' exists)" if close else ""),
            f"names as {model}.state_dict() spells them",
            "load the checkpoint of this architecture, or rename its tensors (a mapping of "
            "name -> array passed as weights=)",
        )
    aliases = _aliases(module)
    for name, tensor in tensors.items():
        found = next((n for n in aliases.get(name, [name]) if n in source), None)
        if found is None:
            if _abstract(tensor):
                raise WeightsError(
                    f"The weights have no tensor '{name}' ({model} holds it on the meta "
                    f"device or as a fake tensor, so it has no value); looked in "
                    f"{source.origin}",
                    f"every parameter and persistent buffer of {model}",
                    "pass the complete checkpoint (every shard and its index json)",
                )
            continue  # a real tensor of the module (a buffer built on the CPU)
        spec = source.specs[found]
        if spec.shape != tuple(tensor.shape):
            raise WeightsError(
                f"Tensor '{found}' in {spec.where} has shape {list(spec.shape)}, "
                f"{model}.{name} has {list(tensor.shape)}",
                "the checkpoint of this model's configuration",
                "build the model from the checkpoint's config (hidden size, layers, vocab)",
            )
        expected = _DTYPES.get(tensor.dtype)
        if target is not None and tensor.is_floating_point() and spec.dtype.is_floating_point():
            continue  # converted when read
        if expected != spec.dtype:
            raise WeightsError(
                f"Tensor '{found}' in {spec.where} is {dtype_name(spec.dtype)}, "
                f"{model}.{name} is {str(tensor.dtype).removeprefix('torch.')}",
                "the model built in the checkpoint's dtype",
                f"build the model with dtype=torch.{dtype_name(spec.dtype)} (e.g. "
                f"torch.set_default_dtype or from_config(..., dtype=...)), or pass "
                "compute_dtype='float32' to compute in float32",
            )


@contextlib.contextmanager
def _cast(module: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """The module's floating tensors in `dtype` for the trace, restored after."""
    if dtype is None:
        yield
        return
    saved = [(t, t.data) for t in [*module.parameters(), *module.buffers()]]
    for tensor, data in saved:
        if data.is_floating_point():
            tensor.data = data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def _to_device(example_inputs: Any, device: torch.device) -> Any:
    args, kwargs = normalize_inputs(example_inputs)

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, Mapping):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(move(v) for v in value)
        return value

    if kwargs:
        return {k: move(v) for k, v in kwargs.items()}
    return tuple(move(a) for a in args)


def _abstract(tensor: torch.Tensor) -> bool:
    """A tensor without data: on the meta device, or a fake tensor (a module built under
    ``torch._subclasses.fake_tensor.FakeTensorMode``, which reports the device it fakes)."""
    return tensor.is_meta or isinstance(tensor, FakeTensor)


def _is_meta(tensor: Any) -> bool:
    raw = getattr(tensor, "raw", None)
    return isinstance(raw, torch.Tensor) and _abstract(raw)


def _rebuilt_buffer(module: torch.nn.Module, name: str, source: WeightSource) -> Any:
    """A non-persistent meta buffer, from its owner built again on the CPU (see above)."""
    owner_path, _, attr = name.rpartition(".")
    value = None
    try:
        owner = module.get_submodule(owner_path)
        config = getattr(owner, "config", None)
        if config is not None and not any(True for _ in owner.parameters()):
            with torch.device("cpu"):
                value = getattr(type(owner)(config), attr)
    except Exception:  # any failure means the buffer cannot be rebuilt: the error below
        value = None
    if not isinstance(value, torch.Tensor) or _abstract(value):
        raise WeightsError(
            f"'{name}' is a buffer on the meta device that the checkpoint does not hold "
            f"(looked in {source.origin})",
            "every tensor the model computes with: parameters and buffers in the weights, or "
            "buffers built on the CPU",
            "pass it in weights=, or build the model with only its parameters on the meta "
            "device (accelerate.init_empty_weights(include_buffers=False))",
        )
    array = value.detach().contiguous()
    if array.dtype == torch.bfloat16:
        return ir.Tensor(
            array.view(torch.int16).numpy().view(ir.DataType.BFLOAT16.numpy()),
            dtype=ir.DataType.BFLOAT16,
            name=name,
        )
    return ir.Tensor(array.numpy(), name=name)
