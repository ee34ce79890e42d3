"""`interop.flax.Module`: a model of any framework as a trainable Flax nnx submodule.

Defined here, in the flax adapter, and re-exported as ``interop.flax.Module`` (the
name to use); the host's ``nesting`` (`interop.hosts`) is this class.

The guest is traced (or loaded) into a Graph and emitted by the Flax emitter, so its
weights are ``nnx.Param`` / ``nnx.BatchStat`` state of the host, it runs under
``nnx.jit`` and trains with optax. Save it with ``nnx.split`` / ``nnx.merge`` (or any
nnx checkpointing); ``module.graph`` is the guest's Graph, to save beside the state:

>>> self.backbone = interop.flax.Module(torch_backbone, example_inputs=(x,))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from interop.emit import as_graph, to_flax
from interop.graph import Graph, TensorSpec
from interop.guests import check_guest_inputs

__all__ = ["Module"]


class Module(nnx.Module):
    """Wrap a torch / Keras / Flax model, an interop.Graph or an ONNX file as an nnx module."""

    # the public name: reprs, pickles and saved models say interop.flax.Module, as before the
    # class moved here (interop.flax re-exports it)
    __module__ = "interop.flax"

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
        check_guest_inputs(self.guest_name, self.input_specs, inputs)
        return self.net(*inputs)
