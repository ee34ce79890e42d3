"""Reliability and security (issue 7): hostile files, custom domains, external data,
atomic saves, threads, memory growth and NaN/Inf faithfulness.

Checks that could crash or hang the interpreter run in a subprocess with a timeout and
an address-space limit, so a failure is reported instead of killing pytest.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import interop
from interop import serialization, validation
from interop.errors import InteropError, ModelLoadError, ShapeError

ROOT = Path(__file__).resolve().parents[1]
FLOAT = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), functions=(), opsets=(("", 18),)):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
        functions=list(functions),
    )


def _vi(name, shape=(2,), dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def _subprocess(code: str, *args: str, timeout: int = 120, memory_gb: int = 4):
    """Run `code` in a fresh interpreter with an address-space limit; return the result."""
    prelude = textwrap.dedent(f"""
        import resource, sys
        limit = {memory_gb} << 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.path.insert(0, {str(ROOT)!r})
    """)
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# ---------------------------------------------------------------- 1. no code execution
class _Payload:
    """Unpickling this creates `marker`: proof that someone ran a pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(payload)
    with pytest.raises(ModelLoadError):
        interop.load(evil)
    with pytest.raises(ModelLoadError):
        interop.load(payload)
    cli = subprocess.run(
        [sys.executable, "-m", "interop.cli", "inspect", str(evil)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2 and "interop: error:" in cli.stderr, cli.stderr
    # a pickle hidden in metadata and in a string constant is data, never unpickled
    blob = helper.make_tensor("blob", TensorProto.STRING, [1], [payload])
    nodes = [
        helper.make_node("Constant", [], ["b"], value=blob),
        helper.make_node("Identity", ["x"], ["y"]),
    ]
    model = _model(nodes, [_vi("x")], [_vi("y"), _vi("b", (1,), TensorProto.STRING)])
    helper.set_model_props(model, {"payload": payload.hex()})
    graph = interop.load(model.SerializeToString())
    graph.summary(print_fn=None)
    assert graph.run(np.ones(2, np.float32), output_names=["y"]).tolist() == [1, 1]
    config = graph.get_config()
    interop.Graph.from_config(config, graph.get_weights())
    assert not marker.exists()


def test_summary_of_string_initializer():
    model = _model([helper.make_node("Identity", ["s"], ["y"])], [], [_vi("y", (1,), 8)])
    model.graph.initializer.append(helper.make_tensor("s", TensorProto.STRING, [1], [b"a"]))
    text = interop.load(model).summary(print_fn=None)  # used to raise TypeError on STRING
    assert "Total params: 1 (1 B)" in text  # a foreign file: every initializer counts


def _custom_model(domain="evil.ops", op="Double"):
    node = helper.make_node(op, ["x"], ["y"], domain=domain, name="custom")
    return _model([node], [_vi("x")], [_vi("y")], opsets=(("", 18), (domain, 1)))


def test_custom_domains_are_refused_everywhere(tmp_path):
    # onnxruntime-extensions' PyOp would run Python code: refused like any unknown domain
    for model in (_custom_model(), _custom_model("ai.onnx.contrib", "PyOp")):
        domain = model.graph.node[0].domain
        with pytest.raises(ModelLoadError, match=f"custom domain '{domain}'") as info:
            interop.load(model)
        assert "register_domain" in str(info.value)
        with pytest.raises(ModelLoadError, match="custom domain"):
            interop.load(model.SerializeToString())
    path = tmp_path / "custom.onnx"
    path.write_bytes(_custom_model().SerializeToString())
    cli = subprocess.run(
        [sys.executable, "-m", "interop.cli", "run", str(path), "--random"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 2 and "custom domain 'evil.ops'" in cli.stderr, cli.stderr
    # from_config: a config edited to carry a custom node is refused the same way
    graph = interop.load(_model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")]))
    config = graph.get_config()
    config["onnx"]["graph"]["node"][0].update(domain="evil.ops", opType="Double")
    with pytest.raises(ModelLoadError, match="custom domain 'evil.ops'"):
        interop.Graph.from_config(config, {})
    # a custom node hidden in an If body is found too
    body = helper.make_graph(list(_custom_model().graph.node), "body", [], [_vi("y")])
    nested = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)],
        [_vi("c", (), TensorProto.BOOL), _vi("x")],
        [_vi("y")],
    )
    with pytest.raises(ModelLoadError, match="custom domain"):
        interop.load(nested)


def test_registered_domain_loads_and_runs():
    double = helper.make_function(
        "evil.ops", "Double", ["x"], ["y"],
        [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 18)],
    )  # fmt: skip
    model = _custom_model()
    serialization.register_domain("evil.ops", [double])
    try:
        graph = interop.load(model)
        np.testing.assert_array_equal(graph.run(np.array([1, 2], np.float32)), [2, 4])
        assert len(model.functions) == 0  # the caller's proto is left as it was
        with pytest.raises(ValueError, match="already registered"):
            serialization.register_domain("evil.ops")
    finally:
        serialization.CUSTOM_DOMAINS._entries.pop("evil.ops")
    serialization.register_domain("evil.ops")  # allowed without a definition
    try:
        graph = interop.load(model)
        assert "Double" in graph.summary(print_fn=None)
        with pytest.raises(ModelLoadError, match="ONNX Runtime cannot build a session"):
            graph.run(np.ones(2, np.float32))  # ORT has no implementation: a clear error
    finally:
        serialization.CUSTOM_DOMAINS._entries.pop("evil.ops")
    with pytest.raises(ValueError, match="standard domain"):
        serialization.register_domain("com.microsoft")


def test_model_local_functions_and_standard_domains_load():
    square = helper.make_function(
        "pkg.onnxscript.torch_lib", "Square", ["x"], ["y"],
        [helper.make_node("Mul", ["x", "x"], ["y"])], [helper.make_opsetid("", 18)],
    )  # fmt: skip
    nodes = [
        helper.make_node("Square", ["x"], ["s"], domain="pkg.onnxscript.torch_lib"),
        helper.make_node("Gelu", ["s"], ["y"], domain="com.microsoft"),
    ]
    model = _model(
        nodes, [_vi("x")], [_vi("y")], functions=[square],
        opsets=(("", 18), ("pkg.onnxscript.torch_lib", 1), ("com.microsoft", 1)),
    )  # fmt: skip
    graph = interop.load(model.SerializeToString())
    x = np.array([-1.5, 2.0], np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x * x)).numpy()
    np.testing.assert_allclose(graph.run(x), expected, rtol=1e-5, atol=1e-6)


