"""keras.ops.image in subclassed models, checked against Keras (1e-5) at batch 2 and 3:
channels_last and channels_first, batched and single (rank-3) images, map_coordinates
(orders 0 and 1, every fill mode) and affine_transform (both interpolations, the fill
modes the backend has)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras import layers, ops  # noqa: E402

import interop  # noqa: E402
from interop.errors import UnsupportedOpError  # noqa: E402

# Each case maps images of shape (batch, 12, 10, 3) to one float32 tensor.
CASES = {
    "patches_valid": lambda x: ops.image.extract_patches(x, 4),
    "patches_rect": lambda x: ops.image.extract_patches(x, (3, 2)),
    "patches_strided_same": lambda x: ops.image.extract_patches(x, 3, strides=2, padding="same"),
    "patches_overlap_valid": lambda x: ops.image.extract_patches(x, (2, 3), strides=(1, 2)),
    "patches_dilated": lambda x: ops.image.extract_patches(x, 2, strides=1, dilation_rate=2),
    "grayscale": lambda x: ops.image.rgb_to_grayscale(x),
    "crop": lambda x: ops.image.crop_images(x, 2, 1, target_height=7, target_width=6),
    "crop_bottom_right": lambda x: ops.image.crop_images(x, 1, 2, bottom_cropping=3, right_cropping=1),
    "pad": lambda x: ops.image.pad_images(x, 1, 2, target_height=16, target_width=15),
    "pad_bottom_right": lambda x: ops.image.pad_images(x, 2, 0, bottom_padding=1, right_padding=3),
    "resize_bilinear_up": lambda x: ops.image.resize(x, (17, 23)),
    "resize_bilinear_down": lambda x: ops.image.resize(x, (5, 7)),
    "resize_nearest_up": lambda x: ops.image.resize(x, (17, 23), interpolation="nearest"),
    "resize_nearest_down": lambda x: ops.image.resize(x, (5, 7), interpolation="nearest"),
    "resize_nearest_int": lambda x: ops.image.resize(x, (24, 30), interpolation="nearest"),
}  # fmt: skip
_CF = lambda x: ops.transpose(x, (0, 3, 1, 2))  # noqa: E731
CASES.update({
    "patches_channels_first": lambda x: ops.image.extract_patches(_CF(x), 3, data_format="channels_first"),
    "grayscale_channels_first": lambda x: ops.image.rgb_to_grayscale(_CF(x), data_format="channels_first"),
    "crop_channels_first": lambda x: ops.image.crop_images(_CF(x), 2, 1, target_height=7, target_width=6, data_format="channels_first"),
    "pad_channels_first": lambda x: ops.image.pad_images(_CF(x), 1, 2, target_height=16, target_width=15, data_format="channels_first"),
    "resize_channels_first": lambda x: ops.image.resize(_CF(x), (5, 7), data_format="channels_first"),
    # one image (rank 3): the first of the batch, broadcast back over it
    "resize_single": lambda x: ops.image.resize(x[0], (5, 7)) + 0 * x[:, :5, :7],
    "patches_single": lambda x: ops.image.extract_patches(x[0], 2) + 0 * x[:, :6, :5, :1],
    "grayscale_single_cf": lambda x: ops.image.rgb_to_grayscale(_CF(x)[0], data_format="channels_first") + 0 * _CF(x)[:, :1],
})  # fmt: skip


class Net(keras.Model):
    def __init__(self, fn, **kwargs):
        super().__init__(**kwargs)
        self.fn = fn
        self.conv = layers.Conv2D(3, 1)

    def call(self, x):
        return self.fn(self.conv(x))


class Patches(layers.Layer):
    """The keras.io ViT (image classification with vision transformer) patch layer."""

    def __init__(self, patch_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = patch_size

    def call(self, images):
        input_shape = ops.shape(images)
        batch_size = input_shape[0]
        height, width, channels = input_shape[1], input_shape[2], input_shape[3]
        num_patches_h = height // self.patch_size
        num_patches_w = width // self.patch_size
        patches = ops.image.extract_patches(images, size=self.patch_size)
        patches = ops.reshape(
            patches,
            (
                batch_size,
                num_patches_h * num_patches_w,
                self.patch_size * self.patch_size * channels,
            ),
        )
        return patches


class PatchModel(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.patches = Patches(4)
        self.dense = layers.Dense(5)

    def call(self, x):
        patches = self.patches(x)
        patch_dims = 4 * 4 * 3
        flat = ops.reshape(patches, (ops.shape(x)[0], -1, patch_dims))
        return self.dense(flat)


def _check(model, shape):
    rs = np.random.RandomState(0)
    x = rs.rand(2, *shape).astype("float32")
    model(x)
    g = interop.trace(model, x)
    for batch in (2, 3):
        xx = rs.rand(batch, *shape).astype("float32")
        want = ops.convert_to_numpy(model(xx))
        got = g.run(xx)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    return g


@pytest.mark.parametrize("name", sorted(CASES))
def test_image_op(name):
    _check(Net(CASES[name]), (12, 10, 3))


def test_vit_patches_layer():
    g = _check(PatchModel(), (16, 12, 3))
    assert g.inputs[0].shape[0] == "batch"


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: ops.image.resize(x, (5, 7), interpolation="bicubic"),
        lambda x: ops.image.resize(x, (5, 7), antialias=True),
        lambda x: ops.image.resize(x, (5, 7), crop_to_aspect_ratio=True),
        lambda x: ops.image.extract_patches(x[:, :, :, :, None], (2, 2, 1)),
    ],
    ids=["bicubic", "antialias", "crop_to_aspect_ratio", "patches_3d"],
)
def test_unconverted_arguments_raise(fn):
    model = Net(fn)
    x = np.random.RandomState(0).rand(2, 12, 10, 3).astype("float32")
    model(x)
    with pytest.raises(UnsupportedOpError):
        interop.trace(model, x)


class AffineNet(keras.Model):
    """affine_transform with a transform computed per image, or one constant transform."""

    def __init__(self, transform=None, fill_value=0.0, **kwargs):
        super().__init__(**kwargs)
        self.transform, self.fill_value = transform, fill_value
        self.conv = layers.Conv2D(3, 1)
        self.dense = layers.Dense(8)

    def call(self, x):
        if self.transform is None:
            identity = ops.convert_to_tensor(np.asarray([1, 0, 0, 0, 1, 0, 0, 0], "float32"))
            transform = identity + 0.3 * self.dense(ops.mean(x, axis=(1, 2)))
        else:
            transform = np.asarray(self.transform, "float32")
        return ops.image.affine_transform(self.conv(x), transform, fill_value=self.fill_value)


@pytest.mark.parametrize(
    ("transform", "fill_value"),
    [
        (None, 0.0),
        (None, 0.7),
        ([0.9, 0.2, 1.3, -0.1, 1.1, -0.7, 0.01, -0.02], 0.0),
        ([1, 0, 2.5, 0, 1, -1.25, 0, 0], -1.0),
    ],
    ids=["per_image", "per_image_fill", "projective", "translate_fill"],
)
def test_affine_transform_bilinear(transform, fill_value):
    _check(AffineNet(transform, fill_value), (12, 10, 3))


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_resizing_layer(interpolation):
    """keras.layers.Resizing (keras_hub's DeepLabV3 and SegFormer use it) at batch 2 and 3."""
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, keras.layers.Resizing(5, 12, interpolation=interpolation)(inp))
    rng = np.random.default_rng(0)
    graph = interop.trace(model, rng.random((2, 8, 8, 3)).astype("float32"))
    for batch in (2, 3):
        x = rng.random((batch, 8, 8, 3)).astype("float32")
        report = interop.verify(model, graph, x, rtol=1e-4, atol=1e-5)
        assert report.ok, str(report)
    assert [n.op_type for n in graph.model.graph].count("Resize") == 1


