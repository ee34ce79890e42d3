"""IR graph -> trainable `flax.nnx.Module` whose ``__call__`` runs the graph with JAX.

The emit loop is `interop.interpret.Interpreter`; `FlaxEmitter` overrides its steps to
record a *program* once, at emission: graph inputs become slots, initializers become
nnx variables named after their source (`blocks.0.conv.weight` -> attribute `blocks` >
`0` > `conv`), weighted ops with constant weights become nnx layers (nnx.Linear,
nnx.Conv, nnx.ConvTranspose, nnx.BatchNorm, nnx.LayerNorm, nnx.Embed, nnx.Dropout,
nnx.RNN over Flax's LSTM/GRU/simple cells) and
every other node one call of its ONNX semantics on the JAX backend. Nodes whose inputs
are all constants are evaluated here, with numpy, and stay numpy constants of the
program, so shape-like values are static under ``jax.jit``. If/Loop/Scan become
``jax.lax.cond`` / ``while_loop`` / ``scan`` when their operands are traced.

>>> module = to_flax_module(graph)                        # doctest: +SKIP
>>> sorted(module.source_names)[:2]                        # doctest: +SKIP
['blocks.0.bn.bias', 'blocks.0.bn.mean']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
from flax import nnx
from jax import lax

from interop import provenance
from interop.emitter import loop_condition_holds
from interop.interpret import (
    RANDOM_OPS,
    Interpreter,
    SubgraphFunction,
    fold_on_host,
    node_free_values,
)
from interop.normalize import check_supported
from interop.registry import Registry

from .backend import jax_backend

# op type -> builder(emitter, node) returning a `native_layers.Native` or None
LAYERS: Registry[Callable[..., Any]] = Registry("emit", adapter="flax layers")
_SLOT, _STATIC, _VARIABLE = 0, 1, 2


class Frozen(nnx.Variable):
    """A source parameter marked non-trainable: in the state, not in ``nnx.Param``."""


class Scope(nnx.Module):
    """A node of the module tree (``blocks``, ``blocks.0``) holding layers and variables."""


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


def _is_tracer(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_is_tracer(v) for v in value)
    return isinstance(value, jax.core.Tracer)


def _lookup(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


class Program:
    """The emitted graph as a list of steps over slots; run by `FlaxModule.__call__`."""

    def __init__(self) -> None:
        self.steps: list[tuple[Any, ...]] = []
        self.inputs: list[tuple[str, int]] = []
        self.outputs: list[Any] = []
        self.slots = 0

    def run(self, module: Any, inputs: Sequence[Any], named: dict[str, Any]) -> Any:
        env: list[Any] = [None] * self.slots
        for index, (name, slot) in enumerate(self.inputs):
            given = named[name] if name in named else inputs[index]
            env[slot] = _as_jax(given)

        def resolve(spec: Any) -> Any:
            if spec is None:
                return None
            kind, payload = spec
            if kind == _SLOT:
                return env[payload]
            if kind == _STATIC:
                return payload
            return _lookup(module, payload)[...]

        for layer_path, function, args, outs in self.steps:
            values = [resolve(a) for a in args]
            if layer_path is None:
                results = function(*values)
            else:
                results = function(_lookup(module, layer_path), *values)
                results = results if len(outs) > 1 else (results,)
            for slot, result in zip(outs, results):
                if slot is not None:
                    env[slot] = result
        outputs = [_as_jax(resolve(spec)) for spec in self.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _as_jax(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_as_jax(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return value  # strings have no JAX type; the semantics run them on the host (numpy)
    return jnp.asarray(value)


class FlaxModule(nnx.Module):
    """An emitted graph: nnx layers and variables under their source names, run by a program.

    ``module.train()`` / ``module.eval()`` switch BatchNorm (batch statistics and running
    updates) and Dropout; emitted modules start in eval mode, which reproduces ONNX.
    """

    def __init__(self, program: Program, input_names: list[str], output_names: list[str]):
        self._program = program
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.source_names: dict[str, str] = {}  # state path (dots) -> source initializer

    def __call__(self, *inputs: Any, **named: Any) -> Any:
        return self._program.run(self, inputs, named)


class FlaxEmitter(Interpreter):
    """Records the program and builds the module tree of one emitted model."""

    adapter = "flax"

    def __init__(self, source: Any, *, rngs: nnx.Rngs | None = None, normalized: bool = False):
        super().__init__(source, jax_backend, normalized=normalized)
        self.rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.program = Program()
        self.module = FlaxModule(
            self.program, [v.name for v in self.graph.inputs], [v.name for v in self.graph.outputs]
        )
        self.statics: dict[ir.Value, np.ndarray] = {}  # values known at emission
        self.fused: dict[ir.Node, list[Any]] = {}  # bias Add -> the layer output it is
        self._names: set[str] = set()
        self._counter = 0

    def build(self) -> FlaxModule:
        check_supported(self.graph, self.version, self.adapter)
        self.program.outputs = [self.spec(h) for h in self.run(*[None] * len(self.graph.inputs))]
        # no module.eval() walk (~0.15 s on a ResNet50): the native layers are built in eval
        # mode (BatchNorm use_running_average=True, Dropout deterministic=True)
        return self.module

    # ------------------------------------------------------------------ steps of the loop
    def input(self, value: ir.Value, given: Any) -> Any:
        slot = self.new_slot()
        self.program.inputs.append((value.name, slot.index))
        return slot

    def constant(self, value: ir.Value) -> Any:
        if self.kind_of(value) is None:
            self.statics[value] = value.const_value.numpy()
            return _Static(self.statics[value])
        return _Weight(value)

    def run_node(self, node: ir.Node, args: list[Any], env: Any, caller: Any = None) -> Any:
        if node in self.fused:  # an Add of a bias that the layer before it holds
            return self.fused.pop(node)
        folded = self.fold(node, args)
        if folded is not None:
            return folded
        builder = LAYERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        native = builder(self, node) if builder is not None else None
        if native is not None:
            path = self.place_layer(node, native)
            outs = [self.new_slot() for _ in range(native.outputs)]
            outs += [None] * (len(node.outputs) - len(outs))
            specs = [self.spec(args[i] if i < len(args) else None) for i in native.data_inputs]
            self.program.steps.append(
                (path, native.call, specs, [o.index for o in outs[: native.outputs]])
            )
            if native.absorbs is not None:
                self.fused[native.absorbs] = outs[:1]
            return outs
        captured = [env[v] for v in node_free_values(node)]
        return self.call_op(node, args, captured)

    def call_op(self, node: ir.Node, args: list[Any], captured: list[Any]) -> Sequence[Any]:
        function = self.control_function(node) or self.op_function(node)
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
            return (_SLOT, handle.index)
        if isinstance(handle, _Static):
            return (_STATIC, handle.array)
        if handle.path is None:  # a weight read by a generic op: an nnx variable now
            handle.path = self.variable(handle.value)
        return (_VARIABLE, handle.path)

    def weight(self, value: ir.Value | None) -> np.ndarray | None:
        """The initializer behind an input, if it may become a native layer's variable."""
        if value is None or value.const_value is None or value.name not in self.graph.initializers:
            return None
        readers = [use for use in value.uses() if use.node.op_type not in ("Shape", "Size")]
        if self.kind_of(value) is None or len(readers) != 1 or value in self.graph.inputs:
            return None  # a tied weight stays one variable, read by generic ops
        return np.array(value.const_value.numpy())

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
        path = self.unique_path(_attribute_path(value.name) if value.name else "_weight")
        _set_path(self.module, path, cls(jax.device_put(value.const_value.numpy())))
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

    def place_layer(self, node: ir.Node, native: Any) -> str:
        """Place a native layer at its weights' common source prefix (``blocks.0.conv``)."""
        names = [v.name for v in native.sources.values()]
        prefixes = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
        prefix = prefixes.pop() if len(prefixes) == 1 and names else ""
        path = _attribute_path(native.path or prefix) if native.path or prefix else ""
        if not path or path in self._names:
            scope = provenance.node_scope(node) or node.op_type.lower()
            path = _attribute_path(scope).replace(".", "_")
        path = self.unique_path(path)
        for attribute, value in native.sources.items():  # attribute: a dotted path in the layer
            owner_path, _, leaf = attribute.rpartition(".")
            owner = _lookup(native.layer, owner_path) if owner_path else native.layer
            variable = getattr(owner, leaf)
            if self.kind_of(value) == provenance.FROZEN and isinstance(variable, nnx.Param):
                setattr(owner, leaf, Frozen(variable[...]))
            names = native.names or {}
            self.module.source_names[f"{path}.{attribute}"] = names.get(attribute, value.name)
        _set_path(self.module, path, native.layer)
        return path

    # ------------------------------------------------------------------ folding
    def fold(self, node: ir.Node, args: list[Any]) -> list[Any] | None:
        """Evaluate a node of constants once, now; None when it depends on run-time values."""
        if node.op_type in RANDOM_OPS or node_free_values(node):
            return None
        if any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            return None
        inputs = [a.array if isinstance(a, _Static) else None for a in args]
        first = node.inputs[0] if node.inputs else None
        if node.op_type in ("Shape", "Size") and isinstance(args[0], _Weight):
            inputs[0] = first.const_value.numpy()  # a weight's shape is known now
        if (
            node.op_type == "CastLike"
            and inputs[0] is not None
            and inputs[1] is None
            and node.inputs[1].dtype
        ):
            inputs[1] = np.zeros(0, node.inputs[1].dtype.numpy())  # only the dtype matters
        if any(a is None and v is not None for a, v in zip(inputs, node.inputs)):
            return None
        results = fold_on_host(self.graph, self.version, node, inputs)
        if results is None:
            return None
        self.statics.update(zip(node.outputs, results))
        return [_Static(r) for r in results]

    # ------------------------------------------------------------------ control flow
    def control_function(self, node: ir.Node) -> Callable[..., Any] | None:
        """If/Loop/Scan as jax.lax control flow when their operands are traced (under jit)."""
        if node.op_type not in ("If", "Loop", "Scan") or node.domain not in ("", "ai.onnx"):
            return None
        eager = self.op_function(node)
        values, graphs = self.attributes(node)
        outer, count = node_free_values(node), len(node.inputs)
        backend, version = self.backend, self.version

        def bodies(args: Sequence[Any]) -> dict[str, SubgraphFunction]:
            scope = dict(zip(outer, args[count:]))
            return {n: SubgraphFunction(g, backend, scope, version) for n, g in graphs.items()}

        if node.op_type == "If":

            def run_if(*args: Any) -> tuple:
                if not _is_tracer(args[0]):
                    return eager(*args)
                branch = bodies(args)
                then_fn = lambda: tuple(_as_jax(v) for v in branch["then_branch"]())  # noqa: E731
                else_fn = lambda: tuple(_as_jax(v) for v in branch["else_branch"]())  # noqa: E731
                return tuple(lax.cond(jnp.reshape(args[0], ()).astype(bool), then_fn, else_fn))

            return run_if
        if node.op_type == "Loop":
            return _loop_function(eager, bodies, count, loop_condition_holds(graphs["body"]))
        return _scan_function(eager, bodies, count, values)


