"""Our graphs on ONNX Runtime against each anchor exporter's graph of the same model.

For every model, the anchor exporter's graph (torch.onnx's default export, which runs its
default optimizer; tf2onnx's ``from_keras``; jax2onnx's ``to_onnx``) and ours (what
`Graph.run` runs: the optimized copy of `interop.trace`'s graph) run on ONNX Runtime
with the same session options (2 intra-op threads, 1 inter-op thread), batch 1 and 8,
in interleaved rounds (the order alternates every round). Reported: medians, the median
of the per-round ratios ours / anchor with its 25-75% range, the session-creation time
of each (ours: the optimization plus the session), and for the nnx transformer the
`jax.jit` call of the module itself.

    python benchmarks/bench_runtime.py                 # quick sizes, a few minutes on 2 cores
    python benchmarks/bench_runtime.py --full --write  # ResNet-50 at 224, BERT-base / GPT-2
                                                       # at 12 layers and 128 tokens, ...
    python benchmarks/bench_runtime.py --only BERT-base GPT-2 --rounds 15

Each model runs in a subprocess of its own (its memory, a 12-layer model and its
exporter's conversion, is given back before the next starts).

Weights are random (configs only); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
from report import machine, table, write_section  # noqa: E402

import interop  # noqa: E402
from interop.runtime import optimization, optimized_model  # noqa: E402


@dataclass
class Case:
    """One model: ours (a traced Graph), the anchor's graph per batch, and the inputs."""

    name: str
    framework: str
    anchor_name: str
    graph: interop.Graph
    anchor: Callable[[int], Any]  # batch -> ONNX model (proto bytes or ir.Model)
    inputs: Callable[[int], dict[str, np.ndarray]]  # batch -> feeds by our input names
    native: Callable[[int], Callable[[], Any]] | None = None  # batch -> a jitted call


def _ids(batch: int, seq: int, vocab: int = 1000, dtype: str = "int64") -> np.ndarray:
    return np.random.default_rng(batch).integers(1, vocab, (batch, seq)).astype(dtype)


def _torch_export(module: Any, make: Callable[[int], tuple]) -> Callable[[int], Any]:
    import torch

    def export(batch: int) -> Any:  # the default export: static shapes, optimize=True
        with torch.no_grad():
            return torch.onnx.export(module, make(batch), dynamo=True, verbose=False).model

    return export


def torch_cases(full: bool, want: Callable[[str], bool]) -> Iterator[Case]:
    import torch
    import transformers

    torch.manual_seed(0)
    size = 224 if full else 64

    def image(batch: int) -> tuple:
        return (
            torch.from_numpy(
                np.random.default_rng(batch).random((batch, 3, size, size), "float32")
            ),
        )

    if want("ResNet-50"):
        resnet = transformers.ResNetModel(transformers.ResNetConfig()).eval()  # ResNet-50
        graph = interop.trace(resnet, image(2))
        yield Case(f"ResNet-50 ({size}x{size})", "torch", "torch.onnx", graph,
                   _torch_export(resnet, image),
                   lambda b: {graph.inputs[0].name: image(b)[0].numpy()})  # fmt: skip

    seq, layers = (128, 12) if full else (64, 4)
    for name, config in (
        ("BERT-base", lambda: transformers.BertConfig(num_hidden_layers=layers)),
        ("GPT-2", lambda: transformers.GPT2Config(n_layer=layers, use_cache=False)),
    ):
        if not want(name):
            continue
        torch.manual_seed(0)
        factory = transformers.BertModel if name == "BERT-base" else transformers.GPT2Model
        model = factory(config()).eval()
        graph = interop.trace(model, (torch.from_numpy(_ids(2, seq)),))
        yield Case(f"{name} ({layers} layers, seq {seq})", "torch", "torch.onnx", graph,
                   _torch_export(model, lambda b: (torch.from_numpy(_ids(b, seq)),)),
                   lambda b, g=graph: {g.inputs[0].name: _ids(b, seq)})  # fmt: skip


def _tf2onnx(model: Any, specs: list[Any]) -> Callable[[int], Any]:
    import tf2onnx

    converted: list[Any] = []

    def convert(batch: int) -> Any:  # dynamic batch: converted once
        if not converted:
            proto, _ = tf2onnx.convert.from_keras(model, input_signature=specs)
            converted.append(proto.SerializeToString())
        return converted[0]

    return convert


