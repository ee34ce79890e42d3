"""`interop.trace`: find the adapter that accepts a model and let it build the Graph.

Adapters (the capture side of a framework) are discovered through the
``interop.adapters`` entry-point group; the built-in torch, keras and flax adapters are
declared the same way. An adapter's ``accepts`` must not import its framework unless the
model came from it, so that ``import interop`` and tracing stay cheap. The emit side of a
framework, its host, is found the same way (`interop.hosts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from .errors import InteropError, UnsupportedModelError
from .registry import PluginRegistry, Registry

if TYPE_CHECKING:
    import numpy as np

    from .graph import Graph

ENTRY_POINT_GROUP = "interop.adapters"
_BUILTIN = {
    "torch": "interop.adapters.torch:ADAPTER",
    "keras": "interop.adapters.keras:ADAPTER",
    "flax": "interop.adapters.flax:ADAPTER",
}


class Adapter(Protocol):
    """What an adapter provides (see docs/design.md, "Writing an adapter")."""

    name: str
    description: str  # what it accepts, e.g. "torch.nn.Module"

    def accepts(self, model: Any) -> bool: ...

    def trace(self, model: Any, example_inputs: Any, **options: Any) -> Graph: ...

    def run_source(self, model: Any, example_inputs: Any) -> list[tuple[str, np.ndarray]]: ...

    # optional: ``input_feeds(model, example_inputs) -> {graph input name: array}`` lets
    # interop.verify feed nested example inputs (dicts, lists) by the graph's input names


ADAPTERS: PluginRegistry[Adapter] = PluginRegistry(
    "trace", group=ENTRY_POINT_GROUP, builtin=_BUILTIN, kind="adapter"
)


def register_adapter(adapter: Adapter, *, replace: bool = False) -> Adapter:
    """Register an adapter object (entry points do this for installed packages)."""
    return ADAPTERS.register(adapter.name, adapter, replace=replace)


def load_adapters() -> Registry[Adapter]:
    """Load every adapter of the entry-point group once (plus the built-ins)."""
    return ADAPTERS.load()


def adapter_for(model: Any) -> Adapter:
    adapters = load_adapters()
    for _, adapter in adapters.items():
        if adapter.accepts(model):
            return adapter
    raise UnsupportedModelError(model, [a.description for _, a in adapters.items()])


def trace(model: Any, example_inputs: Any = None, **options: Any) -> Graph:
    """Trace a model of any supported framework into an `interop.Graph`.

    `example_inputs` is one tensor/array, a tuple of them, or a dict of named inputs.
    The batch dimension is dynamic by default (``dynamic_batch=False`` turns it off; an
    input whose leading size differs from the first input's gets a dim of its own,
    ``batch_<input>``, since one name would claim the sizes equal);
    ``dynamic_dims={"input_ids": {1: "seq"}}`` makes other dims dynamic. Each declared
    dynamic dim is checked before `trace` returns (`interop.dim_check`): the graph runs at
    a second size of it against the model, and a dim the model fixes (a reshape to the
    example's batch, a constant it broadcasts with) is declared static with a warning
    naming the layer or source line; ``check_dims=False`` skips the check (about one
    extra model call and one ONNX Runtime run per trace).

    ``weights=`` traces a model built without its weights (torch's meta device or
    ``FakeTensorMode``, an ``nnx.eval_shape`` module or linen ``(module, jax.eval_shape(
    module.init, ...))``, a Keras model built under ``StatelessScope(initialize_variables=
    False)``) and reads them lazily from a safetensors file, a folder of shards with its index json, or a
    mapping of names to arrays: nothing is read until the graph is saved, run or emitted
    (``compute_dtype="float32"`` computes in float32 from half-precision files; the
    second-size dim check is skipped, a meta model cannot run). See
    docs/guides/large-models.md.

    >>> with torch.device("meta"):                                  # doctest: +SKIP
    ...     model = LlamaForCausalLM(config)
    >>> g = interop.trace(model, inputs, weights="checkpoint/")     # doctest: +SKIP

    >>> import interop, torch
    >>> g = interop.trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> len(g.layers)                  # a bare Linear has no sub-layers
    0
    >>> g.count_params()
    10
    """
    from .graph import Graph

    if isinstance(model, Graph):
        return model
    adapter = adapter_for(model)
    if example_inputs is None:
        raise InteropError(
            f"interop.trace needs example inputs to trace a {adapter.description}",
            "example_inputs: a tensor, a tuple of tensors or a dict of named tensors",
            "call interop.trace(model, (x,)) with a small batch of real-shaped data",
        )
    return adapter.trace(model, example_inputs, **options)
