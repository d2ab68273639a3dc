"""Readers reading private copies of the residual stream: the intervention of exact edge patching, edge
AtP and circuit faithfulness.

Every reader of the graph (`dpa_lens.graph`: a head's query, key or value input, an MLP's input, the
final readout) can be made to read its own copy of the stream, ``x + Δ``, while every other reader
still sees ``x``. Everything downstream of the reader's first linear map is the model's own forward:
a head reader recomputes its norm on the copy, moves its query, key or value by the difference of
the projections, and recomputes that head's query-key norm, rotary, scores, soft cap and softmax
(grouped key/value heads are handled per query head, which TransformerLens's split inputs cannot
express); an MLP reader recomputes its norm and moves its pre-activations; the logit reader
recomputes the final norm and the target at the answer position. Every change is taken as
``recomputed(copy) − recomputed(stream)``, so a zero ``Δ`` changes nothing, bit for bit. On a model
split across devices a reader's change is computed on its layer's device (`CachedForward.device_for`),
where the offsets move; weights never do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpa_lens.blocks import attention_scores, masked_softmax, normalize, qk_normalize
from dpa_lens.forward import CachedForward, Pair, read_forward, read_pair
from dpa_lens.graph import writer_hook_names
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import rotate
from dpa_lens.targets import Target
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel, typechecked

HeadDeltas = tuple[Tensor | None, Tensor | None, Tensor | None]  # private-copy offsets of q, k, v: [c, pos, head, d_model]


def reader_hook_names(view: ModelView) -> list[str]:
    """The hooks of the corrupted run from which the readers' private inputs are recomputed."""
    rules = view.rules
    names = [hooks.EMBED, hooks.FINAL_NORMALIZED, hooks.resid_post(view.n_layers - 1)]
    for layer in range(view.n_layers):
        names += [hooks.resid_pre(layer)] + [hooks.attn(layer, n) for n in ("q", "k", "v", "attn_scores")]
        if not rules.parallel and rules.has_mlp:  # what an MLP reader reads
            names.append(hooks.resid_mid(layer))
        if rules.rotary and view.rotary_from_cache():
            names += [hooks.attn(layer, "cos"), hooks.attn(layer, "sin")]
    if rules.rotary and not view.rotary_from_cache():  # the positions HookedTransformer rotated by
        names += [hooks.attn(0, "rot_q"), hooks.attn(0, "pattern"),
                  hooks.qk_norm(0, "q", "normalized") if rules.qk_norm else hooks.attn(0, "q")]
    return names


# ---------------------------------------------------------------------------------------------- private copies
def _act(fwd: CachedForward, name: str) -> Tensor:
    """A cached activation on its layer's device (`CachedForward.device_for`), in float32 (float64 for a float64 model)."""
    t = fwd.cache[name].to(fwd.device_for(name))
    return t if t.dtype == torch.float64 else t.float()


