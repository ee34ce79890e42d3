"""Sweep: the optimized copy ONNX Runtime runs (`Graph.run`) against the faithful graph,
over whole model families.

    nice -n 10 python tools/sweep_optimize.py --family hf --out /tmp/opt_hf.jsonl
    nice -n 10 python tools/sweep_optimize.py --family keras_hub --out /tmp/opt_kh.jsonl
    python tools/sweep_optimize.py --family hf Llama BERT        # a few models
    python tools/sweep_optimize.py --table /tmp/opt_hf.jsonl /tmp/opt_kh.jsonl

Families: every Hugging Face transformers architecture of tools/sweep_hf_torch.py (its
``--all`` set, traced with ``interop.trace(model, first, dynamic_dims=dims)`` as its
``run_one`` does) and every keras_hub entry of tools/sweep_keras_hub.py on the TensorFlow
backend (traced with ``interop.trace(model, x)`` as its ``run_one`` does). Each model runs
in its own forked process (sweep_hf_torch's ``_forked``, killed at the timeout). Per model:

- two inputs: the example, and one of another batch (3) and, for sequences, another
  length (HF: the sweep's ``make(3, 10)``; keras_hub: the example resized along the
  graph's symbolic dims, batch 2 -> 3 and length 8 -> 12, values tiled so ids and masks
  stay valid);
- ``graph.run`` (the optimized copy) against a plain ONNX Runtime CPU session of
  ``graph.to_bytes()`` (the graph as captured; ORT's own default optimizations only):
  max abs diff and whether every output agrees within rtol = atol = 1e-5;
- the stage the runtime kept (``optimization(graph)["stage"]``), node counts of the
  faithful graph and of ``optimized_model(graph)``, and the fused op types in the copy;
- on a disagreement, each stage of ``optimized_copy`` run on its own against the
  faithful graph, to name the stage that introduced it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep_hf_torch as hf  # noqa: E402  (tools/ is not a package)

RTOL = ATOL = 1e-5
# op types of the optimized copy worth a column: the fusions and what they replace
FUSED = ("Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization",
         "LayerNormalization", "FastGelu", "Gelu", "BiasGelu", "RotaryEmbedding",
         "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization",
         "FusedMatMul", "Conv", "BatchNormalization")  # fmt: skip
GROUPS = {"Attention / MHA / GQA": ("Attention", "MultiHeadAttention", "GroupQueryAttention"),
          "SkipLN / SkipRMS": ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"),
          "RMSNorm": ("SimplifiedLayerNormalization", "RMSNormalization"),
          "Gelu / FastGelu / BiasGelu": ("Gelu", "FastGelu", "BiasGelu"),
          "RotaryEmbedding": ("RotaryEmbedding",), "FusedMatMul": ("FusedMatMul",)}  # fmt: skip
SHORT = {"MultiHeadAttention": "MHA", "GroupQueryAttention": "GQA", "Attention": "Attn",
         "SkipLayerNormalization": "SkipLN", "LayerNormalization": "LN",
         "SimplifiedLayerNormalization": "RMSNorm*", "SkipSimplifiedLayerNormalization": "SkipRMS",
         "RMSNormalization": "RMSNorm", "RotaryEmbedding": "Rotary",
         "BatchNormalization": "BN"}  # fmt: skip


def _kh():
    import sweep_keras_hub

    return sweep_keras_hub


# ----------------------------------------------------------------------------- comparison
def _ops(model) -> Counter:
    """Op types of every node, subgraphs and functions included."""
    counts = Counter(node.op_type for node in model.graph.all_nodes())
    for function in model.functions.values():
        counts.update(node.op_type for node in function.all_nodes())
    return counts


def _diff(got: dict, want: dict) -> tuple[float, bool, str]:
    """(max abs diff, all within tolerance, first problem) of outputs matched by name."""
    import numpy as np

    worst, ok, problem = 0.0, True, ""
    if set(got) != set(want):
        return float("inf"), False, f"outputs {sorted(got)} instead of {sorted(want)}"
    for name, expected in want.items():
        a, b = np.asarray(got[name]), np.asarray(expected)
        if a.shape != b.shape:
            return float("inf"), False, f"{name}: shape {a.shape} instead of {b.shape}"
        if not a.size:
            continue
        if b.dtype.kind in "fc":
            d = np.abs(a.astype(np.float64) - b.astype(np.float64))
            d = d[~(np.isnan(a) & np.isnan(b))]
            worst = max(worst, float(d.max()) if d.size else 0.0)
            close = bool(np.allclose(a, b, rtol=RTOL, atol=ATOL, equal_nan=True))
        else:
            close = bool(np.array_equal(a, b))
            worst = max(worst, 0.0 if close else float("inf"))
        if not close and ok:
            ok, problem = False, f"{name}: max abs diff {worst:.3g}"
    return worst, ok, problem


def _faithful(graph):
    """The graph as captured on a plain ONNX Runtime CPU session (no interop optimization)."""
    import onnxruntime as ort

    session = ort.InferenceSession(graph.to_bytes(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(None, feeds)))


def _stage_diffs(graph, feeds: dict, want: dict) -> dict:
    """Each stage of the optimized copy on its own against the faithful run."""
    import onnx_ir as ir
    import onnxruntime as ort

    from interop.optimize import optimized_copy

    out = {}
    for stage in optimized_copy(graph.model)[::-1]:
        try:
            data = ir.serde.serialize_model(stage.model).SerializeToString()
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            worst, ok, problem = _diff(dict(zip(names, session.run(None, feeds))), want)
            fused = {k: v for k, v in stage.counts.items() if v}
            out[stage.name] = {"max_abs": worst, "ok": ok, "problem": problem, "counts": fused}
        except Exception as err:
            out[stage.name] = {"error": _short(err)}
    return out


def compare(graph, inputs: list[tuple[str, dict]]) -> dict:
    """The optimized copy (`graph.run`) against the faithful graph on each (label, feeds)."""
    from interop.runtime import optimization, optimized_model, prepare_inputs

    res: dict = {"inputs": [], "ok": True, "max_abs": 0.0}
    faithful = _faithful(graph)
    for label, named in inputs:
        entry: dict = {"input": label}
        feeds = prepare_inputs(graph, (), named)
        entry["shapes"] = {k: list(v.shape) for k, v in feeds.items()}
        try:
            want = faithful(feeds)
        except Exception as err:  # not comparable: the captured graph itself refuses it
            entry["faithful_error"] = _short(err)
            res["inputs"].append(entry)
            continue
        try:
            got = graph.run(feeds, as_dict=True)
            entry["max_abs"], entry["ok"], problem = _diff(dict(got), want)
            if problem:
                entry["problem"] = problem
        except Exception as err:  # the copy fails where the faithful graph runs: a bug
            entry["ok"], entry["max_abs"], entry["run_error"] = False, None, _short(err)
        if not entry["ok"]:
            res["ok"] = False
            res.setdefault("stages_alone", _stage_diffs(graph, feeds, want))
        res["max_abs"] = max(res["max_abs"], entry["max_abs"] or 0.0)
        res["inputs"].append(entry)
    compared = [e for e in res["inputs"] if "ok" in e]
    res["compared"] = len(compared)
    res["ok"] = res["ok"] and len(compared) == len(inputs)
    report = optimization(graph)
    res["stage"] = report["stage"]
    if report["stage"].startswith("as captured (the optimized copy failed"):
        # Graph.run fell back to the captured graph after the copy failed at run time: the
        # numbers above are the faithful graph's; what failed, by a session of the copy
        res["ok"] = False
        res["copy_error"], failing = _copy_error(graph, inputs)
        if failing is not None:
            feeds = prepare_inputs(graph, (), failing)
            res.setdefault("stages_alone", _stage_diffs(graph, feeds, faithful(feeds)))
    res["tried"] = report["tried"]
    if any(t.startswith("optimizer failed") for t in report["tried"]):
        res["optimizer_cause"] = _optimizer_cause(graph)
    res["optimize_s"] = round(report.get("optimize_s", 0.0), 2)
    before, after = _ops(graph.model), _ops(optimized_model(graph))
    res["nodes_faithful"], res["nodes_optimized"] = sum(before.values()), sum(after.values())
    res["fused"] = {op: after[op] for op in FUSED if after[op]}
    res["faithful_bn"] = before["BatchNormalization"]
    return res


def _copy_error(graph, inputs: list[tuple[str, dict]]) -> tuple[str, dict | None]:
    """The error of the optimized copy on its own ONNX Runtime session, and its input."""
    import onnx_ir as ir
    import onnxruntime as ort

    from interop.runtime import optimized_model, prepare_inputs

    data = ir.serde.serialize_model(optimized_model(graph)).SerializeToString()
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:
        return "session: " + _short(err), None
    for label, named in inputs:
        try:
            session.run(None, prepare_inputs(graph, (), named))
        except Exception as err:
            return f"{label}: {_short(err)}", named
    return "not reproduced on a fresh session", None


def _optimizer_cause(graph) -> str:
    """The innermost error of the optimizer, which the runtime's report cuts short."""
    from interop.optimize import optimized_copy

    try:
        optimized_copy(graph.model)
    except Exception as err:
        while err.__cause__ is not None:
            err = err.__cause__
        return _short(err)
    return "not reproduced"