def keras_cases(full: bool, want: Callable[[str], bool]) -> Iterator[Case]:
    import keras
    import tensorflow as tf

    size = 224 if full else 64

    def image(batch: int) -> np.ndarray:
        return np.random.default_rng(batch).random((batch, size, size, 3), "float32")

    if want("ResNet50"):
        resnet = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3))
        graph = interop.trace(resnet, image(2))
        spec = [tf.TensorSpec((None, size, size, 3), tf.float32, name="input")]
        yield Case(f"ResNet50 ({size}x{size})", "keras", "tf2onnx", graph,
                   _tf2onnx(resnet, spec), lambda b: {graph.inputs[0].name: image(b)})  # fmt: skip
    if not want("keras_hub BERT"):
        return

    import keras_hub

    layers, hidden, seq = (12, 768, 128) if full else (2, 128, 64)
    bert = keras_hub.models.BertBackbone(
        vocabulary_size=1000, num_layers=layers, num_heads=max(2, hidden // 64),
        hidden_dim=hidden, intermediate_dim=4 * hidden, max_sequence_length=seq,
    )  # fmt: skip

    def tokens(batch: int) -> dict[str, np.ndarray]:
        return {
            "token_ids": _ids(batch, seq, dtype="int32"),
            "padding_mask": np.ones((batch, seq), "int32"),
            "segment_ids": np.zeros((batch, seq), "int32"),
        }

    graph = interop.trace(bert, tokens(2))
    specs = [tf.TensorSpec((None, seq), tf.int32, name=n) for n in tokens(1)]
    yield Case(f"keras_hub BERT ({layers} layers, d{hidden}, seq {seq})", "keras", "tf2onnx",
               graph, _tf2onnx(bert, [dict(zip(tokens(1), specs))]), tokens)  # fmt: skip


def flax_cases(full: bool, want: Callable[[str], bool]) -> Iterator[Case]:
    import jax
    import jax.numpy as jnp
    from bench_flax import CNN, Transformer
    from flax import nnx
    from jax2onnx import to_onnx

    rngs = nnx.Rngs(0)
    cnn = CNN(rngs)
    cnn.eval()
    for name, module, shape in (
        ("nnx CNN (2 conv + BN)", cnn, (32, 32, 3)),
        ("nnx transformer (4 blocks, d64, seq 16)", Transformer(rngs), (16, 64)),
    ):
        if not want(name):
            continue

        def data(batch: int, shape: tuple = shape) -> np.ndarray:
            return np.random.default_rng(batch).standard_normal((batch, *shape)).astype("float32")

        graph = interop.trace(module, data(2))
        exported: list[Any] = []

        def anchor(
            batch: int, module: Any = module, shape: tuple = shape, exported: list = exported
        ) -> Any:
            if not exported:  # symbolic batch: exported once
                exported.append(to_onnx(module, [("B", *shape)], return_mode="ir"))
            return exported[0]

        def native(batch: int, module: Any = module, data: Callable = data) -> Callable[[], Any]:
            jitted = jax.jit(lambda x: module(x))
            x = jnp.asarray(data(batch))
            return lambda: jax.block_until_ready(jitted(x))

        yield Case(name, "flax", "jax2onnx", graph, anchor,
                   lambda b, g=graph, d=data: {g.inputs[0].name: d(b)}, native)  # fmt: skip


def session(model: Any, threads: int) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    data = (
        model if isinstance(model, bytes) else ir.serde.serialize_model(model).SerializeToString()
    )
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _feeds(sess: Any, ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our inputs under the anchor's input names (same order, or same names)."""
    names = [i.name for i in sess.get_inputs()]
    if set(names) <= set(ours):
        return {n: ours[n] for n in names}
    return dict(zip(names, ours.values()))


_OURS: dict[str, tuple[Any, float, str]] = {}


def _nodes(model: Any) -> int:
    if isinstance(model, bytes):
        import onnx

        return len(onnx.load_from_string(model).graph.node)
    return len(model.graph)


def measure(case: Case, batch: int, rounds: int, threads: int) -> dict[str, Any]:
    start = time.perf_counter()
    anchor_model = case.anchor(batch)
    export_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = session(anchor_model, threads)
    anchor_session_s = time.perf_counter() - start
    if case.name not in _OURS:  # a fresh Graph, no cached copy: what a first run pays
        fresh = interop.Graph(case.graph.model)
        start = time.perf_counter()
        model = optimized_model(fresh)
        _OURS[case.name] = (model, time.perf_counter() - start, optimization(fresh)["stage"])
    model, ours_setup_s, stage = _OURS[case.name]
    ours = session(model, threads)
    feeds = case.inputs(batch)
    their_feeds = _feeds(theirs, feeds)
    want, got = theirs.run(None, their_feeds)[0], ours.run(None, feeds)[0]
    diff = float(np.abs(np.asarray(want, np.float64) - got).max())
    calls: dict[str, Callable[[], Any]] = {
        "anchor": lambda: theirs.run(None, their_feeds),
        "ours": lambda: ours.run(None, feeds),
    }
    if case.native is not None:
        calls["jit"] = case.native(batch)
    for call in calls.values():  # warm-up
        call()
    begin = time.perf_counter()
    calls["anchor"]()
    single = time.perf_counter() - begin
    # each round takes the fastest of a few calls per side: a call the shared machine
    # preempted says nothing about the graph (at least 3 calls, about 0.3 s, per side and round)
    repeat = int(min(20, max(3, 0.3 // max(single, 1e-6))))
    times: dict[str, list[float]] = {k: [] for k in calls}
    order = list(calls)
    for index in range(rounds):
        for key in order if index % 2 == 0 else order[::-1]:
            best = float("inf")
            for _ in range(repeat):
                begin = time.perf_counter()
                calls[key]()
                best = min(best, time.perf_counter() - begin)
            times[key].append(best)
    ratios = np.array(times["ours"]) / np.array(times["anchor"])
    result = {
        "ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
        "ratio": float(np.median(ratios)),
        "iqr": (float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))),
        "anchor_session_s": anchor_session_s,
        "export_s": export_s,
        "ours_setup_s": ours_setup_s,
        "stage": stage,
        "diff": diff,
        "repeat": repeat,
        "nodes": (_nodes(anchor_model), len(model.graph)),
    }
    if "jit" in times:
        result["jit_ratio"] = float(np.median(np.array(times["ours"]) / np.array(times["jit"])))
    return result


def key_cost(nodes: int = 2000, runs: int = 300) -> tuple[float, float, float]:
    """Per-run cost of the runtime's cache key on a `nodes`-node graph (MatMul + LeakyRelu
    pairs, 1,000 initializers): (key check s, whole `Graph.run` s, key walk after an edit
    elsewhere in the process s)."""
    from interop.runtime_cache import current

    def chain(n: int) -> ir.Model:
        x = ir.val("x", ir.DataType.FLOAT, [1, 16])
        body, inits, v = [], [], x
        for i in range(n // 2):
            eye = ir.tensor(np.eye(16, dtype=np.float32))
            w = ir.val(f"w{i}", ir.DataType.FLOAT, [16, 16], const_value=eye)
            inits.append(w)
            mm = ir.node("MatMul", [v, w], name=f"mm{i}")
            body += [mm, ir.node("LeakyRelu", [mm.outputs[0]], {"alpha": 0.5}, name=f"lr{i}")]
            v = body[-1].outputs[0]
        v.name = "y"
        graph = ir.Graph([x], [v], nodes=body, initializers=inits, opset_imports={"": 18})
        return ir.Model(graph, ir_version=9)

    g, other = interop.Graph(chain(nodes)), chain(4)
    x = np.ones((1, 16), np.float32)
    g.run(x)
    current(g)  # building the copy moved the edit counter: the first check walks once
    start = time.perf_counter()
    for _ in range(runs):
        current(g)
    key = (time.perf_counter() - start) / runs
    start = time.perf_counter()
    for _ in range(runs):
        g.run(x)
    run = (time.perf_counter() - start) / runs
    start = time.perf_counter()
    for _ in range(runs // 10):
        other.graph.initializers["w0"].const_value = ir.tensor(np.eye(16, dtype=np.float32))
        current(g)
    return key, run, (time.perf_counter() - start) / (runs // 10)


FRAMEWORKS = {"torch": torch_cases, "keras": keras_cases, "flax": flax_cases}
# every model, by the name its row starts with: what --only matches, one subprocess each
MODELS = {
    "torch": ["ResNet-50", "BERT-base", "GPT-2"],
    "keras": ["ResNet50", "keras_hub BERT"],
    "flax": ["nnx CNN", "nnx transformer"],
}
HEADERS = [
    "model", "anchor", "batch", "anchor ms", "ours ms", "ours / anchor (IQR)",
    "anchor session s", "ours optimize + session s", "nodes anchor / ours", "stage",
    "max diff", "jax.jit (ours / jit)",
]  # fmt: skip


def selected(only: list[str]) -> list[tuple[str, str]]:
    """(framework, model) pairs that --only names (a framework or a name substring)."""
    names = [o for o in only if o not in FRAMEWORKS]
    return [
        (framework, model)
        for framework, models in MODELS.items()
        for model in models
        if not only
        or framework in only
        or any(o.lower() in model.lower() or model.lower() in o.lower() for o in names)
    ]


def rows_of(framework: str, model: str, args: argparse.Namespace) -> list[list[str]]:
    """Measure one model's rows in this process."""
    rows = []
    for case in FRAMEWORKS[framework](args.full, lambda name: name.startswith(model)):
        for batch in args.batches:
            r = measure(case, batch, args.rounds, args.threads)
            lo, hi = r["iqr"]
            jit = f"{r['ms']['jit']:.2f} ms ({r['jit_ratio']:.2f}x)" if "jit" in r["ms"] else ""
            row = [
                case.name, case.anchor_name, str(batch),
                f"{r['ms']['anchor']:.2f}", f"{r['ms']['ours']:.2f}",
                f"**{r['ratio']:.2f}** ({lo:.2f}-{hi:.2f})",
                f"{r['anchor_session_s']:.2f}", f"{r['ours_setup_s']:.2f}",
                f"{r['nodes'][0]} / {r['nodes'][1]}", r["stage"], f"{r['diff']:.1e}", jit,
            ]  # fmt: skip
            print(" | ".join(row), flush=True)
            rows.append(row)
    return rows


def isolated(framework: str, model: str, argv: list[str]) -> list[list[str]]:
    """Run one model in a subprocess of its own, so that its memory (a 12-layer model,
    its exporter's conversion) is given back before the next model starts."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, __file__, *argv, "--model", framework, model, "--rows", str(out)]
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not out.exists():
            print(f"{model}: the subprocess failed (exit {done.returncode})", flush=True)
            return []
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the models at their real sizes")
    parser.add_argument("--only", nargs="*", default=[], help="frameworks or name substrings")
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update docs/performance.md")
    parser.add_argument("--key-cost", action="store_true", help="only the cache key's cost")
    parser.add_argument("--note", default="", help="a sentence added under the table")
    parser.add_argument("--model", nargs=2, help=argparse.SUPPRESS)  # a child: one model
    parser.add_argument("--rows", help=argparse.SUPPRESS)  # where a child writes its rows
    args = parser.parse_args()
    if args.model:
        import json

        Path(args.rows).write_text(json.dumps(rows_of(*args.model, args)))
        return
    key, run, walk = key_cost()
    key_line = (
        f"Cache key (`interop/runtime_cache.py`) on a 2,000-node graph: {key * 1e6:.2f} us per "
        f"run against {run * 1e3:.2f} ms for the whole `Graph.run`; a run after an edit "
        f"elsewhere in the process walks the graph once: {walk * 1e3:.2f} ms."
    )
    print(key_line, flush=True)
    if args.key_cost:
        return
    argv = ["--batches", *map(str, args.batches), "--rounds", str(args.rounds),
            "--threads", str(args.threads)] + (["--full"] if args.full else [])  # fmt: skip
    rows = []
    for framework, model in selected(args.only):
        rows += isolated(framework, model, argv)
    sizes = "full sizes (--full)" if args.full else "quick sizes (default; --full for real sizes)"
    text = "\n".join(
        [
            "### Our graphs vs each exporter's graph on ONNX Runtime (benchmarks/bench_runtime.py)"
            if not args.full
            else "#### At full size (bench_runtime.py --full)",
            "",
            f"{machine()}; onnxruntime {ort.__version__}, {args.threads} intra-op threads; "
            f"{sizes}; each model in a subprocess of its own; {args.rounds} interleaved "
            "rounds, each the fastest of a few calls per side (3 to 20 calls, about 0.3 s), "
            "medians; the ratio is the median of per-round ratios with its 25-75% range. "
            "*stage*: the optimization stage ours ran (interop/optimize.py). *max diff*: "
            "largest difference between the two graphs' first outputs."
            + (f" {args.note}" if args.note else ""),
            "",
            table(HEADERS, rows),
            "",
            key_line,
        ]
    )
    print(text)
    if args.write:
        write_section("runtime-full" if args.full else "runtime", text)


if __name__ == "__main__":
    main()
