"""Rewrites of multi-node ONNX patterns into fewer, native torch calls (used by emit_calls).

Two kinds, both decided at emission from the ONNX graph and kept exact in meaning:

* **Shape arithmetic as Python numbers.** Exporters compute reshape targets and attention
  scales at run time from ``Shape`` (``Concat(64, Reshape(Squeeze(Shape(x)[0:1]), [-1]),
  32)``, ``1 / Sqrt(CastLike(Shape(q)[-1]))``). Run as ops, every step is a Python call on
  a tiny int64 tensor. Here such a value is a `Sym` handle: a list of Python ints/floats
  and fx nodes that produce them (``x.size(0)``, ``a * b``, ``math.sqrt(d)``), so
  ``Reshape`` becomes ``torch.reshape(x, [64, x.size(0) * 8, 32])`` and a scalar scale a
  Python float. Dims are read at run time (never taken from the file's declared shapes),
  so dynamic dims stay dynamic. A `Sym` that reaches any other op becomes a tensor then
  (``torch.tensor(items)``), so nothing else changes meaning.
* **Attention.** ``MatMul(Softmax(MatMul(Q * a, K^T * b) [+ mask], axis=-1), V)`` is
  ``F.scaled_dot_product_attention(Q, K, V, attn_mask=mask, scale=a * b)`` when the
  Softmax and the scores have no other reader and Q, K, V are float tensors of one rank.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx

from interop.normalize import DEFAULT_DOMAINS

from .emit_values import Deferred

_INTS = (np.dtype(np.int64), np.dtype(np.int32))
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_MAX_ITEMS = 16  # longer constant vectors are data, not shapes


def sym_tensor(ref: torch.Tensor, items: list, dtype: torch.dtype, scalar: bool) -> torch.Tensor:
    """A `Sym` as the tensor ONNX would hold (only where an op needs a tensor)."""
    return torch.tensor(items[0] if scalar else items, dtype=dtype, device=ref.device)


def trunc_div(a: int, b: int) -> int:
    """ONNX integer Div: truncates toward zero."""
    quotient = abs(a) // abs(b)
    return quotient if (a >= 0) == (b >= 0) else -quotient


class Sym(Deferred):
    """A small int or float value (rank 0 or 1) held as Python numbers and fx nodes."""

    def __init__(
        self,
        emitter: Any,
        value: ir.Value,
        items: list,
        scalar: bool,
        dtype: np.dtype,
        ref: fx.Node,
    ):
        super().__init__(emitter, value)
        self.items, self.scalar, self.np_dtype, self.ref = items, scalar, dtype, ref

    def node(self) -> fx.Node:
        if self._node is None:
            dtype = torch.from_numpy(np.zeros(0, self.np_dtype)).dtype
            self._node = _pure(
                self.emitter,
                sym_tensor,
                (self.ref, list(self.items)),
                {"dtype": dtype, "scalar": self.scalar},
            )
        return self._node


def _pure(emitter: Any, function: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """An fx call without side effects; erased at build when nothing reads it."""
    node = emitter.fx_graph.call_function(function, args, kwargs or {})
    emitter.maybe_dead.append(node)
    return node


def _size(emitter: Any, tensor: fx.Node, dim: int) -> fx.Node:
    """``tensor.size(dim)``, one node per (tensor, dim) so equal dims are the same node."""
    cache = emitter.sym_sizes
    if (tensor, dim) not in cache:
        node = emitter.fx_graph.call_method("size", (tensor, dim))
        emitter.maybe_dead.append(node)
        cache[tensor, dim] = node
    return cache[tensor, dim]


def _operand(emitter: Any, value: ir.Value | None, handle: Any) -> Sym | tuple | None:
    """A node input as symbolic items: the `Sym` itself, or (items, scalar, dtype) of a
    small int/float constant; None for anything else."""
    if isinstance(handle, Sym):
        return handle
    array = emitter.static.get(value) if value is not None else None
    if array is None or np.ndim(array) > 1 or np.size(array) > _MAX_ITEMS:
        return None
    array = np.asarray(array)
    if array.dtype not in _INTS + _FLOATS:
        return None
    return [v.item() for v in array.reshape(-1)], array.ndim == 0, array.dtype


def _parts(operand: Any) -> tuple[list, bool, np.dtype, fx.Node | None]:
    if isinstance(operand, Sym):
        return list(operand.items), operand.scalar, operand.np_dtype, operand.ref
    items, scalar, dtype = operand
    return items, scalar, dtype, None


def _static_ints(emitter: Any, value: ir.Value | None) -> list[int] | None:
    array = emitter.static.get(value) if value is not None else None
    if array is None or np.asarray(array).dtype not in _INTS:
        return None
    return [int(v) for v in np.asarray(array).reshape(-1)]


def _binary(emitter: Any, op: Any, a: Any, b: Any) -> Any:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return _pure(emitter, op, (a, b))
    return op(a, b)


_ARITHMETIC = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul}


def symbolic(emitter: Any, node: ir.Node, args: list, env: Any) -> Sym | None:
    """The node's output as a `Sym` when its inputs allow (see the module docstring)."""
    op = node.op_type
    out = node.outputs[0]
    if op == "Shape":
        data = args[0]
        rank = _rank(node.inputs[0], env)
        if not isinstance(data, fx.Node) or rank is None:
            return None
        attrs = emitter.node_attributes(node)
        dims = list(range(rank))[attrs.get("start", 0) : attrs.get("end")]
        items = [_size(emitter, data, d) for d in dims]
        return Sym(emitter, out, items, False, np.dtype(np.int64), data)
    if not any(isinstance(a, Sym) for a in args):
        return None
    first = args[0] if isinstance(args[0], Sym) else None
    if op == "Identity" and first is not None:
        return Sym(emitter, out, first.items, first.scalar, first.np_dtype, first.ref)
    if op in ("Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape") and first is None:
        return None
    if op == "Gather":
        index = emitter.static.get(node.inputs[1])
        if emitter.node_attributes(node).get("axis", 0) != 0 or first.scalar or index is None:
            return None
        picked = [first.items[int(i)] for i in np.asarray(index).reshape(-1)]
        return Sym(emitter, out, picked, np.ndim(index) == 0, first.np_dtype, first.ref)
    if op == "Slice":
        bounds = [_static_ints(emitter, v) for v in node.inputs[1:]]
        if first.scalar or any(b is None for b in bounds[:2]) or len(node.inputs) > 5:
            return None
        starts, ends, *rest = bounds
        axes = rest[0] if rest else [0]
        steps = rest[1] if len(rest) > 1 else [1]
        if len(starts) != 1 or axes not in ([0], [-1]) or steps is None or steps == [0]:
            return None
        picked = first.items[slice(starts[0], ends[0], steps[0])]
        return Sym(emitter, out, picked, False, first.np_dtype, first.ref)
    if op == "Squeeze":
        axes = _static_ints(emitter, node.inputs[1]) if len(node.inputs) > 1 else None
        if first.scalar or len(first.items) != 1 or axes not in (None, [0], [-1]):
            return None
        return Sym(emitter, out, first.items, True, first.np_dtype, first.ref)
    if op == "Unsqueeze":
        if not first.scalar or _static_ints(emitter, node.inputs[1]) not in ([0], [-1]):
            return None
        return Sym(emitter, out, first.items, False, first.np_dtype, first.ref)
    if op == "Reshape":
        shape = _static_ints(emitter, node.inputs[1])
        count = len(first.items)
        if shape not in ([-1], [count]) and not (shape == [] and count == 1):
            return None
        return Sym(emitter, out, first.items, shape == [], first.np_dtype, first.ref)
    if op == "Concat":
        operands = [_operand(emitter, v, a) for v, a in zip(node.inputs, args)]
        if any(o is None for o in operands):
            return None
        parts = [_parts(o) for o in operands]
        dtypes = {p[2] for p in parts}
        if any(p[1] for p in parts) or len(dtypes) != 1 or dtypes.pop() not in _INTS:
            return None
        ref = next(p[3] for p in parts if p[3] is not None)
        items = [item for p in parts for item in p[0]]
        return Sym(emitter, out, items, False, parts[0][2], ref)
    if op in ("Cast", "CastLike"):
        if first is None:
            return None
        target = node.outputs[0].dtype
        if op == "CastLike" and node.inputs[1] is not None:
            target = _dtype(node.inputs[1], env)
        if target is None:
            return None
        dtype = np.dtype(target.numpy())
        if dtype == first.np_dtype:
            items = first.items
        elif dtype in _FLOATS and first.np_dtype in _INTS + _FLOATS:
            items = [_binary(emitter, operator.mul, i, 1.0) for i in first.items]  # int -> float
        elif dtype in _INTS and first.np_dtype in _INTS:
            items = first.items
        else:
            return None
        return Sym(emitter, out, items, first.scalar, dtype, first.ref)
    if op == "Sqrt":
        if first is None or first.np_dtype not in _FLOATS:
            return None
        items = [
            _pure(emitter, math.sqrt, (i,)) if isinstance(i, fx.Node) else math.sqrt(i)
            for i in first.items
        ]
        return Sym(emitter, out, items, first.scalar, first.np_dtype, first.ref)
    if op in ("Add", "Sub", "Mul", "Div"):
        operands = [_operand(emitter, v, a) for v, a in zip(node.inputs, args)]
        if len(operands) != 2 or any(o is None for o in operands):
            return None
        (a, a_scalar, a_dtype, a_ref), (b, b_scalar, b_dtype, b_ref) = map(_parts, operands)
        if a_dtype != b_dtype or (len(a) != len(b) and 1 not in (len(a), len(b))):
            return None
        if op == "Div":
            function = trunc_div if a_dtype in _INTS else operator.truediv
        else:
            function = _ARITHMETIC[op]
        length = max(len(a), len(b))
        a, b = (a * length if len(a) == 1 else a), (b * length if len(b) == 1 else b)
        items = [_binary(emitter, function, x, y) for x, y in zip(a, b)]
        return Sym(emitter, out, items, a_scalar and b_scalar, a_dtype, a_ref or b_ref)
    return None


