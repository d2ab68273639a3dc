"""EAP-IG written from its definition on the untouched ``transformers`` Llama, in float64 with plain autograd,
independent of dpa_lens and of TransformerLens.

The forward is the Llama forward written out (RMSNorm, rotary, grouped-query attention, SwiGLU), with every
reader reading its own copy of the stream, ``x + e_r`` (``e_r`` a zero leaf that requires grad, added before the
reader's norm; with grouped-query attention each query head has its own copy for its key and value reads too).
An edge ``u → r`` scores ``Σ_{b, p} (out_u(clean) − out_u(corrupted)) · ḡ_r`` with ``ḡ_r`` the mean of ``∂f/∂e_r`` over:

* ``"inputs"``: the runs whose token embeddings are ``e' + (k/S)(e − e')``, ``k = 0 … S−1``;
* ``"activations"``: the runs of the clean prompt in which one group (the embeddings, a layer's heads together,
  a layer's MLP) outputs the constant ``(k/S)·clean + (1 − k/S)·corrupted``, ``k = 1 … S`` (a constant: no
  gradient flows back through it), over every group; in the runs that replace the embeddings, the first layer's
  heads read that constant alone (Llama has no learned positions) and count no gradient, as in the reference
  implementation, whose gradient hooks fire only on tensors that require grad.

Writers: ``embed`` (the token embedding), ``L{l}H{h}`` (``z_h W_O[h]``), ``L{l}.mlp`` (the MLP's output).
"""

from __future__ import annotations

import torch
from torch import Tensor

DT = torch.float64


def _w(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + turned * sin[:, :, None]


class Llama:
    """The forward of a ``LlamaForCausalLM`` with private reader copies; ``run`` returns the logits, the reader
    leaves ``{(reader, path): e_r}``, the writers' outputs and the embedding the blocks received (a leaf)."""

    def __init__(self, hf) -> None:
        self.hf, self.cfg = hf, hf.config
        c = self.cfg
        self.H, self.K, self.d = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
        self.dh = getattr(c, "head_dim", None) or self.d // self.H

    def embed(self, ids: Tensor) -> Tensor:
        return _w(self.hf.model.embed_tokens.weight)[ids]

    def run(self, ids: Tensor, embed: Tensor | None = None, replace: dict | None = None):
        inner, c = self.hf.model, self.cfg
        H, G, d, dh, eps = self.H, self.H // self.K, self.d, self.dh, c.rms_norm_eps
        replace = replace or {}
        b, n = ids.shape
        x0 = (self.embed(ids) if embed is None else embed).detach().clone().requires_grad_(True)
        outs = {"embed": x0.detach()}
        x = replace.get("embed", x0)
        leaves: dict[tuple[str, str], Tensor] = {}
        cos, sin = (t.to(DT) for t in inner.rotary_emb(x0.detach().float(), torch.arange(n)[None].expand(b, -1)))
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for li, layer in enumerate(inner.layers):
            at = layer.self_attn
            reads = {}
            for path, lin in (("q", at.q_proj), ("k", at.k_proj), ("v", at.v_proj)):
                e = torch.zeros(b, n, H, d, dtype=DT, requires_grad=True)
                leaves.update({(f"L{li}H{h}", path): (e, h) for h in range(H)})
                W = _w(lin.weight).view(-1, dh, d)
                W = W.repeat_interleave(G, dim=0) if path != "q" else W
                reads[path] = torch.einsum("bnhd,hed->bnhe", _rms(x[:, :, None] + e, _w(layer.input_layernorm.weight), eps), W)
            q, k = _rotate(reads["q"], cos, sin), _rotate(reads["k"], cos, sin)
            scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * dh**-0.5
            pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            z = torch.einsum("bhqk,bkhe->bqhe", pattern, reads["v"])
            heads = torch.einsum("bnhe,dhe->bnhd", z, _w(at.o_proj.weight).view(d, H, dh))
            outs.update({f"L{li}H{h}": heads[:, :, h].detach() for h in range(H)})
            heads = replace.get(("attn", li), heads)
            x = x + heads.sum(2)
            e = torch.zeros(b, n, d, dtype=DT, requires_grad=True)
            leaves[(f"L{li}.mlp", "mlp")] = (e, None)
            xn = _rms(x + e, _w(layer.post_attention_layernorm.weight), eps)
            mlp = layer.mlp
            out = (torch.nn.functional.silu(xn @ _w(mlp.gate_proj.weight).T) * (xn @ _w(mlp.up_proj.weight).T)) @ _w(mlp.down_proj.weight).T
            outs[f"L{li}.mlp"] = out.detach()
            x = x + replace.get(("mlp", li), out)
        e = torch.zeros(b, n, d, dtype=DT, requires_grad=True)
        leaves[("logit", "logit")] = (e, None)
        logits = _rms(x + e, _w(inner.norm.weight), eps) @ _w(self.hf.lm_head.weight).T
        return logits, leaves, outs, x0


def _grads(leaves: dict) -> dict:
    out = {}
    for key, (e, h) in leaves.items():
        g = e.grad if e.grad is not None else torch.zeros_like(e)
        out[key] = g[:, :, h] if h is not None else g
    return out


def eap_ig(hf, clean: Tensor, corrupted: Tensor, metric, mode: str, steps: int):
    """``({(writer, reader, path): score}, f(clean) − f(corrupted), Σ_k Δ_embed · ∂f/∂embed / S)`` (the last: the
    integrated gradients of the token embeddings, inputs form only)."""
    net = Llama(hf)
    with torch.no_grad():
        logits_c, _, out_c, _ = net.run(clean)
        logits_x, _, out_x, _ = net.run(corrupted)
    target = metric(logits_c) - metric(logits_x)
    deltas = {u: out_c[u] - out_x[u] for u in out_c}
    runs = []
    if mode == "inputs":
        e_c, e_x = net.embed(clean), net.embed(corrupted)
        runs = [{"embed": e_x + (k / steps) * (e_c - e_x)} for k in range(steps)]
    else:
        groups = ["embed"] + [(kind, li) for li in range(len(hf.model.layers)) for kind in ("attn", "mlp")]

        def stacked(out, g):
            if g == "embed":
                return out["embed"]
            if g[0] == "attn":
                return torch.stack([out[f"L{g[1]}H{h}"] for h in range(net.H)], dim=2)
            return out[f"L{g[1]}.mlp"]

        runs = [{"replace": {g: (k / steps) * stacked(out_c, g) + (1 - k / steps) * stacked(out_x, g)}}
                for g in groups for k in range(1, steps + 1)]
    total: dict = {}
    ig_embed = torch.zeros((), dtype=DT)
    for r in runs:
        logits, leaves, _, x0 = net.run(clean if mode == "activations" else corrupted, embed=r.get("embed"), replace=r.get("replace"))
        metric(logits).sum().backward()
        for key, g in _grads(leaves).items():
            if "embed" in r.get("replace", {}) and key[0].startswith("L0H"):  # they read the constant alone (rotary: no positions)
                g = torch.zeros_like(g)
            total[key] = total.get(key, 0) + g / len(runs)
        if mode == "inputs":
            ig_embed = ig_embed + (deltas["embed"] * x0.grad).sum() / len(runs)
    scores = {(u, r, p): float((deltas[u] * g).sum()) for u in deltas for (r, p), g in total.items()}
    return scores, float(target.sum()), float(ig_embed)
