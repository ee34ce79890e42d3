"""IR graph -> trainable `torch.fx.GraphModule` with native layers named after the source.

`TorchEmitter` is an `interop.emitter.Emitter` (its dispatch order, folding and weight
rule) that builds an fx graph instead of values: graph inputs become placeholders,
initializers parameters / buffers (``get_attr``, `emit_values.Deferred`), weighted ops
with constant weights native layers (``call_module``: nn.Linear, nn.ConvNd,
nn.BatchNormNd, nn.LayerNorm, nn.Embedding, nn.Dropout, nn.LSTM/GRU/RNN; the builders of
`EMIT_LAYERS` in emit_layers.py and emit_recurrent.py), hot simple ops one direct torch
call (`EMIT_CALLS`, emit_calls.py and emit_fusions.py) and every other node one
``call_function`` of its ONNX semantics on the torch backend. Nodes whose inputs are
all constants are evaluated once, here, and become buffers.

>>> module = to_torch_module(graph)               # doctest: +SKIP
>>> dict(module.named_parameters()).keys()         # doctest: +SKIP
dict_keys(['conv.weight', 'conv.bias', 'bn.weight', 'bn.bias', 'fc.weight', 'fc.bias'])
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import fx, nn

from interop import provenance
from interop.emitter import Emitter, Native, attribute_path, packed_sources
from interop.normalize import DEFAULT_DOMAINS
from interop.weights import is_mapped

# emit_calls, emit_layers and emit_recurrent register the builders
from . import EMIT_CALLS, EMIT_LAYERS, emit_calls, emit_layers, emit_recurrent  # noqa: F401
from .backend import torch_backend
from .emit_values import Deferred, materialize


class TorchEmitter(Emitter):
    """Builds the fx graph and the module tree of one emitted model."""

    adapter = "torch"
    layers = EMIT_LAYERS
    # a tied weight is one nn.Parameter held by every layer reading it as is
    shares_weights = True

    def __init__(self, source: Any, *, normalized: bool = False):
        super().__init__(source, torch_backend, normalized=normalized)
        self.root = nn.Module()
        self.fx_graph = fx.Graph()
        self.source_names: dict[str, str] = {}  # torch name -> source initializer name
        self.maybe_dead: list[fx.Node] = []  # nodes only a fusion may have left unused
        self.sym_sizes: dict[tuple[fx.Node, int], fx.Node] = {}  # emit_fusions' x.size(d)
        self.recurrent_stacks: dict[str, nn.Module] = {}  # source path -> multi-layer module
        self._attribute_names: set[str] = set()
        # initializer -> path of the one nn.Parameter holding it (a layer's or a plain one)
        self._parameters: dict[ir.Value, str] = {}
        self._counter = 0
        self._placed: dict[int, str] = {}  # id(native layer) -> its path

    # ------------------------------------------------------------------ building
    def build(self) -> fx.GraphModule:
        self.check()
        outputs = self.run(*[None] * len(self.graph.inputs))
        self.fx_graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        for dead in reversed(self.maybe_dead):  # e.g. a weight's Transpose read by F.linear now
            if not dead.users:  # (after the output node: an output has a reader)
                self.fx_graph.erase_node(dead)
        module = fx.GraphModule(self.root, self.fx_graph, class_name=_class_name(self.graph.name))
        module.input_names = [v.name for v in self.graph.inputs]
        module.output_names = [v.name for v in self.graph.outputs]
        module.source_names = dict(self.source_names)
        return module

    def input(self, value: ir.Value, given: Any) -> Any:
        return self.fx_graph.placeholder(_identifier(value.name or "input"))

    def static_handle(self, value: ir.Value, array: Any) -> Any:
        return Deferred(self, value, array)

    def weight_handle(self, value: ir.Value, kind: str) -> Any:
        return Deferred(self, value)

    def output(self, results: list[Any]) -> list[Any]:
        return [self.materialize(r) for r in results]

    def materialize(self, handle: Any) -> Any:
        """An fx node for a handle (a deferred initializer becomes a get_attr once)."""
        return materialize(handle)

    # ------------------------------------------------------------------ weights
    def weight(self, value: ir.Value | None, *, relaid: bool = False) -> Any:
        """`Emitter.weight` as a torch tensor: a tied weight becomes one nn.Parameter held by
        every layer that reads it as is (`register_layer`), so training moves it once for
        all, as the file means."""
        array = super().weight(value, relaid=relaid)
        return None if array is None else _host_tensor(array)

    def source_name(self, value: ir.Value) -> str:
        """A layer is named after the names its node reads: the TorchScript exporter reads
        one initializer of equal tensors through Identity nodes named after each layer's
        own parameter (``bn2.weight``), which is where that layer belongs."""
        return str(value.name)

    # ------------------------------------------------------------------ placement
    def register_layer(
        self,
        node: ir.Node,
        layer: nn.Module,
        sources: dict[str, ir.Value],
        preferred: str | None = None,
    ) -> str:
        """Place a native layer named after its weights' source (``blocks.0.conv``)."""
        placed = self._placed.get(id(layer))
        prefix = self.source_prefix(sources.values())
        matches = all(str(v.name).rsplit(".", 1)[-1] == attr for attr, v in sources.items())
        path = attribute_path(prefix) if matches and sources and prefix else ""
        if placed is not None:
            path = placed  # one module serving several nodes (the layers of an nn.LSTM)
        elif preferred and attribute_path(preferred) not in self._attribute_names:
            path = attribute_path(preferred)
        elif not path or path in self._attribute_names or self._occupied(path, sources):
            base = attribute_path(self.scope_name(node)).replace(".", "_")
            path = self._unique(base)
            while path in self._attribute_names or self._occupied(path, {}):
                self._counter += 1
                path = f"{base}_{self._counter}"
        self._attribute_names.add(path)
        for attr, value in sources.items():
            root = self.initializer_of(value) or value
            self.source_names[f"{path}.{attr}"] = _source_name(value, attr)
            tensor = getattr(layer, attr)
            if not isinstance(tensor, nn.Parameter):
                continue  # a buffer (running statistics): each layer updates its own copy
            tensor.requires_grad_(self.kind_of(root) != provenance.FROZEN)
            held = self._parameters.get(root)
            if held is None:
                if root not in self.relaid and _as_is(tensor, root):  # others may share it
                    self._parameters[root] = f"{path}.{attr}"
                continue
            existing = self.root.get_parameter(held) if held != f"{path}.{attr}" else tensor
            if existing.shape == tensor.shape and existing.dtype == tensor.dtype:
                setattr(layer, attr, existing)  # one Parameter for every reader of the weight
        if placed is None:
            _set_path(self.root, path, layer)
            self._placed[id(layer)] = path
        return path

    def _occupied(self, path: str, sources: dict[str, ir.Value]) -> bool:
        """Whether placing a layer at ``path`` would replace a module holding attributes a
        generic op registered first, other than the parameters this layer takes over."""
        try:
            module = self.root.get_submodule(path)
        except AttributeError:
            return False
        roots = {attr: self.initializer_of(v) for attr, v in sources.items()}
        return bool(module._buffers or module._modules) or any(
            roots.get(name) is None or self._parameters.get(roots[name]) != f"{path}.{name}"
            for name in module._parameters
        )

    def _inside_native_layer(self, path: str) -> bool:
        """Whether a path names an attribute of a placed layer (a Linear's `bias` slot that
        a Flax `query.bias`, added after the matmul's reshape, would overwrite)."""
        placed = set(self._placed.values())
        parts = path.split(".")
        return any(".".join(parts[:end]) in placed for end in range(1, len(parts)))

    def attribute(self, value: ir.Value, array: np.ndarray, kind: str | None) -> fx.Node:
        held = self._parameters.get(value)
        if held is not None:  # a weight a native layer holds, also read by a generic op
            return self.fx_graph.get_attr(held)
        path = attribute_path(value.name) if value.name else self._unique("_const")
        if path in self._attribute_names or self._inside_native_layer(path):
            path = self._unique(path.replace(".", "_"))
        self._attribute_names.add(path)
        tensor = _host_tensor(array if is_mapped(array) else np.array(array))
        if kind in (provenance.TRAINABLE, provenance.FROZEN) and tensor.is_floating_point():
            _set_path(
                self.root, path, nn.Parameter(tensor, requires_grad=kind == provenance.TRAINABLE)
            )
            if value.name in self.graph.initializers:
                self._parameters[value] = path  # a native layer reading it later shares it
        else:
            _set_path(
                self.root,
                path,
                tensor,
                persistent=kind is not None or value.name in self.graph.initializers,
            )
        if value.name:
            self.source_names[path] = value.name
        return self.fx_graph.get_attr(path)

    # ------------------------------------------------------------------ nodes
    def call_native(self, node: ir.Node, native: Native, args: list[Any]) -> Sequence[Any]:
        layer = native.layer
        path = self.register_layer(node, layer, native.sources, native.path)
        fx_args = tuple(self.materialize(args[i]) for i in native.data_inputs)
        call = self.fx_graph.call_module(path, fx_args, native.kwargs)
        if getattr(layer, "returns_node_outputs", False):  # a tuple of the node's outputs
            return [
                self.fx_graph.call_function(operator.getitem, (call, i))
                for i in range(len(node.outputs))
            ]
        return [call] + [None] * (len(node.outputs) - 1)

    def call_op(self, node: ir.Node, args: list[Any], captured: list[Any]) -> Sequence[Any]:
        """A direct torch call (`EMIT_CALLS`) where one fits, else the node's ONNX semantics
        as one closure on the torch backend."""
        direct = (
            EMIT_CALLS.get(node.op_type)
            if node.domain in DEFAULT_DOMAINS and not captured
            else None
        )
        if direct is not None and len(node.outputs) == 1:
            built = direct(self, node, args)
            if built is not None:
                function, fx_args, kwargs, *absorbs = built
                if function is None:  # the node is its input (Identity)
                    return [fx_args[0]]
                fx_args = tuple(self.materialize(a) for a in fx_args)
                call = self.fx_graph.create_node(
                    "call_function", function, fx_args, kwargs, name=_node_name(node)
                )
                for add in absorbs[0] if absorbs else ():
                    self.fused[add] = [call]
                return [call]
        function = self.op_function(node, single=True)
        fx_args = tuple(self.materialize(a) for a in [*args, *captured])
        call = self.fx_graph.create_node("call_function", function, fx_args, name=_node_name(node))
        if len(node.outputs) == 1:
            return [call]
        return [
            self.fx_graph.call_function(operator.getitem, (call, i))
            for i in range(len(node.outputs))
        ]

    def _unique(self, base: str) -> str:
        self._counter += 1
        return f"{base}_{self._counter}" if base in self._attribute_names or not base else base


