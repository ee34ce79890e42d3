"""A layer no converter or symbolic call can open, captured by the backend's own tracer.

Some layers cannot run on KerasTensors at all: they call the backend directly
(``tf.math.*`` on TensorFlow), take ``len()`` or ``int()`` of a symbolic size, branch in
Python on a tensor, or use an op interop has no converter for. Such a layer is traced once
more, this time by the backend that runs it, on concrete tensors:

- the layer's call becomes a pure function of its weights and tensor inputs through
  ``layer.stateless_call`` (so every weight is an input of the traced graph and stays a
  named, trainable parameter rather than a frozen constant);
- the backend traces it, first with the run-time dims the walk knows (``None`` for the
  batch), then at the example's concrete shapes:
  TensorFlow through a concrete ``tf.function`` converted by tf2onnx (capture_tf2onnx.py; a
  transformer attention layer in 1-5 s; writing our own lowering of TF's ~1,500 raw ops
  would duplicate tf2onnx), JAX through ``jax.make_jaxpr`` and interop's own jaxpr lowering
  (the Flax adapter), torch through ``torch.export`` and interop's torch capture;
- the resulting ONNX graph is spliced into the walk: its inputs bound to the layer's
  weights (named after their Keras paths) and to the walked inputs, its nodes placed in the
  layer path of the sub-layer whose name scope made them (``.../self_attention/query``),
  nodes without one in the scope of their consumers.

The dims such a layer fixes are found by `capture_dim_check` like any other.

>>> g = interop.trace(keras_hub.models.Qwen3Backbone(...), inputs)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import onnx_ir as ir
from keras import tree

from interop import provenance

from .capture_concrete import example_shapes
from .capture_lowering import OPSET, Builder, Tensor
from .capture_tf2onnx import Deferred, trace_tensorflow

# backend name -> (function, weight arrays, input specs, layer) -> ONNX ModelProto / ir.Model
Tracer = Callable[[Callable[..., list[Any]], list[np.ndarray], list[tuple], Any], Any]


def lower_by_backend_tracer(
    b: Builder, layer: Any, path: str, args: list, kwargs: dict, tensors: list[Tensor]
) -> tuple[Any, bool]:
    """The layer's outputs (in its call's structure), traced by the running backend, and
    whether that took the example's concrete shapes (the call computes with sizes)."""
    tracer = TRACERS.get(keras.backend.backend())
    if tracer is None:
        raise NotImplementedError(f"no tracer for the {keras.backend.backend()} backend")
    trainable = list(layer.trainable_variables)
    variables = trainable + list(layer.non_trainable_variables)
    structure: list[Any] = [None]

    def function(weights: list[Any], inputs: list[Any]) -> list[Any]:
        feeds = iter(inputs)
        call_args, call_kwargs = tree.map_structure(
            lambda x: next(feeds) if isinstance(x, Tensor) else x, (list(args), dict(kwargs))
        )
        outputs, _ = layer.stateless_call(
            weights[: len(trainable)], weights[len(trainable) :], *call_args, **call_kwargs
        )
        structure[0] = outputs
        return [x for x in tree.flatten(outputs) if x is not None]

    weights = [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in variables]
    # Keras counts `layer.weights`; other state (dropout seeds) is a constant of the graph
    counted = {id(w) for w in layer.weights}
    shapes = example_shapes(b, tensors, every=True) or {}
    run_time = [(_trusted(t.shape, shapes.get(id(t))), t.dtype) for t in tensors]
    example = [(shapes.get(id(t), t.shape), t.dtype) for t in tensors]
    # the batch kept dynamic, the other dims at the example's: a branch on a size folds
    # (keras_hub SAM's `ops.cond` on the number of masks, whose untaken branch tf2onnx
    # cannot type), and a call that needs static sizes may still keep a dynamic batch
    batch_free = [
        ((r[0], *e[1:]) if len(r) == len(e) and r else e, d)
        for (r, _), (e, d) in zip(run_time, example, strict=True)
    ]

    def trace(specs: list[tuple]) -> tuple[Any, Any]:
        return tracer(function, weights, specs, layer), structure[0]

    (model, structure[0]), at_example = _first_traced(trace, run_time, batch_free, example)
    feeds = [
        b.variable(v) if id(v) in counted else b.const(w)
        for v, w in zip(variables, weights, strict=True)
    ] + [t.value for t in tensors]
    outputs = _splice(b, model, path, _scopes(layer), feeds)
    found = iter(outputs)
    flat = [
        None if x is None else Tensor(next(found), _dims(x.shape), _dtype(x))
        for x in tree.flatten(structure[0])
    ]
    return tree.pack_sequence_as(structure[0], flat), at_example