def _short(err) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


# ------------------------------------------------------------------------------- families
def run_hf(name: str) -> dict:
    """One Hugging Face architecture of tools/sweep_hf_torch.py, traced as its run_one does."""
    import warnings

    warnings.filterwarnings("ignore")
    import interop

    result = {"name": name, "family": family_of("hf", name), "capture": False}
    t0 = time.time()
    model, make = hf.build(name)
    first, dims = make(2, 7)
    second, _ = make(3, 10)
    try:
        graph = interop.trace(model, first, dynamic_dims=dims)
    except Exception as err:
        result["capture_error"] = _short(err)
        return result
    result["capture"], result["trace_s"] = True, round(time.time() - t0, 1)
    names = {spec.name for spec in graph.inputs}
    inputs = [
        (label, {k: v.numpy() for k, v in feeds.items() if k in names})
        for label, feeds in (("batch 2, length 7", first), ("batch 3, length 10", second))
    ]
    result.update(compare(graph, inputs))
    return result


def _kh_feeds(graph, x) -> dict:
    """keras_hub's example input by graph input name (its run_one's matching)."""
    xs = (
        list(x.values())
        if isinstance(x, dict)
        else list(x if isinstance(x, (list, tuple)) else [x])
    )
    return {
        spec.name: x[spec.name] if isinstance(x, dict) and spec.name in x else xs[i]
        for i, spec in enumerate(graph.inputs)
    }


