"""`Graph.view()` / ``interop view``: an interactive view of a graph in Google's Model Explorer.

Model Explorer (``pip install 'interop-graph[explorer]'``, package ``ai-edge-model-explorer``)
lays out graphs of many thousand nodes in the browser (WebGL) and collapses them by
namespace, which is what a large model needs where a static `plot()` stops being
readable. The graph is built with its Python graph builder (`model_explorer.graph_builder`):

- one namespace per layer path: the layer tree as nested, collapsible groups (a namespace
  is the chain of layer names from the top, ``blocks/0/fc`` for ``blocks.0.fc``);
- one node per ONNX node (plumbing of shapes and constants hidden, as in `plot()`), its
  attributes, weights and source line as node attributes, shapes and dtypes of every
  output (``tensor_shape``: shown on the edges) and the ONNX value name (``tensor_name``);
- each layer's class, parameter count and output shapes as attributes of its group;
- a `compare` report as node data: the error of every compared layer output, keyed by
  the value name, on a colour scale ("max abs error"), and the report's verdict
  ("beyond tolerance": 1, red, where a value is beyond it; 0, green, within).

`view()` serves the page from a local server in a background thread; in Jupyter it
returns an inline frame (in Colab, Model Explorer embeds itself). Nothing here imports
Model Explorer until a view is asked for: it stays an optional extra.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from . import provenance
from .errors import MissingDependencyError
from .hierarchy import Layer

if TYPE_CHECKING:
    from .compare import CompareReport
    from .graph import Graph

GRAPH_ID = "main"


def _explorer() -> Any:
    try:
        import model_explorer
        from model_explorer import graph_builder, node_data_builder  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "ai-edge-model-explorer", extra="explorer", purpose="view graphs in Model Explorer"
        ) from err
    return model_explorer


def namespaces(graph: Graph) -> dict[str, str]:
    """Layer path -> Model Explorer namespace (the chain of layer names, joined by "/")."""
    out: dict[str, str] = {"": ""}
    for layer in graph.root.walk():
        if layer.parent is None:
            continue
        parent = layer.parent.path
        name = (
            layer.path[len(parent) + 1 :]
            if parent and layer.path.startswith(parent)
            else layer.path
        )
        name = name.replace("/", ".") or "_"  # a "/" inside one name would split the group
        out[layer.path] = f"{out[parent]}/{name}" if out[parent] else name
    return out


def _tensor_shape(value: Any) -> str:
    dtype = value.dtype.numpy().name if value.dtype is not None else "?"
    if value.shape is None:
        return f"{dtype}[?]"
    dims = [
        str(d) if isinstance(d, int) else str(getattr(d, "value", None) or "?") for d in value.shape
    ]
    return f"{dtype}[{','.join(dims)}]"


def _attribute_text(attr: Any) -> str:
    text = str(attr.value)
    return text if len(text) <= 200 else text[:197] + "..."


def build_graph(graph: Graph) -> Any:
    """The Model Explorer graph (`model_explorer.graph_builder.Graph`) of `graph`."""
    gb = _explorer().graph_builder
    tree = graph.tree
    spaces = namespaces(graph)
    # a layer of one node stays a group: its path is what the view is for
    me = gb.Graph(id=GRAPH_ID, layoutConfigs=gb.LayoutConfigs(keepLayersWithASingleChild=True))
    ids: dict[int, str] = {}
    outputs_of: dict[int, tuple[str, str]] = {}  # id(value) -> (node id, output index)
    from .legacy import data_inputs

    for i, value in enumerate(data_inputs(graph.model.graph)):
        node = gb.GraphNode(id=f"input_{i}", label=f"Input {value.name}", namespace="")
        node.outputsMetadata.append(_metadata(gb, "0", value))
        me.nodes.append(node)
        outputs_of[id(value)] = (node.id, "0")
    for index, onnx_node in enumerate(graph.model.graph):
        if id(onnx_node) in tree.plumbing:
            continue
        layer = tree.resolve(provenance.node_scope(onnx_node))
        node = gb.GraphNode(
            id=f"n{index}", label=onnx_node.op_type, namespace=spaces.get(layer.path, "")
        )
        ids[id(onnx_node)] = node.id
        node.attrs.append(gb.KeyValue(key="name", value=onnx_node.name or ""))
        node.attrs.append(gb.KeyValue(key="layer", value=layer.path))
        location = provenance.node_location(onnx_node)
        if location:
            node.attrs.append(gb.KeyValue(key="source", value=location))
        for name, attr in onnx_node.attributes.items():
            node.attrs.append(gb.KeyValue(key=name, value=_attribute_text(attr)))
        for position, read in enumerate(onnx_node.inputs):
            if read is None:
                continue
            value = read
            if value.is_initializer():
                node.attrs.append(
                    gb.KeyValue(
                        key=f"weight {position}", value=f"{value.name}: {_tensor_shape(value)}"
                    )
                )
                continue
            source = outputs_of.get(id(value))
            if source is not None:
                node.incomingEdges.append(
                    gb.IncomingEdge(
                        sourceNodeId=source[0],
                        sourceNodeOutputId=source[1],
                        targetNodeInputId=str(position),
                    )
                )
        for position, value in enumerate(onnx_node.outputs):
            node.outputsMetadata.append(_metadata(gb, str(position), value))
            outputs_of[id(value)] = (node.id, str(position))
        me.nodes.append(node)
    for i, value in enumerate(graph.model.graph.outputs):
        node = gb.GraphNode(id=f"output_{i}", label=f"Output {value.name}", namespace="")
        source = outputs_of.get(id(value))
        if source is not None:
            node.incomingEdges.append(
                gb.IncomingEdge(sourceNodeId=source[0], sourceNodeOutputId=source[1])
            )
        me.nodes.append(node)
    me.groupNodeAttributes = {
        spaces[layer.path]: _layer_attributes(layer) for layer in tree.root.walk() if layer.path
    }
    return me


def _metadata(gb: Any, output_id: str, value: Any) -> Any:
    return gb.MetadataItem(
        id=output_id,
        attrs=[
            gb.KeyValue(key="tensor_name", value=str(value.name)),
            gb.KeyValue(key="tensor_shape", value=_tensor_shape(value)),
        ],
    )


def _layer_attributes(layer: Layer) -> dict[str, str]:
    return {
        "path": layer.path,
        "class": layer.qualified_class or layer.class_name,
        "parameters": f"{layer.param_count:,}",
        "outputs": ", ".join(layer.output_shapes) or "-",
    }


def overlay(graph: Graph, report: CompareReport) -> dict[str, float]:
    """The compared layers' errors by the name of the value they return in `graph`:
    ``{value name: max abs error}``, each output of each layer the report compared."""
    values: dict[str, float] = {}
    for row in report.layers:
        layer = graph.tree.by_path.get(row.path)
        if layer is None or not layer.returns:
            continue
        for value, check in zip(layer.returns, row.outputs):
            values.setdefault(str(value.name), check.max_abs_error)
    return values


def node_data(graph: Graph, report: CompareReport) -> dict[str, Any]:
    """The report as Model Explorer node data: {overlay name: ModelNodeData}."""
    nb = _explorer().node_data_builder
    errors = overlay(graph, report)
    beyond: dict[str, float] = {}
    for row in report.layers:
        layer = graph.tree.by_path.get(row.path)
        for value, check in zip(layer.returns if layer else [], row.outputs):
            beyond.setdefault(str(value.name), 0.0 if check.ok else 1.0)
    gradient = [nb.GradientItem(stop=0, bgColor="#c8e6c9"), nb.GradientItem(stop=0.5, bgColor="#fff59d"),
                nb.GradientItem(stop=1, bgColor="#ef9a9a")]  # fmt: skip
    abs_data = nb.GraphNodeData(
        results={k: nb.NodeDataResult(value=v) for k, v in errors.items()}, gradient=gradient
    )
    # 1 where the value is beyond atol + rtol * |reference| somewhere: the report's verdict
    beyond_data = nb.GraphNodeData(
        results={k: nb.NodeDataResult(value=v) for k, v in beyond.items()},
        thresholds=[
            nb.ThresholdItem(value=0, bgColor="#c8e6c9"),
            nb.ThresholdItem(value=1, bgColor="#ef9a9a"),
        ],  # fmt: skip
    )
    return {
        "max abs error": nb.ModelNodeData(graphsData={GRAPH_ID: abs_data}),
        "beyond tolerance": nb.ModelNodeData(graphsData={GRAPH_ID: beyond_data}),
    }


def config(graph: Graph, report: CompareReport | None = None) -> Any:
    """A `model_explorer` config holding the graph (and the report's overlays)."""
    me = _explorer()
    cfg = me.config()
    cfg.graphs_list.append({"graphs": [build_graph(graph)]})
    cfg.model_sources.append({"url": f"graphs://{graph.name}/{len(cfg.graphs_list) - 1}"})
    if report is not None:
        for name, data in node_data(graph, report).items():
            cfg.add_node_data(name, data)
    return cfg


# The page a view opens first: it turns on Model Explorer's "tensor shape" edge labels and
# keeps layers of one node as groups (choices the web app keeps in the browser's
# localStorage and offers no URL parameter for; the graph's own layoutConfigs flag is not
# read by the standalone app), unless the user chose otherwise before, then loads the app
# with the same query.
START_PAGE = "interop"
_EDGE_SETTING = "model_explorer_show_on_edge_item_v3"
_SETTINGS = "model_explorer_settings"
_START_HTML = f"""<!doctype html><script>
if (!localStorage.getItem("{_EDGE_SETTING}"))
  localStorage.setItem("{_EDGE_SETTING}", JSON.stringify({{type: "Tensor shape"}}));
const settings = JSON.parse(localStorage.getItem("{_SETTINGS}") || "{{}}");
if (!("keep_layers_with_a_single_child" in settings)) {{
  settings["keep_layers_with_a_single_child"] = true;  // a one-node layer stays a group
  localStorage.setItem("{_SETTINGS}", JSON.stringify(settings));
}}
location.replace("/" + location.search);
</script>"""


def _add_start_page(server: Any) -> None:
    """Make the Flask app `server.start` builds answer `START_PAGE` too (once per process).

    `server.start` creates its app inside; the `flask` it sees is swapped for a view of
    the real module whose `Flask` adds the route, so no other Flask app is affected."""
    import types

    import flask

    if getattr(server.flask, "_interop", False):
        return

    class App(flask.Flask):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.add_url_rule(f"/{START_PAGE}", START_PAGE, lambda: _START_HTML)

    class Flask(types.ModuleType):
        _interop = True

        def __getattr__(self, name: str) -> Any:
            return getattr(flask, name)

    shim = Flask("flask")
    shim.Flask = App  # type: ignore[attr-defined]
    server.flask = shim


def _no_version_check(print_msg: bool = True) -> dict[str, str]:
    return {"version": "", "runningVersion": "", "releaseUrl": "", "desktopAppUrl": ""}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host != "localhost" else "127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(
    graph: Graph,
    report: CompareReport | None = None,
    *,
    host: str = "localhost",
    port: int | None = None,
) -> str:
    """Start a local Model Explorer server for `graph` in a daemon thread; its page's URL."""
    _explorer()
    from model_explorer import server

    # Model Explorer asks PyPI and GitHub for a newer release when it starts and when the
    # page loads: a view of a local model stays local (and offline machines do not wait)
    server._check_new_version = _no_version_check  # type: ignore[attr-defined]
    _add_start_page(server)
    cfg = config(graph, report)
    port = port or _free_port(host)
    thread = threading.Thread(
        target=server.start,
        kwargs={"host": host, "port": port, "config": cfg, "no_open_in_browser": True},
        daemon=True,
        name=f"model-explorer-{port}",
    )
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                break
        time.sleep(0.1)
    return f"http://{host}:{port}/{START_PAGE}?data={cfg.to_url_param_value()}"


def view(
    graph: Graph,
    report: CompareReport | None = None,
    *,
    host: str = "localhost",
    port: int | None = None,
    open_browser: bool = True,
    height: int = 800,
) -> Any:
    """Open `graph` in Model Explorer; see `Graph.view`."""
    if "google.colab" in sys.modules:  # Model Explorer embeds itself in the cell
        _explorer()
        from model_explorer import server

        server._check_new_version = _no_version_check  # type: ignore[attr-defined]
        server.start(host=host, port=port or 8080, config=config(graph, report))
        return None
    url = serve(graph, report, host=host, port=port)
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":  # a notebook
        from IPython.display import IFrame

        return IFrame(url, width="100%", height=height)
    if open_browser:
        import webbrowser

        webbrowser.open_new_tab(url)
    return url
