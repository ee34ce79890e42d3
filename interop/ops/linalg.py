"""Linear algebra and quantization ONNX ops: MatMul, Gemm, Einsum, Det, (De)QuantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import normalize_axis, op
from .elementwise import onnx_dtype

_SUB_BYTE_INTS = ("int4", "uint4", "int2", "uint2")


@op("MatMul")
def matmul(xp, a, b):
    return xp.matmul(a, b)


@op("Gemm")
def gemm(xp, a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):  # noqa: N803  (spec names)
    a = xp.permute_dims(a, [1, 0]) if transA else a
    b = xp.permute_dims(b, [1, 0]) if transB else b
    out = xp.matmul(a, b)
    if alpha != 1.0:
        out = xp.multiply(out, xp.asarray(alpha, xp.dtype(out), like=out))
    if c is not None:
        out = xp.add(
            out, c if beta == 1.0 else xp.multiply(c, xp.asarray(beta, xp.dtype(c), like=c))
        )
    return out


@op("Einsum")
def einsum(xp, *operands, equation):
    return xp.einsum(equation.replace(" ", ""), *operands)


@op("Det")
def det(xp, x):
    return xp.det(x)


def per_axis(xp, value, x, axis, block_size):
    """Broadcast a per-tensor / per-axis / blocked scale or zero point against x."""
    rank = len(xp.shape(x))
    value_rank = len(xp.shape(value))
    if value_rank == 0 or rank == 0:
        return value
    axis = normalize_axis(axis, rank)
    if block_size:  # blocked: repeat each scale over block_size elements of the axis
        repeat = np.repeat(np.arange(xp.shape(value)[axis]), block_size)[: xp.shape(x)[axis]]
        return xp.take(value, xp.asarray(repeat, like=value), axis)
    if value_rank == 1:
        return xp.reshape(value, [-1 if i == axis else 1 for i in range(rank)])
    return value


@op("DequantizeLinear")
def dequantize_linear(xp, x, scale, zero_point=None, axis=1, block_size=0, output_dtype=0):
    scale_ = per_axis(xp, scale, x, axis, block_size)
    values = xp.astype(x, np.float32)
    if zero_point is not None:
        values = xp.subtract(
            values, xp.astype(per_axis(xp, zero_point, x, axis, block_size), np.float32)
        )
    out = xp.multiply(values, xp.astype(scale_, np.float32))
    return xp.astype(out, onnx_dtype(output_dtype) if output_dtype else xp.dtype(scale))


@op("QuantizeLinear")
def quantize_linear(
    xp, x, scale, zero_point=None, axis=1, block_size=0, output_dtype=0, saturate=1, precision=0
):
    scale_ = per_axis(xp, scale, x, axis, block_size)
    if zero_point is not None:
        target = xp.dtype(zero_point)
    else:
        target = onnx_dtype(output_dtype) if output_dtype else np.dtype(np.uint8)
    scaled = xp.divide(xp.astype(x, np.float32), xp.astype(scale_, np.float32))
    if target.kind in "iu" or target.name in _SUB_BYTE_INTS:
        info = ml_dtypes.iinfo(target)  # numpy's iinfo does not know int4/int2
        # round half to even, then add the zero point and saturate to the integer range
        values = xp.unary("round", scaled)
        if zero_point is not None:
            values = xp.add(
                values, xp.astype(per_axis(xp, zero_point, x, axis, block_size), np.float32)
            )
        return xp.astype(xp.clip(values, float(info.min), float(info.max)), target)
    import onnx

    from .elementwise import cast

    if zero_point is not None:
        scaled = xp.add(
            scaled, xp.astype(per_axis(xp, zero_point, x, axis, block_size), np.float32)
        )
    return cast(xp, scaled, onnx.helper.np_dtype_to_tensor_dtype(target), saturate=saturate)


@op("DynamicQuantizeLinear")
def dynamic_quantize_linear(xp, x):
    low = np.minimum(
        0.0,
        float(np.asarray(xp.to_numpy(xp.reduce("min", x, tuple(range(len(xp.shape(x)))), False)))),
    )
    high = np.maximum(
        0.0,
        float(np.asarray(xp.to_numpy(xp.reduce("max", x, tuple(range(len(xp.shape(x)))), False)))),
    )
    scale = np.float32((high - low) / 255.0)
    zero_point = np.uint8(np.clip(np.rint(0 - low / scale), 0, 255)) if scale else np.uint8(0)
    scale_ = xp.asarray(np.array(scale, np.float32), like=x)
    zero_ = xp.asarray(np.array(zero_point, np.uint8), like=x)
    return quantize_linear(xp, x, scale_, zero_), scale_, zero_


@op("MatMulInteger")
def matmul_integer(xp, a, b, a_zero_point=None, b_zero_point=None):
    a32 = xp.astype(a, np.int32)
    b32 = xp.astype(b, np.int32)
    if a_zero_point is not None:
        zero = xp.astype(a_zero_point, np.int32)
        a32 = xp.subtract(a32, xp.reshape(zero, [-1, 1]) if len(xp.shape(zero)) == 1 else zero)
    if b_zero_point is not None:
        b32 = xp.subtract(b32, xp.astype(b_zero_point, np.int32))
    return xp.matmul(a32, b32)


@op("QLinearMatMul")
def qlinear_matmul(xp, a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero):
    real_a = dequantize_linear(xp, a, a_scale, a_zero, axis=0 if len(xp.shape(a_scale)) else 1)
    real_b = dequantize_linear(xp, b, b_scale, b_zero, axis=-1)
    product = xp.matmul(xp.astype(real_a, np.float32), xp.astype(real_b, np.float32))
    return quantize_linear(xp, product, y_scale, y_zero, axis=-1)