def _attend(fwd: CachedForward, layer: int, rows: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Head outputs ``z [c, pos, head, d_head]`` from projected (not yet normed or rotated) queries, keys and
    values, one of each per query head ``[c, pos, head, d_head]``, with the masks of the corrupted run."""
    view = fwd.view
    if view.rules.qk_norm:
        q, k = qk_normalize(q, view, layer, "q"), qk_normalize(k, view, layer, "k")
    rot = fwd.rotary(layer)
    if rot is not None:
        cos, sin = ((t[rows] if t.shape[0] > 1 else t).to(q) for t in rot)
        q, k = rotate(q, cos, sin, view.adjacent_pairs), rotate(k, cos, sin, view.adjacent_pairs)
    ran = _act(fwd, hooks.attn(layer, "attn_scores"))[rows]
    masked = ~torch.isfinite(ran) | (ran < -1e30)  # causal, padding and sliding-window masks as the model ran them
    pattern = masked_softmax(attention_scores(view, layer, q, k), masked)
    return torch.einsum("chqk,ckhe->cqhe", pattern, v)


@typechecked
def head_z_change(
    fwd: CachedForward, layer: int, rows: Int[Tensor, " c"], deltas: HeadDeltas
) -> Float[Tensor, "c pos head d_head"]:
    """How each head's output ``z`` changes when head h reads ``x + dq[:, :, h]`` for its query, ``x + dk[:, :, h]``
    for its keys and ``x + dv[:, :, h]`` for its values (``x``: the stream entering ``layer`` in row ``rows[c]`` of
    ``fwd``; ``None``: no offset). Exactly zero for zero offsets."""
    view = fwd.view
    group = view.n_heads // view.n_kv_heads
    x = _act(fwd, hooks.resid_pre(layer))[rows]
    base = normalize(x, view, "ln1", layer)[:, :, None]
    w = view.attn(layer)
    before, after = [], []
    for name, W, d in (("q", w.W_Q, deltas[0]), ("k", w.W_K, deltas[1]), ("v", w.W_V, deltas[2])):
        t = _act(fwd, hooks.attn(layer, name))[rows]
        if name != "q":  # grouped keys and values: one copy per query head
            t, W = t.repeat_interleave(group, dim=2), W.repeat_interleave(group, dim=0)
        before.append(t)
        if d is not None:
            moved = normalize(x[:, :, None] + d.to(x), view, "ln1", layer) - base
            t = t + torch.einsum("cnhd,hde->cnhe", moved, W.to(x))
        after.append(t)
    return _attend(fwd, layer, rows, *after) - _attend(fwd, layer, rows, *before)


@typechecked
def mlp_pre_change(
    fwd: CachedForward, layer: int, rows: Int[Tensor, " c"], delta: Float[Tensor, "c pos d_model"]
) -> tuple[Float[Tensor, "c pos d_mlp"], Float[Tensor, "c pos d_mlp"] | None]:
    """How an MLP's pre-activations (``hook_pre``, and ``hook_pre_linear`` when gated) change when it reads
    ``x + delta`` (``x``: its input stream in row ``rows[c]`` of ``fwd``). Exactly zero for a zero offset."""
    view = fwd.view
    x = _act(fwd, hooks.resid_pre(layer) if view.rules.parallel else hooks.resid_mid(layer))[rows]
    moved = normalize(x + delta.to(x), view, "ln2", layer) - normalize(x, view, "ln2", layer)
    m = view.mlp(layer)
    if view.rules.gated:
        return moved @ m.W_gate.to(x), moved @ m.W_in.to(x)
    return moved @ m.W_in.to(x), None


@typechecked
def final_value_change(
    fwd: CachedForward, target: Target, rows: Int[Tensor, " c"], delta: Float[Tensor, "c d_model"]
) -> Float[Tensor, " c"]:
    """How the explained quantity of row ``rows[c]`` changes when the final norm reads ``x + delta`` at the
    answer position (``target``: one row per ``c``), on the device of the last layer."""
    x = _act(fwd, hooks.resid_post(fwd.view.n_layers - 1))
    x = x[rows.to(x.device), fwd.positions[rows].to(x.device)]
    after = normalize(x + delta.to(x), fwd.view, "ln_final")
    return target.value(after) - target.value(normalize(x, fwd.view, "ln_final"))


def private_input_hooks(
    fwd: CachedForward,
    rows: Tensor,
    heads: dict[int, tuple[Tensor, HeadDeltas | Callable[[], HeadDeltas]]],
    mlps: dict[int, tuple[Tensor, Tensor | Callable[[], Tensor]]],
) -> list[tuple[str, Callable[[Tensor, Any], Tensor]]]:
    """Forward hooks that make some readers read private copies of the stream.

    ``heads[layer] = (copies, (dq, dk, dv))``: the batch entries ``copies`` of that layer's heads read offsets
    ``[len(copies), pos, head, d_model]`` (see `head_z_change`); ``mlps[layer] = (copies, delta)`` likewise for
    the MLP. The batch entry ``copies[i]`` is a forward of row ``rows[copies[i]]`` of ``fwd``. Changes are
    computed when the hook runs, so ``fwd`` may be filled by the very forward that is hooked; an offset may
    then be a function of no arguments, called when the hook runs (offsets that depend on what the hooked
    forward computed upstream: `dpa_lens.evaluation.circuit_faithfulness`).
    """
    out = []
    for layer, (copies, deltas) in heads.items():
        def z_hook(z: Tensor, hook: Any, layer: int = layer, copies: Tensor = copies, deltas: Any = deltas) -> Tensor:
            change = head_z_change(fwd, layer, rows[copies], deltas() if callable(deltas) else deltas)
            return z.index_add(0, copies.to(z.device), change.to(z))

        out.append((hooks.attn(layer, "z"), z_hook))
    for layer, (copies, delta) in mlps.items():
        memo: dict[str, Any] = {}

        def mlp_hook(x: Tensor, hook: Any, layer: int = layer, copies: Tensor = copies, delta: Any = delta,
                     memo: dict = memo, which: int = 0) -> Tensor:
            if "change" not in memo:
                memo["change"] = mlp_pre_change(fwd, layer, rows[copies], delta() if callable(delta) else delta)
            return x.index_add(0, copies.to(x.device), memo["change"][which].to(x))

        out.append((hooks.mlp(layer, "pre"), mlp_hook))
        if fwd.view.rules.gated:
            out.append((hooks.mlp(layer, "pre_linear"), lambda x, hook, f=mlp_hook: f(x, hook, which=1)))
    return out


# ---------------------------------------------------------------------------------------------- the pair's forwards
def pair_forwards(
    model: TLModel, prompt: PromptLike, corrupted: PromptLike, target: TargetLike, position: PositionLike, *,
    clean_cache: Cache | None, attention_mask: Tensor | None, logit: str, method: str, run_corrupted: bool,
) -> tuple[Pair, CachedForward, CachedForward | None]:
    """The prelude of the edge methods on a clean/corrupted pair: `read_pair`, the clean forward (the cache
    given, or a run) and, with ``run_corrupted``, a run of the corrupted tokens caching what the readers and
    writers read."""
    pair = read_pair(model, prompt, corrupted, target, position, method=method, attention_mask=attention_mask, logit=logit,
                     supported=True)

    def run(tokens: Tensor, names: list[str]) -> Cache:
        wanted = set(names)
        with torch.no_grad():
            return model.run_with_cache(tokens, names_filter=lambda n: n in wanted, **pair.forward_kwargs)[1]

    def read(cache: Cache, tokens: Tensor, names: list[str], what: str, given: bool) -> CachedForward:
        fwd = read_forward(model, cache, None, position, method=f"{method} ({what})", hook_names=names, tokens=tokens,
                           filter_hint="None (cache the clean run without a names_filter)", attention_mask=pair.mask, check_model=given)
        fwd.positions, fwd.target = pair.positions, pair.target
        return fwd

    names = writer_hook_names(pair.view)
    given = clean_cache is not None  # a cache passed in is checked against the model; runs made here need not be
    clean_fwd = read(clean_cache if given else run(pair.tokens, names), pair.tokens, names, "clean cache", given)
    corr_fwd = None
    if run_corrupted:
        names = list(dict.fromkeys(reader_hook_names(pair.view) + names))
        corr_fwd = read(run(pair.corrupted_tokens, names), pair.corrupted_tokens, names, "corrupted run", False)
    return pair, clean_fwd, corr_fwd
