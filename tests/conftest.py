"""Test setup: quiet, CPU-only frameworks; Keras on the TensorFlow backend unless told otherwise."""

import os
import sys

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=None,
        help="cases for the fuzzers in tests/test_fuzz.py (sets INTEROP_FUZZ_EXAMPLES; "
        "see docs/reliability.md)",
    )


def pytest_configure(config):
    count = config.getoption("--fuzz-examples", default=None)
    if count:
        os.environ["INTEROP_FUZZ_EXAMPLES"] = str(count)


@pytest.fixture(autouse=True)
def _fresh_framework_state():
    """Each test starts from the same framework state, whatever ran before it in the process.

    Keras: a cleared session (auto-generated layer names restart: `lstm`, not `lstm_12`),
    the float32 dtype policy and floatx; torch: float32 default dtype and grad mode on.
    Frameworks are touched only when already imported, so tests without them stay cheap.
    """
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "utils"):
        keras.utils.clear_session(free_memory=False)  # also resets the dtype policy
        if keras.config.floatx() != "float32":
            keras.config.set_floatx("float32")
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_default_dtype"):
        if torch.get_default_dtype() != torch.float32:
            torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
    yield
