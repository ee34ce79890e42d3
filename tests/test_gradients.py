"""Gradients through the emitted torch, Keras and Flax models, over the ONNX node-test cases.

Issue 5 asks that "gradients flow through every op that is differentiable in ONNX". For
each selected case and emitter this computes the gradient of ``sum(w * output)`` (``w`` a
fixed random weight per case, summed over the differentiable float outputs) with respect
to the differentiable float inputs (torch autograd on `interop.to_torch`, tf.GradientTape
on `interop.to_keras`, jax.grad of `interop.to_jax`'s function, jitted, or eagerly when a
shape-like graph input cannot be traced) and checks:

1. a gradient exists for every differentiable input, with the input's shape, and is
   finite; None (disconnected) is accepted only for an empty input or an input the
   reference outputs do not move with at all (BatchNormalization's mean in training mode,
   Hardmax), where it stands for zeros;
2. its directional derivative ``sum(grad * v)`` (``v`` a fixed random direction) matches a
   central finite difference of the numpy reference evaluator (`interop.interpret.evaluate`)
   in float64 (the case's model copied with every float32 type, tensor, ``to``/``dtype``
   and ``stash_type`` attribute as float64; rtol 1e-3 plus a float32 rounding allowance
   ``eps32 * sum|w| * sum|v|`` for the emitters' float32 gradients), or in float32 with a
   larger step (rtol 1e-2) when the float64 copy does not reproduce the outputs;
3. where finite differences are unreliable, the emitters' gradients agree with each other
   instead (each must match another emitter's, rtol 1e-3, atol 1e-5): at a kink (the
   forward and backward one-sided differences disagree: Max/Min/MaxPool/ScatterND ties,
   zeros under Abs/Relu/L1 norms...), where the objective is not finite at x or x +- h v
   (a step out of the domain, inf/nan inputs), and always for the selection ops in
   `CROSS_CHECKED` (Hardmax, TopK, MaxUnpool: integer-valued or tie-dependent outputs).

Selection rule (`selected()`): single-node cases (not ``_expanded``) whose op schema (at
the case's opset and domain) marks at least one input and one output Differentiable, all
of whose differentiable inputs are float32/float64 graph inputs, with at least one
float32/float64 differentiable output; only cases that pass the conformance suite for
numpy, torch, keras and flax (a gradient of a wrong forward says nothing); per op type
`PER_OP` (3) of them, evenly spaced in name order (indices 0, n//3, 2n//3). Every
selected case is checked for every emitter: 291 cases of 117 ops, 873 pairs, ~60 s.

Pairs that fail are strict xfails with their reason in tests/gradient_xfails.json
({"<emitter>::<case>": reason}); regenerate it with
``python tests/test_gradients.py --update-xfails`` (a pair that still fails keeps its
hand-written reason). ``test_pass_rate_meets_target`` asserts the share of passing pairs.
Run with ``pytest -m conformance tests/test_gradients.py``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script: conformance_support
import conformance_support as cs  # noqa: E402

XFAILS = cs.TESTS / "gradient_xfails.json"
EMITTERS = ("torch", "keras", "flax")
PER_OP = 3
TARGET = 0.98  # measured: 867 / 873 = 99.3% (6 strict xfails)
RTOL64, RTOL32 = 1e-3, 1e-2  # finite-difference comparisons in float64 / float32
STEP64, STEP32 = 1e-5, 1e-2
AGREE_RTOL, AGREE_ATOL = 1e-3, 1e-5  # emitters against each other
# ops whose outputs are selections (tie-dependent or piecewise constant): emitters agree
CROSS_CHECKED = frozenset({"Hardmax", "TopK", "MaxUnpool"})


@dataclass(frozen=True)
class Selected:
    name: str
    op_type: str
    inputs: tuple[int, ...]  # graph-input positions of the differentiable float inputs
    outputs: tuple[int, ...]  # graph-output positions of the differentiable float outputs


def _float(value_type: Any) -> bool:
    import onnx

    return value_type.HasField("tensor_type") and value_type.tensor_type.elem_type in (
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.DOUBLE,
    )


def _formal(formals: list[Any], index: int) -> Any:
    import onnx

    if index < len(formals):
        return formals[index]
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return formals[-1] if formals and formals[-1].option == variadic else None


def _differentiable(case: Any) -> Selected | None:
    """The case's differentiable float inputs and outputs, or None when it does not qualify."""
    import onnx

    graph = case.model.graph
    if len(graph.node) != 1 or "_expanded" in case.name:
        return None
    node = graph.node[0]
    try:
        schema = _schema(case.model, node)
    except onnx.defs.SchemaError:
        return None
    wanted = onnx.defs.OpSchema.DifferentiationCategory.Differentiable

    def positions(names: list[str], formals: list[Any], values: list[Any]) -> list[int] | None:
        where = {v.name: i for i, v in enumerate(values)}
        found = []
        for i, name in enumerate(names):
            formal = _formal(formals, i)
            if name and formal is not None and formal.differentiation_category == wanted:
                if name not in where:
                    return None  # computed inside the graph: not a plain case
                found.append(where[name])
        return found

    inputs = positions(list(node.input), schema.inputs, list(graph.input))
    outputs = positions(list(node.output), schema.outputs, list(graph.output))
    if not inputs or not outputs:
        return None
    if not all(_float(graph.input[i].type) for i in inputs):
        return None
    outputs = [i for i in outputs if _float(graph.output[i].type)]
    if not outputs:
        return None
    return Selected(case.name, node.op_type, tuple(dict.fromkeys(inputs)), tuple(outputs))


