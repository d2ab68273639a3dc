"""Disruption and recovery curves: is an attribution faithful to what the model does?

Rank the units of one prompt by an `Attribution`'s scores, then

* *disrupt*: ablate the top-k units, and
* *recover*: ablate every unit but the top-k,

and record the answer's probability relative to the clean run, ``p(y | ablated) / p(y)``, over a
grid of fractions k/N. A faithful ranking drops the probability fast when disrupting and keeps it
when recovering; ``total = AUC(recovery) − AUC(disruption)``.

The authors' protocol (the default here) ablates token embeddings by setting them to zero, with
fractions 0.1 … 1.0, and for components sets attention probabilities (query, key, head) or MLP
neuron activations to zero, with fractions on a log grid from 4e-8 to 0.45, and integrates on a
linear axis. Improvements offered: AUC on a log axis for component curves (``auc(axis="log")``),
mean and resample ablation, ranking in float32 (never bf16), and only causal units counted
(positions up to the answer; attention entries with query ≥ key).

Units: ``"tokens"``, ``"heads"`` (head outputs per position), ``"neurons"`` (per position),
``"components"`` (heads and neurons ranked together), ``"attention"`` (attention probabilities
per (layer, head, query, key), ranked by ``head_keys``) and ``"attention+neurons"`` (the authors'
component benchmark).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.inputs import leading_bos, prepare_tokens
from dpa_lens.models import hooks
from dpa_lens.models.tl import locked
from dpa_lens.results import Attribution
from dpa_lens.validation import require_eval

Unit = Literal["tokens", "heads", "neurons", "components", "attention", "attention+neurons"]
Ablation = Literal["zero", "mean", "resample"]
TOKEN_FRACTIONS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
COMPONENT_FRACTIONS: tuple[float, ...] = tuple(float(f) for f in torch.logspace(math.log10(4e-8), math.log10(0.45), 20, dtype=torch.float64))


@dataclass
class Curves:
    """Disruption and recovery curves of one method on some prompts.

    ``disruption[i, j]`` (and ``recovery``) is ``p(y | ablated) / p(y)`` for prompt i at fraction j.
    """

    method: str
    unit: str
    ablation: str
    fractions: Tensor  # [fraction]
    disruption: Tensor  # [prompt, fraction]
    recovery: Tensor  # [prompt, fraction]
    n_units: list[int] = field(default_factory=list)

    def auc(self, axis: Literal["linear", "log"] = "linear") -> dict[str, float]:
        """Mean area under each curve over the prompts, ×100 and divided by the width of the
        fraction axis (so 100 means the probability stayed at its clean value throughout)."""
        x = self.fractions.double()
        if axis == "log":
            x = x.log10()
        width = float(x[-1] - x[0]) if len(x) > 1 else 1.0

        def area(y: Tensor) -> float:
            y = y.double()
            if len(x) == 1:
                return float(y.mean()) * 100
            return float(torch.trapezoid(y, x, dim=-1).mean()) / width * 100

        d, r = area(self.disruption), area(self.recovery)
        return {"disruption": d, "recovery": r, "total": r - d}

    @staticmethod
    def concat(curves: Sequence[Curves]) -> Curves:
        """One `Curves` from several (same method, unit, ablation and fractions), prompts stacked."""
        first = curves[0]
        for c in curves[1:]:
            if (c.method, c.unit, c.ablation) != (first.method, first.unit, first.ablation) or not torch.equal(c.fractions, first.fractions):
                raise ValueError("can only concatenate curves of the same method, unit, ablation and fractions")
        return Curves(first.method, first.unit, first.ablation, first.fractions,
                      torch.cat([c.disruption for c in curves]), torch.cat([c.recovery for c in curves]),
                      [n for c in curves for n in c.n_units])


KIND_CODES = {"tokens": 0, "heads": 1, "neurons": 2, "attention": 3}


@dataclass
class _Units:
    """The rankable units of one prompt: their kinds, coordinates and scores."""

    kinds: Tensor  # [N] codes of KIND_CODES
    coords: Tensor  # [N, 4] (layer, pos, index, key) with -1 where unused
    scores: Tensor  # [N] float32

    def groups(self) -> list[tuple[str, str, Tensor]]:
        """(kind, hook name, indices of its units) for every hook the units live at."""
        layer = self.coords[:, 0].clamp(min=0)
        key = self.kinds * 100_000 + layer
        out = []
        for value in torch.unique(key).tolist():
            kind = next(k for k, c in KIND_CODES.items() if c == value // 100_000)
            out.append((kind, _hook_name(kind, value % 100_000), torch.nonzero(key == value).flatten()))
        return out


def _units(attr: Attribution, row: int, unit: str, answer: int, real: Tensor, kept: Tensor) -> _Units:
    """The units of one row that are ranked and ablated: real positions up to the answer, not ``kept``."""
    kinds, coords, scores = [], [], []
    causal = torch.arange(len(real)) <= answer
    usable = real & causal & ~kept

    def add(kind: str, c: Tensor, s: Tensor) -> None:
        kinds.append(torch.full((len(s),), KIND_CODES[kind]))
        coords.append(c)
        scores.append(s.float())

    if unit == "tokens":
        pos = torch.nonzero(usable).flatten()
        t = attr.scores("tokens")[row].detach().cpu()
        add("tokens", torch.stack([torch.full_like(pos, -1), pos, torch.full_like(pos, -1), torch.full_like(pos, -1)], 1), t[pos])
    if unit in ("heads", "components"):
        t = attr.scores("heads")[row].detach().cpu()  # [L, pos, H]
        idx = torch.nonzero(usable[None, :, None].expand_as(t))
        add("heads", torch.cat([idx, torch.full((len(idx), 1), -1)], 1), t[idx[:, 0], idx[:, 1], idx[:, 2]])
    if unit in ("neurons", "components", "attention+neurons"):
        t = attr.scores("neurons")[row].detach().cpu()  # [L, pos, d_mlp]
        idx = torch.nonzero(usable[None, :, None].expand_as(t))
        add("neurons", torch.cat([idx, torch.full((len(idx), 1), -1)], 1), t[idx[:, 0], idx[:, 1], idx[:, 2]])
    if unit in ("attention", "attention+neurons"):
        if attr.head_keys is None:
            raise ValueError(f"unit={unit!r} ranks attention entries by per-key head scores: {attr.method} has none "
                             "(dpa(..., head_keys=True) gives them)")
        t = attr.head_keys[row].detach().cpu()  # [L, H, q, k]
        ok = usable[:, None] & usable[None, :] & (torch.arange(len(real))[:, None] >= torch.arange(len(real))[None, :])
        idx = torch.nonzero(ok[None, None].expand_as(t))  # (layer, head, q, k)
        add("attention", idx[:, [0, 2, 1, 3]], t[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]])  # -> (layer, q, head, k)
    if not kinds:
        raise ValueError(f"unknown unit {unit!r}")
    return _Units(torch.cat(kinds), torch.cat(coords), torch.cat(scores))


def _hook_name(kind: str, layer: int) -> str:
    return {"tokens": hooks.EMBED, "heads": hooks.attn(layer, "z"), "neurons": hooks.mlp(layer, "post"),
            "attention": hooks.attn(layer, "pattern")}[kind]


def _replacement(kind: str, ablation: str, clean: Tensor, other: Tensor | None, real: Tensor) -> Tensor:
    """What an ablated unit's activation becomes, shaped like ``clean`` (one prompt's activation)."""
    if ablation == "zero" or kind == "attention":
        return torch.zeros_like(clean)
    if ablation == "mean":  # the unit's mean over the prompt's real positions
        mean = clean[real.to(clean.device)].mean(0, keepdim=True)
        return mean.expand_as(clean)
    return other  # resample: the corrupted run's activation


@renamed(tokens="prompt", corrupted_tokens="corrupted")
@locked
def faithfulness_curves(
    model: Any,
    prompt: Any,
    attr: Attribution,
    *,
    unit: Unit = "tokens",
    fractions: Sequence[float] | None = None,
    ablation: Ablation = "zero",
    corrupted: Any = None,
    absolute: bool = False,
    keep_bos: bool = False,
    batch_size: int = 32,
) -> Curves:
    """Disruption and recovery curves of ``attr`` on the prompts it explains.

    Args:
        prompt: the prompts ``attr`` was computed on (strings or ids), one per batch row.
        unit: what to rank and ablate (see the module docstring).
        fractions: of the units ablated (disrupt) or kept (recover); default: the authors' grid
            for the unit (0.1 … 1.0 for tokens, a log grid from 4e-8 to 0.45 otherwise).
        ablation: ``"zero"`` (the authors'), ``"mean"`` (the unit's mean over the prompt's
            positions) or ``"resample"`` (its value on ``corrupted``). Attention entries
            are always zeroed.
        absolute: rank by absolute score instead of signed score (highest first).
        keep_bos: never rank or ablate a leading BOS token (its embedding, and its position's heads,
            neurons and attention entries). The authors' protocol ablates it like any token; a model
            that uses the BOS as an attention sink (Gemma 3) loses the answer when its embedding
            alone is zeroed, so recovery then measures whether a method ranks the BOS first.
        batch_size: ablated copies per forward pass.

    The answer token is the target's correct token (for a pair, the first one); the position is
    ``attr.positions``.
    """
    require_eval(model, "faithfulness curves")
    if ablation not in ("zero", "mean", "resample"):
        raise ValueError(f"ablation must be 'zero', 'mean' or 'resample', got {ablation!r}")
    if ablation == "resample" and corrupted is None:
        raise ValueError("ablation='resample' takes the ablated values from the corrupted prompt: pass corrupted=")
    default = TOKEN_FRACTIONS if unit == "tokens" else COMPONENT_FRACTIONS
    fr = torch.tensor(list(fractions) if fractions is not None else default, dtype=torch.float64)
    if bool((fr <= 0).any() or (fr > 1).any()):
        raise ValueError("fractions must lie in (0, 1]")
    ids = attr.target.get("token_ids")
    if not ids or any(row[0] < 0 for row in ids):
        raise ValueError("faithfulness curves need a token target (the answer's probability is measured)")
    n_layers = model.cfg.n_layers
    tok, mask = prepare_tokens(model, prompt)
    if attr.token_ids is not None and not torch.equal(tok.cpu(), attr.token_ids.cpu()):
        raise ValueError("the prompt's tokens differ from the tokens the attribution was computed on")
    other_tok = None
    if corrupted is not None:
        other_tok, _ = prepare_tokens(model, corrupted)
        if other_tok.shape != tok.shape:
            raise ValueError("the corrupted prompt must have the same shape as the prompt")
    real_all = torch.ones_like(tok, dtype=torch.bool).cpu() if mask is None else mask.bool().cpu()
    kept = leading_bos(model, tok, real_all) if keep_bos else torch.zeros_like(real_all)
    kwargs = {} if mask is None else {"attention_mask": mask}
    names = sorted({_hook_name(k, l) for k in ("tokens", "heads", "neurons") for l in range(n_layers)})
    with torch.no_grad():
        logits, clean_cache = model.run_with_cache(tok, names_filter=lambda n: n in names, **kwargs)
        other_cache = None
        if other_tok is not None:
            _, other_cache = model.run_with_cache(other_tok, names_filter=lambda n: n in names, **kwargs)
    rows = []
    for b in range(tok.shape[0]):
        answer = int(attr.positions[b])
        y = int(ids[b][0])
        p_clean = float(logits[b, answer].float().softmax(-1)[y])
        units = _units(attr, b, unit, answer, real_all[b], kept[b])
        order = units.scores.abs().argsort(descending=True, stable=True) if absolute else units.scores.argsort(descending=True, stable=True)
        N = len(order)
        ks = [min(N, max(1, math.ceil(float(f) * N))) for f in fr]
        # each distinct ablation once; keeping every unit is the clean run
        jobs = sorted({("disrupt", k) for k in ks} | {("recover", k) for k in ks if k < N})
        groups = units.groups()
        replacements = {
            name: (None if kind == "attention" else _replacement(kind, ablation, clean_cache[name][b],
                                                                 None if other_cache is None else other_cache[name][b], real_all[b]))
            for kind, name, _ in groups
        }
        measured = {("recover", N): p_clean}
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            ablate = torch.zeros(len(chunk), N, dtype=torch.bool)
            for i, (mode, k) in enumerate(chunk):
                if mode == "disrupt":
                    ablate[i, order[:k]] = True
                else:
                    ablate[i] = True
                    ablate[i, order[:k]] = False
            probs = _ablated_probs(model, tok[b : b + 1], None if mask is None else mask[b : b + 1], units, groups,
                                   replacements, ablate, answer, y)
            measured.update(zip(chunk, probs.tolist()))
        rows.append((torch.tensor([measured[("disrupt", k)] for k in ks]) / p_clean,
                     torch.tensor([measured[("recover", k)] for k in ks]) / p_clean, N))
    return Curves(
        method=attr.method,
        unit=unit,
        ablation=ablation,
        fractions=fr,
        disruption=torch.stack([r[0] for r in rows]),
        recovery=torch.stack([r[1] for r in rows]),
        n_units=[r[2] for r in rows],
    )


def _ablated_probs(model, tok, mask, units: _Units, groups, replacements, ablate: Tensor, answer: int, y: int) -> Tensor:
    """p(y) at the answer position for each ablation pattern (one forward of ``len(ablate)`` copies)."""
    R = ablate.shape[0]
    fwd_hooks = []
    for kind, name, members in groups:
        sel = ablate[:, members]  # [R, m]
        if not bool(sel.any()):
            continue
        copies, which = torch.nonzero(sel, as_tuple=True)
        c = units.coords[members[which]]
        pos, idx, key = c[:, 1], c[:, 2], c[:, 3]
        repl = replacements[name]

        def hook(x, hook, kind=kind, copies=copies, pos=pos, idx=idx, key=key, repl=repl):
            x = x.clone()
            if kind == "tokens":
                x[copies, pos] = repl[pos].to(x)
            elif kind == "attention":
                x[copies, idx, pos, key] = 0.0  # (head, query, key)
            else:
                x[copies, pos, idx] = repl[pos, idx].to(x)
            return x

        fwd_hooks.append((name, hook))
    kwargs = {} if mask is None else {"attention_mask": mask.expand(R, -1)}
    logits = None
    if model not in _NO_SLICING:  # unembed the answer position only, where the model allows it
        sliced = fwd_hooks + [(hooks.FINAL_NORMALIZED, lambda x, hook: x[:, answer : answer + 1])]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # the bridge notes that the sliced final norm leaves HF's native path (same numbers)
                warnings.filterwarnings("ignore", message="A forward hook edited hook_scale/hook_normalized")
                logits = model.run_with_hooks(tok.expand(R, -1), fwd_hooks=sliced, **kwargs)[:, -1]
        except RuntimeError:  # e.g. GPT-2 on the bridge reshapes the final stream to the full length
            _NO_SLICING.add(model)
    if logits is None:
        with torch.no_grad():
            logits = model.run_with_hooks(tok.expand(R, -1), fwd_hooks=fwd_hooks, **kwargs)[:, answer]
    return logits.float().softmax(-1)[:, y].cpu()


_NO_SLICING: weakref.WeakSet[Any] = weakref.WeakSet()
