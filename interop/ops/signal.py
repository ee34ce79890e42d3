"""Signal ONNX ops: DFT and STFT as real matmuls with cos/sin matrices (no complex dtype)."""

from __future__ import annotations

import numpy as np

from . import normalize_axis, op


def _fit(xp, x, n):
    """x zero-padded or truncated to n along its last axis (None stays None)."""
    size = None if x is None else xp.shape(x)[-1]
    if x is None or size == n:
        return x
    if size > n:
        return xp.getitem(x, (Ellipsis, slice(0, n)))
    return xp.pad(x, [(0, 0)] * (len(xp.shape(x)) - 1) + [(0, n - size)])


def _angles(n, rows, columns, inverse):
    # k * t reduced mod n before scaling: exact angles for long transforms
    angle = 2 * np.pi * (np.outer(np.arange(rows), np.arange(columns)) % n) / n
    return angle if inverse else -angle


def _matrix(xp, values, like):
    return xp.asarray(values.astype(xp.dtype(like)), xp.dtype(like), like=like)


def _dft_last(xp, re, im, n, inverse, onesided):
    """DFT along the last axis of (re, im) (im may be None); returns (re, im)."""
    re, im = _fit(xp, re, n), _fit(xp, im, n)  # dft_length: zero-pad or truncate the signal
    angle = _angles(n, n, n // 2 + 1 if onesided else n, inverse)
    scale = 1.0 / n if inverse else 1.0
    cos, sin = _matrix(xp, np.cos(angle) * scale, re), _matrix(xp, np.sin(angle) * scale, re)
    out_re, out_im = xp.matmul(re, cos), xp.matmul(re, sin)
    if im is not None:  # (re + i im)(cos + i sin)
        out_re = xp.subtract(out_re, xp.matmul(im, sin))
        out_im = xp.add(out_im, xp.matmul(im, cos))
    return out_re, out_im


def _irfft_last(xp, re, im, n):
    """Real inverse DFT of length n from the one-sided spectrum along the last axis (numpy's
    irfft: bins past n // 2 are dropped, missing ones are zeros, the rest mirror as conjugates)."""
    bins = n // 2 + 1
    re, im = _fit(xp, re, bins), _fit(xp, im, bins)
    # each bin but DC (and Nyquist for even n) stands for itself and its conjugate mirror
    weight = np.full(bins, 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    angle = _angles(n, bins, n, True)
    cos = _matrix(xp, np.cos(angle) * weight[:, None] / n, re)
    out = xp.matmul(re, cos)
    if im is not None:  # Re((re + i im)(cos + i sin)) = re cos - im sin
        sin = _matrix(xp, np.sin(angle) * weight[:, None] / n, re)
        out = xp.subtract(out, xp.matmul(im, sin))
    return out


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
    back = list(np.argsort(order))
    size = xp.shape(x)[axis]
    if inverse and onesided:  # the inverse of a real DFT: a one-sided spectrum to a real signal
        n = 2 * (size - 1) if dft_length is None else int(np.asarray(xp.to_numpy(dft_length)))
        out = xp.permute_dims(_irfft_last(xp, re, im, n), back)
        return xp.reshape(out, [*xp.shape(out), 1])
    n = size if dft_length is None else int(np.asarray(xp.to_numpy(dft_length)))
    out_re, out_im = _dft_last(xp, re, im, n, inverse, onesided)
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
