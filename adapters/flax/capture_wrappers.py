"""Module trees for models that wrap their modules: Hugging Face's ``FlaxPreTrainedModel``
and the libraries that register a `ModuleTree` hook (equinox's is built in).

* A **wrapper of a linen module** (an object with a linen ``module``, a ``params`` dict and a
  ``__call__`` that runs ``module.apply``, as every Flax model of Hugging Face
  transformers 4.x is): its ``__call__`` runs under the linen method interceptor, with
  the weights passed in as ``params=`` (or swapped into ``.params`` for the duration of
  the trace when ``__call__`` takes no such argument), so input preparation (default
  masks, NCHW -> NHWC) and output structure (``ModelOutput``) are the wrapper's own while
  each submodule call gets its path (``encoder.layer.0.attention``) and the weights their
  variable paths. ``params`` is either the ``params`` collection itself or, for models
  with batch statistics, a dict of collections (``{"params": ..., "batch_stats": ...}``).
* A **registered module tree** (`register_module_tree`): a library says how to split a
  model into weights and a rebuild function, and how to list its modules with their
  paths; interop then names the weights after their pytree paths and opens a scope for
  every call of a listed module (its class's ``__call__`` is wrapped during the trace).

>>> import equinox as eqx, jax, interop                    # doctest: +SKIP
>>> mlp = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.key(0))
>>> g = interop.trace(mlp, jnp.ones((4,)), dynamic_batch=False)
>>> [la.path for la in g.layers][:3]
['', 'layers', 'layers.0']
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jax

from interop import provenance

from . import is_linen_module
from .capture_lowering import MARK
from .capture_modules import (
    Capture,
    Returns,
    call_owners,
    capture_linen,
    leaf_names,
    mark_returns,
    qualname,
)

_COLLECTIONS = {"params", "batch_stats", "cache", "intermediates", "constants", "stats"}


# ---------------------------------------------------------------------- linen wrappers
def is_linen_wrapper(model: Any) -> bool:
    """An object holding a linen ``module`` and its ``params`` (FlaxPreTrainedModel-shaped)."""
    return (
        callable(model)
        and not is_linen_module(model)
        and is_linen_module(getattr(model, "module", None))
        and isinstance(getattr(model, "params", None), Mapping)
    )


def capture_linen_wrapper(model: Any) -> Capture:
    params = dict(model.params)
    collections = bool(params) and set(params) <= _COLLECTIONS
    variables = params if collections else {"params": params}
    try:
        takes_params = "params" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        takes_params = False

    def call(tree: Any, *args: Any, **kwargs: Any) -> Any:
        given = tree if collections else tree["params"]
        if takes_params:
            return model(*args, params=given, **kwargs)
        held = model.params
        object.__setattr__(model, "params", given) if not _settable(model) else setattr(
            model, "params", given
        )
        try:
            return model(*args, **kwargs)
        finally:
            object.__setattr__(model, "params", held) if not _settable(model) else setattr(
                model, "params", held
            )

    cap = capture_linen(model.module, variables, call)
    cap.source = {"framework": "flax", "api": "linen", "class": qualname(model)}
    try:
        cap.signature = inspect.signature(model.__call__)
    except (TypeError, ValueError):
        cap.signature = None
    root = cap.finish_layers

    def finish_layers() -> list[provenance.LayerRecord]:
        records = root() if root else []
        # the root is the wrapper (FlaxBertModel), whose module (FlaxBertModule) it runs
        return [
            provenance.LayerRecord("", qualname(model), None) if r.path == "" else r
            for r in records
        ]

    cap.finish_layers = finish_layers
    return cap


def _settable(model: Any) -> bool:
    prop = getattr(type(model), "params", None)
    return not isinstance(prop, property) or prop.fset is not None


# ---------------------------------------------------------------------- registered trees
@dataclass(frozen=True)
class ModuleTree:
    """How a JAX library exposes its module tree to interop (see `register_module_tree`)."""

    name: str
    accepts: Callable[[Any], bool]
    split: Callable[[Any], tuple[Any, Callable[[Any], Any]]]
    modules: Callable[[Any], Iterable[tuple[str, Any]]]


MODULE_TREES: list[ModuleTree] = []


def register_module_tree(
    name: str,
    accepts: Callable[[Any], bool],
    split: Callable[[Any], tuple[Any, Callable[[Any], Any]]],
    modules: Callable[[Any], Iterable[tuple[str, Any]]],
) -> ModuleTree:
    """Teach interop the module tree of another JAX library's models.

    * ``accepts(model)``: whether this hook handles `model`;
    * ``split(model) -> (weights, rebuild)``: a pytree of the model's arrays (they become
      initializers named after their pytree paths, ``layers.0.weight``) and a function
      that rebuilds a callable model from such a pytree (of tracers, during the trace);
    * ``modules(model) -> [(path, module), ...]``: every submodule with its dotted path,
      the model itself as ``""``, in definition order. It is called on the model (for the
      layer table) and on each rebuilt copy (to find the path of ``self`` in a call).

    The ``__call__`` of each listed module's class is wrapped for the duration of the
    trace to open ``jax.named_scope`` with the module's path. Equinox's hook, built in:

    >>> register_module_tree(                               # doctest: +SKIP
    ...     "equinox", lambda m: isinstance(m, eqx.Module),
    ...     lambda m: (eqx.filter(m, eqx.is_array), lambda p: eqx.combine(p, m)),
    ...     lambda m: walk_fields(m, lambda x: isinstance(x, eqx.Module)))
    """
    hook = ModuleTree(name, accepts, split, modules)
    MODULE_TREES[:] = [h for h in MODULE_TREES if h.name != name] + [hook]
    return hook


def module_tree_for(model: Any) -> ModuleTree | None:
    _register_builtin()
    for hook in reversed(MODULE_TREES):
        try:
            if hook.accepts(model):
                return hook
        except Exception:  # a hook that cannot judge this object does not take it
            continue
    return None


def walk_fields(root: Any, is_module: Callable[[Any], bool]) -> list[tuple[str, Any]]:
    """``(path, module)`` for `root` and every module reachable through its attributes,
    lists, tuples and dicts, in field order (a helper for `register_module_tree` hooks)."""
    found: list[tuple[str, Any]] = []
    seen: set[int] = set()

    def visit(obj: Any, path: str) -> None:
        if id(obj) in seen:
            return
        if is_module(obj):
            seen.add(id(obj))
            found.append((path, obj))
            items = list(vars(obj).items()) if hasattr(obj, "__dict__") else []
        elif isinstance(obj, Mapping):
            items = list(obj.items())
        elif isinstance(obj, list | tuple):
            items = list(enumerate(obj))
        else:
            return
        for key, value in items:
            if not str(key).startswith("_"):
                visit(value, f"{path}.{key}" if path else str(key))

    visit(root, "")
    return found


def capture_module_tree(model: Any, hook: ModuleTree) -> Capture:
    weights, rebuild = hook.split(model)
    names = leaf_names(weights)
    listed = list(hook.modules(model))
    paths = {p for p, _ in listed}
    layers = []
    for path, module in listed:
        parent = None if path == "" else ""
        for i in range(path.count("."), 0, -1):
            prefix = path.rsplit(".", path.count(".") - i + 1)[0]
            if prefix in paths:
                parent = prefix
                break
        layers.append(provenance.LayerRecord(path, qualname(module), parent))
    classes = {type(m) for _, m in listed}
    returns = Returns()

    def fn(params: Any, *args: Any, **kwargs: Any) -> Any:
        copy = rebuild(params)
        by_id = {id(m): p for p, m in hook.modules(copy)}
        with _scoped(classes, by_id, returns):
            return copy(*args, **kwargs)

    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):
        signature = None
    return Capture(
        fn,
        weights,
        names,
        {n: provenance.TRAINABLE for n in names},
        layers,
        {"framework": "jax", "api": hook.name, "class": qualname(model)},
        signature,
        lambda: returns.layers(layers),
    )


@contextlib.contextmanager
def _scoped(classes: set[type], by_id: dict[int, str], returns: Returns) -> Iterator[None]:
    owners = call_owners(classes)
    for klass, original in owners.items():

        def wrapper(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            path = by_id.get(id(self), "")
            with jax.named_scope(MARK + path) if path else contextlib.nullcontext():
                return mark_returns(__original(self, *args, **kwargs), path, returns)

        functools.update_wrapper(wrapper, original)
        type.__setattr__(klass, "__call__", wrapper)
    try:
        yield
    finally:
        for klass, original in owners.items():
            type.__setattr__(klass, "__call__", original)


# ---------------------------------------------------------------------- equinox
def _is_equinox(model: Any) -> bool:
    if "equinox" not in sys.modules:
        return False
    import equinox as eqx

    return isinstance(model, eqx.Module)


def _equinox_split(model: Any) -> tuple[Any, Callable[[Any], Any]]:
    import equinox as eqx

    weights, static = eqx.partition(model, eqx.is_array)
    return weights, lambda params: eqx.combine(params, static)


def _equinox_modules(model: Any) -> list[tuple[str, Any]]:
    import equinox as eqx

    return walk_fields(model, lambda x: isinstance(x, eqx.Module))


_BUILTIN_DONE: list[bool] = []


def _register_builtin() -> None:
    if not _BUILTIN_DONE:
        _BUILTIN_DONE.append(True)
        if not any(h.name == "equinox" for h in MODULE_TREES):
            MODULE_TREES.insert(
                0, ModuleTree("equinox", _is_equinox, _equinox_split, _equinox_modules)
            )
