"""Shared helpers of the ONNX node-test conformance suites (one test file per emitter).

An emitter's suite is a runner plus an xfail table:

    # tests/test_conformance_keras.py
    import conformance_support as cs

    def run_keras(model, inputs):            # onnx.ModelProto, list of numpy -> list of numpy
        ...                                  # (lists for sequences, None for empty optionals)

    RUNNERS = {"keras": run_keras}           # tools/gen_ops_doc.py finds runners here

    @pytest.mark.conformance
    @pytest.mark.parametrize("name", cs.case_params("keras"))
    def test_node_case(name):
        cs.run_case_with(run_keras, cs.case(name))

Known failures live in tests/conformance_xfails_<emitter>.json ({case name: reason});
they become strict xfails, so a listed case that starts passing fails the suite. A case
whose result varies between runs (thread count, BLAS) is listed with a reason starting
"numerically borderline:" instead: a non-strict xfail, kept by table updates.
Regenerate them with `python tools/gen_ops_doc.py --update-xfails --emitters keras`.
"""

from __future__ import annotations

import functools
import importlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
RTOL, ATOL = 1e-3, 1e-7  # the onnx backend runner's defaults (cases may override)
TARGET = 0.95  # pass rate asked by issue 5
# a table reason with this prefix marks a case whose result genuinely varies (threads, BLAS):
# it becomes a non-strict xfail, still counted as failing, and table updates keep it
BORDERLINE = "numerically borderline:"

Runner = Callable[[Any, list[Any]], list[Any]]


@functools.lru_cache(maxsize=1)
def cases() -> list[Any]:
    """Every ONNX backend node test case of the installed onnx, sorted by name."""
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return sorted(collect_testcases(), key=lambda c: c.name)


@functools.lru_cache(maxsize=1)
def _by_name() -> dict[str, Any]:
    return {c.name: c for c in cases()}


def case(name: str) -> Any:
    """The case called name."""
    return _by_name()[name]


def case_op_type(case: Any) -> str:
    """The op a case tests: its last node's (the `_expanded` tests end in the function body)."""
    nodes = case.model.graph.node
    return nodes[-1].op_type if nodes else "?"


def xfails_path(emitter: str) -> Path:
    return TESTS / f"conformance_xfails_{emitter}.json"


def emitters_with_xfails() -> list[str]:
    """Emitters that have an xfail table (numpy and torch first, then alphabetical)."""
    found = [
        p.stem.removeprefix("conformance_xfails_") for p in TESTS.glob("conformance_xfails_*.json")
    ]
    first = [e for e in ("numpy", "torch") if e in found]
    return first + sorted(e for e in found if e not in first)


def load_xfails(emitter: str) -> dict[str, str]:
    """{failing case name: reason} of an emitter ({} when it has no table yet)."""
    path = xfails_path(emitter)
    return json.loads(path.read_text()) if path.exists() else {}


def write_xfails(emitter: str, failures: dict[str, str]) -> None:
    xfails_path(emitter).write_text(
        json.dumps(dict(sorted(failures.items())), indent=1, ensure_ascii=False) + "\n"
    )


def runner(emitter: str) -> Runner:
    """The emitter's run function: RUNNERS[emitter] of test_conformance_<emitter> or test_conformance."""
    for module_name in (f"test_conformance_{emitter}", "test_conformance"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue
        if emitter in getattr(module, "RUNNERS", {}):
            return module.RUNNERS[emitter]
    raise LookupError(f"no conformance runner for emitter {emitter!r}")


def as_numpy(value: Any) -> Any:
    """Test data as numpy: some cases store exact bits as TensorProto."""
    import onnx

    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, (list, tuple)):
        return [as_numpy(v) for v in value]
    return value


def map_nested(value: Any, function: Callable[[Any], Any]) -> Any:
    """function applied to every tensor of a value (None and nested lists kept)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [map_nested(v, function) for v in value]
    return function(value)


def compare(expected: Any, actual: Any, rtol: float = RTOL, atol: float = ATOL) -> None:
    """The onnx backend runner's comparison: same structure, shapes and dtypes; allclose values."""
    if isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)), f"expected a sequence, got {type(actual)}"
        assert len(actual) == len(expected), f"sequence length {len(actual)} != {len(expected)}"
        for e, a in zip(expected, actual):
            compare(e, a, rtol, atol)
        return
    if expected is None:
        assert actual is None, "expected an empty optional"
        return
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    np.testing.assert_array_equal(actual.shape, expected.shape, err_msg="shape")
    if expected.dtype == object:
        np.testing.assert_array_equal(actual, expected)
        return
    np.testing.assert_equal(actual.dtype, expected.dtype)
    if expected.dtype.kind not in "biufc" or expected.dtype.name == "bfloat16":
        # ml_dtypes (bfloat16, float8, int4...) compare as float32 like the onnx runner
        rtol = max(rtol, 2**-6) if expected.dtype.name == "bfloat16" else rtol
        actual, expected = actual.astype(np.float32), expected.astype(np.float32)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def run_case_with(run: Runner, case: Any) -> None:
    """Run every data set of a case through run(model, inputs); raise on the first mismatch."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for inputs, expected in case.data_sets:
            expected = as_numpy(list(expected))
            actual = run(case.model, as_numpy(list(inputs)))
            assert len(actual) == len(expected), f"{len(actual)} outputs, expected {len(expected)}"
            for e, a in zip(expected, actual):
                compare(e, a, case.rtol, case.atol)


def outcome(run: Runner, case: Any) -> tuple[bool, str]:
    """(passed, reason): the reason is what the xfail table records."""
    try:
        run_case_with(run, case)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        return False, f"{type(err).__name__}: {first_line}"[:160]
    return True, ""


def case_params(emitter: str) -> list[Any]:
    """pytest params (case names): strict xfail where the table lists a case, non-strict if borderline."""
    xfails = load_xfails(emitter)
    params = []
    for c in cases():
        reason = xfails.get(c.name)
        strict = not (reason or "").startswith(BORDERLINE)
        marks = [pytest.mark.xfail(reason=reason, strict=strict)] if reason else []
        params.append(pytest.param(c.name, id=f"{emitter}-{c.name}", marks=marks))
    return params


def pass_rate(emitter: str) -> float:
    """Fraction of cases not listed as failing in the emitter's xfail table."""
    return 1 - len(load_xfails(emitter)) / len(cases())
