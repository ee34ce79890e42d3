"""Capture without weights: a Keras model traced with its weights given apart (issue 20).

``interop.trace(model, example_inputs, weights=...)``. The weights come from a safetensors
checkpoint (a file, a folder of shards with its index) or a mapping of names to arrays
(`interop.weights`), named by the Keras variable paths the capture gives initializers
(``block_1/dense/kernel``, as ``[v.path for v in model.weights]``).

Keras has no meta device: a variable holds a value once built. Two ways in:

- built under ``keras.StatelessScope(initialize_variables=False)``, Keras defers every
  variable's initialization: the model has shapes, dtypes and paths and no storage (what
  ``jax.eval_shape`` is to Flax). A model passed unbuilt is built so here, by a symbolic
  call on the example's shapes. Such variables stay uninitialized: Keras computes with
  them only after ``model.set_weights`` / ``variable.assign``.
- a model built normally holds its own (random) values, one copy of the weights in
  memory; they are never read by the capture nor copied into the graph.

Either way:

1. the source's headers are checked against ``model.weights`` (missing or extra names,
   shapes, dtypes) before anything is traced: `WeightsError` names the tensor and the file;
2. the model is traced with a `Builder` whose variables are initializers of zeros made
   only if read (the trace needs shapes only), never the variables' values;
3. each initializer becomes the source's lazy tensor (an `onnx_ir.ExternalTensor` over
   the shard's bytes): nothing is read until the graph is saved, run or emitted.

The dynamic-dim check compares the graph with the model run eagerly, whose values are not
the weights: it is off. With ``compute_dtype="float32"`` a float32 model takes
half-precision weights, each converted when read.
"""

from __future__ import annotations

import contextlib
from typing import Any

import keras
import numpy as np
import onnx_ir as ir
from keras import tree

from interop import provenance
from interop.errors import TraceError, WeightsError
from interop.graph import Graph
from interop.weights import Wanted, attach_weights, match_weights, open_weights, placeholder

from .capture import call_structure, trace_model
from .capture_lowering import Builder, onnx_dtype
from .capture_walk import with_training


class LazyWeights(Builder):
    """A `Builder` whose model variables are placeholders named after their paths."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names  # id(variable) -> initializer name

    def variable(self, var: Any) -> ir.Value:
        name = self.names.get(id(var))
        if name is None or id(var) in self._variables:  # a seed or other state: as usual
            return super().variable(var)
        shape = tuple(int(d) for d in var.shape)
        dtype = onnx_dtype(var.dtype)
        value = ir.Value(
            name=name, shape=ir.Shape(shape), const_value=placeholder(shape, dtype, name)
        )
        value.dtype = dtype
        self.initializers[name] = value
        self.kinds[name] = provenance.TRAINABLE if var.trainable else provenance.FROZEN
        self._variables[id(var)] = value
        return value


def trace_with_weights(
    model: Any,
    example_inputs: Any,
    *,
    weights: Any = None,
    compute_dtype: Any = None,
    **options: Any,
) -> Graph:
    """Trace a Keras model whose weights are read lazily from `weights`.

    >>> with keras.StatelessScope(initialize_variables=False):         # doctest: +SKIP
    ...     backbone = keras_hub.models.GemmaBackbone(**config)
    >>> g = interop.trace(backbone, inputs, weights="checkpoint/")    # doctest: +SKIP
    """
    source = open_weights(weights)
    convert = _floating(compute_dtype)
    if not model.built:
        build_deferred(model, example_inputs)
    names = variable_names(model)
    # every weight must come from the source: the model's own values are never used
    wanted = [
        Wanted(names[id(var)], tuple(int(d) for d in var.shape), onnx_dtype(var.dtype))
        for var in model.weights
    ]
    found = match_weights(
        source,
        wanted,
        model=type(model).__name__,
        spelled="the Keras variable paths ([v.path for v in model.weights])",
        dtype_fix="build the model with dtype='{dtype}' (its dtype policy), or a float32 model "
        "and compute_dtype='float32'",
        convert=convert,
    )
    options["check_dims"] = False  # it runs the model eagerly, whose values are not these
    with _deferred(model):
        graph = trace_model(model, example_inputs, builder=LazyWeights(names), **options)
    attach_weights(graph.model, source, found, convert=convert)
    return graph


def refuse_deferred(model: Any) -> None:
    """A trace without ``weights=`` of a model whose variables have no values (built under
    ``StatelessScope(initialize_variables=False)``) would bake their initializers' random
    values into the graph: an error instead."""
    deferred = [v.path for v in getattr(model, "weights", []) if getattr(v, "_value", 0) is None]
    if deferred:
        raise TraceError(
            f"{len(deferred)} variable(s) of {type(model).__name__} have no value, e.g. "
            f"'{deferred[0]}' (the model was built under "
            "keras.StatelessScope(initialize_variables=False))",
            "a model with values, or its weights given apart",
            "pass weights= (a safetensors file, a folder of shards, or a mapping of Keras "
            "variable path -> array); see docs/guides/large-models.md",
        )


def variable_names(model: Any) -> dict[int, str]:
    """id(variable) -> its path, made unique as the capture does (a ``_`` appended)."""
    names: dict[int, str] = {}
    taken: set[str] = set()
    for var in model.weights:
        if id(var) in names:
            continue
        name = str(var.path)
        while name in taken:
            name += "_"
        taken.add(name)
        names[id(var)] = name
    return names


def build_deferred(model: Any, example_inputs: Any) -> None:
    """Build `model` by a symbolic call on the example's shapes, its variables left
    uninitialized (no storage: see the module docstring)."""
    args, kwargs = call_structure(model, example_inputs)

    def symbolic(x: Any) -> Any:
        array = np.asarray(keras.ops.convert_to_numpy(x)) if not isinstance(x, np.ndarray) else x
        dtype = keras.config.floatx() if array.dtype == np.float64 else str(array.dtype)
        return keras.KerasTensor(array.shape, dtype=dtype)

    args, kwargs = tree.map_structure(symbolic, (list(args), dict(kwargs)))
    with keras.StatelessScope(initialize_variables=False):
        model(*args, **with_training(model, kwargs))


def _deferred(model: Any) -> Any:
    """Keras's own output-spec inference (a symbolic call) opens a `StatelessScope`, whose
    exit initializes every deferred variable of the process: a model built without storage
    would get all its weights allocated by the trace. Inside an outer scope that initializes
    nothing, those exits do not (measured: +0.6 GiB for a 0.5 GiB Llama backbone, then 0)."""
    if all(getattr(var, "_value", True) is not None for var in model.weights):
        return contextlib.nullcontext()
    return keras.StatelessScope(initialize_variables=False)


def _floating(compute_dtype: Any) -> bool:
    if compute_dtype is None:
        return False
    name = str(getattr(compute_dtype, "name", compute_dtype))
    if name not in ("float32", "float16", "bfloat16", "float64"):
        raise WeightsError(
            f"compute_dtype={compute_dtype!r} is not a floating dtype",
            "'float32', 'float16' or 'bfloat16'",
            "build the Keras model in the dtype to compute in and pass compute_dtype='float32'",
        )
    return True
