"""`interop.keras.Layer`: a model of any framework as a trainable Keras layer.

Defined here, in the keras adapter, and re-exported as ``interop.keras.Layer`` (the
name to use); the host's ``nesting`` (`interop.hosts`) is this class.

The guest is traced (or loaded) into a Graph and emitted with the Keras emitter, on
whichever Keras backend is active (TensorFlow, JAX or torch), so its weights are Keras
variables of the host and train with ``model.fit``. Calling the layer on a symbolic
input checks the input against the guest's signature at definition time and computes
the output shape from the graph's shape inference. The layer's config carries the
graph (ONNX bytes) and the current weights, so ``model.save`` /
``keras.models.load_model`` work in a process where the guest's framework is not
installed (``import interop`` is enough, before or after ``import keras``: it registers the
class once Keras is imported, see interop/keras_registration.py):

>>> inp = keras.Input((3, 32, 32))                                      # doctest: +SKIP
>>> x = interop.keras.Layer(torch_backbone, example_inputs=(sample,))(inp)  # doctest: +SKIP
>>> model = keras.Model(inp, keras.layers.Dense(10)(x))                 # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import keras
import numpy as np

from interop.emit import as_graph, to_keras
from interop.errors import ShapeError
from interop.graph import Graph
from interop.guests import check_guest_inputs
from interop.serialization import load

__all__ = ["Layer"]


@keras.saving.register_keras_serializable(package="interop", name="Layer")
class Layer(keras.layers.Layer):
    """Wrap a torch / Keras / Flax model, an interop.Graph or an ONNX file as a Keras layer."""

    # the public name: reprs, pickles and saved models say interop.keras.Layer, as before the
    # class moved here (interop.keras re-exports it)
    __module__ = "interop.keras"

    def __init__(
        self,
        source: Any = None,
        example_inputs: Any = None,
        *,
        graph: str | None = None,
        weights: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if graph is not None:  # from_config: the graph travels as base64 ONNX bytes
            self.graph: Graph = load(base64.b64decode(graph))
        elif source is not None:
            self.graph = as_graph(source, example_inputs)
        else:
            raise TypeError("interop.keras.Layer needs a model, a Graph or an ONNX file")
        self.net = to_keras(self.graph)
        if weights is not None:
            _assign(self.net, _decode_arrays(weights))

    def call(self, *inputs: Any, training: Any = None) -> Any:
        flat = (
            list(inputs[0])
            if len(inputs) == 1 and isinstance(inputs[0], (list, tuple))
            else list(inputs)
        )
        return self.net(flat if len(flat) > 1 else flat[0], training=training)

    def compute_output_spec(self, *inputs: Any, training: Any = None) -> Any:
        flat = (
            list(inputs[0])
            if len(inputs) == 1 and isinstance(inputs[0], (list, tuple))
            else list(inputs)
        )
        sizes = check_guest_inputs(self.graph.name, self.graph.inputs, flat)
        outputs = [
            keras.KerasTensor(_resolve(spec.shape, sizes), dtype=str(spec.dtype))
            for spec in self.graph.outputs
        ]
        return outputs[0] if len(outputs) == 1 else outputs

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["graph"] = base64.b64encode(self.graph.to_bytes()).decode("ascii")
        config["weights"] = _encode_arrays(
            {v.path: keras.ops.convert_to_numpy(v) for v in self.net.weights}
        )
        return config


def _resolve(shape: tuple[Any, ...] | None, sizes: dict[str, int | None]) -> tuple[int | None, ...]:
    if shape is None:
        raise ShapeError(
            "The guest's output has no inferred shape", fix="trace it with example inputs"
        )
    return tuple(
        d if isinstance(d, int) else sizes.get(str(d)) if d is not None else None for d in shape
    )


def _encode_arrays(arrays: dict[str, np.ndarray]) -> str:
    buffer = io.BytesIO()
    named: dict[str, Any] = {_safe(k): v for k, v in arrays.items()}
    np.savez(buffer, **named)  # no pickles: plain arrays
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_arrays(text: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _safe(path: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.-]", "__", path)


def _assign(model: Any, arrays: dict[str, np.ndarray]) -> None:
    for variable in model.weights:
        key = _safe(variable.path)
        if key in arrays:
            variable.assign(arrays[key])
