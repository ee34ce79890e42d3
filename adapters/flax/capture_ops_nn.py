"""Converters for the weighted and windowed primitives: dot_general, convolution and
pooling windows (gathers and scatters: capture_ops_index.py).

Weights keep their Flax layout (an HWIO conv kernel stays HWIO under its state name);
the layout change to ONNX's OIHW is a Transpose on the initializer, which ONNX Runtime
folds once at session creation. This keeps every parameter named and shaped exactly
as in the nnx state / linen variables.
"""

from __future__ import annotations

import string

import numpy as np

from interop.errors import UnsupportedOpError

from . import register_primitive as reg


def _unsupported(low, what: str, fix: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        low.primitive, adapter="flax", layer=low.scope, location=low.location, detail=what, fix=fix
    )


def _finish_dtype(low, eqn, y):
    want = eqn.params.get("preferred_element_type") or eqn.outvars[0].aval.dtype
    if want is not None and np.dtype(want) != np.dtype(eqn.invars[0].aval.dtype):
        return low.cast(y, want)
    return y


def _matmul_dtype(out_dtype):
    """The dtype a MatMul computes `out_dtype` results in on ONNX Runtime's CPU kernels."""
    out = np.dtype(out_dtype)
    if out.name in ("float32", "float64", "int32", "int64", "uint32", "uint64"):
        return out
    if out.kind == "f" or out.name == "bfloat16":  # XLA's CPU dot accumulates those in f32 too
        return np.dtype(np.float32)
    return np.dtype(np.int64) if out.kind == "u" else np.dtype(np.int32)


@reg("dot_general")
def convert_dot_general(low, eqn, a, b):
    """Operands of other dtypes than the result (int8 x int8 -> int32, bf16 -> f32, an int
    mask times floats) are cast to the dtype the product is computed in first, so the
    MatMul / Einsum always sees one dtype ONNX Runtime has a kernel for."""
    out = np.dtype(eqn.outvars[0].aval.dtype)
    compute = _matmul_dtype(out)
    if np.dtype(eqn.invars[0].aval.dtype) != compute:
        a = low.cast(a, compute)
    if np.dtype(eqn.invars[1].aval.dtype) != compute:
        b = low.cast(b, compute)
    y = _dot_general(low, eqn, a, b)
    return y if compute == out else low.cast(y, out)


def _dot_general(low, eqn, a, b):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    ra, rb_rank = len(eqn.invars[0].aval.shape), len(eqn.invars[1].aval.shape)
    lc, rc, lb, rb = list(lc), list(rc), list(lb), list(rb)
    k = len(lb)
    # The MatMul patterns (dense layers, batched attention products) read better and run
    # faster than Einsum; everything else is an Einsum, which is exact for any numbers.
    leading = lb == rb == list(range(k))
    if leading and lc == [ra - 1] and rb_rank == k + 2 and rc == [k] and ra >= k + 1:
        if k == 0 or ra == k + 2:
            return low.op("MatMul", [a, b])
    if leading and lc == [ra - 1] and rb_rank == k + 2 and rc == [k + 1] and ra == k + 2:
        perm = list(range(k)) + [k + 1, k]
        bt = low.op("Transpose", [b], {"perm": perm})
        return low.op("MatMul", [a, bt])
    general = _general_matmul(low, eqn, a, b, lc, rc, lb, rb)
    if general is not None:
        return general
    letters = iter(string.ascii_letters)
    la = [next(letters) for _ in range(ra)]
    lb_letters = [None] * rb_rank
    for i, j in zip(lb, rb, strict=False):
        lb_letters[j] = la[i]
    for i, j in zip(lc, rc, strict=False):
        lb_letters[j] = la[i]
    lb_letters = [c or next(letters) for c in lb_letters]
    free_a = [la[i] for i in range(ra) if i not in lb and i not in lc]
    free_b = [lb_letters[j] for j in range(rb_rank) if j not in rb and j not in rc]
    out = [la[i] for i in lb] + free_a + free_b
    equation = f"{''.join(la)},{''.join(lb_letters)}->{''.join(out)}"
    return low.op("Einsum", [a, b], {"equation": equation})


def _general_matmul(low, eqn, a, b, lc, rc, lb, rb):
    """Any dot_general as Transpose + Reshape + one batched MatMul + Reshape.

    ONNX Runtime's MatMul is several times faster than its Einsum on attention-shaped
    products (measured in benchmarks/bench_flax.py), so Einsum is only the fallback
    for contractions over symbolic dims.
    """
    sa, sb = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    free_a = [i for i in range(len(sa)) if i not in lb and i not in lc]
    free_b = [j for j in range(len(sb)) if j not in rb and j not in rc]
    contract = [sa[i] for i in lc]
    if not all(isinstance(d, int) for d in contract):
        return None
    k = int(np.prod(contract, dtype=np.int64))
    nb = len(lb)
    perm_a, perm_b = lb + free_a + lc, rb + rc + free_b
    if perm_a != list(range(len(sa))):
        a = low.op("Transpose", [a], {"perm": perm_a})
    if perm_b != list(range(len(sb))):
        b = low.op("Transpose", [b], {"perm": perm_b})
    # Reshape's 0 copies the (possibly symbolic) batch dims; -1 folds the free dims.
    a = low.op("Reshape", [a, low.ints([0] * nb + [-1, k])])
    b = low.op("Reshape", [b, low.ints([0] * nb + [k, -1])])
    y = low.op("MatMul", [a, b])
    return low.op("Reshape", [y, low.shape(eqn.outvars[0].aval.shape)])


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


