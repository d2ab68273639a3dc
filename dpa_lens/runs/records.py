"""A dataset's records: what one line of a ``.jsonl`` file holds, read and checked.

A record is one JSON object per line::

    {"id": "ioi-0", "prompt": "When Mary and John went to the store, John gave a drink to",
     "target": [" Mary", " John"], "corrupted": "When Mary and John went to the store, Mary gave a drink to"}

``id`` names the record in the results (a string, unique in the file; a number is read as its
string). ``target`` is a token (``" Mary"`` or an id), a ``[correct, incorrect]`` pair (a logit
difference), or absent for methods that explain no target. ``corrupted`` is the corrupted prompt of
pair methods (AtP, patching, edge AtP) and of contrastive DPA edges. Other keys are kept aside.

`read_records` reads the structure (a line that is no JSON object, or lacks a prompt, is a `Skip`,
not an error); `prepare` reads each record with the model's tokenizer (a target of two tokens, a
prompt longer than the context, a corrupted prompt of another length are `Skip`s too) and keeps its token ids:
the run tokenizes each record once, `batch_tokens` pads a batch's rows as `dpa_lens.inputs.prepare_tokens` pads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpa_lens.errors import DpaLensError, InputError
from dpa_lens.targets import token_id

Target = str | int | tuple[str | int, str | int] | None


@dataclass(frozen=True)
class Record:
    """One prompt of a dataset, with what to explain (see the module docstring)."""

    id: str
    prompt: str
    target: Target = None
    corrupted: str | None = None
    index: int = 0  # its place in the dataset (0-based): the order `load_results` gives
    extra: Mapping[str, Any] = field(default_factory=dict)

    def target_json(self) -> str:
        """The target as the JSON text a record file holds (``null``, a token, or a pair)."""
        return json.dumps(list(self.target) if isinstance(self.target, tuple) else self.target)


@dataclass(frozen=True)
class Skip:
    """A record that is not attributed: its id (or ``line N`` when it has none) and why."""

    id: str
    reason: str
    index: int = -1

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "index": self.index, "reason": self.reason}


@dataclass(frozen=True)
class Prepared:
    """A record read with the model's tokenizer: its token ids ``[pos]`` (on the CPU) and its corrupted prompt's
    (None without one), read once for the whole run."""

    record: Record
    tokens: Tensor = field(repr=False, compare=False)
    corrupted_tokens: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def n_tokens(self) -> int:
        """Its length in tokens (the batching key)."""
        return int(self.tokens.shape[-1])


def read_records(source: str | os.PathLike | Iterable[Mapping[str, Any] | Record]) -> tuple[list[Record], list[Skip]]:
    """The records of a ``.jsonl`` file (or of an iterable of dicts or `Record`s), and the lines skipped.

    Refused (`InputError`): a file that cannot be read, ids that repeat (results are kept by id), and a
    source without one usable record. Skipped, with the reason: a line that is no JSON object, one
    without a ``prompt`` string, a ``target`` that is not a token or a pair, a ``corrupted`` that is not a string.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InputError(f"the records file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read the records file {path}: {err}") from None
        items: list[tuple[int, Any]] = []
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as err:
                    items.append((n, f"not JSON ({err.msg} at column {err.colno})"))
        where = f"in {path}"
    else:
        items = list(enumerate(source, 1))
        where = "in the records given"
    records, skipped = [], []
    for n, item in items:
        got = _record(item, index=len(records))
        (records if isinstance(got, Record) else skipped).append(got if isinstance(got, Record) else Skip(f"line {n}", got))
    _refuse_repeats(records, where)
    if not records:
        why = f" (first skipped: {skipped[0].id}: {skipped[0].reason})" if skipped else ""
        raise InputError(f"no usable record {where}{why}; a record is a JSON line with at least \"id\" and \"prompt\"")
    if skipped and len(skipped) == len(items):
        raise InputError(f"every record {where} was skipped (first: {skipped[0].id}: {skipped[0].reason})")
    return records, skipped


