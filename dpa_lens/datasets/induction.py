"""A 2-layer model with a known induction circuit, and the repeated sequences it was trained on.

The model (``data/induction_2l``, trained by ``scripts/train_induction.py``) is a GPT-2 block
stack: 2 layers, 4 heads of 32, ``d_model`` 128, LayerNorm, fixed sinusoidal positions (32), the
tiny test tokenizer (445 ids, BOS = 0). Its MLP output projections are zero, so it is
attention-only: every MLP adds exactly 0 to the residual stream.

It was trained on `sample_repeats` rows (BOS, then distinct random ids from `TOKEN_IDS`, with a
segment copied to a random later place) and learned the textbook circuit: a previous-token head in
layer 0 (`PREVIOUS_TOKEN_HEAD`) whose output the induction head in layer 1 (`INDUCTION_HEAD`) reads
through its **key** (K-composition); on the repeat, the induction head attends to the token after
the earlier occurrence of the current token and copies it.

    model = induction_model()                          # TransformerLens, either line
    data = repeated_tokens(model, n_prompts=8)         # tokens [8, 24], starts, length
    roles = head_roles(model, data)                    # previous_token / induction [layer, head]
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Any

import torch
from torch import Tensor

MODEL_FOLDER = "induction_2l"
TOKEN_IDS = range(1, 129)  # the ids the model was trained on; the others never occurred
N_POSITIONS = 32
PREVIOUS_TOKEN_HEAD = (0, 3)  # (layer, head)
INDUCTION_HEAD = (1, 2)


@dataclass(frozen=True)
class RepeatedTokens:
    """Sequences in which the segment ``tokens[r, starts[r, 0] : starts[r, 0] + length[r]]`` recurs.

    Copy ``j`` of row ``r`` starts at ``starts[r, j]`` (increasing, copies never overlap); all
    other tokens are random.

    Attributes:
        tokens: ``[n, seq_len]`` token ids, BOS at position 0.
        starts: ``[n, copies]`` where each copy of the segment starts (``starts[:, 0] >= 1``).
        length: ``[n]`` segment length.
    """

    tokens: Tensor
    starts: Tensor
    length: Tensor

    @property
    def first(self) -> Tensor:
        """``[n]`` start of the segment's first occurrence."""
        return self.starts[:, 0]

    @property
    def second(self) -> Tensor:
        """``[n]`` start of its first repeat."""
        return self.starts[:, 1]

    def pairs(self, predictable: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Every repeated token with its previous occurrence, flattened over rows and copies.

        Returns ``(rows, later, earlier)``, each ``[N]``: the token at ``(rows, later)`` repeats
        the one at ``(rows, earlier)`` (in the copy before). An induction head at query ``later``
        attends to key ``earlier + 1``. With ``predictable=True`` the last token of each copy is
        left out, so that the token after ``later`` is ``tokens[rows, earlier + 1]``, the one an
        induction head predicts (``N = sum((copies - 1) * (length - 1))``).
        """
        rows, later, earlier = [], [], []
        for r, (starts, n) in enumerate(zip(self.starts.tolist(), self.length.tolist())):
            i = torch.arange(n - 1 if predictable else n)
            for before, after in zip(starts[:-1], starts[1:]):
                rows.append(torch.full_like(i, r))
                later.append(after + i)
                earlier.append(before + i)
        return torch.cat(rows), torch.cat(later), torch.cat(earlier)

    def to(self, device: Any) -> RepeatedTokens:
        return RepeatedTokens(self.tokens.to(device), self.starts.to(device), self.length.to(device))


def sample_repeats(
    n: int,
    seq_len: int,
    segment: int | tuple[int, int],
    vocab_size: int,
    *,
    copies: int = 2,
    bos_id: int = 0,
    distinct: bool = True,
    generator: torch.Generator | None = None,
) -> RepeatedTokens:
    """``n`` rows of BOS + random tokens, in which a random segment occurs ``copies`` times.

    Args:
        n: number of rows.
        seq_len: tokens per row, BOS included.
        segment: the segment length, or an inclusive range ``(lo, hi)`` drawn from per row.
        vocab_size: token ids are drawn from ``range(vocab_size)`` without ``bos_id``.
        copies: how many times the segment occurs in each row (2: once, then a repeat).
        bos_id: the id at position 0 (never drawn elsewhere).
        distinct: draw the random tokens of a row without replacement, so that the copies of the
            segment are its only repetitions; otherwise independently (with chance repeats).
        generator: the random source (``scripts/train_induction.py`` trains on this sampler:
            changing how it draws changes the weights that script reproduces).

    Copy ``j`` starts uniformly at random among the places that leave room for the copies after
    it, so neither where the segment starts nor how far back its previous copy lies is fixed.
    """
    lo, hi = (segment, segment) if isinstance(segment, int) else segment
    if not 1 <= lo <= hi or copies < 1 or copies * hi > seq_len - 1:
        raise ValueError(f"{copies} copies of {lo}..{hi} tokens do not fit after a BOS in {seq_len} tokens")
    ids = torch.tensor([i for i in range(vocab_size) if i != bos_id])
    if distinct:
        if seq_len - 1 > len(ids):
            raise ValueError(f"{seq_len - 1} distinct tokens cannot be drawn from {len(ids)} ids")
        order = torch.rand(n, len(ids), generator=generator).argsort(dim=1)[:, : seq_len - 1]
    else:
        order = torch.randint(len(ids), (n, seq_len - 1), generator=generator)
    tokens = torch.cat([torch.full((n, 1), bos_id), ids[order]], dim=1)
    length = torch.randint(lo, hi + 1, (n,), generator=generator)
    starts = torch.empty(n, copies, dtype=torch.long)
    for r, size in enumerate(length.tolist()):
        earliest = 1
        for j in range(copies):  # copy j starts anywhere that leaves room for the copies after it
            latest = seq_len - (copies - j) * size
            starts[r, j] = int(torch.randint(earliest, latest + 1, (), generator=generator))
            earliest = int(starts[r, j]) + size
        for start in starts[r, 1:].tolist():
            tokens[r, start : start + size] = tokens[r, starts[r, 0] : starts[r, 0] + size]
    return RepeatedTokens(tokens, starts, length)


def repeated_tokens(model: Any, n_prompts: int = 8, segment: int = 8, seq_len: int = 24, seed: int = 0) -> RepeatedTokens:
    """Seeded `sample_repeats` rows for the induction model: ids from `TOKEN_IDS`, its tokenizer's BOS.

    Returns `RepeatedTokens` with ``tokens [n_prompts, seq_len]`` on the model's device, BOS
    first (pass them to ``run_with_cache`` as they are: no BOS is added to a tensor), ``starts
    [n_prompts, 2]`` and ``length [n_prompts]``. ``seq_len`` is at most `N_POSITIONS`.
    """
    if seq_len > N_POSITIONS:
        raise ValueError(f"the induction model has {N_POSITIONS} positions; seq_len={seq_len}")
    bos = model.tokenizer.bos_token_id
    gen = torch.Generator().manual_seed(seed)
    data = sample_repeats(n_prompts, seq_len, segment, TOKEN_IDS.stop, bos_id=bos, generator=gen)
    return data.to(model.cfg.device)


def segment_losses(logits: Tensor, data: RepeatedTokens) -> tuple[Tensor, Tensor]:
    """Mean next-token loss on the segment's first occurrence and on its repeat.

    Args:
        logits: ``[n, seq_len, vocab]`` for ``data.tokens``.

    Returns:
        ``(first, repeat)``, scalars: the cross-entropy of predicting segment tokens 2..length
        from the tokens before them, in the first occurrence (unpredictable: about
        ``log(vocab_size)``) and in the repeat (copyable by induction).
    """
    logp = logits.float().log_softmax(-1)
    rows, later, earlier = data.pairs(predictable=True)
    rows, later, earlier = rows.to(logp.device), later.to(logp.device), earlier.to(logp.device)
    nxt = data.tokens.to(logp.device)
    first = -logp[rows, earlier, nxt[rows, earlier + 1]].mean()
    repeat = -logp[rows, later, nxt[rows, later + 1]].mean()
    return first, repeat


@dataclass(frozen=True)
class HeadRoles:
    """Attention-pattern scores of every head, each ``[n_layers, n_heads]`` in ``[0, 1]``.

    ``previous_token``: mean attention from position ``i`` to ``i - 1`` (``i >= 1``).
    ``induction``: mean attention from a repeated token to the token after its earlier occurrence.
    """

    previous_token: Tensor
    induction: Tensor

    def top(self, role: str) -> tuple[int, int]:
        """``(layer, head)`` of the head with the highest ``role`` score."""
        scores = getattr(self, role)
        layer, head = divmod(int(scores.argmax()), scores.shape[1])
        return layer, head


def head_roles(model: Any, data: RepeatedTokens) -> HeadRoles:
    """Previous-token and induction scores of every head, from the patterns of one ``run_with_cache``."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens, names_filter=lambda name: name in names)
    rows, later, earlier = data.pairs()
    prev, ind = [], []
    for name in names:
        pattern = cache[name].float().cpu()  # [batch, head, query, key]
        prev.append(pattern.diagonal(offset=-1, dim1=2, dim2=3).mean(dim=(0, 2)))  # [head]
        ind.append(pattern[rows, :, later, earlier + 1].mean(dim=0))  # [N, head] -> [head]
    return HeadRoles(torch.stack(prev), torch.stack(ind))


def induction_hf() -> tuple[Any, Any]:
    """The committed model as a ``transformers`` ``GPT2LMHeadModel`` (eval mode) and its tokenizer."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    folder = str(files("dpa_lens.datasets") / "data" / MODEL_FOLDER)
    hf_model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    return hf_model.eval(), AutoTokenizer.from_pretrained(folder)


def induction_model(line: Any = None, **kwargs: Any) -> Any:
    """The committed model wrapped by ``dpa_lens.load_model`` (``line``: ``"bridge"``, ``"hooked"`` or None)."""
    from dpa_lens.models.load import load_model

    hf_model, tok = induction_hf()
    return load_model(hf_model, tokenizer=tok, line=line, **kwargs)
