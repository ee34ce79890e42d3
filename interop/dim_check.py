"""A declared dynamic dimension must hold: checked once before `trace` returns.

Every adapter's capture ends here (Keras, torch, Flax; no framework is imported). The
graph is run on ONNX Runtime at a second size of its dynamic dimensions (the example
grown by one along them, by repeating it cyclically, or shrunk by one, by slicing it;
token ids stay in range as only the example's own values are used) and compared with the
source model at the same inputs. All dimensions change together first, so a graph that
holds costs one source call and one graph run (whose ONNX Runtime session the graph
keeps for later runs). A dimension that does not hold (a run error, another output
shape, other numbers) is declared static, at the example's size, with a warning naming
the dimension and the layer of the node that failed; the dimensions left dynamic are
checked again together. Sizes the source model itself cannot run (a ViT's patch grid, a
position table) are not held against the graph.

>>> import numpy as np
>>> _resized(np.array([[1, 2, 3]]), 1, 4).tolist()    # repeated cyclically: ids stay valid
[[1, 2, 3, 1]]
>>> second_sizes(2), second_sizes(1)
([3, 1], [2])
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from interop import provenance, weightless
from interop.graph import Graph

# ``run_source(feeds) -> [(output name, array)]``: the source model on inputs named as
# the graph's, outputs flattened in the graph's order
RunSource = Callable[[dict[str, np.ndarray]], list[tuple[str, np.ndarray]]]

_NODE = re.compile(r"node\. Name:'([^']+)'")
_SIZE_OPS = {"Reshape", "Expand", "Tile", "ConstantOfShape", "Slice", "Range", "Split"}
_ARITHMETIC = re.compile(r"^[\d\s+\-*/()]+$")
_SESSIONS: dict[int, tuple[Any, Any]] = {}  # id(model) -> (model, session), during one check
_UNDECIDED = "the source runs at no second size"  # by identity: neither holds nor fails


def dynamic_axes(graph: ir.Graph) -> dict[str, list[tuple[str, int]]]:
    """Symbolic dim name -> the (input name, axis) pairs that declare it."""
    dims: dict[str, list[tuple[str, int]]] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                dims.setdefault(dim.value, []).append((str(value.name), axis))
    return dims


@dataclass(frozen=True)
class Finding:
    """A dynamic dim that symbolic shape propagation finds contradicted."""

    dim: str
    text: str  # "Reshape of layer 'flat' (model.py:12) makes it 2"
    definite: bool  # a proof (the graph cannot run at another size), not a likely cause


def _inferred_shapes(model: ir.Model) -> dict[str, list[int | str | None]] | None:
    """Value name -> dims from ONNX shape inference with data propagation, from the graph
    inputs' declared dims alone (the exporter's own shapes are dropped); None where the
    graph is over one protobuf or inference raises.

    Large initializers go as external references never read: inference needs only their
    types and shapes, and copying a BERT's weights into a proto would cost more than
    the inference itself."""
    import onnx

    from .serialization import PROTO_LIMIT, weight_bytes

    if weight_bytes(model) >= PROTO_LIMIT:
        return None
    try:
        with weightless.data_elided(model):
            proto = ir.serde.serialize_model(model)
    except Exception:
        return None
    del proto.graph.value_info[:]
    for output in proto.graph.output:
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    try:
        _unsqueezed(model, proto)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:
        return None
    shapes: dict[str, list[int | str | None]] = {}
    for info in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        kind = info.type.WhichOneof("value")
        if kind == "tensor_type" and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in info.type.tensor_type.shape.dim
            ]
    return shapes


def _unsqueezed(model: ir.Model, proto: Any) -> None:
    """Reshapes of a scalar to [1] in `proto` made Unsqueezes (the same op there): how
    torch.onnx turns a symbolic size into a shape element, and data propagation passes
    Unsqueeze but not Reshape, which would make every torch reshape of a dynamic size
    end the symbol's flow."""
    if model.opset_imports.get("", 0) < 13:  # Unsqueeze takes its axes as an input
        return
    import onnx

    zero = "interop_dim_check_axis_0"
    for node, into in zip(model.graph, proto.graph.node, strict=True):
        data = node.inputs[0] if node.op_type == "Reshape" and not node.domain else None
        target = None if data is None else _constant_ints(node.inputs[1])
        ints = None if target is None or 0 in target else _constant_ints(data)
        if ints is not None and target is not None:
            # a constant reshaped (torch.onnx's reduction axes): folded, as inference
            # takes a reduction's axes from a constant only
            array = np.reshape(np.array(ints, np.int64), target)
            value = onnx.helper.make_attribute("value", onnx.numpy_helper.from_array(array))
            into.op_type = "Constant"
            del into.input[:], into.attribute[:]
            into.attribute.append(value)
            continue
        if data is None or data.shape is None or len(data.shape) != 0:
            continue
        if target in ([1], [-1]):
            into.op_type, into.input[1] = "Unsqueeze", zero
            if not any(t.name == zero for t in proto.graph.initializer):
                proto.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.int64), zero))  # fmt: skip


