"""Old-opset forms that onnx's version converter gets wrong, rewritten before it runs.

Scan-8 runs its body once per batch entry (axis 0 of every state and scan input, scanning
axis 1); Scan-9 has no batch axis. The converter's Scan 8 -> 9 adapter only drops the first
dim from the declared shapes, so the converted model scans the batch axis: silently wrong
numbers. `batched_scans` makes each Scan-8 a Loop over the batch whose body gathers one
entry and runs the Scan on it, which the converter then turns into a correct Scan-9.
"""

from __future__ import annotations

import onnx
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
