"""Dual Path Attribution (DPA, arXiv 2603.19742) over a TransformerLens ``ActivationCache``.

DPA walks the target direction down the frozen network, layer by layer, and keeps an *effective
target* ``t`` at every residual position: the direction whose dot product with that residual
stream is the target's share carried there. Norm scales are frozen at their forward values;
the non-linearities are split into weighted paths:

* SwiGLU MLP ``post = silu(g) * u``: content (up) path ``μ_up·λ·silu(g)`` through ``W_in``,
  control (gate) path ``μ_gate·λ·u·sigmoid(g)`` through ``W_gate`` (the gate's secant), with
  ``λ = W_out t``;
* attention: value (content) path ``μ_v·Σ_i α_ij λ_i`` through ``W_V``; the softmax sensitivity
  ``δ_ij = α_ij (v_j − z_i)·λ_i`` feeds the query (``μ_q``) and key (``μ_k``) control paths,
  un-rotated by RoPE, through ``W_Q``/``W_K`` (grouped-query heads add up on their shared K/V head).

Other families follow the same rules (``ModelView.rules``): a plain MLP (GPT-2, NeoX) has one
path, ``post = (act(s)/s)·s`` with the secant frozen; LayerNorm keeps its centring; parallel blocks
(NeoX) send the target through attention and MLP from the same stream; output norms (Gemma) and
query-key norms (Qwen3, Gemma 3) are linear with their scales frozen; soft caps (Gemma 2) are
replaced by their secant; partial rotary rotates only the first dimensions.

Every score is then activation · effective target: tokens against the target at ``resid_pre`` of
layer 0, heads against ``resid_mid``, neurons against ``resid_post`` (the paper; the authors'
code uses ``resid_mid``, available as ``neuron_target="mid"``).

Equivalently, DPA is the gradient of a re-wired forward pass (see the method doc): the tests check
this implementation against such an autograd oracle. The sweep costs about one backward pass and
never loops over heads, neurons or tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

import torch
from torch import Tensor

from dpa_lens.attribution import Attribution
from dpa_lens.inputs import (
    CacheError,
    RunInputs,
    check_cache_model,
    check_hooks,
    read_inputs,
    resolve_positions,
)
from dpa_lens.methods.registry import register
from dpa_lens.models.view import ModelView, activation, pull_norm, rotate, softcap_ratio, unrotate
from dpa_lens.targets import Target, final_input, resolve_target

# --------------------------------------------------------------------------------------- mu


@dataclass(frozen=True)
class Mu:
    """Weights of DPA's paths: query, key and value (content) in attention; gate and up in the MLP.

    A valid weighting has every weight in [0, 1], ``q + k + v = 1`` and ``gate + up = 1``.
    """

    q: float = 0.25
    k: float = 0.25
    v: float = 0.5
    gate: float = 0.5
    up: float = 0.5

    def __post_init__(self) -> None:
        values = {"q": self.q, "k": self.k, "v": self.v, "gate": self.gate, "up": self.up}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Mu.{name} must be a finite number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Mu.{name} = {value} is outside [0, 1]")
        if abs(self.q + self.k + self.v - 1.0) > 1e-6:
            raise ValueError(f"Mu: q + k + v must be 1 (attention's paths share its output), got {self.q + self.k + self.v}")
        if abs(self.gate + self.up - 1.0) > 1e-6:
            raise ValueError(f"Mu: gate + up must be 1 (the MLP's paths share its output), got {self.gate + self.up}")

    @classmethod
    def paper_default(cls) -> "Mu":
        """The authors' defaults: q = k = 0.25, v = 0.5, gate = up = 0.5."""
        return cls()

    @classmethod
    def content_only(cls) -> "Mu":
        """Only the content paths (v = up = 1): linear in the embeddings, so token scores are complete."""
        return cls(q=0.0, k=0.0, v=1.0, gate=0.0, up=1.0)

    @classmethod
    def control_content(cls, p: float) -> "Mu":
        """The paper's main sweep: content weight p everywhere, ((1-p)/2, (1-p)/2, p, 1-p, p)."""
        return cls(q=(1 - p) / 2, k=(1 - p) / 2, v=p, gate=1 - p, up=p)

    @classmethod
    def query_key(cls, p: float) -> "Mu":
        """Split attention's control share (0.5) between query (p) and key (1-p); the rest at default."""
        return cls(q=0.5 * p, k=0.5 * (1 - p), v=0.5, gate=0.5, up=0.5)

    @classmethod
    def attention(cls, p: float) -> "Mu":
        """Content weight p in attention only ((1-p)/2, (1-p)/2, p); the MLP at default."""
        return cls(q=(1 - p) / 2, k=(1 - p) / 2, v=p, gate=0.5, up=0.5)

    @classmethod
    def mlp(cls, p: float) -> "Mu":
        """Content weight p in the MLP only (gate = 1-p, up = p); attention at default."""
        return cls(q=0.25, k=0.25, v=0.5, gate=1 - p, up=p)

    def as_dict(self) -> dict[str, float]:
        return {"q": self.q, "k": self.k, "v": self.v, "gate": self.gate, "up": self.up}


