"""PyTorch capture end to end: numerics, parameter totals, hierarchy, sub-models, round trips."""

from __future__ import annotations

import dataclasses
import inspect
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from models import ResNetish, cases, randomize_batchnorm

import interop

RTOL = ATOL = 1e-5
CASES = {name: (module, inputs) for name, module, inputs in cases()}
# a layer of each model whose output the sub-model tests compare with a forward hook
PROBES = {
    "resnetish": "blocks.0",
    "encoder": "encoder.layers.0",
    "lstm": "embed",
    "attention": "norm",
    "two_tower": "image",
    "dict_head": "body",
}


@pytest.fixture(scope="module")
def traced():
    return {name: interop.trace(module, inputs) for name, (module, inputs) in CASES.items()}


def _reference(module, inputs):
    with torch.no_grad():
        out = module(*inputs)
    if isinstance(out, dict):
        return [v.numpy() for v in out.values()]
    if isinstance(out, tuple):
        return [v.numpy() for v in out]
    return [out.numpy()]


def _as_list(result):
    return list(result) if isinstance(result, tuple) else [result]


def _other_batch(inputs, batch=3):
    torch.manual_seed(1)
    out = []
    for x in inputs:
        if x.dtype == torch.long:
            out.append(torch.randint(0, 50, (batch, *x.shape[1:])))
        else:
            out.append(torch.randn(batch, *x.shape[1:]))
    return tuple(out)


@pytest.mark.parametrize("name", list(CASES))
def test_run_matches_module(traced, name):
    module, inputs = CASES[name]
    graph = traced[name]
    for feed in (inputs, _other_batch(inputs)):
        expected = _reference(module, feed)
        actual = _as_list(graph.run(*feed))
        assert len(actual) == len(expected)
        for got, want in zip(actual, expected):
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    assert interop.verify(module, graph, inputs).ok


@pytest.mark.parametrize("name", list(CASES))
def test_summary_totals_are_exact(traced, name):
    module, _ = CASES[name]
    graph = traced[name]
    total = sum(p.numel() for p in module.parameters())
    text = graph.summary(print_fn=None)
    assert f"Total params: {total:,} " in text
    assert graph.count_params() == total
    used_buffers = sum(
        b.numel() for n, b in module.named_buffers() if n in graph.model.graph.initializers
    )
    assert f"Buffers: {used_buffers:,} " in text
    for layer in graph.layers:
        assert f"{layer.path} ({layer.class_name})" in text


@pytest.mark.parametrize("name", list(CASES))
def test_submodel_equals_hooked_activation(traced, name):
    module, inputs = CASES[name]
    path = PROBES[name]
    captured = {}
    target = module.get_submodule(path)
    handle = target.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        handle.remove()
    want = captured["out"]
    want = want[0] if isinstance(want, tuple) else want
    sub = traced[name].submodel(outputs=[path])
    assert sub.outputs[0].name in (path, f"{path}:0")  # ":0" where a graph input has that name
    wanted = {s.name for s in sub.inputs}
    got = _as_list(sub.run(**{k: v for k, v in _named(name).items() if k in wanted}))[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL)
    assert len(sub.model.graph) < len(traced[name].model.graph)


def _named(name):
    module, inputs = CASES[name]
    return dict(zip(inspect.signature(module.forward).parameters, inputs))


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_round_trip(traced, name, tmp_path):
    module, inputs = CASES[name]
    graph = traced[name]
    path = graph.save(tmp_path / f"{name}.onnx")
    for loaded in (
        interop.load(path),
        interop.load(path.read_bytes()),
        interop.load(graph.to_proto()),
    ):
        assert [s.name for s in loaded.inputs] == [s.name for s in graph.inputs]
        assert [s.shape for s in loaded.outputs] == [s.shape for s in graph.outputs]
        assert [la.path for la in loaded.layers] == [la.path for la in graph.layers]
        assert [la.qualified_class for la in loaded.layers] == [
            la.qualified_class for la in graph.layers
        ]
        assert loaded.parameter_kinds == graph.parameter_kinds
        assert loaded.source == graph.source
        for got, want in zip(_as_list(loaded.run(*inputs)), _as_list(graph.run(*inputs))):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", list(CASES))
