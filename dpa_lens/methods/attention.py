"""Token baselines from attention patterns, and a random baseline.

The paper compares DPA against these for token attribution:

* ``attention_last``: the last layer's attention from the answer position, averaged over heads;
* ``attention_mean``: attention from the answer position averaged over all layers and heads;
* ``attention_rollout`` (Abnar & Zuidema 2020): per layer ``Â = ½·mean_h(α) + ½·I`` (rows
  renormalised), multiplied from the first layer up; the answer position's row;
* ``random_baseline``: seeded standard-normal scores for tokens, heads and neurons.

Attention scores are non-negative and do not depend on the target (it is accepted for a uniform
call shape and recorded); they sum to one over the prompt's tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.results import KINDS, Attribution
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel


def attention_hook_names(model: TLModel) -> list[str]:
    """What the attention baselines read: the embeddings (for the tokens) and every layer's pattern."""
    return [hooks.EMBED] + [hooks.attn(l, "pattern") for l in range(ModelView(model).n_layers)]


def _attention_method(model, cache, target, position, tokens, attention_mask, method: str,
                      scores_fn: Callable[[list[Tensor], Tensor], Tensor]) -> Attribution:
    fwd = read_forward(model, cache, target, position, method=method, hook_names=attention_hook_names(model),
                       filter_hint=f"dpa_lens.names_filter(model, {method!r})", tokens=tokens, attention_mask=attention_mask,
                       check_model=False)
    with torch.no_grad():
        patterns = [cache[hooks.attn(l, "pattern")] for l in range(fwd.view.n_layers)]  # each where its layer cached it
        scores = scores_fn(patterns, fwd.positions).to(fwd.device)
    return _result(fwd, method, tokens=scores)


def _result(fwd: CachedForward, method: str, **scores: Tensor | None) -> Attribution:
    return Attribution(
        method=method,
        **scores,
        **fwd.result_fields(),
        target={} if fwd.target is None else fwd.target.describe(),
    )


def _rows(pattern: Tensor, positions: Tensor) -> Tensor:
    """Head-averaged attention row of each batch row's answer position, ``[batch, key]``."""
    b = torch.arange(pattern.shape[0], device=pattern.device)
    return pattern.float().mean(1)[b, positions.to(pattern.device)]


def _spec(name: str, summary: str) -> MethodSpec:
    return MethodSpec(name=name, input="cache", scores=("tokens",), hook_names=attention_hook_names, target=False, summary=summary)


@register(_spec("attention_last", "last layer's attention from the answer position, mean over heads (no target)"))
def attention_last(model: TLModel, cache: Cache, target: TargetLike | None = None, position: PositionLike = -1, *,
                   tokens: Tensor | None = None, attention_mask: Tensor | None = None) -> Attribution:
    """Last layer's attention from the answer position, mean over heads: ``tokens [batch, pos]``."""
    return _attention_method(model, cache, target, position, tokens, attention_mask, "attention_last", lambda p, pos: _rows(p[-1], pos))


@register(_spec("attention_mean", "attention from the answer position, mean over layers and heads (no target)"))
def attention_mean(model: TLModel, cache: Cache, target: TargetLike | None = None, position: PositionLike = -1, *,
                   tokens: Tensor | None = None, attention_mask: Tensor | None = None) -> Attribution:
    """Attention from the answer position, mean over all layers and heads: ``tokens [batch, pos]``."""
    return _attention_method(
        model, cache, target, position, tokens, attention_mask, "attention_mean",
        lambda p, pos: torch.stack([_rows(x, pos).to(p[0].device) for x in p]).mean(0),
    )


def rollout(patterns: list[Tensor], positions: Tensor) -> Tensor:
    """Attention rollout from the answer position, ``[batch, key]``."""
    flow = None
    for pattern in patterns:
        a = pattern.float().mean(1)  # [batch, q, k]
        eye = torch.eye(a.shape[-1], device=a.device).expand_as(a)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        flow = a if flow is None else a @ flow.to(a.device)  # the flow follows a split model's layers
    b = torch.arange(flow.shape[0], device=flow.device)
    return flow[b, positions.to(flow.device)]


@register(_spec("attention_rollout", "attention rollout (Abnar & Zuidema 2020) from the answer position (no target)"))
def attention_rollout(model: TLModel, cache: Cache, target: TargetLike | None = None, position: PositionLike = -1, *,
                      tokens: Tensor | None = None, attention_mask: Tensor | None = None) -> Attribution:
    """Attention rollout (Abnar & Zuidema 2020) from the answer position: ``tokens [batch, pos]``."""
    return _attention_method(model, cache, target, position, tokens, attention_mask, "attention_rollout", rollout)


@register(MethodSpec(name="random", input="cache", scores=KINDS, hook_names=lambda model: [hooks.EMBED], target=False,
                     summary="seeded standard-normal scores: the chance baseline"))
def random_baseline(model: TLModel, cache: Cache, target: TargetLike | None = None, position: PositionLike = -1, *, seed: int = 0,
                    tokens: Tensor | None = None, attention_mask: Tensor | None = None) -> Attribution:
    """Seeded random scores (standard normal) for tokens, heads and neurons: the chance baseline."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    fwd = read_forward(model, cache, target, position, method="random", hook_names=[hooks.EMBED],
                       filter_hint="dpa_lens.names_filter(model, 'random')", tokens=tokens, attention_mask=attention_mask,
                       check_model=False)
    b, n, view = fwd.batch, fwd.seq_len, fwd.view
    gen = torch.Generator().manual_seed(seed)  # drawn on the CPU (the same scores on any device), put where the cache is
    real = fwd.inputs.real.float().to(fwd.device)
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(fwd.device)  # noqa: E731
    attr = _result(
        fwd, "random",
        tokens=draw(b, n) * real,
        heads=draw(b, view.n_layers, n, view.n_heads) * real[:, None, :, None],
        neurons=draw(b, view.n_layers, n, view.d_mlp) * real[:, None, :, None] if view.has_neurons else None,
    )
    attr.settings["seed"] = seed
    return attr
