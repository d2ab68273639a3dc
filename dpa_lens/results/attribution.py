"""`Attribution`: the result of every node method (scores of tokens, heads and neurons).

Score tensors are shaped like what they explain (``None`` where a method does not score that kind):

* ``tokens``  ``[batch, pos]``: each input position (its embedding, plus its positional embedding
  where the model has learned positions);
* ``heads``   ``[batch, layer, pos, head]``: each attention head's output at each query position;
* ``neurons`` ``[batch, layer, pos, d_mlp]``: each MLP neuron at each position;
* ``head_totals`` ``[batch, layer, head]`` and ``neuron_totals`` ``[batch, layer, d_mlp]``: a unit's
  score over all positions at once, for methods that measure whole units (patching a head at every
  position); `totals` gives them for every method (the sum over positions otherwise);
* ``head_keys`` ``[batch, layer, head, query, key]``: head scores split by key position (on request);
* ``bias``    ``[batch]``: what the model's biases contribute (the part no token, head or neuron owns);
* ``flow``    ``[batch, layer + 1, pos]``: DPA's information flow, the residual stream entering each
  layer (and, last, leaving the model) dotted with its effective target (on request).

A score is in the units of the explained quantity (a logit, or a logit difference): positive
scores push it up. ``target_value`` holds the quantity itself, as the model computed it;
``target`` says what it is (``labels``, ``token_ids``, and ``logit``: raw, centered, difference or
direction). ``mask [batch, pos]`` marks real tokens (False at padding). Per-row numbers a method
reports besides its scores are in ``diagnostics``; its options in ``settings``.

The shapes are checked when an `Attribution` is made: a method that breaks them fails at once. Rows,
slicing, ``concat``, ``to`` and ``save``/``load`` are those of every result (`dpa_lens.results.rows`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.graph import unit_name
from dpa_lens.results.paths import Path
from dpa_lens.results.rows import UNALIGNED, Diagnostics, Rows, RunningMean, figure, pad
from dpa_lens.types import typechecked

Kind = Literal["tokens", "heads", "neurons"]
KINDS: tuple[Kind, ...] = ("tokens", "heads", "neurons")
_TOTALS = {"heads": "head_totals", "neurons": "neuron_totals"}


@typechecked
@dataclass
class Attribution(Rows):
    """Scores of one method for a batch of prompts, with everything needed to read them."""

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "tokens": ("batch", "pos"), "heads": ("batch", "layer", "pos", "head"), "neurons": ("batch", "layer", "pos", "d_mlp"),
        "head_totals": ("batch", "layer", "head"), "neuron_totals": ("batch", "layer", "d_mlp"),
        "head_keys": ("batch", "layer", "head", "pos", "pos"), "bias": ("batch",), "flow": ("batch", "layer_plus_one", "pos"),
        "target_value": ("batch",), "positions": ("batch",), "token_ids": ("batch", "pos"), "mask": ("batch", "pos"),
    }
    ROW_DICTS: ClassVar[tuple[str, ...]] = ("effective_targets",)
    FILLS: ClassVar[dict[str, Any]] = {"mask": True}  # a row without a mask has no padding
    EXTRAS: ClassVar[tuple[str, ...]] = ("head_keys", "flow", "effective_targets")
    FORMAT: ClassVar[tuple[str, int]] = ("dpa_lens_attribution", 2)
    READS: ClassVar[tuple[int, ...]] = (1,)
    ALIGN_BY: ClassVar[tuple[str, ...]] = ("mask", "positions")  # the same real tokens and answer position
    PER_POSITION_OPTION: ClassVar[bool] = True

    method: str
    tokens: Float[Tensor, "batch pos"] | None = None
    heads: Float[Tensor, "batch layer pos head"] | None = None
    neurons: Float[Tensor, "batch layer pos d_mlp"] | None = None
    head_totals: Float[Tensor, "batch layer head"] | None = None
    neuron_totals: Float[Tensor, "batch layer d_mlp"] | None = None
    head_keys: Float[Tensor, "batch layer head pos pos"] | None = None
    bias: Float[Tensor, " batch"] | None = None
    effective_targets: dict[str, Float[Tensor, "batch pos d_model"]] | None = None
    flow: Float[Tensor, "batch layer_plus_one pos"] | None = None
    target_value: Float[Tensor, " batch"] | None = None
    positions: Int[Tensor, " batch"] | None = None
    token_ids: Int[Tensor, "batch pos"] | None = None
    str_tokens: list[list[str]] | None = None
    mask: Bool[Tensor, "batch pos"] | None = None
    paths: list[list[Path]] | None = None  # per row, strongest first: named paths (DPA, Unpack)
    target: dict[str, Any] = field(default_factory=dict)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    settings: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""

    def __post_init__(self) -> None:
        self.check_shapes()

    # ------------------------------------------------------------------ basics
    def has(self, kind: Kind) -> bool:
        """Whether this attribution scores ``kind``, per position or as whole units."""
        return getattr(self, kind) is not None or (kind in _TOTALS and getattr(self, _TOTALS[kind]) is not None)

    def scores(self, kind: Kind) -> Tensor:
        """The score tensor of a kind; a clear error when this method does not score it."""
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        t = getattr(self, kind)
        if t is None:
            whole = kind != "tokens" and getattr(self, _TOTALS[kind]) is not None
            hint = f" per position (it scores whole {kind}: use .totals({kind!r}))" if whole else " here"
            raise InputError(f"{self.method} computed no {kind} scores{hint}")
        return t

    def totals(self, kind: Kind) -> Tensor:
        """Each unit's score over all positions: tokens ``[batch, pos]`` as they are, heads
        ``[batch, layer, head]`` and neurons ``[batch, layer, d_mlp]`` (the whole-unit scores where the
        method measured them, else the sum over positions; NaN where a layer was not measured)."""
        if kind == "tokens":
            return self.scores("tokens")
        whole = getattr(self, _TOTALS[kind]) if kind in _TOTALS else None
        return whole if whole is not None else self.scores(kind).sum(dim=2)

    def sum_over_positions(self, kind: Literal["heads", "neurons"]) -> Tensor:
        """Head scores ``[batch, layer, head]`` or neuron scores ``[batch, layer, d_mlp]`` over all positions (see `totals`)."""
        return self.totals(kind)

    def total(self, kind: Kind) -> Float[Tensor, " batch"]:
        """Sum of all scores of a kind per row (content-only DPA: tokens + bias = target_value)."""
        t = self.totals(kind)
        return t.reshape(t.shape[0], -1).sum(-1)

    def flat(self, kind: Kind, row: int = 0, sum_positions: bool = True) -> tuple[Float[Tensor, " unit"], list[str]]:
        """One row's scores of a kind as a vector, with unit labels (``"3:' Mary'"``, ``"L5H1"``,
        ``"L5H1@7"``, ``"L9N200"``); heads and neurons summed over positions by default."""
        row = self.row_index(row)
        if kind == "tokens":
            t = self.scores("tokens")[row].detach().float().cpu()
            strs = self.str_tokens[row] if self.str_tokens else [str(i) for i in range(len(t))]
            return t, [f"{i}:{s!r}" for i, s in enumerate(strs)]
        if sum_positions:
            t = self.totals(kind)[row].detach().float().cpu()
            L, U = t.shape
            return t.flatten(), [unit_name(kind, l, u) for l in range(L) for u in range(U)]
        t = self.scores(kind)[row].detach().float().cpu()
        L, P, U = t.shape
        return t.flatten(), [unit_name(kind, l, u, p) for l in range(L) for p in range(P) for u in range(U)]

    # ------------------------------------------------------------------ several attributions
    def _padded_from(self, parts: Sequence[Attribution], n: int) -> Attribution:
        if all(a.mask is None for a in parts) and any(a.seq_len != n for a in parts):  # padding needs a mask
            mask = torch.cat([pad(torch.ones(a.batch, a.seq_len, dtype=torch.bool), (1,), n, False) for a in parts])
            return replace(self, mask=mask)
        return self

    def mean(self, per_position: bool | None = None) -> Attribution:
        """The mean over rows, as an attribution of one row.

        Unit totals (`totals`), ``bias`` and ``target_value`` are averaged. Per-position scores (tokens,
        heads and neurons by position, head keys, flow) are averaged too when the rows align: the same
        real positions and answer position in every row, as prompts of one template have (``str_tokens``
        then read ``"a|b"`` where the rows' tokens differ). Rows that do not align keep only unit totals
        (``heads`` and ``neurons`` become ``head_totals`` and ``neuron_totals``), with a warning naming
        what was dropped. ``per_position=False`` asks for the unit totals only (no warning);
        ``per_position=True`` refuses rows that do not align. `RunningMean` gives the same over parts."""
        return self._mean_of(RunningMean(per_position).add(self), stacklevel=3)

    def _mean_of(self, acc: RunningMean, stacklevel: int) -> Attribution:
        out: dict[str, Any] = {name: acc.field_mean(name) for name in ("bias", "target_value")}
        kept = acc.aligned() if acc.per_position is not False else None
        if acc.per_position and kept is None:
            raise InputError(UNALIGNED)
        by_position = ("tokens", "heads", "neurons", "head_keys", "flow")
        if kept is not None:
            out.update({name: acc.field_mean(name) for name in (*by_position, "head_totals", "neuron_totals")})
            out.update(positions=kept["positions"], token_ids=kept["token_ids"], str_tokens=kept["str_tokens"], mask=kept["real"],
                       effective_targets=acc.dict_mean("effective_targets"))
        else:
            has = {kind: acc.holds(kind) or acc.holds(_TOTALS[kind]) for kind in _TOTALS}
            if not any(has.values()):
                raise InputError(f"{self.method} scores only tokens, and these rows are prompts of other lengths: their token scores "
                                 "cannot be averaged position by position (average prompts of one template, or compare them side by side)")
            dropped = [name for name in (*by_position, "effective_targets") if acc.holds(name)]
            if dropped and acc.per_position is None:
                warnings.warn(f"Attribution.mean: the rows' prompts have their tokens or answers at other positions, so only unit "
                              f"totals are averaged; dropped the per-position {', '.join(dropped)}", UserWarning, stacklevel=stacklevel)
            out.update(dict.fromkeys((*by_position, "positions", "token_ids", "mask", "str_tokens", "effective_targets")))
            for kind, whole in _TOTALS.items():  # a unit's whole score where measured, else its positions summed
                out[whole] = None if not has[kind] else acc.field_mean(whole) if acc.holds(whole) else acc.field_mean(kind, over_positions=True)
        return replace(self, **out, **acc.shared())

    # ------------------------------------------------------------------ reading
    def to_dataframe(self, kind: Kind | None = None) -> pd.DataFrame:
        """Long format: one row per (batch row, unit) with columns
        ``row, kind, layer, pos, head, neuron, token, score`` (units a kind lacks are -1)."""
        kinds = [kind] if kind is not None else [k for k in KINDS if getattr(self, k) is not None]
        frames = []
        for k in kinds:
            t = self.scores(k).detach().float().cpu()
            if k == "tokens":
                b, p = torch.meshgrid(torch.arange(t.shape[0]), torch.arange(t.shape[1]), indexing="ij")
                df = pd.DataFrame({"row": b.flatten().numpy(), "layer": -1, "pos": p.flatten().numpy(), "head": -1, "neuron": -1})
            else:
                idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in t.shape], indexing="ij"), -1)
                idx = idx.reshape(-1, 4).numpy()
                df = pd.DataFrame({"row": idx[:, 0], "layer": idx[:, 1], "pos": idx[:, 2]})
                df["head"] = idx[:, 3] if k == "heads" else -1
                df["neuron"] = idx[:, 3] if k == "neurons" else -1
            df.insert(1, "kind", k)
            df["token"] = [self.str_tokens[r][p] for r, p in zip(df["row"], df["pos"])] if self.str_tokens else ""
            df["score"] = t.flatten().numpy()
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def top(
        self,
        k: int = 10,
        kind: Kind = "heads",
        *,
        row: int = 0,
        sum_positions: bool = False,
        absolute: bool = True,
    ) -> pd.DataFrame:
        """The k strongest units of a kind for one batch row, as a table (columns ``unit``, ``layer``,
        ``head``/``neuron``, ``pos``, ``token``, ``score``).

        Args:
            sum_positions: rank heads/neurons by their score over all positions (`totals`).
            absolute: rank by |score| (default: the largest effect either way, as `Circuit.top`);
                ``False`` ranks by signed score, highest first. The sign stays in ``score``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        row = self.row_index(row)
        if kind != "tokens" and (sum_positions or getattr(self, kind) is None):
            t = self.totals(kind)[row].detach().float().cpu()  # [layer, unit]
            L, U = t.shape
            unit = "head" if kind == "heads" else "neuron"
            df = pd.DataFrame(
                {
                    "layer": torch.arange(L).repeat_interleave(U).numpy(),
                    unit: torch.arange(U).repeat(L).numpy(),
                    "score": t.flatten().numpy(),
                }
            )
            df.insert(0, "unit", [unit_name(kind, l, u) for l, u in zip(df["layer"], df[unit])])
        else:
            df = self[row].to_dataframe(kind).drop(columns=["row", "kind"])
            if kind == "tokens":
                df = df.drop(columns=["layer", "head", "neuron"])
                df.insert(0, "unit", [f"{p}:{tok!r}" for p, tok in zip(df["pos"], df["token"])])
            else:
                df = df.drop(columns=["neuron" if kind == "heads" else "head"])
                col = "head" if kind == "heads" else "neuron"
                df.insert(0, "unit", [unit_name(kind, l, u, p) for l, u, p in zip(df["layer"], df[col], df["pos"])])
        df = df[df["score"].notna()]
        key = df["score"].abs() if absolute else df["score"]
        return df.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def show(self, kind: Literal["heads", "tokens", "neurons", "flow"] = "heads", **kwargs: Any) -> Any:
        """A plotly figure of one kind of score (``plot.heads``, ``plot.tokens``, ``plot.neurons_top``,
        ``plot.flow``); it displays itself in a notebook."""
        return figure(self, kind, **kwargs)

    def __repr__(self) -> str:
        parts = [f"method={self.method!r}"]
        for name in ("tokens", "heads", "neurons", "head_totals", "neuron_totals", "head_keys"):
            t = getattr(self, name)
            if t is not None:
                parts.append(f"{name}={list(t.shape)}")
        labels = self.target.get("labels")
        if labels:
            kind = (self.target.get("logit") or [""])[0]
            what = {"raw": "raw logit", "centered": "centred logit", "difference": "logit difference"}.get(kind, kind)
            value = f" = {float(self.target_value[0]):.4g}" if self.target_value is not None and self.target_value.numel() else ""
            parts.append(f"target={labels[0]}" + (f" ({what}){value}" if what else value)
                         + (f" (+{len(labels) - 1} rows)" if len(labels) > 1 else ""))
        if self.settings:
            parts.append("settings={" + ", ".join(f"{k}={v}" for k, v in self.settings.items()) + "}")
        return "Attribution(" + ", ".join(parts) + ")"
