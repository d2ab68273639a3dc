"""Circuit faithfulness: keep the top edges of a `Circuit`, ablate the rest, and see how much of the model is left.

This is MIB's circuit localisation metric (Mueller et al. 2025, "MIB: a mechanistic interpretability
benchmark"), on dpa_lens's edge graph (`dpa_lens.graph`: writers ``embed``, ``L{l}H{h}``,
``L{l}.mlp``; readers ``(L{l}H{h}, q|k|v)``, ``(L{l}.mlp, mlp)``, ``(logit, logit)``).

**The intervention.** The model runs on the clean prompt. Every reader ``r`` gets a private copy of the
residual stream (its query, key or value input per query head, grouped-query heads included; its MLP
input; the final readout at the answer position), recomputed from its norm on as exact edge patching
does (`dpa_lens.interventions`). For every *ablated* edge ``w → r`` the reader reads
``out_w(ablated)`` instead of ``out_w(current)``::

    x_r = x + Σ_{w → r ablated} (out_w(ablated) − out_w(current))

where ``x`` is the stream of this (patched) forward and ``out_w(current)`` what writer ``w`` writes in
it, captured as the forward runs. ``ablation="corrupted"``: ``out_w(ablated)`` is the writer's output on
the corrupted prompt (MIB's "patching"); ``"mean"``: its mean over the prompt's real positions on the
clean run, at every position.

**Exact consequences (corrupted ablation).** With no edge kept every reader reads the corrupted stream,
so every writer writes its corrupted output and ``m(∅)`` is the corrupted run's value; with every edge
kept nothing moves and ``m(M)`` is the clean run's. A writer's output differs from its corrupted output
only if a kept path joins it to ``embed``, and it changes the metric only through a kept path to
``logit``: edges on no such path change nothing (MIB's pruning of them changes only the count). Keeping
the single edge ``u → r`` together with every edge into ``u``'s ancestors and ``u`` (so that ``u``
writes its clean output) and every edge out of ``r``'s node and the nodes downstream of it (so that
``r``'s change propagates as in a normal forward) gives exactly exact edge patching of ``u → r``
(`dpa_lens.edge_patching`) plus the corrupted value.

**The curve.** Rank the existing edges by ``|score|`` of the circuit's row (one row for all prompts, or one
per prompt; ``absolute=False``: by the signed score, highest first), keep the top ``⌊x·N⌋`` of the ``N`` edges
for each fraction ``x`` of `MIB_FRACTIONS` and measure ``f(x) = (m(C_x) − m(∅)) / (m(M) − m(∅))``.
`CircuitCurve.cpr` is the area under ``f``, `CircuitCurve.cmd` the area under ``|1 − f|``, both on a linear
fraction axis by default (MIB's ``evaluate_area_under_curve`` integrates with ``log_scale=False``),
trapezoidal over the grid, divided by the grid's width (0.999; MIB leaves the raw area, a factor 1.001 apart:
``raw=True`` gives it) so that a constant ``f = c`` has CPR ``c``. MIB's leaderboard takes CPR from the signed
ranking and CMD from the ``|score|`` ranking (its ``print_results.py`` prefers ``abs-False`` runs for CPR and
``abs-True`` runs for CMD); MIB's score files have dpa_lens's sign (positive: the edge moves the metric toward
its clean value). On the linear axis the seven points at or below 10 % span a tenth of the width: the area
mostly reflects 20–100 % of the edges; ``axis="log"`` weighs each decade of the grid equally. As in MIB, ``f``
of a set of prompts is the ratio of their means, ``(mean m(C) − mean m(∅)) / (mean m(M) − mean m(∅))``.

Cost: one forward of the model per kept-edge count per prompt (``batch_size`` of them batched), plus a
``[copies, writers, pos, d_model]`` buffer and, per layer, one ``[readers, writers] × [writers, pos·d_model]``
product per copy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward
from dpa_lens.graph import Graph, all_writer_outputs, head_outputs, writer_hook_names, writer_outputs
from dpa_lens.inputs import inputs_from_tokens
from dpa_lens.interventions import final_value_change, pair_forwards, private_input_hooks, reader_hook_names
from dpa_lens.models import hooks
from dpa_lens.models.tl import locked
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Circuit
from dpa_lens.targets import target_values
from dpa_lens.types import PositionLike, PromptLike, TargetLike, TLModel, typechecked

Ablation = Literal["corrupted", "mean"]
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@typechecked
@dataclass
class CircuitCurve:
    """Faithfulness of one circuit ranking over a grid of edge fractions, on some prompts.

    ``values[i, j]`` is ``m(C)`` of prompt i with the top ``n_edges[j]`` of ``n_total`` edges kept
    (fraction ``fractions[j]``); ``full[i]`` is ``m(M)`` (the clean run), ``empty[i]`` is ``m(∅)`` (every
    edge ablated). ``m`` is the explained quantity of the target (an IO − S logit difference for IOI).
    """

    method: str
    ablation: str
    fractions: Float[Tensor, " fraction"]
    values: Float[Tensor, "prompt fraction"]
    full: Float[Tensor, " prompt"]
    empty: Float[Tensor, " prompt"]
    n_edges: Int[Tensor, " fraction"]
    n_total: int
    absolute: bool = True  # edges ranked by |score| (False: by the signed score, highest first)

    @property
    def faithfulness(self) -> Float[Tensor, "prompt fraction"]:
        """``f = (m(C) − m(∅)) / (m(M) − m(∅))`` per prompt and fraction (1: the full model, 0: nothing kept)."""
        return (self.values - self.empty[:, None]) / (self.full - self.empty)[:, None]

    def curve(self) -> Float[Tensor, " fraction"]:
        """MIB's faithfulness of the prompts together: the ratio of the means (robust to prompts whose
        ``m(M) − m(∅)`` is small)."""
        empty = self.empty.double().mean()
        return ((self.values.double().mean(0) - empty) / (self.full.double().mean() - empty)).to(self.values.dtype)

    def _area(self, y: Tensor, axis: Literal["linear", "log"], raw: bool) -> float:
        if axis not in ("linear", "log"):
            raise InputError(f"axis must be 'linear' or 'log', got {axis!r}")
        x = self.fractions.double()
        x = x.log() if axis == "log" else x  # MIB's log axis is the natural log (only the raw area depends on the base)
        y = y.double()
        if len(x) == 1:
            return float(y[0])
        area = torch.trapezoid(y, x)
        return float(area if raw else area / (x[-1] - x[0]))

    def cpr(self, axis: Literal["linear", "log"] = "linear", *, raw: bool = False) -> float:
        """Circuit performance ratio: the area under `curve` over the fraction axis, divided by its width
        (higher is better; 1 when every circuit on the grid is as good as the model). ``raw=True``: the area
        itself, as MIB's ``evaluate_area_under_curve`` returns it."""
        return self._area(self.curve(), axis, raw)

    def cmd(self, axis: Literal["linear", "log"] = "linear", *, raw: bool = False) -> float:
        """Circuit-model distance: the area under ``|1 − f|`` (`curve`), divided by the axis width
        (lower is better; 0 when every circuit on the grid behaves as the model). ``raw=True``: MIB's area."""
        return self._area((1 - self.curve()).abs(), axis, raw)

    @staticmethod
    def concat(curves: Sequence[CircuitCurve]) -> CircuitCurve:
        """One curve from several of the same method, ablation and grid, prompts stacked."""
        first = curves[0]
        for c in curves[1:]:
            if ((c.method, c.ablation, c.n_total, c.absolute) != (first.method, first.ablation, first.n_total, first.absolute)
                    or not torch.equal(c.fractions, first.fractions)):
                raise InputError("can only concatenate circuit curves of the same method, ablation, ranking, graph and fractions")
        return CircuitCurve(first.method, first.ablation, first.fractions, torch.cat([c.values for c in curves]),
                            torch.cat([c.full for c in curves]), torch.cat([c.empty for c in curves]), first.n_edges, first.n_total,
                            first.absolute)


