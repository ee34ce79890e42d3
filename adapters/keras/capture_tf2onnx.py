"""The TensorFlow backend's tracer: a concrete ``tf.function`` of a layer's call,
converted by tf2onnx (capture_tracer.py splices the result into the walk).

tf2onnx leaves a few TF ops unconverted that keras_hub layers write; they are converted
here: ``Erfc`` (Keras's exact GELU) and the ``TensorList`` ops of a ``tf.TensorArray``
a Python loop fills (keras_hub RWKV7's recurrence, unrolled over the example's length).
A TensorArray a ``tf.while_loop`` carries (``ops.map``) stays tf2onnx's: a ``Loop`` whose
writes are scan outputs.

>>> model = trace_tensorflow(function, weights, specs, layer)   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .capture_lowering import OPSET


class Deferred:
    """A traced graph with a branch, its conversion to ONNX left until it is chosen: the
    TensorFlow tracer's run-time graph with a ``tf.cond`` the batch-free trace may fold
    (keras_hub SAM and SAM3's prompt encoders), whose tf2onnx conversion (half of SAM3's
    trace time) is then never needed."""

    def __init__(self, convert: Callable[[], Any]) -> None:
        self.convert = convert


def trace_tensorflow(
    function: Callable, weights: list[np.ndarray], specs: list[tuple], layer: Any
) -> Any:
    """A concrete ``tf.function`` of the call, converted by tf2onnx (a `Deferred`
    conversion where the graph branches on a tensor)."""
    import tensorflow as tf

    signature = [tf.TensorSpec(w.shape, w.dtype, name=f"w{i}") for i, w in enumerate(weights)]
    signature += [
        tf.TensorSpec([d if isinstance(d, int) else None for d in shape], dtype, name=f"x{i}")
        for i, (shape, dtype) in enumerate(specs)
    ]
    count = len(weights)

    def flat(*values: Any) -> list[Any]:
        return function(list(values[:count]), list(values[count:]))

    traced = tf.function(flat, input_signature=signature, autograph=False)
    concrete = traced.get_concrete_function()  # the layer's own failure, before tf2onnx's
    if any(op.type in _BRANCHES for op in concrete.graph.get_operations()):
        return Deferred(lambda: _converted(traced, signature))
    return _converted(traced, signature)


_BRANCHES = ("If", "StatelessIf", "Case", "StatelessCase")  # tf2onnx writes an ONNX If


def _converted(traced: Any, signature: list[Any]) -> Any:
    """The tf.function converted by tf2onnx, with interop's handlers for the ops it lacks."""
    import tf2onnx

    _RESERVED.clear()
    _WRITTEN.clear()
    with _quiet_tf2onnx():
        model, _ = tf2onnx.convert.from_function(
            traced, input_signature=signature, opset=OPSET, custom_op_handlers=_TF_OPS
        )
    unconverted = sorted(_unknown_ops(model.graph))
    if unconverted:  # tf2onnx leaves TF ops it cannot convert in the graph
        raise ValueError(f"tf2onnx cannot convert the TF ops {', '.join(unconverted)}")
    return model


def _erfc(ctx: Any, node: Any, name: str, args: Any) -> None:
    """TF's Erfc (Keras's exact GELU on TensorFlow), which tf2onnx does not convert, as
    1 - Erf(x)."""
    from tf2onnx import utils

    x = node.input[0]
    one = np.array(1, dtype=utils.map_onnx_to_numpy_type(ctx.get_dtype(x)))
    erf = ctx.make_node("Erf", [x]).output[0]
    node.type = "Sub"
    ctx.replace_inputs(node, [ctx.make_const(utils.make_name("one"), one).output[0], erf])


