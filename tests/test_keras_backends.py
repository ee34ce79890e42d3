"""The Keras adapter on the JAX and torch backends (Keras picks one backend per process).

Each case runs a small script in a subprocess with KERAS_BACKEND set and checks,
inside it, a CNN, a subclassed model with a custom layer and a masked LSTM against
``model(x)`` (rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, interop
    from keras import layers, ops
    assert keras.backend.backend() == BACKEND, keras.backend.backend()
    rs = np.random.RandomState(0)

    def check(model, x):
        g = interop.trace(model, x)
        report = interop.verify(model, g, x)
        assert report.ok, str(report)
        assert g.count_params() == model.count_params()
        assert g.source["backend"] == BACKEND
        return g

    cnn = keras.Sequential([keras.Input((12, 12, 3)), layers.Conv2D(4, 3, activation="relu", name="conv"),
                            layers.BatchNormalization(), layers.MaxPooling2D(), layers.GlobalAveragePooling2D(),
                            layers.Dense(3, name="fc")])
    check(cnn, rs.rand(2, 12, 12, 3).astype("float32"))

    class Block(layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.dense = layers.Dense(4, name="inner")
        def call(self, x):
            return ops.tanh(self.dense(x)) * 2.0 + ops.mean(x, axis=-1, keepdims=True)

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.block = Block(name="block")
            self.head = layers.Dense(2, name="head")
        def call(self, x):
            return self.head(self.block(x))

    net = Net(); x = rs.rand(3, 5).astype("float32"); net(x)
    g = check(net, x)
    assert "block/inner" in {la.path for la in g.layers}

    i = keras.Input((None,), dtype="int32")
    seq = keras.Model(i, layers.LSTM(5)(layers.Embedding(10, 4, mask_zero=True)(i)))
    tokens = rs.randint(1, 10, size=(3, 6)).astype("int32"); tokens[0, 4:] = 0
    g = check(seq, tokens)
    longer = rs.randint(0, 10, size=(2, 11)).astype("int32")
    np.testing.assert_allclose(g.run(longer), keras.ops.convert_to_numpy(seq(longer)), rtol=1e-4, atol=1e-5)
    print("OK")
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_backend(backend):
    pytest.importorskip(backend)
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    code = f"BACKEND = {backend!r}\n" + SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


APPLICATION_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, interop
    from keras import layers
    assert keras.backend.backend() == BACKEND
    rs = np.random.RandomState(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=10)
    x = rs.rand(2, 64, 64, 3).astype("float32")
    g = interop.trace(model, x)
    assert interop.verify(model, g, x).ok
    assert g.count_params() == model.count_params()
    q = keras.Input((None, 12))
    h = layers.MultiHeadAttention(4, 8)(q, q, use_causal_mask=True)
    enc = keras.Model(q, layers.LayerNormalization()(layers.Add()([q, h])))
    g = interop.trace(enc, rs.rand(2, 5, 12).astype("float32"))
    other = rs.rand(3, 9, 12).astype("float32")
    assert interop.verify(enc, g, other).ok
    print("OK")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_keras_backend_mobilenet_and_attention(backend):
    pytest.importorskip(backend)
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    code = f"BACKEND = {backend!r}\n" + APPLICATION_SCRIPT
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
