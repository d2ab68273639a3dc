"""`Circuit` and `Path`: the result types of edge and path attribution.

A circuit is a set of *edges*: a **writer** (what adds to the residual stream: the token
embeddings ``"embed"``, a head ``"L{layer}H{head}"``, an MLP ``"L{layer}.mlp"``, or a neuron
``"L{layer}N{neuron}"`` on request) feeding a **reader** (a head ``"L{layer}H{head}"`` through its
query, key or value input, an MLP ``"L{layer}.mlp"`` through its input, or the ``"logit"``) along a
**path** label in ``q``, ``k``, ``v``, ``mlp``, ``logit``. An edge exists only when the reader is
downstream of the writer (a later layer; in sequential blocks also the writer's own layer's MLP for
a head; the logit for every writer).

``Circuit.scores [batch, writer, reader]`` holds edge scores summed over positions (zero where no
edge exists, see ``mask``); ``per_position [batch, pos, writer, reader]`` splits them by the position
where the writer writes and the reader reads (on request). Scores are in the units of the explained
quantity, like an `Attribution`'s. For DPA, a writer's outgoing edges add up to its node score.

A `Path` is a chain of hops from a writer to the logit (``embed@3 → L5H1[k] → L9H6[q] → logit``):
each hop after the first names the node that read the previous one and through which input.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path as FilePath
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from dpa_lens.circuits.paths import LABELS, Path, head_name, mlp_name, neuron_name, node_layer, path_from_state, path_state
from dpa_lens.errors import InputError
from dpa_lens.types import typechecked


@typechecked
@dataclass
class Circuit:
    """Edge scores of one method for a batch of prompts (see the module docstring)."""

    method: str
    writers: list[str]
    readers: list[tuple[str, str]]  # (reader node, path label)
    scores: Float[Tensor, "batch writer reader"]
    mask: Bool[Tensor, "writer reader"]
    per_position: Float[Tensor, "batch pos writer reader"] | None = None
    nodes: Float[Tensor, "batch writer"] | None = None  # the writers' node scores, where the method has them
    bias: Float[Tensor, " batch"] | None = None  # what no writer owns (biases), for methods that are complete
    target_value: Float[Tensor, " batch"] | None = None
    positions: Int[Tensor, " batch"] | None = None
    token_ids: Int[Tensor, "batch pos"] | None = None
    str_tokens: list[list[str]] | None = None
    paths: list[list[Path]] | None = None  # per row, strongest first
    target: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""

    def __post_init__(self) -> None:
        W, R = len(self.writers), len(self.readers)
        if tuple(self.scores.shape[1:]) != (W, R) or tuple(self.mask.shape) != (W, R):
            raise ValueError(f"Circuit: scores {tuple(self.scores.shape)} and mask {tuple(self.mask.shape)} must be "
                             f"[batch, {W} writers, {R} readers]")
        bad = [p for _, p in self.readers if p not in LABELS]
        if bad:
            raise ValueError(f"Circuit: reader paths must be among {LABELS}, got {sorted(set(bad))}")

    @property
    def batch(self) -> int:
        return self.scores.shape[0]

    def _row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not -self.batch <= row < self.batch:
            raise InputError(f"row {row!r} is out of range: this circuit has {self.batch} row(s)")
        return row % self.batch

    # ------------------------------------------------------------------ reading
    def edge(self, writer: str, reader: str, path: str, row: int = 0) -> float:
        """One edge's score (0 for an edge that does not exist)."""
        try:
            w, r = self.writers.index(writer), self.readers.index((reader, path))
        except ValueError:
            raise InputError(f"no edge {writer} → {reader} [{path}] in this circuit's graph") from None
        return float(self.scores[self._row(row), w, r])

    def outgoing(self, row: int = 0) -> Float[Tensor, " writer"]:
        """Each writer's edges summed (DPA: its node score)."""
        return self.scores[self._row(row)].sum(-1)

    def incoming(self, row: int = 0) -> Float[Tensor, " reader"]:
        """Each reader's (reader, path) edges summed."""
        return self.scores[self._row(row)].sum(0)

    def to_dataframe(self, *, row: int | None = None, per_position: bool = False) -> pd.DataFrame:
        """One table row per existing edge: ``writer, reader, path, score`` (and ``position`` when
        ``per_position``); with several batch rows and no ``row`` given, a ``row`` column first."""
        rows = range(self.batch) if row is None else [self._row(row)]
        w_idx, r_idx = torch.nonzero(self.mask, as_tuple=True)
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
            writer_kind: Literal["any", "embed", "head", "mlp"] = "any") -> pd.DataFrame:
        """The ``k`` strongest edges of one row (by |score| unless ``absolute=False``), optionally of one
        path label or one kind of writer."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        df = self.to_dataframe(row=row)
        if path is not None:
            if path not in LABELS:
                raise InputError(f"path must be one of {LABELS}, got {path!r}")
            df = df[df["path"] == path]
        if writer_kind != "any":
            kind = df["writer"].map(lambda w: "embed" if w == "embed" else ("mlp" if w.endswith(".mlp") else "head"))
            df = df[kind == writer_kind]
        key = df["score"].abs() if absolute else df["score"]
        return df.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def prune(self, *, top_n: int | None = None, threshold: float | None = None, row: int = 0) -> Circuit:
        """The circuit keeping only the ``top_n`` edges by |score| and/or those with |score| ≥ ``threshold``
        (of one row; scores of the others are kept on the same edges)."""
        if top_n is None and threshold is None:
            raise InputError("prune needs top_n or threshold")
        s = self.scores[self._row(row)].abs().masked_fill(~self.mask, -1.0)
        keep = self.mask.clone()
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
        return replace(self, scores=scores, mask=keep, per_position=per_pos, settings={**self.settings, "pruned_from": int(self.mask.sum())})

    def __getitem__(self, rows: int | slice) -> Circuit:
        sel = rows if isinstance(rows, slice) else slice(self._row(rows), self._row(rows) + 1)
        cut = lambda v: None if v is None else v[sel]  # noqa: E731
        target = {k: (v[sel] if isinstance(v, list) and len(v) == self.batch else v) for k, v in self.target.items()}
        return replace(self, scores=self.scores[sel], per_position=cut(self.per_position), nodes=cut(self.nodes), bias=cut(self.bias),
                       target_value=cut(self.target_value), positions=cut(self.positions), token_ids=cut(self.token_ids),
                       str_tokens=cut(self.str_tokens), paths=cut(self.paths), target=target)

    def show(self, **kwargs: Any) -> Any:
        """`dpa_lens.plot.circuit` of this circuit (``row=``, ``top_n=``, ``threshold=``, ``title=``)."""
        from dpa_lens import plot

        return plot.circuit(self, **kwargs)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | FilePath) -> FilePath:
        """Save to a file (``torch.save`` of plain tensors and metadata; `load` reads it back)."""
        path = FilePath(path).expanduser()
        if not path.parent.is_dir():
            raise InputError(f"cannot save to {path}: the folder {path.parent} does not exist")
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state = {k: (v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in state.items()}
        state["readers"] = [list(r) for r in self.readers]
        state["paths"] = None if self.paths is None else [[path_state(p) for p in row] for row in self.paths]
        torch.save({"dpa_lens_circuit": 1, **state}, path)
        return path

    @classmethod
    def load(cls, path: str | FilePath) -> Circuit:
        path = FilePath(path).expanduser()
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise InputError(f"{path} is not a saved dpa_lens Circuit ({type(err).__name__})") from None
        if not isinstance(state, dict) or state.pop("dpa_lens_circuit", None) != 1:
            raise InputError(f"{path} is not a saved dpa_lens Circuit")
        state["readers"] = [tuple(r) for r in state["readers"]]
        if state.get("paths") is not None:
            state["paths"] = [[path_from_state(p) for p in row] for row in state["paths"]]
        return cls(**state)

    def __repr__(self) -> str:
        n = int(self.mask.sum())
        labels = self.target.get("labels")
        return (f"Circuit(method={self.method!r}, {len(self.writers)} writers, {len(self.readers)} readers, {n} edges, "
                f"batch={self.batch}" + (f", target={labels[0]}" if labels else "")
                + (f", paths={sum(len(p) for p in self.paths)}" if self.paths else "") + ")")


def graph(n_layers: int, n_heads: int, *, parallel: bool, neurons: int = 0) -> tuple[list[str], list[tuple[str, str]], Tensor]:
    """The writers, readers and edge mask of a model's residual graph (see the module docstring).

    ``neurons`` > 0 adds ``L{l}N{n}`` writers (``neurons`` per layer) after the others.
    """
    writers = ["embed"]
    readers: list[tuple[str, str]] = []
    for layer in range(n_layers):
        readers += [(head_name(layer, h), p) for h in range(n_heads) for p in ("q", "k", "v")] + [(mlp_name(layer), "mlp")]
        writers += [head_name(layer, h) for h in range(n_heads)] + [mlp_name(layer)]
    readers.append(("logit", "logit"))
    writers += [neuron_name(layer, i) for layer in range(n_layers) for i in range(neurons)]
    w_depth = torch.tensor([node_layer(w) for w in writers])
    r_depth = torch.tensor([node_layer(r) if r != "logit" else float("inf") for r, _ in readers])
    r_is_mlp = torch.tensor([p == "mlp" for _, p in readers])
    # a reader reads the writers above it in depth: a head those of earlier layers, an MLP also its own
    # layer's heads unless the block is parallel, the logit all
    mask = w_depth[:, None] < r_depth[None, :]
    heads_of_layer = (w_depth[:, None] == (r_depth[None, :] - 0.5)) & r_is_mlp[None, :]
    if parallel:
        mask &= ~heads_of_layer
    return writers, readers, mask
