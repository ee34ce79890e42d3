"""Flax's standard layers captured as ONNX layer ops, so emitters rebuild the host's layers.

Traced as written, Flax's layers reach the jaxpr as arithmetic: an inference BatchNorm is
``(x - mean) * rsqrt(var + eps) * scale + bias`` over reshaped statistics, a LayerNorm
its mean/variance reductions, and Conv/Linear add ``reshape(bias)`` after the
convolution's output transpose. Emitters then see generic ops, not layers. While a model
is traced, the calls of these modules bind primitives of their own instead (the hooks
are called from the capture's module wrappers, capture_modules.py), whose converters emit:

* ``nnx.BatchNorm`` / ``nn.BatchNorm`` on running averages, features on the last axis ->
  ``interop_batch_norm`` -> Transpose to channels-first + ONNX ``BatchNormalization``
  (Flax's momentum, which is ONNX's convention) + Transpose back; none for ``[N, C]``.
  The transposes cancel against the convolutions' own in interop/simplify.py. A missing
  scale / bias (``use_scale=False``) is a constant of ones / zeros, not a parameter.
* ``nnx.LayerNorm`` / ``nn.LayerNorm`` over the last axis -> ``interop_layer_norm`` ->
  ``LayerNormalization(axis=-1)``.
* ``nnx.Conv`` / ``nn.Conv`` and ``nnx.Linear`` / ``nn.Dense``: the module runs its own
  code with the bias switched off (every padding mode keeps Flax's lowering), then
  ``interop_bias_add`` adds the bias: folded into the Conv node's B input when the value
  is that Conv's output transposed back to channels-last, else an Add of the 1-D bias
  (MatMul + Add is what the emitters fuse into nn.Linear / Dense).

Each primitive's JAX implementation is Flax's formula, so running the capture (verify)
computes what the module does. Anything else (other axes, dtypes other than float32,
custom dtype promotion, training-mode BatchNorm, masks) runs the original call.
nnx.RMSNorm stays arithmetic: ONNX RMSNormalization needs opset 23, the capture writes 18.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import register_primitive

bias_add_p = Primitive("interop_bias_add")
batch_norm_p = Primitive("interop_batch_norm")
layer_norm_p = Primitive("interop_layer_norm")


def _bias_add(y: Any, bias: Any) -> Any:
    return y + bias  # bias [C] broadcasts over the channels-last axis, as Flax's reshape does


def _batch_norm(
    x: Any, mean: Any, var: Any, *weights: Any, epsilon: float, has_scale: bool, **_: Any
) -> Any:
    """Flax's `_normalize` on running statistics, features on the last axis."""
    mul = lax.rsqrt(var + epsilon)
    if has_scale:
        mul = mul * weights[0]
    y = (x - mean) * mul
    return y + weights[-1] if len(weights) > int(has_scale) else y


def _layer_norm(x: Any, *weights: Any, epsilon: float, fast_variance: bool, **p: Any) -> Any:
    """Flax's `_compute_stats` + `_normalize` over the last axis."""
    mean = x.mean(-1, keepdims=True)
    if fast_variance:
        var = jnp.maximum(0.0, (x * x).mean(-1, keepdims=True) - mean * mean)
    else:
        var = jnp.square(x - mean).mean(-1, keepdims=True)
    return _batch_norm(x, mean, var, *weights, epsilon=epsilon, **p)


def _define(prim: Primitive, impl: Any) -> None:
    """Implementation, abstract value, XLA lowering, vmap and jvp of a layer primitive.

    vmap (an nnx.vmap'ed ensemble) and jvp run the Flax formula, so such calls lose the
    layer op but stay correct.
    """
    prim.def_impl(impl)
    prim.def_abstract_eval(lambda x, *_, **__: jax.core.ShapedArray(x.shape, x.dtype))
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))

    def batch(args: Any, dims: Any, **params: Any) -> Any:
        return jax.vmap(functools.partial(impl, **params), in_axes=tuple(dims))(*args), 0

    def jvp(primals: Any, tangents: Any, **params: Any) -> Any:
        tangents = [ad.instantiate_zeros(t) for t in tangents]
        return jax.jvp(functools.partial(impl, **params), tuple(primals), tuple(tangents))

    batching.primitive_batchers[prim] = batch
    ad.primitive_jvps[prim] = jvp


_define(bias_add_p, _bias_add)
_define(batch_norm_p, _batch_norm)
_define(layer_norm_p, _layer_norm)


# ---------------------------------------------------------------------- checks
def _float32(*arrays: Any) -> bool:
    return all(a is None or jnp.result_type(a) == jnp.float32 for a in arrays)


def _last_axis(axes: Any, ndim: int) -> bool:
    axes = tuple(axes) if isinstance(axes, tuple | list) else (axes,)
    try:
        return ndim >= 1 and tuple(int(a) % ndim for a in axes) == (ndim - 1,)
    except TypeError:
        return False


def _features(x: Any, *weights: Any) -> bool:
    """Every weight is a [C] vector for the last axis of x (static C)."""
    c = x.shape[-1]
    return isinstance(c, int) and all(w is None or tuple(w.shape) == (c,) for w in weights)


