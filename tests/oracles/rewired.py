"""An autograd oracle for DPA, independent of dpa_lens and of TransformerLens.

DPA is the gradient of a re-wired forward pass (Jantsch et al. 2026; README, "How it is tested"): a forward whose values equal
the model's, but whose autograd graph has every norm scale detached (LayerNorm keeps its centring),
``post = μ_up·act(g)̄·u + μ_gate·slope(g)̄·g·ū`` in a gated MLP (slope = act(g)/g, the secant),
``post = slope(s)̄·s`` in a plain MLP, soft caps replaced by their secant,
``scores = μ_q·(q·k̄) + μ_k·(q̄·k) + (1−μ_q−μ_k)·(q̄·k̄)`` and ``z = μ_v·(ᾱ v) + α v̄ − μ_v·(ᾱ v̄)``
(bar = detached). This module writes that forward from the raw ``transformers`` weights of each
supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, GPT-2, GPT-NeoX), in float64, and reads
every DPA score off ``torch.autograd`` as activation × gradient of that activation:

* tokens: the residual stream entering the first block (embedding, plus learned positions);
* heads: each head's contribution to the residual stream (after the output norm, if any);
* neurons: each MLP neuron's activation (its gradient carries W_out and any output norm).

Biases are leaves too, split per batch row. The value bias is booked as the output bias it amounts
to (attention weights sum to one), and LayerNorm's β as the biases of the maps that read it, as
TransformerLens's weight processing does. The only pieces taken from the model's code are its rotary
cos/sin (constants, not re-wired); the test checks that the oracle's logits are the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

DT = torch.float64


@dataclass
class OracleScores:
    logits: Tensor  # [batch, pos, vocab]: the re-wired forward's (= the model's) logits
    value: Tensor  # [batch] the target quantity
    tokens: Tensor  # [batch, pos]
    heads: Tensor  # [batch, layer, pos, head]
    neurons: Tensor  # [batch, layer, pos, d_mlp]  (against resid_post, the paper)
    neurons_mid: Tensor | None  # [batch, layer, pos, d_mlp]  (against resid_mid, the authors' code)
    head_keys: Tensor  # [batch, layer, head, q, k]
    bias: Tensor  # [batch]
    grad_resid_pre: list[Tensor]  # per layer [batch, pos, d_model]
    grad_resid_mid: list[Tensor]  # per layer (sequential blocks only)


def slope(act: str, x: Tensor) -> Tensor:
    """act(x)/x for the activations of the supported families."""
    if act in ("silu", "swish"):
        return torch.sigmoid(x)
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(x / 2**0.5))
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * (1.0 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    raise NotImplementedError(act)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, n, h, dh]; cos/sin [b, n, r]: rotate the first r dimensions."""
    r = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x[..., :r] * c + _rotate_half(x[..., :r]) * s, x[..., r:]], dim=-1)


