"""Converters for elementwise, comparison, cast, shape and reduction primitives.

Each converter is ``(low, eqn, *inputs) -> value(s)``; see `capture_lowering.Lowering`. JAX
has already made broadcasting explicit (``broadcast_in_dim``), so binary ops see
operands of equal shape and ONNX's own broadcasting is never relied on for meaning.
"""

from __future__ import annotations

import numpy as np

from . import register_primitive as reg
from .capture_lowering import is_static

# dtypes ONNX Runtime's CPU kernels take, per op, where that is not every numeric type
# (measured on onnxruntime 1.32); other dtypes are computed in a wider one and cast back
_ARITH = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "float16", "float32",
          "float64"}  # fmt: skip
_NARROW = {"int8", "uint8", "int32", "uint32", "int64", "float16", "float32", "float64"}
_REDUCE = {"int32", "int64", "float16", "float32", "float64"}
ORT_TYPES = {
    "Add": _ARITH, "Sub": _ARITH, "Mul": _ARITH, "Div": _ARITH, "Mod": _ARITH, "Pow": {"int32", "int64", "float32", "float64"},
    "Less": _ARITH, "LessOrEqual": _ARITH, "Greater": _ARITH, "GreaterOrEqual": _ARITH,
    "Max": _NARROW, "Min": _NARROW, "Where": _NARROW, "Abs": _ARITH, "Sign": _ARITH,
    "Neg": {"int8", "int16", "int32", "int64", "float16", "float32", "float64"},
    "ReduceSum": _REDUCE, "ReduceProd": _REDUCE, "CumSum": _REDUCE,
    "ReduceMax": {"int8", "uint8", "int32", "int64", "float16", "float32", "float64"},
    "ReduceMin": {"int8", "uint8", "int32", "int64", "float16", "float32", "float64"},
    "ArgMax": {"int8", "uint8", "int32", "int64", "float16", "float32", "float64"},
    "ArgMin": {"int8", "uint8", "int32", "int64", "float16", "float32", "float64"},
    "TopK": {"int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64"},
    "MatMul": {"int32", "int64", "uint32", "uint64", "float16", "float32", "float64"},
}  # fmt: skip


def wide_dtype(op_type: str, dtype) -> np.dtype | None:
    """The dtype to compute `op_type` in when ONNX Runtime has no kernel for `dtype`."""
    dtype = np.dtype(dtype)
    allowed = ORT_TYPES.get(op_type)
    if allowed is None or dtype.name in allowed:
        return None
    if dtype.kind in "fV" or dtype.name == "bfloat16":
        return np.dtype(np.float32)
    if dtype == np.bool_:
        return np.dtype(np.uint8) if "uint8" in allowed else np.dtype(np.int32)
    for wide in ("int32", "int64"):
        if wide in allowed and np.can_cast(dtype, wide):
            return np.dtype(wide)
    return np.dtype(np.int64)


def typed_op(low, op_type, inputs, dtype, attrs=None, *, outputs=1, back=True, data=None):
    """`low.op` with the inputs of `dtype` computed in a wider dtype ONNX Runtime takes.

    With `back`, results come back in `dtype` (arithmetic wraps as JAX's does for narrow
    integers); comparisons and index outputs pass ``back=False``.
    """
    wide = wide_dtype(op_type, dtype)
    if wide is None:
        return low.op(op_type, inputs, attrs, outputs=outputs)
    data = len(inputs) if data is None else data  # the leading `data` inputs are of `dtype`
    cast = [low.cast(x, wide) if x is not None and i < data else x for i, x in enumerate(inputs)]
    result = low.op(op_type, cast, attrs, outputs=outputs)
    if not back:
        return result
    if isinstance(result, list):
        return [low.cast(r, dtype) for r in result]
    return low.cast(result, dtype)


_UNARY = {
    "neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh", "logistic": "Sigmoid",
    "sqrt": "Sqrt", "abs": "Abs", "sign": "Sign", "floor": "Floor", "ceil": "Ceil",
    "sin": "Sin", "cos": "Cos", "tan": "Tan", "asin": "Asin", "acos": "Acos", "atan": "Atan",
    "sinh": "Sinh", "cosh": "Cosh", "asinh": "Asinh", "acosh": "Acosh", "atanh": "Atanh",
    "erf": "Erf", "stop_gradient": "Identity", "copy": "Identity", "copy_p": "Identity",
    "optimization_barrier": "Identity",
}  # fmt: skip
_BINARY = {
    "add": "Add", "add_any": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "max": "Max",
    "min": "Min", "pow": "Pow", "eq": "Equal", "lt": "Less", "le": "LessOrEqual",
    "gt": "Greater", "ge": "GreaterOrEqual",
}  # fmt: skip
_LOGICAL = {"and": ("And", "BitwiseAnd"), "or": ("Or", "BitwiseOr"), "xor": ("Xor", "BitwiseXor")}


