"""`Attribution`: the one result type every dpa_lens method returns.

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

The shapes are checked when an `Attribution` is made: a method that breaks them fails at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path as FilePath
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dpa_lens.circuits.paths import Path, path_from_state, path_state
from dpa_lens.errors import InputError
from dpa_lens.types import typechecked

Kind = Literal["tokens", "heads", "neurons"]
KINDS: tuple[Kind, ...] = ("tokens", "heads", "neurons")
UNIT_LETTER = {"heads": "H", "neurons": "N"}


@dataclass
class Diagnostics:
    """Per-row numbers a method reports besides its scores (``None`` where it has none)."""

    clean_value: Float[Tensor, " batch"] | None = None  # f(clean): AtP, patching
    corrupted_value: Float[Tensor, " batch"] | None = None  # f(corrupted): AtP, patching
    completeness_gap: Float[Tensor, " batch"] | None = None  # IG: (Σ tokens − (f(x) − f(x'))) / |f(x) − f(x')|
    remainder: Float[Tensor, " batch *layer"] | None = None  # decompositions: what no unit owns ([batch], or per layer)
    mlp_flow: Float[Tensor, " batch layer"] | None = None  # Unpack: credit through each layer's MLP, positions summed
    suppress_ratio: Float[Tensor, " batch"] | None = None  # Unpack: negative over total token mass
    paths_found: Int[Tensor, " batch"] | None = None  # paths a search found before keeping the top ones
    corrupted_str_tokens: list[list[str]] | None = None

    def rows(self, sel: slice) -> Diagnostics:
        return Diagnostics(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[sel] for f in fields(self)})

    def to(self, device: str | torch.device) -> Diagnostics:
        return Diagnostics(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def concat(parts: Sequence[Diagnostics]) -> Diagnostics:
        out = {}
        for f in fields(Diagnostics):
            values = [getattr(p, f.name) for p in parts]
            if any(v is None for v in values):
                out[f.name] = None
            elif isinstance(values[0], Tensor):
                out[f.name] = torch.cat([v.to(values[0].device) for v in values])
            else:
                out[f.name] = [row for v in values for row in v]
        return Diagnostics(**out)


def _move(value: Any, device: str | torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


# every field with a batch dimension, and the axes that index positions (padded by `concat`)
_POSITION_AXES: dict[str, tuple[int, ...]] = {
    "tokens": (1,), "heads": (2,), "neurons": (2,), "head_keys": (3, 4), "flow": (2,), "token_ids": (1,), "mask": (1,),
}
_ROW_TENSORS = ("tokens", "heads", "neurons", "head_totals", "neuron_totals", "head_keys", "bias", "flow", "target_value",
                "positions", "token_ids", "mask")


@typechecked
@dataclass
class Attribution:
    """Scores of one method for a batch of prompts, with everything needed to read them."""

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
        _check_shapes(self)

    # ------------------------------------------------------------------ basics
    @property
    def batch(self) -> int:
        for name in _ROW_TENSORS:
            t = getattr(self, name)
            if t is not None:
                return t.shape[0]
        return len(self.str_tokens) if self.str_tokens is not None else 0

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
        letter = UNIT_LETTER[kind]
        if sum_positions:
            t = self.totals(kind)[row].detach().float().cpu()
            L, U = t.shape
            return t.flatten(), [f"L{l}{letter}{u}" for l in range(L) for u in range(U)]
        t = self.scores(kind)[row].detach().float().cpu()
        L, P, U = t.shape
        return t.flatten(), [f"L{l}{letter}{u}@{p}" for l in range(L) for p in range(P) for u in range(U)]

    def row_index(self, row: int) -> int:
        """``row`` as a non-negative index, or `InputError` when this attribution has no such row."""
        if isinstance(row, bool) or not isinstance(row, int):
            raise InputError(f"row must be an int, got {row!r}")
        if not -self.batch <= row < self.batch:
            raise InputError(f"row {row} is out of range: this attribution has {self.batch} row{'s' if self.batch != 1 else ''}")
        return row % self.batch

    def __getitem__(self, rows: int | slice) -> Attribution:
        """The attribution of some batch rows (``attr[0]`` keeps a batch dimension of one)."""
        if isinstance(rows, slice):
            sel = rows
        else:
            r = self.row_index(rows)
            sel = slice(r, r + 1)

        def cut(value: Any) -> Any:
            if isinstance(value, Tensor) and value.ndim >= 1:
                return value[sel]
            if isinstance(value, dict):
                return {k: v[sel] for k, v in value.items()}
            if isinstance(value, list):
                return value[sel]
            return value

        out = {name: cut(getattr(self, name)) for name in _ROW_TENSORS + ("str_tokens", "effective_targets", "paths")}
        target = {k: (v[sel] if isinstance(v, list) and len(v) == self.batch else v) for k, v in self.target.items()}
        return replace(self, **out, target=target, diagnostics=self.diagnostics.rows(sel))

    # ------------------------------------------------------------------ several attributions
    @staticmethod
    def concat(attrs: Sequence[Attribution]) -> Attribution:
        """One attribution of all rows of ``attrs`` (same method). Rows of different lengths are
        padded on the right: scores 0, ``mask`` False, ``token_ids`` -1, ``str_tokens`` ""."""
        attrs = list(attrs)
        if not attrs:
            raise InputError("concat needs at least one Attribution")
        methods = {a.method for a in attrs}
        if len(methods) > 1:
            raise InputError(f"can only concatenate attributions of one method, got {sorted(methods)}")
        n = max((a.seq_len for a in attrs), default=0)
        out: dict[str, Any] = {}
        for name in _ROW_TENSORS:
            values = [getattr(a, name) for a in attrs]
            if any(v is None for v in values):
                out[name] = None
                continue
            fill = {"token_ids": -1, "mask": False}.get(name, 0)
            out[name] = torch.cat([_pad(v, _POSITION_AXES.get(name, ()), n, fill).to(values[0].device) for v in values])
        if all(a.mask is None for a in attrs) and any(a.seq_len != n for a in attrs):  # padding needs a mask
            out["mask"] = torch.cat([_pad(torch.ones(a.batch, a.seq_len, dtype=torch.bool), (1,), n, False) for a in attrs])
        paths = [a.paths for a in attrs]
        out["paths"] = None if any(p is None for p in paths) else [row for p in paths for row in p]
        strs = [a.str_tokens for a in attrs]
        out["str_tokens"] = None if any(s is None for s in strs) else [row + [""] * (n - len(row)) for s in strs for row in s]
        targets = [a.effective_targets for a in attrs]
        out["effective_targets"] = None if any(t is None for t in targets) else {
            k: torch.cat([_pad(t[k], (1,), n, 0) for t in targets]) for k in targets[0]}
        target: dict[str, Any] = {}
        for k in attrs[0].target:
            values = [a.target.get(k) for a in attrs]
            target[k] = [x for v in values for x in v] if all(isinstance(v, list) for v in values) else values[0]
        return replace(attrs[0], **out, target=target, diagnostics=Diagnostics.concat([a.diagnostics for a in attrs]))

    def mean(self) -> Attribution:
        """The mean over rows, as an attribution of one row.

        Unit totals (`totals`), ``bias`` and ``target_value`` are averaged. Per-position scores are
        averaged only when every row has the same tokens: positions of different prompts do not
        correspond, so otherwise only the totals are kept (``heads`` and ``neurons`` become
        ``head_totals`` and ``neuron_totals``)."""
        same = self.token_ids is None or bool((self.token_ids == self.token_ids[:1]).all())
        avg = lambda t: None if t is None else t.float().mean(0, keepdim=True)  # noqa: E731
        out: dict[str, Any] = {name: avg(getattr(self, name)) for name in ("bias", "target_value")}
        if same:
            for name in ("tokens", "heads", "neurons", "head_keys", "flow", "head_totals", "neuron_totals"):
                out[name] = avg(getattr(self, name))
            for name in ("positions", "token_ids", "mask"):
                value = getattr(self, name)
                out[name] = None if value is None else value[:1]
            out["str_tokens"] = self.str_tokens[:1] if self.str_tokens else None
            out["effective_targets"] = None if self.effective_targets is None else {k: avg(v) for k, v in self.effective_targets.items()}
        else:
            for name in ("tokens", "heads", "neurons", "head_keys", "flow", "positions", "token_ids", "mask", "str_tokens", "effective_targets"):
                out[name] = None
            out["head_totals"] = None if self.heads is None and self.head_totals is None else avg(self.totals("heads"))
            out["neuron_totals"] = None if self.neurons is None and self.neuron_totals is None else avg(self.totals("neurons"))
        out["paths"] = None
        if not same and out["head_totals"] is None and out["neuron_totals"] is None:
            raise InputError(f"{self.method} scores only tokens, and these rows are different prompts: their token scores "
                             "cannot be averaged position by position (average rows of one prompt, or compare them side by side)")
        labels = self.target.get("labels") or []
        target = {"labels": [labels[0] if len(set(labels)) == 1 else f"mean of {self.batch} rows"]} if labels else {}
        settings = {**self.settings, "mean_of_rows": self.batch}
        return replace(self, **out, target=target, diagnostics=Diagnostics(), settings=settings)

    @property
    def seq_len(self) -> int:
        for name in ("tokens", "token_ids", "mask"):
            t = getattr(self, name)
            if t is not None:
                return t.shape[1]
        for name in ("heads", "neurons", "flow"):
            t = getattr(self, name)
            if t is not None:
                return t.shape[2]
        return 0

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
        absolute: bool = False,
    ) -> pd.DataFrame:
        """The k highest-scoring units of a kind for one batch row, as a table.

        Args:
            sum_positions: rank heads/neurons by their score over all positions (`totals`).
            absolute: rank by absolute value (largest effect either way); the sign stays in ``score``.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
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
            df.insert(0, "unit", [f"L{l}{UNIT_LETTER[kind]}{u}" for l, u in zip(df["layer"], df[unit])])
        else:
            df = self[row].to_dataframe(kind).drop(columns=["row", "kind"])
            if kind == "tokens":
                df = df.drop(columns=["layer", "head", "neuron"])
                df.insert(0, "unit", [f"{p}:{tok!r}" for p, tok in zip(df["pos"], df["token"])])
            else:
                df = df.drop(columns=["neuron" if kind == "heads" else "head"])
                col = "head" if kind == "heads" else "neuron"
                df.insert(0, "unit", [f"L{l}{UNIT_LETTER[kind]}{u}@{p}" for l, u, p in zip(df["layer"], df[col], df["pos"])])
        df = df[df["score"].notna()]
        key = df["score"].abs() if absolute else df["score"]
        return df.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def show(self, kind: Literal["heads", "tokens", "neurons", "flow"] = "heads", **kwargs: Any) -> Any:
        """A plotly figure of one kind of score (see `dpa_lens.plot`); it displays itself in a notebook."""
        from dpa_lens import plot

        figures = {"heads": plot.heads, "tokens": plot.tokens, "neurons": plot.neurons_top, "flow": plot.flow}
        if kind not in figures:
            raise InputError(f"kind must be one of {sorted(figures)}, got {kind!r}")
        return figures[kind](self, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | FilePath) -> FilePath:
        """Save to a file (``torch.save`` of plain tensors and metadata; `load` reads it back).
        ``~`` is expanded; the folder must exist. Returns the path written."""
        path = FilePath(path).expanduser()
        if not path.parent.is_dir():
            raise InputError(f"cannot save to {path}: the folder {path.parent} does not exist")
        state = {f.name: _move(getattr(self, f.name), "cpu") for f in fields(self)}
        state = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in state.items()}
        state["diagnostics"] = self.diagnostics.to("cpu").as_dict()
        state["paths"] = None if self.paths is None else [[path_state(p) for p in row] for row in self.paths]
        torch.save({"dpa_lens_attribution": 2, **state}, path)
        return path

    @classmethod
    def load(cls, path: str | FilePath) -> Attribution:
        """An `Attribution` saved by `save`."""
        path = FilePath(path).expanduser()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise InputError(f"{path} is not a saved dpa_lens Attribution ({type(err).__name__})") from None
        version = state.pop("dpa_lens_attribution", None) if isinstance(state, dict) else None
        if version not in (1, 2):
            raise InputError(f"{path} is not a saved dpa_lens Attribution")
        known = {f.name for f in fields(cls)}
        state["diagnostics"] = Diagnostics(**state.get("diagnostics", {}))
        if state.get("paths") is not None:
            state["paths"] = [[path_from_state(p) for p in row] for row in state["paths"]]
        return cls(**{k: v for k, v in state.items() if k in known})

    def to(self, device: str | torch.device) -> Attribution:
        """The same attribution with every tensor on ``device``."""
        moved = {f.name: _move(getattr(self, f.name), device) for f in fields(self) if f.name not in ("target", "settings", "diagnostics")}
        return replace(self, **moved, diagnostics=self.diagnostics.to(device))

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


