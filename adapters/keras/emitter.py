"""IR graph -> trainable Keras functional ``keras.Model`` on whichever Keras backend is active.

The emit loop is `interop.interpret.Interpreter`; `KerasEmitter` overrides its steps to
build a functional graph of ``KerasTensor``s: graph inputs become ``keras.Input`` (symbolic
dims -> None), weighted ops with constant weights become Keras layers (``native_layers``:
Dense, ConvND(Transpose), BatchNormalization, LayerNormalization, Embedding, Dropout,
LSTM/GRU) and every other node one `OnnxOp` layer calling its ONNX semantics with the
``keras.ops`` backend. Nodes whose inputs are all constants are evaluated here.

Sequences: a sequence value of statically known length is a Python list of KerasTensors
(or `Const`s) between layers. SequenceConstruct / SequenceEmpty / SequenceLength and
SequenceAt / SequenceInsert / SequenceErase at constant positions are list operations at
emission (no layer); a layer reading a sequence takes its elements, one producing one
(SplitToSequence with a constant split, SequenceMap) returns them one by one (see
`generic.OnnxOp.layout`). A sequence whose length is only known at run time (a run-time
split, a Loop's) makes the graph the interpreted `GraphModel`, as sequence inputs and
outputs of the graph do.

Layout: values keep ONNX's (the source's) layout; native convolution / pooling /
normalization layers run channels-last between two permutations, and `transpose`
cancels a permutation against the one that produced its input, so consecutive
channels-last layers (and a Keras source's own Transpose pairs) meet without transposes.

>>> model = to_keras_model(graph)                  # doctest: +SKIP
>>> model.source_names["blocks.0.conv/kernel"]     # doctest: +SKIP
'blocks.0.conv.weight'
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import onnx_ir as ir

from interop import provenance
from interop.errors import EmitError
from interop.interpret import (
    RANDOM_OPS,
    Interpreter,
    fold_on_host,
    node_free_values,
)
from interop.normalize import check_supported

from .backend import emulated, keras_backend, keras_dtype
from .generic import sequence_function
from .interpreted import graph_model, needs_graph_model
from .native_layers import (
    LAYERS,
    MAX_INPUTS,
    OnnxOp,
    Transpose,
    control_function,
    forget_initializers,
    op_class,
)

# ops applied elementwise: they commute with a permutation of their (same-layout) inputs
_ELEMENTWISE = {"Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "HardSigmoid", "HardSwish",
                "Softplus", "Gelu", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Clip", "Add", "Sub",
                "Mul", "Div", "Max", "Min", "Identity", "PRelu"}  # fmt: skip


class Const:
    """An initializer or folded constant; a layer that reads it decides what it becomes."""

    def __init__(self, value: ir.Value, array: np.ndarray, kind: str | None):
        self.value, self.array, self.kind = value, array, kind


class KerasEmitter(Interpreter):
    """Builds the functional graph and the layers of one emitted Keras model."""

    adapter = "keras"

    def __init__(self, source: Any, *, normalized: bool = False):
        super().__init__(source, keras_backend, normalized=normalized)
        self.static: dict[ir.Value, np.ndarray] = {}
        self.variables: dict[ir.Value, keras.Variable] = {}
        self.source_names: dict[str, str] = {}  # keras variable path -> source initializer
        self.origin: dict[int, tuple[Any, tuple[int, ...]]] = {}  # id(tensor) -> (source, perm)
        self._permuted: dict[tuple[int, tuple[int, ...]], Any] = {}
        self._names: set[str] = set()
        self.inputs: list[Any] = []
        self.fused: dict[ir.Node, list[Any]] = {}  # nodes a native layer already computes
        self.inferred: dict[str, tuple[Any, Any]] = {}  # value name -> (dims, dtype name)

    # ------------------------------------------------------------------ building
    def build(self) -> keras.Model:
        check_supported(self.graph, self.version, self.adapter)
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

    def constant(self, value: ir.Value) -> Any:
        array = value.const_value.numpy()
        kind = self.kind_of(value)
        if kind is None:
            self.static[value] = array
        return Const(value, array, kind)

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

    def weight(self, value: ir.Value | None) -> np.ndarray | None:
        """The initializer behind an input, if it may become a native layer's variable.

        A weight read through a constant-perm Transpose (a Keras source's HWIO kernel) counts:
        the layer holds it in the orientation it needs anyway.
        """
        source = self.source_value(value)
        if (
            source is None
            or source.const_value is None
            or source.name not in self.graph.initializers
        ):
            return None
        readers = [use for use in source.uses() if use.node.op_type not in ("Shape", "Size")]
        if self.kind_of(source) is None or len(readers) != 1 or source in self.graph.inputs:
            return None
        array = np.array(source.const_value.numpy())
        if source is not value:
            if len(value.uses()) != 1:
                return None
            perm = self.attributes(value.producer())[0].get("perm")
            array = np.transpose(array, perm)
        return array

    def source_value(self, value: ir.Value | None) -> ir.Value | None:
        """The initializer a value is, or is a Transpose of."""
        producer = value.producer() if value is not None else None
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and producer.inputs[0] is not None
        ):
            return producer.inputs[0]
        return value

    def variable(self, value: ir.Value, array: np.ndarray, kind: str) -> keras.Variable:
        """One Keras variable per source weight, named after it, shared by all its readers."""
        if value not in self.variables:
            name = _variable_name(value.name or "constant")
            self.variables[value] = variable = keras.Variable(
                array, name=name, trainable=kind == provenance.TRAINABLE, autocast=False
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

    def layer_name(self, node: ir.Node, sources: Sequence[ir.Value] = ()) -> str:
        """The common prefix of the weights' source names (``blocks.0.conv``), else the scope."""
        names = [self.source_value(v).name for v in sources if v is not None]
        prefixes = {name.rsplit(".", 1)[0] for name in names if "." in name}
        if not prefixes:  # Keras names: "conv/kernel"
            prefixes = {name.rsplit("/", 1)[0] for name in names if "/" in name}
        if len(prefixes) == 1:
            return self.unique(prefixes.pop())
        return self.unique(provenance.node_scope(node) or node.name or node.op_type.lower())

    def adopt(self, layer: keras.layers.Layer, sources: dict[str, ir.Value]) -> None:
        """Record the source name of each variable of a freshly called native layer."""
        forget_initializers(layer)
        for attribute, value in sources.items():
            variable = getattr(layer, attribute)
            self.source_names[variable.path] = self.source_value(value).name

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
    def run_node(
        self, node: ir.Node, args: list[Any], env: Any, caller: Any = None
    ) -> Sequence[Any]:
        if caller is not None:
            return super().run_node(node, args, env, caller)
        if node in self.fused:
            return self.fused.pop(node)
        folded = self.fold(node)
        if folded is not None:
            return folded
        if node.domain in ("", "ai.onnx") and node.op_type in _SEQUENCE_STEPS:
            if node.op_type in _SEQUENCE_READERS and not isinstance(args[0], list):
                raise NotImplementedError(f"{node.op_type} of a sequence not known as a list")
            listed = _SEQUENCE_STEPS[node.op_type](self, node, args)
            if listed is not None:
                return listed
        if node.op_type == "Transpose" and not isinstance(args[0], Const):
            rank = len(args[0].shape)
            perm = self.attributes(node)[0].get("perm") or list(range(rank))[::-1]
            return [self.transpose(args[0], perm)]
        builder = LAYERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if builder is not None:
            result = builder(self, node, args)
            if result is not None:
                return result
        captured = [env[v] for v in node_free_values(node)]
        if node.op_type in _ELEMENTWISE and not captured:
            permuted = self.elementwise_in_source_layout(node, args)
            if permuted is not None:
                return permuted
        return self.call_op(node, args, captured)

    def fold(self, node: ir.Node) -> list[Any] | None:
        """Evaluate a node of constants once, now; None when it depends on run-time values."""
        if node.op_type in RANDOM_OPS or node_free_values(node):
            return None
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in node.attributes.values()):  # fmt: skip
            return None
        inputs = [None if v is None else self.static.get(v) for v in node.inputs]
        first = node.inputs[0] if node.inputs else None
        if node.op_type in ("Shape", "Size") and inputs[0] is None:
            if first.const_value is not None:
                inputs[0] = first.const_value.numpy()  # a weight's shape is known now
            elif first.shape is not None and all(isinstance(d, int) for d in first.shape):
                inputs[0] = np.empty(tuple(first.shape), np.uint8)  # a static run-time shape
        if node.op_type == "CastLike" and inputs[0] is not None and inputs[1] is None:
            if node.inputs[1].dtype is not None:
                inputs[1] = np.zeros(0, node.inputs[1].dtype.numpy())
        if any(a is None and v is not None for a, v in zip(inputs, node.inputs, strict=True)):
            return None
        results = fold_on_host(self.graph, self.version, node, inputs)
        if results is None:
            return None
        self.static.update(zip(node.outputs, results))
        return [Const(value, result, None) for value, result in zip(node.outputs, results)]

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
        inner = self.call_op(node, sources, [], shapes=[_permuted_shape(node.outputs[0], perm)])
        return [self.transpose(inner[0], perm)]

    def call_op(
        self, node: ir.Node, args: list[Any], captured: list[Any], shapes: Any = None
    ) -> Sequence[Any]:
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
        if node.op_type in _SEQUENCE_MAKERS and node.domain in ("", "ai.onnx"):
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
        return self.call_op(node, [value], [])[0]


