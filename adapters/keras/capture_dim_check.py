"""A declared dynamic dimension must hold: checked once before `trace` returns.

The graph is run on ONNX Runtime at a second size of its dynamic dimensions (the example
grown by one along them, by repeating it, or shrunk by one, by slicing it) and compared
with the Keras model at the same inputs. All dimensions are changed together first, so a
graph that holds costs one Keras call and one graph run (whose ONNX Runtime session the
graph keeps for later runs). A dimension that does not hold (a run error, another output
shape, other numbers) is declared static, at the example's size, with a warning naming
the dimension and the layer of the node that failed. Sizes the Keras model itself cannot
run (a ViT's patch grid, a position table) are not held against the graph.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import onnx_ir as ir

from interop import provenance
from interop.graph import Graph

_NODE = re.compile(r"node\. Name:'([^']+)'")
_SIZE_OPS = {"Reshape", "Expand", "Tile", "ConstantOfShape", "Slice", "Range", "Split"}


def dynamic_axes(graph: ir.Graph) -> dict[str, list[tuple[int, int]]]:
    """Symbolic dim name -> the (input index, axis) pairs that declare it."""
    dims: dict[str, list[tuple[int, int]]] = {}
    for index, value in enumerate(graph.inputs):
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                dims.setdefault(dim.value, []).append((index, axis))
    return dims


def _resized(array: np.ndarray, axis: int, size: int) -> np.ndarray:
    """`array` sliced or repeated (cyclically) to `size` along `axis`; zeros when the
    example's axis is empty (keras_hub SAM's prompt without boxes)."""
    if array.shape[axis] == 0:
        shape = list(array.shape)
        shape[axis] = size
        return np.zeros(shape, array.dtype)
    return np.take(array, np.arange(size) % array.shape[axis], axis=axis)


def _sizes(example: int) -> list[int]:
    return [example + 1] + ([example - 1] if example > 1 else [])


def check_dynamic_dims(
    graph: Graph,
    run_source: Any,
    examples: list[np.ndarray],
    *,
    model_name: str,
) -> Graph:
    """`graph`, or a copy whose failing dynamic dims are static (with a warning each).

    ``run_source(flat_inputs)`` runs the Keras model on flat numpy inputs and returns its
    flattened ``[(name, array)]`` outputs, named as the graph's.
    """
    dims = dynamic_axes(graph.model.graph)
    if not dims:
        return graph
    examples = [np.asarray(e) for e in examples]
    sizes = {name: examples[i].shape[axis] for name, [(i, axis), *_] in dims.items()}
    verdict = _try(graph, run_source, examples, dims, list(dims), sizes)
    if verdict is None or not holds_at_example(graph, run_source, examples):
        return graph  # holds; or wrong at any size, which interop.verify reports
    failing: dict[str, str] = {}
    for name in dims if len(dims) > 1 else []:
        reason = _try(graph, run_source, examples, dims, [name], sizes)
        if reason is not None:
            failing[name] = reason
    if len(dims) == 1 or not failing:  # only together (or alone) do they fail
        failing = dict.fromkeys(dims, verdict)
    for name, reason in failing.items():
        warnings.warn(
            f"interop: Keras model '{model_name}': the dynamic dimension '{name}' does not "
            f"hold ({reason}); the graph declares it static, of size {sizes[name]}",
            stacklevel=4,
        )
    return _made_static(graph, {name: sizes[name] for name in failing})


def _try(
    graph: Graph,
    run_source: Any,
    examples: list[np.ndarray],
    dims: dict[str, list[tuple[int, int]]],
    names: list[str],
    sizes: dict[str, int],
) -> str | None:
    """None when the graph matches Keras at a second size of `names` (or Keras cannot
    run any); else why not."""
    for step in range(2):
        inputs = list(examples)
        new: dict[str, int] = {}
        for name in names:
            options = _sizes(sizes[name])
            new[name] = options[min(step, len(options) - 1)]
            for i, axis in dims[name]:
                inputs[i] = _resized(inputs[i], axis, new[name])
        try:
            want = run_source(inputs)
        except Exception:
            continue  # the source cannot run at this size either
        at = ", ".join(f"{n}={s}" for n, s in new.items())
        try:
            got = graph.run(*inputs, as_dict=True)
        except Exception as err:
            text = f"{err} {err.__cause__ or ''}"
            return f"at {at} the graph fails{_where(graph, text)}: {_first_line(err)}{_baked(graph, sizes, names)}"  # fmt: skip
        differs = _differs(got, want)
        return None if differs is None else f"at {at} {differs}{_baked(graph, sizes, names)}"
    return None


def _differs(got: dict[str, Any], want: list[tuple[str, np.ndarray]]) -> str | None:
    # by position, as interop.verify: a graph output may be renamed (one returning an
    # input under the input's name)
    for (name, expected), actual in zip(want, got.values(), strict=True):
        actual = np.asarray(actual)
        if actual.shape != expected.shape:
            return f"output '{name}' has shape {actual.shape}, Keras {expected.shape}"
        scale = float(np.max(np.abs(expected), initial=1.0))
        if not np.allclose(actual, expected, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
            gap = float(np.max(np.abs(actual.astype(np.float64) - expected)))
            return f"output '{name}' differs from Keras by {gap:.3g}"
    return None


def holds_at_example(graph: Graph, run_source: Any, examples: list[np.ndarray]) -> bool:
    """Whether the graph matches Keras at the example itself (else the dims are not to blame)."""
    try:
        return _differs(graph.run(*examples, as_dict=True), run_source(examples)) is None
    except Exception:
        return False


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _layer_of(node: ir.Node) -> str:
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
        (n for n in graph.model.graph if n.name and named.startswith(n.name)),
        key=lambda n: len(n.name or ""),
        default=None,
    )
    return "" if best is None else f" in {best.op_type} of {_layer_of(best)}"


def _baked(graph: Graph, sizes: dict[str, int], names: list[str]) -> str:
    """'; likely at ...' naming layers whose shape constants hold an example size."""
    example = {sizes[n] for n in names if sizes[n] > 1}
    suspects: list[str] = []
    for node in graph.model.graph:
        if node.op_type not in _SIZE_OPS:
            continue
        for value in node.inputs[1:]:
            const = None if value is None else value.const_value
            if const is None or const.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
                continue
            if example & {int(v) for v in np.asarray(const.numpy()).ravel()}:
                layer = _layer_of(node)
                if layer not in suspects:
                    suspects.append(layer)
    return f"; a shape constant holds the example size in {', '.join(suspects[:3])}" if suspects else ""  # fmt: skip


def _made_static(graph: Graph, static: dict[str, int]) -> Graph:
    """A new Graph on the same model where each dim of `static` is its example size."""
    model = graph.model

    def fix(value: ir.Value) -> None:
        if value.shape is None:
            return
        dims = [
            static[d.value] if isinstance(d, ir.SymbolicDim) and d.value in static else d
            for d in value.shape
        ]
        if dims != list(value.shape):
            value.shape = ir.Shape(dims)

    for value in [*model.graph.inputs, *model.graph.outputs]:
        fix(value)
    for node in model.graph:
        for value in node.outputs:
            fix(value)
    return Graph(model)
