"""What was run: the tokens behind a cache, which of them are padding, and the answer positions.

A TransformerLens ``ActivationCache`` does not keep the input tokens. dpa_lens reads them from the
cache (``embed.hook_in`` on the bridge, else by matching ``hook_embed`` rows to ``W_E``), which also
proves the cache came from this model; tokens passed by the user are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from dpa_lens.errors import CacheError, InputError, PairError
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.types import typechecked


@typechecked
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

    def rows(self, index: Tensor) -> RunInputs:
        """The inputs of some rows (``index`` may repeat rows, e.g. one per integration step)."""
        return RunInputs(self.tokens[index.to(self.tokens.device)], self.real[index.to(self.real.device)],
                         [self.str_tokens[i] for i in index.tolist()])


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


@typechecked
def leading_bos(model: Any, tokens: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """True at each row's first real token when it is the tokenizer's BOS (all False without one)."""
    out = torch.zeros(tokens.shape, dtype=torch.bool)
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    if bos is None:
        return out
    first = real.long().cpu().argmax(-1)
    rows = torch.arange(tokens.shape[0])
    out[rows, first] = (tokens.cpu()[rows, first] == bos) & real.cpu()[rows, first]
    return out


def read_inputs(
    view: ModelView,
    cache: Any,
    *,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
) -> RunInputs:
    """Tokens, padding mask and string tokens of the run that made ``cache``."""
    if not hooks.cached(cache, hooks.EMBED):
        raise CacheError(f"the cache has no {hooks.EMBED!r}; dpa_lens needs it to read the input tokens")
    embed = cache[hooks.EMBED]
    if embed.ndim != 3 or embed.shape[-1] != view.d_model:
        raise CacheError(
            f"cache['hook_embed'] has shape {tuple(embed.shape)}, expected [batch, pos, d_model={view.d_model}]: "
            "the cache is from another model, or was made with remove_batch_dim=True (not supported)"
        )
    if hooks.cached(cache, hooks.TOKENS) and cache[hooks.TOKENS].shape == embed.shape[:2]:
        found = cache[hooks.TOKENS].long()
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
            raise InputError(f"attention_mask has shape {tuple(real.shape)}, the tokens {tuple(tokens.shape)}")
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
    Token tensors are used as they are; pass ``attention_mask`` for left-padded ones. A prompt longer
    than the model's context, empty token ids, or ids outside the vocabulary are an `InputError`
    (``model.to_tokens`` would cut a long prompt to its first ``n_ctx`` tokens, and the answer explained
    would be another token's).
    """
    device = model.cfg.device
    if hasattr(text, "keys") and hasattr(text, "__getitem__") and not isinstance(text, Tensor):
        raise InputError(f"expected a prompt (a string, a list of strings or token ids), got a {type(text).__name__}; "
                         "methods that run the model take prompts (a clean cache goes in clean_cache=...)")
    if isinstance(text, str):
        text = [text]
    if isinstance(text, (list, tuple)) and not text:
        raise InputError("the list of prompts is empty")
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        rows = [model.to_tokens(t, truncate=False)[0].cpu() for t in text]
        _check_length(model, max(len(r) for r in rows), "prompt")
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
    try:
        tokens = torch.as_tensor(text)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"expected a string, a list of strings or token ids [batch, pos], got {type(text).__name__}") from None
    if tokens.dtype.is_floating_point or tokens.ndim not in (1, 2):
        raise InputError(f"expected a string, a list of strings or token ids [batch, pos], got {type(text).__name__}")
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.shape[-1] == 0 or tokens.shape[0] == 0:
        raise InputError(f"the token ids are empty (shape {tuple(tokens.shape)}): pass at least one token per row")
    vocab = getattr(model.cfg, "d_vocab", None)
    if tokens.numel() and (int(tokens.min()) < 0 or (vocab is not None and int(tokens.max()) >= vocab)):
        raise InputError(f"token ids must be in [0, {vocab}) (the model's vocabulary), got ids from {int(tokens.min())} to "
                         f"{int(tokens.max())}")
    _check_length(model, tokens.shape[-1], "input")
    return tokens.to(device), (None if attention_mask is None else torch.as_tensor(attention_mask).to(device))


def _check_length(model: Any, n: int, what: str) -> None:
    """`InputError` when ``n`` tokens are more than the model's context."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if isinstance(n_ctx, int) and n > n_ctx:
        raise InputError(f"the {what} is {n} tokens long and the model's context is {n_ctx}: shorten it (the model would "
                         f"read only its first {n_ctx} tokens, and the answer explained would be another token's)")


def prepare_pair(
    model: Any, view: ModelView, clean: Any, corrupted: Any, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, RunInputs, RunInputs]:
    """Tokens of a clean/corrupted pair; they must align position by position."""
    clean_tok, clean_mask = prepare_tokens(model, clean, attention_mask)
    corr_tok, corr_mask = prepare_tokens(model, corrupted, attention_mask)
    if clean_tok.shape != corr_tok.shape:
        raise PairError(
            f"clean and corrupted inputs have different shapes ({tuple(clean_tok.shape)} vs "
            f"{tuple(corr_tok.shape)} tokens): patching needs them aligned position by position; "
            "choose corrupted prompts that tokenize to the same length"
        )
    mask = clean_mask if clean_mask is not None else corr_mask
    if clean_mask is not None and corr_mask is not None and not torch.equal(clean_mask, corr_mask):
        raise PairError("clean and corrupted inputs are padded differently; their real tokens must align")
    return clean_tok, corr_tok, mask, inputs_from_tokens(view, clean_tok, mask), inputs_from_tokens(view, corr_tok, mask)


@typechecked
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
            raise InputError(f"{len(position)} positions for a batch of {batch}")
        values = list(position)
    else:
        values = [position] * batch
    out = []
    last_real = [int(torch.nonzero(row).max()) if bool(row.any()) else n - 1 for row in inputs.real]
    for b, p in enumerate(values):
        if isinstance(p, bool) or not isinstance(p, int):
            raise InputError(f"position must be an int (or one per row), got {p!r}")
        q = last_real[b] + 1 + p if p < 0 else p
        if not 0 <= q < n:
            raise InputError(f"position {p} is out of range for row {b} ({last_real[b] + 1} real tokens, {n} in all)")
        if not bool(inputs.real[b, q]):
            raise InputError(f"position {p} of row {b} is a padding token")
        out.append(q)
    return torch.tensor(out, dtype=torch.long)
