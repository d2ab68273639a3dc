"""Exact edge patching ("path patching", Wang et al. 2023): the ground truth for circuit edges.

An edge ``u → r`` joins a writer (``embed``, a head ``L{l}H{h}``, an MLP ``L{l}.mlp``) to a reader
(a head's query, key or value input, an MLP's input, or the final readout ``logit``). Patching the
edge adds the writer's clean-minus-corrupted output ``Δ_u = out_u(clean) − out_u(corrupted)`` (at
every position) to the reader's *private copy* of the residual stream on the corrupted run, and
nothing else: every other reader still sees the corrupted stream. The edge's score is the change of
the explained quantity, ``f(corrupted with the edge patched) − f(corrupted)``, the denoising
convention of `dpa_lens.activation_patching`; ``target_value`` is ``f(clean) − f(corrupted)``.

Writers, readers and what a writer outputs are those of `dpa_lens.graph`, so that edges of DPA, AtP
and patching are edges of one graph (``embed``'s learned positions and the biases cancel in ``Δ``).
How a reader reads its private copy ``x + Δ`` is `dpa_lens.interventions`: everything downstream of
the reader's first linear map is the model's own forward, and a zero ``Δ`` changes nothing, bit for bit.

Cost: one forward per edge (``batch_size`` patched copies per forward), ``logit`` edges free.
`dpa_lens.edge_atp` linearises the same patches, all edges in one backward pass.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import InputError
from dpa_lens.graph import Edge, Graph, writer_deltas
from dpa_lens.interventions import HeadDeltas, final_value_change, pair_forwards, private_input_hooks
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Circuit, Diagnostics
from dpa_lens.targets import target_values
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel


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


@register(MethodSpec(name="edge_patching", input="pair", scores=(), returns="edges", reference=True,
                     summary="exact edge patching: f(corrupted with one reader reading the writer's clean output) − f(corrupted)"))
@renamed(clean="prompt")
def edge_patching(
    model: TLModel,
    prompt: PromptLike,
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
        prompt, corrupted: the clean and the corrupted prompts (strings or token ids) of equal shape,
            aligned position by position.
        target, position, attention_mask, logit: as for `dpa_lens.activation_patching`.
        edges: the edges to measure, as ``(writer, reader, path)`` tuples such as ``("L0H1", "L2H3", "k")``,
            ``("embed", "L1.mlp", "mlp")`` or ``("L3.mlp", "logit", "logit")``; None (default) for every edge
            of the model (one forward each: only for tiny models).
        batch_size: patched copies of the corrupted input per forward pass.
        progress: show a progress bar over the forward passes.
        clean_cache: an ``ActivationCache`` of the clean run, if you have one (saves a forward).

    Returns:
        `Circuit` (``method="edge_patching"``) whose ``scores [batch, writer, reader]`` are
        ``f(corrupted with the edge patched) − f(corrupted)`` on the edges measured (``in_graph``) and 0
        elsewhere; ``target_value = f(clean) − f(corrupted)``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    pair, clean_fwd, corr = pair_forwards(model, prompt, corrupted, target, position, clean_cache=clean_cache,
                                          attention_mask=attention_mask, logit=logit, method="edge patching", run_corrupted=True)
    view, corr_tok, mask, resolved = pair.view, pair.corrupted_tokens, pair.mask, pair.target
    g = Graph.of(view)
    writers, readers = g.writers, g.readers
    chosen = g.edge_mask(edges)
    slots = g.reader_slots()
    with torch.no_grad():
        deltas = writer_deltas(clean_fwd, corr)  # [b, n, W, d]
        corr_value = corr.target_value(resolved)
        clean_value = clean_fwd.target_value(resolved, corr.positions)
    b, logit = corr.batch, g.logit_reader
    scores = torch.zeros(b, len(writers), len(readers), device=corr.device)

    # logit edges: the final norm and the target, recomputed at the answer position
    w_logit = torch.nonzero(chosen[:, logit]).flatten().to(corr.device)
    if len(w_logit):
        rows = torch.arange(b).repeat_interleave(len(w_logit))
        at_answer = deltas[torch.arange(b, device=corr.device), corr.positions.to(corr.device)]  # [b, W, d]
        with torch.no_grad():
            change = final_value_change(corr, resolved.rows(rows), rows, at_answer[:, w_logit].reshape(-1, view.d_model))
        scores[:, w_logit, logit] = change.view(b, -1).to(scores.device)

    # every other edge: one patched copy of the corrupted row per edge, many copies per forward
    pairs = [(w, r) for w, r in torch.nonzero(chosen[:, :logit]).tolist()]
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
        in_graph=chosen,
        target_value=(clean_value - corr_value).to(corr.device),
        positions=corr.positions,
        token_ids=clean_fwd.inputs.tokens,
        str_tokens=clean_fwd.inputs.str_tokens,
        target=resolved.describe(),
        diagnostics=Diagnostics(corrupted_str_tokens=corr.inputs.str_tokens),
        settings={"edges": int(chosen.sum()), "batch_size": batch_size},
        model_name=view.name,
    )
