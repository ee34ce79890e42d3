"""The graph rules of the optimized copy (interop/optimize_rules.py) on small graphs.

Each graph runs on ONNX Runtime before and after the rule at several batch sizes; the
outputs agree within 1e-6 and the rule did what it claims (nodes counted by op type).
The models these rules were written for (GPT-2's causal mask, the Flax attention's
``(V^T P^T)^T``) are in tests/test_runtime_optimize.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from interop import optimize_batch, optimize_rules
from interop.optimize import _optimize

B = ir.SymbolicDim("batch")


def _model(inputs, outputs, nodes) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": 18})
    return ir.Model(graph, ir_version=9)


def _const(array, dtype=np.int64) -> ir.Value:
    node = ir.node("Constant", [], {"value": ir.tensor(np.asarray(array, dtype=dtype))})
    _const.nodes.append(node)
    return node.outputs[0]


_const.nodes = []


def _run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    data = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph)


def _prepare(model: ir.Model) -> None:
    import onnx_ir.passes.common as common_passes

    common_passes.ShapeInferencePass()(model)


def _attention_like():
    """scores [B, 2, 8, 8] + a causal mask that is Expand(mask[1, 1, 8, 8], [B, 1, 8, 8])."""
    _const.nodes = []
    x = ir.val("x", ir.DataType.FLOAT, [B, 2, 8, 8])
    shape = ir.node("Shape", [x], {"start": 0, "end": 1})
    target = ir.node("Concat", [shape.outputs[0], _const([1, 8, 8])], {"axis": 0})
    causal = np.triu(np.ones((1, 1, 8, 8), bool), 1)
    expand = ir.node("Expand", [_const(causal, bool), target.outputs[0]])
    where = ir.node("Where", [expand.outputs[0], _const(-1e9, np.float32), _const(0.0, np.float32)])
    add = ir.node("Add", [x, where.outputs[0]])
    # the batch index used as data: not uniform over the batch, must stay as it is
    limit = ir.node("Squeeze", [shape.outputs[0], _const([0])])
    index = ir.node("Range", [_const(0), limit.outputs[0], _const(1)])
    as_float = ir.node("Cast", [index.outputs[0]], {"to": ir.DataType.FLOAT})
    column = ir.node("Unsqueeze", [as_float.outputs[0], _const([1, 2, 3])])
    out = ir.node("Add", [add.outputs[0], column.outputs[0]])
    out.outputs[0].name = "y"
    nodes = [*_const.nodes, shape, target, expand, where, add, limit, index, as_float, column]
    return _model([x], [out.outputs[0]], [*nodes, out])


def test_batch_free_computes_the_mask_at_batch_one():
    model = _attention_like()
    feeds = {
        b: {"x": np.random.default_rng(b).standard_normal((b, 2, 8, 8)).astype(np.float32)}
        for b in (1, 3, 8)
    }
    want = {b: _run(model, f)[0] for b, f in feeds.items()}
    _prepare(model)
    assert optimize_batch.batch_free(model) == 1  # the mask; the batch index is data
    _optimize(model)
    ops = _ops(model)
    assert ops["Expand"] == 0 and ops["Where"] == 0, ops  # folded: a [1, 1, 8, 8] constant
    assert ops["Range"] == 1, ops  # the batch index used as data stays per batch
    for b, f in feeds.items():
        np.testing.assert_allclose(_run(model, f)[0], want[b], rtol=1e-6, atol=1e-6)


def _dynamic_sequence_mask():
    """scores [B, 2, S, S] + a causal mask built from arange(S), expanded to [B, 1, S, S];
    plus arange(B) used as data, which depends on the batch size."""
    _const.nodes = []
    s = ir.SymbolicDim("seq")
    x = ir.val("x", ir.DataType.FLOAT, [B, 2, s, s])
    size = ir.node("Shape", [x], {"start": 2, "end": 3})
    limit = ir.node("Squeeze", [size.outputs[0], _const([0])])
    arange = ir.node("Range", [_const(0), limit.outputs[0], _const(1)])
    rows = ir.node("Unsqueeze", [arange.outputs[0], _const([1])])
    causal = ir.node("Less", [rows.outputs[0], arange.outputs[0]])  # [S, S]: above the diagonal
    batch = ir.node("Shape", [x], {"start": 0, "end": 1})
    target = ir.node("Concat", [batch.outputs[0], _const([1]), size.outputs[0], size.outputs[0]],
                     {"axis": 0})  # fmt: skip
    expand = ir.node("Expand", [causal.outputs[0], target.outputs[0]])
    where = ir.node("Where", [expand.outputs[0], _const(-1e9, np.float32), _const(0.0, np.float32)])
    add = ir.node("Add", [x, where.outputs[0]])
    index = ir.node(
        "Range", [_const(0), ir.node("Squeeze", [batch.outputs[0]]).outputs[0], _const(1)]
    )
    as_float = ir.node("Cast", [index.outputs[0]], {"to": ir.DataType.FLOAT})
    column = ir.node("Unsqueeze", [as_float.outputs[0], _const([1, 2, 3])])
    out = ir.node("Add", [add.outputs[0], column.outputs[0]])
    out.outputs[0].name = "y"
    nodes = [*_const.nodes, size, limit, arange, rows, causal, batch, target, expand, where, add]
    squeeze = index.inputs[1].producer()
    model = _model([x], [out.outputs[0]], [*nodes, squeeze, index, as_float, column, out])
    _prepare(model)
    # the shapes a capture names (ONNX's inference leaves Range's length unnamed)
    for node, shape in ((arange, [s]), (rows, [s, 1]), (causal, [s, s]), (expand, [B, 1, s, s]),
                        (where, [B, 1, s, s]), (add, [B, 2, s, s]), (index, [B]),
                        (as_float, [B]), (column, [B, 1, 1, 1]), (out, [B, 2, s, s])):  # fmt: skip
        node.outputs[0].shape = ir.Shape(shape)
    return model


def test_batch_free_with_a_dynamic_sequence_computes_the_mask_at_batch_one():
    model = _dynamic_sequence_mask()
    rng = np.random.default_rng(0)
    sizes = [(1, 3), (3, 5), (8, 8), (2, 1)]
    feeds = {bs: {"x": rng.standard_normal((bs[0], 2, bs[1], bs[1])).astype(np.float32)}
             for bs in sizes}  # fmt: skip
    want = {bs: _run(model, f)[0] for bs, f in feeds.items()}
    assert optimize_batch.batch_free(model) == 1  # the mask, not the batch index
    _optimize(model)
    expand = [node for node in model.graph if node.op_type == "Expand"]
    assert not expand or all(str(n.outputs[0].shape[0]) != "batch" for n in expand), expand
    assert _ops(model)["Range"] == 2, _ops(model)  # arange(S) per run, arange(B) as data
    for bs, f in feeds.items():
        np.testing.assert_allclose(_run(model, f)[0], want[bs], rtol=1e-6, atol=1e-6)


def test_batch_free_leaves_graphs_without_a_batch_alone():
    _const.nodes = []
    x = ir.val("x", ir.DataType.FLOAT, [2, 8])
    y = ir.node("Add", [x, _const(np.ones((2, 8)), np.float32)])
    y.outputs[0].name = "y"
    model = _model([x], [y.outputs[0]], [*_const.nodes, y])
    assert optimize_batch.batch_free(model) == 0


def _flax_attention():
    """Flax's P @ V: MatMul(V^T, P^T) between transposes and size-1 reshapes, transposed back."""
    _const.nodes = []
    p = ir.val("p", ir.DataType.FLOAT, [1, B, 4, 16, 16])
    v = ir.val("v", ir.DataType.FLOAT, [B, 16, 4, 8])
    p_t = ir.node("Transpose", [p], {"perm": [1, 2, 4, 0, 3]})  # [B, 4, 16, 1, 16]
    p_r = ir.node("Reshape", [p_t.outputs[0], _const([0, 4, 16, 16])])
    v_t = ir.node("Transpose", [v], {"perm": [0, 2, 3, 1]})  # [B, 4, 8, 16]
    mm = ir.node("MatMul", [v_t.outputs[0], p_r.outputs[0]])  # [B, 4, 8, 16] = (P V)^T
    up = ir.node("Reshape", [mm.outputs[0], _const([0, 4, 8, 1, 16])])
    back = ir.node("Transpose", [up.outputs[0]], {"perm": [0, 4, 1, 3, 2]})  # [B, 16, 4, 1, 8]
    out = ir.node("Reshape", [back.outputs[0], _const([-1, 32])])
    out.outputs[0].name = "y"
    nodes = [*_const.nodes, p_t, p_r, v_t, mm, up, back, out]
    return _model([p, v], [out.outputs[0]], nodes)


