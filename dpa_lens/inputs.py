"""What was run: the tokens behind a cache, which of them are padding, and the answer positions.

A TransformerLens ``ActivationCache`` does not keep the input tokens. dpa_lens reads them from the
cache (``embed.hook_in`` on the bridge, else by matching ``hook_embed`` rows to ``W_E``), which also
proves the cache came from this model; tokens passed by the user are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from dpa_lens.models.view import ModelView


class CacheError(ValueError):
    """The cache cannot be used: hooks are missing, or it belongs to another model or input."""


@dataclass
class RunInputs:
    tokens: Int[Tensor, "batch pos"]
    real: Bool[Tensor, "batch pos"]  # False at padding
    str_tokens: list[list[str]]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


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


def _recover_tokens(view: ModelView, embed: Tensor) -> Tensor:
    """Token ids whose ``W_E`` rows equal the cached embeddings (sorted random projections)."""
    W_E = view.W_E.detach()
    gen = torch.Generator(device="cpu").manual_seed(0)
    r = torch.randn(W_E.shape[1], generator=gen).to(W_E.device)
    keys = W_E.float() @ r
    sorted_keys, order = keys.sort()
    flat = embed.detach().reshape(-1, embed.shape[-1]).to(W_E.device).float() / view.embed_scale
    idx = torch.searchsorted(sorted_keys, flat @ r)
    window = torch.arange(-3, 4, device=W_E.device)
    cand = order[(idx[:, None] + window).clamp(0, len(order) - 1)]  # [n, 7]
    dist = (W_E[cand].float() - flat[:, None, :]).abs().amax(-1)
    best = dist.argmin(-1)
    ids = cand.gather(1, best[:, None])[:, 0]
    err = dist.gather(1, best[:, None])[:, 0]
    tol = 1e-3 * float(W_E.float().abs().max()) + 1e-6
    if bool((err > tol).any()):
        raise CacheError(
            "the cache's hook_embed does not match this model's embedding matrix: the cache was made "
            "by another model (or by a forward that did not start from token ids)."
        )
    return ids.reshape(embed.shape[:-1])


def check_cache_model(view: ModelView, cache: Any, n_pos: int = 16) -> None:
    """Check that layer 0's cached values are this model's ``W_V`` applied to its cached input stream.

    Together with the embedding check of `read_inputs`, this catches a cache made by another
    model of the same shape (another checkpoint, another seed). Needs ``blocks.0.hook_resid_pre``,
    ``blocks.0.ln1.hook_scale`` and ``blocks.0.attn.hook_v``; costs a few positions of one layer.
    """
    names = ("blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale", "blocks.0.attn.hook_v")
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
    low_precision = cache["blocks.0.attn.hook_v"].dtype in (torch.float16, torch.bfloat16)
    tol = (3e-2 if low_precision else 1e-3) * float(v.abs().max()) + 1e-6
    if float((pred - v.to(pred.device)).abs().max()) > tol:
        raise CacheError(
            "the cache does not match this model's weights (layer 0 values differ from W_V applied to "
            "the cached embeddings): it was made by another model"
        )


def _real_mask(view: ModelView, tokens: Tensor) -> Tensor:
    """Padding read from the pad token, in a batch of several rows (a single row is never padded).

    Right padding: trailing pad tokens in rows shorter than the longest one. Left padding: leading
    pad tokens; when the BOS token is the pad token and the model prepends it, the last of them is
    the BOS and is real (TransformerLens's rule). Pass ``attention_mask`` where this is ambiguous
    (a prompt that really ends with the pad token, say).
    """
    real = torch.ones_like(tokens, dtype=torch.bool)
    tokenizer = getattr(view.model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None or tokens.shape[0] < 2:
        return real
    ends_in_pad = tokens[:, -1] == pad
    if bool(ends_in_pad.any()) and not bool(ends_in_pad.all()):
        for b in torch.nonzero(ends_in_pad).flatten().tolist():
            row = tokens[b]
            n = row.shape[0]
            while n > 0 and int(row[n - 1]) == pad:
                n -= 1
            real[b, n:] = False
        return real
    bos_is_pad = getattr(tokenizer, "bos_token_id", None) == pad and bool(getattr(view.cfg, "default_prepend_bos", True))
    leading = []
    for row in tokens:
        run = 0
        while run < len(row) and int(row[run]) == pad:
            run += 1
        leading.append(max(run - 1, 0) if bos_is_pad else run)
    if any(leading) and not all(leading):
        for b, count in enumerate(leading):
            real[b, :count] = False
    return real


def read_inputs(
    view: ModelView,
    cache: Any,
    *,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> RunInputs:
    """Tokens, padding mask and string tokens of the run that made ``cache``."""
    if "hook_embed" not in cache:
        raise CacheError("the cache has no 'hook_embed'; dpa_lens needs it to read the input tokens")
    embed = cache["hook_embed"]
    if embed.ndim != 3 or embed.shape[-1] != view.d_model:
        raise CacheError(
            f"cache['hook_embed'] has shape {tuple(embed.shape)}, expected [batch, pos, d_model={view.d_model}]: "
            "the cache is from another model, or was made with remove_batch_dim=True (not supported)"
        )
    if "embed.hook_in" in cache and cache["embed.hook_in"].shape == embed.shape[:2]:
        found = cache["embed.hook_in"].long()
        rows = view.W_E[found.to(view.W_E.device)].float() * view.embed_scale
        if not torch.allclose(rows, embed.float().to(view.W_E.device), rtol=1e-3, atol=1e-5 * view.embed_scale):
            raise CacheError("the cache's hook_embed does not match this model's embedding matrix: cache from another model")
    else:
        found = _recover_tokens(view, embed)
    if tokens is not None:
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tuple(tokens.shape) != tuple(embed.shape[:2]):
            raise CacheError(
                f"tokens have shape {tuple(tokens.shape)} but the cache holds a run on {tuple(embed.shape[:2])}: "
                "the cache is from another input"
            )
        given = tokens.to(found.device).long()
        same = view.W_E[given.to(view.W_E.device)].float() == view.W_E[found.to(view.W_E.device)].float()
        if not bool(same.all()):
            raise CacheError("the tokens passed differ from the tokens the cache was made from (another input)")
        found = given
    return inputs_from_tokens(view, found, attention_mask)


def inputs_from_tokens(view: ModelView, tokens: Tensor, attention_mask: Tensor | None = None) -> RunInputs:
    """`RunInputs` of token ids; padding from ``attention_mask``, else read from the pad token."""
    tokens = tokens.cpu()
    if attention_mask is not None:
        real = torch.as_tensor(attention_mask).bool().cpu()
        if real.ndim == 1:
            real = real[None]
        if tuple(real.shape) != tuple(tokens.shape):
            raise ValueError(f"attention_mask has shape {tuple(real.shape)}, the tokens {tuple(tokens.shape)}")
    else:
        real = _real_mask(view, tokens)
    tokenizer = getattr(view.model, "tokenizer", None)
    if tokenizer is not None:
        str_tokens = [[tokenizer.decode([int(t)]) for t in row] for row in tokens]
    else:
        str_tokens = [[f"#{int(t)}" for t in row] for row in tokens]
    return RunInputs(tokens=tokens, real=real, str_tokens=str_tokens)


def prepare_tokens(
    model: Any, text: Any, attention_mask: Tensor | None = None, padding_side: str | None = None
) -> tuple[Tensor, Tensor | None]:
    """Token ids on the model's device, and an attention mask where rows were padded.

    Strings are tokenized one by one as ``model.to_tokens`` does, then padded on
    ``padding_side`` (default: the tokenizer's), so each row is exactly its own tokenization.
    Token tensors are used as they are; pass ``attention_mask`` for left-padded ones.
    """
    device = model.cfg.device
    if isinstance(text, str):
        text = [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        rows = [model.to_tokens(t)[0].cpu() for t in text]
        n = max(len(r) for r in rows)
        if all(len(r) == n for r in rows):
            return torch.stack(rows).to(device), None
        side = padding_side or getattr(model.tokenizer, "padding_side", "right") or "right"
        pad = model.tokenizer.pad_token_id
        tokens = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(0, len(r)) if side == "right" else slice(n - len(r), n)
            tokens[i, cols], mask[i, cols] = r, 1
        return tokens.to(device), mask.to(device)
    tokens = torch.as_tensor(text)
    if tokens.dtype.is_floating_point or tokens.ndim not in (1, 2):
        raise ValueError(f"expected a string, a list of strings or token ids [batch, pos], got {type(text).__name__}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    return tokens.to(device), (None if attention_mask is None else torch.as_tensor(attention_mask).to(device))


def resolve_positions(position: Any, inputs: RunInputs) -> Int[Tensor, " batch"]:
    """Answer position per row.

    Negative positions count back from each row's last real token (``-1``, the default, is the
    last real token whatever the padding); non-negative positions index the padded sequence as
    it was run. A list or tensor gives one position per row.
    """
    batch, n = inputs.batch, inputs.seq_len
    if isinstance(position, Tensor):
        position = position.tolist()
    if isinstance(position, (list, tuple)):
        if len(position) != batch:
            raise ValueError(f"{len(position)} positions for a batch of {batch}")
        values = list(position)
    else:
        values = [position] * batch
    out = []
    last_real = [int(torch.nonzero(row).max()) if bool(row.any()) else n - 1 for row in inputs.real]
    for b, p in enumerate(values):
        if isinstance(p, bool) or not isinstance(p, int):
            raise ValueError(f"position must be an int (or one per row), got {p!r}")
        q = last_real[b] + 1 + p if p < 0 else p
        if not 0 <= q < n:
            raise ValueError(f"position {p} is out of range for row {b} ({last_real[b] + 1} real tokens, {n} in all)")
        if not bool(inputs.real[b, q]):
            raise ValueError(f"position {p} of row {b} is a padding token")
        out.append(q)
    return torch.tensor(out, dtype=torch.long)
