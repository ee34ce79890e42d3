"""A third-party interop host: any interop.Graph as a plain-numpy callable.

``HOST.emit(graph)`` returns a `NumpyModel`, which evaluates the graph with interop's
reference evaluator (`interop.interpret.Interpreter` on the numpy backend): no
deep-learning framework involved. Installing this package registers `HOST` in the
``interop.hosts`` entry-point group, so ``interop.convert(model, to="numpy")`` and
``interop convert SRC --to numpy -o OUT.npz`` work without importing anything from here.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import interop
from interop.backend import numpy_backend
from interop.errors import InteropError
from interop.interpret import Interpreter

__all__ = ["HOST", "NumpyHost", "NumpyModel"]


class NumpyModel:
    """A graph evaluated with numpy: ``model(*arrays)`` returns one array or a list."""

    def __init__(self, graph: interop.Graph):
        self.graph = graph
        self._interpreter = Interpreter(graph, numpy_backend)  # normalizes the graph once

    @property
    def weights(self) -> dict[str, np.ndarray]:
        """The graph's initializers under their source names (what ``save`` writes)."""
        return {
            name: value.const_value.numpy()
            for name, value in self.graph.model.graph.initializers.items()
            if value.const_value is not None
        }

    def __call__(self, *arrays: Any, **named: Any) -> Any:
        outputs = [np.asarray(out) for out in self._interpreter.run(*arrays, **named)]
        return outputs[0] if len(outputs) == 1 else outputs


class NumpyHost:
    """The host protocol of `interop.hosts.Host`: these members, nothing else."""

    name = "numpy"
    description = "a plain-numpy callable (interop's reference evaluator)"
    requires: tuple[str, ...] = ()  # numpy is always there
    suffixes = (".npz",)

    def emit(self, source: Any, **options: Any) -> NumpyModel:
        if options:
            raise InteropError(
                f"The numpy host takes no emit options, got {sorted(options)}",
                fix="call interop.convert(model, to='numpy') without options",
            )
        # a graph, or an onnx.ModelProto passed as is: interop.load reads it either way
        graph = source if isinstance(source, interop.Graph) else interop.load(source)
        return NumpyModel(graph)

    def run(self, native: NumpyModel, arrays: list[np.ndarray]) -> list[np.ndarray]:
        out = native(*arrays)
        return list(out) if isinstance(out, list) else [out]

    def save(self, native: NumpyModel, out: Path) -> list[Path]:
        """The weights as .npz (no pickles), written to a temporary file then renamed."""
        out = Path(out)
        arrays: dict[str, Any] = native.weights  # plain arrays: no pickles in the file
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as file:
                np.savez(file, **arrays)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return [out]

    @property
    def nesting(self) -> type:
        return NumpyModel  # a graph inside plain numpy code is just this callable


HOST = NumpyHost()