def test_transposed_matmul_drops_a_transpose():
    model = _flax_attention()
    feeds = {
        b: {
            "p": np.random.default_rng(b).random((1, b, 4, 16, 16)).astype(np.float32),
            "v": np.random.default_rng(b + 10).standard_normal((b, 16, 4, 8)).astype(np.float32),
        }
        for b in (1, 3)
    }
    want = {b: _run(model, f)[0] for b, f in feeds.items()}
    assert _ops(model)["Transpose"] == 3
    _prepare(model)
    assert optimize_rules.transposed_matmul(model) == 1
    _optimize(model)
    # P^T's transpose only moved a size-1 axis: gone; V and the result keep one each
    assert _ops(model)["Transpose"] == 2, _ops(model)
    for b, f in feeds.items():
        np.testing.assert_allclose(_run(model, f)[0], want[b], rtol=1e-6, atol=1e-6)
    assert optimize_rules.transposed_matmul(model) == 0  # no further gain: left alone


def _regrouped_k():
    """torch's k.transpose(-1, -2) on merged batch and heads, scaled, split back (GPT-2)."""
    _const.nodes = []
    x = ir.val("x", ir.DataType.FLOAT, [B, 6, 4, 3])  # [batch, seq, heads, d]
    heads = ir.node("Transpose", [x], {"perm": [0, 2, 1, 3]})  # [batch, heads, seq, d]
    merged = ir.node("Reshape", [heads.outputs[0], _const([-1, 6, 3])])
    swapped = ir.node("Transpose", [merged.outputs[0]], {"perm": [0, 2, 1]})
    scaled = ir.node("Mul", [swapped.outputs[0], _const(0.5, np.float32)])
    shape = ir.node("Shape", [x], {"start": 0, "end": 1})
    back = ir.node("Concat", [shape.outputs[0], _const([4, 3, 6])], {"axis": 0})
    split = ir.node("Reshape", [scaled.outputs[0], back.outputs[0]])
    out = ir.node("Neg", [split.outputs[0]])
    out.outputs[0].name = "y"
    nodes = [*_const.nodes, heads, merged, swapped, scaled, shape, back, split, out]
    return _model([x], [out.outputs[0]], nodes)


