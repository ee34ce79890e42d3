"""PyTorch adapter: `torch.nn.Module` -> `interop.Graph` through torch.onnx's export path.

Importing this package does not import torch; the capture module does, on first use.

Unsupported aten ops can be given an ONNX translation (an onnxscript function), which
`interop.trace` passes to torch.onnx as a custom translation:

>>> from interop.adapters.torch import register_op           # doctest: +SKIP
>>> @register_op(torch.ops.aten.cummax.default)                # doctest: +SKIP
... def cummax(x, dim): ...
"""

from __future__ import annotations

from typing import Any

from interop.registry import Registry

# aten op name ("aten::cummax") -> (op overload, onnxscript function)
CAPTURE_OPS: Registry[tuple[Any, Any]] = Registry("import", adapter="torch")
# emit side (emitter.py): op type -> builder(emitter, node, args) giving an
# `interop.emitter.Native` (a torch layer: emit_layers.py, emit_recurrent.py) or None
EMIT_LAYERS: Registry[Any] = Registry("emit", adapter="torch layers")
# op type -> builder(emitter, node, args) giving (torch callable, args, kwargs[, absorbed
# nodes]) or None: a direct torch call where dtypes and attributes allow (emit_calls.py).
# The generic op is a closure re-dispatching through the backend on every forward.
EMIT_CALLS: Registry[Any] = Registry("emit", adapter="torch calls")


def register_op(op_overload: Any, function: Any = None, *, replace: bool = False) -> Any:
    """Register an onnxscript function as the ONNX translation of a torch op overload."""

    def decorator(fn: Any) -> Any:
        CAPTURE_OPS.register(str(op_overload.name()), (op_overload, fn), replace=replace)
        return fn

    return decorator(function) if function is not None else decorator


# module rewrites for layers torch.export cannot take (mixture-of-experts dispatch):
# REWRITES and the decorator live beside the code that applies them (capture_rewrites.py,
# which imports no framework); re-exported here beside register_op
from .capture_rewrites import REWRITES as REWRITES  # noqa: E402
from .capture_rewrites import register_rewrite as register_rewrite  # noqa: E402
from .capture_rewrites import unregister_rewrite as unregister_rewrite  # noqa: E402


def _is_torch_module(model: Any) -> bool:
    return any(
        cls.__module__ == "torch.nn.modules.module" and cls.__name__ == "Module"
        for cls in type(model).__mro__
    )


class TorchAdapter:
    name = "torch"
    description = (
        "torch.nn.Module (PyTorch, Hugging Face transformers, Keras on the torch backend excluded)"
    )

    def accepts(self, model: Any) -> bool:
        return _is_torch_module(model) and not _is_keras(model)

    def trace(self, model: Any, example_inputs: Any, **options: Any) -> Any:
        weights = options.pop("weights", None)
        if weights is not None:  # weights apart from a meta-device model (issue 20)
            from .capture_weights import trace_with_weights

            return trace_with_weights(model, example_inputs, weights=weights, **options)
        from .capture import trace_module

        return trace_module(model, example_inputs, **options)

    def input_feeds(self, model: Any, example_inputs: Any) -> dict[str, Any]:
        from .capture import input_feeds

        return input_feeds(model, example_inputs)

    def run_source(self, model: Any, example_inputs: Any) -> list[tuple[str, Any]]:
        from .capture import run_module

        return run_module(model, example_inputs)


def _is_keras(model: Any) -> bool:
    return any(cls.__module__.startswith("keras.") for cls in type(model).__mro__)


ADAPTER = TorchAdapter()

# the host side (emit, run, save, nesting) is in host.py; found through `interop.hosts`
from .host import HOST as HOST  # noqa: E402
