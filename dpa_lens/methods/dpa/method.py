"""`dpa`: the top-down sweep that propagates the target and records every score on the way."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dpa_lens.attribution import KINDS, Attribution, Kind
from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.methods.dpa.hooks import dpa_hook_names, required_hooks
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.methods.dpa.rules import AttentionStep, MLPStep, Propagator
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import pull_norm
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel


@dataclass
class SweepResult:
    tokens: Tensor | None
    heads: Tensor | None
    neurons: Tensor | None
    head_keys: Tensor | None
    bias: Tensor
    targets: dict[str, Tensor] | None
    flow: Tensor | None


def start_target(fwd: CachedForward) -> tuple[Tensor, Tensor]:
    """The target at the final residual stream ``[batch, pos, d_model]`` (zero but at the answer
    positions), and the target's own bias ``[batch]`` (a final soft cap is taken by its secant)."""
    view = fwd.view
    rows, pos = torch.arange(fwd.batch, device=fwd.device), fwd.positions.to(fwd.device)
    direction, target_bias = fwd.target.linearized(fwd.final_input())
    start = torch.zeros(fwd.batch, fwd.seq_len, view.d_model, device=fwd.device)
    start[rows, pos] = pull_norm(direction.to(fwd.device), fwd.answer_scale(), view.norm_weight("ln_final"), center=view.rules.norm == "ln")
    return start, target_bias.to(fwd.device)


def sweep(
    fwd: CachedForward,
    start: Tensor,
    mu: Mu,
    *,
    kinds: set[str],
    neuron_target: str = "post",
    head_keys: bool = False,
    keep_targets: bool = False,
    flow: bool = False,
    readers: bool = False,
    on_layer: Callable[[int, AttentionStep, MLPStep], None] | None = None,
    top_layer: int | None = None,
) -> SweepResult:
    """Propagate the target ``start [batch, pos, d_model]`` from the final residual stream to the embeddings.

    ``on_layer(layer, attention, mlp)`` sees each layer's steps as the sweep passes (``readers=True``
    splits the attention's update by reader, for circuit edges). ``top_layer`` starts the sweep below
    the final stream: ``start`` is then the target at ``blocks.{top_layer}.hook_resid_post``."""
    view = fwd.view
    b, n, _ = start.shape
    L, H = view.n_layers, view.n_heads
    device = start.device
    rules = Propagator(fwd, mu)
    heads = torch.zeros(b, L, n, H, device=device) if "heads" in kinds else None
    neurons = torch.zeros(b, L, n, view.d_mlp, device=device) if "neurons" in kinds else None
    keys = torch.zeros(b, L, H, n, n, device=device) if head_keys else None
    bias = torch.zeros(b, device=device)
    targets: dict[str, Tensor] | None = {} if keep_targets else None
    flows = torch.zeros(b, L + 1, n, device=device) if flow else None
    t = start
    last = L - 1 if top_layer is None else top_layer
    if targets is not None:
        targets[hooks.resid_post(last)] = t
    if flows is not None:
        flows[:, last + 1] = (fwd.act(hooks.resid_post(last)) * t).sum(-1)
    for layer in reversed(range(last + 1)):
        mlp = rules.mlp(layer, t)
        if view.rules.parallel:  # attention and MLP read the same stream and write the same stream
            attn = rules.attention(layer, t, head_keys=head_keys, readers=readers)
            lam = mlp.lam
            t = t + mlp.update + attn.update
        else:
            t_mid = t + mlp.update
            lam = mlp.lam if neuron_target == "post" else rules.neuron_targets(layer, t_mid)
            if targets is not None:
                targets[hooks.resid_mid(layer)] = t_mid
            attn = rules.attention(layer, t_mid, head_keys=head_keys, readers=readers)
            t = t_mid + attn.update
        if on_layer is not None:
            on_layer(layer, attn, mlp)
        bias += mlp.bias + attn.bias
        if neurons is not None:
            neurons[:, layer] = mlp.post * lam
        if heads is not None:
            heads[:, layer] = attn.heads
        if keys is not None:
            keys[:, layer] = attn.head_keys
        if targets is not None:
            targets[hooks.resid_pre(layer)] = t
        if flows is not None:
            flows[:, layer] = (fwd.act(hooks.resid_pre(layer)) * t).sum(-1)
    tokens = (fwd.act(hooks.resid_pre(0)) * t).sum(-1) if "tokens" in kinds else None
    return SweepResult(tokens=tokens, heads=heads, neurons=neurons, head_keys=keys, bias=bias, targets=targets, flow=flows)


