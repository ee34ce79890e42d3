"""What to trace for each kind of Flax / JAX model, and how its modules are marked.

Each model kind becomes a `Capture`: a pure function ``fn(params, *inputs)`` whose
`params` are the weights (so they become named ONNX initializers instead of anonymous
constants), the name and kind of each weight, and the layer table. Module paths reach
the jaxpr through ``jax.named_scope(MARK + path)`` opened around every module call:

* nnx: the ``__call__`` of every module class in the model is wrapped for the duration
  of the trace; the wrapper finds the path of ``self`` in a table built from the model
  that `nnx.merge` rebuilt inside the traced function. nnx.Dropout is replaced by a
  marker primitive (an ONNX Dropout, identity at inference); nnx.RNN over a standard
  cell by one recurrent primitive (capture_recurrent.py); BatchNorm, LayerNorm and the
  bias of Conv / Linear by layer primitives (capture_layers.py).
* linen: a method interceptor (`flax.linen.intercept_methods`) opens the scope, forces
  ``use_running_average=True`` on BatchNorm, replaces Dropout by the marker and
  BatchNorm, LayerNorm and the Conv / Dense bias by the layer primitives.
* plain JAX functions: no modules; closed-over arrays are named after the closure
  variables or `functools.partial` arguments that hold them.

What each module call returns (the layer's ``returns``, see `interop.provenance`) is
marked the same way for nnx and linen: the arrays of the result pass through one
identity primitive (`returns_p`) naming the module path; its converter emits no node and
notes the ONNX values, which `Capture.finish_layers` writes into the layer table.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from interop import provenance

from . import register_primitive
from .capture_layers import linen_layer_call, nnx_layer_call
from .capture_lowering import MARK
from .capture_recurrent import rnn_call

# ---------------------------------------------------------------------- dropout marker
dropout_p = Primitive("interop_dropout")
dropout_p.def_impl(lambda x, *, rate: x)
dropout_p.def_abstract_eval(lambda x, *, rate: x)
mlir.register_lowering(dropout_p, mlir.lower_fun(lambda x, *, rate: x, multiple_results=False))


def mark_dropout(x: Any, rate: float) -> Any:
    """Identity that records a dropout of `rate` in the jaxpr (inference semantics)."""
    return dropout_p.bind(x, rate=float(rate)) if rate > 0 else x


# ---------------------------------------------------------------------- return marker
returns_p = Primitive("interop_returns")
returns_p.multiple_results = True
returns_p.def_impl(lambda *xs, **_: list(xs))
returns_p.def_abstract_eval(lambda *avals, **_: list(avals))
mlir.register_lowering(returns_p, mlir.lower_fun(lambda *xs, **_: list(xs), multiple_results=True))
batching.primitive_batchers[returns_p] = lambda xs, dims, **p: (returns_p.bind(*xs, **p), dims)
ad.primitive_jvps[returns_p] = lambda xs, ts, **p: (returns_p.bind(*xs, **p), list(ts))


class Returns:
    """The ONNX values each module path's calls returned, noted while the jaxpr is lowered.

    Hashable by identity, so it can ride in the primitive's parameters.
    """

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {}

    def layers(self, records: list[provenance.LayerRecord]) -> list[provenance.LayerRecord]:
        return provenance.with_returns(records, self.values)


@register_primitive("interop_returns")
def _convert_returns(low: Any, eqn: Any, *values: Any) -> list[Any]:
    eqn.params["sink"].values.setdefault(eqn.params["path"], []).extend(values)
    return list(values)  # no node: the values themselves


def _containers(obj: Any) -> bool:
    return type(obj) in (dict, list, tuple) or (isinstance(obj, tuple) and hasattr(obj, "_fields"))


def mark_returns(result: Any, path: str, sink: Returns) -> Any:
    """`result` with its traced arrays passed through `returns_p` (in structure order)."""
    leaves: list[Any] = []

    def collect(obj: Any) -> None:
        if isinstance(obj, jax.core.Tracer):
            leaves.append(obj)
        elif _containers(obj):
            for item in obj.values() if isinstance(obj, dict) else obj:
                collect(item)

    collect(result)
    if not path or not leaves:
        return result
    marked = iter(returns_p.bind(*leaves, path=path, sink=sink))

    def rebuild(obj: Any) -> Any:
        if isinstance(obj, jax.core.Tracer):
            return next(marked)
        if not _containers(obj):
            return obj
        if isinstance(obj, dict):
            return {key: rebuild(item) for key, item in obj.items()}
        items = [rebuild(item) for item in obj]
        kind: Any = type(obj)
        return kind(*items) if hasattr(obj, "_fields") else kind(items)

    return rebuild(result)


def qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def join_path(parts: Any) -> str:
    return ".".join(str(p) for p in parts)


@dataclass
class Capture:
    fn: Callable[..., Any]  # fn(params, *args, **kwargs) -> outputs (any pytree)
    params: Any  # pytree of arrays passed as the first argument
    names: list[str]  # one per leaf of params, in tree_leaves order
    kinds: dict[str, str]  # name -> trainable / buffer / frozen
    layers: list[provenance.LayerRecord] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    signature: inspect.Signature | None = None
    finish_layers: Callable[[], list[provenance.LayerRecord]] | None = None


def leaf_names(tree: Any) -> list[str]:
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = []
        for key in path:
            part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
            parts.append(str(part))
        if parts and parts[-1] in ("value", "raw_value"):  # nnx.Variable's own field
            parts.pop()
        names.append(".".join(parts))
    return names


def _signature(fn: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------- nnx
def capture_nnx(model: Any) -> Capture:
    from flax import nnx

    graphdef, rng_state, state = nnx.split(model, nnx.RngState, ...)
    names = leaf_names(state)
    kinds = {}
    for name, (_, var) in zip(names, _flat_variables(state), strict=False):
        kinds[name] = provenance.TRAINABLE if isinstance(var, nnx.Param) else provenance.BUFFER
    modules = {
        join_path(p): n for p, n in nnx.graph.iter_graph(model) if isinstance(n, nnx.Module) and p
    }
    layers = [provenance.LayerRecord("", qualname(model), None)]
    for path in _definition_order(model, modules):
        parent = next((path[:i] for i in range(len(path) - 1, 0, -1) if path[:i] in modules), "")
        layers.append(provenance.LayerRecord(path, qualname(modules[path]), parent))
    classes = {
        type(node) for _, node in nnx.graph.iter_graph(model) if isinstance(node, nnx.Module)
    }

    def fn(params: Any, *args: Any, **kwargs: Any) -> Any:
        # merge reuses the Variable objects it is given; RNG state mutated during the
        # call (nnx.RNN draws a key for its initial carry) must be created in this trace.
        copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, rng_state), params)
        _set_inference(copy)
        paths = {
            id(node): join_path(path)
            for path, node in nnx.graph.iter_graph(copy)
            if isinstance(node, nnx.Module)
        }
        originals = {
            id(n): (p, n) for p, n in nnx.graph.iter_graph(copy) if isinstance(n, nnx.Module)
        }
        with _scoped_calls(classes, _PathFinder(paths, list(originals.values())), returns):
            return copy(*args, **kwargs)

    returns = Returns()
    return Capture(
        fn,
        state,
        names,
        kinds,
        layers,
        {"framework": "flax", "api": "nnx", "class": qualname(model)},
        _signature(model),
        lambda: returns.layers(layers),
    )


def _definition_order(model: Any, modules: dict[str, Any]) -> list[str]:
    """Module paths in attribute definition order (nnx's graph walk sorts them by name)."""
    order: list[str] = []
    seen: set[int] = set()

    def visit(obj: Any, path: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if path in modules and modules[path] is obj:
            order.append(path)
        if isinstance(obj, dict):
            items = list(obj.items())
        elif isinstance(obj, list | tuple):
            items = list(enumerate(obj))
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            items = [(k, v) for k, v in vars(obj).items() if not str(k).startswith("_")]
            if hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):  # nnx.List and friends
                try:
                    items += list(enumerate(obj))
                except TypeError:
                    pass
        else:
            return
        for key, value in items:
            if isinstance(value, int | float | str | bool | type(None)) or hasattr(value, "shape"):
                continue
            visit(value, f"{path}.{key}" if path else str(key))

    visit(model, "")
    listed = set(order)
    return order + [p for p in modules if p not in listed]


def _flat_variables(state: Any) -> list[tuple[Any, Any]]:
    """(path, Variable) per leaf of an nnx.State, in tree_leaves order."""
    from flax import nnx

    return jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]


