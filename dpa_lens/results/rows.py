"""What every result shares: rows of prompts, a field table, slicing, moving, merging and saving.

A result (`Attribution`, `Circuit`) is a dataclass whose tensors have a batch axis first, one row per
prompt. Each class declares its tensors once, in ``AXES`` (field name → axis names), and `Rows` reads
that table to check shapes, slice rows (``result[i]``), move to a device, concatenate (padding the
``"pos"`` axes), and save and load. Per-row lists (``str_tokens``, ``paths``) and dicts of per-row
tensors (``effective_targets``) are named in ``ROW_LISTS`` and ``ROW_DICTS``; ``target`` holds per-row
lists beside shared values; `Diagnostics` holds per-row numbers a method reports besides its scores.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path as FilePath
from typing import Any, ClassVar, TypeVar

import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.files import write_atomic
from dpa_lens.results.paths import path_from_state, path_state

R = TypeVar("R", bound="Rows")
PAD_FILL = {"token_ids": -1, "mask": False}  # what padding holds in these fields (0 elsewhere)


@dataclass
class Diagnostics:
    """Per-row numbers a method reports besides its scores (``None`` where it has none)."""

    clean_value: Float[Tensor, " batch"] | None = None  # f(clean): AtP, patching
    corrupted_value: Float[Tensor, " batch"] | None = None  # f(corrupted): AtP, patching
    completeness_gap: Float[Tensor, " batch"] | None = None  # IG: (Σ tokens − (f(x) − f(x'))) / |f(x) − f(x')|
    remainder: Float[Tensor, " batch *layer"] | None = None  # decompositions: what no unit owns ([batch], or per layer)
    mlp_flow: Float[Tensor, " batch layer"] | None = None  # Unpack: credit through each layer's MLP, positions summed
    suppress_ratio: Float[Tensor, " batch"] | None = None  # Unpack: negative over total token mass
    paths_found: Int[Tensor, " batch"] | None = None  # paths a search found before keeping the top ones
    corrupted_str_tokens: list[list[str]] | None = None

    def rows(self, sel: slice) -> Diagnostics:
        return Diagnostics(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[sel] for f in fields(self)})

    def to(self, device: str | torch.device) -> Diagnostics:
        return Diagnostics(**{f.name: move(getattr(self, f.name), device) for f in fields(self)})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def concat(parts: Sequence[Diagnostics], n: int | None = None) -> Diagnostics:
        """The rows of ``parts`` (a number some parts lack is dropped); per-row token lists padded to ``n``."""
        out = {}
        for f in fields(Diagnostics):
            values = [getattr(p, f.name) for p in parts]
            if any(v is None for v in values):
                out[f.name] = None
            elif isinstance(values[0], Tensor):
                out[f.name] = torch.cat([v.to(values[0].device) for v in values])
            else:
                out[f.name] = [row + [""] * ((n or 0) - len(row)) for v in values for row in v]
        return Diagnostics(**out)


def move(value: Any, device: str | torch.device) -> Any:
    """A tensor (or a dict of them) on ``device``; anything else as it is."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    return value


def pad(t: Tensor, axes: Sequence[int], n: int, fill: Any) -> Tensor:
    """``t`` padded on the right to length ``n`` along each of ``axes``."""
    for axis in axes:
        missing = n - t.shape[axis]
        if missing > 0:
            shape = list(t.shape)
            shape[axis] = missing
            t = torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=axis)
    return t


