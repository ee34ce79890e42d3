"""`interop.torch.Module`: a model of any framework as a trainable PyTorch submodule.

The guest is traced (or loaded) into a Graph and emitted by the torch emitter, so its
weights are `nn.Parameter`s named after the source and gradients flow through it.
Save it with ``state_dict``; rebuild it from the saved Graph:

>>> enc = interop.torch.Module(keras_encoder, example_inputs=(x,))   # doctest: +SKIP
>>> enc.graph.save("enc.onnx"); torch.save(enc.state_dict(), "enc.pt")  # doctest: +SKIP
>>> again = interop.torch.Module(interop.load("enc.onnx"))           # doctest: +SKIP
>>> again.load_state_dict(torch.load("enc.pt"))                      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .emit import as_graph, to_torch
from .errors import ShapeError
from .graph import Graph

__all__ = ["Module"]


class Module(torch.nn.Module):
    """Wrap a torch / Keras / Flax model, an interop.Graph or an ONNX file as a submodule.

    Inputs are checked against the guest's signature (rank, static dims, dtype kind)
    before running, so a wrong input names the guest's input instead of failing
    deep inside the emitted graph.
    """

    def __init__(self, source: Any, example_inputs: Any = None, *, check_inputs: bool = True):
        super().__init__()
        graph = as_graph(source, example_inputs)
        self.graph: Graph = graph
        self.check_inputs = check_inputs
        self.net = to_torch(graph)

    def forward(self, *args: Any) -> Any:
        if self.check_inputs:
            check_tensors(self.graph, args)
        return self.net(*args)

    def extra_repr(self) -> str:
        inputs = ", ".join(str(spec) for spec in self.graph.inputs)
        return f"guest={self.graph.name!r} from {self.graph.source.get('framework', 'onnx')}, inputs: {inputs}"


def check_tensors(graph: Graph, args: tuple[Any, ...]) -> None:
    """Raise ShapeError when `args` do not fit the graph's inputs."""
    specs = graph.inputs
    if len(args) != len(specs):
        raise ShapeError(
            f"Guest '{graph.name}' got {len(args)} inputs",
            f"{len(specs)}: " + ", ".join(str(s) for s in specs),
        )
    for spec, tensor in zip(specs, args):
        shape = tuple(tensor.shape)
        if spec.shape is not None and (
            len(shape) != len(spec.shape)
            or any(isinstance(w, int) and w != g for w, g in zip(spec.shape, shape))
        ):
            raise ShapeError(
                f"Input '{spec.name}' of guest '{graph.name}' got shape {shape}",
                f"shape {spec.shape} (names are dims that may vary)",
                "reshape the input, or trace the guest with dynamic_dims for that axis",
            )
        if spec.dtype is not None:
            dtype = np.dtype(str(tensor.dtype).replace("torch.", ""))
            if dtype.kind != spec.dtype.kind:
                raise ShapeError(
                    f"Input '{spec.name}' of guest '{graph.name}' has dtype {tensor.dtype}",
                    f"dtype {spec.dtype}",
                )
