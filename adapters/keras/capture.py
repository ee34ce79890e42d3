"""keras.Model / keras.layers.Layer -> interop.Graph by walking the Keras graph natively.

Functional and Sequential models are graphs of layer calls already; each layer is
lowered by a converter of `LAYERS` inside its own scope. A layer without a converter
(a subclassed model, a custom layer) is opened up by calling its ``call`` on symbolic
KerasTensors: Keras then records every sub-layer call and every ``keras.ops``
operation as graph nodes, exactly as when building a functional model, and that
graph is walked the same way (``keras.ops`` nodes through `OPS`). This needs no
framework exporter, works on every Keras backend, and keeps layer identity.

Scopes are the Keras layer names joined by "/" from the traced model (the root is
""), e.g. ``block_1/conv``; initializers carry the Keras variable paths
(``model/block_1/conv/kernel``) and Keras's own layouts.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import onnx_ir as ir
from keras import tree

from interop import provenance
from interop.errors import InteropError, TraceError, UnsupportedOpError
from interop.graph import Graph
from interop.structure import flatten_outputs

from . import LAYERS, OPS, dim_check
from . import attention as _attention  # noqa: F401  (registers the converters)
from . import conv as _conv  # noqa: F401  (registers the converters)
from . import layers as _layers  # noqa: F401
from . import layers_more as _layers_more  # noqa: F401
from . import ops as _ops  # noqa: F401
from . import ops_image as _ops_image  # noqa: F401
from . import ops_more as _ops_more  # noqa: F401
from . import recurrent as _recurrent  # noqa: F401
from .builder import OPSET, Builder, Tensor, onnx_dtype
from .dynamic_shapes import dynamic_shapes
from .symbolic_variables import SymbolicVariables, used

# Keras's message when a layer cannot be called symbolically names it and its class.
_FAILED_LAYER = re.compile(r"output shape / dtype of '([^']+)' \(of type (\w+)\)")
_FIX = (
    "register a converter: @interop.adapters.keras.register_layer('{cls}') on a function "
    "(builder, layer, *inputs) -> onnx_ir.Value, or write the layer's call with keras.ops"
)


# ---------------------------------------------------------------------------- inputs
def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, Tensor)


def _positional_arity(model: Any) -> int:
    params = list(inspect.signature(model.call).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return 1 << 30
    return sum(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params
    )


def _call_structure(model: Any, example_inputs: Any) -> tuple[list[Any], dict[str, Any]]:
    """How Keras is called with these inputs: (args, kwargs) of arrays or structures.

    One array -> ``model(x)``; a dict -> ``model(dict)``; a tuple/list of several
    arrays -> ``model(*arrays)`` when ``call`` takes that many positional arguments,
    else ``model(list)`` (the functional convention).
    """
    if isinstance(example_inputs, Mapping):
        return [dict(example_inputs)], {}
    if isinstance(example_inputs, tuple | list):
        items = list(example_inputs)
        if len(items) == 1:
            return items, {}
        if not _is_functional(model) and _positional_arity(model) >= len(items):
            return items, {}
        return [items], {}
    return [example_inputs], {}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensors on the torch backend
        value = value.detach().cpu()
    return np.asarray(keras.ops.convert_to_numpy(value))


def run_model(model: Any, example_inputs: Any) -> list[tuple[str, np.ndarray]]:
    """Run the Keras model in inference mode; outputs flattened and named as in the graph."""
    args, kwargs = _call_structure(model, example_inputs)
    outputs = model(*args, **_with_training(model, kwargs))
    return [(name, _to_numpy(v)) for name, v in flatten_outputs(_sorted_dicts(outputs), _is_array)]


def _sorted_dicts(structure: Any) -> Any:
    """Dicts with sorted keys, recursively: Keras's own flattening order on every backend."""
    if isinstance(structure, Mapping):
        return {k: _sorted_dicts(structure[k]) for k in sorted(structure)}
    if isinstance(structure, list | tuple) and not hasattr(structure, "_fields"):
        return type(structure)(_sorted_dicts(v) for v in structure)
    return structure


