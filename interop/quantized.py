"""Quantized files (onnxruntime's quantizer and others): QDQ pairs, QOperator ops, errors.

A QDQ model (`onnxruntime.quantization.quantize_static(quant_format=QuantFormat.QDQ)`)
computes float ops between QuantizeLinear -> DequantizeLinear pairs. Before emission:

- a weight's DequantizeLinear of an integer initializer folds into a float initializer
  (`interop.legacy.fold_constants`): the emitted model holds **dequantized weights** in
  native layers (nn.Conv2d, keras Conv2D, nnx.Conv), trainable;
- each activation's QuantizeLinear -> DequantizeLinear pair (same scale, zero point and axis)
  becomes one `ai.interop::QuantizeDequantize` node (`fake_quantize_pairs`): the two ONNX ops
  computed one after the other, exactly as the file says (the same values as ONNX Runtime up
  to its own rounding), with a straight-through gradient (1 where the value is inside the
  integer range, 0 where it saturates: the fake-quant of quantization-aware training).
  Kept apart, the integer between them would stop every gradient.

QOperator files (`quant_format=QuantFormat.QOperator`, `quantize_dynamic`) use integer ops:
QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger and DynamicQuantizeLinear emit as
generic ops (interop/ops/quantized.py, linalg.py); onnxruntime's contrib ops (QGemm,
QLinearAdd, ... in domain com.microsoft) raise `UnsupportedOpError` with `quantized_fix`.

>>> fake_quantize_pairs(model)    # doctest: +SKIP
3
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DOMAIN = "ai.interop"
FAKE_QUANTIZE = "QuantizeDequantize"
_STANDARD = ("", "ai.onnx")


def is_quantized_op(op_type: str, domain: str) -> bool:
    """An op only a quantizer writes (onnxruntime's QOperator format, its contrib ops)."""
    return (
        op_type.startswith(("QLinear", "QGemm", "QAttention", "QEmbed", "DynamicQuantize"))
        or op_type.endswith(("Integer", "IntegerToFloat"))
        or (domain == "com.microsoft" and op_type in ("QuantizeLinear", "DequantizeLinear"))
    )


def quantized_fix(op: str) -> str:
    """How to get a file interop emits instead of one with the quantized op `op`."""
    return (
        f"'{op}' is an op of onnxruntime's QOperator quantization format; quantize the float "
        "model in the QDQ format instead (onnxruntime.quantization.quantize_static(..., "
        "quant_format=QuantFormat.QDQ)), which emits as dequantized weights and fake-quantized "
        "activations, or leave the op unquantized: op_types_to_quantize=['Conv', 'MatMul'] "
        "(QLinearConv / QLinearMatMul in quantize_static's QOperator format, ConvInteger / "
        "MatMulInteger in quantize_dynamic's; all of them emit)"
    )


def _same(a: ir.Value | None, b: ir.Value | None) -> bool:
    """The same tensor: one value, or two constants with equal dtype, shape and data."""
    if a is b:
        return True
    if a is None or b is None or a.const_value is None or b.const_value is None:
        return False
    x, y = a.const_value.numpy(), b.const_value.numpy()
    return x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))


def _attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.as_int()


def _pairs_with(quantize: ir.Node, dequantize: ir.Node) -> bool:
    """`dequantize` undoes `quantize`: its input is the quantized value, with the same scale,
    zero point, axis and block size."""
    if dequantize.op_type != "DequantizeLinear" or dequantize.domain not in _STANDARD:
        return False
    if dequantize.inputs[0] is not quantize.outputs[0]:
        return False
    q_inputs = list(quantize.inputs) + [None] * (3 - len(quantize.inputs))
    d_inputs = list(dequantize.inputs) + [None] * (3 - len(dequantize.inputs))
    return (
        _same(q_inputs[1], d_inputs[1])
        and _same(q_inputs[2], d_inputs[2])
        and _attribute(quantize, "axis", 1) == _attribute(dequantize, "axis", 1)
        and _attribute(quantize, "block_size", 0) == _attribute(dequantize, "block_size", 0)
    )


_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _float_input(quantize: ir.Node) -> bool:
    """A float input (its type, or its scale's when the file left it untyped: opsets up to 19
    have float scales and inputs, 19 on the same type)."""
    x, scale = quantize.inputs[0], quantize.inputs[1]
    if x is None:
        return False
    dtype = x.dtype if x.dtype is not None else scale.dtype if scale is not None else None
    return dtype in _FLOATS


def fake_quantize_pairs(model: ir.Model) -> int:
    """Each QuantizeLinear read only by DequantizeLinear nodes that undo it becomes one
    `ai.interop::QuantizeDequantize` node (in place, main graph); returns the count."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "QuantizeLinear" or node.domain not in _STANDARD:
            continue
        quantized = node.outputs[0]
        readers = [user for user, _ in quantized.uses()]
        if (
            not readers
            or quantized.is_graph_output()
            or not all(_pairs_with(node, reader) for reader in readers)
            or not _float_input(node)
        ):
            continue
        attributes = [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()]
        output_dtype = readers[0].attributes.get("output_dtype")
        if output_dtype is not None:
            attributes.append(ir.AttrInt64("dequantized_dtype", output_dtype.as_int()))
        fused = ir.Node(
            DOMAIN, FAKE_QUANTIZE, list(node.inputs), attributes,
            name=node.name or f"quantize_dequantize_{count}", num_outputs=1,
        )  # fmt: skip
        fused.metadata_props.update(node.metadata_props)
        first = readers[0].outputs[0]
        result = fused.outputs[0]
        result.shape, result.type = first.shape, first.type
        name = first.name
        graph.insert_before(node, fused)
        for reader in readers:
            reader.outputs[0].replace_all_uses_with(result, replace_graph_outputs=True)
        for reader in readers:
            graph.remove(reader, safe=True)
        graph.remove(node, safe=True)
        result.name = name  # the dequantized value's name, free now
        count += 1
    if count:
        model.opset_imports.setdefault(DOMAIN, 1)
        graph.opset_imports.setdefault(DOMAIN, 1)
    return count