def test_traced_torch_models_load_and_run_after_save(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GELU(), nn.LayerNorm([4, 6, 6]),
        nn.Flatten(), nn.Linear(144, 3), nn.Softmax(-1),
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    graph = interop.trace(module, (x,))
    loaded = interop.load(graph.save(tmp_path / "net.onnx"))
    assert interop.verify(module, loaded, (x,)).ok


# ---------------------------------------------------------------- 2. external data
def _external(location: str, offset: str = "0", length: str | None = "16") -> onnx.ModelProto:
    weight = TensorProto(name="w", data_type=FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    pairs = [("location", location), ("offset", offset)] + ([("length", length)] if length else [])
    for key, value in pairs:
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    node = helper.make_node("Add", ["x", "w"], ["y"])
    return _model([node], [_vi("x", (4,))], [_vi("y", (4,))], [weight])


@pytest.mark.parametrize(
    "location",
    ["..\\secret.bin", "sub\\..\\..\\secret.bin", "C:\\secret.bin", "c:secret.bin",
     "D:/secret.bin", "\\\\server\\share\\secret.bin", "weights.bin\0.txt", "", "/abs/w.bin"],
)  # fmt: skip
def test_foreign_external_locations_are_refused(tmp_path, location):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "m.onnx").write_bytes(_external(location).SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        interop.load(tmp_path / "m.onnx")


@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [("-4", "16", "negative"), ("0", "-16", "negative"), ("64", "16", "too short"),
     ("4", "16", "too short"), ("0", "8", "declares 8 bytes"), ("0x10", "16", "malformed"),
     ("9" * 5000, "16", "malformed"), ("99999999999999999999", "16", "too short"),
     ("0", None, None)],
)  # fmt: skip
def test_external_offsets_and_lengths(tmp_path, offset, length, message):
    (tmp_path / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    (tmp_path / "m.onnx").write_bytes(_external("weights.bin", offset, length).SerializeToString())
    if message is None:  # no length: the shape says how much to read
        graph = interop.load(tmp_path / "m.onnx")
        np.testing.assert_array_equal(graph.run(np.zeros(4, np.float32)), [0, 1, 2, 3])
        return
    with pytest.raises(ModelLoadError, match=message):
        interop.load(tmp_path / "m.onnx")


def test_external_data_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.ones(4, np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "real.bin").write_bytes(np.full(4, 2, np.float32).tobytes())
    os.symlink(folder / "real.bin", folder / "inside.bin")  # stays inside: allowed
    os.symlink(outside, folder / "linkdir")  # a linked folder that leaves: refused
    model = folder / "m.onnx"
    model.write_bytes(_external("inside.bin").SerializeToString())
    np.testing.assert_array_equal(interop.load(model).run(np.zeros(4, np.float32)), [2] * 4)
    model.write_bytes(_external("linkdir/w.bin").SerializeToString())
    with pytest.raises(ModelLoadError, match="resolves outside"):
        interop.load(model)
    # a symlinked model file resolves its data against the real file's folder
    os.symlink(folder / "m.onnx", tmp_path / "alias.onnx")
    model.write_bytes(_external("real.bin").SerializeToString())
    np.testing.assert_array_equal(
        interop.load(tmp_path / "alias.onnx").run(np.zeros(4, np.float32)), [2] * 4
    )


def test_external_data_in_subgraph_attribute_is_checked(tmp_path):
    tensor = TensorProto(name="c", data_type=FLOAT, dims=[2])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    body = helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=tensor)], "body", [], [_vi("y")]
    )
    model = _model(
        [helper.make_node("If", ["cond"], ["y"], then_branch=body, else_branch=body)],
        [_vi("cond", (), TensorProto.BOOL)], [_vi("y")],
    )  # fmt: skip
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        interop.load(tmp_path / "m.onnx")


