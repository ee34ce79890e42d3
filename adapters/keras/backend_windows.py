"""Window helpers of the Keras backend's pooling: ceil-mode pads, window sums and reductions
over channels-first tensors, built from ``keras.ops`` only so gradients reach the input."""

from __future__ import annotations

import math

import numpy as np
from keras import ops


def window_sum(x, kernel, strides, dilations):
    """The sum of each window of the padded channels-first x (no padding left to apply)."""
    if any(d != 1 for d in dilations):
        return window_reduce(ops.sum, x, kernel, strides, dilations)
    # every window is whole: the mean times the window size is the sum
    pooled = ops.average_pool(to_channels_last(x), kernel, strides)
    return to_channels_first(ops.multiply(pooled, float(math.prod(kernel))))


def window_reduce(reduce, x, kernel, strides, dilations):
    """reduce over each dilated window of the padded channels-first x.

    keras.ops has no dilated pooling (and TensorFlow no strided dilated convolution), so the
    windows are gathered: per spatial axis, one take with an (outputs, kernel) index grid
    then a reduction over the kernel axis; take is differentiable on every Keras backend.
    """
    for axis in range(len(kernel)):
        size = int(ops.shape(x)[2 + axis])
        k, s, d = kernel[axis], strides[axis], dilations[axis]
        outputs = (size - (k - 1) * d - 1) // s + 1
        index = np.arange(outputs)[:, None] * s + np.arange(k)[None, :] * d
        # one axis at a time (max and sum are separable): the rank stays low, which the
        # gradient of TensorFlow's reductions needs (its BroadcastTo fails on a 3-D pool's
        # 8-dim windows)
        x = reduce(ops.take(x, index.astype(np.int32), axis=2 + axis), axis=3 + axis)
    return x


def pad_channels_first(x, pads, value=0.0):
    if not any(lo or hi for lo, hi in pads):
        return x
    return ops.pad(x, [(0, 0), (0, 0), *[(int(lo), int(hi)) for lo, hi in pads]], "constant",
                   constant_values=value)  # fmt: skip


def to_channels_last(x):
    rank = len(ops.shape(x))
    return ops.transpose(x, (0, *range(2, rank), 1))


def to_channels_first(x):
    rank = len(ops.shape(x))
    return ops.transpose(x, (0, rank - 1, *range(1, rank - 1)))
