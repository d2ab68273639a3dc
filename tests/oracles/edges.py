"""An autograd oracle for DPA circuit *edges*, independent of dpa_lens and of TransformerLens.

It is the re-wired forward of ``rewired.py`` (DPA is the gradient of this forward; same detached norm scales, secants,
``mu`` mixing, float64, raw ``transformers`` weights) with one change: every *reader* gets a private
copy of the residual stream it reads, ``x_r = x + e_r``, where ``e_r`` is a zero leaf that requires
grad, added *before* the reader's norm. Values are unchanged (``e_r = 0``); ``∂F/∂e_r`` is exactly what
reader ``r`` adds to the effective target (``R_r(t_r)`` in circuits.md), and since the stream reaches
the target only through the readers' copies, the gradient of the stream at any point is the sum of the
``∂F/∂e_r`` of the readers downstream of it. Hence, for a writer ``u`` with output ``out_u``::

    edge(u -> r)[b, p] = out_u[b, p] · ∂F/∂e_r[b, p]          (one stream position p)
    node(u)[b, p]      = out_u[b, p] · ∂F/∂stream[b, p]  =  Σ_{r downstream of u} edge(u -> r)[b, p]

Names (``L{l}`` = layer l, 0-based; ``H{h}`` = *query* head h; ``N{n}`` = MLP neuron n):

* writers: ``"embed"`` (the first block's input: token embedding, + learned positions for GPT-2,
  × Gemma's embedding scale), ``"L{l}H{h}"`` (the head's contribution to the stream, ``z_h W_O[h]``,
  after Gemma's attention output norm with its scale frozen), ``"L{l}.mlp"`` (the MLP output, after
  Gemma's output norm, without the output bias) and, with ``neurons=True``, ``"L{l}N{n}"``
  (activation × its W_out row, times Gemma's output norm gain / frozen scale). Biases are not writers.
* readers, as ``(reader, path)``: ``("L{l}H{h}", "q"|"k"|"v")`` (the query head's own copy of the
  stream for its query, key and value inputs; with grouped-query attention each query head has its
  own copy for k and v too, the shared K/V weights applied to each copy), ``("L{l}.mlp", "mlp")`` and
  ``("logit", "logit")`` (the final norm's input).
* pairs: a writer of layer ``l`` is read by every reader of a later layer, by ``logit``, and in
  sequential blocks a head also by its own layer's MLP (not in parallel NeoX blocks); ``embed`` by all.

Positions: the position ``p`` of an edge is the stream position where ``u`` writes and ``r`` reads
(for ``k``/``v`` readers the key position; the query positions that pulled it are summed).
Sign: a positive score pushes the target quantity up. The batch rows are independent.

Biases (including LayerNorm's β, booked as the biases of the maps reading it, as in rewired.py) are
the remainder: ``bias`` is their total score (equal to ``rewired_scores(...).bias``), and
``bias_edges[(name, reader, path)]`` the edges of the biases that enter the stream
(``"L{l}.attn_bias"``: output bias + value bias through W_O; ``"L{l}.mlp_bias"``: MLP output bias), so
that for every reader ``Σ_u edges[(u, r, path)] + Σ bias_edges[(·, r, path)] == reader_inputs[(r, path)]``
(``x_r · ∂F/∂e_r``). Query/key and MLP input biases do not enter the stream and have no edges.

Use::

    from tests.oracles.edges import edge_scores
    rows = torch.arange(ids.shape[0])
    out = edge_scores(hf_model, ids, lambda lg: lg[rows, -1, y], mu=(0.25, 0.25, 0.5, 0.5, 0.5))
    out.edges[("L0H1", "L1H3", "k")]   # [batch, pos]
    out.frame()                        # DataFrame: writer, reader, path, score (positions summed)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from .rewired import DT, _mask, _p, _Rewired, _rope

Edge = tuple[str, str, str]  # (writer, reader, path)
Reader = tuple[str, str]  # (reader, path)


@dataclass
class EdgeScores:
    """What `edge_scores` returns. ``b`` = batch, ``n`` = positions, ``d`` = d_model.

    Attributes:
        logits: ``[b, n, vocab]`` the oracle's logits (= the model's: the private copies are zero).
        value: ``[b]`` the target quantity.
        writers: writer names, in order ``embed, L0H0 … L0H{H-1}, L0.mlp, L1H0, …`` (no neurons).
        readers: ``(reader, path)`` in order ``(L0H0, q), (L0H0, k), (L0H0, v), (L0H1, q), …, (L0.mlp, mlp),
            …, (logit, logit)``.
        dense: ``[b, n, len(writers), len(readers)]`` edge scores per position, zero where ``mask`` is False.
        mask: ``[len(writers), len(readers)]`` bool: the reader is downstream of the writer.
        edges: ``{(writer, reader, path): [b, n]}`` for every pair in ``mask`` (same numbers as ``dense``),
            plus ``(L{l}N{n}, reader, path)`` for neurons when requested.
        nodes: ``{writer: [b, n]}`` node scores (activation × gradient at the writer, as rewired.py),
            neurons included when requested.
        outputs: ``{writer: [b, n, d]}`` what each writer (not neuron) adds to the stream.
        neuron_writers: ``L{l}N{n}`` names (empty unless ``neurons=True``).
        reader_grads: ``{(reader, path): [b, n, d]}`` ``∂F/∂e_r``, the reader's share of the effective target.
        reader_inputs: ``{(reader, path): [b, n]}`` ``x_r · ∂F/∂e_r`` (the stream the reader reads).
        bias: ``[b]`` total score of all biases (as ``rewired_scores(...).bias``).
        bias_edges: ``{(bias name, reader, path): [b, n]}`` edges of the stream biases.
    """

    logits: Tensor
    value: Tensor
    writers: list[str]
    readers: list[Reader]
    dense: Tensor
    mask: Tensor
    edges: dict[Edge, Tensor]
    nodes: dict[str, Tensor]
    outputs: dict[str, Tensor]
    neuron_writers: list[str]
    reader_grads: dict[Reader, Tensor]
    reader_inputs: dict[Reader, Tensor]
    bias: Tensor
    bias_edges: dict[Edge, Tensor]

    def frame(self, per_position: bool = False, neurons: bool = True):
        """A pandas DataFrame, one row per edge: ``writer, reader, path, [batch], [position], score``.

        ``score`` is summed over positions unless ``per_position``; a ``batch`` column appears when
        there is more than one batch row.
        """
        import pandas as pd

        rows = []
        for (w, r, path), s in self.edges.items():
            if not neurons and w in self._neuron_set:
                continue
            for bi in range(s.shape[0]):
                head = (w, r, path) + ((bi,) if s.shape[0] > 1 else ())
                if per_position:
                    rows += [head + (p, float(v)) for p, v in enumerate(s[bi])]
                else:
                    rows.append(head + (float(s[bi].sum()),))
        cols = ["writer", "reader", "path"] + (["batch"] if self.value.shape[0] > 1 else [])
        cols += (["position"] if per_position else []) + ["score"]
        return pd.DataFrame(rows, columns=cols)

    @property
    def _neuron_set(self) -> set[str]:
        return set(self.neuron_writers)


@dataclass
class _Net:
    """The re-wired pieces (``R``) plus the private reader copies and the writers' outputs."""

    R: _Rewired
    sequential: bool = True
    leaves: dict[str, Tensor] = field(default_factory=dict)  # "L{l}.q|k|v": [b, n, H, d]; "L{l}.mlp", "logit": [b, n, d]
    inputs: dict[str, Tensor] = field(default_factory=dict)  # the stream each copy is added to: [b, n, d]
    embed: Tensor | None = None
    mlp_outs: list[Tensor] = field(default_factory=list)  # [b, n, d] per layer
    neuron_maps: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (post / frozen out-norm scale [b, n, m], W_out [m, d])
    stream_biases: list[tuple[str, int, str, Tensor]] = field(default_factory=list)  # (name, layer, "attn"|"mlp", [b, 1, d])

    def copy(self, key: str, x: Tensor, heads: int | None = None) -> Tensor:
        """x [b, n, d] + a zero leaf; with ``heads``, one copy per head: [b, n, heads, d]."""
        shape = x.shape[:2] + ((heads,) if heads else ()) + x.shape[2:]
        e = torch.zeros(shape, dtype=DT, requires_grad=True)
        self.leaves[key], self.inputs[key] = e, x.detach()
        return (x[:, :, None, :] if heads else x) + e

    def stream_bias(self, name: str, layer: int, kind: str, vec: Tensor) -> Tensor:
        leaf = self.R.leaf(vec)
        self.stream_biases.append((name, layer, kind, leaf))
        return leaf


