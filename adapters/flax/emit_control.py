"""If / Loop / Scan of an emitted Flax program as ``jax.lax`` control flow.

Eagerly (concrete operands) a control-flow node runs its ONNX semantics, Python loops
over the backend; under ``jax.jit`` / ``nnx.jit`` its operands are tracers, and it
becomes ``lax.cond`` (If), ``lax.while_loop`` (Loop without scan outputs), one
``lax.scan`` (Loop running its whole static trip count with scan outputs; Scan), so
jit neither unrolls nor needs concrete conditions. A Loop whose scan outputs would
have a dynamic length keeps the Python loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
from jax import lax

from interop.emitter import loop_condition_holds
from interop.interpret import Interpreter, SubgraphFunction, node_free_values
from interop.normalize import DEFAULT_DOMAINS


def is_tracer(value: Any) -> bool:
    """Whether a value (or any of a list's) is a JAX tracer: the program runs under jit."""
    if isinstance(value, (list, tuple)):
        return any(is_tracer(v) for v in value)
    return isinstance(value, jax.core.Tracer)


def as_jax(value: Any) -> Any:
    """A program value as a JAX array (lists element-wise; strings stay numpy)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [as_jax(v) for v in value]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
        return value  # strings have no JAX type; the semantics run them on the host (numpy)
    return jnp.asarray(value)


def control_function(emitter: Interpreter, node: ir.Node) -> Callable[..., Any] | None:
    """If/Loop/Scan as jax.lax control flow when their operands are traced (under jit)."""
    if node.op_type not in ("If", "Loop", "Scan") or node.domain not in DEFAULT_DOMAINS:
        return None
    eager = emitter.op_function(node)
    values, graphs = emitter.attributes(node)
    outer, count = node_free_values(node), len(node.inputs)
    backend, version = emitter.backend, emitter.version

    def bodies(args: Sequence[Any]) -> dict[str, SubgraphFunction]:
        scope = dict(zip(outer, args[count:]))
        return {n: SubgraphFunction(g, backend, scope, version) for n, g in graphs.items()}

    if node.op_type == "If":

        def run_if(*args: Any) -> tuple:
            if not is_tracer(args[0]):
                return eager(*args)
            branch = bodies(args)
            then_fn = lambda: tuple(as_jax(v) for v in branch["then_branch"]())  # noqa: E731
            else_fn = lambda: tuple(as_jax(v) for v in branch["else_branch"]())  # noqa: E731
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
        if not is_tracer(args):
            return eager(*args)
        if body.num_outputs - 1 != len(initial):
            # scan outputs: a fixed-length lax.scan when the loop runs its whole (static)
            # trip count; otherwise their length would be dynamic, and Python loops
            if not full or trip is None or is_tracer(trip) or is_tracer(condition):
                return eager(*args)
            if condition is not None and not bool(np.asarray(condition).reshape(())):
                return eager(*args)  # runs no iteration
            return _scan_loop(body, int(np.asarray(trip).reshape(())), initial)
        state = tuple(as_jax(s) for s in initial)
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
    state = tuple(as_jax(s) for s in initial)
    counter = jnp.arange(length, dtype=jnp.asarray(np.int64(0)).dtype)

    def step(current: tuple, i: Any) -> tuple:
        outputs = body(i, jnp.asarray(True), *current)
        new = tuple(jnp.asarray(o).astype(c.dtype) for o, c in zip(outputs[1:], current))
        return new, tuple(as_jax(o) for o in outputs[1 + len(current) :])

    final, stacked = lax.scan(step, state, counter)
    return (*final, *stacked)


def _scan_function(eager: Callable, bodies: Callable, count: int, attrs: dict) -> Callable:
    def run_scan(*args: Any) -> tuple:
        if not is_tracer(args):
            return eager(*args)
        body = bodies(args)["body"]
        inputs = args[:count]
        n_scan = attrs["num_scan_inputs"]
        state, sequences = inputs[: len(inputs) - n_scan], inputs[len(inputs) - n_scan :]
        axes = attrs.get("scan_input_axes") or [0] * n_scan
        directions = attrs.get("scan_input_directions") or [0] * n_scan
        moved = []
        for seq, axis, direction in zip(sequences, axes, directions):
            seq = jnp.moveaxis(as_jax(seq), axis % np.ndim(seq), 0)
            moved.append(jnp.flip(seq, 0) if direction else seq)
        carry0 = tuple(as_jax(s) for s in state)

        def step(carry: tuple, slices: tuple) -> tuple:
            outputs = body(*carry, *slices)
            new = tuple(jnp.asarray(o).astype(c.dtype) for o, c in zip(outputs, carry))
            return new, tuple(as_jax(o) for o in outputs[len(carry) :])

        final, stacked = lax.scan(step, carry0, tuple(moved))
        out_axes = attrs.get("scan_output_axes") or [0] * len(stacked)
        out_dirs = attrs.get("scan_output_directions") or [0] * len(stacked)
        results = []
        for values, axis, direction in zip(stacked, out_axes, out_dirs):
            values = jnp.flip(values, 0) if direction else values
            results.append(jnp.moveaxis(values, 0, axis % np.ndim(values)))
        return (*final, *results)

    return run_scan
