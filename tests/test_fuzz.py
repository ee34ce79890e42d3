"""Fuzzing (issue 7): differential testing of the emitters, mutation of model files.

1. `test_emitters_match_onnxruntime[numpy|torch|keras|flax]`: hypothesis builds random
   valid graphs from a table of ONNX ops (chains with branches, broadcasting, constants,
   attributes; elementwise, reductions, MatMul/Gemm, and layout-sensitive ops: Conv,
   pooling, BatchNormalization, LayerNormalization, Reshape/Flatten, Slice, Gather, Pad,
   Expand, Tile, CumSum, ArgMax) and checks each of the numpy reference evaluator
   (`interop.interpret`) and the torch, Keras and Flax emitters (`interop.to_torch`,
   `to_keras`, `to_flax`; Flax eager and under `nnx.jit`) against ONNX Runtime, rtol
   1e-4, atol 1e-5. Known emitter bugs would be listed in `KNOWN_GAPS` (none today); the
   bugs it found are kept as regressions (`test_pad_regressions`).
2. `test_mutated_models_raise_only_interop_errors`: bit flips, truncations, byte-range
   duplication and protobuf field edits of real models; `interop.load` and then
   `summary`, `plot` and `run` on what loads may raise only `interop.errors`
   exceptions. It runs in a subprocess with a memory limit and a timeout, so a crash
   or a runaway allocation in a native library is a test failure, not a dead pytest.

Cases per run: `INTEROP_FUZZ_EXAMPLES` (or ``pytest --fuzz-examples N``); the default
is in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import interop

ROOT = Path(__file__).resolve().parents[1]
DIFFERENTIAL_DEFAULT = 40
MUTATION_DEFAULT = 400


def examples(default: int) -> int:
    """Cases per fuzzer: INTEROP_FUZZ_EXAMPLES scales from the default of the first fuzzer."""
    given_count = os.environ.get("INTEROP_FUZZ_EXAMPLES")
    if not given_count:
        return default
    return max(1, int(given_count) * default // DIFFERENTIAL_DEFAULT)


# ------------------------------------------------------------------ op table
# name -> (inputs: "unary" | "binary", attribute strategy). Values stay bounded (no Exp,
# Div or Log on unbounded inputs) so float32 rounding, not overflow, sets the tolerance.
UNARY = ["Relu", "Sigmoid", "Tanh", "Abs", "Neg", "Erf", "Sin", "Cos", "Softsign",
         "Identity", "Floor", "Ceil", "Softplus", "Sign"]  # fmt: skip
BINARY = ["Add", "Sub", "Mul", "Max", "Min"]
WITH_ATTRIBUTES = ["LeakyRelu", "Elu", "HardSigmoid", "Softmax", "LogSoftmax", "Clip",
                   "ReduceMean", "ReduceMax", "ReduceSum", "Transpose", "MatMul",
                   "Concat", "Gemm", "Where", "Unsqueeze+Squeeze", "Pow2"]  # fmt: skip
# ops the Keras and Flax emitters map to native layers or relayout (channels-first Conv,
# pooling and BatchNorm on channels-last hosts, reshapes, gathers, pads): where their
# layout bookkeeping can go wrong
LAYOUT = ["Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "BatchNormalization",
          "LayerNormalization", "Flatten", "Reshape", "Slice", "Gather", "Pad", "Expand",
          "Tile", "CumSum", "ArgMax", "ReduceMin", "ReduceL2", "SqrtAbs", "SafeDiv"]  # fmt: skip
OPS = UNARY + BINARY + WITH_ATTRIBUTES + LAYOUT
# ops that need an input of rank 1 at least
NEEDS_AXES = set(WITH_ATTRIBUTES + LAYOUT) - {
    "Clip", "Pow2", "Where", "LeakyRelu", "Elu", "HardSigmoid", "SqrtAbs", "SafeDiv"
}  # fmt: skip


class Builder:
    """A graph under construction: values with their static shapes."""

    def __init__(self, shape: tuple[int, ...]):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.values: list[tuple[str, tuple[int, ...]]] = [("x", shape)]
        self.ops: list[str] = []

    def fresh(self) -> str:
        return f"v{len(self.nodes) + len(self.inits)}"

    def const(self, array: np.ndarray) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(onnx.numpy_helper.from_array(array, name))
        return name

    def add(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> str:
        out = self.fresh()
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"n{len(self.nodes)}", **attrs))
        self.values.append((out, shape))
        return out

    def hidden(self, op: str, inputs: list[str], **attrs) -> str:
        """A node whose output is not a float value to build on (a mask, indices)."""
        out = self.add(op, inputs, (), **attrs)
        self.values.pop()
        return out


def step(data: st.DataObject, b: Builder) -> None:
    op = data.draw(st.sampled_from(OPS), label="op")
    name, shape = data.draw(st.sampled_from(b.values), label="input")
    rank = len(shape)
    b.ops.append(op)
    floats = st.floats(-2, 2, width=32, allow_subnormal=False).map(np.float32)
    if rank == 0 and op in NEEDS_AXES:
        b.ops.pop()  # axis-taking ops need a rank-1 input at least
    elif op in UNARY:
        b.add(op, [name], shape)
    elif op in BINARY:
        partners = [(n, s) for n, s in b.values if _broadcast(s, shape) is not None]
        other, other_shape = data.draw(st.sampled_from(partners), label="partner")
        b.add(op, [name, other], _broadcast(shape, other_shape))
    elif op in ("LeakyRelu", "Elu", "HardSigmoid"):
        b.add(op, [name], shape, alpha=float(data.draw(st.floats(0.125, 1.0, width=32))))
    elif op in ("Softmax", "LogSoftmax"):
        b.add(op, [name], shape, axis=data.draw(st.integers(-rank, rank - 1)))
    elif op == "Clip":
        low = data.draw(floats)
        high = low + abs(data.draw(floats))
        b.add(op, [name, b.const(np.float32(low)), b.const(np.float32(high))], shape)
    elif op.startswith("Reduce"):
        axes = sorted(data.draw(st.sets(st.integers(0, rank - 1), min_size=1)))
        keep = data.draw(st.booleans())
        out = tuple(1 if i in axes else d for i, d in enumerate(shape) if keep or i not in axes)
        # opset 18: every Reduce* takes its axes as an input
        b.add(op, [name, b.const(np.array(axes, np.int64))], out, keepdims=int(keep))
    elif op == "Transpose":
        perm = data.draw(st.permutations(range(rank)))
        b.add(op, [name], tuple(shape[p] for p in perm), perm=list(perm))
    elif op == "MatMul" and rank >= 1:
        cols = data.draw(st.integers(1, 5))
        weight = data.draw(_arrays((shape[-1], cols)))
        b.add(op, [name, b.const(weight)], shape[:-1] + (cols,) if rank > 1 else (cols,))
    elif op == "Gemm" and rank == 2:
        cols = data.draw(st.integers(1, 5))
        weight = data.draw(_arrays((cols, shape[1])))
        bias = data.draw(_arrays((cols,)))
        b.add(op, [name, b.const(weight), b.const(bias)], (shape[0], cols), transB=1,
              alpha=float(data.draw(st.floats(0.5, 1.5, width=32))))  # fmt: skip
    elif op == "Concat":
        same = [(n, s) for n, s in b.values if len(s) == rank]
        axis = data.draw(st.integers(0, rank - 1))
        fits = [n for n, s in same if all(s[i] == shape[i] for i in range(rank) if i != axis)]
        other = data.draw(st.sampled_from(fits))
        size = dict(b.values)[other][axis]
        out = tuple(d + size if i == axis else d for i, d in enumerate(shape))
        b.add(op, [name, other], out, axis=axis)
    elif op == "Where":
        mask = b.hidden("Greater", [name, b.const(np.float32(data.draw(floats)))])
        other = b.const(data.draw(_arrays(shape)))
        b.add(op, [mask, name, other], shape)
    elif op == "Unsqueeze+Squeeze":
        axis = data.draw(st.integers(0, rank))
        axes = b.const(np.array([axis], np.int64))
        wide = b.add("Unsqueeze", [name, axes], shape[:axis] + (1,) + shape[axis:])
        b.add("Squeeze", [wide, axes], shape)
    elif op == "Pow2":
        b.add("Pow", [name, b.const(np.float32(2.0))], shape)
    elif op in LAYOUT:
        if not _layout_step(op, data, b, name, shape):
            b.ops.pop()
    else:  # an op that needs a rank this value does not have
        b.ops.pop()


def _layout_step(op: str, data: st.DataObject, b: Builder, name: str, shape) -> bool:
    """One of the LAYOUT ops on `name`; False when its input does not fit the op."""
    rank = len(shape)
    draw = data.draw
    if op == "Conv" and rank in (3, 4):  # [N, C, spatial...]
        channels, spatial = shape[1], shape[2:]
        group = draw(st.sampled_from([g for g in (1, 2, channels) if channels % g == 0]))
        out_channels = group * draw(st.integers(1, 3))
        kernel = [draw(st.integers(1, min(3, d))) for d in spatial]
        strides = [draw(st.integers(1, 2)) for _ in spatial]
        pads = [draw(st.integers(0, k - 1)) for k in kernel * 2]  # begins, then ends
        out = [(d + pads[i] + pads[i + len(spatial)] - kernel[i]) // strides[i] + 1
               for i, d in enumerate(spatial)]  # fmt: skip
        fan_in = channels // group * int(np.prod(kernel))
        weight = draw(_arrays((out_channels, channels // group, *kernel))) / np.float32(fan_in)
        inputs = [name, b.const(weight)]
        if draw(st.booleans()):
            inputs.append(b.const(draw(_arrays((out_channels,)))))
        b.add("Conv", inputs, (shape[0], out_channels, *out), kernel_shape=kernel,
              strides=strides, pads=pads, group=group)  # fmt: skip
    elif op in ("MaxPool", "AveragePool") and rank in (3, 4):
        spatial = shape[2:]
        kernel = [draw(st.integers(1, min(3, d))) for d in spatial]
        strides = [draw(st.integers(1, 2)) for _ in spatial]
        pads = [draw(st.integers(0, k - 1)) for k in kernel * 2]  # begins, then ends
        out = [(d + pads[i] + pads[i + len(spatial)] - kernel[i]) // strides[i] + 1
               for i, d in enumerate(spatial)]  # fmt: skip
        attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads}
        if op == "AveragePool":
            attrs["count_include_pad"] = int(draw(st.booleans()))
        b.add(op, [name], (*shape[:2], *out), **attrs)
    elif op == "GlobalAveragePool" and rank >= 3:
        b.add(op, [name], shape[:2] + (1,) * (rank - 2))
    elif op == "BatchNormalization" and rank >= 2:
        c = shape[1]
        scale, bias = draw(_arrays((c,))), draw(_arrays((c,)))
        mean = draw(_arrays((c,)))
        var = np.abs(draw(_arrays((c,)))) + np.float32(0.5)
        inputs = [name] + [b.const(a) for a in (scale, bias, mean, var)]
        b.add(op, inputs, shape, epsilon=float(draw(st.sampled_from([1e-5, 1e-3]))))
    elif op == "LayerNormalization":
        axis = draw(st.integers(-rank, rank - 1))
        normalized = shape[axis:]
        if int(np.prod(normalized)) < 2:
            return False  # one element: the output is the bias, whatever the input
        inputs = [name, b.const(draw(_arrays(normalized)))]
        if draw(st.booleans()):
            inputs.append(b.const(draw(_arrays(normalized))))
        b.add(op, inputs, shape, axis=axis, epsilon=1e-5)
    elif op == "Flatten":
        axis = draw(st.integers(-rank, rank))
        split = axis + rank if axis < 0 else axis
        out = (int(np.prod(shape[:split])), int(np.prod(shape[split:])))
        b.add(op, [name], out, axis=axis)
    elif op == "Reshape":
        # merge runs of adjacent dims (or split nothing): the same elements in order
        cuts = sorted(draw(st.sets(st.integers(1, max(1, rank - 1)), max_size=rank - 1)))
        bounds = [0, *[c for c in cuts if c < rank], rank]
        out = [int(np.prod(shape[a:z])) for a, z in zip(bounds, bounds[1:]) if z > a]
        if draw(st.booleans()):
            out = [1, *out]  # a new leading 1
        target = list(out)
        if draw(st.booleans()):
            target[draw(st.integers(0, len(out) - 1))] = -1
        for i, d in enumerate(target):  # 0 copies the input's dim at the same index
            if d > 0 and i < rank and shape[i] == d and draw(st.booleans()):
                target[i] = 0
        b.add(op, [name, b.const(np.array(target, np.int64))], tuple(out))
    elif op == "Slice":
        axes = sorted(draw(st.sets(st.integers(0, rank - 1), min_size=1)))
        starts, ends, steps, out = [], [], [], list(shape)
        for axis in axes:
            d = shape[axis]
            stride = draw(st.sampled_from([1, 1, 2, -1]))
            lo = draw(st.integers(0, d - 1))
            hi = draw(st.integers(lo + 1, d))
            if stride > 0:
                start, end = lo, hi
                if draw(st.booleans()):
                    start -= d  # negative indices count from the end
                if hi == d and draw(st.booleans()):
                    end = 1 << 30  # past the end: clamped
            else:
                start, end = hi - 1, lo - 1
                if lo == 0:
                    end = -(1 << 30)  # before the start: clamped, the first element kept
            starts.append(start)
            ends.append(end)
            steps.append(stride)
            out[axis] = len(range(*slice(start, end, stride).indices(d)))
        consts = [b.const(np.array(v, np.int64)) for v in (starts, ends, axes, steps)]
        b.add(op, [name, *consts], tuple(out))
    elif op == "Gather":
        axis = draw(st.integers(-rank, rank - 1))
        d = shape[axis]
        index_shape = draw(st.sampled_from([(), (2,), (2, 2)]))
        count = int(np.prod(index_shape))
        indices = draw(st.lists(st.integers(-d, d - 1), min_size=count, max_size=count))
        indices = np.asarray(indices, np.int64).reshape(index_shape)
        a = axis % rank
        out = shape[:a] + index_shape + shape[a + 1 :]
        b.add(op, [name, b.const(indices)], out, axis=axis)
    elif op == "Pad":
        mode = draw(st.sampled_from(["constant", "reflect", "edge"]))
        limit = [d - 1 if mode == "reflect" else 2 for d in shape]
        pads = [draw(st.integers(0, min(2, m))) for m in limit * 2]  # begins, then ends
        inputs = [name, b.const(np.array(pads, np.int64))]
        if mode == "constant":
            inputs.append(b.const(np.float32(draw(st.floats(-1, 1, width=32)))))
        out = tuple(d + pads[i] + pads[i + rank] for i, d in enumerate(shape))
        b.add(op, inputs, out, mode=mode)
    elif op == "Expand":
        target = [draw(st.integers(2, 3)) if d == 1 else d for d in shape]
        if draw(st.booleans()):
            target = [2, *target]
        b.add(op, [name, b.const(np.array(target, np.int64))], tuple(target))
    elif op == "Tile":
        repeats = [draw(st.integers(1, 2)) for _ in shape]
        out = tuple(d * r for d, r in zip(shape, repeats))
        b.add(op, [name, b.const(np.array(repeats, np.int64))], out)
    elif op == "CumSum":
        axis = b.const(np.array(draw(st.integers(-rank, rank - 1)), np.int64))
        b.add(op, [name, axis], shape, exclusive=int(draw(st.booleans())),
              reverse=int(draw(st.booleans())))  # fmt: skip
    elif op == "ArgMax":  # ties (a Relu's zeros) pick the first, or the last, index
        axis = draw(st.integers(-rank, rank - 1))
        keep = draw(st.booleans())
        last = int(draw(st.booleans()))
        a = axis % rank
        out = tuple(1 if i == a else d for i, d in enumerate(shape) if keep or i != a)
        index = b.hidden(op, [name], axis=axis, keepdims=int(keep), select_last_index=last)
        b.add("Cast", [index], out, to=TensorProto.FLOAT)
    elif op == "SqrtAbs":
        b.add("Sqrt", [b.hidden("Abs", [name])], shape)
    elif op == "SafeDiv":  # x / (1 + |y|): bounded by |x|
        partners = [(n, s) for n, s in b.values if _broadcast(s, shape) is not None]
        other, other_shape = draw(st.sampled_from(partners), label="divisor")
        one = b.const(np.float32(1.0))
        divisor = b.hidden("Add", [b.hidden("Abs", [other]), one])
        b.add("Div", [name, divisor], _broadcast(shape, other_shape))
    else:
        return False
    return True


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


def _arrays(shape: tuple[int, ...]):
    size = int(np.prod(shape))
    return st.lists(
        st.floats(-2, 2, width=32, allow_subnormal=False), min_size=size, max_size=size
    ).map(lambda v: np.asarray(v, np.float32).reshape(shape))


@st.composite
def random_graphs(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank)))
    b = Builder(shape)
    data = draw(st.data())
    for _ in range(draw(st.integers(1, 8))):
        step(data, b)
    outputs = [b.values[-1]] + ([b.values[1]] if len(b.values) > 2 else [])
    graph = helper.make_graph(
        b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in outputs],
        initializer=b.inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = draw(_arrays(shape))
    return model, x, b.ops


EMITTERS = ("numpy", "torch", "keras", "flax")
# Ops an emitter gets wrong, with the reason: excluded from its comparison and listed in
# the report (add entries here rather than weakening the tolerance), each with a repro.
# None today: torch's edge / reflect Pad of no axis or of more than the last three axes
# (NotImplementedError from F.pad) was the last; its repros are in test_pad_regressions.
KNOWN_GAPS: dict[str, dict[str, str]] = {emitter: {} for emitter in EMITTERS}
# Cases per emitter, scaled by INTEROP_FUZZ_EXAMPLES (whose DIFFERENTIAL_DEFAULT = 40 gives
# these): a case costs ~0.01 s on the numpy evaluator and torch, ~0.05 s on Keras, ~0.15 s
# on Flax (eager and one jit compile) here.
EXAMPLES = {"numpy": 100, "torch": 100, "keras": 60, "flax": 40}
RTOL, ATOL = 1e-4, 1e-5


def _emit(emitter: str, model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """The emitted model's outputs (inference mode), in graph order."""
    if emitter == "numpy":
        from interop.interpret import evaluate

        return [np.asarray(v) for v in evaluate(model, x)]
    from interop.conversion import run_native

    native = getattr(interop, f"to_{emitter}")(model)
    got = run_native(native, emitter, [x])
    if emitter == "flax":  # and under jit, one XLA program (not the eager per-op path)
        from flax import nnx

        jitted = nnx.jit(lambda m, v: m(v))(native, x)
        jitted = jitted if isinstance(jitted, (list, tuple)) else [jitted]
        assert len(jitted) == len(got), "flax: jit and eager output counts differ"
        for eager, under_jit in zip(got, jitted):
            np.testing.assert_allclose(
                np.asarray(under_jit), eager, rtol=RTOL, atol=ATOL, err_msg="flax under jit"
            )
    return got


