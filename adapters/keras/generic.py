"""The generic layer of emitted Keras models: one ONNX node run through its semantics.

`OnnxOp` calls the node's ONNX semantics with the ``keras.ops`` backend; `Transpose` is the
layout change between layers; `control_function` makes If / Loop / Scan ``keras.ops.cond`` /
``while_loop`` / ``scan`` when traced.
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

from interop.interpret import SubgraphFunction, node_free_values

from .backend import as_dtype, emulated, from_carrier, keras_backend, keras_dtype, to_carrier


@keras.saving.register_keras_serializable("interop")
class Transpose(keras.layers.Layer):
    """A permutation of all axes (batch included), the layout change between layers."""

    def __init__(self, perm, **kwargs):
        super().__init__(**kwargs)
        self.perm = tuple(int(p) for p in perm)

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
        self.input_dtypes: dict[int, str] = {}  # ONNX dtypes of the carrier inputs, by position
        # ONNX fixes the dtypes: no autocasting of inputs to the layer's float policy
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True

    def emulates(self) -> bool:
        """Whether the node reads or writes a dtype Keras lacks (it runs on the host)."""
        return bool(self.input_dtypes) or any(emulated(d) for _, d in self.specs)

    def run(self, inputs):
        if self.emulates():
            return self.run_on_host(inputs)
        args: list[Any] = [None] * self.arity
        for position, constant in self.constants.items():
            args[position] = constant.value if isinstance(constant, keras.Variable) else constant
        if not self.anchored:
            for position, tensor in zip(self.positions, inputs):
                args[position] = tensor
        results = [
            ops.zeros((0,)) if r is None else r for r in self.function(*args)
        ]  # an optional output ONNX leaves empty
        if self.exposed:  # a model output: host values (shape arithmetic) become tensors
            results = [
                ops.convert_to_tensor(r) if isinstance(r, np.ndarray) else r for r in results
            ]
        return results[0] if len(self.specs) == 1 else results

    def run_on_host(self, inputs):
        """The node on numpy (ml_dtypes' rounding, saturation and wrapping: the reference's),
        its carrier inputs back in their ONNX dtype; results handed on as carriers."""
        if not all(keras_backend.is_concrete(t) for t in inputs):
            raise NotImplementedError(
                f"{self.op_type}: dtypes Keras lacks ({self.input_dtypes or self.specs}) are "
                "emulated on the host, which needs eager execution"
            )
        args: list[Any] = [None] * self.arity
        for position, constant in self.constants.items():
            args[position] = keras_backend.to_numpy(
                constant.value if isinstance(constant, keras.Variable) else constant
            )
        if not self.anchored:
            for position, tensor in zip(self.positions, inputs):
                args[position] = from_carrier(tensor, self.input_dtypes.get(position))
        results = [
            ops.zeros((0,)) if r is None else ops.convert_to_tensor(to_carrier(r))
            for r in self.function(*args)
        ]
        return results[0] if len(self.specs) == 1 else results

    def get_config(self):
        """The node as ONNX bytes, its constants and wiring; variables are saved as weights."""
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for a in self.node.attributes.values()):  # fmt: skip
            raise NotImplementedError(f"saving a {self.op_type} node (subgraphs) is not supported")
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
        }  # fmt: skip

    @classmethod
    def from_config(cls, config):
        import onnx

        from interop.interpret import Interpreter

        config = dict(config)
        proto = onnx.NodeProto.FromString(base64.b64decode(config.pop("node")))
        # a lone node's inputs are outside any graph: onnx_ir warns, and creates them as it should
        logger = logging.getLogger(ir.serde.__name__)
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            node = ir.serde.deserialize_node(proto)
        finally:
            logger.setLevel(level)
        version = config.pop("version")
        interpreter = Interpreter(ir.Graph([], [], nodes=[]), keras_backend, version=version)
        specs = [(None if s is None else tuple(s), d) for s, d in config.pop("specs")]
        wiring = {k: config.pop(k) for k in ("positions", "arity", "anchored", "exposed")}
        wiring["input_dtypes"] = {int(k): v for k, v in config.pop("input_dtypes", {}).items()}
        constants, variables = config.pop("constants"), config.pop("variables")
        layer = cls(interpreter.op_function(node), node, specs, version, **config)
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
        tensors = [
            keras.KerasTensor(shape, dtype=keras_dtype(dtype or "float32"))
            for shape, dtype in specs
        ]
        return tensors[0] if len(tensors) == 1 else tensors

    def _evaluated_specs(self, inputs):
        """Output shapes by running the op on host arrays, twice, to tell dynamic dims apart."""
        runs = []
        for size in (2, 3):
            args: list[Any] = [None] * self.arity
            for position, constant in self.constants.items():
                args[position] = np.asarray(keras.ops.convert_to_numpy(constant))
            for position, tensor in zip(self.positions, inputs):
                shape = tuple(size if d is None else d for d in tensor.shape)
                dtype = self.input_dtypes.get(position) or tensor.dtype
                args[position] = np.zeros(shape, as_dtype(dtype))
            runs.append([np.shape(r) for r in self.function(*args)])
        specs = []
        for (shape, dtype), first, second in zip(self.specs, runs[0], runs[1]):
            if shape is None:
                shape = tuple(a if a == b else None for a, b in zip(first, second))
            specs.append((shape, dtype))
        return specs


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
    if len(body_graph.outputs) != 1 + carried:  # scan outputs grow per step: Python loop
        return eager

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
