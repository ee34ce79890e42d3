"""`interop.Graph`: an `onnx_ir.Model` plus the layer tree, signature and user API.

A Graph is treated as immutable once built: methods that change structure
(`submodel`, `clone`) return new graphs, so cached views (layer tree, runtime
sessions) stay valid.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from . import provenance
from .errors import LayerNotFoundError, close_matches
from .hierarchy import Layer, LayerTree, format_shape

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints for static dims, names for symbolic ones) and dtype of a tensor."""

    name: str
    shape: tuple[Dim, ...] | None
    dtype: np.dtype | None

    @classmethod
    def of(cls, value: ir.Value) -> TensorSpec:
        shape = None
        if value.shape is not None:
            shape = tuple(
                d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None)
                for d in value.shape
            )
        dtype = value.dtype.numpy() if value.dtype is not None else None
        return cls(value.name or "", shape, dtype)

    def __str__(self) -> str:
        dims = (
            "?"
            if self.shape is None
            else ", ".join("?" if d is None else str(d) for d in self.shape)
        )
        return f"{self.name}: {self.dtype}[{dims}]"


class Graph:
    """A model of any framework as an ONNX graph with its source's layer hierarchy.

    Build one with `interop.trace(model, example_inputs)` or `interop.load(path)`.

    >>> import interop, torch
    >>> g = interop.trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> g.inputs[0].shape
    ('batch', 4)
    >>> g.run(np.ones((5, 4), np.float32)).shape
    (5, 2)
    """

    def __init__(self, model: ir.Model, *, base_dir: str | Path | None = None):
        self.model = model
        self._base_dir = str(base_dir) if base_dir else None
        self._tree: LayerTree | None = None
        self._sessions: dict[str, Any] = {}
        # the runtime's optimized copy and what it did (when stale: interop.runtime_cache)
        self._optimized: Any = None
        self._optimize_report: dict[str, Any] = {}
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- signature
    @property
    def name(self) -> str:
        return self.model.graph.name or "graph"

    @property
    def inputs(self) -> list[TensorSpec]:
        """The named inputs, with symbolic dims as names (e.g. ``'batch'``).

        A graph input that is also an initializer (every weight of an IR-version-3 file) is
        a weight, not an input: it is listed in `weight_inputs` and `run` takes it by name
        only, to override the stored value.
        """
        from .legacy import data_inputs

        return [TensorSpec.of(v) for v in data_inputs(self.model.graph)]

    @property
    def weight_inputs(self) -> list[TensorSpec]:
        """Initializer-backed graph inputs: weights `run` accepts by name as overrides."""
        from .legacy import weight_inputs

        return [TensorSpec.of(v) for v in weight_inputs(self.model.graph)]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.of(v) for v in self.model.graph.outputs]

    @property
    def signature(self) -> dict[str, list[TensorSpec]]:
        return {"inputs": self.inputs, "outputs": self.outputs}

    @property
    def source(self) -> dict[str, Any]:
        """Where the graph came from: framework, version, model class."""
        return provenance.read_source(self.model)

    # ----------------------------------------------------------------- hierarchy
    @property
    def tree(self) -> LayerTree:
        if self._tree is None:
            with self._lock:
                if self._tree is None:
                    self._tree = LayerTree(self.model)
        return self._tree

    @property
    def root(self) -> Layer:
        """The model itself as a layer; its children are the top-level layers."""
        return self.tree.root

    @property
    def layers(self) -> list[Layer]:
        """Every layer below the root, depth first in definition order."""
        return [layer for layer in self.root.walk() if layer is not self.root]

    def layer(self, path: str) -> Layer:
        """One layer by its source path, e.g. ``"blocks.0.conv"``."""
        layer = self.tree.by_path.get(path)
        if layer is None:
            close = close_matches(path, self.tree.by_path)
            raise LayerNotFoundError(
                f"No layer '{path}' in graph '{self.name}'",
                "a layer path such as "
                + (", ".join(repr(c) for c in close) or "those in graph.layers"),
                "list the paths with [layer.path for layer in graph.layers]",
            )
        return layer

    # ----------------------------------------------------------------- weights
    @property
    def parameter_kinds(self) -> dict[str, str]:
        """Initializer name -> "trainable" | "frozen" | "buffer" for the weights of the source."""
        return self.root.all_parameter_kinds()

    def get_weights(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by source name, as numpy arrays (copies)."""
        inits = self.model.graph.initializers
        weights = {}
        for name in self.parameter_kinds:
            tensor = inits[name].const_value
            assert tensor is not None, f"initializer {name} has no value"
            weights[name] = np.array(tensor.numpy())
        return weights

    def count_params(self) -> int:
        """Trainable plus frozen parameters (buffers excluded)."""
        return self.root.param_count

    # ----------------------------------------------------------------- inspection
    def summary(
        self, depth: int | None = None, print_fn: Callable[[str], Any] | None = print, **kwargs: Any
    ) -> str | None:
        """A Keras-style table of layers, shapes, parameters and connections.

        `depth` collapses the layer tree below that depth (1 = top-level layers).
        With ``print_fn=None`` the text is returned instead of printed.
        """
        from .inspection import summarize

        text = summarize(self, depth=depth, **kwargs)
        if print_fn is None:
            return text
        print_fn(text)
        return None

    def plot(self, path: str | Path | None = None, depth: int | None = None, **kwargs: Any) -> Any:
        """Draw the graph with layer clusters and shape-labelled edges through graphviz.

        The format follows the suffix of `path` (.svg, .png, .pdf, .dot). Returns the
        path written, or the `graphviz.Digraph` when `path` is None.
        """
        from .plotting import plot

        return plot(self, path, depth=depth, **kwargs)

    def view(self, report: Any = None, **kwargs: Any) -> Any:
        """Open the graph in Model Explorer (extra ``explorer``): the layer tree as collapsible
        groups, shapes and dtypes on the edges, parameter counts per layer, and a `compare`
        report (`report`) as an error overlay. Returns an inline frame in Jupyter, else the
        URL of the local page (opened in a browser unless ``open_browser=False``).

        >>> g.view()                                        # doctest: +SKIP
        >>> g.view(interop.compare(model, g, (x,)))         # doctest: +SKIP
        """
        from .explorer import view

        return view(self, report, **kwargs)

    def _repr_html_(self) -> str:
        from .inspection import summarize_html

        return summarize_html(self)

    def _repr_svg_(self) -> str | None:
        from .plotting import render_svg

        return render_svg(self, depth=1)

    def __repr__(self) -> str:
        from .legacy import data_inputs

        ins = ", ".join(
            f"{s.name}{format_shape(v)}" for s, v in zip(self.inputs, data_inputs(self.model.graph))
        )
        outs = ", ".join(
            f"{s.name}{format_shape(v)}" for s, v in zip(self.outputs, self.model.graph.outputs)
        )
        src = self.source.get("framework", "onnx")
        return (
            f"<interop.Graph '{self.name}' from {src}: {len(self.layers)} layers, "
            f"{len(self.model.graph)} nodes, {self.count_params():,} params; ({ins}) -> ({outs})>"
        )

    # ----------------------------------------------------------------- serialization
    def to_proto(self) -> onnx.ModelProto:
        """The model as an `onnx.ModelProto`, weights inline (read from external files if needed)."""
        from .serialization import PROTO_LIMIT, weight_bytes

        external = any(
            isinstance(v.const_value, ir.ExternalTensor)
            for v in self.model.graph.initializers.values()
        )
        if external and weight_bytes(self.model) < PROTO_LIMIT:
            # references relative to our folder would dangle in a bare proto: read them in
            ir.external_data.load_to_model(self.model)
        return ir.serde.serialize_model(self.model)

    def to_bytes(self) -> bytes:
        return self.to_proto().SerializeToString()

    def save(
        self, path: str | Path, *, external_data: bool | None = None, optimize: bool = False
    ) -> Path:
        """Write an .onnx file atomically; weights go to ``<name>.data`` when large.

        ``optimize=True`` writes the inference-optimized copy that `run` uses (folded
        constants and BatchNorms, ONNX Runtime's fused transformer ops) for deployment
        on ONNX Runtime, instead of the graph as captured.
        """
        from .serialization import save

        return save(self, path, external_data=external_data, optimize=optimize)

    def clone(self) -> Graph:
        """A deep copy: same structure, metadata and weights, sharing nothing."""
        from .serialization import deserialize

        return deserialize(self.to_proto(), base_dir=self._base_dir)

    def get_config(self) -> dict[str, Any]:
        """A JSON-serialisable description of the graph without its weights.

        Rebuild it with ``Graph.from_config(config, graph.get_weights())``.
        """
        from .config import graph_config

        return graph_config(self)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], weights: Mapping[str, Any] | None = None
    ) -> Graph:
        """Rebuild a graph from `get_config()` output and its weights (name -> array)."""
        from .config import graph_from_config

        return graph_from_config(config, weights)

    # ----------------------------------------------------------------- sub-graphs
    def submodel(self, outputs: Sequence[str] | str, inputs: Sequence[str] | None = None) -> Graph:
        """A new graph computing the given layers' outputs (or named values).

        Each entry of `outputs` is a layer path (the values that layer returned, in
        return order, named ``path`` or ``path:i``; a layer that emits no node gives the
        value it passes through) or a value name (how to ask for a layer's
        `side_outputs`, such as a KV-cache write). Nodes that do not feed them are
        dropped, and so are graph inputs they do not need.

        >>> feats = g.submodel(outputs=["blocks.0"])   # doctest: +SKIP
        """
        from .subgraph import extract

        return extract(self, [outputs] if isinstance(outputs, str) else list(outputs), inputs)

    # ----------------------------------------------------------------- execution
    def run(
        self,
        *args: Any,
        device: str = "cpu",
        output_names: Sequence[str] | None = None,
        as_dict: bool = False,
        **named: Any,
    ) -> Any:
        """Run on ONNX Runtime. Inputs: numpy arrays, torch tensors, or anything array-like.

        Returns one array for a single output, a tuple otherwise (or a dict with
        ``as_dict=True``). `device` is "cpu", "cuda" or "auto" (CUDA when present).
        Weights listed as graph inputs (`weight_inputs`) are never positional; give one by
        name to run with another value, ``g.run(x, **{"fc.weight": w})``.
        """
        from .runtime import run

        return run(self, args, named, device=device, output_names=output_names, as_dict=as_dict)