# ---------------------------------------------------------------------------------------------- the forward
class _Ablator:
    """A clean/corrupted pair, ready to evaluate circuits on any of its rows."""

    def __init__(self, model: TLModel, prompt: PromptLike, corrupted: PromptLike, target: TargetLike, position: PositionLike,
                 ablation: str, batch_size: int, attention_mask: Tensor | None, logit: str):
        if ablation not in ("corrupted", "mean"):
            raise InputError(f"ablation must be 'corrupted' (each writer's output on the corrupted prompt) or 'mean' (its "
                             f"mean over the clean prompt's positions), got {ablation!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.ablation, self.batch_size = model, ablation, batch_size
        pair, self.clean, self.corr = pair_forwards(model, prompt, corrupted, target, position, clean_cache=None,
                                                    attention_mask=attention_mask, logit=logit, method="circuit faithfulness",
                                                    run_corrupted=True)
        self.view, self.mask, self.target = pair.view, pair.mask, pair.target
        self.tokens = self.clean.inputs.tokens.to(pair.corrupted_tokens.device)  # the forward runs on the clean prompt
        view = self.view
        self.graph = Graph.of(view)
        self.writers, self.readers, self.exists = self.graph.writers, self.graph.readers, self.graph.mask
        self.names = list(dict.fromkeys(reader_hook_names(view) + writer_hook_names(view)))
        gain = view.norm_weight("ln_final")
        with torch.no_grad():
            self.full = target_values(self.target, self.clean.act(hooks.FINAL_NORMALIZED), self.corr.positions, gain)
            self.corrupted = target_values(self.target, self.corr.act(hooks.FINAL_NORMALIZED), self.corr.positions, gain)
            if ablation == "corrupted":
                ablated = all_writer_outputs(self.corr)  # [b, n, W, d]
            else:
                outs, real = all_writer_outputs(self.clean), self.clean.inputs.real.to(self.clean.device).float()
                mean = torch.einsum("bnwd,bn->bwd", outs, real) / real.sum(1)[:, None, None]
                ablated = mean[:, None].expand_as(outs)
            self.ablated = ablated.transpose(1, 2).contiguous()  # [b, W, n, d]

    def check(self, keep: Tensor) -> Tensor:
        W, R = len(self.writers), len(self.readers)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or tuple(keep.shape[-2:]) != (W, R):
            got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, Tensor) else type(keep).__name__
            raise InputError(f"keep must be a bool tensor [..., {W} writers, {R} readers] (e.g. Circuit.in_graph), got {got}")
        return keep.cpu() & self.exists

    def values(self, row: int, keeps: Bool[Tensor, "k writer reader"], bar: Any = None) -> Float[Tensor, " k"]:
        """m(C) of one row with the edges ``keeps[i]`` kept, ``batch_size`` circuits per forward."""
        out = []
        for start in range(0, keeps.shape[0], self.batch_size):
            out.append(self._forward(row, keeps[start : start + self.batch_size]))
            if bar is not None:
                bar.update(1)
        return torch.cat(out)

    def _forward(self, row: int, keeps: Tensor) -> Tensor:
        view, device = self.view, self.corr.device
        H, L, W = view.n_heads, view.n_layers, len(self.writers)
        c, n, d = keeps.shape[0], self.tokens.shape[1], view.d_model
        drop = (self.exists & ~keeps).to(device=device, dtype=self.ablated.dtype)  # [c, W, R]
        real = self.corr.inputs.real[row].to(device=device, dtype=self.ablated.dtype)[None, None, :, None]
        gap = self.ablated[row][None].repeat(c, 1, 1, 1)  # out(ablated) − out(current), [c, W, n, d]: current subtracted as written
        done = [0]  # writers (in graph order) whose current output is in gap
        acts: dict[str, Tensor] = {}
        tokens = self.tokens[row : row + 1].expand(c, -1)
        mask = None if self.mask is None else self.mask[row : row + 1].expand(c, -1)
        position = int(self.corr.positions[row])
        live = CachedForward(view=view, cache=acts, inputs=inputs_from_tokens(view, tokens, mask),
                             positions=torch.full((c,), position), target=None, device=device, layer_devices=self.corr.layer_devices)
        copies = torch.arange(c)

        def written(n_writers: int) -> Tensor:
            """``gap`` of the first ``n_writers`` writers, subtracting current outputs not yet there."""
            while done[0] < n_writers:
                w = done[0]
                layer, unit = self.graph.writer_unit(w)
                out = (live.act(hooks.resid_pre(0))[:, :, None] if w == 0 else
                       head_outputs(live, layer) if unit < H else writer_outputs(live, layer)[:, :, H:])
                gap[:, w : w + out.shape[2]] -= out.transpose(1, 2).to(gap.device)  # from its layer's device (a split model)
                done[0] += out.shape[2]
            return gap[:, :n_writers]

        def offsets(readers: slice, n_writers: int) -> Tensor:
            """Σ over the ablated edges into ``readers`` of their writers' gap: ``[c, reader, n, d]``."""
            a = drop[:, :n_writers, readers]
            out = torch.bmm(a.transpose(1, 2), written(n_writers).reshape(c, n_writers, n * d))
            return out.view(c, -1, n, d) * real

        def head_deltas(layer: int) -> tuple[Tensor | None, ...]:
            readers, n_writers = self.graph.head_readers(layer), self.graph.read_by_heads(layer)
            per_path = offsets(readers, n_writers).view(c, H, 3, n, d).permute(2, 0, 3, 1, 4)  # [3, c, n, H, d]
            used = drop[:, :n_writers, readers].reshape(c, n_writers, H, 3).sum((0, 1, 2)) > 0
            return tuple(per_path[i] if bool(used[i]) else None for i in range(3))

        def mlp_delta(layer: int) -> Tensor:
            r = self.graph.mlp_reader(layer)
            return offsets(slice(r, r + 1), self.graph.read_by_mlp(layer))[:, 0]

        def capture(name: str) -> Any:
            return lambda x, hook: acts.__setitem__(name, x.detach())

        # readers' private inputs first: the captures of hook_z and the MLP's pre-activations then see what the
        # heads and MLPs of this forward really output
        fwd_hooks = private_input_hooks(live, copies, {l: (copies, lambda l=l: head_deltas(l)) for l in range(L)},
                                        {l: (copies, lambda l=l: mlp_delta(l)) for l in range(L)} if self.graph.has_mlp else {})
        fwd_hooks += [(name, capture(name)) for name in self.names]
        kwargs = {} if mask is None else {"attention_mask": mask}
        with torch.no_grad():
            self.model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type=None, **kwargs)
            at_answer = torch.einsum("cw,cwd->cd", drop[:, :, self.graph.logit_reader], written(W)[:, :, position])
            target = self.target.rows(torch.full((c,), row))
            value = target_values(target, live.act(hooks.FINAL_NORMALIZED), live.positions, view.norm_weight("ln_final"))
            return (value + final_value_change(live, target, copies, at_answer).to(value.device)).cpu()


