"""FFTs and the complex values they make, inside a captured graph.

ONNX Runtime has no complex tensor kernels, but ONNX ``DFT`` works on real tensors whose
last axis holds (real, imaginary) pairs. A complex64 value of the jaxpr is therefore a
float32 ONNX value of shape ``shape + [2]``; the converters here know that layout:
``fft`` (FFT / IFFT / RFFT / IRFFT over one or more trailing axes), ``real``, ``imag``,
``complex``, ``conj``, ``abs``, ``add`` / ``sub`` / ``mul`` of complex values,
``convert_element_type`` to complex and ``pad`` (jnp's zero padding of spectra). The
graph's inputs and outputs stay real: a spectrum is returned through ``abs`` /
``real`` / ``imag`` / ``angle`` or an inverse transform. Any other primitive meeting a
complex value writes a node whose declared complex type the capture-time check rejects,
naming that primitive and line.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import CAPTURE_PRIMITIVES
from . import register_primitive as reg
from .capture_lowering import is_static


def _is_complex(aval) -> bool:
    return np.dtype(aval.dtype).kind == "c"


def _typed(low, value, aval):
    """Type a pair value: float32 (float64 for complex128) with a trailing axis of 2."""
    real = np.float64 if np.dtype(aval.dtype) == np.complex128 else np.float32
    value.dtype = ir.DataType.from_numpy(np.dtype(real))
    dims = [int(d) if is_static(d) else ir.SymbolicDim(str(d)) for d in aval.shape]
    value.shape = ir.Shape([*dims, 2])
    return value


def _part(low, pair, index):
    return low.op("Squeeze", [low.op("Slice", [pair, low.ints([index]), low.ints([index + 1]),
                                               low.ints([-1])]), low.ints([-1])])  # fmt: skip


def _pair(low, re, im):
    return low.op("Concat", [low.op("Unsqueeze", [re, low.ints([-1])]),
                             low.op("Unsqueeze", [im, low.ints([-1])])], {"axis": -1})  # fmt: skip


def _to_pair(low, x, aval):
    if _is_complex(aval):
        return x
    if np.dtype(aval.dtype).kind != "f":
        x = low.cast(x, np.float32)
    return _pair(low, x, low.op("Mul", [x, low.const(0.0, np.float32)]))


def _conj(low, pair):
    return low.op("Mul", [pair, low.const(np.array([1.0, -1.0], np.float32))])


# ---------------------------------------------------------------------- fft
_FFT, _IFFT, _RFFT, _IRFFT = 0, 1, 2, 3


def _kind(fft_type) -> int:
    name = str(getattr(fft_type, "name", fft_type)).upper()
    for value, key in ((_IRFFT, "IRFFT"), (_RFFT, "RFFT"), (_IFFT, "IFFT"), (_FFT, "FFT")):
        if name == key or name.endswith("." + key) or name == str(value):
            return value
    return int(fft_type)


def _dft(low, pair, axis, inverse=False):
    return low.op("DFT", [pair], {"axis": axis, "inverse": int(inverse), "onesided": 0})


def _flip_tail(low, pair, axis, n_out):
    """conj(X[1 : n - m + 1][::-1]): the negative frequencies a onesided spectrum omits."""
    m = n_out - n_out // 2 - 1
    if m <= 0:
        return None
    big = np.iinfo(np.int64).max
    tail = low.op("Slice", [pair, low.ints([1]), low.ints([m + 1]), low.ints([axis])])
    tail = low.op("Slice", [tail, low.ints([-1]), low.ints([-big]), low.ints([axis]),
                            low.ints([-1])])  # fmt: skip
    return _conj(low, tail)


@reg("fft")
def convert_fft(low, eqn, x):
    kind = _kind(eqn.params["fft_type"])
    lengths = [int(n) for n in eqn.params["fft_lengths"]]
    in_aval, out_aval = eqn.invars[0].aval, eqn.outvars[0].aval
    rank = len(in_aval.shape)
    axes = list(range(rank - len(lengths), rank))
    if kind == _RFFT:
        pair = low.op("Unsqueeze", [x, low.ints([-1])])
        last = axes[-1]
        y = low.op("DFT", [pair], {"axis": last, "inverse": 0, "onesided": 1})
        for axis in axes[:-1]:
            y = _dft(low, y, axis)
        return _typed(low, y, out_aval)
    if kind in (_FFT, _IFFT):
        y = x
        for axis in axes:
            y = _dft(low, y, axis, inverse=kind == _IFFT)
        return _typed(low, y, out_aval)
    # IRFFT: full complex inverses over the leading axes, then the last axis rebuilt from
    # its onesided half (Hermitian symmetry) and inverted; the result is its real part
    y = x
    for axis in axes[:-1]:
        y = _dft(low, y, axis, inverse=True)
    last, n = axes[-1], lengths[-1]
    half = n // 2 + 1
    y = low.op("Slice", [y, low.ints([0]), low.ints([half]), low.ints([last])])
    tail = _flip_tail(low, y, last, n)
    if tail is not None:
        y = low.op("Concat", [y, tail], {"axis": last})
    return _part(low, _dft(low, y, last, inverse=True), 0)


# ---------------------------------------------------------------------- complex arithmetic
@reg("real")
def convert_real(low, eqn, x):
    return _part(low, x, 0)


@reg("imag")
def convert_imag(low, eqn, x):
    return _part(low, x, 1)


@reg("complex")
def convert_complex(low, eqn, re, im):
    return _typed(low, _pair(low, re, im), eqn.outvars[0].aval)


@reg("conj")
def convert_conj(low, eqn, x, *rest):
    return _typed(low, _conj(low, _to_pair(low, x, eqn.invars[0].aval)), eqn.outvars[0].aval)


def _complex_aware(name, on_complex):
    """Replace `name`'s converter by one that handles complex operands, else defers."""
    original = CAPTURE_PRIMITIVES.get(name)

    def convert(low, eqn, *xs):
        if any(_is_complex(v.aval) for v in eqn.invars) or _is_complex(eqn.outvars[0].aval):
            return on_complex(low, eqn, *xs)
        return original(low, eqn, *xs)

    reg(name, convert, replace=True)


