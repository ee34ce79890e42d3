"""Graph-level rewrites of the optimized copy that look further than one pattern.

`interop.optimize` runs these beside the pattern rules of `interop.rewrites`; each is
exact (the same values up to float rounding) and checks what makes it so:

- `batch_free`: a tensor the graph computes from the batch size alone, whose every
  batch row is the same (GPT-2's causal mask: positions expanded over the batch, then
  indexed with ``arange(batch)``), is computed once at batch 1 and broadcast by the
  consumer that meets the batch. With a static batch (torch.onnx's default export) it
  is a constant; in our symbolic-batch graph it was computed on every run, for every row.
- `transposed_matmul`: ``MatMul(A, B)`` between chains of Transposes and Reshapes that
  only add or drop size-1 axes becomes ``MatMul(B^T, A^T)`` with the swap folded into
  those chains, when that leaves fewer Transposes (the Flax capture writes ``P @ V`` as
  ``(V^T P^T)^T``, JAX's dot_general output order).
- `regrouped_transpose`: a Transpose between a Reshape that merges axes and one that
  splits them back is one Transpose of the original axes (GPT-2's ``K^T`` on merged
  batch and heads; ONNX Runtime does this itself only at static shapes).

>>> import interop, torch                                   # doctest: +SKIP
>>> g = interop.trace(transformers.GPT2Model(config), (ids,))
>>> batch_free(g.model.clone())   # the causal mask: one value now computed at batch 1
1
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

# ops whose output element is a function of the same (broadcast) element of each input
_ELEMENTWISE = frozenset(
    "Add Sub Mul Div Pow Mod Max Min Equal Less LessOrEqual Greater GreaterOrEqual And Or "
    "Xor Not Neg Abs Sqrt Exp Log Cast Where IsNaN IsInf Identity Sign Floor Ceil Relu "
    "BitwiseAnd BitwiseOr BitwiseNot Reciprocal".split()
)
# ops that compute shapes from shapes (their inputs and outputs are small int tensors)
_SHAPE_OPS = _ELEMENTWISE | {"Concat", "Gather", "Squeeze", "Unsqueeze", "Slice", "Reshape"}
# consumers that broadcast an input: a batch-1 value may replace a batch-B one
_BROADCASTING = _ELEMENTWISE - {"Identity", "Cast", "Not", "Neg", "Abs", "Sqrt", "Exp", "Log"}

_UNIFORM, _INDEX, _SHAPE, _DATA, _CONST = "uniform", "index", "shape", "data", "const"


def batch_free(model: ir.Model) -> int:
    """Compute batch-uniform tensors at batch 1; the number of consumers rewired.

    A value is *uniform* when its shape is static but for the batch (the symbolic dim on
    axis 0 of the graph inputs) and it equals the broadcast of what the graph computes
    at batch 1: it depends on the inputs only through their shapes, and every op on the
    way keeps that (elementwise ops, Expand, Slice / Concat / CumSum / Gather along
    static axes, and GatherND that indexes the batch axis with ``arange(batch)`` into a
    uniform tensor, where each row reads the same). Each uniform value that meets a
    batch-dependent tensor in a broadcasting op is replaced there by its batch-1 copy:
    the same nodes, with every ``Shape`` of a batch-B tensor replaced by the batch-1
    shape, which constant folding then folds when the other dims are static. Needs the
    shapes ONNX's inference gives (with data propagation: the optimizer leaves an Expand
    to a computed shape unshaped).
    """
    graph = model.graph
    batch = {
        dim.value
        for value in graph.inputs
        if value.shape is not None and len(value.shape) > 0
        for dim in value.shape[:1]
        if isinstance(dim, ir.SymbolicDim) and dim.value
    }
    if not batch or any(_has_subgraph(node) for node in graph):
        return 0
    state = _states(graph, batch)
    targets: list[tuple[ir.Node, int, ir.Value]] = []
    for node in graph:
        if state.get(node.outputs[0]) == _UNIFORM or node.op_type not in _BROADCASTING:
            continue
        for index, value in enumerate(node.inputs):
            if value is not None and state.get(value) == _UNIFORM and _covered(node, index):
                targets.append((node, index, value))
    if not targets:
        return 0
    copies = _batch_one_copy(graph, [value for _, _, value in targets], batch)
    if copies is None:
        return 0
    for node, index, value in targets:
        node.replace_input_with(index, copies[value])
    return len(targets)


def _has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for attr in node.attributes.values())  # fmt: skip


def _static_but_batch(value: Any, batch: set[str]) -> bool:
    shape = value.shape
    return shape is not None and all(
        isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value in batch) for d in shape
    )


def _static_axis(value: Any, axis: int) -> bool:
    shape = value.shape
    return shape is not None and -len(shape) <= axis < len(shape) and isinstance(shape[axis], int)


def _tensor(value: ir.Value | None) -> Any:
    tensor = None if value is None else value.const_value
    producer = None if value is None else value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")  # not lifted to an initializer yet
        tensor = None if attr is None else attr.value
    return tensor


def _ints(value: ir.Value | None) -> list[int] | None:
    tensor = _tensor(value)
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


def _states(graph: ir.Graph, batch: set[str]) -> dict[ir.Value, str]:
    """Each value's kind: uniform over the batch, the batch index, a shape, data or constant."""
    state: dict[ir.Value, str] = {v: _DATA for v in graph.inputs}
    for value in graph.initializers.values():
        state[value] = _CONST
    for node in graph:
        kind = _kind(node, state, batch)
        for output in node.outputs:
            state[output] = kind
    return state


