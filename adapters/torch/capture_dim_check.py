"""A declared dynamic dimension must hold: the torch side of `interop.dim_check`.

Two ways a torch model fixes a dimension interop made dynamic:

- loudly: torch.export specialises the dim (``x * torch.ones(2, 1)``, ``x.reshape(2, -1)``,
  ``if x.shape[0] > 2``) and refuses ``Dim.DYNAMIC``. `export` then exports again with
  ``Dim.AUTO``, which lets torch specialise; each dim that became a number is static in
  the graph, with a warning naming the source line that fixed it (recorded when torch's
  shape environment replaced the symbol by a number).
- silently: the graph runs at other sizes but computes otherwise. `checked` runs it at a
  second size of each dynamic dim against the module (`interop.dim_check`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from interop import dim_check
from interop.errors import TraceError
from interop.graph import Graph
from interop.ort_feeds import host_numpy

from .capture_arguments import map_arguments

_TORCH_DIR = os.path.dirname(torch.__file__)
_OURS = (os.sep + "interop" + os.sep, os.sep + os.path.join("adapters", "torch") + os.sep)


def export(
    export_fn: Callable[..., Any],
    module: torch.nn.Module,
    args: Any,
    kwargs: Any,
    dynamic_shapes: Any,
    fixed: dict[str, Any],
    *,
    check_dims: bool = True,
) -> Any:
    """``export_fn(module, args, kwargs, dynamic_shapes)``; where torch specialises a
    dynamic dim, exported again with ``Dim.AUTO`` (that dim static). `fixed` then holds
    the user ``lines`` that fixed a dim and the ``shapes`` of the user inputs."""
    try:
        return export_fn(module, args, kwargs, dynamic_shapes)
    except TraceError as err:
        text = str(getattr(err, "original", err))
        if not check_dims or dynamic_shapes is None or "specialized it" not in text:
            raise
    lines: dict[str, str] = {}
    with _recording_specializations(lines):
        exported = export_fn(module, args, kwargs, _auto(dynamic_shapes))
    fixed["lines"] = list(dict.fromkeys(line for line in lines.values() if line))
    nodes = {n.name: n for n in exported.graph.nodes if n.op == "placeholder"}
    fixed["shapes"] = {
        name: tuple(_concrete(d) for d in nodes[name].meta["val"].shape)
        for name in exported.graph_signature.user_inputs
        if name in nodes and isinstance(nodes[name].meta.get("val"), torch.Tensor)
    }
    return exported


def _concrete(dim: Any) -> int | None:
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    return int(dim) if is_concrete_int(dim) else None


def _auto(spec: Any) -> Any:
    if isinstance(spec, dict):
        return {k: _auto(v) for k, v in spec.items()}
    if isinstance(spec, list | tuple):
        return type(spec)(_auto(v) for v in spec)
    return torch.export.Dim.AUTO if spec is torch.export.Dim.DYNAMIC else spec


def _user_line() -> str | None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if name.startswith(_TORCH_DIR) or any(p in name for p in _OURS) or "<" in name:
            continue
        if f"{os.sep}site-packages{os.sep}" in name and "transformers" not in name:
            continue
        return f"{name}:{frame.lineno} ({(frame.line or '').strip()[:80]})"
    return None


@contextlib.contextmanager
def _recording_specializations(fixed: dict[str, str]) -> Iterator[None]:
    """symbol -> the user line where torch's shape environment made it a number.

    Patches ShapeEnv._set_replacement (private; skipped when its shape changes)."""
    try:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        original = ShapeEnv._set_replacement
    except (ImportError, AttributeError):
        yield
        return

    def _set_replacement(self: Any, a: Any, tgt: Any, msg: str) -> Any:
        if getattr(tgt, "is_number", False) and str(a) not in fixed:
            fixed[str(a)] = _user_line() or ""
        return original(self, a, tgt, msg)

    ShapeEnv._set_replacement = _set_replacement  # type: ignore[method-assign]
    try:
        yield
    finally:
        ShapeEnv._set_replacement = original  # type: ignore[method-assign]


def checked(
    graph: Graph,
    module: torch.nn.Module,
    bound: inspect.BoundArguments,
    signature: inspect.Signature,
    dims: dict[str, dict[int, str]],
    fixed: dict[str, Any],
    flatten: Callable[[Any], list[tuple[str, Any]]],
    *,
    check_dims: bool = True,
) -> Graph:
    """The graph after `interop.dim_check` ran it at a second size of each dynamic dim;
    a warning for each dim `export` had to leave static."""
    source = f"torch module {type(module).__name__}"
    if fixed:
        graph = _made_static(graph, dims, fixed, source)
    if not check_dims:
        return graph

    feeds: dict[str, np.ndarray] = {}

    def record(name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not value.is_meta:  # meta: nothing to run
            feeds[name] = host_numpy(value)  # bfloat16 included
        return value

    map_arguments(bound, signature, record)

    def run_source(named: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        def leaf(name: str, value: Any) -> Any:
            if name in named and isinstance(value, torch.Tensor):
                return torch.from_numpy(np.ascontiguousarray(named[name]))
            return value

        call = inspect.BoundArguments(signature, map_arguments(bound, signature, leaf))
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        try:
            with torch.no_grad():
                outputs = module(*call.args, **call.kwargs)
        finally:
            for m, training in modes:
                m.training = training
        return [(n, host_numpy(t)) for n, t in flatten(outputs)]

    return dim_check.check_dims(graph, run_source, feeds, source=source, stacklevel=6)


def _made_static(
    graph: Graph, dims: dict[str, dict[int, str]], fixed: dict[str, Any], source: str
) -> Graph:
    """The dims torch.export fixed, static in the graph, with a warning each. (torch.onnx
    declares such an input dim as the symbol '2', which rename_dims then named.)"""
    where = f" at {fixed['lines'][0]}" if fixed["lines"] else ""
    static: dict[str, int] = {}
    for value in graph.model.graph.inputs:
        shape = fixed["shapes"].get(str(value.name), ())
        for axis, name in dims.get(str(value.name), {}).items():
            size = shape[axis] if axis < len(shape) else None
            if not isinstance(size, int) or name in static:
                continue
            static[name] = size
            warnings.warn(
                f"interop: {source}: the dynamic dimension '{name}' (axis {axis} of input "
                f"'{value.name}') does not hold: torch.export fixed it{where}; the graph "
                f"declares it static, of size {size}",
                stacklevel=6,
            )
    return dim_check.made_static(graph, static)