@dataclass
class _Rewired:
    """The re-wired pieces, and the leaves and records they leave behind."""

    mu: tuple[float, float, float, float, float]
    b: int
    bias_leaves: list[Tensor] = field(default_factory=list)
    heads: list[Tensor] = field(default_factory=list)  # per layer [b, n, H, d] contributions
    posts: list[Tensor] = field(default_factory=list)
    head_parts: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)  # (α, v, z with its gradient kept)
    w_outs: list[Tensor] = field(default_factory=list)  # MLP output weights [d_mlp, d] of sequential blocks without output norms
    pres: list[Tensor] = field(default_factory=list)
    mids: list[Tensor] = field(default_factory=list)

    def leaf(self, vec: Tensor) -> Tensor:
        leaf = vec.to(DT).reshape(1, 1, -1).repeat(self.b, 1, 1).requires_grad_(True)
        self.bias_leaves.append(leaf)
        return leaf

    @staticmethod
    def rms(x: Tensor, gain: Tensor, eps: float) -> Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps).detach() * gain

    @staticmethod
    def ln(x: Tensor, gain: Tensor, eps: float) -> Tensor:
        centred = x - x.mean(-1, keepdim=True)  # the centring is linear: kept
        return centred / torch.sqrt((centred * centred).mean(-1, keepdim=True) + eps).detach() * gain

    def attention(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, scaling: float, softcap: float | None) -> Tensor:
        """q [b, n, H, dh], k/v [b, n, H, dh] (already repeated for GQA): z [b, n, H, dh]."""
        mq, mk, mv = self.mu[:3]
        qd, kd = q.detach(), k.detach()
        s = (mq * torch.einsum("bqhe,bkhe->bhqk", q, kd) + mk * torch.einsum("bqhe,bkhe->bhqk", qd, k)
             + (1 - mq - mk) * torch.einsum("bqhe,bkhe->bhqk", qd, kd)) * scaling
        if softcap is not None:
            raw = s.detach()
            s = (softcap * torch.tanh(raw / softcap) / raw) * s  # the secant: values exact, slope frozen
        alpha = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        ad, vd = alpha.detach(), v.detach()
        z = mv * torch.einsum("bhqk,bkhe->bqhe", ad, v) + torch.einsum("bhqk,bkhe->bqhe", alpha, vd) - mv * torch.einsum("bhqk,bkhe->bqhe", ad, vd)
        z.retain_grad()  # ∂F/∂z_i splits a head's score over key positions: α_ij v_j · ∂F/∂z_i
        self.head_parts.append((alpha.detach(), vd, z))
        return z

    def heads_out(self, z: Tensor, W_O: Tensor, out_norm=None) -> Tensor:
        """Per-head contributions [b, n, H, d] (a leaf of the scores), summed into the stream."""
        H, dh = z.shape[2], z.shape[3]
        contrib = torch.einsum("bqhe,hed->bqhd", z, W_O.reshape(H, dh, -1))
        if out_norm is not None:
            contrib = out_norm(contrib)
        contrib.retain_grad()
        self.heads.append(contrib)
        return contrib.sum(2)

    def gated(self, g: Tensor, u: Tensor, act: str) -> Tensor:
        mgate, mup = self.mu[3], self.mu[4]
        sl = slope(act, g).detach()
        post = mup * (g.detach() * sl) * u + mgate * sl * g * u.detach()
        post.retain_grad()
        self.posts.append(post)
        return post

    def plain(self, s: Tensor, act: str) -> Tensor:
        post = slope(act, s).detach() * s
        post.retain_grad()
        self.posts.append(post)
        return post