def _record(item: Any, index: int) -> Record | str:
    """A `Record`, or the reason the item is not one."""
    if isinstance(item, Record):
        return Record(item.id, item.prompt, item.target, item.corrupted, index, item.extra)
    if isinstance(item, str):
        return item  # the JSON error found while reading
    if not isinstance(item, Mapping):
        return f"a record is a JSON object, got {type(item).__name__}"
    rid = item.get("id")
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        return f"no \"id\" (a non-empty string or number), got {rid!r}"
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return f"record {rid!r}: no \"prompt\" (a non-empty string)"
    target = item.get("target")
    if isinstance(target, list):
        if len(target) != 2:
            return f"record {rid!r}: a target list is a [correct, incorrect] pair, got {len(target)} items"
        target = tuple(target)
    parts = target if isinstance(target, tuple) else (target,)
    if any(isinstance(t, bool) or not isinstance(t, (str, int, type(None))) for t in parts) or (isinstance(target, tuple) and None in parts):
        return f"record {rid!r}: a target is a token (a string or an id) or a [correct, incorrect] pair, got {item.get('target')!r}"
    corrupted = item.get("corrupted")
    if corrupted is not None and (not isinstance(corrupted, str) or not corrupted.strip()):
        return f"record {rid!r}: \"corrupted\" must be a non-empty string, got {corrupted!r}"
    extra = {k: v for k, v in item.items() if k not in ("id", "prompt", "target", "corrupted")}
    return Record(str(rid), prompt, target, corrupted, index, extra)


def _refuse_repeats(records: list[Record], where: str) -> None:
    seen: dict[str, int] = {}
    repeated = []
    for r in records:
        if r.id in seen:
            repeated.append(r.id)
        seen[r.id] = r.index
    if repeated:
        shown = ", ".join(repr(i) for i in list(dict.fromkeys(repeated))[:5])
        raise InputError(f"ids must be unique {where} (results are kept by id): {len(set(repeated))} repeat, e.g. {shown}")


def prepare(model: Any, record: Record, *, needs_target: bool, needs_corrupted: bool, takes_corrupted: bool) -> Prepared | Skip:
    """`record` read with the model's tokenizer, or why it cannot be attributed (a `Skip`). ``needs_corrupted``: a
    record without a corrupted prompt is skipped; ``takes_corrupted`` False: its corrupted prompt is ignored."""
    from dpa_lens.inputs import prepare_tokens

    def skip(reason: str) -> Skip:
        return Skip(record.id, reason, record.index)

    if needs_target and record.target is None:
        return skip("no \"target\": the method explains one (a token, or a [correct, incorrect] pair)")
    if needs_corrupted and record.corrupted is None:
        return skip("no \"corrupted\" prompt: the method compares a clean and a corrupted prompt")
    if not takes_corrupted:  # a method that takes none ignores it: one records file serves every method
        record = replace(record, corrupted=None)
    try:
        for t in record.target if isinstance(record.target, tuple) else (record.target,):
            if t is not None:
                token_id(model, t, model.cfg.d_vocab)
        tokens, _ = prepare_tokens(model, record.prompt)
        corrupted = None
        if record.corrupted is not None:
            corrupted, _ = prepare_tokens(model, record.corrupted)
            if corrupted.shape != tokens.shape:
                return skip(f"the corrupted prompt is {corrupted.shape[-1]} tokens, the prompt {tokens.shape[-1]}: "
                            "they must align position by position")
    except DpaLensError as err:
        return skip(str(err))
    return Prepared(record, tokens[0].cpu(), None if corrupted is None else corrupted[0].cpu())


def batch_tokens(model: Any, rows: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Token id rows ``[pos]`` of a batch as `dpa_lens.inputs.prepare_tokens` makes them from their prompts (on the CPU):
    stacked, or padded on the tokenizer's side with the pad token, and the attention mask of padded rows (else None)."""
    n = max(len(r) for r in rows)
    if all(len(r) == n for r in rows):
        return torch.stack(rows), None
    side = getattr(model.tokenizer, "padding_side", "right") or "right"
    tokens = torch.full((len(rows), n), model.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(0, len(r)) if side == "right" else slice(n - len(r), n)
        tokens[i, cols], mask[i, cols] = r, 1
    return tokens, mask


def batches(prepared: list[Prepared], batch_size: int) -> list[list[Prepared]]:
    """Records grouped by length (shortest first), ``batch_size`` a group: little padding in each batch.
    Records with a corrupted prompt and records without one are never in one batch."""
    out = []
    for with_corrupted in (False, True):
        group = sorted((p for p in prepared if (p.record.corrupted is not None) == with_corrupted),
                       key=lambda p: (p.n_tokens, p.record.index))
        out += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return out
