"""Keras 3 adapter: any `keras.Model` or `keras.layers.Layer` -> `interop.Graph`.

The capture walks the Keras graph itself (Functional / Sequential graphs as they
are; subclassed models and custom layers by calling their ``call`` on symbolic
KerasTensors, which records the sub-layer calls and ``keras.ops`` operations they
make) and lowers each layer with a converter registered here. Importing this
package does not import Keras; the capture module does, on first use.

Add a converter for a layer class the adapter does not know (the function receives
the `Builder`, the layer, then the call's arguments as `Tensor`s):

>>> from interop.adapters.keras import register_layer         # doctest: +SKIP
>>> @register_layer("MyScale")                                 # doctest: +SKIP
... def import_my_scale(b, layer, x):
...     return b.op("Mul", [x, b.variable(layer.scale)])
"""

from __future__ import annotations

from typing import Any

from interop.registry import Registry

# Keras layer class name ("Conv2D") -> converter(builder, layer, *args, **kwargs)
CAPTURE_LAYERS: Registry[Any] = Registry("import", adapter="keras")
# keras.ops operation class name ("Matmul") -> converter(builder, op, *args, **kwargs)
CAPTURE_OPS: Registry[Any] = Registry("import", adapter="keras")
# ONNX op type ("Conv") -> emit builder(emitter, node, args) -> interop.emitter.Native | None
# (emit_layers.py, emit_recurrent.py; None leaves the node to the generic OnnxOp)
EMIT_LAYERS: Registry[Any] = Registry("emit", adapter="keras layers")


def register_layer(class_name: str | type, function: Any = None, *, replace: bool = False) -> Any:
    """Register a converter for a Keras layer class (by class or class name).

    The converter is called as ``fn(builder, layer, *args, **kwargs)`` with the
    layer's call arguments as `interop.adapters.keras.capture_lowering.Tensor` values and
    returns an ``onnx_ir.Value`` (or a Tensor, or a list of them for several outputs).
    """
    key = class_name if isinstance(class_name, str) else class_name.__name__
    return CAPTURE_LAYERS.register(key, function, replace=replace)


def register_op(class_name: str | type, function: Any = None, *, replace: bool = False) -> Any:
    """Register a converter for a ``keras.ops`` operation class (e.g. ``"Matmul"``)."""
    key = class_name if isinstance(class_name, str) else class_name.__name__
    return CAPTURE_OPS.register(key, function, replace=replace)


def _is_keras(model: Any) -> bool:
    return any(
        cls.__module__.startswith(("keras.", "keras_hub.", "keras_nlp."))
        and cls.__name__ in ("Layer", "Operation")
        for cls in type(model).__mro__
    )


class KerasAdapter:
    name = "keras"
    description = "keras.Model or keras.layers.Layer (Keras 3, any backend)"

    def accepts(self, model: Any) -> bool:
        return _is_keras(model)

    def trace(self, model: Any, example_inputs: Any, **options: Any) -> Any:
        if options.get("weights") is not None or options.get("compute_dtype") is not None:
            from .capture_weights import trace_with_weights  # weights apart (issue 20)

            return trace_with_weights(model, example_inputs, **options)
        from .capture import trace_model
        from .capture_weights import refuse_deferred

        refuse_deferred(model)

        return trace_model(model, example_inputs, **options)

    def run_source(self, model: Any, example_inputs: Any) -> list[tuple[str, Any]]:
        from .capture import run_model

        return run_model(model, example_inputs)


ADAPTER = KerasAdapter()

# the host side (emit, run, save, nesting) is in host.py; found through `interop.hosts`
from .host import HOST as HOST  # noqa: E402
