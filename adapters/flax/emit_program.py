"""The emitted Flax model: a `FlaxModule` holding nnx layers and variables, run by a `Program`.

`FlaxEmitter` (emitter.py) records the program once, at emission: a list of steps over
slots, each one call of a native layer (placed in the module tree) or of a generic op.
``FlaxModule.__call__`` replays it, reading variables from the module, so nnx sees
every variable and jax.jit / nnx.jit / optax work on the module as on a hand-written one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from .emit_control import as_jax

# what a step argument is: a slot of the program, a constant, an nnx variable (by path)
SLOT, STATIC, VARIABLE = 0, 1, 2


class Frozen(nnx.Variable):
    """A source parameter marked non-trainable: in the state, not in ``nnx.Param``."""


class Scope(nnx.Module):
    """A node of the module tree (``blocks``, ``blocks.0``) holding layers and variables."""


def lookup(root: Any, path: str) -> Any:
    """The object at a dotted attribute path under ``root``."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def set_path(root: nnx.Module, path: str, obj: Any) -> None:
    """Set ``obj`` at a dotted attribute path, creating the `Scope` nodes above it."""
    *parents, leaf = path.split(".")
    node = root
    for part in parents:
        child = getattr(node, part, None)
        if child is None:
            child = Scope()
            setattr(node, part, child)
        node = child
    setattr(node, leaf, obj)


class Program:
    """The emitted graph as a list of steps over slots; run by `FlaxModule.__call__`.

    A step is ``(layer path or None, function, argument specs, output slots)``: with a
    layer path, ``function(layer, *args)`` (a native layer's call), else
    ``function(*args)`` (a generic op). An argument spec is ``(SLOT, index)``,
    ``(STATIC, array)`` or ``(VARIABLE, path)``.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[Any, ...]] = []
        self.inputs: list[tuple[str, int]] = []
        self.outputs: list[Any] = []
        self.slots = 0
        self._drops: list[list[int]] | None = None

    def drops(self) -> list[list[int]]:
        """Per step, the slots no later step reads: dropped after it, so a forward holds only
        the live activations (not every intermediate until it returns)."""
        if self._drops is None or len(self._drops) != len(self.steps):
            kept = {spec[1] for spec in self.outputs if spec is not None and spec[0] == SLOT}
            last: dict[int, int] = {}
            for index, (_, _, args, outs) in enumerate(self.steps):
                for spec in args:
                    if spec is not None and spec[0] == SLOT:
                        last[spec[1]] = index
                for slot in outs:
                    if slot is not None:
                        last.setdefault(slot, index)  # written and never read: dropped at once
            self._drops = [[] for _ in self.steps]
            for slot, index in last.items():
                if slot not in kept:
                    self._drops[index].append(slot)
        return self._drops

    def run(self, module: Any, inputs: Sequence[Any], named: dict[str, Any]) -> Any:
        env: list[Any] = [None] * self.slots
        for index, (name, slot) in enumerate(self.inputs):
            given = named[name] if name in named else inputs[index]
            env[slot] = as_jax(given)

        def resolve(spec: Any) -> Any:
            if spec is None:
                return None
            kind, payload = spec
            if kind == SLOT:
                return env[payload]
            if kind == STATIC:
                return payload
            return lookup(module, payload)[...]

        for (layer_path, function, args, outs), drops in zip(self.steps, self.drops()):
            values = [resolve(a) for a in args]
            if layer_path is None:
                results = function(*values)
            else:
                results = function(lookup(module, layer_path), *values)
                results = results if len(outs) > 1 else (results,)
            for slot, result in zip(outs, results):
                if slot is not None:
                    env[slot] = result
            del values, results
            for slot in drops:
                env[slot] = None
        outputs = [as_jax(resolve(spec)) for spec in self.outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


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