class Rows:
    """The row behaviour of a result dataclass, driven by its field table (see the module docstring)."""

    AXES: ClassVar[dict[str, tuple[str, ...]]]  # every tensor field and its axes
    ROW_LISTS: ClassVar[tuple[str, ...]] = ("str_tokens", "paths")
    ROW_DICTS: ClassVar[tuple[str, ...]] = ()
    FILLS: ClassVar[dict[str, Any]] = {}  # [batch, pos] fields a part may lack, and the value that stands for them in `concat`
    EXTRAS: ClassVar[tuple[str, ...]] = ()  # what a method computes on request: `concat` drops it (with a warning) when a part lacks it
    SHARED: ClassVar[tuple[str, ...]] = ("model_name", "settings")  # other fields that rows to be merged must share
    FORMAT: ClassVar[tuple[str, int]]  # the key that marks a saved file, and its version
    READS: ClassVar[tuple[int, ...]] = ()  # earlier versions `load` still reads
    ALIGN_BY: ClassVar[tuple[str, ...]] = ("positions",)  # rows whose fields these are the same in line up position by position
    PER_POSITION_OPTION: ClassVar[bool] = False  # whether ``mean`` takes ``per_position``

    method: str
    target: dict[str, Any]
    diagnostics: Diagnostics
    settings: dict[str, Any]

    # ------------------------------------------------------------------ the table
    @classmethod
    def _row_fields(cls) -> list[str]:
        return [name for name, axes in cls.AXES.items() if axes[0] == "batch"]

    def check_shapes(self) -> None:
        """Every tensor agrees on batch, layer, position and unit sizes with the others (ValueError if not)."""
        dims: dict[str, int] = {}
        kind = type(self).__name__
        for name, axes in self.AXES.items():
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.ndim != len(axes):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{kind}.{name} must be [{', '.join(axes)}], got {got}")
            for axis, size in zip(axes, t.shape):
                if axis == "layer_plus_one":
                    axis, size = "layer", size - 1
                if dims.setdefault(axis, size) != size:
                    raise ValueError(f"{kind}.{name} has {axis} = {size}, other fields have {dims[axis]} ({tuple(t.shape)})")
        for name in self.ROW_LISTS:
            rows = getattr(self, name)
            if rows is not None and "batch" in dims and len(rows) != dims["batch"]:
                raise ValueError(f"{kind}.{name} has {len(rows)} rows, the scores {dims['batch']}")
        if getattr(self, "str_tokens", None) is not None and "pos" in dims and any(len(r) != dims["pos"] for r in self.str_tokens):
            raise ValueError(f"{kind}.str_tokens rows must have {dims['pos']} tokens")

    @property
    def batch(self) -> int:
        """The number of rows (prompts)."""
        for name in self._row_fields():
            t = getattr(self, name)
            if t is not None:
                return t.shape[0]
        return len(self.str_tokens) if getattr(self, "str_tokens", None) is not None else 0

    @property
    def seq_len(self) -> int:
        """The (padded) number of positions, 0 where no field has a position axis."""
        for name, axes in self.AXES.items():
            t = getattr(self, name)
            if t is not None and "pos" in axes:
                return t.shape[axes.index("pos")]
        return 0

    def row_index(self, row: int) -> int:
        """``row`` as a non-negative index, or `InputError` when there is no such row."""
        if isinstance(row, bool) or not isinstance(row, int):
            raise InputError(f"row must be an int, got {row!r}")
        if not -self.batch <= row < self.batch:
            raise InputError(f"row {row} is out of range: this {type(self).__name__.lower()} has {self.batch} "
                             f"row{'s' if self.batch != 1 else ''}")
        return row % self.batch

    # ------------------------------------------------------------------ rows
    def __getitem__(self: R, rows: int | slice) -> R:
        """The result of some rows (``result[0]`` keeps a batch dimension of one)."""
        if isinstance(rows, slice):
            sel = rows
        else:
            r = self.row_index(rows)
            sel = slice(r, r + 1)
        out: dict[str, Any] = {name: None if getattr(self, name) is None else getattr(self, name)[sel] for name in self._row_fields()}
        out.update({name: None if getattr(self, name) is None else getattr(self, name)[sel] for name in self.ROW_LISTS})
        out.update({name: None if getattr(self, name) is None else {k: v[sel] for k, v in getattr(self, name).items()}
                    for name in self.ROW_DICTS})
        target = {k: (v[sel] if isinstance(v, list) and len(v) == self.batch else v) for k, v in self.target.items()}
        return replace(self, **out, target=target, diagnostics=self.diagnostics.rows(sel))

    def to(self: R, device: str | torch.device) -> R:
        """The same result with every tensor on ``device``."""
        moved = {name: move(getattr(self, name), device) for name in [*self.AXES, *self.ROW_DICTS]}
        return replace(self, **moved, diagnostics=self.diagnostics.to(device))

    @classmethod
    def _check_parts(cls, parts: Sequence[Rows]) -> dict[str, int]:
        """`InputError` unless ``parts`` can be merged into one result (one class, one method, the same model,
        settings and graph, the same kinds of scores); returns the extras only some parts hold, each with
        how many parts hold it (`concat` drops them)."""
        if not parts:
            raise InputError(f"concat needs at least one {cls.__name__}")
        bad = [type(p).__name__ for p in parts if not isinstance(p, cls)]
        if bad:
            raise InputError(f"{cls.__name__}.concat takes {cls.__name__} objects, got {bad[0]}")
        methods = {p.method for p in parts}
        if len(methods) > 1:
            raise InputError(f"can only concatenate {cls.__name__.lower()}s of one method, got {sorted(methods)}")
        first = parts[0]
        shared = [name for name, axes in cls.AXES.items() if axes[0] != "batch"] + list(cls.SHARED)
        for name in shared:  # what is not per row (the model, the method's settings, a circuit's graph) must agree
            if any(not _same(getattr(p, name), getattr(first, name)) for p in parts[1:]):
                raise InputError(f"can only concatenate {cls.__name__.lower()}s with the same {name} "
                                 f"(of the same model, method settings and graph)")
        partial: dict[str, int] = {}
        for name in cls._row_fields() + list(cls.ROW_DICTS):  # the same kinds of scores: none dropped without a word
            held = [getattr(p, name) is not None for p in parts]
            if not any(held) or all(held) or name in cls.FILLS:
                continue
            if name not in cls.EXTRAS:
                raise InputError(f"can only concatenate {cls.__name__.lower()}s that hold the same scores: {name} is in "
                                 f"{sum(held)} of the {len(parts)}")
            partial[name] = sum(held)
        for name in cls.ROW_DICTS:  # dicts of [batch, pos, ...] tensors: the same keys in every part that holds one
            keys = [set(getattr(p, name)) for p in parts if getattr(p, name) is not None]
            if name not in partial and any(k != keys[0] for k in keys):
                raise InputError(f"can only concatenate {cls.__name__.lower()}s whose {name} hold the same hooks")
        return partial

    @classmethod
    def concat(cls: type[R], parts: Sequence[R]) -> R:
        """One result of all rows of ``parts`` (one method, one graph). Rows of different lengths are padded
        on the right: scores 0, ``token_ids`` -1, ``str_tokens`` ""."""
        parts = list(parts)
        for name, held in cls._check_parts(parts).items():
            warnings.warn(_partial_message(cls, name, held, len(parts)), stacklevel=2)
        first = parts[0]
        n = max(p.seq_len for p in parts)
        out: dict[str, Any] = {}
        for name in cls._row_fields():
            values = [getattr(p, name) for p in parts]
            if name in cls.FILLS and any(v is not None for v in values):
                values = [torch.full((p.batch, p.seq_len), cls.FILLS[name]) if v is None else v for v, p in zip(values, parts)]
            if any(v is None for v in values):
                out[name] = None
                continue
            axes = [i for i, a in enumerate(cls.AXES[name]) if a == "pos"]
            out[name] = torch.cat([pad(v, axes, n, PAD_FILL.get(name, 0)).to(values[0].device) for v in values])
        for name in cls.ROW_LISTS:
            values = [getattr(p, name) for p in parts]
            rows = None if any(v is None for v in values) else [row for v in values for row in v]
            out[name] = rows if name != "str_tokens" or rows is None else [row + [""] * (n - len(row)) for row in rows]
        for name in cls.ROW_DICTS:  # dicts of [batch, pos, ...] tensors, the same keys in every part
            values = [getattr(p, name) for p in parts]
            if any(v is None for v in values):
                out[name] = None
                continue
            out[name] = {k: torch.cat([pad(v[k], (1,), n, 0).to(values[0][k].device) for v in values]) for k in values[0]}
        target: dict[str, Any] = {}
        for k in first.target:
            values = [p.target.get(k) for p in parts]
            target[k] = [x for v in values for x in v] if all(isinstance(v, list) for v in values) else values[0]
        merged = replace(first, **out, target=target, diagnostics=Diagnostics.concat([p.diagnostics for p in parts], n))
        return merged._padded_from(parts, n)

    def _padded_from(self: R, parts: Sequence[R], n: int) -> R:
        """Hook for what a class adds when rows of different lengths were padded (`Attribution`: a mask)."""
        return self

    def _mean_of(self: R, acc: RunningMean, stacklevel: int) -> R:
        """Hook: the mean of the rows ``acc`` holds, as a result of one row built on ``self`` (its first row);
        warnings at ``stacklevel`` (see `RunningMean`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | FilePath) -> FilePath:
        """Save to a file (``torch.save`` of plain tensors and metadata; `load` reads it back), replacing
        any earlier file at once (never a partial file). ``~`` is expanded; the folder must exist.
        Returns the path written."""
        state = {f.name: move(getattr(self, f.name), "cpu") for f in fields(self)}
        state = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in state.items()}
        state["diagnostics"] = self.diagnostics.to("cpu").as_dict()
        if "paths" in state:
            state["paths"] = None if self.paths is None else [[path_state(p) for p in row] for row in self.paths]
        state = self._to_state(state)
        key, version = self.FORMAT
        name = type(self).__name__

        def write(handle: Any) -> None:
            try:
                torch.save({key: version, **state}, handle)
            except (pickle.PicklingError, AttributeError, TypeError) as err:  # what pickle raises for what it cannot write
                raise InputError(f"cannot save the {name}: its {_unpicklable(state)} cannot be written to a file ({type(err).__name__}: "
                                 f"{err}); keep tensors, numbers, strings, lists and dicts in its fields (the earlier file, if "
                                 "any, is left as it was)") from None

        return write_atomic(path, write, what=f"the {name}")

    @classmethod
    def load(cls: type[R], path: str | FilePath) -> R:
        """A result saved by `save`."""
        path = FilePath(path).expanduser()
        name = cls.__name__
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise InputError(f"{path} is not a saved dpa_lens {name} ({type(err).__name__})") from None
        key, version = cls.FORMAT
        found = state.pop(key, None) if isinstance(state, dict) else None
        if found not in (version, *cls.READS):
            raise InputError(f"{path} is not a saved dpa_lens {name}")
        known = {f.name for f in fields(cls)}
        wrong = _wrong_field(cls, state) or _wrong_field(Diagnostics, state.get("diagnostics") or {}, "diagnostics")
        if wrong:
            raise InputError(f"{path} holds a dpa_lens {name} that does not read back: its {wrong}; was it edited by hand? "
                             "Compute and save it again")
        state["diagnostics"] = Diagnostics(**(state.get("diagnostics") or {}))
        try:
            if state.get("paths") is not None:
                state["paths"] = [[path_from_state(p) for p in row] for row in state["paths"]]
            return cls(**{k: v for k, v in cls._from_state(state).items() if k in known})
        except Exception as err:  # whatever a hand-edited or foreign file breaks in the result's checks
            raise InputError(f"{path} holds a dpa_lens {name} that does not read back ({type(err).__name__}: {err}); "
                             "was it edited by hand? Compute and save it again") from None

    def _to_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> dict[str, Any]:
        return state


ALIGN = ("positions", "token_ids", "mask")  # what a mean keeps of the first row (when rows align), never averages
UNALIGNED = ("mean(per_position=True): the rows' prompts have their tokens or answers at other positions; average prompts "
             "of one template, or pass per_position=False for the unit totals")


class RunningMean:
    """The mean over rows of results given part by part: what ``type(part).concat(parts).mean()`` gives.

    ``acc = RunningMean(); acc.add(part)`` for each part (an `Attribution` or a `Circuit` of any number of
    rows), then ``acc.result()``, a result of one row. It holds float64 sums of one row's size, the first
    row's positions and tokens, and up to four distinct tokens per position, whatever the number of rows.
    Parts must be what `concat` merges (one class, one method, the same model, settings and graph), else
    `InputError`. Rows align, and per-position scores are kept, exactly where `concat` (which pads on the
    right) and ``mean`` would keep them: an `Attribution`'s rows with the same real positions (``mask``,
    padding included) and answer position, a `Circuit`'s with the same ``token_ids`` and answer position.
    ``per_position`` is `Attribution.mean`'s (None, False or True; True refuses rows that do not align,
    at the `add` that brings them); a `Circuit` takes None only. Warnings (per-position scores dropped,
    extras only some parts hold) come from `result`. `Attribution.mean` and `Circuit.mean` are this with
    one part."""

    def __init__(self, per_position: bool | None = None) -> None:
        if per_position not in (None, False, True):
            raise InputError(f"per_position must be None, False or True, got {per_position!r}")
        self.per_position = per_position
        self.count = 0  # rows added
        self.parts = 0  # parts added
        self._first: Rows | None = None  # the first part's first row: method, model, settings, graph
        self._first_labels: Any = None  # the first part's target labels (all its rows)
        self._home = self._device = torch.device("cpu")  # the first part's device; where the sums are kept
        self._sums: dict[str, Tensor] = {}  # field (or "dict.key") → float64 sum over rows, "pos" axes padded to the longest
        self._held: dict[str, int] = {}  # field → how many parts hold it
        self._lengths: set[int] = set()  # the parts' seq_len
        self._masked = False  # some part has a mask
        self._ref: dict[str, Tensor] = {}  # align field → the first row's value (unpadded)
        self._same: dict[str, bool] = {}  # align field → every row equals the first (as concat pads them)
        self._columns: list[list[str]] = []  # per position, the distinct str_tokens met (up to 4; "" for padding)
        self._token_rows = 0  # rows whose str_tokens are in _columns
        self._labels: list[Any] | None = []  # the distinct target labels met (up to 2); None once a part holds no list

    # ------------------------------------------------------------------ adding
    def add(self, part: Rows) -> RunningMean:
        """Add the rows of ``part``; returns the accumulator (``RunningMean().add(a).result()``)."""
        if not isinstance(part, Rows):
            raise InputError(f"RunningMean.add takes an Attribution or a Circuit, got {type(part).__name__}")
        if self._first is None:
            if self.per_position is not None and not part.PER_POSITION_OPTION:
                raise InputError(f"per_position is an option of an Attribution's mean; a {type(part).__name__}'s mean keeps "
                                 "its per-position scores where the rows align")
            self._first, self._first_labels = part[:1], part.target.get("labels")
            tensors = (getattr(part, name) for name in part._row_fields())
            self._home = next((t.device for t in tensors if isinstance(t, Tensor)), torch.device("cpu"))
            self._device = torch.device("cpu") if self._home.type == "mps" else self._home  # MPS has no float64
        else:
            type(self._first)._check_parts([self._first, part])
        self.parts += 1
        self.count += part.batch
        self._lengths.add(part.seq_len)
        for name in [*part._row_fields(), *part.ROW_DICTS, *part.ROW_LISTS]:
            self._held[name] = self._held.get(name, 0) + (getattr(part, name) is not None)
        self._add_sums(part)
        self._add_labels(part.target.get("labels"))
        if part.batch:
            self._add_alignment(part)
            self._add_tokens(part.str_tokens or [])
        if self.per_position and not self.aligned_now():
            raise InputError(UNALIGNED)
        return self

    def _add_sums(self, part: Rows) -> None:
        values = {name: getattr(part, name) for name in part._row_fields() if name not in ALIGN}
        for name in part.ROW_DICTS:
            values.update({f"{name}.{key}": t for key, t in (getattr(part, name) or {}).items()})
        for key, t in values.items():
            if t is None:
                continue
            axes = self._pos_axes(key)
            s = t.detach().to(self._device).sum(0, dtype=torch.float64)
            if key in self._sums:
                n = max((max(s.shape[i], self._sums[key].shape[i]) for i in axes), default=0)
                s = pad(s, axes, n, 0) + pad(self._sums[key], axes, n, 0)
            self._sums[key] = s

    def _add_alignment(self, part: Rows) -> None:
        for name in ALIGN:
            if name not in part.AXES:
                continue
            t = getattr(part, name)
            self._masked |= name == "mask" and t is not None
            if t is None and name in part.FILLS:  # what concat fills in: a part without a mask has no padding
                t = torch.full((part.batch, part.seq_len), part.FILLS[name], device=self._device)
            if t is None:
                continue
            ref = self._ref.setdefault(name, t[0])
            if t.ndim > 1:  # compared as concat pads them: on the right, token_ids with -1, mask with False
                n = max(ref.shape[0], t.shape[1])
                ref, t = pad(ref, (0,), n, PAD_FILL[name]), pad(t, (1,), n, PAD_FILL[name])
            self._same[name] = self._same.get(name, True) and bool((t == ref.to(t.device)).all())

    def _add_tokens(self, str_tokens: list[list[str]]) -> None:
        for row in str_tokens:
            if len(row) > len(self._columns):  # the rows before were shorter: concat pads them with ""
                self._columns += [[""] if self._token_rows else [] for _ in range(len(row) - len(self._columns))]
            for j, column in enumerate(self._columns):
                token = row[j] if j < len(row) else ""
                if len(column) < 4 and token not in column:
                    column.append(token)
            self._token_rows += 1

    def _add_labels(self, labels: Any) -> None:
        if not isinstance(labels, list) or self._labels is None:
            self._labels = None  # concat then keeps the first part's labels
            return
        for label in labels:
            if len(self._labels) < 2 and label not in self._labels:
                self._labels.append(label)

    # ------------------------------------------------------------------ what the result classes read
    def aligned_now(self) -> bool:
        """Whether every row so far has the first row's values of the fields its class aligns rows by."""
        return self._first is not None and all(self._same.get(name, True) for name in self._first.ALIGN_BY)

    def holds(self, name: str) -> bool:
        """Whether the mean of all parts has this field: every part holds it."""
        return self.parts > 0 and self._held.get(name, 0) == self.parts

    def field_mean(self, name: str, over_positions: bool = False) -> Tensor | None:
        """The float32 mean ``[1, ...]`` of a field (``"dict.key"`` for a dict's tensor) with its ``"pos"`` axes
        padded to the longest row, or summed over when ``over_positions``; None where not every part holds it."""
        if not self.holds(name.split(".")[0]) or name not in self._sums:
            return None
        s, axes = self._sums[name], self._pos_axes(name)
        if over_positions and axes:
            s = s.sum(dim=axes)
        elif axes:
            s = pad(s, axes, max(self._lengths), 0)
        return (s / self.count).float().unsqueeze(0).to(self._home)

    def dict_mean(self, name: str) -> dict[str, Tensor] | None:
        """The means of a dict of tensors (``effective_targets``), None where not every part holds it."""
        keys = [key for key in self._sums if key.startswith(f"{name}.")]
        return {key[len(name) + 1:]: self.field_mean(key) for key in keys} if self.holds(name) else None

    def aligned(self) -> dict[str, Any] | None:
        """What the mean keeps of the rows' positions, or None when the rows do not align: the first row's
        ``positions``, ``token_ids`` (None where rows hold other tokens), ``real`` (its mask; None where no
        part has one and all have one length) and ``str_tokens`` labelled ``"a|b"`` where rows differ."""
        if not self.aligned_now() or not self.count:
            return None
        n = max(self._lengths)
        first = lambda name: self._ref[name].unsqueeze(0).to(self._home) if name in self._ref else None  # noqa: E731
        ids = first("token_ids") if self._same.get("token_ids", True) else None
        real = first("mask") if self._masked or len(self._lengths) > 1 else None
        return {"positions": first("positions"), "token_ids": None if ids is None else pad(ids, (1,), n, PAD_FILL["token_ids"]),
                "real": None if real is None else pad(real, (1,), n, PAD_FILL["mask"]),
                "str_tokens": [[_label(c) for c in self._columns]] if self.holds("str_tokens") else None}

    def shared(self) -> dict[str, Any]:
        """What every mean says besides its scores: the target's label (or "mean of N rows"), the settings with
        ``mean_of_rows``, no paths and no diagnostics."""
        labels = self._first_labels if self._labels is None else self._labels
        target = {"labels": [labels[0] if len(set(labels)) == 1 else f"mean of {self.count} rows"]} if labels else {}
        return {"target": target, "settings": {**self._first.settings, "mean_of_rows": self.count}, "paths": None,
                "diagnostics": Diagnostics()}

    # ------------------------------------------------------------------ the mean
    def result(self) -> Rows:
        """The mean of every row added, as a result of one row (see the class docstring)."""
        if not self.count:
            raise InputError("RunningMean.result: no rows were added")
        cls = type(self._first)
        for name in (*cls._row_fields(), *cls.ROW_DICTS):  # concat's warnings, in its order
            if name in cls.EXTRAS and 0 < self._held.get(name, 0) < self.parts:
                warnings.warn(_partial_message(cls, name, self._held[name], self.parts), stacklevel=2)
        return self._first._mean_of(self, stacklevel=3)

    def _pos_axes(self, name: str) -> list[int]:
        """The ``"pos"`` axes of a row of a field (a dict's tensors are ``[pos, ...]``)."""
        axes = self._first.AXES.get(name, ("batch", "pos"))[1:]
        return [i for i, a in enumerate(axes) if a == "pos"]


