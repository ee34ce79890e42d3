"""ONNX backend node tests against the Keras emitter (`interop.to_keras`), TensorFlow backend.

Each case is emitted as a functional keras.Model (not compiled) and called once, eagerly,
on the backend the test session runs (TensorFlow, set by conftest.py). Known failures are
strict xfails, pinned to their exception type, in conformance_xfails_keras.json. Run with
``pytest -m conformance tests/test_conformance_keras.py``.
"""

from __future__ import annotations

from typing import Any

import conformance_support as cs
import pytest

keras = pytest.importorskip("keras")


def run_keras(model: Any, inputs: list[Any]) -> list[Any]:
    """Outputs of the model emitted with to_keras, as numpy."""
    from interop.adapters.keras.backend import from_carrier, to_carrier

    from interop.emit import to_keras

    emitted = to_keras(model)
    # dtypes Keras lacks (int4, float8 fnuz...) cross the model boundary in their carrier
    inputs = [cs.map_nested(x, to_carrier) for x in inputs]
    outputs = emitted(inputs if len(inputs) != 1 else inputs[0])
    outputs = list(outputs) if len(emitted.output_names) > 1 else [outputs]
    return [
        cs.map_nested(o, lambda t, d=dtype: from_carrier(t, d))
        for o, dtype in zip(outputs, emitted.output_dtypes)
    ]


RUNNERS = {"keras": run_keras}


@pytest.mark.conformance
@pytest.mark.parametrize("name", cs.case_params("keras"))
def test_node_case(name: str) -> None:
    cs.check_case("keras", run_keras, name)


@pytest.mark.conformance
def test_pass_rate_meets_target() -> None:
    assert cs.pass_rate("keras") >= cs.TARGET


@pytest.mark.conformance
def test_unsupported_op_inside_a_layer_call_names_the_op() -> None:
    """Keras rebuilds errors escaping a layer call from their message: UnsupportedOpError keeps its op."""
    from interop.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError) as raised:
        cs.run_case_with(run_keras, cs.case("test_bernoulli"))
    assert raised.value.op == "RandomUniformLike" and raised.value.adapter == "keras"
