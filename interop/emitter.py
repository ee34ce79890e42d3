"""The emit skeleton: the one `Emitter` every host builds on, and the one builder contract.

An emitter walks a normalized graph with `interop.interpret.Interpreter`'s loop and, for
each node, takes the first of these that applies (`Emitter.run_node`, the same order for
every host):

1. **fused**: a node a native layer already computes (the bias Add after a MatMul, the
   activation a Keras Dense applies itself) is that layer's output;
2. **folded**: a node whose inputs are all known now (constants, a weight's shape) is
   evaluated once, with numpy, and its results are constants of the host model;
3. **rewritten**: `rewrite`, for nodes that are structure rather than computation in a
   host (Keras: sequences as Python lists, a Transpose composing with the last one);
4. **native layer**: the host's builder registry (``layers``) gives a `Native`: the
   host's own layer holding the node's weights, placed at their common source prefix
   (``blocks.0.conv``) and called on the node's data inputs (`call_native`);
5. **generic op**: `call_op`, the node's ONNX semantics on the host's backend.

A host subclass keeps only what truly differs between hosts: graph inputs (`input`),
constants (`static_handle`, `weight_handle`), outputs (`output`), placement
(`place`), calling a native layer (`call_native`) and calling a generic op (`call_op`).

Builders are ``builder(emitter, node, args) -> Native | None``, registered per host
(``EMIT_LAYERS`` of each adapter); None leaves the node to the generic op. The helpers
below are the patterns builders share (optional biases, pads, a bias Add after a
MatMul, a plain dropout, packed source names).

>>> class Numpy(Emitter):                       # doctest: +SKIP
...     layers = Registry("emit", adapter="numpy layers")
...     def call_native(self, node, native, args):
...         return [native.layer(*[args[i] for i in native.data_inputs])]
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from . import provenance
from .interpret import RANDOM_OPS, Interpreter, fold_on_host, node_free_values
from .normalize import DEFAULT_DOMAINS, check_supported
from .registry import Registry
from .weights import host_array


@dataclass
class Native:
    """What a builder returns: a host layer that computes one node (or a few).

    >>> Native(layer, {"weight": node.inputs[1], "bias": node.inputs[2]}, [0])  # doctest: +SKIP
    """

    layer: Any
    # layer attribute (a dotted path inside the layer) -> the source initializer it holds
    sources: dict[str, Any]
    data_inputs: list[int] = field(default_factory=lambda: [0])  # node inputs it is called on
    # how the host calls the layer on those inputs when not ``layer(*inputs)``: Flax adapts
    # layouts at run time, Keras around the call at emission
    call: Callable[..., Any] | None = None
    outputs: int = 1  # > 1: the call returns one value per node output
    names: dict[str, str] | None = None  # source names, where not the initializers' names
    path: str | None = None  # where to place the layer, if not its sources' common prefix
    absorbs: Sequence[ir.Node] = ()  # nodes after this one whose output the layer computes
    kwargs: dict[str, Any] | None = None  # keyword arguments of the call (torch)


class Emitter(Interpreter):
    """The emit loop of every host: dispatch, folding, weight lookup, placement."""

    adapter = "emit"
    layers: Registry[Callable[..., Any]] = Registry("emit", adapter="none")
    # fold Shape / Size of a run-time value whose shape is static: a Keras functional layer
    # needs static shapes, while torch and JAX keep the graph as general as it was written
    fold_static_shapes = False
    # one host variable may be held by several native layers (torch: one nn.Parameter)
    shares_weights = False
    # a weight read through a constant Transpose may become a native layer's (transposed)
    weights_through_transpose = False

    def __init__(self, source: Any, backend: Any, *, normalized: bool = False):
        super().__init__(source, backend, normalized=normalized)
        self.static: dict[ir.Value, Any] = {}  # values known at emission (numpy)
        self.fused: dict[ir.Node, list[Any]] = {}  # nodes a native layer computes
        self.relaid: set[ir.Value] = set()  # weights a layer holds transposed / reordered
        self.env: dict[ir.Value, Any] = {}  # the handles so far (builders may look back)

    def check(self) -> None:
        """Raise `UnsupportedOpError` for the first node this host cannot emit."""
        check_supported(self.graph, self.version, self.adapter)

    # ------------------------------------------------------------------ dispatch
    def run_node(
        self, node: ir.Node, args: list[Any], env: Any, caller: Any = None
    ) -> Sequence[Any]:
        if caller is not None:  # inside an expanded function body: plain semantics
            return super().run_node(node, args, env, caller)
        self.env = env
        if node in self.fused:
            return self.fused.pop(node)
        folded = self.fold(node)
        if folded is not None:
            return folded
        rewritten = self.rewrite(node, args, env)
        if rewritten is not None:
            return rewritten
        builder = self.layers.get(node.op_type) if node.domain in DEFAULT_DOMAINS else None
        native = builder(self, node, args) if builder is not None else None
        if native is not None:
            outputs = list(self.call_native(node, native, args))
            for absorbed in native.absorbs:
                self.fused[absorbed] = outputs[:1]
            return outputs
        captured = [env[v] for v in node_free_values(node)]
        return self.call_op(node, args, captured)

    def rewrite(self, node: ir.Node, args: list[Any], env: Any) -> Sequence[Any] | None:
        """Outputs for a node the host handles as structure (None: not such a node)."""
        return None

    def call_native(self, node: ir.Node, native: Native, args: list[Any]) -> Sequence[Any]:
        """Place a native layer and call it on the node's data inputs; the node's outputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ constants
    def constant(self, value: ir.Value) -> Any:
        kind = self.kind_of(value)
        if kind is None:  # a constant of the graph: folding may use it
            array = _array(value)
            self.static[value] = array
            return self.static_handle(value, array)
        return self.weight_handle(value, kind)

    def static_handle(self, value: ir.Value, array: Any) -> Any:
        """The host's handle of a value known at emission (a constant or a folded result)."""
        return array

    def weight_handle(self, value: ir.Value, kind: str) -> Any:
        """The host's handle of a source weight (a variable once a generic op reads it)."""
        return _array(value)

    def fold(self, node: ir.Node) -> list[Any] | None:
        """Evaluate a node of constants once, now; None when it depends on run-time values."""
        if node.op_type in RANDOM_OPS or node_free_values(node):
            return None
        if any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            return None
        inputs = [None if v is None else self.static.get(v) for v in node.inputs]
        first: Any = node.inputs[0] if node.inputs else None
        if node.op_type in ("Shape", "Size") and inputs[0] is None and first is not None:
            if first.const_value is not None:
                inputs[0] = first.const_value.numpy()  # a weight's shape is known now
            elif self.fold_static_shapes and _static_shape(first):
                inputs[0] = np.empty(tuple(first.shape), np.uint8)  # only the shape is read
        if node.op_type == "CastLike" and inputs[0] is not None and inputs[1] is None:
            target: Any = node.inputs[1]
            if target.dtype is not None:  # only the target's dtype matters
                inputs[1] = np.zeros(0, target.dtype.numpy())
        if any(a is None and v is not None for a, v in zip(inputs, node.inputs, strict=True)):
            return None
        results = fold_on_host(self.graph, self.version, node, inputs)
        if results is None:
            return None
        self.static.update(zip(node.outputs, results))
        return [self.static_handle(v, r) for v, r in zip(node.outputs, results, strict=True)]

    # ------------------------------------------------------------------ weights
    def weight(self, value: ir.Value | None, *, relaid: bool = False) -> np.ndarray | None:
        """The source weight behind a node input, if a native layer may hold it; else None.

        Exporters read one initializer through Identity nodes (torch.onnx's TorchScript
        exporter keeps one copy of equal tensors); a Keras source reads its HWIO kernels
        through a Transpose (followed where ``weights_through_transpose``). A weight read by
        several nodes (tied) goes to a native layer only where the host shares one variable
        among layers (``shares_weights``) and the layer holds it as is (``relaid=False``:
        not transposed or reordered); otherwise it stays one variable that generic ops read.
        """
        found = self.weight_source(value)
        if found is None:
            return None
        root, perm = found
        readers = self.readers(root)
        if readers != 1 and (not self.shares_weights or relaid or perm is not None):
            return None
        if relaid or perm is not None:
            self.relaid.add(root)
        assert root.const_value is not None
        array = host_array(root.const_value)  # the host's own (mapped when on disk)
        return array if perm is None else np.transpose(array, perm)

    def weight_array(self, value: ir.Value) -> np.ndarray:
        """An initializer's array for a host that stores it in its own buffers (a generic op's
        variable): weights on disk are mapped copy-on-write and released when the host drops
        the array, so emission holds one weight at a time beside the host's copy (or none,
        for a host that keeps the mapping: `interop.weights.host_array`)."""
        assert value.const_value is not None, f"{value.name} is not a constant"
        return host_array(value.const_value, copy=False)

    def weight_source(self, value: ir.Value | None) -> tuple[ir.Value, Sequence[int] | None] | None:
        """(initializer, perm) of the source weight a value is; perm when read transposed."""
        perm = None
        if self.weights_through_transpose and value is not None:
            producer = value.producer()
            if (
                producer is not None
                and producer.op_type == "Transpose"
                and producer.domain in DEFAULT_DOMAINS
                and producer.inputs[0] is not None
                and len(value.uses()) == 1
            ):
                rank = len(producer.inputs[0].shape or ())
                perm = self.attributes(producer)[0].get("perm") or list(range(rank))[::-1]
                value = producer.inputs[0]
        root = self.initializer_of(value)
        if root is None or self.kind_of(root) is None or root in self.graph.inputs:
            return None
        return root, perm

    def initializer_of(self, value: ir.Value | None) -> ir.Value | None:
        """The initializer a value is, directly or through Identity nodes; else None."""
        while value is not None and value.name not in self.graph.initializers:
            producer = value.producer()
            if producer is None or producer.op_type != "Identity":
                return None
            if producer.domain not in DEFAULT_DOMAINS:
                return None
            value = producer.inputs[0]
        return value if value is not None and value.const_value is not None else None

    def readers(self, value: ir.Value) -> int:
        """Nodes reading a value's data, through Identity; reading a weight's shape (Shape /
        Size, folded away) does not share the weight."""
        count = int(value.is_graph_output())
        for use in value.uses():
            node = use.node
            if node.op_type == "Identity" and node.domain in DEFAULT_DOMAINS:
                count += self.readers(node.outputs[0])
            elif node.op_type not in ("Shape", "Size"):
                count += 1
        return count

    def source_name(self, value: ir.Value) -> str:
        """The name of the initializer behind a node input (the input's own name otherwise)."""
        found = self.weight_source(value)
        root = found[0] if found is not None else self.initializer_of(value)
        return str((root or value).name)

    # ------------------------------------------------------------------ placement
    def source_prefix(self, sources: Iterable[ir.Value | None]) -> str | None:
        """The common layer path of weights' source names: ``blocks.0.conv`` for
        ``blocks.0.conv.weight`` and ``blocks.0.conv.bias`` (Keras names: ``conv`` for
        ``conv/kernel``); None when they have none or name different layers."""
        names = [self.source_name(v) for v in sources if v is not None]
        prefixes = {name.rsplit(".", 1)[0] if "." in name else "" for name in names}
        if "" in prefixes and any("/" in name for name in names):
            prefixes = {name.rsplit("/", 1)[0] if "/" in name else "" for name in names}
        if len(prefixes) != 1 or "" in prefixes:
            return None
        return prefixes.pop()

    def scope_name(self, node: ir.Node) -> str:
        """A name for a layer without a source prefix: its node's layer path, else the op."""
        return provenance.node_scope(node) or node.op_type.lower()

    # ------------------------------------------------------------------ shared patterns
    def node_attributes(self, node: ir.Node) -> dict[str, Any]:
        """The node's plain attributes with schema defaults filled in."""
        return self.attributes(node)[0]


