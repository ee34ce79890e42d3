"""Graph clean-ups before emission: inverse Transpose pairs cancel (also across elementwise
ops between them), missing shapes are inferred.

Captures that work in one layout and call ops of another wrap each op in transposes: the
Keras capture turns an NHWC Conv2D into Transpose -> Conv -> Transpose, so two layers in a
row leave Transpose(NCHW->NHWC) -> Transpose(NHWC->NCHW) between them. Emitted as is, each
pair costs two copies per call and hides the Conv -> BatchNormalization chain a host layer
could take. Shapes matter for the same reason: a native BatchNorm needs its input's rank.
Both run on the emitter's private copy of the model (after `packing.pack_weights`), in
place: `Interpreter` never hands them the caller's model.

>>> model = simplify(model)   # doctest: +SKIP
"""

from __future__ import annotations

import logging

import onnx_ir as ir

_STANDARD = ("", "ai.onnx")


def simplify(model: ir.Model) -> ir.Model:
    """The model with inverse transposes cancelled and missing value shapes inferred (in place)."""
    cancel_inverse_transposes(model.graph)
    sink_transposes(model.graph)
    infer_missing_shapes(model)
    return model


def _perm(node: ir.Node) -> list[int] | None:
    attribute = node.attributes.get("perm")
    return None if attribute is None else list(attribute.as_ints())


def _drop_unread_transposes(graph: ir.Graph) -> None:
    for node in reversed(list(graph)):
        if node.op_type == "Transpose" and not any(
            out.uses() or out.is_graph_output() for out in node.outputs
        ):
            graph.remove(node, safe=True)


def cancel_inverse_transposes(graph: ir.Graph) -> int:
    """Readers of Transpose(Transpose(x, p), q) read x when q undoes p; returns how many."""
    cancelled = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in _STANDARD or not node.inputs:
            continue
        inner = node.inputs[0].producer() if node.inputs[0] is not None else None
        if inner is None or inner.op_type != "Transpose" or inner.domain not in _STANDARD:
            continue
        first, second = _perm(inner), _perm(node)
        if first is None or second is None or len(first) != len(second):
            continue  # a default perm (reverse) has no rank on record: leave it
        if [first[axis] for axis in second] != list(range(len(first))):
            continue
        output, source = node.outputs[0], inner.inputs[0]
        if output.is_graph_output() or source is None:
            continue  # the graph's own output value must stay produced under its name
        output.replace_all_uses_with(source)
        cancelled += 1
    _drop_unread_transposes(graph)
    return cancelled


# ops that compute each element from the elements at the same position (and attributes that
# name no axis): they work the same in any layout
_ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "Cast", "Ceil", "Clip", "Cos", "Div", "Elu", "Erf", "Exp", "Floor",
        "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "Max", "Min",
        "Mish", "Mul", "Neg", "Pow", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid",
        "Sign", "Sin", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip


def _scalar(value: ir.Value | None) -> bool:
    """A constant of one element (broadcasts the same in every layout)."""
    if value is None:
        return True
    const = value.const_value
    producer = value.producer()
    if const is None and producer is not None and producer.op_type == "Constant":
        attribute = producer.attributes.get("value")
        const = None if attribute is None else attribute.value
    return const is not None and const.size == 1 and len(const.shape) == 0


