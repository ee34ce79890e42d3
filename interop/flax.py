"""`interop.flax.Module`: a model of any framework as a trainable Flax nnx submodule.

The guest is traced (or loaded) into a Graph and emitted by the Flax emitter, so its
weights are ``nnx.Param`` / ``nnx.BatchStat`` state of the host, it runs under
``nnx.jit`` and trains with optax. Save it with ``nnx.split`` / ``nnx.merge`` (or any
nnx checkpointing); ``module.graph`` is the guest's Graph, to save beside the state:

>>> self.backbone = interop.flax.Module(torch_backbone, example_inputs=(x,))  # doctest: +SKIP
"""

from __future__ import annotations

# the class lives with its host adapter (interop.adapters.flax.nesting); this module keeps
# the public name, and the import path that pickles and saved models may refer to
from .adapters.flax.nesting import Module

__all__ = ["Module"]