def _first_traced(
    trace: Callable[[list[tuple]], tuple[Any, Any]],
    run_time: list[tuple],
    batch_free: list[tuple],
    example: list[tuple],
) -> tuple[Any, bool]:
    """`trace` (graph, outputs) of the first specs the tracer takes, and whether they were not the run-time
    ones. A run-time graph with an ``If`` gives way to the batch-free one where that folds
    the branch; the full example (a static batch) only when nothing else traces."""
    tries = [run_time] + [s for s in (batch_free, example) if s != run_time]
    if len(tries) == 3 and tries[1] == tries[2]:
        tries.pop()
    model, error = None, None
    for specs in tries:
        if model is not None and specs is example:
            break
        try:
            traced = trace(specs)
        except Exception as err:
            error = err
            if model is not None:
                break
            continue
        if specs is not run_time:
            if model is not None and _has_branches(traced):
                return _converted(model), False
            return _converted(traced), True
        if not _has_branches(traced):
            return traced, False
        model = traced
    if model is None:
        assert error is not None
        raise error
    return _converted(model), False


def _converted(traced: tuple[Any, Any]) -> tuple[Any, Any]:
    model, outputs = traced
    return (model.convert() if isinstance(model, Deferred) else model), outputs


def _has_branches(model: Any) -> bool:
    """Whether a traced (graph, outputs)'s graph (ModelProto or ir.Model) has a top-level
    ``If`` (a `Deferred` one has)."""
    if isinstance(model[0], Deferred):
        return True
    graph = model[0].graph
    nodes = graph if isinstance(graph, ir.Graph) else graph.node
    return any(node.op_type == "If" for node in nodes)


def _trusted(declared: tuple, example: tuple | None) -> tuple:
    """The walk's shape with the static dims the example contradicts made unknown (a
    layer's ``compute_output_shape`` may declare a wrong size: keras_hub's SigLIP)."""
    if example is None:
        return tuple(declared)
    if len(example) != len(declared):
        return (None,) * len(example)
    return tuple(d if d is None or d == e else None for d, e in zip(declared, example, strict=True))


def _unknown(shape: tuple) -> bool:
    return any(not isinstance(d, int) for d in shape)


def _dims(shape: Any) -> tuple:
    return tuple(d if isinstance(d, int) else None for d in tuple(shape))


def _dtype(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


# ---------------------------------------------------------------------------- splicing
def _splice(
    b: Builder, model: Any, path: str, scopes: Callable[[str], str], feeds: list[ir.Value]
) -> list[ir.Value]:
    """Move the nodes of `model` into the walk; returns the values of its outputs."""
    if not isinstance(model, ir.Model):
        model = ir.serde.deserialize_model(model)
    graph = model.graph
    if len(graph.inputs) != len(feeds):
        raise ValueError(f"traced graph has {len(graph.inputs)} inputs, expected {len(feeds)}")
    outputs = list(graph.outputs)
    bound = dict(zip(graph.inputs, feeds, strict=True))
    for name, init in list(graph.initializers.items()):
        const = init.const_value
        if const is not None:
            bound[init] = b.const(const.numpy())
        del graph.initializers[name]
    nodes = list(graph)
    graph.remove(nodes, safe=False)
    if model.opset_imports.get("", OPSET) > OPSET:  # the torch capture writes opset 20
        _dft_axis_as_attribute(nodes)
        nodes = _gelu_expanded(b, nodes)
    for value, feed in bound.items():
        value.replace_all_uses_with(feed)
    graph.inputs.clear()
    graph.outputs.clear()
    placed = _place(nodes, path, scopes)
    for node in nodes:
        with b.scoped(placed[node]):
            node.name = b.fresh(node.op_type)
        node.metadata_props[provenance.SCOPE] = placed[node]
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}:{i}" if len(node.outputs) > 1 else node.name
            out.shape = None  # inferred again: the tracer's dim names (unk__N) would clash
        b.nodes.append(node)
    return [bound.get(v, v) for v in outputs]


