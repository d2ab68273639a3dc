"""DPA's circuit edges from one sweep: every writer → reader edge with its q/k/v/mlp/logit label.

DPA's sweep is a linear map of the target. Each reader (a head's query, key or value input, an
MLP's input, the final norm) adds its own term ``R_r`` to the effective target of the stream it
reads, so the effective target where a writer ``u`` writes is ``t_final + Σ_{r downstream of u} R_r``
and its node score ``out_u · t_u`` splits exactly into edges::

    edge(u → r) = Σ_p out_u[p] · R_r[p]          edge(u → logit) = Σ_p out_u[p] · t_final[p]

with no remainder, for every ``mu``. ``out_u`` is what the writer adds to the stream (the token
embeddings with their positions; a head's ``z W_O``, through its output norm where the model has
one; an MLP's ``post W_out``, likewise; biases are not writers). Grouped key/value heads are split
by the query head that pulls them, so every query head has its own k and v readers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.errors import CacheError, InputError
from dpa_lens.forward import CachedForward, read_forward, reduce_runs
from dpa_lens.graph import Graph, all_writer_outputs, entry_stream, mlp_hidden
from dpa_lens.methods.dpa.hooks import required_hooks
from dpa_lens.methods.dpa.method import SweepResult, start_target, sweep
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.methods.dpa.paths import search_paths
from dpa_lens.methods.dpa.root import Root, parse_root
from dpa_lens.methods.dpa.rules import AttentionStep, MLPStep
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import pull_norm
from dpa_lens.results import Circuit
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel


def _neuron_edges(fwd: CachedForward, layer: int, post_diff: Tensor | None, U: Tensor, steps: int = 1) -> Tensor:
    """Edges from the neurons of ``layer`` into readers whose updates are ``U [batch, pos, reader, d]``:
    ``Σ_p post[p, n] · W_out[n] · U[p]``, ``[batch, d_mlp, reader]``, on the neurons' layer's device (``steps``: the
    rows of ``fwd`` and ``U`` are ``steps`` runs of ``post_diff``'s rows, whose terms are averaged)."""
    view = fwd.view
    m = view.mlp(layer)
    post = mlp_hidden(fwd, layer) if post_diff is None else post_diff
    U = U.to(post.device)
    if view.rules.post_norms:
        U = pull_norm(U, fwd.act(hooks.norm_scale(layer, "ln2_post"))[:, :, None], view.norm_weight("ln2_post", layer), center=False)
    U = reduce_runs(U, steps, "mean")
    lam = U @ m.W_out.T  # [b, n, reader, d_mlp]
    return torch.einsum("bnm,bnrm->bmr", post, lam)


def parse_neuron_layers(neurons: bool | Iterable[int] | None, n_layers: int) -> list[int]:
    """The layers whose neurons are writers: ``True`` every layer, ``False``/None none, or the layers listed."""
    if neurons is True:
        return list(range(n_layers))
    if neurons is False or neurons is None:
        return []
    try:
        layers = sorted({int(l) for l in neurons})
    except (TypeError, ValueError):
        raise InputError(f"neurons must be True, False or a list of layer indices, got {neurons!r}") from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise InputError(f"neuron layers {bad} are out of range (the model has {n_layers} layers)")
    return layers


@register(MethodSpec(name="dpa_edges", input="cache", scores=(), returns="edges", contrast="corrupted_cache",
                     hook_names=lambda model: required_hooks(ModelView(model), False),
                     summary="DPA's edges: each writer's DPA score split exactly by the reader (q, k, v, mlp, logit) it reaches the target through"))
def dpa_edges(
    model: TLModel,
    cache: Cache,
    target: TargetLike,
    position: PositionLike = -1,
    mu: Mu | None = None,
    *,
    per_position: bool = False,
    neurons: bool | Iterable[int] = False,
    corrupted_cache: Cache | None = None,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: Literal["auto", "raw", "centered"] = "auto",
    root: str | None = None,
    paths: int = 0,
) -> Circuit:
    """DPA's edges: how much of each writer's DPA score reaches the target through each reader.

    Args:
        model, cache, target, position, mu, tokens, attention_mask, logit: as for `dpa_lens.dpa`.
        per_position: also return ``per_position [batch, pos, writer, reader]``: edges split by the
            position where the writer writes and the reader reads (a key or value read at position p
            is counted at p, whichever query pulled it).
        neurons: also score each MLP neuron as a writer (``True``: every layer; or a list of layers).
            Its edges cost one ``[pos, reader, d_mlp]`` product per neuron layer and reader layer.
        corrupted_cache: a cache of a corrupted prompt of the same length: contrastive DPA, every
            writer's score is ``(out_clean − out_corrupted) · R_r`` with the clean run's targets (the
            question patching answers, asked of DPA's linearisation).
        root: explain ``x · target`` at a residual hook or a head's output instead of the logit
            (rerooting, `dpa_lens.methods.dpa.root`; ``target`` is then a direction): the graph keeps
            the writers and readers upstream of the root, and ``(logit, logit)`` is the root's direct
            read (of the stream, or of the root head's output).
        paths: also find the top ``paths`` DPA paths per row (`dpa_lens.dpa_paths` with its defaults)
            into ``Circuit.paths``.

    Returns:
        `Circuit` with ``scores [batch, writer, reader]`` (writers ``embed``, ``L{l}H{h}``,
        ``L{l}.mlp``, then ``L{l}N{n}``; readers ``(L{l}H{h}, q|k|v)``, ``(L{l}.mlp, mlp)``,
        ``(logit, logit)``), ``in_graph``: the edges that exist, ``nodes [batch, writer]`` (the
        writers' DPA node scores, each the sum of its outgoing edges) and ``bias``.
    """
    mu = Mu.paper_default() if mu is None else mu
    if not isinstance(mu, Mu):
        raise TypeError(f"mu must be a dpa_lens.Mu, got {type(mu).__name__}")
    view = ModelView(model)
    view.check_supported("DPA edges")
    rooted = None if root is None else parse_root(view, root)
    if rooted is not None and corrupted_cache is not None:
        raise InputError("contrastive edges explain the logit: pass root= or corrupted_cache=, not both")
    if isinstance(paths, bool) or not isinstance(paths, int) or paths < 0:
        raise InputError(f"paths must be a non-negative int (how many paths per row), got {paths!r}")
    if paths and corrupted_cache is not None:
        raise InputError("paths explain the clean run: pass paths= or corrupted_cache=, not both")
    neuron_layers = parse_neuron_layers(neurons, view.n_layers)
    kwargs = dict(hook_names=required_hooks(view, False), filter_hint="dpa_lens.dpa_names_filter(model)", logit=logit)
    if rooted is not None:
        kwargs.update(hook_names=kwargs["hook_names"] + rooted.hooks, filter_hint=rooted.filter_hint)
    # the sweep by reader reads W_Q, W_K and the MLP inputs' weights: checked through its products (the weight
    # probe), and on the corrupted cache, which no sweep reads, by recomputing them
    fwd = read_forward(model, cache, target, position, method="DPA edges", tokens=tokens, attention_mask=attention_mask,
                       weights="probe", **kwargs)
    base = None
    if corrupted_cache is not None:
        try:
            base = read_forward(model, corrupted_cache, None, position, method="contrastive DPA edges (corrupted cache)",
                                weights="every", **kwargs)
        except CacheError as err:  # which of the two caches
            raise CacheError(f"corrupted_cache: {err}") from None
        if base.inputs.tokens.shape != fwd.inputs.tokens.shape:
            raise CacheError(f"the corrupted cache is a run on {tuple(base.inputs.tokens.shape)} tokens, the clean one on "
                             f"{tuple(fwd.inputs.tokens.shape)}: contrastive scores need them aligned position by position")
    g = Graph.of(view, neuron_layers)
    with torch.no_grad():
        outs = all_writer_outputs(fwd)
        post_diff = None
        if base is not None:
            outs = outs - all_writer_outputs(base)
            post_diff = {l: mlp_hidden(fwd, l) - mlp_hidden(base, l) for l in neuron_layers}
        start, target_bias = start_target(fwd) if rooted is None else rooted.start(fwd)
        edges = edge_sweep(fwd, outs, start, mu, g, neuron_layers, post_diff=post_diff, per_position=per_position,
                           sweep_args={} if rooted is None else rooted.sweep_args)
        del outs
        value = fwd.target.value(fwd.final_input()) if rooted is None else rooted.value(fwd)
        found = search_paths(fwd, start, mu, root=rooted, k=paths) if paths else None
        fwd.verify_weights()  # W_Q, W_K and the MLP inputs' weights, read by the sweep through its probe
    result, mask, per_pos = edges.result, edges.mask, edges.per_position
    writers, readers, b = g.writers, g.readers, fwd.batch
    nodes = None
    if base is None:  # each writer's DPA node score, in the order of the graph's writers
        units = [result.heads.sum(2)] + ([result.neurons.sum((2, 3))[:, :, None]] if g.has_mlp else [])
        nodes = torch.cat([result.tokens.sum(-1, keepdim=True), torch.cat(units, dim=-1).reshape(b, -1),
                           *[result.neurons[:, l].sum(1) for l in neuron_layers]], dim=1)
    if rooted is not None:
        mask &= _upstream(rooted, writers, readers, view.rules.parallel).to(mask.device)
    if per_pos is not None:
        per_pos = per_pos * mask
    return Circuit(
        method="dpa_edges" if base is None else "dpa_edges (contrastive)",
        writers=writers,
        readers=readers,
        scores=edges.scores * mask,
        in_graph=mask,
        per_position=per_pos,
        nodes=nodes,
        bias=result.bias + target_bias if base is None else None,
        target_value=value if base is None else value - _corrupted_value(fwd, base),
        positions=fwd.positions,
        token_ids=fwd.inputs.tokens,
        str_tokens=fwd.inputs.str_tokens,
        paths=found,
        target=fwd.target.describe() if rooted is None else rooted.describe(fwd),
        settings={"mu": mu.as_dict(), "neurons": neuron_layers, "contrastive": base is not None, **({} if root is None else {"root": root})},
        model_name=view.name,
    )


@dataclass
class EdgeSweep:
    """What `edge_sweep` returns: ``scores [batch, writer, reader]`` (zero off ``mask``), ``mask [writer,
    reader]`` (the edges that exist; neuron rows included), ``per_position [batch, pos, writer, reader]`` when
    asked, and the sweep's node scores (``result``)."""

    scores: Tensor
    mask: Tensor
    per_position: Tensor | None
    result: SweepResult


def edge_sweep(
    fwd: CachedForward,
    outs: Float[Tensor, "batch pos unit d_model"],
    start: Float[Tensor, "batch pos d_model"],
    mu: Mu,
    g: Graph,
    neuron_layers: list[int],
    *,
    post_diff: dict[int, Tensor] | None = None,
    per_position: bool = False,
    sweep_args: dict | None = None,
    steps: int = 1,
) -> EdgeSweep:
    """One DPA sweep of ``fwd`` from the target ``start``, every edge ``Σ_p outs_u[p] · R_r[p]`` on the way.

    ``outs`` are the writers' outputs in `Graph` order, neurons aside (``all_writer_outputs(fwd)`` for DPA's
    edges, a difference of two runs for contrastive and integrated DPA); a neuron layer's activations are
    ``post_diff[layer]`` where given, else ``fwd``'s own. The readers' terms ``R_r`` are those of ``fwd``'s sweep;
    with ``steps > 1`` the rows of ``fwd`` are ``steps`` runs of each row of ``outs`` (run-major) and ``R_r`` is their
    mean (integrated DPA: one sweep for every run of the path)."""
    view = fwd.view
    mask = g.mask.to(fwd.device, copy=True)
    b, n, R = outs.shape[0], fwd.seq_len, len(g.readers)
    if fwd.batch != steps * b:
        raise ValueError(f"the forward has {fwd.batch} rows, not steps × {b}")
    W0 = g.n_units  # writers that are not neurons
    post_diff = post_diff or {}
    scores = torch.zeros(b, mask.shape[0], R, device=fwd.device)
    per_pos = torch.zeros(b, n, mask.shape[0], R, device=fwd.device) if per_position else None
    # writer-major, so that the writers before a reader are a contiguous prefix: one matrix product per layer
    outs_w = outs.permute(0, 2, 1, 3).contiguous()  # [b, writer, n, d]
    flat = outs_w.reshape(b, outs_w.shape[1], -1)

    def add(writer_slice: slice, reader_slice: slice, U: Tensor) -> None:
        """Edges of the writers ``writer_slice`` (a prefix) into readers whose updates are ``U [b, n, r, d]``
        (on a split model, moved from the readers' layer to the writers' outputs, gathered on ``fwd.device``)."""
        U = reduce_runs(U.to(flat.device), steps, "mean")
        Ur = U.permute(0, 2, 1, 3).reshape(b, U.shape[2], -1)  # [b, r, n·d]
        scores[:, writer_slice, reader_slice] = torch.bmm(flat[:, writer_slice], Ur.transpose(1, 2))
        if per_pos is not None:
            per_pos[:, :, writer_slice, reader_slice] = torch.einsum("bwnd,bnrd->bnwr", outs_w[:, writer_slice], U)

    def add_neurons(before_layer: int, reader_slice: slice, U: Tensor) -> None:
        for k, l in enumerate(neuron_layers):
            if l < before_layer:
                rows = slice(W0 + k * view.d_mlp, W0 + (k + 1) * view.d_mlp)
                scores[:, rows, reader_slice] = _neuron_edges(fwd, l, post_diff.get(l), U, steps).to(scores.device)
                mask[rows, reader_slice] = True

    def on_layer(layer: int, attn: AttentionStep, mlp: MLPStep) -> None:
        heads = g.head_readers(layer)
        U = attn.readers.reshape(fwd.batch, n, 3 * view.n_heads, -1)
        if not g.has_mlp:  # an attention-only layer: its heads read the embeddings and earlier layers
            add(slice(0, g.read_by_heads(layer)), heads, U)
            return
        m = g.mlp_reader(layer)
        # heads read the embeddings and earlier layers; a sequential MLP also reads its own layer's heads
        # (one product for both: the same-layer head → head entries are outside the graph, zeroed by ``mask``)
        add(slice(0, g.read_by_mlp(layer)), slice(heads.start, m + 1), torch.cat([U, mlp.update[:, :, None]], dim=2))
        add_neurons(layer, heads, U)
        add_neurons(layer, slice(m, m + 1), mlp.update[:, :, None])

    result = sweep(fwd, start, mu, kinds={"tokens", "heads", "neurons"}, readers=True, on_layer=on_layer, **(sweep_args or {}))
    logit = slice(g.logit_reader, g.logit_reader + 1)
    add(slice(0, W0), logit, start[:, :, None])
    add_neurons(view.n_layers, logit, start[:, :, None])
    return EdgeSweep(scores=scores, mask=mask, per_position=per_pos, result=result)


def _upstream(root: Root, writers: list[str], readers: list[tuple[str, str]], parallel: bool) -> Tensor:
    """``[writer, reader]``: what a rerooted graph keeps. Writers and readers whose outputs enter the
    stream at or above the root, and ``logit`` (the root's own read); for a head root, its own q, k,
    v readers, and itself as the only writer that ``logit`` reads."""
    w = torch.tensor([entry_stream(n, parallel) <= root.stream for n in writers])
    r = torch.tensor([n == "logit" or entry_stream(n, parallel) <= root.stream for n, _ in readers])
    keep = w[:, None] & r[None, :]
    if root.head is not None:
        keep[:, [n == root.name for n, _ in readers]] = w[:, None]
        keep[:, [n == "logit" for n, _ in readers]] = torch.tensor([n == root.name for n in writers])[:, None]
    return keep


def _corrupted_value(fwd: CachedForward, base: CachedForward) -> Tensor:
    """The target's value on the corrupted run, at the clean run's answer positions."""
    base.positions = fwd.positions
    return fwd.target.value(base.final_input())
