"""Integer convolutions of quantized files: ConvInteger and QLinearConv (QOperator format).

onnxruntime's `quantize_dynamic` writes ConvInteger (uint8 / int8 operands, int32 result)
and `quantize_static(quant_format=QuantFormat.QOperator)` writes QLinearConv. Both are
computed as ONNX Runtime computes them: the zero points subtracted, the convolution
accumulated (here in float32 on integer values, exact while a sum stays below 2^24, far above
what an int8 convolution of a few thousand taps reaches), and for QLinearConv the int32
accumulator requantized with one float32 multiplier per output channel,
`x_scale * w_scale / y_scale`, rounded half to even and saturated, as MLAS does.

>>> import numpy as np
>>> from interop.backend import numpy_backend as xp
>>> x = np.array([[[[1, 2], [3, 4]]]], np.uint8); w = np.ones((1, 1, 1, 1), np.uint8)
>>> conv_integer(xp, x, w, np.uint8(1)).ravel().tolist()
[0, 1, 2, 3]
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import op
from .linalg import dequantize_linear, per_axis, quantize_linear
from .nn import conv


def _centered(xp, values, zero_point, channel_axis: bool):
    """values - zero_point as float32; a per-channel zero point applies along axis 0."""
    out = xp.astype(values, np.float32)
    if zero_point is None:
        return out
    zero = xp.astype(zero_point, np.float32)
    if channel_axis and len(xp.shape(zero)) == 1 and xp.shape(zero)[0] > 1:
        zero = xp.reshape(zero, [-1] + [1] * (len(xp.shape(values)) - 1))
    return xp.subtract(out, zero)


@op("ConvInteger")
def conv_integer(xp, x, w, x_zero_point=None, w_zero_point=None, **attributes):
    accumulated = conv(
        xp, _centered(xp, x, x_zero_point, False), _centered(xp, w, w_zero_point, True),
        None, **attributes,
    )  # fmt: skip
    return xp.astype(xp.unary("round", accumulated), np.int32)


@op("QLinearConv")
def qlinear_conv(
    xp,
    x,
    x_scale,
    x_zero_point,
    w,
    w_scale,
    w_zero_point,
    y_scale,
    y_zero_point,
    B=None,  # noqa: N803
    **attributes,
):
    accumulated = conv(
        xp, _centered(xp, x, x_zero_point, False), _centered(xp, w, w_zero_point, True),
        None if B is None else xp.astype(B, np.float32), **attributes,
    )  # fmt: skip
    rank = len(xp.shape(accumulated))
    multiplier = xp.divide(
        xp.multiply(xp.astype(x_scale, np.float32), xp.astype(w_scale, np.float32)),
        xp.astype(y_scale, np.float32),
    )
    if len(xp.shape(multiplier)) == 1:  # per output channel
        multiplier = xp.reshape(multiplier, [1, -1] + [1] * (rank - 2))
    values = xp.unary("round", xp.multiply(accumulated, multiplier))
    target = xp.dtype(y_zero_point) if y_zero_point is not None else np.dtype(np.uint8)
    if y_zero_point is not None:
        values = xp.add(values, xp.astype(y_zero_point, np.float32))
    info = ml_dtypes.iinfo(target)
    return xp.astype(xp.clip(values, float(info.min), float(info.max)), target)


def _detached(xp, x):
    """x's values without a gradient path: bitcast to the same-width integer and back (the
    backend protocol has no stop_gradient; no framework differentiates through an integer)."""
    dtype = np.dtype(xp.dtype(x))
    carrier = {2: np.int16, 4: np.int32, 8: np.int64}[dtype.itemsize]
    return xp.bitcast(xp.bitcast(x, carrier), dtype)


@op("ai.interop::QuantizeDequantize")
def quantize_dequantize(
    xp, x, scale, zero_point=None, axis=1, block_size=0, output_dtype=0, saturate=1,
    precision=0, dequantized_dtype=0,
):  # fmt: skip
    """A QuantizeLinear -> DequantizeLinear pair (interop.quantized.fake_quantize_pairs): the
    two ONNX ops' values, with a straight-through gradient (1 inside the integer range)."""
    quantized = quantize_linear(
        xp, x, scale, zero_point, axis=axis, block_size=block_size, output_dtype=output_dtype,
        saturate=saturate, precision=precision,
    )  # fmt: skip
    values = dequantize_linear(
        xp, quantized, scale, zero_point, axis=axis, block_size=block_size,
        output_dtype=dequantized_dtype,
    )  # fmt: skip
    # zero in value, x's gradient in training: values + 0 are the values exactly
    through = xp.subtract(x, _detached(xp, x))
    target = np.dtype(xp.dtype(quantized))
    if target.kind in "iu":  # saturated entries pass no gradient, as fake-quant layers do
        divisor = xp.astype(per_axis(xp, scale, x, axis, block_size), np.float32)
        scaled = xp.unary("round", xp.divide(xp.astype(x, np.float32), divisor))
        if zero_point is not None:
            zero = per_axis(xp, zero_point, x, axis, block_size)
            scaled = xp.add(scaled, xp.astype(zero, np.float32))
        info = ml_dtypes.iinfo(target)
        low = xp.compare("greater_equal", scaled, xp.asarray(np.float32(info.min), like=scaled))
        high = xp.compare("less_equal", scaled, xp.asarray(np.float32(info.max), like=scaled))
        inside = xp.compare("logical_and", low, high)
        # where, not a product: an infinite x saturates, and inf - inf would be NaN
        through = xp.where(inside, through, xp.asarray(np.zeros((), xp.dtype(x)), like=x))
    return xp.add(values, xp.astype(through, xp.dtype(values)))