def _loop_function(eager: Callable, bodies: Callable, count: int, full: bool) -> Callable:
    def run_loop(*args: Any) -> tuple:
        # a Loop may omit its trailing optional inputs (no condition, nothing carried)
        trip, condition, *initial = (*args[:count], None, None)[: max(count, 2)]
        body = bodies(args)["body"]
        if not _is_tracer(args):
            return eager(*args)
        if body.num_outputs - 1 != len(initial):
            # scan outputs: a fixed-length lax.scan when the loop runs its whole (static)
            # trip count; otherwise their length would be dynamic, and Python loops
            if not full or trip is None or _is_tracer(trip) or _is_tracer(condition):
                return eager(*args)
            if condition is not None and not bool(np.asarray(condition).reshape(())):
                return eager(*args)  # runs no iteration
            return _scan_loop(body, int(np.asarray(trip).reshape(())), initial)
        state = tuple(_as_jax(s) for s in initial)
        keep = jnp.asarray(True) if condition is None else jnp.reshape(condition, ()).astype(bool)

        def more(carry: tuple) -> Any:
            i, going, _ = carry
            return going if trip is None else going & (i < jnp.reshape(trip, ()).astype(i.dtype))

        def step(carry: tuple) -> tuple:
            i, going, current = carry
            outputs = body(i, going, *current)
            new = tuple(jnp.asarray(o).astype(c.dtype) for o, c in zip(outputs[1:], current))
            return i + 1, jnp.reshape(outputs[0], ()).astype(bool), new

        start = jnp.asarray(0, jnp.asarray(np.int64(0)).dtype)
        return tuple(lax.while_loop(more, step, (start, keep, state))[2])

    return run_loop


