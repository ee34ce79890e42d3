"""The generic layer of emitted Keras models: one ONNX node run through its semantics.

`OnnxOp` calls the node's ONNX semantics with the ``keras.ops`` backend; `Transpose` is the
layout change between layers; `control_function` makes If / Loop / Scan ``keras.ops.cond`` /
``while_loop`` / ``scan`` when traced.
An ONNX sequence of statically known length flows between layers as a Python list of
KerasTensors: a layer reading one takes its elements as run-time inputs and hands the
semantics the list; a layer producing one returns its elements as separate outputs
(``layout`` records which outputs form which sequence). `sequence_function` makes
SequenceAt / SequenceInsert / SequenceErase with a run-time position a gather on the
stacked elements, so they trace.
Values of ONNX dtypes Keras lacks (int4, float8 fnuz...) travel between layers in a carrier
dtype (``backend.CARRIERS``); a node reading or writing one runs on the host with numpy's
(ml_dtypes') rules, the reference semantics, and hands carriers on.
"""

from __future__ import annotations

import base64
import functools
import logging
from typing import Any

import keras
import numpy as np
import onnx_ir as ir
from keras import ops

from interop.emitter import loop_condition_holds
from interop.errors import InteropError
from interop.interpret import SubgraphFunction, node_free_values

from .backend import as_dtype, emulated, from_carrier, keras_backend, keras_dtype, to_carrier


class Const:
    """An initializer or folded constant; a layer that reads it decides what it becomes."""

    def __init__(self, value: ir.Value, array: np.ndarray, kind: str | None):
        self.value, self.array, self.kind = value, array, kind


