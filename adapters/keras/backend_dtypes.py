"""Dtypes of the Keras backend: ONNX dtypes Keras lacks travel in a wider carrier dtype.

`keras_dtype` names the Keras dtype that holds an ONNX dtype, `to_carrier` / `from_carrier`
convert host arrays at the model's boundary, `is_host` tells host values from Keras tensors.
"""

from __future__ import annotations

import keras
import ml_dtypes
import numpy as np
from keras import ops

from interop.errors import UnsupportedOpError


def is_host(value) -> bool:
    """Whether `value` is still a host value (numpy arrays and Python numbers, or lists of them)."""
    return isinstance(value, (np.ndarray, np.generic, int, float, bool)) or (
        isinstance(value, (list, tuple)) and all(is_host(v) for v in value)
    )


# ONNX dtypes Keras lacks: held in a wider carrier dtype whose values are exact (the model's
# inputs and outputs are carriers too; `model.input_dtypes` / `output_dtypes` name the ONNX
# dtype, `to_carrier` / `from_carrier` convert at the boundary)
CARRIERS = {
    np.dtype(ml_dtypes.int4): "int8",
    np.dtype(ml_dtypes.int2): "int8",
    np.dtype(ml_dtypes.uint4): "uint8",
    np.dtype(ml_dtypes.uint2): "uint8",
    np.dtype(ml_dtypes.float4_e2m1fn): "float32",
    np.dtype(ml_dtypes.float8_e8m0fnu): "float32",
    np.dtype(ml_dtypes.float8_e4m3fnuz): "float32",
    np.dtype(ml_dtypes.float8_e5m2fnuz): "float32",
    # Keras's TensorFlow backend computes uint64 arithmetic in uint32: the bits travel in
    # int64 (numpy's wrapping casts both ways) and uint64 nodes compute on the host
    np.dtype(np.uint64): "int64",
}


_BY_NAME = {dtype.name: dtype for dtype in CARRIERS}


def as_dtype(dtype) -> np.dtype:
    """A dtype from a dtype or its name ("int4" is ml_dtypes' int4 here, not numpy's int32)."""
    return (
        _BY_NAME.get(dtype, None) or np.dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    )


def emulated(dtype) -> bool:
    """Whether values of this dtype travel in a carrier (Keras has no such dtype)."""
    return dtype is not None and as_dtype(dtype) in CARRIERS


def keras_dtype(dtype) -> str:
    dtype = as_dtype(dtype)
    if dtype.kind == "O":  # ONNX strings: numpy holds them as objects, Keras as "string"
        if keras.backend.backend() != "tensorflow":
            raise UnsupportedOpError(
                "string tensor",
                direction="emit",
                adapter="keras",
                detail=f"Keras has string tensors on TensorFlow only, not {keras.backend.backend()}",
                fix="emit on KERAS_BACKEND=tensorflow, or keep the string ops out of the model",
            )
        return "string"
    return CARRIERS.get(dtype) or dtype.name


def to_carrier(array):
    """A host array of an ONNX dtype Keras lacks as its carrier (others unchanged)."""
    array = np.asarray(array)
    return array.astype(CARRIERS[array.dtype]) if array.dtype in CARRIERS else array


def from_carrier(x, dtype):
    """A carrier tensor (or array) back as a host array of its ONNX dtype."""
    array = x if is_host(x) else np.asarray(ops.convert_to_numpy(x))
    return np.asarray(array).astype(as_dtype(dtype)) if emulated(dtype) else np.asarray(array)
