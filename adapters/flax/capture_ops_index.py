"""Converters for indexing primitives: gather, scatter (set / add / mul / min / max) and
dynamic_update_slice, in their general XLA forms.

`jnp.take` and ``table[ids]`` (one indexed axis, whole slices elsewhere) stay one ONNX
``Gather``, which the emitters read as an embedding lookup. Every other gather and every
scatter goes through one construction: the operand axes that are taken whole (and not
indexed) move to the back, and an int64 index tensor gives, for each window element, its
position on every other axis (start index + offset within the window, or the batch
position for vmapped / batched indexing); one ``GatherND`` / ``ScatterND`` then does the
work and a Transpose puts the axes where JAX wants them. The index modes follow JAX:
``clip`` and ``promise_in_bounds`` clamp start indices so the window fits;
``fill`` (gather) gives the fill value for windows that do not fit, and the scatter
default (``FILL_OR_DROP``) drops them: their updates go to a padding region that is cut
off afterwards.
"""

from __future__ import annotations

import numpy as np

from . import register_primitive as reg
from .capture_lowering import is_static


def _scalar_dim(low, d):
    return low.op("Squeeze", [low.dim(d), low.ints([0])])


def _where(low, cond, a, b, dtype):
    if np.dtype(dtype) == np.bool_:  # ONNX Runtime's CPU Where has no bool kernel
        picked = low.op("Where", [cond, low.cast(a, np.uint8), low.cast(b, np.uint8)])
        return low.cast(picked, np.bool_)
    return low.op("Where", [cond, a, b])


def _fill_mode(mode) -> bool:
    return "FILL" in str(mode).upper() or str(mode) == "1"


def _inverse(perm):
    return [perm.index(i) for i in range(len(perm))]


def _element_indices(low, starts, batch, window, shape_b, op_shape, sizes, indexed, drop=None):
    """The int64 index tensor, shape ``B + window sizes + [len(indexed)]``, and the
    in-bounds mask (shape ``B``) of each window.

    `starts` maps an operand axis to its start index values (shape ``B``), `batch` maps an
    operand axis to the indices' batch axis it follows, `window` lists the operand axes
    with a window dim (in order), `sizes` the window size per operand axis. Starts are
    clamped so the window fits; with `drop` (an operand axis), windows that do not fit
    start at that axis' end instead (a padding region the caller adds).
    """
    nb, nw = len(shape_b), len(window)
    full_shape = low.shape([*shape_b, *[sizes[d] for d in window]])
    clamped, valid = {}, None
    for d, start in starts.items():
        s = low.cast(start, np.int64)
        upper = low.op("Sub", [_scalar_dim(low, op_shape[d]), _scalar_dim(low, sizes[d])])
        ok = low.op(
            "And",
            [
                low.op("GreaterOrEqual", [s, low.const(np.int64(0))]),
                low.op("LessOrEqual", [s, upper]),
            ],
        )
        valid = ok if valid is None else low.op("And", [valid, ok])
        clamped[d] = low.op("Min", [low.op("Max", [s, low.const(np.int64(0))]), upper])
    if drop is not None and valid is not None:
        end = _scalar_dim(low, op_shape[drop])
        clamped[drop] = low.op("Where", [valid, clamped[drop], end])
    parts = []
    for d in indexed:
        part = None
        if d in clamped:
            s = clamped[d]
            part = low.op("Unsqueeze", [s, low.ints(range(nb, nb + nw))]) if nw else s
        elif d in batch:
            j = batch[d]
            n = _scalar_dim(low, shape_b[j])
            line = low.op("Range", [low.const(np.int64(0)), n, low.const(np.int64(1))])
            others = [a for a in range(nb + nw) if a != j]
            part = low.op("Unsqueeze", [line, low.ints(others)]) if others else line
        if d in window:
            k = window.index(d)
            line = low.op(
                "Range",
                [low.const(np.int64(0)), _scalar_dim(low, sizes[d]), low.const(np.int64(1))],
            )
            others = [a for a in range(nb + nw) if a != nb + k]
            line = low.op("Unsqueeze", [line, low.ints(others)]) if others else line
            part = line if part is None else low.op("Add", [part, line])
        if part is None:  # an axis of size 1 taken at 0
            part = low.const(np.int64(0))
        part = low.op("Expand", [part, full_shape])
        parts.append(low.op("Unsqueeze", [part, low.ints([-1])]))
    index = parts[0] if len(parts) == 1 else low.op("Concat", parts, {"axis": -1})
    return index, valid


def _plan(op_shape, sizes, skipped, starts_axes):
    """(window axes, whole axes moved to the back, indexed axes, operand perm)."""
    rank = len(op_shape)
    window = [d for d in range(rank) if d not in skipped]
    whole = [
        d
        for d in window
        if d not in starts_axes and is_static(sizes[d]) and is_static(op_shape[d])
        and sizes[d] == op_shape[d]
    ]  # fmt: skip
    if len(whole) == rank:  # GatherND needs at least one indexed axis
        whole = whole[1:]
    indexed = [d for d in range(rank) if d not in whole]
    return window, whole, indexed, indexed + whole


