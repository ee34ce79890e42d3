"""Rewrite rules of our own for the optimized copy (`interop.optimize`).

Each rule turns a spelling our captures (or the exporters under them) write into the one
ONNX Runtime's kernels and fusions know; each is exact (same values up to float rounding)
and checks the shapes that make it so. onnxscript's optimizer and its ORT fusions do the
rest; these cover what they miss on our graphs:

- `gemm_on_rows`: Reshape(x, [-1, K]) -> Gemm -> Reshape back becomes MatMul (+ Add) on x.
- `relu`: Max(x, 0) becomes Relu (JAX's relu).
- `no_op_max`: Max(x, -inf) is x (JAX's max with ``initial=-inf``).
- `unit_transpose`: a Transpose that only moves axes of size 1 is a Reshape (no copy).
- `softmax`: Exp(x - c) / ReduceSum(Exp(x - c)) over one axis, c constant along it,
  becomes Softmax (JAX's softmax, whatever c is: the quotient does not depend on it).
- `scale_before_reshape`: Mul(Reshape(x), scalar) becomes Reshape(Mul(x, scalar)), so the
  scale meets the MatMul before it (ONNX Runtime's FusedMatMul).
- `bias_before_split`: Add(Reshape(MatMul(x, W)), b), b along the trailing axes that
  split (or keep) the product's last axis, becomes Reshape(MatMul(x, W) + b.reshape(-1)):
  a MatMul + Add pair ONNX Runtime runs as one Gemm (Flax's DenseGeneral projections).
- `fast_gelu_bias`: FastGelu(x + b) with a 1-D b takes b as its own bias input.
- `pad_after_transpose`: Transpose(Pad(x)) becomes Pad(Transpose(x)), so a Keras
  ZeroPadding2D in NHWC meets the NCHW Conv it pads (onnxscript folds Pad into Conv).
- `einsum_as_matmul`: an Einsum that is a matrix product becomes MatMul (Keras).
- `gelu_tanh`: the tanh GELU (JAX's, Keras's, torch's spelling) becomes FastGelu.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = None if value is None else value.const_value
    return None if tensor is None else tensor.numpy()


def gemm_on_rows() -> pattern.RewriteRuleSet:
    """Reshape(x, [-1, K]) -> Gemm -> Reshape(back) becomes MatMul (+ Add) on `x` itself.

    torch's ``addmm`` on flattened rows (GPT-2's Conv1D) hides the 3-D MatMul that the
    attention and skip-normalization fusions look for; onnxscript's own rule for it gives
    up on symbolic dims, this one compares them. Heads merged on the way
    ([b, s, h, d] -> [b * s, h * d], GPT-2's c_proj) are merged by a Reshape that keeps
    the leading dims.
    """

    def target(op, x, w, rows, shape):
        flat = op.Reshape(x, rows)
        return op.Reshape(op.Gemm(flat, w, _outputs=["gemm"]), shape, _outputs=["out"])

    def target_bias(op, x, w, b, rows, shape):
        flat = op.Reshape(x, rows)
        return op.Reshape(op.Gemm(flat, w, b, _outputs=["gemm"]), shape, _outputs=["out"])

    def check(context, x, w, gemm, out, b=None, **_):
        attrs = {k: v.value for k, v in gemm.producer().attributes.items()}
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            return False
        if x.shape is None or out.shape is None or w.shape is None or len(x.shape) < 3:
            return False
        if len(w.shape) != 2 or (b is not None and (b.shape is None or len(b.shape) > 1)):
            return False
        k_dim = w.shape[1] if attrs.get("transB", 0) else w.shape[0]
        if len(out.shape) == len(x.shape):  # rows of x itself
            return list(out.shape)[:-1] == list(x.shape)[:-1] and x.shape[-1] == k_dim
        h, d = x.shape[-2], x.shape[-1]
        return (
            len(out.shape) == len(x.shape) - 1
            and list(out.shape)[:-1] == list(x.shape)[:-2]
            and isinstance(h, int)
            and isinstance(d, int)
            and h * d == k_dim
        )

    def replacement(op, x, w, gemm, out, b=None, **_):
        if len(out.shape) < len(x.shape):  # merge the heads, keep the leading dims (0s)
            k_dim = x.shape[-2] * x.shape[-1]
            keep = op.Constant(value_ints=[0] * (len(out.shape) - 1) + [k_dim])
            x = op.Reshape(x, keep)
        if gemm.producer().attributes.get_int("transB", 0):
            w = op.Transpose(w, perm=[1, 0])  # ONNX Runtime folds it at session creation
        product = op.MatMul(x, w)
        return product if b is None else op.Add(product, b)

    return pattern.RewriteRuleSet(
        [
            pattern.RewriteRule(target_bias, replacement, check),
            pattern.RewriteRule(target, replacement, check),
        ]
    )


def _float(value: ir.Value) -> bool:
    return value.dtype is not None and value.dtype.is_floating_point()


def relu() -> pattern.RewriteRuleSet:
    """Max(x, 0) becomes Relu(x): ONNX Runtime fuses a Relu into the Conv before it (and
    keeps NCHWc layouts across it), never a Max."""

    def check(context, x, c, **_):
        data = _const(c)
        return data is not None and data.size <= 1 and not np.any(data) and _float(x)

    def target(op, x, c):
        return op.Max(x, c)

    return pattern.RewriteRuleSet(
        [pattern.RewriteRule(target, lambda op, x, **_: op.Relu(x), check)], commute=True
    )


def no_op_max() -> pattern.RewriteRuleSet:
    """Max(x, -inf) is x (the result has x's shape: the constant is a scalar or [1])."""

    def check(context, x, c, **_):
        data = _const(c)
        return (
            data is not None and data.size == 1 and np.all(np.isneginf(data)) and x.shape is not None
            and len(x.shape) >= data.ndim
        )  # fmt: skip

    def target(op, x, c):
        return op.Max(x, c)

    return pattern.RewriteRuleSet(
        [pattern.RewriteRule(target, lambda op, x, **_: op.Identity(x), check)], commute=True
    )


def unit_transpose() -> pattern.RewriteRuleSet:
    """A Transpose that keeps the order of every axis longer than 1 is a Reshape."""

    def check(context, x, out, **_):
        perm = out.producer().attributes.get_ints("perm", None)
        if perm is None or x.shape is None or out.shape is None:
            return False
        moved = [axis for axis in perm if x.shape[axis] != 1]
        unknown = [d for d in out.shape if not isinstance(d, int)]
        return (
            moved == sorted(moved)
            and len(unknown) <= 1
            and all(d != 0 for d in out.shape if isinstance(d, int))
        )

    def replacement(op, x, out, **_):
        dims = [d if isinstance(d, int) else -1 for d in out.shape]
        return op.Reshape(x, op.Constant(value_ints=dims))

    return pattern.RewriteRuleSet(
        [pattern.RewriteRule(lambda op, x: op.Transpose(x, _outputs=["out"]), replacement, check)]
    )


def softmax() -> pattern.RewriteRuleSet:
    """Exp(x - c) / sum over one axis of it becomes Softmax(x) along that axis.

    c may be anything constant along the axis (JAX subtracts the row maximum, reshaped
    on the way): the quotient is the same for every such c, and Softmax subtracts the
    maximum itself.
    """

    def target_unsqueezed(op, x, c, axes, axes2):
        e = op.Exp(op.Sub(x, c), _outputs=["e"])
        return op.Div(e, op.Unsqueeze(op.ReduceSum(e, axes, _outputs=["total"]), axes2))

    def target_kept(op, x, c, axes):
        e = op.Exp(op.Sub(x, c), _outputs=["e"])
        return op.Div(e, op.ReduceSum(e, axes, _outputs=["total"]))

    def axis_of(x: ir.Value, total: ir.Value, axes: ir.Value, axes2: ir.Value | None) -> Any:
        data, rank = _const(axes), len(x.shape) if x.shape is not None else None
        if data is None or data.size != 1 or rank is None:
            return None
        axis = int(data.reshape(-1)[0]) % rank
        node = total.producer()
        if node is None:
            return None
        keep = node.attributes.get_int("keepdims", 1)
        if node.attributes.get_int("noop_with_empty_axes", 0):
            return None
        if axes2 is None:
            return axis if keep else None
        again = _const(axes2)
        if keep or again is None or again.size != 1 or int(again.reshape(-1)[0]) % rank != axis:
            return None
        return axis

    def check(context, x, c, e, total, axes, axes2=None, **_):
        axis = axis_of(x, total, axes, axes2)
        if axis is None or c.shape is None or e.shape is None or not _float(x):
            return False
        rank = len(x.shape)
        if len(c.shape) > rank or list(e.shape) != list(x.shape):
            return False  # c must not broadcast x to another shape
        offset = axis - (rank - len(c.shape))  # the axis in c's shape (numpy broadcasting)
        return offset < 0 or c.shape[offset] == 1

    def replacement(op, x, total, axes, axes2=None, **_):
        return op.Softmax(x, axis=axis_of(x, total, axes, axes2))

    return pattern.RewriteRuleSet(
        [
            pattern.RewriteRule(target_unsqueezed, replacement, check),
            pattern.RewriteRule(target_kept, replacement, check),
        ]
    )


def gelu_tanh(model: ir.Model) -> int:
    """0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))) becomes FastGelu.

    JAX, Keras and torch each order the products differently (x^3 as Pow or x * x * x,
    constants first or second, the 0.5 on x, on the bracket or last); a pattern per
    ordering would be hundreds of patterns, so this walks up and down from each Tanh
    with commutative checks instead. Returns how many it replaced.
    """
    count = 0
    for tanh in [n for n in model.graph if n.op_type == "Tanh" and not n.domain]:
        found = _gelu_at(tanh)
        if found is None:
            continue
        x, last = found
        fused = ir.node("FastGelu", [x], domain="com.microsoft", name=f"{tanh.name}_fast_gelu")
        output = fused.outputs[0]
        output.shape, output.type = last.outputs[0].shape, last.outputs[0].type
        model.graph.insert_before(last, fused)
        if last.outputs[0].is_graph_output():  # first: onnx_ir refuses to rewire an output
            index = model.graph.outputs.index(last.outputs[0])
            output.name, last.outputs[0].name = last.outputs[0].name, None
            model.graph.outputs[index] = output
        ir.convenience.replace_all_uses_with(last.outputs[0], output)
        if "com.microsoft" not in model.opset_imports:
            model.opset_imports["com.microsoft"] = 1
        count += 1
    if count:
        import onnx_ir.passes.common as common_passes

        common_passes.RemoveUnusedNodesPass()(model)
    return count


def _split(node: ir.Node | None, op: str, value: float | None = None) -> Any:
    """(other operand, constant) of a binary `op` node with one scalar constant near `value`."""
    if node is None or node.op_type != op or node.domain or len(node.inputs) != 2:
        return None
    for const, other in (node.inputs, node.inputs[::-1]):
        data = _const(const)
        if data is not None and data.size == 1 and other is not None:
            if value is None or math.isclose(float(data.reshape(-1)[0]), value, rel_tol=1e-5):
                return other
    return None


def _only_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


def _is_cube(value: ir.Value | None, x: ir.Value) -> bool:
    node = value.producer() if value is not None else None
    if node is None or node.domain:
        return False
    if node.op_type == "Pow":
        data = _const(node.inputs[1])
        return node.inputs[0] is x and data is not None and data.size == 1 and data.item() == 3
    if node.op_type != "Mul":
        return False
    a, b = node.inputs
    square = b if a is x else a if b is x else None
    sq = square.producer() if square is not None else None
    return sq is not None and sq.op_type == "Mul" and not sq.domain and list(sq.inputs) == [x, x]


def _gelu_at(tanh: ir.Node) -> tuple[ir.Value, ir.Node] | None:
    """(x, the node whose output is the GELU) of the tanh GELU around `tanh`, or None."""
    source = tanh.inputs[0]
    inner = _split(source.producer() if source is not None else None, "Mul", _SQRT_2_PI)
    total = inner.producer() if inner is not None else None
    if total is None or total.op_type != "Add" or total.domain:
        return None
    x = None
    for cand, rest in (total.inputs, total.inputs[::-1]):
        cube = _split(rest.producer() if rest is not None else None, "Mul", 0.044715)
        if cand is not None and _is_cube(cube, cand):
            x = cand
    bracket = _only_use(tanh.outputs[0])
    if x is None or bracket is None or _split(bracket, "Add", 1.0) is None:
        return None
    out = bracket.outputs[0]
    step = _only_use(out)
    if step is None or step.op_type != "Mul" or step.domain:
        return None
    last = _only_use(step.outputs[0])
    if _split(step, "Mul", 0.5) is out:  # 0.5 * bracket, then * x
        ok = last is not None and last.op_type == "Mul" and x in last.inputs
        return (x, last) if ok and last is not None else None
    other = [v for v in step.inputs if v is not out]
    if len(other) != 1 or other[0] is None:
        return None
    if other[0] is x:  # x * bracket, then * 0.5
        return (
            (x, last) if last is not None and _split(last, "Mul", 0.5) is step.outputs[0] else None
        )
    if _split(other[0].producer(), "Mul", 0.5) is x:  # (0.5 * x) * bracket
        return x, step
    return None


_SQRT_2_PI = math.sqrt(2.0 / math.pi)


def einsum_as_matmul() -> pattern.RewriteRuleSet:
    """A two-operand Einsum that is a (batched) matrix product becomes MatMul.

    ONNX Runtime's Einsum kernel is much slower than MatMul on the equations Keras's
    EinsumDense and MultiHeadAttention write (``abc,cde->abde``, ``aecd,abcd->acbe``...).
    With a constant right operand, its contracted and free axes are merged into a 2-D
    weight (static sizes); with two computed operands, each of the batch, free and
    contracted groups must be one axis. Transposes put the axes in place.
    """

    def check(context, x, y, out, **_):
        return _einsum_plan(out.producer(), x, y) is not None

    def replacement(op, x, y, out, **_):
        plan = _einsum_plan(out.producer(), x, y)
        assert plan is not None
        return plan(op, x, y)

    target = lambda op, x, y: op.Einsum(x, y, _outputs=["out"])  # noqa: E731
    return pattern.RewriteRuleSet([pattern.RewriteRule(target, replacement, check)])


def _einsum_plan(node: ir.Node | None, x: ir.Value, y: ir.Value) -> Any:
    if node is None or x.shape is None or y.shape is None:
        return None
    equation = node.attributes.get_string("equation", "").replace(" ", "")
    if "..." in equation or "->" not in equation or equation.count(",") != 1:
        return None
    inputs, result = equation.split("->")
    left, right = inputs.split(",")
    if len(left) != len(x.shape) or len(right) != len(y.shape):
        return None
    if any(len(set(t)) != len(t) for t in (left, right, result)):
        return None  # a diagonal or a repeated output label
    if set(result) - set(left) - set(right) or (set(left) ^ set(right)) - set(result):
        return None  # a label summed inside one operand
    batch = [c for c in left if c in right and c in result]
    contract = [c for c in left if c in right and c not in result]
    free_x = [c for c in left if c not in right]
    free_y = [c for c in right if c not in left]
    if not contract:
        return None
    dims = {c: x.shape[i] for i, c in enumerate(left)} | {
        c: y.shape[i] for i, c in enumerate(right)
    }
    weight = _const(y)
    if not batch and weight is not None:
        if not all(isinstance(dims[c], int) for c in contract + free_y):
            return None
        return _weight_plan(left, right, result, free_x, contract, free_y, dims, weight)
    if len(contract) == len(free_x) == len(free_y) == 1 and batch:
        return _batched_plan(left, right, result, batch, free_x, contract, free_y)
    return None


def _perm(source: str, target: list[str]) -> list[int]:
    return [source.index(c) for c in target]


def _transposed(op: Any, value: Any, source: str, target: list[str]) -> Any:
    perm = _perm(source, target)
    return value if perm == sorted(perm) else op.Transpose(value, perm=perm)


def _weight_plan(left, right, result, free_x, contract, free_y, dims, weight) -> Any:
    k = int(np.prod([dims[c] for c in contract]))
    n_dims = [dims[c] for c in free_y]
    matrix = np.transpose(weight, _perm(right, contract + free_y)).reshape(k, -1)

    def build(op: Any, x: Any, y: Any) -> Any:
        a = _transposed(op, x, left, free_x + contract)
        if len(contract) > 1:  # merge the contracted axes; the free ones are copied (0)
            a = op.Reshape(a, op.Constant(value_ints=[0] * len(free_x) + [k]))
        product = op.MatMul(a, op.Constant(value=ir.tensor(np.ascontiguousarray(matrix))))
        if len(free_y) != 1:
            product = op.Reshape(product, op.Constant(value_ints=[0] * len(free_x) + n_dims))
        return _transposed(op, product, "".join(free_x + free_y), list(result))

    return build


def _batched_plan(left, right, result, batch, free_x, contract, free_y) -> Any:
    def build(op: Any, x: Any, y: Any) -> Any:
        a = _transposed(op, x, left, batch + free_x + contract)
        b = _transposed(op, y, right, batch + contract + free_y)
        return _transposed(op, op.MatMul(a, b), "".join(batch + free_x + free_y), list(result))

    return build


def scale_before_reshape() -> pattern.RewriteRuleSet:
    """Mul(Reshape(x, shape), c) with a one-element c becomes Reshape(Mul(x, c), shape)."""

    def check(context, x, c, out, **_):
        data = _const(c)
        return (
            data is not None and data.size == 1 and _float(x) and out.shape is not None
            and data.ndim <= len(out.shape)
        )  # fmt: skip

    def target(op, x, shape, c):
        return op.Mul(op.Reshape(x, shape, _outputs=["out"]), c)

    def replacement(op, x, shape, c, out, **_):
        scalar = op.Constant(value=ir.tensor(_const(c).reshape(())))
        allowzero = out.producer().attributes.get_int("allowzero", 0)
        return op.Reshape(op.Mul(x, scalar), shape, allowzero=allowzero)

    return pattern.RewriteRuleSet([pattern.RewriteRule(target, replacement, check)], commute=True)


def bias_before_split() -> pattern.RewriteRuleSet:
    """Add(Reshape(MatMul(x, W), [..., h, d]), b) becomes Reshape(MatMul(x, W) + b')."""

    def check(context, product, b, out, **_):
        bias = _const(b)
        if bias is None or product.shape is None or out.shape is None or b.dtype != product.dtype:
            return False
        k_dim = product.shape[-1]
        core = list(bias.shape)
        while core and core[0] == 1 and len(core) > 1:
            core.pop(0)  # leading 1s broadcast over the leading dims
        tail = list(out.shape[len(out.shape) - len(core) :]) if core else []
        # b covers the trailing axes of out that split the product's last axis, no more
        return (
            isinstance(k_dim, int) and bool(core) and bias.ndim <= len(out.shape)
            and tail == core and int(np.prod(core)) == k_dim
        )  # fmt: skip

    def target(op, x, w, shape, b):
        product = op.MatMul(x, w, _outputs=["product"])
        return op.Add(op.Reshape(product, shape, _outputs=["out"]), b)

    def replacement(op, x, w, shape, b, out, **_):
        flat = op.Constant(value=ir.tensor(_const(b).reshape(-1)))
        allowzero = out.producer().attributes.get_int("allowzero", 0)
        return op.Reshape(op.Add(op.MatMul(x, w), flat), shape, allowzero=allowzero)

    return pattern.RewriteRuleSet([pattern.RewriteRule(target, replacement, check)], commute=True)


def fast_gelu_bias() -> pattern.RewriteRuleSet:
    """FastGelu(Add(x, b)) with a constant 1-D b of x's last dim becomes FastGelu(x, b)."""

    def check(context, x, b, **_):
        bias = _const(b)
        return (
            bias is not None and bias.ndim == 1 and x.shape is not None and len(x.shape) >= 1
            and x.shape[-1] == bias.shape[0] and b.dtype == x.dtype
        )  # fmt: skip

    def target(op, x, b):
        return op.FastGelu(op.Add(x, b), _domain="com.microsoft")

    def replacement(op, x, b):
        return op.FastGelu(x, b, _domain="com.microsoft")

    return pattern.RewriteRuleSet([pattern.RewriteRule(target, replacement, check)], commute=True)


def pad_after_transpose() -> pattern.RewriteRuleSet:
    """Transpose(Pad(x, pads), perm) becomes Pad(Transpose(x, perm), pads permuted)."""

    def check(context, x, pads, out, **_):
        data = _const(pads)
        node = out.producer()
        perm = node.attributes.get_ints("perm", None) if node is not None else None
        return data is not None and perm is not None and data.size == 2 * len(perm)

    def target(op, x, pads, value):
        return op.Transpose(op.Pad(x, pads, value, _outputs=["padded"]), _outputs=["out"])

    def target_zero(op, x, pads):
        return op.Transpose(op.Pad(x, pads, _outputs=["padded"]), _outputs=["out"])

    def replacement(op, x, pads, out, padded, value=None, **_):
        perm = list(out.producer().attributes.get_ints("perm"))
        data, rank = _const(pads).reshape(-1), len(perm)
        moved = [int(data[p]) for p in perm] + [int(data[rank + p]) for p in perm]
        mode = padded.producer().attributes.get_string("mode", "constant")
        new_pads = op.Constant(value=ir.tensor(np.array(moved, np.int64)))
        transposed = op.Transpose(x, perm=perm)
        if value is None:
            return op.Pad(transposed, new_pads, mode=mode)
        return op.Pad(transposed, new_pads, value, mode=mode)

    return pattern.RewriteRuleSet(
        [
            pattern.RewriteRule(target, replacement, check),
            pattern.RewriteRule(target_zero, replacement, check),
        ]
    )
