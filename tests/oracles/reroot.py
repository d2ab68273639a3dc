"""An autograd oracle for *rerooted* DPA (``root=``), independent of dpa_lens and of TransformerLens.

It runs the re-wired forward of ``rewired.py`` (same float64 weights, detached norm scales, secants and
``mu`` mixing) and reads the target quantity inside the model instead of at the logits:

* ``"blocks.{l}.hook_resid_pre"`` / ``"hook_resid_mid"`` / ``"hook_resid_post"``: the residual stream
  there (``R.pres[l]``, ``R.mids[l]``, ``R.pres[l + 1]``; the last layer's ``resid_post`` is the input
  of the final norm, recorded here), at ``positions``, dotted with ``direction``;
* ``"L{l}H{h}"``: query head ``h``'s contribution to the stream (``z_h W_O[h]``, after Gemma's output
  norm with its scale frozen), likewise.

DPA of that quantity is its gradient in the re-wired forward, so every score is activation × gradient
as in ``rewired_scores``; activations downstream of the root get no gradient and score zero.

Use::

    from tests.oracles.reroot import rerooted_scores
    o = rerooted_scores(hf_model, ids, "blocks.1.hook_resid_mid", direction, positions, mu=(0.25, 0.25, 0.5, 0.5, 0.5))
    o.tokens, o.heads, o.neurons, o.bias, o.value
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .rewired import DT, FORWARDS, OracleScores, _Rewired


class _Recorded(_Rewired):
    """`_Rewired` that remembers the input of its last norm: the final norm's, i.e. the last ``resid_post``."""

    final: Tensor | None = None

    def rms(self, x: Tensor, gain: Tensor, eps: float) -> Tensor:
        self.final = x
        return _Rewired.rms(x, gain, eps)

    def ln(self, x: Tensor, gain: Tensor, eps: float) -> Tensor:
        self.final = x
        return _Rewired.ln(x, gain, eps)


def _located(R: _Recorded, root: str) -> Tensor:
    """The ``[b, n, d]`` tensor of the re-wired forward that ``root`` names."""
    if m := re.fullmatch(r"L(\d+)H(\d+)", root):
        return R.heads[int(m[1])][:, :, int(m[2])]
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)", root)
    layer, where = int(m[1]), m[2]
    if where == "pre":
        return R.pres[layer]
    if where == "mid":
        return R.mids[layer]
    return R.pres[layer + 1] if layer + 1 < len(R.pres) else R.final


def _grad(t: Tensor) -> Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad


def rerooted_scores(hf_model, input_ids: Tensor, root: str, direction: Tensor, positions: Tensor, *,
                    mu: tuple[float, float, float, float, float]) -> OracleScores:
    """Scores of ``x_root[b, positions[b]] · direction`` (``direction [d]`` or ``[b, d]``) in the re-wired forward."""
    b = input_ids.shape[0]
    R = _Recorded(mu=mu, b=b)
    embed, logits = FORWARDS[type(hf_model).__name__](hf_model, input_ids, R)
    rows = torch.arange(b)
    value = (_located(R, root)[rows, positions] * direction.to(DT)).sum(-1)
    value.sum().backward()
    bias = torch.zeros(b, dtype=DT)
    for leaf in R.bias_leaves:
        bias = bias + (leaf.detach() * _grad(leaf)).sum(dim=(1, 2))
    return OracleScores(
        logits=logits.detach(),
        value=value.detach(),
        tokens=(embed * embed.grad).sum(-1).detach(),
        heads=torch.stack([(c.detach() * _grad(c)).sum(-1) for c in R.heads], 1),
        neurons=torch.stack([p.detach() * _grad(p) for p in R.posts], 1),
        neurons_mid=None,
        head_keys=torch.stack([torch.einsum("bhqk,bkhe,bqhe->bhqk", alpha, v, _grad(z)) for alpha, v, z in R.head_parts], 1),
        bias=bias,
        grad_resid_pre=[_grad(t).detach() for t in R.pres],
        grad_resid_mid=[_grad(t).detach() for t in R.mids],
    )