def _set_inference(module: Any) -> None:
    """Eval mode on a copy: BatchNorm on running averages, Dropout deterministic."""
    from flax import nnx

    for _, node in nnx.graph.iter_graph(module):
        if isinstance(node, nnx.Module):
            for attr, value in (("use_running_average", True), ("deterministic", True)):
                if hasattr(node, attr):
                    object.__setattr__(node, attr, value)


def _shapes(module: Any) -> list[tuple[str, tuple[int, ...]]]:
    from flax import nnx

    flat = jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]
    return sorted((jax.tree_util.keystr(p), tuple(np.shape(v))) for p, v in flat)


class _PathFinder:
    """Path of a module object; for objects nnx transforms rebuild (the layer inside
    an nnx.scan / nnx.vmap, the cell inside nnx.RNN), the one module of the same class
    whose variables have the same shapes, or those shapes with a stacked leading axis."""

    def __init__(self, paths: dict[int, str], modules: list[tuple[tuple[Any, ...], Any]]):
        self.paths, self.modules = paths, modules
        self._alive: list[Any] = []
        self._shapes: dict[str, list[tuple[str, tuple[int, ...]]]] = {}

    def get(self, module: Any) -> str | None:
        if id(module) in self.paths:
            return self.paths[id(module)]
        try:
            wanted = _shapes(module)
        except Exception:  # a module nnx cannot read the state of here: no scope
            return None
        matches = []
        for path, node in self.modules:
            if type(node) is not type(module) or not path:
                continue
            key = join_path(path)
            shapes = self._shapes.setdefault(key, _shapes(node))
            if shapes == wanted or [(k, s[1:]) for k, s in shapes] == wanted:
                matches.append(key)
        if len(matches) != 1:
            return None
        self._adopt(module, matches[0])
        return matches[0]

    def _adopt(self, module: Any, path: str) -> None:
        """Give the submodules of a rebuilt module their paths under it by identity, so that
        siblings of one class and shape (attention's query / key / value) are told apart.
        The objects are kept alive with the paths so that their ids stay theirs."""
        from flax import nnx

        for sub_path, node in nnx.iter_graph(module):
            if sub_path and isinstance(node, nnx.Module) and id(node) not in self.paths:
                self.paths[id(node)] = join_path((path, *sub_path))
                self._alive.append(node)