def test_config_round_trip(traced, name):
    _, inputs = CASES[name]
    graph = traced[name]
    config = json.loads(json.dumps(graph.get_config()))
    weights = graph.get_weights()
    for tensor in config["onnx"]["graph"]["initializer"]:
        if tensor["name"] in weights:  # the config carries no weight data
            assert not {"rawData", "floatData", "int64Data"} & set(tensor)
    rebuilt = interop.Graph.from_config(config, weights)
    assert [la.path for la in rebuilt.layers] == [la.path for la in graph.layers]
    for got, want in zip(_as_list(rebuilt.run(*inputs)), _as_list(graph.run(*inputs))):
        np.testing.assert_array_equal(got, want)
    clone = graph.clone()
    assert clone.model is not graph.model
    for got, want in zip(_as_list(clone.run(*inputs)), _as_list(graph.run(*inputs))):
        np.testing.assert_array_equal(got, want)


def test_config_needs_every_weight(traced):
    graph = traced["dict_head"]
    weights = graph.get_weights()
    weights.pop("cls.weight")
    with pytest.raises(interop.ModelLoadError, match="cls.weight"):
        interop.Graph.from_config(graph.get_config(), weights)


@pytest.mark.parametrize("name", ["resnetish", "two_tower"])
def test_plot_writes_svg_naming_layers(traced, name, tmp_path):
    graph = traced[name]
    path = graph.plot(tmp_path / "net.svg")
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")
    text = path.read_text()
    for layer in graph.layers:
        if layer.nodes:
            assert layer.path in text
    collapsed = graph.plot(tmp_path / "net.dot", depth=1).read_text()
    assert collapsed.startswith("digraph")
    assert collapsed.count("cluster_") < text.count("cluster_") or not any(
        la.depth > 1 for la in graph.layers
    )


def test_layer_tree_of_residual_net(traced):
    graph = traced["resnetish"]
    block = graph.layer("blocks.0")
    assert block.class_name == "ResidualBlock"
    assert block.qualified_class == "models.ResidualBlock"
    assert [c.path for c in block.children] == [
        f"blocks.0.{n}" for n in ("conv1", "bn1", "conv2", "bn2", "drop")
    ]
    assert block.parent is graph.layer("blocks") and block.depth == 2
    assert sorted(graph.layer("blocks.0.bn1").parameters) == [
        "blocks.0.bn1.bias", "blocks.0.bn1.running_mean", "blocks.0.bn1.running_var", "blocks.0.bn1.weight",
    ]  # fmt: skip
    assert graph.layer("blocks.0.bn1").param_count == 16  # weight + bias; running stats are buffers
    assert block.input_shapes == ["(batch, 8, 16, 16)"] and block.output_shapes == [
        "(batch, 8, 16, 16)"
    ]
    assert "<Layer 'blocks.0' (ResidualBlock): 5 children" in repr(block)
    ops = [n.op_type for n in graph.model.graph]
    assert ops.count("BatchNormalization") == 5 and "Conv" in ops  # BatchNorm is not folded
    dropout = [n for n in graph.model.graph if n.op_type == "Dropout"]
    assert len(dropout) == 2
    assert dropout[0].inputs[1].const_value.numpy() == pytest.approx(0.2)
    assert dropout[0].metadata_props["interop.scope"] == "blocks.0.drop"
    assert graph.layer("blocks.0.drop").class_name == "Dropout"
    with pytest.raises(interop.errors.LayerNotFoundError, match="blocks.0"):
        graph.layer("blocks.O")


def test_signature_and_output_names(traced):
    assert [(s.name, s.shape) for s in traced["resnetish"].inputs] == [("x", ("batch", 3, 16, 16))]
    assert [s.name for s in traced["dict_head"].outputs] == ["logits", "score", "hidden"]
    assert [s.name for s in traced["two_tower"].inputs] == ["image", "meta"]
    assert [s.name for s in traced["two_tower"].outputs] == ["output_0", "output_1"]
    assert traced["dict_head"].outputs[0].dtype == np.float32
    assert "dict_head" not in repr(traced["dict_head"]) and "DictHead" in repr(traced["dict_head"])


