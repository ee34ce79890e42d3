"""IR graph -> trainable Keras functional ``keras.Model`` on whichever Keras backend is active.

`KerasEmitter` is the core `interop.emitter.Emitter` building a functional graph of
``KerasTensor``s: graph inputs become ``keras.Input`` (symbolic dims -> None), weighted ops
with constant weights become Keras layers (`EMIT_LAYERS`: ``emit_layers`` Dense,
ConvND(Transpose), BatchNormalization, LayerNormalization, Embedding, Dropout, pooling;
``emit_recurrent`` LSTM/GRU/SimpleRNN) and every other node one `OnnxOp` layer calling its
ONNX semantics with the ``keras.ops`` backend (``emit_generic``). Nodes whose inputs are
all constants (and Shape of a statically shaped value) are evaluated here.

Sequences: a sequence value of statically known length is a Python list of KerasTensors
(or `Const`s) between layers (``emit_sequences``); a sequence whose length is only known at
run time (a run-time split, a Loop's) makes the graph the interpreted `GraphModel`
(``emit_interpreted``), as sequence inputs and outputs of the graph do.

Layout: values keep ONNX's (the source's) layout; native convolution / pooling /
normalization layers run channels-last between two permutations, and `transpose`
cancels a permutation against the one that produced its input, so consecutive
channels-last layers (and a Keras source's own Transpose pairs) meet without transposes.

>>> model = to_keras_model(graph)                  # doctest: +SKIP
>>> model.source_names["blocks.0.conv/kernel"]     # doctest: +SKIP
'blocks.0.conv.weight'
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import onnx_ir as ir

from interop import provenance
from interop.emitter import Emitter, Native
from interop.errors import EmitError
from interop.interpret import node_free_values
from interop.normalize import DEFAULT_DOMAINS

from . import EMIT_LAYERS, emit_recurrent  # noqa: F401  (emit_recurrent: its builders)
from .backend import emulated, keras_backend, keras_dtype
from .emit_generic import (
    MAX_INPUTS,
    Const,
    OnnxOp,
    Transpose,
    control_function,
    op_class,
    sequence_function,
)
from .emit_interpreted import graph_model, needs_graph_model
from .emit_layers import forget_initializers, host_tensor
from .emit_sequences import SEQUENCE_MAKERS, sequence_step

# ops applied elementwise: they commute with a permutation of their (same-layout) inputs
_ELEMENTWISE = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "HardSigmoid", "HardSwish",
                "Softplus", "Gelu", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Clip", "Add", "Sub",
                "Mul", "Div", "Max", "Min", "Identity", "PRelu"}  # fmt: skip


class KerasEmitter(Emitter):
    """Builds the functional graph and the layers of one emitted Keras model."""

    adapter = "keras"
    layers = EMIT_LAYERS
    fold_static_shapes = True  # a functional model needs static shapes
    weights_through_transpose = True  # a Keras source's HWIO kernels

    def __init__(self, source: Any, *, normalized: bool = False):
        super().__init__(source, keras_backend, normalized=normalized)
        self.variables: dict[ir.Value, keras.Variable] = {}
        self.source_names: dict[str, str] = {}  # keras variable path -> source initializer
        self.origin: dict[int, tuple[Any, tuple[int, ...]]] = {}  # id(tensor) -> (source, perm)
        self._permuted: dict[tuple[int, tuple[int, ...]], Any] = {}
        self._names: set[str] = set()
        self.inputs: list[Any] = []
        self.inferred: dict[str, tuple[Any, Any]] = {}  # value name -> (dims, dtype name)

    # ------------------------------------------------------------------ building
    def build(self) -> keras.Model:
        self.check()
        name = _layer_name(self.graph.name or "emitted")
        if needs_graph_model(self.graph):  # sequences, optionals, no inputs: not functional
            return self.described(graph_model(self, name))
        _infer_missing_shapes(self)
        try:
            outputs = self.run(*[None] * len(self.graph.inputs))
        except EmitError:
            # a layer's output shape was not knowable at build time (shapes computed from
            # run-time values, as in expanded function bodies): the graph runs node by node
            self.source_names.clear()
            return self.described(graph_model(self, name))
        outputs = [self.runtime(o) for o in outputs]
        for tensor in outputs:
            layer = tensor._keras_history.operation
            if isinstance(layer, OnnxOp):
                layer.exposed = True
        inputs = self.inputs if len(self.inputs) != 1 else self.inputs[0]
        model = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=name)
        # variables of layers the outputs do not depend on (a weight's Transpose that a native
        # layer took over) are not part of the model
        paths = {v.path for v in model.weights}
        model.source_names = {k: v for k, v in self.source_names.items() if k in paths}
        return self.described(model)

    def described(self, model: keras.Model) -> keras.Model:
        """The model with the graph's input / output names and ONNX dtypes attached."""
        model.input_names = [v.name for v in self.graph.inputs]
        # the ONNX dtypes of inputs and outputs (a dtype Keras lacks travels in its carrier)
        model.input_dtypes = [_dtype_name(v) for v in self.graph.inputs]
        model.output_dtypes = [_dtype_name(v) for v in self.graph.outputs]
        model.output_names = [v.name for v in self.graph.outputs]
        return model

    def input(self, value: ir.Value, given: Any) -> Any:
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            raise NotImplementedError(f"graph input '{value.name}' is a {value.type}")
        shape = _dims(value.shape) if value.shape is not None else None
        if shape is None:
            raise NotImplementedError(f"graph input '{value.name}' has no shape")
        dtype = _dtype_name(value)
        tensor = keras.Input(
            batch_shape=shape,
            dtype=None if dtype is None else keras_dtype(dtype),
            name=self.unique(value.name or "input"),
        )
        self.inputs.append(tensor)
        return tensor

    def static_handle(self, value: ir.Value, array: Any) -> Const:
        return Const(value, array, None)

    def weight_handle(self, value: ir.Value, kind: str) -> Const:
        return Const(value, self.weight_array(value), kind)

    def output(self, results: list[Any]) -> list[Any]:
        return results

    # ------------------------------------------------------------------ weights and names
    def kind_of(self, value: ir.Value) -> str | None:
        """ "trainable" / "frozen" / "buffer" for source weights; None for constants."""
        if value.name in self.kinds:
            return self.kinds[value.name]
        if value.dtype is not None and emulated(value.dtype.numpy()):
            return None  # no Keras variable of a dtype Keras lacks: a host constant
        return super().kind_of(value)

    def variable(self, value: ir.Value, array: np.ndarray, kind: str) -> keras.Variable:
        """One Keras variable per source weight, named after it, shared by all its readers."""
        if value not in self.variables:
            name = _variable_name(value.name or "constant")
            self.variables[value] = variable = keras.Variable(
                host_tensor(array),
                name=name,
                trainable=kind == provenance.TRAINABLE,
                autocast=False,
            )
            self.source_names[variable.path] = value.name
        return self.variables[value]

    def unique(self, base: str) -> str:
        name = _layer_name(base)
        candidate, count = name, 0
        while candidate in self._names:
            count += 1
            candidate = f"{name}_{count}"
        self._names.add(candidate)
        return candidate

    def scope_name(self, node: ir.Node) -> str:
        return provenance.node_scope(node) or node.name or node.op_type.lower()

    def place(self, node: ir.Node, native: Native) -> str:
        """A native layer's name: its path, else its weights' common source prefix
        (``blocks.0.conv``), else the node's scope; made unique."""
        path = native.path or self.source_prefix(native.sources.values())
        return self.unique(path or self.scope_name(node))

    def adopt(self, layer: keras.layers.Layer, native: Native) -> None:
        """Record the source name of each variable of a freshly called native layer."""
        forget_initializers(layer)
        names = native.names or {}
        for attribute, value in native.sources.items():
            variable = functools.reduce(getattr, attribute.split("."), layer)
            self.source_names[variable.path] = names.get(attribute) or self.source_name(value)

    # ------------------------------------------------------------------ layout
    def transpose(self, tensor: Any, perm: Sequence[int]) -> Any:
        """``tensor`` permuted; a permutation of a permuted tensor composes with the first."""
        perm = tuple(int(p) for p in perm)
        if perm == tuple(range(len(perm))):
            return tensor
        if id(tensor) in self.origin:
            source, first = self.origin[id(tensor)]
            combined = tuple(first[p] for p in perm)
            if combined == tuple(range(len(combined))):
                return source
            tensor, perm = source, combined
        key = (id(tensor), perm)
        if key not in self._permuted:
            result = Transpose(perm, name=self.unique("transpose"))(tensor)
            self.origin[id(result)] = (tensor, perm)
            self._permuted[key] = result
        return self._permuted[key]

    def channels_last(self, tensor: Any) -> Any:
        rank = len(tensor.shape)
        return self.transpose(tensor, (0, *range(2, rank), 1))

    def channels_first(self, tensor: Any) -> Any:
        rank = len(tensor.shape)
        return self.transpose(tensor, (0, rank - 1, *range(1, rank - 1)))

    # ------------------------------------------------------------------ nodes
    def rewrite(self, node: ir.Node, args: list[Any], env: Any) -> Sequence[Any] | None:
        """Sequences as lists (`emit_sequences`); a Transpose composing with the last one."""
        listed = sequence_step(self, node, args)
        if listed is not None:
            return listed
        if node.op_type == "Transpose" and node.domain in DEFAULT_DOMAINS:
            if not isinstance(args[0], Const):
                rank = len(args[0].shape)
                perm = self.node_attributes(node).get("perm") or list(range(rank))[::-1]
                return [self.transpose(args[0], perm)]
        return None

    def call_native(self, node: ir.Node, native: Native, args: list[Any]) -> Sequence[Any]:
        """Name the layer where its weights come from, call it, record its variables."""
        layer = native.layer
        layer.name = self.place(node, native)  # before the first call: variable paths follow
        inputs = [args[i] for i in native.data_inputs]
        result = native.call(layer, *inputs) if native.call is not None else layer(*inputs)
        self.adopt(layer, native)
        outputs = list(result) if native.outputs > 1 else [result]
        return outputs + [None] * (len(node.outputs) - len(outputs))

    def call_op(self, node: ir.Node, args: list[Any], captured: list[Any]) -> Sequence[Any]:
        if node.op_type in _ELEMENTWISE and not captured:
            permuted = self.elementwise_in_source_layout(node, args)
            if permuted is not None:
                return permuted
        return self.generic_op(node, args, captured)

    def elementwise_in_source_layout(self, node: ir.Node, args: list[Any]) -> list[Any] | None:
        """Apply an elementwise op before the permutation its inputs came out of, if they share it."""
        runtime = [a for a in args if a is not None and not isinstance(a, Const)]
        perms = {self.origin[id(a)][1] if id(a) in self.origin else None for a in runtime}
        if len(perms) != 1 or None in perms:
            return None
        for a in args:
            if isinstance(a, Const) and a.array.size != 1:
                return None  # a broadcast constant would need permuting too
        perm = perms.pop()
        sources = [self.origin[id(a)][0] if a in runtime else a for a in args]
        shapes = [_permuted_shape(node.outputs[0], perm)]
        inner = self.generic_op(node, sources, [], shapes=shapes)
        return [self.transpose(inner[0], perm)]

    def generic_op(
        self, node: ir.Node, args: list[Any], captured: list[Any], shapes: Any = None
    ) -> Sequence[Any]:
        """The node as one `OnnxOp` layer (its ONNX semantics on the keras.ops backend)."""
        function = control_function(self, node) or sequence_function(node) or self.op_function(node)
        values = [*node.inputs, *node_free_values(node)]
        # a sequence's elements are run-time inputs each (constants flow as Identity outputs)
        args = [[self.runtime(e) for e in a] if isinstance(a, list) else a for a in args]
        captured = [[self.runtime(e) for e in a] if isinstance(a, list) else a for a in captured]
        count = sum(
            len(a) if isinstance(a, list) else 1
            for a in [*args, *captured]
            if a is not None and not isinstance(a, Const)
        )
        if count > MAX_INPUTS:
            raise NotImplementedError(f"{count} run-time inputs (at most {MAX_INPUTS})")
        specs = [_spec(self, value, shapes[i] if shapes else None) for i, value in
                 enumerate(node.outputs)]  # fmt: skip
        if node.op_type in SEQUENCE_MAKERS and node.domain in DEFAULT_DOMAINS:
            # the layer finds its sequences' lengths and elements by running the op: a shape
            # on record for a sequence value is its elements' at best
            specs = [(None, dtype) for _, dtype in specs]
        layer = op_class(max(count, 1))(
            function, node, specs, self.version, name=self.unique(node.name or node.op_type.lower())
        )
        runtime: list[Any] = []
        for position, (value, arg) in enumerate(zip(values, [*args, *captured], strict=True)):
            if arg is None:
                continue
            if isinstance(arg, list):
                layer.sequences.append(position)
                layer.positions.extend([position] * len(arg))
                runtime.extend(arg)
            elif isinstance(arg, Const):
                if arg.kind is not None:
                    layer.constants[position] = self.variable(value, arg.array, arg.kind)
                else:
                    layer.constants[position] = arg.array
            else:
                layer.positions.append(position)
                runtime.append(arg)
        layer.arity = len(values)
        for position, value in enumerate(values):
            dtype = _spec(self, value)[1] if value is not None else None
            if emulated(dtype) and position in layer.positions:
                layer.input_dtypes[position] = dtype
        if not runtime:  # nothing flows in (random ops, sources): anchor it to the first input
            layer.anchored = True
            runtime = [self.inputs[0]]
        outputs = layer(*runtime)
        return layer.group(list(outputs) if isinstance(outputs, (list, tuple)) else [outputs])

    def runtime(self, value: Any) -> Any:
        """A KerasTensor for a value (a constant becomes a layer output when it must flow)."""
        if not isinstance(value, Const):
            return value
        node = ir.Node("", "Identity", [value.value], num_outputs=1)
        node.outputs[0].shape, node.outputs[0].dtype = value.value.shape, value.value.dtype
        if value.value.shape is None:
            node.outputs[0].shape = ir.Shape(value.array.shape)
        if value.value.dtype is None:
            node.outputs[0].dtype = ir.DataType.from_numpy(value.array.dtype)
        return self.generic_op(node, [value], [])[0]