def _unary(op_type: str):
    def convert(low, eqn, *xs):
        # optimization_barrier takes several
        return [
            typed_op(low, op_type, [x], v.aval.dtype) for x, v in zip(xs, eqn.invars, strict=True)
        ]

    return convert


for _name, _op in _UNARY.items():
    reg(_name, _unary(_op))


_COMPARISONS = {"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"}


def _binary(op_type: str):
    def convert(low, eqn, a, b):
        dtype = eqn.invars[0].aval.dtype
        return typed_op(low, op_type, [a, b], dtype, back=op_type not in _COMPARISONS)

    return convert


for _name, _op in _BINARY.items():
    reg(_name, _binary(_op))


def _logical(pair):
    def convert(low, eqn, a, b):
        return low.op(pair[0] if eqn.invars[0].aval.dtype == np.bool_ else pair[1], [a, b])

    return convert


for _name, _pair in _LOGICAL.items():
    reg(_name, _logical(_pair))


@reg("not")
def convert_not(low, eqn, x):
    return low.op("Not" if eqn.invars[0].aval.dtype == np.bool_ else "BitwiseNot", [x])


@reg("ne")
def convert_ne(low, eqn, a, b):
    return low.op("Not", [low.op("Equal", [a, b])])


@reg("rem")
def convert_rem(low, eqn, a, b):  # lax.rem is C fmod: the result takes the dividend's sign
    return typed_op(low, "Mod", [a, b], eqn.invars[0].aval.dtype, {"fmod": 1})


@reg("rsqrt")
def convert_rsqrt(low, eqn, x):
    return low.op("Reciprocal", [low.op("Sqrt", [x])])


@reg("square")
def convert_square(low, eqn, x):
    return low.op("Mul", [x, x])


@reg("log1p")
def convert_log1p(low, eqn, x):
    return low.op("Log", [low.op("Add", [x, low.const(1, eqn.invars[0].aval.dtype)])])


@reg("expm1")
def convert_expm1(low, eqn, x):
    return low.op("Sub", [low.op("Exp", [x]), low.const(1, eqn.invars[0].aval.dtype)])


@reg("exp2")
def convert_exp2(low, eqn, x):
    return low.op("Pow", [low.const(2, eqn.invars[0].aval.dtype), x])


@reg("erfc")
def convert_erfc(low, eqn, x):
    return low.op("Sub", [low.const(1, eqn.invars[0].aval.dtype), low.op("Erf", [x])])


@reg("is_finite")
def convert_is_finite(low, eqn, x):
    return low.op("Not", [low.op("Or", [low.op("IsNaN", [x]), low.op("IsInf", [x])])])


@reg("round")
def convert_round(low, eqn, x):
    method = str(eqn.params.get("rounding_method", ""))
    if "EVEN" in method or method == "1":
        return low.op("Round", [x])
    # lax.round's default rounds half away from zero; ONNX Round rounds half to even.
    dtype = eqn.invars[0].aval.dtype
    magnitude = low.op("Floor", [low.op("Add", [low.op("Abs", [x]), low.const(0.5, dtype)])])
    return low.op("Mul", [low.op("Sign", [x]), magnitude])


@reg("integer_pow")
def convert_integer_pow(low, eqn, x):
    y = int(eqn.params["y"])
    if y == 0:
        return low.op("Expand", [low.const(1, eqn.invars[0].aval.dtype), low.op("Shape", [x])])
    result = x
    for _ in range(abs(y) - 1):  # exact repeated products, as XLA computes small powers
        result = low.op("Mul", [result, x])
    return low.op("Reciprocal", [result]) if y < 0 else result


@reg("convert_element_type")
def convert_convert_element_type(low, eqn, x):
    if eqn.params["new_dtype"] == eqn.invars[0].aval.dtype:
        return low.op("Identity", [x])
    return low.cast(x, eqn.params["new_dtype"])


@reg("clamp")
def convert_clamp(low, eqn, lo, x, hi):
    dtype = eqn.invars[1].aval.dtype
    return typed_op(low, "Max", [typed_op(low, "Min", [x, hi], dtype), lo], dtype)


