"""A float64 reference for DePass (arXiv 2510.18462, a decomposed forward pass), independent of dpa_lens.

DePass splits the residual stream at some depth into parts that add up to it and pushes every part
through the rest of the network with everything non-linear frozen at the real forward's values:

* norms: the real input's ``1/rms`` (or ``1/std``) is applied to every part; LayerNorm centres each
  part (a linear map) and its β goes to the remainder;
* attention: the real pattern mixes each part's values (``W_V``), then ``W_O``; the value and
  output biases go to the remainder; Gemma's output norm applies the real output's frozen scale;
* MLP: each neuron's real output ``act(g)·u`` is shared out among the parts by a rule over their
  contributions ``g_c`` to its gate pre-activation (a plain MLP's only pre-activation ``s`` plays the
  gate; its input bias is the remainder's); see `mlp_shares`. ``taylor`` instead gives part c
  ``g_c·(act(g)/g)·u``, which is DPA's gate path with the up projection frozen;
* read-out: the final norm's frozen scale and the unembedding (Gemma 2's final soft cap by its
  secant), then a linear function of the logits (a logit, or a difference).

The last part is always the *remainder*: the real stream minus the other parts at the start, plus
every bias on the way, plus (``lost_to_remainder``) whatever share of a neuron a rule leaves
unassigned, so that the parts add up to the real residual stream at every layer. Token parts follow
the authors' code (``DePass/manager.py``, ``decomposed_state_manager``): one part per position, the
first position's part ignored in the MLP rules (``ignore_first``) and pinned at position 0, optional
chunks. Component parts (``heads``, ``neurons``) start at one layer, one run per layer, with the
rest of the stream as the remainder. The rules and where they were read are in the DePass notes.

Everything is computed from the raw ``transformers`` weights of the eight families of
``dpa_lens.models.testing.FAMILIES``; the only pieces taken from the model's code are its rotary
cos/sin (constants). `frozen_forward` checks out against the model's own logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

DT = torch.float64
RULES = ("softmax", "max", "linear", "relu", "taylor")
REMAINDER_THRESHOLD = 1e-5  # |g_R| below this: the remainder takes no part in a neuron (manager.py)
SHARE_EPS = 1e-6  # added to the denominators of the relu and linear rules (manager.py)


# ---------------------------------------------------------------------------------------------
# The real forward, with everything DePass freezes recorded
# ---------------------------------------------------------------------------------------------


def slope(act: str, x: Tensor) -> Tensor:
    """act(x)/x (the secant through 0) for the activations of the supported families."""
    if act in ("silu", "swish"):
        return torch.sigmoid(x)
    if act == "gelu":
        return 0.5 * (1.0 + torch.erf(x / 2**0.5))
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return 0.5 * (1.0 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    raise NotImplementedError(act)


@dataclass
class Norm:
    """A norm whose scale is frozen: ``y = centre?(x) · inv · gain (+ beta)``."""

    kind: Literal["rms", "ln"]
    gain: Tensor  # [d]
    beta: Tensor | None
    eps: float
    inv: Tensor | None = None  # [batch, pos, 1] 1/rms (or 1/std) of the real input, set by the forward

    def freeze(self, x: Tensor) -> None:
        c = x - x.mean(-1, keepdim=True) if self.kind == "ln" else x
        self.inv = 1.0 / torch.sqrt((c * c).mean(-1, keepdim=True) + self.eps)

    def linear(self, x: Tensor) -> Tensor:
        """The linear map (centring, frozen scale, gain) without β."""
        c = x - x.mean(-1, keepdim=True) if self.kind == "ln" else x
        return c * self.inv * self.gain

    def parts(self, x: Tensor) -> Tensor:
        """Apply to parts ``[M, batch, pos, d]``; β goes to the last part (the remainder)."""
        y = self.linear(x)
        return y if self.beta is None else on_remainder(y, self.beta)


def on_remainder(parts: Tensor, const: Tensor) -> Tensor:
    """Add a constant (a bias) to the last part only."""
    out = parts.clone()
    out[-1] = out[-1] + const
    return out


@dataclass
class Layer:
    """One block's weights (per query head, GQA expanded) and the real values DePass freezes."""

    parallel: bool  # GPT-NeoX: attention and MLP both read the block input
    ln1: Norm
    ln2: Norm
    W_V: Tensor  # [H, d, dh]
    b_V: Tensor | None  # [H, dh]
    W_O: Tensor  # [H, dh, d]
    b_O: Tensor | None  # [d]
    attn_out_norm: Norm | None  # Gemma: RMSNorm of the attention output (scale of the real output)
    gated: bool
    W_gate: Tensor | None  # [d, m]
    W_in: Tensor  # [d, m]
    b_in: Tensor | None  # [m] (plain MLPs)
    act: str
    W_out: Tensor  # [m, d]
    b_out: Tensor | None
    mlp_out_norm: Norm | None
    # real values, set by the forward
    pattern: Tensor | None = None  # [b, H, q, k]
    g: Tensor | None = None  # [b, n, m] gate pre-activation (plain MLP: the pre-activation)
    u: Tensor | None = None  # [b, n, m] up projection (gated only)
    post: Tensor | None = None  # [b, n, m] act(g)·u, or act(s)
    resid_pre: Tensor | None = None
    resid_mid: Tensor | None = None  # sequential blocks only
    resid_post: Tensor | None = None