def _with_training(layer: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    call = getattr(layer, "call", None)
    try:
        params = inspect.signature(call).parameters if call else {}
    except (TypeError, ValueError):
        params = {}
    if "training" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return {**kwargs, "training": False}
    return kwargs


# ---------------------------------------------------------------------------- trace
def trace_model(
    model: Any,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    check_dynamic_dims: bool = True,
    verbose: bool = False,
) -> Graph:
    """Trace a Keras model or layer on `example_inputs` into a Graph (see `interop.trace`).

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="fc")])  # doctest: +SKIP
    >>> g = interop.trace(model, np.zeros((1, 4), np.float32))                            # doctest: +SKIP
    >>> [layer.path for layer in g.layers], g.count_params() == model.count_params()      # doctest: +SKIP
    (['input_layer', 'fc'], True)
    """
    del verbose  # nothing is printed either way
    args, kwargs = _call_structure(model, example_inputs)
    if not model.built:
        model(*args, **_with_training(model, kwargs))
    b = Builder()
    graph_inputs: list[ir.Value] = []
    flat_examples = tree.flatten((args, kwargs))
    names = _input_names(model, args, kwargs, len(flat_examples))
    specs = _input_specs(model, len(flat_examples))
    dims = dict(dynamic_dims or {})
    unknown = sorted(set(dims) - set(names))
    if unknown:
        raise TraceError(
            f"dynamic_dims names inputs the model does not have: {', '.join(unknown)}",
            "input names: " + ", ".join(names),
        )
    flat_inputs: list[Tensor] = []
    for name, example, spec in zip(names, flat_examples, specs, strict=False):
        tensor = _graph_input(name, example, spec, dynamic_batch, dims.get(name, {}))
        graph_inputs.append(tensor.value)
        flat_inputs.append(tensor)
    call_args, call_kwargs = tree.pack_sequence_as((args, kwargs), flat_inputs)
    outputs = lower_layer(b, model, "", list(call_args), dict(call_kwargs))
    for variable in model.weights:  # weights no node reads (Normalization's count) still count
        b.variable(variable)
    flat_outputs = flatten_outputs(_sorted_dicts(outputs), lambda v: isinstance(v, Tensor))
    graph = _assemble(b, graph_inputs, flat_outputs)
    model_ir = ir.Model(
        graph, ir_version=10, producer_name="interop.keras", producer_version=keras.__version__
    )
    _record_provenance(model_ir, model, b)
    traced = Graph(model_ir)
    if not check_dynamic_dims:
        return traced

    def run_source(flat: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        call_args, call_kwargs = tree.pack_sequence_as((args, kwargs), flat)
        outputs = model(*call_args, **_with_training(model, dict(call_kwargs)))
        return [(n, _to_numpy(v)) for n, v in flatten_outputs(_sorted_dicts(outputs), _is_array)]

    examples = [_to_numpy(e) for e in flat_examples]
    return dim_check.check_dynamic_dims(traced, run_source, examples, model_name=model.name)


def _is_functional(layer: Any) -> bool:
    return hasattr(layer, "_nodes_by_depth") and hasattr(layer, "_outputs_struct")


def _functional_of(layer: Any) -> Any:
    if type(layer).__name__ == "Sequential" and getattr(layer, "_functional", None) is not None:
        return layer._functional
    return layer if _is_functional(layer) and type(layer).call is _functional_call() else None


def _functional_call() -> Any:
    from keras.src.models.functional import Functional

    return Functional.call


def _input_names(model: Any, args: list, kwargs: dict, count: int) -> list[str]:
    functional = _functional_of(model)
    if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
        names = ["/".join(str(p) for p in path) for path, _ in tree.flatten_with_path(args[0])]
    elif functional is not None and len(functional.inputs) == count:
        names = [re.sub(r"\W", "_", _input_layer_name(t)) for t in functional.inputs]
    elif count == 1:
        names = ["input"]
    else:
        names = [f"input_{i}" for i in range(count)]
    return names


def _input_layer_name(spec: Any) -> str:
    history = getattr(spec, "_keras_history", None)
    return history.operation.name if history is not None else spec.name


def _input_specs(model: Any, count: int) -> list[Any]:
    functional = _functional_of(model)
    if functional is not None and len(functional.inputs) == count:
        return list(functional.inputs)
    return [None] * count


def _graph_input(
    name: str, example: Any, spec: Any, dynamic_batch: bool, extra: Mapping[int, str]
) -> Tensor:
    array = _to_numpy(example) if not isinstance(example, np.ndarray) else example
    shape: list[int | None] = list(array.shape)
    dims: list[Any] = list(array.shape)
    if spec is not None:  # axes the model leaves open (None) stay open in the graph
        for axis, size in enumerate(spec.shape):
            if size is None and axis > 0:
                shape[axis], dims[axis] = None, f"{name}_dim{axis}"
    if dynamic_batch and shape:
        shape[0], dims[0] = None, "batch"
    for axis, dim_name in extra.items():
        axis = int(axis) % max(len(shape), 1)
        shape[axis], dims[axis] = None, re.sub(r"\W", "_", str(dim_name))
    dtype = str(spec.dtype) if spec is not None else str(array.dtype)
    if dtype == "float64" and spec is None:
        dtype = keras.config.floatx()  # Keras computes in floatx whatever the input precision
    value = ir.Value(
        name=name,
        shape=ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims]),
        type=ir.TensorType(onnx_dtype(dtype)),
    )
    return Tensor(value, tuple(shape), dtype)


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
    converter = LAYERS.get(type(layer).__name__)
    if converter is not None:
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
    functional = _functional_of(layer)
    if functional is not None:
        return walk_function(b, functional, path, tree.flatten((args, kwargs)))
    return _lower_by_symbolic_call(b, layer, path, args, kwargs)


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
            flat = tree.flatten(outputs)
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