@reg("select_n")
def convert_select_n(low, eqn, which, *cases):
    if len(cases) == 1:
        return low.op("Identity", [cases[0]])
    dtype = eqn.outvars[0].aval.dtype
    wide = wide_dtype("Where", dtype)  # ONNX Runtime's CPU Where has no bool/int16 kernel
    if wide is not None:
        picked = _select(low, eqn, which, [low.cast(c, wide) for c in cases])
        return low.cast(picked, dtype)
    return _select(low, eqn, which, list(cases))


def _select(low, eqn, which, cases):
    if eqn.invars[0].aval.dtype == np.bool_:
        return low.op("Where", [which, cases[1], cases[0]])
    dtype = eqn.invars[0].aval.dtype
    result = cases[-1]
    for i in range(len(cases) - 2, -1, -1):
        result = low.op("Where", [low.op("Equal", [which, low.const(i, dtype)]), cases[i], result])
    return result


@reg("interop_dropout")
def convert_dropout(low, eqn, x):
    ratio = low.const(np.float32(eqn.params["rate"]))
    return low.op("Dropout", [x, ratio])  # no training_mode input: identity at inference


# ---------------------------------------------------------------------- shapes
@reg("reshape")
def convert_reshape(low, eqn, x, *dynamic):
    if eqn.params.get("dimensions") not in (None, ()):
        x = low.op("Transpose", [x], {"perm": list(eqn.params["dimensions"])})
    new = eqn.params["new_sizes"]
    return low.op("Reshape", [x, low.shape(new)], {"allowzero": 1 if 0 in new else 0})


@reg("broadcast_in_dim")
def convert_broadcast_in_dim(low, eqn, x, *dynamic):
    shape = eqn.params["shape"]
    kept = eqn.params["broadcast_dimensions"]
    in_shape = eqn.invars[0].aval.shape
    if tuple(in_shape) == tuple(shape):
        return low.op("Identity", [x])
    missing = [d for d in range(len(shape)) if d not in kept]
    if missing:
        x = low.op("Unsqueeze", [x, low.ints(missing)])
    if all(in_shape[i] == shape[d] for i, d in enumerate(kept)):
        full = [shape[d] if d not in kept else 1 for d in range(len(shape))]
        if all(s == 1 for s in full):
            return x
    return low.op("Expand", [x, low.shape(shape)])


@reg("squeeze")
def convert_squeeze(low, eqn, x):
    return low.op("Squeeze", [x, low.ints(eqn.params["dimensions"])])


@reg("expand_dims")
def convert_expand_dims(low, eqn, x):
    return low.op("Unsqueeze", [x, low.ints(eqn.params["dimensions"])])


@reg("transpose")
def convert_transpose(low, eqn, x):
    return low.op("Transpose", [x], {"perm": list(eqn.params["permutation"])})


@reg("concatenate")
def convert_concatenate(low, eqn, *xs):
    return low.op("Concat", list(xs), {"axis": int(eqn.params["dimension"])})


@reg("split")
def convert_split(low, eqn, x):
    sizes = eqn.params["sizes"]
    return low.op(
        "Split", [x, low.shape(sizes)], {"axis": int(eqn.params["axis"])}, outputs=len(sizes)
    )


@reg("slice")
def convert_slice(low, eqn, x):
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params.get("strides") or [1] * len(starts)
    axes = list(range(len(starts)))
    return low.op(
        "Slice", [x, low.shape(starts), low.shape(limits), low.ints(axes), low.shape(strides)]
    )


@reg("rev")
def convert_rev(low, eqn, x):
    dims = list(eqn.params["dimensions"])
    big = np.iinfo(np.int64).max
    return low.op(
        "Slice",
        [
            x,
            low.ints([-1] * len(dims)),
            low.ints([-big] * len(dims)),
            low.ints(dims),
            low.ints([-1] * len(dims)),
        ],
    )


@reg("pad")
def convert_pad(low, eqn, x, value):
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or any(
        not is_static(lo) or not is_static(hi) or lo < 0 or hi < 0 for lo, hi, _ in config
    ):
        from interop.errors import UnsupportedOpError

        raise UnsupportedOpError(
            "pad", adapter="flax", layer=low.scope, location=low.location,
            detail="interior or negative padding", fix="use non-negative edge padding",
        )  # fmt: skip
    pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
    return low.op("Pad", [x, low.ints(pads), value], {"mode": "constant"})


