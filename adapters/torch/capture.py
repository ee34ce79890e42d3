"""torch.nn.Module -> interop.Graph, through torch.export and torch.onnx.

torch.export captures the module (non-strict mode, dynamic batch by default);
torch.onnx translates the exported program with ``optimize=False`` so that
BatchNormalization stays unfused and every node keeps the module path and class
that produced it. capture_provenance.py then rewrites that provenance into interop's
own key scheme, names parameters, outputs and symbolic dims after the source, and
turns the Identity that eval-mode dropout becomes back into an ONNX Dropout node.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import traceback
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from interop import provenance
from interop.errors import InteropError, TraceError, UnsupportedOpError
from interop.graph import Graph
from interop.progress import progress
from interop.structure import flatten_outputs

from . import CAPTURE_OPS, capture_dim_check
from .capture_arguments import map_arguments
from .capture_fallback import ModuleStack, fallback
from .capture_provenance import (
    TORCH_DIR,
    fx_provenance,
    name_outputs,
    record_provenance,
    rename_dims,
    restore_dropout,
)
from .capture_returns import ModuleReturns
from .capture_rewrites import rewritten

_FAILED_TARGET = re.compile(r"target=torch\.ops\.([\w.]+?)\.(\w+)\]?\(|OpOverload\(op='([\w.]+)'")


# ---------------------------------------------------------------------------- inputs
def _to_tensor(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return torch.from_numpy(np.ascontiguousarray(value))
    if hasattr(value, "__array__") and not isinstance(
        value, torch.Tensor | int | float | bool | str
    ):
        return torch.from_numpy(np.ascontiguousarray(np.asarray(value)))  # jax arrays and the like
    return value


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tensor, a tuple/list of them, or a dict of named ones -> (args, kwargs)."""
    if isinstance(example_inputs, Mapping):
        return (), {str(k): _to_tensor(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, tuple | list):
        return tuple(_to_tensor(v) for v in example_inputs), {}
    return (_to_tensor(example_inputs),), {}


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _expand_cache(obj: Any) -> Any:
    """Hugging Face KV caches -> ``{layer: {"key", "value"}}`` so they flatten to named outputs.

    Encoder-decoder caches become ``{"self_attention": ..., "cross_attention": ...}``.
    """
    if "Cache" not in type(obj).__name__:
        return obj
    layers = getattr(obj, "layers", None)
    if layers is not None and all(hasattr(la, "keys") and hasattr(la, "values") for la in layers):
        return {str(i): {"key": la.keys, "value": la.values} for i, la in enumerate(layers)}
    if hasattr(obj, "self_attention_cache") and hasattr(obj, "cross_attention_cache"):
        return {
            "self_attention": obj.self_attention_cache,
            "cross_attention": obj.cross_attention_cache,
        }
    if hasattr(obj, "key_cache") and hasattr(obj, "value_cache"):
        return {
            str(i): {"key": k, "value": v}
            for i, (k, v) in enumerate(zip(obj.key_cache, obj.value_cache))
        }
    return obj


def flatten_module_outputs(outputs: Any) -> list[tuple[str, Any]]:
    return flatten_outputs(outputs, _is_tensor, _expand_cache)


def run_module(module: torch.nn.Module, example_inputs: Any) -> list[tuple[str, np.ndarray]]:
    """Run the module eagerly in eval mode; outputs flattened and named as in the graph."""
    args, kwargs = normalize_inputs(example_inputs)
    with _eval_mode(module), torch.no_grad():
        outputs = module(*args, **kwargs)
    return [(name, t.detach().cpu().numpy()) for name, t in flatten_module_outputs(outputs)]


# ---------------------------------------------------------------------------- trace
def trace_module(
    module: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    verbose: bool = False,
    check_dims: bool = True,
) -> Graph:
    """Trace `module` on `example_inputs` into a Graph (see `interop.trace`).

    With `check_dims` (the default) a dim torch.export specialises is left static with a
    warning, and the graph runs at a second size of each dynamic dim against the module
    (capture_dim_check.py); ``check_dims=False`` skips both (a specialised dim raises).
    """
    args, kwargs = normalize_inputs(example_inputs)
    signature = inspect.signature(module.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TraceError(
            f"The example inputs do not fit {type(module).__name__}.forward{signature}: {err}",
            "one value per forward() argument, as a tuple or a dict of named values",
        ) from None
    dims = _dynamic_axes(bound, signature, dynamic_batch, dynamic_dims or {})
    args, kwargs = _widen_unit_dims(bound, signature, dims)
    dynamic_shapes = _dynamic_shapes(bound, signature, dims)
    output_names: list[str] = []
    # a three-step bar on a terminal (large models take tens of seconds in torch.export)
    steps = iter(
        progress(("export", "translate", "provenance"), desc=f"trace {type(module).__name__}")
    )
    next(steps)
    returns = ModuleReturns(module, _expand_cache)
    fixed: dict[str, Any] = {}  # where torch.export fixed a dynamic dim (capture_dim_check)
    stack = ModuleStack(module)

    def capture() -> tuple[Any, dict[str, Any]]:
        with returns.recording(), stack.recording():
            exported = capture_dim_check.export(
                _export, module, args, kwargs, dynamic_shapes, fixed, check_dims=check_dims
            )
        next(steps, None)
        program = _to_onnx(exported)
        return program.model, returns.resolve(exported, program)

    how = "torch.export"
    with _eval_mode(module), _flat_forward(module, output_names), _quiet(verbose):
        try:
            with rewritten(module, upfront=True) as upfront:  # patterns known to fail plain
                model, returned = capture()
            how += f" with rewrites {', '.join(upfront)}" if upfront else ""
        except (TraceError, UnsupportedOpError) as first:
            # rewrites of known patterns, then the TorchScript exporter (capture_fallback.py)
            failed_in = getattr(first, "layer", None) or stack.failed_in()
            leaves = {n: v for n, v in _tensor_leaves(bound, signature) if _is_tensor(v)}
            flat = module.forward

            def call(feeds: dict[str, Any]) -> Any:
                mapped = map_arguments(bound, signature, lambda n, v: feeds.get(n, v))
                again = inspect.BoundArguments(signature, mapped)  # type: ignore[arg-type]
                return flat(*again.args, **again.kwargs)

            model, returned, how = fallback(
                module, first, failed_in, capture, leaves, call, dims, output_names, upfront
            )
    next(steps, None)
    record_provenance(model, module)
    provenance.write_source(model, {**provenance.read_source(model), "capture": how})
    sizes = {n: tuple(v.shape) for n, v in _tensor_leaves(bound, signature) if _is_tensor(v)}
    rename_dims(model, dims, sizes)
    name_outputs(model, output_names)
    restore_dropout(model, module)
    # names are final now: each module's return values, recorded during the export
    provenance.write_layers(model, provenance.with_returns(provenance.read_layers(model), returned))
    model.graph.name = type(module).__name__
    next(steps, None)
    graph = Graph(model)
    return capture_dim_check.checked(
        graph, module, bound, signature, dims, fixed, flatten_module_outputs, check_dims=check_dims
    )


def _roots(
    bound: inspect.BoundArguments, signature: inspect.Signature
) -> Iterator[tuple[str, Any]]:
    """(name, value) per argument, with ``*args`` and ``**kwargs`` spelled out."""
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            yield from ((f"{name}_{i}", v) for i, v in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            yield from value.items()
        else:
            yield name, value


def _leaves(name: str, value: Any) -> Iterator[tuple[str, Any]]:
    """Leaves of a nested argument, named as torch.onnx names graph inputs (``batch_x``)."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(f"{name}_{key}", item)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _leaves(f"{name}_{index}", item)
    else:
        yield name, value


def _tensor_leaves(
    bound: inspect.BoundArguments, signature: inspect.Signature
) -> Iterator[tuple[str, Any]]:
    """(input name, value) for every leaf, in the order torch.onnx names graph inputs."""
    for root, value in _roots(bound, signature):
        yield from _leaves(root, value)


def input_feeds(module: torch.nn.Module, example_inputs: Any) -> dict[str, np.ndarray]:
    """The example inputs as the graph's named inputs (nested arguments flattened)."""
    args, kwargs = normalize_inputs(example_inputs)
    signature = inspect.signature(module.forward)
    bound = signature.bind(*args, **kwargs)
    return {
        n: v.detach().cpu().numpy() for n, v in _tensor_leaves(bound, signature) if _is_tensor(v)
    }


def _dynamic_axes(bound, signature, dynamic_batch, dynamic_dims) -> dict[str, dict[int, str]]:
    known = {name for name, v in _tensor_leaves(bound, signature) if _is_tensor(v)}
    unknown = sorted(set(dynamic_dims) - known)
    if unknown:
        raise TraceError(
            f"dynamic_dims names inputs that are not tensor arguments: {', '.join(unknown)}",
            "names of forward() arguments given as tensors: " + ", ".join(sorted(known)),
        )
    axes: dict[str, dict[int, str]] = {}
    for name, value in _tensor_leaves(bound, signature):
        if not _is_tensor(value):
            continue
        chosen = {0: "batch"} if dynamic_batch and value.dim() > 0 else {}
        for axis, dim_name in dynamic_dims.get(name, {}).items():
            axis = int(axis) % max(value.dim(), 1)
            chosen[axis] = re.sub(r"\W", "_", str(dim_name))
        if chosen:
            axes[name] = chosen
    return axes


def _widen_unit_dims(bound, signature, dims) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """torch.export specialises dims of size 1; trace such examples with size 2 instead."""

    def widen(name: str, value: Any) -> Any:
        for axis in dims.get(name, {}):
            if _is_tensor(value) and value.shape[axis] == 1:
                value = torch.cat([value, value], dim=axis)
        return value

    bound.arguments.update(map_arguments(bound, signature, widen))
    return bound.args, bound.kwargs


def _dynamic_shapes(bound, signature, dims) -> dict[str, Any] | None:
    if not dims:
        return None

    def spec(name: str, value: Any) -> Any:
        if not _is_tensor(value) or name not in dims:
            return None
        # Dim.DYNAMIC lets torch.export infer ranges (Bert's seq <= 512) and equalities
        # (one batch symbol across inputs); we rename the symbols after export.
        return {axis: torch.export.Dim.DYNAMIC for axis in dims[name]}

    return map_arguments(bound, signature, spec)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _flat_forward(module: torch.nn.Module, names: list[str]) -> Iterator[None]:
    """Make forward return a flat tuple of tensors, recording their structured names."""
    original = module.forward
    own = "forward" in module.__dict__

    def forward(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        flat = flatten_module_outputs(original(*args, **kwargs))
        names[:] = [name for name, _ in flat]
        return tuple(t for _, t in flat)

    forward.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own:
            module.forward = original  # type: ignore[method-assign]
        else:
            del module.forward


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    if verbose:
        yield
        return
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _interop_cause(err: BaseException) -> InteropError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InteropError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def _user_location(err: BaseException) -> str | None:
    frames = [
        f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(TORCH_DIR)
    ]
    frames = [
        f for f in frames if "/interop/" not in f.filename and "/adapters/torch/" not in f.filename
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_lines(err: BaseException, count: int = 3) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]
    return " ".join(lines[:count])[:600]


def _export(module, args, kwargs, dynamic_shapes) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(
            module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False
        )
    except Exception as err:  # torch raises many types; each becomes a TraceError with a fix
        ours = _interop_cause(err)
        if ours is not None:
            raise ours from None
        message = str(err)
        where = _user_location(err)
        at = f" at {where}" if where else ""
        if "data-dependent" in message or "DataDependent" in type(err).__name__:
            fix = (
                "forward branches or loops on tensor values; use torch.where / torch.cond, "
                "torch._check to state what holds, or register a rewrite of that module "
                "(interop.adapters.torch.capture_rewrites.register_rewrite)"
            )
        elif "Constraints violated" in message or "specialized" in message:
            fix = (
                "the model fixes the size of a dimension that interop made dynamic; pass "
                "dynamic_batch=False or drop that axis from dynamic_dims"
            )
        else:
            fix = "make forward exportable by torch.export (no Python-side effects on tensors, "
            fix += "no unsupported Python types); see the torch.export documentation"
        error = TraceError(
            f"torch.export could not trace {type(module).__name__}{at}: {_first_lines(err)}",
            None,
            fix,
        )
        error.original = err  # type: ignore[attr-defined]
        raise error from None


_REGISTRY_CACHE: dict[int, Any] = {}


@contextlib.contextmanager
def _cached_torchlib_registry() -> Iterator[None]:
    """Reuse torch.onnx's aten->ONNX function registry across traces.

    torch.onnx rebuilds it from torchlib on every export (about 1.5 s on a 2-core
    machine, more than the export of a small model). We build it once per opset and
    hand each export a copy, so custom translations never leak between calls. This
    reaches into a private API: when its shape changes we fall back to torch's path.
    """
    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        original = registry_class.__dict__["from_torchlib"]
        build = original.__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, opset_version=_registration._constants.TORCHLIB_OPSET):
        base = _REGISTRY_CACHE.get(opset_version)
        if base is None or not hasattr(base, "functions"):
            base = _REGISTRY_CACHE[opset_version] = build(cls, opset_version)
        copy = cls()
        copy.__dict__.update(base.__dict__)
        copy.functions = {target: list(metas) for target, metas in base.functions.items()}
        return copy

    registry_class.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_class.from_torchlib = original


def _to_onnx(exported: torch.export.ExportedProgram) -> Any:
    table = {overload: fn for _, (overload, fn) in CAPTURE_OPS.items()} or None
    try:
        with _cached_torchlib_registry():
            return torch.onnx.export(
                exported, dynamo=True, optimize=False, verbose=False, custom_translation_table=table
            )
    except Exception as err:
        chain, cause = [], err
        while cause is not None and len(chain) < 16:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        text = "\n".join(str(c) for c in chain)
        match = _FAILED_TARGET.search(text)
        missing = "No ONNX function found" in text or "No decompositions registered" in text
        if match and not missing:  # a translation exists but failed on this node
            op = match.group(3) or f"{match.group(1)}.{match.group(2)}"
            layer, location = fx_provenance(exported, op)
            where = f" in layer '{layer}'" if layer else ""
            where += f" at {location}" if location else ""
            error: InteropError = TraceError(
                f"torch.onnx failed to translate '{op}'{where}: {_first_lines(chain[-1], 2)}",
                None,
                "this is a limitation of torch.onnx on this construct; try dynamic_batch=False / "
                "fewer dynamic_dims, or rewrite that call with simpler ops",
            )
        elif match:
            op = match.group(3) or f"{match.group(1)}.{match.group(2)}"
            layer, location = fx_provenance(exported, op)
            base = op.rsplit(".", 1)[0] if op.count(".") > 1 else op
            error = UnsupportedOpError(
                base.replace(".", "::", 1),
                direction="import",
                adapter="torch",
                layer=layer,
                location=location,
                detail=_first_lines(chain[-1], 1),
                fix=(
                    f"rewrite that call with supported ops, or register an ONNX translation: "
                    f"@interop.adapters.torch.register_op(torch.ops.{op if op.count('.') > 1 else op + '.default'}) "
                    "on an onnxscript function"
                ),
            )
        else:
            error = TraceError(
                f"torch.onnx could not translate the exported program of this model: {_first_lines(chain[-1])}",
                None,
                "simplify the construct named above, or report it with the model to the torch.onnx "
                "issue tracker; interop.trace(..., verbose=True) shows the exporter's log",
            )
        error.original = err  # type: ignore[attr-defined]
        raise error from None
