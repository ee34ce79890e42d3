"""bfloat16 values in and out of ONNX Runtime (issue 20: dtypes kept end to end).

numpy has no bfloat16 of its own (``ml_dtypes.bfloat16`` is the one JAX, onnx_ir and
interop use), and ONNX Runtime's numpy binding refuses it ("Numpy_type 256 can't be
converted to MLDataType") both ways; torch's ``.numpy()`` refuses a bf16 tensor. Here the
bits travel instead: a bf16 feed becomes an ``OrtValue`` over its bytes with the ONNX
element type BFLOAT16, and a bf16 output is copied out of ONNX Runtime's buffer.

>>> run_session(session, ["y"], {"x": np.ones((2, 3), ml_dtypes.bfloat16)})  # doctest: +SKIP
[array([[...]], dtype=bfloat16)]
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["BFLOAT16", "host_numpy", "run_session"]

BFLOAT16 = np.dtype(ir.DataType.BFLOAT16.numpy())


def host_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as a numpy array, bfloat16 included (through its bits)."""
    tensor = tensor.detach().cpu()
    if str(tensor.dtype) == "torch.bfloat16":
        import torch

        return tensor.contiguous().view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def run_session(session: Any, names: Sequence[str], feeds: Mapping[str, Any]) -> list[Any]:
    """``session.run(names, feeds)``, with bfloat16 feeds and outputs as OrtValues.

    Without bfloat16 among the feeds and requested outputs this is ``session.run``.
    """
    wide = getattr(session, "_interop_bf16_outputs", None)
    if wide is None:  # looked up once per session: Graph.run's per-call cost stays as it was
        wide = {o.name for o in session.get_outputs() if o.type == "tensor(bfloat16)"}
        try:
            session._interop_bf16_outputs = wide
        except AttributeError:  # a session type that takes no attributes: asked every run
            pass
    if not any(_bf16(v) for v in feeds.values()) and not wide.intersection(names):
        return list(session.run(names, feeds))
    import onnxruntime as ort

    values = {}
    for name, value in feeds.items():
        if _bf16(value):
            bits = np.ascontiguousarray(value).view(np.uint16)
            value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, int(ir.DataType.BFLOAT16))
        elif isinstance(value, np.ndarray):
            value = ort.OrtValue.ortvalue_from_numpy(value)
        values[name] = value  # a bound array: ONNX Runtime reads it during the run
    return [_host(v) for v in session.run_with_ort_values(list(names), values)]


def _bf16(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == BFLOAT16


def _host(value: Any) -> Any:
    if value.is_tensor() and value.data_type() == "tensor(bfloat16)":
        out = np.empty(value.shape(), np.uint16)
        if out.size:
            ctypes.memmove(out.ctypes.data, value.data_ptr(), out.nbytes)
        return out.view(BFLOAT16)
    return value.numpy()
