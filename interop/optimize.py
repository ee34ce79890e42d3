"""The inference-optimized copy of a graph that ONNX Runtime runs.

The captured graph stays as captured (inspection, emission and `save` show it); what
ONNX Runtime runs is a copy built once per graph by `optimized_copy`, in stages:

1. ``fold``: onnxscript's optimizer, the pass torch.onnx applies with ``optimize=True``:
   constant folding that knows shapes (Shape / Expand / CastLike of known shapes fold
   away, which ONNX Runtime cannot do: it has no CPU kernel to fold CastLike, and a
   BatchNormalization behind such a chain is never fused into its Conv), the default
   rewrite rules (BatchNormalization folded into Conv / ConvTranspose / Gemm, no-op
   removal, slice and reshape clean-up, Pad into Conv), function inlining, common
   subexpression elimination; then ONNX's own fusions for opset 23 (RMSNormalization,
   RotaryEmbedding).
2. ``fuse``: ONNX Runtime's contrib fusions from onnxscript's ``ort_fusions`` that are
   local to a few nodes: Gelu / FastGelu / BiasGelu, SkipLayerNormalization,
   SkipSimplifiedLayerNormalization, SimplifiedLayerNormalization (RMSNorm), rotary
   embeddings.
3. ``attention``: the attention fusions (SDPA, MultiHeadAttention, Attention, GQA).

Each stage's model is kept (they share weight tensors, so a copy costs little) and the
runtime takes the most optimized one ONNX Runtime accepts: a fusion whose pattern
matched a graph it does not fit (GPT-2's ``Gemm`` on flattened rows under the MHA
fusion) falls back to the stage before, never to an error. docs/design.md ("Running
on ONNX Runtime") gives the measurements behind these choices.

What the build costs, and what was cut (docs/performance.md has the numbers): the
optimizer (`_optimize`) removes the nodes constant folding left dead before its rewrite
rules visit every node; the ``fuse`` stage does not run that optimizer twice more
(`_pre_fuse`: the ``fold`` stage ran it); the last exact rewrites (`_tidy`) apply only
the three rules that can match after them, and only to the stage the runtime takes
(`Stage.model` runs them when first read).

>>> import interop, torch                                   # doctest: +SKIP
>>> g = interop.trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
>>> [stage.name for stage in optimized_copy(g.model)]
['attention', 'fuse', 'fold']
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from . import optimize_batch, optimize_rules, rewrites

# onnxscript logs every pattern it tries to fold and cannot (e.g. a Reshape of a symbolic
# dim) at WARNING/ERROR; those are expected misses, not problems of the user's graph.
_QUIET_LOGGERS = ("onnxscript", "onnxscript.optimizer", "onnxscript.rewriter")

STAGES = ("fold", "fuse", "attention")


@dataclass
class Stage:
    """One optimization stage's result: its model, what fused, and how long it took.

    The last, exact rewrites (`_tidy`) run when `model` is first read: a stage the
    runtime never falls back to never pays for them.
    """

    name: str
    raw: ir.Model
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    tidied: bool = False

    @property
    def model(self) -> ir.Model:
        if not self.tidied:  # last, so that no fusion pattern meets the tidied spelling
            start = time.perf_counter()
            with _quiet():
                self.counts.update(_tidy(self.raw))
                _adopt_constants(self.raw)
                self.raw.graph.sort()
            self.seconds += time.perf_counter() - start
            self.tidied = True
        return self.raw

    @property
    def summary(self) -> str:
        fused = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()) if v)
        return f"{self.name} ({fused or 'nothing fused'}; {self.seconds:.2f} s)"


def optimized_copy(model: ir.Model, *, last: str = "attention") -> list[Stage]:
    """Optimize a copy of `model` up to stage `last`; the stages, most optimized first.

    `model` itself is never changed: the copy shares its weight tensors (no data is
    copied) and every pass replaces tensors instead of writing into them.
    """
    if last not in STAGES:
        raise ValueError(f"Unknown stage '{last}', expected one of {STAGES}")
    with _quiet():
        work = model.clone()
        stages = [_timed("fold", work, _fold)]
        for name, step in (("fuse", _fuse_local), ("attention", _fuse_attention)):
            if STAGES.index(name) > STAGES.index(last):
                break
            work = work.clone()  # the stage before stays intact for the fallback
            stage = _timed(name, work, step)
            if any(stage.counts.values()):
                stages.append(stage)
            else:
                work = stages[-1].raw  # nothing fused: the extra passes are not kept
    return stages[::-1]


def _timed(name: str, model: ir.Model, step: Callable[[ir.Model], dict[str, int]]) -> Stage:
    start = time.perf_counter()
    counts = step(model)
    _adopt_constants(model)
    model.graph.sort()
    return Stage(name, model, counts, time.perf_counter() - start)


def _adopt_constants(model: ir.Model) -> None:
    """Register constants that nodes read but the graph lost as initializers.

    onnxscript's ReshapeReshape rule can leave a Reshape reading a shape constant that
    is no longer among the initializers (keras_hub's Swin and SAM, XLNet); the graph
    then fails to clone or serialize, and the runtime fell back to the graph as
    captured. The value is the same: it only needs registering.
    """
    graph = model.graph
    known = set(graph.initializers.values()) | set(graph.inputs)
    for node in graph:
        for value in node.inputs:
            if value is None or value in known or value.producer() is not None:
                continue
            if value.const_value is None:
                continue  # not ours to guess: cloning reports it
            if value.name is None or value.name in graph.initializers:
                value.name = f"{value.name or 'constant'}_{len(graph.initializers)}"
            graph.register_initializer(value)
            known.add(value)


def _optimize(model: ir.Model) -> None:
    """onnxscript's `optimize_ir` (torch.onnx's optimize=True), with the nodes folding left
    dead removed before its 46 rewrite rules try every node: on BERT-base the fold
    leaves 620 of 1,140 nodes dead, and the rules were most of the stage's time."""
    import onnx_ir.passes.common as common_passes
    from onnxscript import rewriter
    from onnxscript.optimizer import _constant_folding

    loop = ir.passes.PassManager(
        [
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            ),
            common_passes.RemoveUnusedNodesPass(),
            rewriter.RewritePass(rewriter._DEFAULT_REWRITE_RULES),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ],
        steps=2,
        early_stop=True,
    )
    ir.passes.Sequential(
        common_passes.InlinePass(),
        loop,
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.OutputFixPass(),
        common_passes.NameFixPass(),
    )(model)
    # a rewrite can leave a node before what it reads (keras_hub's XLNet and SAM), which
    # cloning refuses and the rules here read in order
    model.graph.sort()


