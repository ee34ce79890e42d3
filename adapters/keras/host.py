"""The keras host: an interop.Graph as a functional ``keras.Model``, run and saved natively.

Importing this module does not import Keras; each method does, on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from interop.errors import InteropError
from interop.hosts import output_list


class KerasHost:
    name = "keras"
    description = "a Keras model"
    requires = ("keras",)
    extra = "keras"
    suffixes = (".keras", ".weights.h5")

    def emit(self, source: Any, **options: Any) -> Any:
        from .emitter import to_keras_model

        return to_keras_model(source, **options)

    def run(self, native: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import keras

        out = native(arrays if len(arrays) > 1 else arrays[0], training=False)
        return [np.asarray(keras.ops.convert_to_numpy(t)) for t in output_list(out)]

    def save(self, native: Any, out: Path) -> list[Path]:
        """``save_weights`` for ``.weights.h5``; ``model.save`` for ``.keras`` when Keras can."""
        if out.name.endswith(".weights.h5"):
            native.save_weights(out)
            return [out]
        try:
            native.save(out)
        except (NotImplementedError, TypeError, ValueError) as err:
            stem = out.name[: -len(".keras")]
            raise InteropError(
                f"Keras cannot serialise this model as a .keras file: {str(err).strip()[:200]}",
                fix=f"write the weights instead: -o {out.with_name(stem + '.weights.h5')}",
            ) from err
        return [out]

    @property
    def nesting(self) -> type:
        from .nesting import Layer

        return Layer


HOST = KerasHost()