def _spec(emitter: KerasEmitter, value: ir.Value, shape: Any = None) -> tuple[Any, Any]:
    inferred_shape, inferred_dtype = emitter.inferred.get(value.name, (None, None))
    if shape is None:
        shape = _dims(value.shape) if value.shape is not None else inferred_shape
    return shape, _dtype_name(value) or inferred_dtype


def _permuted_shape(value: ir.Value, perm: tuple[int, ...]) -> Any:
    if value.shape is None:
        return None
    dims = _dims(value.shape)
    inverse = np.argsort(perm)
    return tuple(dims[i] for i in inverse)


def _dims(shape: Any) -> tuple[Any, ...]:
    return tuple(d if isinstance(d, int) else None for d in shape)


def _dtype_name(value: ir.Value) -> str | None:
    return None if value.dtype is None else np.dtype(value.dtype.numpy()).name


# the torch backend keeps variables in torch ParameterDicts, whose keys cannot hold "."
_TORCH = keras.backend.backend() == "torch"


def _layer_name(name: str) -> str:
    name = re.sub(r"[^\w.\-]", "_", name) or "layer"
    return name.replace(".", "_") if _TORCH else name


def _variable_name(name: str) -> str:
    name = name.replace("/", "|")  # keras names exclude "/"
    return name.replace(".", "_") if _TORCH else name


def _infer_missing_shapes(emitter: KerasEmitter) -> None:
    """ONNX shape inference when some node output has no type (kept aside: the model is not touched)."""
    missing = any(
        v.shape is None or v.dtype is None for node in emitter.graph for v in node.outputs if v.name
    )
    if not missing or emitter.model is None:
        return
    import onnx

    proto = ir.serde.serialize_model(emitter.model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # inference is a help only; the layers fall back on their own
        return
    known = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        known[info.name] = info
    for node in emitter.graph:
        for value in node.outputs:
            info = known.get(value.name)
            if info is None or not info.type.HasField("tensor_type"):
                continue
            tensor_type = info.type.tensor_type
            dtype = (
                np.dtype(ir.DataType(tensor_type.elem_type).numpy()).name
                if tensor_type.elem_type
                else None
            )
            dims = (
                tuple(
                    d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
                )
                if tensor_type.HasField("shape")
                else None
            )
            emitter.inferred[value.name] = (dims, dtype)


def to_keras_model(source: Any, *, normalized: bool = False) -> keras.Model:
    """Emit a graph as a trainable Keras functional model (called by `interop.to_keras`)."""
    return KerasEmitter(source, normalized=normalized).build()