@pytest.mark.filterwarnings("ignore::UserWarning")  # Keras: softmax over a size-1 axis, ...
@pytest.mark.parametrize("emitter", EMITTERS)
def test_emitters_match_onnxruntime(emitter):
    if emitter in ("keras", "flax"):
        pytest.importorskip(emitter)
    gaps = KNOWN_GAPS[emitter]

    @settings(
        max_examples=examples(EXAMPLES[emitter]),
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(random_graphs())
    def check(case):
        model, x, ops = case
        onnx.checker.check_model(model, full_check=True)  # the generator makes valid graphs
        assume(not gaps.keys() & set(ops))  # a known emitter bug: draw another case
        reference = interop.load(model).run(x)  # ONNX Runtime
        reference = list(reference) if isinstance(reference, tuple) else [reference]
        got = _emit(emitter, model, x)
        assert len(got) == len(reference), (emitter, ops)
        for want, have in zip(reference, got):
            have = np.asarray(have)
            assert have.shape == want.shape, (emitter, ops, have.shape, want.shape)
            np.testing.assert_allclose(
                have, want, rtol=RTOL, atol=ATOL, err_msg=f"{emitter} emitter, ops {ops}"
            )

    check()


def _pad_model(shape, pads, mode):
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)], "pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(pads, np.int64), "pads")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