def _carries(dim: object, name: str) -> bool:
    """Whether `dim` is the symbol `name` or an expression of it ("2*batch")."""
    return isinstance(dim, str) and re.search(rf"\b{re.escape(name)}\b", dim) is not None


def _constant_ints(value: ir.Value | None) -> list[int] | None:
    """The ints of an initializer or Constant node's value, else None."""
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        attrs = producer.attributes
        if "value_ints" in attrs or "value_int" in attrs:  # torch.onnx's shape elements
            ints = attrs.get("value_ints") or attrs["value_int"]
            return [int(v) for v in np.ravel(ints.value)]
        attr = attrs.get("value")
        tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None  # fmt: skip
    if tensor is None or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
        return None
    return [int(v) for v in np.asarray(tensor.numpy()).ravel()]


def symbolic_findings(model: ir.Model, sizes: Mapping[str, int]) -> dict[str, list[Finding]]:
    """Dynamic dims (of example sizes `sizes`) that shape propagation finds contradicted.

    Two patterns, both conservative: a Reshape or Expand whose constant target holds the
    example's size of a dim its data input carries, while its output carries the dim no
    more and holds that number instead (a converter that baked it); and a graph output
    declared with a dim that inference proves a number. Milliseconds on a BERT (the
    graph goes to inference without its weights); nothing where inference cannot run.

    >>> x = ir.Value(name="x", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    >>> target = ir.Value(name="t", const_value=ir.tensor(np.array([2, 4], np.int64), name="t"))
    >>> node = ir.node("Reshape", [x, target], name="r")
    >>> y = node.outputs[0]
    >>> y.name, y.type, y.shape = "y", x.type, ir.Shape(["batch", 4])
    >>> g = ir.Graph([x], [y], nodes=[node], initializers=[target], opset_imports={"": 21})
    >>> for finding in symbolic_findings(ir.Model(g, ir_version=10), {"batch": 2})["batch"]:
    ...     print(finding.text, finding.definite)
    Reshape of the model itself makes it 2 True
    """
    named = {name: size for name, size in sizes.items() if size > 1}  # 1 is everywhere
    shapes = _inferred_shapes(model) if named else None
    if not shapes:
        return {}
    found: dict[str, list[Finding]] = {}
    blamed: dict[tuple[str, ir.Node], int] = {}  # (dim, node found) -> index in found[dim]
    for node in model.graph:
        if node.op_type not in ("Reshape", "Expand") or len(node.inputs) < 2:
            continue
        target = _constant_ints(node.inputs[1])
        data = node.inputs[0]
        into = shapes.get(str(data.name)) if data is not None else None
        out = shapes.get(str(node.outputs[0].name))
        if target is None or into is None or out is None:
            continue
        for name, size in named.items():
            if (
                size in target
                and size in out
                and any(_carries(d, name) for d in into)
                and not any(_carries(d, name) for d in out)
            ):
                # Expand: the dim met a number in a broadcast; Reshape without -1: a
                # fixed element count from a varying one. A -1 may only be a likely cause
                definite = node.op_type == "Expand" or -1 not in target
                text = f"{node.op_type} of {layer_of(node)} makes it {size}"
                found.setdefault(name, []).append(Finding(name, text, definite))
                blamed[name, node] = len(found[name]) - 1
    for output in model.graph.outputs:
        inferred = shapes.get(str(output.name))
        if output.shape is None or inferred is None or len(inferred) != len(output.shape):
            continue
        producer = output.producer()
        by = "" if producer is None else f" of {producer.op_type} of {layer_of(producer)}"
        for declared, dim in zip(output.shape, inferred, strict=True):
            if not isinstance(dim, int) or not isinstance(declared, ir.SymbolicDim):
                continue
            for name, size in named.items():
                if dim != size or not _carries(declared.value, name):
                    continue  # another number: wrong at the example, interop.verify's
                if (
                    producer is not None and (name, producer) in blamed
                ):  # the node found makes an output a number:
                    index = blamed[name, producer]  # a proof, said once
                    found[name][index] = Finding(name, found[name][index].text, True)
                    continue
                text = f"output '{output.name}'{by} is declared '{declared.value}' but is {dim}"
                found.setdefault(name, []).append(Finding(name, text, True))
    return found


