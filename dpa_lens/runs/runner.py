"""`attribute_dataset`: any registered method over a dataset of records, in batches, resumable, in one
process or several (see `dpa_lens.runs` for the folder it writes)."""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from dpa_lens.errors import DpaLensError, InputError
from dpa_lens.methods.registry import MethodSpec, checked_options, get_method, run
from dpa_lens.models.tl import locked
from dpa_lens.progress import progress_bar
from dpa_lens.runs.distributed import Processes
from dpa_lens.runs.records import Prepared, Record, Skip, batch_tokens, batches, prepare, read_records
from dpa_lens.runs.store import DatasetResults, Store, load_results, options_key
from dpa_lens.types import TLModel


def run_identity(method: str, options: Mapping[str, Any], position: int, model_name: str) -> dict[str, Any]:
    """What a resumed run must share with the run whose folder it continues."""
    return {"method": method, "options": options_key(options), "position": position, "model_name": model_name}


@locked
def attribute_dataset(
    model: TLModel,
    method: str,
    records: str | os.PathLike | Iterable[Mapping[str, Any] | Record],
    out: str | os.PathLike,
    *,
    batch_size: int = 8,
    position: int = -1,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    **options: Any,
) -> DatasetResults:
    """Run ``method`` on every record and keep each record's result on disk, in ``out``.

    Args:
        method: any registered method (`dpa_lens.available_methods`), node or edge.
        records: a ``.jsonl`` file of records, or an iterable of dicts (``{"id", "prompt", "target",
            "corrupted"}``; see `dpa_lens.runs.records`).
        out: the run's folder (made if missing). Running the same call again resumes: records whose
            results are on disk are skipped; a folder of a run with other settings is refused.
        batch_size: records per forward (records of similar length are batched together; each
            batch is one shard, so a killed run loses at most the batch it was computing).
        position: the answer position of every record (default: its last token).
        progress: a progress bar (records/s) on the first process.
        rank, world_size: this process among several; default: torchrun's environment, or one process.
            Records are dealt round-robin by their place in the dataset; every process writes its own shards.
        options: the method's own options (as for `dpa_lens.run`).

    Returns:
        `load_results(out)`: the records written (by every process), their mean, a table.

    A record that cannot be attributed (a target of two tokens, a prompt longer than the context, a
    corrupted prompt of another length, an error of the method on it alone) is skipped, its id and
    the reason listed in ``skipped`` (and warned about), and the run goes on.
    """
    spec = get_method(method)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(position, bool) or not isinstance(position, int):
        raise InputError(f"position must be an int (the same answer position for every record), got {position!r}")
    checked_options(spec, options)
    identity = run_identity(spec.name, options, position, str(getattr(model.cfg, "model_name", "")))
    store = Store(out)
    all_records, unreadable = read_records(records)
    procs = Processes.start(rank, world_size)
    try:
        # the folder checked by one process, before any writes it: the others learn its verdict
        refused = None
        if procs.rank == 0 or not procs.grouped:
            try:
                store.check(identity)
            except InputError as err:
                refused = str(err)
        refused = procs.broadcast(refused)
        if refused is not None:
            raise InputError(refused)
        alone = not procs.grouped  # one process, or ranks started by hand: each keeps the manifest itself
        if procs.rank == 0 or alone:
            store.begin(identity, clean=procs.world == 1 or procs.grouped, records=len(all_records) + len(unreadable),
                        processes=procs.world, batch_size=batch_size)
        if procs.rank == 0:
            store.write_skipped(0, unreadable)
        procs.barrier()
        done = store.written()
        _refuse_changed(all_records, done, store, spec.takes_corrupted)
        mine = [r for r in all_records if procs.owns(r.index) and r.id not in done]
        skipped = list(unreadable) if procs.rank == 0 else []
        _work(model, spec, mine, all_records, store, procs, skipped, batch_size=batch_size, position=position, progress=progress, options=options)
        procs.barrier()
        if procs.rank == 0 or alone:
            manifest = store.finish(processes=procs.world, batch_size=batch_size)
            if manifest["skipped"] and procs.rank == 0:
                first = manifest["skipped"][0]
                warnings.warn(f"attribute_dataset: {len(manifest['skipped'])} record(s) skipped (first: {first['id']}: "
                              f"{first['reason']}); their list is in .skipped", UserWarning, stacklevel=2)
        procs.barrier()
    finally:
        procs.stop()
    return load_results(out)