def _kind(node: Any, state: dict[Any, str], batch: set[str]) -> str:  # noqa: PLR0911
    op, out = node.op_type, node.outputs[0]
    kinds = [state.get(v, _DATA) if v is not None else _CONST for v in node.inputs]
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return _DATA
    if op == "Constant":
        return _CONST
    if op == "Shape":
        return _SHAPE
    if kinds and all(k in (_SHAPE, _CONST) for k in kinds) and op in _SHAPE_OPS:
        return _CONST if all(k == _CONST for k in kinds) else _SHAPE
    if not _static_but_batch(out, batch):
        return _DATA
    first, rest = (kinds[0], kinds[1:]) if kinds else (_DATA, [])
    uniform = (_UNIFORM, _CONST)
    if op == "ConstantOfShape" and first in (_SHAPE, _CONST):
        return _UNIFORM
    if op in _ELEMENTWISE and all(k in uniform for k in kinds):
        return _UNIFORM
    if op == "Expand" and first in uniform and rest[0] in (_SHAPE, _CONST):
        return _UNIFORM
    if op == "Expand" and first == _INDEX and rest[0] in (_SHAPE, _CONST):
        same_rank = len(node.inputs[0].shape or ()) == len(out.shape or ())
        return _INDEX if same_rank and _batch_dim0(out, batch) else _DATA
    if op == "Range" and _ints(node.inputs[0]) == [0] and _ints(node.inputs[2]) == [1]:
        return _INDEX if len(out.shape or ()) == 1 and _batch_dim0(out, batch) else _DATA
    if op == "Unsqueeze" and first == _INDEX and 0 not in (_ints(node.inputs[1]) or [0]):
        return _INDEX
    if op == "Concat" and all(k in uniform for k in kinds):
        return _UNIFORM if _keeps_uniform(node) else _DATA
    if first not in uniform or any(k != _CONST for k in rest):
        return _gather_nd(node, state, batch) if op == "GatherND" else _DATA
    return _UNIFORM if _keeps_uniform(node) else _DATA


def _batch_dim0(value: Any, batch: set[str]) -> bool:
    shape = value.shape
    return bool(shape) and isinstance(shape[0], ir.SymbolicDim) and shape[0].value in batch


def _keeps_uniform(node: Any) -> bool:
    """Whether an op on one uniform input (the others constant) gives a uniform output."""
    op, x = node.op_type, node.inputs[0]
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if op in ("Transpose", "Identity"):
        return True
    if op in ("Unsqueeze", "Squeeze"):  # Squeeze of static size-1 axes only
        axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        return op == "Unsqueeze" or (axes is not None and all(_static_axis(x, a) for a in axes))
    if op == "Slice":
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else None
        return axes is not None and all(_static_axis(x, a) for a in axes)
    if op in ("Concat", "Softmax", "LogSoftmax", "CumSum"):
        cumsum_axis: list[Any] = _ints(node.inputs[1]) or [None]
        axis = attrs.get("axis", -1) if op != "CumSum" else cumsum_axis[0]
        return isinstance(axis, int) and _static_axis(x, axis)
    if op == "Gather":
        return _static_axis(x, attrs.get("axis", 0))
    if op.startswith("Reduce"):
        axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
        return axes is not None and all(_static_axis(x, a) for a in axes)
    return False