def _dft_axis_as_attribute(nodes: list[ir.Node]) -> None:
    """DFT-20's constant axis input back to DFT-17's attribute: the torch capture writes
    opset 20 (keras_hub FNet's FFTs on torch), the Keras graph is opset `OPSET`."""
    for node in nodes:
        if node.op_type != "DFT" or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        const, axis = node.inputs[2].const_value, None
        producer = node.inputs[2].producer()
        if const is not None:
            axis = const.numpy()
        elif producer is not None and producer.op_type == "Constant" and producer.attributes:
            attr = next(iter(producer.attributes.values()))  # value, value_int or value_ints
            axis = attr.as_tensor().numpy() if attr.type == ir.AttributeType.TENSOR else attr.value
        if axis is None:
            raise ValueError("a DFT with a computed axis cannot be written at opset 18")
        node.attributes["axis"] = ir.AttrInt64("axis", int(np.asarray(axis).reshape(-1)[0]))
        node.resize_inputs(2)


def _gelu_expanded(b: Builder, nodes: list[ir.Node]) -> list[ir.Node]:
    """Gelu (opset 20) as its function body at opset `OPSET`; the Gelu node becomes the
    body's last Mul, so its output value and consumers stay."""
    result: list[ir.Node] = []
    for node in nodes:
        if node.op_type != "Gelu" or node.domain not in ("", "ai.onnx"):
            result.append(node)
            continue
        x = node.inputs[0]
        dtype = x.dtype.numpy() if x is not None and x.dtype is not None else np.float32

        def const(v: float, dtype: Any = dtype) -> ir.Value:
            return b.const(np.array(v, dtype))

        def add(op: str, *inputs: ir.Value, name: str = node.name or "gelu") -> ir.Value:
            made = ir.Node("", op, inputs, name=f"{name}_{op}_{len(result)}")
            result.append(made)
            return made.outputs[0]

        attr = node.attributes.get("approximate")
        if attr is not None and attr.value == "tanh":
            cube = add("Mul", add("Mul", x, x), x)
            inner = add(
                "Mul", add("Add", x, add("Mul", cube, const(0.044715))), const(0.7978845608028654)
            )
            gate = add("Add", add("Tanh", inner), const(1.0))
        else:
            gate = add("Add", add("Erf", add("Div", x, const(np.sqrt(2.0)))), const(1.0))
        node.op_type = "Mul"
        node.attributes.clear()
        node.resize_inputs(2)
        node.replace_input_with(0, add("Mul", x, gate))
        node.replace_input_with(1, const(0.5))
        result.append(node)
    return result


def _place(nodes: list[ir.Node], path: str, scopes: Callable[[str], str]) -> dict[ir.Node, str]:
    """Each node's layer path: from its name scope; a node the converter added (tf2onnx's
    ``Unsqueeze__12``) takes its first placed consumer's."""
    placed = {node: scopes(_scoped_name(node)) for node in nodes}
    for node in reversed(nodes):  # consumers come later in topological order
        if placed[node] or not _ADDED.search(node.name or ""):
            continue
        for out in node.outputs:
            user = next((u for u, _ in out.uses() if placed.get(u)), None)
            if user is not None:
                placed[node] = placed[user]
                break
    return {
        node: f"{path}/{rel}" if path and rel else (rel or path) for node, rel in placed.items()
    }


_ADDED = re.compile(r"__\d+(:\d+)?$")
_WRAPPER = "traced_keras_layer"  # the torch tracer's attribute holding the layer


def _scoped_name(node: ir.Node) -> str:
    """TF's name scope is in the node name; interop's captures record a scope."""
    scope = node.metadata_props.get(provenance.SCOPE)
    if not scope:
        return node.name or ""
    return f"{scope.removeprefix(_WRAPPER).lstrip('/')}/{node.op_type}"


def _scopes(layer: Any) -> Callable[[str], str]:
    """A node name -> the relative path of the sub-layer whose name scope it is in."""

    def children(parent: Any) -> dict[str, Any]:
        """Sub-layers by Keras name and by the attribute holding them (torch's paths)."""
        found = {c.name: c for c in parent._flatten_layers(include_self=False, recursive=False)}
        held = {id(c) for c in found.values()}
        found.update({k: v for k, v in vars(parent).items() if id(v) in held and k not in found})
        return found

    def scope_of(name: str) -> str:
        parts, current, found = name.split("/")[:-1], layer, []
        for part in parts:
            named = children(current)
            child = named.get(part) or named.get(re.sub(r"_\d+$", "", part))
            if child is None:
                break
            found.append(child.name)
            current = child
        return "/".join(found)

    return scope_of