def call_owners(classes: set[type]) -> dict[type, Any]:
    """For each class, the class in its MRO that defines ``__call__`` -> that function (the
    method a scope wrapper must replace and call through)."""
    owners: dict[type, Any] = {}
    for cls in classes:
        for klass in cls.__mro__:
            if "__call__" in klass.__dict__:
                owners.setdefault(klass, klass.__dict__["__call__"])
                break
    return owners


@contextlib.contextmanager
def _scoped_calls(classes: set[type], paths: _PathFinder, returns: Returns) -> Iterator[None]:
    """Wrap ``__call__`` of the classes defining it so that calls open a named scope and
    mark what they return."""
    from flax import nnx

    # classes whose own __call__ nnx_layer_call may stand for (capture_layers.py)
    layer_owners = {nnx.BatchNorm, nnx.LayerNorm, nnx.Conv, nnx.Linear}
    owners = call_owners(classes)
    for klass, original in owners.items():

        def wrapper(
            self: Any, *args: Any, __original: Any = original, __owner: type = klass, **kwargs: Any
        ) -> Any:
            path = paths.get(self)
            # The root, or a module rebuilt inside an nnx transform: no scope of its own.
            scope = jax.named_scope(MARK + path) if path else contextlib.nullcontext()
            with scope:
                result = NotImplemented
                if isinstance(self, nnx.Dropout) and args:
                    result = mark_dropout(args[0], self.rate)
                elif isinstance(self, nnx.RNN):  # standard cells: one ONNX LSTM/GRU/RNN node
                    result = rnn_call(self, args, kwargs)
                elif __owner in layer_owners:  # BatchNorm, LayerNorm, Conv/Linear bias
                    result = nnx_layer_call(self, __owner, __original, args, kwargs)
                if result is NotImplemented:
                    result = __original(self, *args, **kwargs)
                return mark_returns(result, path or "", returns)

        functools.update_wrapper(wrapper, original)
        klass.__call__ = wrapper
    try:
        yield
    finally:
        for klass, original in owners.items():
            klass.__call__ = original


