"""Direct torch calls for common ONNX nodes (registered in `EMIT_CALLS`).

The generic op runs a node's ONNX semantics through the backend on every call; for the
hot, simple ops of real models (activations, layout, shape plumbing, linear algebra) a
plain torch call is emitted instead, when dtypes and attributes allow it. Each builder is
``builder(emitter, node, args)`` and returns ``(callable, args, kwargs)`` (with a fourth
item, the nodes after it that the call computes too: a bias Add), or None to fall back
to the generic op. The handles of other values are ``emitter.env``.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from interop.emitter import following_bias_add
from interop.normalize import DEFAULT_DOMAINS

from . import EMIT_CALLS, emit_fusions
from .emit_layers import input_rank, symmetric_pads

_FLOATS = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _floats(*values: Any) -> bool:
    """Values of one ONNX type constraint (an op's T) hold a float dtype torch computes
    natively (no carrier types); values the exporter left untyped share the others' dtype."""
    dtypes = {v.dtype for v in values if v is not None and v.dtype is not None}
    return len(dtypes) == 1 and dtypes.pop() in _FLOATS


def _register_call(op_types: dict[str, Any]) -> None:
    for op_type, function in op_types.items():

        def build(emitter: Any, node: Any, args: list, function: Any = function) -> Any:
            if len(args) != len(node.inputs) or not _floats(*node.inputs, *node.outputs):
                return None
            return function, args, {}

        EMIT_CALLS.register(op_type, build)


# same dtype in and out and numpy broadcasting in ONNX and torch alike
_register_call(
    {
        "Relu": torch.relu,
        "Sigmoid": torch.sigmoid,
        "Tanh": torch.tanh,
        "Exp": torch.exp,
        "Log": torch.log,
        "Sqrt": torch.sqrt,
        "Abs": torch.abs,
        "Neg": torch.neg,
        "Erf": torch.special.erf,
        "Add": torch.add,
        "Sub": torch.sub,
        "Mul": torch.mul,
        "Div": torch.div,
    }
)


@EMIT_CALLS.register("Gelu")
def gelu_call(emitter: Any, node: Any, args: list) -> Any:
    if not _floats(node.inputs[0], node.outputs[0]):
        return None
    return F.gelu, args, {"approximate": emitter.node_attributes(node).get("approximate", "none")}


@EMIT_CALLS.register("Softmax")
def softmax_call(emitter: Any, node: Any, args: list) -> Any:
    if emitter.version < 13 or not _floats(node.inputs[0]):  # older opsets flatten to 2-D first
        return None
    return torch.softmax, args, {"dim": emitter.node_attributes(node).get("axis", -1)}


@EMIT_CALLS.register("Identity")
def identity_call(emitter: Any, node: Any, args: list) -> Any:
    return None if args[0] is None or node.inputs[0].type is None else (None, args, {})


@EMIT_CALLS.register("Transpose")
def transpose_call(emitter: Any, node: Any, args: list) -> Any:
    perm = emitter.node_attributes(node).get("perm")
    rank = input_rank(node.inputs[0])
    if perm is None and rank is None:
        return None
    return torch.permute, args, {"dims": list(perm if perm is not None else range(rank)[::-1])}


@EMIT_CALLS.register("Flatten")
def flatten_call(emitter: Any, node: Any, args: list) -> Any:
    rank = input_rank(node.inputs[0])
    if emitter.node_attributes(node).get("axis", 1) != 1 or rank is None or rank < 2:
        return None
    return torch.flatten, args, {"start_dim": 1}


def onnx_reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX Reshape (allowzero=0) to a run-time shape: a 0 keeps the input's dim."""
    dims = shape.tolist()
    if 0 in dims:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return torch.reshape(x, dims)


def reshape_to(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """ONNX Reshape with allowzero=1 to a run-time shape: a 0 is an empty dim."""
    return torch.reshape(x, shape.tolist())


@EMIT_CALLS.register("Reshape")
def reshape_call(emitter: Any, node: Any, args: list) -> Any:
    if len(args) != 2 or args[1] is None:
        return None
    allowzero = emitter.node_attributes(node).get("allowzero", 0)
    static = emitter.static.get(node.inputs[1])
    if static is None:
        return (reshape_to if allowzero else onnx_reshape), args, {}
    dims = [int(d) for d in np.asarray(static).reshape(-1)]
    if 0 in dims and not allowzero:
        return onnx_reshape, args, {}
    return torch.reshape, args[:1], {"shape": dims}


@EMIT_CALLS.register("Concat")
def concat_call(emitter: Any, node: Any, args: list) -> Any:
    if not args or any(a is None for a in args):
        return None
    tensors = [emitter.materialize(a) for a in args]
    return torch.cat, [tensors], {"dim": emitter.node_attributes(node)["axis"]}


def onnx_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor(x.shape, dtype=torch.int64, device=x.device)


@EMIT_CALLS.register("Shape")
def shape_call(emitter: Any, node: Any, args: list) -> Any:
    attrs = emitter.node_attributes(node)
    if attrs.get("start", 0) != 0 or attrs.get("end") is not None:
        return None
    return onnx_shape, args, {}


def _static_axes(emitter: Any, node: Any, rank: int | None) -> list[int] | None:
    """A Squeeze/Unsqueeze's constant axes made non-negative against ``rank``."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    static = emitter.static.get(node.inputs[1])
    if static is None:
        return None
    axes = [int(a) for a in np.asarray(static).reshape(-1)]
    if any(a < 0 for a in axes) and rank is None:
        return None
    return sorted(a + rank if a < 0 else a for a in axes)


@EMIT_CALLS.register("Squeeze")
def squeeze_call(emitter: Any, node: Any, args: list) -> Any:
    axes = _static_axes(emitter, node, input_rank(node.inputs[0]))
    return None if not axes else (torch.squeeze, args[:1], {"dim": tuple(axes)})


def onnx_unsqueeze(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    for axis in axes:  # ascending, each counted in the output's rank
        x = torch.unsqueeze(x, axis)
    return x


@EMIT_CALLS.register("Unsqueeze")
def unsqueeze_call(emitter: Any, node: Any, args: list) -> Any:
    rank = input_rank(node.inputs[0])
    count = emitter.static.get(node.inputs[1]) if len(node.inputs) > 1 else None
    if count is None:
        return None
    axes = _static_axes(emitter, node, None if rank is None else rank + np.asarray(count).size)
    return None if not axes else (onnx_unsqueeze, args[:1], {"axes": tuple(axes)})


@EMIT_CALLS.register("Gather")
def gather_call(emitter: Any, node: Any, args: list) -> Any:
    index = emitter.static.get(node.inputs[1])
    if index is None or np.ndim(index) != 0 or args[0] is None:
        return None  # a scalar constant index drops the axis: a select
    return (
        torch.select,
        args[:1],
        {"dim": emitter.node_attributes(node).get("axis", 0), "index": int(index)},
    )


_MAX_POOLS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)


@EMIT_CALLS.register("MaxPool")
def max_pool_call(emitter: Any, node: Any, args: list) -> Any:
    """F.max_poolNd where torch's own padding means ONNX's: symmetric pads of at most half
    the kernel, floor mode (ceil_mode and other pads stay with the generic op)."""
    attrs = emitter.node_attributes(node)
    kernel = list(attrs.get("kernel_shape") or [])
    spatial = len(kernel)
    padding = symmetric_pads(attrs.get("pads"), spatial)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if (
        not 1 <= spatial <= 3
        or not _floats(node.inputs[0], node.outputs[0])
        or auto_pad not in ("NOTSET", "VALID")
        or attrs.get("ceil_mode", 0)
        or padding is None
        or (auto_pad == "VALID" and any(padding))
        or any(p > k // 2 for p, k in zip(padding, kernel))
    ):
        return None
    kwargs = {
        "kernel_size": kernel,
        "stride": list(attrs.get("strides") or [1] * spatial),
        "padding": padding,
        "dilation": list(attrs.get("dilations") or [1] * spatial),
    }
    return _MAX_POOLS[spatial - 1], args, kwargs


def _global_pool(reduce: Any) -> Any:
    def build(emitter: Any, node: Any, args: list) -> Any:
        rank = input_rank(node.inputs[0])
        if rank is None or rank < 3 or not _floats(node.inputs[0], node.outputs[0]):
            return None
        return reduce, args, {"dim": list(range(2, rank)), "keepdim": True}

    return build


EMIT_CALLS.register("GlobalAveragePool", _global_pool(torch.mean))
EMIT_CALLS.register("GlobalMaxPool", _global_pool(torch.amax))


def _reduce(function: Any) -> Any:
    """ReduceMean / ReduceSum over constant axes (opset 18's input or the older attribute)."""

    def build(emitter: Any, node: Any, args: list) -> Any:
        attrs = emitter.node_attributes(node)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            static = emitter.static.get(node.inputs[1])
            axes = None if static is None else [int(a) for a in np.asarray(static).reshape(-1)]
        else:
            axes = attrs.get("axes")
        if not axes or not _floats(node.inputs[0], node.outputs[0]):
            return None  # no axes: all of them, or none with noop_with_empty_axes
        keepdim = bool(attrs.get("keepdims", 1))
        return function, args[:1], {"dim": list(axes), "keepdim": keepdim}

    return build


EMIT_CALLS.register("ReduceMean", _reduce(torch.mean))
EMIT_CALLS.register("ReduceSum", _reduce(torch.sum))


@EMIT_CALLS.register("MatMul")
def matmul_call(emitter: Any, node: Any, args: list) -> Any:
    if not _floats(*node.inputs):
        return None
    env = emitter.env
    fused = emit_fusions.attention(emitter, node, args, env)
    if fused is not None:
        return fused
    transpose = node.inputs[1].producer()
    source = (
        transpose.inputs[0] if transpose is not None and transpose.op_type == "Transpose" else None
    )
    if (
        source is None
        or transpose.domain not in DEFAULT_DOMAINS
        or source.const_value is None
        or emitter.kind_of(source) is None
        or len(source.const_value.shape) != 2
        or list(emitter.node_attributes(transpose).get("perm") or [1, 0]) != [1, 0]
    ):
        return torch.matmul, args, {}
    # x @ W.T (+ b) is F.linear on the weight itself: no transpose, bias added inside addmm
    weight = env[source]
    emitter.maybe_dead.append(emitter.materialize(args[1]))
    add, bias = following_bias_add(emitter, node, source.const_value.shape[0])
    if add is None:
        return emit_fusions.linear_call(emitter, node, args[0], weight, None, env)
    function, fx_args, kwargs = emit_fusions.linear_call(
        emitter, node, args[0], weight, env[bias], env
    )
    return function, fx_args, kwargs, [add]  # the bias Add is this call's output


def _with_symbolic(builder: Any) -> Any:
    """Shape arithmetic on `emit_fusions.Sym` values stays Python numbers (emit_fusions.symbolic);
    a float Sym scalar operand is passed as a Python float; otherwise ``builder``."""

    def build(emitter: Any, node: Any, args: list) -> Any:
        env = emitter.env
        handle = emit_fusions.symbolic(emitter, node, args, env)
        if handle is not None:
            return None, [handle], {}
        call = emit_fusions.scalar_operand(emitter, node, args, env)
        if call is None and node.op_type == "Reshape":
            call = emit_fusions.reshape_dims(emitter, node, args)
        if call is not None:
            return call
        return builder(emitter, node, args) if builder is not None else None

    return build


def _constant(emitter: Any, value: Any) -> Any:
    """A value's array when the graph knows it before running: a folded or initializer constant."""
    if value is None:
        return None
    static = emitter.static.get(value)
    if static is None and value.const_value is not None:
        static = value.const_value.numpy()
    return static


@EMIT_CALLS.register("Slice")
def slice_call(emitter: Any, node: Any, args: list) -> Any:
    """Slice with constant starts / ends / axes and positive steps -> ``x[a:b:c, ...]``: Python
    slicing counts negative bounds from the end and clamps, as ONNX does."""
    if not args or not isinstance(args[0], fx.Node) or len(node.inputs) < 3:
        return None
    parts = [_constant(emitter, v) for v in node.inputs[1:5]] + [None] * (5 - len(node.inputs))
    if (
        parts[0] is None
        or parts[1] is None
        or any(v is not None and p is None for v, p in zip(node.inputs[3:5], parts[2:]))
    ):
        return None
    starts, ends = (np.asarray(p).reshape(-1).tolist() for p in parts[:2])
    axes = np.asarray(parts[2]).reshape(-1).tolist() if parts[2] is not None else None
    steps = np.asarray(parts[3]).reshape(-1).tolist() if parts[3] is not None else None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    rank = input_rank(node.inputs[0])
    if any(a < 0 for a in axes):
        if rank is None:
            return None
        axes = [a + rank if a < 0 else a for a in axes]
    if any(step <= 0 for step in steps) or len(set(axes)) != len(axes):
        return None
    key: list[Any] = [slice(None)] * (max(axes) + 1)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        key[axis] = slice(int(start), int(end), None if step == 1 else int(step))
    return operator.getitem, [args[0], tuple(key)], {}


_INTERPOLATE_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


@EMIT_CALLS.register("Resize")
def resize_call(emitter: Any, node: Any, args: list) -> Any:
    """Resize by constant power-of-two scales on the spatial axes -> F.interpolate: nearest
    with asymmetric coordinates rounded down, or linear with half-pixel / align-corners
    coordinates. Powers of two only: torch samples at ``x * (1 / scale)``, ONNX at
    ``x / scale``, equal when 1 / scale is exact."""
    attrs = emitter.node_attributes(node)
    scales = _constant(emitter, node.inputs[2]) if len(node.inputs) > 2 else None
    rank = np.size(scales) if scales is not None else None  # one scale per axis
    dtypes = {v.dtype for v in (node.inputs[0], node.outputs[0]) if v.dtype is not None}
    if (
        rank not in _INTERPOLATE_MODES
        or not dtypes <= _FLOATS
        or (len(node.inputs) > 3 and node.inputs[3] is not None)
        or attrs.get("antialias", 0)
        or attrs.get("exclude_outside", 0)
        or attrs.get("axes") is not None
        or not isinstance(args[0], fx.Node)
    ):
        return None
    factors = [float(f) for f in np.asarray(scales).reshape(-1)]
    if factors[:2] != [1.0, 1.0] or not all(
        f > 0 and math.frexp(f)[0] == 0.5 for f in factors[2:]
    ):  # frexp's mantissa is 0.5 exactly for powers of two
        return None
    mode = attrs.get("mode", "nearest")
    coordinates = attrs.get("coordinate_transformation_mode", "half_pixel")
    kwargs: dict[str, Any] = {"scale_factor": tuple(factors[2:])}
    if mode == "nearest":
        if (
            coordinates != "asymmetric"
            or attrs.get("nearest_mode", "round_prefer_floor") != "floor"
        ):
            return None
        kwargs["mode"] = "nearest"
    elif mode == "linear" and coordinates in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        if coordinates == "pytorch_half_pixel" and min(factors[2:]) < 1:
            return None  # samples an output of length 1 at 0, torch at half_pixel's point
        kwargs["mode"] = _INTERPOLATE_MODES[rank]
        kwargs["align_corners"] = coordinates == "align_corners"
    else:
        return None
    return F.interpolate, [args[0]], kwargs


for _op_type in (
    "Shape", "Identity", "Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Concat",
    "Cast", "CastLike", "Sqrt", "Add", "Sub", "Mul", "Div",
):  # fmt: skip
    EMIT_CALLS.register(_op_type, _with_symbolic(EMIT_CALLS.get(_op_type)), replace=True)


def _scalar(emitter: Any, value: Any, expected: float) -> bool:
    """A one-element float constant of the graph equal to ``expected`` (to float32 rounding)."""
    array = emitter.static.get(value) if value is not None else None
    if array is None or np.size(array) != 1 or np.asarray(array).dtype.kind != "f":
        return False
    return math.isclose(float(np.asarray(array).reshape(-1)[0]), expected, rel_tol=1e-6)


def _only_reader(value: Any, reader: Any, op_type: str) -> Any:
    """The default-domain ``op_type`` node making ``value``, if ``reader`` alone reads it."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
        return None
    uses = list(value.uses())
    single = len(uses) == 1 and uses[0].node is reader and not value.is_graph_output()
    return node if single else None


def erf_gelu(emitter: Any, node: Any, args: list) -> Any:
    """``Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5)``, GELU as exporters spell it before
    opset 20 (operands in either order), is one F.gelu(x) when nothing else reads its steps."""
    if not _floats(*node.inputs, *node.outputs):
        return None
    env = emitter.env
    for half in (0, 1):
        inner = _only_reader(node.inputs[1 - half], node, "Mul")
        if inner is None or not _scalar(emitter, node.inputs[half], 0.5):
            continue
        for side in (0, 1):
            x, plus = inner.inputs[side], _only_reader(inner.inputs[1 - side], inner, "Add")
            for one in (0, 1) if plus is not None else ():
                erf = _only_reader(plus.inputs[1 - one], plus, "Erf")
                div = erf and _only_reader(erf.inputs[0], erf, "Div")
                if (
                    div is not None
                    and _scalar(emitter, plus.inputs[one], 1.0)
                    and div.inputs[0] is x
                    and _scalar(emitter, div.inputs[1], math.sqrt(2.0))
                    and isinstance(env[x], fx.Node)
                ):
                    steps = (div, erf, plus, inner)  # left without readers: erased at build
                    emitter.maybe_dead.extend(
                        env[n.outputs[0]] for n in steps if isinstance(env[n.outputs[0]], fx.Node)
                    )
                    return F.gelu, [env[x]], {}
    return None


_SYMBOLIC_MUL = EMIT_CALLS.get("Mul")
EMIT_CALLS.register(
    "Mul",
    lambda emitter, node, args: erf_gelu(emitter, node, args) or _SYMBOLIC_MUL(emitter, node, args),
    replace=True,
)


_PLAIN_RELU = EMIT_CALLS.get("Relu")
# producers whose backward does not read their output, so a Relu may overwrite it
_OVERWRITABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)
_OVERWRITABLE_CALLS = (torch.add, torch.sub)


def _overwritable(emitter: Any, node: Any, source: Any) -> bool:
    """The Relu is the only reader of a fresh tensor that no backward needs (a conv's,
    batch norm's, linear's or add's output), as in torchvision's ReLU(inplace=True)."""
    value = node.inputs[0]
    producer = value.producer()
    uses = list(value.uses())
    if (
        not isinstance(source, fx.Node)
        or producer is None
        or producer.op_type not in ("Conv", "BatchNormalization", "Gemm", "MatMul", "Add", "Sub")
        or len(uses) != 1
        or value.is_graph_output()
    ):
        return False
    if source.op == "call_module":
        return isinstance(emitter.root.get_submodule(source.target), _OVERWRITABLE_LAYERS)
    return source.op == "call_function" and source.target in _OVERWRITABLE_CALLS


def _relu_call(emitter: Any, node: Any, args: list) -> Any:
    if not _floats(*node.inputs, *node.outputs):
        return None
    fused = emit_fusions.relu_call(emitter, node, args, emitter.env)
    if fused is None and _overwritable(emitter, node, args[0]):
        return torch.relu_, args, {}  # saves a fresh output per Relu: 2-4% of a ResNet50
    return fused or _PLAIN_RELU(emitter, node, args)


EMIT_CALLS.register("Relu", _relu_call, replace=True)
