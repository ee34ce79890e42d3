"""The interpreter: walk a normalized ONNX graph and evaluate every node with a backend.

`Interpreter` has the torch.fx Interpreter shape: `run` feeds the graph inputs,
`run_graph` walks the nodes, `run_node` calls the node's semantics (`call_op`), and a
failure is re-raised as `EmitError` "while emitting <node> (<op>)". Run as is, it is the
reference evaluator of any backend (numpy by default). Emitters build on it through
`interop.emitter.Emitter`, which adds the dispatch to native layers and folding.

Models are normalized on entry (`interop.normalize`: ONNX semantics at `TARGET_OPSET`).
Ops without semantics but with an ONNX function body (Attention, Gelu,
SoftmaxCrossEntropyLoss, ...) run as that body (`FunctionBody`).

>>> import numpy as np, onnx
>>> from onnx import helper, TensorProto
>>> node = helper.make_node("Relu", ["x"], ["y"])
>>> graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
...                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
>>> evaluate(helper.make_model(graph), np.array([-1.0, 1.0], np.float32))[0].tolist()
[0.0, 1.0]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from . import provenance
from .backend import numpy_backend
from .errors import EmitError, InteropError, UnsupportedOpError
from .normalize import (
    as_model,
    check_supported_node,
    has_function_body,
    normalize,
    opset_of,
    schema_defaults,
)
from .ops import SEMANTICS, semantics_key
from .packing import pack_weights
from .simplify import simplify


def attribute_value(attribute: ir.Attr) -> Any:
    value = attribute.value
    kind = attribute.type
    if kind == ir.AttributeType.TENSOR:
        return value.numpy()
    if kind == ir.AttributeType.TENSORS:
        return [v.numpy() for v in value]
    if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(value)
    return value


def free_values(graph: ir.Graph) -> list[ir.Value]:
    """Values a (sub)graph reads from enclosing scopes, in first-use order."""
    produced: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    found: dict[ir.Value, None] = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and value not in produced:
                found.setdefault(value)
        for attribute in node.attributes.values():
            for sub in _subgraphs(attribute):
                for value in free_values(sub):
                    if value not in produced:
                        found.setdefault(value)
        produced.update(node.outputs)
    for value in graph.outputs:  # an output may pass an outer value straight through
        if value not in produced:
            found.setdefault(value)
    return list(found)


def _subgraphs(attribute: ir.Attr) -> list[ir.Graph]:
    if attribute.is_ref():
        return []
    if attribute.type == ir.AttributeType.GRAPH:
        return [attribute.value]
    if attribute.type == ir.AttributeType.GRAPHS:
        return list(attribute.value)
    return []


def node_free_values(node: ir.Node) -> list[ir.Value]:
    found: dict[ir.Value, None] = {}
    for attribute in node.attributes.values():
        for sub in _subgraphs(attribute):
            for value in free_values(sub):
                found.setdefault(value)
    return list(found)


class SubgraphFunction:
    """A subgraph attribute as a callable over backend arrays, the outer scope bound."""

    def __init__(self, graph: ir.Graph, backend: Any, outer: Mapping[ir.Value, Any], version: int):
        self.graph, self.backend, self.outer, self.version = graph, backend, outer, version
        self.num_outputs = len(graph.outputs)

    def __call__(self, *inputs: Any) -> list[Any]:
        env = dict(self.outer)
        for value, given in zip(self.graph.inputs, inputs):
            env[value] = given if not isinstance(given, np.ndarray) else self.backend.asarray(given)
        return Interpreter(self.graph, self.backend, version=self.version).run_graph(
            self.graph, env
        )


# ops whose outputs are not functions of their inputs: never folded into constants
RANDOM_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
        "Dropout",
    }
)


def fold_on_host(
    graph: Any, version: int, node: ir.Node, inputs: list[Any]
) -> list[np.ndarray] | None:
    """Evaluate one node on numpy at emission time (constant folding).

    None when a result is not a plain array (sequences, strings), so the caller emits
    the node instead.
    """
    results = Interpreter(graph, numpy_backend, version=version).op_function(node)(*inputs)
    if not all(isinstance(r, np.ndarray) and r.dtype != object for r in results):
        return None
    return list(results)


_PROGRESS_NODES = 300  # below this, emission is too quick for a progress bar


class Interpreter:
    """Evaluate (or, in subclasses, emit) an ONNX graph node by node with a backend.

    >>> from interop.backend import numpy_backend          # doctest: +SKIP
    >>> Interpreter(graph, numpy_backend).run(x)            # doctest: +SKIP
    """

    adapter = "numpy"

    def __init__(
        self,
        source: Any,
        backend: Any = numpy_backend,
        *,
        version: int | None = None,
        normalized: bool = False,
    ):
        if isinstance(source, ir.Graph):
            self.model, self.graph = None, source
            self.version = version or opset_of(source)
        else:
            self.model = as_model(source) if normalized else normalize(as_model(source))
            self.version = version or opset_of(self.model)
            # computed or relaid weights become initializers, so hosts can build their own
            # layers; inverse transposes cancel and missing shapes are inferred
            packed = pack_weights(self.model, self.version)
            # the clean-up rewrites in place: never the caller's model
            self.model = simplify(packed if packed is not self.model else packed.clone())
            self.graph = self.model.graph
        self.backend = backend
        model = self.model
        self.kinds = provenance.read_parameters(model) if model is not None else {}
        # a file from another tool has no parameter table (an empty table is a model without weights)
        self.foreign = model is None or provenance.PARAMETERS not in model.metadata_props

    def kind_of(self, value: ir.Value) -> str | None:
        """ "trainable" / "frozen" / "buffer" for source weights; None for constants."""
        if value.name in self.kinds:
            return self.kinds[value.name]
        const = value.const_value
        if (
            self.foreign
            and const is not None
            and const.dtype.is_floating_point()
            and const.size > 1
        ):
            return provenance.TRAINABLE  # a plain ONNX file: float weight tensors train
        return None

    # ------------------------------------------------------------------ the loop
    def run(self, *args: Any, **named: Any) -> list[Any]:
        env: dict[ir.Value, Any] = {}
        provided = list(args)
        for index, value in enumerate(self.graph.inputs):
            if value.name in named:
                env[value] = self.input(value, named[value.name])
            elif index < len(provided):
                env[value] = self.input(value, provided[index])
            elif value.name in self.graph.initializers:
                continue  # an input with a default (old-style initializer-as-input)
            else:
                raise InteropError(
                    f"Missing graph input '{value.name}'", f"{len(self.graph.inputs)} inputs"
                )
        return self.output(self.run_graph(self.graph, env))

    def run_graph(
        self, graph: Any, env: dict[ir.Value, Any], caller: Mapping[str, Any] | None = None
    ) -> list[Any]:
        """Run the nodes of a graph (or function body) over ``env``; return its outputs."""
        for value in getattr(graph, "initializers", {}).values():
            if value not in env:
                env[value] = self.constant(value)
        nodes: Any = graph
        if caller is None and graph is self.graph and len(graph) >= _PROGRESS_NODES:
            from .progress import (
                progress,
            )  # a bar on a terminal only; emitting big graphs takes seconds

            nodes = progress(graph, total=len(graph), desc=f"emit {type(self).__name__}")
        for node in nodes:
            args = [
                None if v is None or (caller is not None and v.name == "") else env[v]
                for v in node.inputs
            ]
            try:
                results = self.run_node(node, args, env, caller)
            except (UnsupportedOpError, EmitError):
                raise
            except Exception as err:
                scope = provenance.node_scope(node)
                raise EmitError(
                    f"{type(err).__name__}: {err}\nwhile emitting node '{node.name}' ({node.op_type})"
                    + (f" of layer '{scope}'" if scope else ""),
                    fix="check the node's inputs and attributes against the ONNX spec",
                ) from err
            for value, result in zip(node.outputs, results):
                env[value] = result
        return [env[value] for value in graph.outputs]

    def run_node(
        self,
        node: ir.Node,
        args: list[Any],
        env: Mapping[ir.Value, Any],
        caller: Mapping[str, Any] | None = None,
    ) -> Sequence[Any]:
        captured = [env[v] for v in node_free_values(node)]
        if (
            caller is not None
        ):  # inside a function body: attribute references resolve against the caller
            return self.op_function(node, caller)(*args, *captured)
        return self.call_op(node, args, captured)

    # ------------------------------------------------------------------ overridable steps
    def input(self, value: ir.Value, given: Any) -> Any:
        if given is None or isinstance(given, (list, tuple)):  # empty optional, sequence
            return given if given is None else [self.backend.asarray(g) for g in given]
        return self.backend.asarray(given)

    def constant(self, value: ir.Value) -> Any:
        tensor = value.const_value
        assert tensor is not None, f"{value.name} is not a constant"
        return self.backend.asarray(tensor.numpy())

    def call_op(self, node: ir.Node, args: list[Any], captured: list[Any]) -> Sequence[Any]:
        return self.op_function(node)(*args, *captured)

    def output(self, results: list[Any]) -> list[Any]:
        return results

    # ------------------------------------------------------------------ node -> callable
    def attributes(
        self, node: ir.Node, caller: Mapping[str, Any] | None = None
    ) -> tuple[dict, dict]:
        """(plain attribute values with schema defaults, subgraph attributes)."""
        values = dict(schema_defaults(node.op_type, node.domain, self.version))
        graphs = {}
        for name, attribute in node.attributes.items():
            if attribute.is_ref():  # inside a function body: the caller's attribute, if given
                ref = attribute.ref_attr_name
                if caller is not None and ref is not None and ref in caller:
                    values[name] = caller[ref]
                continue
            if attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                graphs[name] = attribute.value
            else:
                values[name] = attribute_value(attribute)
        return values, graphs

    def op_function(
        self, node: ir.Node, caller: Mapping[str, Any] | None = None, *, single: bool = False
    ) -> Callable[..., Any]:
        """One callable ``(*inputs, *captured outer values) -> tuple of outputs`` for a node.

        With ``single``, a one-output node's callable returns the value itself.
        """
        values, graphs = self.attributes(node, caller)
        semantics = SEMANTICS.get(semantics_key(node.op_type, node.domain))
        if semantics is None:
            if not has_function_body(node.op_type, node.domain, self.version):
                check_supported_node(node, self.version, self.adapter)
            body = FunctionBody(node, values, self.backend, self.version, self.adapter)
            if single and len(node.outputs) == 1:

                def call_body(*args: Any) -> Any:
                    return body(*args)[0]

                call_body.__name__ = call_body.__qualname__ = f"onnx_{node.op_type}_function"
                return call_body
            return body
        if "_outputs" in inspect.signature(semantics).parameters:
            values["_outputs"] = len(node.outputs)
        backend, version = self.backend, self.version
        outer = node_free_values(node)
        input_count = len(node.inputs)

        def call(*args: Any) -> tuple:
            bound = dict(values)
            if graphs:
                scope = dict(zip(outer, args[input_count:]))
                for name, graph in graphs.items():
                    bound[name] = SubgraphFunction(graph, backend, scope, version)
            result = semantics(backend, *args[:input_count], **bound)
            return result if isinstance(result, tuple) else (result,)

        if single and len(node.outputs) == 1 and not graphs:

            def call_single(*args: Any) -> Any:
                result = semantics(backend, *args, **values)
                return result[0] if isinstance(result, tuple) else result

            call_single.__name__ = call_single.__qualname__ = f"onnx_{node.op_type}"
            return call_single

        call.__name__ = f"onnx_{node.op_type}"
        call.__qualname__ = call.__name__
        if single and len(node.outputs) == 1:  # If / Loop / Scan with one output

            def call_first(*args: Any) -> Any:
                return call(*args)[0]

            call_first.__name__ = call_first.__qualname__ = call.__name__
            return call_first
        return call


class FunctionBody:
    """An op without direct semantics, run as its ONNX function body (cached per input types)."""

    def __init__(
        self,
        node: ir.Node,
        attributes: dict[str, Any],
        backend: Any,
        version: int,
        adapter: str = Interpreter.adapter,
    ):
        self.node, self.attributes, self.backend, self.version = node, attributes, backend, version
        self.adapter = adapter  # errors in the body name the emitter, not "numpy"
        self.__name__ = f"onnx_{node.op_type}_function"
        self._bodies: dict[tuple, tuple[ir.Function, list[int]]] = {}

    def body(self, args: Sequence[Any]) -> tuple[ir.Function, list[int]]:
        key = tuple(
            None if a is None else (str(self.backend.dtype(a)), len(self.backend.shape(a)))
            for a in args
        )
        if key not in self._bodies:
            # Any: onnx's stubs lack OpSchema's function accessors
            schema: Any = onnx.defs.get_schema(self.node.op_type, self.version, self.node.domain)
            if schema.has_function:
                proto = onnx.FunctionProto.FromString(
                    schema.get_function_with_opset_version(schema.since_version)
                )
            else:
                types = [
                    onnx.TypeProto()
                    if a is None
                    else onnx.helper.make_tensor_type_proto(
                        onnx.helper.np_dtype_to_tensor_dtype(self.backend.dtype(a)),
                        list(self.backend.shape(a)),
                    )
                    for a in args
                ]
                node_proto = ir.serde.serialize_node(self.node)
                # inside a function body the builder must see the caller's value, not @ref; a
                # reference the caller leaves unset is an absent attribute (left in, the builder
                # reads its empty value: SoftmaxCrossEntropyLoss's NLL body got ignore_index 0)
                attributes = []
                for attribute in node_proto.attribute:
                    if attribute.ref_attr_name and attribute.name in self.attributes:
                        attribute = onnx.helper.make_attribute(
                            attribute.name, self.attributes[attribute.name]
                        )
                    if not attribute.ref_attr_name:
                        attributes.append(
                            onnx.AttributeProto.FromString(attribute.SerializeToString())
                        )
                del node_proto.attribute[:]
                node_proto.attribute.extend(attributes)
                raw = schema.get_context_dependent_function_with_opset_version(
                    schema.since_version,
                    node_proto.SerializeToString(),
                    [t.SerializeToString() for t in types],
                )
                proto = onnx.FunctionProto.FromString(raw)
            # a context-dependent body may list optional outputs it never produces
            produced = {name for node in proto.node for name in node.output} | set(proto.input)
            kept = [i for i, name in enumerate(proto.output) if name in produced]
            names = [proto.output[i] for i in kept]
            del proto.output[:]
            proto.output.extend(names)
            self._bodies[key] = (ir.serde.deserialize_function(proto), kept)
        return self._bodies[key]

    def __call__(self, *args: Any) -> tuple:
        args = args[: len(self.node.inputs)]
        function, kept = self.body(args)
        interpreter = Interpreter(
            function.graph if hasattr(function, "graph") else function,
            self.backend,
            version=function.opset_imports.get("", self.version),
        )
        interpreter.adapter = self.adapter
        env = {value: given for value, given in zip(function.inputs, args) if given is not None}
        produced = interpreter.run_graph(function, env, caller=self.attributes)
        results: list[Any] = [None] * len(self.node.outputs)
        for index, value in zip(kept, produced):
            if index < len(results):
                results[index] = value
        return tuple(results)


def evaluate(source: Any, *inputs: Any, backend: Any = numpy_backend, **named: Any) -> list[Any]:
    """Evaluate a model (interop.Graph, ONNX model or path) on inputs with a backend.

    The numpy backend makes this the reference evaluator:

    >>> outputs = evaluate("net.onnx", x)   # doctest: +SKIP
    """
    return Interpreter(source, backend).run(*inputs, **named)