# ---------------------------------------------------------------------- linen
def linen_interceptor(
    seen: dict[str, provenance.LayerRecord], sink: Callable[[], Returns]
) -> Callable[..., Any]:
    """The linen method interceptor: opens each module call's scope, records the module in
    `seen` (path -> record) and its returns in `sink()`, forces inference mode
    (BatchNorm on running averages, Dropout as a marker) and binds the layer primitives."""
    import flax.linen as nn

    def interceptor(next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        mod = context.module
        method = context.method_name
        if method == "setup" or (method.startswith("_") and method != "__call__"):
            return next_fun(*args, **kwargs)
        parts = mod.scope.path if mod.scope is not None else ()
        path = join_path(parts)
        if path not in seen:
            seen[path] = provenance.LayerRecord(path, qualname(mod), join_path(parts[:-1]))
        if isinstance(mod, nn.BatchNorm):
            # linen merges the attribute with the call argument and rejects both being
            # set: set the attribute on this apply-time instance and clear the argument.
            object.__setattr__(mod, "use_running_average", True)
            kwargs = {k: v for k, v in kwargs.items() if k != "use_running_average"}
            args = tuple(args[:1]) + (None,) + tuple(args[2:]) if len(args) > 1 else args
        with jax.named_scope(MARK + path) if path else contextlib.nullcontext():
            result = NotImplemented
            if isinstance(mod, nn.Dropout) and args:
                result = mark_dropout(args[0], mod.rate)
            elif method == "__call__":  # BatchNorm, LayerNorm, Conv/Dense bias: ONNX layer ops
                result = linen_layer_call(mod, next_fun, args, kwargs)
            if result is NotImplemented:
                result = next_fun(*args, **kwargs)
            return mark_returns(result, path, sink())

    return interceptor


def capture_linen(module: Any, variables: Any, call: Callable[..., Any] | None = None) -> Capture:
    """A linen module with its variables; `call(variables, *args, **kwargs)` runs it (by
    default ``module.apply``; a wrapper such as a Hugging Face ``FlaxPreTrainedModel``
    passes its own ``__call__``, which prepares inputs and outputs around ``apply``)."""
    import flax.linen as nn

    variables = dict(variables)
    params: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    names: list[str] = []
    for collection, tree in sorted(variables.items(), key=lambda kv: kv[0] != "params"):
        for name in leaf_names(tree):
            final = name if name not in kinds else f"{collection}.{name}"
            kinds[final] = provenance.TRAINABLE if collection == "params" else provenance.BUFFER
            names.append(final)
        params[collection] = tree
    # tree_leaves sorts dict keys: put the names in that order.
    order = leaf_names(params)
    by_path = dict(
        zip([f"{c}.{n}" for c in params for n in leaf_names(params[c])], names, strict=False)
    )
    names = [by_path[p] for p in order]
    seen: dict[str, provenance.LayerRecord] = {
        "": provenance.LayerRecord("", qualname(module), None)
    }

    interceptor = linen_interceptor(seen, lambda: returns)

    def fn(tree: Any, *args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(interceptor):
            if call is not None:
                return call(tree, *args, **kwargs)
            return module.apply(tree, *args, **kwargs)

    returns = Returns()

    def finish_layers() -> list[provenance.LayerRecord]:
        records = dict(seen)
        for collection in params.values():  # modules with weights that were never called
            for name in leaf_names(collection):
                parts = name.split(".")[:-1]
                for i in range(1, len(parts) + 1):
                    path = ".".join(parts[:i])
                    records.setdefault(
                        path, provenance.LayerRecord(path, "", ".".join(parts[: i - 1]))
                    )
        return returns.layers(list(records.values()))

    return Capture(
        fn,
        params,
        names,
        kinds,
        [],
        {"framework": "flax", "api": "linen", "class": qualname(module)},
        _signature(module.__call__),
        finish_layers,
    )


# ---------------------------------------------------------------------- plain JAX
def capture_function(fn: Any) -> Capture:
    """A plain JAX function; linen modules it calls (``lambda x: model.apply(v, x)``) get
    their scopes and layer records through the linen method interceptor."""
    root = provenance.LayerRecord(
        "", qualname(fn) if not inspect.isfunction(fn) else fn.__qualname__, None
    )
    seen: dict[str, provenance.LayerRecord] = {"": root}
    returns = Returns()

    def call(_params: Any, *args: Any, **kwargs: Any) -> Any:
        if "flax.linen" not in sys.modules:
            return fn(*args, **kwargs)
        import flax.linen as nn

        with nn.intercept_methods(linen_interceptor(seen, lambda: returns)):
            return fn(*args, **kwargs)

    return Capture(
        call,
        {},
        [],
        {},
        [root],
        {"framework": "jax", "api": "jax", "class": getattr(fn, "__qualname__", qualname(fn))},
        _signature(fn),
        lambda: returns.layers(list(seen.values())),
    )


def closure_names(fn: Any) -> dict[int, str]:
    """id(array) -> a readable name, for arrays a function closes over."""
    found: dict[int, str] = {}

    def scan(prefix: str, tree: Any) -> None:
        try:
            leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        except Exception:  # not a pytree; nothing to name
            return
        for path, leaf in leaves:
            if isinstance(leaf, jax.Array | np.ndarray):
                suffix = ".".join(
                    str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
                )
                found.setdefault(id(leaf), f"{prefix}.{suffix}" if suffix else prefix)

    target = fn
    while isinstance(target, functools.partial):
        for i, arg in enumerate(target.args):
            scan(f"args.{i}", arg)
        for key, arg in target.keywords.items():
            scan(key, arg)
        target = target.func
    target = getattr(target, "__wrapped__", target)
    code = getattr(target, "__code__", None)
    if code is not None:
        for name, cell in zip(code.co_freevars, target.__closure__ or (), strict=False):
            with contextlib.suppress(ValueError):
                scan(name, cell.cell_contents)
        for name in code.co_names:
            if name in getattr(target, "__globals__", {}):
                value = target.__globals__[name]
                if not callable(value) and not inspect.ismodule(value):
                    scan(name, value)
    return found