@register(MethodSpec(name="dpa", input="cache", scores=KINDS, hook_names=lambda model: dpa_hook_names(model, flow=True),
                     options={"flow": True}, summary="Dual Path Attribution: activation · effective target, from one top-down sweep"))
def dpa(
    model: TLModel,
    cache: Cache,
    target: TargetLike,
    position: PositionLike = -1,
    mu: Mu | None = None,
    *,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: Literal["auto", "raw", "centered"] = "auto",
    neuron_target: Literal["post", "mid"] = "post",
    kinds: Iterable[Kind] = KINDS,
    head_keys: bool = False,
    effective_targets: bool = False,
    flow: bool = False,
) -> Attribution:
    """Dual Path Attribution of ``target`` over the activations in ``cache``.

    Args:
        model: the TransformerLens model that made the cache (``dpa_lens.load_model``).
        cache: ``ActivationCache`` from ``model.run_with_cache(tokens)`` (all hooks, or
            ``names_filter=dpa_lens.dpa_names_filter(model)``).
        target: token id, single-token string, ``(correct, incorrect)`` pair, direction
            ``[d_model]``, or a list of these per row (see `dpa_lens.targets`).
        position: answer position; negative counts back from each row's last real token
            (default ``-1``), non-negative indexes the padded sequence; or one per row.
        mu: path weights (default `Mu.paper_default`).
        tokens: the input tokens, to check the cache against (read from the cache otherwise).
        attention_mask: which tokens are real, if padding cannot be read from the pad token.
        logit: which logit a token target explains: ``"raw"``, ``"centered"`` or ``"auto"``.
        neuron_target: ``"post"`` scores neurons against the target at ``resid_post`` (the
            paper); ``"mid"`` against ``resid_mid``, as the authors' public code does.
        kinds: which scores to compute, among ``"tokens"``, ``"heads"``, ``"neurons"``.
        head_keys: also return head scores per key position, ``[batch, layer, head, q, k]``.
        effective_targets: also return the effective target at every ``resid_pre`` and
            ``resid_mid`` (keyed by hook name), ``[batch, pos, d_model]`` each.
        flow: also return ``flow [batch, layer + 1, pos]``: each layer's input residual stream
            (and, last, the final one) dotted with its effective target, i.e. where the target's
            evidence sits at each depth (needs ``dpa_names_filter(model, flow=True)``).

    Returns:
        `Attribution` with ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``,
        ``neurons [batch, layer, pos, d_mlp]``, ``bias [batch]`` and ``target_value [batch]``.
        A score is in the units of the target (a logit, or a logit difference); with
        ``Mu.content_only()`` the token scores plus ``bias`` add up to ``target_value``.
    """
    mu = Mu.paper_default() if mu is None else mu
    if not isinstance(mu, Mu):
        raise TypeError(f"mu must be a dpa_lens.Mu, got {type(mu).__name__}")
    if neuron_target not in ("post", "mid"):
        raise InputError(f"neuron_target must be 'post' or 'mid', got {neuron_target!r}")
    kinds = set(kinds)
    if not kinds <= set(KINDS):
        raise InputError(f"kinds must be among {KINDS}, got {sorted(kinds)}")
    view = ModelView(model)
    view.check_supported("DPA")
    fwd = read_forward(
        model, cache, target, position, method="DPA" + (" with flow=True" if flow else ""),
        hook_names=required_hooks(view, flow),
        filter_hint=f"dpa_lens.dpa_names_filter(model{', flow=True' if flow else ''})",
        tokens=tokens, attention_mask=attention_mask, logit=logit,
    )
    with torch.no_grad():
        start, target_bias = start_target(fwd)
        scores = sweep(fwd, start, mu, kinds=kinds, neuron_target=neuron_target, head_keys=head_keys,
                       keep_targets=effective_targets, flow=flow)
        value = fwd.target.value(fwd.final_input())
    return Attribution(
        method="dpa",
        tokens=scores.tokens,
        heads=scores.heads,
        neurons=scores.neurons,
        head_keys=scores.head_keys,
        bias=scores.bias + target_bias,
        effective_targets=scores.targets,
        flow=scores.flow,
        target_value=value,
        positions=fwd.positions,
        token_ids=fwd.inputs.tokens,
        str_tokens=fwd.inputs.str_tokens,
        mask=fwd.inputs.real,
        target=fwd.target.describe(),
        settings={"mu": mu.as_dict(), "neuron_target": neuron_target},
        model_name=view.name,
    )
