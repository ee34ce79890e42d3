"""ONNX backend node tests against the Flax emitter (`interop.to_flax`), run eagerly.

Each case is emitted as an nnx module (by the emitter behind `interop.to_flax`) and called once, eagerly (not jitted: one XLA
compile per case would take the suite far past its time budget; tests/test_emit_flax.py
covers jit). 64-bit types are enabled around each case with ``jax.enable_x64`` so int64
and float64 stay what ONNX says. Known failures are strict xfails, pinned to their exception
type, in conformance_xfails_flax.json. Run with ``pytest -m conformance tests/test_conformance_flax.py``.
"""

from __future__ import annotations

from typing import Any

import conformance_support as cs
import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")


def run_flax(model: Any, inputs: list[Any]) -> list[Any]:
    """Outputs of the model emitted by the Flax emitter, as numpy (lists for sequences)."""
    import interop

    with jax.enable_x64(True):
        module = interop.to_flax(model)  # the public path: protos go to the emitter as they are
        outputs = module(*inputs)
        outputs = list(outputs) if len(module.output_names) > 1 else [outputs]
        return [cs.map_nested(o, np.asarray) for o in outputs]


RUNNERS = {"flax": run_flax}


@pytest.mark.conformance
@pytest.mark.parametrize("name", cs.case_params("flax"))
def test_node_case(name: str) -> None:
    cs.check_case("flax", run_flax, name)


@pytest.mark.conformance
def test_pass_rate_meets_target() -> None:
    """At least 95% of the cases pass (the xfail table is the failing set)."""
    rate = cs.pass_rate("flax")
    assert rate >= cs.TARGET, f"flax: {rate:.1%} of {len(cs.cases())} cases pass"