def _array(value: ir.Value) -> np.ndarray:
    tensor = value.const_value
    assert tensor is not None, f"{value.name} is not a constant"
    return tensor.numpy()


def _static_shape(value: ir.Value) -> bool:
    return value.shape is not None and all(isinstance(d, int) for d in value.shape)


def is_constant_fill(value: ir.Value | None, fill: float, known: Mapping[Any, Any]) -> bool:
    """Whether an input is a constant whose every element is `fill`: known at emission
    (``known``, an emitter's folded values) or an initializer. Emitters ask it of inputs
    that are not weights (a source BatchNorm without scale reads constant ones)."""
    if value is None:
        return False
    array = known.get(value)
    if array is None and value.const_value is not None:
        array = value.const_value.numpy()
    return array is not None and np.size(array) > 0 and bool(np.all(np.asarray(array) == fill))


def constant_fill(emitter: Emitter, value: ir.Value | None, fill: float) -> bool:
    """A constant input that is no weight and whose every element is `fill`."""
    return emitter.weight(value) is None and is_constant_fill(value, fill, emitter.static)


def optional_weight(emitter: Emitter, node: ir.Node, index: int) -> tuple[Any, Any, bool]:
    """``(value, array, usable)`` of an optional weight input such as a bias.

    Absent, or a constant of zeros (how exporters spell "no bias"): ``(None, None, True)``;
    a weight: ``(value, array, True)``; anything else: ``(value, None, False)``.
    """
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return None, None, True
    static = emitter.static.get(value)
    if static is not None and not np.any(static):
        return None, None, True
    array = emitter.weight(value)
    return value, array, array is not None


