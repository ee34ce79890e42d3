"""Converters for ``keras.ops.image`` operations met inside subclassed models and layers.

Channels-last images of rank 4 ``(batch, height, width, channels)`` with a static
height, width and channel count; the batch stays dynamic. Covered: ``extract_patches``
(a Conv with an identity kernel, as Keras computes it), ``rgb_to_grayscale``,
``crop_images`` / ``pad_images`` (static offsets) and ``resize`` (bilinear / nearest,
no antialias, no crop or pad to the aspect ratio) as ONNX ``Resize`` with the
coordinate mode of ``tf.image.resize`` (half-pixel centres), and ``affine_transform``
(bilinear, constant fill) as ``GridSample``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from interop.errors import UnsupportedOpError

from . import capture_ops_sampling, register_layer, register_op
from .capture_conv import padding_attrs
from .capture_lowering import Builder, Tensor
from .capture_ops import value


def _unsupported(op: Any, detail: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        f"keras.ops.image.{type(op).__name__}", adapter="keras", detail=detail
    )


def _image(b: Builder, op: Any, x: Any) -> tuple[Tensor, Callable[[ir.Value], ir.Value]]:
    """The images as a batched channels_last Tensor with static height, width and
    channels, and the function that gives a result of that layout the op's own (an
    unbatched ``(h, w, c)`` image is a batch of one; channels_first is transposed)."""
    first = getattr(op, "data_format", "channels_last") == "channels_first"
    if not isinstance(x, Tensor) or x.rank not in (3, 4):
        raise _unsupported(op, "only images of rank 3 (one image) or 4 (a batch)")
    v, shape, single = x.value, tuple(x.shape), x.rank == 3
    if single:
        v, shape = b.op("Unsqueeze", [v, b.ints([0])]), (1, *shape)
    if first:
        v, shape = b.transpose(v, [0, 2, 3, 1]), (shape[0], shape[2], shape[3], shape[1])
    if any(d is None for d in shape[1:]):
        raise _unsupported(op, "only images with a static height, width and channel count")

    def back(y: ir.Value) -> ir.Value:
        if first:
            y = b.transpose(y, [0, 3, 1, 2])
        return b.op("Squeeze", [y, b.ints([0])]) if single else y

    return Tensor(v, shape, x.dtype), back


def _pair(v: Any) -> list[int]:
    return [int(i) for i in v] if isinstance(v, list | tuple) else [int(v)] * 2


@register_op("ExtractPatches")
def import_extract_patches(b: Builder, op: Any, images: Any) -> ir.Value:
    x, back = _image(b, op, images)
    if op.is_3d:
        raise _unsupported(op, "3D patches are not converted")
    (ph, pw), strides = _pair(op.size), _pair(op.strides or op.size)
    dilation, channels = _pair(op.dilation_rate), int(x.shape[-1])
    out_dim = ph * pw * channels
    # Keras: conv with eye(out_dim) reshaped to (ph, pw, c, out_dim) (HWIO) -> OIHW.
    kernel = np.eye(out_dim, dtype=np.dtype(x.dtype)).reshape(ph, pw, channels, out_dim)
    weight = b.const(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    attrs = {
        "kernel_shape": [ph, pw],
        "strides": strides,
        "dilations": dilation,
        **padding_attrs(x, str(op.padding).lower(), [ph, pw], strides, dilation),
    }
    y = b.op("Conv", [b.to_channels_first(x.value, 4), weight], attrs)
    return back(b.to_channels_last(y, 4))


@register_op("RGBToGrayscale")
def import_rgb_to_grayscale(b: Builder, op: Any, images: Any) -> ir.Value:
    x, back = _image(b, op, images)
    if x.shape[-1] != 3 or x.dtype not in ("float32", "float64", "float16"):
        raise _unsupported(op, "only float images with 3 channels are converted")
    weights = b.const(np.asarray([[0.2989], [0.5870], [0.1140]], dtype=np.dtype(x.dtype)))
    return back(b.op("MatMul", [x.value, weights]))


@register_op("CropImages")
def import_crop_images(b: Builder, op: Any, images: Any) -> ir.Value:
    x, back = _image(b, op, images)
    height, width = x.shape[1], x.shape[2]
    top, bottom = op.top_cropping, op.bottom_cropping
    left, right = op.left_cropping, op.right_cropping
    th, tw = op.target_height, op.target_width
    # Same inference as keras.src.ops.image._crop_images.
    if top is None:
        top = height - th - bottom
    if th is None:
        th = height - bottom - top
    if left is None:
        left = width - tw - right
    if tw is None:
        tw = width - right - left
    top, left, th, tw = int(top), int(left), int(th), int(tw)
    if min(top, left) < 0 or th <= 0 or tw <= 0 or top + th > height or left + tw > width:
        raise _unsupported(op, "the crop does not fit the image")
    ends = b.ints([top + th, left + tw])
    return back(b.op("Slice", [x.value, b.ints([top, left]), ends, b.ints([1, 2])]))


@register_op("PadImages")
def import_pad_images(b: Builder, op: Any, images: Any) -> ir.Value:
    x, back = _image(b, op, images)
    height, width = x.shape[1], x.shape[2]
    top, bottom = op.top_padding, op.bottom_padding
    left, right = op.left_padding, op.right_padding
    th, tw = op.target_height, op.target_width
    # Same inference as keras.src.ops.image._pad_images.
    if top is None:
        top = th - bottom - height
    if bottom is None:
        bottom = th - top - height
    if left is None:
        left = tw - right - width
    if right is None:
        right = tw - left - width
    pads = [int(p) for p in (top, left, bottom, right)]
    if min(pads) < 0:
        raise _unsupported(op, "negative padding")
    top, left, bottom, right = pads
    zero = value(b, 0.0, x.dtype)
    return back(b.op("Pad", [x.value, b.ints([0, top, left, 0, 0, bottom, right, 0]), zero]))


_RESIZE = {
    # tf.image.resize (TF2): half-pixel centres for both. Nearest takes
    # floor((i + 0.5) * in / out), which is ONNX half_pixel + round_prefer_ceil.
    "bilinear": {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
    "nearest": {
        "mode": "nearest",
        "coordinate_transformation_mode": "half_pixel",
        "nearest_mode": "round_prefer_ceil",
    },
}


@register_op("Resize")
def import_resize(b: Builder, op: Any, images: Any) -> ir.Value:
    x, back = _image(b, op, images)
    if op.interpolation not in _RESIZE:
        raise _unsupported(op, f"interpolation={op.interpolation!r} is not converted")
    if op.antialias or op.crop_to_aspect_ratio or op.pad_to_aspect_ratio:
        raise _unsupported(op, "antialias / crop_to_aspect_ratio / pad_to_aspect_ratio")
    if x.dtype not in ("float32", "float64", "float16"):
        raise _unsupported(op, "only float images are converted")
    height, width = (int(s) for s in op.size)
    # Full NHWC sizes with the batch and channels read at run time (the batch stays
    # dynamic). Not Resize-18's `axes=[1, 2]`: ONNX Runtime 1.32 refuses that on a 1x1
    # image ("Number of elements of input 'sizes' (0)", keras_hub DeepLabV3's pooling).
    shape = b.op("Shape", [x.value])
    batch = b.op("Slice", [shape, b.ints([0]), b.ints([1])])
    channels = b.op("Slice", [shape, b.ints([3]), b.ints([4])])
    sizes = b.op("Concat", [batch, b.ints([height, width]), channels], {"axis": 0})
    return back(b.op("Resize", [x.value, None, None, sizes], dict(_RESIZE[op.interpolation])))


@register_layer("Resizing")
def import_resizing(b: Builder, layer: Any, images: Any, **_: Any) -> ir.Value:
    """The Resizing layer: ``ops.image.resize`` to (height, width) with its options."""
    op = types.SimpleNamespace(
        size=(layer.height, layer.width),
        interpolation=layer.interpolation,
        antialias=getattr(layer, "antialias", False),
        crop_to_aspect_ratio=layer.crop_to_aspect_ratio,
        pad_to_aspect_ratio=layer.pad_to_aspect_ratio,
        data_format=layer.data_format,
    )
    return import_resize(b, op, images)


@register_op("AffineTransform")
def import_affine_transform(b: Builder, op: Any, images: Any, transform: Any) -> ir.Value:
    """ImageProjectiveTransformV3 on the pixel coordinates of each output pixel.

    Output pixel (x, y) reads the input at ((a0 x + a1 y + a2) / k, (a3 x + a4 y + a5) / k),
    k = a6 x + a7 y + 1, in pixel units. Bilinear with a constant fill is GridSample
    (``align_corners=1``, zero padding, a non-zero fill added where the interpolation
    weights fall outside the image); nearest and the other fill modes gather the
    neighbours (capture_ops_sampling.py) with the backend's rules: TensorFlow maps the
    coordinate into the image first, JAX / torch map each neighbour's index.
    """
    x, back = _image(b, op, images)
    if op.interpolation not in ("bilinear", "nearest"):
        raise _unsupported(op, f"interpolation={op.interpolation!r} is not converted")
    if x.dtype != "float32":
        raise _unsupported(op, "only float32 images are converted")
    height, width = int(x.shape[1]), int(x.shape[2])
    t = value(b, transform)
    t = b.op("Reshape", [b.op("Cast", [t], {"to": ir.DataType.FLOAT}), b.ints([-1, 8])])
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    points = np.stack([xs.ravel(), ys.ravel(), np.ones(height * width)]).astype(np.float32)
    affine = b.op("Reshape", [b.op("Slice", [t, b.ints([0]), b.ints([6]), b.ints([1])]),
                              b.ints([-1, 2, 3])])  # fmt: skip
    num = b.op("MatMul", [affine, b.const(points)])  # (batch, 2, h*w): x, y
    proj = b.op("Reshape", [b.op("Slice", [t, b.ints([6]), b.ints([8]), b.ints([1])]),
                            b.ints([-1, 1, 2])])  # fmt: skip
    k = b.op("Add", [b.op("MatMul", [proj, b.const(points[:2])]), b.const(np.float32(1.0))])
    coords = b.op("Div", [num, k])
    # One transform (shape (8,) or (1, 8)) applies to every image, as in TensorFlow.
    batch = b.op("Slice", [b.op("Shape", [x.value]), b.ints([0]), b.ints([1])])
    coords = b.op("Expand", [coords, b.op("Concat", [batch, b.ints([2, height * width])], {"axis": 0})])  # fmt: skip
    if op.interpolation == "bilinear" and op.fill_mode == "constant" and min(height, width) > 1:
        return back(_grid_sample(b, x, coords, batch, float(op.fill_value)))
    try:
        y = capture_ops_sampling.affine_gather(
            b, x, coords, op.interpolation, op.fill_mode, float(op.fill_value)
        )
    except ValueError as err:
        raise _unsupported(op, str(err)) from None
    return back(y)


def _grid_sample(b: Builder, x: Tensor, coords: ir.Value, batch: ir.Value, fill: float) -> ir.Value:
    height, width = int(x.shape[1]), int(x.shape[2])
    # Pixel -> [-1, 1] with align_corners=1: 2 * p / (size - 1) - 1.
    scale = b.const(np.asarray([[2.0 / (width - 1)], [2.0 / (height - 1)]], dtype=np.float32))
    grid = b.op("Sub", [b.op("Mul", [coords, scale]), b.const(np.float32(1.0))])
    grid = b.op("Reshape", [b.transpose(grid, [0, 2, 1]), b.ints([-1, height, width, 2])])
    attrs = {"mode": "bilinear", "padding_mode": "zeros", "align_corners": 1}
    y = b.op("GridSample", [b.to_channels_first(x.value, 4), grid], attrs)
    if fill != 0.0:
        ones = b.op("Expand", [b.const(np.ones((1, 1, height, width), np.float32)),
                               b.op("Concat", [batch, b.ints([1, height, width])], {"axis": 0})])  # fmt: skip
        inside = b.op("GridSample", [ones, grid], attrs)
        outside = b.op("Sub", [b.const(np.float32(1.0)), inside])
        y = b.op("Add", [y, b.op("Mul", [outside, b.const(np.float32(fill))])])
    return b.to_channels_last(y, 4)