# the fuzzer's finds, kept as regressions: edge / reflect / wrap Pad of no axis, and of axes
# before the last three (torch's F.pad pads at most three trailing axes in these modes)
PAD_REGRESSIONS = {
    "reflect-none": ((3,), [0, 0], "reflect"),
    "edge-first-of-4": ((2, 2, 2, 2), [1, 0, 0, 0, 0, 0, 0, 0], "edge"),
    "reflect-all-4": ((3, 3, 3, 3), [1, 2, 0, 1, 2, 0, 1, 1], "reflect"),
    "wrap-5d": ((2, 3, 2, 3, 4), [1, 0, 1, 0, 2, 0, 2, 0, 1, 3], "wrap"),
}


@pytest.mark.parametrize("emitter", EMITTERS)
@pytest.mark.parametrize("name", list(PAD_REGRESSIONS))
def test_pad_regressions(name, emitter):
    if emitter in ("keras", "flax"):
        pytest.importorskip(emitter)
    shape, pads, mode = PAD_REGRESSIONS[name]
    model = _pad_model(shape, pads, mode)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = interop.load(model).run(x)  # ONNX Runtime
    (got,) = _emit(emitter, model, x)
    assert np.asarray(got).shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ mutation fuzzer
MUTATOR = r"""
import json, random, resource, sys, traceback
limit = 6 << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.path.insert(0, ROOT)
import numpy as np, onnx
from onnx import helper
import interop
from interop.cli import random_inputs
from interop.errors import InteropError

seeds = [open(p, "rb").read() for p in sys.argv[3:]]
count, base = int(sys.argv[1]), int(sys.argv[2])
OPS = ["Relu", "Add", "MatMul", "Reshape", "Conv", "If", "Loop", "Gather", "Expand",
       "ConstantOfShape", "Tile", "Concat", "Split", "Resize", "Nope"]

def byte_mutation(rng, data):
    data = bytearray(data)
    if not data:  # truncated to nothing by an earlier mutation
        return bytes([rng.randrange(256)])
    kind = rng.randrange(5)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data)); data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        data = data[: rng.randrange(len(data))]
    elif kind == 2:  # duplicate a byte range (repeats fields and parts of fields)
        i = rng.randrange(len(data)); j = min(len(data), i + rng.randint(1, 64))
        data[j:j] = data[i:j]
    elif kind == 3:  # random bytes over a range
        i = rng.randrange(len(data))
        data[i:i + 4] = bytes(rng.randrange(256) for _ in range(4))
    else:  # delete a range
        i = rng.randrange(len(data)); del data[i:i + rng.randint(1, 32)]
    return bytes(data)

def proto_mutation(rng, data):
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:  # an earlier byte mutation broke the wire format: keep the bytes
        return data
    g = model.graph
    kind = rng.randrange(9)
    node = rng.choice(g.node) if g.node else None
    names = [n for x in g.node for n in x.output] + [i.name for i in g.input] + [t.name for t in g.initializer]
    if kind == 0 and node is not None:
        node.op_type = rng.choice(OPS)
    elif kind == 1 and node is not None and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(names + ["", "ghost"])
    elif kind == 2 and g.initializer:
        t = rng.choice(g.initializer)
        t.dims.append(rng.choice([0, 1, 2, 1 << 20, 1 << 40]))
    elif kind == 3 and g.initializer:
        rng.choice(g.initializer).data_type = rng.randrange(1, 24)
    elif kind == 4 and node is not None:
        node.attribute.append(helper.make_attribute(rng.choice(["axis", "perm", "to", "mode"]),
                              rng.choice([1, -7, 1 << 40, [0, 0], "x", 2.5])))
    elif kind == 5 and node is not None:
        g.node.append(node)  # the same node twice
    elif kind == 6:
        model.opset_import[0].version = rng.choice([1, 7, 11, 13, 17, 21, 99])
    elif kind == 7 and g.input:
        dims = g.input[0].type.tensor_type.shape.dim
        if dims:
            dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 1, 3, 1 << 31])
    elif kind == 8 and len(g.node) > 1:
        i, j = rng.sample(range(len(g.node)), 2)  # reorder two nodes
        a, b = onnx.NodeProto(), onnx.NodeProto()
        a.CopyFrom(g.node[i]); b.CopyFrom(g.node[j])
        g.node[i].CopyFrom(b); g.node[j].CopyFrom(a)
    return model.SerializeToString()

stats = {"cases": 0, "loaded": 0, "ran": 0, "refused": {}}
for case in range(count):
    rng = random.Random(base + case)
    data = rng.choice(seeds)
    for _ in range(rng.randint(1, 3)):
        data = (proto_mutation if rng.random() < 0.5 else byte_mutation)(rng, data)
    stats["cases"] += 1
    stage = "load"
    try:
        graph = interop.load(data)
        stats["loaded"] += 1
        stage = "summary"; graph.summary(print_fn=None)
        stage = "plot"; graph.plot(None)
        stage = "run"
        # the CLI's random inputs follow the declared shape: skip absurd declared sizes
        # (building the input would be the harness's allocation, not the library's)
        sizes = [np.prod([d if isinstance(d, int) else 1 for d in s.shape or ()]) for s in graph.inputs]
        if max(sizes, default=0) > 1 << 20:
            stats["absurd inputs"] = stats.get("absurd inputs", 0) + 1
            continue
        graph.run(random_inputs(graph, {}, seed=case))
        stats["ran"] += 1
    except InteropError as err:
        key = f"{stage}: {type(err).__name__}"
        stats["refused"][key] = stats["refused"].get(key, 0) + 1
    except BaseException:
        print("ESCAPED " + json.dumps({"seed": base + case, "stage": stage,
                                       "error": traceback.format_exc()[-3000:]}))
        sys.exit(1)
print("STATS " + json.dumps(stats))
"""


