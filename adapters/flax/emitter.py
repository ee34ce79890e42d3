"""IR graph -> trainable `flax.nnx.Module` whose ``__call__`` runs the graph with JAX.

`FlaxEmitter` is the core `interop.emitter.Emitter` (dispatch, folding, the weight rule,
placement by source prefix) recording a *program* once, at emission (emit_program.py):
graph inputs become slots, initializers become nnx variables named after their source
(`blocks.0.conv.weight` -> attribute `blocks` > `0` > `conv`), weighted ops with constant
weights become nnx layers (`EMIT_LAYERS`: emit_layers.py, emit_recurrent.py) and every
other node one call of its ONNX semantics on the JAX backend. Nodes whose inputs are all
constants are evaluated here, with numpy, and stay numpy constants of the program, so
shape-like values are static under ``jax.jit``. If/Loop/Scan become ``jax.lax.cond`` /
``while_loop`` / ``scan`` when their operands are traced (emit_control.py).

>>> module = to_flax_module(graph)                        # doctest: +SKIP
>>> sorted(module.source_names)[:2]                        # doctest: +SKIP
['blocks.0.bn.bias', 'blocks.0.bn.mean']
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
import onnx_ir as ir
from flax import nnx

from interop import provenance
from interop.emitter import Emitter, Native, attribute_path
from interop.normalize import DEFAULT_DOMAINS

from . import EMIT_LAYERS, emit_layers, emit_recurrent  # noqa: F401  (register the builders)
from .backend import jax_backend
from .emit_control import control_function
from .emit_layers import owned
from .emit_program import SLOT, STATIC, VARIABLE, FlaxModule, Frozen, Program, lookup, set_path

__all__ = ["FlaxEmitter", "FlaxModule", "Frozen", "Program", "to_flax_module"]


class _Slot:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


class _Static:
    """A constant known at emission (initializer that is no weight, or a folded node)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _Weight:
    """A source weight; becomes an nnx variable only if a generic op reads it."""

    __slots__ = ("value", "path")

    def __init__(self, value: ir.Value):
        self.value, self.path = value, None


class _Deferred:
    """A node over a weight that a native layer may take over (a Transpose of a weight that a
    MatMul holds as its kernel): recorded only if a generic op reads its output, so the
    weight does not become a variable next to the layer's copy."""

    __slots__ = ("node", "args", "slot")

    def __init__(self, node: ir.Node, args: list[Any]):
        self.node, self.args, self.slot = node, args, None


def _call_layer(layer: Any, *inputs: Any) -> Any:
    return layer(*inputs)