@dataclass
class Frozen:
    """The real forward of one batch: input of the first block, layers, final norm and read-out."""

    resid0: Tensor  # [b, n, d] embeddings (+ learned positions; Gemma: scaled)
    layers: list[Layer]
    final: Norm
    W_U: Tensor  # [d, V]
    logit_ratio: Tensor | None  # [b, n, V] Gemma 2's final soft cap by its secant: cap·tanh(l/cap)/l
    logits: Tensor  # [b, n, V]


def _p(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def _rotate_half(x: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [b, n, h, dh]; cos/sin [b, n, r]: rotate the first r dimensions of every head."""
    r = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x[..., :r] * c + _rotate_half(x[..., :r]) * s, x[..., r:]], dim=-1)


def _pattern(q: Tensor, k: Tensor, scaling: float, softcap: float | None, window: int | None) -> Tensor:
    """q, k [b, n, H, dh] -> attention pattern [b, H, q, k] (causal, optional sliding window)."""
    s = torch.einsum("bqhe,bkhe->bhqk", q, k) * scaling
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    n = q.shape[1]
    i = torch.arange(n)
    allowed = i[:, None] >= i[None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    return s.masked_fill(~allowed, float("-inf")).softmax(-1)


def _llama_like(hf, ids: Tensor):
    """Llama, Mistral, Qwen2, Qwen3, Gemma 2 and 3: weights, and a q/k function per layer."""
    cfg, inner = hf.config, hf.model
    arch = type(hf).__name__
    gemma = arch.startswith("Gemma")
    b, n = ids.shape
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    G = H // K
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    eps = cfg.rms_norm_eps
    act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    gain = (lambda w: 1.0 + _p(w)) if gemma else _p  # Gemma stores w for a gain of 1 + w
    rms = lambda w: Norm("rms", gain(w), None, eps)  # noqa: E731
    x0 = _p(inner.embed_tokens.weight)[ids]
    if gemma:
        x0 = x0 * torch.tensor(cfg.hidden_size**0.5, dtype=hf.dtype).to(DT)
    positions = torch.arange(n)[None].expand(b, -1)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    rope = {}
    for kind in set(layer_types):
        args = (x0.float(), positions) + ((kind,) if arch == "Gemma3ForCausalLM" else ())
        cos, sin = inner.rotary_emb(*args)
        rope[kind] = (cos.to(DT), sin.to(DT))
    layers, qks = [], []
    for li, layer in enumerate(inner.layers):
        at, ml = layer.self_attn, layer.mlp
        W_V = _p(at.v_proj.weight).view(K, dh, -1).transpose(1, 2).repeat_interleave(G, 0)
        b_V = None if at.v_proj.bias is None else _p(at.v_proj.bias).view(K, dh).repeat_interleave(G, 0)
        layers.append(Layer(
            parallel=False,
            ln1=rms(layer.input_layernorm.weight),
            ln2=rms((layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm).weight),
            W_V=W_V, b_V=b_V, W_O=_p(at.o_proj.weight).T.reshape(H, dh, -1),
            b_O=None if at.o_proj.bias is None else _p(at.o_proj.bias),
            attn_out_norm=rms(layer.post_attention_layernorm.weight) if gemma else None,
            gated=True, W_gate=_p(ml.gate_proj.weight).T, W_in=_p(ml.up_proj.weight).T, b_in=None, act=act,
            W_out=_p(ml.down_proj.weight).T, b_out=None,
            mlp_out_norm=rms(layer.post_feedforward_layernorm.weight) if gemma else None,
        ))
        assert getattr(ml.gate_proj, "bias", None) is None and getattr(ml.down_proj, "bias", None) is None

        def qk(y, at=at, kind=layer_types[li]):
            def proj(lin, heads):
                out = y @ _p(lin.weight).T
                if lin.bias is not None:
                    out = out + _p(lin.bias)
                return out.view(b, n, heads, dh)

            q, k = proj(at.q_proj, H), proj(at.k_proj, K)
            if getattr(at, "q_norm", None) is not None:  # query-key norm, per head, before rotary
                q = q / torch.sqrt((q * q).mean(-1, keepdim=True) + eps) * gain(at.q_norm.weight)
                k = k / torch.sqrt((k * k).mean(-1, keepdim=True) + eps) * gain(at.k_norm.weight)
            cos, sin = rope[kind]
            window = cfg.sliding_window if kind == "sliding_attention" or (arch == "MistralForCausalLM" and cfg.sliding_window) else None
            q, k = _rope(q, cos, sin), _rope(k, cos, sin).repeat_interleave(G, dim=2)
            return q, k, getattr(at, "scaling", dh**-0.5), getattr(cfg, "attn_logit_softcapping", None), window

        qks.append(qk)
    final = rms(inner.norm.weight)
    return x0, layers, qks, final, _p(hf.lm_head.weight).T, getattr(cfg, "final_logit_softcapping", None)


def _gpt2(hf, ids: Tensor):
    cfg, tr = hf.config, hf.transformer
    b, n = ids.shape
    H, d = cfg.n_head, cfg.n_embd
    dh = d // H
    eps = cfg.layer_norm_epsilon
    ln = lambda m: Norm("ln", _p(m.weight), _p(m.bias), eps)  # noqa: E731
    x0 = _p(tr.wte.weight)[ids] + _p(tr.wpe.weight)[:n][None]
    layers, qks = [], []
    for block in tr.h:
        W, bias = _p(block.attn.c_attn.weight), _p(block.attn.c_attn.bias)  # Conv1D: y = x W + b, [d, 3d]
        layers.append(Layer(
            parallel=False, ln1=ln(block.ln_1), ln2=ln(block.ln_2),
            W_V=W[:, 2 * d:].view(d, H, dh).transpose(0, 1), b_V=bias[2 * d:].view(H, dh),
            W_O=_p(block.attn.c_proj.weight).view(H, dh, d), b_O=_p(block.attn.c_proj.bias), attn_out_norm=None,
            gated=False, W_gate=None, W_in=_p(block.mlp.c_fc.weight), b_in=_p(block.mlp.c_fc.bias),
            act=cfg.activation_function, W_out=_p(block.mlp.c_proj.weight), b_out=_p(block.mlp.c_proj.bias),
            mlp_out_norm=None,
        ))

        def qk(y, W=W, bias=bias):
            q = (y @ W[:, :d] + bias[:d]).view(b, n, H, dh)
            k = (y @ W[:, d:2 * d] + bias[d:2 * d]).view(b, n, H, dh)
            return q, k, dh**-0.5, None, None

        qks.append(qk)
    return x0, layers, qks, ln(tr.ln_f), _p(hf.lm_head.weight).T, None


def _neox(hf, ids: Tensor):
    cfg, nx = hf.config, hf.gpt_neox
    b, n = ids.shape
    H, d = cfg.num_attention_heads, cfg.hidden_size
    dh = d // H
    eps = cfg.layer_norm_eps
    ln = lambda m: Norm("ln", _p(m.weight), _p(m.bias), eps)  # noqa: E731
    x0 = _p(nx.embed_in.weight)[ids]
    cos, sin = nx.rotary_emb(x0.float(), torch.arange(n)[None].expand(b, -1))
    cos, sin = cos.to(DT), sin.to(DT)
    layers, qks = [], []
    for layer in nx.layers:
        at, ml = layer.attention, layer.mlp
        W = _p(at.query_key_value.weight).view(H, 3, dh, d)  # rows grouped per head: (q, k, v)
        bias = _p(at.query_key_value.bias).view(H, 3, dh)
        layers.append(Layer(
            parallel=cfg.use_parallel_residual, ln1=ln(layer.input_layernorm), ln2=ln(layer.post_attention_layernorm),
            W_V=W[:, 2].transpose(1, 2), b_V=bias[:, 2], W_O=_p(at.dense.weight).T.reshape(H, dh, d),
            b_O=_p(at.dense.bias), attn_out_norm=None,
            gated=False, W_gate=None, W_in=_p(ml.dense_h_to_4h.weight).T, b_in=_p(ml.dense_h_to_4h.bias),
            act=cfg.hidden_act, W_out=_p(ml.dense_4h_to_h.weight).T, b_out=_p(ml.dense_4h_to_h.bias), mlp_out_norm=None,
        ))

        def qk(y, W=W, bias=bias):
            q = torch.einsum("bnd,hed->bnhe", y, W[:, 0]) + bias[:, 0]
            k = torch.einsum("bnd,hed->bnhe", y, W[:, 1]) + bias[:, 1]
            return _rope(q, cos, sin), _rope(k, cos, sin), dh**-0.5, None, None

        qks.append(qk)
    return x0, layers, qks, ln(nx.final_layer_norm), _p(hf.get_output_embeddings().weight).T, None


FAMILIES = {
    "LlamaForCausalLM": _llama_like,
    "MistralForCausalLM": _llama_like,
    "Qwen2ForCausalLM": _llama_like,
    "Qwen3ForCausalLM": _llama_like,
    "Gemma2ForCausalLM": _llama_like,
    "Gemma3ForCausalLM": _llama_like,
    "GPT2LMHeadModel": _gpt2,
    "GPTNeoXForCausalLM": _neox,
}


def _attention(L: Layer, y: Tensor) -> Tensor:
    """Normed parts ``[M, b, n, d]`` -> per-head outputs ``[M, b, n, H, d]`` (the value bias, mixed
    by the pattern, is the remainder's)."""
    v = torch.einsum("mbkd,hde->mbkhe", y, L.W_V)
    if L.b_V is not None:
        v = on_remainder(v, L.b_V)
    z = torch.einsum("bhqk,mbkhe->mbqhe", L.pattern, v)
    return torch.einsum("mbqhe,hed->mbqhd", z, L.W_O)


def _attention_out(L: Layer, heads: Tensor) -> Tensor:
    """Per-head outputs -> the parts' attention outputs (output bias to the remainder, output norm)."""
    out = heads.sum(3)
    if L.b_O is not None:
        out = on_remainder(out, L.b_O)
    return out if L.attn_out_norm is None else L.attn_out_norm.parts(out)


def _mlp_out(L: Layer, post: Tensor) -> Tensor:
    """Per-part neuron outputs ``[M, b, n, m]`` -> the parts' MLP outputs."""
    out = post @ L.W_out
    if L.b_out is not None:
        out = on_remainder(out, L.b_out)
    return out if L.mlp_out_norm is None else L.mlp_out_norm.parts(out)


def frozen_forward(hf_model, input_ids: Tensor) -> Frozen:
    """The model's forward in float64 from its raw weights, recording every frozen quantity."""
    x0, layers, qks, final, W_U, cap = FAMILIES[type(hf_model).__name__](hf_model, input_ids)
    x = x0
    for L, qk in zip(layers, qks):
        L.resid_pre = x
        L.ln1.freeze(x)
        y = L.ln1.parts(x[None])
        q, k, scaling, softcap, window = qk(y[0])
        L.pattern = _pattern(q, k, scaling, softcap, window)
        heads = _attention(L, y)
        if L.attn_out_norm is not None:
            L.attn_out_norm.freeze(heads.sum(3)[0] + (0 if L.b_O is None else L.b_O))
        attn = _attention_out(L, heads)[0]
        if not L.parallel:
            L.resid_mid = x + attn
        mlp_in = x if L.parallel else L.resid_mid
        L.ln2.freeze(mlp_in)
        y2 = L.ln2.parts(mlp_in[None])[0]
        if L.gated:
            L.g, L.u = y2 @ L.W_gate, y2 @ L.W_in
            L.post = L.g * slope(L.act, L.g) * L.u
        else:
            L.g = y2 @ L.W_in + L.b_in
            L.post = L.g * slope(L.act, L.g)
        if L.mlp_out_norm is not None:
            L.mlp_out_norm.freeze(L.post @ L.W_out + (0 if L.b_out is None else L.b_out))
        x = mlp_in + (attn if L.parallel else 0) + _mlp_out(L, L.post[None])[0]
        L.resid_post = x
    final.freeze(x)
    logits = final.parts(x[None])[0] @ W_U
    ratio = None
    if cap is not None:
        ratio = cap * torch.tanh(logits / cap) / logits
        logits = logits * ratio
    return Frozen(resid0=x0, layers=layers, final=final, W_U=W_U, logit_ratio=ratio, logits=logits)


# ---------------------------------------------------------------------------------------------
# The MLP rules
# ---------------------------------------------------------------------------------------------


def mlp_shares(gc: Tensor, rule: str, temperature: float = 0.1, *, first: int | None = None,
               ignore_first: bool = True) -> Tensor:
    """Each part's share of each neuron's real output.

    Args:
        gc: ``[M, b, n, m]`` every part's contribution to every neuron's gate pre-activation
            (plain MLPs: to its pre-activation), the remainder last (its ``g`` includes the biases).
        rule: ``softmax`` (``softmax_c(g_c/T)``), ``max`` (one-hot on the largest ``g_c``),
            ``relu`` (``relu(g_c)/(Σ relu + 1e-6)``) or ``linear`` (``g_c − min g``, normalised).
        first: index of the part that holds position 0 (token level), else None.
        ignore_first: the first part takes no share at positions ≥ 1.

    Before the rule, as ``manager.py`` does: the first part's ``g`` is set to 0 at positions ≥ 1
    (``ignore_first``) and to 1 at position 0; a remainder with ``|g| < 1e-5`` takes no share;
    where no part contributes at all, the remainder takes the neuron. Only parts with a non-zero
    ``g`` take part in the rule. Returns ``[M, b, n, m]``; each neuron's shares sum to 1 (``relu``
    and ``linear``: slightly less, and 0 for ``relu`` where no ``g_c`` is positive).
    """
    g = gc.clone()
    if first is not None:
        if ignore_first:
            g[first, :, 1:] = 0.0
        g[first, :, 0] = 1.0
    g[-1] = torch.where(g[-1].abs() < REMAINDER_THRESHOLD, torch.zeros_like(g[-1]), g[-1])
    g[-1] = torch.where((g == 0).all(0), torch.ones_like(g[-1]), g[-1])
    live = g != 0
    if rule == "softmax":
        return (g / temperature).masked_fill(~live, float("-inf")).softmax(0)
    if rule == "max":
        best = g.masked_fill(~live, float("-inf")).argmax(0, keepdim=True)
        return torch.zeros_like(g).scatter_(0, best, 1.0)
    if rule == "relu":
        r = g.clamp_min(0.0)
        return r / (r.sum(0, keepdim=True) + SHARE_EPS)
    if rule == "linear":  # g_c − min over the live parts; a single live part takes it all (see the notes)
        low = g.masked_fill(~live, float("inf")).amin(0, keepdim=True)
        shifted = (g - low).masked_fill(~live, 0.0)
        total = shifted.sum(0, keepdim=True)
        uniform = live / live.sum(0, keepdim=True)
        return torch.where(total > 0, shifted / (total + SHARE_EPS), uniform)
    raise ValueError(f"unknown MLP rule {rule!r}; choose from {RULES}")


# ---------------------------------------------------------------------------------------------
# The decomposed forward
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One decomposed forward: M parts, the remainder last, each a full ``[b, n, d]`` stream."""

    labels: list[tuple]  # ("token", j), ("head", layer, h[, pos]), ("neuron", layer, i[, pos]), ("first",), ("remainder",)
    scores: Tensor  # [M, b]
    streams: dict[str, Tensor] = field(default_factory=dict)  # checkpoint -> parts there [M, b, n, d]
    real: dict[str, Tensor] = field(default_factory=dict)  # checkpoint -> real stream there [b, n, d]


@dataclass
class DePassReference:
    """Scores of one call (see `depass_reference`)."""

    level: str
    value: Tensor  # [b] the target on the real logits
    scores: Tensor  # tokens [b, n]; heads [b, layer, H] or [b, layer, n, H]; neurons [b, layer, m] or [b, layer, n, m]
    remainder: Tensor  # tokens [b] (chunked: value − Σ scores); heads/neurons [b, layer]: the rest of each run
    runs: list[Run]


def _mlp(L: Layer, x: Tensor, rule: str, temperature: float, first: int | None, ignore_first: bool,
         lost_to_remainder: bool) -> Tensor:
    y = L.ln2.parts(x)
    if L.gated:
        gc = y @ L.W_gate
    else:
        gc = on_remainder(y @ L.W_in, L.b_in)
    if rule == "taylor":
        post = gc * slope(L.act, L.g) * (L.u if L.gated else 1.0)
    else:
        post = mlp_shares(gc, rule, temperature, first=first, ignore_first=ignore_first) * L.post
    if lost_to_remainder:
        post = on_remainder(post, L.post - post.sum(0))
    return _mlp_out(L, post)


def _propagate(fz: Frozen, parts: Tensor, layer: int, at: str, run: Run, record: bool, **rule) -> Tensor:
    """Push parts that live at ``blocks.{layer}.hook_resid_{at}`` to the final residual stream."""

    def keep(name, x, real):
        if record:
            run.streams[name], run.real[name] = x, real

    x = parts
    for li in range(layer, len(fz.layers)):
        L = fz.layers[li]
        if li > layer or at == "pre":
            keep(f"blocks.{li}.hook_resid_pre", x, L.resid_pre)
            attn = _attention_out(L, _attention(L, L.ln1.parts(x)))
            if L.parallel:
                x = x + attn + _mlp(L, x, **rule)
                keep(f"blocks.{li}.hook_resid_post", x, L.resid_post)
                continue
            x = x + attn
        if li > layer or at in ("pre", "mid"):
            keep(f"blocks.{li}.hook_resid_mid", x, L.resid_mid)
            x = x + _mlp(L, x, **rule)
        keep(f"blocks.{li}.hook_resid_post", x, L.resid_post)
    return x


def _read(fz: Frozen, final: Tensor, direction_fn) -> Tensor:
    """Scores ``[M, b]``: each part through the frozen final norm and the unembedding (β and any
    unembedding bias are the remainder's), then the linear ``direction_fn`` of its logits."""
    y = fz.final.parts(final)
    scores = []
    for c in range(y.shape[0]):
        logits = y[c] @ fz.W_U
        if fz.logit_ratio is not None:
            logits = logits * fz.logit_ratio
        scores.append(direction_fn(logits))
    return torch.stack(scores)


def _start(parts: Tensor, real: Tensor) -> Tensor:
    """Append the remainder: the real stream minus the parts."""
    return torch.cat([parts, (real - parts.sum(0))[None]])


def _token_runs(fz, direction_fn, start_layer, chunk_size, ignore_first, record, rule):
    real = fz.layers[start_layer].resid_pre
    b, n, _ = real.shape
    eye = torch.eye(n, dtype=DT)
    scores = torch.zeros(b, n, dtype=DT)
    runs = []
    size = chunk_size or n
    for k, lo in enumerate(range(0, n, size)):
        idx = list(range(lo, min(lo + size, n)))
        labels = [("token", j) for j in idx]
        parts = torch.stack([real * eye[j][None, :, None] for j in idx])
        first = 0
        if k > 0:
            if ignore_first:  # every later chunk carries the first position as a part of its own
                parts = torch.cat([(real * eye[0][None, :, None])[None], parts])
                labels = [("first",)] + labels
            else:
                first = None  # the first position is in the remainder
        run = Run(labels=labels + [("remainder",)], scores=torch.empty(0))
        x = _propagate(fz, _start(parts, real), start_layer, "pre", run, record,
                       first=first, ignore_first=ignore_first, **rule)
        run.real["final"], run.streams["final"] = fz.layers[-1].resid_post, x
        run.scores = _read(fz, x, direction_fn)
        for c, label in enumerate(run.labels):
            if label[0] == "token":
                scores[:, label[1]] = run.scores[c]
        runs.append(run)
    return scores, runs


def _component_parts(fz: Frozen, level: str, li: int, by_position: bool):
    """Parts of one layer's heads or neurons, each a full stream; and where they are added."""
    L = fz.layers[li]
    b, n, _ = L.resid_pre.shape
    if level == "heads":
        y = L.ln1.linear(L.resid_pre)  # LayerNorm's β and the value bias are the remainder's
        v = torch.einsum("bkd,hde->bkhe", y, L.W_V)
        z = torch.einsum("bhqk,bkhe->bqhe", L.pattern, v)
        heads = torch.einsum("bqhe,hed->hbqd", z, L.W_O)  # [H, b, n, d]
        if L.attn_out_norm is not None:  # frozen scale of the real output: linear per head
            heads = heads * L.attn_out_norm.inv * L.attn_out_norm.gain
        units, names = heads, [("head", li, h) for h in range(heads.shape[0])]
        real, at = (L.resid_post, "post") if L.parallel else (L.resid_mid, "mid")
    else:
        per = L.post.permute(2, 0, 1)[..., None] * L.W_out[:, None, None, :]  # [m, b, n, d]
        if L.mlp_out_norm is not None:
            per = per * L.mlp_out_norm.inv * L.mlp_out_norm.gain
        units, names = per, [("neuron", li, i) for i in range(per.shape[0])]
        real, at = L.resid_post, "post"
    if by_position:  # one part per (position, unit), position-major
        eye = torch.eye(n, dtype=DT)
        units = torch.stack([units * eye[i][None, None, :, None] for i in range(n)]).flatten(0, 1)
        names = [name + (i,) for i in range(n) for name in names]
    return units, names, real, at


def depass_reference(
    hf_model,
    input_ids: Tensor,
    direction_fn: Callable[[Tensor], Tensor],
    *,
    level: Literal["tokens", "heads", "neurons"] = "tokens",
    start_layer: int = 0,
    mlp_rule: str = "softmax",
    temperature: float = 0.1,
    ignore_first: bool = True,
    chunk_size: int | None = None,
    by_position: bool = False,
    layers: list[int] | None = None,
    lost_to_remainder: bool = True,
    record: bool = True,
) -> DePassReference:
    """DePass scores of a ``transformers`` model of a supported family, in float64.

    Args:
        input_ids: ``[b, n]`` (no padding); position 0 is the first (BOS) position.
        direction_fn: ``logits [b, n, vocab] -> [b]``, linear (a logit, or a logit difference, at
            the answer position); applied to the real logits (the value) and to each part's.
        level: ``tokens``: one part per position of ``blocks.{start_layer}.hook_resid_pre``;
            ``heads``/``neurons``: for each of ``layers`` (default all) a run whose parts are that
            layer's heads (their outputs at every position) or MLP neurons (``post_i · W_out[i]``),
            with ``by_position`` one part per (position, unit) instead.
        mlp_rule: ``softmax``, ``max``, ``linear``, ``relu`` or ``taylor`` (see `mlp_shares`).
        ignore_first: (tokens) the first position's part takes no MLP share at positions ≥ 1
            (``ignore_special_token`` of the authors' code, default True there too).
        chunk_size: (tokens) positions per run, as the authors' ``single_compute_token``: the other
            positions are the remainder's, which changes every rule but ``taylor``.
        lost_to_remainder: give the remainder whatever share of a neuron the rule leaves
            unassigned (``relu``, ``linear``: the authors' code drops it).
        record: keep every run's parts at every ``hook_resid_pre/mid/post`` (``Run.streams``).

    Returns: `DePassReference`; per-part scores plus the remainder add up to ``value``.
    """
    if mlp_rule not in RULES:
        raise ValueError(f"unknown MLP rule {mlp_rule!r}; choose from {RULES}")
    with torch.no_grad():
        fz = frozen_forward(hf_model, input_ids)
        value = direction_fn(fz.logits)
        rule = dict(rule=mlp_rule, temperature=temperature, lost_to_remainder=lost_to_remainder)
        if level == "tokens":
            scores, runs = _token_runs(fz, direction_fn, start_layer, chunk_size, ignore_first, record, rule)
            remainder = runs[0].scores[-1] if len(runs) == 1 else value - scores.sum(-1)
            return DePassReference(level, value, scores, remainder, runs)
        if level not in ("heads", "neurons"):
            raise ValueError(f"unknown level {level!r}")
        runs, per_layer, rest = [], [], []
        for li in layers if layers is not None else range(len(fz.layers)):
            units, names, real, at = _component_parts(fz, level, li, by_position)
            run = Run(labels=names + [("remainder",)], scores=torch.empty(0))
            x = _propagate(fz, _start(units, real), li, at, run, record, first=None, ignore_first=False, **rule)
            run.real["final"], run.streams["final"] = fz.layers[-1].resid_post, x
            run.scores = _read(fz, x, direction_fn)
            s = run.scores[:-1].T  # [b, units]
            if by_position:
                s = s.reshape(s.shape[0], input_ids.shape[1], -1)
            per_layer.append(s)
            rest.append(run.scores[-1])
            runs.append(run)
        return DePassReference(level, value, torch.stack(per_layer, 1), torch.stack(rest, 1), runs)


def logit_fn(position: int | Tensor, token: int, other: int | None = None) -> Callable[[Tensor], Tensor]:
    """``direction_fn`` for one token's logit (or its difference from ``other``) at ``position``."""

    def fn(logits: Tensor) -> Tensor:
        rows = torch.arange(logits.shape[0])
        out = logits[rows, position, token]
        return out if other is None else out - logits[rows, position, other]

    return fn
