"""`Circuit`: the result of every edge method (scores of writer → reader edges).

Edges join the writers and readers of the residual graph (`dpa_lens.graph`): a writer (``embed``,
``L{l}H{h}``, ``L{l}.mlp``, ``L{l}N{n}``) feeding a reader (``(L{l}H{h}, q|k|v)``, ``(L{l}.mlp, mlp)``,
``(logit, logit)``) along a path label.

* ``scores [batch, writer, reader]``: each edge's score summed over positions (0 where the edge is not
  in the graph, see ``in_graph``);
* ``in_graph [writer, reader]``: the edges the circuit holds (those that exist, those measured, or those
  a `prune` kept);
* ``per_position [batch, pos, writer, reader]``: scores split by the position where the writer writes
  and the reader reads (on request);
* ``nodes [batch, writer]``: the writers' node scores, where the method has them (for DPA, each the sum
  of the writer's outgoing edges); ``bias [batch]``: what no writer owns, for methods that are complete.

Scores are in the units of the explained quantity, like an `Attribution`'s: positive edges push it up.
Rows, slicing, ``concat``, ``to`` and ``save``/``load`` are those of every result (`dpa_lens.results.rows`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path as FilePath
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.graph import LABELS
from dpa_lens.graph import writer_kind as kind_of
from dpa_lens.results.paths import Path
from dpa_lens.results.rows import Diagnostics, Rows, RunningMean, figure
from dpa_lens.types import typechecked

WriterKind = Literal["any", "embed", "heads", "mlp", "neurons"]
_WRITER_KINDS = {"any": None, "embed": "embed", "heads": "head", "mlp": "mlp", "neurons": "neuron"}


@typechecked
@dataclass
class Circuit(Rows):
    """Edge scores of one method for a batch of prompts (see the module docstring)."""

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "scores": ("batch", "writer", "reader"), "in_graph": ("writer", "reader"), "per_position": ("batch", "pos", "writer", "reader"),
        "nodes": ("batch", "writer"), "bias": ("batch",), "target_value": ("batch",), "positions": ("batch",), "token_ids": ("batch", "pos"),
    }
    SHARED: ClassVar[tuple[str, ...]] = ("model_name", "settings", "writers", "readers")
    EXTRAS: ClassVar[tuple[str, ...]] = ("per_position",)
    FORMAT: ClassVar[tuple[str, int]] = ("dpa_lens_circuit", 2)
    READS: ClassVar[tuple[int, ...]] = (1,)
    ALIGN_BY: ClassVar[tuple[str, ...]] = ("token_ids", "positions")  # the same prompt (no mask to align prompts by)

    method: str
    writers: list[str]
    readers: list[tuple[str, str]]  # (reader node, path label)
    scores: Float[Tensor, "batch writer reader"]
    in_graph: Bool[Tensor, "writer reader"]
    per_position: Float[Tensor, "batch pos writer reader"] | None = None
    nodes: Float[Tensor, "batch writer"] | None = None
    bias: Float[Tensor, " batch"] | None = None
    target_value: Float[Tensor, " batch"] | None = None
    positions: Int[Tensor, " batch"] | None = None
    token_ids: Int[Tensor, "batch pos"] | None = None
    str_tokens: list[list[str]] | None = None
    paths: list[list[Path]] | None = None  # per row, strongest first
    target: dict[str, Any] = field(default_factory=dict)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    settings: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""

    def __post_init__(self) -> None:
        W, R = len(self.writers), len(self.readers)
        if tuple(self.scores.shape[1:]) != (W, R) or tuple(self.in_graph.shape) != (W, R):
            raise ValueError(f"Circuit: scores {tuple(self.scores.shape)} and in_graph {tuple(self.in_graph.shape)} must be "
                             f"[batch, {W} writers, {R} readers]")
        bad = [p for _, p in self.readers if p not in LABELS]
        if bad:
            raise ValueError(f"Circuit: reader paths must be among {LABELS}, got {sorted(set(bad))}")
        self.in_graph = self.in_graph.to(self.scores.device)  # one device for the edges and their scores
        self.check_shapes()

    @property
    def mask(self) -> Tensor:
        """Deprecated name of `in_graph` (``mask`` is an `Attribution`'s real-token mask)."""
        warnings.warn("Circuit.mask is now Circuit.in_graph (the edges the circuit holds)", DeprecationWarning, stacklevel=2)
        return self.in_graph

    # ------------------------------------------------------------------ reading
    def edge(self, writer: str, reader: str, path: str, row: int = 0) -> float:
        """One edge's score (0 for an edge that is not in the graph)."""
        try:
            w, r = self.writers.index(writer), self.readers.index((reader, path))
        except ValueError:
            raise InputError(f"no edge {writer} → {reader} [{path}] in this circuit's graph") from None
        return float(self.scores[self.row_index(row), w, r])

    def outgoing(self, row: int = 0) -> Float[Tensor, " writer"]:
        """Each writer's edges summed (DPA: its node score)."""
        return self.scores[self.row_index(row)].sum(-1)

    def incoming(self, row: int = 0) -> Float[Tensor, " reader"]:
        """Each reader's (reader, path) edges summed."""
        return self.scores[self.row_index(row)].sum(0)

    def to_dataframe(self, *, row: int | None = None, per_position: bool = False) -> pd.DataFrame:
        """One table row per edge in the graph: ``writer, reader, path, score`` (and ``position`` when
        ``per_position``); with several batch rows and no ``row`` given, a ``row`` column first."""
        rows = range(self.batch) if row is None else [self.row_index(row)]
        w_idx, r_idx = torch.nonzero(self.in_graph, as_tuple=True)
        frames = []
        for b in rows:
            if per_position:
                if self.per_position is None:
                    raise InputError("this circuit has no per-position scores: compute it with per_position=True")
                t = self.per_position[b][:, w_idx, r_idx].detach().float().cpu()  # [pos, edges]
                pos = torch.arange(t.shape[0]).repeat_interleave(t.shape[1])
                wi, ri = w_idx.repeat(t.shape[0]).tolist(), r_idx.repeat(t.shape[0]).tolist()
                df = pd.DataFrame({"writer": [self.writers[i] for i in wi], "reader": [self.readers[i][0] for i in ri],
                                   "path": [self.readers[i][1] for i in ri], "position": pos.numpy(), "score": t.flatten().numpy()})
            else:
                s = self.scores[b][w_idx, r_idx].detach().float().cpu()
                df = pd.DataFrame({"writer": [self.writers[i] for i in w_idx.tolist()],
                                   "reader": [self.readers[i][0] for i in r_idx.tolist()],
                                   "path": [self.readers[i][1] for i in r_idx.tolist()], "score": s.numpy()})
            if row is None and self.batch > 1:
                df.insert(0, "row", b)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def top(self, k: int = 20, *, row: int = 0, absolute: bool = True, path: str | None = None,
            kind: WriterKind = "any", writer_kind: str | None = None) -> pd.DataFrame:
        """The ``k`` strongest edges of one row (by |score| unless ``absolute=False``), optionally of one
        path label or of one kind of writer (``"embed"``, ``"heads"``, ``"mlp"``, ``"neurons"``)."""
        if writer_kind is not None:
            warnings.warn("Circuit.top(writer_kind=...) is now kind= ('embed', 'heads', 'mlp', 'neurons')", DeprecationWarning, stacklevel=2)
            kind = {"head": "heads", "neuron": "neurons"}.get(writer_kind, writer_kind)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        if kind not in _WRITER_KINDS:
            raise InputError(f"kind must be one of {tuple(_WRITER_KINDS)}, got {kind!r}")
        df = self.to_dataframe(row=row)
        if path is not None:
            if path not in LABELS:
                raise InputError(f"path must be one of {LABELS}, got {path!r}")
            df = df[df["path"] == path]
        if kind != "any":
            if not any(kind_of(w) == _WRITER_KINDS[kind] for w in self.writers):
                raise InputError(f"this circuit has no {kind} writers" + (": compute it with neurons=True (dpa_edges)" if kind == "neurons" else ""))
            df = df[df["writer"].map(kind_of) == _WRITER_KINDS[kind]]
        key = df["score"].abs() if absolute else df["score"]
        return df.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def prune(self, *, top_n: int | None = None, threshold: float | None = None, row: int = 0) -> Circuit:
        """The circuit keeping only the ``top_n`` edges by |score| and/or those with |score| ≥ ``threshold``
        (of one row; scores of the others are kept on the same edges)."""
        if top_n is None and threshold is None:
            raise InputError("prune needs top_n or threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0):
            raise InputError(f"threshold must be a number ≥ 0 (an |score|), got {threshold!r}")
        s = self.scores[self.row_index(row)].abs().masked_fill(~self.in_graph, -1.0)
        keep = self.in_graph.clone()
        if threshold is not None:
            keep &= s >= threshold
        if top_n is not None:
            if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
                raise InputError(f"top_n must be a non-negative int, got {top_n!r}")
            flat = s.masked_fill(~keep, -1.0).flatten()
            chosen = torch.zeros_like(flat, dtype=torch.bool)
            chosen[flat.argsort(descending=True)[: min(top_n, int(keep.sum()))]] = True
            keep &= chosen.view_as(keep)
        scores = self.scores * keep
        per_pos = None if self.per_position is None else self.per_position * keep
        return replace(self, scores=scores, in_graph=keep, per_position=per_pos,
                       settings={**self.settings, "pruned_from": int(self.in_graph.sum())})

    def mean(self) -> Circuit:
        """The mean over rows, as a circuit of one row: edge scores, node scores, ``bias`` and
        ``target_value`` averaged (the circuit of a dataset). Per-position scores are averaged too when
        every row has the same tokens and answer position (a circuit holds no padding mask to align prompts
        by); else they are dropped, with a warning. `RunningMean` gives the same over parts."""
        return self._mean_of(RunningMean().add(self), stacklevel=3)

    def _mean_of(self, acc: RunningMean, stacklevel: int) -> Circuit:
        out: dict[str, Any] = {name: acc.field_mean(name) for name in ("scores", "nodes", "bias", "target_value")}
        kept = acc.aligned()
        if kept is None and acc.holds("per_position"):
            warnings.warn("Circuit.mean: the rows are other prompts, so only the edges' totals are averaged; "
                          "dropped per_position", UserWarning, stacklevel=stacklevel)
        out["per_position"] = acc.field_mean("per_position") if kept is not None else None
        for name in ("positions", "token_ids", "str_tokens"):
            out[name] = None if kept is None else kept[name]
        return replace(self, **out, **acc.shared())

    def show(self, **kwargs: Any) -> Any:
        """`dpa_lens.plot.circuit` of this circuit (``row=``, ``top_n=``, ``threshold=``, ``title=``)."""
        return figure(self, "circuit", **kwargs)

    # ------------------------------------------------------------------ MIB's graph JSON
    def to_mib_json(self, path: str | os.PathLike, *, keep: int | Tensor | None = None, row: int = 0,
                    cfg: dict[str, Any] | None = None, absolute: bool = True) -> FilePath:
        """Write one row as MIB's circuit-localization graph JSON (``cfg``, ``nodes``, ``edges``; the format of
        ``hannamw/EAP-IG``'s ``Graph.to_json``), every edge of the graph with its score and ``in_graph`` flag.

        ``keep``: the edges marked ``in_graph``: None, this circuit's ``in_graph [writer, reader]``; an int ``n``,
        the ``n`` held edges of largest ``|score|`` (``absolute=False``: of largest signed score, MIB's ranking for
        CPR; ties in graph order); a bool mask ``[writer, reader]``.
        ``row``: the batch row of ``scores [batch, writer, reader]`` written. ``cfg``: MIB cfg values a circuit cannot
        know (``d_model``, required unless it was read from a MIB file; ``parallel_attn_mlp`` where its edges do not
        tell). Scores keep dpa_lens's sign. See `dpa_lens.results.mib.write_mib_json`. Returns the path written."""
        from dpa_lens.results.mib import write_mib_json

        return write_mib_json(self, path, keep=keep, row=row, cfg=cfg, absolute=absolute)

    @classmethod
    def from_mib_json(cls, path: str | os.PathLike, *, edges: Literal["all", "kept"] = "all") -> Circuit:
        """A circuit of one row from a MIB graph JSON (written by `to_mib_json`, MIB or ``hannamw/EAP-IG``), on the
        graph of the file's ``cfg``: ``scores [1, writer, reader]`` (float64) and ``in_graph [writer, reader]``, the
        edges the file lists (``edges="all"``) or those it marks ``in_graph``, its circuit, with scores 0 elsewhere
        (``edges="kept"``). A bad file is an `InputError` naming the problem. See `dpa_lens.results.mib.read_mib_json`."""
        from dpa_lens.results.mib import read_mib_json

        return read_mib_json(path, edges=edges)

    # ------------------------------------------------------------------ persistence
    def _to_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "readers": [list(r) for r in self.readers]}

    @classmethod
    def _from_state(cls, state: dict[str, Any]) -> dict[str, Any]:
        state = dict(state)
        if "mask" in state:  # files of version 1
            state["in_graph"] = state.pop("mask")
            state["method"] = {"dpa": "dpa_edges", "dpa (contrastive)": "dpa_edges (contrastive)"}.get(state["method"], state["method"])
        corrupted = state.get("settings", {}).pop("corrupted_str_tokens", None)
        if corrupted is not None:  # version 1 kept them in settings
            state["diagnostics"] = replace(state["diagnostics"], corrupted_str_tokens=corrupted)
        state["readers"] = [tuple(r) for r in state["readers"]]
        return state

    def __repr__(self) -> str:
        n = int(self.in_graph.sum())
        labels = self.target.get("labels")
        return (f"Circuit(method={self.method!r}, {len(self.writers)} writers, {len(self.readers)} readers, {n} edges, "
                f"batch={self.batch}" + (f", target={labels[0]}" if labels else "")
                + (f", paths={sum(len(p) for p in self.paths)}" if self.paths else "") + ")")
