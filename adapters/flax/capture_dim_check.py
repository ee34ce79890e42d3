"""A declared dynamic dimension must hold: the Flax / JAX side of `interop.dim_check`.

Two ways a JAX model fixes a dimension interop made dynamic:

- loudly: ``jax.make_jaxpr`` cannot trace it symbolically (``x * jnp.ones((2, 1))``,
  ``int(x.shape[0])``). `make_jaxpr` then traces again with each dynamic dim static in
  turn (then all of them); the first that traces is static in the graph, with a warning
  naming the source line of the failure. A model that fails with every dim static
  raises its first error, as before.
- silently: the graph runs at other sizes but computes otherwise. `checked` runs it at a
  second size of each dynamic dim against the model (`interop.dim_check`).
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from interop import dim_check
from interop.errors import InteropError
from interop.graph import Graph

_SKIP = ("site-packages", os.sep + "interop" + os.sep, os.path.join("adapters", "flax"))


def _names(specs: list[Any]) -> list[str]:
    """The symbolic dim names of the input specs, in order of first use."""
    names: list[str] = []
    for spec in specs:
        for dim in spec.shape:
            if not isinstance(dim, int) and str(dim) not in names:
                names.append(str(dim))
    return names


def _static(specs: list[Any], arrays: list[Any], static: set[str]) -> list[Any]:
    """`specs` with the dims named in `static` at the example's size."""
    scope = jax.export.SymbolicScope()
    out = []
    for spec, array in zip(specs, arrays, strict=True):
        dims = [
            str(np.shape(array)[axis]) if str(d) in static else str(d)
            for axis, d in enumerate(spec.shape)
        ]
        shape = jax.export.symbolic_shape(", ".join(dims), scope=scope) if dims else ()
        out.append(jax.ShapeDtypeStruct(shape, spec.dtype))
    return out


def _user_line(err: BaseException) -> str | None:
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if any(part in frame.filename for part in _SKIP) or frame.filename.startswith("<"):
            continue
        return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()[:80]})"
    return None


def make_jaxpr(
    fn: Callable[..., Any],
    params: Any,
    specs: list[Any],
    arrays: list[Any],
    *,
    source: str,
    check_dims: bool = True,
) -> tuple[Any, list[Any]]:
    """``jax.make_jaxpr(fn)(params, *specs)`` and the specs it took; where a dynamic dim
    cannot be traced symbolically, traced again with that dim static (and a warning)."""
    try:
        return jax.make_jaxpr(fn)(params, *specs), specs
    except InteropError:
        raise
    except Exception as err:
        names = _names(specs)
        if not check_dims or not names:
            raise
        first = err
    tries = [{name} for name in names] + ([set(names)] if len(names) > 1 else [])
    for static in tries:
        specs_static = _static(specs, arrays, static)
        try:
            closed = jax.make_jaxpr(fn)(params, *specs_static)
        except Exception:
            continue
        line = _user_line(first)
        where = f" at {line}" if line else ""
        reason = " ".join(str(first).split())[:200]
        for name in static:
            size = next(
                np.shape(a)[axis]
                for spec, a in zip(specs, arrays, strict=True)
                for axis, d in enumerate(spec.shape)
                if str(d) == name
            )
            warnings.warn(
                f"interop: {source}: the dynamic dimension '{name}' does not hold: JAX "
                f"cannot trace it symbolically{where} ({type(first).__name__}: {reason}); "
                f"the graph declares it static, of size {size}",
                stacklevel=5,
            )
        return closed, specs_static
    raise first


def checked(
    graph: Graph,
    run_model: Callable[[Any, Any], list[tuple[str, np.ndarray]]],
    model: Any,
    arrays: list[Any],
    input_names: list[str],
    n_args: int,
    keywords: list[str],
    *,
    source: str,
) -> Graph:
    """The graph after `interop.dim_check` ran it at a second size of each dynamic dim
    against ``run_model(model, inputs)``."""
    feeds = {name: np.asarray(a) for name, a in zip(input_names, arrays, strict=True)}

    def run_source(named: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        flat = [named[name] for name in input_names]
        inputs = dict(zip(keywords, flat[n_args:], strict=True)) if keywords else tuple(flat)
        # op by op: compiling the whole model for one call at one new size costs seconds
        with jax.disable_jit():
            return run_model(model, inputs)

    if n_args and keywords:  # not one structure run_model takes: nothing to compare with
        return graph
    return dim_check.check_dims(graph, run_source, feeds, source=source, stacklevel=6)
