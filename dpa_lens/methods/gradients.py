"""Gradient baselines: gradient (saliency), input × gradient, and integrated gradients.

All three run the model themselves (they need autograd), from a string, a list of strings or
token ids, and return the same `Attribution` as DPA.

* ``gradient``: the size of the target's gradient at each unit, ``‖∂f/∂a‖`` (L2 over the unit's
  activation vector; ``|∂f/∂a|`` for a neuron). Unsigned: how sensitive f is to the unit.
* ``input_x_gradient``: ``a · ∂f/∂a``, signed: the first-order share of f carried by the unit
  (for heads, ``z · ∂f/∂z``, which is the authors' "AtP without a corrupted run").
* ``integrated_gradients``: ``(x − x') · ∫₀¹ ∂f/∂x(x' + α(x − x')) dα`` over the token embeddings,
  with a zero baseline ``x'`` by default (the authors' protocol). Complete up to quadrature error:
  tokens sum to ``f(x) − f(x')``, which ``bias`` holds as ``f(x')`` and ``settings`` reports as a gap.

Units: tokens are the embeddings fed to the first block, heads the per-head outputs
``blocks.L.attn.hook_z`` (per query position), neurons ``blocks.L.mlp.hook_post``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpa_lens.attribution import Attribution
from dpa_lens.inputs import inputs_from_tokens, prepare_tokens, resolve_positions
from dpa_lens.methods._grad import forward_with_grads, require_eval
from dpa_lens.methods.registry import register
from dpa_lens.models.view import ModelView
from dpa_lens.targets import resolve_target

KINDS_ALL = ("tokens", "heads", "neurons")


def _prepare(model: Any, text: Any, target: Any, position: Any, attention_mask: Any, logit: str, method: str):
    view = ModelView(model)
    require_eval(model, method)
    tokens, mask = prepare_tokens(model, text, attention_mask)
    inputs = inputs_from_tokens(view, tokens, mask)
    positions = resolve_positions(position, inputs)
    resolved = resolve_target(model, view, target, inputs.batch, logit=logit)
    return view, tokens, mask, inputs, positions, resolved


def _component_names(view: ModelView, kinds: set[str]) -> list[str]:
    names = []
    for layer in range(view.n_layers):
        if "heads" in kinds:
            names.append(f"blocks.{layer}.attn.hook_z")
        if "neurons" in kinds:
            names.append(f"blocks.{layer}.mlp.hook_post")
    return names


def _gradient_method(model, text, target, position, attention_mask, logit, kinds, signed: bool, method: str) -> Attribution:
    kinds = set(kinds)
    if not kinds <= set(KINDS_ALL):
        raise ValueError(f"kinds must be among {KINDS_ALL}, got {sorted(kinds)}")
    view, tokens, mask, inputs, positions, resolved = _prepare(model, text, target, position, attention_mask, logit, method)
    run = forward_with_grads(model, view, tokens, resolved, positions, _component_names(view, kinds), attention_mask=mask)

    def score(act: Tensor, grad: Tensor, vector: bool) -> Tensor:
        act, grad = act.float(), grad.float()
        if signed:
            return (act * grad).sum(-1) if vector else act * grad
        return grad.norm(dim=-1) if vector else grad.abs()

    L = view.n_layers
    tokens_out = score(run.embed, run.embed_grad, True) if "tokens" in kinds else None
    heads = neurons = None
    if "heads" in kinds:
        heads = torch.stack([score(run.acts[f"blocks.{l}.attn.hook_z"], run.grads[f"blocks.{l}.attn.hook_z"], True) for l in range(L)], 1)
    if "neurons" in kinds:
        neurons = torch.stack([score(run.acts[f"blocks.{l}.mlp.hook_post"], run.grads[f"blocks.{l}.mlp.hook_post"], False) for l in range(L)], 1)
    return Attribution(
        method=method,
        tokens=tokens_out,
        heads=heads,
        neurons=neurons,
        target_value=run.value,
        positions=positions,
        token_ids=inputs.tokens,
        str_tokens=inputs.str_tokens,
        target=resolved.describe(),
        settings={},
        model_name=view.name,
    )


@register("gradient")
def gradient(
    model: Any,
    tokens: Any,
    target: Any,
    position: Any = -1,
    *,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    kinds: tuple[str, ...] = KINDS_ALL,
) -> Attribution:
    """Gradient magnitude of the target at each token embedding, head output and neuron.

    ``tokens`` may be a string, a list of strings (padded as ``model.to_tokens`` would) or ids.
    Returns ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``,
    ``neurons [batch, layer, pos, d_mlp]``, all ≥ 0.
    """
    return _gradient_method(model, tokens, target, position, attention_mask, logit, kinds, signed=False, method="gradient")


@register("input_x_gradient")
def input_x_gradient(
    model: Any,
    tokens: Any,
    target: Any,
    position: Any = -1,
    *,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    kinds: tuple[str, ...] = KINDS_ALL,
) -> Attribution:
    """Activation · gradient of the target at each token embedding, head output and neuron (signed)."""
    return _gradient_method(model, tokens, target, position, attention_mask, logit, kinds, signed=True, method="input_x_gradient")


# ------------------------------------------------------------------------ integrated gradients

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
        raise ValueError(f"integrated gradients needs at least 2 steps, got {steps}")
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
        raise ValueError(f"unknown quadrature {rule!r}; choose one of {', '.join(QUADRATURES)}")
    return alphas, _trapezoid_weights(alphas)


def _trapezoid_weights(alphas: Tensor, first_finite: bool = False) -> Tensor:
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


def _baseline(model: Any, baseline: Any, inputs: Any, shape: tuple[int, int, int], device: torch.device, keep_bos: bool) -> Tensor:
    if isinstance(baseline, str):
        if baseline == "zero":
            base = torch.zeros(shape, device=device)
        elif baseline == "pad":
            pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
            if pad is None:
                raise ValueError("baseline='pad' needs a tokenizer with a pad token")
            base = model.W_E[pad].detach().float().to(device).expand(shape).clone()
        else:
            raise ValueError(f"baseline must be 'zero', 'pad' or a tensor, got {baseline!r}")
        bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
        if keep_bos and bos is not None:  # the first real token, when it is the BOS, stays as it is
            first = inputs.real.long().argmax(-1)
            rows = torch.nonzero(inputs.tokens.cpu()[torch.arange(shape[0]), first] == bos).flatten()
            base[rows.to(device), first[rows].to(device)] = torch.nan  # filled with the embedding
        return base
    base = torch.as_tensor(baseline).detach().float().to(device)
    if not bool(torch.isfinite(base).all()):
        raise ValueError("the baseline tensor has non-finite entries")
    try:
        return base.expand(shape)
    except RuntimeError:
        raise ValueError(f"a baseline tensor must broadcast to [batch, pos, d_model] = {list(shape)}, got {list(base.shape)}") from None


class _Path:
    """f and each token's share ``∂f/∂x_t · (x_t − x'_t)`` at points of the straight path, batched."""

    def __init__(self, model, view, tok, mask, resolved, positions, base, batch_size, bar):
        self.model, self.view, self.tok, self.mask = model, view, tok, mask
        self.resolved, self.positions, self.base = resolved, positions, base
        self.batch_size, self.bar = batch_size, bar

    def __call__(self, rows: Tensor, alphas: Tensor) -> tuple[Tensor, Tensor]:
        """``rows [m]``, ``alphas [m]`` -> ``f [m]`` and shares ``[m, pos]`` (float64, CPU)."""
        values, shares = [], []
        device = self.tok.device
        for chunk in torch.arange(len(rows)).split(self.batch_size):
            r = rows[chunk].to(device)
            a = alphas[chunk].to(device)
            kept: dict[str, Tensor] = {}

            def interpolate(x: Tensor, a: Tensor = a, r: Tensor = r) -> Tensor:
                origin = self.base[r].to(x.dtype)
                origin = torch.where(origin.isnan(), x, origin)  # kept tokens (BOS)
                kept["diff"] = (x - origin).detach()
                return origin + a.to(x.dtype)[:, None, None] * (x - origin)

            run = forward_with_grads(self.model, self.view, self.tok[r], self.resolved.rows(r.cpu()), self.positions[r.cpu()],
                                     attention_mask=None if self.mask is None else self.mask[r], embed_override=interpolate)
            values.append(run.value.double().cpu())
            shares.append((run.embed_grad.double() * kept["diff"].double()).sum(-1).cpu())
            self.bar.update(len(chunk))
        return torch.cat(values), torch.cat(shares)


def _fixed_rule(path: _Path, b: int, alphas: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Scores, f(x') and f(x) per row with fixed nodes (the ends evaluated for the gap only)."""
    nodes = torch.cat([alphas, torch.tensor([0.0, 1.0], dtype=torch.float64)])
    S = len(nodes)
    f, c = path(torch.arange(b).repeat_interleave(S), nodes.repeat(b))
    f, c = f.view(b, S), c.view(b, S, -1)
    w = torch.cat([weights, torch.zeros(2, dtype=torch.float64)])
    return (c[:, :-2] * w[:-2, None]).sum(1), f[:, -2], f[:, -1]