@reg("conv_general_dilated")
def convert_conv(low, eqn, x, w):
    p = eqn.params
    if p["batch_group_count"] != 1:
        raise _unsupported(low, "batch_group_count > 1", "use feature groups instead")
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    x = low.op("Transpose", [x], {"perm": list(lhs_spec)})
    if any(d != 1 for d in p["lhs_dilation"]):  # a transposed (fractionally strided) conv
        spatial = [eqn.invars[0].aval.shape[i] for i in lhs_spec[2:]]
        x = _dilate(low, x, spatial, list(p["lhs_dilation"]))
    w = low.op("Transpose", [w], {"perm": list(rhs_spec)})
    pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
    if any(v < 0 for v in pads):
        raise _unsupported(low, "negative padding", "crop the input before the convolution")
    attrs = {
        "strides": list(p["window_strides"]),
        "pads": pads,
        "dilations": list(p["rhs_dilation"]),
        "group": int(p["feature_group_count"]),
    }
    y = low.op("Conv", [x, w], attrs)
    y = low.op("Transpose", [y], {"perm": _inverse(list(out_spec))})
    return _finish_dtype(low, eqn, y)


def _dilate(low, x, spatial, dilation):
    """Insert ``d - 1`` zeros between neighbours along each spatial axis of an NC... array.

    This is what lhs dilation means; the convolution that follows is then an ordinary
    one, exact for any padding JAX computed (ONNX ConvTranspose's output_padding and
    kernel-flip conventions never come into play).
    """
    if not all(isinstance(n, int) for n in spatial):
        raise _unsupported(
            low, "input dilation over a symbolic spatial dim", "give the spatial dims static sizes"
        )
    sizes = list(spatial)
    for j, d in enumerate(dilation):
        if d == 1:
            continue
        axis = 2 + j
        y = low.op("Unsqueeze", [x, low.ints([axis + 1])])
        pads = [0] * (len(sizes) + 3) * 2
        pads[len(sizes) + 3 + axis + 1] = d - 1  # zeros after each element on the new axis
        y = low.op("Pad", [y, low.ints(pads)], {"mode": "constant"})
        sizes[j] *= d
        y = low.op("Reshape", [y, low.ints([0, 0, *sizes])])  # 0 keeps batch and channels
        sizes[j] -= d - 1  # drop the trailing zeros after the last element
        x = low.op("Slice", [y, low.ints([0]), low.ints([sizes[j]]), low.ints([axis])])
    return x


def _pool(kind: str):
    def convert(low, eqn, x):
        p = eqn.params
        window, strides = list(p["window_dimensions"]), list(p["window_strides"])
        padding = list(p["padding"])
        if any(d != 1 for d in p["base_dilation"]):
            raise _unsupported(low, "base dilation", "pool without base dilation")
        rank = len(window)
        trivial = [
            i for i in range(rank) if window[i] == 1 and strides[i] == 1 and padding[i] == (0, 0)
        ]
        spatial = [i for i in range(rank) if i not in trivial]
        if rank < 3 or 0 not in trivial or not spatial:
            raise _unsupported(low, "a window over the batch axis or a rank < 3 input",
                               "pool over spatial axes of an (N, ..., C) array")  # fmt: skip
        channel = [i for i in trivial if i != 0]
        if len(channel) != 1:
            raise _unsupported(
                low, "not exactly one non-pooled feature axis", "pool an (N, ..., C) array"
            )
        keep = [0, channel[0]]  # ONNX pools over axes 2..: batch and features go first
        perm = keep + spatial
        x = low.op("Transpose", [x], {"perm": perm})
        attrs = {
            "kernel_shape": [window[i] for i in spatial],
            "strides": [strides[i] for i in spatial],
            "pads": [padding[i][0] for i in spatial] + [padding[i][1] for i in spatial],
        }
        dilation = [p["window_dilation"][i] for i in spatial]
        if kind == "max":
            y = low.op("MaxPool", [x], {**attrs, "dilations": dilation})
        else:
            if any(d != 1 for d in dilation):
                raise _unsupported(low, "dilated sum window", "use an undilated window")
            y = low.op("AveragePool", [x], {**attrs, "count_include_pad": 1})
            y = low.op(
                "Mul",
                [y, low.const(float(np.prod(attrs["kernel_shape"])), eqn.invars[0].aval.dtype)],
            )
        return low.op("Transpose", [y], {"perm": _inverse(perm)})

    return convert


reg("reduce_window_max", _pool("max"))
reg("reduce_window_sum", _pool("sum"))