def resized(graph, feeds: dict, batch: int = 3, grow: int = 4) -> tuple[dict, str]:
    """The example resized along the graph's symbolic dims: the leading one to `batch`,
    others of the sequence length (8) grown by `grow`; values tiled along each resized
    axis (rolled by one along the batch), so token ids and masks stay valid."""
    import numpy as np

    kh = _kh()
    sizes: dict = {}
    for spec in graph.inputs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and spec.name in feeds:
                old = np.shape(feeds[spec.name])[axis]
                sizes[dim] = batch if axis == 0 else (old + grow if old == kh.SEQ else old)
    out = {}
    for spec in graph.inputs:
        a = np.asarray(feeds[spec.name])
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str) and sizes.get(dim, a.shape[axis]) != a.shape[axis]:
                index = np.arange(sizes[dim]) + (1 if axis == 0 else 0)
                a = np.take(a, index % a.shape[axis], axis=axis)
        out[spec.name] = a
    label = ", ".join(f"{k}={v}" for k, v in sizes.items()) or "the example again (no symbolic dim)"
    return out, label


def run_keras_hub(name: str) -> dict:
    """One keras_hub entry of tools/sweep_keras_hub.py, traced as its run_one does."""
    import warnings

    warnings.filterwarnings("ignore")
    import interop

    kh = _kh()
    result = {"name": name, "family": family_of("keras_hub", name), "capture": False}
    t0 = time.time()
    try:
        model, x = kh.CONFIGS[name]()
    except kh.Unbuildable as err:
        result["capture_error"] = f"unbuildable: {err}"
        return result
    try:
        graph = interop.trace(model, x)
    except Exception as err:
        result["capture_error"] = _short(err)
        return result
    result["capture"], result["trace_s"] = True, round(time.time() - t0, 1)
    first = _kh_feeds(graph, x)
    second, label = resized(graph, first)
    result.update(compare(graph, [("example (batch 2)", first), (label, second)]))
    if "faithful_error" in result["inputs"][-1]:
        # the captured graph itself refuses the longer sequence (CLIP's text positions are
        # a static 8): compare on another batch alone
        second, label = resized(graph, first, grow=0)
        label += f" (the captured graph refuses length {kh.SEQ + 4})"
        result.update(compare(graph, [("example (batch 2)", first), (label, second)]))
    return result


