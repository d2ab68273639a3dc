"""Attribution patching (AtP), and AtP* 's query-key fix.

AtP linearises activation patching (Nanda 2023; Kramár et al. 2024). In the denoising convention
of ``transformer_lens.tools.analysis.attribution_patch``, a unit's score estimates how much the
target moves when that unit's clean activation is patched into the corrupted run:
``(a_clean − a_corrupted) · ∂f/∂a`` with the gradient taken on the corrupted run.
Units: token embeddings, head outputs ``hook_z`` per query position, MLP neurons per position.
``target_value`` is ``f(clean) − f(corrupted)``, the total effect the scores estimate.

AtP's linearisation fails where a softmax saturates: a head whose patched query or key would move
its attention a lot can have a near-zero gradient at the corrupted pattern. AtP* (Kramár et al.
2024, section 3.1.1) fixes this for queries and keys by recomputing the softmax. With
``qk_fix=True`` a head's score is the sum of three estimates, each per position of the patched
input: its values (linear, as AtP), its query at position i (row i of the pattern recomputed with
the clean query, exact softmax) and its key at position j (column j recomputed with the clean key,
exact softmax for every row), all weighted by ``∂f/∂α_ij = ∂f/∂z_i · v_j``. ``heads[..., p, h]``
is then the effect of patching head h's query, key and value at position p.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import CacheError
from dpa_lens.forward import read_pair
from dpa_lens.inputs import read_inputs
from dpa_lens.methods._autograd import forward_with_grads
from dpa_lens.methods.registry import MethodSpec, register, register_variant
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import softcap
from dpa_lens.results import KINDS, Attribution, Diagnostics
from dpa_lens.targets import Metric, MetricTarget, Target, target_values
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel


def atp_names(view: ModelView, qk_fix: bool) -> list[str]:
    names = []
    for layer in range(view.n_layers):
        names += [hooks.attn(layer, "z")] + ([hooks.mlp(layer, "post")] if view.has_neurons else [])
        if qk_fix:
            names += [hooks.attn(layer, n) for n in ("v", "pattern", "attn_scores")] + view.qk_hook_names(layer)
    return names


def clean_activations(
    model: TLModel, view: ModelView, tokens: Tensor, mask: Tensor | None, names: list[str], clean_cache: Cache | None
) -> dict[str, Tensor]:
    needed = [hooks.EMBED, hooks.FINAL_NORMALIZED] + [n for n in names if not n.endswith(("pattern", "attn_scores"))]
    if clean_cache is not None:
        missing = [n for n in needed if not hooks.cached(clean_cache, n)]
        if missing:
            raise CacheError(f"clean_cache lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}; cache the clean run without a names_filter")
        read_inputs(view, clean_cache, tokens=tokens)  # the cache must be of these clean tokens
        return {n: clean_cache[n] for n in needed}
    wanted = set(needed)
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted, **kwargs)
    return {n: cache[n] for n in needed}


def corrupted_run(model: TLModel, view: ModelView, tokens: Tensor, target: Target | MetricTarget, positions: Tensor, names: list[str],
                  mask: Tensor | None = None):
    """Forward and backward on the corrupted tokens, recording ``names`` (rotary angles without gradient)."""
    constants = [n for n in names if n.endswith(("hook_cos", "hook_sin"))]
    return forward_with_grads(model, view, tokens, target, positions, [n for n in names if n not in constants],
                              attention_mask=mask, act_only=constants)


def qk_fixed_parts(view: ModelView, layer: int, run, clean: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """AtP*'s value, query and key estimates of one layer's heads, each ``[batch, pos, head]``."""
    H, K = view.n_heads, view.n_kv_heads
    G = H // K
    scale = view.attn_scale(layer)
    f = lambda t: t.float()  # noqa: E731
    g = f(run.grads[hooks.attn(layer, "z")])  # [b, q, H, dh]
    # where the layer is: a split HookedTransformer with an attention mask caches its scores and pattern where the mask is
    alpha = f(run.acts[hooks.attn(layer, "pattern")]).to(g.device)  # [b, H, q, k]
    scores = f(run.acts[hooks.attn(layer, "attn_scores")]).to(g.device)
    masked = ~torch.isfinite(scores) | (scores < -1e30)
    expand = lambda t: t.repeat_interleave(G, dim=2)  # noqa: E731  [b, k, K, dh] -> [b, k, H, dh]
    v, v_clean = expand(f(run.acts[hooks.attn(layer, "v")])), expand(f(clean[hooks.attn(layer, "v")]).to(g.device))
    q, k = view.rotated_qk(run.acts, layer)
    q_clean, k_clean = (t.to(g.device) for t in view.rotated_qk(clean, layer))
    k, k_clean = expand(k), expand(k_clean)
    cap = view.rules.attn_softcap  # the scores are capped after the scaling (Gemma 2)
    G_ = torch.einsum("bqhe,bkhe->bhqk", g, v)  # ∂f/∂α_ij = g_i · v_j
    hs = (G_ * alpha).sum(-1, keepdim=True)  # [b, H, q, 1] = g_i · z_i

    # values: linear, Σ_i α_ij g_i · Δv_j
    value = torch.einsum("bhqk,bqhe,bkhe->bkh", alpha, g, v_clean - v)

    # queries: row i recomputed with the clean query
    s_new = softcap(torch.einsum("bqhe,bkhe->bhqk", q_clean, k) / scale, cap)
    s_new = s_new.masked_fill(masked, float("-inf"))
    alpha_new = torch.softmax(s_new, dim=-1).nan_to_num(0.0)
    query = ((alpha_new - alpha) * G_).sum(-1).permute(0, 2, 1)  # [b, q, H]

    # keys: column j recomputed with the clean key, in every row; with only entry j changed,
    # α'_ij = σ(logit α_ij + Δs_ij) and the rest of row i scales by (1 − α'_ij)/(1 − α_ij)
    ds = softcap(torch.einsum("bqhe,bkhe->bhqk", q, k_clean) / scale, cap) - softcap(torch.einsum("bqhe,bkhe->bhqk", q, k) / scale, cap)
    ds = ds.clamp(-80.0, 80.0)
    rest = (1.0 - alpha).clamp_min(0.0)
    denom = rest + alpha * torch.exp(ds)  # (1 − α + α e^{Δs})
    a_new = alpha * torch.exp(ds) / denom
    shrink = 1.0 / denom  # (1 − α'_ij)/(1 − α_ij)
    effect = G_ * a_new + shrink * (hs - G_ * alpha) - hs
    effect = effect.masked_fill(masked, 0.0)
    key = effect.sum(2).permute(0, 2, 1)  # [b, k, H]
    return value, query, key


@register(MethodSpec(name="atp", input="pair", scores=KINDS, metric=True,
                     summary="attribution patching: (clean − corrupted activation) · gradient on the corrupted run"))
@renamed(clean_tokens="prompt", corrupted_tokens="corrupted")
def atp(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike | Metric,
    position: PositionLike = -1,
    *,
    clean_cache: Cache | None = None,
    qk_fix: bool = False,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> Attribution:
    """Attribution patching of token embeddings, heads by position and neurons by position.

    Args:
        prompt, corrupted: the clean and the corrupted prompts (strings, lists of strings or token ids) of
            equal shape, aligned position by position.
        target: any target form, or a metric ``metric(logits) -> scalar`` as for TransformerLens's
            ``attribution_patch``, applied to each row's logits ``[1, pos, vocab]`` (it must be
            differentiable; with ``clean_cache`` it costs one more forward, for the clean logits).
        clean_cache: an ``ActivationCache`` of the clean run you already have (saves a forward).
        qk_fix: AtP*'s query-key fix for heads (exact softmax for patched queries and keys).

    Returns:
        `Attribution` with ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``,
        ``neurons [batch, layer, pos, d_mlp]`` (None for an attention-only model or a mixture of experts);
        ``target_value = f(clean) − f(corrupted)``. Without ``qk_fix`` the head scores equal
        TransformerLens's ``attribution_patch``.
    """
    pair = read_pair(model, prompt, corrupted, target, position, method="AtP", attention_mask=attention_mask, logit=logit, metric=True)
    view, clean_tok, corr_tok, mask, resolved, positions = pair.view, pair.tokens, pair.corrupted_tokens, pair.mask, pair.target, pair.positions
    clean_in, corr_in = pair.clean, pair.corrupted
    names = atp_names(view, qk_fix)
    clean = clean_activations(model, view, clean_tok, mask, names, clean_cache)
    run = corrupted_run(model, view, corr_tok, resolved, positions, names, mask)
    if isinstance(resolved, MetricTarget):
        with torch.no_grad():
            clean_value = resolved.of_logits(model(clean_tok, **({} if mask is None else {"attention_mask": mask})))
    else:
        clean_value = target_values(resolved, clean[hooks.FINAL_NORMALIZED], positions, view.norm_weight("ln_final"))

    L = view.n_layers
    home = run.embed.device  # each layer is scored on its device (a split model), gathered on the embedding's
    d = lambda name: clean[name].to(run.acts[name].device).float() - run.acts[name].float()  # noqa: E731
    tokens_out = ((clean[hooks.EMBED].to(run.embed.device).float() - run.embed.float()) * run.embed_grad.float()).sum(-1)
    if qk_fix:
        heads = torch.stack([sum(qk_fixed_parts(view, l, run, clean)).to(home) for l in range(L)], 1)
    else:
        heads = torch.stack([(d(hooks.attn(l, "z")) * run.grads[hooks.attn(l, "z")].float()).sum(-1).to(home) for l in range(L)], 1)
    neurons = None
    if view.has_neurons:
        neurons = torch.stack([(d(hooks.mlp(l, "post")) * run.grads[hooks.mlp(l, "post")].float()).to(home) for l in range(L)], 1)
    corrupted_value = run.value.to(home) if view.split else run.value
    return Attribution(
        method="atp*" if qk_fix else "atp",
        tokens=tokens_out,
        heads=heads,
        neurons=neurons,
        target_value=clean_value.to(corrupted_value.device) - corrupted_value,
        positions=positions,
        token_ids=clean_in.tokens,
        str_tokens=clean_in.str_tokens,
        mask=clean_in.real,
        target=resolved.describe(),
        diagnostics=Diagnostics(clean_value=clean_value.to(corrupted_value.device), corrupted_value=corrupted_value,
                                corrupted_str_tokens=corr_in.str_tokens),
        settings={"qk_fix": qk_fix},
        model_name=view.name,
    )


register_variant("atp*", "atp", "AtP* (Kramár et al. 2024): AtP with the softmax recomputed for patched queries and keys", qk_fix=True)

