"""The walk of a Keras graph: each layer call lowered by its converter, or opened up.

`lower_layer` lowers one layer call inside its own scope: with the converter registered
for its class in `CAPTURE_LAYERS`, by walking its graph when it is a Functional /
Sequential model (`walk_function`, ``keras.ops`` nodes through `CAPTURE_OPS`), or else by
calling its ``call`` on symbolic KerasTensors and walking the graph Keras records
(variables swapped for placeholders, see capture_variables.py). Converters of wrapper
layers (TimeDistributed, attention sub-layers) call `lower_layer` for the layers they wrap.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import warnings
from collections.abc import Iterator
from typing import Any

import keras
import onnx_ir as ir
from keras import tree

from interop.errors import InteropError, TraceError, UnsupportedOpError

from . import CAPTURE_LAYERS, CAPTURE_OPS
from .capture_concrete import example_shapes
from .capture_dynamic_shapes import dynamic_shapes
from .capture_feeds import adjust_ranks, functional_feeds
from .capture_lowering import Builder, Tensor, onnx_dtype
from .capture_tracer import (
    RETRACE,
    first_line,
    lower_by_backend_tracer,
    source_line,
    tracing_layers_first,
)
from .capture_variables import SymbolicVariables, used

# Keras's message when a layer cannot be called symbolically names it and its class.
_FAILED_LAYER = re.compile(r"output shape / dtype of '([^']+)' \(of type (\w+)\)")
_FIX = (
    "register a converter: @interop.adapters.keras.register_layer('{cls}') on a function "
    "(builder, layer, *inputs) -> onnx_ir.Value, or write the layer's call with keras.ops"
)


def with_training(layer: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` with ``training=False`` when the layer's call takes it, and without it when
    not (a parent's ``self.mlp(x, training=training)``, which Keras's ``__call__`` drops)."""
    call = getattr(layer, "call", None)
    try:
        params = inspect.signature(call).parameters if call else {}
    except (TypeError, ValueError):
        params = {}
    if "training" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {**kwargs, "training": False}
    return {k: v for k, v in kwargs.items() if k != "training"}


def is_functional(layer: Any) -> bool:
    """Whether `layer` is a Keras Functional graph (a Functional model or its subclass)."""
    return hasattr(layer, "_nodes_by_depth") and hasattr(layer, "_outputs_struct")


def functional_of(layer: Any) -> Any:
    """The Functional graph to walk for `layer` (a Sequential's inner one), or None."""
    if type(layer).__name__ == "Sequential" and getattr(layer, "_functional", None) is not None:
        return layer._functional
    return layer if is_functional(layer) and type(layer).call is _functional_call() else None


def _functional_call() -> Any:
    from keras.src.models.functional import Functional

    return Functional.call


# ---------------------------------------------------------------------------- walking
def lower_layer(b: Builder, layer: Any, path: str, args: list, kwargs: dict) -> Any:
    """Lower one call of `layer` on Tensors; returns the outputs in Keras's structure.

    The values returned are recorded in ``b.returns[path]`` (the layer's ``returns``).
    """
    outputs = _lower_layer(b, layer, path, args, kwargs)
    if path:
        leaves = tree.flatten(outputs)
        b.returns.setdefault(path, []).extend(
            leaf.value if isinstance(leaf, Tensor) else leaf
            for leaf in leaves
            if isinstance(leaf, Tensor | ir.Value)
        )
    return outputs


def _lower_layer(b: Builder, layer: Any, path: str, args: list, kwargs: dict) -> Any:
    converter = CAPTURE_LAYERS.get(type(layer).__name__)
    if converter is not None:
        args, kwargs = _positional(layer, args, kwargs)
        with b.scoped(path):
            try:
                result = converter(b, layer, *args, **kwargs)
            except InteropError:
                raise
            except Exception as err:
                raise TraceError(
                    f"Converting Keras layer '{path or layer.name}' ({type(layer).__name__}) failed: {err}",
                    None,
                    _FIX.format(cls=type(layer).__name__) + " (or report the failure)",
                ) from err
        return result
    functional = functional_of(layer)
    if functional is not None:
        feeds = functional_feeds(functional, args, kwargs)
        with b.scoped(path):
            feeds = adjust_ranks(b, functional, feeds)
        return walk_function(b, functional, path, feeds)
    return _lower_by_symbolic_call(b, layer, path, args, kwargs)


