"""A dataset run's folder: Parquet shards of per-record results and a manifest, and reading them back.

::

    DIR/manifest.json                    the run: method, options, model; records written and skipped
    DIR/shards/part-00000042.parquet     one batch's records, one table row each (named by its first record)
    DIR/skipped-r0.json                  the records process 0 could not attribute, with the reason

Every file is written atomically (`dpa_lens.files.write_atomic`): a killed run leaves whole shards
and at most a hidden temporary file, and a second run of the same command skips the records whose
shard exists, so no id is written twice. A shard is a Parquet table (`dpa_lens.results.table`: one row
per record, its scores as list columns, ``id``, ``index``, ``prompt``, ``record_target`` (JSON), ``corrupted`` beside
them) that pandas, polars or duckdb read directly.

`load_results(DIR)` gives a `DatasetResults`: its ``ids``, ``mean()`` computed one shard at a time
(memory bounded by a shard, not by the dataset), ``to_pandas()``, and any record's result by id.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_lens.errors import InputError
from dpa_lens.files import write_atomic, write_text_atomic
from dpa_lens.results import Attribution, Circuit
from dpa_lens.runs.records import Record, Skip

FORMAT, VERSION = "dpa_lens_dataset", 1
IDENTITY = ("method", "options", "position", "model_name")  # what a resumed run must share with the folder's
Result = Attribution | Circuit


def _pq() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise InputError("dataset runs store Parquet files: pip install pyarrow") from None
    return pq


def options_key(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as the manifest keeps them: JSON values as they are, anything else by its repr."""
    return json.loads(json.dumps(dict(options), sort_keys=True, default=repr))


