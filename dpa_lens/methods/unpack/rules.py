"""Unpack's rules: the presets, branch weights, the safe denominator, and the marginal norm.

There are two rule sets: ``"flow"``, the rules of the unpruned sweep that gives token credit (no bias
row in any denominator; with ``quirks``, a K-only head passes on 0.3 of its credit), and ``"paths"``,
the rules of the pruned recursion that finds paths (with ``quirks``, bias rows and the value bias
stay in the denominators, as the reference's recursion keeps them; a K-only head passes on 0.333).
With ``quirks=False`` the two coincide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.models import hooks
from dpa_lens.ops import rotate_half

DT = torch.float64
SAFE_EPS = 1e-10  # below this Σ|v| a split is undefined (its credit is lost), as in the reference
RULE_SETS = ("flow", "paths")


@dataclass(frozen=True)
class Preset:
    """One of Unpack's configurations (its ``config.py::PRESETS``).

    Attributes:
        branches: ``"kqv"`` (a head passes credit through its keys, queries and values) or ``"k"``.
        aligned: deeper heads split credit over source positions by how each position's value
            aligns with the head layer's output, and deeper MLPs by the output-aligned rule.
        mlp_rule: the deeper MLP rule when not aligned: ``"weighted"`` (activation-weighted) or ``"l2"``.
        beta: the safe denominator's floor, ``|den| >= beta·Σ|v|``.
    """

    branches: Literal["kqv", "k"]
    aligned: bool
    mlp_rule: Literal["weighted", "l2"]
    beta: float = 0.8


PRESETS: dict[str, Preset] = {
    "kqv_aligned": Preset("kqv", True, "weighted"),  # Unpack's default
    "k_only_weighted": Preset("k", False, "weighted"),
    "k_only_l2": Preset("k", False, "l2"),
    "k_only_aligned": Preset("k", True, "weighted"),
    "kqv_weighted": Preset("kqv", False, "weighted"),
    "kqv_l2": Preset("kqv", False, "l2"),
}


def branch_weights(preset: Preset, *, quirks: bool, rule_set: str) -> dict[str, float]:
    """The share of a head's credit each branch passes on (a branch not listed is not taken)."""
    if preset.branches == "kqv":
        w = 0.333 if quirks else 1 / 3
        return {"k": w, "q": w, "v": w}
    if quirks:  # the reference passes no weights: its recursion's default 0.333, its flow sweep's 0.3
        return {"k": 0.3 if rule_set == "flow" else 0.333}
    return {"k": 1.0}


def safe_split(values: Tensor, keep: Tensor | bool, beta: float, dim: int) -> tuple[Tensor, Tensor]:
    """``values / den`` along ``dim``, ``den = sign(Σv)·max(|Σv|, β·Σ|v|)`` over the kept entries
    (sign + when Σv = 0); zero where ``Σ|v| < 1e-10`` (the split is undefined). Also returns where it
    is defined (``dim`` reduced)."""
    kept = values * keep
    total, mass = kept.sum(dim, keepdim=True), kept.abs().sum(dim, keepdim=True)
    size = torch.maximum(total.abs(), beta * mass)
    den = torch.where(total >= 0, size, -size)
    valid = mass >= SAFE_EPS
    return torch.where(valid, values / torch.where(valid, den, torch.ones_like(den)), 0.0), valid.squeeze(dim)


def normalized(layer: int, norm: str) -> str:
    """``blocks.L.{norm}.hook_normalized``: a norm's input over its scale (before the gain)."""
    return hooks.block(layer, f"{norm}.hook_normalized")


def marginal(c: Float[Tensor, "*comp pos d"], scale: Float[Tensor, "pos 1"], gain: Tensor | None, centre: bool) -> Tensor:
    """A norm read marginally: each part centred (LayerNorm), over the real stream's frozen scale, times
    the gain. Σ over the parts of the stream, plus the norm's bias, is the norm's output."""
    if centre:
        c = c - c.mean(-1, keepdim=True)
    c = c / scale
    return c * gain.to(c) if gain is not None else c


def rotate_at(x: Tensor, cos: Tensor, sin: Tensor, adjacent: bool, transpose: bool = False) -> Tensor:
    """Rotary embedding of ``x [..., d_head]`` by ``cos``/``sin`` ``[..., rotary_dim]`` (broadcast
    against x), or its transpose ``x·cos − P(x·sin)``; dimensions past the rotary ones pass."""
    r = cos.shape[-1]
    head, tail = x[..., :r], x[..., r:]
    turned = head * cos - rotate_half(head * sin, adjacent) if transpose else head * cos + rotate_half(head, adjacent) * sin
    return torch.cat([turned, tail.expand(*turned.shape[:-1], -1)], dim=-1)
