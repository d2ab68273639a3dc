"""What every result shares: rows of prompts, a field table, slicing, moving, merging and saving.

A result (`Attribution`, `Circuit`) is a dataclass whose tensors have a batch axis first, one row per
prompt. Each class declares its tensors once, in ``AXES`` (field name → axis names), and `Rows` reads
that table to check shapes, slice rows (``result[i]``), move to a device, concatenate (padding the
``"pos"`` axes), and save and load. Per-row lists (``str_tokens``, ``paths``) and dicts of per-row
tensors (``effective_targets``) are named in ``ROW_LISTS`` and ``ROW_DICTS``; ``target`` holds per-row
lists beside shared values; `Diagnostics` holds per-row numbers a method reports besides its scores.
"""

from __future__ import annotations

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
    def concat(cls: type[R], parts: Sequence[R]) -> R:
        """One result of all rows of ``parts`` (one method, one graph). Rows of different lengths are padded
        on the right: scores 0, ``token_ids`` -1, ``str_tokens`` ""."""
        parts = list(parts)
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
        for name in cls._row_fields() + list(cls.ROW_DICTS):  # the same kinds of scores: none dropped without a word
            held = [getattr(p, name) is not None for p in parts]
            if not any(held) or all(held) or name in cls.FILLS:
                continue
            if name not in cls.EXTRAS:
                raise InputError(f"can only concatenate {cls.__name__.lower()}s that hold the same scores: {name} is in "
                                 f"{sum(held)} of the {len(parts)}")
            warnings.warn(f"{cls.__name__}.concat: {name} is in {sum(held)} of the {len(parts)} parts only, so the result has none",
                          stacklevel=2)
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
            if any(set(v) != set(values[0]) for v in values):
                raise InputError(f"can only concatenate {cls.__name__.lower()}s whose {name} hold the same hooks")
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
        return write_atomic(path, lambda handle: torch.save({key: version, **state}, handle), what=f"the {type(self).__name__}")

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
        state["diagnostics"] = Diagnostics(**(state.get("diagnostics") or {}))
        if state.get("paths") is not None:
            state["paths"] = [[path_from_state(p) for p in row] for row in state["paths"]]
        try:
            return cls(**{k: v for k, v in cls._from_state(state).items() if k in known})
        except Exception as err:  # whatever a hand-edited or foreign file breaks in the result's checks
            raise InputError(f"{path} holds a dpa_lens {name} that does not read back ({type(err).__name__}: {err}); "
                             "was it edited by hand? Compute and save it again") from None

    def _to_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> dict[str, Any]:
        return state


def aligned_positions(result: Rows, real: Tensor | None) -> dict[str, Any] | None:
    """What the mean of a result's rows keeps of its positions, or None when the rows do not align.

    Rows align when every row has its real tokens (``real [batch, pos]``) and its answer at the same
    positions (prompts of one template: IOI sentences of one length): position ``p`` then means the
    same slot in every row. Kept: the first row's ``positions``, ``real`` and ``token_ids`` (None where
    rows hold other tokens) and ``str_tokens`` labelled ``"a|b"`` at the slots where they differ."""
    same = lambda t: t is None or bool((t == t[:1]).all())  # noqa: E731
    if not (same(real) and same(result.positions)):
        return None
    first = lambda t: None if t is None else t[:1]  # noqa: E731
    kept = {"positions": first(result.positions), "token_ids": first(result.token_ids) if same(result.token_ids) else None}
    if result.str_tokens:
        labels = []
        for column in zip(*result.str_tokens):
            distinct = list(dict.fromkeys(column))
            labels.append(distinct[0] if len(distinct) == 1 else "|".join(distinct[:3]) + ("|…" if len(distinct) > 3 else ""))
        kept["str_tokens"] = [labels]
    else:
        kept["str_tokens"] = None
    return {**kept, "real": first(real)}


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
