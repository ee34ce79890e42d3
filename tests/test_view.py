"""Graph.view(): the Model Explorer graph (namespaces, shapes, parameter counts, overlay)
and, where a Chromium is installed, the page itself in a headless browser."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

import interop
from interop import explorer, plotting

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from test_compare import Net  # noqa: E402
from test_plotting import chain_graph  # noqa: E402

needs_explorer = pytest.mark.skipif(
    importlib.util.find_spec("model_explorer") is None,
    reason="ai-edge-model-explorer not installed (extra 'explorer')",
)


def test_large_plot_suggests_view():
    graph = chain_graph(plotting.LARGE_GRAPH_NODES + 10)
    with pytest.warns(UserWarning, match=r"depth=1 .*graph\.view\(\)"):
        plotting.build_digraph(graph)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 4)
    return model, x, interop.trace(model, (x,))


@needs_explorer
def test_one_namespace_per_layer_path(net):
    model, _, g = net
    me = explorer.build_graph(g)
    spaces = {node.namespace for node in me.nodes}
    groups = {"/".join(s.split("/")[: i + 1]) for s in spaces if s for i in range(s.count("/") + 1)}
    assert groups == {
        "inp", "blocks", "blocks/0", "blocks/0/fc", "blocks/0/norm",
        "blocks/1", "blocks/1/fc", "blocks/1/norm", "head",
    }  # fmt: skip
    assert explorer.namespaces(g)["blocks.1.fc"] == "blocks/1/fc"
    # one node per data-carrying ONNX node plus the graph's input and output
    ops = [n for n in me.nodes if n.id.startswith("n")]
    assert [n.label for n in ops] == ["Gemm", "Gemm", "Relu", "Add", "LayerNormalization"] * 1 + [
        "Gemm",
        "Relu",
        "Add",
        "LayerNormalization",
        "Gemm",
    ]
    # parameter counts per layer, as torch counts them
    attrs = me.groupNodeAttributes
    for path, module in model.named_modules():
        if path and not path.endswith("blocks"):
            expected = sum(p.numel() for p in module.parameters())
            assert attrs[explorer.namespaces(g)[path]]["parameters"] == f"{expected:,}"
    assert attrs["blocks/0"]["class"].endswith("Block")
    # shapes and dtypes on every edge's source output
    head = next(n for n in ops if n.namespace == "head")
    shapes = {a.key: a.value for a in head.outputsMetadata[0].attrs}
    assert shapes["tensor_shape"] == "float32[batch,3]"
    assert shapes["tensor_name"] == g.layer("head").returns[0].name
    assert head.incomingEdges[0].sourceNodeId == next(
        n.id for n in ops if n.namespace == "blocks/1/norm"
    )
    assert any(a.key == "weight 1" and "head.weight" in a.value for a in head.attrs)


@needs_explorer
def test_overlay_equals_report(net):
    model, x, g = net
    emitted = interop.to_torch(g)
    with torch.no_grad():
        emitted.get_submodule("blocks.0.norm").weight[2] += 0.25
    report = interop.compare(model, emitted, (x,))
    assert report.first_divergence.path == "blocks.0.norm"
    values = explorer.overlay(g, report)
    data = explorer.node_data(g, report)
    results = data["max abs error"].graphsData[explorer.GRAPH_ID].results
    beyond = data["beyond tolerance"].graphsData[explorer.GRAPH_ID].results
    checked = 0
    for row in report.layers:
        if row.path not in g.tree.by_path:
            continue
        for value, check in zip(g.layer(row.path).returns, row.outputs):
            assert values[value.name] == check.max_abs_error
            assert results[value.name].value == check.max_abs_error
            assert beyond[value.name].value == (0.0 if check.ok else 1.0)
            checked += 1
    assert checked == 6  # inp, blocks.0.fc, blocks.0.norm, blocks.1.fc, blocks.1.norm, head
    assert beyond[g.layer("blocks.0.fc").returns[0].name].value == 0.0
    assert beyond[g.layer("blocks.0.norm").returns[0].name].value == 1.0
    # every overlay key is the tensor_name of a node output, which is how Model Explorer
    # attaches node data to nodes
    names = {
        a.value
        for n in explorer.build_graph(g).nodes
        for m in n.outputsMetadata
        for a in m.attrs
        if a.key == "tensor_name"
    }
    assert set(values) <= names


def _chromium() -> str | None:
    return next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )


@needs_explorer
@pytest.mark.slow
def test_browser_shows_top_level_layers(tmp_path):
    """A traced Hugging Face BERT (tiny random config) in the local Model Explorer page,
    in the system's headless Chromium: its top-level layers are listed."""
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium installed (CI installs Debian's chromium package)")
    playwright = pytest.importorskip("playwright.sync_api")
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 64, (1, 8))}
    g = interop.trace(model, inputs)
    report = interop.compare(model, g, inputs)
    assert report.ok, str(report)
    url = g.view(report, open_browser=False)
    assert url.startswith("http://localhost:") and "/interop?data=" in url
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=browser_path, headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.get_by_text("Root-level nodes stats").wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "view.png"))
            text = page.inner_text("body")
            # the start page turned on the tensor-shape labels of the edges
            edges = page.evaluate("localStorage.getItem('model_explorer_show_on_edge_item_v3')")
        finally:
            browser.close()
    # the top-level layers are the root-level groups of the drawn graph
    for layer in ("embeddings", "encoder", "pooler"):
        assert f"\n{layer}\t" in text or f"\t{layer}\t" in text, text[:2000]
    # every layer path is a group, one-node layers included (the start page's setting)
    spaces = {n.namespace for n in explorer.build_graph(g).nodes if n.namespace}
    groups = {"/".join(s.split("/")[: i + 1]) for s in spaces for i in range(s.count("/") + 1)}
    shown = re.search(r"layer count\s+(\d+)", text)
    assert shown is not None and int(shown.group(1)) == len(groups) > 28, text[:500]
    assert edges is not None and "Tensor shape" in edges
    assert (tmp_path / "view.png").stat().st_size > 10_000


@needs_explorer
def test_served_page_holds_graph_and_overlay(net):
    """The local server answers the web app's requests with our graph and node data."""
    import json
    import urllib.request

    model, x, g = net
    report = interop.compare(model, g, (x,))
    url = g.view(report, open_browser=False)
    base = url.split("/interop?", 1)[0]
    with urllib.request.urlopen(f"{base}/interop", timeout=30) as r:  # the start page
        assert "model_explorer_show_on_edge_item_v3" in r.read().decode()
    with urllib.request.urlopen(f"{base}/api/v1/load_graphs_json?graph_index=0", timeout=30) as r:
        payload = json.loads(r.read())
    graph = payload["graphs"][0]
    assert {n["namespace"] for n in graph["nodes"]} >= {"inp", "blocks/0/fc", "head"}
    assert graph["groupNodeAttributes"]["blocks/1/fc"]["parameters"] == "72"
    with urllib.request.urlopen(f"{base}/api/v1/load_node_data?node_data_index=0", timeout=30) as r:
        data = json.loads(json.loads(r.read())["content"])
    results = data[explorer.GRAPH_ID]["results"]
    name = g.layer("head").returns[0].name
    assert results[name]["value"] == report.layer("head").max_abs_error
