"""Checks shared by every method: is this cache usable with this model, is the model in eval mode.

Each raises a `dpa_lens.errors` class with a message that says what was wrong and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dpa_lens.blocks import attn_write, mlp_post, mlp_write, qk_normalize
from dpa_lens.errors import CacheError, TrainModeError
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import heads_in, push_norm, rotary_invariant, unrotate


def require_eval(model: Any, method: str, *, dropout_only: bool = False) -> None:
    """Raise `TrainModeError` when any module of ``model`` is in train mode (dropout would be on);
    ``dropout_only``: only when one of them drops activations (a forward's cache would be random)."""

    def on(module: torch.nn.Module) -> bool:
        return module.training and (not dropout_only or _drops(module))

    if any(on(module) for module in model.modules()):
        training = [name for name, module in model.named_modules() if on(module)]
        raise TrainModeError(
            f"{method} needs the model in eval mode (dropout would make the numbers random); "
            f"call model.eval() first ({len(training)} modules are in train mode{' with dropout' if dropout_only else ''}, "
            f"e.g. {training[0] or 'the model'})"
        )


def _drops(module: torch.nn.Module) -> bool:
    """Whether a module in train mode drops activations: a dropout layer, or an attention with a dropout rate."""
    p = module.p if isinstance(module, torch.nn.modules.dropout._DropoutNd) else getattr(module, "attention_dropout", 0.0)
    return isinstance(p, (int, float)) and p > 0


def check_hooks(cache: Any, names: Iterable[str], *, method: str, filter_hint: str) -> None:
    """Raise `CacheError` naming the missing hooks and the ``names_filter`` that caches them."""
    missing = [n for n in names if not hooks.cached(cache, n)]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CacheError(
            f"{method} needs activations the cache does not hold: {shown}. Cache them with\n"
            f"    logits, cache = model.run_with_cache(tokens, names_filter={filter_hint})\n"
            "or run_with_cache without a names_filter."
        )


def check_cache_object(cache: Any, method: str) -> None:
    """Raise `CacheError` unless ``cache`` is an ``ActivationCache`` (or a mapping of hook names to tensors),
    saying what was passed instead."""
    def is_cache(x: Any) -> bool:
        return isinstance(x, Mapping) or (hasattr(x, "__getitem__") and hasattr(x, "keys") and not isinstance(x, torch.Tensor))

    if isinstance(cache, tuple) and len(cache) == 2 and is_cache(cache[1]):
        raise CacheError(f"{method} was given the pair (logits, cache) that run_with_cache returns; pass the cache: "
                         "logits, cache = model.run_with_cache(...)")
    if isinstance(cache, torch.Tensor):
        raise CacheError(f"{method} was given a tensor of shape {tuple(cache.shape)} as the cache (logits?); pass the "
                         "ActivationCache: logits, cache = model.run_with_cache(...)")
    if not is_cache(cache):
        raise CacheError(f"{method} needs an ActivationCache (logits, cache = model.run_with_cache(...)), got {type(cache).__name__}")


def check_cache_shape(view: ModelView, cache: Any, needed: Iterable[str] = ()) -> None:
    """Raise `CacheError` when the cache's layers or width are not this model's (a cache of another model),
    before any missing hook is reported one by one."""
    if hooks.cached(cache, hooks.EMBED) and cache[hooks.EMBED].shape[-1] != view.d_model:
        raise CacheError(f"this cache was made by a model of width {cache[hooks.EMBED].shape[-1]}; this model's d_model is "
                         f"{view.d_model}: pass the cache of this model's run")
    layers = [l for l in (hooks.layer_of(name) for name in cache.keys()) if l is not None]
    if not layers:
        return
    top = max(layers) + 1
    if top > view.n_layers:
        raise CacheError(f"this cache was made by a model with at least {top} layers; this model has {view.n_layers}: "
                         "pass the cache of this model's run")
    wanted = [l for l in (hooks.layer_of(n) for n in needed) if l is not None]
    if wanted and max(wanted) >= top:
        raise CacheError(f"this cache holds layers 0–{top - 1} only, and this model has {view.n_layers}: it was made by a "
                         "smaller model, or with a names_filter that left layers out (use the method's names_filter)")


def check_finite(cache: Any, names: Iterable[str], method: str) -> None:
    """Raise `CacheError` naming the first hook (among ``names``) whose cached values are not all finite."""
    named = [(n, cache[n]) for n in names if hooks.cached(cache, n) and n != hooks.TOKENS and not n.endswith("attn_scores")]
    named = [(n, t) for n, t in named if t.is_floating_point() and t.numel()]
    if not named:
        return
    # a tensor's min and max are finite iff all of it is (NaN propagates); one synchronisation for all of them
    finite = torch.stack([torch.isfinite(torch.stack(torch.aminmax(t))).all().to(named[0][1].device) for _, t in named])
    if bool(finite.all()):
        return
    name = named[int((~finite).nonzero()[0, 0])][0]
    raise CacheError(f"cache[{name!r}] holds NaN or infinite values: {method}'s scores would be NaN. The forward "
                     "overflowed (half precision?) or the cache was edited; rerun it (in float32)")


def check_padding(real: torch.Tensor, cache: Any, *, given_mask: bool) -> None:
    """The padding dpa_lens assumes (``real [batch, pos]``) must be the padding the forward masked.

    Read from the first cached attention pattern: a key the forward masked gets no attention from any
    real query in any head; a real key gets some (at least from itself). Padding that only padding
    attends to (right padding under a causal mask) changes no real token and passes."""
    name = next((hooks.attn(l, "pattern") for l in range(64) if hooks.cached(cache, hooks.attn(l, "pattern"))), None)
    if name is None:
        return
    pattern = cache[name].detach().float().nan_to_num(0.0).cpu()  # [batch, head, query, key]
    real = real.cpu()
    if pattern.shape[0] != real.shape[0] or pattern.shape[-1] != real.shape[1]:
        return
    attended = (pattern * real[:, None, :, None]).amax(dim=(1, 2)) > 0  # [batch, key], from real queries
    unmasked = ~real & attended
    if bool(unmasked.any()):
        rows = sorted(set(torch.nonzero(unmasked)[:, 0].tolist()))
        raise CacheError(
            f"row{'s' if len(rows) > 1 else ''} {rows}: the forward attended to tokens that dpa_lens takes for padding "
            f"({'as the attention_mask says' if given_mask else 'pad tokens at the ends of the rows'}), so it did not "
            "mask them. Rerun the forward with the mask, e.g. tokens, mask = dpa_lens.inputs.prepare_tokens(model, prompts); "
            "model.run_with_cache(tokens, attention_mask=mask); or pass attention_mask=torch.ones_like(tokens) to explain "
            "the run as it happened, padding included")
    masked = real & ~attended
    if bool(masked.any()):
        b, p = torch.nonzero(masked)[0].tolist()
        raise CacheError(f"position {p} of row {b} is a real token for dpa_lens but the forward masked it: the "
                         "attention_mask given contradicts the cache; pass the mask the forward used")


def check_cache_model(view: ModelView, cache: Any, n_pos: int = 4, *, every_weight: bool | None = None) -> None:
    """Check, at every layer where the cache allows it, that the cached activations are this model's
    weights applied to the cached stream (a cache of another checkpoint, or made before the weights were
    edited, fails here), and that the norms' cached scales and outputs are the norms of the cached
    streams (a relation of activations alone: a cache edited after caching fails there).

    At ``n_pos`` positions spread over the input (the first and the last among them), at each layer:
    ``ln1``'s scale is the norm of the stream; the values, queries and keys are ``W_V``, ``W_Q``, ``W_K``
    applied to ``ln1(resid_pre)`` (query-key norms applied; rotated queries and keys compared by what
    the rotation keeps, `ops.rotary_invariant`); the MLP's inputs are ``W_in`` and the gate ``W_gate``
    applied to ``ln2`` of the stream after attention; and the layer's write, ``resid_post − resid_pre``,
    is ``hook_z`` and the MLP activations through ``W_O`` and ``W_out``. At every position, the final
    norm's scale and output are those of the last stream. The cost is one read of the block weights
    (products of ``n_pos`` rows). Queries, keys (with the query-key norm's cached scale, as the sweep reads
    them) and the MLP's inputs are checked only with ``every_weight`` (default: ``DPA_LENS_CHECK=every-weight``
    in the environment; the methods that read those weights ask for it, `read_forward`'s ``weights``): they
    double the check's cost (on SmolLM2 on CPU, about 50 -> 120 ms a call). Node DPA and DPA edges check them
    through their sweep instead (`WeightProbe`; its cost: bench/results/speed_smollm2.md). Raises `CacheError` when no layer can be checked at all.

    Any model TransformerLens builds passes: norms and biases that processing did not fold (their
    biases are in `ModelView.attn` and `ModelView.mlp`), ``ln1`` scales cached per head
    (``use_split_qkv_input``), attention-only blocks."""
    rules = view.rules
    every_weight = os.environ.get("DPA_LENS_CHECK") == "every-weight" if every_weight is None else every_weight
    center = rules.norm == "ln"
    checked = 0
    low = any(cache[n].dtype in (torch.float16, torch.bfloat16) for n in (hooks.EMBED,) if hooks.cached(cache, n))
    rel = 3e-2 if low else 2e-3

    at: list[torch.device | None] = [None]  # a split model: where the layer checked is (its weights never move)
    spread_at = _Positions(n_pos)

    def get(name: str, spread: bool = True) -> torch.Tensor | None:
        if not hooks.cached(cache, name):
            return None
        t = cache[name]
        t = (spread_at(t) if spread else t).float()
        return t if at[0] is None else t.to(at[0])

    def differ(pred: torch.Tensor, cached: torch.Tensor, atol: float = 1e-5) -> bool:
        """Whether they differ at some position by more than the float error (relative to that position's values)."""
        cached = cached.to(pred.device)
        err, size = (pred - cached).abs().flatten(2).amax(-1), cached.abs().flatten(2).amax(-1)  # [batch, pos]
        return bool((err > rel * size + atol).any())

    def fail(layer: int, what: str) -> None:
        raise CacheError(f"the cache does not match this model's weights at layer {layer} ({what}): it was made by "
                         "another model (another checkpoint or seed) or before the weights were edited, or its activations "
                         "were edited after caching; pass the cache of this model's run")

    def check_norm(stream: str, scale: str, out: str | None = None, spread: bool = True) -> torch.Tensor | None:
        """The cached ``scale`` (and output) of a norm of ``stream``: a relation of activations alone, for any weights."""
        x, s, y = get(stream, spread), get(scale, spread), (get(out, spread) if out else None)
        if x is None or s is None:
            return None
        s = view.stream_scale(s).to(x.device)
        x = x - x.mean(-1, keepdim=True) if center else x
        for name, pred, cached in ((scale, (x.pow(2).mean(-1, keepdim=True) + view.cfg.eps).sqrt(), s), (out, x / s, y)):
            if cached is not None and differ(pred, cached):
                raise CacheError(f"cache[{name!r}] is not the norm of the cached stream {stream} (which holds for any "
                                 "weights): the cache was edited after caching; pass the cache of this model's run as it was made")
        return s

    check_norm(hooks.resid_post(view.n_layers - 1), hooks.FINAL_SCALE, hooks.FINAL_NORMALIZED, spread=False)  # at every position
    for layer in range(view.n_layers):
        at[0] = view.layer_device(layer) if view.split else None
        resid = get(hooks.resid_pre(layer))
        scale = check_norm(hooks.resid_pre(layer), hooks.norm_scale(layer, "ln1"))
        if scale is not None:
            x = push_norm(resid, scale, view.norm_weight("ln1", layer), center=center)
            a, r = view.attn(layer), _rotary_dim(view, cache, layer)
            q, k = view.qk_hook_names(layer)[:2]
            products = (("values", "V", a.W_V, a.b_V, hooks.attn(layer, "v")), ("queries", "Q", a.W_Q, a.b_Q, q), ("keys", "K", a.W_K, a.b_K, k))
            for what, which, W, b, name in products[: 3 if every_weight else 1]:
                cached, rotated = get(name), which != "V" and rules.rotary and rules.rot_hooks
                if cached is None or (rotated and r is None):
                    continue
                pred = (x @ heads_in(W.to(x.device))).unflatten(-1, W.shape[::2])  # one flat product: [pos, heads·d_head]
                pred = pred + (b.to(x.device) if b is not None else 0.0)
                if rotated:  # compared by what the rotation keeps, after the query-key norm
                    pred = _qk_norm_cached(view, cache, layer, which.lower(), pred, n_pos) if rules.qk_norm else pred
                    pred, cached = rotary_invariant(pred, r, view.adjacent_pairs), rotary_invariant(cached, r, view.adjacent_pairs)
                if differ(pred, cached):
                    fail(layer, f"{what} differ from W_{which} applied to the cached stream")
                checked += 1
        nxt = hooks.resid_pre(layer + 1) if layer + 1 < view.n_layers else hooks.resid_post(layer)
        z, after = get(hooks.attn(layer, "z")), get(nxt)
        attn = None
        if z is not None and (not rules.post_norms or hooks.cached(cache, hooks.norm_scale(layer, "ln1_post"))):
            attn = attn_write(view, layer, z)
            if rules.post_norms:
                attn = push_norm(attn, get(hooks.norm_scale(layer, "ln1_post")), view.norm_weight("ln1_post", layer), center=False)
        pre, pre_linear = get(hooks.mlp(layer, "pre")), get(hooks.mlp(layer, "pre_linear"))
        mid = resid if rules.parallel else get(hooks.resid_mid(layer))
        if mid is None and resid is not None and attn is not None:
            mid = resid + attn
        scale2 = get(hooks.norm_scale(layer, "ln2"))
        mlp_inputs = pre is not None and (pre_linear is not None or not rules.gated)
        if every_weight and rules.has_mlp and mid is not None and scale2 is not None and mlp_inputs:
            x2 = push_norm(mid, view.stream_scale(scale2).to(mid.device), view.norm_weight("ln2", layer), center=center)
            m = view.mlp(layer)
            for W, b, cached, name in ((m.W_in, m.b_in, pre_linear if rules.gated else pre, "W_in"), (m.W_gate, None, pre, "W_gate")):
                if W is not None and differ(x2 @ W.to(x2.device) + (b.to(x2.device) if b is not None else 0.0), cached):
                    fail(layer, f"the MLP's inputs differ from {name} applied to the cached stream")
            checked += 1
        post = get(hooks.mlp(layer, "post"))
        if post is None and pre is not None and (not rules.gated or pre_linear is not None):
            post = mlp_post(rules, pre, pre_linear)
        if resid is None or after is None or attn is None or (post is None and rules.has_mlp):
            continue
        if rules.post_norms and not hooks.cached(cache, hooks.norm_scale(layer, "ln2_post")):
            continue
        mlp = mlp_write(view, layer, post) if rules.has_mlp else torch.zeros_like(attn)
        if rules.post_norms:
            mlp = push_norm(mlp, get(hooks.norm_scale(layer, "ln2_post")), view.norm_weight("ln2_post", layer), center=False)
        write = after - resid
        if differ(attn + mlp, write, 1e-5 * float(after.abs().max()) + 1e-5):
            fail(layer, "its write to the stream differs from W_O and W_out applied to the cached activations")
        checked += 1
    if not checked:
        raise CacheError("the cache holds nothing to check it against this model's weights (no residual streams); cache "
                         "the method's hooks (dpa_lens.names_filter(model, <method>)) or run_with_cache without a names_filter")


def _qk_norm_cached(view: ModelView, cache: Any, layer: int, which: str, y: torch.Tensor, n_pos: int) -> torch.Tensor:
    """The query/key norm of the projections ``y [batch, P, heads, d_head]`` (at `_spread`'s positions) with the
    cached scale, as DPA's sweep reads it (the scale recomputed would hide an edit that scales a head's weights),
    or in full where the cache has no scale."""
    name = hooks.qk_norm(layer, which)
    if not hooks.cached(cache, name):
        return qk_normalize(y, view, layer, which)
    s = _Positions(n_pos)(view.qk_norm_scale(cache, layer, which, y.shape[0], cache[hooks.EMBED].shape[1], heads=y.shape[2]))
    s = s.float().to(y.device)
    gain = view.qk_norm_weight(layer, which)
    y = y / s
    return y * gain.detach().float().to(y.device) if gain is not None else y


class _Positions:
    """``t[:, P]`` for ``P`` = `_spread` ``(t.shape[1], n_pos)``, by one index tensor per length and device: indexing
    with a list makes a new index tensor on every read, a third of `WeightProbe.verify`'s time."""

    def __init__(self, n_pos: int):
        self.n_pos = n_pos
        self._index: dict[tuple[int, torch.device], torch.Tensor] = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.shape[1], t.device)
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = torch.tensor(_spread(t.shape[1], self.n_pos), device=t.device)
        return t.index_select(1, index)


