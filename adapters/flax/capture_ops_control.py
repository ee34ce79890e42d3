"""Converters for call-like and control-flow primitives.

* ``pjit`` (nested ``jax.jit``), ``custom_jvp_call``, ``custom_vjp_call``, ``remat`` and
  ``closed_call`` are inlined: at inference only their primal computation matters.
* ``scan`` becomes an ONNX ``Loop`` with the trip count as an input (computed from a
  symbolic dim when the scanned axis is dynamic), so a scan over layers or time steps
  stays one node with a body instead of an unrolled copy. Loop, not Scan, because it
  also covers scans without scanned inputs (``fori_loop`` with static bounds) and with
  ``reverse=True`` by plain indexing.
* ``while`` becomes an ONNX ``Loop`` driven by the loop condition.
* ``cond`` becomes ONNX ``If`` (nested for more than two branches).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from . import register_primitive as reg


def _jaxpr_param(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    raise KeyError(f"no jaxpr parameter in {eqn.primitive.name}")


def _inline(low, eqn, *args):
    inner = _jaxpr_param(eqn)
    if hasattr(inner, "consts"):  # a ClosedJaxpr
        return low.emit_closed(inner, list(args))
    return low.emit_jaxpr(inner, [], list(args))


for _name in ("pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint", "custom_jvp_call", "custom_vjp_call",
              "custom_vjp_call_jaxpr", "custom_lin"):  # fmt: skip
    reg(_name, _inline)


def _bool(low, value, dtype):
    return value if np.dtype(dtype) == np.bool_ else low.cast(value, np.bool_)


@reg("scan")
def convert_scan(low, eqn, *operands):
    p = eqn.params
    closed, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
    length, reverse = p["length"], bool(p["reverse"])
    consts, carry, xs = (
        operands[:n_consts],
        operands[n_consts : n_consts + n_carry],
        operands[n_consts + n_carry :],
    )
    body_invars = closed.jaxpr.invars
    carry_avals = [v.aval for v in body_invars[n_consts : n_consts + n_carry]]
    trip = low.dim(length)  # int64 [1]; a symbolic length is computed from the inputs
    trip_scalar = low.op("Squeeze", [trip, low.ints([0])])
    iteration = ir.Value(
        name=low.fresh("iter"), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
    )
    cond_in = ir.Value(
        name=low.fresh("cond"), type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([])
    )
    carry_in = [low.new_input(a, "carry") for a in carry_avals]
    scope = low.scope

    def body():
        low.scope = scope
        index = iteration
        if reverse:
            index = low.op("Sub", [low.op("Sub", [trip_scalar, low.const(np.int64(1))]), iteration])
        slices = [low.op("Gather", [x, index], {"axis": 0}) for x in xs]
        outs = low.emit_closed(closed, [*consts, *carry_in, *slices])
        keep_going = low.op("Identity", [cond_in])
        return [keep_going, *outs]

    graph = low.subgraph(low.fresh("scan_body"), [iteration, cond_in, *carry_in], body)
    for value, var in zip(graph.outputs[1:], closed.jaxpr.outvars, strict=False):
        low.type_value(value, var.aval)
    results = low.op("Loop", [trip_scalar, None, *carry], {"body": graph}, outputs=len(eqn.outvars))
    results = results if isinstance(results, list) else [results]
    if reverse:  # Loop stacks scan outputs in iteration order; reverse scans emit them backwards
        big = np.iinfo(np.int64).max
        for i in range(n_carry, len(results)):
            results[i] = low.op(
                "Slice",
                [results[i], low.ints([-1]), low.ints([-big]), low.ints([0]), low.ints([-1])],
            )
    return results


@reg("while")
def convert_while(low, eqn, *operands):
    p = eqn.params
    cond_closed, body_closed = p["cond_jaxpr"], p["body_jaxpr"]
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, carry = operands[:nc], operands[nc : nc + nb], operands[nc + nb :]
    first = low.emit_closed(cond_closed, [*cond_consts, *carry])[0]
    first = _bool(low, first, cond_closed.jaxpr.outvars[0].aval.dtype)
    iteration = ir.Value(
        name=low.fresh("iter"), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([])
    )
    cond_in = ir.Value(
        name=low.fresh("cond"), type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([])
    )
    carry_avals = [v.aval for v in body_closed.jaxpr.invars[nb:]]
    carry_in = [low.new_input(a, "carry") for a in carry_avals]
    scope = low.scope

    def body():
        low.scope = scope
        new = low.emit_closed(body_closed, [*body_consts, *carry_in])
        again = low.emit_closed(cond_closed, [*cond_consts, *new])[0]
        return [_bool(low, again, cond_closed.jaxpr.outvars[0].aval.dtype), *new]

    graph = low.subgraph(low.fresh("while_body"), [iteration, cond_in, *carry_in], body)
    results = low.op("Loop", [None, first, *carry], {"body": graph}, outputs=len(eqn.outvars))
    return results if isinstance(results, list) else [results]


@reg("cond")
def convert_cond(low, eqn, index, *operands):
    branches = list(eqn.params["branches"])
    index_dtype = eqn.invars[0].aval.dtype
    scope = low.scope

    def branch_graph(i):
        def body():
            low.scope = scope
            return low.emit_closed(branches[i], list(operands))

        graph = low.subgraph(low.fresh(f"branch_{i}"), [], body)
        for value, var in zip(graph.outputs, eqn.outvars, strict=False):
            low.type_value(value, var.aval)
        return graph

    def build(i):
        """If over branches i.. (branch i when index == i, else the rest)."""
        if i == len(branches) - 1:
            return None
        if i == len(branches) - 2:
            if np.dtype(index_dtype) == np.bool_:
                test = index
            else:
                test = low.op("Equal", [index, low.const(i + 1, index_dtype)])
            return test, branch_graph(i + 1), branch_graph(i)
        test = low.op("Equal", [index, low.const(i, index_dtype)])
        then = branch_graph(i)

        def rest():
            low.scope = scope
            inner_test, inner_then, inner_else = build(i + 1)
            out = low.op("If", [inner_test], {"then_branch": inner_then, "else_branch": inner_else},
                         outputs=len(eqn.outvars))  # fmt: skip
            return out if isinstance(out, list) else [out]

        other = low.subgraph(low.fresh(f"branches_{i + 1}"), [], rest)
        return test, then, other

    if len(branches) == 1:
        return low.emit_closed(branches[0], list(operands))
    test, then, other = build(0)
    results = low.op(
        "If", [test], {"then_branch": then, "else_branch": other}, outputs=len(eqn.outvars)
    )
    return results if isinstance(results, list) else [results]