# ---------------------------------------------------------------- 3. hostile structure
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_if_bytes(depth: int) -> bytes:
    """An ONNX model of `depth` nested If bodies, encoded by hand: protobuf's own
    builders refuse to nest that deep, a hostile writer does not have to."""
    out = _field(12, _field(1, b"y"))  # GraphProto.output: ValueInfoProto(name="y")
    one = _varint(2 << 3) + _varint(1) + _field(9, b"\0\0\x80\x3f")  # float32 scalar 1.0
    value = _field(1, b"value") + _varint(20 << 3) + _varint(4) + _field(5, one)
    leaf = _field(1, _field(2, b"y") + _field(4, b"Constant") + _field(5, value))
    leaf += _field(2, b"leaf") + out
    graph = leaf
    for level in range(depth):
        branches = b"".join(
            _field(5, _field(1, name) + _varint(20 << 3) + _varint(5) + _field(6, body))
            for name, body in ((b"then_branch", graph), (b"else_branch", leaf))
        )
        node = _field(1, b"c") + _field(2, b"y") + _field(4, b"If") + branches
        graph = _field(1, node) + _field(2, b"g%d" % level) + out
    graph += _field(11, _field(1, b"c") + _field(2, _field(1, _varint(1 << 3) + _varint(9))))
    opset = _field(8, _varint(2 << 3) + _varint(18))
    return _varint(1 << 3) + _varint(9) + opset + _field(7, graph)