# ---------------------------------------------------------------------- gather
def _simple_take(low, eqn, operand, indices):
    """jnp.take / table[ids]: one ONNX Gather, or None when the gather is not that."""
    dn = eqn.params["dimension_numbers"]
    op_shape, idx_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    start_map, collapsed = list(dn.start_index_map), list(dn.collapsed_slice_dims)
    sizes = list(eqn.params["slice_sizes"])
    if getattr(dn, "operand_batching_dims", ()) or len(start_map) != 1 or start_map != collapsed:
        return None
    if _fill_mode(eqn.params.get("mode")):
        return None
    (axis,) = start_map
    rank, batch_rank = len(op_shape), len(idx_shape) - 1
    full = [i for i in range(rank) if i != axis]
    if any(sizes[i] != op_shape[i] for i in full):
        return None
    if list(dn.offset_dims) != list(range(batch_rank, batch_rank + len(full))):
        return None
    idx = low.cast(low.op("Squeeze", [indices, low.ints([-1])]), np.int64)
    # jnp clamps or normalises indices before the gather; clamp again so ONNX never sees
    # an out-of-range index (JAX's own gather clamps in clip / promise modes)
    upper = low.op("Sub", [_scalar_dim(low, op_shape[axis]), low.const(np.int64(1))])
    idx = low.op("Min", [low.op("Max", [idx, low.const(np.int64(0))]), upper])
    y = low.op("Gather", [operand, idx], {"axis": axis})
    if axis != 0 and batch_rank:  # ONNX puts the index dims at `axis`; JAX puts them first
        perm = (
            list(range(axis, axis + batch_rank))
            + list(range(axis))
            + list(range(axis + batch_rank, rank - 1 + batch_rank))
        )
        y = low.op("Transpose", [y], {"perm": perm})
    return y


@reg("gather")
def convert_gather(low, eqn, operand, indices):
    simple = _simple_take(low, eqn, operand, indices)
    if simple is not None:
        return simple
    p = eqn.params
    dn = p["dimension_numbers"]
    op_shape, idx_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    sizes = [int(s) if is_static(s) else s for s in p["slice_sizes"]]  # batch-sized slices too
    start_map = [int(d) for d in dn.start_index_map]
    collapsed = [int(d) for d in dn.collapsed_slice_dims]
    obatch = [int(d) for d in getattr(dn, "operand_batching_dims", ())]
    ibatch = [int(d) for d in getattr(dn, "start_indices_batching_dims", ())]
    offset_dims = [int(d) for d in dn.offset_dims]
    shape_b = list(idx_shape[:-1])
    window, whole, indexed, perm = _plan(op_shape, sizes, set(collapsed) | set(obatch), start_map)
    starts = {
        d: low.op("Gather", [indices, low.const(np.int64(k))], {"axis": len(idx_shape) - 1})
        for k, d in enumerate(start_map)
    }
    batch = dict(zip(obatch, ibatch, strict=True))
    partial = [d for d in window if d not in whole]
    index, valid = _element_indices(low, starts, batch, partial, shape_b, op_shape, sizes, indexed)
    data = operand if perm == list(range(len(op_shape))) else low.op(
        "Transpose", [operand], {"perm": perm}
    )  # fmt: skip
    y = low.op("GatherND", [data, index])
    # y's axes: B, partial windows, whole axes; JAX's: batch axes where offset_dims are not
    current = [("b", j) for j in range(len(shape_b))] + [("w", d) for d in partial + whole]
    target, next_batch = [], iter(range(len(shape_b)))
    for o in range(len(out_shape)):
        target.append(
            ("w", window[offset_dims.index(o)]) if o in offset_dims else ("b", next(next_batch))
        )
    order = [current.index(t) for t in target]
    if order != list(range(len(order))):
        y = low.op("Transpose", [y], {"perm": order})
    if _fill_mode(p.get("mode")) and valid is not None:
        dtype = eqn.outvars[0].aval.dtype
        fill = p.get("fill_value")
        if fill is None:
            fill = _default_fill(dtype)
        mask = valid
        if offset_dims:  # the mask is per window: broadcast it over the window axes
            mask = low.op("Unsqueeze", [mask, low.ints(offset_dims)])
        y = _where(low, mask, y, low.const(np.asarray(fill, dtype=dtype)), dtype)
    return y


