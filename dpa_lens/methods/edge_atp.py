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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, Pair, read_pair
from dpa_lens.graph import Graph, writer_deltas, writer_hook_names
from dpa_lens.inputs import inputs_from_tokens
from dpa_lens.interventions import pair_forwards, private_input_hooks, reader_hook_names
from dpa_lens.methods._autograd import forward_with_grads
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.results import Circuit, Diagnostics
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
    G, value, live = reader_gradients(model, pair, clean_fwd, pair.corrupted_tokens)
    with torch.no_grad():
        deltas = writer_deltas(clean_fwd, live)
    return edge_circuit("edge_atp", pair, clean_fwd, deltas, G, value, per_position=per_position)


def reader_gradients(
    model: TLModel,
    pair: Pair,
    clean_fwd: CachedForward,
    tokens: Tensor,
    *,
    embed_override: Callable[[Tensor], Tensor] | None = None,
    extra_hooks: Sequence[tuple[str, Callable]] = (),
    cut: bool = False,
) -> tuple[Float[Tensor, "batch pos reader d_model"], Float[Tensor, " batch"], CachedForward]:
    """One forward of ``tokens`` (the pair's clean or corrupted prompt) and one backward of the target, with
    every reader of `Graph` reading a zero private offset of the stream that requires grad.

    Returns ``∂f/∂x_r [batch, pos, reader, d_model]`` (every reader's gradient with respect to its private
    input, on the embedding's device), the target ``f [batch]`` of the run, and the run itself (a
    `CachedForward` of what the readers and writers read). ``embed_override`` maps the token embeddings to
    what the blocks receive (EAP-IG's interpolation); ``extra_hooks`` run after the readers' hooks (a hook that
    replaces a sublayer's output by a constant cuts the gradient of the readers upstream of it: with ``cut``,
    those readers get a zero gradient instead of an error).
    """
    view, resolved, mask = pair.view, pair.target, pair.mask
    L, H, d = view.n_layers, view.n_heads, view.d_model
    b, n = tokens.shape
    device = clean_fwd.device
    acts: dict[str, Tensor] = {}  # the run's activations, filled as it runs
    live = CachedForward(view=view, cache=acts, inputs=inputs_from_tokens(view, tokens, mask), positions=clean_fwd.positions,
                         target=resolved, device=device, layer_devices=clean_fwd.layer_devices)

    def capture(name: str) -> Any:
        return lambda x, hook: acts.__setitem__(name, x.detach())

    def leaf(layer: int, *shape: int) -> Tensor:  # where the layer's readers are (a split model)
        return torch.zeros(b, n, *shape, device=live.layer_device(layer), requires_grad=True)

    has_mlp = view.rules.has_mlp
    # per layer: q, k, v (per head), and the MLP's where the model has one
    offsets = [(leaf(l, H, d), leaf(l, H, d), leaf(l, H, d)) + ((leaf(l, d),) if has_mlp else ()) for l in range(L)]
    rows = torch.arange(b)
    fwd_hooks = [(name, capture(name)) for name in dict.fromkeys(reader_hook_names(view) + writer_hook_names(view))]
    fwd_hooks += private_input_hooks(live, rows, {l: (rows, o[:3]) for l, o in enumerate(offsets)},
                                     {l: (rows, o[3]) for l, o in enumerate(offsets)} if has_mlp else {})
    fwd_hooks += list(extra_hooks)
    final = hooks.resid_post(L - 1)  # read by the final norm alone: its gradient is the logit reader's
    run = forward_with_grads(model, view, tokens, resolved, clean_fwd.positions, [final], attention_mask=mask,
                             extra_fwd_hooks=fwd_hooks, embed_override=embed_override)
    if not cut and any(t.grad is None for o in offsets for t in o):
        raise RuntimeError("a reader's private offset received no gradient (its hook did not fire); please report this")

    def grad(t: Tensor) -> Tensor:
        return t.grad if t.grad is not None else torch.zeros_like(t)

    grads = []
    for q, k, v, *m in offsets:  # gathered on the embedding's device
        grads += [torch.stack([grad(q), grad(k), grad(v)], dim=3).reshape(b, n, 3 * H, d).to(device)] + [grad(x)[:, :, None].to(device) for x in m]
    grads.append(run.grads[final].float()[:, :, None].to(device))
    return torch.cat(grads, dim=2), run.value, live


def edge_scores(
    deltas: Float[Tensor, "batch pos writer d_model"], grads: Float[Tensor, "batch pos reader d_model"],
    exists: Tensor, per_position: bool,
) -> tuple[Float[Tensor, "batch writer reader"], Float[Tensor, "batch pos writer reader"] | None]:
    """``Σ_p Δ_u[p] · g_r[p]`` on the edges that exist (``[batch, writer, reader]``), and split by position with
    ``per_position`` (``[batch, pos, writer, reader]``, else None)."""
    per_pos = torch.einsum("bnwd,bnrd->bnwr", deltas, grads) * exists if per_position else None
    scores = per_pos.sum(1) if per_pos is not None else torch.einsum("bnwd,bnrd->bwr", deltas, grads) * exists
    return scores, per_pos


def edge_circuit(
    method: str, pair: Pair, clean_fwd: CachedForward, deltas: Float[Tensor, "batch pos writer d_model"],
    grads: Float[Tensor, "batch pos reader d_model"], corrupted_value: Float[Tensor, " batch"], *,
    per_position: bool, settings: dict[str, Any] | None = None,
) -> Circuit:
    """The `Circuit` of a linearised edge method on a clean/corrupted pair: `edge_scores` of the writers' differences
    ``deltas`` and the readers' gradients ``grads`` on every edge of the model's `Graph`, ``target_value = f(clean) −
    f(corrupted)`` (``corrupted_value``), the clean prompt's tokens and the corrupted prompt's in its `Diagnostics`."""
    g = Graph.of(pair.view)
    device = clean_fwd.device
    with torch.no_grad():
        clean_value = clean_fwd.target_value(pair.target)
    scores, per_pos = edge_scores(deltas, grads, g.mask.to(device), per_position)
    return Circuit(
        method=method,
        writers=g.writers,
        readers=g.readers,
        scores=scores,
        in_graph=g.mask,
        per_position=per_pos,
        target_value=clean_value.to(device) - corrupted_value.to(device),
        positions=clean_fwd.positions,
        token_ids=clean_fwd.inputs.tokens,
        str_tokens=clean_fwd.inputs.str_tokens,
        target=pair.target.describe(),
        diagnostics=Diagnostics(corrupted_str_tokens=pair.corrupted.str_tokens),
        settings={} if settings is None else settings,
        model_name=pair.view.name,
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