def _fold(model: ir.Model) -> dict[str, int]:
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter import onnx_fusions

    before = len(model.graph)
    _optimize(model)
    if rewrites.pad_after_transpose().apply_to_model(model):
        _optimize(model)  # the transposes cancel, the Pad folds into its Conv
    if any(node.op_type == "BatchNormalization" for node in model.graph):
        # a Conv kernel the optimizer computed (Flax's HWIO kernel transposed to OIHW) is an
        # initializer only once the optimizer lifts constants at its end: fold again now
        from onnxscript.rewriter import rewrite
        from onnxscript.rewriter.rules.common import _fuse_batchnorm

        rewrite(model, _fuse_batchnorm.rules)
    counts = {
        "relu": rewrites.relu().apply_to_model(model),
        "no-op max": rewrites.no_op_max().apply_to_model(model),
        "transpose as reshape": rewrites.unit_transpose().apply_to_model(model),
        "einsum as matmul": rewrites.einsum_as_matmul().apply_to_model(model),
    }
    counts["softmax"] = rewrites.softmax().apply_to_model(model)
    common_passes.ShapeInferencePass()(model)  # the two graph rules read every shape
    counts["batch-1 values"] = optimize_batch.batch_free(model)
    counts["transposed matmul"] = optimize_rules.transposed_matmul(model)
    if any(counts.values()):
        _optimize(model)  # drop what the rewrites left dead, merge Reshapes
    counts["removed nodes"] = before - len(model.graph)
    counts.update(onnx_fusions.fuse(model))
    return counts


def _fuse_local(model: ir.Model) -> dict[str, int]:
    """The fusions of `fuse_xformers` that do not touch attention, in its order."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter.ort_fusions import _core as ort

    _pre_fuse(model)
    counts = {"gemm_on_rows": rewrites.gemm_on_rows().apply_to_model(model)}
    counts.update(
        {
            "erf_gelu": ort.fuse_erfgelu(model),
            "rms_normalization": ort.fuse_rms_normalization(model),
            "rotary_embedding": ort.fuse_rotary_embedding(model),
            "cos_sin_cache": ort.fuse_cos_sin_cache(model),
        }
    )
    common_passes.CommonSubexpressionEliminationPass()(model)
    counts["partial_rotary_embedding"] = ort.fuse_partial_rotary_embedding(model)
    counts["gelu"] = ort.fuse_gelu(model) + rewrites.gelu_tanh(model)
    counts["gelu"] += rewrites.fast_gelu_bias().apply_to_model(model)
    counts["bias_gelu"] = ort.fuse_bias_gelu(model)
    _finish(model)
    return counts


def _pre_fuse(model: ir.Model) -> None:
    """What `fuse_xformers` runs first, less its two full optimizer passes: the fold stage
    ran that optimizer already, and again it found nothing (1.5-3 s on BERT-base); it
    runs only if the shape rules changed the graph."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter.ort_fusions import shape_optimization

    common_passes.ShapeInferencePass()(model)
    trial = model.clone()
    if shape_optimization.rules.apply_to_model(trial):
        _optimize(trial)  # a bad target shows once folded
        if _reshapes_valid(trial):
            shape_optimization.rules.apply_to_model(model)  # the same rewrite, now kept
            _optimize(model)


