"""`interop.flax.Module`: a model of any framework as a trainable Flax nnx submodule.

The guest is traced (or loaded) into a Graph and emitted by the Flax emitter, so its
weights are ``nnx.Param`` / ``nnx.BatchStat`` state of the host, it runs under
``nnx.jit`` and trains with optax. Save it with ``nnx.split`` / ``nnx.merge`` (or any
nnx checkpointing); ``module.graph`` is the guest's Graph, to save beside the state:

>>> self.backbone = interop.flax.Module(torch_backbone, example_inputs=(x,))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from .emit import as_graph, to_flax
from .errors import ShapeError
from .graph import Graph, TensorSpec

__all__ = ["Module"]


class Module(nnx.Module):
    """Wrap a torch / Keras / Flax model, an interop.Graph or an ONNX file as an nnx module."""

    def __init__(self, source: Any, example_inputs: Any = None, *, rngs: nnx.Rngs | None = None):
        graph = as_graph(source, example_inputs)
        # static metadata only: nnx keeps non-Variable attributes in the graphdef
        self.input_specs: tuple[TensorSpec, ...] = tuple(graph.inputs)
        self.guest_name: str = graph.name
        self.net = to_flax(graph, rngs=rngs)
        self._graph = graph

    @property
    def graph(self) -> Graph:
        return self._graph

    def __call__(self, *inputs: Any) -> Any:
        check_arrays(self.guest_name, self.input_specs, inputs)
        return self.net(*inputs)


def check_arrays(name: str, specs: tuple[TensorSpec, ...], inputs: tuple[Any, ...]) -> None:
    """Raise ShapeError when `inputs` do not fit the guest's signature (checked at trace time)."""
    if len(inputs) != len(specs):
        raise ShapeError(
            f"Guest '{name}' got {len(inputs)} inputs",
            f"{len(specs)}: " + ", ".join(map(str, specs)),
        )
    for spec, array in zip(specs, inputs):
        shape = tuple(array.shape)
        if spec.shape is not None and (
            len(shape) != len(spec.shape)
            or any(isinstance(w, int) and w != g for w, g in zip(spec.shape, shape))
        ):
            raise ShapeError(
                f"Input '{spec.name}' of guest '{name}' got shape {shape}",
                f"shape {spec.shape} (names are dims that may vary)",
                "reshape or transpose the input (the guest keeps its own layout, e.g. NCHW for torch)",
            )
        if spec.dtype is not None and np.dtype(array.dtype).kind != spec.dtype.kind:
            raise ShapeError(
                f"Input '{spec.name}' of guest '{name}' has dtype {array.dtype}",
                f"dtype {spec.dtype}",
            )
