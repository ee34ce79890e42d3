"""The input check shared by the nesting wrappers (interop.torch/keras/flax).

A guest keeps its own signature (a PyTorch CNN stays NCHW inside a Keras model), so a
wrong input is reported against the guest's input names and shapes, before it reaches
the emitted graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ShapeError
from .graph import TensorSpec


def _kind(dtype: Any) -> str | None:
    try:  # numpy, jax and Keras dtypes, and torch's ("torch.float32")
        return np.dtype(str(dtype).replace("torch.", "")).kind
    except TypeError:
        return None


def check_guest_inputs(
    name: str, specs: Sequence[TensorSpec], inputs: Sequence[Any]
) -> dict[str, int | None]:
    """Raise ShapeError unless `inputs` fit `specs` (rank, static dims, dtype kind).

    Unknown sizes in the inputs (None, as in a symbolic Keras input) are accepted.
    Returns the size each symbolic dim of the signature takes (None when unknown or
    inconsistent), so a caller can work out the guest's output shapes.
    """
    if len(inputs) != len(specs):
        raise ShapeError(
            f"Guest '{name}' was called with {len(inputs)} inputs",
            f"{len(specs)}: " + ", ".join(str(s) for s in specs),
        )
    sizes: dict[str, int | None] = {}
    for spec, tensor in zip(specs, inputs):
        shape = tuple(tensor.shape)
        if spec.shape is not None:
            if len(shape) != len(spec.shape) or any(
                isinstance(want, int) and got is not None and want != got
                for want, got in zip(spec.shape, shape)
            ):
                raise ShapeError(
                    f"Input '{spec.name}' of guest '{name}' got shape {shape}",
                    f"shape {spec.shape} (names are dims that may vary)",
                    "reshape or permute the input first (the guest keeps its own layout, e.g. NCHW "
                    "for a PyTorch CNN), or trace the guest with dynamic_dims for that axis",
                )
            for want, got in zip(spec.shape, shape):
                if isinstance(want, str):
                    sizes[want] = got if sizes.get(want, got) == got else None
        kind = _kind(getattr(tensor, "dtype", None))
        if spec.dtype is not None and kind is not None and kind != spec.dtype.kind:
            raise ShapeError(
                f"Input '{spec.name}' of guest '{name}' has dtype {tensor.dtype}",
                f"dtype {spec.dtype}",
                "cast the input first",
            )
    return sizes
