"""IR graph -> trainable `torch.fx.GraphModule` with native layers named after the source.

The emit loop is `interop.interpret.Interpreter`; `TorchEmitter` overrides its steps to
build an fx graph instead of values: graph inputs become placeholders, initializers
become parameters / buffers (``get_attr``), weighted ops with constant weights become
native layers (``call_module``: nn.Linear, nn.ConvNd, nn.BatchNormNd, nn.LayerNorm,
nn.Embedding, nn.Dropout) and every other node one ``call_function`` of its ONNX
semantics on the torch backend. Nodes whose inputs are all constants are evaluated once,
here, and become buffers.

>>> module = to_torch_module(graph)               # doctest: +SKIP
>>> dict(module.named_parameters()).keys()         # doctest: +SKIP
dict_keys(['conv.weight', 'conv.bias', 'bn.weight', 'bn.bias', 'fc.weight', 'fc.bias'])
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import fx, nn

from interop import provenance
from interop.interpret import (
    RANDOM_OPS,
    Interpreter,
    fold_on_host,
    node_free_values,
)
from interop.normalize import check_supported
from interop.packing import PACKED_FROM
from interop.registry import Registry

from .backend import torch_backend

# op type -> function(emitter, node) returning a native layer and its parameter names, or None
LAYERS: Registry[Callable[..., Any]] = Registry("emit", adapter="torch layers")
# op type -> function(emitter, node, handles) returning (torch callable, args, kwargs) or None:
# a direct torch call for a node whose attributes and dtypes allow one. The generic op is a
# Python closure that re-dispatches through the backend on every forward (and creates its
# scalar constants each time), which dominates small-batch forwards.
CALLS: Registry[Callable[..., Any]] = Registry("emit", adapter="torch calls")


def _attribute_path(name: str) -> str:
    """A source name as a dotted attribute path torch accepts (``onnx::Conv_3`` -> ``onnx__Conv_3``)."""
    parts = [re.sub(r"\W", "_", part) or "_" for part in name.split(".")]
    return ".".join(parts)


class TorchEmitter(Interpreter):
    """Builds the fx graph and the module tree of one emitted model."""

    adapter = "torch"

    def __init__(self, source: Any, *, normalized: bool = False):
        super().__init__(source, torch_backend, normalized=normalized)
        self.root = nn.Module()
        self.fx_graph = fx.Graph()
        self.source_names: dict[str, str] = {}  # torch name -> source initializer name
        self.static: dict[ir.Value, np.ndarray] = {}  # constants known at emission time
        self._attribute_names: set[str] = set()
        # initializer -> path of the one nn.Parameter holding it (a layer's or a plain one)
        self._parameters: dict[ir.Value, str] = {}
        self._relaid: set[ir.Value] = set()  # initializers a layer holds transposed / reordered
        # bias Adds folded into the MatMul before them: Add node -> the fx node that replaces it
        self.fused: dict[ir.Node, Any] = {}
        self.absorbed: dict[ir.Node, list[ir.Node]] = {}  # MatMul node -> Add nodes it absorbs
        self._maybe_dead: list[fx.Node] = []  # nodes only a fusion may have left unused
        self._counter = 0
        self._placed: dict[int, str] = {}  # id(native layer) -> its path
        self.recurrent_stacks: dict[str, nn.Module] = {}  # source path -> multi-layer module

    # ------------------------------------------------------------------ building
    def build(self) -> fx.GraphModule:
        check_supported(self.graph, self.version, self.adapter)
        outputs = self.run(*[None] * len(self.graph.inputs))
        self.fx_graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        for dead in reversed(self._maybe_dead):  # e.g. a weight's Transpose read by F.linear now
            if not dead.users:  # (after the output node: an output has a reader)
                self.fx_graph.erase_node(dead)
        module = fx.GraphModule(self.root, self.fx_graph, class_name=_class_name(self.graph.name))
        module.input_names = [v.name for v in self.graph.inputs]
        module.output_names = [v.name for v in self.graph.outputs]
        module.source_names = dict(self.source_names)
        return module

    def input(self, value: ir.Value, given: Any) -> Any:
        return self.fx_graph.placeholder(_identifier(value.name or "input"))

    def constant(self, value: ir.Value) -> Any:
        kind = self.kind_of(value)
        array = value.const_value.numpy()
        if kind is None:  # a constant of the graph: folding may use it
            self.static[value] = array
        return _Deferred(self, value)

    def output(self, results: list[Any]) -> list[Any]:
        return [self.materialize(r) for r in results]

    # ------------------------------------------------------------------ weights
    def weight(self, value: ir.Value | None, *, shared: bool = True) -> torch.Tensor | None:
        """The initializer behind an input, if it may become a native layer's parameter.

        Exporters share one initializer between several nodes: torch.onnx's TorchScript
        exporter keeps one copy of equal tensors (every freshly initialised BatchNorm's ones
        and zeros) and reads it through Identity nodes. Such a weight becomes one
        nn.Parameter held by every layer that reads it as is (`register_layer`), so
        training moves it once for all, as the file means. ``shared=False`` is for a
        builder that transposes or reorders the tensor: then a second reader could not
        hold the same Parameter, and the node stays generic.
        """
        root = self.initializer_of(value)
        if root is None or self.kind_of(root) is None or root in self.graph.inputs:
            return None
        if not shared:
            if self._readers(root) != 1:
                return None
            self._relaid.add(root)  # the layer's tensor is not the initializer as is
        return torch.from_numpy(np.array(root.const_value.numpy()))

    def initializer_of(self, value: ir.Value | None) -> ir.Value | None:
        """The initializer a value is, directly or through Identity nodes; else None."""
        while value is not None and value.name not in self.graph.initializers:
            producer = value.producer()
            if (
                producer is None
                or producer.op_type != "Identity"
                or producer.domain not in ("", "ai.onnx")
            ):
                return None
            value = producer.inputs[0]
        return value if value is not None and value.const_value is not None else None

    def _readers(self, value: ir.Value) -> int:
        """Nodes reading a value's data, through Identity; reading a weight's shape (Shape /
        Size, folded away) does not share the weight."""
        count = int(value.is_graph_output())
        for use in value.uses():
            node = use.node
            if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
                count += self._readers(node.outputs[0])
            elif node.op_type not in ("Shape", "Size"):
                count += 1
        return count

    def register_layer(
        self,
        node: ir.Node,
        layer: nn.Module,
        sources: dict[str, ir.Value],
        preferred: str | None = None,
    ) -> str:
        """Place a native layer named after its weights' source (``blocks.0.conv``)."""
        placed = self._placed.get(id(layer))
        prefixes = {
            name.rsplit(".", 1)[0] if "." in name else ""
            for name in (v.name for v in sources.values())
        }
        matches = len(prefixes) == 1 and all(
            v.name.rsplit(".", 1)[-1] == attr for attr, v in sources.items()
        )
        path = _attribute_path(prefixes.pop()) if matches and "" not in prefixes else ""
        if placed is not None:
            path = placed  # one module serving several nodes (the layers of an nn.LSTM)
        elif preferred and _attribute_path(preferred) not in self._attribute_names:
            path = _attribute_path(preferred)
        elif not path or path in self._attribute_names or self._occupied(path, sources):
            scope = provenance.node_scope(node) or node.op_type.lower()
            base = _attribute_path(scope).replace(".", "_")
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
                if root not in self._relaid and _as_is(tensor, root):  # others may share it
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

    def materialize(self, handle: Any) -> Any:
        """An fx node for a handle (a deferred initializer becomes a get_attr once)."""
        return handle.node() if isinstance(handle, _Deferred) else handle

    def attribute(self, value: ir.Value, array: np.ndarray, kind: str | None) -> fx.Node:
        held = self._parameters.get(value)
        if held is not None:  # a weight a native layer holds, also read by a generic op
            return self.fx_graph.get_attr(held)
        path = _attribute_path(value.name) if value.name else self._unique("_const")
        if path in self._attribute_names or self._inside_native_layer(path):
            path = self._unique(path.replace(".", "_"))
        self._attribute_names.add(path)
        tensor = torch_backend.asarray(np.array(array))
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
    def run_node(
        self, node: ir.Node, args: list[Any], env: Any, caller: Any = None
    ) -> Sequence[Any]:
        if node in self.fused:
            return [self.fused.pop(node)]
        folded = self.fold(node)
        if folded is not None:
            return folded
        layer_builder = LAYERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if layer_builder is not None:
            built = layer_builder(self, node)
            if built is not None:
                layer, sources, data_inputs, *more = built
                # optional: a preferred path and call kwargs (a layer of a multi-layer module)
                options = more[0] if more else {}
                path = self.register_layer(node, layer, sources, options.get("path"))
                fx_args = tuple(self.materialize(args[i]) for i in data_inputs)
                call = self.fx_graph.call_module(path, fx_args, options.get("kwargs"))
                for add in self.absorbed.pop(node, []):
                    self.fused[add] = call
                if getattr(layer, "returns_node_outputs", False):  # a tuple of the node's outputs
                    return [
                        self.fx_graph.call_function(operator.getitem, (call, i))
                        for i in range(len(node.outputs))
                    ]
                return [call] + [None] * (len(node.outputs) - 1)
        captured = [env[v] for v in node_free_values(node)]
        direct = (
            CALLS.get(node.op_type) if node.domain in ("", "ai.onnx") and not captured else None
        )
        if direct is not None and len(node.outputs) == 1:
            built = direct(self, node, args, env)
            if built is not None:
                function, fx_args, kwargs = built
                if function is None:  # the node is its input (Identity)
                    return [fx_args[0]]
                fx_args = tuple(self.materialize(a) for a in fx_args)
                call = self.fx_graph.create_node(
                    "call_function", function, fx_args, kwargs, name=_node_name(node)
                )
                for add in self.absorbed.pop(node, []):
                    self.fused[add] = call
                return [call]
        return self.call_op(node, args, captured)

    def fold(self, node: ir.Node) -> list[Any] | None:
        """Evaluate a node of constants once, now; None when it depends on run-time values."""
        if (
            node.op_type in RANDOM_OPS
            or node_free_values(node)
            or any(
                a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                for a in node.attributes.values()
            )
        ):
            return None
        inputs = [None if v is None else self.static.get(v) for v in node.inputs]
        if (
            node.op_type in ("Shape", "Size")
            and inputs[0] is None
            and node.inputs[0].const_value is not None
        ):
            inputs[0] = node.inputs[0].const_value.numpy()  # a weight's shape is known now
        if (
            node.op_type == "CastLike"
            and inputs[0] is not None
            and inputs[1] is None
            and node.inputs[1].dtype
        ):
            inputs[1] = np.zeros(0, node.inputs[1].dtype.numpy())  # only the target's dtype matters
        if any(a is None and v is not None for a, v in zip(inputs, node.inputs, strict=True)):
            return None
        results = fold_on_host(self.graph, self.version, node, inputs)
        if results is None:
            return None
        self.static.update(zip(node.outputs, results))
        return [_Deferred(self, value, result) for value, result in zip(node.outputs, results)]

    def call_op(self, node: ir.Node, args: list[Any], captured: list[Any]) -> Sequence[Any]:
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


