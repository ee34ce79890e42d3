"""Hosts: the frameworks an `interop.Graph` is emitted into (the other side of adapters).

A host turns a graph into a native model (``emit``), runs that model in inference mode
(``run``, for ``interop.convert(..., verify=True)``), saves its weights (``save``, for
``interop convert``) and names its nesting wrapper (``nesting``: ``interop.torch.Module``
and its kin). Hosts are discovered through the ``interop.hosts`` entry-point group; the
built-in ones (torch, keras, flax) register the same way. Looking a host up never imports
its framework: ``emit``, ``run``, ``save`` and ``nesting`` do, on first use.

>>> host_for("torch").suffixes
('.pt', '.pth')
>>> all(name in load_hosts() for name in ("torch", "keras", "flax"))
True
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import InteropError, close_matches
from .registry import PluginRegistry, Registry

if TYPE_CHECKING:
    import numpy as np

ENTRY_POINT_GROUP = "interop.hosts"
_BUILTIN = {
    "torch": "interop.adapters.torch:HOST",
    "keras": "interop.adapters.keras:HOST",
    "flax": "interop.adapters.flax:HOST",
}


class Host(Protocol):
    """What a host provides (see docs/design.md, "Writing a host").

    ``requires`` names the modules whose absence makes ``emit`` raise
    `MissingDependencyError` (e.g. ``("jax", "flax")``); ``suffixes`` the file name endings
    ``save`` writes. A host without a native file format raises an `InteropError` from
    ``save``. Optional: ``extra``, the pip extra of interop-graph that installs the
    framework (named in the `MissingDependencyError` fix).
    """

    name: str
    description: str  # what it emits, e.g. "torch.nn.Module (a torch.fx.GraphModule)"
    requires: tuple[str, ...]
    suffixes: tuple[str, ...]

    def emit(self, source: Any, **options: Any) -> Any:
        """The native model of an interop.Graph or an onnx.ModelProto (passed as is)."""
        ...

    def run(self, native: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run the native model in inference mode; outputs as numpy arrays, in graph order."""
        ...

    def save(self, native: Any, out: Path) -> list[Path]:
        """Write the native model's weights to `out`; returns the paths written."""
        ...

    @property
    def nesting(self) -> type:
        """The class that nests a guest of any framework in this host's models."""
        ...


HOSTS: PluginRegistry[Host] = PluginRegistry(
    "emit", group=ENTRY_POINT_GROUP, builtin=_BUILTIN, kind="host"
)


def register_host(host: Host, *, replace: bool = False) -> Host:
    """Register a host object (entry points do this for installed packages)."""
    return HOSTS.register(host.name, host, replace=replace)


def load_hosts() -> Registry[Host]:
    """Load every host of the entry-point group once (plus the built-ins)."""
    return HOSTS.load()


def output_list(out: Any) -> list[Any]:
    """A native model's outputs as a list, in graph order (a dict, a sequence or one tensor)."""
    if isinstance(out, Mapping):
        return list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


def host_names() -> list[str]:
    """The names of the registered hosts, sorted."""
    return sorted(load_hosts())


def host_for(name: str) -> Host:
    """The host registered as `name`; an unknown name raises `InteropError` listing them."""
    hosts = load_hosts()
    host = hosts.get(name)
    if host is None:
        known = host_names()
        matches = close_matches(name, known)
        raise InteropError(
            f"Unknown host '{name}'"
            + (f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""),
            "one of " + ", ".join(known),
            "install the package that provides it (entry-point group 'interop.hosts') "
            "or register it with interop.hosts.register_host",
        )
    return host
