"""Keras variables as symbolic inputs while a layer's ``call`` runs on KerasTensors.

`capture_walk._lower_by_symbolic_call` opens a layer up by calling its ``call`` on
KerasTensors; Keras records an op only when one of its operands is symbolic. An op
on variables alone (PReLU's ``-self.alpha``, GroupNormalization's
``ops.reshape(self.gamma, ...)``) would run eagerly and reach the graph as a folded
constant, leaving the variable an unread initializer that no emitted model can train.
So, for the duration of the call, every variable held by the layer or its sub-layers
is swapped, in the attribute (or list / dict / tuple) that holds it, for a KerasTensor
placeholder; the placeholders become extra inputs of the traced function, fed with
the variables' initializers. A sub-layer called inside gets its real variables back
while Keras infers its output spec (which may run its ``call`` on backend tensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import keras

# Attributes where Keras (and TF's trackable base) keep their own references to a
# layer's variables: swapping those would make the layer lose track of its weights.
_INTERNAL = {"_trainable_variables", "_non_trainable_variables", "_tracker", "_layers"}


class VariableTensor(keras.KerasTensor):
    """The placeholder of a variable: a KerasTensor that also answers what code commonly
    asks a variable (``.value`` is the tensor itself; ``path``, ``trainable``)."""

    def __init__(self, variable: Any) -> None:
        super().__init__(tuple(variable.shape), dtype=str(variable.dtype))
        self.variable = variable

    @property
    def value(self) -> VariableTensor:
        return self

    @property
    def path(self) -> str:
        return self.variable.path

    @property
    def trainable(self) -> bool:
        return self.variable.trainable


@dataclass(eq=False)
class _Slot:
    """One place holding a variable: ``holder[key]`` (a layer's __dict__, a list, a dict)."""

    holder: Any
    key: Any
    variable: Any
    placeholder: Any
    original: Any = None  # the tuple replaced as a whole (tuples cannot be assigned into)

    def swap(self, symbolic: bool) -> None:
        if self.original is not None:
            items = [self.placeholder if x is self.variable else x for x in self.original]
            value = type(self.original)(items) if symbolic else self.original
        else:
            value = self.placeholder if symbolic else self.variable
        if isinstance(self.holder, list):
            list.__setitem__(self.holder, self.key, value)
        else:
            dict.__setitem__(self.holder, self.key, value)


def _is_variable(value: Any) -> bool:
    return isinstance(value, keras.Variable)


def _slots_of(layer: Any, placeholder: Any) -> Iterator[_Slot]:
    """Where `layer` holds variables: attributes, and items of lists, tuples and dicts."""
    attributes = vars(layer)
    for name, value in list(attributes.items()):
        if name in _INTERNAL or name.startswith("_self_"):
            continue
        if _is_variable(value):
            yield _Slot(attributes, name, value, placeholder(value))
        elif isinstance(value, tuple) and any(_is_variable(x) for x in value):
            for x in dict.fromkeys(x for x in value if _is_variable(x)):
                yield _Slot(attributes, name, x, placeholder(x), original=value)
        elif isinstance(value, list):
            for i, x in enumerate(value):
                if _is_variable(x):
                    yield _Slot(value, i, x, placeholder(x))
        elif isinstance(value, dict):
            for key, x in value.items():
                if _is_variable(x):
                    yield _Slot(value, key, x, placeholder(x))


class SymbolicVariables:
    """Context manager: `layer`'s (and its sub-layers') variables read as KerasTensors.

    >>> with SymbolicVariables(layer) as swapped:               # doctest: +SKIP
    ...     outputs = layer.call(keras.KerasTensor((None, 4)))
    >>> swapped.placeholders                                    # [(KerasTensor, variable)]
    """

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self._by_variable: dict[int, tuple[Any, Any]] = {}
        self._slots: dict[int, list[_Slot]] = {}  # by id of the layer holding them
        self._subtrees: dict[int, list[Any]] = {}
        self._wrapped: list[Any] = []

    @property
    def placeholders(self) -> list[tuple[Any, Any]]:
        """(placeholder KerasTensor, variable) for every swapped variable."""
        return list(self._by_variable.values())

    def _placeholder(self, variable: Any) -> Any:
        if id(variable) not in self._by_variable:
            self._by_variable[id(variable)] = (VariableTensor(variable), variable)
        return self._by_variable[id(variable)][0]

    def __enter__(self) -> SymbolicVariables:
        try:
            for sub in self.layer._flatten_layers(include_self=True, recursive=True):
                if id(sub) not in self._slots:
                    self._slots[id(sub)] = list(_slots_of(sub, self._placeholder))
            for sub in self.layer._flatten_layers(include_self=False, recursive=True):
                subtree = list(sub._flatten_layers(include_self=True, recursive=True))
                if any(self._slots.get(id(s)) for s in subtree) and id(sub) not in self._subtrees:
                    self._subtrees[id(sub)] = subtree
                    self._wrap(sub)
            self._swap(self._slots, symbolic=True)
        except BaseException:
            self.__exit__()  # no layer keeps a placeholder or a wrapper
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._swap(self._slots, symbolic=False)
        for sub in self._wrapped:
            vars(sub).pop("symbolic_call", None)
        self._wrapped.clear()

    def _swap(self, slots: dict[int, list[_Slot]], symbolic: bool) -> None:
        for layer_slots in slots.values():
            for slot in layer_slots:
                slot.swap(symbolic)

    def _wrap(self, sub: Any) -> None:
        """Give `sub` its real variables back while Keras infers its output spec."""
        slots = {id(s): self._slots.get(id(s), []) for s in self._subtrees[id(sub)]}

        def symbolic_call(*args: Any, **kwargs: Any) -> Any:
            self._swap(slots, symbolic=False)
            try:
                # looked up now: the walk may patch Layer.symbolic_call around a call
                return type(sub).symbolic_call(sub, *args, **kwargs)
            finally:
                self._swap(slots, symbolic=True)

        vars(sub)["symbolic_call"] = symbolic_call  # instance attribute, found before the class's
        self._wrapped.append(sub)


def used(placeholders: list[tuple[Any, Any]], outputs: Any) -> list[tuple[Any, Any]]:
    """The placeholders that `outputs` depend on, walking Keras's node history back."""
    wanted = {id(p): (p, v) for p, v in placeholders}
    if not wanted:
        return []
    found: dict[int, tuple[Any, Any]] = {}
    seen: set[int] = set()
    stack = list(keras.tree.flatten(outputs))
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in wanted:
            found[id(tensor)] = wanted[id(tensor)]
        history = getattr(tensor, "_keras_history", None)
        if history is None or history.operation is None:
            continue
        node = history.operation._inbound_nodes[history.node_index]
        stack.extend(node.input_tensors)
    return [found[id(p)] for p, _ in placeholders if id(p) in found]