def test_pooling_ops_in_a_custom_layer():
    """ops.average_pool / ops.max_pool (keras_hub's MobileNetV5 fuses scales with them)."""

    class Pools(layers.Layer):
        def call(self, x):
            return ops.average_pool(x, 2, 2, padding="valid") + ops.max_pool(
                x, (2, 2), 2, padding="same"
            )

    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, Pools(name="pools")(inp))
    rng = np.random.default_rng(0)
    graph = interop.trace(model, rng.random((2, 8, 8, 3)).astype("float32"))
    for batch in (2, 3):
        x = rng.random((batch, 8, 8, 3)).astype("float32")
        report = interop.verify(model, graph, x, rtol=1e-4, atol=1e-5)
        assert report.ok, str(report)
    ops_used = [n.op_type for n in graph.model.graph]
    assert "AveragePool" in ops_used and "MaxPool" in ops_used


# ---------------------------------------------------------------------------- affine, map_coordinates
class AffineModes(keras.Model):
    """affine_transform with a per-image transform that reads outside the image."""

    def __init__(self, interpolation, fill_mode, data_format="channels_last", **kwargs):
        super().__init__(**kwargs)
        self.options = {"interpolation": interpolation, "fill_mode": fill_mode}
        self.data_format = data_format
        self.conv = layers.Conv2D(3, 1)
        self.dense = layers.Dense(8)

    def call(self, x):
        base = np.asarray([1.2, 0.3, -2.7, -0.2, 1.1, 3.1, 0.002, -0.003], "float32")
        # the projective terms stay fixed: near k = 0 a coordinate of 60 keeps float32
        # precision of 4e-6 only, and both sides then differ by more than the tolerance
        affine = np.asarray([0.2] * 6 + [0.0] * 2, "float32")
        transform = ops.convert_to_tensor(base) + self.dense(ops.mean(x, axis=(1, 2))) * affine
        y = self.conv(x)
        if self.data_format == "channels_first":
            y = ops.transpose(y, (0, 3, 1, 2))
        return ops.image.affine_transform(
            y, transform, fill_value=0.4, data_format=self.data_format, **self.options
        )


