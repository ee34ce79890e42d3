"""Graph-level rewrites of the optimized copy that look further than one pattern.

`interop.optimize` runs these beside the pattern rules of `interop.rewrites`; each is
exact (the same values up to float rounding) and checks what makes it so:

- `transposed_matmul`: ``MatMul(A, B)`` between chains of Transposes and Reshapes that
  only add or drop size-1 axes becomes ``MatMul(B^T, A^T)`` with the swap folded into
  those chains, when that leaves fewer Transposes (the Flax capture writes ``P @ V`` as
  ``(V^T P^T)^T``, JAX's dot_general output order).
- `regrouped_transpose`: a Transpose between a Reshape that merges axes and one that
  splits them back is one Transpose of the original axes (GPT-2's ``K^T`` on merged
  batch and heads; ONNX Runtime does this itself only at static shapes).

The batch-1 values (GPT-2's causal mask) are in `interop.optimize_batch`.

>>> import interop, torch                                   # doctest: +SKIP
>>> g = interop.trace(transformers.GPT2Model(config), (ids,))
>>> regrouped_transpose(g.model.clone())   # K^T: one Transpose per block
2
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir


def has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for attr in node.attributes.values())  # fmt: skip


def _tensor(value: ir.Value | None) -> Any:
    tensor = None if value is None else value.const_value
    producer = None if value is None else value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")  # not lifted to an initializer yet
        tensor = None if attr is None else attr.value
    return tensor


def const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = _tensor(value)
    return None if tensor is None else [int(v) for v in np.asarray(tensor.numpy()).reshape(-1)]


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


def _groups(dims: Sequence[Any], target: Sequence[Any]) -> list[list[int]] | None:
    """Which consecutive axes of `dims` each entry of a Reshape's `target` merges (one -1
    at most, taking what the other entries around it leave; a symbolic entry is the one
    axis of that symbol); None if it does not."""
    ints = [v for v in target if isinstance(v, int)]
    if ints.count(-1) > 1 or any(v == 0 or v < -1 for v in ints):
        return None

    def take(axes: Iterable[int], want: Any) -> list[int] | None:
        if not isinstance(want, int):
            axis = next(iter(axes), None)
            return [axis] if axis is not None and _same_dims([dims[axis]], [want]) else None
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
    x, target = merge.inputs[0], _reshape_target(merge)
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


def _reshape_target(reshape: Any) -> list[Any] | None:
    """A Reshape's target: its constant, or, computed at run time (a dynamic sequence),
    the shape inference gives its output, where a dim not among the input's (a merged
    ``batch * heads``, or unnamed) is -1 (one at most, else `_groups` refuses it)."""
    target = const_ints(reshape.inputs[1])
    x, out = reshape.inputs[0], reshape.outputs[0].shape
    if target is not None or out is None or x is None or x.shape is None:
        return target
    names = {d.value for d in x.shape if isinstance(d, ir.SymbolicDim) and d.value}
    return [d if isinstance(d, int) or d.value in names else -1 for d in out]


def _only_consumer(value: Any) -> Any:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


def _labels(dims: Iterable[object]) -> list[int | None]:
    return [None if d == 1 else i for i, d in enumerate(dims)]