# ------------------------------------------------------------------ sequences as lists
def _position(arg: Any, length: int, default: int, *, end: bool = False) -> int | None:
    """A constant position, checked and counted from the front; None when known at run time."""
    if arg is None:
        return default
    if not isinstance(arg, Const) or arg.kind is not None:
        return None
    index = int(np.asarray(arg.array).reshape(-1)[0])
    limit = length + 1 if end else length  # SequenceInsert may append
    if not -length <= index < limit:
        raise IndexError(f"position {index} outside a sequence of {length}")
    return index + length if index < 0 else index


def _static(emitter: KerasEmitter, node: ir.Node, items: list[Any]) -> list[Any]:
    """A list result, remembered as host arrays when its elements are plain constants, so
    that nodes reading it fold."""
    if all(isinstance(i, Const) and i.kind is None for i in items):
        emitter.static[node.outputs[0]] = [i.array for i in items]
    return [items]


def _uniform(node: ir.Node, items: list[Any]) -> None:
    """A run-time position picks among elements of one shape and dtype only (a gather)."""
    specs = {
        (tuple(i.array.shape), str(i.array.dtype))
        if isinstance(i, Const)
        else (tuple(i.shape), str(i.dtype))
        for i in items
    }
    if len(specs) > 1:
        raise NotImplementedError(
            f"{node.op_type} at a run-time position among tensors of different shapes {specs}"
        )


