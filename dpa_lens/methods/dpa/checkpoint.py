"""Activation checkpointing for DPA: cache the residual streams only, recompute each layer's internals.

A full DPA cache holds, for every layer, the queries, keys, values, head outputs, norm scales and MLP
pre-activations: on SmolLM2-135M about 5,000 floats per token and layer, most of DPA's memory at long
contexts. ``dpa_names_filter(model, checkpoint=True)`` caches only the stream entering each layer
(and the last one leaving), the embeddings, the final norm and what fixes the rotary positions
(`dpa_lens.methods.dpa.hooks.checkpoint_hook_names`). `dpa` reads such a cache through a
`RecomputedCache`: when the sweep reaches a layer, the layer is run again from its cached input stream
with the model's weights, and only that layer's internals are held. Each recomputed layer's output is
checked against the next cached stream, so a recomputation that does not reproduce the forward raises
instead of giving wrong scores.

The cost is about one more forward pass, spread over the sweep. Models whose attention the
recomputation does not rebuild (sliding windows, soft-capped scores, norms after the sublayers:
Mistral, Gemma 2/3) are refused (`check_checkpointable`); cache their internals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from dpa_lens.blocks import attn_write, mlp_post, mlp_write
from dpa_lens.errors import CacheError, UnsupportedModelError
from dpa_lens.forward import CachedForward
from dpa_lens.methods.dpa.hooks import check_checkpointable, checkpoint_hook_names, flow_hooks, layer_internals
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import heads_in, normalize, rotate
from dpa_lens.types import Cache
from dpa_lens.validation import check_cache_shape, check_hooks

Rotary = Callable[[int], "tuple[Tensor, Tensor] | None"]
CHECK_ROWS = 512  # positions of each recomputed layer checked against the next cached stream (all, up to this)


def is_checkpointed(view: ModelView, cache: Cache) -> bool:
    """True when ``cache`` holds what `checkpoint_hook_names` lists but not the layers' internals.

    A cache that holds most of the layers' input streams and none of the internals of the layers after the
    first is a checkpointed cache too (a full cache holds them, a DLA cache the head outputs): when it lacks
    some of what `checkpoint_hook_names` lists, a `CacheError` names them and the ``names_filter`` that caches
    them, ``dpa_names_filter(model, checkpoint=True)`` (read as a full cache, its error would list the layers'
    internals instead)."""
    names = checkpoint_hook_names(view)
    if hooks.cached(cache, hooks.attn(0, "v")):
        return False
    if all(hooks.cached(cache, name) for name in names):
        return True
    streams = flow_hooks(view)
    if 2 * sum(hooks.cached(cache, name) for name in streams) < len(streams):
        return False
    if any(hooks.cached(cache, name) for layer in range(1, view.n_layers) for name in layer_internals(view, layer)):
        return False
    try:
        check_checkpointable(view)  # a model dpa_names_filter(model, checkpoint=True) refuses: read as a full cache
    except UnsupportedModelError:
        return False
    check_cache_shape(view, cache, names)  # another model's cache is named as such first
    check_hooks(cache, names, method="checkpointed DPA", filter_hint="dpa_lens.dpa_names_filter(model, checkpoint=True)")
    return True


def recomputed(fwd: CachedForward) -> CachedForward:
    """``fwd`` over a checkpointed cache, reading each layer's internals through a `RecomputedCache` (each layer
    recomputed on its own device, `CachedForward.layer_device`)."""
    return dataclasses.replace(fwd, cache=RecomputedCache(fwd.view, fwd.cache, fwd.inputs.real, fwd.rotary, fwd.layer_device))


def _eps(module: object, default: float) -> float:
    for name in ("eps", "variance_epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return default


def _check_rows(n: int, device: torch.device) -> Tensor:
    """The positions checked: all of them, or `CHECK_ROWS` spread over the sequence (the first and last included)."""
    if n <= CHECK_ROWS:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, CHECK_ROWS, device=device).round().long().unique()


class RecomputedCache(Mapping):
    """A checkpointed cache read as a full one: a layer's internals are recomputed from its cached
    input stream on first access, and held until another layer is asked for.

    Holds the base cache's hooks, and per layer the ones DPA reads (`layer_internals`: norm scales,
    queries and keys as DPA reads them, values, head outputs, query/key norm scales, MLP
    pre-activations), float32, in the layouts TransformerLens caches them. Never patterns: DPA
    recomputes those block by block. ``device_of(layer)`` is where a layer is recomputed (its weights'
    device on a split model; by default, where its input stream is cached)."""

    def __init__(self, view: ModelView, base: Cache, real: Tensor, rotary: Rotary,
                 device_of: Callable[[int], torch.device] | None = None):
        check_checkpointable(view)
        self.view, self.base, self.real, self.rotary = view, base, real, rotary
        self.device_of = device_of or (lambda layer: base[hooks.resid_pre(layer)].device)
        self.names = [frozenset(n for n in layer_internals(view, l) if n not in base) for l in range(view.n_layers)]
        self.layer: int | None = None
        self.acts: dict[str, Tensor] = {}
        self.low_precision = base[hooks.resid_pre(0)].dtype in (torch.float16, torch.bfloat16)
        default = float(getattr(view.cfg, "eps", 1e-5))
        blocks = view.model.blocks
        self.eps = {(l, n): _eps(getattr(blocks[l], n, None), default) for l in range(view.n_layers) for n in ("ln1", "ln2")}
        if view.rules.qk_norm:
            self.eps.update({(l, n): _eps(getattr(blocks[l].attn, f"{n}_norm", None), default)
                             for l in range(view.n_layers) for n in ("q", "k")})

    def _layer(self, name: object) -> int | None:
        layer = hooks.layer_of(name) if isinstance(name, str) else None
        return layer if layer is not None and 0 <= layer < self.view.n_layers and name in self.names[layer] else None

    def __contains__(self, name: object) -> bool:
        return name in self.base or self._layer(name) is not None

    def __getitem__(self, name: str) -> Tensor:
        if name in self.base:
            return self.base[name]
        layer = self._layer(name)
        if layer is None:
            raise KeyError(name)
        if layer != self.layer:
            self.acts = {}  # free the previous layer before recomputing the next
            self.acts = self._recompute(layer)
            self.layer = layer
        return self.acts[name]

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        for names in self.names:
            yield from sorted(names)

    def __len__(self) -> int:
        return len(self.base) + sum(len(names) for names in self.names)

    @torch.no_grad()
    def _recompute(self, layer: int) -> dict[str, Tensor]:
        """One layer's forward from its cached input stream (float32), checked against the next stream."""
        view, rules = self.view, self.view.rules
        H, K, dh = view.n_heads, view.n_kv_heads, view.d_head
        center = rules.norm == "ln"
        dev = self.device_of(layer)
        resid = self.base[hooks.resid_pre(layer)].to(dev).float()
        b, n, d = resid.shape
        acts: dict[str, Tensor] = {}
        x, acts[hooks.norm_scale(layer, "ln1")] = normalize(resid, self.eps[layer, "ln1"], view.norm_weight("ln1", layer), center)
        a = view.attn(layer)
        # the three projections as one product: [d_model, (H + 2K) d_head]
        W = torch.cat([heads_in(w) for w in (a.W_Q, a.W_K, a.W_V)], dim=1).to(dev)
        qkv = x @ W
        if any(bias is not None for bias in (a.b_Q, a.b_K, a.b_V)):
            qkv = qkv + torch.cat([(bias if bias is not None else torch.zeros(h, dh)).reshape(-1).to(dev)
                                   for bias, h in ((a.b_Q, H), (a.b_K, K), (a.b_V, K))])
        q, k, v = qkv.split([H * dh, K * dh, K * dh], dim=-1)
        q, k, v = q.reshape(b, n, H, dh), k.reshape(b, n, K, dh), v.reshape(b, n, K, dh)
        acts[hooks.attn(layer, "q")], acts[hooks.attn(layer, "k")], acts[hooks.attn(layer, "v")] = q, k, v
        if rules.qk_norm:
            q, q_scale = normalize(q, self.eps[layer, "q"], view.qk_norm_weight(layer, "q"), center=False)
            k, k_scale = normalize(k, self.eps[layer, "k"], view.qk_norm_weight(layer, "k"), center=False)
            acts[hooks.qk_norm(layer, "q")] = q_scale.transpose(1, 2)  # [batch, head, pos, 1], as the bridge caches it
            acts[hooks.qk_norm(layer, "k")] = k_scale.transpose(1, 2)
        if rules.rotary:
            cos, sin = (t.to(dev) for t in self.rotary(layer))
            q, k = rotate(q, cos, sin, view.adjacent_pairs), rotate(k, cos, sin, view.adjacent_pairs)
            acts[hooks.attn(layer, "rot_q")], acts[hooks.attn(layer, "rot_k")] = q, k
        z = acts[hooks.attn(layer, "z")] = self._attend(layer, q, k, v)
        after = resid + attn_write(view, layer, z)
        rows = _check_rows(n, dev)
        if rules.has_mlp:
            x2, acts[hooks.norm_scale(layer, "ln2")] = normalize(resid if rules.parallel else after, self.eps[layer, "ln2"],
                                                                  view.norm_weight("ln2", layer), center)
            m = view.mlp(layer)
            if rules.gated:  # gate and up projections as one product
                pre, pre_linear = (x2 @ torch.cat([m.W_gate, m.W_in], dim=1).to(dev)).split(view.d_mlp, dim=-1)
                acts[hooks.mlp(layer, "pre_linear")] = pre_linear
                post = mlp_post(rules, pre[:, rows], pre_linear[:, rows])
            else:
                pre = x2 @ m.W_in.to(dev) + (m.b_in.to(dev) if m.b_in is not None else 0.0)
                post = mlp_post(rules, pre[:, rows])
            acts[hooks.mlp(layer, "pre")] = pre
            after = after[:, rows] + mlp_write(view, layer, post)
        else:
            after = after[:, rows]
        self._check(layer, after, rows)
        return {name: t for name, t in acts.items() if name in self.names[layer]}

    def _attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention over the real keys, ``[batch, pos, head, d_head]`` (a query row with no real key: 0)."""
        G = self.view.n_heads // self.view.n_kv_heads
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)))
        scale = 1.0 / self.view.attn_scale(layer)
        real = self.real.to(q.device)
        if bool(real.all()):
            z = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        else:
            n = q.shape[1]
            allowed = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None] & real[:, None, None, :]
            z = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale).nan_to_num(0.0)
            z = z * allowed.any(-1, keepdim=True)
        return z.transpose(1, 2)

    def _check(self, layer: int, after: Tensor, rows: Tensor) -> None:
        """The recomputed layer's output (at ``rows``) must be the next cached stream there, on real tokens."""
        last = layer == self.view.n_layers - 1
        cached = self.base[hooks.resid_post(layer) if last else hooks.resid_pre(layer + 1)].to(after.device)[:, rows].float()
        real = self.real.to(after.device)[:, rows, None]
        err = float(((after - cached).abs() * real).max())
        rel = 3e-2 if self.low_precision else 1e-4
        if err > rel * float((cached * real).abs().max()) + 1e-5:
            raise CacheError(
                f"layer {layer}, recomputed from its cached input stream, does not reproduce the next cached stream "
                f"(they differ by {err:.2e}): the cache was made by another model, or by a forward that dpa_lens does not "
                "rebuild; pass this model's cache, or cache the layer internals, names_filter=dpa_lens.dpa_names_filter(model)"
            )
