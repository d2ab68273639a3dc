"""Unpack (arXiv 2605.23393, "Every Component is a Lookup"): a slow float64 reference on raw weights.

Written from the rules of the method and of its reference code (``Fun-Cry/unpacklm``), independent
of dpa_lens and TransformerLens, for the reference's own families: GPT-2 (``GPT2LMHeadModel``) and
GPT-NeoX (``GPTNeoXForCausalLM``). The forward is rewritten from the ``transformers`` weights in
float64 (only NeoX's rotary cos/sin are taken from the model).

The method, in brief (/work/notes/unpack_rules.md has the full rules and where each was read):

* Components write additively to the residual stream: ``embedding`` (and GPT-2's
  ``pos_embedding``), ``attn_L_head_H`` (a head's output through its slice of W_O), ``attn_L_bias``
  (the output-projection bias) and ``mlp_L`` (the whole MLP output, biases included).
* A component is read by a LayerNorm "marginally": centred, divided by the real stream's frozen
  scale, times the gain; the norm's bias is a separate constant term.
* Credit starts at the seeds: each component's marginal logit-lens score at the target position
  (target unembedding minus the vocabulary mean), or 1 on a chosen root component (rerooting). It is
  split backwards, without gradients:

  - a head at query q hands its credit to source positions s by ``α·<centred value·W_O, d_t>``
    (depth 0, d_t = the target direction) or by ``α·<value·W_O, attention output>/‖output‖²``
    (deeper, "aligned" presets) or by α itself (other presets); then to three branches with fixed
    weights: K (components at s by their share of the centred key-side logit), Q (components at q
    by their share of the centred query-side logit) and V (components at s by their share of
    ``<v_c, v>``);
  - an MLP at q hands its credit to the components at q by their share of a direction in the
    MLP's input (d_t-aligned at depth 0; activation-weighted ("Geva") or output-aligned deeper), or
    by the L2 norms of their up-projections (sign kept);
  - every share is divided by the safe denominator ``sign(Σv)·max(|Σv|, β·Σ|v|)``;
  - an embedding reached at position p adds the path's credit to token p. Constants (biases) are
    dropped.

* Token credit comes from an unpruned top-down sweep ("flow"); paths from a pruned depth-first
  recursion (``|credit| >= min_frac`` at every split).

``quirks=True`` (default) reproduces the reference code as it is, including details that look
unintended: the MLP shares of GPT-2 read the block input (not the stream after attention); the MLP
shares do not centre the components; the seeds ignore the distractor (only d_t uses it); the path
recursion keeps bias components (and the value bias) in its denominators while the flow does not;
branch weights are 0.333 (kqv), and a K-only head passes 0.333 of its credit on in the recursion,
0.3 in the flow. ``quirks=False`` gives the same method with these made consistent: the real MLP
input, centred components, seeds on the logit difference, biases never in a denominator, weights
1/3 (kqv) and 1 (K only). Then, with β = 0, every split conserves credit exactly, except at query
position 0: it sees one key, its centred K and Q logits all vanish, and those branches are dropped
(in both modes, as in the reference).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

DT = torch.float64
EMBEDDINGS = ("embedding", "pos_embedding")
SAFE_EPS = 1e-10  # below this Σ|v| a split is skipped (reference: recursion._safe_denom)


# ----------------------------------------------------------------------------------------------
# presets


@dataclass(frozen=True)
class Preset:
    """One of the reference's six configurations (``unpack/config.py::PRESETS``)."""

    branches: str  # "kqv" (K, Q and V at every head) or "k" (K only)
    aligned: bool  # deeper heads split sources by output alignment; deeper MLPs use "outproj"
    mlp_rule: str  # deeper MLP rule when not aligned: "weighted" (Geva) or "l2"
    beta: float = 0.8


PRESETS = {
    "kqv_aligned": Preset("kqv", True, "weighted"),  # the default
    "k_only_weighted": Preset("k", False, "weighted"),
    "k_only_l2": Preset("k", False, "l2"),
    "k_only_aligned": Preset("k", True, "weighted"),
    "kqv_weighted": Preset("kqv", False, "weighted"),
    "kqv_l2": Preset("kqv", False, "l2"),
}


def branch_weights(preset: Preset, *, quirks: bool, flow: bool) -> dict[str, float]:
    """Weights of the K, Q and V branches (a missing branch is not taken)."""
    if preset.branches == "kqv":
        w = 0.333 if quirks else 1 / 3
        return {"K": w, "Q": w, "V": w}
    if quirks:  # branch_weights=None: the recursion's default 0.333, the flow sweep's 0.3
        return {"K": 0.3 if flow else 0.333}
    return {"K": 1.0}


# ----------------------------------------------------------------------------------------------
# the forward, from raw weights


def _p(t: Tensor) -> Tensor:
    return t.detach().to(DT)


