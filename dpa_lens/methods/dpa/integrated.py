"""Integrated DPA edges: contrastive DPA's edges with the readers' terms averaged along the corrupted → clean path.

Contrastive DPA (`dpa_edges` with ``corrupted_cache=``) scores an edge ``u → r`` as ``Σ_p Δ_u[p] · R_r[p]``, with
``Δ_u = out_u(clean) − out_u(corrupted)`` and ``R_r`` the reader's term in DPA's sweep of the *clean* run: a
linearisation at one end of the path. Where a softmax saturates on the clean run (an induction head attending to
one token: its key path ``α (v − z) · λ`` vanishes as ``α → 1``) that end sees no key edge at all. Integrated DPA
takes the readers' terms from DPA's sweeps of ``steps`` runs between the two prompts, as EAP-IG takes the
gradient, and averages them::

    edge(u → r) = Σ_p Δ_u[p] · (1/S) Σ_k R_r^(α_k)[p],      α_k = (k + ½) / S,  k = 0 … S − 1

where run ``α`` has token embeddings (``hook_embed``) ``e' + α (e − e')`` (``e``: the clean prompt's, ``e'``: the
corrupted prompt's; the corrupted prompt's tokens otherwise, as EAP-IG-inputs runs them) and its own
attention patterns, norm scales and MLP activations, which set DPA's rules. The grid is the midpoint rule: no
end of the path is one of the runs (``steps=1`` is the halfway run alone).

Cost: a forward of each prompt for the writers' outputs, then the ``steps`` runs as one batch of ``steps × batch``
rows (``chunk`` runs at a time, if asked): one forward with DPA's cache and one DPA sweep, whose reader terms are
averaged over the runs before the edges are formed (an edge is linear in them): about one contrastive DPA call on a
batch ``steps`` times larger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, read_forward, read_pair
from dpa_lens.graph import Graph, mlp_hidden, writer_deltas, writer_hook_names
from dpa_lens.inputs import inputs_from_tokens
from dpa_lens.methods.dpa.edges import edge_sweep, parse_neuron_layers
from dpa_lens.methods.dpa.hooks import required_hooks
from dpa_lens.methods.dpa.method import start_target
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Circuit, Diagnostics
from dpa_lens.types import PositionLike, PromptLike, TargetLike, TLModel
from dpa_lens.validation import check_finite

DEFAULT_STEPS = 3


@register(MethodSpec(name="dpa_edges_ig", input="pair", scores=(), returns="edges",
                     summary="integrated DPA edges: (clean − corrupted writer output) · the reader's DPA term averaged "
                             "over runs between the corrupted and the clean token embeddings"))
def dpa_edges_ig(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    position: PositionLike = -1,
    mu: Mu | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    per_position: bool = False,
    neurons: bool | Iterable[int] = False,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    chunk: int | None = None,
    progress: bool = True,
) -> Circuit:
    """Integrated DPA edges: contrastive DPA with the readers' terms averaged over runs along the path.

    Args:
        model, prompt, corrupted, target, position, attention_mask, logit: as for `dpa_lens.edge_atp`.
        mu: DPA's rules (`dpa_lens.Mu`; default the paper's).
        steps: runs on the path, at ``α = (k + ½)/steps`` of the way from the corrupted to the clean embeddings.
        per_position: also return ``per_position [batch, pos, writer, reader]``.
        neurons: also score MLP neurons as writers (as for `dpa_lens.dpa_edges`).
        chunk: runs of the path per forward and sweep (default: all ``steps`` at once, a batch of ``steps × batch``
            rows; a smaller chunk holds less memory).
        progress: a progress bar over the chunks.

    Returns:
        `Circuit` (``method="dpa_edges_ig"``) with ``scores [batch, writer, reader]``: each edge's part in
        ``f(clean) − f(corrupted)`` (``target_value``) by DPA's rules averaged along the path, an estimate like EAP-IG's
        (the edges need not add up to it); sign as contrastive DPA's and edge AtP's: positive moves f toward its
        clean value.
    """
    chunk = steps if chunk is None else chunk
    mu = Mu.paper_default() if mu is None else mu
    if not isinstance(mu, Mu):
        raise TypeError(f"mu must be a dpa_lens.Mu, got {type(mu).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive int, got {steps!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"chunk must be a positive int (runs of the path per forward), got {chunk!r}")
    method = "integrated DPA edges"
    pair = read_pair(model, prompt, corrupted, target, position, method=method, attention_mask=attention_mask, logit=logit,
                     supported=True)
    view = pair.view
    neuron_layers = parse_neuron_layers(neurons, view.n_layers)
    writer_names = writer_hook_names(view)
    sweep_names = list(dict.fromkeys(required_hooks(view, False) + writer_names))

    def forward(tokens: Tensor, names: list[str]) -> CachedForward:
        """A run of ``tokens`` caching ``names``."""
        wanted = set(names)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted, **pair.forward_kwargs)
        fwd = read_forward(model, cache, None, position, method=method, hook_names=names, tokens=tokens,
                           filter_hint="None", attention_mask=pair.mask, check_model=False)
        fwd.positions, fwd.target = pair.positions, pair.target
        return fwd

    def on_path(alphas: list[float]) -> CachedForward:
        """The runs of the corrupted prompt with its token embeddings ``α`` of the way to the clean prompt's, for each
        ``α`` (one batch, run-major), caching what DPA's sweep reads (inputs: the corrupted run's, repeated)."""
        runs = pair.rows(torch.arange(pair.corrupted_tokens.shape[0]).repeat(len(alphas)))
        embed = torch.cat([e_corr + alpha * (e_clean - e_corr) for alpha in alphas])
        with torch.no_grad(), model.hooks(fwd_hooks=[(hooks.EMBED, lambda x, hook: embed.to(x))]):
            _, cache = model.run_with_cache(runs.corrupted_tokens, names_filter=lambda n: n in wanted, **runs.forward_kwargs)
        check_finite(cache, sweep_names, method)
        return dataclasses.replace(corr, cache=cache, inputs=inputs_from_tokens(view, runs.corrupted_tokens, runs.mask),
                                   positions=runs.positions, target=runs.target, _rotary=None, _rotary_read=False)

    clean, corr = forward(pair.tokens, writer_names), forward(pair.corrupted_tokens, writer_names)
    wanted = set(sweep_names)
    g = Graph.of(view, neuron_layers)
    with torch.no_grad():
        outs = writer_deltas(clean, corr)
        real = corr.inputs.real.to(corr.device)[:, :, None]
        post_diff = {l: (mlp_hidden(clean, l) - mlp_hidden(corr, l)) * real for l in neuron_layers}
        e_clean, e_corr = clean.act(hooks.EMBED), corr.act(hooks.EMBED)
        clean_value, corrupted_value = clean.target.value(clean.final_input()), corr.target.value(corr.final_input())
    del clean
    alphas = [(k + 0.5) / steps for k in range(steps)]
    total, per_pos = None, None
    with tqdm(range(0, steps, chunk), desc="integrated DPA", disable=not progress or steps <= chunk, leave=False) as bar:
        for start_at in bar:  # ``chunk`` runs of the path at once: one forward and one sweep of chunk × batch rows
            part = alphas[start_at : start_at + chunk]
            fwd = on_path(part)
            with torch.no_grad():
                start, _ = start_target(fwd)
                got = edge_sweep(fwd, outs, start, mu, g, neuron_layers, post_diff=post_diff, per_position=per_position,
                                 steps=len(part))
            weight = len(part) / steps  # edge_sweep averages its runs; the parts weigh by their runs
            total = got.scores * weight if total is None else total + got.scores * weight
            if per_position:
                per_pos = got.per_position * weight if per_pos is None else per_pos + got.per_position * weight
            mask = got.mask
            del fwd, got
    scores = total * mask
    return Circuit(
        method="dpa_edges_ig",
        writers=g.writers,
        readers=g.readers,
        scores=scores,
        in_graph=mask,
        per_position=None if per_pos is None else per_pos * mask,
        target_value=(clean_value - corrupted_value).to(scores.device),
        positions=pair.positions,
        token_ids=pair.tokens,
        str_tokens=pair.clean.str_tokens,
        target=pair.target.describe(),
        diagnostics=Diagnostics(corrupted_str_tokens=pair.corrupted.str_tokens),
        settings={"mu": mu.as_dict(), "neurons": neuron_layers, "steps": steps},
        model_name=view.name,
    )