def _construct(emitter, node, args):
    return _static(emitter, node, list(args))


def _empty(emitter, node, args):
    return [[]]


def _length(emitter, node, args):
    array = np.array(len(args[0]), np.int64)
    emitter.static[node.outputs[0]] = array
    return [Const(node.outputs[0], array, None)]


def _at(emitter, node, args):
    sequence = args[0]
    index = _position(args[1], len(sequence), 0)
    if index is None:
        _uniform(node, sequence)
        return None  # a layer gathers it (generic.sequence_function)
    return [sequence[index]]


def _insert(emitter, node, args):
    sequence, tensor = args[0], args[1]
    index = _position(args[2] if len(args) > 2 else None, len(sequence), len(sequence), end=True)
    if index is None:
        _uniform(node, [*sequence, tensor])
        return None
    return _static(emitter, node, [*sequence[:index], tensor, *sequence[index:]])


def _erase(emitter, node, args):
    sequence = args[0]
    index = _position(args[1] if len(args) > 1 else None, len(sequence), len(sequence) - 1)
    if index is None:
        _uniform(node, sequence)
        return None
    return _static(emitter, node, [*sequence[:index], *sequence[index + 1 :]])


def _identity(emitter, node, args):
    return _static(emitter, node, list(args[0])) if isinstance(args[0], list) else None


def _split(emitter, node, args):
    split = args[1] if len(args) > 1 else None
    if split is not None and not (isinstance(split, Const) and split.kind is None):
        raise NotImplementedError("SplitToSequence with a run-time split: a run-time length")
    return None  # one layer, whose outputs are the chunks


# ops whose first input is a sequence
_SEQUENCE_READERS = frozenset({"SequenceAt", "SequenceInsert", "SequenceErase", "SequenceLength"})
# ops whose outputs are all sequences, made by a layer
_SEQUENCE_MAKERS = frozenset({"SplitToSequence", "SequenceInsert", "SequenceErase", "SequenceMap"})

_SEQUENCE_STEPS = {"SequenceConstruct": _construct, "SequenceEmpty": _empty,
                   "SequenceLength": _length, "SequenceAt": _at, "SequenceInsert": _insert,
                   "SequenceErase": _erase, "Identity": _identity,
                   "SplitToSequence": _split}  # fmt: skip


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
