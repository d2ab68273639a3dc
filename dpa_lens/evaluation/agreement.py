"""How far two attributions agree (usually a method against exact activation patching)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dpa_lens.results import Attribution


def _ranks(x: Tensor) -> Tensor:
    """Ranks with ties averaged (as Spearman's ρ requires)."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    if len(values) < len(x):  # average the ranks of tied values
        sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
        counts = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
        ranks = (sums / counts)[inverse]
    return ranks


def correlation(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Pearson and Spearman correlation of two score vectors (entries NaN in either are dropped)."""
    x, y = x.flatten().double().cpu(), y.flatten().double().cpu()
    keep = ~(x.isnan() | y.isnan())
    x, y = x[keep], y[keep]
    pearson = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    spearman = float(torch.corrcoef(torch.stack([_ranks(x), _ranks(y)]))[0, 1])
    return pearson, spearman


def agreement(
    attr: Attribution,
    reference: Attribution,
    kind: Literal["tokens", "heads", "neurons"] = "heads",
    *,
    k: int = 10,
    sum_positions: bool = True,
) -> dict[str, float]:
    """Pearson r, Spearman ρ and top-k overlap of ``attr`` against ``reference``, averaged over rows.

    Top-k overlap is the share of the reference's k largest units (by absolute score) that are
    also among ``attr``'s k largest. Units the reference did not measure (NaN) are left out.
    """
    if attr.batch != reference.batch:
        raise ValueError(f"different numbers of rows: {attr.batch} vs {reference.batch}")
    results = {"pearson": 0.0, "spearman": 0.0, f"top{k}_overlap": 0.0}
    for row in range(attr.batch):
        x, y = attr.flat(kind, row, sum_positions)[0], reference.flat(kind, row, sum_positions)[0]
        if x.shape != y.shape:
            raise ValueError(f"the attributions score different units ({tuple(x.shape)} vs {tuple(y.shape)}); "
                             "compare heads summed over positions (sum_positions=True) with patching of whole heads")
        keep = ~(x.isnan() | y.isnan())
        x, y = x[keep], y[keep]
        pearson, spearman = correlation(x, y)
        kk = min(k, len(x))
        top_x = set(x.abs().argsort(descending=True)[:kk].tolist())
        top_y = set(y.abs().argsort(descending=True)[:kk].tolist())
        results["pearson"] += pearson / attr.batch
        results["spearman"] += spearman / attr.batch
        results[f"top{k}_overlap"] += len(top_x & top_y) / kk / attr.batch
    return results