class FlaxEmitter(Emitter):
    """Records the program and builds the module tree of one emitted model."""

    adapter = "flax"
    layers = EMIT_LAYERS
    # torch's Linear is MatMul(x, Transpose(W)): the nnx.Linear holds W^T as its [in, out]
    # kernel (as for Gemm with transB), and the Transpose is recorded only if a generic op
    # reads it (`_Deferred`): one copy of the weight, no transposed copy per call
    weights_through_transpose = True

    def __init__(self, source: Any, *, rngs: nnx.Rngs | None = None, normalized: bool = False):
        super().__init__(source, jax_backend, normalized=normalized)
        self.rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.program = Program()
        self.module = FlaxModule(
            self.program, [v.name for v in self.graph.inputs], [v.name for v in self.graph.outputs]
        )
        self._names: set[str] = set()
        self._counter = 0

    def build(self) -> FlaxModule:
        self.check()
        self.program.outputs = [self.spec(h) for h in self.run(*[None] * len(self.graph.inputs))]
        # no module.eval() walk (~0.15 s on a ResNet50): the native layers are built in eval
        # mode (BatchNorm use_running_average=True, Dropout deterministic=True)
        return self.module

    # ------------------------------------------------------------------ steps of the loop
    def input(self, value: ir.Value, given: Any) -> Any:
        slot = self.new_slot()
        self.program.inputs.append((value.name, slot.index))
        return slot

    def static_handle(self, value: ir.Value, array: Any) -> Any:
        return _Static(array)

    def weight_handle(self, value: ir.Value, kind: str) -> Any:
        return _Weight(value)

    def rewrite(self, node: ir.Node, args: list[Any], env: Any) -> Sequence[Any] | None:
        # an Identity of a weight is the weight: a native layer may hold it (the core's
        # weight rule follows Identity), and a generic op reading it makes one variable
        if node.op_type == "Identity" and node.domain in DEFAULT_DOMAINS:
            if args and isinstance(args[0], _Weight):
                return [args[0]]
        if node.op_type == "Transpose" and node.domain in DEFAULT_DOMAINS:
            if args and isinstance(args[0], _Weight):
                return [_Deferred(node, args)]
        return None

    def call_native(self, node: ir.Node, native: Native, args: list[Any]) -> Sequence[Any]:
        path = self.place_layer(node, native)
        outs = [self.new_slot() for _ in range(native.outputs)]
        specs = [self.spec(args[i] if i < len(args) else None) for i in native.data_inputs]
        call = native.call or _call_layer
        if native.kwargs:
            call = partial(call, **native.kwargs)
        self.program.steps.append((path, call, specs, [o.index for o in outs]))
        return [*outs, *[None] * (len(node.outputs) - len(outs))]

    def call_op(self, node: ir.Node, args: list[Any], captured: list[Any]) -> Sequence[Any]:
        function = control_function(self, node) or self.op_function(node)
        outs = [self.new_slot() for _ in node.outputs]
        specs = [self.spec(a) for a in [*args, *captured]]
        self.program.steps.append((None, function, specs, [o.index for o in outs]))
        return outs

    # ------------------------------------------------------------------ values
    def new_slot(self) -> _Slot:
        self.program.slots += 1
        return _Slot(self.program.slots - 1)

    def spec(self, handle: Any) -> Any:
        if handle is None:
            return None
        if isinstance(handle, _Slot):
            return (SLOT, handle.index)
        if isinstance(handle, _Static):
            return (STATIC, handle.array)
        if isinstance(handle, _Deferred):
            if handle.slot is None:  # a generic op reads it: the node is recorded now
                handle.slot = self.call_op(handle.node, handle.args, [])[0]
            return (SLOT, handle.slot.index)
        if handle.path is None:  # a weight read by a generic op: an nnx variable now
            handle.path = self.variable(handle.value)
        return (VARIABLE, handle.path)

    def variable_class(self, value: ir.Value) -> type:
        kind = self.kind_of(value)
        floating = value.const_value.dtype.is_floating_point()
        if kind == provenance.TRAINABLE and floating:
            return nnx.Param
        if kind == provenance.FROZEN and floating:
            return Frozen
        return nnx.BatchStat

    def variable(self, value: ir.Value) -> str:
        cls = self.variable_class(value)
        path = self.unique_path(attribute_path(value.name) if value.name else "_weight")
        set_path(self.module, path, cls(jax.device_put(owned(self.weight_array(value)))))
        self.module.source_names[path] = value.name
        return path

    def unique_path(self, path: str) -> str:
        for taken in sorted(self._names, key=len):
            if path.startswith(taken + "."):  # never inside a layer or variable placed before
                path = taken + "_" + path[len(taken) + 1 :].replace(".", "_")
        while path in self._names or any(n.startswith(path + ".") for n in self._names):
            self._counter += 1
            path = f"{path}_{self._counter}"
        self._names.add(path)
        return path

    # ------------------------------------------------------------------ placement
    def place_layer(self, node: ir.Node, native: Native) -> str:
        """Place a native layer at its weights' common source prefix (``blocks.0.conv``)."""
        prefix = native.path or self.source_prefix(native.sources.values())
        path = attribute_path(prefix) if prefix else ""
        if not path or path in self._names:
            path = attribute_path(self.scope_name(node)).replace(".", "_")
        path = self.unique_path(path)
        names = native.names or {}
        for attribute, value in native.sources.items():  # attribute: a dotted path in the layer
            owner_path, _, leaf = attribute.rpartition(".")
            owner = lookup(native.layer, owner_path) if owner_path else native.layer
            variable = getattr(owner, leaf)
            source = self.initializer_of(value) or value
            if self.kind_of(source) == provenance.FROZEN and isinstance(variable, nnx.Param):
                setattr(owner, leaf, Frozen(variable[...]))
            name = names.get(attribute, self.source_name(value))
            self.module.source_names[f"{path}.{attribute}"] = name
        set_path(self.module, path, native.layer)
        return path


def to_flax_module(
    source: Any, *, rngs: nnx.Rngs | None = None, normalized: bool = False
) -> FlaxModule:
    """Emit a graph as a trainable flax.nnx.Module (called by `interop.to_flax`)."""
    return FlaxEmitter(source, rngs=rngs, normalized=normalized).build()
