"""Handles of values known at emission (shared by emitter.py and the emit_* builders).

A constant of the graph, a source weight or a folded result is a `Deferred`: it becomes a
parameter or buffer of the module (one ``get_attr``) only if a generic op reads it, so a
weight a native layer holds is not registered twice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from torch import fx


class Deferred:
    """An initializer or folded constant, registered on the module only if a generic op reads it.

    ``emitter`` is the `TorchEmitter` (its ``kind_of`` and ``attribute``); ``array`` is the
    folded value, None for an initializer (read from the file, with its kind)."""

    def __init__(self, emitter: Any, value: ir.Value, array: np.ndarray | None = None):
        self.emitter, self.value, self.array = emitter, value, array
        self._node: fx.Node | None = None

    def node(self) -> fx.Node:
        if self._node is None:
            array = self.array if self.array is not None else self.emitter.weight_array(self.value)
            kind = self.emitter.kind_of(self.value) if self.array is None else None
            self._node = self.emitter.attribute(self.value, array, kind)
        return self._node


def materialize(handle: Any) -> Any:
    """An fx node for a handle (a deferred initializer becomes a get_attr once)."""
    return handle.node() if isinstance(handle, Deferred) else handle
