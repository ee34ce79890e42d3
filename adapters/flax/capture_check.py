"""The capture's own check: the graph it wrote must load, or `trace` fails naming why.

A converter that writes an ill-typed node (a MatMul of int32 and float32, a bool where
ONNX wants a number) would otherwise surface as a `ModelLoadError` at the first
`Graph.run`, far from its cause. Before `trace` returns, the graph goes through

1. ``onnx.checker.check_model(full_check=True)``: the schema checks plus strict type and
   shape inference, Loop / If bodies included, against the types the walk declared from
   the jaxpr's abstract values;
2. one ONNX Runtime session with graph optimizations disabled: ORT's own type binding
   (kernel availability per dtype, which the ONNX checker does not know about).

Both run on a copy of the graph whose weights are graph inputs without data (same
names, types and shapes), so the cost does not grow with the size of the weights. The
first failing node's name is mapped back to the JAX equation that wrote it (its
primitive, module path and ``file:line``), which the `TraceError` names.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import onnx_ir as ir

from interop.errors import TraceError


def _shell_proto(model: ir.Model) -> Any:
    """The model as a proto whose initializers are data-less graph inputs."""
    from onnx_ir import serde

    graph = model.graph
    held = {name: value.const_value for name, value in graph.initializers.items()}
    logger = logging.getLogger(serde.__name__)  # it warns about each data-less initializer
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)
        for value in graph.initializers.values():
            value.const_value = None
        proto = serde.serialize_model(model)
    finally:
        logger.setLevel(level)
        for name, value in graph.initializers.items():
            value.const_value = held[name]
    infos = {info.name: info for info in proto.graph.value_info}
    kept = [info for info in proto.graph.value_info if info.name not in held]
    for name in held:
        if name in infos:
            proto.graph.input.append(infos[name])
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return proto


def _origin(text: str, origins: dict[str, tuple[str, str, str | None]]) -> tuple[str, ...] | None:
    """The (node, primitive, scope, location) of the longest node name quoted in `text`."""
    found = [name for name in origins if name and name in text]
    if not found:
        return None
    name = max(found, key=len)
    return (name, *origins[name])  # type: ignore[return-value]


def check_captured(model: ir.Model, origins: dict[str, tuple[str, str, str | None]]) -> None:
    """Raise `TraceError` unless `model` passes the ONNX checker and loads in ONNX Runtime.

    >>> check_captured(graph.model, lowering.origins)      # doctest: +SKIP
    """
    import onnx
    import onnxruntime as ort

    proto = _shell_proto(model)
    stage = "the ONNX checker (full type and shape inference)"
    try:
        onnx.checker.check_model(proto, full_check=True)
        stage = "ONNX Runtime"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # the checker's and ORT's exception types share no base
        text = " ".join(str(err).split())
        raise _error(stage, text, _origin(text, origins), model.graph.name) from None


def _error(stage: str, text: str, origin: tuple[str, ...] | None, graph: str) -> TraceError:
    short = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)[:500]
    if origin is None:
        return TraceError(
            f"The graph captured from '{graph}' fails {stage}: {short}",
            "a graph that passes the ONNX checker and loads in ONNX Runtime",
            "this is an interop bug: please report it with the model",
        )
    node, primitive, scope, location = origin
    where = f" in layer '{scope or '<root>'}'" + (f" at {location}" if location else "")
    error = TraceError(
        f"The ONNX written for JAX primitive '{primitive}'{where} fails {stage} "
        f"(node {node}): {short}",
        "a graph that passes the ONNX checker and loads in ONNX Runtime",
        f"this is an interop converter bug for '{primitive}': please report it; meanwhile "
        f"express that line with other jax.numpy calls, or replace the converter with "
        f"@interop.adapters.flax.register_primitive('{primitive}', replace=True)",
    )
    error.primitive, error.location = primitive, location  # type: ignore[attr-defined]
    return error