AFFINE_MODES = ["constant", "nearest", "wrap", "reflect"]


@pytest.mark.parametrize("fill_mode", AFFINE_MODES)
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_affine_transform_modes(interpolation, fill_mode):
    keras.utils.set_random_seed(0)
    _check(AffineModes(interpolation, fill_mode), (12, 10, 3))


def test_affine_transform_channels_first_and_single_image():
    _check(AffineModes("bilinear", "reflect", "channels_first"), (12, 10, 3))
    transform = np.asarray([0.9, 0.1, 1.5, -0.1, 1.0, -0.5, 0, 0], "float32")
    single = Net(lambda x: ops.image.affine_transform(x[0], transform) + 0 * x)
    _check(single, (12, 10, 3))


class MapNet(keras.Model):
    """map_coordinates of the first image at coordinates that reach outside it."""

    def __init__(self, order, fill_mode, **kwargs):
        super().__init__(**kwargs)
        self.order, self.fill_mode = order, fill_mode
        self.conv = layers.Conv2D(3, 1)
        rs = np.random.RandomState(1)
        high = np.asarray([12, 10, 3], "float32")[:, None, None]
        self.coords = (rs.rand(3, 7, 5).astype("float32") * (high + 6) - 3).astype("float32")

    def call(self, x):
        image = self.conv(x)[0]  # (12, 10, 3): a static shape, as the fill modes need
        shift = ops.mean(x) * 0.01
        out = ops.image.map_coordinates(
            image, self.coords + shift, self.order, fill_mode=self.fill_mode, fill_value=0.3
        )
        return ops.expand_dims(out, 0) + ops.mean(x, axis=(1, 2, 3))[:, None, None]


@pytest.mark.parametrize("fill_mode", ["constant", "nearest", "wrap", "mirror", "reflect"])
@pytest.mark.parametrize("order", [0, 1])
def test_map_coordinates(order, fill_mode):
    model = MapNet(order, fill_mode)
    x = np.random.RandomState(0).rand(2, 12, 10, 3).astype("float32")
    try:
        model(x)
    except Exception as err:  # Keras's TF mirror can index past the end
        pytest.skip(f"Keras itself fails: {type(err).__name__}")
    _check(model, (12, 10, 3))


def test_map_coordinates_of_an_integer_image_and_a_dynamic_shape():
    class Ints(keras.Model):
        def call(self, x):
            image = ops.cast(ops.reshape(ops.arange(24), (4, 6)), "int32")
            coords = ops.stack([ops.mean(x, axis=1)[:2] * 3, ops.mean(x, axis=1)[2:4] * 5])
            return ops.image.map_coordinates(image, coords, 1, fill_mode="nearest") + 0 * ops.cast(
                x[:1, :1], "int32"
            )

    model = Ints()
    x = np.random.RandomState(0).rand(4, 3).astype("float32")
    model(x)
    g = interop.trace(model, x, dynamic_batch=False)
    np.testing.assert_array_equal(g.run(x), ops.convert_to_numpy(model(x)))
    dynamic = Net(lambda x: ops.image.map_coordinates(x, ops.zeros((4, 2)), 0))
    x = np.random.RandomState(0).rand(2, 12, 10, 3).astype("float32")
    dynamic(x)
    with pytest.raises(UnsupportedOpError, match="static shape"):
        interop.trace(dynamic, x)
