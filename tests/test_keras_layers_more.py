"""Layers without a dedicated converter (opened by a symbolic call) and newer converters."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

import interop  # noqa: E402

CASES = {
    "prelu": ((5, 6), lambda i: layers.PReLU(alpha_initializer="random_uniform")(i)),
    "unit_norm": ((5, 6), lambda i: layers.UnitNormalization()(i)),
    "rms_norm": ((5, 6), lambda i: layers.RMSNormalization()(i)),
    "group_norm": ((4, 4, 6), lambda i: layers.GroupNormalization(groups=3)(i)),
    "upsampling1d": ((5, 6), lambda i: layers.UpSampling1D(2)(i)),
    "upsampling3d": ((2, 3, 2, 4), lambda i: layers.UpSampling3D((2, 1, 2))(i)),
    "time_distributed_dense": ((5, 6), lambda i: layers.TimeDistributed(layers.Dense(3))(i)),
    "time_distributed_conv": ((3, 6, 6, 2), lambda i: layers.TimeDistributed(layers.Conv2D(4, 3))(i)),
    "lambda": ((5, 6), lambda i: layers.Lambda(lambda x: x[:, ::-1] * 2.0 + 1.0)(i)),
    "identity_reshape": ((5, 6), lambda i: layers.Reshape((-1, 3))(layers.Identity()(i))),
    "softmax_axis": ((5, 6), lambda i: layers.Softmax(axis=1)(i)),
    "relu_threshold": ((5, 6), lambda i: layers.ReLU(threshold=0.5, max_value=1.5)(i)),
    "global_pool_keepdims": ((4, 4, 3), lambda i: layers.GlobalAveragePooling2D(keepdims=True)(i)),
    "activations_more": ((6,), lambda i: layers.Concatenate()(
        [layers.Activation(a)(i) for a in ("softsign", "exponential", "log_softmax", "linear", "hard_silu",
                                           "leaky_relu", "tanh", "sigmoid", "relu")])),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_more_layers_match_keras(name):
    keras.utils.set_random_seed(0)
    shape, build = CASES[name]
    i = keras.Input(shape)
    model = keras.Model(i, build(i))
    x = (np.random.RandomState(1).rand(2, *shape) * 4 - 2).astype("float32")
    g = interop.trace(model, x)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)
    assert g.count_params() == model.count_params() or not model.count_params()
