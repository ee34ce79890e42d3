"""Flax / JAX model -> interop.Graph: trace a jaxpr with symbolic shapes, then walk it.

1. `capture` turns the model into ``fn(params, *inputs)`` with named weights (capture_modules.py).
2. ``jax.make_jaxpr`` traces it on `jax.ShapeDtypeStruct`s whose batch axis (and any
   axis named in ``dynamic_dims``) is a `jax.export` symbolic dim, so the graph is
   dynamic by construction rather than re-specialised afterwards.
3. The walk (capture_lowering.py + capture_ops_*.py) emits ONNX nodes with scope and
   source line.
4. Provenance (layers, parameter kinds, source) is written with `interop.provenance`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import onnx_ir as ir

from interop import provenance
from interop.errors import InteropError, TraceError
from interop.graph import Graph
from interop.structure import flatten_outputs
from interop.weights import WEIGHTS_APART, placeholder

from . import (  # noqa: F401  (register the converters)
    capture_dim_check,
    capture_ops_basic,
    capture_ops_complex,
    capture_ops_control,
    capture_ops_index,
    capture_ops_math,
    capture_ops_nn,
    capture_recurrent,
    is_linen_module,
    is_nnx_module,
)
from .capture_check import check_captured
from .capture_lowering import OPSET, Lowering, walk
from .capture_modules import Capture, capture_function, capture_linen, capture_nnx, closure_names
from .capture_wrappers import (
    capture_linen_wrapper,
    capture_module_tree,
    is_linen_wrapper,
    module_tree_for,
)


def capture(model: Any) -> Capture:
    hook = module_tree_for(model)
    if hook is not None:
        return capture_module_tree(model, hook)
    if is_linen_wrapper(model):
        return capture_linen_wrapper(model)
    applied = _applied_linen(model)
    if applied is not None:  # functools.partial(module.apply, variables)
        return capture_linen(*applied)
    if isinstance(model, tuple) and len(model) == 2 and is_linen_module(model[0]):
        return capture_linen(model[0], model[1])
    if is_nnx_module(model):
        return capture_nnx(model)
    if is_linen_module(model):
        if getattr(model, "scope", None) is None:
            raise TraceError(
                f"The linen module {type(model).__name__} is not bound to variables",
                "a (module, variables) tuple or a bound module",
                "call interop.trace((module, variables), inputs)",
            )
        unbound, variables = model.unbind()
        return capture_linen(unbound, variables)
    return capture_function(model)


def _applied_linen(model: Any) -> tuple[Any, Any] | None:
    """(module, variables) of ``functools.partial(module.apply, variables)``, else None."""
    if not isinstance(model, functools.partial) or model.keywords or len(model.args) != 1:
        return None
    owner = getattr(model.func, "__self__", None)
    if getattr(model.func, "__name__", "") != "apply" or not is_linen_module(owner):
        return None
    return (owner, model.args[0]) if isinstance(model.args[0], Mapping) else None


def _is_leaf(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray | jax.core.Tracer)


def normalize_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Mapping):
        return (), {str(k): v for k, v in example_inputs.items()}
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _input_names(cap: Capture, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """One name per positional then keyword input, after the model's signature."""
    names: list[str] = []
    params = list(cap.signature.parameters.values()) if cap.signature else []
    params = [p for p in params if p.name != "self"]
    for i in range(len(args)):
        if i < len(params) and params[i].kind in (
            params[i].POSITIONAL_ONLY,
            params[i].POSITIONAL_OR_KEYWORD,
        ):
            names.append(params[i].name)
        else:
            var = next(
                (p.name for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL), "input"
            )
            names.append(f"{var}_{i}")
    names.extend(kwargs)
    return [re.sub(r"\W", "_", n) for n in names]


def _specs(arrays, names, dynamic_batch, dynamic_dims) -> list[Any]:
    known = set(names)
    unknown = sorted(set(dynamic_dims) - known)
    if unknown:
        raise TraceError(
            f"dynamic_dims names unknown inputs: {', '.join(unknown)}",
            "input names: " + ", ".join(names),
        )
    scope = jax.export.SymbolicScope()
    specs = []
    batch_size = None
    for name, array in zip(names, arrays, strict=False):
        dims: list[str] = [str(d) for d in array.shape]
        if dynamic_batch and array.ndim > 0:
            batch_size = array.shape[0] if batch_size is None else batch_size
            # one symbol claims the sizes equal: an input whose leading size differs from
            # the first input's (a batch of 4 beside a vector of 8) gets a symbol of its own
            dims[0] = "batch" if array.shape[0] == batch_size else f"batch_{name}"
        for axis, dim_name in dynamic_dims.get(name, {}).items():
            dims[int(axis) % max(array.ndim, 1)] = re.sub(r"\W", "_", str(dim_name))
        shape = jax.export.symbolic_shape(", ".join(dims), scope=scope) if dims else ()
        specs.append(jax.ShapeDtypeStruct(shape, jax.dtypes.canonicalize_dtype(array.dtype)))
    return specs