def _gelu(kind: str) -> Callable[[Tensor], Tensor]:
    tanh = kind in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
    if not tanh and kind != "gelu":
        raise NotImplementedError(kind)
    return lambda x: torch.nn.functional.gelu(x, approximate="tanh" if tanh else "none")


@dataclass
class _Block:
    """One block's weights, per head: W_Q/W_K/W_V [H, d, dh], b_* [H, dh], W_O [H, dh, d]."""

    ln1: tuple[Tensor, Tensor, float]
    W_Q: Tensor
    b_Q: Tensor
    W_K: Tensor
    b_K: Tensor
    W_V: Tensor
    b_V: Tensor
    W_O: Tensor
    b_O: Tensor
    scale: float
    ln2: tuple[Tensor, Tensor, float]
    W_in: Tensor  # [d, m]
    b_in: Tensor
    W_out: Tensor  # [m, d]
    b_out: Tensor
    act: Callable[[Tensor], Tensor]


def _gpt2(model, ids: Tensor):
    cfg, tr = model.config, model.transformer
    d, H = cfg.n_embd, cfg.n_head
    dh, n = d // H, ids.shape[0]
    eps = cfg.layer_norm_epsilon
    embeds = {"embedding": _p(tr.wte.weight)[ids], "pos_embedding": _p(tr.wpe.weight)[:n]}
    heads = lambda w: w.reshape(d, H, dh).permute(1, 0, 2)  # noqa: E731  Conv1D columns -> [H, d, dh]
    blocks = []
    for blk in tr.h:
        W, b = _p(blk.attn.c_attn.weight), _p(blk.attn.c_attn.bias)  # x @ W + b, [d, 3d]
        blocks.append(_Block(
            ln1=(_p(blk.ln_1.weight), _p(blk.ln_1.bias), eps),
            W_Q=heads(W[:, :d]), b_Q=b[:d].view(H, dh), W_K=heads(W[:, d:2 * d]), b_K=b[d:2 * d].view(H, dh),
            W_V=heads(W[:, 2 * d:]), b_V=b[2 * d:].view(H, dh),
            W_O=_p(blk.attn.c_proj.weight).view(H, dh, d), b_O=_p(blk.attn.c_proj.bias), scale=dh**-0.5,
            ln2=(_p(blk.ln_2.weight), _p(blk.ln_2.bias), eps),
            W_in=_p(blk.mlp.c_fc.weight), b_in=_p(blk.mlp.c_fc.bias),
            W_out=_p(blk.mlp.c_proj.weight), b_out=_p(blk.mlp.c_proj.bias), act=_gelu(cfg.activation_function),
        ))
    final = (_p(tr.ln_f.weight), _p(tr.ln_f.bias), eps)
    return embeds, blocks, final, _p(model.lm_head.weight).T, False, None


def _neox(model, ids: Tensor):
    cfg, nx = model.config, model.gpt_neox
    d, H = cfg.hidden_size, cfg.num_attention_heads
    dh, n = d // H, ids.shape[0]
    eps = cfg.layer_norm_eps
    embeds = {"embedding": _p(nx.embed_in.weight)[ids]}
    blocks = []
    for layer in nx.layers:
        at = layer.attention
        W = _p(at.query_key_value.weight).view(H, 3, dh, d)  # rows per head: q, k, v
        b = _p(at.query_key_value.bias).view(H, 3, dh)
        blocks.append(_Block(
            ln1=(_p(layer.input_layernorm.weight), _p(layer.input_layernorm.bias), eps),
            W_Q=W[:, 0].transpose(1, 2), b_Q=b[:, 0], W_K=W[:, 1].transpose(1, 2), b_K=b[:, 1],
            W_V=W[:, 2].transpose(1, 2), b_V=b[:, 2],
            W_O=_p(at.dense.weight).T.reshape(H, dh, d), b_O=_p(at.dense.bias), scale=dh**-0.5,
            ln2=(_p(layer.post_attention_layernorm.weight), _p(layer.post_attention_layernorm.bias), eps),
            W_in=_p(layer.mlp.dense_h_to_4h.weight).T, b_in=_p(layer.mlp.dense_h_to_4h.bias),
            W_out=_p(layer.mlp.dense_4h_to_h.weight).T, b_out=_p(layer.mlp.dense_4h_to_h.bias), act=_gelu(cfg.hidden_act),
        ))
    cos, sin = nx.rotary_emb(torch.zeros(1, n, d), torch.arange(n)[None])
    final = (_p(nx.final_layer_norm.weight), _p(nx.final_layer_norm.bias), eps)
    return embeds, blocks, final, _p(model.get_output_embeddings().weight).T, True, (_p(cos[0]), _p(sin[0]))


FAMILIES = {"GPT2LMHeadModel": _gpt2, "GPTNeoXForCausalLM": _neox}


