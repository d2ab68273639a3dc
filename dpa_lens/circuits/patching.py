"""Exact edge patching ("path patching", Wang et al. 2023): the ground truth for circuit edges.

An edge ``u → r`` joins a writer (``embed``, a head ``L{l}H{h}``, an MLP ``L{l}.mlp``) to a reader
(a head's query, key or value input, an MLP's input, or the final readout ``logit``). Patching the
edge adds the writer's clean-minus-corrupted output ``Δ_u = out_u(clean) − out_u(corrupted)`` (at
every position) to the reader's *private copy* of the residual stream on the corrupted run, and
nothing else: every other reader still sees the corrupted stream. The edge's score is the change of
the explained quantity, ``f(corrupted with the edge patched) − f(corrupted)``, the denoising
convention of `dpa_lens.activation_patching`; ``target_value`` is ``f(clean) − f(corrupted)``.

What a writer outputs is what `dpa_lens.circuits.dpa_edges.dpa_edges` calls its output, so that
edges of DPA, AtP and patching are edges of one graph: the stream entering the first block for
``embed`` (learned positions included; they cancel in ``Δ``), a head's ``z W_O`` (through Gemma's
attention output norm with each run's scale frozen: the head's share of what the layer adds to the
stream), an MLP's ``post W_out`` (likewise through Gemma's output norm). Biases are no writer's;
they cancel in every difference anyway.

How a reader reads its private copy ``x + Δ``: everything downstream of the reader's first linear
map is the model's own forward. A head reader recomputes its norm (scale included) on the private
copy, moves its query, key or value by the difference of the projections, and recomputes that head's
query-key norm, rotary, scores, soft cap and softmax; the head's output ``hook_z`` takes the change.
Grouped key/value heads are handled the same way, the shared key or value changing for one query
head only (TransformerLens's split inputs cannot express this). An MLP reader recomputes its norm and
moves its pre-activations (``hook_pre``, ``hook_pre_linear``). The ``logit`` reader recomputes the
final norm and the target at the answer position (no forward needed). Every change is taken as
``recomputed(private copy) − recomputed(stream)``, so a zero ``Δ`` changes nothing, bit for bit.

Cost: one forward per edge (``batch_size`` patched copies per forward), ``logit`` edges free.
`dpa_lens.circuits.atp.edge_atp` linearises the same patches, all edges in one backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from dpa_lens.circuits.dpa_edges import writer_outputs
from dpa_lens.circuits.result import Circuit, graph
from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.inputs import prepare_pair, resolve_positions
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import rotate, softcap
from dpa_lens.targets import Target, resolve_target, target_values
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel, typechecked
from dpa_lens.validation import require_eval

Edge = tuple[str, str, str]  # (writer, reader, path)
HeadDeltas = tuple[Tensor | None, Tensor | None, Tensor | None]  # private-copy offsets of q, k, v: [c, pos, head, d_model]


# ---------------------------------------------------------------------------------------------- hooks read
def writer_hook_names(view: ModelView) -> list[str]:
    """The hooks from which every writer's output is read (`dpa_edges.writer_outputs`), and the residual
    streams against which a cache is checked to be this model's."""
    rules = view.rules
    names = [hooks.EMBED, hooks.FINAL_NORMALIZED, hooks.resid_post(view.n_layers - 1)]
    for layer in range(view.n_layers):
        names += [hooks.resid_pre(layer), hooks.attn(layer, "z"), hooks.mlp(layer, "pre")]
        names += [hooks.mlp(layer, "pre_linear")] if rules.gated else []
        if rules.post_norms:
            names += [hooks.norm_scale(layer, "ln1_post"), hooks.norm_scale(layer, "ln2_post")]
    return names


def reader_hook_names(view: ModelView) -> list[str]:
    """The hooks of the corrupted run from which the readers' private inputs are recomputed."""
    rules = view.rules
    names = [hooks.EMBED, hooks.FINAL_NORMALIZED, hooks.resid_post(view.n_layers - 1)]
    for layer in range(view.n_layers):
        names += [hooks.resid_pre(layer)] + [hooks.attn(layer, n) for n in ("q", "k", "v", "attn_scores")]
        if not rules.parallel:
            names.append(hooks.resid_mid(layer))
        if rules.rotary and view.rotary_from_cache():
            names += [hooks.attn(layer, "cos"), hooks.attn(layer, "sin")]
    if rules.rotary and not view.rotary_from_cache():  # the positions HookedTransformer rotated by
        names += [hooks.attn(0, "rot_q"), hooks.attn(0, "pattern"),
                  hooks.qk_norm(0, "q", "normalized") if rules.qk_norm else hooks.attn(0, "q")]
    return names