def onnx_pads(attrs: Mapping[str, Any], spatial: int) -> list[tuple[int, int]] | None:
    """``[(begin, end)]`` per spatial axis of an explicitly padded window op; None for
    ``auto_pad`` SAME_UPPER / SAME_LOWER (their pads depend on the input size)."""
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    pads = list(attrs.get("pads") or [0] * (2 * spatial))
    return list(zip(pads[:spatial], pads[spatial:]))


@dataclass
class ConvWeights:
    """A Conv / ConvTranspose node's constant kernel, optional bias and window attributes."""

    weight: np.ndarray
    bias: np.ndarray | None
    bias_value: ir.Value | None
    attrs: dict[str, Any]
    spatial: int  # spatial axes (1 to 3)
    pads: list[tuple[int, int]]
    strides: list[int]
    dilations: list[int]
    group: int


def conv_weights(emitter: Emitter, node: ir.Node) -> ConvWeights | None:
    """What a host's convolution layer needs of a Conv / ConvTranspose node: a float kernel a
    native layer may hold (1 to 3 spatial axes), an optional bias, explicit pads; None when
    the node must stay a generic op."""
    weight = emitter.weight(node.inputs[1])
    bias_value, bias, usable = optional_weight(emitter, node, 2)
    if weight is None or not usable or not 3 <= weight.ndim <= 5 or weight.dtype.kind != "f":
        return None
    attrs = emitter.node_attributes(node)
    spatial = weight.ndim - 2
    pads = onnx_pads(attrs, spatial)
    if pads is None:
        return None
    return ConvWeights(
        weight=weight,
        bias=bias,
        bias_value=bias_value,
        attrs=attrs,
        spatial=spatial,
        pads=pads,
        strides=list(attrs.get("strides") or [1] * spatial),
        dilations=list(attrs.get("dilations") or [1] * spatial),
        group=int(attrs.get("group", 1)),
    )


