"""`to_torch` and kin: any model (interop.Graph, ONNX file or proto, framework model) as a native one.

The front is framework-agnostic: `to_host` turns what it is given into an ONNX model
(`interop.load` for files, `interop.trace` for framework models; a ModelProto goes to
the emitter as is) and hands it to the host registered under that name
(`interop.hosts`), whose emitter imports the framework. `to_torch`, `to_keras` and
`to_flax` are `to_host` for the built-in hosts.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import onnx

from .errors import MissingDependencyError
from .hosts import host_for


def as_graph(source: Any, example_inputs: Any = None) -> Any:
    """An interop.Graph from a Graph, an ONNX model (proto, path, bytes) or a framework model."""
    from .graph import Graph
    from .serialization import load
    from .tracing import trace

    if isinstance(source, Graph):
        return source
    if isinstance(source, (onnx.ModelProto, str, bytes, bytearray)) or hasattr(
        source, "__fspath__"
    ):
        return load(source)
    import onnx_ir as ir

    if isinstance(source, ir.Model):
        return Graph(source)
    return trace(source, example_inputs)


def to_host(name: str, source: Any, example_inputs: Any = None, **options: Any) -> Any:
    """Emit a model as the native model of the host registered as `name` (`interop.hosts`).

    `options` go to the host's ``emit`` (e.g. ``rngs`` for flax). A missing framework
    raises `MissingDependencyError`; an unknown name an `InteropError` listing the hosts.

    >>> import interop, torch
    >>> module = to_host("torch", interop.trace(torch.nn.Linear(4, 3), (torch.randn(2, 4),)))
    >>> isinstance(module, torch.nn.Module)
    True
    """
    host = host_for(name)
    for module in host.requires:  # fail before tracing, not after
        if sys.modules.get(module) is None and importlib.util.find_spec(module) is None:
            raise MissingDependencyError(
                module, getattr(host, "extra", None), f"emit {host.description}"
            )
    try:
        if isinstance(source, onnx.ModelProto):
            # the emitter reads protos itself (load() would vet its domains); its
            # unsupported-op error names the source layer
            return host.emit(source, **options)
        return host.emit(as_graph(source, example_inputs), **options)
    except ModuleNotFoundError as err:
        if err.name in host.requires:
            raise MissingDependencyError(
                err.name, getattr(host, "extra", None), f"emit {host.description}"
            ) from err
        raise


def to_torch(source: Any, example_inputs: Any = None) -> Any:
    """Emit a model as a trainable ``torch.nn.Module`` (a torch.fx.GraphModule).

    Parameters keep their source names, weighted ops become native layers, constants
    become buffers. The module starts in inference mode (``eval()``), computing what the
    graph computes; ``train()`` switches BatchNorm and Dropout to training as in torch.

    >>> import interop, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> module = to_torch(interop.trace(net, (torch.randn(2, 4),)))
    >>> sorted(dict(module.named_parameters()))
    ['0.bias', '0.weight']
    >>> module(torch.randn(5, 4)).shape
    torch.Size([5, 3])
    """
    return to_host("torch", source, example_inputs)


def to_keras(source: Any, example_inputs: Any = None) -> Any:
    """Emit a model as a trainable ``keras.Model`` (functional) on the active Keras backend.

    Weighted ops become Keras layers (Dense, ConvND, BatchNormalization, Embedding...)
    whose variables map back to the source names in ``model.source_names``; the model
    keeps the source's layout at its inputs and outputs (a torch CNN stays NCHW). Like every
    Keras model it computes in inference mode when called (``model(x)``, ``predict``), as
    the graph does; ``model(x, training=True)`` and ``fit`` use BatchNorm's batch statistics
    and Dropout.

    >>> import interop, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> model = to_keras(interop.trace(net, (torch.randn(2, 4),)))
    >>> sorted(model.source_names.values())
    ['0.bias', '0.weight']
    >>> tuple(model(torch.randn(5, 4).numpy()).shape)
    (5, 3)
    """
    return to_host("keras", source, example_inputs)


def to_flax(source: Any, example_inputs: Any = None, *, rngs: Any = None) -> Any:
    """Emit a model as a trainable ``flax.nnx.Module`` run with JAX (jit-compatible).

    Weights become ``nnx.Param`` (trainable), ``nnx.BatchStat`` (buffers, BatchNorm
    statistics) or a ``Frozen`` variable, under their source path (``blocks.0.conv`` is
    attribute ``blocks`` > ``0`` > ``conv``); ``module.source_names`` maps each state path
    to its source name. The module starts in eval mode; ``module.train()`` makes
    BatchNorm use batch statistics and Dropout drop (with ``rngs``, default nnx.Rngs(0)).

    >>> import interop, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> module = to_flax(interop.trace(net, (torch.randn(2, 4),)))
    >>> sorted(module.source_names.items())
    [('0.bias', '0.bias'), ('0.kernel', '0.weight')]
    >>> module(torch.randn(5, 4).numpy()).shape
    (5, 3)
    """
    return to_host("flax", source, example_inputs, rngs=rngs)


def to_jax(source: Any, example_inputs: Any = None) -> tuple[Any, Any]:
    """Emit a model as ``(pure_fn, params)``: ``pure_fn(params, *inputs)`` in eval mode.

    ``params`` is a nested dict of the trainable arrays (the ``nnx.Param`` of `to_flax`'s
    module); the rest (BatchNorm statistics, frozen weights, rng state) is bound inside
    ``pure_fn``. ``jax.jit(pure_fn)`` and ``jax.grad(loss)(params, ...)`` work directly.

    >>> import interop, jax, torch
    >>> net = torch.nn.Linear(4, 3)
    >>> fn, params = to_jax(interop.trace(net, (torch.randn(2, 4),)))
    >>> sorted(params["gemm"])          # a root-level layer lives under its op's name
    ['bias', 'kernel']
    >>> jax.jit(fn)(params, torch.randn(5, 4).numpy()).shape
    (5, 3)
    """
    from flax import nnx

    graphdef, state, rest = nnx.split(to_flax(source, example_inputs), nnx.Param, ...)  # type: ignore[misc]

    def pure_fn(params: Any, *inputs: Any, **named: Any) -> Any:
        import jax

        fresh = jax.tree.map(lambda leaf: leaf, state)  # a copy to fill, never the template
        nnx.replace_by_pure_dict(fresh, params)
        # copied too: under jit, nnx.scan (inside nnx.RNN) rejects variables that were
        # created outside the trace, such as frozen recurrent weights in `rest`
        bound = jax.tree.map(lambda leaf: leaf, rest)
        return nnx.merge(graphdef, fresh, bound)(*inputs, **named)

    return pure_fn, nnx.to_pure_dict(state)
