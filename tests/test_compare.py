"""interop.compare: per-layer errors between a model and its trace or emissions.

The fault tests change one weight element of an emitted model (torch, Keras, Flax) and
check that the report names that layer first and flags nothing upstream of it; the
clean emissions match the source model layer by layer within float32 tolerances.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import interop

torch = pytest.importorskip("torch")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)) + x)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 8)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


UPSTREAM = ["inp", "blocks.0.fc", "blocks.0.norm"]  # computed before blocks.1.fc


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(3, 4)
    return model, x, interop.trace(model, (x,))


def _set_fault(target: str, emitted):
    """Add 1.0 to one element of blocks.1.fc's weight, in the emitted model's framework."""
    if target == "torch":
        with torch.no_grad():
            emitted.get_submodule("blocks.1.fc").weight[0, 0] += 1.0
    elif target == "keras":
        kernel = emitted.get_layer("blocks.1.fc").kernel
        value = np.array(kernel.numpy())
        value[0, 0] += 1.0
        kernel.assign(value)
    else:
        from flax import nnx

        fc = dict(nnx.iter_modules(emitted))[("blocks", "1", "fc")]
        fc.kernel[...] = fc.kernel[...].at[0, 0].add(1.0)


@pytest.mark.parametrize("target", ["torch", "keras", "flax"])
def test_fault_in_emitted_model_is_named_first(source, target):
    if target != "torch":
        pytest.importorskip("keras" if target == "keras" else "flax")
    model, x, g = source
    emitted = getattr(interop, f"to_{target}")(g)
    clean = interop.compare(model, emitted, (x,), rtol=1e-4, atol=1e-5)
    assert clean.ok, str(clean)
    assert clean.first_divergence is None
    compared = [row.path for row in clean.layers]
    # the native layers the emitter placed under the source paths, then the outputs
    for path in ["inp", "blocks.0.fc", "blocks.0.norm", "blocks.1.fc", "blocks.1.norm", "head"]:
        assert path in compared
    assert compared[-1] == "<outputs>"

    _set_fault(target, emitted)
    report = interop.compare(model, emitted, (x,), rtol=1e-4, atol=1e-5)
    assert not report.ok
    first = report.first_divergence
    assert first is not None and first.path == "blocks.1.fc", str(report)
    assert first.max_abs_error > 0.01
    paths = [row.path for row in report.layers]
    upstream = paths[: paths.index("blocks.1.fc")]
    assert set(UPSTREAM) <= set(upstream)
    assert all(report.layer(p).ok for p in upstream), str(report)
    assert not report.layer("<outputs>").ok
    assert "<- first divergence" in str(report).splitlines()[2 + paths.index("blocks.1.fc")]


def test_source_against_its_graph_and_file(source, tmp_path):
    model, x, g = source
    report = interop.compare(model, g, (x,))
    assert report.ok, str(report)
    paths = [row.path for row in report.layers]
    # containers are layers of both: the hooks see Block calls, the graph their returns
    assert paths == [
        "inp", "blocks.0.fc", "blocks.0.norm", "blocks.0", "blocks.1.fc", "blocks.1.norm",
        "blocks.1", "head", "<outputs>",
    ]  # fmt: skip
    assert report.layer("blocks.0").class_name == "Block"
    # value names of the graph travel with the rows (the view's overlay keys on them)
    assert report.layer("head").outputs[0].name == g.layer("head").returns[0].name
    assert report.layer("blocks.0.fc").outputs[0].shape == (3, 8)

    path = g.save(tmp_path / "net.onnx")
    between_graphs = interop.compare(g, str(path), (x.numpy(),), atol=0, rtol=0)
    assert between_graphs.ok and len(between_graphs.layers) == 10  # blocks too: both graphs
    data = between_graphs.to_dict()
    json.dumps(data)
    assert data["first_divergence"] is None and data["layers"][0]["path"] == "inp"
    assert "<table>" in between_graphs._repr_html_()


def test_graph_fault_and_table(source):
    model, x, g = source
    broken = g.clone()
    weight = broken.model.graph.initializers["blocks.0.norm.weight"]
    array = weight.const_value.numpy().copy()
    array[3] += 0.5
    import onnx_ir as ir

    weight.const_value = ir.tensor(array, name="blocks.0.norm.weight")
    report = interop.compare(g, broken, {"x": x.numpy()})
    assert report.first_divergence.path == "blocks.0.norm"
    assert [r.path for r in report.layers if not r.ok][:2] == ["blocks.0.norm", "blocks.0"]
    text = str(report)
    assert "first divergence: blocks.0.norm" in text.splitlines()[0]


def test_across_devices(source):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA execution provider (onnxruntime-gpu and a GPU)")
    _, x, g = source
    report = interop.compare(g, g, (x.numpy(),), device=("cpu", "cuda"), rtol=1e-3, atol=1e-4)
    assert report.ok, str(report)
    assert report.device == ("cpu", "cuda")


def test_cli_compare(source, tmp_path, capsys):
    import onnx_ir as ir

    from interop.cli import main

    _, _, g = source
    a = g.save(tmp_path / "a.onnx")
    broken = g.clone()
    weight = broken.model.graph.initializers["head.weight"]
    array = weight.const_value.numpy().copy()
    array[0, 0] += 1.0
    weight.const_value = ir.tensor(array, name="head.weight")
    b = broken.save(tmp_path / "b.onnx")
    assert main(["compare", str(a), str(a)]) == 0
    assert "10 layers compared, OK" in capsys.readouterr().out
    assert main(["compare", str(a), str(b), "--dim", "batch=2", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["first_divergence"] == "head"
    assert [row["ok"] for row in data["layers"]] == [True] * 8 + [False, False]
    assert data["layers"][0]["outputs"][0]["shape"] == [2, 8]


def test_keras_and_flax_sources_against_other_frameworks():
    """Layers match across spellings: the Keras layer ``blk/dense_1`` is the emitted torch
    module ``blk_dense_1``; an nnx source's paths are the Keras emission's layer names."""
    keras = pytest.importorskip("keras")
    nnx = pytest.importorskip("flax.nnx")

    class Blk(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.fc = keras.layers.Dense(8)
            self.norm = keras.layers.LayerNormalization()

        def call(self, x):
            return self.norm(keras.ops.relu(self.fc(x)) + x)

    class KNet(keras.Model):
        def __init__(self):
            super().__init__(name="knet")
            self.inp = keras.layers.Dense(8, name="inp")
            self.blk = Blk(name="blk")
            self.head = keras.layers.Dense(3, name="head")

        def call(self, x):
            return self.head(self.blk(self.inp(x)))

    x = np.random.default_rng(0).standard_normal((2, 4)).astype("float32")
    model = KNet()
    model(x)
    emitted = interop.to_torch(interop.trace(model, (x,)))
    clean = interop.compare(model, emitted, (x,))
    assert clean.ok, str(clean)
    assert {"inp", "blk/dense", "blk/layer_normalization", "head"} <= {
        r.path for r in clean.layers
    }, str(clean)
    module = next(m for n, m in emitted.named_modules() if n.endswith("dense") and "blk" in n)
    with torch.no_grad():
        module.weight[0, 0] += 1.0
    report = interop.compare(model, emitted, (x,))
    assert report.first_divergence.path == "blk/dense", str(report)
    assert report.layer("inp").ok

    class Small(nnx.Module):
        def __init__(self, rngs):
            self.inp = nnx.Linear(4, 8, rngs=rngs)
            self.head = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.inp(x)))

    small = Small(nnx.Rngs(0))
    keras_model = interop.to_keras(interop.trace(small, (x,)))
    report = interop.compare(small, keras_model, (x,))
    assert report.ok and [r.path for r in report.layers] == ["inp", "head", "<outputs>"], str(
        report
    )


def test_cli_compare_factory_reference(tmp_path, capsys):
    """`interop compare module:function file.onnx`: the factory's model runs in torch."""
    from interop.cli import load_factory, main

    factory = tmp_path / "factory_for_compare.py"
    factory.write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(1)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),"
        " torch.nn.Linear(6, 2)).eval()\n"
        "    return model, (torch.randn(2, 4),)\n"
    )
    spec = f"{factory}:build"
    model, inputs = load_factory(spec)
    path = interop.trace(model, inputs).save(tmp_path / "seq.onnx")
    assert main(["compare", spec, str(path)]) == 0
    out = capsys.readouterr().out
    assert "Sequential (torch) vs Graph" in out and "4 layers compared, OK" in out
