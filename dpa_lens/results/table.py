"""Results as Arrow tables: one table row per result row (prompt), for Parquet files that pandas, DuckDB
or Polars read as they are, and that `from_arrow` turns back into the `Attribution` or `Circuit`.

Columns of `to_arrow` (format 1), in this order; a field the result does not hold has no column:

* ``id`` (string), then the ``columns`` given (``prompt``, say: as pyarrow infers them);
* each per-row tensor of the class's ``AXES`` (``tokens``, ``heads``, ``neurons``, ``head_totals``,
  ``neuron_totals``, ``head_keys``, ``flow``, ``token_ids``, ``mask``; a circuit's ``scores``,
  ``per_position``, ``nodes``): ``<field>``, the row's tensor flattened in C order as a list of its dtype
  (``list<float>``, ``list<double>``, ``list<int64>``, ``list<bool>``; ``large_list`` where a table's
  column holds 2³¹ numbers or more), and ``<field>__shape`` (``list<int32>``), its shape without the batch
  axis. A per-row number (``bias``, ``target_value``, ``positions``) is a plain scalar column instead;
* ``str_tokens`` (``list<string>``); ``paths`` (string: a JSON list of paths, each
  ``{"hops": [[node, label, position], ...], "score", "method", "source_token", "extra"}``); ``target``
  (string: the row's own target as JSON, per-row entries taken at the row, shared ones kept);
* ``diagnostics.<name>``: the `Diagnostics` a method reports, by the same rule (``diagnostics.clean_value``
  a scalar column, ``diagnostics.mlp_flow`` a list with ``diagnostics.mlp_flow__shape``), and
  ``diagnostics.corrupted_str_tokens`` (``list<string>``);
* ``effective_targets.<hook>`` (and ``__shape``): an attribution's effective targets ``[pos, d_model]``.

Float16 and bfloat16 tensors are stored as float32 lists (``dtypes`` below restores them). What all rows
share is the schema metadata: under the key ``b"dpa_lens"``, JSON ``{"format": 1, "class": "Attribution"
| "Circuit", "method", "model_name", "settings", "dtypes": {column: torch dtype name}}``, and for a circuit
``"writers"``, ``"readers"`` (``[node, label]`` pairs) and ``"in_graph": {"shape": [writer, reader],
"packbits": base64 of numpy.packbits of the flattened bool tensor}``. Settings are stored as JSON: tuples
come back as lists, and a value JSON cannot hold as its ``repr`` string.

Padding is trimmed, so that a stored row is what the method gives for its prompt alone:

* an `Attribution` row with a ``mask`` whose real positions are contiguous (right or left padding, or the
  right padding of `concat`) keeps only those positions, along every ``"pos"`` axis (tokens, heads,
  neurons, head_keys (both), flow, token_ids, mask, effective_targets) and in ``str_tokens`` and
  ``diagnostics.corrupted_str_tokens``; ``positions`` and the paths' hop positions are shifted by the
  padding cut on the left. A row whose real positions have gaps, or whose answer is not among them,
  is kept whole;
* a `Circuit` holds no mask: only the trailing ``token_ids == -1`` that `concat` pads with are cut. A
  batch an edge method ran padded keeps its padding (pad-token ids; its edge scores hold no padding).

`from_arrow` rebuilds each row and joins them with the class's `concat`, which pads rows of other lengths
on the right: a stored batch reads back as ``concat`` of its rows each computed alone. `RunningMean` (of
`dpa_lens.results.rows`) averages such parts as ``concat(parts).mean()`` would, one part in memory at a time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.results.attribution import Attribution
from dpa_lens.results.circuit import Circuit
from dpa_lens.results.paths import Path, path_from_state, path_state
from dpa_lens.results.rows import PAD_FILL, Diagnostics, Rows, RunningMean

__all__ = ["FORMAT", "KEY", "RunningMean", "from_arrow", "metadata", "to_arrow"]

KEY = b"dpa_lens"  # the schema metadata key
FORMAT = 1  # the layout's version
CLASSES: dict[str, type[Rows]] = {"Attribution": Attribution, "Circuit": Circuit}
NAMED = ("id", "str_tokens", "paths", "target")  # columns besides the tensor fields
PREFIXES = ("diagnostics.", "effective_targets.")
Result = Attribution | Circuit


# ---------------------------------------------------------------------------------------------- writing
def to_arrow(result: Result, ids: Sequence[str], columns: Mapping[str, Sequence[Any]] | None = None, *,
             real: Tensor | None = None) -> pa.Table:
    """One table row per row of ``result`` (see the module docstring for the columns and metadata).

    Args:
        result: an `Attribution` or a `Circuit`.
        ids: one string per row (the ``id`` column).
        columns: more per-row values (``{"prompt": [...]}``), one per row each, stored as pyarrow infers
            them; their names must not be the result's own.
        real: ``[batch, pos]``, True at each row's real tokens, where the caller knows them (the attention mask
            of the run): padding is then cut by it, a circuit's too (else by the result's own ``mask``).
    """
    if not isinstance(result, (Attribution, Circuit)):
        raise InputError(f"to_arrow takes an Attribution or a Circuit, got {type(result).__name__}")
    if not result.batch:
        raise InputError(f"the {type(result).__name__.lower()} holds no rows")
    if isinstance(ids, str) or not isinstance(ids, Sequence) or len(ids) != result.batch:
        got = f"{len(ids)} ids" if isinstance(ids, Sequence) and not isinstance(ids, str) else repr(ids)
        raise InputError(f"to_arrow needs one id per row ({result.batch}), got {got}")
    if not all(isinstance(i, str) for i in ids):
        raise InputError(f"ids must be strings, got {next(type(i).__name__ for i in ids if not isinstance(i, str))}")
    data: dict[str, pa.Array] = {"id": pa.array(list(ids), pa.string())}
    data.update(_extra_columns(columns or {}, result.batch))
    result = result.to("cpu")
    if real is not None and tuple(real.shape) != (result.batch, result.seq_len):
        raise InputError(f"real must be [batch, pos] = {[result.batch, result.seq_len]}, got {list(real.shape)}")
    rows = [_trimmed(result[b], None if real is None else real[b].bool().cpu()) for b in range(result.batch)]
    dtypes: dict[str, str] = {}
    for name in result._row_fields():
        if getattr(result, name) is not None:
            _put_tensors(data, dtypes, name, [getattr(r, name)[0] for r in rows])
    if result.str_tokens is not None:
        data["str_tokens"] = pa.array([r.str_tokens[0] for r in rows], pa.list_(pa.string()))
    if result.paths is not None:
        data["paths"] = pa.array([json.dumps([path_state(p) for p in r.paths[0]]) for r in rows], pa.string())
    data["target"] = pa.array([json.dumps(_jsonable(r.target)) for r in rows], pa.string())
    for name, value in result.diagnostics.as_dict().items():
        if isinstance(value, Tensor):
            _put_tensors(data, dtypes, f"diagnostics.{name}", [getattr(r.diagnostics, name)[0] for r in rows])
        else:
            data[f"diagnostics.{name}"] = pa.array([getattr(r.diagnostics, name)[0] for r in rows], pa.list_(pa.string()))
    for name in result.ROW_DICTS:
        for key in getattr(result, name) or {}:
            _put_tensors(data, dtypes, f"{name}.{key}", [getattr(r, name)[key][0] for r in rows])
    meta: dict[str, Any] = {"format": FORMAT, "class": type(result).__name__, "method": result.method, "model_name": result.model_name,
                            "settings": _jsonable(result.settings), "dtypes": dtypes}
    if isinstance(result, Circuit):
        graph = result.in_graph.detach().cpu()
        meta.update(writers=list(result.writers), readers=[list(r) for r in result.readers],
                    in_graph={"shape": list(graph.shape), "packbits": base64.b64encode(np.packbits(graph.flatten().numpy())).decode()})
    return pa.table(data).replace_schema_metadata({KEY: json.dumps(meta).encode()})


def _extra_columns(columns: Mapping[str, Sequence[Any]], batch: int) -> dict[str, pa.Array]:
    out = {}
    for name, values in columns.items():
        if not isinstance(name, str):
            raise InputError(f"column names must be strings, got {name!r}")
        if _reserved(name):
            raise InputError(f"column {name!r} is a name of the result's own columns: choose another")
        if isinstance(values, Tensor):
            values = values.tolist()
        if isinstance(values, str) or not hasattr(values, "__len__") or len(values) != batch:
            raise InputError(f"column {name!r} needs one value per row ({batch})")
        try:
            out[name] = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(
                values if isinstance(values, np.ndarray) else list(values))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as err:
            raise InputError(f"column {name!r} cannot be stored in an Arrow table: {err}") from None
    return out


def _reserved(name: str) -> bool:
    fields = {*Attribution.AXES, *Circuit.AXES}
    return name in NAMED or name.removesuffix("__shape") in fields or name.startswith(PREFIXES)


def _put_tensors(data: dict[str, pa.Array], dtypes: dict[str, str], name: str, rows: list[Tensor]) -> None:
    """Column ``name`` of one tensor per row: a scalar column for 0-d rows, else a flat list and its shape."""
    dtypes[name] = str(rows[0].dtype).removeprefix("torch.")
    arrays = [(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).detach().cpu().numpy() for t in rows]
    if rows[0].ndim == 0:
        data[name] = pa.array(np.stack(arrays))
        return
    offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])])
    kind = pa.ListArray if offsets[-1] < 2**31 else pa.LargeListArray
    values = pa.array(np.concatenate([a.reshape(-1) for a in arrays]))
    data[name] = kind.from_arrays(pa.array(offsets, pa.int32() if kind is pa.ListArray else pa.int64()), values)
    data[f"{name}__shape"] = pa.array([list(a.shape) for a in arrays], pa.list_(pa.int32()))


def _jsonable(value: Any) -> Any:
    """``value`` as JSON holds it: tuples as lists, numpy numbers as Python's, what JSON cannot hold as its repr."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k if isinstance(k, str) else repr(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else repr(value)