def test_deeply_nested_subgraphs_are_a_clear_error(tmp_path):
    path = tmp_path / "deep.onnx"
    path.write_bytes(nested_if_bytes(10_000))
    done = _subprocess(
        """
        import interop
        try:
            interop.load(sys.argv[1])
        except interop.ModelLoadError as err:
            print("ModelLoadError:", err)
        """,
        str(path),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ModelLoadError" in done.stdout and "nest" in done.stdout, done.stdout
    shallow = interop.load(nested_if_bytes(5))  # real nesting still loads
    assert next(iter(shallow.model.graph)).op_type == "If"
    assert float(shallow.run(np.array(True))) == 1.0


def test_nesting_limit_applies_to_in_memory_protos(monkeypatch):
    monkeypatch.setattr(validation, "MAX_SUBGRAPH_DEPTH", 3)
    proto = onnx.ModelProto()
    proto.ParseFromString(nested_if_bytes(6))
    with pytest.raises(ModelLoadError, match="nested more than 3 levels"):
        interop.load(proto)


def test_absurd_declared_sizes_are_refused_without_allocating():
    # each declares 2^40 float32 elements (4 TiB) but carries one value or none
    short = TensorProto(name="w", data_type=FLOAT, dims=[1 << 20, 1 << 20], float_data=[1.0])
    constant = helper.make_node("Constant", [], ["c"], value=TensorProto(
        name="c", data_type=FLOAT, dims=[1 << 40]))  # fmt: skip
    cases = [
        _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x")], [_vi("y")], [short]),
        _model([constant, helper.make_node("Add", ["x", "c"], ["y"])], [_vi("x")], [_vi("y")]),
    ]
    for model in cases:
        with pytest.raises(ModelLoadError, match="declares 1099511627776 elements"):
            interop.load(model.SerializeToString())


def test_duplicate_names_and_attributes():
    twice = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x"), _vi("x")], [_vi("y")])
    with pytest.raises(ModelLoadError, match="two inputs named 'x'"):
        interop.load(twice)
    shadow = _model([helper.make_node("Relu", ["x"], ["x"])], [_vi("x")], [_vi("x")])
    with pytest.raises(ModelLoadError, match="'x' is produced twice"):
        interop.load(shadow)
    node = helper.make_node("Softmax", ["x"], ["y"], axis=0)
    node.attribute.append(helper.make_attribute("axis", 1))
    with pytest.raises(ModelLoadError, match=r"attribute\(s\) \['axis'\] more than once"):
        interop.load(_model([node], [_vi("x")], [_vi("y")]))


def test_huge_attribute_and_string_counts_stay_bounded():
    done = _subprocess(
        """
        import numpy as np, onnx
        from onnx import TensorProto, helper
        import interop
        results = []
        # 200,000 attributes on one node: loads (linear), ONNX Runtime refuses it clearly
        node = helper.make_node("Relu", ["x"], ["y"])
        node.attribute.extend(helper.make_attribute(f"a{i}", i) for i in range(200_000))
        # 2,000,000 strings declared as a [10] tensor: refused at load
        strings = TensorProto(name="s", data_type=TensorProto.STRING, dims=[10])
        strings.string_data.extend([b"x"] * 2_000_000)
        ident = helper.make_node("Identity", ["s"], ["t"])
        for nodes, init, outs in (([node], [], ["y"]), ([ident], [strings], ["t"])):
            graph = helper.make_graph(
                nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs],
                initializer=init)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
            try:
                g = interop.load(model.SerializeToString())
                g.summary(print_fn=None)
                g.run(np.zeros(2, np.float32))
                results.append("ran")
            except interop.InteropError as err:
                results.append(type(err).__name__)
        print(results)
        """,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['ModelLoadError', 'ModelLoadError']" in done.stdout, done.stdout


# ---------------------------------------------------------------- 5. atomic saves
@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = torch.randn(3, 16)
    graph = interop.trace(module, (x,))
    assert interop.verify(module, graph, (x,)).ok
    return module, graph


def test_interrupted_external_data_save_keeps_the_old_model(mlp, tmp_path):
    module, graph = mlp
    path = graph.save(tmp_path / "m.onnx", external_data=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["m.onnx", "m.onnx.data"]
    # a second process saving a different model is killed after the weights were moved
    # into place but before the model file was: the old pair must survive untouched
    done = _subprocess(
        """
        import os, torch, interop
        from interop import serialization
        real = os.replace
        def crash(src, dst):
            real(src, dst)
            if str(dst).endswith(".data.1") or str(dst).endswith(".data"):
                os._exit(9)  # the process dies here, as on a power cut
        serialization.os.replace = crash
        net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        interop.trace(net, (torch.randn(3, 16),)).save(sys.argv[1], external_data=True)
        """,
        str(path),
        timeout=300,
        memory_gb=16,
    )
    assert done.returncode == 9, done.stderr[-2000:]
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data
    x = torch.randn(5, 16)
    assert interop.verify(module, interop.load(path), (x,)).ok
    # a completed save replaces both and leaves no temporary files or stale data
    graph.save(path, external_data=True)
    graph.save(path, external_data=True)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".m.onnx."))
    assert left in (["m.onnx", "m.onnx.data"], ["m.onnx", "m.onnx.data.1"]), left
    assert interop.verify(module, interop.load(path), (x,)).ok
    graph.save(path)  # back to inline weights: the data file goes away
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".m.")) == ["m.onnx"]


def test_failed_save_leaves_no_temporary_files(mlp, tmp_path):
    _, graph = mlp
    path = graph.save(tmp_path / "m.onnx", external_data=True)
    before = path.read_bytes()
    with pytest.raises(OSError):
        graph.save(tmp_path / "m.onnx" / "inside-a-file.onnx")  # parent is a file
    (tmp_path / "ro").mkdir()
    real = os.replace

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    serialization.os.replace = fail
    try:
        with pytest.raises(OSError, match="No space"):
            graph.save(path, external_data=True)
    finally:
        serialization.os.replace = real
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "ro"]