# ---------------------------------------------------------------------------- tracers
def trace_jax(function: Callable, weights: list[np.ndarray], specs: list[tuple], layer: Any) -> Any:
    """``jax.make_jaxpr`` of the call, lowered by the Flax adapter; run-time dims become
    `jax.export` symbolic dims (``batch`` for the first axis, one symbol per other one)."""
    from interop.adapters.flax.capture import trace_model

    names = [f"w{i}" for i in range(len(weights))] + [f"x{i}" for i in range(len(specs))]
    arrays = list(weights) + [
        np.zeros([d if isinstance(d, int) else 2 for d in s], keras.backend.standardize_dtype(t))
        for s, t in specs
    ]
    dims = {
        f"x{i}": {a: "batch" if a == 0 else f"x{i}_{a}" for a, d in enumerate(s) if d is None}
        for i, (s, _) in enumerate(specs)
    }
    count = len(weights)

    def flat(**values: Any) -> tuple[Any, ...]:
        ordered = [values[n] for n in names]
        return tuple(function(ordered[:count], ordered[count:]))

    examples = dict(zip(names, arrays, strict=True))
    with _jax_scopes(layer):
        return trace_model(flat, examples, dynamic_batch=False, dynamic_dims=dims).model


@contextlib.contextmanager
def _jax_scopes(layer: Any) -> Iterator[None]:
    """Each sub-layer call of `layer` inside a ``jax.named_scope`` of its relative path,
    which the Flax adapter's lowering records as the node's scope."""
    import jax
    from interop.adapters.flax.capture_lowering import MARK

    paths: dict[int, str] = {}

    def collect(parent: Any, prefix: str) -> None:
        for child in parent._flatten_layers(include_self=False, recursive=False):
            if id(child) not in paths:
                paths[id(child)] = f"{prefix}{child.name}"
                collect(child, f"{prefix}{child.name}/")

    collect(layer, "")
    original = keras.layers.Layer.__call__

    def scoped_call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if id(self) not in paths:
            return original(self, *args, **kwargs)
        with jax.named_scope(MARK + paths[id(self)]):
            return original(self, *args, **kwargs)

    keras.layers.Layer.__call__ = scoped_call  # type: ignore[method-assign]
    try:
        yield
    finally:
        keras.layers.Layer.__call__ = original  # type: ignore[method-assign]


def trace_torch(
    function: Callable, weights: list[np.ndarray], specs: list[tuple], layer: Any
) -> Any:
    """``torch.export`` of the call, through interop's torch capture (concrete shapes)."""
    import torch
    from interop.adapters.torch.capture import trace_module

    if any(_unknown(shape) for shape, _ in specs):
        raise ValueError("the torch tracer needs the example's concrete shapes")
    count = len(weights)

    class Call(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, _WRAPPER, layer)  # module paths of the sub-layers

        def forward(self, *values: Any) -> tuple[Any, ...]:
            return tuple(function(list(values[:count]), list(values[count:])))

    arrays = [torch.as_tensor(w) for w in weights] + [
        torch.zeros(s, dtype=getattr(torch, keras.backend.standardize_dtype(d))) for s, d in specs
    ]
    graph = trace_module(Call(), tuple(arrays), dynamic_batch=False)
    return graph.model


TRACERS: dict[str, Tracer] = {
    "tensorflow": trace_tensorflow,
    "jax": trace_jax,
    "torch": trace_torch,
}


# ---------------------------------------------------------------------------- retry mode
_TRACER_FIRST = [False]
RETRACE = RuntimeError("its symbolic call's graph did not reproduce the model at the example")


@contextlib.contextmanager
def layers_traced_first() -> Iterator[None]:
    """Every layer a symbolic call would open is traced by the backend (capture.py's retry
    when the symbolic graph does not reproduce the model at the example)."""
    saved, _TRACER_FIRST[0] = _TRACER_FIRST[0], True
    try:
        yield
    finally:
        _TRACER_FIRST[0] = saved


def tracing_layers_first() -> bool:
    return _TRACER_FIRST[0]


def first_line(err: BaseException) -> str:
    """The message's first informative line (Keras wraps errors in a generic first line)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception encountered")]
    return lines[0][:300] if lines else type(err).__name__


def source_line(layer: Any) -> str | None:
    """``file:line`` of the layer class's ``call``, where Python can tell."""
    if layer is None:
        return None
    try:
        call = type(layer).call
        return f"{inspect.getsourcefile(call)}:{inspect.getsourcelines(call)[1]}"
    except (TypeError, OSError):
        return None
