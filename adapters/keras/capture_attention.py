"""Converters for attention: MultiHeadAttention, GroupedQueryAttention, Attention,
AdditiveAttention and the ``keras.ops.dot_product_attention`` operation.

The attention layers are lowered directly rather than through a symbolic call of
their ``call``: their masks (Keras masks of query/value/key, ``attention_mask``,
``use_causal_mask``, sliding windows) are computed from ``ops.shape`` of the inputs,
which a symbolic call cannot express for a dynamic sequence axis. Here causal and
window masks are built from ``Shape``/``Range`` so traced graphs accept any length.
The projections stay separate sub-layer calls (``mha/query``, ``mha/attention_output``)
lowered by their own converters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from . import register_layer, register_op
from .capture_lowering import Builder, Tensor
from .capture_walk import lower_layer

# Keras's DotProductAttention fills masked logits with -0.7 * float32 max; the Softmax
# layer (the explicit-scores path) adds -1e9 instead. Both give exp() == 0.
_DPA_NEGATIVE = np.float32(-0.7 * 3.38953e38)
_SOFTMAX_NEGATIVE = np.float32(-1e9)


def _value(x: Any) -> ir.Value:
    return x.value if isinstance(x, Tensor) else x


def _sublayer(b: Builder, layer: Any, x: Any) -> Tensor:
    """Lower a call of a projection sub-layer in its own scope (``<layer>/<sub>``)."""
    path = f"{b.scope}/{layer.name}" if b.scope else layer.name
    x = x if isinstance(x, Tensor) else Tensor(x, (None,))
    out = lower_layer(b, layer, path, [x], {})
    return out.value if isinstance(out, Tensor) else out


def _dim(b: Builder, x: ir.Value, axis: int) -> ir.Value:
    """A 1-D int64 tensor holding ``x.shape[axis]`` at run time."""
    return b.op("Shape", [x], {"start": axis, "end": axis + 1})


def _positions(b: Builder, x: ir.Value, axis: int) -> ir.Value:
    """``arange(x.shape[axis])`` as int64, built at run time."""
    length = b.op("Squeeze", [_dim(b, x, axis), b.ints([0])])
    return b.op("Range", [b.const(np.int64(0)), length, b.const(np.int64(1))])


def causal_mask(b: Builder, query: ir.Value, value: ir.Value, q_axis: int, v_axis: int) -> ir.Value:
    """Boolean ``(T, S)`` lower-triangular mask (row >= column), for any T and S."""
    rows = b.op("Unsqueeze", [_positions(b, query, q_axis), b.ints([1])])
    cols = b.op("Unsqueeze", [_positions(b, value, v_axis), b.ints([0])])
    return b.op("GreaterOrEqual", [rows, cols])


def _window_mask(b: Builder, query: ir.Value, value: ir.Value, window: int) -> ir.Value:
    rows = b.op("Unsqueeze", [_positions(b, query, 1), b.ints([1])])
    cols = b.op("Unsqueeze", [_positions(b, value, 1), b.ints([0])])
    distance = b.op("Abs", [b.op("Sub", [rows, cols])])
    return b.op("Less", [distance, b.const(np.int64(window))])


def _and(b: Builder, a: ir.Value | None, c: ir.Value | None) -> ir.Value | None:
    if a is None or c is None:
        return a if c is None else c
    return b.op("And", [a, c])


def _as_bool(b: Builder, mask: Any) -> ir.Value | None:
    if mask is None:
        return None
    return b.op("Cast", [_value(mask)], {"to": ir.DataType.BOOL})


def masked_fill(b: Builder, logits: ir.Value, mask: ir.Value | None, additive: bool) -> ir.Value:
    """Logits where ``mask`` is off pushed to a large negative value, as Keras does."""
    if mask is None:
        return logits
    if additive:  # the Softmax layer: x + (1 - mask) * -1e9
        off = b.op("Cast", [b.op("Not", [mask])], {"to": ir.DataType.FLOAT})
        return b.op("Add", [logits, b.op("Mul", [off, b.const(_SOFTMAX_NEGATIVE)])])
    return b.op("Where", [mask, logits, b.const(_DPA_NEGATIVE)])


def _softmax(b: Builder, x: ir.Value, axes: list[int]) -> ir.Value:
    if len(axes) == 1:
        return b.op("Softmax", [x], {"axis": axes[0]})
    shifted = b.op("Sub", [x, b.op("ReduceMax", [x, b.ints(axes)], {"keepdims": 1})])
    exp = b.op("Exp", [shifted])
    return b.op("Div", [exp, b.op("ReduceSum", [exp, b.ints(axes)], {"keepdims": 1})])


def _repeat_heads(b: Builder, x: ir.Value, repeats: int) -> ir.Value:
    """``ops.repeat(x, repeats, axis=2)`` on (B, S, N, H): each head repeated in place."""
    if repeats == 1:
        return x
    y = b.op("Unsqueeze", [x, b.ints([3])])  # (B, S, N, 1, H)
    y = b.op("Tile", [y, b.ints([1, 1, 1, repeats, 1])])
    shape = b.op("Shape", [x])
    heads = b.op("Mul", [b.op("Gather", [shape, b.ints([2])]), b.ints([repeats])])
    new_shape = b.op("Concat", [b.op("Slice", [shape, b.ints([0]), b.ints([2])]), heads,
                                b.op("Slice", [shape, b.ints([3]), b.ints([4])])], {"axis": 0})  # fmt: skip
    return b.op("Reshape", [y, new_shape])


def dot_product_attention(
    b: Builder,
    query: ir.Value,
    key: ir.Value,
    value: ir.Value,
    *,
    q_heads: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    bias: ir.Value | None = None,
    mask: ir.Value | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    soft_cap: float | None = None,
) -> ir.Value:
    """``keras.ops.dot_product_attention`` on (B, T, N, H) tensors, as the backends compute it."""
    if q_heads and kv_heads and q_heads > kv_heads:  # grouped-query attention
        key = _repeat_heads(b, key, q_heads // kv_heads)
        value = _repeat_heads(b, value, q_heads // kv_heads)
    if scale is None:
        if head_dim is None:
            raise ValueError("dot_product_attention needs a static head size when scale is None")
        scale = 1.0 / float(np.sqrt(head_dim))
    logits = b.op("Einsum", [query, key], {"equation": "btnh,bsnh->bnts"})
    logits = b.op("Mul", [logits, b.const(np.float32(scale))])
    if soft_cap is not None:  # the JAX backend caps before the bias
        cap = b.const(np.float32(soft_cap))
        logits = b.op("Mul", [b.op("Tanh", [b.op("Div", [logits, cap])]), cap])
    if bias is not None:
        logits = b.op("Add", [logits, bias])
    if is_causal:
        mask = _and(b, mask, causal_mask(b, query, key, 1, 1))
    probs = b.op("Softmax", [masked_fill(b, logits, mask, additive=False)], {"axis": -1})
    return b.op("Einsum", [probs, value], {"equation": "bnts,bsnh->btnh"})


@register_op("DotProductAttention")
def import_dot_product_attention(
    b: Builder,
    op: Any,
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    scale: Any = None,
) -> ir.Value:
    """keras.ops.dot_product_attention (bias, mask, causal, scale, soft cap, GQA heads)."""
    from .capture_ops import value as as_value

    if getattr(op, "flash_attention", None):
        raise ValueError("flash_attention=True cannot be exported; pass flash_attention=False")
    return dot_product_attention(
        b,
        as_value(b, query),
        as_value(b, key),
        as_value(b, value),
        q_heads=query.shape[2],
        kv_heads=key.shape[2],
        head_dim=key.shape[3],
        bias=None if bias is None else as_value(b, bias),
        mask=_as_bool(b, None if mask is None else as_value(b, mask)),
        scale=None if scale is None else float(np.asarray(scale)),
        is_causal=bool(op.is_causal),
        soft_cap=getattr(op, "attn_logits_soft_cap", None),
    )


# ---------------------------------------------------------------------------- MHA / GQA
def _expand_mask(b: Builder, mask: ir.Value, mask_rank: int, rank: int, axis: int) -> ir.Value:
    for _ in range(rank - mask_rank):
        mask = b.op("Unsqueeze", [mask, b.ints([axis])])
    return mask


@register_layer("MultiHeadAttention")
@register_layer("GroupedQueryAttention")
def import_multi_head_attention(
    b: Builder,
    layer: Any,
    query: Tensor,
    value: Tensor,
    key: Tensor | None = None,
    query_mask: Any = None,
    value_mask: Any = None,
    key_mask: Any = None,
    attention_mask: Any = None,
    return_attention_scores: bool = False,
    training: Any = None,
    use_causal_mask: bool = False,
    **_: Any,
) -> Any:
    """MultiHeadAttention / GroupedQueryAttention with every mask source, gate and window."""
    gqa = type(layer).__name__ == "GroupedQueryAttention"
    key_in = value if key is None else key
    # Keras masks travel on the inputs (Embedding(mask_zero=True)) or come as arguments.
    query_mask = query_mask if query_mask is not None else query.mask
    value_mask = value_mask if value_mask is not None else value.mask
    if key_mask is None and key is not None:
        key_mask = key.mask
    window = getattr(layer, "sliding_window" if gqa else "_sliding_window", None)
    mask = None
    if query_mask is not None:
        mask = b.op("Unsqueeze", [_as_bool(b, query_mask), b.ints([-1])])  # (B, T, 1)
    for m in (value_mask, key_mask):
        if m is not None:
            mask = _and(b, mask, b.op("Unsqueeze", [_as_bool(b, m), b.ints([-2])]))  # (B, 1, S)
    mask_rank = 3 if mask is not None else 0
    if use_causal_mask:
        causal = b.op("Unsqueeze", [causal_mask(b, query.value, value.value, 1, 1), b.ints([0])])
        mask, mask_rank = _and(b, mask, causal), 3
    if window is not None:
        banded = b.op("Unsqueeze", [_window_mask(b, query.value, value.value, int(window)), b.ints([0])])  # fmt: skip
        mask, mask_rank = _and(b, mask, banded), 3
    if attention_mask is not None:
        mask = _and(b, _as_bool(b, attention_mask), mask)
        mask_rank = max(mask_rank, attention_mask.rank)

    use_gate = getattr(layer, "use_gate" if gqa else "_use_gate", False)
    gate = _sublayer(b, layer._gate_dense, query) if use_gate else None
    q = _sublayer(b, layer._query_dense, query)
    k = _sublayer(b, layer._key_dense, key_in)
    v = _sublayer(b, layer._value_dense, value)
    if gqa:
        k, v = _repeat_heads(b, k, layer.num_repeats), _repeat_heads(b, v, layer.num_repeats)
    inv_sqrt = float(layer._inverse_sqrt_head_dim if gqa else layer._inverse_sqrt_key_dim)
    axes = (-1,) if gqa else tuple(layer._attention_axes)
    # projected rank R = query.rank + 1; scores keep the batch dims, heads, and each
    # attention axis twice (query and key positions): R - 1 + len(axes).
    scores_rank = query.rank + len(axes) if not gqa else 4
    norm_axes = list(range(scores_rank - len(axes), scores_rank))
    # Keras takes the fused dot_product_attention path (where-masking) when it can and
    # the explicit einsum + Softmax-layer path (additive masking) otherwise.
    dropout = float(layer.dropout if gqa else layer._dropout)
    fused = not (dropout > 0.0 or return_attention_scores or query.rank + 1 != 4)
    if mask is not None:
        mask = _expand_mask(b, mask, mask_rank, scores_rank, -len(axes) * 2 - 1)
    q = b.op("Mul", [q, b.const(np.float32(inv_sqrt))])
    # MultiHeadAttention's equation takes (key, query); GroupedQueryAttention's (query, key).
    pair = [q, k] if gqa else [k, q]
    scores = b.op("Einsum", pair, {"equation": layer._dot_product_equation})
    scores = _softmax(b, masked_fill(b, scores, mask, additive=not fused), norm_axes)
    out = b.op("Einsum", [scores, v], {"equation": layer._combine_equation})
    if gate is not None:
        out = b.op("Mul", [out, gate])
    out = _sublayer(b, layer._output_dense, out)
    result = Tensor(out, (None,), query.dtype, query.mask if not gqa else None)
    return (result, scores) if return_attention_scores else result


# ---------------------------------------------------------------------------- Attention
@register_layer("Attention")
@register_layer("AdditiveAttention")
def import_attention(
    b: Builder,
    layer: Any,
    inputs: list[Tensor],
    mask: Any = None,
    training: Any = None,
    return_attention_scores: bool = False,
    use_causal_mask: bool = False,
    **_: Any,
) -> Any:
    """Luong-style Attention (dot / concat scores) and Bahdanau-style AdditiveAttention."""
    q, v = inputs[0], inputs[1]
    k = inputs[2] if len(inputs) > 2 else v
    masks = list(mask) if isinstance(mask, list | tuple) else [t.mask for t in inputs]
    q_mask = masks[0] if masks else None
    v_mask = masks[1] if len(masks) > 1 else None
    additive = type(layer).__name__ == "AdditiveAttention"
    if additive or layer.score_mode == "concat":
        qe = b.op("Unsqueeze", [q.value, b.ints([-2])])  # (B, Tq, 1, dim)
        ke = b.op("Unsqueeze", [k.value, b.ints([-3])])  # (B, 1, Tv, dim)
        summed = b.op("Add", [qe, ke])
        if additive:
            t = b.op("Tanh", [summed])
            if layer.use_scale:
                t = b.op("Mul", [b.variable(layer.scale), t])
            scores = b.op("ReduceSum", [t, b.ints([-1])], {"keepdims": 0})
        else:
            if layer.scale is not None:
                summed = b.op("Mul", [b.variable(layer.scale), summed])
            t = b.op("ReduceSum", [b.op("Tanh", [summed]), b.ints([-1])], {"keepdims": 0})
            scores = b.op("Mul", [b.variable(layer.concat_score_weight), t])
    else:
        scores = b.op("MatMul", [q.value, b.op("Transpose", [k.value], {"perm": [0, 2, 1]})])
        if layer.scale is not None:
            scores = b.op("Mul", [scores, b.variable(layer.scale)])
    score_mask = None
    if v_mask is not None:
        score_mask = b.op("Unsqueeze", [_as_bool(b, v_mask), b.ints([-2])])  # (B, 1, Tv)
    if use_causal_mask:
        causal = b.op("Unsqueeze", [causal_mask(b, scores, scores, 1, 2), b.ints([0])])
        score_mask = _and(b, score_mask, causal)
    if score_mask is not None:  # scores - 1e9 where the mask is off
        shifted = b.op("Sub", [scores, b.const(np.float32(1e9))])
        scores = b.op("Where", [score_mask, scores, shifted])
    weights = b.op("Softmax", [scores], {"axis": -1})
    out = b.op("MatMul", [weights, v.value])
    if q_mask is not None:
        keep = b.op("Unsqueeze", [_as_bool(b, q_mask), b.ints([-1])])
        out = b.op("Where", [keep, out, b.const(np.float32(0))])
    result = Tensor(out, (None,), q.dtype, q_mask if isinstance(q_mask, Tensor) else None)
    return [result, weights] if return_attention_scores else result
