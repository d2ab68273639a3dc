"""EAP-IG (Hanna et al. 2024, "Have faith in faithfulness"): edge attribution patching with integrated
gradients, in the two forms of MIB's circuit-localization track.

Both score an edge ``u → r`` of `dpa_lens.graph` as edge AtP does (`dpa_lens.edge_atp`), with the gradient
averaged over interpolated runs instead of taken once:

    Σ_p Δ_u[p] · ḡ_r[p],     Δ_u = out_u(clean) − out_u(corrupted)

where ``ḡ_r`` averages ``∂f/∂x_r``, the gradient of the explained quantity with respect to the reader's private
copy of the stream (the head's query, key or value input, the MLP's input, the final norm's input):

* ``mode="inputs"`` (MIB's EAP-IG-inputs): over the runs whose token embeddings (``hook_embed``) are
  ``e' + (k/S)(e − e')`` for ``k = 0 … S−1`` (``S = steps``): the corrupted end is included, the clean end is not
  (a left Riemann sum of integrated gradients along the straight path of the embeddings);
* ``mode="activations"`` (MIB's EAP-IG-activations): over ``(1 + 2L)·S`` runs of the clean prompt (``(1 + L)·S`` without MLPs), in each of which
  one group of writers, the token embeddings, a layer's attention (all its heads, replaced at ``hook_z``, which is
  ``hook_result`` before ``W_O``) or a layer's MLP (``hook_mlp_out``), outputs the constant
  ``(k/S)·clean + (1 − k/S)·corrupted`` for ``k = 1 … S`` (the clean end included, the corrupted end not). A replaced
  group passes no gradient back: in that run the readers upstream of it see only the other paths, and its own
  readers a zero gradient. In the runs that replace the embeddings of a model without learned positions, the readers
  of the stream entering the first block (its heads, and its MLP in a parallel block) get a zero gradient too: they
  read a constant, on which the reference's gradient hooks do not fire.

These are the conventions of the reference implementation MIB uses (``hannamw/EAP-IG``, ``src/eap/attribute.py``:
``get_scores_eap_ig`` and ``get_scores_ig_activations``; the graph of ``src/eap/graph.py``), with one difference of
sign: the reference scores ``(corrupted − clean) · ḡ``; here, as in edge AtP, ``(clean − corrupted) · ḡ``, so that
a positive edge moves f toward its clean value (multiply by −1 for the reference's numbers on the same metric; MIB runs
the reference on the negated logit difference, so MIB's score files have this sign). MIB runs 5 steps.

Identities (tested): with ``steps=1`` the inputs form is edge AtP exactly (its one run is the corrupted run); the
edges out of ``embed`` add up to the integrated gradients of the token embeddings, so that they tend to
``f(clean) − f(corrupted)`` as ``steps`` grows (every path from the embeddings to f passes through a reader).
Writers are dpa_lens's (`dpa_lens.graph`): on models with output norms (Gemma) the reference differences the
heads' outputs before the norm (``hook_result``), dpa_lens after it with each run's scale frozen, so there the edges
out of heads differ (those out of the embeddings and MLPs agree). The reference's tokenizer call always prepends a
BOS token; pass the same token ids to compare with it on a model whose default does not.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, Pair, reduce_runs
from dpa_lens.graph import Graph, writer_deltas
from dpa_lens.interventions import pair_forwards
from dpa_lens.methods.edge_atp import edge_circuit, reader_gradients
from dpa_lens.methods.registry import MethodSpec, register, register_variant
from dpa_lens.models import hooks
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Circuit
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel

MODES: tuple[str, ...] = ("inputs", "activations")
MIB_STEPS = 5  # MIB's circuit-localization baselines run EAP-IG with 5 steps


@register(MethodSpec(name="eap_ig", input="pair", scores=(), returns="edges",
                     summary="EAP-IG (MIB's EAP-IG-inputs): (clean − corrupted writer output) · the reader's input "
                             "gradient averaged over steps from the corrupted to the clean token embeddings"))
def eap_ig(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    position: PositionLike = -1,
    *,
    mode: Literal["inputs", "activations"] = "inputs",
    steps: int = MIB_STEPS,
    chunk: int | None = None,
    per_position: bool = False,
    clean_cache: Cache | None = None,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    progress: bool = True,
) -> Circuit:
    """EAP-IG: edge AtP with the reader's gradient averaged along a path from the corrupted to the clean run.

    Args:
        model, prompt, corrupted, target, position, clean_cache, attention_mask, logit: as for `edge_atp`.
        mode: ``"inputs"`` interpolates the token embeddings (``steps`` forward and backward passes);
            ``"activations"`` each group of writers in turn (``(1 + 2·n_layers)·steps`` passes; the module's note).
        steps: points of the path (MIB's default, 5). ``steps=1`` with ``"inputs"`` is `edge_atp`.
        chunk: runs per forward and backward, as one batch of ``chunk × batch`` rows (default: as many as keep the
            memory the runs add to a pass within an estimated `CHUNK_BUDGET` bytes, at most ``steps``; 1 holds the least memory, more
            are faster at short inputs, where a pass is mostly fixed cost).
        per_position: also return ``per_position [batch, pos, writer, reader]``, the scores split by the
            position where the writer writes and the reader reads.
        progress: a progress bar over the passes.

    Returns:
        `Circuit` (``method="eap_ig"``, or ``"eap_ig_activations"``) with ``scores [batch, writer, reader]`` on every
        edge of the model (``in_graph``): the share of ``f(clean) − f(corrupted)`` (``target_value``) that the
        edge carries, sign as edge AtP's (the opposite of the reference implementation's).
    """
    if mode not in MODES:
        raise InputError(f"mode must be 'inputs' or 'activations', got {mode!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive int (MIB runs {MIB_STEPS}), got {steps!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk must be a positive int (runs per forward and backward), got {chunk!r}")
    name = "eap_ig" if mode == "inputs" else "eap_ig_activations"
    pair, clean_fwd, corr_fwd = pair_forwards(model, prompt, corrupted, target, position, clean_cache=clean_cache,
                                              attention_mask=attention_mask, logit=logit, method=name,
                                              run_corrupted=mode == "activations")
    chunk = min(steps, chunk or _default_chunk(pair, mode))
    if mode == "inputs":
        clean_embed = clean_fwd.cache[hooks.EMBED].detach()
        b, total = pair.tokens.shape[0], None
        with tqdm(range(0, steps, chunk), desc="EAP-IG", disable=not progress or steps <= chunk, leave=False) as bar:
            for start in bar:  # the runs k = start … start + chunk − 1 as one batch, run-major
                ks = range(start, min(start + chunk, steps))
                alphas = torch.tensor([k / steps for k in ks]).repeat_interleave(b)[:, None, None]

                def interpolate(x: Tensor, alphas: Tensor = alphas) -> Tensor:  # x: the corrupted prompt's embeddings
                    return x + alphas.to(x) * (clean_embed.repeat(len(alphas) // b, 1, 1).to(x) - x)

                runs, fwd = _repeated(pair, clean_fwd, len(ks))
                G, value, live = reader_gradients(model, runs, fwd, runs.corrupted_tokens, embed_override=interpolate)
                total = reduce_runs(G, len(ks)) + (0 if total is None else total)
                if start == 0:  # its first run is the corrupted run itself
                    with torch.no_grad():
                        deltas = writer_deltas(clean_fwd, _first_run(live, b))
                    corrupted_value = value[:b]
        G = total / steps
    else:
        G = _activation_path_gradients(model, pair, clean_fwd, steps, chunk, progress)
        with torch.no_grad():
            deltas = writer_deltas(clean_fwd, corr_fwd)
            corrupted_value = corr_fwd.target_value(pair.target)
    return edge_circuit(name, pair, clean_fwd, deltas, G, corrupted_value, per_position=per_position,
                        settings={"mode": mode, "steps": steps})


CHUNK_BUDGET = 2**32  # bytes the runs of one pass may add by default (4 GiB), estimated by `_RUN_MEMORY`
# a run's memory over its readers' gradients [rows, pos, reader, d_model] in float32: the increase of the peak per
# run added to a pass, measured on SmolLM2-135M (CPU; inputs at 32 and 64 tokens: 5.4× and 7.2×; activations at
# 16 and 32 tokens: 24× and 30×). What one run and the call itself hold comes on top.
_RUN_MEMORY = {"inputs": 8, "activations": 32}


def _default_chunk(pair: Pair, mode: str) -> int:
    """Runs per pass such that what they add to a pass's memory stays within an estimated `CHUNK_BUDGET` bytes (at least 1)."""
    b, n = pair.tokens.shape
    gradients = b * n * len(Graph.of(pair.view).readers) * pair.view.d_model * 4
    return max(1, CHUNK_BUDGET // (_RUN_MEMORY[mode] * gradients))


def _repeated(pair: Pair, clean_fwd: CachedForward, runs: int) -> tuple[Pair, CachedForward]:
    """The pair and the clean forward's answer positions repeated ``runs`` times, run-major (one batch of runs)."""
    rows = torch.arange(pair.tokens.shape[0]).repeat(runs)
    return pair.rows(rows), dataclasses.replace(clean_fwd, positions=clean_fwd.positions[rows.to(clean_fwd.positions.device)])


def _first_run(live: CachedForward, b: int) -> CachedForward:
    """The first run (``b`` rows) of a batch of runs."""
    rows = torch.arange(b)
    return dataclasses.replace(live, cache={k: v[:b] for k, v in live.cache.items()}, inputs=live.inputs.rows(rows),
                               positions=live.positions[:b], target=live.target.rows(rows))


def _activation_path_gradients(model: TLModel, pair: Pair, clean_fwd: CachedForward, steps: int, chunk: int,
                               progress: bool) -> Tensor:
    """EAP-IG-activations' ``ḡ [batch, pos, reader, d_model]``: the readers' gradients averaged over the clean
    runs in which one group of writers outputs ``(k/S)·clean + (1 − k/S)·corrupted``, ``k = 1 … S`` (``chunk`` of
    them per pass)."""
    view = pair.view
    groups = [hooks.EMBED]
    for layer in range(view.n_layers):
        groups += [hooks.attn(layer, "z")] + ([hooks.mlp_out(layer)] if view.rules.has_mlp else [])
    wanted = set(groups)

    def outputs(tokens: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted, **pair.forward_kwargs)
        return {n: cache[n].detach() for n in groups}

    clean, corrupted = outputs(pair.tokens), outputs(pair.corrupted_tokens)
    g = Graph.of(view)  # the readers of the stream entering the first block: its heads, and its MLP in a parallel block
    first_readers = list(range(g.head_readers(0).start, g.head_readers(0).stop))
    first_readers += [g.mlp_reader(0)] if view.rules.parallel and view.rules.has_mlp else []
    total = None
    with tqdm(total=len(groups) * steps, desc="EAP-IG (activations)", disable=not progress, leave=False) as bar:
        for group in groups:
            for start in range(1, steps + 1, chunk):  # the runs k = start … start + chunk − 1 as one batch, run-major
                ks = range(start, min(start + chunk, steps + 1))
                value = torch.cat([(k / steps) * clean[group] + (1 - k / steps) * corrupted[group] for k in ks])
                runs, fwd = _repeated(pair, clean_fwd, len(ks))

                def replace(x: Tensor, hook: object = None, value: Tensor = value) -> Tensor:  # a constant: no gradient
                    return value.to(x)

                if group == hooks.EMBED:
                    G, _, _ = reader_gradients(model, runs, fwd, runs.tokens, embed_override=replace, cut=True)
                    if view.rules.rotary:  # the first block reads the constant alone: no gradient in the reference
                        G[:, :, first_readers] = 0
                else:
                    G, _, _ = reader_gradients(model, runs, fwd, runs.tokens, extra_hooks=[(group, replace)], cut=True)
                total = reduce_runs(G, len(ks)) + (0 if total is None else total)
                bar.update(len(ks))
    return total / (len(groups) * steps)


register_variant("eap_ig_activations", "eap_ig",
                 "EAP-IG (MIB's EAP-IG-activations): (clean − corrupted writer output) · the reader's input gradient "
                 "averaged over runs interpolating one layer's attention, MLP or the embeddings at a time", mode="activations")