def _gather_nd(node: Any, state: dict[Any, str], batch: set[str]) -> str:
    """GatherND(data, indices) where data is uniform and indices' first column is the
    batch index (``data[arange(B)[:, ...], rest]``): every row reads row 0's values."""
    data, indices = node.inputs
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if attrs.get("batch_dims", 0) or state.get(data) != _UNIFORM or not _batch_dim0(data, batch):
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
    graph: ir.Graph, values: Sequence[ir.Value], batch: set[str]
) -> dict[ir.Value, ir.Value] | None:
    """Copies of the nodes computing `values`, at batch 1: each ``Shape`` of a batch-B
    tensor becomes the batch-1 shape (a constant when the other dims are static)."""
    cone: set[ir.Node] = set()
    stack = [v.producer() for v in values]
    while stack:
        node = stack.pop()
        if node is None or node in cone:
            continue
        cone.add(node)
        if node.op_type != "Shape":
            stack.extend(v.producer() for v in node.inputs if v is not None)
    mapping: dict[ir.Value, ir.Value] = {}
    new_nodes: list[ir.Node] = []
    for node in graph:
        if node not in cone:
            continue
        if node.op_type == "Shape":
            shape = _shape_at_one(node, batch)
            if shape is None:
                return None
            constant = ir.node("Constant", [], {"value": ir.tensor(shape, name=None)})
            new_nodes.append(constant)
            mapping[node.outputs[0]] = constant.outputs[0]
            continue
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
    first = next(iter(graph))
    graph.insert_before(first, new_nodes)
    return {v: mapping[v] for v in values}


def _shape_at_one(node: Any, batch: set[str]) -> np.ndarray | None:
    """The value `node` (a Shape) has at batch 1, when its input's dims are static but
    for the batch."""
    x = node.inputs[0]
    if x is None or not _static_but_batch(x, batch):
        return None
    dims = [d if isinstance(d, int) else 1 for d in x.shape]
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return np.array(dims[slice(start, end)], dtype=np.int64)


def transposed_matmul(model: ir.Model) -> int:
    """``MatMul(A, B)`` becomes ``MatMul(B^T, A^T)`` where that leaves fewer Transposes.

    A and B are followed back, and the product forward, through Transposes and Reshapes
    that only add or drop size-1 axes (each value on the way used once); each of the three
    chains becomes at most one Transpose (none where the order of the axes larger than 1
    is kept) and a Squeeze / Unsqueeze of size-1 axes. ``(A B)^T = B^T A^T`` over the last
    two axes, so the values are the same. Returns the number of MatMuls rewritten.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            count += _swap_matmul(model.graph, node)
    return count


def _same_dims(a: Sequence[object], b: Sequence[object]) -> bool:
    def key(d: object) -> object:
        return d if isinstance(d, int) else getattr(d, "value", None) or object()

    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))


def _step(node: Any) -> tuple[str, list[Any]] | None:
    """A Transpose's perm, or the output shape of a reshape that only moves size-1 axes."""
    x, out = node.inputs[0] if node.inputs else None, node.outputs[0]
    if node.domain not in ("", "ai.onnx") or x is None or x.shape is None or out.shape is None:
        return None
    if node.op_type == "Transpose":
        perm = node.attributes.get("perm")
        return ("perm", list(perm.value) if perm is not None else list(range(len(x.shape)))[::-1])
    if node.op_type in ("Reshape", "Squeeze", "Unsqueeze"):
        big_in = [d for d in x.shape if d != 1]
        big_out = [d for d in out.shape if d != 1]
        if _same_dims(big_in, big_out):
            return ("shape", list(out.shape))
    return None


def _back(value: Any) -> tuple[Any, list[tuple[str, list]], int]:
    """The chain of moves ending at `value`: its start, its steps, its Transposes."""
    steps: list[tuple[str, list]] = []
    transposes = 0
    while len(value.uses()) == 1 and not value.is_graph_output():
        producer = value.producer()
        step = None if producer is None else _step(producer)
        if producer is None or step is None:
            break
        steps.insert(0, step)
        transposes += producer.op_type == "Transpose"
        value = producer.inputs[0]
    return value, steps, transposes


