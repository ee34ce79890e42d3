"""The jaxpr walk: one `Lowering` turns a (closed) jaxpr into onnx_ir nodes.

Each equation is handed to the converter registered for its primitive in
`interop.adapters.flax.CAPTURE_PRIMITIVES`; converters receive the `Lowering` (to emit nodes and
constants), the equation and its inputs as `onnx_ir.Value`s, and return one value per
equation output. The walk owns what converters should not care about:

* provenance: every node gets ``interop.scope`` (the innermost module marker on the
  equation's JAX name stack, see `capture_modules.MARK`) and ``interop.location`` (the innermost
  non-JAX frame JAX recorded for the equation);
* value types: outputs are typed from the equation's abstract values, with symbolic
  dims (``batch``) kept as ONNX symbolic dims;
* symbolic dims as data: `dim` evaluates a JAX dimension expression (``batch * 16``)
  into an int64 ONNX value computed from the graph inputs' shapes at run time;
* sub-graphs for control flow (`subgraph`), where outer values are referenced by name
  as ONNX allows.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import onnx_ir as ir
from jax._src import source_info_util

from interop import provenance
from interop.errors import TraceError, UnsupportedOpError

from . import CAPTURE_PRIMITIVES
from .capture_precision import narrow_results, widen_inputs, widened

MARK = "interop:"  # prefix of the jax.named_scope that capture_modules.py opens per module call
OPSET = 18
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))


def onnx_dtype(dtype: Any) -> ir.DataType:
    try:
        return ir.DataType.from_numpy(np.dtype(dtype))
    except (TypeError, ValueError):
        raise TraceError(
            f"JAX dtype {dtype} has no ONNX equivalent",
            "numeric or boolean arrays",
            "keep PRNG keys and other extended dtypes out of the traced computation",
        ) from None


def is_static(dim: Any) -> bool:
    return isinstance(dim, int | np.integer)


class _DimValue:
    """An int64 ONNX scalar-in-a-1-D-tensor standing for a symbolic dim during evaluation.

    JAX's dimension expressions evaluate themselves with ``+``/``*``/``//``/``%`` on the
    values bound to their variables; this class turns those operators into ONNX nodes.
    """

    def __init__(self, low: Lowering, value: ir.Value):
        self.low, self.value = low, value

    def _lift(self, other: Any) -> ir.Value:
        if isinstance(other, _DimValue):
            return other.value
        return self.low.const(np.array([int(other)], np.int64))

    def _bin(self, op: str, other: Any, swap: bool = False) -> _DimValue:
        a, b = self.value, self._lift(other)
        return _DimValue(self.low, self.low.op(op, [b, a] if swap else [a, b]))

    def __add__(self, o):
        return self._bin("Add", o)

    def __radd__(self, o):
        return self._bin("Add", o, True)

    def __sub__(self, o):
        return self._bin("Sub", o)

    def __rsub__(self, o):
        return self._bin("Sub", o, True)

    def __mul__(self, o):
        return self._bin("Mul", o)

    def __rmul__(self, o):
        return self._bin("Mul", o, True)

    def __floordiv__(self, o):  # dims are non-negative, so truncating Div is floor division
        return self._bin("Div", o)

    def __rfloordiv__(self, o):
        return self._bin("Div", o, True)

    def __mod__(self, o):
        return self._bin("Mod", o)


class Lowering:
    """State of one jaxpr -> ONNX conversion (see the module docstring)."""

    def __init__(self, dim_sources: dict[str, tuple[ir.Value, int]]):
        self._ids = itertools.count()
        self._frames: list[list[ir.Node]] = [[]]
        self.env: dict[Any, ir.Value] = {}
        self.dim_sources = dim_sources  # symbol -> (graph input, axis)
        self._dim_cache: dict[str, ir.Value] = {}
        self.scope, self.location, self.primitive = "", None, ""
        self.unresolved_scopes: set[str] = set()
        # node name -> (primitive, scope, location): names the equation behind a node an
        # ONNX check rejects (capture_check.py)
        self.origins: dict[str, tuple[str, str, str | None]] = {}

    # ------------------------------------------------------------------ emission
    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._ids)}"

    @property
    def nodes(self) -> list[ir.Node]:
        return self._frames[0]

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        outputs: int = 1,
        domain: str = "",
    ) -> Any:
        """Emit one node in the current (sub)graph; returns its output, or a list of them."""
        node = ir.Node(
            domain,
            op_type,
            list(inputs),
            ir.convenience.convert_attributes(attrs or {}),
            num_outputs=outputs,
            name=f"{self.scope + '/' if self.scope else ''}{op_type}_{next(self._ids)}",
        )
        for value in node.outputs:
            value.name = self.fresh(op_type.lower())
        node.metadata_props[provenance.SCOPE] = self.scope
        if self.location:
            node.metadata_props[provenance.LOCATION] = self.location
        self.origins[node.name] = (self.primitive, self.scope, self.location)
        self._frames[-1].append(node)
        return node.outputs[0] if outputs == 1 else list(node.outputs)

    def const(self, array: Any, dtype: Any = None) -> ir.Value:
        array = np.asarray(array, dtype=dtype)
        return self.op("Constant", [], {"value": ir.tensor(array, name=self.fresh("const"))})

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.const(np.asarray(list(values), np.int64).reshape(-1))

    def cast(self, value: ir.Value, dtype: Any) -> ir.Value:
        return self.op("Cast", [value], {"to": onnx_dtype(dtype)})

    # ------------------------------------------------------------------ symbolic dims
    def dim(self, d: Any) -> ir.Value:
        """A JAX dim (int or symbolic expression) as an int64 ONNX tensor of shape [1]."""
        if is_static(d):
            return self.ints([int(d)])
        key = str(d)
        if key not in self._dim_cache:
            # Emitted in the main graph so that every sub-graph can read (and share) it.
            self._frames.append(self._frames[0])
            try:
                env = {}
                for name in d._get_vars():
                    if name not in self.dim_sources:
                        raise TraceError(
                            f"Symbolic dim '{name}' does not come from any input shape"
                        )
                    source, axis = self.dim_sources[name]
                    env[name] = _DimValue(
                        self, self.op("Shape", [source], {"start": axis, "end": axis + 1})
                    )
                result = d._evaluate(env)
                self._dim_cache[key] = (
                    result.value if isinstance(result, _DimValue) else self.ints([int(result)])
                )
            finally:
                self._frames.pop()
        return self._dim_cache[key]

    def shape(self, dims: Sequence[Any]) -> ir.Value:
        """A shape of ints and symbolic dims as one int64 1-D ONNX tensor."""
        if all(is_static(d) for d in dims):
            return self.ints([int(d) for d in dims])
        return self.op("Concat", [self.dim(d) for d in dims], {"axis": 0})

    # ------------------------------------------------------------------ typing
    @staticmethod
    def type_value(value: ir.Value, aval: Any) -> None:
        if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
            return
        value.dtype = onnx_dtype(aval.dtype)
        value.shape = ir.Shape(
            [int(d) if is_static(d) else ir.SymbolicDim(str(d)) for d in aval.shape]
        )

    def new_input(self, aval: Any, hint: str = "arg") -> ir.Value:
        value = ir.Value(name=self.fresh(hint))
        self.type_value(value, aval)
        return value

    # ------------------------------------------------------------------ the walk
    def read(self, atom: Any) -> ir.Value:
        if isinstance(atom, jax.extend.core.Literal):
            return self.const(np.asarray(atom.val, dtype=atom.aval.dtype))
        return self.env[atom]

    def emit_jaxpr(
        self, jaxpr: Any, consts: Sequence[ir.Value], args: Sequence[ir.Value]
    ) -> list[ir.Value]:
        """Emit the equations of an open jaxpr with its constvars and invars bound."""
        for var, value in zip(jaxpr.constvars, consts, strict=False):
            self.env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=False):
            self.env[var] = value
        outer = (self.scope, self.location)
        for eqn in jaxpr.eqns:
            self.emit_eqn(eqn, outer[0], outer[1])
        self.scope, self.location = outer
        return [self.read(v) for v in jaxpr.outvars]

    def emit_closed(self, closed: Any, args: Sequence[ir.Value]) -> list[ir.Value]:
        consts = [self.const(np.asarray(c)) for c in closed.consts]
        return self.emit_jaxpr(closed.jaxpr, consts, args)

    def emit_eqn(
        self, eqn: Any, enclosing_scope: str, enclosing_location: str | None = None
    ) -> None:
        self.scope = self._scope_of(eqn, enclosing_scope)
        # equations of a library's jitted function (jnp.fft, jnp.bitwise_xor.reduce) have no
        # user frame of their own: the call site of the enclosing equation stands for them
        self.location = self._location_of(eqn) or enclosing_location
        name = eqn.primitive.name
        self.primitive = name
        converter = CAPTURE_PRIMITIVES.get(name)
        if converter is None:
            raise UnsupportedOpError(
                name,
                direction="import",
                adapter="flax",
                layer=self.scope,
                location=self.location,
                close_matches=CAPTURE_PRIMITIVES.close_matches(name),
                detail=_describe(eqn),
                fix=(
                    "express it with supported jax.numpy/lax calls, or register a converter: "
                    f"@interop.adapters.flax.register_primitive('{name}') on a function "
                    "(lowering, eqn, *inputs) -> list of onnx_ir values"
                ),
            )
        inputs = [self.read(v) for v in eqn.invars]
        wide = widened(eqn)  # bfloat16 arithmetic: the same equation in float32
        if wide is None:
            results = converter(self, eqn, *inputs)
        else:
            results = converter(self, wide, *widen_inputs(self, eqn, inputs))
        if isinstance(results, ir.Value):
            results = [results]
        if wide is not None:
            results = narrow_results(self, eqn, wide, results)
        if len(results) != len(eqn.outvars):
            raise TraceError(
                f"converter for '{name}' returned {len(results)} values for {len(eqn.outvars)} outputs"
            )
        for var, value in zip(eqn.outvars, results, strict=False):
            if type(var).__name__ == "DropVar":
                continue
            if value.dtype is None:  # new values only; a passed-through input keeps its type
                self.type_value(value, var.aval)
            self.env[var] = value

    def _scope_of(self, eqn: Any, enclosing: str) -> str:
        scope = enclosing
        for part in str(eqn.source_info.name_stack).split("/"):
            if part.startswith(MARK):
                scope = part[len(MARK) :]
        return scope

    def _location_of(self, eqn: Any) -> str | None:
        for frame in source_info_util.user_frames(eqn.source_info.traceback):
            if not frame.file_name.startswith(_OWN_DIR):
                return f"{frame.file_name}:{frame.start_line}"
        return None

    # ------------------------------------------------------------------ sub-graphs
    def subgraph(
        self, name: str, inputs: list[ir.Value], body: Callable[[], list[ir.Value]]
    ) -> ir.Graph:
        """Build an ONNX sub-graph: `body` emits nodes reading `inputs` (and outer values)."""
        self._frames.append([])
        saved = (self.scope, self.location)
        try:
            outputs = body()
        finally:
            nodes = self._frames.pop()
            self.scope, self.location = saved
        made_here = {id(v) for n in nodes for v in n.outputs}
        final: list[ir.Value] = []
        seen: set[int] = set()
        for value in outputs:
            # ONNX Runtime wants every sub-graph output produced by a node of that
            # sub-graph, once: pass-through and outer values get an Identity.
            if id(value) not in made_here or id(value) in seen:
                identity = ir.Node(
                    "", "Identity", [value], num_outputs=1, name=self.fresh("Identity")
                )
                identity.outputs[0].name = self.fresh("identity")
                identity.outputs[0].dtype, identity.outputs[0].shape = value.dtype, value.shape
                identity.metadata_props[provenance.SCOPE] = self.scope
                nodes.append(identity)
                value = identity.outputs[0]
            seen.add(id(value))
            final.append(value)
        return ir.Graph(inputs, final, nodes=nodes, name=name)


def _describe(eqn: Any) -> str:
    """The primitive's parameters and operand types, short enough for an error message."""
    params = []
    for key in sorted(eqn.params):
        text = " ".join(repr(eqn.params[key]).split())
        params.append(f"{key}={text[:60] + '...' if len(text) > 60 else text}")
    types = ", ".join(str(v.aval) for v in eqn.invars)
    detail = f"JAX primitive on ({types})"
    return detail + (f" with params {', '.join(params)}" if params else "")


def walk(
    closed_jaxpr: Any,
    bound: list[ir.Value],
    dim_sources: dict[str, tuple[ir.Value, int]],
) -> tuple[Lowering, list[ir.Value]]:
    """Lower `closed_jaxpr` with its constvars then invars bound to `bound`, in that order."""
    low = Lowering(dim_sources)
    n = len(closed_jaxpr.jaxpr.constvars)
    outs = low.emit_jaxpr(closed_jaxpr.jaxpr, bound[:n], bound[n:])
    return low, outs