def _as_tensor(value: Any, spec: Any, operation: Any, first: Tensor | None) -> Tensor:
    """Attach the Keras shape/dtype of `spec`; propagate the input mask as Keras would."""
    if isinstance(value, Tensor):
        _annotate(value.value, spec)
        return Tensor(value.value, tuple(spec.shape), str(spec.dtype), value.mask)
    _annotate(value, spec)
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


def _annotate(value: ir.Value, spec: Any) -> None:
    """Give a layer's output value the shape and type Keras inferred (for summaries)."""
    if value.shape is None and not value.is_graph_input() and not value.is_initializer():
        dims = [
            ("batch" if axis == 0 else None) if d is None else int(d)
            for axis, d in enumerate(spec.shape)
        ]
        value.shape = ir.Shape(
            [ir.SymbolicDim(d) if isinstance(d, str) or d is None else d for d in dims]
        )
    if value.type is None:
        value.type = ir.TensorType(onnx_dtype(spec.dtype))


def _lower_op(b: Builder, operation: Any, path: str, args: Any, kwargs: Any) -> Any:
    name = type(operation).__name__
    converter = OPS.get(name)
    if converter is None:
        raise UnsupportedOpError(
            f"keras.ops.{name}",
            direction="import",
            adapter="keras",
            layer=path,
            close_matches=OPS.close_matches(name),
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
            traced = _symbolic_call(layer, args, kwargs, tensors, [])
        except InteropError:
            raise
        except Exception as err:
            raise _call_failed(layer, path, err) from None
        result = _walk_traced(b, path, traced)
    except Exception as err:
        setattr(err, _RETRIED, True)
        raise
    reason = str(first).splitlines()[0][:200] if str(first) else ""
    warnings.warn(
        f"interop: Keras layer '{path or layer.name}' ({type(layer).__name__}) cannot be "
        f"traced with symbolic variables ({type(first).__name__}: {reason}); its computations "
        "on variables alone are folded into constants, which emitted models cannot train",
        stacklevel=2,
    )
    return result


_RETRIED = "_interop_traced_with_concrete_variables"


def _call_failed(layer: Any, path: str, err: Exception) -> UnsupportedOpError:
    cls, where = type(layer).__name__, path
    inner = _FAILED_LAYER.search(str(err))
    if inner and inner.group(1) != layer.name:  # a sub-layer of this one failed
        where, cls = f"{path}/{inner.group(1)}" if path else inner.group(1), inner.group(2)
    return UnsupportedOpError(
        cls,
        direction="import",
        adapter="keras",
        layer=where,
        close_matches=LAYERS.close_matches(cls),
        detail=f"{cls} has no converter and its call could not be "
        f"run on symbolic KerasTensors: {str(err).splitlines()[0][:300] if str(err) else type(err).__name__}",
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
    return walk_function(b, function, path, values)


def _symbolic_call(
    layer: Any, args: list, kwargs: dict, tensors: list[Tensor], variables: list[tuple[Any, Any]]
) -> tuple[Any, Any, list[Any]]:
    """Call ``layer.call`` on KerasTensors standing for `tensors` (and for the variables of
    `variables`: pairs of placeholder and Keras variable).

    Returns (Keras Function, None, what feeds its inputs: Tensors and Keras variables), or
    (None, the outputs, []) when the call hands its inputs back unchanged.
    """
    from keras.src.ops.function import Function

    symbolic = {id(t): keras.KerasTensor(t.shape, dtype=t.dtype) for t in tensors}
    sym_args, sym_kwargs = tree.map_structure(lambda x: symbolic.get(id(x), x), (args, kwargs))
    sym_kwargs = _with_training(layer, dict(sym_kwargs))
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
    with dynamic_shapes():  # ops.shape(x)[i] of a dynamic axis is a graph value, not None
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
    return Function(inputs, outputs), None, feeds


# ---------------------------------------------------------------------------- assembly
def _assemble(b: Builder, inputs: list[ir.Value], outputs: list[tuple[str, Tensor]]) -> ir.Graph:
    graph_outputs: list[ir.Value] = []
    taken = {v.name for v in inputs}
    for name, tensor in outputs:
        value = tensor.value
        if (
            value.is_graph_input()
            or value.is_initializer()
            or value in graph_outputs
            or name in taken
        ):
            with b.scoped(""):
                value = b.op("Identity", [value])
        taken.add(name)
        graph_outputs.append(value)
    used = _live_nodes(b.nodes, graph_outputs)
    nodes = [n for n in b.nodes if id(n) in used]
    for (name, _), value in zip(outputs, graph_outputs, strict=False):
        value.name = name
    live_inits = {id(v) for n in nodes for v in _all_inputs(n)}
    inits = [v for v in b.initializers.values() if id(v) in live_inits or v.name in b.kinds]
    graph = ir.Graph(
        inputs,
        graph_outputs,
        nodes=nodes,
        initializers=inits,
        opset_imports={"": OPSET},
        name="keras",
    )
    return graph


def _all_inputs(node: ir.Node) -> list[ir.Value]:
    values = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            for inner in attr.value:
                values.extend(_all_inputs(inner))
    return values


def _live_nodes(nodes: list[ir.Node], outputs: list[ir.Value]) -> set[int]:
    live: set[int] = set()
    stack = [v.producer() for v in outputs if v.producer() is not None]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        stack.extend(v.producer() for v in _all_inputs(node) if v.producer() is not None)
    return live


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _layer_records(model: Any) -> list[provenance.LayerRecord]:
    records = [provenance.LayerRecord("", _qualname(model), None)]
    seen: set[str] = {""}

    def visit(parent: Any, path: str, stack: tuple[int, ...]) -> None:
        children = _children(parent)
        for child in children:
            if id(child) in stack:
                continue
            child_path = f"{path}/{child.name}" if path else child.name
            if child_path in seen:
                continue
            seen.add(child_path)
            records.append(provenance.LayerRecord(child_path, _qualname(child), path or ""))
            visit(child, child_path, (*stack, id(child)))

    visit(model, "", (id(model),))
    return records


def _children(layer: Any) -> list[Any]:
    if isinstance(layer, keras.Model) and _functional_of(layer) is not None:
        return list(layer.layers)
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _record_provenance(model_ir: ir.Model, model: Any, b: Builder) -> None:
    provenance.write_layers(model_ir, provenance.with_returns(_layer_records(model), b.returns))
    present = model_ir.graph.initializers
    provenance.write_parameters(model_ir, {n: k for n, k in b.kinds.items() if n in present})
    provenance.write_source(
        model_ir,
        {
            "framework": "keras",
            "version": keras.__version__,
            "backend": keras.backend.backend(),
            "class": _qualname(model),
            "parameters": int(model.count_params()),
        },
    )
    model_ir.graph.name = model.name
