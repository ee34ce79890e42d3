"""Module rewrites applied for the duration of a trace, when torch.export alone fails.

Some layers compute in a way torch.export or torch.onnx cannot capture, while an
equivalent formulation (the same numbers, other ops) captures cleanly. The mixture-of-
experts layers of Hugging Face transformers 5 are the case that matters: by default they
dispatch tokens through ``torch.ops.transformers.grouped_mm_fallback`` (a custom op with
no ONNX translation) or, with ``experts_implementation="eager"``, through a Python loop
over the experts that ``nonzero()`` found hit (data-dependent: torch.export stops).
Their ``batched_mm`` formulation gathers each token's expert weights
(``gate_up_proj[expert_ids]``) and runs one batched matmul: no data-dependent shape, the
same parameters, results equal to float rounding.

A rewrite is a predicate on a submodule and a replacement ``forward(module, *args,
**kwargs)``; during the retry the replacement is bound to every matching submodule
instance (the class is not touched) and removed afterwards, so module paths, parameter
names and hooks are those of the original model. Register your own the way op
translations are registered:

>>> from interop.adapters.torch import register_rewrite  # doctest: +SKIP
>>> @register_rewrite("my-moe", matches=lambda m: type(m).__name__ == "MyMoE")  # doctest: +SKIP
... def dense_moe(module, hidden):       # every expert on every token, weighted by the router
...     weights = module.router(hidden).softmax(-1)
...     outs = torch.stack([e(hidden) for e in module.experts], -1)
...     return (outs * weights.unsqueeze(-2)).sum(-1)

A rewrite must compute what the module computes; interop does not check it beyond the
verification the caller runs (``interop.verify``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from interop.registry import Registry


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """A replacement forward for the submodules that `matches` accepts."""

    name: str
    matches: Callable[[Any], bool]
    forward: Callable[..., Any]
    upfront: bool = False  # applied on the first attempt: the plain capture is known to fail
    # (module name, attribute, replacement): module-level functions replaced as well while
    # the rewrite is applied (the callers of a rewritten layer's new output format)
    patches: tuple[tuple[str, str, Any], ...] = ()


REWRITES: Registry[Rewrite] = Registry("import", adapter="torch rewrites")


def register_rewrite(
    name: str,
    forward: Callable[..., Any] | None = None,
    *,
    matches: Callable[[Any], bool],
    upfront: bool = False,
    patches: tuple[tuple[str, str, Any], ...] = (),
    replace: bool = False,
) -> Any:
    """Register ``forward(module, *args, **kwargs)`` for submodules where ``matches(module)``.

    Used as a decorator (``@register_rewrite("name", matches=...)``) or called with the
    function. `interop.trace` applies registered rewrites only when the plain
    torch.export capture failed (``upfront=True``: on the first attempt already, for a
    pattern the plain capture can never take), names the rewrites it used in the graph's
    source (``capture``) and what it tried in the error otherwise.
    """

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        REWRITES.register(name, Rewrite(name, matches, fn, upfront, patches), replace=replace)
        return fn

    return decorator(forward) if forward is not None else decorator


def matching(module: Any, upfront: bool = False) -> dict[str, list[str]]:
    """``{rewrite name: [module paths it applies to]}`` for `module` and its submodules
    (only the ``upfront`` rewrites if asked)."""
    found: dict[str, list[str]] = {}
    for path, sub in module.named_modules():
        for name, rewrite in REWRITES.items():
            if upfront and not rewrite.upfront:
                continue
            try:
                hit = rewrite.matches(sub)
            except Exception:  # a predicate that cannot read this module: not a match
                hit = False
            if hit:
                found.setdefault(name, []).append(path)
                break
    return found


@contextlib.contextmanager
def rewritten(module: Any, upfront: bool = False) -> Iterator[dict[str, list[str]]]:
    """Bind each matching rewrite's forward to its submodules; restore them on exit."""
    applied = matching(module, upfront)
    subs = dict(module.named_modules())
    patched: list[tuple[Any, bool, Any]] = []
    replaced: list[tuple[Any, str, Any]] = []
    try:
        for name, paths in applied.items():
            rewrite = REWRITES.get(name)
            assert rewrite is not None
            for module_name, attribute, replacement in rewrite.patches:
                owner = importlib.import_module(module_name)
                replaced.append((owner, attribute, getattr(owner, attribute)))
                setattr(owner, attribute, replacement)
            for path in paths:
                sub = subs[path]
                own = "forward" in sub.__dict__
                patched.append((sub, own, sub.__dict__.get("forward")))
                bound = functools.partial(rewrite.forward, sub)
                sub.forward = functools.wraps(rewrite.forward)(bound)
        yield applied
    finally:
        for owner, attribute, original in reversed(replaced):
            setattr(owner, attribute, original)
        for sub, own, original in reversed(patched):
            if own:
                sub.forward = original
            else:
                del sub.forward