def _resized(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`array` sliced or repeated (cyclically) to `size` along `axis`; zeros when the
    example's axis is empty (keras_hub SAM's prompt without boxes)."""
    if array.shape[axis] == 0:
        shape = list(array.shape)
        shape[axis] = size
        return np.zeros(shape, array.dtype)
    return np.take(array, np.arange(size) % array.shape[axis], axis=axis)


def second_sizes(example: int) -> list[int]:
    """The sizes tried, in order: one more, then one less (never 0)."""
    return [example + 1] + ([example - 1] if example > 1 else [])


def check_dims(
    graph: Graph,
    run_source: RunSource,
    feeds: Mapping[str, np.ndarray],
    *,
    source: str,
    stacklevel: int = 4,
) -> Graph:
    """`graph`, or a copy whose failing dynamic dims are static (with a warning each).

    `feeds` are the example inputs by graph input name (inputs the graph does not list
    are passed to the source unchanged); `source` names the model in warnings
    ("Keras model 'vit'").
    """
    feeds = {name: np.asarray(value) for name, value in feeds.items()}
    if any(spec.name not in feeds for spec in graph.inputs):
        return graph  # an input the source does not name: nothing to compare with
    try:
        return _check(graph, run_source, feeds, source, stacklevel + 1)
    finally:
        _SESSIONS.clear()  # one check's sessions: the graph builds its own to run


def _check(
    graph: Graph,
    run_source: RunSource,
    feeds: dict[str, np.ndarray],
    source: str,
    stacklevel: int,
) -> Graph:
    dims = {
        name: [(i, axis) for i, axis in where if i in feeds]
        for name, where in dynamic_axes(graph.model.graph).items()
    }
    dims = {name: where for name, where in dims.items() if where}
    if not dims:
        return graph
    sizes = {name: feeds[i].shape[axis] for name, [(i, axis), *_] in dims.items()}
    findings = symbolic_findings(graph.model, sizes)
    verdict = _try(graph, run_source, feeds, dims, list(dims), sizes)
    if verdict is _UNDECIDED:  # the source runs no other size: only a proof may decide
        proven = {n: f for n, f in findings.items() if any(x.definite for x in f)}
        return _declare(graph, dict.fromkeys(proven, verdict), sizes, proven, source, stacklevel)  # fmt: skip
    if verdict is None or not holds_at_example(graph, run_source, feeds):
        return graph  # holds; or wrong at any size, which interop.verify reports
    failing: dict[str, str] = {}
    # the dims inference finds contradicted are tried alone first: where they are the
    # culprits, the rest hold together at once, without a run each
    suspects = [name for name in dims if name in findings]
    others = [name for name in dims if name not in findings]
    for name in suspects if len(dims) > 1 else []:
        reason = _try(graph, run_source, feeds, dims, [name], sizes)
        if _failed(reason):
            failing[name] = str(reason)
    checked = False
    if failing and others:
        fixed = made_static(graph, {name: sizes[name] for name in failing})
        checked = not _failed(_try(fixed, run_source, feeds, dims, others, sizes))
    for name in others if len(dims) > 1 and not checked else []:
        reason = _try(graph, run_source, feeds, dims, [name], sizes)
        if _failed(reason):
            failing[name] = str(reason)
    if not checked and failing and len(failing) < len(dims):  # the rest must hold together
        rest = [name for name in dims if name not in failing]
        fixed = made_static(graph, {name: sizes[name] for name in failing})
        again = _try(fixed, run_source, feeds, dims, rest, sizes)
        if _failed(again):
            failing.update(dict.fromkeys(rest, str(again)))
    if not failing:  # only together do they fail
        failing = dict.fromkeys(dims, verdict)
    return _declare(graph, failing, sizes, findings, source, stacklevel)


def _failed(reason: str | None) -> bool:
    return reason is not None and reason is not _UNDECIDED


def _declare(
    graph: Graph,
    failing: dict[str, str],
    sizes: dict[str, int],
    findings: dict[str, list[Finding]],
    source: str,
    stacklevel: int,
) -> Graph:
    """`graph` with the `failing` dims static, with a warning each."""
    for name, reason in failing.items():
        proof = "; ".join(f.text for f in findings.get(name, [])[:2])
        if proof:  # names the layer itself: the constants' guess would repeat it
            reason = reason.split("; a shape constant holds")[0]
        warnings.warn(
            f"interop: {source}: the dynamic dimension '{name}' does not hold ({reason}"
            f"{'; shape inference: ' + proof if proof else ''}); "
            f"the graph declares it static, of size {sizes[name]}",
            stacklevel=stacklevel + 1,
        )
    return made_static(graph, {name: sizes[name] for name in failing})


def _try(
    graph: Graph,
    run_source: RunSource,
    feeds: dict[str, np.ndarray],
    dims: dict[str, list[tuple[str, int]]],
    names: list[str],
    sizes: dict[str, int],
) -> str | None:
    """None when the graph matches the source at a second size of `names`; `_UNDECIDED`
    when the source cannot run any; else why not."""
    for step in range(2):
        inputs = dict(feeds)
        new: dict[str, int] = {}
        for name in names:
            options = second_sizes(sizes[name])
            if step >= len(options):
                continue
            new[name] = options[step]
            for i, axis in dims[name]:
                inputs[i] = _resized(inputs[i], axis, new[name])
        if not new:
            return _UNDECIDED if step else None
        try:
            want = run_source(inputs)
        except Exception:
            continue  # the source cannot run at this size either
        at = ", ".join(f"{n}={s}" for n, s in new.items())
        try:
            got = _run(graph, inputs)
        except Exception as err:
            text = f"{err} {err.__cause__ or ''}"
            return f"at {at} the graph fails{_where(graph, text)}: {_first_line(err)}{_baked(graph, sizes, names)}"  # fmt: skip
        differs = _differs(got, want)
        return None if differs is None else f"at {at} {differs}{_baked(graph, sizes, names)}"
    return _UNDECIDED


def _run(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """The graph as captured on ONNX Runtime (CPU), in a session of the check's own: not
    the optimized copy `graph.run` builds (seconds on a transformer: a trace that is only
    emitted to another framework would pay it for nothing)."""
    session = _SESSIONS.get(id(graph.model))
    if session is None or session[0] is not graph.model:
        try:
            ort_session = weightless.session(graph)
        except ValueError:  # weights over 2 GB: graph.run knows how to load those
            return graph.run(*(feeds[spec.name] for spec in graph.inputs), as_dict=True)
        session = _SESSIONS[id(graph.model)] = (graph.model, ort_session)
    ort_session = session[1]
    names = [o.name for o in ort_session.get_outputs()]
    inputs = {i.name: feeds[i.name] for i in ort_session.get_inputs()}
    return dict(zip(names, ort_session.run(names, inputs), strict=True))


def _differs(got: dict[str, Any], want: list[tuple[str, np.ndarray]]) -> str | None:
    # by position, as interop.verify: a graph output may be renamed (one returning an
    # input under the input's name)
    if len(got) != len(want):
        return f"{len(got)} outputs, the source {len(want)}"
    for (name, expected), actual in zip(want, got.values(), strict=True):
        actual, expected = np.asarray(actual), np.asarray(expected)
        if actual.shape != expected.shape:
            return f"output '{name}' has shape {actual.shape}, the source {expected.shape}"
        if expected.dtype.kind not in "fciub":
            continue
        scale = float(np.max(np.abs(expected), initial=1.0))
        if not np.allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
            gap = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            return f"output '{name}' differs from the source by {gap:.3g}"
    return None


def holds_at_example(graph: Graph, run_source: RunSource, feeds: Mapping[str, Any]) -> bool:
    """Whether the graph matches the source at the example itself (else the dims are not
    to blame)."""
    feeds = {name: np.asarray(value) for name, value in feeds.items()}
    try:
        return _differs(_run(graph, feeds), run_source(feeds)) is None
    except Exception:
        return False
    finally:
        _SESSIONS.clear()


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def layer_of(node: ir.Node) -> str:
    """ "layer 'blocks.0.attn' (file.py:12)" from a node's provenance."""
    scope = node.metadata_props.get(provenance.SCOPE, "")
    where = f"layer '{scope}'" if scope else "the model itself"
    location = node.metadata_props.get(provenance.LOCATION)
    return f"{where} ({location})" if location else where


