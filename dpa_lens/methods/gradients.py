"""Gradient baselines: gradient (saliency) and input × gradient.

Both run the model themselves (they need autograd), from a string, a list of strings or
token ids, and return the same `Attribution` as DPA.

* ``gradient``: the size of the target's gradient at each unit, ``‖∂f/∂a‖`` (L2 over the unit's
  activation vector; ``|∂f/∂a|`` for a neuron). Unsigned: how sensitive f is to the unit.
* ``input_x_gradient``: ``a · ∂f/∂a``, signed: the first-order share of f carried by the unit
  (for heads, ``z · ∂f/∂z``, which is the authors' "AtP without a corrupted run").
* ``integrated_gradients`` (in its own module): the gradient integrated along a path from a baseline.

Units: tokens are the embeddings fed to the first block, heads the per-head outputs
``blocks.L.attn.hook_z`` (per query position), neurons ``blocks.L.mlp.hook_post`` (none in an
attention-only model or a mixture of experts, where ``kinds`` naming them is refused). ``kinds`` picks
what to score (default: every kind the model has). ``target`` is any target form, or a metric
``metric(logits) -> scalar`` applied to each row's logits (see `dpa_lens.targets.MetricTarget`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import InputError
from dpa_lens.methods._autograd import forward_with_grads, prepare_run
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.results import KINDS, Attribution, Kind
from dpa_lens.targets import Metric
from dpa_lens.types import PositionLike, PromptLike, TargetLike, TLModel


def _component_names(view: ModelView, kinds: set[str]) -> list[str]:
    names = []
    for layer in range(view.n_layers):
        if "heads" in kinds:
            names.append(hooks.attn(layer, "z"))
        if "neurons" in kinds and view.has_neurons:
            names.append(hooks.mlp(layer, "post"))
    return names


def _gradient_method(model, text, target, position, attention_mask, logit, kinds, signed: bool, method: str) -> Attribution:
    asked, kinds = kinds is not None, set(KINDS if kinds is None else kinds)
    if not kinds <= set(KINDS):
        raise InputError(f"kinds must be among {KINDS}, got {sorted(kinds)}")
    view, tokens, mask, inputs, positions, resolved = prepare_run(model, text, target, position, attention_mask, logit, method)
    if asked and "neurons" in kinds:
        view.check_neurons(f"kinds={tuple(sorted(kinds))}", "ask for kinds=('tokens', 'heads')")
    run = forward_with_grads(model, view, tokens, resolved, positions, _component_names(view, kinds), attention_mask=mask)

    def score(name: str, vector: bool) -> Tensor:
        act, grad = run.acts[name].float(), run.grads[name].float()
        if signed:
            return (act * grad).sum(-1) if vector else act * grad
        return grad.norm(dim=-1) if vector else grad.abs()

    L = view.n_layers
    home = run.embed.device  # a split model's layers are scored on their devices, gathered on the embedding's
    tokens_out = None
    if "tokens" in kinds:
        embed, grad = run.embed.float(), run.embed_grad.float()
        tokens_out = (embed * grad).sum(-1) if signed else grad.norm(dim=-1)
    heads = torch.stack([score(hooks.attn(l, "z"), True).to(home) for l in range(L)], 1) if "heads" in kinds else None
    neurons = (torch.stack([score(hooks.mlp(l, "post"), False).to(home) for l in range(L)], 1)
               if "neurons" in kinds and view.has_neurons else None)
    return Attribution(
        method=method,
        tokens=tokens_out,
        heads=heads,
        neurons=neurons,
        target_value=run.value.to(home) if view.split else run.value,
        positions=positions,
        token_ids=inputs.tokens,
        str_tokens=inputs.str_tokens,
        mask=inputs.real,
        target=resolved.describe(),
        model_name=view.name,
    )


@register(MethodSpec(name="gradient", input="tokens", scores=KINDS, metric=True,
                     summary="‖∂f/∂a‖: how sensitive the target is to each unit (unsigned)"))
@renamed(tokens="prompt")
def gradient(
    model: TLModel,
    prompt: PromptLike,
    target: TargetLike | Metric,
    position: PositionLike = -1,
    *,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    kinds: Iterable[Kind] | None = None,
) -> Attribution:
    """Gradient magnitude of the target at each token embedding, head output and neuron.

    ``prompt`` may be a string, a list of strings (padded as ``model.to_tokens`` would) or ids.
    Returns ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``,
    ``neurons [batch, layer, pos, d_mlp]`` (None for an attention-only model or a mixture of experts), all ≥ 0.
    """
    return _gradient_method(model, prompt, target, position, attention_mask, logit, kinds, signed=False, method="gradient")


@register(MethodSpec(name="input_x_gradient", input="tokens", scores=KINDS, metric=True,
                     summary="a · ∂f/∂a: the first-order share of the target carried by each unit (signed)"))
@renamed(tokens="prompt")
def input_x_gradient(
    model: TLModel,
    prompt: PromptLike,
    target: TargetLike | Metric,
    position: PositionLike = -1,
    *,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    kinds: Iterable[Kind] | None = None,
) -> Attribution:
    """Activation · gradient of the target at each token embedding, head output and neuron (signed)."""
    return _gradient_method(model, prompt, target, position, attention_mask, logit, kinds, signed=True, method="input_x_gradient")