def _default_fill(dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return True
    if dtype.kind in "fc" or dtype.name == "bfloat16":
        return np.nan
    return np.iinfo(dtype).min if dtype.kind == "i" else np.iinfo(dtype).max


# ---------------------------------------------------------------------- scatter
_REDUCTION = {"scatter": "none", "scatter-add": "add", "scatter_add": "add",
              "scatter-mul": "mul", "scatter_mul": "mul", "scatter-min": "min",
              "scatter_min": "min", "scatter-max": "max", "scatter_max": "max",
              "scatter-sub": "sub", "scatter_sub": "sub"}  # fmt: skip


def scatter(low, operand, indices, updates, *, op_shape, idx_shape, upd_shape, dtype,
            window_dims, inserted, to_operand, obatch, ibatch, reduction, drop):  # fmt: skip
    """ScatterND of `updates` into `operand` for XLA scatter dimension numbers."""
    rank = len(op_shape)
    scatter_axes = [a for a in range(len(upd_shape)) if a not in window_dims]
    shape_b = [upd_shape[a] for a in scatter_axes]
    skipped = set(inserted) | set(obatch)
    window_all = [d for d in range(rank) if d not in skipped]
    sizes = {d: 1 for d in skipped}
    for d, a in zip(window_all, window_dims, strict=True):
        sizes[d] = upd_shape[a]
    window, whole, indexed, perm = _plan(op_shape, sizes, skipped, to_operand)
    starts = {
        d: low.op("Gather", [indices, low.const(np.int64(k))], {"axis": len(idx_shape) - 1})
        for k, d in enumerate(to_operand)
    }
    partial = [d for d in window if d not in whole]
    pad_axis = to_operand[0] if drop and to_operand else None
    index, valid = _element_indices(
        low, starts, dict(zip(obatch, ibatch, strict=True)), partial, shape_b, op_shape,
        sizes, indexed, pad_axis,
    )  # fmt: skip
    data = operand if perm == list(range(rank)) else low.op("Transpose", [operand], {"perm": perm})
    # updates' axes to B + partial windows + whole axes
    upd_order = scatter_axes + [window_dims[window_all.index(d)] for d in partial + whole]
    if upd_order != list(range(len(upd_order))):
        updates = low.op("Transpose", [updates], {"perm": upd_order})
    if reduction == "sub":
        updates, reduction = low.op("Neg", [updates]), "add"
    boolean = np.dtype(dtype) == np.bool_
    if boolean:
        data, updates = low.cast(data, np.uint8), low.cast(updates, np.uint8)
        reduction = {"add": "max", "mul": "min"}.get(reduction, reduction)
    if pad_axis is not None:
        pads = [0] * (2 * rank)
        pads[rank + indexed.index(pad_axis)] = int(sizes[pad_axis])
        data = low.op("Pad", [data, low.ints(pads)], {"mode": "constant"})
    attrs = {} if reduction == "none" else {"reduction": reduction}
    y = low.op("ScatterND", [data, index, updates], attrs)
    if pad_axis is not None:
        first = indexed.index(pad_axis)
        y = low.op("Slice", [y, low.ints([0]), low.dim(op_shape[pad_axis]), low.ints([first])])
    if perm != list(range(rank)):
        y = low.op("Transpose", [y], {"perm": _inverse(perm)})
    return low.cast(y, np.bool_) if boolean else y


def _scatter_converter(name):
    def convert(low, eqn, operand, indices, updates):
        p = eqn.params
        dn = p["dimension_numbers"]
        mode = p.get("mode")
        return scatter(
            low, operand, indices, updates,
            op_shape=eqn.invars[0].aval.shape, idx_shape=eqn.invars[1].aval.shape,
            upd_shape=eqn.invars[2].aval.shape, dtype=eqn.invars[0].aval.dtype,
            window_dims=[int(d) for d in dn.update_window_dims],
            inserted=[int(d) for d in dn.inserted_window_dims],
            to_operand=[int(d) for d in dn.scatter_dims_to_operand_dims],
            obatch=[int(d) for d in getattr(dn, "operand_batching_dims", ())],
            ibatch=[int(d) for d in getattr(dn, "scatter_indices_batching_dims", ())],
            reduction=_REDUCTION[name], drop=_fill_mode(mode) or mode is None,
        )  # fmt: skip

    return convert


for _name in _REDUCTION:
    reg(_name, _scatter_converter(_name))


@reg("dynamic_update_slice")
def convert_dynamic_update_slice(low, eqn, operand, update, *starts):
    """A window write at clamped start indices (KV caches): a scatter in clip mode."""
    op_shape, upd_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    rank = len(op_shape)
    # axes the update covers whole always start at 0: they need no index
    moving = [
        d for d in range(rank)
        if not (is_static(op_shape[d]) and is_static(upd_shape[d]) and op_shape[d] == upd_shape[d])
    ] or [0]  # fmt: skip
    index = low.op(
        "Concat",
        [low.op("Unsqueeze", [low.cast(starts[d], np.int64), low.ints([0])]) for d in moving],
        {"axis": 0},
    )
    return scatter(
        low, operand, index, update,
        op_shape=op_shape, idx_shape=(len(moving),), upd_shape=upd_shape,
        dtype=eqn.invars[0].aval.dtype, window_dims=list(range(rank)), inserted=[],
        to_operand=moving, obatch=[], ibatch=[], reduction="none", drop=False,
    )  # fmt: skip
