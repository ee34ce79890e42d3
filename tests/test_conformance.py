"""ONNX backend node tests (shipped inside the `onnx` package) against the numpy and torch emitters.

Each case runs with the tolerances of the onnx backend runner (rtol 1e-3, atol 1e-7,
same dtypes and shapes). Known failures are listed with their kind, exception type and
reason in conformance_xfails_<emitter>.json; the xfail is strict and pinned to that type, so
a listed case that starts passing, or fails another way, fails the suite too. A listed wrong
value (kind "mismatch") fails `test_no_table_lists_wrong_values`: an expected failure may be an
explicit error, never a silent wrong number. Run with ``pytest -m conformance``.
docs/ops.md is generated from the same runners by tools/gen_ops_doc.py; the shared
helpers (case list, comparison, xfail tables) are in conformance_support.py.
"""

from __future__ import annotations

from typing import Any

import conformance_support as cs
import pytest


def run_numpy(model: Any, inputs: list[Any]) -> list[Any]:
    """Outputs of the reference evaluator (numpy backend)."""
    from interop.backend import numpy_backend
    from interop.interpret import evaluate

    return evaluate(model, *inputs, backend=numpy_backend)


def run_torch(model: Any, inputs: list[Any]) -> list[Any]:
    """Outputs of the emitted torch module, as numpy."""
    from interop.adapters.torch.backend import torch_backend

    from interop.emit import to_torch

    # the node tests check inference semantics: eval() is the emitted module's inference mode
    # (nn.Dropout is the identity there, as ONNX Dropout without training_mode)
    module = to_torch(model).eval()
    outputs = module(*[cs.map_nested(x, torch_backend.asarray) for x in inputs])
    if not (isinstance(outputs, (tuple, list)) and len(module.output_names) > 1):
        outputs = [outputs]
    return [cs.map_nested(output, torch_backend.to_numpy) for output in outputs]


RUNNERS = {"numpy": run_numpy, "torch": run_torch}


@pytest.mark.conformance
@pytest.mark.parametrize("name", cs.case_params("numpy"))
def test_numpy_node_case(name: str) -> None:
    cs.check_case("numpy", run_numpy, name)


@pytest.mark.conformance
@pytest.mark.parametrize("name", cs.case_params("torch"))
def test_torch_node_case(name: str) -> None:
    pytest.importorskip("torch")
    cs.check_case("torch", run_torch, name)


@pytest.mark.conformance
@pytest.mark.parametrize("emitter", list(RUNNERS))
def test_pass_rate_meets_target(emitter: str) -> None:
    """At least 95% of the cases pass (the xfail table is the failing set)."""
    rate = cs.pass_rate(emitter)
    assert rate >= cs.TARGET, f"{emitter}: {rate:.1%} of {len(cs.cases())} cases pass"


@pytest.mark.conformance
@pytest.mark.parametrize("emitter", cs.emitters_with_xfails())
def test_xfail_table_is_well_formed(emitter: str) -> None:
    cs.check_table(emitter)


@pytest.mark.conformance
@pytest.mark.parametrize("emitter", cs.emitters_with_xfails())
def test_no_table_lists_wrong_values(emitter: str) -> None:
    """No expected failure is a wrong value: fix the op, or make it raise UnsupportedOpError."""
    wrong = cs.wrong_values(emitter)
    assert not wrong, f"{emitter} lists wrong values (kind 'mismatch') as expected: {wrong}"