def _label(distinct: list[str]) -> str:
    """A position's label in a mean: its token, or ``"a|b|c|…"`` where rows hold other tokens."""
    return distinct[0] if len(distinct) == 1 else "|".join(distinct[:3]) + ("|…" if len(distinct) > 3 else "")


def _partial_message(cls: type, name: str, held: int, parts: int) -> str:
    return f"{cls.__name__}.concat: {name} is in {held} of the {parts} parts only, so the result has none"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


# ---------------------------------------------------------------------------------------------- figures
_FIGURES: dict[tuple[str, str], Any] = {}


def register_figure(result: str, kind: str, draw: Any) -> None:
    """Make ``draw(result, **kwargs)`` the figure that ``<result>.show(kind)`` returns (`dpa_lens.plot`
    registers its figures when it is imported, so that results never import the plots)."""
    _FIGURES[(result, kind)] = draw


def figure(result: Any, kind: str, **kwargs: Any) -> Any:
    """The registered figure ``kind`` of a result (see `register_figure`)."""
    name = type(result).__name__
    kinds = sorted(k for r, k in _FIGURES if r == name)
    if not kinds:
        raise InputError(f"no figures are registered for {name}: import dpa_lens.plot (importing dpa_lens does)")
    if (name, kind) not in _FIGURES:
        raise InputError(f"kind must be one of {kinds}, got {kind!r}")
    return _FIGURES[(name, kind)](result, **kwargs)


