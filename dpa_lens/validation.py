"""Checks shared by every method: is this cache usable with this model, is the model in eval mode.

Each raises a `dpa_lens.errors` class with a message that says what was wrong and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dpa_lens.errors import CacheError, TrainModeError
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView


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


def check_cache_model(view: ModelView, cache: Any, n_pos: int = 16) -> None:
    """Check that layer 0's cached values are this model's ``W_V`` applied to its cached input stream.

    Together with the embedding check of `read_inputs`, this catches a cache made by another
    model of the same shape (another checkpoint, another seed). Needs ``blocks.0.hook_resid_pre``,
    ``blocks.0.ln1.hook_scale`` and ``blocks.0.attn.hook_v``; costs a few positions of one layer.
    """
    names = (hooks.resid_pre(0), hooks.norm_scale(0, "ln1"), hooks.attn(0, "v"))
    if not all(n in cache for n in names):
        return
    embed, scale, v = (cache[n][:, :n_pos].float() for n in names)
    a = view.attn(0)
    if view.rules.norm == "ln":
        embed = embed - embed.mean(-1, keepdim=True)
    x = embed / scale.to(embed.device)
    gamma = view.norm_weight("ln1", 0)
    if gamma is not None:
        x = x * gamma.to(x.device)
    pred = torch.einsum("bpd,kde->bpke", x, a.W_V.to(x.device))
    if a.b_V is not None:
        pred = pred + a.b_V.to(x.device)
    low_precision = cache[names[2]].dtype in (torch.float16, torch.bfloat16)
    tol = (3e-2 if low_precision else 1e-3) * float(v.abs().max()) + 1e-6
    if float((pred - v.to(pred.device)).abs().max()) > tol:
        raise CacheError(
            "the cache does not match this model's weights (layer 0 values differ from W_V applied to "
            "the cached embeddings): it was made by another model"
        )