def _plain_dtype(module: Any) -> bool:
    return getattr(module, "dtype", None) in (None, jnp.float32, np.float32)


def _value(variable: Any) -> Any:
    return None if variable is None else variable[...]


# ---------------------------------------------------------------------- binding
def _bind_batch_norm(x, mean, var, scale, bias, epsilon, momentum) -> Any:
    weights = [w for w in (scale, bias) if w is not None]
    return batch_norm_p.bind(
        x,
        mean,
        var,
        *weights,
        epsilon=float(epsilon),
        momentum=float(momentum),
        has_scale=scale is not None,
        has_bias=bias is not None,
    )


def _bind_layer_norm(x, scale, bias, epsilon, fast_variance) -> Any:
    weights = [w for w in (scale, bias) if w is not None]
    return layer_norm_p.bind(
        x,
        *weights,
        epsilon=float(epsilon),
        fast_variance=bool(fast_variance),
        has_scale=scale is not None,
        has_bias=bias is not None,
    )


def _without_bias(module: Any, x: Any, kernel: Any, bias: Any, call: Any) -> Any:
    """Run `call` with the module's bias switched off, then add it with interop_bias_add.

    Flax adds the bias last (Conv before restoring extra batch dims, which commutes with
    a bias over the channels), so the layer's own code keeps every padding mode and
    kernel mask and the bias becomes one visible op.
    """
    if bias is None or bias.ndim != 1 or not _float32(x, kernel, bias):
        return NotImplemented
    if not _plain_dtype(module) or getattr(module, "preferred_element_type", None) is not None:
        return NotImplemented
    saved = {k: module.__dict__[k] for k in ("use_bias", "bias") if k in module.__dict__}
    object.__setattr__(module, "use_bias", False)
    if "bias" in saved:
        object.__setattr__(module, "bias", None)
    try:
        y = call()
    finally:
        for key, value in saved.items():
            object.__setattr__(module, key, value)
    if jnp.result_type(y) != jnp.float32 or y.shape[-1:] != bias.shape:
        return y + bias  # not the expected layout: Flax's own addition
    return bias_add_p.bind(y, bias)


# ---------------------------------------------------------------------- nnx
def nnx_layer_call(module: Any, owner: type, original: Any, args: tuple, kwargs: dict) -> Any:
    """The layer primitive standing for ``module(*args, **kwargs)``, or NotImplemented.

    `owner` is the class whose ``__call__`` is being run (the module's class or a base it
    inherits ``__call__`` from), `original` that unwrapped ``__call__``.
    """
    from flax import nnx
    from flax.nnx.nn import dtypes

    if not args or not hasattr(args[0], "shape"):
        return NotImplemented
    x = args[0]
    if owner in (nnx.Conv, nnx.Linear):
        if len(args) != 1 or set(kwargs) - {"out_sharding"} or not module.use_bias:
            return NotImplemented
        return _without_bias(
            module,
            x,
            _value(module.kernel),
            _value(module.bias),
            lambda: original(module, *args, **kwargs),
        )
    if getattr(module, "promote_dtype", None) is not dtypes.promote_dtype:
        return NotImplemented
    if not _plain_dtype(module) or len(args) != 1:
        return NotImplemented
    scale, bias = _value(module.scale), _value(module.bias)
    if owner is nnx.BatchNorm:
        running = kwargs.get("use_running_average")
        running = module.use_running_average if running is None else running
        mean, var = _value(module.mean), _value(module.var)
        if (
            set(kwargs) - {"use_running_average", "mask"}  # mask only matters for batch stats
            or not running
            or x.ndim < 2
            or not _last_axis(module.axis, x.ndim)
            or not _float32(x, mean, var, scale, bias)
            or not _features(x, mean, var, scale, bias)
        ):
            return NotImplemented
        return _bind_batch_norm(x, mean, var, scale, bias, module.epsilon, module.momentum)
    if owner is nnx.LayerNorm:
        return _layer_norm(module, x, scale, bias, kwargs)
    return NotImplemented


def _layer_norm(module: Any, x: Any, scale: Any, bias: Any, kwargs: dict) -> Any:
    """LayerNormalization for an nnx or linen LayerNorm over the last axis, or NotImplemented."""
    if (
        kwargs.get("mask") is not None
        or set(kwargs) - {"mask"}
        or module.axis_name is not None
        or not _last_axis(module.reduction_axes, x.ndim)
        or not _last_axis(module.feature_axes, x.ndim)
        or not _float32(x, scale, bias)
        or not _features(x, scale, bias)
    ):
        return NotImplemented
    return _bind_layer_norm(x, scale, bias, module.epsilon, module.use_fast_variance)


