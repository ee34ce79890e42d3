"""Control flow and containers: If, Loop, Scan, sequences and optionals.

Subgraph attributes arrive as callables ``body(*inputs) -> list of outputs`` (built by
the interpreter with the outer scope captured), with ``body.num_outputs``; so each host
runs its own Python control flow around its own tensors.
"""

from __future__ import annotations

import numpy as np

from . import normalize_axis, op


def _truth(xp, value) -> bool:
    return bool(np.asarray(xp.to_numpy(value)).reshape(-1)[0])


@op("If")
def if_(xp, condition, then_branch, else_branch):
    return tuple(then_branch() if _truth(xp, condition) else else_branch())


@op("Loop")
def loop(xp, trip_count=None, condition=None, *initial, body):
    limit = None if trip_count is None else int(np.asarray(xp.to_numpy(trip_count)).reshape(-1)[0])
    keep_going = True if condition is None else _truth(xp, condition)
    state = list(initial)
    scan_count = body.num_outputs - 1 - len(state)
    scans: list[list] = [[] for _ in range(scan_count)]
    iteration = 0
    while (limit is None or iteration < limit) and keep_going:
        outputs = body(np.array(iteration, np.int64), np.array(keep_going), *state)
        keep_going = _truth(xp, outputs[0])
        state = list(outputs[1 : 1 + len(state)])
        for collected, value in zip(scans, outputs[1 + len(state) :]):
            collected.append(value)
        iteration += 1
    stacked = [
        xp.stack(values, 0) if values else xp.asarray(np.zeros((0,), np.float32))
        for values in scans
    ]
    return tuple(state + stacked)


@op("Scan")
def scan(
    xp,
    *inputs,
    body,
    num_scan_inputs,
    scan_input_axes=None,
    scan_input_directions=None,
    scan_output_axes=None,
    scan_output_directions=None,
):
    state_count = len(inputs) - num_scan_inputs
    state, sequences = list(inputs[:state_count]), inputs[state_count:]
    in_axes = [
        normalize_axis(a, len(xp.shape(s)))
        for a, s in zip(scan_input_axes or [0] * num_scan_inputs, sequences)
    ]
    in_directions = scan_input_directions or [0] * num_scan_inputs
    length = xp.shape(sequences[0])[in_axes[0]]
    scan_count = body.num_outputs - state_count
    scans: list[list] = [[] for _ in range(scan_count)]
    for step in range(length):
        slices = [
            xp.getitem(seq, (slice(None),) * axis + (length - 1 - step if direction else step,))
            for seq, axis, direction in zip(sequences, in_axes, in_directions)
        ]
        outputs = body(*state, *slices)
        state = list(outputs[:state_count])
        for collected, value in zip(scans, outputs[state_count:]):
            collected.append(value)
    out_axes = scan_output_axes or [0] * scan_count
    out_directions = scan_output_directions or [0] * scan_count
    stacked = []
    for values, axis, direction in zip(scans, out_axes, out_directions):
        values = values[::-1] if direction else values
        stacked.append(xp.stack(values, normalize_axis(axis, len(xp.shape(values[0])) + 1)))
    return tuple(state + stacked)


# ------------------------------------------------------------------- sequences (Python lists)
@op("SequenceConstruct")
def sequence_construct(xp, *xs):
    return list(xs)


@op("SequenceEmpty")
def sequence_empty(xp, dtype=None):
    return []


def _position(xp, sequence, position, default):
    index = default if position is None else int(np.asarray(xp.to_numpy(position)).reshape(-1)[0])
    return index + len(sequence) if index < 0 else index


@op("SequenceInsert")
def sequence_insert(xp, sequence, tensor, position=None):
    out = list(sequence)
    out.insert(_position(xp, sequence, position, len(sequence)), tensor)
    return out


@op("SequenceAt")
def sequence_at(xp, sequence, position):
    return sequence[_position(xp, sequence, position, 0)]


@op("SequenceErase")
def sequence_erase(xp, sequence, position=None):
    out = list(sequence)
    del out[_position(xp, sequence, position, len(sequence) - 1)]
    return out


@op("SequenceLength")
def sequence_length(xp, sequence):
    return xp.asarray(np.array(len(sequence), np.int64))


@op("ConcatFromSequence")
def concat_from_sequence(xp, sequence, axis, new_axis=0):
    rank = len(xp.shape(sequence[0])) + (1 if new_axis else 0)
    axis = normalize_axis(axis, rank)
    return xp.stack(sequence, axis) if new_axis else xp.concat(sequence, axis)


@op("SplitToSequence")
def split_to_sequence(xp, x, split=None, axis=0, keepdims=1):
    from .shape import split as split_op

    dims = xp.shape(x)
    axis = normalize_axis(axis, len(dims))
    if split is None:
        parts = split_op(xp, x, None, axis, num_outputs=dims[axis])
        return (
            [xp.reshape(p, [d for i, d in enumerate(dims) if i != axis]) for p in parts]
            if not keepdims
            else list(parts)
        )
    sizes = np.asarray(xp.to_numpy(split)).reshape(-1)
    if np.ndim(xp.to_numpy(split)) == 0:  # one chunk size: equal chunks, the last one smaller
        chunk = int(sizes[0])
        sizes = [chunk] * (dims[axis] // chunk) + (
            [dims[axis] % chunk] if dims[axis] % chunk else []
        )
    return list(split_op(xp, x, np.asarray(sizes, np.int64), axis))


@op("SequenceMap")
def sequence_map(xp, sequence, *extra, body):
    length = len(sequence)
    results = [
        body(*(s[i] if isinstance(s, list) else s for s in (sequence, *extra)))
        for i in range(length)
    ]
    return tuple([r[k] for r in results] for k in range(body.num_outputs))


@op("Optional")
def optional(xp, value=None, type=None):  # noqa: A002  (spec name)
    return value


@op("OptionalHasElement")
def optional_has_element(xp, value=None):
    return xp.asarray(np.array(value is not None))


@op("OptionalGetElement")
def optional_get_element(xp, value):
    return value