class _Deferred:
    """An initializer or folded constant, registered on the module only if a generic op reads it."""

    def __init__(self, emitter: TorchEmitter, value: ir.Value, array: np.ndarray | None = None):
        self.emitter, self.value, self.array = emitter, value, array
        self._node: fx.Node | None = None

    def node(self) -> fx.Node:
        if self._node is None:
            array = self.array if self.array is not None else self.value.const_value.numpy()
            kind = self.emitter.kind_of(self.value) if self.array is None else None
            self._node = self.emitter.attribute(self.value, array, kind)
        return self._node


def _as_is(tensor: torch.Tensor, value: ir.Value) -> bool:
    """A layer's tensor has the initializer's shape and dtype (not a transposed, cast copy)."""
    const = value.const_value
    return (
        tuple(tensor.shape) == tuple(const.shape)
        and tensor.dtype == torch.from_numpy(np.zeros(0, const.dtype.numpy())).dtype
    )


def _source_name(value: ir.Value, attribute: str) -> str:
    """The source parameter behind a layer attribute (a packed weight names its sources)."""
    packed = value.metadata_props.get(PACKED_FROM)
    if packed:
        exact = [n for n in json.loads(packed) if n.rsplit(".", 1)[-1] == attribute]
        if len(exact) == 1:
            return exact[0]
    return str(value.name)


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


from . import direct_calls, native_layers  # noqa: E402,F401  (registers the builders)
