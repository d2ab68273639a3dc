"""Quadrature along integrated gradients' path: fixed rules, and an adaptive rule that bisects
where the gradient disagrees with the measured change of the target.

Both work on a ``path(rows, alphas) -> (f, shares)`` callable: the target ``f [m]`` and each token's
share ``∂f/∂x_t · (x_t − x'_t)`` ``[m, pos]`` at points ``α`` of the straight path of batch rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from dpa_lens.errors import InputError

Path = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

Quadrature = Literal["adaptive", "log", "trapezoid", "riemann_right", "gausslegendre"]
QUADRATURES: tuple[str, ...] = ("adaptive", "log", "trapezoid", "riemann_right", "gausslegendre")


def quadrature_rule(steps: int, rule: Quadrature = "log", alpha_min: float = 1e-2) -> tuple[Tensor, Tensor]:
    """Nodes α in (0, 1] and weights w with ``∫₀¹ g(α) dα ≈ Σ w·g(α)`` (float64), for the fixed rules.

    No fixed rule evaluates the gradient at α = 0: from a zero embedding, a pre-norm model's
    gradient there is of the order of 1/√eps per layer (it overflows float32 in SmolLM2), so the
    first interval [0, α₁] always takes the gradient at its right end.

    ``"log"``: a geometric grid from ``alpha_min`` to 1 with trapezoid weights (as many nodes on
        each decade of α as on [0.1, 1]).
    ``"trapezoid"``: uniform nodes k/steps.
    ``"riemann_right"``: uniform nodes k/steps, equal weights (the common "right Riemann sum").
    ``"gausslegendre"``: Gauss-Legendre nodes (captum's default).

    ``"adaptive"`` has no fixed nodes: see `integrated_gradients`.
    """
    if steps < 2:
        raise InputError(f"integrated gradients needs at least 2 steps, got {steps}")
    if rule == "riemann_right":
        alphas = torch.arange(1, steps + 1, dtype=torch.float64) / steps
        return alphas, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "gausslegendre":
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.tensor((x + 1) / 2), torch.tensor(w / 2)
    if rule == "log":
        alphas = torch.logspace(math.log10(alpha_min), 0, steps, dtype=torch.float64)
    elif rule == "trapezoid":
        alphas = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    else:
        raise InputError(f"unknown quadrature {rule!r}; choose one of {', '.join(QUADRATURES)}")
    return alphas, trapezoid_weights(alphas)


def trapezoid_weights(alphas: Tensor, first_finite: bool = False) -> Tensor:
    """Trapezoid weights on sorted nodes; without a node at 0, [0, α₁] takes its right end."""
    gaps = alphas[1:] - alphas[:-1]
    weights = torch.zeros_like(alphas)
    if float(alphas[0]) > 0:
        weights[0] = alphas[0]
    weights[:-1] += gaps / 2
    weights[1:] += gaps / 2
    if float(alphas[0]) == 0 and not first_finite:  # a non-finite gradient at 0: right end instead
        weights[1] += weights[0]
        weights[0] = 0
    return weights


def fixed_rule(path: Path, b: int, alphas: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, f(x') and f(x) per row with fixed nodes (the ends evaluated for the gap only)."""
    nodes = torch.cat([alphas, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    S = len(nodes)
    f, c = path(torch.arange(b).repeat_interleave(S), nodes.repeat(b))
    f, c = f.view(b, S), c.view(b, S, -1)
    w = torch.cat([weights, torch.zeros(2, dtype=torch.float64)])
    return (c[:, :-2] * w[:-2, None]).sum(1), f[:, -2], f[:, -1]


def adaptive_rule(path: Path, b: int, steps: int, alpha_min: float, batch_size: int, tol: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """Adaptive trapezoid rule: start from a geometric grid, then bisect the intervals whose
    trapezoid estimate of f's change disagrees most with the change measured by the forward
    (each interval's disagreement is its share of the completeness gap), in at least 8 rounds of
    at most ``batch_size`` midpoints (a steep feature needs nested bisections), until ``steps``
    gradients per row are spent or a row's gap is below ``tol``."""
    n0 = max(2, min(steps, steps // 4))
    init = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(math.log10(alpha_min), 0, n0, dtype=torch.float64)])
    f, c = path(torch.arange(b).repeat_interleave(len(init)), init.repeat(b))
    alphas = [init.clone() for _ in range(b)]
    fs = list(f.view(b, -1))
    cs = list(c.view(b, len(init), -1))
    budget = [steps - n0] * b
    per_round = max(1, min(batch_size, math.ceil(b * (steps - n0) / 8)))  # nested bisections need rounds

    def errors(r: int) -> Tensor:
        a, g = alphas[r], cs[r].sum(-1)
        h = a[1:] - a[:-1]
        left = torch.where(torch.isfinite(g[:-1]), g[:-1], g[1:])
        est = h * (left + g[1:]) / 2
        scale = max(float((fs[r][-1] - fs[r][0]).abs()), 1e-12)
        err = (est - (fs[r][1:] - fs[r][:-1])).abs() / scale
        return torch.where(h > 1e-12, err, torch.zeros_like(err))

    while True:
        cand = []
        for r in range(b):
            e = errors(r)
            if budget[r] > 0 and float(e.sum()) > tol:
                top = e.topk(min(budget[r], per_round, len(e)))
                cand += [(float(v), r, int(i)) for v, i in zip(top.values, top.indices)]
        if not cand:
            break
        cand.sort(reverse=True)
        cand = cand[:per_round]
        rows = torch.tensor([r for _, r, _ in cand])
        mids = torch.tensor([float(alphas[r][i] + alphas[r][i + 1]) / 2 for _, r, i in cand], dtype=torch.float64)
        f_new, c_new = path(rows, mids)
        for j, (_, r, _) in enumerate(cand):
            a = torch.cat([alphas[r], mids[j : j + 1]])
            order = a.argsort()
            alphas[r] = a[order]
            fs[r] = torch.cat([fs[r], f_new[j : j + 1]])[order]
            cs[r] = torch.cat([cs[r], c_new[j : j + 1]])[order]
            budget[r] -= 1
    scores = []
    for r in range(b):
        finite0 = bool(torch.isfinite(cs[r][0]).all())
        w = trapezoid_weights(alphas[r], first_finite=finite0)
        c = torch.where(torch.isfinite(cs[r]), cs[r], torch.zeros_like(cs[r]))
        scores.append((c * w[:, None]).sum(0))
    return torch.stack(scores), torch.stack([x[0] for x in fs]), torch.stack([x[-1] for x in fs])


