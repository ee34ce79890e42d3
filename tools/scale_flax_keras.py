"""Peak memory of Flax and Keras capture with weights apart (issue 20), per stage.

Each case runs in its own process (peak RSS is per process): build the model, trace it,
save the graph with external data. Peaks are given over the process's RSS after its
imports. The weights (random, float32) are written first, by another process, into one
safetensors file.

- ``flax-abstract``: ``nnx.eval_shape`` model traced with ``weights=`` the file;
- ``flax-eager``: the same model with values, traced as usual (no ``weights=``);
- ``keras-stateless``: keras_hub LlamaBackbone built under
  ``keras.StatelessScope(initialize_variables=False)``, traced with ``weights=``;
- ``keras-built``: the backbone built normally (its own random values), ``weights=``;
- ``keras-eager``: the backbone built normally, traced as usual;
- ``keras-resnet50`` (not in the default table): ``keras.applications.ResNet50(weights=None)``
  traced as usual on one 224x224 image (its weights stand for themselves: no file).

    python tools/scale_flax_keras.py            # prints a markdown table
    python tools/scale_flax_keras.py --scale 2 --cases flax-abstract,keras-stateless
    python tools/scale_flax_keras.py --cases keras-eager --check-dims   # interop.trace as is

Results are in docs/guides/large-models.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALE = [1]  # layers x this (--scale)
CHECK_DIMS = [False]  # the eager cases run the dynamic-dim check too (--check-dims)
CASES = ["flax-abstract", "flax-eager", "keras-stateless", "keras-built", "keras-eager"]
EXTRA = ["keras-resnet50"]
LLAMA = dict(
    vocabulary_size=32000,
    num_layers=6,
    num_query_heads=16,
    num_key_value_heads=4,
    hidden_dim=1024,
    intermediate_dim=2816,
    dtype="float32",
)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _flax_model(abstract: bool):
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, dim, rngs):
            self.norm = nnx.LayerNorm(dim, rngs=rngs)
            self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
            self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.gelu(self.up(self.norm(x))))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(32000, 1024, rngs=rngs)
            self.blocks = nnx.List([Block(1024, rngs) for _ in range(12 * SCALE[0])])

        def __call__(self, ids):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return jnp.mean(x, axis=-1)

    if abstract:
        return nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    return Net(nnx.Rngs(0))


def _keras_model(stateless: bool):
    import keras
    import keras_hub

    config = {**LLAMA, "num_layers": LLAMA["num_layers"] * SCALE[0]}
    if stateless:
        with keras.StatelessScope(initialize_variables=False):
            return keras_hub.models.LlamaBackbone(**config)
    return keras_hub.models.LlamaBackbone(**config)


def _inputs(framework: str):
    import numpy as np

    ids = (np.arange(16, dtype=np.int32) % 1000).reshape(1, 16)
    if framework == "flax":
        return ids
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def write(framework: str, file: Path) -> None:
    """Random float32 weights named as the capture names them."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    if framework == "flax":
        import jax
        from interop.adapters.flax.capture import capture

        cap = capture(_flax_model(abstract=True))
        leaves = jax.tree_util.tree_leaves(cap.params)
        specs = [(n, tuple(leaf.shape)) for n, leaf in zip(cap.names, leaves, strict=True)]
    else:
        specs = [(v.path, tuple(v.shape)) for v in _keras_model(stateless=True).weights]
    tensors = {}
    for name, shape in specs:
        tensors[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
        if name.endswith(("scale", "gamma")):
            tensors[name] += 1
    save_file(tensors, str(file))


def run(case: str, file: Path, out: Path) -> dict[str, float]:
    """Peak RSS over the post-import baseline after each stage, and each stage's time."""
    import interop

    framework, mode = case.split("-")
    if framework == "flax":
        import jax  # noqa: F401
        from flax import nnx  # noqa: F401
    else:
        import keras_hub  # noqa: F401
    base = _peak_mib()
    result: dict[str, float] = {}
    start = time.perf_counter()
    inputs = _inputs(framework)
    if framework == "flax":
        model = _flax_model(abstract=mode == "abstract")
    elif mode == "resnet50":
        import keras
        import numpy as np

        model = keras.applications.ResNet50(weights=None)
        inputs = np.random.default_rng(0).random((1, 224, 224, 3), np.float32)
    else:
        model = _keras_model(stateless=mode == "stateless")
    result["build_s"], result["build_mib"] = time.perf_counter() - start, _peak_mib() - base
    start = time.perf_counter()
    usual = mode in ("eager", "resnet50")
    options = {"check_dims": CHECK_DIMS[0]} if usual else {"weights": file}
    graph = interop.trace(model, inputs, **options)
    result["trace_s"], result["trace_mib"] = time.perf_counter() - start, _peak_mib() - base
    start = time.perf_counter()
    graph.save(out / f"{case}.onnx", external_data=True)
    result["save_s"], result["save_mib"] = time.perf_counter() - start, _peak_mib() - base
    if mode == "resnet50":
        result["weights_mib"] = sum(int(np.prod(v.shape)) * 4 for v in model.weights) / 2**20
    else:
        result["weights_mib"] = os.path.getsize(file) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=CASES + EXTRA)
    parser.add_argument("--write", choices=["flax", "keras"])
    parser.add_argument("--file", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scale", type=int, default=1, help="layers times this")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated")
    parser.add_argument(
        "--check-dims", action="store_true", help="the usual traces as interop.trace's default"
    )
    args = parser.parse_args()
    SCALE[0] = args.scale
    CHECK_DIMS[0] = args.check_dims
    if args.write:
        write(args.write, args.file)
        return
    if args.case:
        print(json.dumps(run(args.case, args.file, args.out)))
        return
    env = {**os.environ, "KERAS_BACKEND": os.environ.get("KERAS_BACKEND", "tensorflow")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {fw: folder / f"{fw}.safetensors" for fw in ("flax", "keras")}
        for fw, file in files.items():
            command = [sys.executable, __file__, "--write", fw, "--file", str(file)]
            command += ["--scale", str(args.scale)]
            subprocess.run(command, check=True, env=env)
        for case in args.cases.split(","):
            out = folder / "out"
            out.mkdir(exist_ok=True)
            command = [sys.executable, __file__, "--case", case, "--file"]
            command += [str(files[case.split("-")[0]]), "--out", str(out)]
            command += ["--scale", str(args.scale)] + ["--check-dims"] * args.check_dims
            done = subprocess.run(command, check=True, env=env, capture_output=True, text=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((case, result))
            for path in out.iterdir():
                path.unlink()
    print("| case | weights | build | trace | save |")
    print("|---|---|---|---|---|")
    for case, r in rows:
        cells = [
            f"+{r[f'{stage}_mib']:.0f} MiB, {r[f'{stage}_s']:.1f} s"
            for stage in ("build", "trace", "save")
        ]
        print(f"| {case} | {r['weights_mib']:.0f} MiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
