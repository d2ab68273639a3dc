"""Integrated gradients (Sundararajan et al. 2017) over the token embeddings.

``(x − x') · ∫₀¹ ∂f/∂x(x' + α(x − x')) dα`` per token, with a zero baseline ``x'`` by default (the
authors' protocol). Complete up to quadrature error: tokens sum to ``f(x) − f(x')``, which ``bias``
holds as ``f(x')`` and ``diagnostics.completeness_gap`` reports as a gap. The quadrature rules are
in `dpa_lens.methods.quadrature`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import InputError
from dpa_lens.inputs import RunInputs, leading_bos
from dpa_lens.methods._autograd import forward_with_grads, prepare_run
from dpa_lens.methods.quadrature import QUADRATURES, Quadrature, adaptive_rule, fixed_rule, quadrature_rule
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Attribution, Diagnostics
from dpa_lens.targets import Metric
from dpa_lens.types import PositionLike, PromptLike, TargetLike, TLModel


def _baseline(model: TLModel, baseline: str | Tensor, inputs: RunInputs, shape: tuple[int, int, int], device: torch.device,
              keep_bos: bool) -> tuple[Tensor, Tensor]:
    """The baseline embeddings ``[batch, pos, d_model]``, and which positions keep their own
    embedding in it ``[batch, pos]`` (a leading BOS with ``keep_bos``)."""
    keep = torch.zeros(shape[:2], dtype=torch.bool, device=device)
    if isinstance(baseline, str):
        if baseline == "zero":
            base = torch.zeros(shape, device=device)
        elif baseline == "pad":
            pad = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
            if pad is None:
                raise InputError("baseline='pad' needs a tokenizer with a pad token")
            base = model.W_E[pad].detach().float().to(device).expand(shape).clone()
        else:
            raise InputError(f"baseline must be 'zero', 'pad' or a tensor, got {baseline!r}")
        if keep_bos:  # the first real token, when it is the BOS, stays as it is
            keep |= leading_bos(model, inputs.tokens, inputs.real).to(device)
        return base, keep
    base = torch.as_tensor(baseline).detach().float().to(device)
    if not bool(torch.isfinite(base).all()):
        raise InputError("the baseline tensor has non-finite entries")
    try:
        return base.expand(shape), keep
    except RuntimeError:
        raise InputError(f"a baseline tensor must broadcast to [batch, pos, d_model] = {list(shape)}, got {list(base.shape)}") from None


class _Path:
    """f and each token's share ``∂f/∂x_t · (x_t − x'_t)`` at points of the straight path, batched."""

    def __init__(self, model, view, tok, mask, resolved, positions, base, keep, batch_size, bar):
        self.model, self.view, self.tok, self.mask = model, view, tok, mask
        self.resolved, self.positions, self.base, self.keep = resolved, positions, base, keep
        self.batch_size, self.bar = batch_size, bar

    def __call__(self, rows: Tensor, alphas: Tensor) -> tuple[Tensor, Tensor]:
        """``rows [m]``, ``alphas [m]`` -> ``f [m]`` and shares ``[m, pos]`` (float64, CPU)."""
        values, shares = [], []
        device = self.tok.device
        for chunk in torch.arange(len(rows)).split(self.batch_size):
            r = rows[chunk].to(device)
            a = alphas[chunk].to(device)
            kept: dict[str, Tensor] = {}

            def interpolate(x: Tensor, a: Tensor = a, r: Tensor = r, kept: dict[str, Tensor] = kept) -> Tensor:
                # kept tokens (BOS); x is where the embedding is (the tokens' device may differ on a split model)
                origin = torch.where(self.keep[r].to(x.device)[..., None], x, self.base[r].to(x.device, x.dtype))
                kept["diff"] = (x - origin).detach()
                return origin + a.to(x.device, x.dtype)[:, None, None] * (x - origin)

            run = forward_with_grads(self.model, self.view, self.tok[r], self.resolved.rows(r.cpu()), self.positions[r.cpu()],
                                     attention_mask=None if self.mask is None else self.mask[r], embed_override=interpolate)
            values.append(run.value.double().cpu())
            shares.append((run.embed_grad.double() * kept["diff"].double()).sum(-1).cpu())
            self.bar.update(len(chunk))
        return torch.cat(values), torch.cat(shares)


@register(MethodSpec(name="integrated_gradients", input="tokens", scores=("tokens",), metric=True,
                     summary="integrated gradients over the token embeddings from a zero baseline (BOS kept), adaptive quadrature"))
@renamed(tokens="prompt")
def integrated_gradients(
    model: TLModel,
    prompt: PromptLike,
    target: TargetLike | Metric,
    position: PositionLike = -1,
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
        target: any target form, or a differentiable metric ``metric(logits) -> scalar`` applied to
            each row's logits ``[1, pos, vocab]`` (see `dpa_lens.targets.MetricTarget`).
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
        approximates ``target_value``; ``diagnostics.completeness_gap`` is, per row,
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
        raise InputError(f"unknown quadrature {quadrature!r}; choose one of {', '.join(QUADRATURES)}")
    if steps < 2:
        raise InputError(f"integrated gradients needs at least 2 steps, got {steps}")
    if alpha_min is None:
        alpha_min = 1e-4 if quadrature == "adaptive" else 1e-2
    if not 0 < alpha_min < 1:
        raise InputError(f"alpha_min must lie in (0, 1), got {alpha_min}")
    view, tok, mask, inputs, positions, resolved = prepare_run(model, prompt, target, position, attention_mask, logit, "integrated_gradients")
    b, n = inputs.batch, inputs.seq_len
    device = tok.device
    base, keep = _baseline(model, baseline, inputs, (b, n, view.d_model), device, keep_bos)
    with tqdm(total=b * (steps + 2), desc="integrated gradients", disable=not progress or b * steps < 4 * batch_size, leave=False) as bar:
        path = _Path(model, view, tok, mask, resolved, positions, base, keep, batch_size, bar)
        if quadrature == "adaptive":
            scores, f0, f1 = adaptive_rule(path, b, steps, alpha_min, batch_size)
        else:
            scores, f0, f1 = fixed_rule(path, b, *quadrature_rule(steps, quadrature, alpha_min))
    gap = (scores.sum(-1) - (f1 - f0)) / (f1 - f0).abs().clamp_min(1e-12)
    if bool((gap.abs() > warn_gap).any()):
        warnings.warn(
            f"integrated gradients are incomplete by up to {float(gap.abs().max()):.0%} "
            "(diagnostics.completeness_gap): the path is not resolved at this many steps",
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
        mask=inputs.real,
        target=resolved.describe(),
        diagnostics=Diagnostics(completeness_gap=gap.float().to(device)),
        settings={
            "steps": steps,
            "quadrature": quadrature,
            "alpha_min": alpha_min,
            "baseline": baseline if isinstance(baseline, str) else "tensor",
            "keep_bos": keep_bos if isinstance(baseline, str) else None,
        },
        model_name=view.name,
    )
