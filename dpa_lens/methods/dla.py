"""Direct Logit Attribution: each component's direct write to the target at the answer position.

A component's DLA is its output at the answer position, passed through the final norm with the
scale frozen at its cached value (and through its own output norm, frozen likewise, in Gemma 2/3),
dotted with the target direction: what it adds to the target through the residual stream alone,
ignoring every later layer that reads it. A final logit soft cap is taken by its secant, as in DPA.

The scores of tokens (the input stream of the first block: embedding, plus learned positions),
heads, neurons and ``bias`` (output biases of attention and MLPs, the unembedding bias) add up to
the target value exactly. Where TransformerLens's own decomposition applies (models without output
norms), the head scores equal ``cache.logit_attrs(cache.stack_head_results(...))``; the tests check it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpa_lens.attribution import Attribution
from dpa_lens.inputs import check_cache_model, check_hooks, read_inputs, resolve_positions
from dpa_lens.methods.registry import register
from dpa_lens.models.view import ModelView, pull_norm
from dpa_lens.targets import final_input, resolve_target


def dla_hook_names(model: Any) -> list[str]:
    view = ModelView(model)
    names = ["hook_embed", "blocks.0.hook_resid_pre", "ln_final.hook_scale", "ln_final.hook_normalized"]
    for layer in range(view.n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post"]
        if view.rules.post_norms:
            names += [f"blocks.{layer}.ln1_post.hook_scale", f"blocks.{layer}.ln2_post.hook_scale"]
    return names


@register("dla", hook_names=dla_hook_names)
def dla(
    model: Any,
    cache: Any,
    target: Any,
    position: Any = -1,
    *,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> Attribution:
    """Direct logit attribution of tokens, heads and neurons at the answer position.

    Returns ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``, ``neurons [batch, layer,
    pos, d_mlp]`` that are zero except at each row's answer position, and ``bias [batch]``.
    """
    view = ModelView(model)
    check_hooks(cache, dla_hook_names(model), method="DLA", filter_hint="dpa_lens.names_filter(model, 'dla')")
    inputs = read_inputs(view, cache, tokens=tokens, attention_mask=attention_mask)
    check_cache_model(view, cache)
    positions = resolve_positions(position, inputs)
    resolved = resolve_target(model, view, target, inputs.batch, logit=logit)
    b, n, L, H = inputs.batch, inputs.seq_len, view.n_layers, view.n_heads
    with torch.no_grad():
        device = cache["ln_final.hook_normalized"].device
        rows, pos = torch.arange(b, device=device), positions.to(device)
        at = lambda name: cache[name][rows, pos].to(device).float()  # noqa: E731  each row's answer position
        ln_f = view.norm_weight("ln_final")
        x_final = final_input(cache["ln_final.hook_normalized"], positions, ln_f)
        direction, target_bias = resolved.linearized(x_final)  # [batch, d_model]
        t = pull_norm(direction.to(device), at("ln_final.hook_scale"), ln_f, center=view.rules.norm == "ln")

        def written(layer: int, norm: str) -> Tensor:  # the target where a sublayer's output is written
            if not view.rules.post_norms:
                return t
            return pull_norm(t, at(f"blocks.{layer}.{norm}.hook_scale"), view.norm_weight(norm, layer), center=False)

        tokens_out = torch.zeros(b, n, device=device)
        heads_out = torch.zeros(b, L, n, H, device=device)
        neurons_out = torch.zeros(b, L, n, view.d_mlp, device=device)
        bias = target_bias.to(device).float().clone()
        tokens_out[rows, pos] = (at("blocks.0.hook_resid_pre") * t).sum(-1)
        for layer in range(L):
            a, m = view.attn(layer), view.mlp(layer)
            t_attn, t_mlp = written(layer, "ln1_post"), written(layer, "ln2_post")
            lam = torch.einsum("hed,bd->bhe", a.W_O.to(device), t_attn)  # W_O t per head
            heads_out[rows, layer, pos] = (at(f"blocks.{layer}.attn.hook_z") * lam).sum(-1)
            neurons_out[rows, layer, pos] = at(f"blocks.{layer}.mlp.hook_post") * (t_mlp @ m.W_out.to(device).T)
            if a.b_O is not None:
                bias += t_attn @ a.b_O.to(device)
            if m.b_out is not None:
                bias += t_mlp @ m.b_out.to(device)
        value = resolved.value(x_final)
    return Attribution(
        method="dla",
        tokens=tokens_out,
        heads=heads_out,
        neurons=neurons_out,
        bias=bias,
        target_value=value,
        positions=positions,
        token_ids=inputs.tokens,
        str_tokens=inputs.str_tokens,
        target=resolved.describe(),
        settings={},
        model_name=view.name,
    )