def _wrong_field(cls: type, state: Any, within: str | None = None) -> str | None:
    """What is wrong with a loaded ``state`` (the dict a result's `save` wrote, or ``within`` it, its diagnostics):
    a field of another type than ``cls`` declares (checked into lists and dicts), a field ``cls`` does not have
    (``within`` only), a target whose labels or logit kinds are not lists; None when every field fits."""
    where = (lambda name: f"{within}[{name!r}]") if within else (lambda name: f"field {name!r}")
    if not isinstance(state, dict):
        return f"{within or 'content'} is a {type(state).__name__}, not a dict"
    declared = {f.name: f.type for f in fields(cls)}
    for name, value in state.items():
        if name not in declared:
            if within:
                return f"{where(name)} is not one of {cls.__name__}'s fields ({', '.join(declared)})"
            continue  # what other versions kept (a circuit's `mask`): the class's own checks read it
        hint = declared[name]
        if isinstance(hint, str) and not _fits(value, hint):
            return f"{where(name)} is {_describe(value)}: expected {hint}"
    target = state.get("target") if isinstance(state.get("target"), dict) else {}
    for key in ("labels", "logit"):  # per-row lists, read by repr, plots and reports
        if target.get(key) is not None and not isinstance(target[key], list):
            return f"field 'target' has {key} {_describe(target[key])}: expected a list, one per row"
    return None


