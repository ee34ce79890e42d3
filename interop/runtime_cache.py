"""When a graph's cached ONNX Runtime sessions and optimized copy are stale.

`Graph.run` keeps, per graph, its sessions and the inference-optimized copy they run
(`interop.runtime`). They must be dropped whenever the graph computes something else:
a node added, removed or rewired, an attribute replaced, an initializer or the tensor
it holds replaced, a graph input or output changed, in the graph, a subgraph or a
function. The rule:

- *what is watched* (`_watched`): every node in order, its inputs tuple (onnx_ir
  makes a new one whenever an input is replaced), every `Attr` object (immutable: an
  edit is a new object), every initializer and the tensor it holds, the inputs and
  outputs, of the graph, its subgraphs and its functions. The key is the objects' ids;
  the objects themselves are pinned while the key is kept, so no id can come back
  for a new object.
- *when it is looked at*: walking a 2,000-node graph costs about 1 ms, too much for
  every run. So every onnx_ir mutation that can change a watched object (the
  `const_value` setter, attribute and initializer assignment and deletion,
  `replace_input_with` / `resize_inputs`, node insertion and removal, graph input and
  output lists) also bumps one process-wide counter, and a run walks the graph only
  when the counter moved since the graph's last check (any graph's edit, or an
  optimizer building a copy, moves it). A run that finds the counter where it was
  costs a dictionary lookup and a comparison.
- *what is not seen*: writing into a tensor's array in place
  (``value.const_value.numpy()[...] = ...``); replace the tensor instead
  (``value.const_value = ir.tensor(array)``) or call ``interop.runtime.refresh(g)``.

>>> from interop.runtime_cache import current       # doctest: +SKIP
>>> current(g)           # True: the cache was valid; False: it was dropped
True
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from operator import attrgetter, methodcaller
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .graph import Graph

_INPUTS = attrgetter("inputs")
_ATTRIBUTES = attrgetter("attributes.data")
_VALUES = methodcaller("values")
_TENSOR = attrgetter("const_value")

# bumped by every watched onnx_ir mutation, in any model of the process
_VERSION = [0]


def _bumping(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _VERSION[0] += 1
        return method(*args, **kwargs)

    wrapper.__interop_bumps__ = True  # type: ignore[attr-defined]
    return wrapper


def _install() -> bool:
    """Make onnx_ir's mutations of watched objects bump `_VERSION` (once per process).

    These are onnx_ir's private classes (tested at the pinned onnx-ir 1.1). Where another
    release moved them, nothing is patched and every run walks the graph instead (slower
    by about 1 ms per 2,000 nodes, never stale).
    """
    try:
        from onnx_ir import _core, _graph_containers, _linked_list

        const_value: Any = vars(_core.Value)["const_value"]
    except (ImportError, KeyError):
        return False
    targets: list[tuple[type, tuple[str, ...]]] = [
        (_graph_containers.Attributes, ("__setitem__", "__delitem__")),
        (_graph_containers.GraphInitializers, ("__setitem__", "__delitem__")),
        (
            _graph_containers._GraphIO,
            (
                "append",
                "extend",
                "insert",
                "pop",
                "remove",
                "clear",
                "__setitem__",
                "__delitem__",
                "__iadd__",
                "reverse",
                "sort",
            ),
        ),  # fmt: skip
        (_linked_list.DoublyLinkedSet, ("_insert_one_after", "_insert_many_after", "remove")),
        (_core.Node, ("replace_input_with", "resize_inputs")),
    ]
    for cls, names in targets:
        for name in names:
            method = getattr(cls, name, None)
            if method is not None and not getattr(method, "__interop_bumps__", False):
                setattr(cls, name, _bumping(method))
    prop = const_value
    if prop.fset is not None and not getattr(prop.fset, "__interop_bumps__", False):
        bumping = property(prop.fget, _bumping(prop.fset), doc=prop.__doc__)
        type.__setattr__(_core.Value, "const_value", bumping)  # mypy: a property, not a method
    return True


_PATCHED = _install()


def _watched(model: Any, graphs: Sequence[Any]) -> Iterator[Any]:
    """Every object whose replacement changes what `model` computes."""
    parts: list[Any] = [(model,)]
    for body in graphs:
        inits = body.initializers.values()
        parts += [
            (body,), body, map(_INPUTS, body),
            chain.from_iterable(map(_VALUES, map(_ATTRIBUTES, body))),
            inits, map(_TENSOR, inits), body.inputs, body.outputs,
        ]  # fmt: skip
    return chain.from_iterable(parts)


class _Key:
    """A graph's key: the watched objects' ids, the objects (pinned), the version seen."""

    __slots__ = ("graphs", "ids", "model", "pinned", "seen")

    def __init__(self, model: Any) -> None:
        seen = _VERSION[0]  # read first: an edit during the walk moves it again
        self.model, self.seen = model, seen
        self.graphs = [model.graph, *(g for g in model.graphs() if g is not model.graph)]
        self.graphs += [f.graph for f in model.functions.values()]
        self.pinned = list(_watched(model, self.graphs))
        self.ids = tuple(map(id, self.pinned))


_KEYS: weakref.WeakKeyDictionary[Graph, _Key] = weakref.WeakKeyDictionary()


def current(graph: Graph) -> bool:
    """Whether `graph`'s cache is still valid; if not, drop its sessions and optimized copy."""
    key = _KEYS.get(graph)
    version = _VERSION[0]
    model = graph.model
    if key is not None and key.model is model and key.graphs[0] is model.graph:
        if key.seen == version and _PATCHED:  # `model.graph = ...`: checked above
            return True
        if tuple(map(id, _watched(key.model, key.graphs))) == key.ids:
            key.seen = version
            return True
    with graph._lock:
        fresh, latest = _Key(graph.model), _KEYS.get(graph)
        if latest is not None and latest.model is fresh.model and latest.ids == fresh.ids:
            latest.seen = fresh.seen  # another thread rebuilt it meanwhile
            return True
        graph._sessions.clear()
        graph._optimized = None
        _KEYS[graph] = fresh
    return False


def rekey(graph: Graph) -> None:
    """Take the key again, keeping the cache: after the runtime itself replaced tensors
    with equal ones (external weights read into memory). The caller holds the lock."""
    _KEYS[graph] = _Key(graph.model)


def refresh(graph: Graph) -> None:
    """Forget `graph`'s sessions and optimized copy: the next run builds them again.

    Needed only after writing into a weight's array in place, which the cache key does
    not see (replacing a tensor, an attribute or a node is seen).

    >>> g.model.graph.initializers["fc.weight"].const_value.numpy()[:] = 0  # doctest: +SKIP
    >>> interop.runtime.refresh(g)                                          # doctest: +SKIP
    """
    with graph._lock:
        graph._sessions.clear()
        graph._optimized = None
        _KEYS.pop(graph, None)