# ---------------------------------------------------------------------------------------------- private copies
def _act(fwd: CachedForward, name: str) -> Tensor:
    """A cached activation on the forward's device, in float32 (float64 for a float64 model)."""
    t = fwd.cache[name].to(fwd.device)
    return t if t.dtype == torch.float64 else t.float()


@typechecked
def normalize(x: Float[Tensor, "*batch d"], view: ModelView, norm: str, layer: int | None = None) -> Float[Tensor, "*batch d"]:
    """The model's norm ``norm`` (``ln1``, ``ln2``, ``ln_final``) applied in full, its scale recomputed from ``x``
    (gain included; biases left out: they cancel in every difference taken here)."""
    if view.rules.norm == "ln":
        x = x - x.mean(-1, keepdim=True)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + view.cfg.eps)
    gain = view.norm_weight(norm, layer)
    return y if gain is None else y * gain.to(y)


def _qk_norm(x: Tensor, view: ModelView, layer: int, which: str) -> Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + view.cfg.eps)
    gain = view.qk_norm_weight(layer, which)
    return y if gain is None else y * gain.to(y)


def _attend(fwd: CachedForward, layer: int, rows: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Head outputs ``z [c, pos, head, d_head]`` from projected (not yet normed or rotated) queries, keys and
    values, one of each per query head ``[c, pos, head, d_head]``, with the masks of the corrupted run."""
    view = fwd.view
    if view.rules.qk_norm:
        q, k = _qk_norm(q, view, layer, "q"), _qk_norm(k, view, layer, "k")
    rot = fwd.rotary(layer)
    if rot is not None:
        cos, sin = ((t[rows] if t.shape[0] > 1 else t).to(q) for t in rot)
        q, k = rotate(q, cos, sin, view.adjacent_pairs), rotate(k, cos, sin, view.adjacent_pairs)
    scores = softcap(torch.einsum("cqhe,ckhe->chqk", q, k) / view.attn_scale(layer), view.rules.attn_softcap)
    ran = _act(fwd, hooks.attn(layer, "attn_scores"))[rows]
    masked = ~torch.isfinite(ran) | (ran < -1e30)  # causal, padding and sliding-window masks as the model ran them
    pattern = scores.masked_fill(masked, float("-inf")).softmax(-1).nan_to_num(0.0)
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
    answer position (``target``: one row per ``c``)."""
    x = _act(fwd, hooks.resid_post(fwd.view.n_layers - 1))[rows, fwd.positions[rows].to(fwd.device)]
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


# ---------------------------------------------------------------------------------------------- writers, edges
@typechecked
def all_writer_outputs(fwd: CachedForward) -> Float[Tensor, "batch pos writer d_model"]:
    """``out_u`` of every writer in the order of `graph`: the stream entering the first block, then each layer's
    heads and MLP (`dpa_edges.writer_outputs`)."""
    return torch.cat([fwd.act(hooks.resid_pre(0))[:, :, None]] + [writer_outputs(fwd, l) for l in range(fwd.view.n_layers)], 2)


@typechecked
def writer_deltas(clean: CachedForward, corrupted: CachedForward) -> Float[Tensor, "batch pos writer d_model"]:
    """``out_u(clean) − out_u(corrupted)`` of every writer in the order of `graph` (zero at padding)."""
    real = corrupted.inputs.real.to(corrupted.device)[:, :, None, None]
    return (all_writer_outputs(clean).to(corrupted.device) - all_writer_outputs(corrupted)) * real


def resolve_edges(edges: Iterable[Edge] | None, writers: list[str], readers: list[tuple[str, str]], mask: Tensor) -> Tensor:
    """The edges asked for as a ``[writer, reader]`` mask (all existing edges for None)."""
    if edges is None:
        return mask.clone()
    chosen = torch.zeros_like(mask)
    w_index, r_index = {w: i for i, w in enumerate(writers)}, {r: i for i, r in enumerate(readers)}
    for edge in edges:
        if not (isinstance(edge, Sequence) and len(edge) == 3 and all(isinstance(s, str) for s in edge)):
            raise InputError(f"an edge is a tuple (writer, reader, path) of strings such as ('L0H1', 'L2H3', 'k'), got {edge!r}")
        writer, reader, path = edge
        if writer not in w_index:
            raise InputError(f"unknown writer {writer!r}: writers are 'embed', 'L{{layer}}H{{head}}' and 'L{{layer}}.mlp' "
                             f"({len(writers)} in this model, from {writers[0]!r} to {writers[-1]!r})")
        if (reader, path) not in r_index:
            raise InputError(f"unknown reader {reader!r} with path {path!r}: readers are ('L{{layer}}H{{head}}', 'q'|'k'|'v'), "
                             "('L{layer}.mlp', 'mlp') and ('logit', 'logit')")
        w, r = w_index[writer], r_index[(reader, path)]
        if not bool(mask[w, r]):
            raise InputError(f"there is no edge {writer} → {reader} [{path}]: {reader} does not read {writer} "
                             "(a reader reads only writers upstream of it)")
        chosen[w, r] = True
    if not bool(chosen.any()):
        raise InputError("edges is empty: pass None for every edge, or a list of (writer, reader, path)")
    return chosen


def _reader_slots(view: ModelView) -> list[tuple[int, str, int]]:
    """Per reader of `graph`: (layer, path, head) (layer L and head -1 for the logit, head -1 for MLPs)."""
    slots = []
    for layer in range(view.n_layers):
        slots += [(layer, p, h) for h in range(view.n_heads) for p in ("q", "k", "v")] + [(layer, "mlp", -1)]
    return slots + [(view.n_layers, "logit", -1)]


def _place_offsets(
    chunk: list[tuple[int, int]], slots: list[tuple[int, str, int]], deltas: Tensor, view: ModelView
) -> tuple[dict[int, tuple[Tensor, HeadDeltas]], dict[int, tuple[Tensor, Tensor]]]:
    """The private-copy offsets of a chunk of edges ``(writer, reader)``, copy i patching edge i: per layer, the
    copies whose reader is one of its heads (offsets per path, zero for the other heads) or its MLP."""
    heads: dict[int, tuple[Tensor, HeadDeltas]] = {}
    mlps: dict[int, tuple[Tensor, Tensor]] = {}
    for layer in sorted({slots[r][0] for _, r in chunk}):
        at = [(i, w, slots[r]) for i, (w, r) in enumerate(chunk) if slots[r][0] == layer]
        mlp = [(i, w) for i, w, (_, path, _) in at if path == "mlp"]
        if mlp:
            mlps[layer] = (torch.tensor([i for i, _ in mlp]), deltas[:, [w for _, w in mlp]].transpose(0, 1))
        head = [(i, w, path, h) for i, w, (_, path, h) in at if path != "mlp"]
        if head:
            per_path = []
            for path in ("q", "k", "v"):
                picked = [(j, w, h) for j, (_, w, p, h) in enumerate(head) if p == path]
                d = None
                if picked:
                    d = deltas.new_zeros(len(head), deltas.shape[0], view.n_heads, view.d_model)
                    d[[j for j, _, _ in picked], :, [h for _, _, h in picked]] = deltas[:, [w for _, w, _ in picked]].transpose(0, 1)
                per_path.append(d)
            heads[layer] = (torch.tensor([i for i, *_ in head]), tuple(per_path))
    return heads, mlps


def pair_forwards(
    model: TLModel, clean: PromptLike, corrupted: PromptLike, target: TargetLike, position: PositionLike, *,
    clean_cache: Cache | None, attention_mask: Tensor | None, logit: str, method: str, run_corrupted: bool,
) -> tuple[ModelView, Tensor, Tensor | None, CachedForward, CachedForward | None, Target]:
    """The prelude of the edge methods on a clean/corrupted pair: checks, tokens, the clean forward (the cache
    given, or a run) and, with ``run_corrupted``, a run of the corrupted tokens caching what the readers and
    writers read."""
    view = ModelView(model)
    view.check_supported(method)
    require_eval(model, method)
    clean_tok, corr_tok, mask, clean_in, corr_in = prepare_pair(model, view, clean, corrupted, attention_mask)
    positions = resolve_positions(position, corr_in)
    resolved = resolve_target(model, view, target, corr_in.batch, logit=logit)
    kwargs = {} if mask is None else {"attention_mask": mask}

    def run(tokens: Tensor, names: list[str]) -> Cache:
        wanted = set(names)
        with torch.no_grad():
            return model.run_with_cache(tokens, names_filter=lambda n: n in wanted, **kwargs)[1]

    def read(cache: Cache, tokens: Tensor, names: list[str], what: str, given: bool) -> CachedForward:
        fwd = read_forward(model, cache, None, position, method=f"{method} ({what})", hook_names=names, tokens=tokens,
                           filter_hint="None (cache the clean run without a names_filter)", attention_mask=mask, check_model=given)
        fwd.positions, fwd.target = positions, resolved
        return fwd

    names = writer_hook_names(view)
    given = clean_cache is not None  # a cache passed in is checked against the model; runs made here need not be
    clean_fwd = read(clean_cache if given else run(clean_tok, names), clean_tok, names, "clean cache", given)
    corr_fwd = None
    if run_corrupted:
        names = list(dict.fromkeys(reader_hook_names(view) + names))
        corr_fwd = read(run(corr_tok, names), corr_tok, names, "corrupted run", False)
    return view, corr_tok, mask, clean_fwd, corr_fwd, resolved


def edge_patching(
    model: TLModel,
    clean: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    position: PositionLike = -1,
    *,
    edges: Iterable[Edge] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    clean_cache: Cache | None = None,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> Circuit:
    """Exact edge patching: each edge's effect when only its reader sees the writer's clean output.

    Args:
        model: a TransformerLens model in eval mode (either line, grouped-query attention included).
        clean, corrupted: prompts or token ids of equal shape (aligned position by position).
        target, position, attention_mask, logit: as for `dpa_lens.activation_patching`.
        edges: the edges to measure, as ``(writer, reader, path)`` tuples such as ``("L0H1", "L2H3", "k")``,
            ``("embed", "L1.mlp", "mlp")`` or ``("L3.mlp", "logit", "logit")``; None (default) for every edge
            of the model (one forward each: only for tiny models).
        batch_size: patched copies of the corrupted input per forward pass.
        progress: show a progress bar over the forward passes.
        clean_cache: an ``ActivationCache`` of the clean run, if you have one (saves a forward).

    Returns:
        `Circuit` (``method="edge_patching"``) whose ``scores [batch, writer, reader]`` are
        ``f(corrupted with the edge patched) − f(corrupted)`` on the edges measured (``mask``) and 0
        elsewhere; ``target_value = f(clean) − f(corrupted)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    view, corr_tok, mask, clean_fwd, corr, resolved = pair_forwards(
        model, clean, corrupted, target, position, clean_cache=clean_cache, attention_mask=attention_mask, logit=logit,
        method="edge patching", run_corrupted=True)
    writers, readers, exists = graph(view.n_layers, view.n_heads, parallel=view.rules.parallel)
    chosen = resolve_edges(edges, writers, readers, exists)
    slots = _reader_slots(view)
    with torch.no_grad():
        deltas = writer_deltas(clean_fwd, corr)  # [b, n, W, d]
        corr_value = target_values(resolved, corr.act(hooks.FINAL_NORMALIZED), corr.positions, view.norm_weight("ln_final"))
        clean_value = target_values(resolved, clean_fwd.act(hooks.FINAL_NORMALIZED), corr.positions, view.norm_weight("ln_final"))
    b, R = corr.batch, len(readers)
    scores = torch.zeros(b, len(writers), R, device=corr.device)

    # logit edges: the final norm and the target, recomputed at the answer position
    w_logit = torch.nonzero(chosen[:, R - 1]).flatten().to(corr.device)
    if len(w_logit):
        rows = torch.arange(b).repeat_interleave(len(w_logit))
        at_answer = deltas[torch.arange(b, device=corr.device), corr.positions.to(corr.device)]  # [b, W, d]
        with torch.no_grad():
            change = final_value_change(corr, resolved.rows(rows), rows, at_answer[:, w_logit].reshape(-1, view.d_model))
        scores[:, w_logit, R - 1] = change.view(b, -1)

    # every other edge: one patched copy of the corrupted row per edge, many copies per forward
    pairs = [(w, r) for w, r in torch.nonzero(chosen[:, : R - 1]).tolist()]
    jobs = [(row, pairs[i : i + batch_size]) for row in range(b) for i in range(0, len(pairs), batch_size)]
    for row, chunk in tqdm(jobs, desc="edge patching", disable=not progress, leave=False):
        c = len(chunk)
        rows = torch.full((c,), row)
        heads, mlps = _place_offsets(chunk, slots, deltas[row], view)
        captured: dict[str, Tensor] = {}
        fwd_hooks = private_input_hooks(corr, rows, heads, mlps)
        fwd_hooks.append((hooks.FINAL_NORMALIZED, lambda x, hook, captured=captured: captured.__setitem__("x", x)))
        kwargs = {} if mask is None else {"attention_mask": mask[row : row + 1].expand(c, -1)}
        with torch.no_grad():
            model.run_with_hooks(corr_tok[row : row + 1].expand(c, -1), fwd_hooks=fwd_hooks, return_type=None, **kwargs)
        values = target_values(resolved.rows(rows), captured["x"], corr.positions[rows], view.norm_weight("ln_final"))
        for (w, r), v in zip(chunk, (values.to(corr.device) - corr_value[row]).tolist()):
            scores[row, w, r] = v

    return Circuit(
        method="edge_patching",
        writers=writers,
        readers=readers,
        scores=scores,
        mask=chosen,
        target_value=(clean_value - corr_value).to(corr.device),
        positions=corr.positions,
        token_ids=clean_fwd.inputs.tokens,
        str_tokens=clean_fwd.inputs.str_tokens,
        target=resolved.describe(),
        settings={"edges": int(chosen.sum()), "batch_size": batch_size, "corrupted_str_tokens": corr.inputs.str_tokens},
        model_name=view.name,
    )