def tl_processing(embeds: dict[str, Tensor], blocks: list[_Block]) -> tuple[dict[str, Tensor], list[_Block]]:
    """The same model with TransformerLens's weight processing (``fold_ln``, ``fold_value_biases``,
    ``center_writing_weights``), done here in float64.

    The forward computes the same function, but the components change: each norm's bias moves into
    the biases of the projections that read it; the value bias (with the first norm's bias) moves
    through W_O into the output bias, so that the heads no longer write ``b_V·W_O`` and
    ``attn_L_bias`` does; every write (embeddings, W_O, b_O, W_out, b_out) loses its mean over
    d_model. The gains stay apart (folding them into the weights changes no product).
    """
    centre = lambda t: t - t.mean(-1, keepdim=True)  # noqa: E731
    out = []
    for B in blocks:
        (g1, b1, eps1), (g2, b2, eps2) = B.ln1, B.ln2
        b_V = B.b_V + torch.einsum("d,hde->he", b1, B.W_V)
        b_O = B.b_O + torch.einsum("he,hed->d", b_V, B.W_O)
        out.append(replace(
            B, ln1=(g1, torch.zeros_like(b1), eps1), ln2=(g2, torch.zeros_like(b2), eps2),
            b_Q=B.b_Q + torch.einsum("d,hde->he", b1, B.W_Q), b_K=B.b_K + torch.einsum("d,hde->he", b1, B.W_K),
            b_V=torch.zeros_like(b_V), W_O=centre(B.W_O), b_O=centre(b_O),
            b_in=B.b_in + b2 @ B.W_in, W_out=centre(B.W_out), b_out=centre(B.b_out),
        ))
    return {nm: centre(e) for nm, e in embeds.items()}, out


