"""`interop.torch.Module`: a model of any framework as a trainable PyTorch submodule.

Defined here, in the torch adapter, and re-exported as ``interop.torch.Module`` (the
name to use); the host's ``nesting`` (`interop.hosts`) is this class.

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

import torch

from interop.emit import as_graph, to_torch
from interop.graph import Graph
from interop.guests import check_guest_inputs

__all__ = ["Module"]


class Module(torch.nn.Module):
    """Wrap a torch / Keras / Flax model, an interop.Graph or an ONNX file as a submodule.

    Inputs are checked against the guest's signature (rank, static dims, dtype kind)
    before running, so a wrong input names the guest's input instead of failing
    deep inside the emitted graph.
    """

    # the public name: reprs, pickles and saved models say interop.torch.Module, as before the
    # class moved here (interop.torch re-exports it)
    __module__ = "interop.torch"

    def __init__(self, source: Any, example_inputs: Any = None, *, check_inputs: bool = True):
        super().__init__()
        graph = as_graph(source, example_inputs)
        self.graph: Graph = graph
        self.check_inputs = check_inputs
        # a submodule follows its host's train()/eval() like any nn.Module: it starts in
        # training mode as every newly built nn.Module does (to_torch itself starts in eval)
        self.net = to_torch(graph).train(self.training)

    def forward(self, *args: Any) -> Any:
        if self.check_inputs:
            check_guest_inputs(self.graph.name, self.graph.inputs, args)
        return self.net(*args)

    def extra_repr(self) -> str:
        inputs = ", ".join(str(spec) for spec in self.graph.inputs)
        return f"guest={self.graph.name!r} from {self.graph.source.get('framework', 'onnx')}, inputs: {inputs}"
