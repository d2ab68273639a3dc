"""DPA's propagation rules for one block: from the target at a sublayer's output to the update of
the target at its input stream.

Each rule is linear in the target (activations, patterns and norm scales are constants read from
the cache). `Propagator.mlp` and `Propagator.attention` also return what the node scores need:
the neuron activations and ``λ = W_out t`` (MLP), and the head outputs dotted with their target (attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.forward import CachedForward
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.models import hooks
from dpa_lens.ops import activation, pull_norm, softcap_ratio, unrotate
from dpa_lens.types import typechecked


@typechecked
@dataclass
class MLPStep:
    update: Float[Tensor, "batch pos d_model"]  # what the MLP adds to the target at its input stream
    post: Float[Tensor, "batch pos d_mlp"]  # neuron activations
    lam: Float[Tensor, "batch pos d_mlp"]  # W_out t: each neuron's target
    bias: Float[Tensor, " batch"]  # the share of the MLP's biases


@typechecked
@dataclass
class AttentionStep:
    update: Float[Tensor, "batch pos d_model"]
    heads: Float[Tensor, "batch pos head"]  # each head's output dotted with its target
    head_keys: Float[Tensor, "batch head query key"] | None  # heads split by key position (on request)
    bias: Float[Tensor, " batch"]
    # on request, the update split by reader: each query head's q, k and v input (they add up to ``update``)
    readers: Float[Tensor, "batch pos head 3 d_model"] | None = None


class Propagator:
    """DPA's rules for every block of one cached forward, with path weights ``mu``."""

    def __init__(self, fwd: CachedForward, mu: Mu):
        self.fwd, self.view, self.rules, self.mu = fwd, fwd.view, fwd.view.rules, mu
        self.b, self.n = fwd.batch, fwd.seq_len

    def out_norm(self, t: Tensor, layer: int, name: str) -> Tensor:
        """The target where a sublayer's output enters its post-norm (Gemma 2/3), else itself."""
        if not self.rules.post_norms:
            return t
        return pull_norm(t, self.fwd.act(hooks.norm_scale(layer, name)), self.view.norm_weight(name, layer), center=False)

    def in_norm(self, update: Tensor, layer: int, name: str) -> Tensor:
        """Through a sublayer's input norm (scale frozen, LayerNorm centred) to the stream it reads.
        The norm's bias, where processing left one, is in the biases of the maps that read it
        (`ModelView.attn`, `ModelView.mlp`), so its share is in the step's ``bias``."""
        return pull_norm(update, self.view.stream_scale(self.fwd.act(hooks.norm_scale(layer, name))),
                         self.view.norm_weight(name, layer), center=self.rules.norm == "ln")

    # ------------------------------------------------------------------ MLP
    def mlp(self, layer: int, t: Tensor) -> MLPStep:
        """The MLP's update of the target at its input stream, from the target ``t`` at its output
        (nothing, with no neurons, in an attention-only model)."""
        if not self.rules.has_mlp:
            return MLPStep(update=torch.zeros_like(t), post=t.new_zeros(self.b, self.n, 0), lam=t.new_zeros(self.b, self.n, 0),
                           bias=t.new_zeros(self.b))
        mu, w, act = self.mu, self.view.mlp(layer), self.fwd.act
        t_out = self.out_norm(t, layer, "ln2_post")
        lam = t_out @ w.W_out.T  # [b, n, d_mlp]
        bias = (t_out @ w.b_out).sum(-1) if w.b_out is not None else torch.zeros(self.b, device=t.device)
        if self.rules.gated:
            g, u = act(hooks.mlp(layer, "pre")), act(hooks.mlp(layer, "pre_linear"))
            a, slope = activation(self.rules.act, g)
            post = a * u
            paths = torch.cat([(mu.up * lam) * a, (mu.gate * lam) * u * slope], dim=-1)  # content, control (secant)
            update = paths @ torch.cat([w.W_in.T, w.W_gate.T], dim=0)
        else:  # a plain MLP has one path, post = (act(s)/s)·s with the slope frozen, at full weight
            post, slope = activation(self.rules.act, act(hooks.mlp(layer, "pre")))
            grad_pre = lam * slope
            if w.b_in is not None:
                bias = bias + (grad_pre @ w.b_in).sum(-1)
            update = grad_pre @ w.W_in.T
        return MLPStep(update=self.in_norm(update, layer, "ln2"), post=post, lam=lam, bias=bias)

    def neuron_targets(self, layer: int, t: Tensor) -> Float[Tensor, "batch pos d_mlp"]:
        """``W_out t`` of a layer's neurons for a target ``t`` at the MLP's output stream."""
        return self.out_norm(t, layer, "ln2_post") @ self.view.mlp(layer).W_out.T

    # ------------------------------------------------------------------ attention
    def attention(self, layer: int, t: Tensor, *, head_keys: bool = False, readers: bool = False,
                  head_mask: Tensor | None = None) -> AttentionStep:
        """The attention's update of the target at its input stream, from the target ``t`` at its output.

        ``readers=True`` also splits the update by reader (each query head's q, k, v input; grouped
        key/value heads are split by the query head that pulled them). ``head_mask [head]`` (0/1)
        keeps only some heads: the target at one head's output (rerooting at a head)."""
        view, mu, b, n, fwd = self.view, self.mu, self.b, self.n, self.fwd
        H, K, dh = view.n_heads, view.n_kv_heads, view.d_head
        G = H // K
        a = view.attn(layer)
        t_out = self.out_norm(t, layer, "ln1_post")
        q_rot, k_rot = fwd.queries_keys(layer)
        rot = fwd.rotary(layer)
        alpha = fwd.pattern(layer, q_rot, k_rot).view(b, K, G, n, n)
        v = fwd.act(hooks.attn(layer, "v")).permute(0, 2, 1, 3)  # [b, K, k, dh]
        z = fwd.act(hooks.attn(layer, "z"))  # [b, q, H, dh]
        if a.b_V is not None:  # heads and keys score the values without their bias, an output bias (see below)
            v = v - a.b_V[None, :, None, :]
            z = z - alpha.sum(-1).reshape(b, H, n).transpose(1, 2)[..., None] * a.b_V.repeat_interleave(G, dim=0)
        lam = (t_out @ a.W_O.reshape(H * dh, -1).T).view(b, n, H, dh)  # W_O t per head
        if head_mask is not None:
            lam = lam * head_mask.to(lam)[None, None, :, None]
        head_score = (z * lam).sum(-1)  # [b, q, H]
        bias = (t_out @ a.b_O).sum(-1) if a.b_O is not None else torch.zeros(b, device=t.device)
        keys = None
        lam_g = lam.view(b, n, K, G, dh).permute(0, 2, 3, 1, 4).reshape(b, K, G * n, dh)  # [b, K, (G q), dh]
        # value path: Σ_i α_ij λ_i, summed over the query heads that share a KV head
        grad_v = (alpha.reshape(b, K, G * n, n).transpose(-1, -2) @ lam_g).permute(0, 2, 1, 3)  # [b, k, K, dh]
        if mu.q or mu.k or head_keys:
            # softmax sensitivity δ_ij = α_ij (v_j − z_i)·λ_i
            v_lam = (lam_g @ v.transpose(-1, -2)).view(b, K, G, n, n)  # v_j·λ_i
            if head_keys:
                keys = (alpha * v_lam).reshape(b, H, n, n)
            # in place, δ = α ⊙ (v_j·λ_i − z_i·λ_i): the largest tensors of the sweep
            delta = v_lam.sub_(head_score.permute(0, 2, 1).reshape(b, K, G, n, 1)).mul_(alpha)
            del v_lam
            scale = view.attn_scale(layer)
            q_g = q_rot.view(b, n, K, G, dh).permute(0, 2, 3, 1, 4).reshape(b, K, G * n, dh)
            k_g = k_rot.permute(0, 2, 1, 3)  # [b, K, k, dh]
            if self.rules.attn_softcap is not None:  # the soft cap on the scores, by its secant
                raw = (q_g @ k_g.transpose(-1, -2)).view(b, K, G, n, n) / scale
                delta.mul_(softcap_ratio(raw, self.rules.attn_softcap))
                del raw
            delta_flat = delta.reshape(b, K, G * n, n)
            grad_q = ((delta_flat @ k_g) / scale).view(b, K, G, n, dh).permute(0, 3, 1, 2, 4).reshape(b, n, H, dh)
            grad_k = ((delta_flat.transpose(-1, -2) @ q_g) / scale).permute(0, 2, 1, 3)  # [b, k, K, dh]
            delta_by_head = delta if readers else None
            del delta, delta_flat
            if rot is not None:
                grad_q = unrotate(grad_q, *rot, view.adjacent_pairs)
                grad_k = unrotate(grad_k, *rot, view.adjacent_pairs)
            if self.rules.qk_norm:  # through the query and key norms, scales frozen
                grad_q = pull_norm(grad_q, view.qk_norm_scale(fwd.cache, layer, "q", b, n).to(grad_q).float(),
                                   view.qk_norm_weight(layer, "q"), center=False)
                grad_k = pull_norm(grad_k, view.qk_norm_scale(fwd.cache, layer, "k", b, n).to(grad_k).float(),
                                   view.qk_norm_weight(layer, "k"), center=False)
        else:  # content only: the query and key paths carry nothing
            grad_q = torch.zeros(b, n, H, dh, device=t.device)
            grad_k = torch.zeros(b, n, K, dh, device=t.device)
            delta_by_head = None
        # the value bias reaches z unchanged (each query's weights sum to one): an output bias, at full
        # weight, as TransformerLens's fold_value_biases books it on processed models
        for weight, grad_, bias_ in ((mu.q, grad_q, a.b_Q), (mu.k, grad_k, a.b_K), (1.0, grad_v, a.b_V)):
            if bias_ is not None:
                bias = bias + weight * (grad_ * bias_).sum(dim=(1, 2, 3))
        if readers:
            split = self._readers(layer, a, alpha, lam, grad_q, q_rot, delta_by_head, rot)
            return AttentionStep(update=split.sum(dim=(2, 3)), heads=head_score, head_keys=keys, bias=bias, readers=split)
        paths = torch.cat(
            [(mu.q * grad_q).reshape(b, n, H * dh), (mu.k * grad_k).reshape(b, n, K * dh), (mu.v * grad_v).reshape(b, n, K * dh)],
            dim=-1,
        )
        W = torch.cat(
            [a.W_Q.transpose(1, 2).reshape(H * dh, -1), a.W_K.transpose(1, 2).reshape(K * dh, -1), a.W_V.transpose(1, 2).reshape(K * dh, -1)],
            dim=0,
        )
        return AttentionStep(update=self.in_norm(paths @ W, layer, "ln1"), heads=head_score, head_keys=keys, bias=bias)

    def _readers(self, layer: int, a, alpha: Tensor, lam: Tensor, grad_q: Tensor, q_rot: Tensor, delta: Tensor | None,
                 rot: tuple[Tensor, Tensor] | None) -> Tensor:
        """The attention update split by reader, ``[batch, pos, head, (q, k, v), d_model]``: each query
        head's query path, and the key and value paths it pulls through its (shared) key/value head."""
        view, mu, b, n = self.view, self.mu, self.b, self.n
        H, K, dh = view.n_heads, view.n_kv_heads, view.d_head
        G = H // K
        lam_h = lam.view(b, n, K, G, dh).permute(0, 2, 3, 1, 4)  # [b, K, G, q, dh]
        grad_v = torch.einsum("bkgqj,bkgqe->bjkge", alpha, lam_h).reshape(b, n, H, dh)
        if delta is not None:
            q_h = q_rot.view(b, n, K, G, dh).permute(0, 2, 3, 1, 4)
            grad_k = torch.einsum("bkgqj,bkgqe->bjkge", delta, q_h).reshape(b, n, H, dh) / view.attn_scale(layer)
            if rot is not None:
                grad_k = unrotate(grad_k, *rot, view.adjacent_pairs)
            if self.rules.qk_norm:
                scale = view.qk_norm_scale(self.fwd.cache, layer, "k", b, n).to(grad_k).float().repeat_interleave(G, dim=2)
                grad_k = pull_norm(grad_k, scale, view.qk_norm_weight(layer, "k"), center=False)
        else:
            grad_k = torch.zeros_like(grad_v)
        expand = lambda W: W.repeat_interleave(G, dim=0)  # noqa: E731  [K, d, dh] -> [H, d, dh]
        split = torch.stack([
            torch.einsum("bnhe,hde->bnhd", mu.q * grad_q, a.W_Q),
            torch.einsum("bnhe,hde->bnhd", mu.k * grad_k, expand(a.W_K)),
            torch.einsum("bnhe,hde->bnhd", mu.v * grad_v, expand(a.W_V)),
        ], dim=3)  # [b, n, H, 3, d]
        scale = self.view.stream_scale(self.fwd.act(hooks.norm_scale(layer, "ln1")))[:, :, None, None]  # [b, n, 1, 1, 1]
        return pull_norm(split, scale, self.view.norm_weight("ln1", layer), center=self.rules.norm == "ln")