@functools.lru_cache(maxsize=1)
def selected() -> list[Selected]:
    """The checked cases: see the module docstring's selection rule."""
    failing = set()
    for emitter in ("numpy", *EMITTERS):
        failing |= set(cs.load_xfails(emitter))
    per_op: dict[str, list[Selected]] = {}
    for case in cs.cases():
        found = _differentiable(case) if case.name not in failing else None
        if found is not None:
            per_op.setdefault(found.op_type, []).append(found)
    chosen = []
    for qualifying in per_op.values():  # evenly spaced in name order: first, n/3, 2n/3
        picks = sorted({k * len(qualifying) // PER_OP for k in range(PER_OP)})
        chosen += [qualifying[k] for k in picks]
    return sorted(chosen, key=lambda s: s.name)


@functools.lru_cache(maxsize=1)
def _by_name() -> dict[str, Selected]:
    return {s.name: s for s in selected()}


# ---------------------------------------------------------------- data of a case


@dataclass
class Problem:
    """Inputs, output weights and direction of one case (seeded by its name)."""

    model: Any
    inputs: list[Any]
    weights: dict[int, np.ndarray]  # graph-output position -> w
    directions: dict[int, np.ndarray]  # graph-input position -> v


@functools.cache
def problem(name: str) -> Problem:
    spec, case = _by_name()[name], cs.case(name)
    inputs = cs.as_numpy(list(case.data_sets[0][0]))
    outputs = _quiet(lambda: _reference(case.model, inputs))
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    weights = {i: rng.standard_normal(np.shape(outputs[i])) for i in spec.outputs}
    directions = {i: rng.standard_normal(np.shape(inputs[i])) for i in spec.inputs}
    return Problem(case.model, inputs, weights, directions)


def _quiet(function: Callable[[], Any]) -> Any:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return function()


def _reference(model: Any, inputs: list[Any]) -> list[Any]:
    from interop.interpret import evaluate

    return evaluate(model, *inputs)


def _objective(outputs: list[Any], weights: dict[int, np.ndarray]) -> float:
    return float(sum(np.sum(w * np.asarray(outputs[i], np.float64)) for i, w in weights.items()))


# ---------------------------------------------------------------- emitters' gradients

Gradients = dict[int, Any]  # graph-input position -> gradient (None: disconnected)


def gradients_torch(p: Problem) -> Gradients:
    import torch

    import interop

    module = interop.to_torch(p.model).eval()
    args = [torch.as_tensor(np.asarray(x)) for x in p.inputs]
    for i in p.directions:
        args[i].requires_grad_(True)
    outputs = module(*args)
    if not (isinstance(outputs, (tuple, list)) and len(module.output_names) > 1):
        outputs = [outputs]
    total = sum((torch.as_tensor(w) * outputs[i].double()).sum() for i, w in p.weights.items())
    wrt = [args[i] for i in p.directions]
    if not total.requires_grad:  # nothing differentiable reached the outputs
        return dict.fromkeys(p.directions)
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return {i: None if g is None else g.numpy() for i, g in zip(p.directions, grads)}


def gradients_keras(p: Problem) -> Gradients:
    import tensorflow as tf

    import interop

    model = interop.to_keras(p.model)
    args = [tf.constant(np.asarray(x)) for x in p.inputs]
    with tf.GradientTape() as tape:
        for i in p.directions:
            tape.watch(args[i])
        outputs = model(args if len(args) != 1 else args[0])
        outputs = list(outputs) if len(model.output_names) > 1 else [outputs]
        total = tf.add_n(
            [
                tf.reduce_sum(tf.constant(w) * tf.cast(outputs[i], tf.float64))
                for i, w in p.weights.items()
            ]
        )
    grads = tape.gradient(total, [args[i] for i in p.directions])
    # Gather's gradient is a tf.IndexedSlices: densify it
    return {
        i: None if g is None else np.asarray(tf.convert_to_tensor(g))
        for i, g in zip(p.directions, grads)
    }


def gradients_flax(p: Problem) -> Gradients:
    import jax
    import jax.numpy as jnp
    from interop.adapters.flax.backend import StaticValueError

    import interop

    with jax.enable_x64(True):
        fn, params = interop.to_jax(p.model)
        positions = list(p.directions)

        def total(*wrt: Any) -> Any:
            args = list(p.inputs)
            for i, x in zip(positions, wrt):
                args[i] = x
            outputs = fn(params, *args)
            outputs = list(outputs) if len(p.model.graph.output) > 1 else [outputs]
            return sum(
                jnp.sum(jnp.asarray(w) * outputs[i].astype(jnp.float64))
                for i, w in p.weights.items()
            )

        wrt = [jnp.asarray(p.inputs[i]) for i in positions]
        gradient = jax.grad(total, argnums=tuple(range(len(wrt))))
        try:  # jitted: one XLA compile instead of one per primitive (far faster eagerly)
            grads = jax.jit(gradient)(*wrt)
        except StaticValueError:  # a shape-like graph input (Expand's shape...): run eagerly
            grads = gradient(*wrt)
        return {i: np.asarray(g) for i, g in zip(positions, grads)}


GRADIENTS: dict[str, Callable[[Problem], Gradients]] = {
    "torch": gradients_torch,
    "keras": gradients_keras,
    "flax": gradients_flax,
}


@functools.cache
def gradients(emitter: str, name: str) -> Gradients | str:
    """The emitter's gradients of a case, or the error (one line) that computing them raised."""
    try:
        return _quiet(lambda: GRADIENTS[emitter](problem(name)))
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        return f"gradient raised {type(err).__name__}: {first_line}"[:200]


# ---------------------------------------------------------------- finite differences


@dataclass(frozen=True)
class Difference:
    central: float  # (F(x + h v) - F(x - h v)) / 2h
    precision: str  # "float64" or "float32"
    reliable: str  # "" or why the emitters are compared with each other instead
    scale: float  # roundoff scale of F / h (float32 tolerance)


def as_float64(model: Any) -> Any:
    """A copy of model with every float32 type, tensor and dtype attribute made float64."""
    import onnx
    from onnx import numpy_helper

    model64 = onnx.ModelProto()
    model64.CopyFrom(model)
    f32, f64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE

    def tensor(t: Any) -> None:
        if t.data_type == f32:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    def graph(g: Any) -> None:
        for value in [*g.input, *g.output, *g.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type == f32:
                value.type.tensor_type.elem_type = f64
        for t in g.initializer:
            tensor(t)
        for node in g.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    tensor(attribute.t)
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    graph(attribute.g)
                elif (
                    attribute.name in ("to", "dtype", "output_dtype", "stash_type")
                    and attribute.i == f32
                ):
                    attribute.i = f64

    graph(model64.graph)
    for node in model64.graph.node:  # computations stashed in float32 by default: float64 too
        if "stash_type" in _schema(model64, node).attributes:
            if not any(a.name == "stash_type" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("stash_type", f64))
    return model64


def _schema(model: Any, node: Any) -> Any:
    import onnx

    domain = node.domain or ""
    opset = next(o.version for o in model.opset_import if (o.domain or "") == domain)
    return onnx.defs.get_schema(node.op_type, opset, domain)


@functools.cache
def _evaluation(name: str) -> tuple[Any, list[Any], float, str]:
    """(model, inputs, step, precision): the float64 copy when it reproduces the outputs."""
    p = problem(name)
    model64 = as_float64(p.model)
    inputs64 = [
        np.asarray(x, np.float64) if np.asarray(x).dtype == np.float32 else x for x in p.inputs
    ]
    try:
        expected = _quiet(lambda: _reference(p.model, p.inputs))
        got = _quiet(lambda: _reference(model64, inputs64))
        for i in p.weights:
            np.testing.assert_allclose(
                np.asarray(got[i], np.float64), np.asarray(expected[i], np.float64), 1e-3, 1e-5
            )
    except Exception:
        return p.model, p.inputs, STEP32, "float32"
    return model64, inputs64, STEP64, "float64"


def _objective_at(name: str, t: float, only: int | None = None) -> tuple[float, float]:
    """(F, sum |w * outputs|) at inputs + t * directions (only input `only` moved if given)."""
    p = problem(name)
    model, inputs, _, _ = _evaluation(name)
    moved = list(inputs)
    for i, v in p.directions.items():
        if only is None or i == only:
            moved[i] = (np.asarray(inputs[i]) + t * v).astype(np.asarray(inputs[i]).dtype)
    outputs = _quiet(lambda: _reference(model, moved))
    with np.errstate(all="ignore"):  # inf/nan inputs (Cast cases) or a step out of the domain
        weighted = [w * np.asarray(outputs[i], np.float64) for i, w in p.weights.items()]
        total = float(sum(np.sum(x) for x in weighted))
        return total, float(sum(np.sum(np.abs(x)) for x in weighted))


@functools.cache
def difference(name: str) -> Difference:
    """Central finite difference of sum(w * outputs) along the case's direction."""
    _, _, h, precision = _evaluation(name)
    (plus, size), (minus, _), (zero, _) = (_objective_at(name, t) for t in (h, -h, 0.0))
    central = (plus - minus) / (2 * h)
    forward, backward = (plus - zero) / h, (zero - minus) / h
    roundoff = (1e-15 if precision == "float64" else 1e-6) * size / h
    rtol = RTOL64 if precision == "float64" else RTOL32
    reliable = ""
    if not np.isfinite([plus, minus, zero]).all():
        reliable = "sum(w * outputs) is not finite at x or x +- h v (domain edge or inf/nan inputs)"
    elif abs(forward - backward) > 10 * rtol * max(abs(forward), abs(backward)) + 4 * roundoff:
        reliable = f"kink: one-sided differences {forward:.6g} and {backward:.6g} disagree"
    elif _by_name()[name].op_type in CROSS_CHECKED:
        reliable = "selection op (CROSS_CHECKED)"
    return Difference(central, precision, reliable, roundoff)


@functools.cache
def independent(name: str, position: int) -> bool:
    """Whether the reference outputs do not move at all when only that input moves."""
    h = _evaluation(name)[2]
    return _objective_at(name, h, position)[0] == _objective_at(name, -h, position)[0]


# ---------------------------------------------------------------- the check


def _zeros_for_none(p: Problem, grads: Gradients) -> dict[int, np.ndarray]:
    return {i: np.zeros_like(p.inputs[i]) if g is None else g for i, g in grads.items()}


def check(emitter: str, name: str) -> None:
    """Raise AssertionError (with the reason the table records) if the pair fails."""
    p = problem(name)
    graph_inputs = p.model.graph.input
    grads = gradients(emitter, name)
    assert not isinstance(grads, str), grads
    for i, g in grads.items():
        label = graph_inputs[i].name
        if g is None and (np.size(p.inputs[i]) == 0 or independent(name, i)):
            continue  # empty, or the outputs do not depend on it (BatchNorm training's mean)
        assert g is not None, f"no gradient for input {label!r} (disconnected)"
        assert np.shape(g) == np.shape(p.inputs[i]), (
            f"gradient of {label!r} has shape {np.shape(g)}, input {np.shape(p.inputs[i])}"
        )
        assert np.isfinite(g).all(), f"gradient of {label!r} is not finite"
    fd = difference(name)
    grads = _zeros_for_none(p, grads)
    if not fd.reliable:
        directional = sum(
            float(np.sum(np.asarray(g, np.float64) * p.directions[i])) for i, g in grads.items()
        )
        size = sum(float(np.sum(np.abs(g * p.directions[i]))) for i, g in grads.items())
        rtol = RTOL64 if fd.precision == "float64" else RTOL32
        # float32 rounding allowance of the emitters' gradients: eps * sum|w| * sum|v| (a
        # saturated tanh's 1 - y * y is all rounding, test_rnn_seq_length)
        rounding = (
            float(np.finfo(np.float32).eps)
            * sum(float(np.sum(np.abs(w))) for w in p.weights.values())
            * sum(float(np.sum(np.abs(v))) for v in p.directions.values())
        )
        tol = rtol * abs(fd.central) + 1e-4 * size + fd.scale + rounding
        assert abs(directional - fd.central) <= tol, (
            f"directional derivative {directional:.6g} != {fd.precision} finite difference "
            f"{fd.central:.6g}"
        )
        return
    others = {e: gradients(e, name) for e in EMITTERS if e != emitter}
    others = {e: _zeros_for_none(p, g) for e, g in others.items() if not isinstance(g, str)}
    assert others, f"{fd.reliable}; no other emitter has a gradient to compare with"
    agree = [
        e
        for e, other in others.items()
        if all(
            np.shape(other[i]) == np.shape(grads[i])
            and np.allclose(grads[i], other[i], rtol=AGREE_RTOL, atol=AGREE_ATOL)
            for i in grads
        )
    ]
    assert agree, f"{fd.reliable}; gradient differs from {' and '.join(others)}"


def outcome(emitter: str, name: str) -> tuple[bool, str]:
    try:
        check(emitter, name)
    except AssertionError as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        return False, first_line[:240]
    return True, ""


# ---------------------------------------------------------------- xfail table


def load_xfails() -> dict[str, str]:
    return json.loads(XFAILS.read_text()) if XFAILS.exists() else {}


def write_xfails(table: dict[str, str]) -> None:
    XFAILS.write_text(json.dumps(dict(sorted(table.items())), indent=1, ensure_ascii=False) + "\n")


def pairs() -> list[tuple[str, str]]:
    return [(e, s.name) for e in EMITTERS for s in selected()]


def params() -> list[Any]:
    table = load_xfails()
    found = []
    for emitter, name in pairs():
        key = f"{emitter}::{name}"
        marks = [pytest.mark.xfail(reason=table[key], strict=True)] if key in table else []
        found.append(pytest.param(emitter, name, id=key, marks=marks))
    return found


def regenerate() -> dict[str, str]:
    """Check every pair and write the failing ones to tests/gradient_xfails.json.

    A pair that still fails keeps the reason the table gives it (reasons explained by
    hand survive); a new failure is listed with the check's message.
    """
    old, table = load_xfails(), {}
    for emitter, name in pairs():
        passed, reason = outcome(emitter, name)
        if not passed:
            key = f"{emitter}::{name}"
            table[key] = old.get(key, reason)
    write_xfails(table)
    return table


# ---------------------------------------------------------------- tests


@pytest.fixture(autouse=True, scope="module")
def _frameworks() -> None:
    for module in ("torch", "keras", "jax", "flax"):
        pytest.importorskip(module)


@pytest.mark.conformance
@pytest.mark.parametrize(("emitter", "name"), params())
def test_gradient(emitter: str, name: str) -> None:
    if emitter == "keras":
        import keras

        if keras.config.backend() != "tensorflow":
            pytest.skip("the Keras gradients are taken with tf.GradientTape")
    check(emitter, name)


@pytest.mark.conformance
def test_selection_covers_differentiable_ops() -> None:
    ops = {s.op_type for s in selected()}
    assert len(ops) >= 100, sorted(ops)
    assert {"Conv", "MatMul", "Softmax", "LSTM", "Relu", "Gather"} <= ops


@pytest.mark.conformance
def test_xfail_table_lists_real_pairs_with_reasons() -> None:
    table = load_xfails()
    assert set(table) <= {f"{e}::{n}" for e, n in pairs()}
    assert all(reason.strip() for reason in table.values())


@pytest.mark.conformance
def test_pass_rate_meets_target() -> None:
    """At least TARGET of the checked (case, emitter) pairs pass (the table is the failing set)."""
    rate = 1 - len(load_xfails()) / len(pairs())
    assert rate >= TARGET, f"{rate:.1%} of {len(pairs())} pairs pass"


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    if "--update-xfails" in sys.argv:
        failing = regenerate()
        print(f"{len(failing)} of {len(pairs())} pairs fail; wrote {XFAILS}")
    else:
        print(__doc__)
