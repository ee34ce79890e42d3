"""Gradients of the pooling configurations torch's and Keras's pool kernels do not cover.

Dilated, asymmetric-padded, over-padded (pad > kernel // 2) and ceil-mode AveragePool,
MaxPool and LpPool are composed from explicit padding and window reductions in
adapters/torch/backend.py and adapters/keras/backend.py `pool()`; an earlier host (numpy)
fallback there computed the right values but cut the gradient. For each case below:

1. the numpy reference (`interop.interpret.evaluate`) agrees with ONNX Runtime in float32
   (same shape, rtol 1e-5, atol 1e-6), so the reference the gradients are checked against is
   ONNX's semantics (ceil_mode's "a window starts inside the input or the begin pad",
   count_include_pad counting declared pads but not the ceil-mode extension);
2. each emitter, on the float64 model, reproduces the reference outputs (rtol 1e-10) and its
   gradient of ``sum(w * y)`` matches central finite differences of the float64 reference,
   element by element (step 1e-6, rtol 1e-6, atol 1e-8: the pools are piecewise linear or
   smooth here, random inputs have no max-pool ties), and on the float32 model matches them
   to float32 accuracy (rtol 1e-4, atol 1e-5);
3. the Keras checks run once more on Keras's JAX and torch backends, in a subprocess each
   (Keras picks one backend per process), with jax.grad / torch autograd.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

H, FD_RTOL, FD_ATOL = 1e-6, 1e-6, 1e-8  # finite differences of the float64 reference
RTOL32, ATOL32 = 1e-4, 1e-5  # float32 emitters against the same differences
FORWARD_RTOL = 1e-10  # float64 emitters against the float64 reference

# name: (op, attributes, input shape); ONNX pads are (begin..., end...)
CASES: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    "avg_dilated_asymmetric": (
        "AveragePool",
        dict(kernel_shape=[3, 2], dilations=[2, 2], pads=[1, 0, 2, 1], strides=[1, 2]),
        (1, 2, 7, 6),
    ),
    "avg_dilated_ceil_count_include_pad": (
        "AveragePool",
        dict(
            kernel_shape=[2, 3],
            dilations=[2, 1],
            pads=[1, 2, 0, 1],
            strides=[2, 2],
            ceil_mode=1,
            count_include_pad=1,
        ),
        (1, 2, 6, 7),
    ),
    "avg_pads_over_half_kernel": (
        "AveragePool",
        dict(kernel_shape=[3, 3], pads=[2, 2, 2, 2], count_include_pad=1),
        (1, 2, 5, 5),
    ),
    "avg_1d_asymmetric_ceil": (
        "AveragePool",
        dict(kernel_shape=[3], pads=[0, 1], strides=[2], ceil_mode=1),
        (2, 2, 9),
    ),
    "avg_3d_dilated": (
        "AveragePool",
        dict(kernel_shape=[2, 2, 2], dilations=[2, 1, 2], pads=[1, 0, 0, 0, 1, 1]),
        (1, 2, 4, 4, 5),
    ),
    "max_dilated_asymmetric_ceil": (
        "MaxPool",
        dict(kernel_shape=[3, 3], dilations=[2, 2], pads=[0, 1, 2, 1], strides=[2, 2], ceil_mode=1),
        (1, 2, 8, 7),
    ),
    # ceil_mode's last window would start in the end pad: ONNX drops it
    "max_1d_ceil_window_in_end_pad": (
        "MaxPool",
        dict(kernel_shape=[3], pads=[0, 2], strides=[3], ceil_mode=1),
        (2, 2, 5),
    ),
    "lp_dilated_ceil": (
        "LpPool",
        dict(kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 0, 1, 1], strides=[2, 1], ceil_mode=1),
        (1, 2, 8, 6),
    ),
    "lp3_asymmetric": (
        "LpPool",
        dict(kernel_shape=[3, 2], pads=[0, 1, 2, 0], p=3),
        (1, 2, 5, 6),
    ),
}


def pool_model(name: str, dtype: Any) -> Any:
    from onnx import helper

    op, attributes, shape = CASES[name]
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], **attributes)],
        name,
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, None)],
    )
    # opset 19: AveragePool's dilations
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def problem(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The case's input (float64) and the weight w of the objective sum(w * y)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    x = rng.standard_normal(CASES[name][2])
    w = rng.standard_normal(reference(name, x).shape)
    return x, w


def reference(name: str, x: np.ndarray) -> np.ndarray:
    from interop.backend import numpy_backend
    from interop.interpret import evaluate

    return np.asarray(evaluate(pool_model(name, x.dtype), x, backend=numpy_backend)[0])


def finite_differences(name: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """d sum(w * y) / dx of the float64 reference, by central differences per element."""
    grad = np.zeros_like(x)
    for index in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[index] += H
        down[index] -= H
        grad[index] = np.sum(w * (reference(name, up) - reference(name, down))) / (2 * H)
    return grad


def torch_forward_and_gradient(model: Any, x: np.ndarray, w: np.ndarray) -> tuple[Any, Any]:
    import torch

    import interop

    module = interop.to_torch(model).eval()
    xt = torch.tensor(x, requires_grad=True)
    y = module(xt)
    (torch.as_tensor(w) * y.double()).sum().backward()
    assert xt.grad is not None, "no gradient reached x"
    return y.detach().numpy(), xt.grad.numpy()


def keras_forward_and_gradient(model: Any, x: np.ndarray, w: np.ndarray) -> tuple[Any, Any]:
    """With the gradient machinery of the Keras backend this process runs."""
    import keras

    import interop

    emitted = interop.to_keras(model)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = emitted(xt)
            total = tf.reduce_sum(tf.constant(w) * tf.cast(y, tf.float64))
        grad = tape.gradient(total, xt)
        assert grad is not None, "no gradient reached x"
        return y.numpy(), np.asarray(tf.convert_to_tensor(grad))
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def total(xj: Any) -> Any:
            return jnp.sum(jnp.asarray(w) * emitted(xj).astype(jnp.float64))

        xj = jnp.asarray(x)
        return np.asarray(emitted(xj)), np.asarray(jax.grad(total)(xj))
    if backend == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        y = emitted(xt)
        (torch.as_tensor(w) * y.double()).sum().backward()
        assert xt.grad is not None, "no gradient reached x"
        return y.detach().cpu().numpy(), xt.grad.cpu().numpy()
    raise NotImplementedError(backend)


RUN = {"torch": torch_forward_and_gradient, "keras": keras_forward_and_gradient}


def check(emitter: str, name: str) -> None:
    x, w = problem(name)
    expected = finite_differences(name, x, w)
    y, grad = RUN[emitter](pool_model(name, np.float64), x, w)
    np.testing.assert_allclose(y, reference(name, x), rtol=FORWARD_RTOL, atol=FORWARD_RTOL)
    np.testing.assert_allclose(grad, expected, rtol=FD_RTOL, atol=FD_ATOL)
    x32 = x.astype(np.float32)
    y32, grad32 = RUN[emitter](pool_model(name, np.float32), x32, w)
    np.testing.assert_allclose(y32, reference(name, x32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad32, expected, rtol=RTOL32, atol=ATOL32)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_matches_onnxruntime(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = pool_model(name, np.float32)
    x = problem(name)[0].astype(np.float32)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnx's shape inference ignores ceil_mode's start rule
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    expected = session.run(None, {"x": x})[0]
    actual = reference(name, x)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("emitter", ["torch", "keras"])
def test_gradient_matches_finite_differences(emitter: str, name: str) -> None:
    pytest.importorskip(emitter)
    check(emitter, name)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_backend_gradients(backend: str) -> None:
    pytest.importorskip(backend)
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "JAX_ENABLE_X64": "1",  # the float64 checks need float64 JAX arrays
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import keras, test_pool_gradients as t\n"
        f"assert keras.backend.backend() == {backend!r}\n"
        "for name in t.CASES: t.check('keras', name)\n"
        "print('OK')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