def trace_model(
    model: Any,
    example_inputs: Any,
    *,
    dynamic_batch: bool = True,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    name: str | None = None,
    check: bool = True,
    check_dims: bool = True,
) -> Graph:
    """Trace a Flax/JAX model on `example_inputs` into a Graph (see `interop.trace`).

    With `check` (the default) the graph must pass the ONNX checker with full type
    inference and load in ONNX Runtime before it is returned (capture_check.py);
    otherwise a `TraceError` names the JAX primitive and source line that wrote the
    offending node. With `check_dims` (the default) a dynamic dim JAX cannot trace
    symbolically is left static with a warning, and the graph runs at a second size of
    each dynamic dim against the model (capture_dim_check.py); ``check_dims=False``
    skips both.

    >>> import interop, jax.numpy as jnp                    # doctest: +SKIP
    >>> from flax import nnx
    >>> g = interop.trace(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), jnp.ones((3, 4)))
    >>> g.inputs[0].shape, g.count_params()
    (('batch', 4), 10)

    An abstract model (``nnx.eval_shape``) is traced with ``weights=`` (capture_weights.py).
    """
    cap = capture(model)
    args, kwargs = normalize_inputs(example_inputs)
    args = tuple(np.asarray(a) if not isinstance(a, jax.Array) else a for a in args)
    kwargs = {k: np.asarray(v) if not isinstance(v, jax.Array) else v for k, v in kwargs.items()}
    input_names = _input_names(cap, args, kwargs)
    arrays = [*args, *kwargs.values()]
    specs = _specs(arrays, input_names, dynamic_batch, dict(dynamic_dims or {}))
    n_args = len(args)
    output_names: list[str] = []

    def flat_fn(params: Any, *flat_inputs: Any) -> tuple[Any, ...]:
        outputs = cap.fn(
            params, *flat_inputs[:n_args], **dict(zip(kwargs, flat_inputs[n_args:], strict=False))
        )
        flat = flatten_outputs(outputs, _is_leaf)
        output_names[:] = [n for n, _ in flat]
        return tuple(t for _, t in flat)

    try:
        closed, specs = capture_dim_check.make_jaxpr(
            flat_fn, cap.params, specs, arrays, source=_source(model), check_dims=check_dims
        )
    except InteropError:
        raise
    except Exception as err:
        raise _trace_error(model, err, dynamic_batch) from err
    closed = _dead_code_eliminated(closed)
    graph = _build(closed, cap, specs, input_names, output_names, model, check=False)
    graph.model.graph.name = name or cap.source["class"].rsplit(".", 1)[-1]
    if check:
        check_captured(graph.model, graph.model.graph.meta.get(_ORIGINS, {}))
    graph.model.graph.meta.pop(_ORIGINS, None)
    if not check_dims:
        return graph
    return capture_dim_check.checked(
        graph, run_model, model, arrays, input_names, n_args, list(kwargs), source=_source(model)
    )


def _source(model: Any) -> str:
    return f"JAX model {getattr(model, '__name__', None) or type(model).__name__}"


def _dead_code_eliminated(closed: Any) -> Any:
    """Drop equations no output needs (RNG plumbing for initial carries, unused branches)."""
    from jax._src.interpreters import partial_eval as pe

    jaxpr, used_inputs = pe.dce_jaxpr(
        closed.jaxpr, [True] * len(closed.jaxpr.outvars), instantiate=True
    )
    # Keep every input (weights stay listed even when unused) by re-adding dropped invars.
    if not all(used_inputs):
        jaxpr = jaxpr.replace(invars=list(closed.jaxpr.invars))
    # Constants no equation reads any more (PRNG keys among them) are dropped too.
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    keep = [i for i, v in enumerate(jaxpr.constvars) if id(v) in read]
    jaxpr = jaxpr.replace(constvars=[jaxpr.constvars[i] for i in keep])
    return jax.extend.core.ClosedJaxpr(jaxpr, [closed.consts[i] for i in keep])


def _trace_error(model: Any, err: Exception, dynamic_batch: bool) -> TraceError:
    text = " ".join(str(err).split())[:600]
    if "symbolic" in text.lower() or "InconclusiveDimensionOperation" in type(err).__name__:
        fix = "the model fixes the size of a dimension that interop made dynamic; pass dynamic_batch=False"
    else:
        fix = "make the call traceable by jax.make_jaxpr (no Python control flow on array values)"
    error = TraceError(
        f"JAX could not trace {type(model).__name__}: {type(err).__name__}: {text}", None, fix
    )
    error.original = err  # type: ignore[attr-defined]
    return error


_ORIGINS = "interop.flax.origins"  # graph.meta key: node name -> the equation that wrote it