_TOTALS = {"heads": "head_totals", "neurons": "neuron_totals"}


def _pad(t: Tensor, axes: tuple[int, ...], n: int, fill: Any) -> Tensor:
    for axis in axes:
        missing = n - t.shape[axis]
        if missing > 0:
            shape = list(t.shape)
            shape[axis] = missing
            t = torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=axis)
    return t


def _check_shapes(a: Attribution) -> None:
    """Every tensor agrees on batch, layer, position and unit sizes with the others."""
    dims: dict[str, int] = {}
    layout = {
        "tokens": ("batch", "pos"), "heads": ("batch", "layer", "pos", "head"), "neurons": ("batch", "layer", "pos", "d_mlp"),
        "head_totals": ("batch", "layer", "head"), "neuron_totals": ("batch", "layer", "d_mlp"),
        "head_keys": ("batch", "layer", "head", "pos", "pos"), "bias": ("batch",), "flow": ("batch", "layer_plus_one", "pos"),
        "target_value": ("batch",), "positions": ("batch",), "token_ids": ("batch", "pos"), "mask": ("batch", "pos"),
    }
    for name, axes in layout.items():
        t = getattr(a, name)
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.ndim != len(axes):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"Attribution.{name} must be [{', '.join(axes)}], got {got}")
        for axis, size in zip(axes, t.shape):
            if axis == "layer_plus_one":
                axis, size = "layer", size - 1
            if dims.setdefault(axis, size) != size:
                raise ValueError(f"Attribution.{name} has {axis} = {size}, other fields have {dims[axis]} ({tuple(t.shape)})")
    if a.str_tokens is not None:
        if "batch" in dims and len(a.str_tokens) != dims["batch"]:
            raise ValueError(f"Attribution.str_tokens has {len(a.str_tokens)} rows, the scores {dims['batch']}")
        if "pos" in dims and any(len(r) != dims["pos"] for r in a.str_tokens):
            raise ValueError(f"Attribution.str_tokens rows must have {dims['pos']} tokens")