# --------------------------------------------------------------------------------- hooks


def _layer_hooks(view: ModelView, layer: int, patterns: bool = True) -> list[str]:
    rules = view.rules
    pre = f"blocks.{layer}."
    names = [pre + "ln1.hook_scale", pre + "ln2.hook_scale", pre + "attn.hook_v", pre + "attn.hook_z", pre + "mlp.hook_pre"]
    if patterns:
        names.append(pre + "attn.hook_pattern")
    if rules.rotary and rules.rot_hooks:
        names += [pre + "attn.hook_rot_q", pre + "attn.hook_rot_k"]
    else:
        names += [pre + "attn.hook_q", pre + "attn.hook_k"]
    if rules.rotary and view.rotary_from_cache():
        names += [pre + "attn.hook_cos", pre + "attn.hook_sin"]
    if rules.gated:
        names.append(pre + "mlp.hook_pre_linear")
    if rules.qk_norm:
        names += [pre + "attn.q_norm.hook_scale", pre + "attn.k_norm.hook_scale"]
    if rules.post_norms:
        names += [pre + "ln1_post.hook_scale", pre + "ln2_post.hook_scale"]
    return names


def dpa_hook_names(model: Any, flow: bool = False, patterns: bool = True) -> list[str]:
    """Every hook name DPA reads from the cache for this model.

    ``flow=True`` adds the residual streams that ``dpa(..., flow=True)`` reads. ``patterns=False``
    leaves out the attention patterns (``[batch, head, pos, pos]`` per layer, most of the cache's
    memory at long contexts): DPA then recomputes each layer's pattern from the cached queries and
    keys, and checks it against the cached head outputs. Sliding-window models always cache their
    patterns (the window is the model's, not a causal mask dpa_lens can rebuild for every line).
    """
    view = ModelView(model)
    rules = view.rules
    patterns = patterns or rules.sliding_window
    names = ["hook_embed", "blocks.0.hook_resid_pre", "ln_final.hook_scale", "ln_final.hook_normalized"]
    if view.is_bridge:
        names.append("embed.hook_in")  # the input tokens, cached by the bridge
    elif rules.rotary:  # to check the rotary positions of the forward
        names += ["blocks.0.attn.hook_q"] + (["blocks.0.attn.q_norm.hook_normalized"] if rules.qk_norm else [])
    for layer in range(view.n_layers):
        names += _layer_hooks(view, layer, patterns)
    if flow:
        names += _flow_hooks(view)
    return names


def _flow_hooks(view: ModelView) -> list[str]:
    return [f"blocks.{l}.hook_resid_pre" for l in range(view.n_layers)] + [f"blocks.{view.n_layers - 1}.hook_resid_post"]


def dpa_names_filter(model: Any, flow: bool = False, patterns: bool = True) -> Callable[[str], bool]:
    """A ``names_filter`` for ``run_with_cache`` that caches exactly what `dpa` needs (see `dpa_hook_names`)."""
    wanted = frozenset(dpa_hook_names(model, flow=flow, patterns=patterns))
    return lambda name: name in wanted


