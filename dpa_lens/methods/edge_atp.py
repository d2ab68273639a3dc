"""Edge attribution patching (EAP, Syed et al. 2023) and the random edge baseline.

EAP linearises exact edge patching (`dpa_lens.edge_patching`): an edge ``u → r`` scores

    Σ_p Δ_u[p] · ∂f/∂x_r[p]

where ``Δ_u = out_u(clean) − out_u(corrupted)`` is the writer's output difference (the writers of
`dpa_lens.graph`: embeddings, a head's ``z W_O``, an MLP's ``post W_out``; through Gemma's output norms with
each run's scale frozen) and ``∂f/∂x_r`` is the gradient of the explained quantity with respect to
the reader's private copy of the stream on the corrupted run: the head's query, key or value input, the
MLP's input, or the final norm's input. It is the derivative at ``ε = 0`` of patching ``ε Δ_u`` into the
edge, the denoising convention of `dpa_lens.atp`.

All edges come from one forward and backward of the corrupted input (plus a clean forward): every
reader gets a zero private offset that requires grad, added by the same hooks that exact edge patching
uses (`dpa_lens.interventions.private_input_hooks`), so the two methods read the same private inputs. Grouped-query
heads are fine (each query head has its own key and value reads). On the models where TransformerLens
4.3's ``attribution_patch(..., EdgeAttributionConfig(granularity="edge"))`` runs (no grouped keys and
values, no norms after the sublayers) the scores equal its edge scores summed over positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, read_pair
from dpa_lens.graph import Graph, writer_deltas, writer_hook_names
from dpa_lens.inputs import inputs_from_tokens
from dpa_lens.interventions import pair_forwards, private_input_hooks, reader_hook_names
from dpa_lens.methods._autograd import forward_with_grads
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.results import Circuit, Diagnostics
from dpa_lens.targets import target_values
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel


@register(MethodSpec(name="edge_atp", input="pair", scores=(), returns="edges",
                     summary="edge attribution patching (EAP): (clean − corrupted writer output) · gradient at the reader's input"))
@renamed(clean="prompt")
def edge_atp(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    position: PositionLike = -1,
    *,
    per_position: bool = False,
    clean_cache: Cache | None = None,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> Circuit:
    """Edge attribution patching: every edge's linearised patching effect, from one backward pass.

    Args:
        model, prompt, corrupted, target, position, clean_cache, attention_mask, logit: as for
            `dpa_lens.edge_patching`.
        per_position: also return ``per_position [batch, pos, writer, reader]``, the scores split by the
            position where the writer writes and the reader reads.

    Returns:
        `Circuit` (``method="edge_atp"``) with ``scores [batch, writer, reader]`` on every edge of the
        model (``in_graph``); ``target_value = f(clean) − f(corrupted)``. Memory: a ``[batch, pos, head,
        d_model]`` offset (and its gradient) per layer for each of q, k and v.
    """
    pair, clean_fwd, _ = pair_forwards(model, prompt, corrupted, target, position, clean_cache=clean_cache,
                                       attention_mask=attention_mask, logit=logit, method="edge AtP", run_corrupted=False)
    view, corr_tok, mask, resolved = pair.view, pair.corrupted_tokens, pair.mask, pair.target
    L, H, d = view.n_layers, view.n_heads, view.d_model
    b, n = corr_tok.shape
    device = clean_fwd.device
    acts: dict[str, Tensor] = {}  # the corrupted forward's activations, filled as it runs
    live = CachedForward(view=view, cache=acts, inputs=inputs_from_tokens(view, corr_tok, mask), positions=clean_fwd.positions,
                         target=resolved, device=device)

    def capture(name: str) -> Any:
        return lambda x, hook: acts.__setitem__(name, x.detach())

    def leaf(*shape: int) -> Tensor:
        return torch.zeros(b, n, *shape, device=device, requires_grad=True)

    has_mlp = view.rules.has_mlp
    # per layer: q, k, v (per head), and the MLP's where the model has one
    offsets = [(leaf(H, d), leaf(H, d), leaf(H, d)) + ((leaf(d),) if has_mlp else ()) for _ in range(L)]
    rows = torch.arange(b)
    fwd_hooks = [(name, capture(name)) for name in dict.fromkeys(reader_hook_names(view) + writer_hook_names(view))]
    fwd_hooks += private_input_hooks(live, rows, {l: (rows, o[:3]) for l, o in enumerate(offsets)},
                                     {l: (rows, o[3]) for l, o in enumerate(offsets)} if has_mlp else {})
    final = hooks.resid_post(L - 1)  # read by the final norm alone: its gradient is the logit reader's
    run = forward_with_grads(model, view, corr_tok, resolved, clean_fwd.positions, [final], attention_mask=mask, extra_fwd_hooks=fwd_hooks)
    if any(t.grad is None for o in offsets for t in o):
        raise RuntimeError("a reader's private offset received no gradient (its hook did not fire); please report this")

    grads = []
    for q, k, v, *m in offsets:
        grads += [torch.stack([q.grad, k.grad, v.grad], dim=3).reshape(b, n, 3 * H, d)] + [x.grad[:, :, None] for x in m]
    grads.append(run.grads[final].float()[:, :, None])
    G = torch.cat(grads, dim=2)  # [b, n, reader, d]
    g = Graph.of(view)
    with torch.no_grad():
        deltas = writer_deltas(clean_fwd, live)
        clean_value = target_values(resolved, clean_fwd.act(hooks.FINAL_NORMALIZED), clean_fwd.positions, view.norm_weight("ln_final"))
    exists = g.mask.to(device)
    per_pos = torch.einsum("bnwd,bnrd->bnwr", deltas, G) * exists if per_position else None
    scores = per_pos.sum(1) if per_pos is not None else torch.einsum("bnwd,bnrd->bwr", deltas, G) * exists
    return Circuit(
        method="edge_atp",
        writers=g.writers,
        readers=g.readers,
        scores=scores,
        in_graph=g.mask,
        per_position=per_pos,
        target_value=clean_value.to(device) - run.value.to(device),
        positions=clean_fwd.positions,
        token_ids=clean_fwd.inputs.tokens,
        str_tokens=clean_fwd.inputs.str_tokens,
        target=resolved.describe(),
        diagnostics=Diagnostics(corrupted_str_tokens=live.inputs.str_tokens),
        model_name=view.name,
    )


@register(MethodSpec(name="edge_random", input="pair", scores=(), returns="edges",
                     summary="seeded standard-normal scores on every edge: the chance baseline for edge rankings"))
@renamed(clean="prompt")
def edge_random(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    position: PositionLike = -1,
    *,
    seed: int = 0,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> Circuit:
    """The chance baseline for edge rankings: independent standard normal scores on every existing edge.

    Runs no forward. ``seed`` fixes the scores (same seed, same model shape: same scores). The arguments
    are those of `edge_atp`, so that a benchmark can call every edge method the same way.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    pair = read_pair(model, prompt, corrupted, target, position, method="edge_random", attention_mask=attention_mask, logit=logit,
                     runs=False)
    g = Graph.of(pair.view)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(pair.clean.batch, len(g.writers), len(g.readers), generator=gen) * g.mask
    return Circuit(
        method="edge_random",
        writers=g.writers,
        readers=g.readers,
        scores=scores,
        in_graph=g.mask,
        positions=pair.positions,
        token_ids=pair.clean.tokens,
        str_tokens=pair.clean.str_tokens,
        target=pair.target.describe(),
        settings={"seed": seed},
        model_name=pair.view.name,
    )