# ---------------------------------------------------------------- 6. concurrency, memory
def test_run_from_16_threads_matches_sequential(mlp):
    module, graph = mlp
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1 + i % 4, 16)).astype(np.float32) for i in range(16)]
    expected = [graph.run(x) for x in inputs]
    with torch.no_grad():
        for x, y in zip(inputs, expected):
            np.testing.assert_allclose(y, module(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    failures: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(index: int) -> None:
        try:
            barrier.wait()
            for step in range(200):
                k = (index * 7 + step) % len(inputs)
                np.testing.assert_array_equal(graph.run(inputs[k]), expected[k])
        except BaseException as err:  # noqa: BLE001 - reported below
            failures.append(err)

    fresh = interop.load(graph.to_bytes())  # sessions created concurrently, too
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=lambda: fresh.run(inputs[0])) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]
    assert len(fresh._sessions) == 1


def test_no_memory_growth_over_10000_runs(mlp):
    psutil = pytest.importorskip("psutil")
    _, graph = mlp
    process = psutil.Process()
    x = np.random.default_rng(2).standard_normal((8, 16)).astype(np.float32)
    for _ in range(500):  # warm-up: session, arenas, caches
        graph.run(x)
    before = process.memory_info().rss
    for i in range(10_000):
        graph.run(x if i % 2 else torch.from_numpy(x))
        graph.run(input=x, as_dict=True)
    grown = (process.memory_info().rss - before) / 2**20
    assert grown < 20, f"RSS grew by {grown:.1f} MiB over 20,000 runs"


# ---------------------------------------------------------------- 8. NaN / Inf
class Pathological(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        image = x.reshape(x.shape[0], 2, 2, 2)
        return {
            "relu": torch.relu(x),
            "softmax": torch.softmax(x, dim=-1),
            "layernorm": self.norm(x),
            "maxpool": self.pool(image).flatten(1),
            "sum": x.sum(-1),
            "clamp": x.clamp(-1, 1),
        }


def test_nan_and_inf_propagate_as_in_torch():
    module = Pathological().eval()
    x = torch.tensor(
        [[0.5, float("nan"), 1.0, -2.0, 3.0, 0.0, -1.0, 2.0],
         [float("inf"), 1.0, -1.0, 0.0, 2.0, -3.0, 0.5, 1.5],
         [float("-inf"), 1.0, -1.0, 0.0, 2.0, -3.0, 0.5, 1.5],
         [1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0]]
    )  # fmt: skip
    graph = interop.trace(module, (torch.randn(2, 8),))
    report = interop.verify(module, graph, (x,))
    assert report.ok, str(report)
    outputs = graph.run(x, as_dict=True)
    # not vacuous: the special values really reach the outputs, where torch puts them
    assert np.isnan(outputs["softmax"][0]).all() and np.isnan(outputs["maxpool"][0]).any()
    assert np.isposinf(outputs["relu"][1, 0]) and outputs["relu"][2, 0] == 0
    assert np.isnan(outputs["layernorm"][1]).all() and np.isfinite(outputs["layernorm"][3]).all()
    assert np.isneginf(outputs["sum"][2]) and np.isnan(outputs["clamp"][0, 1])


def test_run_failures_inside_ort_are_interop_errors():
    # a Reshape whose target size does not match at run time: ORT fails, we report it
    model = _model(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [_vi("x", ("n",))], [_vi("y", (None,))],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [3, 3])],
    )  # fmt: skip
    graph = interop.load(model)
    assert graph.run(np.zeros(9, np.float32)).shape == (3, 3)
    with pytest.raises(InteropError, match="ONNX Runtime failed while running") as info:
        graph.run(np.zeros(4, np.float32))
    assert not isinstance(info.value, ShapeError)


def test_corrupt_metadata_is_refused_at_load(mlp):
    _, graph = mlp
    for key, value in (("interop.source", '{"version": "2"}'), ("interop.source", "[1")):
        proto = graph.to_proto()
        for entry in proto.metadata_props:
            if entry.key == key:
                entry.value = value
        with pytest.raises(ModelLoadError, match="'interop.source'"):
            interop.load(proto)
    data = graph.to_bytes().replace(b"interop.layers", b"interop.l\xc2yers")
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        interop.load(data)