def sink_transposes(graph: ir.Graph) -> int:
    """Elementwise ops between a Transpose and its inverse run in the untransposed layout.

    The Keras capture leaves NCHW -> NHWC before an activation and NHWC -> NCHW after it
    (Conv -> BatchNorm -> Transpose -> Relu -> Transpose -> Conv). A region of elementwise
    ops (inputs: outputs of Transposes with one perm, the region's own values, scalar
    constants) whose every reader is in the region or an inverse Transpose is rewired to
    the Transposes' inputs; the inverse Transposes' readers read the region directly.
    Returns how many regions moved.
    """
    moved = 0
    done: set[ir.Node] = set()
    for node in list(graph):
        if node in done or not _is_transpose(node) or _perm(node) is None:
            continue
        region = _region(node)
        if region is None:
            continue
        entries, members, exits = region
        done.update(entries)
        perm = _perm(node)
        assert perm is not None
        inverse = [perm.index(axis) for axis in range(len(perm))]
        for member in members:
            for index, value in enumerate(member.inputs):
                producer = value.producer() if value is not None else None
                if producer is not None and producer in entries:
                    member.replace_input_with(index, producer.inputs[0])
            for out in member.outputs:
                if out.shape is not None and len(out.shape) == len(perm):
                    out.shape = ir.Shape([out.shape[inverse[axis]] for axis in range(len(perm))])
        for exit_node in exits:
            source = exit_node.inputs[0]
            producer = source.producer()
            if producer in entries:  # an entry read straight back: its input
                source = producer.inputs[0]
            exit_node.outputs[0].replace_all_uses_with(source)
        moved += 1
    _drop_unread_transposes(graph)
    return moved


def _is_transpose(node: ir.Node | None) -> bool:
    return node is not None and node.op_type == "Transpose" and node.domain in _STANDARD


def _region(start: ir.Node):
    """(entries, members in graph order, exits) of the region `start` opens, or None."""
    perm = _perm(start)
    assert perm is not None
    undo = [perm.index(axis) for axis in range(len(perm))]
    entries, members, exits = {start}, set(), set()
    pending = [start]
    while pending:  # grow: readers of the region, and Transposes feeding it in its layout
        node = pending.pop()
        entry = node in entries
        for out in node.outputs:
            if out.is_graph_output() and not entry:
                return None  # the graph's output keeps its layout
            for use in out.uses():
                reader = use.node
                if reader in members or reader in exits:
                    continue
                if _is_transpose(reader) and _perm(reader) == undo:
                    if reader.outputs[0].is_graph_output():
                        return None  # its value must stay produced under the output's name
                    exits.add(reader)
                elif reader.op_type in _ELEMENTWISE and reader.domain in _STANDARD:
                    members.add(reader)
                    pending.append(reader)
                    for value in reader.inputs:
                        producer = value.producer() if value is not None else None
                        if producer is None or producer in entries:
                            continue
                        if _is_transpose(producer) and _perm(producer) == perm:
                            # another input in this layout (a residual Add's other branch)
                            entries.add(producer)
                            pending.append(producer)
                elif not entry:
                    return None  # a reader that needs the transposed layout
                if len(members) > 256:
                    return None
    inside = entries | members
    for member in members:  # every input in the region's layout, or a scalar
        for value in member.inputs:
            if _scalar(value):
                continue
            assert value is not None  # a missing input counts as a scalar
            if value.producer() not in inside:
                return None
    if not members or not exits:
        return None
    return entries, members, exits


def infer_missing_shapes(model: ir.Model) -> None:
    """Shapes and dtypes from ONNX shape inference, for values that have none on record.

    Recorded shapes win (they may name symbolic dims the inference would rename). A model
    the inference rejects keeps what it has: shapes are a help to emitters, not a need.
    """
    graph = model.graph
    missing = {
        v.name: v for node in graph for v in node.outputs if v.shape is None or v.dtype is None
    }
    if not missing:
        return
    from onnx_ir.passes.common import ShapeInferencePass

    copy = model.clone()
    logger = logging.getLogger("onnx_ir.passes.common.shape_inference")
    level = logger.level
    logger.setLevel(logging.ERROR)  # a failed inference is expected on exotic graphs
    try:
        inferred = ShapeInferencePass(strict_mode=False, data_prop=True)(copy).model
    finally:
        logger.setLevel(level)
    for node in inferred.graph:
        for value in node.outputs:
            target = missing.get(value.name)
            if target is None or value.type is None:
                continue
            if target.type is None:  # the whole type: a sequence stays a sequence
                target.type = value.type
            elif target.type != value.type:
                continue  # the inference disagrees with what is on record: keep the record
            if target.shape is None and value.shape is not None:
                target.shape = value.shape
