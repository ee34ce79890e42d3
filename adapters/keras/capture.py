"""keras.Model / keras.layers.Layer -> interop.Graph by walking the Keras graph natively.

Functional and Sequential models are graphs of layer calls already; each layer is
lowered by a converter of `CAPTURE_LAYERS` inside its own scope. A layer without a converter
(a subclassed model, a custom layer) is opened up by calling its ``call`` on symbolic
KerasTensors: Keras then records every sub-layer call and every ``keras.ops``
operation as graph nodes, exactly as when building a functional model, and that
graph is walked the same way (``keras.ops`` nodes through `CAPTURE_OPS`; the walk is in
capture_walk.py). This needs no framework exporter, works on every Keras backend, and
keeps layer identity.

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
import onnx
import onnx_ir as ir
from keras import tree

from interop import provenance, weightless
from interop.errors import TraceError
from interop.graph import Graph
from interop.structure import flatten_outputs
from interop.weights import serialize_without_placeholders

from . import (  # noqa: F401  (register the converters)
    capture_attention,
    capture_conv,
    capture_dim_check,
    capture_layers,
    capture_ops,
    capture_ops_arrays,
    capture_ops_image,
    capture_ops_math,
    capture_recurrent,
    capture_wrappers,
)
from .capture_lowering import OPSET, Builder, Tensor, onnx_dtype
from .capture_tracer import layers_traced_first, tracing_layers_first
from .capture_walk import functional_of, is_functional, lower_callable, lower_layer, with_training


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
        if not is_functional(model) and _positional_arity(model) >= len(items):
            return items, {}
        return [items], {}
    return [example_inputs], {}


call_structure = _call_structure  # public: capture_weights.py builds a model by it


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensors on the torch backend
        value = value.detach().cpu()
    return np.asarray(keras.ops.convert_to_numpy(value))


def run_model(model: Any, example_inputs: Any) -> list[tuple[str, np.ndarray]]:
    """Run the Keras model in inference mode; outputs flattened and named as in the graph."""
    args, kwargs = _call_structure(model, example_inputs)
    outputs = model(*args, **with_training(model, kwargs))
    return [(name, _to_numpy(v)) for name, v in flatten_outputs(_sorted_dicts(outputs), _is_array)]


def _sorted_dicts(structure: Any) -> Any:
    """Dicts with sorted keys, recursively: Keras's own flattening order on every backend."""
    if isinstance(structure, Mapping):
        return {k: _sorted_dicts(structure[k]) for k in sorted(structure)}
    if isinstance(structure, list | tuple) and not hasattr(structure, "_fields"):
        return type(structure)(_sorted_dicts(v) for v in structure)
    return structure


# ---------------------------------------------------------------------------- trace
def trace_model(
    model: Any,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    check_dynamic_dims: bool = True,
    verbose: bool = False,
    check_dims: bool = True,
    builder: Builder | None = None,
) -> Graph:
    """Trace a Keras model or layer on `example_inputs` into a Graph (see `interop.trace`).

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="fc")])  # doctest: +SKIP
    >>> g = interop.trace(model, np.zeros((1, 4), np.float32))                            # doctest: +SKIP
    >>> [layer.path for layer in g.layers], g.count_params() == model.count_params()      # doctest: +SKIP
    (['input_layer', 'fc'], True)

    ``builder`` is the `Builder` to lower into (capture_weights.py's makes variables lazy).
    """
    del verbose  # nothing is printed either way
    args, kwargs = _call_structure(model, example_inputs)
    if not model.built:
        model(*args, **with_training(model, kwargs))
    seeds = capture_dim_check.seed_states(model)  # the noise the trace draws, for the check
    b = builder or Builder()
    b.lower_callable = lower_callable
    graph_inputs: list[ir.Value] = []
    flat_examples = tree.flatten((args, kwargs))
    names = _input_names(model, args, kwargs, len(flat_examples))
    specs = _input_specs(model, names)
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
        b.examples[str(tensor.value.name)] = _to_numpy(example)
        flat_inputs.append(tensor)
    call_args, call_kwargs = tree.pack_sequence_as((args, kwargs), flat_inputs)
    with capture_dim_check.frozen_seeds():  # keras.random draws at the state `seeds` holds
        outputs = lower_layer(b, model, "", list(call_args), dict(call_kwargs))
    for variable in model.weights:  # weights no node reads (Normalization's count) still count
        b.variable(variable)
    flat_outputs = flatten_outputs(_sorted_dicts(outputs), lambda v: isinstance(v, Tensor))
    graph = _assemble(b, graph_inputs, flat_outputs)
    model_ir = ir.Model(
        graph, ir_version=10, producer_name="interop.keras", producer_version=keras.__version__
    )
    _correct_declared_shapes(model_ir)
    _record_provenance(model_ir, model, b)
    traced = Graph(model_ir)
    if not (check_dims and check_dynamic_dims):  # check_dims: the name every adapter takes
        return traced

    def run_source(flat: list[np.ndarray]) -> list[tuple[str, np.ndarray]]:
        capture_dim_check.restore_seeds(seeds)
        call_args, call_kwargs = tree.pack_sequence_as((args, kwargs), flat)
        outputs = model(*call_args, **with_training(model, dict(call_kwargs)))
        return [(n, _to_numpy(v)) for n, v in flatten_outputs(_sorted_dicts(outputs), _is_array)]

    examples = [_to_numpy(e) for e in flat_examples]
    if not tracing_layers_first() and not capture_dim_check.holds_at_example(
        traced, run_source, examples
    ):
        traced = _retraced(model, example_inputs, traced, run_source, examples, dynamic_batch, dims)
    return capture_dim_check.check_dynamic_dims(traced, run_source, examples, model_name=model.name)