# ----------------------------------------------------------------- built-in rewrites
def _is_transformers_experts(module: Any) -> bool:
    """An experts layer decorated with transformers' ``use_experts_implementation``."""
    config = getattr(module, "config", None)
    return (
        hasattr(module, "has_gate")
        and hasattr(module, "is_transposed")
        and hasattr(module, "_is_expert_parallel")
        and config is not None
        and hasattr(config, "_experts_implementation")
        and getattr(config, "_experts_implementation", None) != "batched_mm"
        and not module._is_expert_parallel
    )


def _transformers_batched_experts(module: Any, *args: Any, **kwargs: Any) -> Any:
    from transformers.integrations.moe import batched_mm_experts_forward

    return batched_mm_experts_forward(module, *args, **kwargs)


register_rewrite(
    "transformers-experts-batched",
    _transformers_batched_experts,
    matches=_is_transformers_experts,
    upfront=True,  # grouped_mm has no ONNX translation, the eager loop is data-dependent
)


def unregister_rewrite(name: str) -> None:
    """Remove a registered rewrite (a no-op if there is none of that name)."""
    REWRITES._entries.pop(name, None)


def _is_dbrx_experts(module: Any) -> bool:
    cls = type(module)
    return cls.__name__ == "DbrxExperts" and cls.__module__.startswith("transformers.")


def _dbrx_gathered_experts(
    module: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any
) -> Any:
    """DBRX's expert loop as a gather of each token's experts and batched matmuls."""
    batch = hidden_states.shape[0]
    x = hidden_states.reshape(-1, module.hidden_size)
    shape = (module.num_experts, module.ffn_hidden_size, module.hidden_size)
    mlp = module.mlp
    w1, v1, w2 = (w.view(shape)[top_k_index] for w in (mlp.w1, mlp.v1, mlp.w2))  # (T, K, F, H)
    rows = x[:, None, None, :]  # (T, 1, 1, H)
    gate = mlp.activation_fn(rows @ w1.transpose(-1, -2))
    up = rows @ v1.transpose(-1, -2)  # (T, K, 1, F)
    down = ((gate * up) @ w2)[:, :, 0]  # (T, K, H)
    out = (down * top_k_weights[..., None].to(down.dtype)).sum(1)
    return out.view(batch, -1, module.hidden_size)


register_rewrite(
    "transformers-dbrx-experts-gathered", _dbrx_gathered_experts, matches=_is_dbrx_experts
)


# Complex rotary embeddings (torch.polar, view_as_complex): torch.onnx has no complex
# dtype. The rotary layer returns (cos, sin) in a trailing axis of 2 instead, and the
# function that applies it multiplies the pairs out, the same arithmetic as the complex
# product; indexing such as ``freqs[:, :, None, :]`` keeps the trailing axis.
def _is_complex_rotary(module: Any) -> bool:
    cls = type(module)
    return cls.__name__ in _COMPLEX_ROTARY and cls.__module__ == _COMPLEX_ROTARY[cls.__name__]