def _forward(value: Any) -> tuple[Any, list[tuple[str, list]], int]:
    steps: list[tuple[str, list]] = []
    transposes = 0
    while len(value.uses()) == 1 and not value.is_graph_output():
        consumer, index = next(iter(value.uses()))
        step = _step(consumer) if index == 0 else None
        if step is None:
            break
        steps.append(step)
        transposes += consumer.op_type == "Transpose"
        value = consumer.outputs[0]
    return value, steps, transposes


def _swap(rank: int) -> tuple[str, list[int]]:
    return ("perm", [*range(rank - 2), rank - 1, rank - 2])


def _order(shape: Sequence[object], steps: Sequence[tuple[str, list]]) -> list[int]:
    """Where the start's axes larger than 1 end up after `steps`, in order."""
    labels: list[int | None] = _labels(shape)
    for kind, arg in steps:
        if kind == "perm":
            labels = [labels[p] for p in arg]
        else:
            big = iter([label for label in labels if label is not None])
            labels = [None if d == 1 else next(big) for d in arg]
    return [label for label in labels if label is not None]


def _swap_matmul(graph: ir.Graph, matmul: Any) -> int:
    a, b = matmul.inputs
    c = matmul.outputs[0]
    if a is None or b is None or any(v.shape is None or len(v.shape) < 2 for v in (a, b, c)):
        return 0
    base_a, steps_a, count_a = _back(a)
    base_b, steps_b, count_b = _back(b)
    out, steps_c, count_c = _forward(c)
    if out.is_graph_output() or any(v.shape is None for v in (base_a, base_b, out)):
        return 0
    chains = [
        (base_a, [*steps_a, _swap(len(a.shape))]),
        (base_b, [*steps_b, _swap(len(b.shape))]),
    ]
    c_swapped = [*c.shape[:-2], c.shape[-1], c.shape[-2]]
    out_steps = [_swap(len(c.shape)), *steps_c]
    orders = [_order(base.shape, steps) for base, steps in chains]
    orders.append(_order(c_swapped, out_steps))
    after = sum(order != sorted(order) for order in orders)
    if after >= count_a + count_b + count_c:
        return 0
    new_nodes: list[ir.Node] = []
    a_t = _build(base_a, orders[0], [*a.shape[:-2], a.shape[-1], a.shape[-2]], new_nodes)
    b_t = _build(base_b, orders[1], [*b.shape[:-2], b.shape[-1], b.shape[-2]], new_nodes)
    product = ir.node("MatMul", [b_t, a_t])
    product.outputs[0].shape = ir.Shape(c_swapped)
    product.outputs[0].dtype = c.dtype
    new_nodes.append(product)
    result = _build(product.outputs[0], orders[2], list(out.shape), new_nodes)
    graph.insert_before(matmul, new_nodes)
    out.replace_all_uses_with(result)
    return 1


def _build(base: Any, order: list[int], target: list[Any], nodes: list[ir.Node]) -> Any:
    """`base` with its axes larger than 1 in `order` and the shape `target`: a Transpose
    (when the order changes), then a Squeeze / Unsqueeze of size-1 axes (when they move)."""
    shape = list(base.shape)
    value = base
    if order != sorted(order):
        units = [i for i, d in enumerate(shape) if d == 1]
        if len(target) == len(shape):  # size-1 axes where the target has them: no reshape
            spare, big = iter(units), iter(order)
            perm = [next(spare) if d == 1 else next(big) for d in target]
        else:
            perm = units + order
        value = _add(nodes, "Transpose", [value], {"perm": perm}, [shape[p] for p in perm], base)
        shape = [shape[p] for p in perm]
    if not _same_dims(shape, target):
        squeeze = [i for i, d in enumerate(shape) if d == 1]
        if squeeze:
            shape = [d for d in shape if d != 1]
            value = _add(nodes, "Squeeze", [value, _axes(nodes, squeeze)], {}, shape, base)
        unsqueeze = [i for i, d in enumerate(target) if d == 1]
        if unsqueeze:
            value = _add(nodes, "Unsqueeze", [value, _axes(nodes, unsqueeze)], {}, target, base)
    return value


def _axes(nodes: list[ir.Node], axes: list[int]) -> ir.Value:
    constant = ir.node("Constant", [], {"value": ir.tensor(np.array(axes, dtype=np.int64))})
    nodes.append(constant)
    return constant.outputs[0]