def scalar_operand(emitter: Any, node: ir.Node, args: list, env: Any) -> Any:
    """``tensor * s`` (+, -, /) with a one-element float operand ``s`` (a `Sym` or a constant
    of the graph) as a Python float, not a tensor: torch casts it to the tensor's dtype,
    which is the constant's own dtype here, so the result is the same."""
    if node.op_type not in ("Add", "Sub", "Mul", "Div") or len(args) != 2:
        return None
    functions = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}
    for index in (0, 1):
        scalar, tensor = args[index], args[1 - index]
        operand = _operand(emitter, node.inputs[index], scalar)
        dtype, rank = _info(node.inputs[1 - index], env)
        if operand is None or not isinstance(tensor, fx.Node) or dtype is None:
            continue
        items, is_scalar, np_dtype, _ = _parts(operand)
        if (
            len(items) == 1
            and (is_scalar or (rank or 0) >= 1)  # a [1] operand must not add a dim
            and np_dtype in _FLOATS
            and np.dtype(dtype.numpy()) == np_dtype
            and (index == 1 or node.op_type in ("Add", "Mul"))
        ):
            return functions[node.op_type], [tensor, items[0]], {}
    return None


def reshape_dims(emitter: Any, node: ir.Node, args: list) -> Any:
    """``Reshape(x, <Sym>)`` as ``torch.reshape(x, [items])``."""
    shape = args[1] if len(args) == 2 else None
    if not isinstance(shape, Sym) or shape.scalar or shape.np_dtype not in _INTS:
        return None
    items = list(shape.items)
    if not emitter.node_attributes(node).get("allowzero", 0):  # a 0 keeps the input's dim
        if any(isinstance(i, fx.Node) for i in items):
            return onnx_reshape_items, [args[0], items], {}
        items = [_size(emitter, args[0], d) if i == 0 else i for d, i in enumerate(items)]
    return torch.reshape, [args[0], items], {}