def _seed_models(folder: Path) -> list[str]:
    from torch import nn

    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3), nn.Softmax(-1)).eval()  # fmt: skip
    attention = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attention

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    paths = []
    for name, module, x in (
        ("conv", conv, torch.randn(2, 3, 6, 6)),
        ("attention", SelfAttention().eval(), torch.randn(2, 5, 8)),
    ):
        graph = interop.trace(module, (x,))
        assert interop.verify(module, graph, (x,)).ok
        paths.append(str(graph.save(folder / f"{name}.onnx")))
    body = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["y"])], "else", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    control = helper.make_model(
        helper.make_graph(
            [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)], "if",
            [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
             helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ), opset_imports=[helper.make_opsetid("", 18)],
    )  # fmt: skip
    (folder / "if.onnx").write_bytes(control.SerializeToString())
    return paths + [str(folder / "if.onnx")]


def test_mutated_models_raise_only_interop_errors(tmp_path):
    seeds = _seed_models(tmp_path)
    count = examples(MUTATION_DEFAULT)
    done = subprocess.run(
        [sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + textwrap.dedent(MUTATOR),
         str(count), "0", *seeds],
        capture_output=True, text=True, cwd=ROOT, timeout=60 + count,
    )  # fmt: skip
    escaped = [line for line in done.stdout.splitlines() if line.startswith("ESCAPED ")]
    assert not escaped, json.loads(escaped[0][len("ESCAPED ") :])
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.split("STATS ", 1)[1])
    assert stats["cases"] == count
    # not vacuous: mutations produce both loadable-and-runnable models and refusals
    assert stats["ran"] > 0 and stats["cases"] - stats["ran"] > 0, stats
    print(stats)