def output_read(value: ir.Value | None) -> bool:
    """Whether an (optional) output is read: by a node, or as a graph output."""
    return value is not None and (bool(value.uses()) or value.is_graph_output())


def following_bias_add(
    emitter: Emitter, node: ir.Node, features: int
) -> tuple[ir.Node, ir.Value] | tuple[None, None]:
    """``(Add node, bias value)`` when a MatMul's only reader adds a constant ``[features]``
    vector of its dtype (exporters write Linear as MatMul + Add); else ``(None, None)``."""
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None, None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain not in DEFAULT_DOMAINS or len(add.inputs) != 2:
        return None, None
    bias = add.inputs[1 - index]
    data: Any = node.inputs[0]
    if bias is None or bias in emitter.graph.inputs or bias.dtype != data.dtype:
        return None, None
    array = emitter.static.get(bias)
    if array is None and bias.const_value is not None:
        array = bias.const_value.numpy()
    if array is None or array.ndim != 1 or array.shape[0] != features:
        return None, None
    return add, bias


def following_activation(
    emitter: Emitter, value: ir.Value, op_types: Iterable[str]
) -> ir.Node | None:
    """The activation node (one of ``op_types``) that is a layer output's only reader, with
    the same dtype: a host layer that applies activations itself may take it over."""
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    reader = uses[0].node
    if reader.domain not in DEFAULT_DOMAINS or reader.op_type not in op_types:
        return None
    return reader if reader.outputs[0].dtype == value.dtype else None