# ---------------------------------------------------------------------------------------------- trimming
def _trimmed(row: Result, real: Tensor | None = None) -> Result:
    """A row (a result of one row) cut to its real positions (``real [pos]`` where given; see the module
    docstring), or as it is."""
    span = _real_span(row, real)
    if span is None:
        return row
    a, e = span
    cut: dict[str, Any] = {}
    for name, axes in row.AXES.items():
        t = getattr(row, name)
        if t is not None and axes[0] == "batch" and "pos" in axes:
            for axis in (i for i, ax in enumerate(axes) if ax == "pos"):
                t = t.narrow(axis, a, e - a)
            cut[name] = t
    for name in row.ROW_DICTS:
        if getattr(row, name) is not None:
            cut[name] = {k: v[:, a:e] for k, v in getattr(row, name).items()}
    if row.str_tokens is not None:
        cut["str_tokens"] = [row.str_tokens[0][a:e]]
    if row.paths is not None:
        cut["paths"] = [[_shifted(p, a) for p in row.paths[0]]]
    if row.positions is not None:
        cut["positions"] = row.positions - a
    corrupted = row.diagnostics.corrupted_str_tokens
    diagnostics = row.diagnostics if corrupted is None else replace(row.diagnostics, corrupted_str_tokens=[corrupted[0][a:e]])
    return replace(row, **cut, diagnostics=diagnostics)