def _retraced(
    model: Any,
    example_inputs: Any,
    traced: Graph,
    run_source: Any,
    examples: list[np.ndarray],
    dynamic_batch: bool,
    dims: Mapping[str, Mapping[int, str]],
) -> Graph:
    """A graph that does not reproduce the model at the example itself (ONNX Runtime
    refuses it, or it computes otherwise) is captured again with every layer a symbolic
    call would open traced by the backend instead: a layer's ``compute_output_shape`` may
    declare a wrong shape that the rest of its Python then computes with (keras_hub's
    XLNet, PARSeq), while the backend's tracer sees the real ones. Kept only if it does
    reproduce the model; otherwise the first graph stays, for interop.verify to report."""
    try:
        with layers_traced_first():
            again = trace_model(
                model, example_inputs, dynamic_batch=dynamic_batch, dynamic_dims=dims,
                check_dynamic_dims=False,
            )  # fmt: skip
    except Exception:
        return traced
    if not capture_dim_check.holds_at_example(again, run_source, examples):
        return traced
    warnings.warn(
        f"interop: Keras model '{model.name}': the graph of its symbolic calls does not "
        "reproduce the model at the example; its custom layers were traced by the "
        f"{keras.backend.backend()} backend instead",
        stacklevel=3,
    )
    return again


def _input_names(model: Any, args: list, kwargs: dict, count: int) -> list[str]:
    functional = functional_of(model)
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


def _input_specs(model: Any, names: list[str]) -> list[Any]:
    """The functional inputs in the order of `names` (a dict of inputs flattens in sorted
    key order, the model's inputs keep theirs); None where unknown."""
    functional = functional_of(model)
    if functional is None or len(functional.inputs) != len(names):
        return [None] * len(names)
    by_name = {re.sub(r"\W", "_", _input_layer_name(t)): t for t in functional.inputs}
    if set(by_name) == set(names):
        return [by_name[name] for name in names]
    return list(functional.inputs)


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
    input_names = {v.name for v in inputs}
    for (name, _), value in zip(outputs, graph_outputs, strict=False):
        # an output returning an input under its own name (keras_hub SD3's "images") gets
        # another: ONNX names each value once
        value.name = f"{name}_output" if name in input_names else name
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


def _correct_declared_shapes(model_ir: ir.Model) -> None:
    """Replace the output shapes and types Keras declared where ONNX shape inference proves
    them wrong: a layer's ``compute_output_shape`` may lie (keras_hub's SigLIP embedding
    declares one patch more than it makes), and ONNX Runtime refuses a graph whose
    annotations contradict its nodes. Inference sees the weights' types and shapes only
    (`weightless.data_elided`: serialized, a 0.5 GB Llama backbone's weights cost +2 GB
    here). Skipped for graphs whose weights exceed one protobuf."""
    from interop.serialization import PROTO_LIMIT, weight_bytes

    if weight_bytes(model_ir) >= PROTO_LIMIT:
        return
    with weightless.data_elided(model_ir):
        proto = serialize_without_placeholders(model_ir)  # weights given apart: no zeros
    del proto.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference gave up: keep the annotations
        return
    found = {info.name: info.type.tensor_type for info in inferred.graph.value_info}
    for node in model_ir.graph:
        for out in node.outputs:
            kind = found.get(out.name)
            if kind is None:
                continue
            if kind.elem_type and out.dtype is not None and kind.elem_type != out.dtype.value:
                out.type = ir.TensorType(ir.DataType(kind.elem_type))
            if out.shape is None or not kind.HasField("shape"):
                continue
            dims = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in kind.shape.dim
            ]
            declared = list(out.shape)
            # wrong: another rank, another size, or a size where inference follows a
            # named dynamic dim (a layer called at the example's shapes annotates those)
            if len(dims) != len(declared) or any(
                isinstance(a, int) and b is not None and a != b
                for a, b in zip(declared, dims, strict=True)
            ):
                out.shape = ir.Shape(
                    [ir.SymbolicDim(d) if not isinstance(d, int) else d for d in dims]
                )


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
    if isinstance(layer, keras.Model) and functional_of(layer) is not None:
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