def _host_tensor(array: np.ndarray) -> torch.Tensor:
    """A weight array as a torch tensor sharing its memory (a mapped bfloat16 weight too,
    through its bits: the backend's conversion would copy it)."""
    if array.dtype.name == "bfloat16" and array.flags.writeable:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch_backend.asarray(array)


def _as_is(tensor: torch.Tensor, value: ir.Value) -> bool:
    """A layer's tensor has the initializer's shape and dtype (not a transposed, cast copy)."""
    const = value.const_value
    return (
        tuple(tensor.shape) == tuple(const.shape)
        and tensor.dtype == torch_backend.asarray(np.zeros(0, const.dtype.numpy())).dtype
    )


def _source_name(value: ir.Value, attribute: str) -> str:
    """The source parameter behind a layer attribute (a packed weight names its sources)."""
    exact = [n for n in packed_sources(value) if n.rsplit(".", 1)[-1] == attribute]
    return exact[0] if len(exact) == 1 else str(value.name)


def _set_path(root: nn.Module, path: str, obj: Any, persistent: bool = True) -> None:
    *parents, leaf = path.split(".")
    module = root
    for part in parents:
        child = getattr(module, part, None) if part in module._modules else None
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if isinstance(obj, nn.Module):
        module.add_module(leaf, obj)
    elif isinstance(obj, nn.Parameter):
        module.register_parameter(leaf, obj)
    else:
        module.register_buffer(leaf, obj, persistent=persistent)


def _node_name(node: ir.Node) -> str:
    output = node.outputs[0].name if node.outputs else ""
    return _identifier(output or node.op_type.lower())


def _identifier(name: str) -> str:
    cleaned = re.sub(r"\W", "_", name)
    return cleaned if cleaned[:1].isalpha() or cleaned[:1] == "_" else f"v_{cleaned}"


def _class_name(name: str) -> str:
    cleaned = re.sub(r"\W", "_", name or "Emitted")
    return cleaned if cleaned[:1].isalpha() else f"Emitted_{cleaned}"


def to_torch_module(source: Any, *, normalized: bool = False) -> fx.GraphModule:
    """Emit a graph as a trainable torch.fx.GraphModule (called by `interop.to_torch`)."""
    # inference mode, as the captured graph computes (and as to_flax/to_keras start):
    # BatchNorm reads its running statistics and leaves them alone until .train()
    return TorchEmitter(source, normalized=normalized).build().eval()
