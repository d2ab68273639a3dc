"""Checks shared by every method: is this cache usable with this model, is the model in eval mode.

Each raises a `dpa_lens.errors` class with a message that says what was wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dpa_lens.blocks import attn_write, mlp_post, mlp_write
from dpa_lens.errors import CacheError, TrainModeError
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import heads_in, push_norm


def require_eval(model: Any, method: str) -> None:
    """Raise `TrainModeError` when any module of ``model`` is in train mode (dropout would be on)."""
    training = [name for name, module in model.named_modules() if module.training]
    if training:
        raise TrainModeError(
            f"{method} needs the model in eval mode (dropout would make the numbers random); "
            f"call model.eval() first ({len(training)} modules are in train mode, e.g. {training[0] or 'the model'})"
        )


def check_hooks(cache: Any, names: Iterable[str], *, method: str, filter_hint: str) -> None:
    """Raise `CacheError` naming the missing hooks and the ``names_filter`` that caches them."""
    missing = [n for n in names if n not in cache]
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
    if hooks.EMBED in cache and cache[hooks.EMBED].shape[-1] != view.d_model:
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
    named = [(n, cache[n]) for n in names if n in cache and n != hooks.TOKENS and not n.endswith("attn_scores")]
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
    name = next((hooks.attn(l, "pattern") for l in range(64) if hooks.attn(l, "pattern") in cache), None)
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


def check_cache_model(view: ModelView, cache: Any, n_pos: int = 16) -> None:
    """Check, at every layer where the cache allows it, that the cached activations are this model's
    weights applied to the cached stream (a cache of another checkpoint fails here).

    Two checks on the first ``n_pos`` positions: the values ``v = W_V·ln1(resid_pre)`` where the
    stream, the norm scale and ``hook_v`` are cached; and the layer's write, ``resid_post − resid_pre
    = attention out + MLP out`` rebuilt from ``hook_z`` and the MLP activations with ``W_O`` and
    ``W_out``, where the streams are cached. Raises `CacheError` when no layer can be checked at all.

    Any model TransformerLens builds passes: norms and biases that processing did not fold (their
    biases are in `ModelView.attn` and `ModelView.mlp`), ``ln1`` scales cached per head
    (``use_split_qkv_input``), attention-only blocks."""
    rules = view.rules
    checked = 0
    low = any(cache[n].dtype in (torch.float16, torch.bfloat16) for n in (hooks.EMBED,) if n in cache)
    rel = 3e-2 if low else 2e-3

    def get(name: str) -> torch.Tensor | None:
        return cache[name][:, :n_pos].float() if name in cache else None

    def fail(layer: int, what: str) -> None:
        raise CacheError(f"the cache does not match this model's weights at layer {layer} ({what}): it was made by "
                         "another model (another checkpoint or seed); pass the cache of this model's run")

    for layer in range(view.n_layers):
        resid, scale, v = get(hooks.resid_pre(layer)), get(hooks.norm_scale(layer, "ln1")), get(hooks.attn(layer, "v"))
        if resid is not None and scale is not None and v is not None:
            a = view.attn(layer)
            x = push_norm(resid, view.stream_scale(scale).to(resid.device), view.norm_weight("ln1", layer), center=rules.norm == "ln")
            K, _, dh = a.W_V.shape  # one flat product (a view of the bridge's [K·d_head, d_model] matrix)
            pred = (x @ heads_in(a.W_V.to(x.device))).unflatten(-1, (K, dh))
            pred = pred + (a.b_V.to(x.device) if a.b_V is not None else 0.0)
            if float((pred - v.to(x.device)).abs().max()) > rel * float(v.abs().max()) + 1e-5:
                fail(layer, "values differ from W_V applied to the cached stream")
            checked += 1
        nxt = hooks.resid_pre(layer + 1) if layer + 1 < view.n_layers else hooks.resid_post(layer)
        z, after = get(hooks.attn(layer, "z")), get(nxt)
        post = get(hooks.mlp(layer, "post"))
        if post is None and hooks.mlp(layer, "pre") in cache and (not rules.gated or hooks.mlp(layer, "pre_linear") in cache):
            post = mlp_post(rules, get(hooks.mlp(layer, "pre")), get(hooks.mlp(layer, "pre_linear")))
        if resid is None or after is None or z is None or (post is None and rules.has_mlp):
            continue
        if rules.post_norms and not all(hooks.norm_scale(layer, n) in cache for n in ("ln1_post", "ln2_post")):
            continue
        attn = attn_write(view, layer, z)
        mlp = mlp_write(view, layer, post) if rules.has_mlp else torch.zeros_like(attn)
        if rules.post_norms:
            attn = push_norm(attn, get(hooks.norm_scale(layer, "ln1_post")), view.norm_weight("ln1_post", layer), center=False)
            mlp = push_norm(mlp, get(hooks.norm_scale(layer, "ln2_post")), view.norm_weight("ln2_post", layer), center=False)
        write = after - resid
        err = float((attn + mlp - write).abs().max())
        if err > rel * float(write.abs().max()) + 1e-5 * float(after.abs().max()) + 1e-5:
            fail(layer, "its write to the stream differs from W_O and W_out applied to the cached activations")
        checked += 1
    if not checked:
        raise CacheError("the cache holds nothing to check it against this model's weights (no residual streams); cache "
                         "the method's hooks (dpa_lens.names_filter(model, <method>)) or run_with_cache without a names_filter")