FAMILIES = {"hf": run_hf, "keras_hub": run_keras_hub}


def family_of(family: str, name: str) -> str:
    if family == "hf":
        return "hf " + hf.CASES[name][0]
    return "keras_hub task" if name in _kh().TASKS else "keras_hub backbone"


def names_of(family: str) -> list[str]:
    if family == "hf":
        return list(hf.CASES)
    kh = _kh()
    return sorted(kh.CONFIGS, key=lambda n: (n in kh.TASKS, n))


def _preload(family: str, names: list[str]) -> None:
    """Import the frameworks once; each forked child then starts warm."""
    if family == "hf":
        hf._preload(names)
        return
    import keras_hub  # noqa: F401
    import onnxruntime  # noqa: F401
    import tensorflow  # noqa: F401
    from onnxscript import optimizer, rewriter  # noqa: F401

    import interop  # noqa: F401
    from interop import optimize  # noqa: F401


# ---------------------------------------------------------------------------------- table
def _cell(result: dict) -> str:
    if not result.get("capture"):
        return "not traced"
    diffs = [e.get("max_abs") for e in result.get("inputs", [])]
    return " / ".join("-" if d is None else f"{d:.1e}" for d in diffs)


def _note(r: dict) -> str:
    notes = []
    if not r.get("capture"):
        notes.append(r.get("capture_error", ""))
    for e in r.get("inputs", []):
        for key in ("faithful_error", "run_error", "problem"):
            if key in e:
                notes.append(f"{e['input']}: {key.replace('_', ' ')}: {e[key]}")
    for stage, s in r.get("stages_alone", {}).items():
        notes.append(f"{stage} alone: {s.get('error') or ('ok' if s['ok'] else s['problem'])}")
    if "copy_error" in r:
        notes.append("the copy failed at run time: " + r["copy_error"])
    if "optimizer_cause" in r:
        notes.append("optimizer failed: " + r["optimizer_cause"])
    refused = [t for t in r.get("tried", []) if "refused" in t]
    if "optimizer_cause" not in r:
        refused += [t for t in r.get("tried", []) if t.startswith("optimizer failed")]
    notes += refused
    return " ".join("; ".join(notes).split())[:300].replace("|", "/")


def _failed(r: dict) -> bool:
    """The copy disagreed with the faithful graph or failed where it runs."""
    return "copy_error" in r or any(e.get("ok") is False for e in r.get("inputs", []))


