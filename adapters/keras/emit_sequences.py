"""Sequences as Python lists at emission: the steps of `KerasEmitter.rewrite` for them.

A sequence value of statically known length is a Python list of KerasTensors (or `Const`s)
between layers. SequenceConstruct / SequenceEmpty / SequenceLength and SequenceAt /
SequenceInsert / SequenceErase at constant positions are list operations here (no layer);
a layer reading a sequence takes its elements, one producing one (SplitToSequence with a
constant split, SequenceMap) returns them one by one (`emit_generic.OnnxOp.layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from interop.normalize import DEFAULT_DOMAINS

from .emit_generic import Const


def sequence_step(emitter: Any, node: ir.Node, args: list[Any]) -> Sequence[Any] | None:
    """The outputs of a sequence node that is a list operation now; None: a layer's work."""
    if node.domain not in DEFAULT_DOMAINS or node.op_type not in SEQUENCE_STEPS:
        return None
    if node.op_type in SEQUENCE_READERS and not isinstance(args[0], list):
        raise NotImplementedError(f"{node.op_type} of a sequence not known as a list")
    return SEQUENCE_STEPS[node.op_type](emitter, node, args)


def _position(arg: Any, length: int, default: int, *, end: bool = False) -> int | None:
    """A constant position, checked and counted from the front; None when known at run time."""
    if arg is None:
        return default
    if not isinstance(arg, Const) or arg.kind is not None:
        return None
    index = int(np.asarray(arg.array).reshape(-1)[0])
    limit = length + 1 if end else length  # SequenceInsert may append
    if not -length <= index < limit:
        raise IndexError(f"position {index} outside a sequence of {length}")
    return index + length if index < 0 else index


def _static(emitter: Any, node: ir.Node, items: list[Any]) -> list[Any]:
    """A list result, remembered as host arrays when its elements are plain constants, so
    that nodes reading it fold."""
    if all(isinstance(i, Const) and i.kind is None for i in items):
        emitter.static[node.outputs[0]] = [i.array for i in items]
    return [items]


def _uniform(node: ir.Node, items: list[Any]) -> None:
    """A run-time position picks among elements of one shape and dtype only (a gather)."""
    specs = {
        (tuple(i.array.shape), str(i.array.dtype))
        if isinstance(i, Const)
        else (tuple(i.shape), str(i.dtype))
        for i in items
    }
    if len(specs) > 1:
        raise NotImplementedError(
            f"{node.op_type} at a run-time position among tensors of different shapes {specs}"
        )


def _construct(emitter, node, args):
    return _static(emitter, node, list(args))


def _empty(emitter, node, args):
    return [[]]


def _length(emitter, node, args):
    array = np.array(len(args[0]), np.int64)
    emitter.static[node.outputs[0]] = array
    return [Const(node.outputs[0], array, None)]


def _at(emitter, node, args):
    sequence = args[0]
    index = _position(args[1], len(sequence), 0)
    if index is None:
        _uniform(node, sequence)
        return None  # a layer gathers it (emit_generic.sequence_function)
    return [sequence[index]]


def _insert(emitter, node, args):
    sequence, tensor = args[0], args[1]
    index = _position(args[2] if len(args) > 2 else None, len(sequence), len(sequence), end=True)
    if index is None:
        _uniform(node, [*sequence, tensor])
        return None
    return _static(emitter, node, [*sequence[:index], tensor, *sequence[index:]])


def _erase(emitter, node, args):
    sequence = args[0]
    index = _position(args[1] if len(args) > 1 else None, len(sequence), len(sequence) - 1)
    if index is None:
        _uniform(node, sequence)
        return None
    return _static(emitter, node, [*sequence[:index], *sequence[index + 1 :]])


def _identity(emitter, node, args):
    return _static(emitter, node, list(args[0])) if isinstance(args[0], list) else None


def _split(emitter, node, args):
    split = args[1] if len(args) > 1 else None
    if split is not None and not (isinstance(split, Const) and split.kind is None):
        raise NotImplementedError("SplitToSequence with a run-time split: a run-time length")
    return None  # one layer, whose outputs are the chunks


# ops whose first input is a sequence
SEQUENCE_READERS = frozenset({"SequenceAt", "SequenceInsert", "SequenceErase", "SequenceLength"})
# ops whose outputs are all sequences, made by a layer
SEQUENCE_MAKERS = frozenset({"SplitToSequence", "SequenceInsert", "SequenceErase", "SequenceMap"})

SEQUENCE_STEPS = {"SequenceConstruct": _construct, "SequenceEmpty": _empty,
                   "SequenceLength": _length, "SequenceAt": _at, "SequenceInsert": _insert,
                   "SequenceErase": _erase, "Identity": _identity,
                   "SplitToSequence": _split}  # fmt: skip