def _build(
    closed, cap: Capture, specs, input_names, output_names, model, *, check: bool = True
) -> Graph:
    inputs = []
    dim_sources: dict[str, tuple[ir.Value, int]] = {}
    for name, spec in zip(input_names, specs, strict=False):
        value = ir.Value(name=name)
        Lowering.type_value(value, spec)
        inputs.append(value)
        for axis, d in enumerate(spec.shape):
            if not isinstance(d, int):
                for var in d._get_vars():
                    dim_sources.setdefault(var, (value, axis))
    initializers: list[ir.Value] = []
    kinds = dict(cap.kinds)
    for name, leaf in zip(cap.names, jax.tree_util.tree_leaves(cap.params), strict=False):
        initializers.append(ir.Value(name=name, const_value=_weight(leaf, name)))
    # The jaxpr's own constants: arrays the function closed over (named after the
    # closure variable when found) and large literals.
    named = closure_names(model) if not cap.names else {}
    const_values = []
    for i, const in enumerate(closed.consts):
        cname = named.get(id(const)) or f"const_{i}"
        while any(v.name == cname for v in initializers):
            cname += "_"
        value = ir.Value(name=cname, const_value=ir.tensor(np.asarray(const), name=cname))
        const_values.append(value)
        if cname in named.values() and np.asarray(const).dtype.kind == "f":
            kinds[cname] = provenance.TRAINABLE
    for value in [*const_values, *initializers]:
        value.dtype = value.const_value.dtype
        value.shape = ir.Shape(value.const_value.shape)
    low, outs = walk(closed, [*const_values, *initializers, *inputs], dim_sources)
    nodes = low.nodes
    outputs = _finalize_outputs(low, outs, inputs, closed.jaxpr.outvars, output_names)
    graph = ir.Graph(
        inputs,
        outputs,
        nodes=nodes,
        initializers=[*const_values, *initializers],
        opset_imports={"": OPSET},
    )
    onnx_model = ir.Model(graph, ir_version=10, producer_name="interop")
    layers = cap.finish_layers() if cap.finish_layers else cap.layers
    provenance.write_layers(onnx_model, layers)
    provenance.write_parameters(onnx_model, kinds)
    source = dict(cap.source)
    if source["framework"] == "flax":
        import flax

        source["version"] = flax.__version__
    else:
        source["version"] = jax.__version__
    weights = [*const_values, *initializers]
    source["parameters"] = sum(
        int(np.prod(v.const_value.shape.numpy()))
        for v in weights
        if kinds.get(v.name) == provenance.TRAINABLE
    )
    provenance.write_source(onnx_model, source)
    if check:
        check_captured(onnx_model, low.origins)
    else:
        graph.meta[_ORIGINS] = low.origins
    return Graph(onnx_model)


def _weight(leaf: Any, name: str) -> ir.TensorProtocol:
    """A parameter's initializer; an abstract one (`jax.ShapeDtypeStruct`, traced with
    ``weights=``) holds zeros made only if read, until capture_weights.py gives its tensor."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if not WEIGHTS_APART.get():
            raise TraceError(
                f"Parameter '{name}' has no value (a jax.ShapeDtypeStruct: the model was "
                "built by nnx.eval_shape or jax.eval_shape)",
                "a model with values, or its weights given apart",
                "pass weights= (a safetensors file, a folder of shards, or a mapping of "
                "name -> array); see docs/guides/large-models.md",
            )
        dtype = ir.DataType.from_numpy(np.dtype(leaf.dtype))
        return placeholder(tuple(int(d) for d in leaf.shape), dtype, name)
    return ir.tensor(np.asarray(leaf), name=name)


def _finalize_outputs(low, outs, inputs, outvars, names) -> list[ir.Value]:
    """Name graph outputs after the model's output structure; one distinct node output each."""
    final = []
    seen: set[int] = set()
    taken = {v.name for v in inputs}
    for value, var, name in zip(outs, outvars, names, strict=False):
        if np.dtype(var.aval.dtype).kind == "c":
            raise TraceError(
                f"Output '{name}' is {var.aval.dtype}: ONNX Runtime has no complex tensors",
                "real, integer or boolean outputs",
                "return jnp.real / jnp.imag / jnp.abs / jnp.angle of the complex value (complex "
                "values inside the graph, FFTs included, are supported)",
            )
        if value.producer() is None or id(value) in seen or value.is_initializer():
            low.scope, low.location = "", None
            value = low.op("Identity", [value])
        seen.add(id(value))
        low.type_value(value, var.aval)
        value.name = name if name not in taken else f"{name}_out"
        taken.add(value.name)
        final.append(value)
    return final


def run_model(model: Any, example_inputs: Any) -> list[tuple[str, np.ndarray]]:
    """Run the model in inference mode (jit-compiled); outputs flattened and named as in the graph."""
    cap = capture(model)
    args, kwargs = normalize_inputs(example_inputs)
    names: list[str] = []

    def flat_fn(params: Any, *a: Any, **k: Any) -> tuple[Any, ...]:
        # Flatten inside the traced function: jit would return dicts with sorted keys.
        flat = flatten_outputs(cap.fn(params, *a, **k), _is_leaf)
        names[:] = [n for n, _ in flat]
        return tuple(t for _, t in flat)

    outputs = jax.jit(flat_fn)(cap.params, *args, **kwargs)
    return [(n, np.asarray(t)) for n, t in zip(names, outputs, strict=True)]
