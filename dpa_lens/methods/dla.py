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

import torch
from torch import Tensor

from dpa_lens.errors import UnsupportedModelError
from dpa_lens.forward import read_forward
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import pull_norm
from dpa_lens.results import KINDS, Attribution
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel


def dla_hook_names(model: TLModel) -> list[str]:
    """What DLA reads from the cache."""
    view = ModelView(model)
    names = [hooks.EMBED, hooks.FINAL_SCALE, hooks.FINAL_NORMALIZED, hooks.resid_post(view.n_layers - 1), hooks.attn(0, "pattern")]
    for layer in range(view.n_layers):  # the streams check the cache against the weights; the pattern, the padding
        names += [hooks.resid_pre(layer), hooks.attn(layer, "z")] + ([hooks.mlp(layer, "post")] if view.rules.has_mlp else [])
        if view.rules.post_norms:
            names += [hooks.norm_scale(layer, "ln1_post")] + ([hooks.norm_scale(layer, "ln2_post")] if view.rules.has_mlp else [])
    return names


@register(MethodSpec(name="dla", input="cache", scores=KINDS, hook_names=dla_hook_names,
                     summary="Direct logit attribution: each unit's direct write to the target at the answer position"))
def dla(
    model: TLModel,
    cache: Cache,
    target: TargetLike,
    position: PositionLike = -1,
    *,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> Attribution:
    """Direct logit attribution of tokens, heads and neurons at the answer position.

    A head's score is its output without the value bias (which, as every bias, is in ``bias``), so
    the scores are the same whether TransformerLens folded the value biases and norms or not.

    Returns ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``, ``neurons [batch, layer,
    pos, d_mlp]`` (None for an attention-only model) that are zero except at each row's answer
    position, and ``bias [batch]``; they add up to ``target_value``. A mixture of experts is refused:
    its MLPs' writes are no sum over one set of neurons.
    """
    if ModelView(model).experts:
        raise UnsupportedModelError("DLA in dpa_lens does not support a mixture of experts: its scores add up to the target through "
                                    "each MLP's neurons, and a token's neurons here are its experts'. Score the tokens and heads "
                                    "with run('gradient' or 'input_x_gradient', ...), or with run('atp', ..., corrupted=...).")
    fwd = read_forward(model, cache, target, position, method="DLA", hook_names=dla_hook_names(model),
                       filter_hint="dpa_lens.names_filter(model, 'dla')", tokens=tokens, attention_mask=attention_mask, logit=logit)
    view, b, n = fwd.view, fwd.batch, fwd.seq_len
    L, H = view.n_layers, view.n_heads
    with torch.no_grad():
        device = fwd.device  # where the scores are gathered; each layer's are computed on its device (a split model)
        rows, pos = torch.arange(b, device=device), fwd.positions.to(device)

        def at(name: str) -> Tensor:  # each row's answer position, where the activation's layer is
            x = fwd.act(name)
            return x[rows.to(x.device), pos.to(x.device)]

        x_final = fwd.final_input()
        direction, target_bias = fwd.target.linearized(x_final)  # [batch, d_model]
        t = pull_norm(direction.to(device), fwd.answer_scale(), view.norm_weight("ln_final"), center=view.rules.norm == "ln")

        def written(layer: int, norm: str, t: Tensor) -> Tensor:  # the target where a sublayer's output is written
            if not view.rules.post_norms:
                return t
            return pull_norm(t, at(hooks.norm_scale(layer, norm)), view.norm_weight(norm, layer), center=False)

        tokens_out = torch.zeros(b, n, device=device)
        heads_out = torch.zeros(b, L, n, H, device=device)
        neurons_out = torch.zeros(b, L, n, view.d_mlp, device=device) if view.rules.has_mlp else None
        bias = target_bias.to(device).float().clone()
        x0 = at(hooks.resid_pre(0))
        tokens_out[rows, pos] = (x0 * t.to(x0.device)).sum(-1).to(device)
        for layer in range(L):
            dev = fwd.layer_device(layer)
            t_layer = t.to(dev)
            a, t_attn = view.attn(layer), written(layer, "ln1_post", t_layer)
            lam = torch.einsum("hed,bd->bhe", a.W_O.to(dev), t_attn)  # W_O t per head
            z = at(hooks.attn(layer, "z"))
            if a.b_V is not None:  # an answer position's weights sum to one: the value bias is an output bias, as in DPA
                b_V = a.b_V.to(dev).repeat_interleave(view.n_heads // view.n_kv_heads, dim=0)
                z = z - b_V
                bias += (lam * b_V).sum(dim=(1, 2)).to(device)
            heads_out[rows, layer, pos] = (z * lam).sum(-1).to(device)
            if a.b_O is not None:
                bias += (t_attn @ a.b_O.to(dev)).to(device)
            if neurons_out is not None:
                m, t_mlp = view.mlp(layer), written(layer, "ln2_post", t_layer)
                neurons_out[rows, layer, pos] = (at(hooks.mlp(layer, "post")) * (t_mlp @ m.W_out.to(dev).T)).to(device)
                if m.b_out is not None:
                    bias += (t_mlp @ m.b_out.to(dev)).to(device)
        value = fwd.target.value(x_final)
    return Attribution(
        method="dla",
        tokens=tokens_out,
        heads=heads_out,
        neurons=neurons_out,
        bias=bias,
        target_value=value,
        **fwd.result_fields(),
        target=fwd.target.describe(),
    )
