"""The framework side of `interop.compare`: run a model in its own framework and record
the values each of its layers returns, keyed by layer path.

- torch: a forward hook on every submodule (path = ``named_modules`` name);
- Keras: each sub-layer's ``call`` is wrapped on the instance for the run (path =
  ``layer.path`` without the model's own name, as the Keras capture writes it; an
  emitted model's layers are named after the source paths);
- Flax nnx: the ``__call__`` of each module class is wrapped for the run and records
  the modules of the model by their nnx path (``blocks.0.fc``).

The paths are the ones the captures write into the graph and the emitters give the native
layers, which is what lets the two sides of a comparison meet. A model whose framework
records nothing here (a linen module, a jax function) contributes its final outputs
only. Hooks are always removed, also when the run fails. Frameworks are imported only
when a model of theirs is given (their modules are found in ``sys.modules``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from .compare import Recording


def to_numpy(value: Any) -> np.ndarray:
    """Any framework's array as numpy (bfloat16 and other non-numpy floats as float32)."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
        # a copy: an in-place op after the hook (an emitted relu_) must not change it
        if not value.dtype.is_floating_point or value.dtype in _numpy_floats():
            return value.numpy().copy()
        return value.float().numpy()
    if hasattr(value, "numpy") and callable(value.numpy) and not isinstance(value, np.ndarray):
        value = value.numpy()  # tf tensors
    array = np.asarray(value)
    if array.dtype.kind == "V" or str(array.dtype) == "bfloat16":
        array = array.astype(np.float32)
    return array


def _numpy_floats() -> set[Any]:
    import torch

    return {torch.float16, torch.float32, torch.float64}


def leaves(tree: Any) -> Iterator[Any]:
    """The arrays of a nested output (tuples, lists, dicts, dataclasses such as
    Hugging Face's ``ModelOutput``) in order; other objects (caches, None) are skipped."""
    if tree is None or isinstance(tree, str | int | float | bool):
        return
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from leaves(value)
    elif isinstance(tree, tuple | list):
        for value in tree:
            yield from leaves(value)
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            yield from leaves(getattr(tree, f.name))
    elif hasattr(tree, "shape") and hasattr(tree, "dtype"):
        yield tree


def _framework(model: Any) -> str:
    torch = sys.modules.get("torch")
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.layers.Layer):
        return "keras"
    if torch is not None and isinstance(model, torch.nn.Module):
        return "torch"
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(model, nnx.Module):
        return "nnx"
    return "other"


def _for_framework(kind: str, example_inputs: Any, device: str) -> Any:
    """The example inputs as the framework takes them: torch tensors for torch models
    (on `device`), numpy arrays for the others."""

    def convert(value: Any) -> Any:
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            return value
        if kind == "torch":
            import torch

            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(
                np.ascontiguousarray(to_numpy(value)))  # fmt: skip
            return tensor.to(device) if device not in ("cpu", "auto") else tensor
        if kind == "keras" and type(value).__module__.startswith(("tensorflow", "jax")):
            return value
        if kind == "nnx" and type(value).__module__.startswith("jax"):
            return value
        return to_numpy(value)

    if isinstance(example_inputs, Mapping):
        return {k: convert(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, tuple | list):
        return type(example_inputs)(convert(v) for v in example_inputs)
    return convert(example_inputs)


def record_model(model: Any, example_inputs: Any, device: str = "cpu") -> Recording:
    """Run a framework model on `example_inputs` and record its layers' return values."""
    from .tracing import adapter_for

    kind = _framework(model)
    adapter = adapter_for(model)
    inputs = _for_framework(kind, example_inputs, device)
    layers: dict[str, list[np.ndarray]] = {}
    alternates: dict[str, list[np.ndarray]] = {}
    classes: dict[str, str] = {}

    def note(path: str, layer: Any, output: Any, alternate: bool = False) -> None:
        arrays = []
        for leaf in leaves(output):
            try:
                arrays.append(to_numpy(leaf))
            except Exception:  # a symbolic tensor (a traced call inside): nothing to record
                return
        (alternates if alternate else layers).setdefault(path, []).extend(arrays)
        classes[path] = type(layer).__name__

    install = {"torch": _hook_torch, "keras": _hook_keras, "nnx": _hook_nnx}.get(kind)
    remove = install(model, note) if install is not None else (lambda: None)
    try:
        if kind == "nnx":  # eagerly: the adapter's run is jit-compiled, which records tracers
            args, named = (
                ((), inputs) if isinstance(inputs, Mapping)
                else (inputs if isinstance(inputs, tuple | list) else (inputs,), {})
            )  # fmt: skip
            outputs = [(str(i), v) for i, v in enumerate(leaves(model(*args, **named)))]
        else:
            outputs = adapter.run_source(model, inputs)
    finally:
        remove()
    label = type(model).__name__
    return Recording(
        name=f"{label} ({kind})" if kind != "other" else label,
        layers={p: v for p, v in layers.items() if v},
        classes=classes,
        outputs=[to_numpy(v) for _, v in outputs],
        alternates=alternates,
    )


Note = Callable[..., None]


def _hook_torch(model: Any, note: Note) -> Callable[[], None]:
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(module: Any, args: Any, output: Any, path: str = path) -> None:
            note(path, module, output)

        handles.append(module.register_forward_hook(hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove


def _hook_keras(model: Any, note: Note) -> Callable[[], None]:
    import keras

    linear = keras.activations.linear
    prefix = model.name + "/"
    wrapped = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        path = layer.path or layer.name
        path = path[len(prefix) :] if path.startswith(prefix) else path
        original = layer.call

        def call(*args: Any, _original: Any = original, _path: str = path, _layer: Any = layer,
                 **kwargs: Any) -> Any:  # fmt: skip
            activation = getattr(_layer, "activation", None)
            if not callable(activation) or activation is linear:
                output = _original(*args, **kwargs)
                note(_path, _layer, output)
                return output
            # The Keras emitter lets a Dense / Conv apply the activation that follows it
            # (one layer call fewer), also when the source computed it outside the layer:
            # the value before the activation is the alternative a comparison accepts.
            object.__setattr__(_layer, "activation", linear)
            try:
                before = _original(*args, **kwargs)
            finally:
                _layer.__dict__.pop("activation", None)
                object.__setattr__(_layer, "activation", activation)
            output = activation(before)
            note(_path, _layer, output)
            note(_path, _layer, before, alternate=True)
            return output

        object.__setattr__(layer, "call", call)  # past Keras's attribute tracking
        wrapped.append(layer)

    def remove() -> None:
        for layer in wrapped:
            layer.__dict__.pop("call", None)

    return remove


def _hook_nnx(model: Any, note: Note) -> Callable[[], None]:
    from flax import nnx

    modules = nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    paths = {id(m): ".".join(map(str, p)) for p, m in modules if p}
    owners: dict[type, Any] = {}
    for path, module in (
        nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()
    ):
        if not path:
            continue
        owner = next((c for c in type(module).__mro__ if "__call__" in c.__dict__), None)
        if owner is not None and owner is not object:
            owners.setdefault(owner, owner.__dict__["__call__"])
    for owner, original in owners.items():

        def call(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            output = _original(self, *args, **kwargs)
            path = paths.get(id(self))
            if path is not None:
                note(path, self, output)
            return output

        setattr(owner, "__call__", call)  # noqa: B010

    def remove() -> None:
        for owner, original in owners.items():
            setattr(owner, "__call__", original)  # noqa: B010

    return remove
