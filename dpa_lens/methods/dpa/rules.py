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
from torch.profiler import record_function

from dpa_lens.forward import CachedForward
from dpa_lens.methods.dpa.attention_blocks import head_paths
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.models import hooks
from dpa_lens.ops import activation, heads_in, heads_out, pull_norm, unrotate
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
        with record_function("dpa.mlp"):
            return self._mlp(layer, t)

    def _mlp(self, layer: int, t: Tensor) -> MLPStep:
        t = t.to(self.fwd.layer_device(layer))  # a split model: the step runs where the layer's weights are
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
            # content path through W_in, control path through W_gate (secant slope)
            used = [("in", mu.up, (lam * a).view(-1, a.shape[-1]), w.W_in.T)] if mu.up else []
            used += [("gate", mu.gate, (lam * u).mul_(slope).view(-1, a.shape[-1]), w.W_gate.T)] if mu.gate else []
        else:  # a plain MLP has one path, post = (act(s)/s)·s with the slope frozen, at full weight
            post, slope = activation(self.rules.act, act(hooks.mlp(layer, "pre")))
            grad_pre = lam * slope
            if w.b_in is not None:
                bias = bias + (grad_pre @ w.b_in).sum(-1)
            used = [("in", 1.0, grad_pre.view(-1, grad_pre.shape[-1]), w.W_in.T)]
        update = self._products(layer, "mlp", used, t.new_zeros(self.b * self.n, t.shape[-1])).view_as(t)
        return MLPStep(update=self.in_norm(update, layer, "ln2"), post=post, lam=lam, bias=bias)

    def neuron_targets(self, layer: int, t: Tensor) -> Float[Tensor, "batch pos d_mlp"]:
        """``W_out t`` of a layer's neurons for a target ``t`` at the MLP's output stream."""
        return self.out_norm(t.to(self.fwd.layer_device(layer)), layer, "ln2_post") @ self.view.mlp(layer).W_out.T

    # ------------------------------------------------------------------ attention
    def attention(self, layer: int, t: Tensor, *, head_keys: bool = False, readers: bool = False,
                  head_mask: Tensor | None = None) -> AttentionStep:
        """The attention's update of the target at its input stream, from the target ``t`` at its output.

        ``readers=True`` also splits the update by reader (each query head's q, k, v input; grouped
        key/value heads are split by the query head that pulled them). ``head_mask [head]`` (0/1)
        keeps only some heads: the target at one head's output (rerooting at a head). On a split model the
        steps run on the layer's device (`CachedForward.layer_device`), where they return what they compute."""
        view, mu, b, n, fwd = self.view, self.mu, self.b, self.n, self.fwd
        t = t.to(fwd.layer_device(layer))
        H, K, dh = view.n_heads, view.n_kv_heads, view.d_head
        G = H // K
        a = view.attn(layer)
        t_out = self.out_norm(t, layer, "ln1_post")
        q_rot, k_rot = fwd.queries_keys(layer)
        rot = fwd.rotary(layer)
        v = fwd.act(hooks.attn(layer, "v"))  # [b, k, K, dh]
        z = fwd.act(hooks.attn(layer, "z"))  # [b, q, H, dh]
        if a.b_V is not None:  # heads and keys score the values without their bias, an output bias (see below)
            v = v - a.b_V
            z = z - self.fwd.pattern_mass(layer)[..., None] * a.b_V.repeat_interleave(G, dim=0)
        lam = (t_out @ heads_out(a.W_O).T).view(b, n, H, dh)  # W_O t per head
        if head_mask is not None:
            lam = lam * head_mask.to(lam)[None, None, :, None]
        bias = (t_out @ a.b_O).sum(-1) if a.b_O is not None else torch.zeros(b, device=t.device)
        control = bool(mu.q or mu.k)
        # value path Σ_i α_ij λ_i; query and key paths from δ_ij = α_ij (v_j − z_i)·λ_i; block by block
        paths = head_paths(fwd, layer, q_rot, k_rot, v, z, lam, control=control, head_keys=head_keys)
        head_score = paths.heads  # [b, q, H]
        if control:
            grad_q = self._pull_qk(paths.query, layer, "q", rot)  # [b, q, H, dh]
            grad_k_h = paths.key  # [b, k, H, dh], per query head (rotated, normed space)
            grad_k = self._pull_qk(grad_k_h.view(b, n, K, G, dh).sum(3), layer, "k", rot)
        else:  # content only: the query and key paths carry nothing
            grad_q = torch.zeros(b, n, H, dh, device=t.device)
            grad_k_h, grad_k = None, torch.zeros(b, n, K, dh, device=t.device)
        grad_v = paths.value.view(b, n, K, G, dh).sum(3)  # [b, k, K, dh]: summed over the query heads sharing it
        # the value bias reaches z unchanged (each query's weights sum to one): an output bias, at full
        # weight, as TransformerLens's fold_value_biases books it on processed models
        for weight, grad_, bias_ in ((mu.q, grad_q, a.b_Q), (mu.k, grad_k, a.b_K), (1.0, grad_v, a.b_V)):
            if bias_ is not None:
                bias = bias + weight * (grad_ * bias_).sum(dim=(1, 2, 3))
        if readers:
            with record_function("dpa.attention.readers"):
                split = self._readers(layer, a, grad_q, grad_k_h, paths.value, rot)
            if fwd.weight_probe is not None:  # the split reads W_Q, W_K, W_V per head: the probe's row alone through them
                terms = [(which, w, g[:0], W) for which, w, g, W in self._qkv_terms(a, grad_q, grad_k, grad_v)]
                self._products(layer, "attn", terms, grad_q.new_zeros(0, a.W_Q.shape[1]))
            return AttentionStep(update=split.sum(dim=(2, 3)), heads=head_score, head_keys=paths.head_keys, bias=bias,
                                 readers=split)
        with record_function("dpa.attention.projections"):
            return self._project(layer, a, grad_q, grad_k, grad_v, head_score, paths.head_keys, bias)

    def _project(self, layer: int, a, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, head_score: Tensor,
                 head_keys: Tensor | None, bias: Tensor) -> AttentionStep:
        """The three paths through W_Q, W_K, W_V and the input norm, weighted by ``mu``."""
        b, n, d = self.b, self.n, a.W_Q.shape[1]
        update = self._products(layer, "attn", self._qkv_terms(a, grad_q, grad_k, grad_v), grad_q.new_zeros(b * n, d)).view(b, n, d)
        return AttentionStep(update=self.in_norm(update, layer, "ln1"), heads=head_score, head_keys=head_keys, bias=bias)

    def _qkv_terms(self, a, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor) -> list[tuple[str, float, Tensor, Tensor]]:
        """`_products`' terms of the query, key and value paths: ``(which, mu, grad [rows, heads·d_head], W [heads·d_head, d])``
        (``grad_q [b, pos, H, d_head]``, ``grad_k``, ``grad_v [b, pos, K, d_head]``)."""
        mu, H, K, dh = self.mu, self.view.n_heads, self.view.n_kv_heads, self.view.d_head
        return [(which, weight, grad_.reshape(-1, heads * dh), heads_in(W).T)
                for which, weight, grad_, W, heads in (("q", mu.q, grad_q, a.W_Q, H), ("k", mu.k, grad_k, a.W_K, K),
                                                        ("v", mu.v, grad_v, a.W_V, K))
                if weight]

    def _products(self, layer: int, block: str, used: list[tuple[str, float, Tensor, Tensor]], zero: Tensor) -> Tensor:
        """``Σ w_i g_i @ W_i`` over ``(which, w_i, g_i [rows, k_i], W_i [k_i, d])``; with the forward's weight
        probe (`dpa_lens.validation.WeightProbe`), one random row more in each ``g_i``, whose output it keeps."""
        if not used:
            return zero
        probe = self.fwd.weight_probe
        terms = [(w, g, W) for _, w, g, W in used]
        if probe is None:
            return _sum_of_products(terms)
        rows = probe.rows(layer, block, [(which, w, g.shape[-1]) for which, w, g, _ in used], used[0][2].device)
        out = None
        for (w, g, W), r in zip(terms, rows):  # each input with its extra row, in the probe's reused buffer
            x = probe.with_row(g, r)
            out = _sum_of_products([(w, x, W)]) if out is None else out.addmm_(x, W, alpha=w)
        probe.record(layer, block, out[-1].clone())  # not a view: the products' output is not held
        return out[:-1]

    def _pull_qk(self, grad: Tensor, layer: int, which: str, rot: tuple[Tensor, Tensor] | None) -> Tensor:
        """From the rotated, normed query or key back to the projection's output (rotary undone,
        through the query/key norm with its scale frozen). ``grad [b, pos, heads, d_head]``."""
        view = self.view
        if rot is not None:
            grad = unrotate(grad, *rot, view.adjacent_pairs)
        if self.rules.qk_norm:
            scale = view.qk_norm_scale(self.fwd.cache, layer, which, self.b, self.n, heads=grad.shape[2]).to(grad).float()
            grad = pull_norm(grad, scale, view.qk_norm_weight(layer, which), center=False)
        return grad

    def _readers(self, layer: int, a, grad_q: Tensor, grad_k_h: Tensor | None, grad_v_h: Tensor,
                 rot: tuple[Tensor, Tensor] | None) -> Tensor:
        """The attention update split by reader, ``[batch, pos, head, (q, k, v), d_model]``: each query
        head's query path, and the key and value paths it pulls through its (shared) key/value head."""
        view, mu = self.view, self.mu
        G = view.n_heads // view.n_kv_heads
        grad_k = torch.zeros_like(grad_v_h) if grad_k_h is None else self._pull_qk(grad_k_h, layer, "k", rot)
        expand = lambda W: W.repeat_interleave(G, dim=0)  # noqa: E731  [K, d, dh] -> [H, d, dh]
        split = torch.stack([
            torch.einsum("bnhe,hde->bnhd", mu.q * grad_q, a.W_Q),
            torch.einsum("bnhe,hde->bnhd", mu.k * grad_k, expand(a.W_K)),
            torch.einsum("bnhe,hde->bnhd", mu.v * grad_v_h, expand(a.W_V)),
        ], dim=3)  # [b, n, H, 3, d]
        scale = self.view.stream_scale(self.fwd.act(hooks.norm_scale(layer, "ln1")))[:, :, None, None]  # [b, n, 1, 1, 1]
        return pull_norm(split, scale, self.view.norm_weight("ln1", layer), center=self.rules.norm == "ln")


def _sum_of_products(terms: list[tuple[float, Tensor, Tensor]]) -> Tensor:
    """``Σ w·(x @ W)`` over ``(w, x [rows, k_i], W [k_i, d])`` terms, accumulated in place: no concatenated
    copy of the weights (at short inputs reading the weights is most of the cost), and each weight applied
    to the ``d``-wide product rather than to its input."""
    (w, x, W), *rest = terms
    out = x @ W
    if w != 1:
        out.mul_(w)
    flat = out.view(-1, out.shape[-1])
    for w, x, W in rest:
        flat.addmm_(x.reshape(-1, x.shape[-1]), W, alpha=w)
    return out
