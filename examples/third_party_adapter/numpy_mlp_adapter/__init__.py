"""A third-party interop adapter for a toy model type: an MLP kept as numpy arrays.

The model is ``NumpyMLP(layers=[(weight, bias), ...])`` computing
``relu(x @ W0 + b0) @ W1 + b1 ...`` (relu between layers, none after the last).
Installing this package registers `ADAPTER` in the ``interop.adapters`` entry-point
group, so ``interop.trace(mlp, x)`` works without importing anything from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from interop import Graph, provenance

__all__ = ["ADAPTER", "NumpyMLP", "NumpyMLPAdapter"]


@dataclass
class NumpyMLP:
    """Dense layers as ``(weight[in, out], bias[out])`` pairs, relu between them."""

    layers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @classmethod
    def random(cls, sizes: list[int], seed: int = 0) -> NumpyMLP:
        rng = np.random.default_rng(seed)
        return cls(
            [
                (
                    (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32),
                    np.zeros(b, np.float32),
                )
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for i, (weight, bias) in enumerate(self.layers):
            x = x @ weight + bias
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return x


def _first_array(example_inputs: Any) -> np.ndarray:
    if isinstance(example_inputs, (tuple, list)):
        (example_inputs,) = example_inputs
    return np.asarray(example_inputs, dtype=np.float32)


class NumpyMLPAdapter:
    """The adapter protocol of `interop.tracing.Adapter`: five members, nothing else."""

    name = "numpy_mlp"
    description = "numpy_mlp_adapter.NumpyMLP (plain-numpy dense layers)"

    def accepts(self, model: Any) -> bool:
        # cheap and exact: never claim another framework's models
        return isinstance(model, NumpyMLP)

    def trace(self, model: NumpyMLP, example_inputs: Any, **options: Any) -> Graph:
        x = _first_array(example_inputs)
        batch: int | str = "batch" if options.get("dynamic_batch", True) else x.shape[0]
        features = model.layers[0][0].shape[0]
        value = ir.Value(
            name="x", shape=ir.Shape([batch, features]), type=ir.TensorType(ir.DataType.FLOAT)
        )
        graph = ir.Graph([value], [], nodes=[], opset_imports={"": 18}, name="NumpyMLP")
        kinds, layers = {}, [provenance.LayerRecord("", "numpy_mlp_adapter.NumpyMLP", None)]
        for i, (weight, bias) in enumerate(model.layers):
            # the graph computes in float32 whatever the arrays are, like the input
            weight, bias = np.asarray(weight, np.float32), np.asarray(bias, np.float32)
            path = f"layers.{i}"  # parameter names start with the layer path: that is ownership
            layers.append(provenance.LayerRecord(path, "numpy_mlp_adapter.Dense", ""))
            w = ir.Value(
                name=f"{path}.weight", const_value=ir.tensor(weight, name=f"{path}.weight")
            )
            b = ir.Value(name=f"{path}.bias", const_value=ir.tensor(bias, name=f"{path}.bias"))
            for param in (w, b):
                graph.register_initializer(param)
                kinds[param.name] = provenance.TRAINABLE
            nodes = [ir.node("MatMul", [value, w], name=f"{path}/MatMul")]
            nodes.append(ir.node("Add", [nodes[-1].outputs[0], b], name=f"{path}/Add"))
            if i < len(model.layers) - 1:
                nodes.append(ir.node("Relu", [nodes[-1].outputs[0]], name=f"{path}/Relu"))
            for node in nodes:
                node.metadata_props[provenance.SCOPE] = path  # the node belongs to this layer
                out = node.outputs[0]
                out.name = node.name.replace("/", "_")
                out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape([batch, weight.shape[1]])
                graph.append(node)
            value = nodes[-1].outputs[0]
        value.name = "output"
        graph.outputs.append(value)

        onnx_model = ir.Model(graph, ir_version=10, producer_name="numpy_mlp_adapter")
        provenance.write_layers(onnx_model, layers)
        provenance.write_parameters(onnx_model, kinds)
        provenance.write_source(
            onnx_model, {"framework": "numpy_mlp", "version": "0.1.0", "class": "NumpyMLP"}
        )
        return Graph(onnx_model)

    def run_source(self, model: NumpyMLP, example_inputs: Any) -> list[tuple[str, np.ndarray]]:
        # what interop.verify compares the graph against: named like the graph's outputs
        return [("output", model(_first_array(example_inputs)))]


ADAPTER = NumpyMLPAdapter()
