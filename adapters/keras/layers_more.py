"""More converters: TimeDistributed, and the keras.ops that layers such as PReLU,
RMSNormalization and GroupNormalization record when opened by a symbolic call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from . import register_layer, register_op
from .builder import Builder, Tensor
from .layers import relu
from .ops import value


@register_op("ReLU")
def import_relu_op(b: Builder, op: Any, x: Any) -> ir.Value:
    """keras.activations.relu with negative_slope / max_value / threshold."""
    return relu(b, value(b, x), float(op.negative_slope), op.max_value, float(op.threshold))


@register_op("RMSNorm")
def import_rms_norm(b: Builder, op: Any, x: Any, scale: Any = None) -> ir.Value:
    """ops.rms_normalization: x * rsqrt(mean(x^2) + eps) * scale."""
    import keras

    v = value(b, x)
    axes = op.axis if isinstance(op.axis, list | tuple) else [op.axis]
    eps = keras.config.epsilon() if op.epsilon is None else float(op.epsilon)
    mean = b.op(
        "ReduceMean", [b.op("Mul", [v, v]), b.ints([int(a) for a in axes])], {"keepdims": 1}
    )
    y = b.op("Div", [v, b.op("Sqrt", [b.op("Add", [mean, b.const(np.float32(eps))])])])
    return y if scale is None else b.op("Mul", [y, value(b, scale)])


@register_op("Moments")
def import_moments(b: Builder, op: Any, x: Any) -> list[ir.Value]:
    """ops.moments: (mean, variance) over axes."""
    v = value(b, x)
    axes = b.ints([int(a) for a in (op.axes if isinstance(op.axes, list | tuple) else [op.axes])])
    keep = int(bool(op.keepdims))
    mean = b.op("ReduceMean", [v, axes], {"keepdims": 1})
    centered = b.op("Sub", [v, mean])
    var = b.op("ReduceMean", [b.op("Mul", [centered, centered]), axes], {"keepdims": keep})
    return [mean if keep else b.op("ReduceMean", [v, axes], {"keepdims": 0}), var]


@register_layer("TimeDistributed")
def import_time_distributed(b: Builder, layer: Any, x: Tensor, mask: Any = None, **_: Any) -> Any:
    """TimeDistributed(inner): the inner layer on (batch * time, ...), reshaped back."""
    from .importer import lower_layer

    shape = b.op("Shape", [x])
    merged = b.op("Reshape", [x, b.op("Concat", [b.ints([-1]), b.op("Slice", [shape, b.ints([2]), b.ints([x.rank])])], {"axis": 0})])  # fmt: skip
    inner = Tensor(merged, (None, *x.shape[2:]), x.dtype)
    path = f"{b.scope}/{layer.layer.name}" if b.scope else layer.layer.name
    out = lower_layer(b, layer.layer, path, [inner], {})
    out_value = out.value if isinstance(out, Tensor) else out
    out_shape = b.op("Shape", [out_value])
    rest = b.op("Slice", [out_shape, b.ints([1]), b.ints([np.iinfo(np.int64).max])])
    target = b.op("Concat", [b.op("Slice", [shape, b.ints([0]), b.ints([2])]), rest], {"axis": 0})
    return b.op("Reshape", [out_value, target])
