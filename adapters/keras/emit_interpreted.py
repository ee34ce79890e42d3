"""Graphs a functional Keras model cannot hold: a subclassed ``keras.Model`` that runs them.

A functional model's inputs and outputs are tensors, and it needs at least one input. Graphs
with sequence or optional inputs or outputs (``Sequence(Tensor)``, ``Optional(...)``) or no
inputs at all are emitted as a `GraphModel` instead: its ``call`` runs the graph's ONNX
semantics with the ``keras.ops`` backend, node after node (the same functions the functional
model's `OnnxOp` layers call). A sequence is passed and returned as a Python list of tensors,
an empty optional as None. Source weights are Keras variables of the model (trainable or
not as in the source), so gradients and ``fit`` work as for the functional model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import onnx_ir as ir
from keras import ops

from interop.interpret import Interpreter, node_free_values

from .backend import emulated, from_carrier, keras_backend, to_carrier
from .emit_generic import interop_errors_as_raised


def needs_graph_model(graph: ir.Graph) -> bool:
    """Whether the graph has no inputs or a non-tensor (sequence, optional) input or output."""
    values = [*graph.inputs, *graph.outputs]
    return not graph.inputs or any(
        v.type is not None and not isinstance(v.type, ir.TensorType) for v in values
    )


class _Runner(Interpreter):
    """The graph on the keras backend; weights read from the model's variables."""

    def __init__(self, emitter: Any, variables: dict[str, keras.Variable]):
        source = emitter.model if emitter.model is not None else emitter.graph
        super().__init__(source, keras_backend, normalized=True, version=emitter.version)
        self.weights = variables

        # value -> the last node of the graph reading it (its sub-graphs' reads included):
        # dropped after that node, so a call holds the live values, not every intermediate
        # (each weight's Transpose, say) until it returns
        self.last_reads: dict[ir.Node, list[ir.Value]] = {}
        last: dict[ir.Value, ir.Node] = {}
        for node in self.graph:
            for value in [*node.inputs, *node_free_values(node)]:
                if value is not None:
                    last[value] = node
        outputs = set(self.graph.outputs)
        for value, node in last.items():
            if value not in outputs:
                self.last_reads.setdefault(node, []).append(value)

    def run_node(
        self, node: ir.Node, args: list[Any], env: Any, caller: Any = None
    ) -> Sequence[Any]:
        results = super().run_node(node, args, env, caller)
        if caller is None:
            for value in self.last_reads.get(node, ()):
                env.pop(value, None)
        return results

    def input(self, value: ir.Value, given: Any) -> Any:
        dtype = None if value.dtype is None else value.dtype.numpy()

        def one(x):
            # a dtype Keras lacks arrives in its carrier: back to the ONNX dtype on the host
            return from_carrier(x, dtype) if emulated(dtype) else keras_backend.asarray(x)

        if given is None:
            return None
        if isinstance(given, (list, tuple)):
            return [one(g) for g in given]
        return one(given)

    def constant(self, value: ir.Value) -> Any:
        if value.name in self.weights:
            return self.weights[value.name].value
        return value.const_value.numpy()


def _tensor(x: Any) -> Any:
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [_tensor(v) for v in x]
    return ops.convert_to_tensor(to_carrier(x)) if isinstance(x, np.ndarray) else x


class GraphModel(keras.Model):
    """A graph with sequence / optional values or without inputs, run node by node.

    ``model(x)`` for one graph input (a tensor, a list of tensors for a sequence, None for
    an empty optional), ``model([x, y, ...])`` for several; outputs likewise.
    """

    def __init__(self, emitter: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.graph_inputs = len(emitter.graph.inputs)
        weights: dict[str, keras.Variable] = {}
        for value in emitter.graph.initializers.values():
            kind = emitter.kind_of(value)
            if kind is not None and value.const_value is not None:
                # weight_array: a map of this tensor alone, released once copied (the
                # tensor's own numpy() keeps its pages for as long as the graph lives)
                weights[value.name] = emitter.variable(value, emitter.weight_array(value), kind)
        # a list attribute: Keras tracks the variables as the model's weights
        self.graph_weights = list(weights.values())
        self.runner = _Runner(emitter, weights)

    @interop_errors_as_raised
    def call(self, inputs: Any = None) -> Any:
        if self.graph_inputs == 1:
            inputs = [inputs]
        elif self.graph_inputs == 0:
            inputs = []
        outputs = [_tensor(o) for o in self.runner.run(*inputs)]
        return outputs[0] if len(outputs) == 1 else outputs


def graph_model(emitter: Any, name: str) -> GraphModel:
    """The emitter's graph as a `GraphModel` (see the module docstring)."""
    model = GraphModel(emitter, name=name)
    model.source_names = dict(emitter.source_names)
    return model