def _where(graph: Graph, message: str) -> str:
    """' in <op> of layer ...' for the node an ONNX Runtime error names."""
    match = _NODE.search(message)
    if match is None:
        return ""
    named = match.group(1)  # ONNX Runtime may add a suffix to a node it fused
    best = max(
        (n for n in graph.model.graph.all_nodes() if n.name and named.startswith(n.name)),
        key=lambda n: len(n.name or ""),
        default=None,
    )
    return "" if best is None else f" in {best.op_type} of {layer_of(best)}"


def _baked(graph: Graph, sizes: dict[str, int], names: list[str]) -> str:
    """'; a shape constant holds ...' naming layers whose shape constants hold an example size."""
    example = {sizes[n] for n in names if sizes[n] > 1}
    suspects: list[str] = []
    for node in graph.model.graph.all_nodes():
        if node.op_type not in _SIZE_OPS:
            continue
        for value in node.inputs[1:]:
            const = None if value is None else value.const_value
            if const is None or const.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
                continue
            if example & {int(v) for v in np.asarray(const.numpy()).ravel()}:
                layer = layer_of(node)
                if layer not in suspects:
                    suspects.append(layer)
    return f"; a shape constant holds the example size in {', '.join(suspects[:3])}" if suspects else ""  # fmt: skip


