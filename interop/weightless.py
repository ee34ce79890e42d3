"""ONNX protos and ONNX Runtime sessions of a graph that do not copy its weights.

A capture's checks (the Keras shape correction, `interop.dim_check`) serialize the graph
for ONNX shape inference and run it on ONNX Runtime while the source model still holds
its weights, and the graph holds them too (sharing them where it can). Serialized with
its weights, the graph would hold them twice more (the proto, and inference's or ONNX
Runtime's own copy): +2 GB for a 0.5 GB Llama backbone. Here inference gets the large
initializers as external references never read (`data_elided`), and a session gets them
as OrtValues over the arrays the graph holds (`session`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    from .graph import Graph

_ELIDED = 1024  # initializers over this many elements go without their data
_UNREAD = "interop-dim-check-unread"  # the external file an elided initializer names
# dtypes an ONNX Runtime session takes from a numpy array as is (no bfloat16, no 4-bit)
_SHARED = {
    ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.INT8,
    ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64, ir.DataType.UINT8,
    ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64, ir.DataType.BOOL,
}  # fmt: skip


@contextlib.contextmanager
def data_elided(model: ir.Model, names: Collection[str] | None = None) -> Iterator[None]:
    """While inside, `model`'s initializers over `_ELIDED` elements are external references
    that nothing reads: a proto serialized then carries their types and shapes only, what
    ONNX shape inference needs (a copy of the weights would cost more than the inference:
    +2 GB for a 0.5 GB Llama backbone, the proto and inference's own copy of it). Small
    ones (shape constants that data propagation reads) keep their values. With `names`,
    only those initializers (the large ones among them) are elided.

    >>> import numpy as np
    >>> w = ir.Value(name="w", const_value=ir.tensor(np.ones((64, 64), np.float32), name="w"))
    >>> model = ir.Model(ir.Graph([], [w], nodes=[], initializers=[w]), ir_version=10)
    >>> with data_elided(model):
    ...     len(ir.serde.serialize_model(model).graph.initializer[0].raw_data)
    0
    >>> float(w.const_value.numpy().sum())
    4096.0
    """
    kept: dict[ir.Value, Any] = {}
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if names is not None and value.name not in names:
                continue
            if tensor is not None and tensor.size > _ELIDED:
                kept[value] = tensor
                value.const_value = ir.ExternalTensor(
                    _UNREAD, 0, tensor.nbytes, tensor.dtype,
                    shape=ir.Shape(tensor.shape.numpy()), name=str(value.name), base_dir="",
                )  # fmt: skip
        yield
    finally:
        for value, tensor in kept.items():
            value.const_value = tensor


def session(graph: Graph) -> Any:
    """An ONNX Runtime session of `graph` that reads its large weights where they are.

    Serialized, the weights would be in memory three times more during the check (the
    proto's bytes, ONNX Runtime's initializers, its prepacked MatMul copies: +1.5 GB for
    a 0.5 GB Llama backbone). Instead the proto names them as external data never read,
    and the session is given each array as an OrtValue over its own memory
    (``SessionOptions.add_initializer``, which ONNX Runtime uses as is on the CPU), with
    prepacking off and without graph optimizations (which could read the unread data).
    Where ONNX Runtime refuses that, the graph goes serialized as before.
    """
    import onnxruntime as ort

    model = graph.model
    shared: dict[str, Any] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.size > _ELIDED and tensor.dtype in _SHARED:
            array = np.ascontiguousarray(tensor.numpy())  # a view of the array held
            shared[name] = ort.OrtValue.ortvalue_from_numpy(array)
    if shared:
        try:
            return _shared_session(model, shared)
        except Exception:  # noqa: S110  (the serialized graph below says what is wrong)
            pass
    from .serialization import PROTO_LIMIT, weight_bytes

    if weight_bytes(model) >= PROTO_LIMIT:
        raise ValueError("over one protobuf")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing size is reported by the check
    return ort.InferenceSession(graph.to_bytes(), options, providers=["CPUExecutionProvider"])


def _shared_session(model: ir.Model, shared: dict[str, Any]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    for name, value in shared.items():
        options.add_initializer(name, value)
    with data_elided(model, shared), tempfile.TemporaryDirectory() as folder:
        proto = ir.serde.serialize_model(model)
        path = os.path.join(folder, "graph.onnx")
        with open(path, "wb") as f:
            f.write(proto.SerializeToString())
        open(os.path.join(folder, _UNREAD), "wb").close()  # it must exist; never read
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session._interop_shared = shared  # the arrays it reads: alive while it is
    return session