def test_regrouped_transpose_is_one_transpose():
    model = _regrouped_k()
    feeds = {
        b: {"x": np.random.default_rng(b).standard_normal((b, 6, 4, 3)).astype(np.float32)}
        for b in (1, 3)
    }
    want = {b: _run(model, f)[0] for b, f in feeds.items()}
    _prepare(model)
    assert optimize_rules.regrouped_transpose(model) == 1
    from onnxscript.rewriter import rewrite

    from interop.optimize import _tidy_rules

    rewrite(model, _tidy_rules())  # the two transposes left merge into one
    ops = _ops(model)
    assert ops["Transpose"] == 1 and ops["Reshape"] == 0, ops
    assert [n.attributes["perm"].value for n in model.graph if n.op_type == "Transpose"] == [
        (0, 2, 3, 1)
    ]
    for b, f in feeds.items():
        np.testing.assert_allclose(_run(model, f)[0], want[b], rtol=1e-6, atol=1e-6)


def test_groups_of_a_reshape():
    groups = optimize_rules._groups
    assert groups([B, 12, 64, 64], [-1, 64, 64]) == [[0, 1], [2], [3]]
    assert groups([B, 64, 12, 64], [-1, 64, 768]) == [[0], [1], [2, 3]]
    assert groups([2, 3, 4], [6, 4]) == [[0, 1], [2]]
    assert groups([B, 12, 64], [-1, 32, 2]) is None  # splits an axis: not a grouping
    assert groups([B, 4], [-1, -1]) is None
