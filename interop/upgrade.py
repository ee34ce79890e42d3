"""Old-opset forms that onnx's version converter gets wrong, rewritten before it runs.

Scan-8 runs its body once per batch entry (axis 0 of every state and scan input, scanning
axis 1); Scan-9 has no batch axis. The converter's Scan 8 -> 9 adapter only drops the first
dim from the declared shapes, so the converted model scans the batch axis: silently wrong
numbers. `batched_scans` makes each Scan-8 a Loop over the batch whose body gathers one
entry and runs the Scan on it, which the converter then turns into a correct Scan-9.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import helper

from .errors import UnsupportedOpError

SCAN_BATCH_OPSET = 9  # Scan lost its batch axis here


def _unbatched(node: onnx.NodeProto, prefix: str) -> list[onnx.NodeProto]:
    """A Scan-8 node as Shape/Gather of the batch size and a Loop over the batch."""
    if node.input and node.input[0]:
        raise UnsupportedOpError(
            "Scan",
            direction="emit",
            detail="opset-8 Scan with sequence_lens (a length per batch entry)",
            fix="export the model with opset 9 or newer, or without sequence_lens",
        )
    body = next(a.g for a in node.attribute if a.name == "body")
    operands = list(node.input[1:])
    batch, index, entry = f"{prefix}batch", f"{prefix}i", f"{prefix}cond"
    zero = helper.make_tensor(f"{prefix}zero", onnx.TensorProto.INT64, [], [0])
    gathers = [
        helper.make_node("Gather", [name, index], [f"{prefix}in{k}"], axis=0)
        for k, name in enumerate(operands)
    ]
    scan_outputs = [f"{prefix}out{k}" for k in range(len(node.output))]
    inner = helper.make_node(
        "Scan", ["", *(g.output[0] for g in gathers)], scan_outputs, name=f"{prefix}scan"
    )
    inner.attribute.extend(node.attribute)  # body, num_scan_inputs, directions
    keep = helper.make_node("Identity", [entry], [f"{prefix}cond_out"])
    loop_body = helper.make_graph(
        [*gathers, inner, keep],
        f"{prefix}per_batch",
        [
            helper.make_tensor_value_info(index, onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info(entry, onnx.TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info(f"{prefix}cond_out", onnx.TensorProto.BOOL, []),
            # one per-entry result of each Scan output: the Loop stacks them along the batch
            *(
                helper.make_tensor_value_info(name, value.type.tensor_type.elem_type, None)
                for name, value in zip(scan_outputs, body.output)
            ),
        ],
    )
    return [
        helper.make_node("Shape", [operands[-1]], [f"{prefix}shape"]),
        helper.make_node("Constant", [], [f"{prefix}zero"], value=zero),
        helper.make_node("Gather", [f"{prefix}shape", f"{prefix}zero"], [batch], axis=0),
        helper.make_node("Loop", [batch, ""], list(node.output), name=node.name, body=loop_body),
    ]


def _rewrite(graph: onnx.GraphProto, counter: list[int]) -> bool:
    changed = False
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:  # Scans nested in If / Loop bodies
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                changed |= _rewrite(subgraph, counter)
        if node.op_type == "Scan" and node.domain in ("", "ai.onnx"):
            counter[0] += 1
            nodes += _unbatched(node, f"_scan8_{counter[0]}_")
            changed = True
        else:
            nodes.append(node)
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def batched_scans(model: onnx.ModelProto) -> bool:
    """Rewrite the Scan-8 nodes of an opset < 9 model in place; whether there were any."""
    return _rewrite(model.graph, [0])


# ------------------------------------------------------------------ measured converter gaps
# (tests/test_onnx_files.py compares each with ONNX Runtime on the unconverted file)
HARDMAX_COERCION_OPSET = 13  # before 13, Hardmax flattened its input to 2-D at `axis`
RESIZE_COORDINATES_OPSET = 11  # Upsample-7..9 and Resize-10 sample at x_out / scale


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for a in node.attribute for g in ([a.g] if a.HasField("g") else a.graphs)]


def _coerced_hardmax(graph: onnx.GraphProto, counter: list[int]) -> bool:
    """Hardmax-1/11 over `axis` of an N-D input is Hardmax of its 2-D flattening; the
    converter's Hardmax 12 -> 13 keeps the axis, which then means one dim only."""
    changed = False
    nodes = []
    for node in graph.node:
        for subgraph in _subgraphs(node):
            changed |= _coerced_hardmax(subgraph, counter)
        if node.op_type != "Hardmax" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        counter[0] += 1
        prefix = f"_hardmax{counter[0]}_"
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        source = node.input[0]
        nodes += [
            helper.make_node("Shape", [source], [prefix + "shape"]),
            helper.make_node("Flatten", [source], [prefix + "2d"], axis=axis),
            helper.make_node("Hardmax", [prefix + "2d"], [prefix + "max"], axis=1),
            helper.make_node(
                "Reshape", [prefix + "max", prefix + "shape"], list(node.output), name=node.name
            ),
        ]
        changed = True
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return found


