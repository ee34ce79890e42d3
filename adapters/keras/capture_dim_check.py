"""A declared dynamic dimension must hold: the Keras side of `interop.dim_check`.

The graph's inputs are the model's flat inputs, in order; the source is the Keras model
in inference mode on the same flat inputs. The shared check (`interop.dim_check`) runs
the graph at a second size of each dynamic dimension and declares static, with a
warning naming the layer, any dimension that does not hold.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from interop import dim_check
from interop.graph import Graph


def _named(graph: Graph, run_source: Any, examples: list[np.ndarray]) -> tuple[Any, dict]:
    names = [str(v.name) for v in graph.model.graph.inputs][: len(examples)]
    feeds = dict(zip(names, (np.asarray(e) for e in examples), strict=True))

    def run_named(named: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        return run_source([named[n] for n in names])

    return run_named, feeds


def check_dynamic_dims(
    graph: Graph,
    run_source: Any,
    examples: list[np.ndarray],
    *,
    model_name: str,
) -> Graph:
    """`graph`, or a copy whose failing dynamic dims are static (with a warning each).

    ``run_source(flat_inputs)`` runs the Keras model on flat numpy inputs and returns its
    flattened ``[(name, array)]`` outputs, named as the graph's.
    """
    run_named, feeds = _named(graph, run_source, examples)
    return dim_check.check_dims(
        graph, run_named, feeds, source=f"Keras model '{model_name}'", stacklevel=6
    )


def holds_at_example(graph: Graph, run_source: Any, examples: list[np.ndarray]) -> bool:
    """Whether the graph matches Keras at the example itself (else the dims are not to blame)."""
    run_named, feeds = _named(graph, run_source, examples)
    return dim_check.holds_at_example(graph, run_named, feeds)


def seed_states(model: Any) -> list[tuple[Any, np.ndarray]]:
    """The model's SeedGenerator states, to restore before each run of the source.

    Inference mode does not stop ``keras.random`` (a keras.io VAE's Sampling layer draws
    noise in ``predict`` too), and each call advances the generator: restored to the state
    the trace drew from, the model computes the noise the graph holds, so the check
    compares deterministically (and finds that the noise fixes the batch).
    """
    return [
        (v, np.asarray(v.numpy()))
        for v in getattr(model, "variables", [])
        if str(getattr(v, "name", "")) == "seed_generator_state"
    ]


@contextlib.contextmanager
def frozen_seeds() -> Iterator[None]:
    """While the model is traced, ``SeedGenerator.next`` gives its state without advancing
    it: every draw of the trace (symbolic attempts included) uses the state the trace
    started from, the one `restore_seeds` gives back to the model before each check."""
    from keras.src.random.seed_generator import SeedGenerator

    original = SeedGenerator.next

    def next_seed(self: Any, ordered: bool = True) -> Any:
        del ordered
        return self.state.value * 1  # a copy, as Keras's own next

    SeedGenerator.next = next_seed  # type: ignore[method-assign]
    try:
        yield
    finally:
        SeedGenerator.next = original  # type: ignore[method-assign]


def restore_seeds(states: list[tuple[Any, np.ndarray]]) -> None:
    for variable, state in states:
        variable.assign(state)