def _fits(value: Any, hint: str) -> bool:
    """Whether a loaded value fits a field's annotation, as the result classes write them: ``str``, ``Any``,
    ``list[...]``, ``tuple[...]`` (a list in a file), ``dict[..., ...]``, jaxtyping tensors, ``... | None``,
    ``Diagnostics`` and ``Path`` (dicts in a file)."""
    hint = hint.strip()
    options = _split(hint, "|")
    if len(options) > 1:
        return any(_fits(value, option) for option in options)
    if hint == "None":
        return value is None
    head, _, inner = hint.partition("[")
    args = _split(inner[:-1], ",") if inner else []
    if head in ("list", "Sequence"):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if head == "tuple":
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if head == "dict":
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if args and args[0] == "Tensor":  # Float[Tensor, "batch pos"] and the like
        return isinstance(value, Tensor)
    if head in ("Diagnostics", "Path"):  # saved as dicts (`Diagnostics.as_dict`, `path_state`; no diagnostics: None)
        return isinstance(value, dict) or (head == "Diagnostics" and value is None)
    simple = {"str": str, "int": int, "float": (int, float), "bool": bool}
    if head in simple:
        return isinstance(value, simple[head]) and (head == "bool" or not isinstance(value, bool))
    return True  # Any, and what no file holds


