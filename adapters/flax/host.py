"""The flax host: an interop.Graph as a ``flax.nnx.Module``, run and saved natively.

Importing this module does not import jax or flax; each method does, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from interop.hosts import output_list


class FlaxHost:
    name = "flax"
    description = "a Flax module"
    requires = ("jax", "flax")
    extra = "flax"
    suffixes = (".msgpack",)

    def emit(self, source: Any, **options: Any) -> Any:
        """Options: ``rngs`` (an ``nnx.Rngs`` for Dropout in training, default nnx.Rngs(0))."""
        from .emitter import to_flax_module

        return to_flax_module(source, **options)

    def run(self, native: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        out = native(*arrays)
        return [np.asarray(t) for t in output_list(out)]

    def save(self, native: Any, out: Path) -> list[Path]:
        """The nnx state as a pure dict, msgpack-serialised by ``flax.serialization``."""
        from flax import nnx, serialization

        state = nnx.to_pure_dict(nnx.state(native))
        out.write_bytes(serialization.msgpack_serialize(state))
        return [out]

    @property
    def nesting(self) -> type:
        from .nesting import Module

        return Module


HOST = FlaxHost()