def _tensor_list_reserve(ctx: Any, node: Any, name: str, args: Any) -> None:
    """A TensorArray of a Python loop (keras_hub RWKV7's recurrence, unrolled over the
    example's length): the list is a tensor ``(length, *item)``, made by its first write
    (which knows the item's shape); the reserve itself stands for its length."""
    from onnx import TensorProto

    if any(c.is_while() for c in ctx.find_output_consumers(node.output[0])):
        return  # a while loop's list (``ops.map``): tf2onnx makes it a Loop's scan output
    _RESERVED[node.output[0]] = node.input[1]
    node.type = "Identity"
    ctx.replace_inputs(node, [node.input[1]])
    ctx.set_dtype(node.output[0], TensorProto.INT32)
    ctx.set_shape(node.output[0], [])


def _tensor_list_set_item(ctx: Any, node: Any, name: str, args: Any) -> None:
    """``list[index] = item`` as ScatterND on the list's tensor."""
    from onnx import TensorProto

    handle, index, item = node.input[:3]
    dtype = ctx.get_dtype(item)
    producer = ctx.get_node_by_output(handle)
    if handle not in _RESERVED and handle not in _WRITTEN and producer.type != "TensorListReserve":
        # a list carried by a while loop (the body's input): tf2onnx's While conversion
        # makes the write a scan output; a ScatterND here would write into the int32 length
        # a reserve outside stands for (keras_hub D-FINE's ``ops.map``, refused by ORT)
        return
    if handle in _RESERVED or producer.type == "TensorListReserve":
        length = _RESERVED.get(handle) or ctx.get_node_by_output(handle).input[1]
        length = ctx.make_node("Cast", [length], attr={"to": TensorProto.INT64}).output[0]
        length = ctx.make_node("Reshape", [length, _int64s(ctx, [1])]).output[0]
        shape = ctx.make_node("Shape", [item]).output[0]
        shape = ctx.make_node("Concat", [length, shape], attr={"axis": 0}).output[0]
        zero = ctx.make_node("Cast", [_int64s(ctx, [0])], attr={"to": dtype}).output[0]
        handle = ctx.make_node("Expand", [ctx.make_node("Squeeze", [zero]).output[0], shape])
        handle = handle.output[0]
    position = ctx.make_node("Cast", [index], attr={"to": TensorProto.INT64}).output[0]
    position = ctx.make_node("Reshape", [position, _int64s(ctx, [1, 1])]).output[0]
    update = ctx.make_node("Unsqueeze", [item, _int64s(ctx, [0])]).output[0]
    node.type = "ScatterND"
    _WRITTEN.add(node.output[0])
    ctx.replace_inputs(node, [handle, position, update])
    ctx.set_dtype(node.output[0], dtype)


def _tensor_list_stack(ctx: Any, node: Any, name: str, args: Any) -> None:
    """The list's tensor as it is."""
    node.type = "Identity"
    ctx.replace_inputs(node, [node.input[0]])


def _int64s(ctx: Any, values: list[int]) -> str:
    from tf2onnx import utils

    return ctx.make_const(utils.make_name("ints"), np.array(values, np.int64)).output[0]


_RESERVED: dict[str, str] = {}  # a reserve's output -> its length, during one conversion
_WRITTEN: set[str] = set()  # the lists (ScatterND outputs) those writes made

# TF ops tf2onnx leaves out, converted here: name -> (handler, extra arguments)
_TF_OPS = {
    "Erfc": (_erfc, []),
    "TensorListReserve": (_tensor_list_reserve, []),
    "TensorListSetItem": (_tensor_list_set_item, []),
    "TensorListStack": (_tensor_list_stack, []),
}


def _unknown_ops(graph: Any) -> set[str]:
    """Op types in an ONNX GraphProto (and its subgraphs) that no ONNX schema defines."""
    import onnx

    found = set()
    for node in graph.node:
        if not onnx.defs.has(node.op_type, node.domain):
            found.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g, *attr.graphs] if attr.g.node or attr.graphs else []:
                found |= _unknown_ops(sub)
    return found


@contextlib.contextmanager
def _quiet_tf2onnx() -> Iterator[None]:
    logger = logging.getLogger("tf2onnx")
    saved = logger.level
    logger.setLevel(logging.CRITICAL)  # its unsupported-op report: ours says it
    try:
        yield
    finally:
        logger.setLevel(saved)
