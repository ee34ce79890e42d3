"""Which graph values each module call returned (``returns`` of `interop.provenance`).

During ``torch.export`` a forward hook on every submodule reads, for each tensor of the
call's return value (in the order the model's own outputs are flattened), the FX node the tracer
holds for it: exact, and free besides one hook call per module call. torch.onnx then
decomposes the exported program before translating it, which renames nodes; each
decomposed node names the nodes it came from (``meta["from_node"]``), so a recorded node
maps to the decomposed node that carries its result out (the one others read), whose
name is the ONNX value's. A node the decomposition dropped (a ``.to()`` that changes
nothing, an alias) stands for its first input.

Everything here reads torch internals that are public in practice but not promised
(``get_proxy_mode``, ``get_proxy_slot``, ``from_node``); when they change, no returns
are recorded and layers fall back to the values that leave them (`interop.hierarchy`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import onnx_ir as ir
import torch

_NO_OP_HOPS = 16  # dropped nodes followed back to their first input, at most


def returned_tensors(obj: Any, expand: Callable[[Any], Any], depth: int = 0) -> list[Any]:
    """The tensors of a return value in the order the model's outputs are flattened
    (`interop.structure`: mappings, dataclasses, tuples, lists); `expand` turns framework
    objects (a KV cache) into those first, and anything else is skipped, not an error."""
    obj = expand(obj)
    if isinstance(obj, torch.Tensor):
        return [obj]
    if depth > 32:
        return []
    if isinstance(obj, Mapping):
        items: Any = obj.values()
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif isinstance(obj, tuple | list):
        items = obj
    else:
        return []
    return [t for item in items for t in returned_tensors(item, expand, depth + 1)]


@contextlib.contextmanager
def submodule_hooks(
    module: torch.nn.Module,
    pre_hook: Callable[[str], Callable[..., None]] | None = None,
    hook: Callable[[str], Callable[..., None]] | None = None,
) -> Iterator[None]:
    """Installs ``pre_hook(path)`` / ``hook(path)`` as forward (pre-)hooks on every named
    submodule for the duration of the block. A module that refuses hooks stops the
    installation quietly: the hooks are diagnostics and must never fail a trace."""
    handles = []
    try:
        for path, sub in module.named_modules():
            if path:
                if pre_hook is not None:
                    handles.append(sub.register_forward_pre_hook(pre_hook(path)))
                if hook is not None:
                    handles.append(sub.register_forward_hook(hook(path)))
    except Exception:
        pass
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ModuleReturns:
    """Records the FX nodes returned by every call of every submodule of `module`."""

    def __init__(self, module: torch.nn.Module, expand: Callable[[Any], Any] = lambda x: x):
        self.module, self.expand = module, expand
        self.calls: dict[str, list[list[Any]]] = {}  # path -> per call, FX node or None per tensor
        self._tracer: Any = None

    def recording(self) -> contextlib.AbstractContextManager[None]:
        return submodule_hooks(self.module, hook=self._hook)

    def _hook(self, path: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            try:
                from torch.fx.experimental.proxy_tensor import get_proxy_mode, get_proxy_slot

                mode = get_proxy_mode()
                if mode is None:
                    return
                if mode.tracer is not self._tracer:  # a new trace: only the last one counts
                    self._tracer = mode.tracer
                    self.calls.clear()
                nodes = []
                for tensor in returned_tensors(output, self.expand):
                    slot = get_proxy_slot(tensor, mode.tracer, None)
                    nodes.append(slot.proxy.node if slot is not None else None)
            except Exception:  # an output structure we cannot read: this call stays unknown
                nodes = []
            self.calls.setdefault(path, []).append(nodes)

        return hook

    def resolve(self, exported: Any, program: Any) -> dict[str, list[ir.Value | None]]:
        """``{module path: ONNX values returned, every call's in call order}``."""
        try:
            return _Resolver(exported, program).resolve(self.calls)
        except Exception:  # torch internals changed shape: no returns, layers fall back
            return {}


def _origins(node: Any) -> set[str]:
    """Names of the nodes of the program before decomposition that `node` came from."""
    found: set[str] = set()
    stack = list(node.meta.get("from_node") or ())
    while stack:
        source = stack.pop()
        parents = getattr(source, "from_node", None) or []
        if parents:
            stack.extend(parents)
        else:
            found.add(source.name)
    return found


class _Resolver:
    def __init__(self, exported: Any, program: Any):
        graph = program.model.graph
        self.values = {v.name: v for v in graph.inputs if v.name}
        for node in graph:
            self.values.update({v.name: v for v in node.outputs if v.name})
        self.original = {n.name: n for n in exported.graph.nodes}
        decomposed = getattr(program, "exported_program", None)
        self.made_from: dict[str, list[Any]] = {}
        self.decomposed_names: set[str] = set()
        if decomposed is not None:
            for node in decomposed.graph.nodes:
                self.decomposed_names.add(node.name)
                for origin in _origins(node):
                    self.made_from.setdefault(origin, []).append(node)

    def resolve(self, calls: dict[str, list[list[Any]]]) -> dict[str, list[ir.Value | None]]:
        return {
            path: [self.value(node) for nodes in per_call for node in nodes]
            for path, per_call in calls.items()
        }

    def value(self, node: Any) -> ir.Value | None:
        name = node.name if node is not None else None
        for _ in range(_NO_OP_HOPS):
            if name is None:
                return None
            made = self.made_from.get(name)
            if made:
                return self.values.get(self._result(made).name)
            if name in self.decomposed_names:  # kept as is (a graph input)
                return self.values.get(name)
            original = self.original.get(name)
            if original is None or original.op != "call_function":
                return self.values.get(name)
            # dropped by the decomposition (a no-op): its first tensor input stands for it
            first = next((a for a in original.args if isinstance(a, torch.fx.Node)), None)
            name = first.name if first is not None else None
        return None

    @staticmethod
    def _result(made: list[Any]) -> Any:
        """Of the nodes one node decomposed into, the last one read from outside them."""
        inside = set(made)
        leaving = [n for n in made if any(user not in inside for user in n.users)]
        return (leaving or made)[-1]