def interop_errors_as_raised(call):
    """A layer call whose interop errors reach the caller as they were raised.

    Keras rebuilds an error escaping a layer call as ``type(err)(message + the call's
    arguments)``; UnsupportedOpError's first parameter is the op, not a message, so the rebuilt
    error read "No import converter for op 'Exception encountered when calling ...'". Marked as
    already annotated, Keras re-raises it untouched.
    """

    @functools.wraps(call)
    def wrapped(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except InteropError as err:
            err._keras_call_info_injected = True  # type: ignore[attr-defined]
            raise

    return wrapped


@keras.saving.register_keras_serializable("interop")
class Transpose(keras.layers.Layer):
    """A permutation of all axes (batch included), the layout change between layers."""

    def __init__(self, perm, **kwargs):
        super().__init__(**kwargs)
        self.perm = tuple(int(p) for p in perm)
        # a permutation keeps its input's dtype (Keras would cast floats to the layer policy:
        # a float64 / float16 tensor came out float32); a host array (a constant mask) is
        # transposed as it is
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    def call(self, x):
        return ops.transpose(x, self.perm)

    def compute_output_shape(self, shape):
        return tuple(shape[p] for p in self.perm)

    def get_config(self):
        return {**super().get_config(), "perm": list(self.perm)}


class OnnxOp(keras.layers.Layer):
    """One ONNX node run through its semantics with the ``keras.ops`` backend.

    Constants live in the layer: source weights as (shared) Keras variables, other
    constants as host arrays; ``positions`` say where the run-time inputs go.
    """

    def __init__(self, function, node, specs, version=None, **kwargs):
        super().__init__(**kwargs)
        self.function, self.op_type, self.specs = function, node.op_type, specs
        self.node, self.version = node, version
        self.constants: dict[int, Any] = {}
        self.positions: list[int] = []
        self.arity, self.anchored, self.exposed = 0, False, False
        self.sequences: list[int] = []  # positions taking a sequence (their inputs, in order)
        # per node output: None for a tensor, the (shape, dtype) of each element for a sequence
        self.layout: list[Any] = [None] * len(specs)
        self.input_dtypes: dict[int, str] = {}  # ONNX dtypes of the carrier inputs, by position
        # ONNX fixes the dtypes: no autocasting of inputs to the layer's float policy
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    def emulates(self) -> bool:
        """Whether the node reads or writes a dtype Keras lacks (it runs on the host)."""
        return bool(self.input_dtypes) or any(emulated(d) for _, d in self.specs)

    @interop_errors_as_raised
    def run(self, inputs):
        if self.emulates():
            return self.run_on_host(inputs)
        args = self.arguments(
            inputs, lambda c: c.value if isinstance(c, keras.Variable) else c, lambda _, t: t
        )
        results = self.flatten(self.function(*args))
        if self.exposed:  # a model output: host values (shape arithmetic) become tensors
            results = [
                ops.convert_to_tensor(r) if isinstance(r, np.ndarray) else r for r in results
            ]
        return results[0] if len(results) == 1 else results

    def run_on_host(self, inputs):
        """The node on numpy (ml_dtypes' rounding, saturation and wrapping: the reference's),
        its carrier inputs back in their ONNX dtype; results handed on as carriers."""
        if not all(keras_backend.is_concrete(t) for t in inputs):
            raise NotImplementedError(
                f"{self.op_type}: dtypes Keras lacks ({self.input_dtypes or self.specs}) are "
                "emulated on the host, which needs eager execution"
            )
        args = self.arguments(
            inputs,
            lambda c: keras_backend.to_numpy(c.value if isinstance(c, keras.Variable) else c),
            lambda position, t: from_carrier(t, self.input_dtypes.get(position)),
        )
        results = [ops.convert_to_tensor(to_carrier(r)) for r in self.flatten(self.function(*args))]
        return results[0] if len(results) == 1 else results

    def arguments(self, inputs, constant, tensor):
        """The node's inputs in ONNX order: constants (through ``constant``), run-time inputs
        (through ``tensor(position, value)``), a sequence's elements gathered into a list."""
        args: list[Any] = [None] * self.arity
        for position, value in self.constants.items():
            args[position] = constant(value)
        for position in self.sequences:
            args[position] = []
        if not self.anchored:
            for position, value in zip(self.positions, inputs):
                if position in self.sequences:
                    args[position].append(tensor(position, value))
                else:
                    args[position] = tensor(position, value)
        return args

    def flatten(self, results):
        """The node's results as the layer's outputs: a sequence's elements one by one."""
        flat = []
        for result, elements in zip(results, self.layout):
            if elements is None:
                flat.append(ops.zeros((0,)) if result is None else result)  # an omitted output
            elif isinstance(result, (list, tuple)) and len(result) == len(elements):
                flat.extend(result)
            else:
                got = len(result) if isinstance(result, (list, tuple)) else "a tensor"
                raise ValueError(
                    f"{self.op_type} '{self.name}': built for a sequence of {len(elements)} "
                    f"tensors, got {got}"
                )
        return flat

    def group(self, outputs):
        """The layer's outputs as the node's: a sequence's elements back in one list."""
        grouped, start = [], 0
        for elements in self.layout:
            count = 1 if elements is None else len(elements)
            chunk = list(outputs[start : start + count])
            grouped.append(chunk[0] if elements is None else chunk)
            start += count
        return grouped

    def get_config(self):
        """The node as ONNX bytes (subgraphs included), its constants and wiring; variables are
        saved as weights."""
        proto = ir.serde.serialize_node(self.node)
        constants, variables = {}, {}
        for position, constant in self.constants.items():
            if isinstance(constant, keras.Variable):
                variables[str(position)] = [constant.name, list(constant.shape), constant.dtype,
                                            constant.trainable]  # fmt: skip
            else:
                constants[str(position)] = [constant.tolist(), constant.dtype.str]
        return {
            **super().get_config(),
            "node": base64.b64encode(proto.SerializeToString()).decode(),
            "version": self.version,
            "specs": [[None if s is None else list(s), d] for s, d in self.specs],
            "positions": self.positions, "arity": self.arity, "anchored": self.anchored,
            "exposed": self.exposed, "constants": constants, "variables": variables,
            "input_dtypes": {str(k): v for k, v in self.input_dtypes.items()},
            "sequences": self.sequences,
            "outer": [v.name for v in node_free_values(self.node)],
            "layout": [None if e is None else [[None if s is None else list(s), d] for s, d in e]
                       for e in self.layout],
        }  # fmt: skip

    @classmethod
    def from_config(cls, config):
        import onnx

        from interop.interpret import Interpreter

        config = dict(config)
        proto = onnx.NodeProto.FromString(base64.b64decode(config.pop("node")))
        node = _deserialized(proto, config.pop("outer", []))
        version = config.pop("version")
        interpreter = Interpreter(ir.Graph([], [], nodes=[]), keras_backend, version=version)
        specs = [(None if s is None else tuple(s), d) for s, d in config.pop("specs")]
        wiring = {k: config.pop(k) for k in ("positions", "arity", "anchored", "exposed")}
        wiring["input_dtypes"] = {int(k): v for k, v in config.pop("input_dtypes", {}).items()}
        wiring["sequences"] = list(config.pop("sequences", []))
        wiring["layout"] = [
            None if e is None else [(None if s is None else tuple(s), d) for s, d in e]
            for e in config.pop("layout", [None] * len(specs))
        ]
        constants, variables = config.pop("constants"), config.pop("variables")
        function = (
            sequence_function(node)
            or control_function(interpreter, node)  # If/Loop/Scan: host control flow again
            or interpreter.op_function(node)
        )
        layer = cls(function, node, specs, version, **config)
        for key, value in wiring.items():
            setattr(layer, key, value)
        for position, (values, dtype) in constants.items():
            layer.constants[int(position)] = np.asarray(values, np.dtype(dtype))
        for position, (name, shape, dtype, trainable) in variables.items():
            layer.constants[int(position)] = keras.Variable(
                np.zeros(shape, dtype), name=name, trainable=trainable, autocast=False
            )
        return layer

    def spec(self, inputs):
        specs = self.specs
        if any(shape is None for shape, _ in specs):
            specs = self._evaluated_specs(inputs)
        flat = []
        for spec, elements in zip(specs, self.layout):
            flat.extend([spec] if elements is None else elements)
        if not flat:
            raise NotImplementedError(f"{self.op_type}: only empty sequences out (no tensor)")
        tensors = [
            keras.KerasTensor(shape, dtype=keras_dtype(dtype or "float32")) for shape, dtype in flat
        ]
        return tensors[0] if len(tensors) == 1 else tensors

    def _evaluated_specs(self, inputs):
        """Output shapes by running the op on host arrays, twice, to tell dynamic dims apart.

        A sequence output must have the same length in both runs (a length that follows a
        dynamic dim cannot be a fixed set of layer outputs); its elements' specs go to
        ``layout``.
        """
        runs = []
        for size in (2, 3):

            def dummy(position, tensor, size=size):
                shape = tuple(size if d is None else d for d in tensor.shape)
                dtype = self.input_dtypes.get(position) or tensor.dtype
                return np.zeros(shape, as_dtype(dtype))

            args = self.arguments(inputs, lambda c: np.asarray(ops.convert_to_numpy(c)), dummy)
            runs.append(list(self.function(*args)))
        specs = []
        for index, (spec, first, second) in enumerate(zip(self.specs, *runs)):
            shape, dtype = spec
            if isinstance(first, (list, tuple)):
                if self.op_type not in SEQUENCE_OUTPUTS:
                    raise NotImplementedError(
                        f"{self.op_type}: a sequence output, whose length may change at run time"
                    )
                if not isinstance(second, (list, tuple)) or len(first) != len(second):
                    raise NotImplementedError(
                        f"{self.op_type}: the length of its output sequence follows a dynamic dim"
                    )
                self.layout[index] = [
                    (_merged(a, b), dtype or _dtype(a)) for a, b in zip(first, second)
                ]
            elif shape is None:
                shape = _merged(first, second)
            specs.append((shape, dtype))
        return specs


def _merged(first, second) -> tuple:
    """The shape of two runs' results, None where they differ (a dynamic dim)."""
    return tuple(a if a == b else None for a, b in zip(np.shape(first), np.shape(second)))


def _dtype(value) -> str:
    return keras.backend.standardize_dtype(getattr(value, "dtype", np.asarray(value).dtype))


# ops whose output sequences have a length fixed by their inputs' shapes and constants (the
# emitter checks that SplitToSequence's split is constant); others (Loop, If...) fall back
# on the interpreted model
SEQUENCE_OUTPUTS = frozenset(
    {"SplitToSequence", "SequenceMap", "SequenceInsert", "SequenceErase", "SequenceConstruct",
     "Identity"}
)  # fmt: skip


def _deserialized(proto, outer: list[str]) -> ir.Node:
    """A saved node back, inside a one-node graph whose inputs are the node's inputs and the
    outer values its subgraphs read: each name is then one value, shared by every branch."""
    import onnx

    names = list(dict.fromkeys([*[n for n in proto.input if n], *outer]))
    graph = onnx.helper.make_graph(
        [proto], "saved_node", [onnx.ValueInfoProto(name=n) for n in names], []
    )
    logger = logging.getLogger(ir.serde.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)  # untyped inputs and no outputs: warned about, as meant
    try:
        return ir.serde.deserialize_graph(graph).node(0)
    finally:
        logger.setLevel(level)


# Keras rejects a nested call argument mixing tensors and host arrays, and host arrays must
# flow (shape arithmetic cannot leave the host under jit): one named parameter per input,
# in a subclass per input count (Keras binds every declared parameter on every call)
MAX_INPUTS = 64


@functools.lru_cache(maxsize=MAX_INPUTS)
def op_class(count: int) -> type:
    """The OnnxOp subclass whose ``call`` takes exactly ``count`` run-time inputs."""
    names = [f"x{i}" for i in range(count)]
    source = (
        f"def call(self, {', '.join(names)}):\n"
        f"    return self.run(({', '.join(names)},))\n"
        f"def compute_output_spec(self, {', '.join(names)}):\n"
        f"    return self.spec(({', '.join(names)},))\n"
    )
    namespace: dict[str, Any] = {}
    exec(source, namespace)  # noqa: S102  (a fixed signature of generated parameter names)
    cls = type(f"OnnxOp{count}", (OnnxOp,), {"call": namespace["call"],
               "compute_output_spec": namespace["compute_output_spec"]})  # fmt: skip
    return keras.saving.register_keras_serializable("interop")(cls)


for _count in range(1, MAX_INPUTS + 1):  # registered up front, so that a saved model loads
    op_class(_count)


def control_function(emitter, node) -> Any:
    """If / Loop / Scan as ``keras.ops`` control flow when their operands are only known at run
    time (jit, tf.function); eager (concrete) values keep the Python loop of the semantics."""
    if node.domain not in ("", "ai.onnx"):
        return None
    builder = {"If": _if, "Loop": _loop, "Scan": _scan}.get(node.op_type)
    return None if builder is None else builder(emitter, node)


def _subgraph(emitter, node, name, captured):
    outer = node_free_values(node)
    graph = node.attributes[name].value
    return SubgraphFunction(graph, keras_backend, dict(zip(outer, captured)), emitter.version)


def _tensors(values):
    return tuple(ops.convert_to_tensor(v) for v in values)


def _if(emitter, node):
    """If as ``keras.ops.cond`` when its condition is traced."""
    eager = emitter.op_function(node)

    def branch(name, captured):
        return _tensors(_subgraph(emitter, node, name, captured)())

    def run_if(condition, *captured):
        if _concrete(condition):  # eager: run the taken branch only, whatever its shapes
            return eager(condition, *captured)
        flag = ops.reshape(ops.cast(condition, "bool"), ())
        taken = ops.cond(
            flag, lambda: branch("then_branch", captured), lambda: branch("else_branch", captured)
        )
        return tuple(taken)

    return run_if


def _loop(emitter, node):
    """Loop without scan outputs as ``keras.ops.while_loop`` when an operand is traced (a
    data-dependent condition cannot be read on the host there); loop-carried values keep
    their shapes and dtypes, as a while loop requires."""
    eager = emitter.op_function(node)
    carried = len(node.inputs) - 2
    body_graph = node.attributes["body"].value
    if len(body_graph.outputs) != 1 + carried:
        # scan outputs: keras.ops.scan when the loop runs its whole trip count, else their
        # length grows with the data and the Python loop runs
        return _scan_loop(emitter, node, eager) if loop_condition_holds(body_graph) else eager

    def run_loop(trip_count, condition, *rest):
        initial, captured = rest[:carried], rest[carried:]
        if all(_concrete(v) for v in (trip_count, condition, *rest) if v is not None):
            return eager(trip_count, condition, *rest)
        body = _subgraph(emitter, node, "body", captured)
        limit = None if trip_count is None else ops.reshape(ops.cast(trip_count, "int64"), ())
        keep = (
            ops.convert_to_tensor(True)
            if condition is None
            else ops.reshape(ops.cast(condition, "bool"), ())
        )
        state = _tensors(initial)

        def going(iteration, keep, *state):
            return keep if limit is None else ops.logical_and(keep, ops.less(iteration, limit))

        def step(iteration, keep, *state):
            outputs = body(iteration, keep, *state)
            new = [ops.cast(o, ops.dtype(s)) for o, s in zip(_tensors(outputs[1:]), state)]
            return (iteration + 1, ops.reshape(ops.cast(outputs[0], "bool"), ()), *new)

        start = ops.convert_to_tensor(np.array(0, np.int64))
        results = ops.while_loop(going, step, (start, keep, *state))
        return tuple(results[2:])

    return run_loop


def _scan_loop(emitter, node, eager):
    """A Loop that runs its whole (host-known) trip count, with scan outputs, as one
    ``keras.ops.scan`` over the iteration counter when an operand is traced."""
    carried = len(node.inputs) - 2

    def run_loop(trip_count, condition, *rest):
        initial, captured = rest[:carried], rest[carried:]
        values = (trip_count, condition, *rest)
        if all(_concrete(v) for v in values if v is not None):
            return eager(*values)
        if trip_count is None or not all(_concrete(v) for v in (trip_count, condition)):
            return eager(*values)  # no length known before running
        if condition is not None and not bool(keras_backend.to_numpy(condition).reshape(())):
            return eager(*values)  # runs no iteration
        length = int(keras_backend.to_numpy(trip_count).reshape(()))
        body = _subgraph(emitter, node, "body", captured)
        go = ops.convert_to_tensor(True)

        def step(state, iteration):
            outputs = _tensors(body(iteration, go, *state))
            new = [ops.cast(o, ops.dtype(s)) for o, s in zip(outputs[1 : 1 + carried], state)]
            return tuple(new), tuple(outputs[1 + carried :])

        counter = ops.convert_to_tensor(np.arange(length, dtype=np.int64))
        state, stacked = ops.scan(step, _tensors(initial), counter, length=length)
        return (*state, *stacked)

    return run_loop


def _scan(emitter, node):
    """Scan as ``keras.ops.scan`` when an operand is traced: scan axes moved to the front,
    reversed directions flipped, so one forward scan serves every input and output."""
    eager = emitter.op_function(node)
    attributes = emitter.attributes(node)[0]
    count = len(node.inputs)
    sequences = int(attributes["num_scan_inputs"])
    carried = count - sequences
    outputs = len(node.attributes["body"].value.outputs) - carried
    in_axes = list(attributes.get("scan_input_axes") or [0] * sequences)
    in_directions = list(attributes.get("scan_input_directions") or [0] * sequences)
    out_axes = list(attributes.get("scan_output_axes") or [0] * outputs)
    out_directions = list(attributes.get("scan_output_directions") or [0] * outputs)

    def run_scan(*args):
        inputs, captured = args[:count], args[count:]
        if all(_concrete(v) for v in args if v is not None):
            return eager(*args)
        body = _subgraph(emitter, node, "body", captured)
        xs = []
        for value, axis, direction in zip(_tensors(inputs[carried:]), in_axes, in_directions):
            value = ops.moveaxis(value, axis, 0)
            xs.append(ops.flip(value, 0) if direction else value)

        def step(state, x):
            results = body(*state, *x)
            new = [ops.cast(o, ops.dtype(s)) for o, s in zip(_tensors(results[:carried]), state)]
            return tuple(new), _tensors(results[carried:])

        state, ys = ops.scan(step, _tensors(inputs[:carried]), tuple(xs))
        stacked = []
        for y, axis, direction in zip(ys, out_axes, out_directions):
            y = ops.flip(y, 0) if direction else y
            stacked.append(ops.moveaxis(y, 0, axis if axis >= 0 else axis + len(y.shape)))
        return (*state, *stacked)

    return run_scan


def _concrete(value) -> bool:
    try:
        keras_backend.to_numpy(value)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------ sequences, run-time positions
def sequence_function(node) -> Any:
    """SequenceAt / SequenceInsert / SequenceErase as a gather on the stacked elements (all of
    one shape: the emitter checks), so that a run-time position needs no host read (the
    semantics' ``int(position)``) and the node traces under ``tf.function`` / ``jax.jit``;
    None for other nodes. The sequence's length is static (the layer's run-time inputs)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return {"SequenceAt": _sequence_at, "SequenceInsert": _sequence_insert,
            "SequenceErase": _sequence_erase}.get(node.op_type)  # fmt: skip


def _index(position, length: int, default: int):
    """A position as a scalar int32 tensor in [0, length] (ONNX counts negatives from the end)."""
    if position is None:
        return ops.convert_to_tensor(np.int32(default))
    index = ops.reshape(ops.cast(ops.convert_to_tensor(position), "int32"), ())
    return ops.where(index < 0, index + length, index)


def _pick(stacked, indices):
    return [ops.take(stacked, index, axis=0) for index in indices]


def _sequence_at(sequence, position):
    return (_pick(ops.stack(sequence), [_index(position, len(sequence), 0)])[0],)


def _sequence_erase(sequence, position=None):
    length = len(sequence)
    index = _index(position, length, length - 1)
    # element i of the result is element i of the input before the erased one, i + 1 after
    sources = [ops.where(i < index, i, i + 1) for i in range(length - 1)]
    return (_pick(ops.stack(sequence), sources) if length > 1 else [],)


def _sequence_insert(sequence, tensor, position=None):
    length = len(sequence)
    index = _index(position, length, length)
    # the new tensor is stacked last (at `length`); element i of the result is element i
    # of the input before the insertion point, the new tensor at it, element i - 1 after
    sources = [
        ops.where(i < index, i, ops.where(i == index, length, i - 1)) for i in range(length + 1)
    ]
    return (_pick(ops.stack([*sequence, tensor]), sources),)
