"""Provenance of a torch.onnx export, rewritten into interop's key scheme.

torch.onnx leaves on every node the module path, class hierarchy and stack trace that
produced it (``pkg.torch.onnx.*`` metadata). `record_provenance` turns them into
``interop.scope`` / ``interop.location`` and the layer table (the module tree, calls
of a module a second time included), and records parameter kinds and the source;
`rename_dims` and `name_outputs` name symbolic dims and graph outputs after the
source, and `restore_dropout` turns the Identity that eval-mode dropout exports as
back into an ONNX Dropout.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from interop import provenance

TORCH_DIR = torch.__file__.rsplit("/", 1)[0]
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_KEYS = ("pkg.torch.onnx.", "namespace")


def fx_provenance(exported: torch.export.ExportedProgram, op: str) -> tuple[str | None, str | None]:
    """Module path and user file:line of the first fx node calling `op`."""
    for node in exported.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(op.split(".default")[0]):
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            return _clean_path(path), _location(node.meta.get("stack_trace"))
    return None, None


def _clean_path(path: str) -> str:
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")


def _location(stack_trace: str | None) -> str | None:
    if not stack_trace:
        return None
    frames = [(f, line) for f, line in _FRAME.findall(stack_trace) if not f.startswith(TORCH_DIR)]
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else None


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _layer_records(module: torch.nn.Module) -> list[provenance.LayerRecord]:
    records = [provenance.LayerRecord("", _qualname(module), None)]
    stack: list[int] = []

    def visit(parent: torch.nn.Module, path: str) -> None:
        stack.append(id(parent))
        for name, child in parent._modules.items():
            if child is None or id(child) in stack:
                continue
            child_path = f"{path}.{name}" if path else name
            records.append(provenance.LayerRecord(child_path, _qualname(child), path))
            visit(child, child_path)
        stack.pop()

    visit(module, "")
    return records


def _parse_list(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        value = ast.literal_eval(raw)  # a repr of a list of strings; literal_eval runs no code
    except (ValueError, SyntaxError):
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def record_provenance(model: ir.Model, module: torch.nn.Module) -> None:
    records = _layer_records(module)
    known = {r.path for r in records}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        props = node.metadata_props
        scopes = _parse_list(props.get("pkg.torch.onnx.name_scopes"))
        classes = _parse_list(props.get("pkg.torch.onnx.class_hierarchy"))
        location = _location(props.get("pkg.torch.onnx.stack_trace"))
        for key in [k for k in props if k.startswith(_TORCH_KEYS)]:
            del props[key]
        # the last entry names the aten op itself; hook frames are not modules
        modules = [m for m in scopes[:-1] if not m.startswith("_empty_nn_module_stack")]
        path = modules[-1] if modules else ""
        props[provenance.SCOPE] = path
        if location:
            props[provenance.LOCATION] = location
        for depth, scope in enumerate(modules):
            if scope not in known and depth < len(classes):  # e.g. a second call "blocks.0@1"
                known.add(scope)
                parent = modules[depth - 1] if depth else None
                records.append(provenance.LayerRecord(scope, classes[depth], parent))
    provenance.write_layers(model, records)

    kinds: dict[str, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        kinds[name] = provenance.TRAINABLE if param.requires_grad else provenance.FROZEN
    for name, _ in module.named_buffers(remove_duplicate=False):
        kinds[name] = provenance.BUFFER
    present = model.graph.initializers
    provenance.write_parameters(model, {n: k for n, k in kinds.items() if n in present})
    provenance.write_source(
        model,
        {
            "framework": "torch",
            "version": torch.__version__,
            "class": _qualname(module),
            "parameters": sum(p.numel() for p in module.parameters()),
            "buffers": sum(b.numel() for b in module.buffers()),
        },
    )


def rename_dims(
    model: ir.Model,
    dims: dict[str, dict[int, str]],
    sizes: Mapping[str, tuple[int, ...]] | None = None,
) -> None:
    """Give symbolic dims the names asked for ("batch") instead of torch's ("s77").

    `sizes` holds each input's example shape: a name asked for on dims whose example sizes
    differ (a batch of 4 beside a vector of 8) would claim them equal, so such a dim is
    named ``<name>_<input>`` instead."""
    mapping: dict[str, str] = {}
    named_size: dict[str, int] = {}
    for value in model.graph.inputs:
        for axis, name in dims.get(value.name or "", {}).items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in mapping:
                size = (sizes or {}).get(value.name or "", ())[axis : axis + 1]
                if size and named_size.setdefault(name, size[0]) != size[0]:
                    name = f"{name}_{value.name}"
                mapping[dim.value] = name
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in mapping) + r")\b")

    def rename(value: ir.Value) -> None:
        if value.shape is None:
            return
        new_dims = [
            ir.SymbolicDim(pattern.sub(lambda m: mapping[m.group(1)], d.value))
            if isinstance(d, ir.SymbolicDim) and d.value
            else d
            for d in value.shape
        ]
        value.shape = ir.Shape(new_dims)

    for value in model.graph.inputs:
        rename(value)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            rename(value)


def name_outputs(model: ir.Model, names: list[str]) -> None:
    """Name graph outputs after the model's output structure ("logits", "cache.0.key")."""
    graph = model.graph
    if len(names) != len(graph.outputs):
        return
    seen: set[int] = set()
    for index, value in enumerate(list(graph.outputs)):
        if id(value) in seen or value.is_graph_input():
            # the same tensor returned twice, or an input returned as is: ONNX needs a
            # distinct value per output name
            copy = ir.Node(
                "", "Identity", inputs=[value], num_outputs=1, name=f"output_copy_{index}"
            )
            copy.outputs[0].shape, copy.outputs[0].dtype = value.shape, value.dtype
            graph.append(copy)
            value = graph.outputs[index] = copy.outputs[0]
        seen.add(id(value))
    taken = {v.name: v for v in graph.inputs}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            taken[v.name or ""] = v
    for value, name in zip(graph.outputs, names):
        if value.name == name:
            continue
        other = taken.get(name)
        if other is not None and other is not value and other.is_graph_input():
            name = f"{name}_output"  # inputs keep their names: they are the signature
            other = taken.get(name)
        if other is not None and other is not value:
            other.name = f"{name}__{len(taken)}"
            taken[other.name] = other
        taken.pop(value.name or "", None)
        value.name = name
        taken[name] = value


def restore_dropout(model: ir.Model, module: torch.nn.Module) -> None:
    """Eval-mode dropout exports as Identity; make it an ONNX Dropout (identity at inference)."""
    dropouts = {
        path: m
        for path, m in module.named_modules()
        if isinstance(m, torch.nn.modules.dropout._DropoutNd)
    }
    if not dropouts:
        return
    graph = model.graph
    for node in list(graph):
        path = node.metadata_props.get(provenance.SCOPE, "")
        if node.op_type != "Identity" or path not in dropouts:
            continue
        ratio = ir.Value(
            name=f"{path}.ratio", const_value=ir.tensor(np.array(dropouts[path].p, np.float32))
        )
        if ratio.name in graph.initializers:
            ratio = graph.initializers[ratio.name]
        else:
            graph.register_initializer(ratio)
        replacement = ir.Node(
            "", "Dropout", inputs=[node.inputs[0], ratio], num_outputs=1, name=node.name
        )
        replacement.metadata_props.update(node.metadata_props)
        old, new = node.outputs[0], replacement.outputs[0]
        new.shape, new.dtype = old.shape, old.dtype
        name = old.name
        ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], [old], [new])
        new.name = name
