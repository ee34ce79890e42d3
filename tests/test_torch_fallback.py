"""PyTorch capture when torch.export alone fails (adapters/torch/capture_fallback.py).

Mixture-of-experts layers of transformers 5 are captured through a registered rewrite
(their gather formulation), models whose control flow on tensor values torch.export cannot
trace go through the TorchScript exporter, accepted only when its graph reproduces the
model on a second input of another batch, and everything else raises a TraceError naming
the module, the source line, torch.export's reason and what was tried.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from interop.adapters.torch.capture_fallback import second_leaves
from interop.adapters.torch.capture_rewrites import (
    REWRITES,
    register_rewrite,
    unregister_rewrite,
)

import interop
from interop import provenance
from interop.errors import TraceError

warnings.filterwarnings("ignore")
RTOL, ATOL = 1e-4, 1e-5


def _path(graph) -> str:
    return provenance.read_source(graph.model)["capture"]


def _ids(batch, seq, seed=0):
    return torch.randint(3, 99, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _check(model, graph, inputs):
    with torch.no_grad():
        out = model(**inputs)
    want = out.logits if hasattr(out, "logits") else out
    got = graph.run({k: v.numpy() for k, v in inputs.items()})
    got = got[0] if isinstance(got, tuple) else got
    np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL)


# -------------------------------------------------------------------------- transformers
def test_tiny_mixtral_is_captured_through_the_experts_rewrite():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    experts = model.model.layers[0].mlp.experts
    graph = interop.trace(model, {"input_ids": _ids(2, 7)}, dynamic_dims={"input_ids": {1: "seq"}})
    assert _path(graph) == "torch.export with rewrites transformers-experts-batched"
    assert "forward" not in experts.__dict__  # the rewrite lasted only as long as the trace
    for inputs in ({"input_ids": _ids(2, 7)}, {"input_ids": _ids(3, 10, seed=1)}):
        _check(model, graph, inputs)
    assert graph.count_params() == sum(p.numel() for p in model.parameters())
    layer = graph.layer("model.layers.0.mlp.experts")
    assert layer.class_name == "MixtralExperts"
    assert "model.layers.0.mlp.experts.gate_up_proj" in layer.all_parameters()


def test_tiny_bart_is_captured_by_torch_export_with_dynamic_lengths():
    transformers = pytest.importorskip("transformers")
    config = transformers.BartConfig(
        vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37,
        max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BartModel(config).eval()
    dims = {"input_ids": {1: "seq"}, "decoder_input_ids": {1: "decoder_seq"}}
    first = {"input_ids": _ids(2, 7), "decoder_input_ids": _ids(2, 5, seed=2)}
    graph = interop.trace(model, first, dynamic_dims=dims)
    assert _path(graph) == "torch.export"
    second = {"input_ids": _ids(3, 11, seed=3), "decoder_input_ids": _ids(3, 4, seed=4)}
    for inputs in (first, second):
        assert interop.verify(model, graph, inputs, rtol=RTOL, atol=ATOL).ok
    assert graph.layer("decoder.layers.0.encoder_attn").class_name == "BartAttention"


# ------------------------------------------------------------------------------ rewrites
class Router(torch.nn.Module):
    """Top-1 routing with a Python loop over the experts that were hit (data-dependent)."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 3)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        choice = self.gate(x).argmax(-1)
        out = torch.zeros_like(x)
        for index in choice.unique().tolist():
            rows = (choice == index).nonzero().squeeze(-1)
            out[rows] = self.experts[index](x[rows])
        return out


class RoutedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.moe = Router()

    def forward(self, x):
        return self.moe(self.inp(x))


def test_a_registered_rewrite_captures_a_data_dependent_router():
    torch.manual_seed(0)
    net = RoutedNet().eval()

    def dense(module, x):  # every expert on every row, the chosen one kept: same result
        choice = module.gate(x).argmax(-1)
        outs = torch.stack([e(x) for e in module.experts], 1)
        return torch.gather(outs, 1, choice[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]

    register_rewrite("test-dense-router", dense, matches=lambda m: isinstance(m, Router))
    try:
        graph = interop.trace(net, (torch.randn(6, 4),))
    finally:
        unregister_rewrite("test-dense-router")
    assert "test-dense-router" not in REWRITES
    assert _path(graph) == "torch.export with rewrites test-dense-router"
    for x in (torch.randn(6, 4), torch.randn(11, 4)):
        with torch.no_grad():
            want = net(x).numpy()
        np.testing.assert_allclose(graph.run(x.numpy()), want, rtol=RTOL, atol=ATOL)
    assert graph.layer("moe.experts.2").class_name == "Linear"
    assert graph.count_params() == sum(p.numel() for p in net.parameters())


# --------------------------------------------------------------------------- TorchScript
class Checked(torch.nn.Module):
    """Branches on a tensor value that is the same for every finite input."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
        )

    def forward(self, x):
        if bool(torch.isfinite(x).all()):  # torch.export cannot decide this; it always holds
            x = self.norm2(self.norm1(x))
        return self.body(x)


class Counter(torch.nn.Module):
    """Loops as many times as the input has positive entries: baked in by tracing."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        for _ in range(int((x > 0).sum())):
            y = y * 0.9 + 0.1
        return y


class Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), Counter()])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](x))


def test_torchscript_graph_accepted_when_it_reproduces_a_second_input():
    torch.manual_seed(0)
    net = Checked().eval()
    graph = interop.trace(net, (torch.randn(2, 4),))
    assert _path(graph) == "torchscript"
    for x in (torch.randn(2, 4), torch.randn(7, 4)):
        with torch.no_grad():
            want = net(x).numpy()
        np.testing.assert_allclose(graph.run(x.numpy()), want, rtol=RTOL, atol=ATOL)
    # weights keep their names, the two all-ones norms the exporter merged included
    names = {n for n, _ in net.named_parameters()}
    assert names <= set(graph.model.graph.initializers)
    assert graph.count_params() == sum(p.numel() for p in net.parameters())
    assert graph.layer("body.0").class_name == "Linear"
    assert graph.layer("norm2").class_name == "LayerNorm"


def test_torchscript_graph_refused_when_control_flow_depends_on_the_input():
    torch.manual_seed(0)
    with pytest.raises(TraceError) as info:
        interop.trace(Outer().eval(), (torch.ones(2, 4),))
    text = str(info.value)
    assert "torch.export could not trace Outer" in text
    assert "could not trace Outer in module 'blocks.1' at " in text  # the module path
    assert "test_torch_fallback.py:" in text  # the source line
    assert "data-dependent" in text.lower() or "guard" in text.lower()  # torch.export's reason
    assert "module rewrites: none of the registered ones" in text
    assert "the TorchScript exporter: refused" in text and "second input (x[3, 4])" in text
    assert info.value.module_path == "blocks.1"
    assert len(info.value.tried) == 2


def test_torchscript_branch_on_values_is_checked_on_flipped_values():
    """A branch on tensor values that the second input (fresh standard normals) does not
    flip: the tracer's Python-bool conversion brings in inputs of the example's shape with
    other values, and the negated example flips it, so the graph is refused."""

    class Threshold(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(1000, 4)

        def forward(self, x):
            if x.sum() > -300:
                return self.fc(x) * 2
            return self.fc(x)

    x = torch.rand(2, 1000) + 0.5  # sum about 2,000
    second = second_leaves({"x": x}, {"x": {0: "batch"}})["x"]
    assert float(second.sum()) > -300  # the second input alone takes the same branch
    with pytest.raises(TraceError, match="TorchScript exporter: refused.*other values"):
        interop.trace(Threshold(), (x,))
