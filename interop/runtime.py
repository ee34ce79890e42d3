"""Running graphs on ONNX Runtime: one cached session per (graph, device).

Inputs are checked against the signature first (rank, static dims, dtype family), so a
mistake reads as a `ShapeError` naming the input instead of an ONNX Runtime trace.
ONNX Runtime's `InferenceSession.run` is thread-safe, so one session serves every thread.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DeviceError, InteropError, ModelLoadError, ShapeError

if TYPE_CHECKING:
    from .graph import Graph

# from IR version 4 on, an initializer that is also a graph input is a default a feed overrides
OVERRIDABLE_IR_VERSION = 4

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def available_devices() -> list[str]:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    return ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in providers else [])


def resolve_device(device: str) -> str:
    device = device.lower()
    if device == "auto":
        return "cuda" if "cuda" in available_devices() else "cpu"
    if device not in _PROVIDERS:
        raise DeviceError(f"Unknown device '{device}'", "'cpu', 'cuda' or 'auto'")
    if device == "cuda" and "cuda" not in available_devices():
        import onnxruntime as ort

        raise DeviceError(
            "device='cuda' was asked for, but ONNX Runtime has no CUDA execution provider here "
            f"(available: {', '.join(ort.get_available_providers())})",
            "onnxruntime-gpu installed and an NVIDIA GPU visible",
            "pip install 'interop-graph[gpu]' on a machine with CUDA, or pass device='auto' "
            "to fall back to the CPU",
        )
    return device


def session_for(graph: Graph, device: str, *, overrides: bool = False) -> Any:
    """The graph's ONNX Runtime session for `device`, created once.

    With `overrides`, a session whose initializer-backed inputs can be fed (ONNX Runtime
    treats them as constants in an IR-version-3 file: that session reads the model as IR 4).
    """
    key = device + ("+weights" if overrides else "")
    session = graph._sessions.get(key)
    if session is not None:
        return session
    with graph._lock:
        session = graph._sessions.get(key)
        if session is None:
            session = _create_session(graph, device, overrides=overrides)
            graph._sessions[key] = session
    return session


def _create_session(graph: Graph, device: str, *, overrides: bool = False) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    from .serialization import PROTO_LIMIT, weight_bytes

    providers = _PROVIDERS[device]
    try:
        if overrides and graph.model.ir_version < OVERRIDABLE_IR_VERSION:
            proto = graph.to_proto()
            proto.ir_version = OVERRIDABLE_IR_VERSION
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        elif weight_bytes(graph.model) < PROTO_LIMIT:
            session = ort.InferenceSession(graph.to_bytes(), options, providers=providers)
        else:  # too large for one protobuf: hand ONNX Runtime a file with external data
            with tempfile.TemporaryDirectory(prefix="interop-run-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                graph.save(path, external_data=True)
                session = ort.InferenceSession(path, options, providers=providers)
    except InteropError:
        raise
    except Exception as err:  # ORT's own exception types (Fail, InvalidGraph, ...) share no base
        raise ModelLoadError(
            f"ONNX Runtime cannot build a session for graph '{graph.name}': "
            f"{type(err).__name__}: {_first_lines(err)}",
            "a model that passes ONNX Runtime's type and shape checks",
            "check the file's origin and re-export it; graph.summary() still shows its structure",
        ) from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise DeviceError("ONNX Runtime could not start the CUDA execution provider for this graph")
    return session


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def prepare_inputs(
    graph: Graph, args: Sequence[Any], named: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Match positional and named inputs to the signature; check and cast them."""
    specs = graph.inputs
    if len(args) == 1 and isinstance(args[0], Mapping) and not named:
        named, args = args[0], ()
    if len(args) == 1 and isinstance(args[0], (tuple, list)) and len(specs) > 1:
        args = tuple(args[0])
    if len(args) > len(specs):
        raise ShapeError(
            f"Got {len(args)} positional inputs",
            f"at most {len(specs)}: {', '.join(s.name for s in specs)}",
        )
    weights = {s.name: s for s in graph.weight_inputs}  # overridable by name only
    feeds: dict[str, Any] = {spec.name: arg for spec, arg in zip(specs, args)}
    for name, value in named.items():
        if name not in {s.name for s in specs} and name not in weights:
            raise ShapeError(
                f"Unknown input '{name}'",
                "one of "
                + ", ".join(s.name for s in specs)
                + (
                    f" or a weight listed in graph.weight_inputs ({len(weights)})"
                    if weights
                    else ""
                ),
            )
        if name in feeds:
            raise ShapeError(f"Input '{name}' was given both by position and by name")
        feeds[name] = value
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise ShapeError(f"Missing input(s): {', '.join(missing)}", "one array per graph input")
    checked = {spec.name: _check(spec, to_numpy(feeds[spec.name])) for spec in specs}
    for name in feeds.keys() & weights.keys():
        checked[name] = _check(weights[name], to_numpy(feeds[name]))
    return checked


def _check(spec: Any, array: np.ndarray) -> np.ndarray:
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise ShapeError(
                f"Input '{spec.name}' has rank {array.ndim} (shape {array.shape})",
                f"rank {len(spec.shape)}, shape {spec.shape}",
                "reshape the input to the graph's signature (graph.inputs)",
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if isinstance(want, int) and want != got:
                raise ShapeError(
                    f"Input '{spec.name}' has size {got} on axis {axis} (shape {array.shape})",
                    f"size {want} on that axis, shape {spec.shape}",
                    "only the symbolic dims of graph.inputs may vary",
                )
    if spec.dtype is not None and array.dtype != spec.dtype:
        if array.dtype.kind == spec.dtype.kind or (
            array.dtype.kind in "iub" and spec.dtype.kind in "iu"
        ):
            array = array.astype(spec.dtype)  # same family (float64 -> float32, int32 -> int64)
        else:
            raise ShapeError(
                f"Input '{spec.name}' has dtype {array.dtype}",
                f"dtype {spec.dtype}",
                f"convert it first, e.g. x.astype('{spec.dtype}')",
            )
    # np.ascontiguousarray turns 0-d scalars into shape (1,): keep them scalar
    return np.ascontiguousarray(array) if array.ndim else array


def run(
    graph: Graph,
    args: Sequence[Any],
    named: Mapping[str, Any],
    *,
    device: str = "cpu",
    output_names: Sequence[str] | None = None,
    as_dict: bool = False,
) -> Any:
    feeds = prepare_inputs(graph, args, named)
    overrides = len(feeds) > len(graph.inputs)  # weights given by name
    session = session_for(graph, resolve_device(device), overrides=overrides)
    names = list(output_names) if output_names else [s.name for s in graph.outputs]
    try:
        results = session.run(names, feeds)
    except Exception as err:  # ORT's exception types share no base with ours
        raise InteropError(
            f"ONNX Runtime failed while running graph '{graph.name}': "
            f"{type(err).__name__}: {_first_lines(err)}",
            "inputs the graph can compute on (see graph.inputs) and a well-formed graph",
            "check the inputs' shapes and values; if they are right, the model is inconsistent",
        ) from None
    if as_dict:
        return dict(zip(names, results))
    return results[0] if len(results) == 1 else tuple(results)


def _first_lines(err: BaseException, limit: int = 600) -> str:
    text = str(err).strip()
    return text if len(text) <= limit else text[:limit] + " ..."
