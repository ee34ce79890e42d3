"""`Graph.plot()`: a graphviz drawing with one cluster per layer and shapes on the edges.

With ``depth=N`` every layer at depth N is drawn as one box (its inner ops hidden),
which keeps large graphs readable; without it every op is drawn inside the clusters
of the layers it belongs to.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import legacy, provenance
from .errors import MissingDependencyError
from .hierarchy import Layer, format_shape

if TYPE_CHECKING:
    import graphviz

    from .graph import Graph

_FORMATS = {"svg", "png", "pdf", "dot", "gv", "jpg", "jpeg"}


def build_digraph(graph: Graph, depth: int | None = None, rankdir: str = "TB") -> graphviz.Digraph:
    try:
        import graphviz
    except ImportError as err:
        raise MissingDependencyError("graphviz (Python package)", purpose="plot graphs") from err
    tree = graph.tree

    def collapsed(layer: Layer) -> Layer | None:
        if depth is None:
            return None
        chain = []
        while layer.parent is not None:
            chain.append(layer)
            layer = layer.parent
        chain.reverse()  # top-level first
        return chain[depth - 1] if 0 < depth <= len(chain) else None

    hidden = tree.plumbing
    # weights an old file also lists as graph inputs are weights, not input boxes
    data_inputs = legacy.data_inputs(graph.model.graph)
    # graphviz reads "a:b" as node a, port b, so ids are positions, never value names
    io_ids = {("in", v.name): f"in{i}" for i, v in enumerate(data_inputs)}
    io_ids.update({("out", v.name): f"out{i}" for i, v in enumerate(graph.model.graph.outputs)})

    def _io_id(kind: str, name: str | None) -> str:
        return io_ids[(kind, name)]

    layer_ids = {id(layer): i for i, layer in enumerate(tree.root.walk())}  # stable across runs
    unit_of: dict[int, str] = {}
    units: dict[str, tuple[str, Layer | None]] = {}  # unit id -> (label, enclosing layer)
    for index, node in enumerate(graph.model.graph):
        if id(node) in hidden:
            continue
        layer = tree.resolve(provenance.node_scope(node))
        box = collapsed(layer)
        if box is not None:
            unit = f"L{layer_ids[id(box)]}"
            units.setdefault(unit, (f"{box.path}\n{box.class_name}", box.parent))
        else:
            unit = f"N{index}"
            units[unit] = (f"{node.op_type}\n{node.name}", layer)
        unit_of[id(node)] = unit

    if len(units) > LARGE_GRAPH_NODES:
        warnings.warn(
            f"Plotting {len(units)} boxes: the drawing will be hard to read (raster images are "
            f"capped at {MAX_RASTER_PIXELS} px on their long side). Pass depth=1 or depth=2 "
            "to draw layers as single boxes, or browse the whole graph interactively with "
            "graph.view() (Model Explorer, extra 'explorer'; `interop view model.onnx`).",
            stacklevel=3,
        )
    dot = graphviz.Digraph(graph.name, graph_attr={"rankdir": rankdir, "fontname": "Helvetica"},
                           node_attr={"shape": "box", "style": "rounded,filled", "fillcolor": "#eef3fb",
                                      "fontname": "Helvetica", "fontsize": "10"},
                           edge_attr={"fontname": "Helvetica", "fontsize": "8"})  # fmt: skip
    members: dict[int, list[str]] = {}
    for unit, (_, enclosing) in units.items():
        members.setdefault(id(enclosing) if enclosing is not None else 0, []).append(unit)

    def emit_cluster(parent: Any, layer: Layer) -> None:
        for unit in members.get(id(layer), []):
            parent.node(unit, units[unit][0])
        for child in layer.children:
            if not _has_units(child, members):
                continue
            with parent.subgraph(name=f"cluster_{layer_ids[id(child)]}") as cluster:
                cluster.attr(label=f"{child.path} ({child.class_name})", style="rounded",
                             color="#7f8fa6", fontsize="9")  # fmt: skip
                emit_cluster(cluster, child)

    emit_cluster(dot, tree.root)
    for value in data_inputs:
        dot.node(
            _io_id("in", value.name),
            f"{value.name}\n{format_shape(value)}",
            shape="ellipse",
            fillcolor="#e8f5e9",
        )
    for value in graph.model.graph.outputs:
        dot.node(
            _io_id("out", value.name),
            f"{value.name}\n{format_shape(value)}",
            shape="ellipse",
            fillcolor="#fff3e0",
        )
    graph_inputs = {id(v) for v in data_inputs}
    # side outputs (a KV-cache write read outside its layer, not returned) draw dashed
    side = {id(v) for layer in tree.root.walk() for v in layer.side_outputs}
    side_labels: set[tuple[str, str, str]] = set()
    edges: set[tuple[str, str, str]] = set()
    for node in graph.model.graph:
        target = unit_of.get(id(node))
        if target is None:
            continue
        for read in node.inputs:
            if read is None or read.is_initializer():
                continue
            producer = read.producer()
            source = (
                _io_id("in", read.name)
                if id(read) in graph_inputs
                else unit_of.get(id(producer))
                if producer
                else None
            )
            if source and source != target:
                edges.add((source, target, format_shape(read)))
                if id(read) in side:
                    side_labels.add((source, target, format_shape(read)))
    for value in graph.model.graph.outputs:
        producer = value.producer()
        source = unit_of.get(id(producer)) if producer else _io_id("in", value.name)
        if source:
            edges.add((source, _io_id("out", value.name), format_shape(value)))
            if id(value) in side:
                side_labels.add((source, _io_id("out", value.name), format_shape(value)))
    for source, target, label in sorted(edges):
        if (source, target, label) in side_labels:
            dot.edge(source, target, label=f"{label} (side)", style="dashed")
        else:
            dot.edge(source, target, label=label)
    return dot


def _has_units(layer: Layer, members: dict[int, list[str]]) -> bool:
    return any(id(sub) in members for sub in layer.walk())


# Raster images are capped at this many pixels on their long side: a 2,000-node graph
# drawn top to bottom is otherwise a PNG 200,000 pixels tall that no viewer opens.
MAX_RASTER_PIXELS = 16_000
# Past this many drawn boxes a full plot stops being readable: warn and suggest depth=N.
LARGE_GRAPH_NODES = 1_000
_RASTER = {"png", "jpg", "jpeg"}
_DPI = 96  # Graphviz's default for raster output


def dot_binary() -> tuple[str, str] | None:
    """(path, kind) of the Graphviz renderer to use, or None when there is none.

    The system ``dot`` is preferred; otherwise the ``graphviz-pure`` command that pip
    installs with interop (a static port of Graphviz 16.1, svg/png/jpg but no pdf). It is
    looked up in this interpreter's scripts folder first, so a venv works without being
    activated (its bin need not be on PATH).
    """
    system = shutil.which("dot")
    if system:
        return system, "dot"
    name = "graphviz-pure.exe" if os.name == "nt" else "graphviz-pure"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate), "graphviz-pure"
    found = shutil.which("graphviz-pure")
    return (found, "graphviz-pure") if found else None


def render(source: str, fmt: str) -> bytes:
    """The dot source rendered to fmt by the system dot or graphviz-pure."""
    renderer = dot_binary()
    if renderer is None:
        raise MissingDependencyError(
            "a Graphviz renderer (the system 'dot' or the pip package graphviz-pure)",
            purpose="render plots",
            fix="pip install 'graphviz-pure>=0.2.2,<0.3' (interop depends on it; it may have "
            "been uninstalled), install Graphviz (apt-get install graphviz, brew install "
            "graphviz), or plot to a .dot file",
        )
    binary, kind = renderer
    if kind == "graphviz-pure" and fmt == "pdf":
        raise MissingDependencyError(
            "the system Graphviz 'dot' program",
            purpose="plot to PDF (the bundled renderer graphviz-pure writes svg, png and jpg)",
            fix="plot to .svg or .png, or install Graphviz (apt-get install graphviz, brew "
            "install graphviz)",
        )
    args = [binary, f"-T{fmt}"]
    if fmt in _RASTER:
        inches = MAX_RASTER_PIXELS / _DPI  # size only ever scales a drawing down
        args += [f"-Gsize={inches:g},{inches:g}", f"-Gdpi={_DPI}"]
    done = subprocess.run(args, input=source.encode("utf-8"), capture_output=True, check=False)
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode("utf-8", "replace").strip() or f"exit code {done.returncode}"
        raise RuntimeError(f"{kind} failed to render the plot as {fmt}: {message}")
    return done.stdout


def plot(graph: Graph, path: str | Path | None, depth: int | None = None, **kwargs: Any) -> Any:
    dot = build_digraph(graph, depth=depth, **kwargs)
    if path is None:
        return dot
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "svg"
    if fmt not in _FORMATS:
        raise ValueError(f"Cannot plot to '{path}': use one of .{', .'.join(sorted(_FORMATS))}")
    if fmt in ("dot", "gv"):
        path.write_text(dot.source)
        return path
    path.write_bytes(render(dot.source, fmt))
    return path


def render_svg(graph: Graph, depth: int | None = 1) -> str | None:
    if dot_binary() is None:
        return None
    return render(build_digraph(graph, depth=depth).source, "svg").decode("utf-8")
