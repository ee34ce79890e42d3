"""interop: trace PyTorch, Keras and Flax models into one graph IR; inspect, run, convert.

>>> import interop, torch
>>> g = interop.trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
>>> g.summary()                       # doctest: +SKIP
>>> y = g.run(torch.randn(5, 4))

`import interop` needs only numpy, onnx, onnx-ir and onnxruntime: the frameworks are
imported by their adapters, when a model of theirs is traced.
"""

from __future__ import annotations

from . import errors
from .compare import CompareReport, compare
from .conversion import convert
from .errors import (
    DeviceError,
    InteropError,
    ModelLoadError,
    ShapeError,
    TraceError,
    UnsupportedModelError,
    UnsupportedOpError,
)
from .graph import Graph, TensorSpec
from .hierarchy import Layer
from .serialization import load
from .tracing import register_adapter, trace
from .verify import VerifyReport, verify

__version__ = "0.1.0"

from . import keras_registration as _keras_registration  # noqa: E402

# saved Keras models holding interop layers load after `import interop` alone
_keras_registration.install()

_EMITTERS = ("to_torch", "to_keras", "to_flax", "to_jax")


def __getattr__(name: str):
    # the emitters live in interop.emit, which is imported only when one is used
    if name in _EMITTERS:
        from . import emit

        if hasattr(emit, name):
            return getattr(emit, name)
    if name in ("torch", "keras", "flax"):  # interop.torch.Module, interop.keras.Layer, ...
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'interop' has no attribute '{name}'")


__all__ = [
    "Graph",
    "Layer",
    "TensorSpec",
    "VerifyReport",
    "CompareReport",
    "trace",
    "load",
    "convert",
    "verify",
    "compare",
    "register_adapter",
    "to_torch",
    "to_keras",
    "to_flax",
    "to_jax",
    "errors",
    "InteropError",
    "UnsupportedOpError",
    "UnsupportedModelError",
    "TraceError",
    "ModelLoadError",
    "ShapeError",
    "DeviceError",
]
