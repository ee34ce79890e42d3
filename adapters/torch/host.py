"""The torch host: an interop.Graph as a ``torch.nn.Module``, run and saved natively.

Importing this module does not import torch; each method does, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from interop.hosts import output_list


class TorchHost:
    name = "torch"
    description = "a torch module"  # read in errors as "needed to emit a torch module"
    requires = ("torch",)
    extra = "torch"
    suffixes = (".pt", ".pth")

    def emit(self, source: Any, **options: Any) -> Any:
        from .emitter import to_torch_module

        return to_torch_module(source, **options)

    def run(self, native: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        was_training = native.training
        native.eval()
        try:
            with torch.no_grad():
                out = native(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        finally:
            native.train(was_training)
        return [t.detach().cpu().numpy() for t in output_list(out)]

    def save(self, native: Any, out: Path) -> list[Path]:
        """``torch.save`` of the state_dict (loads with ``weights_only=True``)."""
        import torch

        torch.save(native.state_dict(), out)
        return [out]

    @property
    def nesting(self) -> type:
        from .nesting import Module

        return Module


HOST = TorchHost()