def _refuse_changed(records: list[Record], done: Mapping[str, tuple[str, str, str | None]], store: Store, corrupted: bool) -> None:
    """A record whose id is written with another prompt, target or corrupted prompt (``corrupted``: which the
    method reads): the folder is of other data."""
    changed = [r.id for r in records
               if r.id in done and done[r.id] != (r.prompt, r.target_json(), r.corrupted if corrupted else None)]
    if changed:
        raise InputError(f"{store.directory} holds results for id {changed[0]!r} (and {len(changed) - 1} more) computed on another "
                         "prompt, target or corrupted prompt: ids name records, so pass another folder for other data")


def _work(model: TLModel, spec: MethodSpec, mine: list[Record], all_records: list[Record], store: Store, procs: Processes,
          skipped: list[Skip], *,
          batch_size: int, position: int, progress: bool, options: Mapping[str, Any]) -> None:
    """This process's records: read with the tokenizer, batched by length, attributed, written a shard a batch."""
    prepared: list[Prepared] = []
    # a method that can compare with a corrupted prompt (contrastive DPA edges) does so for every record or none:
    # for every record when any record of the dataset has one (the same quantity in every shard, one mean)
    contrastive = spec.contrast is not None and any(r.corrupted is not None for r in all_records)
    for record in mine:
        got = prepare(model, record, needs_target=spec.target, needs_corrupted=spec.input == "pair" or contrastive,
                      takes_corrupted=spec.takes_corrupted)
        (prepared if isinstance(got, Prepared) else skipped).append(got)
    if skipped:
        store.write_skipped(procs.rank, skipped)
    bar = progress_bar(total=len(prepared), unit="record", desc=spec.name, disable=not progress or procs.rank != 0,
                       dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in batches(prepared, batch_size):
            results, failed = _attribute(model, spec, batch, position, options)
            for part, result in results:
                store.write_shard(result, [p.record for p in part], _real_tokens(model, part, result))
            results = result = None  # on disk now: not held while the next batch runs
            _release_memory()
            if failed:
                skipped += failed
                store.write_skipped(procs.rank, skipped)
            bar.update(len(batch))
            bar.set_postfix(skipped=len(skipped), refresh=False)
    finally:
        bar.close()


def _attribute(model: TLModel, spec: MethodSpec, batch: list[Prepared], position: int,
               options: Mapping[str, Any]) -> tuple[list[tuple[list[Prepared], Any]], list[Skip]]:
    """The results of a batch, as (records, result) parts: the batch at once, or, when it fails on some record,
    each record alone so that only the records that fail are skipped."""
    try:
        return [(batch, _call(model, spec, batch, position, options))], []
    except DpaLensError as err:
        if len(batch) == 1:
            record = batch[0].record
            return [], [Skip(record.id, f"{type(err).__name__}: {err}", record.index)]
    parts, failed = [], []
    for one in batch:
        got, why = _attribute(model, spec, [one], position, options)
        parts += got
        failed += why
    return parts, failed


def _release_memory() -> None:
    """Hand the memory a batch freed back to the operating system (glibc keeps it otherwise, and the peak of a long
    run creeps up with the number of batches); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _real_tokens(model: TLModel, batch: list[Prepared], result: Any) -> Any:
    """``[batch, pos]``: True at the real tokens of the batch as the method ran it (its padding cut from the shard)."""
    import torch

    tokens, mask = batch_tokens(model, [p.tokens for p in batch])
    if tokens.shape[-1] != result.seq_len:  # a result without positions (whole-unit scores only): nothing to cut
        return None
    return torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool()


def _call(model: TLModel, spec: MethodSpec, batch: list[Prepared], position: int, options: Mapping[str, Any]) -> Any:
    """`run` on a batch, given the token ids its records were read into (`prepare`), not their text, where it can take
    them: a batch without padding, and a padded one with its attention mask for methods that run the model themselves.
    A cache method's padded batch goes as text (`run` makes its cache from the prompts: it takes no attention mask)."""
    records = [p.record for p in batch]
    targets = [r.target for r in records] if spec.target else None
    with_corrupted = spec.takes_corrupted and records[0].corrupted is not None
    if with_corrupted and any(r.corrupted is None for r in records):
        raise InputError("records of one batch either all have a corrupted prompt or none")  # pragma: no cover - batched apart
    prompts, mask = batch_tokens(model, [p.tokens for p in batch])
    corrupted = batch_tokens(model, [p.corrupted_tokens for p in batch])[0] if with_corrupted else None
    if mask is not None and (spec.input == "cache" or "attention_mask" in options):
        prompts = [r.prompt for r in records]
        corrupted = [r.corrupted for r in records] if with_corrupted else None
    elif mask is not None:
        options = {**options, "attention_mask": mask}
    return run(spec.name, model, prompts, targets, corrupted=corrupted, position=position, progress=False, **options)