def _static_dim(dim: Any, static: Mapping[str, int]) -> Any:
    """`dim` with the names of `static` replaced by their sizes: an int where the result
    is arithmetic of numbers only ("2*batch" -> 6), else the dim as it was."""
    if not isinstance(dim, ir.SymbolicDim) or dim.value is None:
        return dim
    if dim.value in static:
        return static[dim.value]
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in static) + r")\b")
    text = pattern.sub(lambda m: str(static[m.group(1)]), dim.value)
    if text == dim.value or not _ARITHMETIC.match(text):
        return dim
    try:
        value = eval(text, {"__builtins__": {}}, {})  # digits and + - * / ( ) only
    except (SyntaxError, ZeroDivisionError):
        return dim
    return int(value) if float(value).is_integer() else dim


def made_static(graph: Graph, static: Mapping[str, int]) -> Graph:
    """A new Graph on the same model where each dim of `static` is the given size.

    >>> import onnx_ir as ir
    >>> x = ir.Value(name="x", shape=ir.Shape(["batch", 4]), type=ir.TensorType(ir.DataType.FLOAT))
    >>> y = ir.node("Identity", [x]).outputs[0]
    >>> y.shape, y.type = ir.Shape(["2*batch"]), x.type
    >>> g = made_static(Graph(ir.Model(ir.Graph([x], [y], nodes=[y.producer()]), ir_version=10)), {"batch": 3})
    >>> g.model.graph.inputs[0].shape, g.model.graph.outputs[0].shape
    (Shape([3, 4]), Shape([6]))
    """
    if not static:
        return graph
    model = graph.model

    def fix(value: ir.Value) -> None:
        if value.shape is None:
            return
        dims = [_static_dim(d, static) for d in value.shape]
        if dims != list(value.shape):
            value.shape = ir.Shape(dims)

    for value in [*model.graph.inputs, *model.graph.outputs]:
        fix(value)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            fix(value)
    return Graph(model)