def _positional(layer: Any, args: list, kwargs: dict) -> tuple[list, dict]:
    """Arguments a call passed by keyword that its ``call`` takes positionally, moved to
    their positions (``self.key_proj(inputs=x)``), as converters take the inputs in order."""
    try:
        params = list(inspect.signature(layer.call).parameters.values())
    except (TypeError, ValueError):
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for param in params[len(args) :]:
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        if param.default is not param.empty:  # options (training, mask) stay keywords
            break
        if param.name not in kwargs:
            break
        args.append(kwargs.pop(param.name))
    return args, kwargs


def walk_function(b: Builder, function: Any, path: str, inputs: list[Tensor]) -> Any:
    """Run a Keras Function/Functional graph on Tensors, lowering node by node."""
    values: dict[int, Any] = {id(x): y for x, y in zip(function.inputs, inputs, strict=False)}
    for depth in sorted(function._nodes_by_depth, reverse=True):
        for node in function._nodes_by_depth[depth]:
            if not node.operation or node.is_input:
                continue
            if any(id(x) not in values for x in node.input_tensors):
                continue
            args, kwargs = node.arguments.fill_in(values)
            operation = node.operation
            if isinstance(operation, keras.layers.Layer):
                child = f"{path}/{operation.name}" if path else operation.name
                outputs = lower_layer(b, operation, child, list(args), dict(kwargs))
            else:
                outputs = _lower_op(b, operation, path, args, kwargs)
            # Keras records tensor outputs only: not an optional None, and a constant the call
            # made only when its output spec (traced on placeholders) made it a tensor
            flat = [v for v in tree.flatten(outputs) if v is not None]
            if len(flat) != len(node.outputs):
                flat = [v for v in flat if not isinstance(v, _Made)]
            first = next((a for a in tree.flatten((args, kwargs)) if isinstance(a, Tensor)), None)
            for spec, value in zip(node.outputs, flat, strict=False):
                values[id(spec)] = _as_tensor(value, spec, operation, first)
    outputs = []
    for x in function.outputs:
        if id(x) not in values:
            raise TraceError(
                f"Output '{x.name}' of '{path or function.name}' is not connected to its inputs"
            )
        outputs.append(values[id(x)])
    return tree.pack_sequence_as(function._outputs_struct, outputs)


def lower_callable(
    b: Builder, function: Any, path: str, inputs: list[Tensor], **kwargs: Any
) -> Any:
    """Lower a plain function of ``keras.ops`` (a custom activation such as keras_hub's
    ``gelu_approximate``) by calling it on KerasTensors and walking what Keras records."""
    symbolic = [keras.KerasTensor(t.shape, dtype=t.dtype) for t in inputs]
    with dynamic_shapes():
        outputs = function(*symbolic, **kwargs)
    flat = tree.flatten(outputs)
    if all(any(o is s for s in symbolic) for o in flat):  # an identity function
        return tree.map_structure(lambda o: inputs[[id(s) for s in symbolic].index(id(o))], outputs)
    return walk_function(b, RecordedGraph(symbolic, outputs), path, inputs)


class RecordedGraph:
    """The ops Keras recorded between KerasTensors, by depth, as `walk_function` reads a
    Keras Function. Built with Keras's own ``map_graph``, without Function's connectivity
    run, which asks each layer for its first call's outputs (``op.output``): a layer first
    called while the model was built may have returned another structure then (keras_hub's
    rotary layers, whose declared output spec is one tensor where the call returns two)."""

    def __init__(self, inputs: list[Any], outputs: Any) -> None:
        from keras.src.ops.function import map_graph
        from keras.src.ops.node import KerasHistory

        for tensor in inputs:  # an input the call never read has no history: an entry point
            if not hasattr(tensor, "_keras_history"):
                tensor._keras_history = KerasHistory(operation=None, node_index=0, tensor_index=0)
        self.inputs = list(inputs)
        self.outputs = tree.flatten(outputs)
        self._outputs_struct = outputs
        self.name = "recorded"
        _, self._nodes_by_depth, _, _ = map_graph(self.inputs, self.outputs)
        self._interop_structure: Any = None


