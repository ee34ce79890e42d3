"""Register interop's Keras classes with Keras as soon as Keras is imported.

A saved Keras model that holds an ``interop.keras.Layer`` (a nested guest) or layers of an
emitted model (``OnnxOp``, recurrent helpers) names them as ``interop>...``; Keras can load it
only once those classes are registered. ``import interop`` must be enough for that, without
importing Keras (and TensorFlow) eagerly: so when Keras is already imported we register at
once, and otherwise a one-shot import hook registers right after ``keras`` finishes importing.

    >>> import interop, keras                        # any order
    >>> model = keras.models.load_model("host_with_guest.keras")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any

# modules whose import registers every Keras class interop saves models with
KERAS_MODULES = ("interop.keras", "interop.adapters.keras.emitter")


def register() -> None:
    """Import the modules that register interop's Keras classes (needs Keras imported)."""
    try:
        for name in KERAS_MODULES:
            importlib.import_module(name)
    except Exception as err:  # never break the user's `import keras`
        warnings.warn(
            f"interop could not register its Keras layers ({type(err).__name__}: {err}); "
            "loading a saved Keras model that holds interop layers will fail. Fix: run "
            "`import interop.keras` yourself and read the error it raises.",
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Keras's own loader, followed by our registration once the package has executed."""

    def __init__(self, loader: Any):
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register()

    def __getattr__(self, name: str) -> Any:  # resources, get_code, is_package, ...
        return getattr(self._loader, name)


class _AfterKerasImport(importlib.abc.MetaPathFinder):
    """Finds ``keras`` through the other finders and wraps its loader; fires once."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "keras":
            return None
        uninstall()  # one shot; and the loop below must not find us again
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


_HOOK = _AfterKerasImport()


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register now if Keras is imported, else as soon as it is (called by ``import interop``)."""
    keras = sys.modules.get("keras")
    if keras is not None:
        # a Keras still executing its __init__ has no `saving` yet: the hook cannot help it
        # either, so register only a fully imported Keras
        if hasattr(keras, "saving") and hasattr(keras, "layers"):
            register()
        return
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
