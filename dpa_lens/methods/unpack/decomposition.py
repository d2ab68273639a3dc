"""Unpack's decomposition of one row of a cached forward, and the tables by which credit moves from a
component to the components it read.

Everything here is for one batch row at its real positions, in float64 (``n`` positions, ``C``
components). Components are what writes to the residual stream (see `Decomposition`); a *share*
table maps a unit of credit at a component to the components it read ("children", biases never
among them), one table per rule set (see `dpa_lens.methods.unpack.rules`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from dpa_lens.forward import CachedForward
from dpa_lens.graph import head_name, mlp_name
from dpa_lens.methods.unpack.rules import DT, RULE_SETS, SAFE_EPS, Preset, marginal, normalized, rotate_at, safe_split
from dpa_lens.models import hooks
from dpa_lens.ops import activation


def _safe(pre: Tensor) -> Tensor:
    """Pre-activations with those below 1e-10 in size replaced by 1e-10 (the reference's ``safe_pre``)."""
    return torch.where(pre.abs() < SAFE_EPS, torch.full_like(pre, SAFE_EPS), pre)


class RowForward:
    """One batch row of a cached forward at its real positions, in float64 (a hook of a block on its layer's
    device, `CachedForward.device_for`: on a split model each layer's tables are made where its weights are)."""

    def __init__(self, fwd: CachedForward, row: int):
        self.fwd, self.row = fwd, row
        self.idx = torch.nonzero(fwd.inputs.real[row].to(fwd.device)).flatten()
        self.n = int(self.idx.numel())

    def act(self, name: str) -> Tensor:
        """A cached activation of this row at its real positions, float64 (``ln1``'s per-head copies,
        cached with split attention inputs, read as the one stream's, as `CachedForward.act` does)."""
        t = self.fwd.cache[name][self.row]
        if t.ndim == 3 and name.endswith(("ln1.hook_scale", "ln1.hook_normalized")):
            t = t[:, 0]
        t = t.to(self.fwd.device_for(name), DT)
        return t[self.idx.to(t.device)]

    def local(self, position: int) -> int | None:
        """The index among the real positions of a position of the padded sequence (None at padding)."""
        where = torch.nonzero(self.idx == position).flatten()
        return int(where[0]) if where.numel() else None

    def pattern(self, layer: int) -> Float[Tensor, "head query key"]:
        p = self.fwd.pattern(layer)[self.row].to(DT)
        idx = self.idx.to(p.device)
        return p[:, idx][:, :, idx]

    def queries_keys(self, layer: int) -> tuple[Tensor, Tensor]:
        """Queries ``[n, head, d_head]`` and keys ``[n, kv_head, d_head]`` as the scores see them."""
        q, k = self.fwd.queries_keys(layer)
        idx = self.idx.to(q.device)
        return q[self.row].to(DT)[idx], k[self.row].to(DT)[idx]

    def rotary(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` ``[n, 1, rotary_dim]`` at the real positions, or None without rotary."""
        cos_sin = self.fwd.rotary(layer)
        if cos_sin is None:
            return None
        cos, sin = cos_sin
        r = self.row if cos.shape[0] > 1 else 0
        dev = self.fwd.layer_device(layer)
        idx = self.idx.to(dev)
        return cos[r].to(dev, DT)[idx], sin[r].to(dev, DT)[idx]


@dataclass
class HeadTables:
    """How some heads of a layer at query q hand on credit.

    ``factors0``/``factors`` ``[head, q, s]``: the fraction going to source position s, for credit
    arriving straight from a seed and for deeper credit (zero rows where the split is undefined).
    Then per rule set and branch, shares over the children: ``k``/``q`` ``[head, q, s, child]`` (the
    child sits at s for K, at q for Q), ``v`` ``[head, s, child]``; ``peak``, per branch, the largest
    share of the recursion's in size over the children (``[head, q, s]``, ``[head, s]``), for pruning.
    """

    factors0: Tensor
    factors: Tensor
    shares: dict[str, dict[str, Tensor]]
    peak: dict[str, Tensor]

    def to(self, device: torch.device) -> HeadTables:
        """The tables on ``device`` (made on a split model's layer, read where the credit is)."""
        move = _mover(device)
        return HeadTables(move(self.factors0), move(self.factors), {s: {b: move(t) for b, t in by.items()} for s, by in self.shares.items()},
                          {b: move(t) for b, t in self.peak.items()})


@dataclass
class MLPTables:
    """How an MLP at position q hands on credit, per rule set: ``[q, child]`` shares for credit from a
    seed (``first``) and deeper credit (``deeper``)."""

    first: dict[str, Tensor]
    deeper: dict[str, Tensor]

    def to(self, device: torch.device) -> MLPTables:
        """The tables on ``device`` (see `HeadTables.to`)."""
        move = _mover(device)
        return MLPTables({s: move(t) for s, t in self.first.items()}, {s: move(t) for s, t in self.deeper.items()})


def _mover(device: torch.device):
    """``t -> t.to(device)``, moving a tensor shared by several tables (one rule set standing for another) once."""
    moved: dict[int, Tensor] = {}

    def move(t: Tensor) -> Tensor:
        if id(t) not in moved:
            moved[id(t)] = t.to(device)
        return moved[id(t)]

    return move


class Decomposition:
    """The components of one row's forward and the split tables of every layer.

    Components, in order: ``embed`` (the token embedding), ``pos_embed`` (learned positions, GPT-2),
    then per layer its heads ``L{l}H{h}`` (the head's output through its slice of ``W_O``, no output
    bias), its output bias ``L{l}.attn_bias`` (where the model has one) and ``L{l}.mlp`` (the whole
    MLP output). Their writes ``vecs [C, n, d_model]`` add up to the residual stream. A component's
    depth ``order`` is -1 for the embeddings, l for layer l's heads and bias, l + 0.5 for its MLP
    (l in parallel blocks): a sublayer reads the components of lower order. ``vecs`` are on the forward's
    device; on a split model each layer's heads are written on its device and gathered there.
    """

    def __init__(self, fwd: CachedForward, row: int, preset: Preset, quirks: bool):
        self.r = r = RowForward(fwd, row)
        self.view, self.preset, self.quirks = fwd.view, preset, quirks
        view, rules = fwd.view, fwd.view.rules
        self.layer_norm, self.parallel = rules.norm == "ln", rules.parallel
        self.names: list[str] = ["embed"]
        vecs = [r.act(hooks.EMBED)[None]]
        order = [-1.0]
        if getattr(view.cfg, "positional_embedding_type", None) == "standard":
            self.names.append("pos_embed")
            vecs.append(r.act(hooks.POS_EMBED)[None])
            order.append(-1.0)
        self.head_index: list[list[int]] = []
        self.mlp_index: list[int] = []
        self.value_bias = False  # whether some head has a value bias (unprocessed weights)
        for layer in range(view.n_layers):
            a = view.attn(layer)
            self.value_bias |= a.b_V is not None
            W_O = a.W_O.to(fwd.layer_device(layer), DT)
            z = r.act(hooks.attn(layer, "z"))
            self.head_index.append(list(range(len(self.names), len(self.names) + view.n_heads)))
            self.names += [head_name(layer, h) for h in range(view.n_heads)]
            vecs.append(torch.einsum("phe,hed->hpd", z, W_O).to(fwd.device))
            order += [float(layer)] * view.n_heads
            if a.b_O is not None:
                self.names.append(f"L{layer}.attn_bias")
                vecs.append(a.b_O.to(fwd.device, DT).expand(r.n, -1)[None])
                order.append(float(layer))
            self.mlp_index.append(len(self.names))
            self.names.append(mlp_name(layer))
            vecs.append(r.act(hooks.mlp_out(layer))[None].to(fwd.device))
            order.append(layer + (0.0 if self.parallel else 0.5))
        self.vecs = torch.cat(vecs)
        self.order = torch.tensor(order, dtype=DT, device=fwd.device)
        self.bias = torch.tensor(["bias" in nm for nm in self.names], device=fwd.device)

    # ------------------------------------------------------------------ rule sets
    def keep(self, rule_set: str) -> Bool[Tensor, " comp"]:
        """Which components take part in a denominator: the recursion keeps bias rows (with quirks)."""
        if rule_set == "paths" and self.quirks:
            return torch.ones_like(self.bias)
        return ~self.bias

    def rule_sets(self) -> list[str]:
        """The rule sets whose shares differ: "flow" is "paths" unless quirks keep bias rows."""
        return list(RULE_SETS) if self.quirks and (bool(self.bias.any()) or self.value_bias) else ["paths"]

    # ------------------------------------------------------------------ target
    def target(self, t: int, token: int, distractor: int | None) -> tuple[Tensor, Tensor]:
        """``(seeds [C], d_t [d_model])`` for the target at local position t.

        A seed is a component's marginal logit-lens score at t: its write through the final norm
        (frozen scale) onto the target's unembedding minus the vocabulary mean (minus the distractor's
        without quirks; the reference's seeds ignore the distractor). ``d_t`` is the target direction
        in the final stream (target minus distractor, or minus the mean), read by the depth-0 splits;
        only its direction matters.
        """
        view, r = self.view, self.r
        W_U = view.W_U.detach().to(r.fwd.unembed_device, DT)  # read where it is; only columns move (a split model)
        mean = W_U.mean(1)
        against = mean if distractor is None else W_U[:, distractor]
        seed_against = mean if (distractor is None or self.quirks) else against
        home = r.fwd.device
        column, mean, against, seed_against = W_U[:, token].to(home), mean.to(home), against.to(home), seed_against.to(home)
        gain = view.norm_weight("ln_final")
        scale = r.act(hooks.FINAL_SCALE)[t]
        parts = marginal(self.vecs[:, t][:, None], scale[None], gain, self.layer_norm)[:, 0]
        seeds = parts @ (column - seed_against)
        d_t = column - against
        if gain is not None:
            d_t = d_t * gain.to(d_t)
        if self.layer_norm:  # the reference scales by the unbiased variance (a positive factor)
            d = view.d_model
            var = (scale**2 - view.cfg.eps) * d / (d - 1)
            d_t = d_t / torch.sqrt(var + view.cfg.eps)
        else:
            d_t = d_t / scale
        return seeds, d_t

    # ------------------------------------------------------------------ attention
    def attention(self, layer: int, d_t: Tensor) -> AttentionLayer:
        return AttentionLayer(self, layer, d_t)

    # ------------------------------------------------------------------ MLP
    def mlp_rows(self, layer: int, d_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(rows, principled, deeper)``: the components ``L{layer}.mlp`` reads (indices) and their
        values ``[row, n]`` under the depth-0 rule and the preset's deeper rule.

        Rows are the components of lower order, read at the same position (in sequential blocks also
        the layer's own heads and output bias). A row's value is its marginal norm against a
        direction in the MLP's input, ``Σ_j w_j·w_in_j/pre_j`` with neuron weights ``w_j =
        φ_j·<w_out_j, d_t>`` (depth 0, "principled"; ``w_out_j`` centred for LayerNorm), ``φ_j/Σφ``
        (deeper, "weighted") or ``φ_j·<w_out_j, h>/‖h‖²`` (deeper, aligned; ``h`` the MLP's output
        without bias). A gated MLP (``φ = act(g)·u``) splits each neuron half by the gate
        (``w_j/(2g_j)·w_gate_j``) and half by the up projection (``w_j/(2u_j)·w_in_j``). The ``l2``
        rule's value is ``‖marginal(c) @ [W_gate, W_in]‖``.

        With quirks (as the reference): the MLP is read at its block's input in sequential blocks
        (GPT-2), not at the stream after attention, and rows are not centred (LayerNorm,
        "principled", "weighted" and "aligned").
        """
        view, r, P = self.view, self.r, self.preset
        m = view.mlp(layer)
        dev = r.fwd.layer_device(layer)
        d_t = d_t.to(dev)
        W_in = m.W_in.to(dev, DT)
        W_out = m.W_out.to(dev, DT)
        W_gate = None if m.W_gate is None else m.W_gate.to(dev, DT)
        gain = view.norm_weight("ln2", layer)
        order = layer + (0.0 if self.parallel else 0.5)
        rows = torch.nonzero(self.order < order).flatten()
        pre = r.act(hooks.mlp(layer, "pre"))
        up = r.act(hooks.mlp(layer, "pre_linear")) if W_gate is not None else None
        if self.quirks and not self.parallel:  # read at the block input: the pre-activations there
            shift = r.act(normalized(layer, "ln1")) - r.act(normalized(layer, "ln2"))
            if gain is not None:
                shift = shift * gain.to(shift)
            if W_gate is not None:
                pre, up = pre + shift @ W_gate, up + shift @ W_in
            else:
                pre = pre + shift @ W_in
            scale = r.act(hooks.norm_scale(layer, "ln1"))
        else:
            scale = r.act(hooks.norm_scale(layer, "ln2"))
        act, _ = activation(view.rules.act, pre)
        phi = act if up is None else act * up

        def direction(w: Tensor) -> Tensor:  # neuron weights [n, m] -> a direction in the MLP's input [n, d]
            if W_gate is None:
                return (w / _safe(pre)) @ W_in.T
            return (w / (2 * _safe(pre))) @ W_gate.T + (w / (2 * _safe(up))) @ W_in.T

        vecs = self.vecs[rows].to(dev)
        read = marginal(vecs, scale, gain, self.layer_norm and not self.quirks)
        out_c = W_out - W_out.mean(-1, keepdim=True) if self.layer_norm else W_out
        weights = [phi * (out_c @ d_t)]  # principled
        if P.aligned:
            h = phi @ W_out
            weights.append(phi * (h @ W_out.T) / (h * h).sum(-1, keepdim=True).clamp_min(SAFE_EPS))
        elif P.mlp_rule == "weighted":
            weights.append(phi / phi.sum(-1, keepdim=True).clamp_min(SAFE_EPS))
        values = torch.einsum("cpd,kpd->kcp", read, torch.stack([direction(w) for w in weights]))
        if len(weights) == 2:
            return rows, values[0], values[1]
        parts = marginal(vecs, scale, gain, self.layer_norm)
        W = W_in if W_gate is None else torch.cat([W_in, W_gate], dim=1)
        if W.shape[0] < parts.shape[0] * parts.shape[1]:  # through the Gram matrix, when that is cheaper
            norms = torch.einsum("cpd,cpd->cp", parts @ (W @ W.T), parts)
        else:
            norms = (parts @ W).square().sum(-1)
        return rows, values[0], norms.clamp_min(0).sqrt()

    def mlp(self, layer: int, d_t: Tensor) -> tuple[list[int], MLPTables]:
        """The children of ``L{layer}.mlp`` and its split tables (see `mlp_rows`): shares over a safe
        denominator, or for ``l2`` a row's norm over the sum of norms (the credit's sign kept). A
        depth-0 split that is undefined falls through to the deeper rule. With quirks the ``l2`` rows
        of the recursion leave out the layer's own output bias, as the reference's."""
        P = self.preset
        rows, principled, deeper = self.mlp_rows(layer, d_t)
        pick = torch.nonzero(~self.bias[rows]).flatten()  # the rows that are children
        dev = principled.device  # the layer's (a split model)

        def tables(rule_set: str) -> tuple[Tensor, Tensor]:
            keep = self.keep(rule_set)[rows][:, None].to(dev)
            first, valid = safe_split(principled, keep, P.beta, 0)
            if P.aligned or P.mlp_rule == "weighted":
                deep, _ = safe_split(deeper, keep, P.beta, 0)
            else:
                l2_keep = keep.clone()
                if self.quirks and rule_set == "paths":  # the reference's L2 rows leave out this layer's output bias
                    l2_keep &= ((self.order[rows] < layer)[:, None] | ~self.bias[rows][:, None]).to(dev)
                kept = deeper * l2_keep
                total = kept.sum(0, keepdim=True)
                deep = torch.where(total > 0, deeper / torch.where(total > 0, total, 1.0), 0.0)
            first = torch.where(valid[None], first, deep)
            at = pick.to(dev)
            return first[at].T, deep[at].T

        made = {s: tables(s) for s in self.rule_sets()}
        made.setdefault("flow", made["paths"])
        return rows[pick].tolist(), MLPTables(first={s: v[0] for s, v in made.items()}, deeper={s: v[1] for s, v in made.items()})


class AttentionLayer:
    """One attention layer of a `Decomposition`: what its heads share, `rows` and `heads`.

    A branch row of component c, with ``c_p`` its marginal norm (first norm) at position p: K
    ``q[q]·rope_s(W_K c_s)/scale``, Q ``rope_q(W_Q c_q)·k[s]/scale`` and V ``<W_V c_s, v[s]>``. They are
    computed by projecting every component (``C·n·d·d_head`` per head), or by pulling the real key,
    query or value back into the stream (``C·n²·d`` per head), whichever costs less.
    """

    def __init__(self, dec: Decomposition, layer: int, d_t: Tensor):
        self.dec, self.layer = dec, layer
        view, r = dec.view, dec.r
        dev = r.fwd.layer_device(layer)  # a split model: the layer's tables are made where its weights are
        a = view.attn(layer)
        self.W_Q, self.W_K, self.W_V, self.W_O = (w.to(dev, DT) for w in (a.W_Q, a.W_K, a.W_V, a.W_O))
        # the value bias row (see `heads`) is the model's own bias: an unfolded ln1 bias β adds β·W_V to `a.b_V`,
        # which the reference reads as the norm's constant, in no denominator
        beta = view.norm_bias("ln1", layer)
        self.b_V = None if a.b_V is None else a.b_V.to(dev, DT) - (0.0 if beta is None else torch.einsum("d,gde->ge", beta.to(dev, DT), self.W_V))
        self.group = view.n_heads // view.n_kv_heads
        self.scale = view.attn_scale(layer)
        self.adjacent = view.adjacent_pairs
        self.alpha = r.pattern(layer)  # [H, q, s]
        self.q, self.k = r.queries_keys(layer)  # [n, H, dh], [n, kv, dh]
        self.v = r.act(hooks.attn(layer, "v"))  # [n, kv, dh]
        rot = r.rotary(layer)
        self.cos, self.sin = (None, None) if rot is None else (rot[0][:, 0], rot[1][:, 0])  # [n, rot]
        self.d_t = d_t.to(dev)
        self.rows_index = torch.nonzero(dec.order < layer).flatten()
        self.pick = torch.nonzero(~dec.bias[self.rows_index]).flatten()  # the rows that are children
        self.children: list[int] = self.rows_index[self.pick].tolist()
        gain = view.norm_weight("ln1", layer)
        self.parts = marginal(dec.vecs[self.rows_index].to(dev), r.act(hooks.norm_scale(layer, "ln1")), gain, dec.layer_norm)
        # every head's values through W_O, and the layer's output before its bias (aligned splits)
        self.pv = torch.einsum("phe,hed->hpd", self.v.repeat_interleave(self.group, dim=1), self.W_O)
        self.out = torch.einsum("hqs,hsd->qd", self.alpha, self.pv)
        n = r.n
        self.causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()
        C, H, d, dh = len(self.rows_index), view.n_heads, view.d_model, view.d_head
        pulled = C * H * n * n * d
        self.pull_k = pulled < C * n * d * view.n_kv_heads * dh + C * H * n * n * dh
        self.pull_q = pulled < C * n * d * H * dh + C * H * n * n * dh
        self._projected: dict[str, Tensor] = {}

    def _rotate(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, transpose: bool = False) -> Tensor:
        if cos is None:
            return x
        return rotate_at(x, cos, sin, self.adjacent, transpose)

    def _projection(self, name: str) -> Tensor:
        """Every component projected and rotated at its position: ``[C, n, heads, d_head]``."""
        if name not in self._projected:
            W = self.W_K if name == "k" else self.W_Q
            at = lambda t: None if t is None else t[:, None]  # noqa: E731
            self._projected[name] = self._rotate(torch.einsum("cpd,hde->cphe", self.parts, W), at(self.cos), at(self.sin))
        return self._projected[name]

    def rows(self, heads: list[int], kqv: bool = True) -> dict[str, Tensor]:
        """Uncentred branch rows of some heads: ``k`` ``[head, C, q, s]`` (scaled logits), and with ``kqv``
        also ``q`` (the same) and ``v`` ``[head, C, s]``."""
        h = torch.tensor(heads, device=self.q.device)
        g = h // self.group
        q, k = self.q[:, h], self.k[:, g]  # [n, h, dh]
        at_key = lambda t: None if t is None else t[None, None]  # noqa: E731  [1, 1, s, rot]
        at_query = lambda t: None if t is None else t[None, :, None]  # noqa: E731  [1, q, 1, rot]
        n = q.shape[0]
        out = {}
        if self.pull_k:  # W_K rope_s^T q: the query pulled back to the stream, per key position
            back = self._rotate(q.permute(1, 0, 2)[:, :, None], at_key(self.cos), at_key(self.sin), transpose=True)
            pulled = torch.einsum("hqse,hde->hqsd", back.expand(-1, -1, n, -1), self.W_K[g])
            out["k"] = torch.einsum("csd,hqsd->hcqs", self.parts, pulled) / self.scale
        else:
            out["k"] = torch.einsum("qhe,cshe->hcqs", q, self._projection("k")[:, :, g]) / self.scale
        if not kqv:
            return out
        if self.pull_q:
            back = self._rotate(k.permute(1, 0, 2)[:, None], at_query(self.cos), at_query(self.sin), transpose=True)
            pulled = torch.einsum("hqse,hde->hqsd", back.expand(-1, n, -1, -1), self.W_Q[h])
            out["q"] = torch.einsum("cqd,hqsd->hcqs", self.parts, pulled) / self.scale
        else:
            out["q"] = torch.einsum("cqhe,she->hcqs", self._projection("q")[:, :, h], k) / self.scale
        value = torch.einsum("sge,gde->gsd", self.v[:, g], self.W_V[g])  # W_V v, per key position
        out["v"] = torch.einsum("csd,hsd->hcs", self.parts, value)
        return out

    def centred(self, rows: Tensor) -> Tensor:
        """Rows ``[..., q, s]`` minus their mean over the keys each query may attend to."""
        c = self.causal.to(rows)
        return rows - (rows * c).sum(-1, keepdim=True) / c.sum(-1, keepdim=True)

    def heads(self, heads: list[int]) -> HeadTables:
        """The tables of some heads (see `HeadTables`).

        Source factors: at depth 0 ``α[q, s]·<pv[s], d_t>`` (``pv`` the value through W_O, centred for
        LayerNorm), deeper ``α[q, s]·<pv[s], out[q]>/‖out[q]‖²`` (aligned presets) or ``α[q, s]``, each
        over its safe denominator (α over its sum). Branch rows (see the class) are centred over the
        allowed keys (K, Q); the value bias is a V row. A row's share is its value over the safe
        denominator of all rows.
        """
        dec, P = self.dec, self.dec.preset
        h = torch.tensor(heads, device=self.q.device)
        alpha, pv = self.alpha[h], self.pv[h]
        centred_pv = pv - pv.mean(-1, keepdim=True) if dec.layer_norm else pv
        factors0, _ = safe_split(alpha * (centred_pv @ self.d_t)[:, None], True, P.beta, -1)
        if P.aligned:
            aligned = alpha * torch.einsum("qd,hsd->hqs", self.out, pv) / (self.out * self.out).sum(-1)[:, None].clamp_min(SAFE_EPS)
            factors, _ = safe_split(aligned, True, P.beta, -1)
        else:
            total = alpha.sum(-1, keepdim=True)
            factors = torch.where(total > SAFE_EPS, alpha / torch.where(total > SAFE_EPS, total, 1.0), 0.0)
        rows = self.rows(heads, kqv=P.branches == "kqv")
        for branch in ("k", "q"):
            if branch in rows:
                rows[branch] = self.centred(rows[branch])
        if "v" in rows and self.b_V is not None:
            bias_row = torch.einsum("sge,ge->gs", self.v[:, h // self.group], self.b_V[h // self.group])
            rows["v"] = torch.cat([rows["v"], bias_row[:, None]], dim=1)

        shares: dict[str, dict[str, Tensor]] = {}
        pick = self.pick.to(alpha.device)
        for rule_set in dec.rule_sets():
            keep = keep_v = dec.keep(rule_set)[self.rows_index].to(alpha.device)
            if self.b_V is not None:  # a bias row: in the recursion's denominators only, with quirks
                keep_v = torch.cat([keep, keep.new_tensor([rule_set == "paths" and dec.quirks])])
            shares[rule_set] = {}
            for branch, vals in rows.items():
                if branch == "v":
                    share, _ = safe_split(vals, keep_v[:, None], P.beta, 1)
                    share = share[:, pick].transpose(1, 2)  # [head, s, child]
                else:
                    share, _ = safe_split(vals, keep[:, None, None], P.beta, 1)
                    share = share[:, pick].permute(0, 2, 3, 1)  # [head, q, s, child]
                shares[rule_set][branch] = share
        shares.setdefault("flow", shares["paths"])
        peak = {branch: t.abs().amax(-1) if t.shape[-1] else t.sum(-1) for branch, t in shares["paths"].items()}
        return HeadTables(factors0=factors0, factors=factors, shares=shares, peak=peak)

    def groups(self) -> list[list[int]]:
        """The layer's heads in groups whose tables fit in memory together."""
        n, C = self.dec.r.n, len(self.rows_index)
        size = max(1, (1 << 23) // max(1, n * n * C))
        H = self.dec.view.n_heads
        return [list(range(i, min(H, i + size))) for i in range(0, H, size)]