def onnx_reshape_items(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """ONNX Reshape (allowzero=0) to run-time dims: a 0 keeps the input's dim."""
    return torch.reshape(x, [x.shape[i] if d == 0 else d for i, d in enumerate(dims)])


# ---------------------------------------------------------------------------- attention


def _single_reader(value: ir.Value, node: ir.Node) -> bool:
    uses = list(value.uses())
    return len(uses) == 1 and uses[0][0] is node and not value.is_graph_output()


_SAME_AS_FIRST = {
    "Identity", "Sqrt", "Softmax", "Relu", "Neg", "Exp", "Erf", "Tanh", "Sigmoid", "Transpose",
    "Dropout", "LayerNormalization",
}  # fmt: skip
_BROADCAST = {"Add", "Sub", "Mul", "Div", "MatMul", "Where"}


def _info(
    value: ir.Value | None, env: Any = None, depth: int = 0, memo: dict | None = None
) -> tuple[Any, int | None]:
    """(ONNX dtype, rank) of a value, from the file or, where the exporter left them out
    (torch.onnx's attention decomposition), from its producers; None when unknown."""
    if value is None:
        return None, None
    # each value once per question: without it, chains of broadcasting ops on untyped values
    # (a TorchScript BERT's attention mask) are walked once per path, exponentially many
    memo = {} if memo is None else memo
    if id(value) not in memo:
        memo[id(value)] = (None, None)  # while it is being worked out
        memo[id(value)] = _info_from_producers(value, env, depth, memo)
    return memo[id(value)]


def _info_from_producers(
    value: ir.Value, env: Any, depth: int, memo: dict
) -> tuple[Any, int | None]:
    dtype, rank = value.dtype, (len(value.shape) if value.shape is not None else None)
    handle = env.get(value) if env is not None else None
    if isinstance(handle, Sym):
        return dtype or ir.DataType.from_numpy(handle.np_dtype), 0 if handle.scalar else 1
    if value.const_value is not None:
        return value.const_value.dtype, len(value.const_value.shape)
    producer = value.producer()
    if (dtype is not None and rank is not None) or producer is None or depth > 24:
        return dtype, rank
    op, inputs = producer.op_type, producer.inputs
    first = _info(inputs[0], env, depth + 1, memo) if inputs else (None, None)
    if op in _SAME_AS_FIRST:
        found = first
    elif op in _BROADCAST:
        infos = [_info(v, env, depth + 1, memo) for v in inputs if v is not None]
        dtypes = {d for d, _ in infos if d is not None}
        ranks = [r for _, r in infos]
        found = (
            dtypes.pop() if len(dtypes) == 1 else None,
            max(ranks) if None not in ranks else None,
        )
    elif op == "CastLike":
        found = (_info(inputs[1], env, depth + 1, memo)[0], first[1])
    elif op == "Reshape":
        shape = env.get(inputs[1]) if env is not None else None
        if isinstance(shape, Sym):
            length = None if shape.scalar else len(shape.items)
        elif isinstance(shape, Deferred):
            array = shape.array if shape.array is not None else shape.value.const_value.numpy()
            length = np.size(array) if np.ndim(array) == 1 else None
        else:
            length = None
        found = (first[0], length)
    elif op in ("Unsqueeze", "Squeeze") and len(inputs) > 1 and first[1] is not None:
        axes = inputs[1].const_value
        step = (1 if op == "Unsqueeze" else -1) * (axes.size if axes is not None else 0)
        found = (first[0], first[1] + step if axes is not None else None)
    elif op == "Gemm":
        found = (first[0], 2)
    else:
        found = (None, None)
    return dtype or found[0], rank if rank is not None else found[1]


def _rank(value: ir.Value | None, env: Any = None) -> int | None:
    return _info(value, env)[1]


def _dtype(value: ir.Value | None, env: Any = None) -> Any:
    return _info(value, env)[0]


def _scalar_factor(emitter: Any, value: ir.Value, handle: Any) -> Any:
    """A float scalar multiplier as a Python float or an fx node giving one; None if not."""
    if isinstance(handle, Sym):
        if handle.np_dtype in _FLOATS and len(handle.items) == 1:
            return handle.items[0]
        return None
    array = emitter.static.get(value)
    if array is not None and np.asarray(array).size == 1 and np.asarray(array).dtype in _FLOATS:
        return float(np.asarray(array).reshape(-1)[0])
    return None


def _default(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in DEFAULT_DOMAINS


def _peel_scale(emitter: Any, value: ir.Value, reader: ir.Node, env: Any) -> tuple:
    """(operand, factor, the Mul/Div node or None): ``x * s`` / ``s * x`` / ``x / s`` -> x, s."""
    producer = value.producer()
    if not (_default(producer, "Mul") or _default(producer, "Div")) or not _single_reader(
        value, reader
    ):
        return value, 1.0, None
    for index in (1, 0) if producer.op_type == "Mul" else (1,):
        factor_value, operand = producer.inputs[index], producer.inputs[1 - index]
        factor = _scalar_factor(emitter, factor_value, env[factor_value])
        operand_rank = _rank(operand, env)
        if factor is None or operand_rank is None or operand_rank < 1:
            continue
        if producer.op_type == "Div":
            factor = _binary(emitter, operator.truediv, 1.0, factor)
        return operand, factor, producer
    return value, 1.0, None


def _key(emitter: Any, kt: ir.Value, rank: int, env: Any) -> tuple[Any, list[ir.Value]]:
    """K for K^T: the input of a Transpose of the last two axes, or of torch.onnx's spelling
    ``Reshape(Transpose(Reshape(K, [-1, S, E]), [0, 2, 1]), [*batch, E, S])`` (checked on the
    `Sym` dims); else ``K^T.transpose(-2, -1)``. Also the K^T values a match leaves unread."""
    transpose = kt.producer()
    perm = [*range(rank - 2), rank - 1, rank - 2]
    if (
        _default(transpose, "Transpose")
        and list(emitter.node_attributes(transpose).get("perm") or []) == perm
    ):
        source = env[transpose.inputs[0]]
        if isinstance(source, fx.Node):
            return source, [kt]
    outer = transpose
    readers = [u for u in kt.uses() if not (u[0].op_type == "CastLike" and u[1] == 1)]
    if _default(outer, "Reshape") and len(readers) == 1 and not kt.is_graph_output():
        transpose = outer.inputs[0].producer()
        inner = transpose.inputs[0].producer() if _default(transpose, "Transpose") else None
        if (
            _default(inner, "Reshape")
            and list(emitter.node_attributes(transpose).get("perm") or []) == [0, 2, 1]
            and len(list(outer.inputs[0].uses())) == 1
            and len(list(inner.outputs[0].uses())) == 1
        ):
            key = env[inner.inputs[0]]
            flat, back = env[inner.inputs[1]], env[outer.inputs[1]]
            if isinstance(key, fx.Node) and isinstance(flat, Sym) and isinstance(back, Sym):
                dims = [_size(emitter, key, d) for d in range(rank)]
                if flat.items == [-1, dims[-2], dims[-1]] and back.items == [
                    *dims[:-2],
                    dims[-1],
                    dims[-2],
                ]:
                    return key, [inner.outputs[0], outer.inputs[0], kt]
    return _pure(emitter, torch.transpose, (emitter.materialize(env[kt]), -2, -1)), []


def attention(emitter: Any, node: ir.Node, args: list, env: Any) -> Any:
    """``Softmax(Q K^T * scale [+ mask]) @ V`` at its final MatMul -> scaled_dot_product_attention."""
    probs, v = node.inputs
    softmax = probs.producer()
    if not _default(softmax, "Softmax"):
        return None
    dtype, rank = _info(v, env)
    axis = emitter.node_attributes(softmax).get("axis", -1)
    if (
        emitter.version < 13
        or rank is None
        or rank < 3
        or dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)
        or axis not in (-1, rank - 1)
        or not _single_reader(probs, node)
    ):
        return None
    scores = softmax.inputs[0]
    producer = scores.producer()
    mask = None
    reader = softmax
    dead = [scores, probs]
    if _default(producer, "Add"):
        if not _single_reader(scores, softmax):
            return None
        add = producer
        for index in (0, 1):
            side = add.inputs[index].producer()
            if any(_default(side, op) for op in ("MatMul", "Mul", "Div")):
                mask, scores, reader = add.inputs[1 - index], add.inputs[index], add
                break
        if mask is None or _info(mask, env)[0] != dtype or not _mask_fits(mask, scores, add, env):
            return None
        dead.insert(0, scores)
    inner, s_scale, s_mul = _peel_scale(emitter, scores, reader, env)  # (Q K^T) * s
    if s_mul is not None:
        dead.insert(0, inner)
        scores, reader = inner, s_mul
    producer = scores.producer()
    if not _default(producer, "MatMul") or not _single_reader(scores, reader):
        return None
    q, q_scale, q_mul = _peel_scale(emitter, producer.inputs[0], producer, env)
    kt, k_scale, k_mul = _peel_scale(emitter, producer.inputs[1], producer, env)
    if any(_info(x, env) != (dtype, rank) for x in (q, kt, probs)):
        return None
    if not isinstance(env[q], fx.Node) or not isinstance(args[1], fx.Node):
        return None
    key, unread = _key(emitter, kt, rank, env)
    dead[:0] = unread + [m.outputs[0] for m in (q_mul, k_mul) if m is not None]
    scale = _binary(emitter, operator.mul, q_scale, k_scale)
    kwargs: dict[str, Any] = {"scale": _binary(emitter, operator.mul, scale, s_scale)}
    if mask is not None:
        kwargs["attn_mask"] = emitter.materialize(env[mask])
    emitter.maybe_dead.extend(env[d] for d in dead if isinstance(env[d], fx.Node))
    return F.scaled_dot_product_attention, [env[q], key, args[1]], kwargs


def _mask_fits(mask: ir.Value, scores: ir.Value, add: ir.Node, env: Any) -> bool:
    """The additive mask broadcasts to the scores without changing their shape."""
    rank = _rank(mask, env)
    if rank is None or rank > (_rank(scores, env) or 0):
        return False
    if scores.shape is not None and add.outputs[0].shape is not None:
        return scores.shape == add.outputs[0].shape
    return mask.shape is not None and all(d == 1 for d in mask.shape[:-2])  # batch dims of 1


# ---------------------------------------------------------------------------- linear


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    relu: bool = False,
    dims: list[int] | None = None,
) -> torch.Tensor:
    """``[relu](F.linear(x, weight, bias))[.permute(dims)]``.

    ``MatMul(Transpose(x), W^T)`` with the last axis left in place is the linear map of
    ``x`` permuted afterwards: the input stays contiguous (no copy before the GEMM). A
    following Relu runs in the GEMM's epilogue (``torch._addmm_activation``, what
    nn.TransformerEncoderLayer's fast path uses) when no gradient is recorded; that op has
    no derivative, so with autograd it is ``torch.relu`` of the linear."""
    if (
        relu
        and bias is not None
        and _ADDMM_ACTIVATION is not None
        and x.dim() >= 2
        and x.dtype in (torch.float32, torch.float64)
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or bias.requires_grad)
        )
    ):
        flat = _ADDMM_ACTIVATION(bias, x.reshape(-1, x.shape[-1]), weight.t())
        y = flat.reshape(*x.shape[:-1], weight.shape[0])
    else:
        y = F.linear(x, weight, bias)
        if relu:
            y = torch.relu(y)
    return y if dims is None else torch.permute(y, dims)


