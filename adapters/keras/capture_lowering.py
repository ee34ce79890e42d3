"""The lowering context: builds ONNX nodes with onnx_ir while walking a Keras graph.

Converters (see `capture_layers.py`, `capture_ops.py`, `capture_recurrent.py`) receive
a `Builder` and `Tensor`s and call `b.op("Conv", [x, w], {"group": 2})`. The builder stamps every
node with the current layer scope (``interop.scope``), names weights after their Keras
variable path, deduplicates constants and cancels Transpose pairs made by the
NHWC <-> NCHW wrapping of convolutions, so the layout shims cost nothing at run time.

>>> b = Builder()                                             # doctest: +SKIP
>>> y = b.op("Relu", [x])                                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from interop import provenance

OPSET = 18  # the opset torch.onnx emits too, so graphs from every adapter share one target

_DTYPES = {
    "float32": ir.DataType.FLOAT,
    "float64": ir.DataType.DOUBLE,
    "float16": ir.DataType.FLOAT16,
    "bfloat16": ir.DataType.BFLOAT16,
    "int32": ir.DataType.INT32,
    "int64": ir.DataType.INT64,
    "int8": ir.DataType.INT8,
    "uint8": ir.DataType.UINT8,
    "bool": ir.DataType.BOOL,
}


def onnx_dtype(dtype: Any) -> ir.DataType:
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
    try:
        return _DTYPES[name]
    except KeyError:
        return ir.DataType.from_numpy(np.dtype(name))


@dataclass(eq=False)
class Tensor:
    """A value of the graph being built, with the Keras-side shape and Keras mask.

    `shape` uses None for dims unknown at trace time (batch, time); `mask` is the
    boolean ``(batch, time)`` value Keras would attach as ``_keras_mask``.
    """

    value: ir.Value
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    mask: Tensor | None = None

    @property
    def rank(self) -> int:
        return len(self.shape)


class Builder:
    """Collects nodes, initializers and layer scopes for one traced model."""

    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []
        self.initializers: dict[str, ir.Value] = {}
        self.kinds: dict[str, str] = {}
        self.scope = ""
        self.returns: dict[str, list[ir.Value]] = {}  # layer path -> what its calls returned
        self._variables: dict[int, ir.Value] = {}
        self._constants: dict[tuple, ir.Value] = {}
        self._counter = 0
        self._transposes: set[ir.Node] = set()
        # ``(builder, function, path, inputs, **kwargs)``: lowers a plain function of
        # keras.ops by calling it symbolically; set by capture.py to the walk's
        # `lower_callable` (the walk imports the converters, so they cannot import it)
        self.lower_callable: Any = None
        # graph input name -> the example array (concrete shapes for capture_concrete.py)
        self.examples: dict[str, Any] = {}

    # ------------------------------------------------------------------ scopes
    @contextlib.contextmanager
    def scoped(self, path: str) -> Iterator[None]:
        saved, self.scope = self.scope, path
        try:
            yield
        finally:
            self.scope = saved

    def fresh(self, hint: str) -> str:
        self._counter += 1
        base = f"{self.scope}/{hint}" if self.scope else hint
        return f"{base}_{self._counter}"

    # ------------------------------------------------------------------ nodes
    def op(
        self,
        op_type: str,
        inputs: Sequence[Tensor | ir.Value | None],
        attributes: Mapping[str, Any] | None = None,
        *,
        num_outputs: int = 1,
        domain: str = "",
    ) -> Any:
        """Append one node; returns its ir.Value (or a tuple for several outputs)."""
        values = [x.value if isinstance(x, Tensor) else x for x in inputs]
        node = ir.node(
            op_type,
            values,
            {k: v for k, v in (attributes or {}).items() if v is not None},
            domain=domain,
            num_outputs=num_outputs,
            name=self.fresh(op_type),
        )
        node.metadata_props[provenance.SCOPE] = self.scope
        for i, out in enumerate(node.outputs):
            out.name = node.name if num_outputs == 1 else f"{node.name}:{i}"
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else tuple(node.outputs)

    def const(self, array: Any, dtype: Any = None) -> ir.Value:
        """A constant initializer, shared between identical small constants."""
        array = np.asarray(array, dtype=dtype)
        if array.dtype == np.float64 and dtype is None:
            array = array.astype(np.float32)
        key = (array.dtype.str, array.shape, array.tobytes()) if array.size <= 16 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        self._counter += 1
        name = f"const_{self._counter}"
        value = ir.Value(
            name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name)
        )
        value.dtype = ir.DataType.from_numpy(array.dtype)
        self.initializers[name] = value
        if key is not None:
            self._constants[key] = value
        return value

    def variable(self, var: Any) -> ir.Value:
        """The initializer of a Keras variable, named after its path (made once per variable)."""
        if id(var) in self._variables:
            return self._variables[id(var)]
        array = variable_array(var)
        name = str(getattr(var, "path", None) or getattr(var, "name", "weight"))
        while name in self.initializers:  # two variables built under the same path
            name += "_"
        value = ir.Value(
            name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name)
        )
        value.dtype = ir.DataType.from_numpy(array.dtype)
        self.initializers[name] = value
        # Keras counts non-trainable weights (BatchNorm moving statistics) in
        # count_params, so they are "frozen" rather than "buffer" here.
        self.kinds[name] = (
            provenance.TRAINABLE if getattr(var, "trainable", True) else provenance.FROZEN
        )
        self._variables[id(var)] = value
        return value

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.const(np.asarray(list(values), dtype=np.int64))

    # ------------------------------------------------------------------ helpers
    def transpose(self, x: ir.Value, perm: Sequence[int]) -> ir.Value:
        """Transpose, cancelling against a producing Transpose that it undoes."""
        perm = [int(p) for p in perm]
        if perm == list(range(len(perm))):
            return x
        producer = x.producer()
        if (
            producer is not None
            and producer.op_type == "Transpose"
            and producer in self._transposes
            # Only within one layer: a layer's outputs keep Keras's layout so that
            # sub-models cut at a layer boundary see what Keras sees; ONNX Runtime's
            # transpose optimizer removes the pairs left between layers.
            and producer.metadata_props.get(provenance.SCOPE) == self.scope
        ):
            first = list(producer.attributes["perm"].as_ints())
            if [first[p] for p in perm] == list(range(len(perm))):
                return producer.inputs[0]
        out = self.op("Transpose", [x], {"perm": perm})
        self._transposes.add(out.producer())
        return out

    def to_channels_first(self, x: ir.Value, rank: int) -> ir.Value:
        return self.transpose(x, [0, rank - 1, *range(1, rank - 1)])

    def to_channels_last(self, x: ir.Value, rank: int) -> ir.Value:
        return self.transpose(x, [0, *range(2, rank), 1])


def variable_array(var: Any) -> np.ndarray:
    """A variable's value for its initializer, read-only (nothing writes into the model
    through the graph). On TensorFlow it shares the variable's buffer: TensorFlow copies a
    variable's buffer on write while a read of it is alive (assign, assign_add, scatter and
    a training step leave the read as it was), so the graph holds no second copy of the
    weights (it did, for a 0.5 GB Llama backbone +0.5 GB, two copies at once per variable).
    Elsewhere a copy: torch parameters change in place, and Keras's JAX trainer donates the
    variables' buffers.
    """
    import keras

    value = var.value if hasattr(var, "value") and hasattr(var, "path") else var
    array = None
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(value, tf.Variable):  # not in a StatelessScope, nor autocast
            value = value.read_value()  # the variable's buffer, on the CPU
        if isinstance(value, tf.Tensor):
            array = np.asarray(value)
    if array is None:
        array = to_numpy(value)
        if not array.flags.owndata:  # a view of the backend's storage (a torch parameter's)
            array = np.array(array)
    view = array.view()
    view.flags.writeable = False
    return view


def to_numpy(value: Any) -> np.ndarray:
    """A Keras tensor or variable (any backend) as a NumPy array."""
    import keras

    if hasattr(value, "value") and hasattr(value, "path"):  # a keras.Variable
        value = value.value
    return np.asarray(keras.ops.convert_to_numpy(value))
