"""Test setup: quiet, CPU-only frameworks; Keras on the TensorFlow backend unless told otherwise."""

import os

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
