"""The inputs a nested Functional model is fed, as Keras's own Functional call passes them.

A dict given to a model whose inputs are a list is matched by input name; a feed one rank
off its ``Input`` gets the trailing axis of 1 that Keras adds or drops
(``Functional._adjust_input_rank``).
"""

from __future__ import annotations

from typing import Any

from keras import tree

from .capture_lowering import Builder, Tensor


def functional_feeds(functional: Any, args: list, kwargs: dict) -> list[Any]:
    """The call's inputs in the order of the graph's inputs: a dict given to a model whose
    inputs are a list is matched by input name, as Keras does (a flattened dict is in
    sorted key order). Keyword options (``training``, ``mask``) are not inputs: a dict
    passed beside them is matched by name too (keras_hub's Gemma3n CausalLM calls its
    backbone with ``mask=``; flattening would have swapped its two inputs)."""
    if len(args) == 1 and isinstance(args[0], dict):
        names = []
        for spec in functional.inputs:
            history = getattr(spec, "_keras_history", None)
            names.append(history.operation.name if history is not None else spec.name)
        if set(names) == set(args[0]) and len(names) == len(args[0]):
            return [args[0][name] for name in names]
    return tree.flatten((args, kwargs))


def adjust_ranks(b: Builder, functional: Any, feeds: list[Any]) -> list[Any]:
    """A feed one rank off its Input adjusted as Keras's Functional call does: a trailing
    axis of 1 added or dropped (keras_hub Stable Diffusion 3 feeds its diffuser's
    ``(batch, 1)`` timestep a vector)."""
    adjusted = []
    for feed, spec in zip(feeds, functional.inputs, strict=False):
        ref = tuple(spec.shape)
        if isinstance(feed, Tensor) and feed.rank == len(ref) - 1 and ref and ref[-1] == 1:
            value = b.op("Unsqueeze", [feed.value, b.ints([-1])])
            feed = Tensor(value, (*feed.shape, 1), feed.dtype, feed.mask)
        elif isinstance(feed, Tensor) and feed.rank == len(ref) + 1 and feed.shape[-1] == 1:
            value = b.op("Squeeze", [feed.value, b.ints([-1])])
            feed = Tensor(value, feed.shape[:-1], feed.dtype, feed.mask)
        adjusted.append(feed)
    return adjusted + list(feeds[len(adjusted) :])