def _reshapes_valid(model: ir.Model) -> bool:
    """No Reshape to a constant target with two -1s: onnxscript's shape rules wrote one
    into Whisper's decoder, and ONNX Runtime refused the whole stage."""
    for node in model.graph:
        if node.op_type == "Reshape" and len(node.inputs) > 1 and node.inputs[1] is not None:
            target = node.inputs[1].const_value
            if target is not None and int((target.numpy() == -1).sum()) > 1:
                return False
    return True


def _fuse_attention(model: ir.Model) -> dict[str, int]:
    from onnxscript.rewriter.ort_fusions import _core as ort

    # SkipLayerNormalization only comes with fused attention: on its own it measured
    # slower than Add + LayerNormalization (d64 nnx transformer 1.40x vs 1.09x of
    # jax2onnx's graph), and ONNX Runtime fuses it itself where its kernel pays off
    counts = {
        "skip_layer_normalization": ort.fuse_skip_layer_normalization(model),
        "skip_rms_normalization": ort.fuse_skip_rms_normalization(model),
    }
    counts["sdpa"] = ort.fuse_sdpa(model, apply_shape_inference=True)
    counts["gqa"] = ort.fuse_gqa(model)
    counts["packed_qkv_for_gqa"] = ort.fuse_qkv_gqa(model)
    counts["mha1"] = ort.fuse_mha1(model)
    counts["mha2"] = ort.fuse_mha2(model)
    counts["mha_scale"] = ort.fuse_mha_scale(model)
    if counts["mha1"] or counts["mha2"]:
        counts["mha_bias"] = ort.fuse_mha_bias(model)
        counts["attention"] = ort.fuse_attention(model)
    counts["sdpa_via_mha"] = ort.replace_sdpa_by_mha(model)
    _finish(model)
    # kept when a packed Attention or GroupQueryAttention fused: MultiHeadAttention alone
    # (GPT-2's) measured slower than the unfused graph (1.08x vs 1.01x of torch.onnx's)
    return counts if counts.get("attention") or counts["gqa"] else {}


def _tidy_rules() -> Any:
    # what the moved scales and biases leave behind: only these of the default rules can
    # match, and running all 46 again cost BERT-base 0.5-1 s per stage
    from onnxscript.rewriter.rules.common import _basic_rules as basic

    return [
        basic.reshape_reshape_rule,
        basic.no_op_cast_rule,
        basic.no_op_expand_rule,
        basic.transpose_transpose_rule,  # a regrouped transpose meets the one before it
    ]


def _tidy(model: ir.Model) -> dict[str, int]:
    """Exact rewrites that help ONNX Runtime's kernels once every fusion has run."""
    from onnxscript.rewriter import rewrite

    counts = {
        "scale before reshape": rewrites.scale_before_reshape().apply_to_model(model),
        "bias before split": rewrites.bias_before_split().apply_to_model(model),
        "regrouped transpose": optimize_rules.regrouped_transpose(model),
    }
    if any(counts.values()):
        rewrite(model, _tidy_rules())  # Reshape chains merge, dead nodes go
    return counts


def _finish(model: ir.Model) -> None:
    """Inline what a fusion left as a function, drop dead nodes, apply ORT's own rules."""
    from onnxscript.rewriter import rewrite

    _optimize(model)
    rewrite(model, _ort_rules())


@functools.cache
def _ort_rules() -> list[Any]:
    """onnxscript's ORT rules less the six that move a Transpose into FusedMatMul's
    transBatch: they do not check that both inputs have the same rank, and ONNX Runtime
    then refuses to run the graph (a batch-first input transposed to seq-first times a
    2-D weight, SigLIP's attention-pooling head; found by tools/sweep_optimize.py).
    ONNX Runtime's own MatMul-transpose fusion still runs in the session."""
    from onnxscript.rewriter.ort_fusions._core import ORT_PATTERN_REWRITE_RULES

    return [r for r in ORT_PATTERN_REWRITE_RULES if "Batch" not in (getattr(r, "name", "") or "")]


class _quiet:
    """Silence onnxscript's expected folding misses for the duration of the block."""

    def __enter__(self) -> None:
        self._levels: list[tuple[logging.Logger, int]] = []
        for name in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            self._levels.append((logger, logger.level))
            logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        for logger, level in self._levels:
            logger.setLevel(level)