def table(results: list[dict]) -> str:
    """Per-family summary, then one row per model (markdown); a later line for a model wins."""
    results = list({r["name"]: r for r in results}.values())
    families = list(dict.fromkeys(r["family"] for r in results))
    rows = ["| family | models | traced | within 1e-5 on both inputs | copy disagrees or fails "
            "| example only (the capture refuses the second input) "
            "| stage: attention / fuse / fold / as captured |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for family in [*families, "all"]:
        group = [r for r in results if family in ("all", r["family"])]
        traced = [r for r in group if r.get("capture")]
        ok = sum(1 for r in traced if r.get("ok"))
        bad = sum(1 for r in traced if _failed(r))
        stages = Counter(str(r.get("stage")).split(" (")[0] for r in traced)
        label = f"**{family}**" if family == "all" else family
        rows.append(
            f"| {label} | {len(group)} | {len(traced)} | {ok} | {bad} | {len(traced) - ok - bad} | "
            + " / ".join(str(stages[s]) for s in ("attention", "fuse", "fold", "as captured"))
            + " |"
        )
    rows += ["", "Models whose optimized copy holds each fusion (BN folded: the capture has "
             "BatchNormalization, the copy none):", "",
             "| family | " + " | ".join(GROUPS) + " | BN folded | nodes faithful -> copy (sum) |",
             "|---|" + "---|" * (len(GROUPS) + 2)]  # fmt: skip
    for family in [*families, "all"]:
        group = [
            r for r in results if family in ("all", r["family"]) and r.get("fused") is not None
        ]
        has = [sum(1 for r in group if set(r["fused"]) & set(ops)) for ops in GROUPS.values()]
        folded = sum(
            1 for r in group if r["faithful_bn"] and not r["fused"].get("BatchNormalization")
        )
        before = sum(r["nodes_faithful"] for r in group)
        after = sum(r["nodes_optimized"] for r in group)
        label = f"**{family}**" if family == "all" else family
        rows.append(
            f"| {label} | " + " | ".join(map(str, has)) + f" | {folded} | {before} -> {after} |"
        )
    rows += ["", "| model | family | stage | nodes faithful -> copy | max abs diff (input 1 / 2) "
             "| within 1e-5 | fused ops in the copy | note |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        fused = ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in r.get("fused", {}).items())
        if r.get("faithful_bn"):
            fused += f" (BN {r['faithful_bn']} captured)"
        nodes = f"{r['nodes_faithful']} -> {r['nodes_optimized']}" if "nodes_faithful" in r else "-"
        ok = "-" if not r.get("capture") else ("yes" if r.get("ok") else "**no**")
        rows.append(
            f"| {r['name']} | {r['family']} | {r.get('stage', '-')} | {nodes} | {_cell(r)} "
            f"| {ok} | {fused} | {_note(r)} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="models of the family (default: all)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="hf")
    parser.add_argument("--out", default="/tmp/sweep_optimize.jsonl")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--table", nargs="+", help="print the markdown tables of result files")
    args = parser.parse_args(argv)
    if args.table:
        print(table([json.loads(line) for path in args.table for line in open(path)]))
        return 0
    names = args.names or names_of(args.family)
    run = FAMILIES[args.family]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    _preload(args.family, names)
    start = time.time()
    for name in names:
        t0 = time.time()
        try:
            result = hf._forked(name, args.timeout, run=run, family=family_of(args.family, name))
        except Exception:
            result = {"name": name, "family": family_of(args.family, name), "capture": False,
                      "capture_error": traceback.format_exc()[-300:]}  # fmt: skip
        result["total_s"] = round(time.time() - t0, 1)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(
            f"{name:<28} stage={result.get('stage')} ok={result.get('ok')} "
            f"max_abs={result.get('max_abs')} {result['total_s']}s {_note(result)[:160]}",
            flush=True,
        )
    print(f"total {time.time() - start:.0f} s for {len(names)} models", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
