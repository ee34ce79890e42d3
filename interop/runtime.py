"""Running graphs on ONNX Runtime: one cached session per (graph, device).

The session runs an inference-optimized copy of the graph (`interop.optimize`: constant
folding, BatchNormalization into Conv, transformer fusions), built once per graph and
cached with the sessions; the graph itself stays as captured. Both are rebuilt when the
graph changes: a node, input, attribute, initializer or weight tensor added, removed or
replaced (`interop.runtime_cache` has the rule; writing into a weight's array in place
is not seen: call `refresh`). Weights given by name at run time (`weight_inputs`) run
on the graph as captured, whose weights are still inputs; so do graphs with over 2 GB
of weights (the optimizer would read every weight). ``INTEROP_OPTIMIZE=0`` in the environment runs
every graph as captured.

Inputs are checked against the signature first (rank, static dims, dtype family), so a
mistake reads as a `ShapeError` naming the input instead of an ONNX Runtime trace.
ONNX Runtime's `InferenceSession.run` is thread-safe, so one session serves every thread.
On CUDA, runs go through IO binding: weights stay on the GPU, inputs that already live
there (torch CUDA tensors, ``OrtValue``s) are bound in place and outputs are written to
GPU memory, then copied to the host once; the binding is kept per thread and session, so
repeated runs write into the same input and output buffers (`run_bound`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DeviceError, InteropError, ModelLoadError, ShapeError
from .ort_feeds import host_numpy, run_session
from .runtime_cache import current, rekey
from .runtime_cache import refresh as refresh  # public: interop.runtime.refresh(g)

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


def optimizing() -> bool:
    """Whether sessions run the optimized copy (``INTEROP_OPTIMIZE=0`` turns it off)."""
    return os.environ.get("INTEROP_OPTIMIZE", "1").strip().lower() not in ("0", "false", "no")


def session_for(graph: Graph, device: str, *, overrides: bool = False) -> Any:
    """The graph's ONNX Runtime session for `device`, created once.

    It runs the optimized copy (`optimized_model`). With `overrides`, a session of the
    graph as captured whose initializer-backed inputs can be fed (ONNX Runtime treats them
    as constants in an IR-version-3 file: that session reads the model as IR 4).
    """
    current(graph)  # drops a stale cache (the rule: interop.runtime_cache)
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


def optimized_model(graph: Graph) -> Any:
    """The `onnx_ir.Model` ONNX Runtime runs for `graph`: its optimized copy, built once.

    Of the optimization stages (`interop.optimize`), the most optimized one whose session
    ONNX Runtime creates on the CPU; the graph as captured if none does.
    """
    current(graph)  # drops a stale cache (the rule: interop.runtime_cache)
    session_for(graph, "cpu")
    return graph._optimized.model if graph._optimized is not None else graph.model


def optimization(graph: Graph) -> dict[str, Any]:
    """What the runtime did to `graph`: the stage it runs, each stage tried, and timings.

    >>> interop.runtime.optimization(g)["stage"]     # doctest: +SKIP
    'attention'
    """
    optimized_model(graph)
    return dict(graph._optimize_report)


def _create_session(graph: Graph, device: str, *, overrides: bool = False) -> Any:
    if overrides or not optimizing():
        return _session(graph, graph.model, device, overrides=overrides)
    report: dict[str, Any] = {"stage": "as captured", "tried": [], "optimize_s": 0.0}
    if graph._optimized is not None:  # another device's session chose the stage already
        try:
            return _session(graph, graph._optimized.model, device)
        except ModelLoadError:
            graph._optimized = None  # this device refuses it: choose again
    from .optimize import optimized_copy
    from .serialization import PROTO_LIMIT, weight_bytes

    start = time.perf_counter()
    stages = []
    if weight_bytes(graph.model) >= PROTO_LIMIT:
        # the optimizer reads every weight (deduplication hashes them): over 2 GB that
        # would hold copies of mapped external data, against issue 7's memory bound
        report["tried"].append("not optimized: weights over 2 GB")
    else:
        _inline_external(graph)
        try:
            stages = optimized_copy(graph.model)
        except Exception as err:  # an optimizer bug must not stop the graph from running
            reason = f"{type(err).__name__}: {_first_lines(err)}"
            report["tried"].append(f"optimizer failed: {reason}")
    report["optimize_s"] = time.perf_counter() - start
    session = None
    for stage in stages:
        try:
            session = _session(graph, stage.model, device)
        except ModelLoadError as err:
            report["tried"].append(f"{stage.summary}: refused ({_first_lines(err, 200)})")
            continue
        report["tried"].append(stage.summary)
        report["stage"] = stage.name
        graph._optimized = stage
        break
    if session is None:
        session = _session(graph, graph.model, device)
    report["session_s"] = time.perf_counter() - start - report["optimize_s"]
    graph._optimize_report = report
    return session


def _inline_external(graph: Graph) -> None:
    """Read external weights into memory (as `to_proto` does; they fit one protobuf).

    The optimized copy shares the graph's tensors; locations relative to the model's
    folder would dangle in the copy's serialized bytes.
    """
    import onnx_ir as ir

    inits = graph.model.graph.initializers.values()
    if any(isinstance(v.const_value, ir.ExternalTensor) for v in inits):
        ir.external_data.load_to_model(graph.model)
        rekey(graph)  # the same weights, in memory: not an edit that stales the cache


def _session(graph: Graph, model: Any, device: str, *, overrides: bool = False) -> Any:
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    from .serialization import PROTO_LIMIT, save_model, weight_bytes

    providers = _PROVIDERS[device]
    try:
        if overrides and model.ir_version < OVERRIDABLE_IR_VERSION:
            proto = graph.to_proto()
            proto.ir_version = OVERRIDABLE_IR_VERSION
            session = ort.InferenceSession(proto.SerializeToString(), options, providers=providers)
        elif weight_bytes(model) < PROTO_LIMIT:
            if model is graph.model:
                data = graph.to_bytes()  # reads external weights in, as to_proto does
            else:
                data = ir.serde.serialize_model(model).SerializeToString()
            session = ort.InferenceSession(data, options, providers=providers)
        elif (folder := _external_folder(model)) is not None:
            # weights on disk in one folder (a loaded file, a safetensors checkpoint): ONNX
            # Runtime reads them from there itself, nothing is copied or held by us
            options.add_session_config_entry(_EXTERNAL_FOLDER, folder)
            data = ir.serde.serialize_model(model).SerializeToString()
            session = ort.InferenceSession(data, options, providers=providers)
        else:  # too large for one protobuf: hand ONNX Runtime a file with external data
            with tempfile.TemporaryDirectory(prefix="interop-run-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                save_model(model, path, external_data=True)
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


_EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"


def _external_folder(model: Any) -> str | None:
    """The one folder every external weight of `model` is in, when the rest fit a protobuf.

    Locations are made relative to it (they are as loaded, or the shard's name for a
    safetensors checkpoint); None when weights are spread over folders or too many are
    held in memory.
    """
    import onnx_ir as ir

    from .serialization import PROTO_LIMIT

    folders, inline = set(), 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                folders.add(os.path.dirname(os.path.abspath(tensor.path)))
            elif tensor is not None:
                inline += tensor.nbytes
    if len(folders) != 1 or inline >= PROTO_LIMIT // 2:
        return None
    folder = folders.pop()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and str(tensor.location) != os.path.basename(
                tensor.path
            ):
                return None  # a location with folders in it: ORT resolves it from the folder
    return folder


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor without importing torch
        return host_numpy(value)  # bfloat16 included (ort_feeds)
    if type(value).__name__ == "OrtValue":  # an ONNX Runtime value, on the host or a device
        return value.numpy()
    return np.asarray(value)


def prepare_inputs(
    graph: Graph, args: Sequence[Any], named: Mapping[str, Any], *, on_device: bool = False
) -> dict[str, Any]:
    """Match positional and named inputs to the signature; check and cast them.

    With `on_device`, torch CUDA tensors and ONNX Runtime ``OrtValue``s stay where they
    are (checked, not copied) for a run through IO binding.
    """
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

    def check(spec: Any, value: Any) -> Any:
        if on_device and _on_device(value):
            return _check_device(spec, value)
        return _check(spec, to_numpy(value))

    checked = {spec.name: check(spec, feeds[spec.name]) for spec in specs}
    for name in feeds.keys() & weights.keys():
        checked[name] = check(weights[name], feeds[name])
    return checked


def _on_device(value: Any) -> bool:
    if type(value).__name__ == "OrtValue":
        return value.device_name().lower() == "cuda"
    device = getattr(value, "device", None)
    return getattr(device, "type", None) == "cuda" and hasattr(value, "data_ptr")


def _check_device(spec: Any, value: Any) -> Any:
    """`_check` for a CUDA tensor or OrtValue: rank and static dims; a torch dtype cast."""
    is_ort = type(value).__name__ == "OrtValue"
    shape = tuple(value.shape() if is_ort else value.shape)
    if spec.shape is not None:
        fits = len(shape) == len(spec.shape) and all(
            not isinstance(want, int) or want == got for want, got in zip(spec.shape, shape)
        )
        if not fits:
            raise ShapeError(
                f"Input '{spec.name}' has shape {shape}",
                f"shape {spec.shape}",
                "only the symbolic dims of graph.inputs may vary",
            )
    if is_ort or spec.dtype is None:
        return value  # ONNX Runtime checks an OrtValue's element type itself
    torch = sys.modules["torch"]
    want = getattr(torch, spec.dtype.name, None)
    if want is not None and value.dtype != want:
        value = value.to(want)  # on the GPU, like the host path's same-family casts
    return value.contiguous()


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
    device = resolve_device(device)
    feeds = prepare_inputs(graph, args, named, on_device=device == "cuda")
    overrides = len(feeds) > len(graph.inputs)  # weights given by name
    session = session_for(graph, device, overrides=overrides)
    names = list(output_names) if output_names else [s.name for s in graph.outputs]

    def call(session: Any) -> list[Any]:
        if device == "cuda":
            return run_bound(session, names, feeds, device)
        return run_session(session, names, feeds)  # bfloat16 through OrtValues (ort_feeds)

    try:
        try:
            results = call(session)
        except Exception:
            captured = _captured_fallback(graph, device, overrides)
            if captured is None:
                raise
            results = call(captured)  # the optimized copy failed where the capture runs
            with graph._lock:
                graph._sessions[device] = captured
                graph._optimize_report["stage"] = "as captured (the optimized copy failed)"
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


def _captured_fallback(graph: Graph, device: str, overrides: bool) -> Any:
    """A session of the graph as captured, when the failed session ran the optimized copy."""
    if overrides or graph._optimized is None or graph._sessions.get(device) is None:
        return None
    key = device + "+captured"  # built once: bad inputs fail on it too, without a rebuild
    if key not in graph._sessions:
        try:
            graph._sessions[key] = _session(graph, graph.model, device)
        except ModelLoadError:
            graph._sessions[key] = None
    return graph._sessions[key]


class _Bound:
    """One thread's IO binding of one session, kept between runs.

    A numpy input is copied into an ``OrtValue`` on the device that stays bound (the next
    run of the same shape and dtype writes into it: no rebinding, no new buffer); the
    outputs ONNX Runtime allocated on the device in the first run are bound for the next
    runs with the same input shapes, so they are written in place.
    """

    def __init__(self, session: Any, device: str, names: tuple[str, ...]) -> None:
        self.binding = session.io_binding()
        self.device = device
        self.names = names
        self.inputs: dict[str, tuple[Any, Any]] = {}  # numpy input -> (bound OrtValue, dtype)
        self.shapes: dict[str, tuple[Any, ...]] | None = None  # input shapes of the last run
        self.outputs: list[Any] = []  # the OrtValues bound as outputs


_BINDINGS = threading.local()  # per thread: IO bindings are not thread-safe


def bound(session: Any, device: str, names: Sequence[str]) -> _Bound:
    """This thread's binding of `session` for `names` (created on first use)."""
    table = getattr(_BINDINGS, "table", None)
    if table is None:
        table = _BINDINGS.table = weakref.WeakKeyDictionary()
    state = table.get(session)
    if state is None or state.device != device or state.names != tuple(names):
        state = table[session] = _Bound(session, device, tuple(names))
    return state


