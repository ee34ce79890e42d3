"""Signal ONNX ops: DFT and STFT as real matmuls with cos/sin matrices (no complex dtype)."""

from __future__ import annotations

import numpy as np

from . import normalize_axis, op


def _dft_last(xp, re, im, n, inverse, onesided):
    """DFT along the last axis of (re, im) (im may be None); returns (re, im)."""
    size = xp.shape(re)[-1]
    if size != n:  # dft_length: zero-pad or truncate the signal
        if size > n:
            re = xp.getitem(re, (Ellipsis, slice(0, n)))
            im = None if im is None else xp.getitem(im, (Ellipsis, slice(0, n)))
        else:
            pad = [(0, 0)] * (len(xp.shape(re)) - 1) + [(0, n - size)]
            re = xp.pad(re, pad)
            im = None if im is None else xp.pad(im, pad)
    bins = n // 2 + 1 if onesided else n
    angle = 2 * np.pi * np.outer(np.arange(n), np.arange(bins)) / n
    angle = angle if inverse else -angle
    dtype = xp.dtype(re)
    scale = 1.0 / n if inverse else 1.0
    cos = xp.asarray((np.cos(angle) * scale).astype(dtype), dtype, like=re)
    sin = xp.asarray((np.sin(angle) * scale).astype(dtype), dtype, like=re)
    out_re, out_im = xp.matmul(re, cos), xp.matmul(re, sin)
    if im is not None:  # (re + i im)(cos + i sin)
        out_re = xp.subtract(out_re, xp.matmul(im, sin))
        out_im = xp.add(out_im, xp.matmul(im, cos))
    return out_re, out_im


def _split_complex(xp, x):
    re = xp.getitem(x, (Ellipsis, 0))
    im = xp.getitem(x, (Ellipsis, 1)) if xp.shape(x)[-1] == 2 else None
    return re, im


@op("DFT")
def dft(xp, x, dft_length=None, axis=None, inverse=0, onesided=0):
    rank = len(xp.shape(x))
    # opset 20 takes axis as an input (default -2, counted with the complex dim); 17 as attribute 1
    axis = -2 if axis is None else int(np.asarray(xp.to_numpy(axis)).reshape(-1)[0])
    axis = normalize_axis(axis, rank)
    re, im = _split_complex(xp, x)
    order = [a for a in range(rank - 1) if a != axis] + [axis]
    re = xp.permute_dims(re, order)
    im = None if im is None else xp.permute_dims(im, order)
    n = xp.shape(x)[axis] if dft_length is None else int(np.asarray(xp.to_numpy(dft_length)))
    out_re, out_im = _dft_last(xp, re, im, n, inverse, onesided)
    back = list(np.argsort(order))
    return xp.stack([xp.permute_dims(out_re, back), xp.permute_dims(out_im, back)], -1)


@op("STFT")
def stft(xp, signal, frame_step, window=None, frame_length=None, onesided=1):
    step = int(np.asarray(xp.to_numpy(frame_step)))
    if frame_length is not None:
        length = int(np.asarray(xp.to_numpy(frame_length)))
    else:
        length = xp.shape(window)[0]
    frames = 1 + (xp.shape(signal)[1] - length) // step
    index = (np.arange(frames)[:, None] * step + np.arange(length)[None, :]).reshape(-1)
    framed = xp.take(signal, xp.asarray(index, np.int64, like=signal), 1)  # B, F*L, c
    batch, _, parts = xp.shape(signal)
    framed = xp.reshape(framed, [batch, frames, length, parts])
    re, im = _split_complex(xp, framed)
    if window is not None:
        re = xp.multiply(re, window)
        im = None if im is None else xp.multiply(im, window)
    out_re, out_im = _dft_last(xp, re, im, length, 0, onesided)
    return xp.stack([out_re, out_im], -1)