# ---------------------------------------------------------------------------------------------- public
@renamed(clean="prompt")
@locked
def circuit_values(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    keep: Bool[Tensor, "*rows circuit writer reader"],
    *,
    ablation: Ablation = "corrupted",
    position: PositionLike = -1,
    batch_size: int = 16,
    progress: bool = True,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> Float[Tensor, "batch circuit"]:
    """``m(C)``: the explained quantity when only the edges ``keep`` carry the current forward's outputs.

    Args:
        model, prompt, corrupted, target, position, attention_mask, logit: as for `dpa_lens.edge_patching`.
        keep: bool ``[circuit, writer, reader]`` (the same circuits for every prompt) or ``[batch, circuit,
            writer, reader]``, over the graph of `dpa_lens.graph` (``Circuit.in_graph`` is one);
            entries on edges that do not exist are ignored.
        ablation: what an ablated edge carries: ``"corrupted"`` (the writer's output on the corrupted
            prompt) or ``"mean"`` (its mean over the clean prompt's real positions).
        batch_size: circuits evaluated per forward pass.

    Returns:
        ``[batch, circuit]`` values of the target (see the module docstring for the intervention).
    """
    ab = _Ablator(model, prompt, corrupted, target, position, ablation, batch_size, attention_mask, logit)
    keep = ab.check(keep)
    b = ab.tokens.shape[0]
    if keep.ndim == 3:
        keep = keep[None].expand(b, -1, -1, -1)
    if keep.ndim != 4 or keep.shape[0] != b:
        raise InputError(f"keep must be [circuit, writer, reader] or [{b} prompts, circuit, writer, reader], got {tuple(keep.shape)}")
    bar = tqdm(total=b * math.ceil(keep.shape[1] / batch_size), desc="circuit values", disable=not progress, leave=False)
    with bar:
        return torch.stack([ab.values(row, keep[row], bar) for row in range(b)])


def kept_counts(fractions: Sequence[float], n_total: int) -> list[int]:
    """Edges kept at each fraction: ``⌊x·N⌋`` (MIB's count), robust to the rounding of ``x·N``."""
    return [math.floor(x * n_total + 1e-9) for x in fractions]


@renamed(clean="prompt")
@locked
def circuit_faithfulness(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    circuit: Circuit | Sequence[Circuit],
    *,
    fractions: Sequence[float] = MIB_FRACTIONS,
    ablation: Ablation = "corrupted",
    absolute: bool = True,
    position: PositionLike = -1,
    batch_size: int = 16,
    progress: bool = True,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
) -> CircuitCurve | list[CircuitCurve]:
    """MIB's circuit faithfulness of a circuit's edge ranking: keep the top edges, ablate the rest.

    Args:
        model, prompt, corrupted, target, position, attention_mask, logit: as for
            `dpa_lens.edge_patching` (target: what ``m`` measures, e.g. the IO − S
            logit difference as a ``(correct, incorrect)`` pair).
        circuit: edge scores on this model's graph (`dpa_lens.dpa_edges`, `dpa_lens.edge_atp`,
            `dpa_lens.edge_random`, `dpa_lens.edge_patching`...), with one row for every prompt or one row per
            prompt; edges are ranked among all existing edges (ties in graph order). A list of
            circuits is evaluated together (one ``m(∅)``, their circuits batched in the same forwards).
        fractions: increasing fractions of the edges to keep, in (0, 1] (default: MIB's grid, 0.1 % … 100 %).
        ablation: ``"corrupted"`` or ``"mean"`` (see `circuit_values`).
        absolute: rank edges by ``|score|`` (MIB's CMD); ``False``: by the signed score, highest first (MIB's CPR).
        batch_size: circuits evaluated per forward pass.
        progress: show a progress bar over the forward passes.

    Returns:
        `CircuitCurve` (a list of them for a list of circuits) with ``m(C)`` per prompt and fraction, ``m(M)``
        (the clean run; also ``m(C)`` when every edge is kept, which changes nothing), ``m(∅)`` (every edge
        ablated: the corrupted run's value with ``ablation="corrupted"``), the edges kept, and
        `CircuitCurve.cpr` / `CircuitCurve.cmd`.
    """
    try:
        fractions = [float(x) for x in fractions]
    except (TypeError, ValueError):
        fractions = None
    if not fractions or any(not 0 < x <= 1 for x in fractions) or any(a >= b for a, b in zip(fractions, fractions[1:])):
        raise InputError(f"fractions must be an increasing list of numbers in (0, 1], such as MIB_FRACTIONS, got {fractions!r}")
    if not isinstance(absolute, bool):
        raise InputError(f"absolute must be True (rank by |score|) or False (by the signed score), got {absolute!r}")
    circuits = [circuit] if isinstance(circuit, Circuit) else list(circuit) if isinstance(circuit, (list, tuple)) else [circuit]
    bad = [type(c).__name__ for c in circuits if not isinstance(c, Circuit)]
    if not circuits or bad:
        raise InputError(f"circuit must be a dpa_lens Circuit (from dpa_edges, edge_atp, edge_patching...) or a list of them, "
                         f"got {bad[0] if bad else 'an empty list'}")
    ab = _Ablator(model, prompt, corrupted, target, position, ablation, batch_size, attention_mask, logit)
    b = ab.tokens.shape[0]
    for c in circuits:
        _check_circuit(c, ab, b)
    exists = torch.nonzero(ab.exists.flatten()).flatten()
    counts = kept_counts(fractions, len(exists))
    sizes = sorted(set(counts) - {0, len(exists)})  # what needs a forward: 0 is m(∅), every edge is m(M)
    jobs = 1 + len(circuits) * len(sizes)
    bar = tqdm(total=b * math.ceil(jobs / batch_size), desc="circuit faithfulness", disable=not progress, leave=False)
    values, empty = [[] for _ in circuits], []
    with bar:
        for row in range(b):
            keeps = torch.zeros(jobs, *ab.exists.shape, dtype=torch.bool)  # m(∅) first, then each circuit's sizes
            for i, c in enumerate(circuits):
                scores = c.scores[row if c.batch > 1 else 0].detach().float().cpu().flatten()[exists]
                scores = scores.abs() if absolute else scores
                order = exists[torch.argsort(-scores, stable=True)]
                for j, k in enumerate(sizes):
                    keeps[1 + i * len(sizes) + j].view(-1)[order[:k]] = True
            got = ab.values(row, keeps, bar).tolist()
            empty.append(got[0])
            for i in range(len(circuits)):
                by_size = {0: got[0], len(exists): float(ab.full[row]), **dict(zip(sizes, got[1 + i * len(sizes) :]))}
                values[i].append([by_size[k] for k in counts])
    curves = [CircuitCurve(method=c.method, ablation=ablation, fractions=torch.tensor(fractions, dtype=torch.float64),
                           values=torch.tensor(v), full=ab.full.float().cpu(), empty=torch.tensor(empty),
                           n_edges=torch.tensor(counts), n_total=len(exists), absolute=bool(absolute)) for c, v in zip(circuits, values)]
    return curves[0] if isinstance(circuit, Circuit) else curves


def _check_circuit(circuit: Circuit, ab: _Ablator, batch: int) -> None:
    if circuit.writers != ab.writers or circuit.readers != ab.readers:
        raise InputError(f"the circuit's graph ({len(circuit.writers)} writers, {len(circuit.readers)} readers) is not this model's "
                         f"({len(ab.writers)} writers, {len(ab.readers)} readers): compute it on this model, without neurons=")
    if "root" in circuit.settings:
        raise InputError("a rerooted circuit explains its root, not the target: compute the circuit without root=")
    if circuit.batch not in (1, batch):
        raise InputError(f"the circuit has {circuit.batch} rows for {batch} prompts: pass one row for all prompts or one per prompt")
    if circuit.batch > 1 and circuit.token_ids is not None and not torch.equal(circuit.token_ids.cpu(), ab.tokens.cpu()):
        raise InputError("the circuit's rows were computed on other prompts than clean: pass the circuit of these prompts")
    scores = circuit.scores.detach().float().cpu()[:, ab.exists]  # [row, existing edge]
    if not bool(torch.isfinite(scores).all()):
        raise InputError(f"the {circuit.method} circuit has NaN or infinite edge scores: they cannot be ranked")
    held = circuit.in_graph.cpu() & ab.exists
    if not bool(held.any()) or not bool((scores != 0).any()):
        raise InputError(f"the {circuit.method} circuit scores no edge (it is empty or all zero): there is nothing to rank")
    unscored = int(ab.exists.sum() - held.sum())
    if unscored:
        warnings.warn(f"{unscored} of the model's {int(ab.exists.sum())} edges are not in the {circuit.method} circuit (unscored): they "
                      "rank last, in graph order", stacklevel=3)
