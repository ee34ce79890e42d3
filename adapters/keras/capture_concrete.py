"""The example's concrete shapes for a layer whose call cannot run on unknown dims.

Some layers compute with Python on shapes (``for h in ops.shape(x)``, a slice bound that
must be an int, an FFT that needs static axes): their call fails on KerasTensors with
``None`` for the batch or sequence length even with run-time shapes recorded
(capture_dynamic_shapes.py). Such a layer is called again on KerasTensors of the shapes its
inputs have for the example inputs; those come from evaluating the graph built so far with
interop's reference evaluator (numpy), only up to the layer's inputs. The layer's nodes are
then specific to those sizes; `capture_dim_check` runs the finished graph at other sizes
and makes a dim static, with a warning, where the graph does not hold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from .capture_lowering import OPSET, Builder, Tensor


def example_shapes(
    b: Builder, tensors: list[Tensor], every: bool = False
) -> dict[int, tuple[int, ...]] | None:
    """``{id(tensor): shape}`` for the example inputs, for tensors with unknown dims (all of
    them with `every`); None when there are none or the graph so far cannot be evaluated."""
    wanted = [t for t in tensors if every or any(d is None for d in t.shape)]
    if not wanted or not b.examples:
        return None
    names = {t.value.name for t in wanted}
    try:
        arrays = _evaluate(b, names)
    except Exception:  # the prefix cannot run on numpy: no concrete shapes, the caller reports
        return None
    shapes = {id(t): tuple(int(d) for d in np.shape(arrays[t.value.name])) for t in wanted}
    if every:
        return shapes
    return shapes if all(len(s) == len(t.shape) for t, s in zip(wanted, shapes.values())) else None


def _evaluate(b: Builder, names: set[str]) -> dict[str, Any]:
    """The values named `names`, computed from the example inputs by the nodes so far."""
    from interop.interpret import evaluate

    known = {n: b.examples[n] for n in names if n in b.examples}
    known.update(  # a constant the walk made (keras_hub D-FINE's decoder on torch)
        {
            n: b.initializers[n].const_value.numpy()
            for n in names
            if n in b.initializers and b.initializers[n].const_value is not None
        }
    )
    names = names - set(known)
    if not names:
        return known

    producers = {out.name: node for node in b.nodes for out in node.outputs}
    needed: list[ir.Node] = []
    seen: set[str] = set()
    stack = list(names)
    while stack:  # only the nodes the wanted values depend on
        name = stack.pop()
        node = producers.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        needed.append(node)
        stack.extend(v.name for v in node.inputs if v is not None)
    order = {id(node): i for i, node in enumerate(b.nodes)}
    needed.sort(key=lambda node: order[id(node)])
    inputs = [
        onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)
        )
        for name, array in b.examples.items()
    ]
    used = {v.name for node in needed for v in node.inputs if v is not None}
    initializers = [
        ir.serde.serialize_tensor(value.const_value)
        for name, value in b.initializers.items()
        if name in used and value.const_value is not None
    ]
    for tensor, name in zip(initializers, [n for n in b.initializers if n in used], strict=False):
        tensor.name = name
    outputs = [onnx.helper.make_empty_tensor_value_info(name) for name in sorted(names)]
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in needed], "prefix", inputs, outputs,
        initializer=initializers,
    )  # fmt: skip
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    try:
        results = evaluate(model, **b.examples)
    except Exception:  # the reference evaluator's normalization cannot take every prefix
        results = _run_onnxruntime(model, b.examples)  # (tf2onnx's graphs: Moonshine)
    return {**known, **dict(zip(sorted(names), results, strict=True))}


def _run_onnxruntime(model: onnx.ModelProto, examples: dict[str, Any]) -> list[Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, dict(examples))