def _adaptive_rule(path: _Path, b: int, steps: int, alpha_min: float, batch_size: int, tol: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
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
        w = _trapezoid_weights(alphas[r], first_finite=finite0)
        c = torch.where(torch.isfinite(cs[r]), cs[r], torch.zeros_like(cs[r]))
        scores.append((c * w[:, None]).sum(0))
    return torch.stack(scores), torch.stack([x[0] for x in fs]), torch.stack([x[-1] for x in fs])


@register("integrated_gradients")
def integrated_gradients(
    model: Any,
    tokens: Any,
    target: Any,
    position: Any = -1,
    *,
    steps: int = 128,
    baseline: Literal["zero", "pad"] | Tensor = "zero",
    keep_bos: bool = True,
    quadrature: Quadrature = "adaptive",
    alpha_min: float | None = None,
    batch_size: int = 32,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    progress: bool = True,
    warn_gap: float = 0.05,
) -> Attribution:
    """Integrated gradients of the target over the token embeddings.

    ``(x − x') · ∫₀¹ ∂f/∂x(x' + α(x − x')) dα`` per token: how much of ``f(x) − f(x')`` each
    token's embedding accounts for along the straight path from the baseline ``x'``.

    Args:
        steps: gradient evaluations on the path per row (f(x') and f(x) are evaluated too).
        baseline: ``"zero"`` (a zero embedding: the authors' protocol), ``"pad"`` (the pad
            token's embedding) or a tensor broadcastable to ``[batch, pos, d_model]``.
        keep_bos: with ``"zero"`` or ``"pad"``, a BOS token at a row's first real position keeps
            its embedding in the baseline (it gets no score). ``False`` replaces it too, as the
            authors' code does when its tokenizer adds a BOS; see the note.
        quadrature: ``"adaptive"`` (default): a geometric grid of ``steps // 4`` nodes from
            ``alpha_min`` (default 1e-4) to 1, then bisection of the intervals where the gradient
            disagrees most with the measured change of f, until ``steps`` are spent or the gap is
            below 0.1 %. Or a fixed rule of `quadrature_rule`: ``"log"`` (``alpha_min`` default
            1e-2), ``"trapezoid"``, ``"riemann_right"``, ``"gausslegendre"``.
        batch_size: path points per forward pass.
        warn_gap: warn when a row's completeness gap exceeds this fraction.

    Returns:
        ``tokens [batch, pos]``; ``bias [batch]`` is ``f(baseline)``, so ``tokens.sum(-1) + bias``
        approximates ``target_value``; ``settings["completeness_gap"]`` is, per row,
        ``(Σ tokens − (f(x) − f(x'))) / |f(x) − f(x')|``.

    Note:
        A pre-norm model is scale-invariant in its input except for the norms' epsilon, so the
        path from a zero embedding is stiff near α = 0. Zeroing the BOS token as well sends the
        whole input to RMSNorm's singular point: on SmolLM2 (classic IOI prompt, logit
        difference) f is erratic at every scale of α there (f(1e-12) = 0.27, f(3e-12) = −3.3,
        f(1e-6) = −5.7, f(1e-2) = −1.6, f(1) = 5.3), so no quadrature is complete (gap 22 % at
        512 steps). With the BOS kept, f moves smoothly from f(x') = −1.59 and the default is
        complete within a few per cent; a single token's raw logit still jumps (1.5 → 20 between
        α = 3e-4 and 1e-3), which fixed rules miss entirely and the adaptive rule finds. Read
        ``completeness_gap`` before trusting the scores.
    """
    if quadrature not in QUADRATURES:
        raise ValueError(f"unknown quadrature {quadrature!r}; choose one of {', '.join(QUADRATURES)}")
    if steps < 2:
        raise ValueError(f"integrated gradients needs at least 2 steps, got {steps}")
    if alpha_min is None:
        alpha_min = 1e-4 if quadrature == "adaptive" else 1e-2
    if not 0 < alpha_min < 1:
        raise ValueError(f"alpha_min must lie in (0, 1), got {alpha_min}")
    view, tok, mask, inputs, positions, resolved = _prepare(model, tokens, target, position, attention_mask, logit, "integrated_gradients")
    b, n = inputs.batch, inputs.seq_len
    device = tok.device
    base = _baseline(model, baseline, inputs, (b, n, view.d_model), device, keep_bos)
    with tqdm(total=b * (steps + 2), desc="integrated gradients", disable=not progress or b * steps < 4 * batch_size, leave=False) as bar:
        path = _Path(model, view, tok, mask, resolved, positions, base, batch_size, bar)
        if quadrature == "adaptive":
            scores, f0, f1 = _adaptive_rule(path, b, steps, alpha_min, batch_size)
        else:
            scores, f0, f1 = _fixed_rule(path, b, *quadrature_rule(steps, quadrature, alpha_min))
    gap = (scores.sum(-1) - (f1 - f0)) / (f1 - f0).abs().clamp_min(1e-12)
    if bool((gap.abs() > warn_gap).any()):
        warnings.warn(
            f"integrated gradients are incomplete by up to {float(gap.abs().max()):.0%} "
            "(settings['completeness_gap']): the path is not resolved at this many steps",
            stacklevel=2,
        )
    return Attribution(
        method="integrated_gradients",
        tokens=scores.float().to(device),
        bias=f0.float().to(device),
        target_value=f1.float().to(device),
        positions=positions,
        token_ids=inputs.tokens,
        str_tokens=inputs.str_tokens,
        target=resolved.describe(),
        settings={
            "steps": steps,
            "quadrature": quadrature,
            "alpha_min": alpha_min,
            "baseline": baseline if isinstance(baseline, str) else "tensor",
            "keep_bos": keep_bos if isinstance(baseline, str) else None,
            "completeness_gap": gap.tolist(),
        },
        model_name=view.name,
    )
