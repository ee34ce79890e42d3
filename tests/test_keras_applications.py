"""keras.applications (weights=None, small inputs) traced natively and checked against Keras.

Numerics: outputs are logits (``classifier_activation=None``) compared with
``model(x)`` at rtol 1e-4; the absolute tolerance scales with the logits' magnitude
(1e-5 of the largest), since random-weight networks produce logits far from 1.
"""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import interop  # noqa: E402

APPS = {
    "MobileNetV2": 96,
    "ResNet50": 64,
    "EfficientNetB0": 64,
    "DenseNet121": 64,
    "ConvNeXtTiny": 64,
    "InceptionV3": 75,
    "NASNetMobile": 64,
}
FAST = {"MobileNetV2"}


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in APPS]
)
def test_application_matches_keras(name):
    size = APPS[name]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
    )
    x = np.random.RandomState(0).rand(2, size, size, 3).astype("float32") * 255
    g = interop.trace(model, x)
    expected = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    atol = 1e-5 * float(np.abs(expected).max())
    report = interop.verify(model, g, x, rtol=1e-4, atol=atol)
    assert report.ok, str(report)
    np.testing.assert_allclose(g.run(x), expected, rtol=1e-4, atol=atol)
    assert g.count_params() == model.count_params()
    layer_paths = {la.path for la in g.layers}
    assert {layer.name for layer in model.layers} <= layer_paths
