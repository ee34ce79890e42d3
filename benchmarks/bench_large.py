"""A model with more than 2 GB of float32 weights: trace, save, load, run, emit.

Each stage runs in a fresh Python process, so its peak resident memory (ru_maxrss,
which counts mapped pages of the weight file too) is that stage's alone. The goal is a
peak of at most 2.5x the weight size per stage. The run and emit stages also write
their outputs, which are compared with torch's (computed in the trace stage) at the end.

    python benchmarks/bench_large.py [--size 16384] [--layers 2] [--keep DIR]
                                     # writes its section of docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

COMMON = """
import json, resource, sys, time
import numpy as np
sys.path.insert(0, {root!r})
work, size, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def report(**extra):
    print("RESULT " + json.dumps(dict(peak=peak(), **extra)))
"""

STAGES = {
    # the module is built with torch.empty and then filled, so every weight page is real
    "trace + save": """
        import torch, interop
        torch.manual_seed(0)
        with torch.device("meta"):
            net = torch.nn.Sequential(*[torch.nn.Linear(size, size) for _ in range(layers)])
        net = net.to_empty(device="cpu").eval()
        with torch.no_grad():
            for p in net.parameters():
                p.uniform_(-1 / size**0.5, 1 / size**0.5)
        x = torch.randn(2, size)
        with torch.no_grad():
            np.save(work + "/expected.npy", net(x).numpy())
        np.save(work + "/x.npy", x.numpy())
        baseline = peak()
        start = time.perf_counter()
        graph = interop.trace(net, (x,))
        traced = time.perf_counter() - start
        graph.save(work + "/big.onnx")
        report(baseline=baseline, seconds=time.perf_counter() - start, trace_seconds=traced)
    """,
    "load": """
        import interop
        baseline = peak()
        start = time.perf_counter()
        graph = interop.load(work + "/big.onnx")
        graph.summary(print_fn=None)
        report(baseline=baseline, seconds=time.perf_counter() - start)
    """,
    "load + run (ONNX Runtime)": """
        import interop
        x = np.load(work + "/x.npy")
        baseline = peak()
        start = time.perf_counter()
        y = interop.load(work + "/big.onnx").run(x)
        np.save(work + "/run.npy", y)
        report(baseline=baseline, seconds=time.perf_counter() - start)
    """,
    "load + emit (to_torch) + forward": """
        import torch, interop
        from interop.emit import to_torch
        x = torch.from_numpy(np.load(work + "/x.npy"))
        baseline = peak()
        start = time.perf_counter()
        module = to_torch(interop.load(work + "/big.onnx"))
        with torch.no_grad():
            np.save(work + "/emit.npy", module(x).numpy())
        report(baseline=baseline, seconds=time.perf_counter() - start)
    """,
}


def run_stage(name: str, work: str, size: int, layers: int) -> dict:
    code = COMMON.format(root=str(ROOT)) + textwrap.dedent(STAGES[name])
    done = subprocess.run(
        [sys.executable, "-c", code, work, str(size), str(layers)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"stage '{name}' failed:\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=16384, help="in and out features per layer")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--keep", help="keep the model files in this folder")
    parser.add_argument("--no-write", action="store_true", help="print, do not write the doc")
    args = parser.parse_args()
    import numpy as np

    weight_bytes = args.layers * (args.size * args.size + args.size) * 4
    with tempfile.TemporaryDirectory(prefix="interop-large-", dir=args.keep) as work:
        rows, results = [], {}
        for name in STAGES:
            start = time.perf_counter()
            result = run_stage(name, work, args.size, args.layers)
            results[name] = result
            ratio = result["peak"] / weight_bytes
            rows.append(
                [
                    name,
                    f"{result['peak'] / 2**30:.2f} GiB",
                    f"{result['baseline'] / 2**30:.2f} GiB",
                    f"{ratio:.2f}x",
                    "yes" if ratio <= 2.5 else "**no**",
                    f"{result['seconds']:.1f} s",
                ]
            )
            print(rows[-1], f"(stage wall {time.perf_counter() - start:.1f} s)", flush=True)
        expected = np.load(Path(work) / "expected.npy")
        errors = {
            which: float(np.abs(np.load(Path(work) / f"{which}.npy") - expected).max())
            for which in ("run", "emit")
        }
        files = sorted(Path(work).glob("big.onnx*"))
        sizes = ", ".join(f"`{f.name}` {f.stat().st_size / 2**30:.2f} GiB" for f in files)
    markdown = "\n\n".join(
        [
            "## Models over 2 GB (issue 7)",
            f"Measured by `benchmarks/bench_large.py` on {machine()}: {args.layers} x "
            f"`nn.Linear({args.size}, {args.size})`, {weight_bytes / 2**30:.2f} GiB "
            f"({weight_bytes / 1e9:.2f} GB) of float32 weights. Every stage runs in a fresh "
            "process; *peak* is its maximum resident set (ru_maxrss, mapped weight pages "
            "included), *imports* the resident set before the stage's work began "
            "(Python, numpy, torch; the trace stage also holds the torch module). "
            "Goal: peak at most 2.5x the weight size.",
            table(
                ["stage", "peak RSS", "imports (+ module)", "peak / weights", "<= 2.5x", "time"],
                rows,
            ),
            f"Files: {sizes}. Largest difference from torch's output: ONNX Runtime "
            f"{errors['run']:.2g}, emitted torch module {errors['emit']:.2g}.",
        ]
    )
    print(markdown)
    if not args.no_write:
        write_section("large", markdown)


if __name__ == "__main__":
    main()