def _add(
    nodes: list[ir.Node], op: str, inputs: list[Any], attrs: dict, shape: list, like: Any
) -> Any:
    node = ir.node(op, inputs, attrs)
    node.outputs[0].shape = ir.Shape(shape)
    node.outputs[0].dtype = like.dtype  # the value moved, not converted
    nodes.append(node)
    return node.outputs[0]


def regrouped_transpose(model: ir.Model) -> int:
    """``Reshape(Transpose(Reshape(x)))`` that merges axes, transposes the groups and splits
    them back becomes one ``Transpose(x)`` (a scalar Mul on the way stays, after it).

    GPT-2's K (torch's ``k.transpose(-1, -2)`` on ``[batch * heads, seq, d]``, then back to
    4-D): with the Transpose before it, the optimizer merges the two into one; ONNX
    Runtime does that itself only at static shapes (torch.onnx's export), and then takes
    the scale into its FusedMatMul. Returns the number of chains rewritten.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
            count += _regroup(model.graph, node)
    return count


def _groups(dims: Sequence[Any], target: list[int]) -> list[list[int]] | None:
    """Which consecutive axes of `dims` each entry of a Reshape's `target` merges (one -1
    at most, taking what the static entries around it leave); None if it does not."""
    if target.count(-1) > 1 or any(v == 0 or v < -1 for v in target):
        return None

    def take(axes: Iterable[int], want: int) -> list[int] | None:
        group, size = [], 1
        for axis in axes:
            if size >= want or not isinstance(dims[axis], int):
                break
            group.append(axis)
            size *= dims[axis]
        return group if group and size == want else None

    split = target.index(-1) if -1 in target else len(target)
    groups: list[list[int]] = []
    start = 0
    for want in target[:split]:
        group = take(range(start, len(dims)), want)
        if group is None:
            return None
        groups.append(group)
        start = group[-1] + 1
    tail: list[list[int]] = []
    stop = len(dims)
    for want in reversed(target[split + 1 :]):
        group = take(range(stop - 1, start - 1, -1), want)
        if group is None:
            return None
        tail.insert(0, sorted(group))
        stop = min(group)
    if split < len(target):
        if stop <= start:
            return None
        groups.append(list(range(start, stop)))
    elif stop != start:
        return None
    return groups + tail


def _regroup(graph: ir.Graph, transpose: Any) -> int:
    merge = transpose.inputs[0].producer() if transpose.inputs[0] is not None else None
    if merge is None or merge.op_type != "Reshape" or len(transpose.inputs[0].uses()) != 1:
        return 0
    x, target = merge.inputs[0], _ints(merge.inputs[1])
    if x is None or x.shape is None or target is None:
        return 0
    groups = _groups(list(x.shape), target)
    perm_attr = transpose.attributes.get("perm")
    if groups is None or perm_attr is None:
        return 0
    perm = [axis for group_index in perm_attr.value for axis in groups[group_index]]
    value, scale = transpose.outputs[0], None
    consumer = _only_consumer(value)
    if consumer is not None and consumer.op_type == "Mul":
        other = consumer.inputs[1] if consumer.inputs[0] is value else consumer.inputs[0]
        if _tensor(other) is not None and _tensor(other).size == 1:
            scale, value = other, consumer.outputs[0]
            consumer = _only_consumer(value)
    if consumer is None or consumer.op_type != "Reshape" or consumer.inputs[0] is not value:
        return 0
    out = consumer.outputs[0]
    expected = [x.shape[axis] for axis in perm]
    if out.shape is None or out.is_graph_output() or not _same_dims(list(out.shape), expected):
        return 0
    nodes: list[ir.Node] = []
    result = _add(nodes, "Transpose", [x], {"perm": perm}, expected, x)
    if scale is not None:
        result = _add(nodes, "Mul", [result, scale], {}, expected, x)
    graph.insert_before(consumer, nodes)
    out.replace_all_uses_with(result)
    # the old chain goes now: a rule matching the Transpose before it needs its only use
    chain = [consumer, value.producer(), transpose, merge]
    for node in dict.fromkeys(chain):  # the Mul when there is one, in order
        if all(not o.uses() for o in node.outputs):
            graph.remove(node, safe=True)
    return 1


def _only_consumer(value: Any) -> Any:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


def _labels(dims: Iterable[object]) -> list[int | None]:
    return [None if d == 1 else i for i, d in enumerate(dims)]