def _split(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes, each part stripped."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "[":
            depth += 1
        elif not quoted and c == "]":
            depth -= 1
        elif not quoted and depth == 0 and c == sep:
            parts.append(text[start:i].strip())
            start = i + 1
    return [*parts, text[start:].strip()]


def _describe(value: Any) -> str:
    """A value as an error message names it: ``an int (5)``, ``a list of 3``, ``a Tensor [2, 3]``."""
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    if isinstance(value, Tensor):
        return f"a Tensor {list(value.shape)}"
    if isinstance(value, (list, tuple, dict)):
        return f"{article} {kind} of {len(value)}"
    text = repr(value)
    return f"{article} {kind} ({text if len(text) <= 40 else text[:37] + '...'})"


def _unpicklable(state: dict[str, Any]) -> str:
    """Where in a result's saved state the first thing pickle cannot write is: ``settings['f'] (a function)``."""

    def find(value: Any, where: str) -> str | None:
        try:
            pickle.dumps(value)
            return None
        except Exception:  # whatever pickle raises, the search goes on inside
            pass
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
        for key, item in items:
            found = find(item, f"{where}[{key!r}]")
            if found:
                return found
        return f"{where} ({_describe(value)})"

    for name, value in state.items():
        found = find(value, name)
        if found:
            return found
    return "content"
