"""`dpa`: the top-down sweep that propagates the target and records every score on the way."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.methods.dpa.checkpoint import is_checkpointed, recomputed
from dpa_lens.methods.dpa.hooks import checkpoint_hook_names, dpa_hook_names, required_hooks
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.methods.dpa.root import parse_root
from dpa_lens.methods.dpa.rules import AttentionStep, MLPStep, Propagator
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import pull_norm
from dpa_lens.results import KINDS, Attribution, Kind
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel
from dpa_lens.validation import check_cache_object


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
    start_at: Literal["post", "mid"] | int = "post",
) -> SweepResult:
    """Propagate the target ``start [batch, pos, d_model]`` from the final residual stream to the embeddings.

    ``on_layer(layer, attention, mlp)`` sees each layer's steps as the sweep passes (``readers=True``
    splits the attention's update by reader, for circuit edges). ``top_layer`` starts the sweep below
    the final stream (rerooting, `dpa_lens.methods.dpa.root`): ``start`` is then the target at
    ``blocks.{top_layer}.hook_resid_post``, or with ``start_at="mid"`` at its ``hook_resid_mid`` (the
    layer's MLP does not read it), or with ``start_at=h`` at head ``h``'s output alone (the layer's MLP
    and other heads do not read it, the stream above the head is not carried down, and the output
    bias, which is no head's, is left out).

    On a model split across devices each layer's step runs on `CachedForward.layer_device`: only the
    target moves there, and each layer's scores are gathered on ``start``'s device."""
    view = fwd.view
    b, n, _ = start.shape
    L, H = view.n_layers, view.n_heads
    device = start.device
    rules = Propagator(fwd, mu)
    heads = torch.zeros(b, L, n, H, device=device) if "heads" in kinds else None
    neurons = torch.zeros(b, L, n, view.d_mlp, device=device) if "neurons" in kinds and view.rules.has_mlp else None
    keys = torch.zeros(b, L, H, n, n, device=device) if head_keys else None
    bias = torch.zeros(b, device=device)
    targets: dict[str, Tensor] | None = {} if keep_targets else None
    flows = torch.zeros(b, L + 1, n, device=device) if flow else None
    t = start
    last = L - 1 if top_layer is None else top_layer
    if targets is not None:
        targets[hooks.resid_post(last)] = t
    if flows is not None:
        flows[:, last + 1] = _dot(fwd.act(hooks.resid_post(last)), t, device)
    for layer in reversed(range(last + 1)):
        t = t.to(fwd.layer_device(layer))  # the one tensor that moves between a split model's devices
        no_mlp = layer == last and start_at != "post"  # rerooted at resid_mid or at a head
        head = start_at if layer == last and isinstance(start_at, int) else None
        mask = None if head is None else torch.eye(H, device=device)[head]
        mlp = rules.mlp(layer, torch.zeros_like(t) if no_mlp else t)
        if view.rules.parallel:  # attention and MLP read the same stream and write the same stream
            attn = rules.attention(layer, t, head_keys=head_keys, readers=readers, head_mask=mask)
            lam = mlp.lam
            t = (t if head is None else 0) + mlp.update + attn.update
        else:
            t_mid = t + mlp.update
            lam = mlp.lam if neuron_target == "post" or no_mlp or neurons is None else rules.neuron_targets(layer, t_mid)
            if targets is not None and view.rules.has_mlp:  # an attention-only block has no resid_mid
                targets[hooks.resid_mid(layer)] = t_mid.to(device)
            attn = rules.attention(layer, t_mid, head_keys=head_keys, readers=readers, head_mask=mask)
            t = (t_mid if head is None else 0) + attn.update
        if head is not None and view.attn(layer).b_O is not None:
            attn.bias = attn.bias - (rules.out_norm(start.to(t.device), layer, "ln1_post") @ view.attn(layer).b_O).sum(-1)
        if on_layer is not None:
            on_layer(layer, attn, mlp)
        bias += (mlp.bias + attn.bias).to(device)
        if neurons is not None:
            into = neurons[:, layer]
            if into.device == lam.device:
                torch.mul(mlp.post, lam, out=into)  # into the result, no temporary
            else:  # a layer on another device than the results
                into.copy_(mlp.post * lam)
        if heads is not None:
            heads[:, layer] = attn.heads.to(device)
        if keys is not None:
            keys[:, layer] = attn.head_keys.to(device)
        if targets is not None:
            targets[hooks.resid_pre(layer)] = t.to(device)
        if flows is not None:
            flows[:, layer] = _dot(fwd.act(hooks.resid_pre(layer)), t, device)
    tokens = _dot(fwd.act(hooks.resid_pre(0)), t, device) if "tokens" in kinds else None
    return SweepResult(tokens=tokens, heads=heads, neurons=neurons, head_keys=keys, bias=bias, targets=targets, flow=flows)


def _dot(x: Tensor, t: Tensor, device: torch.device) -> Tensor:
    """``x · t`` over ``d_model``, computed where ``x`` is and put on ``device``."""
    return (x * t.to(x.device)).sum(-1).to(device)


@register(MethodSpec(name="dpa", input="cache", scores=KINDS, hook_names=lambda model: dpa_hook_names(model, flow=True, patterns=False),
                     summary="Dual Path Attribution: activation · effective target, from one top-down sweep"))
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
    root: str | None = None,
) -> Attribution:
    """Dual Path Attribution of ``target`` over the activations in ``cache``.

    Args:
        model: the TransformerLens model that made the cache (``dpa_lens.load_model``).
        cache: ``ActivationCache`` from ``model.run_with_cache(tokens)`` (all hooks, or
            ``names_filter=dpa_lens.dpa_names_filter(model)``; with ``dpa_names_filter(model,
            checkpoint=True)`` only the residual streams, each layer recomputed during the sweep).
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
        root: explain ``x · target`` somewhere else than at the logit (rerooting, see
            `dpa_lens.methods.dpa.root`): a residual hook name (``"blocks.5.hook_resid_pre"``,
            ``hook_resid_mid``, ``hook_resid_post``) or a head ``"L5H1"`` (its output); ``target`` is then
            a direction ``[d_model]`` (a probe, an SAE encoder row; or one per row) and ``position`` where
            it is read. Not with ``flow`` or ``effective_targets``.

    Returns:
        `Attribution` with ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``,
        ``neurons [batch, layer, pos, d_mlp]`` (None for an attention-only model), ``bias [batch]``
        and ``target_value [batch]``. A score is in the units of the target (a logit, or a logit
        difference); with ``Mu.content_only()`` the token scores plus ``bias`` add up to ``target_value``.
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
    rooted = None if root is None else parse_root(view, root)
    if rooted is not None and (flow or effective_targets):
        raise InputError("flow and effective_targets describe the sweep from the logit: leave them off with root=")
    check_cache_object(cache, "DPA")  # before is_checkpointed looks into it
    checkpointed = is_checkpointed(view, cache)  # only the streams: each layer is recomputed as the sweep reaches it
    needed = checkpoint_hook_names(view) if checkpointed else required_hooks(view, flow)
    fwd = read_forward(
        model, cache, target, position, method="DPA" + (" with flow=True" if flow else ""),
        hook_names=needed + ([] if rooted is None else rooted.hooks),
        filter_hint=f"dpa_lens.dpa_names_filter(model{', flow=True' if flow else ''})" if rooted is None else rooted.filter_hint,
        tokens=tokens, attention_mask=attention_mask, logit=logit, check_model=not checkpointed, weights="probe",
    )
    if checkpointed:  # every recomputed layer is checked against the next cached stream instead
        fwd = recomputed(fwd)
    with torch.no_grad():
        start, target_bias = start_target(fwd) if rooted is None else rooted.start(fwd)
        scores = sweep(fwd, start, mu, kinds=kinds, neuron_target=neuron_target, head_keys=head_keys,
                       keep_targets=effective_targets, flow=flow, **({} if rooted is None else rooted.sweep_args))
        value = fwd.target.value(fwd.final_input()) if rooted is None else rooted.value(fwd)
        fwd.verify_weights()  # the queries', keys' and MLP inputs' weights, read by the sweep through its probe
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
        **fwd.result_fields(),
        target=fwd.target.describe() if rooted is None else rooted.describe(fwd),
        settings={"mu": mu.as_dict(), "neuron_target": neuron_target, **({} if root is None else {"root": root})},
    )
