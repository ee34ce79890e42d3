"""`Graph.get_config` / `Graph.from_config`: a graph as JSON without its weights, and back.

The config is the ONNX model in protobuf's JSON mapping with the data of every parameter
and buffer stripped, plus the signature and layer table for reading; weights travel
separately (``graph.get_weights()``), as a Keras config and its weights do.

>>> again = Graph.from_config(graph.get_config(), graph.get_weights())   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from . import provenance
from .errors import ModelLoadError, ShapeError

if TYPE_CHECKING:
    from .graph import Graph, TensorSpec


def graph_config(graph: Graph) -> dict[str, Any]:
    """The JSON-serialisable description of a graph without its weights."""
    from google.protobuf import json_format

    proto = graph.to_proto()
    kinds = graph.parameter_kinds
    for tensor in proto.graph.initializer:
        if tensor.name in kinds:
            _strip_tensor_data(tensor)
    return {
        "format": "interop.graph",
        "version": 1,
        "name": graph.name,
        "inputs": [_spec_config(s) for s in graph.inputs],
        "outputs": [_spec_config(s) for s in graph.outputs],
        "layers": [
            {"path": la.path, "class": la.qualified_class, "params": la.param_count}
            for la in graph.layers
        ],
        "onnx": json_format.MessageToDict(proto),
    }


def graph_from_config(config: Mapping[str, Any], weights: Mapping[str, Any] | None = None) -> Graph:
    """A graph rebuilt from `graph_config` output and its weights (name -> array)."""
    from google.protobuf import json_format

    from .serialization import deserialize

    if not isinstance(config, Mapping) or config.get("format") != "interop.graph":
        raise ModelLoadError(
            "The config is not an interop graph config",
            "the dict returned by Graph.get_config() (format 'interop.graph')",
            "pass the value of graph.get_config(), unchanged",
        )
    proto = onnx.ModelProto()
    try:
        json_format.ParseDict(copy.deepcopy(dict(config["onnx"])), proto)
    except (json_format.ParseError, KeyError, TypeError) as err:
        raise ModelLoadError(f"The config's 'onnx' entry is malformed: {err}") from err
    weights = dict(weights or {})
    kinds = _parameter_kinds(proto)
    missing = [name for name in kinds if name not in weights]
    if missing:
        raise ModelLoadError(
            f"from_config is missing {len(missing)} weight(s): {', '.join(missing[:5])}",
            "a mapping with every parameter and buffer name of the graph",
            "pass graph.get_weights() of the graph that produced the config",
        )
    unknown = sorted(set(weights) - set(kinds))
    if unknown:
        raise ModelLoadError(
            f"from_config got weights the graph does not have: {', '.join(unknown[:5])}",
            "only names listed in the graph's parameters",
            "check that the weights belong to this config",
        )
    for tensor in proto.graph.initializer:
        if tensor.name in kinds:
            _fill_tensor(tensor, weights[tensor.name])
    return deserialize(proto)


def _spec_config(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "shape": None if spec.shape is None else list(spec.shape),
        "dtype": None if spec.dtype is None else str(spec.dtype),
    }


_DATA_FIELDS = (
    "raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
    "uint64_data", "external_data",
)  # fmt: skip


def _strip_tensor_data(tensor: onnx.TensorProto) -> None:
    for name in _DATA_FIELDS:
        tensor.ClearField(name)
    tensor.data_location = onnx.TensorProto.DEFAULT


def _fill_tensor(tensor: onnx.TensorProto, array: Any) -> None:
    array = np.asarray(_to_numpy(array))
    expected_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tuple(array.shape) != tuple(tensor.dims):
        raise ShapeError(
            f"Weight '{tensor.name}' has shape {tuple(array.shape)}",
            f"shape {tuple(tensor.dims)}",
            "pass the weights of the graph that produced the config",
        )
    filled = onnx.numpy_helper.from_array(array.astype(expected_dtype, copy=False), tensor.name)
    tensor.CopyFrom(filled)


def _parameter_kinds(proto: onnx.ModelProto) -> dict[str, str]:
    for entry in proto.metadata_props:
        if entry.key == provenance.PARAMETERS:
            try:
                table = json.loads(entry.value)
            except json.JSONDecodeError as err:
                raise ModelLoadError(f"Metadata '{entry.key}' is not valid JSON: {err}") from err
            return {str(k): str(v) for k, v in table.items()} if isinstance(table, dict) else {}
    return {}


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor, without importing torch
        return array.detach().cpu().numpy()
    return np.asarray(array)
