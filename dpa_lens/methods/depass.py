"""DePass (arXiv 2510.18462): a decomposed forward pass over a TransformerLens ``ActivationCache``.

The residual stream at some depth is split into parts that add up to it (tokens, one layer's heads
or one layer's neurons), and every part is pushed through the rest of the network with norms,
attention patterns and gates frozen at the cached forward. Attention is linear in the parts; each
MLP neuron's real output is shared out among the parts by a rule (``mlp_rule``) over their
contributions to its gate. A part's score is what it adds to the target at the answer position.
The last part, the remainder, holds every bias and what no scored unit owns: the scores plus the
remainder add up to ``target_value``. ``mlp_rule="taylor"`` makes the network linear: DePass then
equals DPA with ``Mu(q=0, k=0, v=1, gate=1, up=0)``.

See docs/methods/depass.md for the rules, the levels, the cost and how they relate to DPA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dpa_lens.errors import InputError, UnsupportedModelError
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import activation, heads_in, heads_out, pull_norm, push_norm
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Attribution, Diagnostics
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel, typechecked

RULES: tuple[str, ...] = ("softmax", "taylor", "linear", "relu", "max")
LEVELS: tuple[str, ...] = ("tokens", "heads", "neurons")
REMAINDER_THRESHOLD = 1e-5  # |g_R| below this: the remainder takes no share of a neuron (DePass's code)
SHARE_EPS = 1e-6  # added to the denominators of the relu and linear rules (DePass's code)
BLOCK_ELEMENTS = 2**24  # float32 elements of one block's temporaries (beyond the parts themselves)

Record = Callable[[str, Tensor], None]


def depass_hook_names(model: TLModel) -> list[str]:
    """Every hook name DePass reads from the cache (any level, any start layer)."""
    view = ModelView(model)
    rules = view.rules
    names = [hooks.EMBED, hooks.FINAL_SCALE, hooks.FINAL_NORMALIZED] + ([hooks.TOKENS] if view.is_bridge else [])
    for layer in range(view.n_layers):
        names += [hooks.resid_pre(layer), hooks.resid_post(layer), hooks.norm_scale(layer, "ln1"),
                  hooks.norm_scale(layer, "ln2"), hooks.attn(layer, "pattern"), hooks.attn(layer, "z"), hooks.mlp(layer, "pre")]
        if not rules.parallel:
            names.append(hooks.resid_mid(layer))
        if rules.gated:
            names.append(hooks.mlp(layer, "pre_linear"))
        if rules.post_norms:
            names += [hooks.norm_scale(layer, "ln1_post"), hooks.norm_scale(layer, "ln2_post")]
    return names


@typechecked
def mlp_shares(
    g: Float[Tensor, "part batch pos d_mlp"],
    rule: str,
    temperature: float = 0.1,
    *,
    pin: Bool[Tensor, "batch pos"] | None = None,
    ignore_first: bool = True,
) -> Float[Tensor, "part batch pos d_mlp"]:
    """Each part's share of each neuron's real output, from the parts' gate contributions ``g``.

    The remainder is the last part. ``pin`` marks, per row, the position of the first token, whose
    part is the first: its ``g`` is set to 1 there and (``ignore_first``) to 0 everywhere else. Then
    the remainder's ``g`` is zeroed below 1e-5 and set to 1 where no part contributes; only parts with
    ``g ≠ 0`` take a share (rules in docs/methods/depass.md). Shares of a neuron sum to 1 (``relu``,
    ``linear``: slightly less; ``relu``: 0 where no ``g`` is positive). ``g`` is modified in place.
    """
    if pin is not None:
        g[0] = torch.where(pin[..., None], 1.0, 0.0 if ignore_first else g[0])
    g[-1] = torch.where(g[-1].abs() < REMAINDER_THRESHOLD, 0.0, g[-1])
    g[-1] = torch.where((g == 0).all(0), 1.0, g[-1])
    live = g != 0
    if rule == "softmax":
        return g.div_(temperature).masked_fill_(~live, float("-inf")).softmax(0)
    if rule == "max":
        best = g.masked_fill_(~live, float("-inf")).argmax(0, keepdim=True)
        return torch.zeros_like(g).scatter_(0, best, 1.0)
    if rule == "relu":
        r = g.clamp_min_(0.0)
        return r / (r.sum(0, keepdim=True) + SHARE_EPS)
    if rule == "linear":
        low = g.masked_fill(~live, float("inf")).amin(0, keepdim=True)
        shifted = g.sub_(low).masked_fill_(~live, 0.0)
        total = shifted.sum(0, keepdim=True)
        return torch.where(total > 0, shifted / (total + SHARE_EPS), live / live.sum(0, keepdim=True))
    raise InputError(f"mlp_rule must be one of {RULES}, got {rule!r}")


@dataclass
class _Layer:
    """What DePass freezes in one layer, read from the cache (float32)."""

    ln1: Float[Tensor, "batch pos 1"]
    pattern: Float[Tensor, "batch kv_head group pos pos"]
    attn_post: Float[Tensor, "batch pos 1"] | None  # Gemma's post-attention norm scale
    ln2: Float[Tensor, "batch pos 1"]
    post: Float[Tensor, "batch pos d_mlp"]  # act(g)·u, or act(s)
    secant: Float[Tensor, "batch pos d_mlp"]  # act(g)/g · u, or act(s)/s: the taylor rule
    mlp_post: Float[Tensor, "batch pos 1"] | None


class _Decomposition:
    """The frozen network of one cached forward, and DePass's decomposed forward through it."""

    def __init__(self, fwd: CachedForward, rule: str, temperature: float, ignore_first: bool, unassigned: str,
                 record: Record | None, bar: tqdm):
        self.fwd, self.view, self.rules = fwd, fwd.view, fwd.view.rules
        self.rule, self.temperature, self.ignore_first, self.unassigned = rule, temperature, ignore_first, unassigned
        self.record, self.bar = record, bar
        self.b, self.n = fwd.batch, fwd.seq_len
        self.center = self.rules.norm == "ln"
        real = fwd.inputs.real.to(fwd.device)
        self.first_pos = real.float().argmax(-1)  # each row's first real position
        self._layers: dict[int, _Layer] = {}

    def frozen(self, layer: int) -> _Layer:
        if layer not in self._layers:
            act, view = self.fwd.act, self.view
            scale = lambda name: act(hooks.norm_scale(layer, name)) if self.rules.post_norms else None  # noqa: E731
            K = view.n_kv_heads
            pattern = act(hooks.attn(layer, "pattern")).nan_to_num(0.0)
            g = act(hooks.mlp(layer, "pre"))
            a, slope = activation(self.rules.act, g)
            u = act(hooks.mlp(layer, "pre_linear")) if self.rules.gated else 1.0
            self._layers[layer] = _Layer(
                ln1=act(hooks.norm_scale(layer, "ln1")), pattern=pattern.view(self.b, K, -1, self.n, self.n),
                attn_post=scale("ln1_post"), ln2=act(hooks.norm_scale(layer, "ln2")), post=a * u, secant=slope * u,
                mlp_post=scale("ln2_post"),
            )
        return self._layers[layer]

    def _keep(self, name: str, x: Tensor) -> None:
        if self.record is not None:
            self.record(name, x)

    # ------------------------------------------------------------------ attention
    def attention(self, x: Float[Tensor, "part batch pos d_model"], begin: Tensor, layer: int, out: Tensor) -> None:
        """Add the attention output of every part to ``out`` (``x`` itself in a sequential block),
        in blocks of parts; a block is computed from the first position where one of its parts is non-zero."""
        fz, w, view = self.frozen(layer), self.view.attn(layer), self.view
        device = x.device
        H, K, dh = view.n_heads, view.n_kv_heads, view.d_head
        W_V = heads_in(w.W_V.to(device))
        W_O = heads_out(w.W_O.to(device))
        gain, post_gain = view.norm_weight("ln1", layer), view.norm_weight("ln1_post", layer) if self.rules.post_norms else None
        M = x.shape[0]
        step = max(1, min(-(-M // 8), BLOCK_ELEMENTS // (4 * self.b * self.n * max(view.d_model, H * dh))))
        for c0 in range(0, M, step):
            c1 = min(M, c0 + step)
            j0 = int(begin[c0:c1].min())
            if j0 >= self.n:
                continue
            y = push_norm(x[c0:c1, :, j0:], fz.ln1[None, :, j0:], gain, center=self.center)
            v = y @ W_V  # [m, b, k, K·dh]
            if c1 == M and w.b_V is not None:  # the remainder's values carry the value bias
                v[-1] += w.b_V.to(device).flatten()
            m, k = v.shape[0], v.shape[2]
            v = v.view(m, self.b, k, K, dh).permute(1, 3, 2, 0, 4).reshape(self.b, K, 1, k, m * dh)  # parts side by side
            z = fz.pattern[:, :, :, j0:, j0:] @ v  # [b, K, G, q, m·dh]
            o = z.view(self.b, K, -1, k, m, dh).permute(4, 0, 3, 1, 2, 5).reshape(m, self.b, k, H * dh) @ W_O  # [m, b, q, d]
            if c1 == M and w.b_O is not None:
                o[-1] += w.b_O.to(device)
            if fz.attn_post is not None:
                o = push_norm(o, fz.attn_post[None, :, j0:], post_gain, center=False)
            out[c0:c1, :, j0:] += o

    # ------------------------------------------------------------------ MLP
    def mlp(self, x: Float[Tensor, "part batch pos d_model"], begin: Tensor, layer: int, first: int | None) -> None:
        """Add the MLP output of every part to ``x``, in blocks of positions (the rules act per
        position and neuron); at each position only the parts already non-zero there are computed."""
        fz, w, view = self.frozen(layer), self.view.mlp(layer), self.view
        device = x.device
        W_read = (w.W_gate if self.rules.gated else w.W_in).to(device)
        W_out = w.W_out.to(device)
        gain, post_gain = view.norm_weight("ln2", layer), view.norm_weight("ln2_post", layer) if self.rules.post_norms else None
        M, m = x.shape[0], view.d_mlp
        step = max(1, min(-(-self.n // 8), BLOCK_ELEMENTS // (4 * M * self.b * max(m, view.d_model))))
        for i0 in range(0, self.n, step):
            i1 = min(self.n, i0 + step)
            sel = torch.nonzero(begin < i1).flatten()  # the remainder (last, begin 0) is always in
            y = push_norm(x[sel, :, i0:i1], fz.ln2[None, :, i0:i1], gain, center=self.center)
            g = y @ W_read  # [m', b, p, d_mlp]: each part's share of the gate pre-activation
            if w.b_in is not None:
                g[-1] += w.b_in.to(device)
            post = fz.post[:, i0:i1]
            if self.rule == "taylor":
                parts = g.mul_(fz.secant[:, i0:i1])
            else:
                pin = None
                if first is not None and int(sel[0]) == first:
                    pin = torch.arange(i0, i1, device=device)[None] == self.first_pos.to(device)[:, None]
                parts = mlp_shares(g, self.rule, self.temperature, pin=pin, ignore_first=self.ignore_first).mul_(post)
            if self.unassigned == "remainder":
                parts[-1] += post - parts.sum(0)
            o = parts @ W_out
            if w.b_out is not None:
                o[-1] += w.b_out.to(device)
            if fz.mlp_post is not None:
                o = push_norm(o, fz.mlp_post[None, :, i0:i1], post_gain, center=False)
            x[:, :, i0:i1].index_add_(0, sel, o)

    # ------------------------------------------------------------------ runs
    def propagate(self, x: Float[Tensor, "part batch pos d_model"], begin: Int[Tensor, " part"], layer: int,
                  at: Literal["pre", "mid", "post"], first: int | None) -> Tensor:
        """Push parts that live at ``blocks.{layer}.hook_resid_{at}`` to the final residual stream
        (in place). ``begin [part]``: where each part may first be non-zero (the remainder, last: 0). On a
        split model the parts move to each layer's device (in place there), and the moved parts are returned."""
        for li in range(layer, self.view.n_layers):
            x = x.to(self.fwd.layer_device(li))  # the parts flow through a split model as the stream does
            begin = begin.to(x.device)
            if li > layer or at == "pre":
                self._keep(hooks.resid_pre(li), x)
                if self.rules.parallel:  # attention and MLP both read the block's input
                    attn = torch.zeros_like(x)
                    self.attention(x, begin, li, attn)
                    self.mlp(x, begin, li, first)
                    x += attn
                    del attn
                    self._keep(hooks.resid_post(li), x)
                    self.bar.update()
                    continue
                self.attention(x, begin, li, x)
            if li > layer or at in ("pre", "mid"):
                self._keep(hooks.resid_mid(li), x)
                self.mlp(x, begin, li, first)
            self._keep(hooks.resid_post(li), x)
            self.bar.update()
        return x

    def read(self, x: Float[Tensor, "part batch pos d_model"], t: Float[Tensor, "batch d_model"]) -> Float[Tensor, "part batch"]:
        """Each part's score: its final stream at the answer position dotted with ``t`` (on ``t``'s device)."""
        rows = torch.arange(self.b, device=x.device)
        return (x[:, rows, self.fwd.positions.to(x.device)] * t.to(x.device)).sum(-1).to(t.device)


def _check_options(view: ModelView, level: str, start_layer: int, mlp_rule: str, temperature: float, chunk_size: int | None,
                   unassigned: str, by_position: bool, ignore_first: bool) -> None:
    if level not in LEVELS:
        raise InputError(f"level must be one of {LEVELS}, got {level!r}")
    if mlp_rule not in RULES:
        raise InputError(f"mlp_rule must be one of {RULES}, got {mlp_rule!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise InputError(f"temperature must be a finite number > 0 (DePass's default is 0.1), got {temperature!r}")
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < view.n_layers:
        raise InputError(f"start_layer must be an int in 0 .. {view.n_layers - 1} (this model has {view.n_layers} layers), got {start_layer!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise InputError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if level != "tokens":
            raise InputError(f"chunk_size splits token parts into runs; it does not apply to level={level!r}")
    if unassigned not in ("remainder", "drop"):
        raise InputError(f"unassigned must be 'remainder' or 'drop', got {unassigned!r}")
    if not isinstance(by_position, bool) or not isinstance(ignore_first, bool):
        raise InputError(f"by_position and ignore_first must be bools, got {by_position!r} and {ignore_first!r}")
    if by_position and level == "tokens":
        raise InputError("by_position splits heads or neurons by position; token scores are per position already")


def _token_runs(dec: _Decomposition, t: Tensor, start_layer: int, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Token scores ``[batch, pos]`` and each run's remainder score ``[run, batch]``."""
    fwd, n, device = dec.fwd, dec.n, dec.fwd.device
    real = fwd.inputs.real.to(device)
    length, p0 = real.sum(-1), dec.first_pos
    stream = fwd.act(hooks.resid_pre(start_layer)).to(device)
    size = chunk_size or n
    tokens = torch.zeros(dec.b, n, device=device)
    rests = []
    longest = int(length.max())
    for lo in range(0, longest, size):
        rel = torch.arange(lo, min(lo + size, longest), device=device)  # positions after each row's first real token
        first = 0
        if lo > 0:  # a later chunk: the first token is a part of its own (ignore_first) or the remainder's
            rel = torch.cat([rel.new_zeros(1), rel]) if dec.ignore_first else rel
            first = 0 if dec.ignore_first else None
        pos = p0[None] + rel[:, None]  # [part, batch]
        valid = rel[:, None] < length[None]
        onehot = (torch.arange(n, device=device) == pos[..., None]) & valid[..., None]  # [part, batch, pos]
        x = torch.cat([stream * onehot[..., None], (stream * ~onehot.any(0)[..., None])[None]])
        begin = torch.cat([torch.where(valid, pos, n).amin(1), pos.new_zeros(1)])
        scores = dec.read(dec.propagate(x, begin, start_layer, "pre", first), t)
        own = slice(1 if lo > 0 and dec.ignore_first else 0, len(rel))  # the extra first part is not reported
        rows = torch.arange(dec.b, device=device).expand_as(pos)
        keep = valid[own]
        tokens[rows[own][keep], pos[own][keep]] = scores[:-1][own][keep]
        rests.append(scores[-1])
        del x
    return tokens, torch.stack(rests)


def _units(dec: _Decomposition, level: str, layer: int) -> tuple[Tensor, str, str]:
    """One layer's heads ``[head, batch, pos, d_model]`` (or neurons ``[d_mlp, ...]``) as parts, the
    hook where they are added, and its real stream's hook."""
    fwd, view = dec.fwd, dec.view
    device = fwd.layer_device(layer)  # the layer's units are computed where its weights are
    if level == "heads":
        w = view.attn(layer)
        z = fwd.act(hooks.attn(layer, "z"))
        if w.b_V is not None:  # the value bias is the remainder's
            z = z - w.b_V.to(device).repeat_interleave(view.n_heads // view.n_kv_heads, dim=0)
        units = torch.einsum("bqhe,hed->hbqd", z, w.W_O.to(device))
        scale, norm = dec.frozen(layer).attn_post, "ln1_post"
        at = "post" if dec.rules.parallel else "mid"
    else:
        units = dec.frozen(layer).post.permute(2, 0, 1)[..., None] * view.mlp(layer).W_out.to(device)[:, None, None]
        scale, norm, at = dec.frozen(layer).mlp_post, "ln2_post", "post"
    if scale is not None:
        units = push_norm(units, scale[None], view.norm_weight(norm, layer), center=False)
    return units, at, hooks.resid_post(layer) if at == "post" else hooks.resid_mid(layer)


def _unit_runs(dec: _Decomposition, t: Tensor, level: str, start_layer: int, by_position: bool) -> tuple[Tensor, Tensor]:
    """Scores ``[batch, layer, unit]`` (``[batch, layer, pos, unit]`` by position, NaN below
    ``start_layer``) and each layer's remainder score ``[batch, layer]``."""
    b, n, L, device = dec.b, dec.n, dec.view.n_layers, dec.fwd.device
    U = dec.view.n_heads if level == "heads" else dec.view.d_mlp
    scores = torch.full((b, L) + ((n,) if by_position else ()) + (U,), float("nan"), device=device)
    rests = torch.full((b, L), float("nan"), device=device)
    for layer in range(start_layer, L):
        units, at, real_hook = _units(dec, level, layer)
        rest = dec.fwd.act(real_hook) - units.sum(0)
        if by_position:  # part (i, u) holds unit u's output at position i only, position-major
            x = units.new_zeros(n, U, b, n, units.shape[-1])
            i = torch.arange(n, device=units.device)
            x[i, :, :, i] = units.permute(2, 0, 1, 3)
            x = torch.cat([x.flatten(0, 1), rest[None]])
            begin = torch.cat([i.repeat_interleave(U), i.new_zeros(1)])
        else:
            x = torch.cat([units, rest[None]])
            begin = torch.zeros(U + 1, dtype=torch.long, device=device)
        del units, rest
        s = dec.read(dec.propagate(x, begin, layer, at, None), t)
        del x
        scores[:, layer] = s[:-1].T.reshape(scores[:, layer].shape)
        rests[:, layer] = s[-1]
    return scores, rests


@register(MethodSpec(name="depass", input="cache", scores=("tokens",), hook_names=depass_hook_names,
                     summary="DePass: a decomposed forward pass; each part's read-out after the frozen network, MLP outputs shared by a rule"))
def depass(
    model: TLModel,
    cache: Cache,
    target: TargetLike,
    position: PositionLike = -1,
    *,
    level: Literal["tokens", "heads", "neurons"] = "tokens",
    start_layer: int = 0,
    mlp_rule: Literal["softmax", "taylor", "linear", "relu", "max"] = "softmax",
    temperature: float = 0.1,
    ignore_first: bool = True,
    chunk_size: int | None = None,
    unassigned: Literal["remainder", "drop"] = "remainder",
    by_position: bool = False,
    progress: bool = True,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: Literal["auto", "raw", "centered"] = "auto",
    record: Record | None = None,
) -> Attribution:
    """DePass attribution of ``target``: each part's contribution after a decomposed forward pass.

    Args:
        model: the TransformerLens model that made the cache (``dpa_lens.load_model``).
        cache: ``ActivationCache`` of ``model.run_with_cache(tokens)`` (all hooks, or
            ``names_filter=dpa_lens.names_filter(model, "depass")``).
        target: token id, single-token string, ``(correct, incorrect)`` pair, direction
            ``[d_model]``, or one per row (see `dpa_lens.targets`).
        position: answer position (negative: from each row's last real token), or one per row.
        level: ``"tokens"``, ``"heads"`` or ``"neurons"``: what the parts are (docs/methods/depass.md).
        start_layer: tokens: split ``blocks.{start_layer}.hook_resid_pre``; heads/neurons: score
            the layers from ``start_layer`` on (NaN below).
        mlp_rule: ``"softmax"`` (default), ``"taylor"``, ``"linear"``, ``"relu"`` or ``"max"``.
        temperature: the softmax rule's T (> 0; DePass's default 0.1, the DPA authors' code 1).
        ignore_first: (tokens) the first real token's part takes no MLP share after its position.
        chunk_size: (tokens) positions per run, as DePass's code; the results then depend on it.
        unassigned: ``"remainder"``: what a rule leaves unassigned goes to the remainder (complete);
            ``"drop"``: it is lost (DePass's code).
        by_position: (heads, neurons) one part per (position, unit) instead of per unit.
        progress: show a progress bar.
        tokens, attention_mask, logit: as for `dpa_lens.dpa`.
        record: called as ``record(hook_name, parts)`` at every ``hook_resid_pre/mid/post`` a run
            passes, with the parts there ``[part, batch, pos, d_model]`` (the remainder last); they
            add up to the cached stream (for tests and debugging; the tensor is overwritten later).

    Returns:
        `Attribution` with ``target_value [batch]`` (the target as the model computed it) and

        * tokens: ``tokens [batch, pos]`` and ``bias [batch]``, the remainder's score (plus the
          target's own constant, e.g. an unembedding bias): ``tokens.sum(-1) + bias ==
          target_value`` (with chunks, ``bias`` is defined by it, as in DePass's code);
        * heads: ``head_totals [batch, layer, head]`` (``heads [batch, layer, pos, head]`` with
          ``by_position``); neurons: ``neuron_totals [batch, layer, d_mlp]`` (``neurons [batch,
          layer, pos, d_mlp]``). Each layer is its own run: its scores plus
          ``diagnostics.remainder [batch, layer]`` (the rest of that layer's stream) add up to
          ``target_value``.

        With ``unassigned="drop"`` the sums fall short by what the rules dropped.

    See docs/methods/depass.md for the MLP rules, the levels, the cost and how they relate to DPA.
    """
    view = ModelView(model)
    view.check_supported("DePass")
    if not view.rules.has_mlp:
        raise UnsupportedModelError("DePass in dpa_lens needs MLPs (its rules share each neuron's output); this model is "
                                    "attention-only: use dpa_lens.dpa, whose content paths decompose it exactly")
    _check_options(view, level, start_layer, mlp_rule, temperature, chunk_size, unassigned, by_position, ignore_first)
    fwd = read_forward(model, cache, target, position, method="DePass", hook_names=depass_hook_names(model),
                       filter_hint="dpa_lens.names_filter(model, 'depass')", tokens=tokens, attention_mask=attention_mask, logit=logit,
                       weights="every")  # its MLP rule reads W_in or W_gate
    L = view.n_layers
    runs = math.ceil(int(fwd.inputs.real.sum(-1).max()) / chunk_size) if level == "tokens" and chunk_size else 1
    steps = runs * (L - start_layer) if level == "tokens" else sum(L - l for l in range(start_layer, L))
    with torch.no_grad(), tqdm(total=steps, desc=f"DePass {level}", disable=not progress, leave=False) as bar:
        dec = _Decomposition(fwd, mlp_rule, float(temperature), ignore_first, unassigned, record, bar)
        x_final = fwd.final_input()
        direction, target_bias = fwd.target.linearized(x_final)
        t = pull_norm(direction.to(fwd.device), fwd.answer_scale(), view.norm_weight("ln_final"), center=dec.center)
        value = fwd.target.value(x_final)
        target_bias = target_bias.to(fwd.device)
        scores: dict[str, Tensor | None] = {}
        bias = remainder = None
        if level == "tokens":
            scores["tokens"], rests = _token_runs(dec, t, start_layer, chunk_size)
            bias = rests[0] + target_bias if chunk_size is None else value.to(fwd.device) - scores["tokens"].sum(-1)
        else:
            units, rests = _unit_runs(dec, t, level, start_layer, by_position)
            remainder = rests + target_bias[:, None]
            name = level if by_position else {"heads": "head_totals", "neurons": "neuron_totals"}[level]
            scores[name] = units
    return Attribution(
        method="depass",
        **scores,
        bias=bias,
        target_value=value,
        **fwd.result_fields(),
        target=fwd.target.describe(),
        diagnostics=Diagnostics(remainder=remainder),
        settings={"level": level, "mlp_rule": mlp_rule, "temperature": float(temperature), "ignore_first": ignore_first,
                  "start_layer": start_layer, "chunk_size": chunk_size, "unassigned": unassigned, "by_position": by_position},
    )
