"""Tensor kernels the methods share: rotary embeddings and their transpose, norms (in full, and with
their scale frozen), activations with their secant slope, soft caps.

Pure functions of tensors: no model, no cache, no dpa_lens import but the errors. Linearising a
non-linearity by its *secant* (``f(x)/x``, frozen) rather than its derivative is DPA's rule: the
linearised map then reproduces the forward's values exactly.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.errors import UnsupportedModelError
from dpa_lens.types import typechecked

ACTIVATIONS: tuple[str, ...] = ("silu", "swish", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")


def rotate_half(x: Tensor, adjacent_pairs: bool = False) -> Tensor:
    """The linear map P with rot(x) = x·cos + P(x)·sin (GPT-NeoX halves, or GPT-J pairs)."""
    if adjacent_pairs:
        out = torch.empty_like(x)
        out[..., ::2] = -x[..., 1::2]
        out[..., 1::2] = x[..., ::2]
        return out
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@typechecked
def rotate(
    x: Float[Tensor, "*batch d_head"], cos: Float[Tensor, "*#batch rot"], sin: Float[Tensor, "*#batch rot"], adjacent_pairs: bool = False
) -> Float[Tensor, "*batch d_head"]:
    """Rotary embedding of the first ``cos.shape[-1]`` dimensions (the rest pass through)."""
    r = cos.shape[-1]
    head, tail = x[..., :r], x[..., r:]
    return torch.cat([head * cos + rotate_half(head, adjacent_pairs) * sin, tail], dim=-1)


@typechecked
def unrotate(
    g: Float[Tensor, "*batch d_head"], cos: Float[Tensor, "*#batch rot"], sin: Float[Tensor, "*#batch rot"], adjacent_pairs: bool = False
) -> Float[Tensor, "*batch d_head"]:
    """Transpose of `rotate`: Rᵀg = g·cos − P(g·sin) on the rotated dimensions (Pᵀ = −P)."""
    r = cos.shape[-1]
    head, tail = g[..., :r], g[..., r:]
    return torch.cat([head * cos - rotate_half(head * sin, adjacent_pairs), tail], dim=-1)


def rotary_invariant(x: Tensor, r: int, adjacent_pairs: bool = False) -> Tensor:
    """What a rotary embedding of the first ``r`` dimensions leaves unchanged, at any position: the length of
    each rotated pair (GPT-NeoX halves, or GPT-J pairs), then the dimensions it does not rotate."""
    head, tail = x[..., :r], x[..., r:]
    pairs = head.unflatten(-1, (r // 2, 2)) if adjacent_pairs else head.unflatten(-1, (2, r // 2)).transpose(-1, -2)
    return torch.cat([pairs.square().sum(-1).sqrt(), tail], dim=-1)


def heads_in(W: Float[Tensor, "head d_model d_head"]) -> Float[Tensor, "d_model head_x_d_head"]:
    """A per-head input weight (W_Q, W_K, W_V) as one matrix: ``x @ heads_in(W)`` is every head's
    projection side by side, head-major. A view where the layout allows (a bridge's weights)."""
    return W.permute(1, 0, 2).flatten(1)


def heads_out(W: Float[Tensor, "head d_head d_model"]) -> Float[Tensor, "head_x_d_head d_model"]:
    """A per-head output weight (W_O) as one matrix: ``z.flatten(-2) @ heads_out(W)`` sums the heads' writes."""
    return W.flatten(0, 1)


@typechecked
def normalize(
    x: Float[Tensor, "*batch d"], eps: float, gain: Float[Tensor, " d"] | None, center: bool
) -> tuple[Float[Tensor, "*batch d"], Float[Tensor, "*batch 1"]]:
    """A norm in full, its scale computed from ``x``: ``(normalised x times the gain, scale)``, a LayerNorm
    (``center``, bias left out) or an RMSNorm."""
    if center:
        x = x - x.mean(-1, keepdim=True)
    scale = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    y = x / scale
    return (y if gain is None else y * gain.to(y)), scale


@typechecked
def pull_norm(
    update: Float[Tensor, "*batch d"], scale: Float[Tensor, "*#batch 1"], gain: Float[Tensor, " d"] | None, center: bool
) -> Float[Tensor, "*batch d"]:
    """Transpose of a norm with its scale frozen: times the gain, centred (LayerNorm), over the scale.

    Maps a target at a norm's output to the target at its input.
    """
    if gain is not None:
        update = update * gain.to(update.device)
    if center:
        update = update - update.mean(-1, keepdim=True)
    return update / scale


@typechecked
def push_norm(
    x: Float[Tensor, "*batch d"], scale: Float[Tensor, "*#batch 1"], gain: Float[Tensor, " d"] | None, center: bool
) -> Float[Tensor, "*batch d"]:
    """A norm with its scale frozen, applied to a part of the stream (a linear map; `pull_norm` is its transpose)."""
    if center:
        x = x - x.mean(-1, keepdim=True)
    x = x / scale
    return x * gain.to(x.device) if gain is not None else x


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """``cap·tanh(x/cap)``, or ``x`` when there is no cap."""
    return x if cap is None else cap * torch.tanh(x / cap)


def softcap_ratio(x: Tensor, cap: float) -> Tensor:
    """Secant slope ``cap·tanh(x/cap)/x`` of a soft cap (1 at x = 0)."""
    y = x / cap
    safe = y.abs() > 1e-4
    return torch.where(safe, torch.tanh(y) / torch.where(safe, y, torch.ones_like(y)), 1.0 - y * y / 3.0)


def activation(name: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(act(x), act(x)/x)``: the activation and its secant slope (exact at 0, no division)."""
    if name in ("silu", "swish"):
        ratio = torch.sigmoid(x)
    elif name == "gelu":
        ratio = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    elif name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        ratio = 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
    elif name == "relu":
        ratio = (x > 0).to(x.dtype)
    else:
        raise UnsupportedModelError(f"activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    return x * ratio, ratio