def _real_span(row: Result, given: Tensor | None = None) -> tuple[int, int] | None:
    """``(first, end)`` of a row's real positions where they are contiguous and padding can be cut, else None."""
    if given is not None:
        real = given
    elif isinstance(row, Attribution):
        real = None if row.mask is None else row.mask[0]
    else:  # a circuit's padding is told only by concat's -1 ids, at the end
        real = None if row.token_ids is None else row.token_ids[0] != PAD_FILL["token_ids"]
    if real is None or not bool(real.any()):
        return None
    where = torch.nonzero(real.cpu()).flatten()
    a, e = int(where[0]), int(where[-1]) + 1
    if e - a != len(where) or (a, e) == (0, real.shape[0]) or (isinstance(row, Circuit) and a > 0 and given is None):
        return None
    if row.positions is not None and not a <= int(row.positions[0]) < e:
        return None
    return a, e


def _shifted(path: Path, by: int) -> Path:
    """``path`` with every hop's position moved ``by`` to the left (padding cut before it)."""
    if not by:
        return path
    return replace(path, hops=tuple(h if h.position is None else replace(h, position=h.position - by) for h in path.hops))


# ---------------------------------------------------------------------------------------------- reading
def from_arrow(table: pa.Table | pa.RecordBatch) -> tuple[Result, list[str]]:
    """The result a table of `to_arrow` holds, and its ``id`` column: ``(result, ids)``.

    Each table row is rebuilt as a result of one row, and the rows are joined by the class's `concat`
    (rows of other lengths padded on the right). Columns that are not the result's (``prompt``, ...) are
    left aside: read them with ``table.column(name)``. A table of several Parquet files must come from one
    method, model and settings (``concat`` refuses others)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if not isinstance(table, pa.Table):
        raise InputError(f"from_arrow takes a pyarrow Table, got {type(table).__name__}")
    meta = metadata(table.schema)
    cls = CLASSES[meta["class"]]
    if table.num_rows == 0 or "id" not in table.column_names:
        raise InputError("the table holds no rows" if table.num_rows == 0 else "the table has no id column")
    try:
        results = _rows(table, cls, meta)
    except InputError:
        raise
    except Exception as err:  # a table edited by hand, or written by another program
        raise InputError(f"the table holds a dpa_lens {cls.__name__} that does not read back ({type(err).__name__}: {err})") from None
    return cls.concat(results), [str(i) for i in table.column("id").to_pylist()]


def _rows(table: pa.Table, cls: type[Rows], meta: dict[str, Any]) -> list[Result]:
    """Each table row as a result of one row."""
    names, dtypes, n = set(table.column_names), meta.get("dtypes", {}), table.num_rows
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for name in cls._row_fields():
        if name in names:
            for row, t in zip(rows, _row_tensors(table, name, dtypes.get(name))):
                row[name] = None if t is None else t.unsqueeze(0)
    for name, decode in (("str_tokens", lambda v: [v]), ("paths", lambda v: [[path_from_state(s) for s in json.loads(v)]])):
        if name in names:
            for row, value in zip(rows, table.column(name).to_pylist()):
                row[name] = None if value is None else decode(value)
    targets = table.column("target").to_pylist() if "target" in names else [None] * n
    for row, value in zip(rows, targets):
        row["target"] = {} if value is None else json.loads(value)
    diagnostics: list[dict[str, Any]] = [{} for _ in range(n)]
    for column in sorted(c for c in names if c.startswith("diagnostics.") and not c.endswith("__shape")):
        name = column.removeprefix("diagnostics.")
        if name == "corrupted_str_tokens":
            values = [None if v is None else [v] for v in table.column(column).to_pylist()]
        else:
            values = [None if t is None else t.unsqueeze(0) for t in _row_tensors(table, column, dtypes.get(column))]
        for d, value in zip(diagnostics, values):
            d[name] = value
    for name in cls.ROW_DICTS:
        keys = [c.removeprefix(f"{name}.") for c in table.column_names if c.startswith(f"{name}.") and not c.endswith("__shape")]
        values = {key: _row_tensors(table, f"{name}.{key}", dtypes.get(f"{name}.{key}")) for key in keys}
        for i, row in enumerate(rows):
            held = keys and all(values[key][i] is not None for key in keys)
            row[name] = {key: values[key][i].unsqueeze(0) for key in keys} if held else None
    shared: dict[str, Any] = {"method": meta["method"], "model_name": meta.get("model_name", ""), "settings": meta.get("settings", {})}
    if cls is Circuit:
        shared.update(writers=meta["writers"], readers=[tuple(r) for r in meta["readers"]], in_graph=_unpack_bits(meta["in_graph"]))
    return [cls(**shared, **row, diagnostics=Diagnostics(**d)) for row, d in zip(rows, diagnostics)]


def metadata(schema: pa.Schema) -> dict[str, Any]:
    """The dpa_lens metadata of a table's schema (``pyarrow.parquet.read_schema(path)`` reads a file's
    without its rows); `InputError` when the schema is not of a dpa_lens table."""
    raw = (schema.metadata or {}).get(KEY)
    try:
        meta = json.loads(raw) if raw is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("class") not in CLASSES or not isinstance(meta.get("format"), int):
        raise InputError("the table is not a dpa_lens result table (its schema has no dpa_lens metadata; "
                         "tables of to_arrow keep it, and so do Parquet files written from them)")
    if meta["format"] > FORMAT:
        raise InputError(f"the table is of a newer dpa_lens (format {meta['format']}; this one reads format {FORMAT}): upgrade dpa_lens")
    return meta


def _row_tensors(table: pa.Table, name: str, dtype: str | None) -> list[Tensor | None]:
    """One tensor per table row of a column of `_put_tensors` (None where the row holds none)."""
    wanted = getattr(torch, dtype, None) if dtype else None
    wanted = wanted if isinstance(wanted, torch.dtype) else None
    column = table.column(name).combine_chunks()
    valid = column.is_valid().to_pylist()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        values = [torch.tensor(v, dtype=wanted) if ok else None for v, ok in zip(column.to_pylist(), valid)]
    else:
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).tolist()
        flat = torch.from_numpy(np.array(pc.list_flatten(column).to_numpy(zero_copy_only=False)))  # a copy torch may write to
        shapes = table.column(f"{name}__shape").to_pylist() if f"{name}__shape" in table.column_names else [None] * len(valid)
        values = [p.reshape(s if s is not None else (-1,)) if ok else None for p, s, ok in zip(flat.split(lengths), shapes, valid)]
    return [t if t is None or wanted is None else t.to(wanted) for t in values]


def _unpack_bits(state: dict[str, Any]) -> Tensor:
    shape = state["shape"]
    bits = np.unpackbits(np.frombuffer(base64.b64decode(state["packbits"]), dtype=np.uint8))[: int(np.prod(shape))]
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