_ADDMM_ACTIVATION = getattr(torch, "_addmm_activation", None)


def linear_call(emitter: Any, node: ir.Node, x: Any, weight: Any, bias: Any, env: Any) -> Any:
    """F.linear(x, weight, bias) as a `fused_linear` call when x is a Transpose keeping the
    last axis (the linear runs before the permutation), else plain F.linear."""
    transpose = node.inputs[0].producer()
    rank = _rank(node.inputs[0], env)
    if _default(transpose, "Transpose") and rank is not None:
        perm = list(emitter.node_attributes(transpose).get("perm") or range(rank)[::-1])
        source = env[transpose.inputs[0]]
        if perm[-1] == rank - 1 and isinstance(source, fx.Node):
            if len(list(node.inputs[0].uses())) == 1 and not node.inputs[0].is_graph_output():
                emitter.maybe_dead.append(emitter.materialize(x))
            args = [source, weight] + ([] if bias is None else [bias])
            return fused_linear, args, {"dims": perm}
    return F.linear, [x, weight] + ([] if bias is None else [bias]), {}


def relu_call(emitter: Any, node: ir.Node, args: list, env: Any) -> Any:
    """Relu of a linear's only output -> the same `fused_linear` with ``relu=True``."""
    source = args[0]
    value = node.inputs[0]
    if (
        not isinstance(source, fx.Node)
        or source.target not in (F.linear, fused_linear)
        or source.kwargs.get("relu")
        or len(list(value.uses())) != 1
        or value.is_graph_output()
    ):
        return None
    emitter.maybe_dead.append(source)
    return fused_linear, list(source.args), {**source.kwargs, "relu": True}
