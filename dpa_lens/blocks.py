"""The pieces of a transformer block, computed from a model's weights and cached activations, written once.

What a block computes, as the checks, the recomputed layers of a checkpointed cache, exact edge patching
and circuit faithfulness each need to rebuild: a norm in full, an attention pattern from queries and
keys, a head's or an MLP's write to the stream, an MLP's activations. Weights come from a
`dpa_lens.models.view.ModelView` and move to the input's device; biases are included where a write
is the layer's whole write (`attn_write`, `mlp_write`) and left out where only differences are taken.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from dpa_lens.models.view import BlockRules, ModelView
from dpa_lens.ops import activation, heads_out, softcap
from dpa_lens.ops import normalize as _normalize
from dpa_lens.types import typechecked


@typechecked
def normalize(x: Float[Tensor, "*batch d"], view: ModelView, norm: str, layer: int | None = None) -> Float[Tensor, "*batch d"]:
    """The model's norm ``norm`` (``ln1``, ``ln2``, ``ln_final``) in full, its scale recomputed from ``x``
    (gain included; a LayerNorm's bias left out)."""
    return _normalize(x, view.cfg.eps, view.norm_weight(norm, layer), center=view.rules.norm == "ln")[0]


def qk_normalize(x: Tensor, view: ModelView, layer: int, which: str) -> Tensor:
    """A layer's query (``"q"``) or key (``"k"``) RMS norm in full, ``x [..., d_head]``."""
    return _normalize(x, view.cfg.eps, view.qk_norm_weight(layer, which), center=False)[0]


def mlp_post(rules: BlockRules, pre: Tensor, pre_linear: Tensor | None = None) -> Tensor:
    """An MLP's hidden activations from its pre-activations: ``act(pre)``, times ``pre_linear`` when gated."""
    post = activation(rules.act, pre)[0]
    return post * pre_linear if rules.gated else post


def attn_write(view: ModelView, layer: int, z: Float[Tensor, "*batch head d_head"]) -> Float[Tensor, "*batch d_model"]:
    """What a layer's attention adds to the stream, ``Σ_h z_h W_O,h + b_O`` (before any output norm)."""
    a = view.attn(layer)
    out = z.flatten(-2) @ heads_out(a.W_O).to(z)
    return out if a.b_O is None else out + a.b_O.to(z)


def mlp_write(view: ModelView, layer: int, post: Float[Tensor, "*batch d_mlp"]) -> Float[Tensor, "*batch d_model"]:
    """What a layer's MLP adds to the stream, ``post W_out + b_out`` (before any output norm)."""
    m = view.mlp(layer)
    out = post @ m.W_out.to(post)
    return out if m.b_out is None else out + m.b_out.to(post)


@typechecked
def attention_scores(
    view: ModelView, layer: int, q: Float[Tensor, "*batch query head d_head"], k: Float[Tensor, "*batch key head d_head"]
) -> Float[Tensor, "*batch head query key"]:
    """Attention scores from queries and keys as the scores see them (normed and rotated; one key per
    query head): ``q·k`` over the layer's scale, soft-capped where the model caps them."""
    scores = torch.einsum("...qhe,...khe->...hqk", q, k) / view.attn_scale(layer)
    return softcap(scores, view.rules.attn_softcap)


def masked_softmax(scores: Tensor, masked: Bool[Tensor, ...]) -> Tensor:
    """The attention pattern: a softmax over the keys not ``masked``; a query with no key left gets zeros."""
    return scores.masked_fill(masked, float("-inf")).softmax(-1).nan_to_num(0.0)
