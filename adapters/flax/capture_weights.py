"""Capture without weights: an abstract Flax model traced, its weights given apart (issue 20).

``interop.trace(model, example_inputs, weights=...)`` for a model whose parameters are
shapes and dtypes only (`jax.ShapeDtypeStruct`), so that a model larger than memory is
never allocated:

- nnx: ``nnx.eval_shape(lambda: Model(config, rngs=nnx.Rngs(0)))``;
- linen: ``(module, jax.eval_shape(module.init, key, x))`` (or any pytree of
  ShapeDtypeStructs as the variables).

The weights come from a safetensors checkpoint (a file, a folder of shards with its
index) or a mapping of names to arrays (`interop.weights`), named as the Flax capture
names the initializers: nnx ``block.linear.kernel``, linen ``Dense_0.kernel`` (the linen
collection may prefix it: ``params.Dense_0.kernel``, ``batch_stats.BatchNorm_0.mean``).
The steps:

1. the source's headers are checked against the model's abstract leaves (missing or extra
   names, shapes, dtypes) before anything is traced: `WeightsError` names the tensor and
   the file;
2. the model is traced as usual (``jax.make_jaxpr`` takes ShapeDtypeStructs), so no
   weight is allocated; the nnx RNG state (keys and counts, a few bytes) is made concrete
   for the trace, since a module's call may draw from it;
3. each initializer becomes the source's lazy tensor (an `onnx_ir.ExternalTensor` over the
   shard's bytes): nothing is read until the graph is saved, run or emitted.

The dynamic-dim check runs the model eagerly, which an abstract model cannot: it is off.
With ``compute_dtype="float32"`` the model's floating parameters are traced as float32 and
each weight is converted when read.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from interop.errors import WeightsError
from interop.graph import Graph
from interop.weights import (
    WEIGHTS_APART,
    Wanted,
    attach_weights,
    ir_dtype,
    match_weights,
    open_weights,
)

from . import is_linen_module, is_nnx_module
from .capture import capture, trace_model
from .capture_modules import leaf_names


def trace_with_weights(
    model: Any,
    example_inputs: Any,
    *,
    weights: Any = None,
    compute_dtype: Any = None,
    **options: Any,
) -> Graph:
    """Trace an abstract Flax model with its weights read lazily from `weights`.

    >>> model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))   # doctest: +SKIP
    >>> g = interop.trace(model, ids, weights="checkpoint/")               # doctest: +SKIP
    >>> g.save("llama.onnx")                    # the weights streamed here   # doctest: +SKIP
    """
    source = open_weights(weights)
    target = _float_dtype(compute_dtype)
    model = _prepared(model, target)
    cap = capture(model)
    aliases = _collection_aliases(model)
    wanted = []
    for name, leaf in zip(cap.names, jax.tree_util.tree_leaves(cap.params), strict=True):
        dtype = ir_dtype(leaf.dtype)
        if dtype is None:  # not a number array (a key): the model's own value
            continue
        abstract = isinstance(leaf, jax.ShapeDtypeStruct)
        shape = tuple(int(d) for d in leaf.shape)
        wanted.append(Wanted(name, shape, dtype, abstract, aliases.get(name, ())))
    found = match_weights(
        source,
        wanted,
        model=cap.source["class"].rsplit(".", 1)[-1],
        spelled="the Flax capture names its weights (nnx: 'block.linear.kernel', linen: "
        "'Dense_0.kernel' or 'params.Dense_0.kernel')",
        dtype_fix="build the model with param_dtype=jnp.{dtype}, or pass "
        "compute_dtype='float32' to compute in float32",
        convert=target is not None,
    )
    options["check_dims"] = False  # it runs the model eagerly, which has no values
    allowed = WEIGHTS_APART.set(True)
    try:
        graph = trace_model(model, example_inputs, **options)
    finally:
        WEIGHTS_APART.reset(allowed)
    attach_weights(graph.model, source, found, convert=target is not None)
    return graph


def _float_dtype(compute_dtype: Any) -> Any:
    if compute_dtype is None:
        return None
    try:
        dtype = jnp.dtype(str(compute_dtype).removeprefix("jnp.").removeprefix("numpy."))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise WeightsError(
            f"compute_dtype={compute_dtype!r} is not a floating dtype",
            "'float32', 'float16' or 'bfloat16'",
            "pass compute_dtype='float32' to compute in float32 from half-precision weights",
        )
    return dtype


def _prepared(model: Any, target: Any) -> Any:
    """The model to trace: nnx RNG state concrete, floating leaves in `target` if given."""
    if is_nnx_module(model):
        from flax import nnx

        graphdef, rng_state, state = nnx.split(model, nnx.RngState, ...)
        rng_state = jax.tree.map(_concrete_rng, rng_state)
        if target is not None:
            state = jax.tree.map(lambda leaf: _cast(leaf, target), state)
        return nnx.merge(graphdef, rng_state, state)
    if target is None:
        return model
    module, variables = _linen_parts(model)
    if module is None:
        return model  # a plain function or another library's tree: nothing to cast
    return (module, jax.tree.map(lambda leaf: _cast(leaf, target), dict(variables)))


def _linen_parts(model: Any) -> tuple[Any, Any]:
    if isinstance(model, functools.partial) and len(model.args) == 1:  # partial(m.apply, v)
        owner = getattr(model.func, "__self__", None)
        if is_linen_module(owner) and isinstance(model.args[0], Mapping):
            return owner, model.args[0]
    if isinstance(model, tuple) and len(model) == 2 and is_linen_module(model[0]):
        return model
    if is_linen_module(model) and getattr(model, "scope", None) is not None:
        return model.unbind()
    return None, None


def _collection_aliases(model: Any) -> dict[str, tuple[str, ...]]:
    """Linen: capture name -> the name with its collection (``params.Dense_0.kernel``)."""
    _, variables = _linen_parts(model) if not is_nnx_module(model) else (None, None)
    if not isinstance(variables, Mapping):
        return {}
    aliases: dict[str, tuple[str, ...]] = {}
    for collection, tree in variables.items():
        for name in leaf_names(tree):
            aliases[name] = (*aliases.get(name, ()), f"{collection}.{name}")
    return aliases


def _concrete_rng(leaf: Any) -> Any:
    """An abstract RNG key or counter as a value (the trace may draw from it)."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        count = int(np.prod(leaf.shape, dtype=np.int64))
        return jax.random.split(jax.random.key(0), max(count, 1))[:count].reshape(leaf.shape)
    return jnp.zeros(leaf.shape, leaf.dtype)


def _cast(leaf: Any, dtype: Any) -> Any:
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape, dtype)
    return jnp.asarray(leaf, dtype)
