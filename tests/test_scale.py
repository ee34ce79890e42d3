"""Models larger than memory (issue 20): a meta-device model traced with its weights apart.

A small Llama is built twice: eagerly with random weights (written to safetensors, the
reference) and on the meta device (traced with ``weights=``). The weights are never read
before `save`: a mapping of counting array-likes proves it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import interop  # noqa: E402
from interop.errors import WeightsError  # noqa: E402

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def _config():
    return transformers.LlamaConfig(**CONFIG)


def _eager(dtype=torch.float32):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_config()).to(dtype).eval()


def _meta(dtype=torch.float32):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(_config()).to(dtype).eval()


def _state(model):
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


IDS = torch.arange(1, 9).reshape(1, 8) % CONFIG["vocab_size"]
INPUTS = {"input_ids": IDS, "use_cache": False}


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The eager model and its weights in two shards with an index, as Hugging Face writes."""
    folder = tmp_path_factory.mktemp("ckpt")
    eager = _eager()
    state = _state(eager)
    names = list(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half]}
    shards["model-00002-of-00002.safetensors"] = names[half:]
    weight_map = {}
    for shard, members in shards.items():
        safetensors_torch.save_file({n: state[n] for n in members}, str(folder / shard))
        weight_map.update(dict.fromkeys(members, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return eager, folder


@pytest.fixture(scope="module")
def traced(checkpoint):
    eager, folder = checkpoint
    return interop.trace(_meta(), INPUTS, weights=folder)


# the traced graph is emitted and saved before anything runs it (a run of a graph
# under 2 GB reads its weights into memory for the optimized copy)
def test_saved_beside_the_checkpoint_references_its_shards(checkpoint, traced):
    eager, folder = checkpoint
    path = traced.save(folder / "llama.onnx", external_data=True)
    assert not (folder / "llama.onnx.data").exists()  # no copy of the weights
    loaded = interop.load(path)
    locations = {
        v.const_value.location
        for v in loaded.model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    assert locations == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    np.testing.assert_allclose(loaded.run(IDS.numpy()), _logits(eager), atol=1e-5)
    path.unlink()


def test_emitted_torch_module_maps_the_weights(checkpoint, traced):
    eager, _ = checkpoint
    module = interop.to_torch(traced)
    with torch.no_grad():
        out = module(IDS)
    np.testing.assert_allclose(out.numpy(), _logits(eager), atol=1e-5)
    # trainable: a step writes private pages, never the checkpoint's file
    before = traced.model.graph.initializers["model.norm.weight"].const_value.numpy().copy()
    for p in module.parameters():
        p.data.add_(1.0)
    after = traced.model.graph.initializers["model.norm.weight"].const_value.numpy()
    np.testing.assert_array_equal(before, after)


def test_emitted_flax_module_matches(checkpoint, traced):
    eager, _ = checkpoint
    module = interop.to_flax(traced)
    np.testing.assert_allclose(np.asarray(module(IDS.numpy())), _logits(eager), atol=1e-5)


@pytest.mark.slow
def test_emitted_keras_model_matches(checkpoint, traced, tmp_path):
    eager, _ = checkpoint
    model = interop.to_keras(traced)
    np.testing.assert_allclose(np.asarray(model(IDS.numpy())), _logits(eager), atol=1e-5)
    # from a saved graph: its variables take the mapped bytes (TensorFlow through DLPack);
    # assigning them writes private pages, never the data file
    path = traced.save(tmp_path / "llama.onnx", external_data=True)
    data = (tmp_path / "llama.onnx.data").read_bytes()
    model = interop.to_keras(interop.load(path))
    np.testing.assert_allclose(np.asarray(model(IDS.numpy())), _logits(eager), atol=1e-5)
    for variable in model.weights:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    assert not np.asarray(model(IDS.numpy())).any()
    assert (tmp_path / "llama.onnx.data").read_bytes() == data


def test_run_reads_weights_from_the_checkpoint_folder(checkpoint, traced, monkeypatch):
    """Over 2 GB (here: a lowered limit), ONNX Runtime is given the shards' folder and reads
    the weights itself; the graph keeps its lazy tensors."""
    from interop import runtime, serialization

    eager, folder = checkpoint
    graph = interop.Graph(traced.model)  # its own sessions
    monkeypatch.setattr(serialization, "PROTO_LIMIT", 1024)
    assert runtime._external_folder(graph.model) == str(folder)
    np.testing.assert_allclose(graph.run(IDS.numpy()), _logits(eager), atol=1e-5)
    assert all(
        isinstance(v.const_value, ir.ExternalTensor)
        for v in graph.model.graph.initializers.values()
        if v.name != "model.rotary_emb.inv_freq"
    )


def test_sharded_checkpoint_is_referenced_not_read(checkpoint, traced, tmp_path):
    eager, folder = checkpoint
    inits = traced.model.graph.initializers
    external = [v for v in inits.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert len(external) == len(_state(eager))  # every weight, none loaded
    assert {v.const_value.location for v in external} == {
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }
    assert traced.count_params() == sum(p.numel() for p in eager.parameters())
    np.testing.assert_allclose(traced.run(IDS.numpy()), _logits(eager), atol=1e-5)
    # saved elsewhere: the bytes are copied into the model's data file and load maps them
    path = traced.save(tmp_path / "llama.onnx", external_data=True)
    assert (tmp_path / "llama.onnx.data").stat().st_size >= 0.9 * 4 * traced.count_params()
    loaded = interop.load(path)
    assert all(
        isinstance(v.const_value, ir.ExternalTensor)
        for v in loaded.model.graph.initializers.values()
        if v.const_value.nbytes >= 256
    )
    np.testing.assert_allclose(loaded.run(IDS.numpy()), _logits(eager), atol=1e-5)


def test_fake_tensor_mode_model_traces_with_its_weights(checkpoint):
    """A model built under torch's FakeTensorMode (parameters are FakeTensors that report
    the CPU) is captured like a meta one: weights from the checkpoint, buffers rebuilt."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    eager, folder = checkpoint
    with FakeTensorMode():
        fake = transformers.LlamaForCausalLM(_config()).eval()
    assert isinstance(fake.model.norm.weight, FakeTensor)
    graph = interop.trace(fake, INPUTS, weights=folder)
    inits = graph.model.graph.initializers
    assert isinstance(inits["model.norm.weight"].const_value, ir.ExternalTensor)
    assert graph.count_params() == sum(p.numel() for p in eager.parameters())
    np.testing.assert_allclose(graph.run(IDS.numpy()), _logits(eager), atol=1e-5)


class _Baked(torch.nn.Module):
    """Reshapes to a batch size held as a Python int: torch.export fixes the dim."""

    def __init__(self, batch=2):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.batch = batch

    def forward(self, x):
        return self.fc(x).reshape(self.batch, -1) * torch.ones(self.batch, 1, device=x.device)


class _Holds(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x).reshape(x.shape[0], 2, 2)


def test_dim_check_without_weights_reads_none():
    """check_dims on a meta model: torch.export's specializations and shape inference's
    proofs make dims static; nothing runs the module or reads a weight."""
    from adapters.torch.capture_weights import _proven_static

    torch.manual_seed(0)
    eager = _Baked().eval()
    weights = {name: Counted(t) for name, t in _state(eager).items()}
    Counted.reads = 0
    with torch.device("meta"):
        meta = _Baked().eval()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match="'batch'.*does not hold: torch.export fixed it"):
        graph = interop.trace(meta, (x,), weights=weights)
    assert graph.inputs[0].shape == (2, 8) and Counted.reads == 0
    np.testing.assert_allclose(graph.run(x.numpy()), eager(x).detach().numpy(), atol=1e-6)
    # a dim that holds stays dynamic; a Reshape whose target a converter baked is proven
    with torch.device("meta"):
        holds = _Holds().eval()
    weights = {name: Counted(t) for name, t in _state(_Holds()).items()}
    Counted.reads = 0
    graph = interop.trace(holds, (x,), weights=weights)
    assert graph.inputs[0].shape[0] == "batch"
    reshape = [n for n in graph.model.graph if n.op_type == "Reshape"][-1]  # of the data
    baked = ir.Value(name="baked_target", const_value=ir.tensor(np.array([2, 2, 2], np.int64)))
    graph.model.graph.initializers.add(baked)
    reshape.replace_input_with(1, baked)
    initializers = [graph.model.graph.initializers[n] for n in weights]
    with pytest.warns(UserWarning, match=r"'batch' does not hold \(shape inference: Reshape"):
        fixed = _proven_static(graph, holds, (x.to("meta"),), initializers)
    assert fixed.inputs[0].shape == (2, 8) and Counted.reads == 0


class Counted:
    """An array-like that counts how often its data is read (shape and dtype are free)."""

    reads = 0

    def __init__(self, tensor):
        self._tensor = tensor
        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype

    def __array__(self, dtype=None, copy=None):
        Counted.reads += 1
        return self._tensor.numpy()


def test_weights_are_read_only_by_save(tmp_path):
    eager = _eager()
    weights = {name: Counted(t) for name, t in _state(eager).items()}
    Counted.reads = 0
    graph = interop.trace(_meta(), INPUTS, weights=weights)
    graph.summary(print_fn=None)
    assert Counted.reads == 0
    graph.save(tmp_path / "m.onnx", external_data=True)
    assert Counted.reads == len(weights)  # each once, streamed into the data file
    np.testing.assert_allclose(
        interop.load(tmp_path / "m.onnx").run(IDS.numpy()), _logits(eager), atol=1e-5
    )


def test_half_precision_weights_stay_half(tmp_path):
    eager = _eager(torch.bfloat16)
    safetensors_torch.save_file(_state(eager), str(tmp_path / "model.safetensors"))
    graph = interop.trace(_meta(torch.bfloat16), INPUTS, weights=tmp_path / "model.safetensors")
    dtypes = {v.const_value.dtype for v in graph.model.graph.initializers.values()}
    assert ir.DataType.BFLOAT16 in dtypes and ir.DataType.FLOAT not in {
        v.dtype for k, v in graph.model.graph.initializers.items() if k.endswith("proj.weight")
    }
    path = graph.save(tmp_path / "out" / "bf16.onnx", external_data=True)
    n_params = sum(p.numel() for p in eager.parameters())
    assert 1.9 * n_params <= (tmp_path / "out" / "bf16.onnx.data").stat().st_size < 3 * n_params
    loaded = interop.load(path)
    q = loaded.model.graph.initializers["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == ir.DataType.BFLOAT16
    # float32 compute from the same bf16 file: equals the eager model upcast
    wide = interop.trace(
        _meta(torch.bfloat16),
        INPUTS,
        weights=tmp_path / "model.safetensors",
        compute_dtype="float32",
    )
    np.testing.assert_allclose(wide.run(IDS.numpy()), _logits(eager.float()), atol=1e-5)


def test_run_takes_and_returns_bfloat16():
    """Graph.run with bfloat16 feeds (torch bf16 tensors and ml_dtypes arrays) and outputs:
    ONNX Runtime's numpy binding refuses bfloat16, the bits travel as OrtValues."""
    ml_dtypes = pytest.importorskip("ml_dtypes")

    class Head(torch.nn.Module):  # bf16 in and out, float32 inside (ORT's CPU kernels)
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x):
            return torch.relu(self.proj(x.float())).to(torch.bfloat16)

    torch.manual_seed(0)
    head = Head().eval()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    graph = interop.trace(head, (x,))  # the dim check runs it on bf16 feeds too
    assert [v.dtype for v in graph.model.graph.inputs] == [ir.DataType.BFLOAT16]
    with torch.no_grad():
        want = head(x).float().numpy()
    for feed in (x, x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)):
        out = graph.run(feed)
        assert out.dtype == ml_dtypes.bfloat16 and out.shape == (4, 8)
        np.testing.assert_allclose(out.astype(np.float32), want, rtol=1e-2, atol=1e-2)
    assert np.abs(want).max() > 0.1  # real content, not zeros


# ---------------------------------------------------------------------------- bad input
def test_missing_tensor_names_it(tmp_path):
    state = _state(_eager())
    del state["model.layers.1.mlp.up_proj.weight"]
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    before = sorted(tmp_path.iterdir())
    with pytest.raises(WeightsError, match=r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        interop.trace(_meta(), INPUTS, weights=tmp_path)
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_extra_tensor_names_it_and_the_file(tmp_path):
    state = _state(_eager())
    state["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2)
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"'model\.layers\.7\.mlp\.up_proj\.weight' in '.*model"):
        interop.trace(_meta(), INPUTS, weights=tmp_path / "model.safetensors")


def test_shape_and_dtype_mismatch(tmp_path):
    state = _state(_eager())
    state["model.norm.weight"] = torch.ones(7)
    with pytest.raises(WeightsError, match=r"'model\.norm\.weight' .* shape \[7\].* has \[32\]"):
        interop.trace(_meta(), INPUTS, weights=state)
    state = _state(_eager(torch.bfloat16))
    with pytest.raises(WeightsError, match=r"is bfloat16, LlamaForCausalLM.* is float32"):
        interop.trace(_meta(), INPUTS, weights=state)


def test_truncated_shard_names_the_tensor_and_file(checkpoint, tmp_path):
    _, folder = checkpoint
    for file in folder.iterdir():
        if file.suffix in (".json", ".safetensors"):
            (tmp_path / file.name).write_bytes(file.read_bytes())
    shard = tmp_path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"shard '.*model-00002-of-00002.safetensors' is trunc"):
        interop.trace(_meta(), INPUTS, weights=tmp_path)
    shard.unlink()
    with pytest.raises(WeightsError, match=r"shard 'model-00002-of-00002.safetensors' .* missing"):
        interop.trace(_meta(), INPUTS, weights=tmp_path)