def _scan_loop(body: Callable, length: int, initial: Sequence[Any]) -> tuple:
    """A Loop that runs its whole trip count, with scan outputs, as one lax.scan."""
    state = tuple(_as_jax(s) for s in initial)
    counter = jnp.arange(length, dtype=jnp.asarray(np.int64(0)).dtype)

    def step(current: tuple, i: Any) -> tuple:
        outputs = body(i, jnp.asarray(True), *current)
        new = tuple(jnp.asarray(o).astype(c.dtype) for o, c in zip(outputs[1:], current))
        return new, tuple(_as_jax(o) for o in outputs[1 + len(current) :])

    final, stacked = lax.scan(step, state, counter)
    return (*final, *stacked)


def _scan_function(eager: Callable, bodies: Callable, count: int, attrs: dict) -> Callable:
    def run_scan(*args: Any) -> tuple:
        if not _is_tracer(args):
            return eager(*args)
        body = bodies(args)["body"]
        inputs = args[:count]
        n_scan = attrs["num_scan_inputs"]
        state, sequences = inputs[: len(inputs) - n_scan], inputs[len(inputs) - n_scan :]
        axes = attrs.get("scan_input_axes") or [0] * n_scan
        directions = attrs.get("scan_input_directions") or [0] * n_scan
        moved = []
        for seq, axis, direction in zip(sequences, axes, directions):
            seq = jnp.moveaxis(_as_jax(seq), axis % np.ndim(seq), 0)
            moved.append(jnp.flip(seq, 0) if direction else seq)
        carry0 = tuple(_as_jax(s) for s in state)

        def step(carry: tuple, slices: tuple) -> tuple:
            outputs = body(*carry, *slices)
            new = tuple(jnp.asarray(o).astype(c.dtype) for o, c in zip(outputs, carry))
            return new, tuple(_as_jax(o) for o in outputs[len(carry) :])

        final, stacked = lax.scan(step, carry0, tuple(moved))
        out_axes = attrs.get("scan_output_axes") or [0] * len(stacked)
        out_dirs = attrs.get("scan_output_directions") or [0] * len(stacked)
        results = []
        for values, axis, direction in zip(stacked, out_axes, out_dirs):
            values = jnp.flip(values, 0) if direction else values
            results.append(jnp.moveaxis(values, 0, axis % np.ndim(values)))
        return (*final, *results)

    return run_scan


def _attribute_path(name: str) -> str:
    """A source name as a dotted attribute path (``onnx::Conv_3`` -> ``onnx__Conv_3``)."""
    return ".".join(re.sub(r"\W", "_", part) or "_" for part in name.split("."))


def _set_path(root: nnx.Module, path: str, obj: Any) -> None:
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = getattr(node, part, None)
        if child is None:
            child = Scope()
            setattr(node, part, child)
        node = child
    setattr(node, leaf, obj)


def to_flax_module(
    source: Any, *, rngs: nnx.Rngs | None = None, normalized: bool = False
) -> FlaxModule:
    """Emit a graph as a trainable flax.nnx.Module (called by `interop.to_flax`)."""
    return FlaxEmitter(source, rngs=rngs, normalized=normalized).build()


from . import native_layers, native_recurrent  # noqa: E402,F401  (register the layer builders)