def test_dynamic_sequence_dim():
    module, inputs = CASES["encoder"]
    graph = interop.trace(module, inputs, dynamic_dims={"x": {1: "seq"}})
    assert graph.inputs[0].shape == ("batch", "seq", 16)
    x = torch.randn(4, 11, 16)
    np.testing.assert_allclose(graph.run(x), _reference(module, (x,))[0], rtol=RTOL, atol=ATOL)
    static = interop.trace(module, inputs, dynamic_batch=False)
    assert static.inputs[0].shape == (2, 7, 16)


def test_batch_of_one_still_gives_dynamic_batch():
    module = randomize_batchnorm(ResNetish()).eval()
    graph = interop.trace(module, (np.random.rand(1, 3, 16, 16).astype(np.float32),))
    assert graph.inputs[0].shape[0] == "batch"
    x = torch.randn(5, 3, 16, 16)
    np.testing.assert_allclose(graph.run(x), _reference(module, (x,))[0], rtol=RTOL, atol=ATOL)


def test_training_mode_is_restored():
    module = ResNetish().train()
    module.blocks[0].eval()
    interop.trace(module, (torch.randn(2, 3, 16, 16),))
    assert module.training and not module.blocks[0].training and module.blocks[1].training
    assert "forward" not in module.__dict__


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor
    extras: list


class DataclassOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, *, scale: float = 2.0, mask=None):
        y = self.linear(x) * scale
        if mask is not None:
            y = y * mask
        return Prediction(y, [y.sum(-1), y > 0, x])


class Repeats(torch.nn.Module):
    def forward(self, x):
        y = x + 1
        return {"x": y, "again": y, "input": x}


def test_structured_outputs_are_flattened_in_order():
    torch.manual_seed(0)
    module = DataclassOutput().eval()
    inputs = {"x": torch.randn(3, 4), "mask": (torch.rand(3, 3) > 0.5).float()}
    graph = interop.trace(module, inputs)
    assert [s.name for s in graph.inputs] == ["x", "mask"]
    assert [s.name for s in graph.outputs] == ["logits", "extras.0", "extras.1", "extras.2"]
    assert graph.outputs[2].dtype == np.bool_
    assert interop.verify(module, graph, inputs).ok
    repeats = interop.trace(Repeats(), (torch.randn(2, 3),))
    assert [s.name for s in repeats.inputs] == [
        "x"
    ]  # an output named like an input does not rename it
    assert [s.name for s in repeats.outputs] == ["x_output", "again", "input"]
    x = np.random.rand(2, 3).astype(np.float32)
    out = repeats.run(x, as_dict=True)
    np.testing.assert_array_equal(out["again"], x + 1)
    np.testing.assert_array_equal(out["input"], x)
    assert interop.verify(Repeats(), repeats, (torch.from_numpy(x),)).ok


def test_plot_png(traced, tmp_path):
    path = traced["lstm"].plot(tmp_path / "lstm.png", depth=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_without_parameters_counts_zero():
    graph = interop.trace(
        torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Flatten()), (torch.randn(2, 3, 4),)
    )
    assert graph.count_params() == 0
    assert "Total params: 0 " in graph.summary(print_fn=None)


class NestedInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, batch, extra=()):
        out = self.a(batch["x"]) + self.b(batch["y"])
        for t in extra:
            out = out + t
        return [out]


def test_nested_inputs_are_flattened_with_a_dynamic_batch():
    torch.manual_seed(0)
    module = NestedInputs().eval()
    inputs = ({"x": torch.randn(2, 3), "y": torch.randn(2, 4)}, [torch.randn(2, 2)])
    graph = interop.trace(module, inputs)
    assert [(s.name, s.shape) for s in graph.inputs] == [
        ("batch_x", ("batch", 3)), ("batch_y", ("batch", 4)), ("extra_0", ("batch", 2)),
    ]  # fmt: skip
    assert interop.verify(module, graph, inputs).ok
    wider = ({"x": torch.randn(5, 3), "y": torch.randn(5, 4)}, [torch.randn(5, 2)])
    assert interop.verify(module, graph, wider).ok