def _heads_in(N: _Net, key: str, x: Tensor, norm, W: Tensor) -> Tensor:
    """Each query head reads its own copy of ``x`` [b, n, d] through ``norm``: ``W`` [H, dh, d] (the rows of
    each query head; with GQA the shared K/V rows repeated per query head) gives [b, n, H, dh]."""
    return torch.einsum("bnhd,hed->bnhe", norm(N.copy(key, x, W.shape[0])), W)


def _llama_like(hf_model, ids: Tensor, N: _Net) -> Tensor:
    """Llama, Mistral, Qwen2, Qwen3 and Gemma 2/3 (query-key norms, output norms, soft caps, windows)."""
    R = N.R
    cfg, inner = hf_model.config, hf_model.model
    arch = type(hf_model).__name__
    gemma = arch.startswith("Gemma")
    b, n = ids.shape
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    G = H // K
    d = cfg.hidden_size
    dh = getattr(cfg, "head_dim", None) or d // H
    eps = cfg.rms_norm_eps
    act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    gain = (lambda w: 1.0 + _p(w)) if gemma else _p  # Gemma stores w for a gain of 1 + w
    x = _p(inner.embed_tokens.weight)[ids]
    if gemma:
        x = x * torch.tensor(d**0.5, dtype=hf_model.dtype).to(DT)
    x = N.embed = x.clone().requires_grad_(True)
    positions = torch.arange(n)[None].expand(b, -1)
    layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    rope = {}
    for kind in set(layer_types):
        args = (x.detach().float(), positions) + ((kind,) if arch == "Gemma3ForCausalLM" else ())
        cos, sin = inner.rotary_emb(*args)
        rope[kind] = (cos.to(DT), sin.to(DT))
    for li, layer in enumerate(inner.layers):
        at = layer.self_attn
        norm = partial(R.rms, gain=gain(layer.input_layernorm.weight), eps=eps)
        q, k, v = (_heads_in(N, f"L{li}.{path}", x, norm, _p(lin.weight).view(-1, dh, d).repeat_interleave(H * dh // lin.out_features, dim=0))
                   for path, lin in (("q", at.q_proj), ("k", at.k_proj), ("v", at.v_proj)))
        if at.q_proj.bias is not None:  # (the value bias is booked as an output bias below)
            q = q + R.leaf(_p(at.q_proj.bias)).view(b, 1, H, dh)
        if at.k_proj.bias is not None:
            k = k + R.leaf(_p(at.k_proj.bias)).view(b, 1, K, dh).repeat_interleave(G, dim=2)
        if getattr(at, "q_norm", None) is not None:  # query-key norm, per head, before rotary
            q, k = R.rms(q, gain(at.q_norm.weight), eps), R.rms(k, gain(at.k_norm.weight), eps)
        cos, sin = rope[layer_types[li]]
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        window = cfg.sliding_window if layer_types[li] == "sliding_attention" or (arch == "MistralForCausalLM" and cfg.sliding_window) else None
        scaling = getattr(at, "scaling", dh**-0.5)
        z = R.attention(q, k, v, _mask(n, window, ids.device), scaling, getattr(cfg, "attn_logit_softcapping", None))
        W_O = _p(at.o_proj.weight).T  # [H*dh, d]
        out_norm = None
        if gemma:  # an output norm with a frozen scale is linear: apply it per head, with the scale of the sum
            total = torch.einsum("bqhe,hed->bqd", z.detach(), W_O.reshape(H, dh, -1))
            scale = torch.sqrt((total * total).mean(-1, keepdim=True) + eps).detach()
            out_norm = lambda c, w=layer.post_attention_layernorm.weight, s=scale: c / s[:, :, None] * gain(w)  # noqa: E731
        x = x + R.heads_out(z, W_O, out_norm)
        bias = torch.zeros(d, dtype=DT)
        if at.v_proj.bias is not None:  # value bias = an output bias (attention weights sum to one)
            bias = bias + _p(at.o_proj.weight) @ _p(at.v_proj.bias).view(K, dh).repeat_interleave(G, dim=0).reshape(-1)
        if at.o_proj.bias is not None:
            bias = bias + _p(at.o_proj.bias)
        if at.v_proj.bias is not None or at.o_proj.bias is not None:
            x = x + N.stream_bias(f"L{li}.attn_bias", li, "attn", bias)
        ml = layer.mlp
        h2 = R.rms(N.copy(f"L{li}.mlp", x), gain((layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm).weight), eps)
        post = R.gated(h2 @ _p(ml.gate_proj.weight).T, h2 @ _p(ml.up_proj.weight).T, act)
        W_out = _p(ml.down_proj.weight).T  # [m, d]
        inv = torch.ones(b, n, 1, dtype=DT)
        if gemma:
            inv = 1 / torch.sqrt(((post @ W_out) ** 2).mean(-1, keepdim=True) + eps).detach()
            W_out = W_out * gain(layer.post_feedforward_layernorm.weight)
        mlp_out = post * inv @ W_out
        N.mlp_outs.append(mlp_out)
        N.neuron_maps.append((post.detach() * inv, W_out))
        x = x + mlp_out
    x = R.rms(N.copy("logit", x), gain(inner.norm.weight), eps)
    logits = x @ _p(hf_model.lm_head.weight).T
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        raw = logits.detach()
        logits = (cap * torch.tanh(raw / cap) / raw) * logits
    return logits


def _gpt2(hf_model, ids: Tensor, N: _Net) -> Tensor:
    R = N.R
    cfg, tr = hf_model.config, hf_model.transformer
    b, n = ids.shape
    H, d = cfg.n_head, cfg.n_embd
    dh = d // H
    eps = cfg.layer_norm_epsilon
    x = N.embed = (_p(tr.wte.weight)[ids] + _p(tr.wpe.weight)[:n][None]).clone().requires_grad_(True)
    for li, block in enumerate(tr.h):
        W = _p(block.attn.c_attn.weight)  # [d, 3d] (Conv1D: y = x W + b)
        bias = _p(block.attn.c_attn.bias) + _p(block.ln_1.bias) @ W  # LayerNorm's β enters through the maps reading it
        norm = partial(R.ln, gain=_p(block.ln_1.weight), eps=eps)
        q, k, v = (_heads_in(N, f"L{li}.{path}", x, norm, W[:, i * d : (i + 1) * d].reshape(d, H, dh).permute(1, 2, 0))
                   for i, path in enumerate("qkv"))
        q = q + R.leaf(bias[:d]).view(b, 1, H, dh)
        k = k + R.leaf(bias[d : 2 * d]).view(b, 1, H, dh)
        z = R.attention(q, k, v, _mask(n, None, ids.device), dh**-0.5, None)
        W_O = _p(block.attn.c_proj.weight)  # [d, d]
        x = x + R.heads_out(z, W_O) + N.stream_bias(f"L{li}.attn_bias", li, "attn", _p(block.attn.c_proj.bias) + bias[2 * d :] @ W_O)
        h2 = R.ln(N.copy(f"L{li}.mlp", x), _p(block.ln_2.weight), eps)
        W_in = _p(block.mlp.c_fc.weight)
        post = R.plain(h2 @ W_in + R.leaf(_p(block.mlp.c_fc.bias) + _p(block.ln_2.bias) @ W_in), cfg.activation_function)
        W_out = _p(block.mlp.c_proj.weight)  # [m, d]
        N.mlp_outs.append(post @ W_out)
        N.neuron_maps.append((post.detach(), W_out))
        x = x + N.mlp_outs[-1] + N.stream_bias(f"L{li}.mlp_bias", li, "mlp", _p(block.mlp.c_proj.bias))
    h = R.ln(N.copy("logit", x), _p(tr.ln_f.weight), eps)
    W_U = _p(hf_model.lm_head.weight).T
    return h @ W_U + R.leaf(_p(tr.ln_f.bias) @ W_U)


def _neox(hf_model, ids: Tensor, N: _Net) -> Tensor:
    R = N.R
    cfg, nx = hf_model.config, hf_model.gpt_neox
    N.sequential = not getattr(cfg, "use_parallel_residual", True)
    b, n = ids.shape
    H, d = cfg.num_attention_heads, cfg.hidden_size
    dh = d // H
    eps = cfg.layer_norm_eps
    x = N.embed = _p(nx.embed_in.weight)[ids].clone().requires_grad_(True)
    cos, sin = nx.rotary_emb(x.detach().float(), torch.arange(n)[None].expand(b, -1))
    cos, sin = cos.to(DT), sin.to(DT)
    for li, layer in enumerate(nx.layers):
        at = layer.attention
        W = _p(at.query_key_value.weight).view(H, 3, dh, d)  # rows grouped per head: (q, k, v)
        bias = (_p(at.query_key_value.bias) + _p(layer.input_layernorm.bias) @ _p(at.query_key_value.weight).T).view(H, 3, dh)
        norm = partial(R.ln, gain=_p(layer.input_layernorm.weight), eps=eps)
        q, k, v = (_heads_in(N, f"L{li}.{path}", x, norm, W[:, i]) for i, path in enumerate("qkv"))
        q = q + R.leaf(bias[:, 0].reshape(-1)).view(b, 1, H, dh)
        k = k + R.leaf(bias[:, 1].reshape(-1)).view(b, 1, H, dh)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        z = R.attention(q, k, v, _mask(n, None, ids.device), dh**-0.5, None)
        W_O = _p(at.dense.weight).T  # [H*dh, d]
        attn = R.heads_out(z, W_O) + N.stream_bias(f"L{li}.attn_bias", li, "attn", _p(at.dense.bias) + bias[:, 2].reshape(-1) @ W_O)
        mid = x + attn if N.sequential else x  # parallel: the MLP reads the block input
        h2 = R.ln(N.copy(f"L{li}.mlp", mid), _p(layer.post_attention_layernorm.weight), eps)
        W_in = _p(layer.mlp.dense_h_to_4h.weight).T
        s = h2 @ W_in + R.leaf(_p(layer.mlp.dense_h_to_4h.bias) + _p(layer.post_attention_layernorm.bias) @ W_in)
        post = R.plain(s, cfg.hidden_act)
        W_out = _p(layer.mlp.dense_4h_to_h.weight).T  # [m, d]
        N.mlp_outs.append(post @ W_out)
        N.neuron_maps.append((post.detach(), W_out))
        x = x + attn + N.mlp_outs[-1] + N.stream_bias(f"L{li}.mlp_bias", li, "mlp", _p(layer.mlp.dense_4h_to_h.bias))
    h = R.ln(N.copy("logit", x), _p(nx.final_layer_norm.weight), eps)
    W_U = _p(hf_model.get_output_embeddings().weight).T
    return h @ W_U + R.leaf(_p(nx.final_layer_norm.bias) @ W_U)


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


def _reads(sequential: bool, writer: tuple[int, str], reader: tuple[int, str]) -> bool:
    """Whether a writer (layer, kind) is in the stream a reader (layer, kind) reads. embed: layer -1."""
    (wl, wk), (rl, rk) = writer, reader
    return rk == "logit" or rl > wl or (sequential and rl == wl and wk == "attn" and rk == "mlp")


def edge_scores(hf_model, input_ids: Tensor, direction_fn, *, mu: tuple[float, float, float, float, float],
                neurons: bool = False) -> EdgeScores:
    """Edge (and node) scores of the re-wired forward of a ``transformers`` model of a supported family.

    Args:
        hf_model: an untouched ``transformers`` causal LM (weights are read, cast to float64).
        input_ids: ``[batch, pos]`` token ids (with BOS, as the model is run).
        direction_fn: ``logits [batch, pos, vocab] -> values [batch]``, the target quantity (a logit, a
            logit difference, ...).
        mu: ``(q, k, v, gate, up)``.
        neurons: also give per-neuron writers ``L{l}N{n}`` (edges and nodes).

    Returns:
        `EdgeScores` (see the module docstring for names, shapes and signs).
    """
    b, n = input_ids.shape
    N = _Net(R=_Rewired(mu=tuple(mu), b=b))
    logits = FORWARDS[type(hf_model).__name__](hf_model, input_ids, N)
    value = direction_fn(logits)
    value.sum().backward()
    R = N.R
    L, H = len(R.heads), R.heads[0].shape[2]

    # writers: (name, (layer, kind), output [b, n, d], node score [b, n])
    writers = [("embed", (-1, "embed"), N.embed.detach(), (N.embed.detach() * N.embed.grad).sum(-1))]
    for li in range(L):
        c = R.heads[li]
        node = (c.detach() * c.grad).sum(-1)  # [b, n, H]
        writers += [(f"L{li}H{h}", (li, "attn"), c[:, :, h].detach(), node[..., h]) for h in range(H)]
        post = R.posts[li]
        writers.append((f"L{li}.mlp", (li, "mlp"), N.mlp_outs[li].detach(), (post.detach() * post.grad).sum(-1)))

    # readers: (name, path, (layer, kind), ∂F/∂e_r [b, n, d], x_r [b, n, d])
    readers = []
    for li in range(L):
        for h in range(H):
            readers += [(f"L{li}H{h}", p, (li, "attn"), N.leaves[f"L{li}.{p}"].grad[:, :, h], N.inputs[f"L{li}.{p}"]) for p in ("q", "k", "v")]
        readers.append((f"L{li}.mlp", "mlp", (li, "mlp"), N.leaves[f"L{li}.mlp"].grad, N.inputs[f"L{li}.mlp"]))
    readers.append(("logit", "logit", (L, "logit"), N.leaves["logit"].grad, N.inputs["logit"]))

    mask = torch.tensor([[_reads(N.sequential, w[1], r[2]) for r in readers] for w in writers])
    outs = torch.stack([w[2] for w in writers], 2)  # [b, n, U, d]
    grads = torch.stack([r[3] for r in readers], 2)  # [b, n, R, d]
    dense = torch.einsum("bnud,bnrd->bnur", outs, grads) * mask
    edges = {(w[0], r[0], r[1]): dense[:, :, i, j] for i, w in enumerate(writers) for j, r in enumerate(readers) if mask[i, j]}
    nodes = {w[0]: w[3].detach() for w in writers}

    neuron_writers = []
    if neurons:
        for li, (act, W_out) in enumerate(N.neuron_maps):
            post = R.posts[li]
            node = post.detach() * post.grad  # [b, n, m]
            names = [f"L{li}N{i}" for i in range(W_out.shape[0])]
            neuron_writers += names
            nodes.update({name: node[..., i] for i, name in enumerate(names)})
            for r in readers:
                if _reads(N.sequential, (li, "mlp"), r[2]):
                    per = act * (r[3] @ W_out.T)  # [b, n, m]
                    edges.update({(name, r[0], r[1]): per[..., i] for i, name in enumerate(names)})

    bias_edges = {}
    for name, layer, kind, leaf in N.stream_biases:
        for r in readers:
            if _reads(N.sequential, (layer, kind), r[2]):
                bias_edges[(name, r[0], r[1])] = (leaf.detach() * r[3]).sum(-1)
    bias = torch.zeros(b, dtype=DT)
    for leaf in R.bias_leaves:
        bias = bias + (leaf.detach() * leaf.grad).sum(dim=(1, 2))

    return EdgeScores(
        logits=logits.detach(),
        value=value.detach(),
        writers=[w[0] for w in writers],
        readers=[(r[0], r[1]) for r in readers],
        dense=dense,
        mask=mask,
        edges=edges,
        nodes=nodes,
        outputs={w[0]: w[2] for w in writers},
        neuron_writers=neuron_writers,
        reader_grads={(r[0], r[1]): r[3] for r in readers},
        reader_inputs={(r[0], r[1]): (r[4] * r[3]).sum(-1) for r in readers},
        bias=bias,
        bias_edges=bias_edges,
    )
