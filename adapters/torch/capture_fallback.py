"""What `interop.trace` tries when torch.export (or torch.onnx's translation of it) fails.

Measured on transformers 5 with tiny random configs (docs/capture-torch.md): every
mixture-of-experts model exports, but its default expert dispatch is a custom op
(``transformers::grouped_mm_fallback``) that torch.onnx cannot translate, and the
``eager`` dispatch loops in Python over the experts ``nonzero()`` found (a data-dependent
shape: torch.export stops). Hence, in order:

1. the plain capture (torch.export, dynamic batch and the dims asked for), with the
   rewrites registered ``upfront`` (patterns the plain capture can never take:
   transformers' experts layers as their gather formulation) bound to the submodules
   they match (`capture_rewrites`);
2. the same with every registered rewrite that matches some submodule;
3. the TorchScript exporter (``torch.onnx.export(dynamo=False)``), which traces one run
   and bakes Python control flow on tensor values into the graph. Its graph is accepted
   only if it reproduces the eager outputs on the example and on a second input of
   another batch and length (every dynamic dim grown, new values); otherwise refused.

The layer tree survives every path: the TorchScript exporter names each node after the
module scope that made it (``/model/layers.0/mlp/MatMul``), which becomes the same
``name_scopes`` metadata torch.onnx writes, so one provenance pass serves both; weights
keep their state-dict names (constant folding off, merged equal tensors split again).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from .capture_returns import submodule_hooks

RTOL, ATOL = 1e-4, 1e-5


class ModuleStack:
    """The submodule that was running when a trace failed (forward pre-hooks push its path;
    forward hooks pop it, and a raising forward never pops)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.stack: list[str] = []

    def recording(self) -> contextlib.AbstractContextManager[None]:
        self.stack.clear()
        return submodule_hooks(self.module, pre_hook=self._push, hook=self._pop)

    def _push(self, path: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self.stack.append(path)

        return hook

    def _pop(self, path: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1] == path:
                self.stack.pop()

        return hook

    def failed_in(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def reset(self) -> None:
        self.stack.clear()


# ------------------------------------------------------------------------- second input
def grown_sizes(
    leaves: Mapping[str, torch.Tensor], dims: Mapping[str, Mapping[int, str]]
) -> dict[str, int]:
    """Per dynamic dim name, a size other than the example's (batch + 1, others + 3)."""
    sizes: dict[str, int] = {}
    for name, axes in dims.items():
        tensor = leaves.get(name)
        if tensor is None:
            continue
        for axis, dim in axes.items():
            if dim not in sizes:
                sizes[dim] = int(tensor.shape[axis]) + (1 if dim == "batch" else 3)
    return sizes


def second_leaves(
    leaves: Mapping[str, torch.Tensor], dims: Mapping[str, Mapping[int, str]]
) -> dict[str, torch.Tensor]:
    """Other values, and other sizes on every dynamic dim, for each example tensor.

    Integer tensors keep their range (token ids stay in the vocabulary; a 0/1 mask
    becomes all ones, a mask every model accepts), float tensors are standard normal.
    """
    sizes = grown_sizes(leaves, dims)
    generator = torch.Generator().manual_seed(1234)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in leaves.items():
        shape = list(tensor.shape)
        for axis, dim in dims.get(name, {}).items():
            shape[axis] = sizes[dim]
        if tensor.dtype == torch.bool:
            out[name] = torch.ones(shape, dtype=torch.bool)
        elif tensor.dtype.is_floating_point:
            out[name] = torch.randn(shape, generator=generator).to(tensor.dtype)
        elif tensor.numel() and int(tensor.min()) >= 0 and int(tensor.max()) <= 1:
            out[name] = torch.ones(shape, dtype=tensor.dtype)
        else:
            low = int(tensor.min()) if tensor.numel() else 0
            high = int(tensor.max()) + 1 if tensor.numel() else 2
            out[name] = torch.randint(low, max(high, low + 1), shape, generator=generator).to(
                tensor.dtype
            )
    return out


# ---------------------------------------------------------------------- TorchScript path
@contextlib.contextmanager
def _positional_forward(
    module: torch.nn.Module, names: list[str], call: Callable[[dict[str, Any]], Any]
) -> Iterator[None]:
    """forward(*tensors) in `names` order -> call({name: tensor}); the exporter wants positions."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")

    def forward(*tensors: Any) -> Any:
        return call(dict(zip(names, tensors)))

    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            module.forward = previous  # type: ignore[method-assign]
        else:
            del module.forward


def torchscript_model(
    module: torch.nn.Module,
    leaves: dict[str, torch.Tensor],
    call: Callable[[dict[str, Any]], Any],
    dims: Mapping[str, Mapping[int, str]],
    output_names: list[str],
) -> tuple[ir.Model, list[str]]:
    """Export through the TorchScript exporter; nodes carry torch.onnx's scope metadata.
    Also the source lines where its tracer turned a tensor into a Python value."""
    names = list(leaves)
    buffer = io.BytesIO()
    with _positional_forward(module, names, call), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            tuple(leaves[n] for n in names),
            buffer,
            dynamo=False,
            input_names=names,
            output_names=output_names or None,
            dynamic_axes={n: dict(axes) for n, axes in dims.items() if n in leaves} or None,
            do_constant_folding=False,  # folding renames transposed weights
        )
    baked = []
    for w in seen:
        if not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif "Python boolean" in str(w.message) or "Python float" in str(w.message):
            baked.append(f"{w.filename}:{w.lineno}")  # a branch the example took, kept
    model = ir.from_proto(onnx.load_from_string(buffer.getvalue()))
    _split_merged_weights(model, module)
    _scopes_from_names(model, module)
    return model, sorted(set(baked))


def value_variants(leaves: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Inputs of the example's shapes with other values, chosen to flip value branches
    (``if x.sum() > 0``): negated, scaled, zero and fresh normal floats; reversed
    integer tensors (token ids stay in range)."""
    generator = torch.Generator().manual_seed(4321)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator).to(t.dtype)

    changes = (torch.neg, lambda t: t * 4.0 + 1.0, torch.zeros_like, fresh)
    variants = []
    for change in changes:
        variants.append(
            {
                n: change(t) if t.dtype.is_floating_point else torch.flip(t, [-1]) if t.ndim else t
                for n, t in leaves.items()
            }
        )  # fmt: skip
    return variants


def _split_merged_weights(model: ir.Model, module: torch.nn.Module) -> None:
    """The exporter keeps one copy of equal weights (all-ones norms) and reads the others
    through Identity nodes named after them; give each parameter its own initializer."""
    graph = model.graph
    state = dict(module.state_dict(keep_vars=True))
    for node in list(graph):
        if node.op_type != "Identity" or not node.inputs or node.inputs[0] is None:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if source.const_value is None or source.name not in graph.initializers:
            continue
        if out.name not in state or out.name in graph.initializers:
            continue
        copy = ir.Value(name=out.name, shape=source.shape, type=source.type)
        copy.const_value = source.const_value
        graph.register_initializer(copy)
        out.replace_all_uses_with(copy)
        graph.remove(node, safe=True)


def _scopes_from_names(model: ir.Model, module: torch.nn.Module) -> None:
    """``/model/layers.0/mlp/MatMul`` -> torch.onnx's ``name_scopes`` / ``class_hierarchy``."""
    subs = dict(module.named_modules())
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        parts = (node.name or "").strip("/").split("/")[:-1]
        scopes, classes, path = [], [], ""
        for part in parts:
            candidate = f"{path}.{part}" if path else part
            if candidate not in subs:
                break
            path = candidate
            scopes.append(path)
            classes.append(f"{type(subs[path]).__module__}.{type(subs[path]).__qualname__}")
        node.metadata_props["pkg.torch.onnx.name_scopes"] = repr([*scopes, node.op_type])
        node.metadata_props["pkg.torch.onnx.class_hierarchy"] = repr(classes)


def mismatch(
    run_graph: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
    run_eager: Callable[[dict[str, torch.Tensor]], list[np.ndarray]],
    feeds: dict[str, torch.Tensor],
) -> str | None:
    """None if the graph reproduces eager outputs on `feeds`, else what differs."""
    want = run_eager(feeds)
    got = run_graph({k: v.detach().cpu().numpy() for k, v in feeds.items()})
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for index, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape:
            return f"output {index} has shape {a.shape} instead of {b.shape}"
        if not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            error = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            return f"output {index} differs by up to {error:.3g}"
    return None


def describe(feeds: Mapping[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())


# ------------------------------------------------------------------------ orchestration
def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:400] + ("..." if len(text) > 400 else "")


def fallback(
    module: torch.nn.Module,
    first: Exception,
    failed_in: str | None,
    capture: Callable[[], tuple[ir.Model, dict[str, Any]]],
    leaves: dict[str, torch.Tensor],
    call: Callable[[dict[str, Any]], Any],
    dims: Mapping[str, Mapping[int, str]],
    output_names: list[str],
    upfront: Mapping[str, list[str]] | None = None,
) -> tuple[ir.Model, dict[str, Any], str]:
    """(model, module returns, capture path) from the first fallback that works, or the
    first error extended with the module path and what was tried."""
    from .capture_rewrites import REWRITES, matching, rewritten

    tried: list[str] = []
    hits = matching(module)
    if hits and hits == dict(upfront or {}):
        spelled = "; ".join(f"{n} on {', '.join(p[:3])}" for n, p in hits.items())
        tried.append(f"the module rewrites ({spelled}) were applied on the first attempt")
    elif hits:
        spelled = "; ".join(f"{n} on {', '.join(p[:3])}" for n, p in hits.items())
        try:
            with rewritten(module):
                model, returned = capture()
            return model, returned, "torch.export with rewrites " + ", ".join(hits)
        except Exception as err:
            tried.append(f"torch.export with the module rewrites ({spelled}): {_reason(err)}")
    else:
        known = ", ".join(REWRITES) or "none"
        tried.append(f"module rewrites: none of the registered ones ({known}) matches a submodule")

    try:
        with rewritten(module):  # exact rewrites help the TorchScript exporter too
            model, note = _torchscript(module, leaves, call, dims, output_names)
        if note is None:
            return model, {}, "torchscript"
        tried.append(f"the TorchScript exporter: refused, {note}")
    except Exception as err:
        tried.append(f"the TorchScript exporter: {_reason(err)}")

    text = str(first)
    head, _, rest = text.partition("\n")
    name = type(module).__name__
    if failed_in and f"could not trace {name}" in head:
        head = head.replace(
            f"could not trace {name}", f"could not trace {name} in module '{failed_in}'", 1
        )
    elif failed_in and f"'{failed_in}'" not in head:
        head += f" (in module '{failed_in}')"
    lines = [head, *(f"Tried after it: {t}" for t in tried)]
    extended = "\n".join([*lines, rest] if rest else lines)
    first.args = (extended,)
    first.tried = tried  # type: ignore[attr-defined]
    first.module_path = failed_in  # type: ignore[attr-defined]
    return _raise(first)


def _raise(err: Exception) -> Any:
    raise err from None


def _torchscript(
    module: torch.nn.Module,
    leaves: dict[str, torch.Tensor],
    call: Callable[[dict[str, Any]], Any],
    dims: Mapping[str, Mapping[int, str]],
    output_names: list[str],
) -> tuple[ir.Model, str | None]:
    """The TorchScript export, and why it is refused (None: accepted)."""
    import onnxruntime as ort

    def run_eager(feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.detach().cpu().numpy() for t in call(feeds)]

    run_eager(leaves)  # names the outputs (output_names) before the export
    model, baked = torchscript_model(module, leaves, call, dims, output_names)
    session = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    wanted = [i.name for i in session.get_inputs()]

    def run_graph(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(session.run(None, {k: v for k, v in feeds.items() if k in wanted}))

    tries: list[tuple[dict[str, torch.Tensor], str | None]] = [
        (leaves, "the example input"),
        (second_leaves(leaves, dims), None),
    ]
    if baked:  # the graph holds the branches the example took: inputs that may flip them
        where = ", ".join(baked[:3])
        tries += [(v, f"the example's shapes with other values (branch at {where})") for v in value_variants(leaves)]  # fmt: skip
    for feeds, label in tries:
        problem = mismatch(run_graph, run_eager, feeds)
        if problem:
            label = label or f"a second input ({describe(feeds)})"
            return model, (
                f"its graph does not reproduce the model on {label}: {problem} (the exporter "
                "bakes Python control flow on tensor values into the graph)"
            )
    return model, None