def _spread(n: int, k: int) -> list[int]:
    """``k`` positions of ``n`` spread evenly, the first and the last included (all of them when ``n ≤ k``)."""
    m = min(n, k)
    return sorted({round(i * (n - 1) / max(m - 1, 1)) for i in range(m)})


def _rotary_dim(view: ModelView, cache: Any, layer: int) -> int | None:
    """How many dimensions of a query or key the rotary embedding turns (None where the cache does not say)."""
    if not view.rules.rotary:
        return None
    if view.rotary_from_cache():
        name = hooks.attn(layer, "cos")
        return cache[name].shape[-1] if hooks.cached(cache, name) else None
    return view.rotary_buffers(layer)[0].shape[-1]


class WeightProbe:
    """Freivalds' check of the input weights a sweep multiplies anyway (``W_Q``, ``W_K``, ``W_V``, ``W_in``,
    ``W_gate``), at the cost of one row more in each product of the sweep with them.

    `check_cache_model` checks ``W_V``, ``W_O`` and ``W_out`` by recomputing cached activations at a few
    positions, which reads every weight once more from memory; doing the same for the queries, keys and the
    MLP's inputs doubles the check (`check_cache_model`'s ``every_weight``). DPA's sweep reads those weights
    already, in products ``g_i @ W_iᵀ``: `rows` gives one random row ``r_i`` per product (seeded; the same
    for every layer), which the sweep appends to ``g_i``, and `record` keeps the extra output row
    ``v = Σ_i w_i W_i r_i`` (``w_i`` the path weights). After the sweep `verify` checks, at ``n_pos`` positions ``p``, that ``x_p · v`` equals
    ``Σ_i w_i (y_{i,p} − b_i) · r_i``, with ``x_p`` the normalised stream the sublayer reads and ``y_i`` its
    cached projections (queries and keys un-rotated and their norms undone): a weight edited after the cache
    was made breaks the equality for a random ``r`` (with probability one), a cache of this model's weights
    keeps it up to float error. Query and key dimensions whose norm gain is 0 are left out of ``r``: they
    reach neither the model's output nor the sweep.
    """

    def __init__(self, view: ModelView, n_pos: int = 4, seed: int = 0):
        self.view, self.n_pos, self.seed = view, n_pos, seed
        self._drawn: dict[tuple[str, int, torch.device], torch.Tensor] = {}  # one vector per kind and width, for every layer
        self._rows: dict[tuple[int, str], list[tuple[str, float, torch.Tensor]]] = {}
        self._products: dict[tuple[int, str], torch.Tensor] = {}
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def rows(self, layer: int, block: str, terms: list[tuple[str, float, int]], device: torch.device) -> list[torch.Tensor]:
        """Random rows ``r_i`` for the products of a layer's ``block`` (``"attn"``: ``("q"|"k"|"v", w_i, width)``,
        ``"mlp"``: ``("in"|"gate", w_i, width)``), on ``device``."""
        out = []
        for which, _, width in terms:
            key = (which, width, torch.device(device))
            if key not in self._drawn:
                gen = torch.Generator().manual_seed(self.seed + len(self._drawn))
                self._drawn[key] = torch.randn(width, generator=gen).to(device)
            r = self._drawn[key]
            gain = self.view.qk_norm_weight(layer, which) if which in ("q", "k") and self.view.rules.qk_norm else None
            if gain is not None:  # dimensions the query/key norm zeroes out reach nothing: leave them out
                r = (r.view(-1, gain.shape[-1]) * (gain.detach().to(r) != 0)).flatten()
            out.append(r)
        self._rows[(layer, block)] = [(which, weight, r) for (which, weight, _), r in zip(terms, out)]
        return out

    def with_row(self, g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """``g [rows, k]`` with ``r [k]`` as one row more, in a buffer reused from product to product (a new
        tensor per product would leave the allocator holding memory after the sweep)."""
        n = (g.shape[0] + 1) * g.shape[1]
        key = (g.device, g.dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(n, device=g.device, dtype=g.dtype)
        x = buf[:n].view(g.shape[0] + 1, g.shape[1])
        x[:-1].copy_(g)
        x[-1].copy_(r)
        return x

    def record(self, layer: int, block: str, product: torch.Tensor) -> None:
        """``v = Σ_i w_i W_i r_i [d_model]`` of a layer's ``block``."""
        self._products[(layer, block)] = product.detach()

    def verify(self, cache: Any, rotary: Any, real: torch.Tensor | None = None) -> None:
        """Raise `CacheError` where a recorded product disagrees with the cache (``rotary(layer)``: the
        forward's ``(cos, sin) [batch or 1, pos, 1, rot]`` or None, as `CachedForward.rotary`; ``real [batch, pos]``:
        the real tokens, the only positions compared: padding's rotary positions are not the forward's)."""
        self._buffers.clear()  # the sweep is over
        view, rules = self.view, self.view.rules
        center = rules.norm == "ln"
        low = cache[hooks.EMBED].dtype in (torch.float16, torch.bfloat16)
        rel = 3e-2 if low else 1e-4
        at = _Positions(self.n_pos)
        checked: dict[torch.device, list[tuple[int, str, torch.Tensor, torch.Tensor]]] = {}
        for (layer, block), v in self._products.items():
            dev = v.device

            def get(name: str, dev: torch.device = dev) -> torch.Tensor | None:
                return at(cache[name]).float().to(dev) if hooks.cached(cache, name) else None

            if block == "attn":
                stream, scale, gain = get(hooks.resid_pre(layer)), get(hooks.norm_scale(layer, "ln1")), view.norm_weight("ln1", layer)
            else:
                stream, scale, gain = _mlp_stream(view, cache, layer, get), get(hooks.norm_scale(layer, "ln2")), view.norm_weight("ln2", layer)
            if stream is None or scale is None:
                continue  # not checkable from this cache (as in check_cache_model)
            xs = [push_norm(stream, view.stream_scale(scale), gain, center=center)]  # [b, P, d_model]
            us = [v]
            for which, weight, r in self._rows[(layer, block)]:
                y, b = _projection(view, cache, layer, which, at, rotary, get)
                if y is None:
                    break
                xs.append(y.flatten(2) - b.to(dev).flatten() if b is not None else y.flatten(2))
                us.append(r * -weight)
            else:  # x·v − Σ_i w_i (y_i − b_i)·r_i as one product, and the size of its terms
                x, u = torch.cat(xs, -1), torch.cat(us)
                checked.setdefault(dev, []).append((layer, block, x @ u, x.abs() @ u.abs()))
        for dev, found in checked.items():  # compared at the end, all layers of a device at once
            diff, size = torch.stack([f[2] for f in found]), torch.stack([f[3] for f in found])  # [layers, b, P]
            off = diff.abs() > rel * size + 1e-6
            if real is not None:
                off &= at(real.to(dev)).bool()
            off = off.flatten(1).any(-1)
            if bool(off.any()):
                layer, block = found[int(off.nonzero()[0])][:2]
                names = {"attn": "W_Q, W_K and W_V", "mlp": "W_in and W_gate" if rules.gated else "W_in"}[block]
                raise CacheError(f"the cache does not match this model's weights at layer {layer} ({names} applied to the "
                                 "cached stream differ from the cached projections): it was made by another model (another "
                                 "checkpoint or seed) or before the weights were edited, or its activations were edited after "
                                 "caching; pass the cache of this model's run")


def _mlp_stream(view: ModelView, cache: Any, layer: int, get: Any) -> torch.Tensor | None:
    """The stream a layer's MLP reads, at the positions ``get`` reads (cached, or the stream before the
    layer plus its attention's write)."""
    rules = view.rules
    resid = get(hooks.resid_pre(layer))
    if rules.parallel:
        return resid
    mid = get(hooks.resid_mid(layer))
    if mid is not None or resid is None:
        return mid
    z = get(hooks.attn(layer, "z"))
    if z is None or (rules.post_norms and not hooks.cached(cache, hooks.norm_scale(layer, "ln1_post"))):
        return None
    attn = attn_write(view, layer, z)
    if rules.post_norms:
        attn = push_norm(attn, get(hooks.norm_scale(layer, "ln1_post")), view.norm_weight("ln1_post", layer), center=False)
    return resid + attn


def _projection(view: ModelView, cache: Any, layer: int, which: str, at: _Positions, rotary: Any,
                get: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A sublayer's cached projection ``y = x W + b`` before any rotary or query-key norm, ``[batch, P, heads,
    d_head]`` (``[batch, P, d_mlp]`` for ``"in"``/``"gate"``), with its bias ``b``; None where the cache lacks it."""
    rules = view.rules
    if which in ("in", "gate"):
        m = view.mlp(layer)
        name = hooks.mlp(layer, "pre_linear" if which == "in" and rules.gated else "pre")
        return get(name), (m.b_in if which == "in" else None)
    a = view.attn(layer)
    bias = {"q": a.b_Q, "k": a.b_K, "v": a.b_V}[which]
    if which == "v":
        return get(hooks.attn(layer, "v")), bias
    name = view.qk_hook_names(layer)["qk".index(which)]
    y = get(name)
    if y is None or not (rules.rotary and rules.rot_hooks):
        return y, bias  # cached before the rotation (and any query-key norm)
    rot = rotary(layer)
    if rot is None:
        return None, bias
    cos, sin = (at(t).float().to(y.device) for t in rot)
    y = unrotate(y, cos, sin, view.adjacent_pairs)
    if rules.qk_norm:  # y was normed per head: undo it with the cached scale (dimensions of gain 0 are out of r)
        gain = view.qk_norm_weight(layer, which)
        s = view.qk_norm_scale(cache, layer, which, y.shape[0], cache[hooks.EMBED].shape[1], heads=y.shape[2])
        s = at(s).float().to(y.device)
        y = y * s
        if gain is not None:
            g = gain.detach().float().to(y.device)
            y = torch.where(g != 0, y / torch.where(g != 0, g, torch.ones_like(g)), torch.zeros_like(y))
    return y, bias