def _p(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def _mask(n: int, window: int | None, device) -> Tensor:
    i = torch.arange(n, device=device)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    return allowed[None, None]


def _llama_like(hf_model, ids: Tensor, R: _Rewired) -> Tensor:
    """Llama, Mistral, Qwen2, Qwen3 and Gemma 2/3 (query-key norms, output norms, soft caps, windows)."""
    cfg, inner = hf_model.config, hf_model.model
    arch = type(hf_model).__name__
    gemma = arch.startswith("Gemma")
    b, n = ids.shape
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    eps = cfg.rms_norm_eps
    act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    gain = (lambda w: 1.0 + _p(w)) if gemma else _p  # Gemma stores w for a gain of 1 + w
    x = _p(inner.embed_tokens.weight)[ids]
    if gemma:
        x = x * torch.tensor(cfg.hidden_size**0.5, dtype=hf_model.dtype).to(DT)
    x = x.clone().requires_grad_(True)
    embed = x
    positions = torch.arange(n, device=ids.device)[None].expand(b, -1)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    rope = {}
    for kind in set(layer_types):
        args = (x.detach().float(), positions) + ((kind,) if arch == "Gemma3ForCausalLM" else ())
        cos, sin = inner.rotary_emb(*args)
        rope[kind] = (cos.to(DT), sin.to(DT))
    for li, layer in enumerate(inner.layers):
        x.retain_grad()
        R.pres.append(x)
        at = layer.self_attn
        h = R.rms(x, gain(layer.input_layernorm.weight), eps)

        def proj(lin, heads):
            out = h @ _p(lin.weight).T
            if lin.bias is not None:
                out = out + R.leaf(_p(lin.bias))
            return out.view(b, n, heads, dh)

        q, k = proj(at.q_proj, H), proj(at.k_proj, K)
        v = (h @ _p(at.v_proj.weight).T).view(b, n, K, dh)
        if getattr(at, "q_norm", None) is not None:  # query-key norm, per head, before rotary
            q, k = R.rms(q, gain(at.q_norm.weight), eps), R.rms(k, gain(at.k_norm.weight), eps)
        cos, sin = rope[layer_types[li]]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        G = H // K
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
        window = cfg.sliding_window if layer_types[li] == "sliding_attention" or (arch == "MistralForCausalLM" and cfg.sliding_window) else None
        scaling = getattr(at, "scaling", dh**-0.5)
        z = R.attention(q, k, v, _mask(n, window, ids.device), scaling, getattr(cfg, "attn_logit_softcapping", None))
        W_O = _p(at.o_proj.weight).T  # [H*dh, d]
        out_norm = (lambda c, w=layer.post_attention_layernorm.weight: R.rms(c, gain(w), eps)) if gemma else None
        if out_norm is not None:  # an output norm with a frozen scale is linear: apply it per head, scale of the sum
            total = torch.einsum("bqhe,hed->bqd", z.detach(), W_O.reshape(H, dh, -1))
            scale = torch.sqrt((total * total).mean(-1, keepdim=True) + eps).detach()
            out_norm = lambda c, w=layer.post_attention_layernorm.weight, scale=scale: c / scale[:, :, None] * gain(w)  # noqa: E731
        attn_out = R.heads_out(z, W_O, out_norm)
        if at.v_proj.bias is not None:  # value bias = an output bias
            attn_out = attn_out + R.leaf(_p(at.o_proj.weight) @ _p(at.v_proj.bias).view(K, dh).repeat_interleave(G, dim=0).reshape(-1))
        if at.o_proj.bias is not None:
            attn_out = attn_out + R.leaf(_p(at.o_proj.bias))
        x = x + attn_out
        x.retain_grad()
        R.mids.append(x)
        ml = layer.mlp
        h2 = R.rms(x, gain((layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm).weight), eps)
        post = R.gated(h2 @ _p(ml.gate_proj.weight).T, h2 @ _p(ml.up_proj.weight).T, act)
        mlp_out = post @ _p(ml.down_proj.weight).T
        if gemma:
            mlp_out = R.rms(mlp_out, gain(layer.post_feedforward_layernorm.weight), eps)
        else:
            R.w_outs.append(_p(ml.down_proj.weight).T)
        x = x + mlp_out
    x = R.rms(x, gain(inner.norm.weight), eps)
    logits = x @ _p(hf_model.lm_head.weight).T
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        raw = logits.detach()
        logits = (cap * torch.tanh(raw / cap) / raw) * logits
    return embed, logits


def _gpt2(hf_model, ids: Tensor, R: _Rewired) -> Tensor:
    cfg, tr = hf_model.config, hf_model.transformer
    b, n = ids.shape
    H = cfg.n_head
    d = cfg.n_embd
    dh = d // H
    eps = cfg.layer_norm_epsilon
    x = (_p(tr.wte.weight)[ids] + _p(tr.wpe.weight)[:n][None]).clone().requires_grad_(True)
    embed = x
    for block in tr.h:
        x.retain_grad()
        R.pres.append(x)
        h = R.ln(x, _p(block.ln_1.weight), eps)
        beta = _p(block.ln_1.bias)
        W = _p(block.attn.c_attn.weight)  # [d, 3d] (Conv1D: y = x W + b)
        bias = _p(block.attn.c_attn.bias) + beta @ W  # LayerNorm's β enters through the maps reading it
        q = (h @ W[:, :d] + R.leaf(bias[:d])).view(b, n, H, dh)
        k = (h @ W[:, d : 2 * d] + R.leaf(bias[d : 2 * d])).view(b, n, H, dh)
        v = (h @ W[:, 2 * d :]).view(b, n, H, dh)
        z = R.attention(q, k, v, _mask(n, None, ids.device), dh**-0.5, None)
        W_O = _p(block.attn.c_proj.weight)  # [d, d]
        attn_out = R.heads_out(z, W_O)
        attn_out = attn_out + R.leaf(_p(block.attn.c_proj.bias) + bias[2 * d :] @ W_O)  # value bias -> output bias
        x = x + attn_out
        x.retain_grad()
        R.mids.append(x)
        h2 = R.ln(x, _p(block.ln_2.weight), eps)
        W_in = _p(block.mlp.c_fc.weight)
        s = h2 @ W_in + R.leaf(_p(block.mlp.c_fc.bias) + _p(block.ln_2.bias) @ W_in)
        post = R.plain(s, cfg.activation_function)
        R.w_outs.append(_p(block.mlp.c_proj.weight))
        x = x + post @ _p(block.mlp.c_proj.weight) + R.leaf(_p(block.mlp.c_proj.bias))
    h = R.ln(x, _p(tr.ln_f.weight), eps)
    W_U = _p(hf_model.lm_head.weight).T
    return embed, h @ W_U + R.leaf(_p(tr.ln_f.bias) @ W_U)


def _neox(hf_model, ids: Tensor, R: _Rewired) -> Tensor:
    cfg, nx = hf_model.config, hf_model.gpt_neox
    b, n = ids.shape
    H = cfg.num_attention_heads
    d = cfg.hidden_size
    dh = d // H
    eps = cfg.layer_norm_eps
    x = _p(nx.embed_in.weight)[ids].clone().requires_grad_(True)
    embed = x
    cos, sin = nx.rotary_emb(x.detach().float(), torch.arange(n)[None].expand(b, -1))
    cos, sin = cos.to(DT), sin.to(DT)
    for layer in nx.layers:
        x.retain_grad()
        R.pres.append(x)
        at = layer.attention
        h = R.ln(x, _p(layer.input_layernorm.weight), eps)
        W = _p(at.query_key_value.weight).view(H, 3, dh, d)  # rows grouped per head: (q, k, v)
        bias = (_p(at.query_key_value.bias) + _p(layer.input_layernorm.bias) @ _p(at.query_key_value.weight).T).view(H, 3, dh)
        q = torch.einsum("bnd,hed->bnhe", h, W[:, 0]) + R.leaf(bias[:, 0].reshape(-1)).view(b, 1, H, dh)
        k = torch.einsum("bnd,hed->bnhe", h, W[:, 1]) + R.leaf(bias[:, 1].reshape(-1)).view(b, 1, H, dh)
        v = torch.einsum("bnd,hed->bnhe", h, W[:, 2])
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        z = R.attention(q, k, v, _mask(n, None, ids.device), dh**-0.5, None)
        W_O = _p(at.dense.weight).T  # [H*dh, d]
        attn_out = R.heads_out(z, W_O)
        attn_out = attn_out + R.leaf(_p(at.dense.bias) + bias[:, 2].reshape(-1) @ W_O)
        h2 = R.ln(x, _p(layer.post_attention_layernorm.weight), eps)  # parallel: the MLP reads the block input
        W_in = _p(layer.mlp.dense_h_to_4h.weight).T
        s = h2 @ W_in + R.leaf(_p(layer.mlp.dense_h_to_4h.bias) + _p(layer.post_attention_layernorm.bias) @ W_in)
        post = R.plain(s, cfg.hidden_act)
        mlp_out = post @ _p(layer.mlp.dense_4h_to_h.weight).T + R.leaf(_p(layer.mlp.dense_4h_to_h.bias))
        x = x + attn_out + mlp_out
    h = R.ln(x, _p(nx.final_layer_norm.weight), eps)
    W_U = _p(hf_model.get_output_embeddings().weight).T
    return embed, h @ W_U + R.leaf(_p(nx.final_layer_norm.bias) @ W_U)


FORWARDS = {
    "LlamaForCausalLM": _llama_like,
    "MistralForCausalLM": _llama_like,
    "Qwen2ForCausalLM": _llama_like,
    "Qwen3ForCausalLM": _llama_like,
    "Gemma2ForCausalLM": _llama_like,
    "Gemma3ForCausalLM": _llama_like,
    "GPT2LMHeadModel": _gpt2,
    "GPTNeoXForCausalLM": _neox,
}


def rewired_scores(hf_model, input_ids: Tensor, direction_fn, *, mu: tuple[float, float, float, float, float], positions: Tensor) -> OracleScores:
    """Scores of the re-wired forward of a ``transformers`` model of a supported family.

    Args:
        direction_fn: ``logits [batch, pos, vocab] -> values [batch]`` picking the target quantity
            at ``positions`` (e.g. a logit, or a logit difference).
        mu: ``(q, k, v, gate, up)``.
    """
    b = input_ids.shape[0]
    R = _Rewired(mu=mu, b=b)
    embed, logits = FORWARDS[type(hf_model).__name__](hf_model, input_ids, R)
    value = direction_fn(logits)
    value.sum().backward()
    tokens = (embed * embed.grad).sum(-1)
    heads = torch.stack([(c.detach() * c.grad).sum(-1) for c in R.heads], 1)
    keys = torch.stack([torch.einsum("bhqk,bkhe,bqhe->bhqk", alpha, v, z.grad) for alpha, v, z in R.head_parts], 1)
    neurons = torch.stack([p.detach() * p.grad for p in R.posts], 1)
    neurons_mid = None
    if len(R.w_outs) == len(R.posts) == len(R.mids):  # sequential blocks without output norms
        neurons_mid = torch.stack([p.detach() * (m.grad @ w.T) for p, m, w in zip(R.posts, R.mids, R.w_outs)], 1)
    bias = torch.zeros(b, dtype=DT)
    for leaf in R.bias_leaves:
        bias = bias + (leaf * leaf.grad).sum(dim=(1, 2))
    return OracleScores(
        logits=logits.detach(),
        value=value.detach(),
        tokens=tokens.detach(),
        heads=heads,
        neurons=neurons,
        neurons_mid=neurons_mid,
        head_keys=keys,
        bias=bias.detach(),
        grad_resid_pre=[t.grad.detach() for t in R.pres],
        grad_resid_mid=[t.grad.detach() for t in R.mids],
    )