def run_bound(
    session: Any, names: Sequence[str], feeds: Mapping[str, Any], device: str = "cuda"
) -> list[np.ndarray]:
    """One run through IO binding: inputs bound where they live, outputs on `device`.

    On CUDA, weights live on the GPU from the session's creation on; a numpy input is
    copied up into the input buffer bound in the first run, a torch CUDA tensor or a CUDA
    ``OrtValue`` is bound in place, and the outputs are written into the device buffers
    of the previous run (same input shapes) and copied to the host once, at the end.
    The same code runs with ``device="cpu"`` (tests/test_runtime_optimize.py).

    >>> run_bound(graph._sessions["cuda"], ["y"], {"x": x})       # doctest: +SKIP
    """
    import onnxruntime as ort

    state = bound(session, device, names)
    binding = state.binding
    shapes: dict[str, tuple[Any, ...]] = {}
    torch_inputs = False
    for name, value in feeds.items():
        if isinstance(value, np.ndarray):
            held, dtype = state.inputs.get(name, (None, None))
            if held is None or held.shape() != list(value.shape) or dtype != value.dtype:
                held = ort.OrtValue.ortvalue_from_shape_and_type(
                    value.shape, value.dtype, device, 0
                )  # owned by us: never aliases the caller's array, even on the CPU
                binding.bind_ortvalue_input(name, held)
                state.inputs[name] = (held, value.dtype)
            held.update_inplace(value)  # host to device, into the bound buffer
            shapes[name] = value.shape
        elif isinstance(value, ort.OrtValue):
            state.inputs.pop(name, None)
            binding.bind_ortvalue_input(name, value)
            shapes[name] = tuple(value.shape())
        else:  # a torch CUDA tensor, contiguous (prepare_inputs)
            state.inputs.pop(name, None)
            torch_inputs = True
            dtype = np.dtype(str(value.dtype).removeprefix("torch."))
            index = value.device.index or 0
            shape = tuple(value.shape)
            binding.bind_input(name, "cuda", index, dtype, shape, value.data_ptr())
            shapes[name] = shape
    reuse = state.shapes == shapes and len(state.outputs) == len(names)
    if not reuse:
        for name in names:
            binding.bind_output(name, device)  # allocated by ONNX Runtime on the device
    if torch_inputs:  # torch's kernels writing the inputs run on torch's own stream
        sys.modules["torch"].cuda.synchronize()
    try:
        session.run_with_iobinding(binding)
    except Exception:
        if not reuse:
            raise
        for name in names:  # an output whose shape depends on the values: allocate anew
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        reuse = False
    if not reuse:
        state.outputs = binding.get_outputs()
        for name, value in zip(names, state.outputs):
            binding.bind_ortvalue_output(name, value)  # the next run writes in place
        state.shapes = shapes
    # a CPU OrtValue's numpy() is a view of the bound buffer the next run overwrites
    return [v.numpy().copy() if device == "cpu" else v.numpy() for v in state.outputs]


def _first_lines(err: BaseException, limit: int = 600) -> str:
    text = str(err).strip()
    return text if len(text) <= limit else text[:limit] + " ..."
