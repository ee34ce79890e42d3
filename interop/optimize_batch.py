"""Batch-uniform values of the optimized copy, computed once at batch 1.

A tensor the graph computes from the input shapes alone, whose every batch row is the
same (GPT-2's causal mask: positions expanded over the batch, then indexed with
``arange(batch)``), is computed at batch 1 and broadcast by the consumer that meets the
batch. With a static batch (torch.onnx's default export) it is a constant; in our
symbolic-batch graph it was computed on every run, for every row. With the other dims
static the batch-1 copy folds to a constant; with a dynamic sequence it is computed on
every run, at batch 1 (``[1, 1, seq, seq]`` instead of ``[batch, 1, seq, seq]``).

>>> import interop, torch                                   # doctest: +SKIP
>>> g = interop.trace(transformers.GPT2Model(config), (ids,))
>>> batch_free(g.model.clone())   # the causal mask: one value now computed at batch 1
1
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from interop.optimize_rules import const_ints, has_subgraph

# ops whose output element is a function of the same (broadcast) element of each input
_ELEMENTWISE = frozenset(
    "Add Sub Mul Div Pow Mod Max Min Equal Less LessOrEqual Greater GreaterOrEqual And Or "
    "Xor Not Neg Abs Sqrt Exp Log Cast Where IsNaN IsInf Identity Sign Floor Ceil Relu "
    "BitwiseAnd BitwiseOr BitwiseNot Reciprocal".split()
)
# ops that compute shapes from shapes (their inputs and outputs are small int tensors)
_SHAPE_OPS = _ELEMENTWISE | {"Concat", "Gather", "Squeeze", "Unsqueeze", "Slice", "Reshape"}
# ops that compute a value from their inputs alone (no randomness, no state)
_PURE = _SHAPE_OPS | {"Range", "CumSum", "Expand", "Transpose", "ConstantOfShape", "Trilu"}
# consumers that broadcast an input: a batch-1 value may replace a batch-B one
_BROADCASTING = _ELEMENTWISE - {"Identity", "Cast", "Not", "Neg", "Abs", "Sqrt", "Exp", "Log"}

_UNIFORM, _INDEX, _SHAPE, _DATA, _CONST = "uniform", "index", "shape", "data", "const"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class _Dims:
    """The graph's batch symbols (axis 0 of its inputs) and its other input symbols, with
    where each of those is found (an input and an axis)."""

    batch: frozenset[str]
    free: dict[str, tuple[ir.Value, int]]

    @classmethod
    def of(cls, graph: ir.Graph) -> _Dims:
        batch = {
            value.shape[0].value
            for value in graph.inputs
            if value.shape is not None and len(value.shape) > 0
            if isinstance(value.shape[0], ir.SymbolicDim) and value.shape[0].value
        }
        free: dict[str, tuple[ir.Value, int]] = {}
        for value in graph.inputs:
            for axis, dim in enumerate(value.shape or ()):
                name = dim.value if isinstance(dim, ir.SymbolicDim) else None
                if name and name not in batch:
                    free.setdefault(name, (value, axis))
        return cls(frozenset(batch), free)

    def is_batch(self, dim: object) -> bool:
        return isinstance(dim, ir.SymbolicDim) and dim.value in self.batch

    def is_free(self, dim: object) -> bool:
        """A dim the batch size cannot change: static, an input's other symbol, or an
        expression of those (torch.export's ``seq + 1``; not ONNX inference's ``unk__``)."""
        if isinstance(dim, int):
            return True
        name = dim.value if isinstance(dim, ir.SymbolicDim) else None
        names = _NAME.findall(name or "")
        return bool(names) and all(n in self.free for n in names)

    def allowed(self, value: Any) -> bool:
        """Every dim the batch or free of it (so each batch-sized axis is a named one)."""
        shape = value.shape
        return shape is not None and all(self.is_batch(d) or self.is_free(d) for d in shape)

    def batchless(self, value: Any) -> bool:
        shape = value.shape
        return shape is not None and all(self.is_free(d) for d in shape)

    def non_batch_axis(self, value: Any, axis: int) -> bool:
        shape = value.shape
        return shape is not None and -len(shape) <= axis < len(shape) and self.is_free(shape[axis])


def batch_free(model: ir.Model) -> int:
    """Compute batch-uniform tensors at batch 1; the number of consumers rewired.

    A value is *uniform* when each of its dims is a batch (the symbolic dim on axis 0 of
    the graph inputs) or free of it (static, or the inputs' other symbols), and it equals
    the broadcast of what the graph computes at batch 1: it depends on the inputs only
    through their shapes, and every op on the way keeps that (elementwise ops, Expand,
    Slice / Concat / CumSum / Gather along axes that are not the batch, and GatherND that
    indexes the batch axis with ``arange(batch)`` into a uniform tensor, where each row
    reads the same). Each uniform value that meets a batch-dependent tensor in a
    broadcasting op is replaced there by its batch-1 copy: the same nodes, with every
    ``Shape`` of a batch-B tensor replaced by its batch-1 shape (a constant when the other
    dims are static, which constant folding then folds through; else built from the
    inputs' shapes). Needs the shapes ONNX's inference gives (with data propagation: the
    optimizer leaves an Expand to a computed shape unshaped).
    """
    graph = model.graph
    dims = _Dims.of(graph)
    if not dims.batch or any(has_subgraph(node) for node in graph):
        return 0
    state = _states(graph, dims)
    targets: list[tuple[ir.Node, int, ir.Value]] = []
    for node in graph:
        if state.get(node.outputs[0]) == _UNIFORM or node.op_type not in _BROADCASTING:
            continue
        for index, value in enumerate(node.inputs):
            if (
                value is not None
                and state.get(value) == _UNIFORM
                and not dims.batchless(value)  # already the same at every batch size
                and _covered(node, index)
            ):
                targets.append((node, index, value))
    if not targets:
        return 0
    copies = _batch_one_copy(graph, [value for _, _, value in targets], dims, state)
    if copies is None:
        return 0
    for node, index, value in targets:
        node.replace_input_with(index, copies[value])
    return len(targets)


def _states(graph: ir.Graph, dims: _Dims) -> dict[ir.Value, str]:
    """Each value's kind: uniform over the batch, the batch index, a shape, data or constant."""
    state: dict[ir.Value, str] = {v: _DATA for v in graph.inputs}
    for value in graph.initializers.values():
        state[value] = _CONST
    for node in graph:
        kind = _kind(node, state, dims)
        for output in node.outputs:
            state[output] = kind
    return state


def _kind(node: Any, state: dict[Any, str], dims: _Dims) -> str:  # noqa: PLR0911, PLR0912
    op, out = node.op_type, node.outputs[0]
    kinds = [state.get(v, _DATA) if v is not None else _CONST for v in node.inputs]
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return _DATA
    if op == "Constant":
        return _CONST
    if op == "Shape":  # free of the batch where the dims it reads are
        return _UNIFORM if _shape_dims_free(node, dims) else _SHAPE
    # computed from values the batch size cannot change: the same at every batch size
    free = [
        k == _CONST or (k == _UNIFORM and dims.batchless(v)) for k, v in zip(kinds, node.inputs)
    ]
    if op in _PURE and all(free) and dims.batchless(out):
        return _UNIFORM if not all(k == _CONST for k in kinds) else _CONST
    if kinds and all(k in (_SHAPE, _CONST) or f for k, f in zip(kinds, free)) and op in _SHAPE_OPS:
        return _SHAPE
    if not dims.allowed(out):
        return _DATA
    first, rest = (kinds[0], kinds[1:]) if kinds else (_DATA, [])
    uniform = (_UNIFORM, _CONST)
    if op == "ConstantOfShape" and first in (_SHAPE, _CONST, _UNIFORM):
        return _UNIFORM
    if op in _ELEMENTWISE and all(k in uniform for k in kinds):
        return _UNIFORM
    if op == "Expand" and first in uniform and rest[0] in (_SHAPE, *uniform):
        return _UNIFORM
    if op == "Expand" and first == _INDEX and rest[0] in (_SHAPE, *uniform):
        same_rank = len(node.inputs[0].shape or ()) == len(out.shape or ())
        return _INDEX if same_rank and _batch_dim0(out, dims) else _DATA
    if op == "Range" and const_ints(node.inputs[0]) == [0] and const_ints(node.inputs[2]) == [1]:
        return _INDEX if len(out.shape or ()) == 1 and _batch_dim0(out, dims) else _DATA
    if op == "Unsqueeze" and first == _INDEX and 0 not in (const_ints(node.inputs[1]) or [0]):
        return _INDEX
    if op == "Concat" and all(k in uniform for k in kinds):
        return _UNIFORM if _keeps_uniform(node, dims) else _DATA
    if first not in uniform or not all(free[1:]):  # the other inputs the same at any batch
        return _gather_nd(node, state, dims) if op == "GatherND" else _DATA
    return _UNIFORM if _keeps_uniform(node, dims) else _DATA


def _shape_dims_free(node: Any, dims: _Dims) -> bool:
    x = node.inputs[0]
    if x is None or x.shape is None:
        return False
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    start, end = attrs.get("start", 0), attrs.get("end", len(x.shape))
    read = list(x.shape)[slice(start, end)]
    return bool(read) and all(dims.is_free(d) for d in read)


def _batch_dim0(value: Any, dims: _Dims) -> bool:
    shape = value.shape
    return bool(shape) and dims.is_batch(shape[0])


def _keeps_uniform(node: Any, dims: _Dims) -> bool:
    """Whether an op on one uniform input (the others constant) gives a uniform output."""
    op, x = node.op_type, node.inputs[0]
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if op in ("Transpose", "Identity"):
        return True
    if op in ("Unsqueeze", "Squeeze"):  # Squeeze of static size-1 axes only
        axes = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        return op == "Unsqueeze" or (axes is not None and all(_static(x, a) for a in axes))
    if op == "Slice":
        axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 else None
        return axes is not None and all(dims.non_batch_axis(x, a) for a in axes)
    if op in ("Concat", "Softmax", "LogSoftmax", "CumSum"):
        cumsum_axis: list[Any] = const_ints(node.inputs[1]) or [None]
        axis = attrs.get("axis", -1) if op != "CumSum" else cumsum_axis[0]
        return isinstance(axis, int) and dims.non_batch_axis(x, axis)
    if op == "Gather":
        return dims.non_batch_axis(x, attrs.get("axis", 0))
    if op.startswith("Reduce"):
        axes = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
        return axes is not None and all(dims.non_batch_axis(x, a) for a in axes)
    return False


def _static(value: Any, axis: int) -> bool:
    shape = value.shape
    return shape is not None and -len(shape) <= axis < len(shape) and isinstance(shape[axis], int)


def _gather_nd(node: Any, state: dict[Any, str], dims: _Dims) -> str:
    """GatherND(data, indices) where data is uniform and indices' first column is the
    batch index (``data[arange(B)[:, ...], rest]``): every row reads row 0's values."""
    data, indices = node.inputs
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("batch_dims", 0) or state.get(data) != _UNIFORM or not _batch_dim0(data, dims):
        return _DATA
    concat = indices.producer() if indices is not None else None
    if concat is None or concat.op_type != "Concat":
        return _DATA
    parts = list(concat.inputs)
    axis = concat.attributes["axis"].value
    rank = len(indices.shape or ())
    if axis not in (-1, rank - 1) or not parts or parts[0] is None or parts[0].shape is None:
        return _DATA
    if parts[0].shape[-1] != 1:  # the first part is the first index column
        return _DATA
    rest = [state.get(p) if p is not None else None for p in parts[1:]]
    if state.get(parts[0]) == _INDEX and all(k in (_UNIFORM, _CONST) for k in rest):
        return _UNIFORM
    return _DATA


def _covered(node: ir.Node, index: int) -> bool:
    """Whether `node`'s other inputs alone give its output shape (so input `index` may
    shrink to batch 1 and be broadcast)."""
    out = node.outputs[0].shape
    others = [v.shape for i, v in enumerate(node.inputs) if i != index and v is not None]
    if out is None or any(s is None for s in others):
        return False
    for axis in range(1, len(out) + 1):
        dims = [s[-axis] for s in others if s is not None and len(s) >= axis]
        if out[-axis] not in dims:
            return False
    return True


def _batch_one_copy(
    graph: ir.Graph, values: Sequence[ir.Value], dims: _Dims, state: dict[ir.Value, str]
) -> dict[ir.Value, ir.Value] | None:
    """Copies of the nodes computing `values`, at batch 1: each ``Shape`` of a batch-B
    tensor becomes the batch-1 shape; values free of the batch are used as they are."""
    cone: set[ir.Node] = set()
    stack = [v.producer() for v in values]
    while stack:
        node = stack.pop()
        if node is None or node in cone:
            continue
        cone.add(node)
        if node.op_type != "Shape":
            stack.extend(
                v.producer()
                for v in node.inputs
                if v is not None and not (state.get(v) == _UNIFORM and dims.batchless(v))
            )
    if any(n.op_type == "Shape" and _shape_at_one(n, dims, []) is None for n in cone):
        return None  # checked first: a copy given up halfway would leave dead nodes
    mapping: dict[ir.Value, ir.Value] = {}
    for node in [n for n in graph if n in cone]:
        # each copy right after its original: what it reads is computed by then
        new_nodes: list[ir.Node] = []
        if node.op_type == "Shape":
            shape = _shape_at_one(node, dims, new_nodes)
            assert shape is not None  # checked above
            mapping[node.outputs[0]] = shape
        else:
            copy = ir.Node(
                node.domain,
                node.op_type,
                [mapping.get(v, v) if v is not None else None for v in node.inputs],
                [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                num_outputs=len(node.outputs),
                version=node.version,
            )
            for old, new in zip(node.outputs, copy.outputs):
                if old.dtype is not None:
                    new.dtype = old.dtype
                mapping[old] = new
            new_nodes.append(copy)
        if new_nodes:
            graph.insert_after(node, new_nodes)
    return {v: mapping[v] for v in values}


def _shape_at_one(node: Any, dims: _Dims, new_nodes: list[ir.Node]) -> ir.Value | None:
    """The value `node` (a Shape) has at batch 1: a constant when the dims it reads are
    static but for the batch, else a Concat of those constants and the inputs' sizes."""
    x = node.inputs[0]
    if x is None or not dims.allowed(x):
        return None
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    start, end = attrs.get("start", 0), attrs.get("end", len(x.shape))
    read = list(x.shape)[slice(start, end)]
    pieces: list[ir.Value] = []
    static: list[int] = []
    for dim in read:
        if isinstance(dim, int) or dims.is_batch(dim):
            static.append(dim if isinstance(dim, int) else 1)
            continue
        name = dim.value if isinstance(dim, ir.SymbolicDim) else None
        if name not in dims.free:  # an expression (seq + 1): not rebuilt here
            return None
        if static:
            pieces.append(_constant(new_nodes, static))
            static = []
        source, axis = dims.free[name]
        size = ir.node("Shape", [source], {"start": axis, "end": axis + 1})
        new_nodes.append(size)
        pieces.append(size.outputs[0])
    if static or not pieces:
        pieces.append(_constant(new_nodes, static))
    if len(pieces) == 1:
        return pieces[0]
    concat = ir.node("Concat", pieces, {"axis": 0})
    new_nodes.append(concat)
    return concat.outputs[0]


def _constant(new_nodes: list[ir.Node], values: list[int]) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(np.array(values, dtype=np.int64))})
    new_nodes.append(node)
    return node.outputs[0]