def dropout_ratio(emitter: Emitter, node: ir.Node) -> float | None:
    """The ratio of a Dropout a host's dropout layer expresses (constant ratio, mask unread,
    no explicit training_mode input); None otherwise."""
    if len(node.outputs) > 1 and output_read(node.outputs[1]):
        return None  # the mask is read: the generic op computes it
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        return None  # an explicit training_mode input: keep ONNX's meaning
    ratio_value = node.inputs[1] if len(node.inputs) > 1 else None
    if ratio_value is None:
        return 0.5
    if ratio_value not in emitter.static:
        return None
    return float(np.asarray(emitter.static[ratio_value]).reshape(-1)[0])


def packed_sources(value: ir.Value, direction: int = 0, directions: int = 1) -> list[str]:
    """The source parameters behind a weight: itself, or those it was packed from
    (`interop.packing` records them under ``interop.packed_from``); of a bidirectional
    recurrent weight, one direction's (torch's ``..._reverse``, Keras's ``backward_...``)."""
    packed = value.metadata_props.get(provenance.PACKED_FROM)
    if not packed:
        return [str(value.name)]
    names = json.loads(packed)
    if directions == 2:
        backward = [n for n in names if _BACKWARD.search(n)]
        forward = [n for n in names if not _BACKWARD.search(n)]
        if backward and forward:
            names = backward if direction else forward
    return names


# torch's backward-direction names (lstm.weight_ih_l0_reverse), Keras's (backward_lstm/...)
_BACKWARD = re.compile(r"(_reverse$|(^|/)backward_)")


def loop_condition_holds(body: ir.Graph) -> bool:
    """Whether a Loop body hands its condition input back unchanged (directly, through
    Identity, or as a constant true): then the loop runs its whole trip count, and scan
    outputs have a length known before it runs (a host scan can take it)."""
    if len(body.inputs) < 2 or not body.outputs:
        return False
    value: ir.Value | None = body.outputs[0]
    while (
        value is not None
        and (producer := value.producer()) is not None
        and producer.op_type == "Identity"
    ):
        value = producer.inputs[0]
    if value is None:
        return False
    producer = value.producer()
    if value is body.inputs[1]:
        return True
    if producer is not None and producer.op_type == "Constant":
        attribute = producer.attributes.get("value")
        const = None if attribute is None else attribute.value
    else:
        const = value.const_value
    return const is not None and const.size == 1 and bool(const.numpy().reshape(()))


def attribute_path(name: str) -> str:
    """A source name as a dotted attribute path hosts accept (``onnx::Conv_3`` -> ``onnx__Conv_3``)."""
    return ".".join(re.sub(r"\W", "_", part) or "_" for part in name.split("."))
