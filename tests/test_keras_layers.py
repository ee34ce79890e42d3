"""One small functional model per layer converter, checked against Keras (rtol 1e-4, atol 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers  # noqa: E402

import interop  # noqa: E402

CASES = {
    "conv_transpose_same": ((8, 8, 3), lambda i: layers.Conv2DTranspose(4, 3, strides=2, padding="same")(i)),
    "conv_transpose_valid": ((8, 8, 3), lambda i: layers.Conv2DTranspose(4, 3, strides=2, padding="valid")(i)),
    "conv1d_causal_dilated": ((10, 3), lambda i: layers.Conv1D(4, 3, padding="causal", dilation_rate=2)(i)),
    "grouped_conv_strided": ((8, 8, 4), lambda i: layers.Conv2D(6, 3, groups=2, strides=2, padding="same")(i)),
    "conv3d": ((6, 6, 6, 2), lambda i: layers.Conv3D(3, 3, padding="same")(i)),
    "separable_conv1d": ((9, 3), lambda i: layers.SeparableConv1D(4, 3, padding="same")(i)),
    "upsampling_nearest": ((6, 6, 3), lambda i: layers.UpSampling2D(2)(i)),
    "upsampling_bilinear": ((6, 6, 3), lambda i: layers.UpSampling2D(2, interpolation="bilinear")(i)),
    "crop_global_max": ((8, 8, 3), lambda i: layers.GlobalMaxPooling2D()(layers.Cropping2D(((1, 2), (0, 1)))(i))),
    "average_pool1d_same": ((9, 3), lambda i: layers.AveragePooling1D(2, padding="same")(i)),
    "dot": ((5,), lambda i: layers.Dot(axes=1)([layers.Dense(3)(i), layers.Dense(3)(i)])),
    "permute_flatten_repeat": ((4, 3), lambda i: layers.RepeatVector(2)(layers.Flatten()(layers.Permute((2, 1))(i)))),
    "einsum_dense": ((4, 3), lambda i: layers.EinsumDense("abc,cd->abd", output_shape=(None, 5), bias_axes="d")(i)),
    "relu_clipped_leaky": ((6,), lambda i: layers.ReLU(max_value=2.0, negative_slope=0.1)(i)),
    "softmax": ((6,), lambda i: layers.Softmax()(i)),
    "activations": ((6,), lambda i: layers.Concatenate()(
        [layers.Activation(a)(i) for a in ("elu", "selu", "softplus", "hard_sigmoid", "mish", "gelu", "silu", "relu6")])),
    "layer_norm_rms": ((4, 6), lambda i: layers.LayerNormalization(rms_scaling=True)(i)),
    "masked_global_average": ((None,), lambda i: layers.GlobalAveragePooling1D()(layers.Embedding(10, 4, mask_zero=True)(i))),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_layer_converter_matches_keras(name):
    keras.utils.set_random_seed(0)
    shape, build = CASES[name]
    dtype = "int32" if shape == (None,) else "float32"
    i = keras.Input(shape, dtype=dtype)
    model = keras.Model(i, build(i))
    rs = np.random.RandomState(1)
    x = (
        rs.randint(0, 10, size=(2, 7)).astype("int32")
        if dtype == "int32"
        else (rs.rand(2, *shape) * 4 - 2).astype("float32")
    )
    g = interop.trace(model, x)
    report = interop.verify(model, g, x)
    assert report.ok, str(report)
    if model.count_params():  # parameter-free graphs count their constants; nothing to compare
        assert g.count_params() == model.count_params()