# ---------------------------------------------------------------------- linen
def linen_layer_call(module: Any, next_fun: Any, args: tuple, kwargs: dict) -> Any:
    """The layer primitive standing for a linen ``module.__call__``, or NotImplemented.

    Called by the capture's method interceptor, which has already set BatchNorm's
    ``use_running_average`` on this apply-time instance.
    """
    import flax.linen as nn

    if not args or not hasattr(args[0], "shape"):
        return NotImplemented
    x = args[0]

    def param(collection: str, name: str) -> Any:
        return module.get_variable(collection, name)

    if (isinstance(module, nn.Conv) and module.shared_weights) or (
        type(module).__call__ is nn.Dense.__call__
    ):
        if len(args) != 1 or kwargs or not module.use_bias:
            return NotImplemented
        return _without_bias(
            module,
            x,
            param("params", "kernel"),
            param("params", "bias"),
            lambda: next_fun(*args, **kwargs),
        )
    norm = type(module).__call__
    if norm not in (nn.BatchNorm.__call__, nn.LayerNorm.__call__):
        return NotImplemented
    if not _plain_dtype(module) or module.param_dtype not in (jnp.float32, np.float32):
        return NotImplemented
    scale = param("params", "scale") if module.use_scale else None
    bias = param("params", "bias") if module.use_bias else None
    if (module.use_scale and scale is None) or (module.use_bias and bias is None):
        return NotImplemented  # variables not there (initialisation): let linen create them
    if norm is nn.BatchNorm.__call__:
        mean, var = param("batch_stats", "mean"), param("batch_stats", "var")
        if (
            set(kwargs) - {"mask"}
            or any(a is not None for a in args[1:])
            or not module.use_running_average
            or mean is None
            or var is None
            or x.ndim < 2
            or not _last_axis(module.axis, x.ndim)
            or not _float32(x, mean, var, scale, bias)
            or not _features(x, mean, var, scale, bias)
        ):
            return NotImplemented
        return _bind_batch_norm(x, mean, var, scale, bias, module.epsilon, module.momentum)
    if norm is nn.LayerNorm.__call__ and len(args) == 1:
        return _layer_norm(module, x, scale, bias, kwargs)
    return NotImplemented


# ---------------------------------------------------------------------- converters
def _weights(low: Any, eqn: Any, operands: list[Any], features: int) -> tuple[Any, Any]:
    """(scale, bias) as ONNX values: the parameters, or constant ones / zeros."""
    p = eqn.params
    ops = list(operands)
    dtype = np.dtype(eqn.invars[0].aval.dtype)
    scale = ops.pop(0) if p["has_scale"] else low.const(np.ones(features, dtype))
    bias = ops.pop(0) if p["has_bias"] else low.const(np.zeros(features, dtype))
    return scale, bias


@register_primitive("interop_batch_norm")
def convert_batch_norm(low: Any, eqn: Any, x: Any, mean: Any, var: Any, *weights: Any) -> Any:
    """interop_batch_norm -> [Transpose] BatchNormalization [Transpose] (channels first)."""
    rank = len(eqn.invars[0].aval.shape)
    scale, bias = _weights(low, eqn, list(weights), eqn.invars[0].aval.shape[-1])
    to_first = [0, rank - 1, *range(1, rank - 1)]
    if rank > 2:
        x = low.op("Transpose", [x], {"perm": to_first})
    attrs = {"epsilon": eqn.params["epsilon"], "momentum": eqn.params["momentum"]}
    y = low.op("BatchNormalization", [x, scale, bias, mean, var], attrs)
    if rank > 2:
        y = low.op("Transpose", [y], {"perm": [0, *range(2, rank), 1]})
    return y


@register_primitive("interop_layer_norm")
def convert_layer_norm(low: Any, eqn: Any, x: Any, *weights: Any) -> Any:
    """interop_layer_norm -> LayerNormalization(axis=-1); no bias input without a bias."""
    p = eqn.params
    scale, bias = _weights(low, eqn, list(weights), eqn.invars[0].aval.shape[-1])
    inputs = [x, scale, bias] if p["has_bias"] else [x, scale]
    return low.op("LayerNormalization", inputs, {"axis": -1, "epsilon": p["epsilon"]})


@register_primitive("interop_bias_add")
def convert_bias_add(low: Any, eqn: Any, y: Any, bias: Any) -> Any:
    """The bias as the B input of the Conv that produced y, else Add(y, bias)."""
    conv = _conv_before_transpose(y)
    if conv is not None and eqn.invars[1].aval.shape == eqn.invars[0].aval.shape[-1:]:
        conv.resize_inputs(3)
        conv.replace_input_with(2, bias)
        return y
    return low.op("Add", [y, bias])


def _conv_before_transpose(y: Any) -> Any:
    """The bias-free Conv node whose output, transposed channels-last, is y and only y."""
    transpose = y.producer()
    if transpose is None or transpose.op_type != "Transpose" or list(y.uses()):
        return None
    perm = transpose.attributes.get("perm")
    rank = len(perm.as_ints()) if perm is not None else 0
    if perm is None or list(perm.as_ints()) != [0, *range(2, rank), 1]:
        return None
    conv = transpose.inputs[0].producer()
    if (
        conv is None
        or conv.op_type != "Conv"
        or len(conv.inputs) > 2
        or [u.node for u in transpose.inputs[0].uses()] != [transpose]
        or transpose.inputs[0].is_graph_output()
    ):
        return None
    return conv