def _as_tensor(value: Any, spec: Any, operation: Any, first: Tensor | None) -> Tensor:
    """Attach the Keras shape/dtype of `spec`; propagate the input mask as Keras would."""
    # a layer's unknown first axis is the batch where its first input's is (a Dense on
    # flattened rows is not: keras_hub Qwen3.5-MoE's router)
    layer = isinstance(operation, keras.layers.Layer) and (
        first is None or _batch_named(first.value)
    )
    if isinstance(value, Tensor):
        _annotate(value.value, spec, layer)
        return Tensor(value.value, tuple(spec.shape), str(spec.dtype), value.mask)
    _annotate(value, spec, layer)
    mask = None
    if (
        first is not None
        and first.mask is not None
        and getattr(operation, "supports_masking", False)
    ):
        if (
            spec.shape[:2] == first.shape[:2]
            or len(spec.shape) >= 2
            and first.shape[1] == spec.shape[1]
        ):
            mask = first.mask
    return Tensor(value, tuple(spec.shape), str(spec.dtype), mask)


def _batch_named(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and len(shape) > 0 and str(shape[0]) == "batch"


def _annotate(value: ir.Value, spec: Any, layer: bool = True) -> None:
    """Give a layer's output value the shape and type Keras inferred (for summaries)."""
    if value.shape is None and not value.is_graph_input() and not value.is_initializer():
        # an unknown first axis is named the batch on a layer's output of rank 2 and up
        # only: a vector's one axis is as often a length (keras_hub Moonshine's positions),
        # and an op's as often batch * length (a reshape to (-1, hidden): Qwen3.5-MoE)
        batched = layer and len(spec.shape) > 1
        dims = [
            ("batch" if axis == 0 and batched else None) if d is None else int(d)
            for axis, d in enumerate(spec.shape)
        ]
        value.shape = ir.Shape(
            [ir.SymbolicDim(d) if isinstance(d, str) or d is None else d for d in dims]
        )
    if value.type is None:
        value.type = ir.TensorType(onnx_dtype(spec.dtype))


def _lower_op(b: Builder, operation: Any, path: str, args: Any, kwargs: Any) -> Any:
    name = type(operation).__name__
    converter = CAPTURE_OPS.get(name)
    if converter is None:
        raise UnsupportedOpError(
            f"keras.ops.{name}",
            direction="import",
            adapter="keras",
            layer=path,
            close_matches=CAPTURE_OPS.close_matches(name),
            fix=f"register a converter: @interop.adapters.keras.register_op('{name}') on a function "
            "(builder, operation, *args, **kwargs) -> onnx_ir.Value",
        )
    with b.scoped(path):
        return converter(b, operation, *args, **kwargs)


def _lower_by_symbolic_call(b: Builder, layer: Any, path: str, args: list, kwargs: dict) -> Any:
    """Open up a subclassed model or custom layer by calling ``call`` on KerasTensors.

    The variables of the layer and its sub-layers are KerasTensors too during the call
    (`SymbolicVariables`), fed with their initializers, so that ops on variables alone
    are recorded rather than folded into constants the emitted models could not train.
    A call that cannot run so (backend code on a variable, an op on variables alone with
    no converter) is traced again with concrete variables, and a warning says what folds.
    """
    tensors = [x for x in tree.flatten((args, kwargs)) if isinstance(x, Tensor)]
    if tracing_layers_first():  # a retry: the symbolic calls' graph did not reproduce the model
        return _by_backend_tracer(b, layer, path, args, kwargs, tensors, RETRACE)
    try:
        with SymbolicVariables(layer) as swapped:
            traced = _symbolic_call(layer, args, kwargs, tensors, swapped.placeholders)
        return _walk_traced(b, path, traced)
    except Exception as err:
        # an error a nested symbolic call raised after its own second try: no third
        if getattr(err, _RETRIED, False) or (
            isinstance(err, InteropError) and not isinstance(err, UnsupportedOpError)
        ):
            raise
        first = err
    try:
        try:
            result, folded = _with_concrete_variables(b, layer, path, args, kwargs, tensors)
        except _NotSymbolic as err:
            return _by_backend_tracer(b, layer, path, args, kwargs, tensors, err.cause)
        except UnsupportedOpError as err:
            if err.layer != path or getattr(err, _RETRIED, False):
                raise  # a sub-layer's op: that layer already tried its tracer
            return _by_backend_tracer(b, layer, path, args, kwargs, tensors, err)
    except Exception as err:
        setattr(err, _RETRIED, True)
        raise
    if not folded:
        return result
    reason = str(first).splitlines()[0][:200] if str(first) else ""
    warnings.warn(
        f"interop: Keras layer '{path or layer.name}' ({type(layer).__name__}) cannot be "
        f"traced with symbolic variables ({type(first).__name__}: {reason}); its computations "
        "on variables alone are folded into constants, which emitted models cannot train",
        stacklevel=2,
    )
    return result


class _NotSymbolic(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _with_concrete_variables(
    b: Builder, layer: Any, path: str, args: list, kwargs: dict, tensors: list[Tensor]
) -> tuple[Any, bool]:
    """The symbolic call with concrete variables (True: variable-only ops fold), else with
    sub-layer specs traced from their calls (False); `_NotSymbolic` when neither runs."""
    try:
        traced = _symbolic_call(layer, args, kwargs, tensors, [])
    except InteropError:
        raise
    except Exception as err:
        result = _traced_call(b, layer, path, args, kwargs, tensors, None)
        if result is None:
            raise _NotSymbolic(err) from None
        return result, False
    return _walk_traced(b, path, traced), True


def _with_example_shapes(
    b: Builder, layer: Any, path: str, args: list, kwargs: dict, tensors: list[Tensor]
) -> Any:
    """The layer called on KerasTensors of the example's concrete shapes (a call that
    computes with Python on sizes), when its backend's tracer failed; None if that fails."""
    shapes = example_shapes(b, tensors)
    result = None if shapes is None else _traced_call(b, layer, path, args, kwargs, tensors, shapes)
    if result is not None:
        warnings.warn(
            f"interop: Keras layer '{path or layer.name}' ({type(layer).__name__}) computes "
            "with concrete sizes; it was captured at the example's shapes (the dims it fixes "
            "are checked at other sizes before trace returns)",
            stacklevel=2,
        )
    return result


def _traced_call(
    b: Builder,
    layer: Any,
    path: str,
    args: list,
    kwargs: dict,
    tensors: list[Tensor],
    shapes: dict[int, tuple[int, ...]] | None,
) -> Any:
    """The walked symbolic call with sub-layer specs traced from their calls; None if it fails
    (its partial nodes are dropped with the graph's dead nodes)."""
    try:
        with SymbolicVariables(layer) as swapped, _traced_specs():
            traced = _symbolic_call(layer, args, kwargs, tensors, swapped.placeholders, shapes)
        return _walk_traced(b, path, traced)
    except InteropError:
        raise
    except Exception:
        return None


_RETRIED = "_interop_traced_with_concrete_variables"


def _by_backend_tracer(
    b: Builder, layer: Any, path: str, args: list, kwargs: dict, tensors: list, err: Exception
) -> Any:
    """The layer traced by the running backend (capture_tracer.py), with a warning saying
    so; the symbolic call's error, with the tracer's, when that fails too."""
    try:
        result, at_example = lower_by_backend_tracer(b, layer, path, args, kwargs, tensors)
    except Exception as tracer_err:  # the JAX / torch captures' TraceErrors included
        # measured on keras_hub: the tracer keeps dims dynamic and gave valid graphs where
        # the example-shape call did not (Qwen3.5, Gemma4), so it comes second
        concrete = _with_example_shapes(b, layer, path, args, kwargs, tensors)
        if concrete is None:
            raise _call_failed(layer, path, err, tracer_err) from None
        return concrete
    warnings.warn(
        f"interop: Keras layer '{path or layer.name}' ({type(layer).__name__}): "
        + (str(err) if err is RETRACE else f"cannot run on KerasTensors ({first_line(err)})")
        + "; it was captured through the "
        f"{keras.backend.backend()} backend's tracer"
        + (" at the example's shapes (the dims it fixes are checked)" if at_example else ""),
        stacklevel=2,
    )
    return result


def _call_failed(
    layer: Any, path: str, err: Exception, tracer_err: Exception | None = None
) -> UnsupportedOpError:
    cls, where, source = type(layer).__name__, path, layer
    inner = _FAILED_LAYER.search(str(err))
    if inner and inner.group(1) != layer.name:  # a sub-layer of this one failed
        where, cls = f"{path}/{inner.group(1)}" if path else inner.group(1), inner.group(2)
        source = None
    detail = f"{cls} has no converter and its call could not be run on symbolic KerasTensors: "
    detail += first_line(err)
    if tracer_err is not None:
        detail += f"; nor by the {keras.backend.backend()} backend's tracer: "
        detail += f"{type(tracer_err).__name__}: {first_line(tracer_err)}"
    return UnsupportedOpError(
        cls,
        direction="import",
        adapter="keras",
        layer=where,
        location=source_line(source),
        close_matches=CAPTURE_LAYERS.close_matches(cls),
        detail=detail,
        fix=_FIX.format(cls=cls),
    )


def _walk_traced(b: Builder, path: str, traced: tuple[Any, Any, list[Any]]) -> Any:
    function, outputs, feeds = traced
    if function is None:  # call returns its inputs (identity)
        return outputs
    values = [
        Tensor(b.variable(feed), tuple(feed.shape), str(feed.dtype))
        if isinstance(feed, keras.Variable)
        else feed
        for feed in feeds
    ]
    result = walk_function(b, function, path, values)
    structure = getattr(function, "_interop_structure", None)
    if structure is None:
        return result
    found = iter(tree.flatten(result))  # the call's tensor outputs
    return tree.pack_sequence_as(
        structure, [_recorded(b, o, found) for o in tree.flatten(structure)]
    )


def _recorded(b: Builder, output: Any, found: Any) -> Any:
    """One output of a symbolic call: walked (a KerasTensor), None, or a constant it made."""
    if output is None or isinstance(output, keras.KerasTensor):
        return None if output is None else next(found)
    array = keras.ops.convert_to_numpy(output)
    return _Made(b.const(array), tuple(array.shape), str(array.dtype))


class _Made(Tensor):
    """An output a call made as a constant (it depends on no input): not in Keras's node."""


_TRACED_SPECS = [False]


@contextlib.contextmanager
def _traced_specs() -> Iterator[None]:
    """Sub-layers' output specs from tracing their call on backend placeholders, not their
    declared ``compute_output_shape`` (keras_hub's rotary layers declare one tensor and
    return two): slower, so only for a layer retried at the example's shapes."""
    saved, _TRACED_SPECS[0] = _TRACED_SPECS[0], True
    try:
        yield
    finally:
        _TRACED_SPECS[0] = saved


@contextlib.contextmanager
def _lenient_output_specs() -> Iterator[None]:
    """Sub-layers called on KerasTensors whose ``compute_output_spec`` rejects the call's
    keywords get Keras's generic spec (their call traced on backend placeholders), and
    sub-layers returning None among their outputs (an optional cache) are recorded.

    keras_hub's CachedMultiHeadAttention takes ``cache=`` in ``call`` but inherits
    MultiHeadAttention's ``compute_output_spec``, which does not: calling it on KerasTensors
    fails although building the model (which traces the parent's call) works.
    """
    from keras.src.ops.operation import Operation

    layer_class = keras.layers.Layer
    original = layer_class.symbolic_call

    def symbolic_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _TRACED_SPECS[0]:  # the spec from the call itself, not the layer's declared one
            return Operation.compute_output_spec(self, *args, **kwargs)
        try:
            return original(self, *args, **kwargs)
        except TypeError as err:
            if "unexpected keyword argument" not in str(err):
                raise
            # the call itself traced on backend placeholders (Layer's version would ask the
            # overridden compute_output_shape, which rejects the keyword too)
            return Operation.compute_output_spec(self, *args, **kwargs)

    from keras.src.ops.node import Node

    node_init = Node.__init__

    def init(self: Any, operation: Any, call_args: Any = None, call_kwargs: Any = None,
             outputs: Any = None) -> None:  # fmt: skip
        # a sub-layer returning (output, None), an optional cache: Keras records tensors only
        if outputs is not None and not all(
            isinstance(o, keras.KerasTensor) for o in tree.flatten(outputs)
        ):
            outputs = [o for o in tree.flatten(outputs) if isinstance(o, keras.KerasTensor)]
        node_init(self, operation, call_args, call_kwargs, outputs)

    layer_class.symbolic_call = symbolic_call
    Node.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        layer_class.symbolic_call = original
        Node.__init__ = node_init  # type: ignore[method-assign]


def _symbolic_call(
    layer: Any,
    args: list,
    kwargs: dict,
    tensors: list[Tensor],
    variables: list[tuple[Any, Any]],
    shapes: dict[int, tuple[int, ...]] | None = None,
) -> tuple[Any, Any, list[Any]]:
    """Call ``layer.call`` on KerasTensors standing for `tensors` (and for the variables of
    `variables`: pairs of placeholder and Keras variable).

    Returns (Keras Function, None, what feeds its inputs: Tensors and Keras variables), or
    (None, the outputs, []) when the call hands its inputs back unchanged.
    """
    shapes = shapes or {}
    symbolic = {
        id(t): keras.KerasTensor(shapes.get(id(t), t.shape), dtype=t.dtype) for t in tensors
    }
    sym_args, sym_kwargs = tree.map_structure(lambda x: symbolic.get(id(x), x), (args, kwargs))
    sym_kwargs = with_training(layer, dict(sym_kwargs))
    mask_inputs: list[tuple[Any, Tensor]] = []
    masked = next((t for t in tensors if t.mask is not None), None)
    if (
        masked is not None
        and "mask" in inspect.signature(layer.call).parameters
        and "mask" not in sym_kwargs
    ):
        mask_spec = keras.KerasTensor(masked.mask.shape, dtype="bool")
        sym_kwargs["mask"] = mask_spec
        mask_inputs.append((mask_spec, masked.mask))
    # ops.shape(x)[i] of a dynamic axis is a graph value, not None
    with dynamic_shapes(), _lenient_output_specs():
        outputs = layer.call(*sym_args, **sym_kwargs)
    inputs = [symbolic[id(t)] for t in tensors] + [m for m, _ in mask_inputs]
    feeds: list[Any] = tensors + [m for _, m in mask_inputs]
    flat_out = tree.flatten(outputs)
    passthrough = {id(s): t for s, t in zip(inputs, feeds, strict=False)}
    if all(id(o) in passthrough for o in flat_out):
        return None, tree.pack_sequence_as(outputs, [passthrough[id(o)] for o in flat_out]), []
    for placeholder, variable in used(variables, outputs):
        inputs.append(placeholder)
        feeds.append(variable)
    # Function re-runs the recorded ops symbolically: with the same output specs as the call
    with dynamic_shapes(), _lenient_output_specs():
        if not all(isinstance(o, keras.KerasTensor) for o in flat_out):
            # (output, None): an optional cache not computed; or an output that does not
            # depend on the inputs (a constant the call made): recorded around the Function
            tensors_out = [o for o in flat_out if isinstance(o, keras.KerasTensor)]
            function = RecordedGraph(inputs, tensors_out)
            function._interop_structure = outputs
            return function, None, feeds
        return RecordedGraph(inputs, outputs), None, feeds