def _rope(x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """Rotate the first r dims of x [..., n, dh] by position (cos/sin [n, r]); identity without rotary."""
    if rope is None:
        return x
    cos, sin = rope
    r = cos.shape[-1]
    xr = x[..., :r]
    rotated = torch.cat([-xr[..., r // 2:], xr[..., : r // 2]], dim=-1)
    return torch.cat([xr * cos + rotated * sin, x[..., r:]], dim=-1)


def _sigma(x: Tensor, eps: float) -> Tensor:
    """The real stream's LayerNorm scale, [n, 1] (biased variance, as nn.LayerNorm)."""
    return torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)


def _ln(x: Tensor, ln) -> Tensor:
    g, b, eps = ln
    return (x - x.mean(-1, keepdim=True)) / _sigma(x, eps) * g + b


def marginal(c: Tensor, x: Tensor, g: Tensor, eps: float, centre: bool = True) -> Tensor:
    """Marginal norm of components c [..., n, d] read from the stream x [n, d]: Σ_c marginal + bias = LN(x)."""
    if centre:
        c = c - c.mean(-1, keepdim=True)
    return c / _sigma(x, eps) * g


# ----------------------------------------------------------------------------------------------
# the decomposition


@dataclass
class AttnParts:
    """Layer L's attention and its per-component decompositions.

    ``up`` names the components written before layer L (their order is the rows of key/query/value).
    Logits are scaled, unmasked; ``key[c, h, q, s]`` is component c at key position s against the
    real query at q, ``query[c, h, q, s]`` component c at q against the real key at s, ``value[c, h,
    s] = <v_c, v>`` in head space; ``*_extra`` hold the constant terms (the norm's bias as a
    component, and the projection bias), so that Σ rows + Σ extras = the real quantity.
    """

    up: list[str]
    q: Tensor  # [H, n, dh] real (rotated)
    k: Tensor
    v: Tensor
    scores: Tensor  # [H, n, n]
    alpha: Tensor  # [H, n, n]
    pv: Tensor  # [H, n, d] values through W_O (value bias in, output bias out)
    key: Tensor  # [C, H, n, n]
    key_extra: dict[str, Tensor]
    query: Tensor
    query_extra: dict[str, Tensor]
    value_vec: Tensor  # [C, H, n, dh] each component's part of v
    value_vec_extra: dict[str, Tensor]
    value: Tensor  # [C, H, n]
    value_extra: dict[str, Tensor]
    shares0: Tensor  # [H, n, n] α·<centred pv, d_t> (depth-0 source shares)
    shares_out: Tensor  # [H, n, n] α·<pv, o>/‖o‖² (aligned source shares, depth >= 1)


@dataclass
class MlpParts:
    """Layer L's MLP shares: ``names`` rows of principled/geva/outproj [C, n], ``l2_names`` rows of l2."""

    names: list[str]
    x_in: Tensor  # [n, d] the stream the shares read (quirk: GPT-2's block input)
    parts: Tensor  # [C, n, d] marginal norms of the named components (centred) against x_in
    principled: Tensor
    geva: Tensor
    outproj: Tensor
    l2_names: list[str]
    l2: Tensor


@dataclass
class Decomposition:
    """Everything Unpack reads from one forward (float64). Positions n, model width d."""

    family: str
    parallel: bool
    ids: Tensor  # [n]
    position: int  # the target position
    target: int
    distractor: int | None
    names: list[str]  # components in the reference's order
    order: dict[str, float]  # a component's layer: -1 embeddings, L heads, L + 0.5 (sequential) or L MLPs
    vecs: Tensor  # [C, n, d] each component's write; Σ = the final stream
    resid_pre: list[Tensor]  # per layer [n, d]
    resid_mid: list[Tensor]  # per layer [n, d] (after attention)
    resid_final: Tensor  # [n, d] entering the final norm
    logits: Tensor  # [n, vocab]
    ln_f: tuple[Tensor, Tensor, float]
    W_U: Tensor  # [d, vocab]
    direction: Tensor  # [vocab] target minus distractor one-hot, or minus the mean
    d_t: Tensor  # [d] the target direction read by the depth-0 shares
    attn: list[AttnParts]
    mlp: list[MlpParts]
    seeds: dict[str, float]  # marginal logit-lens score of every component (biases too)

    def index(self, names: list[str]) -> list[int]:
        where = {nm: i for i, nm in enumerate(self.names)}
        return [where[nm] for nm in names]


def _direction(vocab: int, target: int, distractor: int | None) -> Tensor:
    e = torch.zeros(vocab, dtype=DT)
    e[target] += 1
    if distractor is None:
        return e - 1 / vocab
    e[distractor] -= 1
    return e


def decompose(model, input_ids: Tensor, target: int | None = None, distractor: int | None = None, *,
              position: int = -1, quirks: bool = True, processed: bool = False) -> Decomposition:
    """Run the float64 forward and compute every decomposition Unpack reads.

    Args:
        input_ids: [n] or [1, n].
        target: the target token (default: the model's top prediction); distractor: optional.
        position: the target position (default the last, as in the reference).
        processed: first rewrite the weights as TransformerLens processes them (`tl_processing`),
            so that the components are those of a processed TransformerLens model.
    """
    ids = input_ids.reshape(-1)
    embeds, blocks, ln_f, W_U, parallel, rope = FAMILIES[type(model).__name__](model, ids)
    if processed:
        embeds, blocks = tl_processing(embeds, blocks)
    n = ids.shape[0]
    t = position % n
    causal = torch.ones(n, n, dtype=torch.bool).tril()

    names, order, vecs = list(embeds), {nm: -1.0 for nm in embeds}, list(embeds.values())
    x = sum(embeds.values())
    resid_pre, resid_mid, raw = [], [], []
    for L, B in enumerate(blocks):
        resid_pre.append(x)
        h = _ln(x, B.ln1)
        q = _rope(torch.einsum("pd,hde->hpe", h, B.W_Q) + B.b_Q[:, None], rope)
        k = _rope(torch.einsum("pd,hde->hpe", h, B.W_K) + B.b_K[:, None], rope)
        v = torch.einsum("pd,hde->hpe", h, B.W_V) + B.b_V[:, None]
        scores = torch.einsum("hqe,hse->hqs", q, k) * B.scale
        alpha = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        heads = torch.einsum("hqs,hse,hed->hqd", alpha, v, B.W_O)
        mid = x + heads.sum(0) + B.b_O
        resid_mid.append(mid)
        mlp_in = x if parallel else mid
        mlp_out = B.act(_ln(mlp_in, B.ln2) @ B.W_in + B.b_in) @ B.W_out + B.b_out
        x = mid + mlp_out
        H = heads.shape[0]
        names += [f"attn_{L}_head_{i}" for i in range(H)] + [f"attn_{L}_bias", f"mlp_{L}"]
        order.update({f"attn_{L}_head_{i}": float(L) for i in range(H)})
        order.update({f"attn_{L}_bias": float(L), f"mlp_{L}": L + (0.0 if parallel else 0.5)})
        vecs += list(heads) + [B.b_O.expand(n, -1), mlp_out]
        raw.append((q, k, v, scores, alpha))
    vecs = torch.stack(vecs)
    logits = _ln(x, ln_f) @ W_U
    if target is None:
        target = int(logits[t].argmax())
    direction = _direction(W_U.shape[1], target, distractor)

    g_f, _, eps_f = ln_f
    # d_t: the reference scales by the unbiased variance; only its direction matters (every use is a ratio)
    d_t = g_f / torch.sqrt(x[t].var() + eps_f) * (W_U @ direction)
    seed_dir = direction if (distractor is None or not quirks) else _direction(W_U.shape[1], target, None)
    lens = marginal(vecs[:, t], x[t][None], g_f, eps_f) @ (W_U @ seed_dir)
    seeds = dict(zip(names, lens.tolist()))

    D = Decomposition(type(model).__name__, parallel, ids, t, target, distractor, names, order, vecs, resid_pre,
                      resid_mid, x, logits, ln_f, W_U, direction, d_t, [], [], seeds)
    for L, B in enumerate(blocks):
        D.attn.append(_attn_parts(D, L, B, raw[L], rope))
        D.mlp.append(_mlp_parts(D, L, B, quirks))
    return D


def _attn_parts(D: Decomposition, L: int, B: _Block, raw, rope) -> AttnParts:
    q, k, v, scores, alpha = raw
    n = D.ids.shape[0]
    up = [nm for nm in D.names if D.order[nm] < L]
    g, b1, eps = B.ln1
    parts = marginal(D.vecs[D.index(up)], D.resid_pre[L], g, eps)  # [C, n, d]
    norm_bias = b1.expand(n, -1)  # the norm's bias, as a component at every position

    def proj(c: Tensor, W: Tensor) -> Tensor:  # [..., n, d] -> [..., H, n, dh]
        return torch.einsum("...pd,hde->...hpe", c, W)

    kc = _rope(proj(parts, B.W_K), rope)
    qc = _rope(proj(parts, B.W_Q), rope)
    key = torch.einsum("hqe,chse->chqs", q, kc) * B.scale
    query = torch.einsum("chqe,hse->chqs", qc, k) * B.scale
    k_extra = {"norm_bias": _rope(proj(norm_bias, B.W_K), rope), "attn_bias": _rope(B.b_K[:, None].expand(-1, n, -1), rope)}
    q_extra = {"norm_bias": _rope(proj(norm_bias, B.W_Q), rope), "attn_bias": _rope(B.b_Q[:, None].expand(-1, n, -1), rope)}
    vv = proj(parts, B.W_V)
    vv_extra = {"norm_bias": proj(norm_bias, B.W_V), "value_bias": B.b_V[:, None].expand(-1, n, -1)}
    pv = torch.einsum("hse,hed->hsd", v, B.W_O)
    o = torch.einsum("hqs,hsd->qd", alpha, pv)
    shares_out = alpha * torch.einsum("hsd,qd->hqs", pv, o) / (o * o).sum(-1).clamp_min(SAFE_EPS)[None, :, None]
    shares0 = alpha * ((pv - pv.mean(-1, keepdim=True)) @ D.d_t)[:, None, :]
    return AttnParts(
        up=up, q=q, k=k, v=v, scores=scores, alpha=alpha, pv=pv,
        key=key, key_extra={nm: torch.einsum("hqe,hse->hqs", q, e) * B.scale for nm, e in k_extra.items()},
        query=query, query_extra={nm: torch.einsum("hqe,hse->hqs", e, k) * B.scale for nm, e in q_extra.items()},
        value_vec=vv, value_vec_extra=vv_extra,
        value=(vv * v).sum(-1), value_extra={nm: (e * v).sum(-1) for nm, e in vv_extra.items()},
        shares0=shares0, shares_out=shares_out,
    )


def _mlp_parts(D: Decomposition, L: int, B: _Block, quirks: bool) -> MlpParts:
    threshold = D.order[f"mlp_{L}"]
    names = [nm for nm in D.names if D.order[nm] < threshold]
    if quirks:  # the block input for both families; L2 rows: the stream's groups, plus layer L's heads (GPT-2)
        x_in = D.resid_pre[L]
        l2_names = [nm for nm in D.names if D.order[nm] < L or (nm in names and nm.startswith(f"attn_{L}_head_"))]
    else:
        x_in = D.resid_pre[L] if D.parallel else D.resid_mid[L]
        names = [nm for nm in names if "bias" not in nm]
        l2_names = names
    g, _, eps = B.ln2
    vecs = D.vecs[D.index(names)]
    pre = _ln(x_in, B.ln2) @ B.W_in + B.b_in  # [n, m]
    act = B.act(pre)
    safe_pre = torch.where(pre.abs() < SAFE_EPS, torch.full_like(pre, SAFE_EPS), pre)
    out_c = B.W_out - B.W_out.mean(-1, keepdim=True)  # each neuron's centred output vector [m, d]
    principled = (act / safe_pre * (out_c @ D.d_t)) @ B.W_in.T  # [n, d] directions in the MLP's input
    geva = (act / act.sum(-1, keepdim=True).clamp_min(SAFE_EPS) / safe_pre) @ B.W_in.T
    h_mlp = act @ B.W_out
    align = (h_mlp @ B.W_out.T) / (h_mlp * h_mlp).sum(-1, keepdim=True).clamp_min(SAFE_EPS)
    outproj = (act * align / safe_pre) @ B.W_in.T
    read = marginal(vecs, x_in, g, eps, centre=not quirks)  # quirk: the shares do not centre

    def score(direction: Tensor) -> Tensor:
        return (read * direction).sum(-1)

    l2_parts = marginal(D.vecs[D.index(l2_names)], x_in, g, eps)
    return MlpParts(
        names=names, x_in=x_in, parts=marginal(vecs, x_in, g, eps),
        principled=score(principled), geva=score(geva), outproj=score(outproj),
        l2_names=l2_names, l2=(l2_parts @ B.W_in).norm(dim=-1),
    )


# ----------------------------------------------------------------------------------------------
# the splits


def safe_denominator(values: list[float] | Tensor, beta: float) -> float | None:
    """sign(Σv)·max(|Σv|, β·Σ|v|) (sign + for Σv = 0); None when Σ|v| < 1e-10."""
    vals = torch.as_tensor(values, dtype=DT)
    total, mass = float(vals.sum()), float(vals.abs().sum())
    if mass < SAFE_EPS:
        return None
    magnitude = max(abs(total), beta * mass)
    return magnitude if total >= 0 else -magnitude


def _parse(name: str) -> tuple[str, int, int]:
    m = re.fullmatch(r"attn_(\d+)_head_(\d+)", name)
    if m:
        return "head", int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"mlp_(\d+)", name)
    if m:
        return "mlp", int(m.group(1)), -1
    raise ValueError(name)


@dataclass
class _Rules:
    D: Decomposition
    preset: Preset
    quirks: bool
    flow: bool  # the flow sweep's variant of the rules (quirks only)

    def keep(self, name: str) -> bool:
        """Whether a row takes part in a denominator (the flow never lets a bias in)."""
        return not ("bias" in name and (self.flow or not self.quirks))

    def sources(self, L: int, h: int, q: int, depth0: bool) -> Tensor | None:
        """The factors [n] by which a head's credit at q goes to its source positions."""
        A = self.D.attn[L]
        if depth0 or self.preset.aligned:
            shares = (A.shares0 if depth0 else A.shares_out)[h, q]
            den = safe_denominator(shares, self.preset.beta)
            return None if den is None else shares / den
        w = A.alpha[h, q]
        return None if float(w.sum()) <= SAFE_EPS else w / w.sum()

    def branches(self, L: int, h: int, q: int, s: int):
        """[(mode, child position, names, shares)] for a unit of credit at (head, q, source s)."""
        A, out = self.D.attn[L], []
        weights = branch_weights(self.preset, quirks=self.quirks, flow=self.flow)
        valid = slice(0, q + 1)
        for mode, w in weights.items():
            if mode == "K":
                rows = A.key[:, h, q]
                vals = (rows - rows[:, valid].mean(-1, keepdim=True))[:, s]  # centred over the allowed keys
                names, child = list(A.up), s
            elif mode == "Q":
                rows = A.query[:, h, q]
                vals = (rows - rows[:, valid].mean(-1, keepdim=True))[:, s]
                names, child = list(A.up), q
            else:
                vals = torch.cat([A.value[:, h, s], A.value_extra["value_bias"][h, s][None]])
                names, child = list(A.up) + ["value_bias"], s
            keep = [i for i, nm in enumerate(names) if self.keep(nm)]
            names, vals = [names[i] for i in keep], vals[keep]
            den = safe_denominator(vals, self.preset.beta)
            if den is not None:
                out.append((mode, child, names, (w * vals / den).tolist()))
        return out

    def mlp(self, L: int, q: int, depth0: bool):
        """(names, shares) for a unit of credit at (MLP L, q), or None when it cannot be split."""
        M, P = self.D.mlp[L], self.preset
        if depth0:
            names, vals = self._rows(M.names, M.principled[:, q])
            den = safe_denominator(vals, P.beta)
            if den is not None:
                return names, (vals / den).tolist()
        if P.aligned or P.mlp_rule == "weighted":
            names, vals = self._rows(M.names, (M.outproj if P.aligned else M.geva)[:, q])
            den = safe_denominator(vals, P.beta)
            return None if den is None else (names, (vals / den).tolist())
        names, norms = self._rows(M.l2_names, M.l2[:, q])
        total = float(norms.sum())
        return None if total <= 0 else (names, (norms / total).tolist())  # a positive split keeps the sign

    def _rows(self, names: list[str], vals: Tensor):
        keep = [i for i, nm in enumerate(names) if self.keep(nm)]
        return [names[i] for i in keep], vals[keep]


# ----------------------------------------------------------------------------------------------
# flow (token credit, component flow) and paths


@dataclass
class RefPath:
    """One path: hops (component, label, position) from the root down to an embedding.

    Labels: "K", "Q", "V" at attention hops, "mlp" at MLP hops, None at the embedding.
    """

    hops: tuple[tuple[str, str | None, int], ...]
    raw: float  # credit reaching the embedding along this path
    score: float = 0.0  # raw as a % of the recursion's positive token mass

    @property
    def chain(self) -> str:
        """The reference's string: ``attn_1_head_2[V]@5→mlp_0@3→embedding@3``."""
        tag = lambda nm, lab: f"{nm}[{lab}]" if lab in ("K", "Q", "V") else nm  # noqa: E731
        return "→".join(f"{tag(nm, lab)}@{pos}" for nm, lab, pos in self.hops)

    @property
    def source_pos(self) -> int:
        return self.hops[-1][2]

    @property
    def modes(self) -> list[str]:
        return [lab for _, lab, _ in self.hops if lab in ("K", "Q", "V")]

    @property
    def depth(self) -> int:
        return len(self.hops) - 1


@dataclass
class UnpackRef:
    """The reference's outputs (``TraceResult``), with the decomposition they came from."""

    decomposition: Decomposition
    preset: Preset
    root: str  # "target" or "name@pos"
    seeds: dict[str, float]  # credit at the root position before any split
    token_credit: Tensor  # [n] % of the positive mass (flow sweep; unpruned)
    token_credit_raw: Tensor  # [n]
    suppress_ratio: float  # negative mass / (positive + negative mass)
    component_flow: dict[str, float]  # credit through each non-bias component, summed over positions
    component_flow_pos: dict[str, Tensor]  # ... per position [n]
    paths: list[RefPath]  # the top paths by |score|
    all_paths: list[RefPath]  # every path that survived the pruning, sorted by |raw|
    path_credit_raw: Tensor  # [n] the recursion's token credit (pruned)


def flow_sweep(D: Decomposition, preset: Preset, seeds: dict[str, float], q0: int, *, quirks: bool = True):
    """Unpruned top-down sweep: per-component credit [n] reaching it, and token credit [n] (raw).

    Credit that arrives straight from a seed uses the depth-0 rules; the rest the deeper rules.
    """
    R = _Rules(D, preset, quirks, flow=True)
    n = D.ids.shape[0]
    fresh = {nm: torch.zeros(n, dtype=DT) for nm in D.names if "bias" not in nm}
    inherited = {nm: torch.zeros(n, dtype=DT) for nm in fresh}
    for nm, val in seeds.items():
        if "bias" not in nm:
            fresh[nm][q0] += val
    layers = len(D.attn)
    heads = D.attn[0].alpha.shape[0]
    for L in reversed(range(layers)):  # MLP first: in GPT-2 it reads the same layer's heads
        for nm in [f"mlp_{L}"] + [f"attn_{L}_head_{h}" for h in range(heads)]:
            kind, _, h = _parse(nm)
            for q in range(n):
                for val, depth0 in ((float(fresh[nm][q]), True), (float(inherited[nm][q]), False)):
                    if val == 0.0:
                        continue
                    if kind == "mlp":
                        split = R.mlp(L, q, depth0)
                        for c, sh in zip(*split) if split else ():
                            inherited[c][q] += val * sh
                        continue
                    factors = R.sources(L, h, q, depth0)
                    for s in range(n) if factors is not None else ():
                        val_s = val * float(factors[s])
                        if val_s == 0.0:
                            continue
                        for _, child, names, shares in R.branches(L, h, q, s):
                            for c, sh in zip(names, shares):
                                inherited[c][child] += val_s * sh
    total = {nm: fresh[nm] + inherited[nm] for nm in fresh}
    credit = sum(total[nm] for nm in EMBEDDINGS if nm in total)
    return {nm: v for nm, v in total.items() if bool(v.any())}, credit


def walk_paths(D: Decomposition, preset: Preset, seeds: dict[str, float], q0: int, *, quirks: bool = True,
               min_frac: float = 1e-4, max_depth: int = 50, flow_rules: bool = False) -> list[RefPath]:
    """Depth-first recursion: every path whose credit stays >= min_frac in size at every split.

    ``flow_rules=True`` uses the flow sweep's variant of the rules (then, with min_frac = 0, the
    paths add up to the flow's token credit).
    """
    R = _Rules(D, preset, quirks, flow=flow_rules)
    n = D.ids.shape[0]
    found: list[RefPath] = []

    def visit(name: str, pos: int, credit: float, depth: int, trail: tuple) -> None:
        if depth > max_depth or abs(credit) < min_frac or "bias" in name:
            return
        if name in EMBEDDINGS:
            found.append(RefPath(trail + ((name, None, pos),), credit))
            return
        kind, L, h = _parse(name)
        if kind == "mlp":
            split = R.mlp(L, pos, depth == 0)
            for c, sh in zip(*split) if split else ():
                visit(c, pos, credit * sh, depth + 1, trail + ((name, "mlp", pos),))
            return
        factors = R.sources(L, h, pos, depth == 0)
        for s in range(n) if factors is not None else ():
            credit_s = credit * float(factors[s])
            if abs(credit_s) < min_frac:
                continue
            for mode, child, names, shares in R.branches(L, h, pos, s):
                for c, sh in zip(names, shares):
                    visit(c, child, credit_s * sh, depth + 1, trail + ((name, mode, pos),))

    for name, credit in seeds.items():
        visit(name, q0, credit, 0, ())
    return found


def _root(D: Decomposition, root: str | None) -> tuple[dict[str, float], int, str]:
    if root is None:
        return dict(D.seeds), D.position, "target"
    name, _, pos = root.partition("@")
    q = int(pos) if pos else D.position
    if name not in D.order or not 0 <= q < D.ids.shape[0]:
        raise ValueError(f"unknown root {root!r}")
    return {name: 1.0}, q, f"{name}@{q}"


def unpack_reference(model, input_ids: Tensor, target: int | None = None, distractor: int | None = None, *,
                     preset: str | Preset = "kqv_aligned", root: str | None = None, top_paths: int = 20,
                     min_frac: float = 1e-4, max_depth: int = 50, position: int = -1, quirks: bool = True,
                     processed: bool = False, decomposition: Decomposition | None = None) -> UnpackRef:
    """Unpack on a ``transformers`` GPT-2 or GPT-NeoX model, in float64.

    Args:
        input_ids: [n] or [1, n] token ids.
        target, distractor: token ids (target default: the top prediction at ``position``).
        preset: a name in `PRESETS` or a `Preset`.
        root: None (the target), or a component ``"attn_L_head_H"`` / ``"mlp_L"`` / ..., optionally
            ``"@pos"`` (default: the target position), which then gets credit 1.
        top_paths: how many paths to keep; min_frac: the pruning threshold on raw credit.
        processed: on TransformerLens's processed weights (see `tl_processing`).
        decomposition: reuse one from `decompose` (same quirks and processing).
    """
    P = PRESETS[preset] if isinstance(preset, str) else preset
    D = decomposition or decompose(model, input_ids, target, distractor, position=position, quirks=quirks, processed=processed)
    seeds, q0, label = _root(D, root)
    flows, credit = flow_sweep(D, P, seeds, q0, quirks=quirks)
    pos_mass, neg_mass = float(credit.clamp_min(0).sum()), float(-credit.clamp_max(0).sum())
    token_pct = credit / pos_mass * 100 if pos_mass > 0 else torch.zeros_like(credit)
    suppress = neg_mass / (pos_mass + neg_mass) if pos_mass + neg_mass > 0 else 0.0

    found = walk_paths(D, P, seeds, q0, quirks=quirks, min_frac=min_frac, max_depth=max_depth)
    path_credit = torch.zeros_like(credit)
    for p in found:
        path_credit[p.source_pos] += p.raw
    rec_pos = float(path_credit.clamp_min(0).sum())
    for p in found:
        p.score = p.raw / rec_pos * 100 if rec_pos > 0 and pos_mass > 0 else 0.0
    found.sort(key=lambda p: -abs(p.raw))
    return UnpackRef(
        decomposition=D, preset=P, root=label, seeds=seeds, token_credit=token_pct, token_credit_raw=credit,
        suppress_ratio=suppress, component_flow={nm: float(v.sum()) for nm, v in flows.items()},
        component_flow_pos=flows, paths=found[:top_paths], all_paths=found, path_credit_raw=path_credit,
    )


# ----------------------------------------------------------------------------------------------
# the six closure checks (unpack/validate.py), as errors


def closure_errors(D: Decomposition) -> dict[str, float]:
    """The errors the reference's six checks bound, and its tolerances in `CLOSURE_TOLERANCES`.

    residual: max |Σ components written so far − the stream| over layer boundaries;
    key / query: max |softmax(Σ centred logits + mask) − α|; qk: the two reconstructions apart;
    value: max |Σ_c <v_c, v> − ‖v‖²| / max ‖v‖²; mlp: 0 when every L2 row is finite and >= 0, else 1.
    """
    n = D.ids.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    centred = lambda x: x - x.masked_fill(~causal, 0).sum(-1, keepdim=True) / causal.sum(-1, keepdim=True)  # noqa: E731
    pattern = lambda s: s.masked_fill(~causal, float("-inf")).softmax(-1)  # noqa: E731
    err = dict.fromkeys(("residual", "key", "query", "qk", "value", "mlp"), 0.0)
    for L, A in enumerate(D.attn + [None]):
        written = [i for i, nm in enumerate(D.names) if D.order[nm] < L] if A else list(range(len(D.names)))
        stream = D.resid_pre[L] if A else D.resid_final
        err["residual"] = max(err["residual"], float((D.vecs[written].sum(0) - stream).abs().max()))
        if A is None:
            break
        k_rec = pattern(centred(A.key).sum(0) + sum(centred(e) for e in A.key_extra.values()))
        q_rec = pattern(centred(A.query).sum(0) + sum(centred(e) for e in A.query_extra.values()))
        err["key"] = max(err["key"], float((k_rec - A.alpha).abs().max()))
        err["query"] = max(err["query"], float((q_rec - A.alpha).abs().max()))
        err["qk"] = max(err["qk"], float((k_rec - q_rec).abs().max()))
        norm2 = (A.v * A.v).sum(-1)
        v_rec = A.value.sum(0) + sum(A.value_extra.values())
        err["value"] = max(err["value"], float((v_rec - norm2).abs().max() / norm2.abs().max().clamp_min(1e-12)))
    ok = all(bool(torch.isfinite(M.l2).all() and (M.l2 >= 0).all()) for M in D.mlp)
    err["mlp"] = 0.0 if ok else 1.0
    return err


CLOSURE_TOLERANCES = {"residual": 1e-4, "key": 1e-2, "query": 1e-2, "qk": 1e-2, "value": 1e-3, "mlp": 0.5}
