"""Flax / JAX adapter: nnx modules, linen modules and JAX functions -> `interop.Graph`.

Capture is a walk of the jaxpr JAX traces for the call (see docs/capture-flax.md for
why this beats delegating to jax2onnx here): one converter per JAX primitive, each
registered in `CAPTURE_PRIMITIVES`, and module paths taken from named scopes opened around
every module call. Importing this package does not import jax or flax.

A primitive without a converter raises `interop.UnsupportedOpError` naming it, the
module path and the source line. Register one to extend the walk:

>>> from interop.adapters.flax import register_primitive
>>> @register_primitive("reduce_xor")                     # doctest: +SKIP
... def convert_reduce_xor(low, eqn, x):
...     ...  # emit ONNX nodes with low.op(...), return one value per output
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from interop.registry import Registry

# JAX primitive name -> converter(lowering, eqn, *inputs) -> value or list of values
CAPTURE_PRIMITIVES: Registry[Callable[..., Any]] = Registry("import", adapter="flax")
# ONNX op type -> builder(emitter, node, args) -> interop.emitter.Native or None (emit side:
# emit_layers.py, emit_recurrent.py; registered when adapters/flax/emitter.py is imported)
EMIT_LAYERS: Registry[Callable[..., Any]] = Registry("emit", adapter="flax layers")


def register_primitive(
    name: str, converter: Callable[..., Any] | None = None, *, replace: bool = False
) -> Any:
    """Register the ONNX lowering of the JAX primitive `name` (usable as a decorator).

    The converter gets the `Lowering` (``low.op(op_type, inputs, attrs)``, ``low.const``,
    ``low.shape`` for symbolic shapes), the jaxpr equation (``eqn.params``,
    ``eqn.invars[i].aval``) and one `onnx_ir.Value` per input, and returns one value per
    output of the equation.

    >>> @register_primitive("my_relu")                      # doctest: +SKIP
    ... def convert_my_relu(low, eqn, x):
    ...     return low.op("Relu", [x])
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        CAPTURE_PRIMITIVES.register(name, fn, replace=replace)
        return fn

    return decorator(converter) if converter is not None else decorator


def register_module_tree(
    name: str,
    accepts: Callable[[Any], bool],
    split: Callable[[Any], Any],
    modules: Callable[[Any], Any],
) -> Any:
    """Give interop the module tree of another JAX library's models (equinox's is built in).

    ``accepts(model)`` says whether the hook takes `model`; ``split(model)`` returns the
    model's arrays as a pytree and a function rebuilding a callable model from such a
    pytree; ``modules(model)`` lists ``(dotted path, module)`` pairs, the model as ``""``.
    See `interop.adapters.flax.capture_wrappers.register_module_tree` and
    docs/capture-flax.md.

    >>> register_module_tree("mylib", lambda m: isinstance(m, MyModule),   # doctest: +SKIP
    ...                      my_split, my_modules)
    """
    from .capture_wrappers import register_module_tree as register

    return register(name, accepts, split, modules)


def _mro_modules(obj: Any) -> list[str]:
    return [f"{cls.__module__}.{cls.__name__}" for cls in type(obj).__mro__]


def is_nnx_module(obj: Any) -> bool:
    return "flax.nnx.module.Module" in _mro_modules(obj)


def is_linen_module(obj: Any) -> bool:
    return "flax.linen.module.Module" in _mro_modules(obj)


def _is_other_framework(obj: Any) -> bool:
    return any(
        m.startswith(("torch.", "keras.", "tensorflow.", "tf_keras.")) for m in _mro_modules(obj)
    )


class FlaxAdapter:
    name = "flax"
    description = (
        "flax.nnx.Module; (flax.linen.Module, variables) or a bound linen module; "
        "a JAX function of arrays (parameters closed over)"
    )

    def accepts(self, model: Any) -> bool:
        if isinstance(model, tuple) and len(model) == 2 and isinstance(model[1], Mapping):
            return is_linen_module(model[0])
        if is_nnx_module(model):
            return True
        if is_linen_module(model):
            return getattr(model, "scope", None) is not None  # bound: it carries its variables
        # A plain function: only when JAX is already in use, so accepts stays cheap.
        return (
            "jax" in sys.modules
            and callable(model)
            and not isinstance(model, type)
            and not _is_other_framework(model)
            and not type(model).__module__.startswith("interop")
        )

    def trace(self, model: Any, example_inputs: Any, **options: Any) -> Any:
        if options.get("weights") is not None or options.get("compute_dtype") is not None:
            from .capture_weights import trace_with_weights  # weights apart (issue 20)

            return trace_with_weights(model, example_inputs, **options)
        from .capture import trace_model

        return trace_model(model, example_inputs, **options)

    def run_source(self, model: Any, example_inputs: Any) -> list[tuple[str, Any]]:
        from .capture import run_model

        return run_model(model, example_inputs)


ADAPTER = FlaxAdapter()

# the host side (emit, run, save, nesting) is in host.py; found through `interop.hosts`
from .host import HOST as HOST  # noqa: E402
