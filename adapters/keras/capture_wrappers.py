"""Converters of wrapper layers: TimeDistributed (the inner layer lowered on the batch
and time axes merged, through `capture_walk.lower_layer`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import register_layer
from .capture_lowering import Builder, Tensor
from .capture_walk import lower_layer


@register_layer("TimeDistributed")
def import_time_distributed(b: Builder, layer: Any, x: Tensor, mask: Any = None, **_: Any) -> Any:
    """TimeDistributed(inner): the inner layer on (batch * time, ...), reshaped back."""
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