def _nearest_rounding(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]) -> str:
    """ONNX Runtime's opset-10 nearest sampling: floor on axes that grow, ceil on axes that
    shrink. One rounding serves a Resize-11: mixed axes have none."""
    scales = constants.get(node.input[2]) if len(node.input) > 2 else None
    if scales is None:
        return "floor"  # scales computed at run time: Upsample's (never below 1)
    values = onnx.numpy_helper.to_array(scales).ravel()
    if (values < 1).any() and (values > 1).any():
        raise UnsupportedOpError(
            "Resize",
            direction="emit",
            detail=f"node '{node.name}': opset-10 nearest Resize with scales {values.tolist()}, "
            "which shrink some axes and grow others; ONNX Runtime rounds each axis its own "
            "way, which no Resize of opset 11 or newer expresses",
            fix="export the model with opset 11 or newer",
        )
    return "ceil" if (values < 1).any() else "floor"


def _asymmetric_resizes(graph: onnx.GraphProto) -> None:
    constants = _constants(graph)
    for node in graph.node:
        for subgraph in _subgraphs(node):
            _asymmetric_resizes(subgraph)
        if node.op_type == "Resize" and node.domain in ("", "ai.onnx"):
            names = {a.name for a in node.attribute}
            if "coordinate_transformation_mode" not in names:
                node.attribute.append(
                    helper.make_attribute("coordinate_transformation_mode", "asymmetric")
                )
            mode = next((a.s for a in node.attribute if a.name == "mode"), b"nearest")
            if "nearest_mode" not in names and mode == b"nearest":
                rounding = _nearest_rounding(node, constants)
                node.attribute.append(helper.make_attribute("nearest_mode", rounding))


def before_conversion(model: onnx.ModelProto, version: int) -> None:
    """Rewrite (in place) the old forms onnx's version converter gets wrong, at `version`."""
    if version < HARDMAX_COERCION_OPSET:
        _coerced_hardmax(model.graph, [0])


def after_conversion(model: onnx.ModelProto, version: int) -> None:
    """Repair (in place) a converted model of what the converter left wrong.

    Resize-11 added coordinate_transformation_mode (default half_pixel) and nearest_mode
    (default round_prefer_floor); the converter adds neither to an Upsample / Resize-10,
    whose sampling is asymmetric, nearest rounding down where an axis grows and up where it
    shrinks (ONNX Runtime's reading). Every Resize of a model older than opset 11 came from
    those.
    """
    if version < RESIZE_COORDINATES_OPSET:
        _asymmetric_resizes(model.graph)


def upgrade(model: ir.Model, version: int, target: int) -> ir.Model:
    """`model` (at opset `version`) converted to opset `target` by onnx's version converter,
    with the gaps above handled; the model itself when the converter fails on it."""
    from onnx import version_converter

    proto = ir.serde.serialize_model(model)
    # the converter's Scan 8 -> 9 scans the batch axis: a Loop over the batch first
    scans = version < SCAN_BATCH_OPSET and batched_scans(proto)
    before_conversion(proto, version)
    try:
        converted = version_converter.convert_version(proto, target)
    except Exception as err:  # the converter lacks adapters for some ops: keep the original meaning
        if scans:  # the semantics are Scan-9's: an unconverted Scan-8 would scan the batch axis
            raise UnsupportedOpError(
                "Scan",
                direction="emit",
                detail=f"opset-{version} Scan, which onnx's version converter failed on: {err}",
                fix="export the model with opset 9 or newer",
            ) from err
        return model
    after_conversion(converted, version)  # may raise UnsupportedOpError
    return ir.serde.deserialize_model(converted)