def _required_hooks(view: ModelView, flow: bool) -> list[str]:
    # the tokens are optional, and patterns can be recomputed (except with sliding windows)
    names = [n for n in dpa_hook_names(view.model, flow=flow, patterns=view.rules.sliding_window) if n != "embed.hook_in"]
    return names


def _attention_pattern(view: ModelView, cache: Any, layer: int, real: Tensor, q: Tensor, k: Tensor, act: Callable[[str], Tensor]) -> Tensor:
    """The layer's attention pattern ``[batch, head, q, k]``: cached, or recomputed from the queries
    and keys with a causal and padding mask, then checked against the cached head outputs z."""
    pre = f"blocks.{layer}.attn."
    if pre + "hook_pattern" in cache:
        return act(pre + "hook_pattern")
    H, K = view.n_heads, view.n_kv_heads
    b, n = q.shape[:2]
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k.repeat_interleave(H // K, dim=2)) / view.attn_scale(layer)
    cap = view.rules.attn_softcap
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & real.to(q.device)[:, None, None, :]
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    del scores
    z = act(pre + "hook_z")
    v = act(pre + "hook_v").repeat_interleave(H // K, dim=2)
    z_hat = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
    rows = real.to(q.device)[:, :, None, None]
    err = float(((z_hat - z).abs() * rows).max())
    low_precision = cache[pre + "hook_z"].dtype in (torch.float16, torch.bfloat16)
    if err > (3e-2 if low_precision else 1e-3) * float(z.abs().max()) + 1e-6:
        raise CacheError(
            f"layer {layer}'s attention pattern could not be recomputed from the cached queries and keys "
            f"(its outputs differ by {err:.2e}): cache the patterns, names_filter=dpa_lens.dpa_names_filter(model)"
        )
    return pattern


def _rotary(view: ModelView, cache: Any, inputs: RunInputs) -> Callable[[int], tuple[Tensor, Tensor]] | None:
    """Per layer, the ``(cos, sin)`` ``[batch or 1, pos, 1, rotary_dim]`` that the forward used."""
    if not view.rules.rotary:
        return None
    if view.rotary_from_cache():

        def from_cache(layer: int) -> tuple[Tensor, Tensor]:
            cos = cache[f"blocks.{layer}.attn.hook_cos"].float()
            sin = cache[f"blocks.{layer}.attn.hook_sin"].float()
            return cos.unsqueeze(2), sin.unsqueeze(2)

        return from_cache

    # HookedTransformer: buffers indexed by the position ids its forward used. With left padding
    # (an attention mask) those start at each row's first real token; check against the cache.
    if "blocks.0.attn.hook_pattern" in cache:
        pattern = cache["blocks.0.attn.hook_pattern"]
        attended = pattern.detach().amax(dim=(1, 2)) > 0  # [batch, key]: padded keys get no attention
    else:
        attended = inputs.real.to(cache["blocks.0.attn.hook_rot_q"].device)
    device = attended.device
    candidates = [(attended.long().cumsum(-1) - 1).clamp(min=0)]
    candidates.append(torch.arange(inputs.seq_len, device=device).expand(inputs.batch, -1))
    rot_q = cache["blocks.0.attn.hook_rot_q"]
    rel = 1e-3 if rot_q.dtype not in (torch.float16, torch.bfloat16) else 3e-2
    b, n, H, dh = rot_q.shape
    if view.rules.qk_norm:  # the rotation acts on the normalised query
        q = cache["blocks.0.attn.q_norm.hook_normalized"].float().reshape(b, n, H, dh)
        gain = view.qk_norm_weight(0, "q")
        q = q * gain.to(q.device) if gain is not None else q
    else:
        q = cache["blocks.0.attn.hook_q"].float()
    rot_q = rot_q.float()
    cos_buf, sin_buf = view.rotary_buffers(0)
    tol = rel * float(rot_q.abs().max()) + 1e-6
    for pos_ids in candidates:
        pos_ids = pos_ids.to(cos_buf.device)
        cos, sin = cos_buf[pos_ids].float().unsqueeze(2), sin_buf[pos_ids].float().unsqueeze(2)
        pred = rotate(q, cos.to(q.device), sin.to(q.device), view.adjacent_pairs)
        real = attended.to(q.device)[..., None, None]
        if float(((pred - rot_q).abs() * real).max()) <= tol:

            def from_buffers(layer: int, pos_ids: Tensor = pos_ids) -> tuple[Tensor, Tensor]:
                c, s = view.rotary_buffers(layer)
                return c[pos_ids].float().unsqueeze(2).to(device), s[pos_ids].float().unsqueeze(2).to(device)

            return from_buffers
    raise CacheError(
        "could not reproduce the rotary positions this HookedTransformer forward used (checked "
        "blocks.0.attn.hook_q against hook_rot_q); pass attention_mask= as given to the forward"
    )


# -------------------------------------------------------------------------------- sweep


@dataclass
class _Scores:
    tokens: Tensor | None
    heads: Tensor | None
    neurons: Tensor | None
    head_keys: Tensor | None
    bias: Tensor
    targets: dict[str, Tensor] | None
    flow: Tensor | None


class _Sweep:
    """DPA's top-down pass: propagates the target and records the scores along the way."""

    def __init__(self, view: ModelView, cache: Any, mu: Mu, rotary, real: Tensor, b: int, n: int, device, *,
                 kinds: set[str], neuron_target: str, head_keys: bool):
        self.view, self.cache, self.mu, self.rotary, self.real = view, cache, mu, rotary, real
        self.rules = view.rules
        self.b, self.n, self.device = b, n, device
        L, H = view.n_layers, view.n_heads
        self.neuron_target = neuron_target
        self.heads = torch.zeros(b, L, n, H, device=device) if "heads" in kinds else None
        self.neurons = torch.zeros(b, L, n, view.d_mlp, device=device) if "neurons" in kinds else None
        self.keys = torch.zeros(b, L, H, n, n, device=device) if head_keys else None
        self.bias = torch.zeros(b, device=device)

    def act(self, name: str) -> Tensor:
        return self.cache[name].to(self.device).float()

    def _out_norm(self, t: Tensor, layer: int, name: str) -> Tensor:
        """The target where a sublayer's output enters its post-norm (Gemma 2/3), else itself."""
        if not self.rules.post_norms:
            return t
        return pull_norm(t, self.act(f"blocks.{layer}.{name}.hook_scale"), self.view.norm_weight(name, layer), center=False)

    def _in_norm(self, update: Tensor, layer: int, name: str) -> Tensor:
        return pull_norm(update, self.act(f"blocks.{layer}.{name}.hook_scale"), self.view.norm_weight(name, layer),
                          center=self.rules.norm == "ln")

    # ------------------------------------------------------------------ MLP
    def mlp(self, layer: int, t: Tensor) -> Tensor:
        """Update of the target at the MLP's input stream, from the target ``t`` at its output."""
        pre, mu, w = f"blocks.{layer}.", self.mu, self.view.mlp(layer)
        t_out = self._out_norm(t, layer, "ln2_post")
        lam = t_out @ w.W_out.T  # [b, n, d_mlp]
        if w.b_out is not None:
            self.bias += (t_out @ w.b_out).sum(-1)
        if self.rules.gated:
            g, u = self.act(pre + "mlp.hook_pre"), self.act(pre + "mlp.hook_pre_linear")
            a, slope = activation(self.rules.act, g)
            post = a * u
            paths = torch.cat([(mu.up * lam) * a, (mu.gate * lam) * u * slope], dim=-1)  # content, control (secant)
            update = paths @ torch.cat([w.W_in.T, w.W_gate.T], dim=0)
        else:  # a plain MLP has one path, post = (act(s)/s)·s with the slope frozen, at full weight
            s_ = self.act(pre + "mlp.hook_pre")
            post, slope = activation(self.rules.act, s_)
            grad_pre = lam * slope
            if w.b_in is not None:
                self.bias += (grad_pre @ w.b_in).sum(-1)
            update = grad_pre @ w.W_in.T
        if self.neurons is not None and (self.neuron_target == "post" or self.rules.parallel):
            self.neurons[:, layer] = post * lam
        self._post = post
        return self._in_norm(update, layer, "ln2")

    def mlp_mid_neurons(self, layer: int, t_mid: Tensor) -> None:
        """The authors' convention: neurons against the target at resid_mid (sequential blocks)."""
        if self.neurons is not None and self.neuron_target == "mid" and not self.rules.parallel:
            w = self.view.mlp(layer)
            self.neurons[:, layer] = self._post * (self._out_norm(t_mid, layer, "ln2_post") @ w.W_out.T)

    # ------------------------------------------------------------------ attention
    def _queries_keys(self, layer: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Rotated queries and keys of a layer, and the ``(cos, sin)`` of its rotary embedding (or None)."""
        cos_sin = self.rotary(layer) if self.rules.rotary else None
        names = self.view.qk_hook_names(layer)[:2]
        q, k = self.view.rotated_qk({n: self.act(n) for n in names}, layer, cos_sin)
        return q, k, cos_sin

    def attention(self, layer: int, t: Tensor) -> Tensor:
        """Update of the target at the attention's input stream, from the target ``t`` at its output."""
        view, mu, b, n = self.view, self.mu, self.b, self.n
        pre = f"blocks.{layer}."
        H, K, dh = view.n_heads, view.n_kv_heads, view.d_head
        G = H // K
        a = view.attn(layer)
        t_out = self._out_norm(t, layer, "ln1_post")
        q_rot, k_rot, rot = self._queries_keys(layer)
        alpha = _attention_pattern(view, self.cache, layer, self.real, q_rot, k_rot, self.act).view(b, K, G, n, n)
        v = self.act(pre + "attn.hook_v").permute(0, 2, 1, 3)  # [b, K, k, dh]
        z = self.act(pre + "attn.hook_z")  # [b, q, H, dh]
        lam = (t_out @ a.W_O.reshape(H * dh, -1).T).view(b, n, H, dh)  # W_O t per head
        head_score = (z * lam).sum(-1)  # [b, q, H]
        if self.heads is not None:
            self.heads[:, layer] = head_score
        if a.b_O is not None:
            self.bias += (t_out @ a.b_O).sum(-1)
        lam_g = lam.view(b, n, K, G, dh).permute(0, 2, 3, 1, 4).reshape(b, K, G * n, dh)  # [b, K, (G q), dh]
        # value path: Σ_i α_ij λ_i, summed over the query heads that share a KV head
        grad_v = (alpha.reshape(b, K, G * n, n).transpose(-1, -2) @ lam_g).permute(0, 2, 1, 3)  # [b, k, K, dh]
        if mu.q or mu.k or self.keys is not None:
            # softmax sensitivity δ_ij = α_ij (v_j − z_i)·λ_i
            v_lam = (lam_g @ v.transpose(-1, -2)).view(b, K, G, n, n)  # v_j·λ_i
            if self.keys is not None:
                self.keys[:, layer] = (alpha * v_lam).reshape(b, H, n, n)
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
            del delta, delta_flat
            if rot is not None:
                grad_q = unrotate(grad_q, *rot, view.adjacent_pairs)
                grad_k = unrotate(grad_k, *rot, view.adjacent_pairs)
            if self.rules.qk_norm:  # through the query and key norms, scales frozen
                grad_q = pull_norm(grad_q, view.qk_norm_scale(self.cache, layer, "q", b, n).to(grad_q).float(),
                                    view.qk_norm_weight(layer, "q"), center=False)
                grad_k = pull_norm(grad_k, view.qk_norm_scale(self.cache, layer, "k", b, n).to(grad_k).float(),
                                    view.qk_norm_weight(layer, "k"), center=False)
        else:  # content only: the query and key paths carry nothing
            grad_q = torch.zeros(b, n, H, dh, device=self.device)
            grad_k = torch.zeros(b, n, K, dh, device=self.device)
        for weight, grad_, bias_ in ((mu.q, grad_q, a.b_Q), (mu.k, grad_k, a.b_K), (mu.v, grad_v, a.b_V)):
            if bias_ is not None:
                self.bias += weight * (grad_ * bias_).sum(dim=(1, 2, 3))
        paths = torch.cat(
            [(mu.q * grad_q).reshape(b, n, H * dh), (mu.k * grad_k).reshape(b, n, K * dh), (mu.v * grad_v).reshape(b, n, K * dh)],
            dim=-1,
        )
        W = torch.cat(
            [a.W_Q.transpose(1, 2).reshape(H * dh, -1), a.W_K.transpose(1, 2).reshape(K * dh, -1), a.W_V.transpose(1, 2).reshape(K * dh, -1)],
            dim=0,
        )
        return self._in_norm(paths @ W, layer, "ln1")


def _sweep(
    view: ModelView,
    cache: Any,
    start: Tensor,
    mu: Mu,
    rotary,
    real: Tensor,
    *,
    kinds: set[str],
    neuron_target: str,
    head_keys: bool,
    keep_targets: bool,
    flow: bool = False,
) -> _Scores:
    """Propagate the target from the final residual stream to the embeddings."""
    b, n, _ = start.shape
    L = view.n_layers
    device = start.device
    sweep = _Sweep(view, cache, mu, rotary, real, b, n, device, kinds=kinds, neuron_target=neuron_target, head_keys=head_keys)
    targets: dict[str, Tensor] | None = {} if keep_targets else None
    t = start
    if targets is not None:
        targets[f"blocks.{L - 1}.hook_resid_post"] = t
    flows = torch.zeros(b, L + 1, n, device=device) if flow else None
    if flows is not None:
        flows[:, L] = (sweep.act(f"blocks.{L - 1}.hook_resid_post") * t).sum(-1)
    for layer in reversed(range(L)):
        pre = f"blocks.{layer}."
        if view.rules.parallel:  # attention and MLP read the same stream and write the same stream
            t = t + sweep.mlp(layer, t) + sweep.attention(layer, t)
        else:
            t_mid = t + sweep.mlp(layer, t)
            sweep.mlp_mid_neurons(layer, t_mid)
            if targets is not None:
                targets[pre + "hook_resid_mid"] = t_mid
            t = t_mid + sweep.attention(layer, t_mid)
        if targets is not None:
            targets[pre + "hook_resid_pre"] = t
        if flows is not None:
            flows[:, layer] = (sweep.act(pre + "hook_resid_pre") * t).sum(-1)
    tokens = (sweep.act("blocks.0.hook_resid_pre") * t).sum(-1) if "tokens" in kinds else None
    return _Scores(tokens=tokens, heads=sweep.heads, neurons=sweep.neurons, head_keys=sweep.keys, bias=sweep.bias,
                   targets=targets, flow=flows)


# ---------------------------------------------------------------------------------- api

KINDS_ALL = ("tokens", "heads", "neurons")


@register("dpa", hook_names=lambda model: dpa_hook_names(model))
def dpa(
    model: Any,
    cache: Any,
    target: Any,
    position: int | Iterable[int] | Tensor = -1,
    mu: Mu | None = None,
    *,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: Literal["auto", "raw", "centered"] = "auto",
    neuron_target: Literal["post", "mid"] = "post",
    kinds: Iterable[str] = KINDS_ALL,
    head_keys: bool = False,
    effective_targets: bool = False,
    flow: bool = False,
) -> Attribution:
    """Dual Path Attribution of ``target`` over the activations in ``cache``.

    Args:
        model: the TransformerLens model that made the cache (``dpa_lens.load_model``).
        cache: ``ActivationCache`` from ``model.run_with_cache(tokens)`` (all hooks, or
            ``names_filter=dpa_lens.dpa_names_filter(model)``).
        target: token id, single-token string, ``(correct, incorrect)`` pair, direction
            ``[d_model]``, or a list of these per row (see `dpa_lens.targets`).
        position: answer position; negative counts back from each row's last real token
            (default ``-1``), non-negative indexes the padded sequence; or one per row.
        mu: path weights (default `Mu.paper_default`).
        tokens: the input tokens, to check the cache against (read from the cache otherwise).
        attention_mask: which tokens are real, if padding cannot be read from the pad token.
        logit: which logit a token target explains: ``"raw"``, ``"centered"`` or ``"auto"``.
        neuron_target: ``"post"`` scores neurons against the target at ``resid_post`` (the
            paper); ``"mid"`` against ``resid_mid``, as the authors' public code does.
        kinds: which scores to compute, among ``"tokens"``, ``"heads"``, ``"neurons"``.
        head_keys: also return head scores per key position, ``[batch, layer, head, q, k]``.
        effective_targets: also return the effective target at every ``resid_pre`` and
            ``resid_mid`` (keyed by hook name), ``[batch, pos, d_model]`` each.
        flow: also return ``flow [batch, layer + 1, pos]``: each layer's input residual stream
            (and, last, the final one) dotted with its effective target, i.e. where the target's
            evidence sits at each depth (needs ``dpa_names_filter(model, flow=True)``).

    Returns:
        `Attribution` with ``tokens [batch, pos]``, ``heads [batch, layer, pos, head]``,
        ``neurons [batch, layer, pos, d_mlp]``, ``bias [batch]`` and ``target_value [batch]``.
    """
    mu = Mu.paper_default() if mu is None else mu
    if not isinstance(mu, Mu):
        raise TypeError(f"mu must be a dpa_lens.Mu, got {type(mu).__name__}")
    if neuron_target not in ("post", "mid"):
        raise ValueError(f"neuron_target must be 'post' or 'mid', got {neuron_target!r}")
    kinds = set(kinds)
    if not kinds <= set(KINDS_ALL):
        raise ValueError(f"kinds must be among {KINDS_ALL}, got {sorted(kinds)}")
    view = ModelView(model)
    view.check_supported("DPA")
    check_hooks(
        cache,
        _required_hooks(view, flow),
        method="DPA" + (" with flow=True" if flow else ""),
        filter_hint=f"dpa_lens.dpa_names_filter(model{', flow=True' if flow else ''})",
    )
    inputs = read_inputs(view, cache, tokens=tokens, attention_mask=attention_mask)
    _check_cache_shapes(view, cache, inputs)
    check_cache_model(view, cache)
    positions = resolve_positions(position, inputs)
    resolved = resolve_target(model, view, target, inputs.batch, logit=logit)

    with torch.no_grad():
        normalized = cache["ln_final.hook_normalized"]
        device = normalized.device
        rows = torch.arange(inputs.batch, device=device)
        pos = positions.to(device)
        start = torch.zeros(inputs.batch, inputs.seq_len, view.d_model, device=device)
        ln_f = view.norm_weight("ln_final")
        x_final = final_input(normalized, positions, ln_f)
        direction, target_bias = resolved.linearized(x_final)  # the final soft cap, if any, by its secant
        start[rows, pos] = pull_norm(direction.to(device), cache["ln_final.hook_scale"][rows, pos].to(device).float(), ln_f,
                                      center=view.rules.norm == "ln")
        scores = _sweep(
            view,
            cache,
            start,
            mu,
            _rotary(view, cache, inputs),
            inputs.real,
            kinds=kinds,
            neuron_target=neuron_target,
            head_keys=head_keys,
            keep_targets=effective_targets,
            flow=flow,
        )
        value = resolved.value(x_final)
        bias = scores.bias + target_bias.to(scores.bias.device)
    return Attribution(
        method="dpa",
        tokens=scores.tokens,
        heads=scores.heads,
        neurons=scores.neurons,
        head_keys=scores.head_keys,
        bias=bias,
        effective_targets=scores.targets,
        flow=scores.flow,
        target_value=value,
        positions=positions,
        token_ids=inputs.tokens,
        str_tokens=inputs.str_tokens,
        target=resolved.describe(),
        settings={"mu": mu.as_dict(), "neuron_target": neuron_target},
        model_name=view.name,
    )


def _check_cache_shapes(view: ModelView, cache: Any, inputs: RunInputs) -> None:
    """The cache must hold one run of this model on these inputs."""
    b, n = inputs.batch, inputs.seq_len
    expected = {
        "blocks.0." + view.q_hook: (b, n, view.n_heads, view.d_head),
        "blocks.0.attn.hook_v": (b, n, view.n_kv_heads, view.d_head),
        f"blocks.{view.n_layers - 1}.mlp.hook_pre": (b, n, view.d_mlp),
        "ln_final.hook_scale": (b, n, 1),
    }
    for name, shape in expected.items():
        got = tuple(cache[name].shape)
        if got != shape:
            raise CacheError(
                f"cache[{name!r}] has shape {got}, expected {shape}: the cache was made by another "
                "model or on another input"
            )