def _real_rotary(module: Any, x: Any, position_ids: Any) -> Any:
    import torch

    inv_freq = module.inv_freq.to(device=x.device, dtype=torch.float)
    freqs = position_ids[..., None].float() * inv_freq
    return torch.stack([freqs.cos(), freqs.sin()], -1) * module.attention_scaling


def _rotate_pairs(x: Any, freqs: Any) -> Any:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, d = freqs[..., 0], freqs[..., 1]
    import torch

    return torch.stack([a * c - b * d, a * d + b * c], -1).flatten(3)


def _deepseek_v2_apply(xq: Any, xk: Any, freqs_cis: Any) -> tuple[Any, Any]:
    freqs = freqs_cis.unsqueeze(1).to(xq.device)
    return _rotate_pairs(xq, freqs).type_as(xq), _rotate_pairs(xk, freqs).type_as(xk)


def _llama4_apply(xq: Any, xk: Any, freqs_cis: Any) -> tuple[Any, Any]:
    freqs = freqs_cis[:, :, None, :]
    return _rotate_pairs(xq, freqs).type_as(xq), _rotate_pairs(xk, freqs).type_as(xk)


_COMPLEX_ROTARY = {
    "DeepseekV2RotaryEmbedding": "transformers.models.deepseek_v2.modeling_deepseek_v2",
    "Llama4TextRotaryEmbedding": "transformers.models.llama4.modeling_llama4",
}
register_rewrite(
    "transformers-complex-rotary-as-pairs",
    _real_rotary,
    matches=_is_complex_rotary,
    upfront=True,  # torch.onnx cannot translate complex tensors
    patches=(
        (_COMPLEX_ROTARY["DeepseekV2RotaryEmbedding"], "apply_rotary_emb", _deepseek_v2_apply),
        (_COMPLEX_ROTARY["Llama4TextRotaryEmbedding"], "apply_rotary_emb", _llama4_apply),
    ),
)


# Switch Transformers: the router moves its classifier to the router dtype inside forward
# (``self.classifier = self.classifier.to(self.dtype)``, a module swap torch.export refuses)
# and the experts loop over the experts nonzero() found.
_SWITCH = "transformers.models.switch_transformers.modeling_switch_transformers"


def _is_switch(name: str) -> Callable[[Any], bool]:
    return lambda m: type(m).__name__ == name and type(m).__module__ == _SWITCH


def _switch_router(module: Any, hidden_states: Any) -> Any:
    """The router without the classifier swap (a no-op once the classifier has the router
    dtype, which the first eager call leaves it in); the rest as transformers computes it."""
    import torch

    module.input_dtype = hidden_states.dtype
    logits = module.classifier(hidden_states.to(module.dtype))
    probs = torch.nn.functional.softmax(logits, dim=-1, dtype=module.dtype).to(module.input_dtype)
    index = torch.nn.functional.one_hot(torch.argmax(probs, dim=-1), num_classes=module.num_experts)
    index = index * (torch.cumsum(index, dim=-2) <= module.expert_capacity)
    return index, torch.max(probs, dim=-1).values.unsqueeze(-1), logits


def _switch_experts(module: Any, hidden_states: Any, selected: Any, weights: Any) -> Any:
    """Every expert on every token, scaled by its routing weight where the token chose it and
    capacity allowed (one expert per token: the other terms add exact zeros)."""
    out = hidden_states.new_zeros(hidden_states.shape)
    for e in range(module.num_experts):
        scale = weights * selected[:, 0, e : e + 1].to(hidden_states.dtype)
        out = out + module[f"expert_{e}"](hidden_states) * scale
    return out


register_rewrite(
    "transformers-switch-router",
    _switch_router,
    matches=_is_switch("SwitchTransformersTop1Router"),
    upfront=True,
)
register_rewrite(
    "transformers-switch-experts-dense",
    _switch_experts,
    matches=_is_switch("SwitchTransformersExperts"),
    upfront=True,
)