@reg("iota")
def convert_iota(low, eqn):
    shape, dimension, dtype = eqn.params["shape"], eqn.params["dimension"], eqn.params["dtype"]
    n = low.op("Squeeze", [low.dim(shape[dimension]), low.ints([0])])
    line = low.op("Range", [low.const(np.int64(0)), n, low.const(np.int64(1))])
    axes = [d for d in range(len(shape)) if d != dimension]
    if axes:
        line = low.op("Unsqueeze", [line, low.ints(axes)])
        line = low.op("Expand", [line, low.shape(shape)])
    return low.cast(line, dtype)


@reg("dim_as_value")
def convert_dim_as_value(low, eqn):
    value = low.op(
        "Squeeze", [low.dim(eqn.params.get("dim", eqn.params.get("dimension"))), low.ints([0])]
    )
    return low.cast(value, eqn.outvars[0].aval.dtype)


# ---------------------------------------------------------------------- reductions
def _reduce(op_type: str, bool_op: str | None = None):
    def convert(low, eqn, x):
        axes = list(eqn.params["axes"])
        if not axes:
            return low.op("Identity", [x])
        dtype = eqn.invars[0].aval.dtype
        if dtype == np.bool_ and bool_op:  # ONNX reductions take no booleans
            y = low.op(bool_op, [low.cast(x, np.int32), low.ints(axes)], {"keepdims": 0})
            return low.cast(y, np.bool_)
        return typed_op(low, op_type, [x, low.ints(axes)], dtype, {"keepdims": 0}, data=1)

    return convert


reg("reduce_sum", _reduce("ReduceSum"))
reg("reduce_max", _reduce("ReduceMax", "ReduceMax"))
reg("reduce_min", _reduce("ReduceMin", "ReduceMin"))
reg("reduce_prod", _reduce("ReduceProd"))
reg("reduce_and", _reduce("ReduceMin", "ReduceMin"))
reg("reduce_or", _reduce("ReduceMax", "ReduceMax"))


def _arg(op_type: str):
    def convert(low, eqn, x):
        (axis,) = eqn.params["axes"]
        index = typed_op(
            low,
            op_type,
            [x],
            eqn.invars[0].aval.dtype,
            {"axis": int(axis), "keepdims": 0},
            back=False,
        )
        return low.cast(index, eqn.params["index_dtype"])

    return convert


reg("argmax", _arg("ArgMax"))
reg("argmin", _arg("ArgMin"))


@reg("cumsum")
def convert_cumsum(low, eqn, x):
    axis = low.const(np.int64(eqn.params["axis"]))
    attrs = {"reverse": int(bool(eqn.params.get("reverse")))}
    return typed_op(low, "CumSum", [x, axis], eqn.invars[0].aval.dtype, attrs, data=1)


@reg("device_put")
def convert_device_put(low, eqn, *xs):
    return [low.op("Identity", [x]) for x in xs]  # placement means nothing to the graph


reg("sharding_constraint", _unary("Identity"))


@reg("dynamic_slice")
def convert_dynamic_slice(low, eqn, x, *starts):
    sizes = list(eqn.params["slice_sizes"])
    shape = low.op("Shape", [x])
    size_values = low.shape(sizes)
    # JAX clamps start indices so the slice stays in bounds: 0 <= start <= dim - size.
    begin = low.op(
        "Concat",
        [low.op("Unsqueeze", [low.cast(s, np.int64), low.ints([0])]) for s in starts],
        {"axis": 0},
    )
    upper = low.op("Sub", [shape, size_values])
    begin = low.op("Min", [low.op("Max", [begin, low.ints([0] * len(sizes))]), upper])
    end = low.op("Add", [begin, size_values])
    return low.op("Slice", [x, begin, end, low.ints(range(len(sizes)))])


@reg("top_k")
def convert_top_k(low, eqn, x):
    k = eqn.params["k"]
    values, indices = typed_op(
        low, "TopK", [x, low.shape([k])], eqn.invars[0].aval.dtype,
        {"axis": -1, "largest": 1, "sorted": 1}, outputs=2, back=False, data=1,
    )  # fmt: skip
    return [
        low.cast(values, eqn.outvars[0].aval.dtype),
        low.cast(indices, eqn.outvars[1].aval.dtype),
    ]


@reg("stack")
def convert_stack(low, eqn, *xs):
    axis = int(eqn.params["axis"])
    rank = len(eqn.outvars[0].aval.shape)
    parts = [low.op("Unsqueeze", [x, low.ints([axis % rank])]) for x in xs]
    return parts[0] if len(parts) == 1 else low.op("Concat", parts, {"axis": axis % rank})


@reg("tile")
def convert_tile(low, eqn, x):
    return low.op("Tile", [x, low.shape(list(eqn.params["reps"]))])