class Store:
    """The folder of one dataset run, as the runner writes it."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()
        self.shards = self.directory / "shards"

    # ------------------------------------------------------------------ before any work
    def check(self, identity: Mapping[str, Any], keys: Sequence[str] = IDENTITY) -> None:
        """`InputError` when the folder cannot hold this run: not a folder, not writable, or another run's
        (``keys``: the parts of the identity compared; the command line compares the model's once it is loaded)."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise InputError(f"the output {d} is a file; pass a folder (it will hold the run's shards and manifest)")
        parent = d if d.exists() else d.parent
        if not parent.is_dir():
            raise InputError(f"cannot write the run to {d}: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write the run to {d}: {parent} is not writable")
        manifest = self.manifest()
        if manifest is None:
            if d.is_dir() and any(p for p in d.iterdir() if not p.name.startswith(".")):
                raise InputError(f"{d} is not empty and holds no dpa_lens run (no manifest.json): pass a new or empty folder")
            return
        differ = [k for k in keys if manifest.get(k) != identity.get(k)]
        if differ:
            said = "; ".join(f"{k}: {manifest.get(k)!r} there, {identity.get(k)!r} now" for k in differ)
            raise InputError(f"{d} holds a run with other settings ({said}): pass another folder, or the same settings to resume it")

    def manifest(self) -> dict[str, Any] | None:
        """The manifest, or None where there is none yet."""
        path = self.directory / "manifest.json"
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"{path} cannot be read ({err}); was it edited by hand?") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InputError(f"{path} is not the manifest of a dpa_lens dataset run")
        if manifest.get("version") != VERSION:
            raise InputError(f"{path} is a dataset run of format version {manifest.get('version')}; this dpa_lens reads {VERSION}")
        return manifest

    def begin(self, identity: Mapping[str, Any], *, clean: bool = True, **facts: Any) -> None:
        """Make the folder and write the manifest of a run that starts (or resumes); ``clean``: delete a killed
        run's unfinished writes (hidden temporary files), when no other process of this run can be writing."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for folder in (self.directory, self.shards) if clean else ():
            for stale in folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        manifest = self.manifest() or {"format": FORMAT, "version": VERSION, **identity, "created": _now()}
        # the manifest first: a process checking the folder meanwhile sees it empty, or a run of its settings
        self._write_manifest({**manifest, **facts, "complete": False, "updated": _now()})
        self.shards.mkdir(exist_ok=True)

    # ------------------------------------------------------------------ during the run
    def written(self) -> dict[str, tuple[str, str, str | None]]:
        """Every record written so far: id → (prompt, target JSON, corrupted), read from the shards' own columns."""
        done: dict[str, tuple[str, str, str | None]] = {}
        for path in self.shard_paths():
            names = ("id", "prompt", "record_target", "corrupted")
            table = _read(path, columns=names)
            for rid, prompt, target, corrupted in zip(*(table.column(c).to_pylist() for c in names)):
                done[rid] = (prompt, target, corrupted)
        return done

    def shard_paths(self) -> list[Path]:
        """The shards written, in name order."""
        return sorted(self.shards.glob("part-*.parquet")) if self.shards.is_dir() else []

    def write_shard(self, result: Result, records: Sequence[Record], real: Any = None) -> Path:
        """One batch's results (rows in the order of ``records``; ``real [batch, pos]``: the run's real tokens,
        padding cut by it), atomically, named by its first record."""
        from dpa_lens.results.table import to_arrow

        columns = {"index": [r.index for r in records], "prompt": [r.prompt for r in records],
                   "record_target": [r.target_json() for r in records], "corrupted": [r.corrupted for r in records]}
        table = to_arrow(result, [r.id for r in records], columns, real=real)
        path = self.shards / f"part-{min(r.index for r in records):08d}.parquet"
        pq = _pq()
        # no dictionary encoding (scores repeat no values: trying it was 85 % of a shard's write) and statistics only of
        # the record columns (they let a reader find an id without reading the scores)
        options = {"use_dictionary": False, "write_statistics": ["id", "index"]}
        return write_atomic(path, lambda name: pq.write_table(table, name, **options), what="a shard of results", by_name=True)

    def write_skipped(self, rank: int, skipped: Sequence[Skip]) -> None:
        """The records process ``rank`` could not attribute (replacing its earlier list)."""
        text = json.dumps([s.as_dict() for s in skipped], indent=1)
        write_text_atomic(self.directory / f"skipped-r{rank}.json", text, what="the skipped records")

    def skipped(self) -> list[dict[str, Any]]:
        """Every process's skipped records, in dataset order."""
        out = []
        for path in sorted(self.directory.glob("skipped-r*.json")):
            try:
                out += json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise InputError(f"{path} cannot be read ({err})") from None
        return sorted(out, key=lambda s: s.get("index", -1))

    def finish(self, **facts: Any) -> dict[str, Any]:
        """The manifest once processes have finished: what was written and skipped; ``complete`` when that
        accounts for every record of the dataset."""
        ids = self.written()
        skipped = [s for s in self.skipped() if s["id"] not in ids]
        manifest = {**(self.manifest() or {}), **facts}
        complete = len(ids) + len({s["id"] for s in skipped}) >= manifest.get("records", 0)
        manifest.update(written=len(ids), skipped=skipped, shards=[p.name for p in self.shard_paths()], complete=complete,
                        updated=_now())
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: Mapping[str, Any]) -> None:
        write_text_atomic(self.directory / "manifest.json", json.dumps(manifest, indent=1, default=repr), what="the run's manifest")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read(path: Path, columns: Sequence[str] | None = None) -> Any:
    try:
        return _pq().read_table(path, columns=None if columns is None else list(columns))
    except Exception as err:  # an unreadable file where a shard should be: never a silent gap
        raise InputError(f"{path} is not a readable shard of results ({type(err).__name__}: {err}); "
                         "delete it and run the same command again to recompute its records") from None


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class DatasetResults:
    """The results of a dataset run in a folder (see `load_results`)."""

    directory: Path
    manifest: dict[str, Any]

    @property
    def store(self) -> Store:
        return Store(self.directory)

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def complete(self) -> bool:
        """Whether the run finished (False: killed or still running; run the same command to go on)."""
        return bool(self.manifest.get("complete"))

    @property
    def ids(self) -> list[str]:
        """The ids of the records written, in the dataset's order."""
        rows = []
        for path in self.store.shard_paths():
            table = _read(path, columns=["id", "index"])
            rows += zip(table.column("index").to_pylist(), table.column("id").to_pylist())
        return [rid for _, rid in sorted(rows)]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """The records not attributed: ``{"id", "index", "reason"}`` each."""
        written = set(self.ids)
        return [s for s in self.store.skipped() if s["id"] not in written]

    def __len__(self) -> int:
        return len(self.ids)

    def shards(self) -> Iterator[tuple[Result, list[str]]]:
        """Each shard's results and ids, one shard in memory at a time."""
        from dpa_lens.results.table import from_arrow

        for path in self.store.shard_paths():
            result, ids = from_arrow(_read(path))
            yield result, ids

    def mean(self, **kwargs: Any) -> Result:
        """The mean over every record written, computed one shard at a time: an `Attribution` for a node
        method, a `Circuit` for an edge method (the dataset's circuit), as ``concat(all).mean(**kwargs)``
        would give (per-position scores kept where the records align: one template's prompts)."""
        from dpa_lens.results.table import RunningMean

        acc = RunningMean(**kwargs)
        for result, _ in self.shards():
            acc.add(result)
        if acc.count == 0:
            raise InputError(f"{self.directory} holds no results yet")
        return acc.result()

    def result(self, ids: Sequence[str] | None = None) -> Result:
        """The results of ``ids`` (default: all) as one `Attribution` or `Circuit`, rows in the order asked
        (all of them in memory: use `mean` or `shards` for a large dataset)."""
        from dpa_lens.results.table import from_arrow

        wanted = None if ids is None else set(ids)
        parts: dict[str, Result] = {}
        for path in self.store.shard_paths():
            table = _read(path)
            for i, rid in enumerate(table.column("id").to_pylist()):
                if wanted is None or rid in wanted:
                    parts[rid] = from_arrow(table.slice(i, 1))[0]  # the row as it was alone (no other row's padding)
        order = list(ids) if ids is not None else self.ids
        missing = [rid for rid in order if rid not in parts]
        if missing:
            raise InputError(f"no result for id{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing[:5]))} in {self.directory}")
        if not order:
            raise InputError(f"{self.directory} holds no results yet")
        return type(parts[order[0]]).concat([parts[rid] for rid in order])

    def __getitem__(self, rid: str) -> Result:
        """One record's result, by id."""
        return self.result([rid])

    def to_pandas(self, columns: Sequence[str] | None = None) -> Any:
        """Every shard as one ``pandas.DataFrame``, a row per record in dataset order (``columns``: those only;
        ``id`` and ``index`` always). Scores are list columns; see `dpa_lens.results.table` for their layout."""
        import pandas as pd

        want = None if columns is None else list(dict.fromkeys(["id", "index", *columns]))
        frames = [_read(path, columns=want).to_pandas() for path in self.store.shard_paths()]
        if not frames:
            return pd.DataFrame(columns=want or ["id", "index"])
        return pd.concat(frames, ignore_index=True).sort_values("index").reset_index(drop=True)

    def __repr__(self) -> str:
        state = "complete" if self.complete else "incomplete"
        return (f"DatasetResults({str(self.directory)!r}, method={self.method!r}, {len(self)} records written, "
                f"{len(self.skipped)} skipped, {state})")


def load_results(directory: str | os.PathLike) -> DatasetResults:
    """The results of ``dpa_lens.attribute_dataset`` (or ``dpa-lens attribute``) in ``directory``::

        res = dpa_lens.load_results("runs/ioi_dpa")
        res.ids[:3], len(res), res.skipped
        attr = res.mean()              # Attribution (node methods) or Circuit (edge methods), streamed
        df = res.to_pandas(["target_value"])
        res["ioi-7"].show()
    """
    store = Store(directory)
    if not store.directory.is_dir():
        raise InputError(f"{store.directory} is not a folder of results")
    manifest = store.manifest()
    if manifest is None:
        raise InputError(f"{store.directory} has no manifest.json: it is not the folder of a dpa_lens dataset run")
    return DatasetResults(store.directory, manifest)