def _abs(low, eqn, x):
    square = low.op("Mul", [x, x])
    return low.op("Sqrt", [low.op("ReduceSum", [square, low.ints([-1])], {"keepdims": 0})])


def _pairs(low, eqn, *xs):
    return [_to_pair(low, x, v.aval) for x, v in zip(xs, eqn.invars, strict=True)]


def _add(op_type):
    def convert(low, eqn, a, b):
        a, b = _pairs(low, eqn, a, b)
        return _typed(low, low.op(op_type, [a, b]), eqn.outvars[0].aval)

    return convert


def _mul(low, eqn, a, b):
    a, b = _pairs(low, eqn, a, b)
    ar, ai, br, bi = _part(low, a, 0), _part(low, a, 1), _part(low, b, 0), _part(low, b, 1)
    re = low.op("Sub", [low.op("Mul", [ar, br]), low.op("Mul", [ai, bi])])
    im = low.op("Add", [low.op("Mul", [ar, bi]), low.op("Mul", [ai, br])])
    return _typed(low, _pair(low, re, im), eqn.outvars[0].aval)


def _convert(low, eqn, x):
    out = eqn.outvars[0].aval
    if _is_complex(out):
        return _typed(low, low.op("Identity", [_to_pair(low, x, eqn.invars[0].aval)]), out)
    return low.cast(_part(low, x, 0), out.dtype)  # complex -> real keeps the real part


def _pad(low, eqn, x, value):
    config = list(eqn.params["padding_config"]) + [(0, 0, 0)]
    if any(interior or not is_static(lo) or not is_static(hi) or lo < 0 or hi < 0
           for lo, hi, interior in config):  # fmt: skip
        original = CAPTURE_PRIMITIVES.get("pad")
        return original(low, eqn, x, value)
    pads = [int(lo) for lo, _, _ in config] + [int(hi) for _, hi, _ in config]
    fill = _part(low, _to_pair(low, value, eqn.invars[1].aval), 0)
    y = low.op("Pad", [x, low.ints(pads), fill], {"mode": "constant"})
    return _typed(low, y, eqn.outvars[0].aval)


_complex_aware("abs", _abs)
_complex_aware("add", _add("Add"))
_complex_aware("add_any", _add("Add"))
_complex_aware("sub", _add("Sub"))
_complex_aware("mul", _mul)
_complex_aware("convert_element_type", _convert)
_complex_aware("pad", _pad)
