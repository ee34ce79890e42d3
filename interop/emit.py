"""`to_torch`: any model (interop.Graph, ONNX file or proto, framework model) as a native module.

The front is framework-agnostic: it turns what it is given into an ONNX model
(`interop.load` for files and protos, `interop.trace` for framework models) and hands
it to the adapter's emitter, which imports the framework.
"""

from __future__ import annotations

from typing import Any

import onnx

from .errors import MissingDependencyError


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


def to_torch(source: Any, example_inputs: Any = None) -> Any:
    """Emit a model as a trainable ``torch.nn.Module`` (a torch.fx.GraphModule).

    Parameters keep their source names, weighted ops become native layers, constants
    become buffers; ``train()`` / ``eval()`` switch BatchNorm and Dropout as in torch.

    >>> import interop, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> module = to_torch(interop.trace(net, (torch.randn(2, 4),)))
    >>> sorted(dict(module.named_parameters()))
    ['0.bias', '0.weight']
    >>> module(torch.randn(5, 4)).shape
    torch.Size([5, 3])
    """
    try:
        from .adapters.torch.emitter import to_torch_module
    except ModuleNotFoundError as err:
        if err.name == "torch":
            raise MissingDependencyError("torch", "torch", "emit a torch module") from err
        raise
    graph = as_graph(source, example_inputs)
    if isinstance(source, onnx.ModelProto):
        return to_torch_module(source)
    return to_torch_module(graph)
