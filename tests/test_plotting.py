"""Plots render with nothing but pip: the system `dot` when present, else graphviz-pure.

The graphs are built with onnx.helper (no framework needed); every test renders for real.
"""

from __future__ import annotations

import os
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import interop
from interop import plotting
from interop.errors import MissingDependencyError

VENV_BIN = str(Path(sys.executable).parent)


def chain_graph(length: int) -> interop.Graph:
    """x -> Relu -> Relu -> ... (length nodes), each its own node."""
    nodes, previous = [], "x"
    for i in range(length):
        nodes.append(helper.make_node("Relu", [previous], [f"v{i}"], name=f"relu_{i}"))
        previous = f"v{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, [1, 4])],
    )
    return interop.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.fixture
def only_venv_on_path(monkeypatch):
    """A fresh machine after `pip install`: no system Graphviz anywhere on PATH."""
    monkeypatch.setenv("PATH", VENV_BIN)


def test_without_system_dot_graphviz_pure_renders_svg_and_png(only_venv_on_path, tmp_path):
    binary, kind = plotting.dot_binary()
    assert kind == "graphviz-pure" and Path(binary).parent == Path(VENV_BIN)
    graph = chain_graph(3)
    svg = graph.plot(tmp_path / "g.svg").read_text()
    assert "graphviz-pure" in svg and "relu_1" in svg
    png = graph.plot(tmp_path / "g.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert graph._repr_svg_().lstrip().startswith("<?xml")


def test_system_dot_is_preferred(tmp_path, monkeypatch):
    # a real renderer installed as `dot` on PATH (here graphviz-pure under that name)
    pure = Path(VENV_BIN) / ("graphviz-pure.exe" if os.name == "nt" else "graphviz-pure")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dot").symlink_to(pure)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{VENV_BIN}")
    binary, kind = plotting.dot_binary()
    assert (kind, binary) == ("dot", str(tmp_path / "bin" / "dot"))
    assert chain_graph(2).plot(tmp_path / "g.svg").read_text().count("relu_") >= 2


def test_pdf_without_system_dot_names_the_fix(only_venv_on_path, tmp_path):
    with pytest.raises(MissingDependencyError, match="plot to .svg or .png"):
        chain_graph(2).plot(tmp_path / "g.pdf")
    assert not (tmp_path / "g.pdf").exists()


def test_large_graph_warns_and_png_is_capped(only_venv_on_path, tmp_path):
    graph = chain_graph(plotting.LARGE_GRAPH_NODES + 50)
    with pytest.warns(UserWarning, match="depth=1"):
        path = graph.plot(tmp_path / "long.png")
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    assert max(width, height) <= plotting.MAX_RASTER_PIXELS
    assert height > 5 * width  # scaled down, not cropped: still one tall chain
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chain_graph(5).plot(tmp_path / "small.png")  # small graphs do not warn


def test_colours_are_six_digit_hex():
    # older Graphviz releases reject three-digit colours such as #eef
    source = chain_graph(2).plot(None).source
    colours = [token for token in source.replace('"', " ").split() if token.startswith("#")]
    hex_digits = set("0123456789abcdefABCDEF")
    assert colours and all(len(c) == 7 and set(c[1:]) <= hex_digits for c in colours)


def test_saved_model_plots_from_the_cli_without_system_dot(only_venv_on_path, tmp_path):
    from interop.cli import main

    path = chain_graph(3).save(tmp_path / "chain.onnx")
    assert main(["plot", str(path), "-o", str(tmp_path / "chain.png")]) in (0, None)
    assert (tmp_path / "chain.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weights_listed_as_inputs_are_not_drawn_as_inputs(tmp_path):
    # an IR-version-3 file lists its weights as graph inputs too
    weight = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "fc.weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "fc.weight"], ["y"], name="fc")],
        "ir3",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("fc.weight", TensorProto.FLOAT, [4, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    source = interop.load(model).plot(None).source
    assert 'in0 [label="x\n(1, 4)"' in source and "in1" not in source
    assert "fc.weight" not in source and "in0 -> N0" in source
