"""DPA's exact paths: chains ``writer → reader → … → reader → logit``, each with its exact share of the target.

A path's score is what its source writer, at its position, adds to the target through exactly that
chain of readers (a head's query, key or value input, or an MLP's input), each read by DPA's rule;
intermediate hops are summed over positions. The scores of all paths out of a writer add up to its
DPA node score, with no remainder, for every ``mu``.

`dpa_paths` finds the top ``k`` paths by a best-first search over suffixes ``r_1 → … → logit``.
The search order is a heuristic (a strong path can be missed); every reported score is exact.

See docs/methods/dpa-paths.md for the derivation, the search orders, measured recall and cost.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.graph import Graph, all_writer_outputs, entry_stream, head_name, mlp_name
from dpa_lens.methods.dpa.hooks import required_hooks
from dpa_lens.methods.dpa.method import start_target
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.methods.dpa.root import Root, parse_root
from dpa_lens.methods.dpa.rules import Propagator
from dpa_lens.models.view import ModelView
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Hop, Path
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel, typechecked

PATH_LABELS = ("q", "k", "v")
Order = Literal["positions", "writers", "flow"]


def dpa_paths(
    model: TLModel,
    cache: Cache,
    target: TargetLike,
    position: PositionLike = -1,
    mu: Mu | None = None,
    *,
    k: int | None = 20,
    max_depth: int = 4,
    per_position_source: bool = True,
    order: Order = "positions",
    max_expansions: int | None = 400,
    root: str | None = None,
    progress: bool = False,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: Literal["auto", "raw", "centered"] = "auto",
) -> list[list[Path]]:
    """The strongest DPA paths from the writers to the target, with their exact scores.

    Args:
        model, cache, target, position, mu, tokens, attention_mask, logit: as for `dpa_lens.dpa`.
        k: how many paths per row; ``None`` enumerates every path up to ``max_depth`` readers, whatever
            ``max_expansions`` (exponentially many: tiny models only).
        max_depth: the most readers between the source and the logit.
        per_position_source: a path's source carries its position (``embed@3 → L1H0[k] → logit``);
            ``False`` sums the source over positions too.
        order: which suffixes the search expands first: ``"positions"``, ``"writers"`` (slower, finds
            more of the true top ``k``) or ``"flow"`` (faster, finds fewer); see docs/methods/dpa-paths.md.
        max_expansions: the most suffixes expanded per row (``None``: no limit).
        root: explain ``x · target`` at another location (see `dpa_lens.methods.dpa.root`); the last
            hop ``logit`` then stands for that quantity.
        progress: show a progress bar over the expansions.

    Returns:
        Per batch row, a list of `Path` (hops source first, ``logit`` last; ``score`` in the units of
        the target), strongest ``|score|`` first.

    See docs/methods/dpa-paths.md for how the scores are derived and how the search orders compare.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise InputError(f"k must be a positive int or None (every path), got {k!r}")
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise InputError(f"max_depth must be a non-negative int, got {max_depth!r}")
    if order not in ("positions", "writers", "flow"):
        raise InputError(f"order must be 'positions', 'writers' or 'flow', got {order!r}")
    if max_expansions is not None and (isinstance(max_expansions, bool) or not isinstance(max_expansions, int) or max_expansions < 0):
        raise InputError(f"max_expansions must be a non-negative int or None, got {max_expansions!r}")
    fwd, rooted, mu = read_dpa_forward(model, cache, target, position, mu, root=root, method="DPA paths", tokens=tokens,
                                       attention_mask=attention_mask, logit=logit)
    with torch.no_grad():
        start = start_target(fwd)[0] if rooted is None else rooted.start(fwd)[0]
        return search_paths(fwd, start, mu, root=rooted, k=k, max_depth=max_depth, per_position_source=per_position_source,
                            order=order, max_expansions=max_expansions, progress=progress)


def read_dpa_forward(model: TLModel, cache: Cache, target: TargetLike, position: PositionLike, mu: Mu | None, *, root: str | None,
                     method: str, **kwargs) -> tuple[CachedForward, Root | None, Mu]:
    """`read_forward` for a DPA sweep from the logit or from ``root``; also checks ``mu``."""
    mu = Mu.paper_default() if mu is None else mu
    if not isinstance(mu, Mu):
        raise TypeError(f"mu must be a dpa_lens.Mu, got {type(mu).__name__}")
    view = ModelView(model)
    view.check_supported(method)
    rooted = None if root is None else parse_root(view, root)
    fwd = read_forward(model, cache, target, position, method=method,
                       hook_names=required_hooks(view, False) + ([] if rooted is None else rooted.hooks),
                       filter_hint="dpa_lens.dpa_names_filter(model)" if rooted is None else rooted.filter_hint, weights="every", **kwargs)
    return fwd, rooted, mu


@dataclass
class _Geometry:
    """Where writers enter and readers read the residual stream, as stream indices: ``2l`` is
    ``resid_pre(l)``, ``2l + 1`` ``resid_mid(l)`` (sequential blocks), ``2L`` the final stream."""

    n_layers: int
    n_heads: int
    parallel: bool
    has_mlp: bool = True

    def head_enters(self, layer: int) -> int:
        return 2 * layer + (2 if self.parallel else 1)

    def mlp_reads(self, layer: int) -> int:
        return 2 * layer + (0 if self.parallel else 1)

    def readers(self, stream: int) -> list[tuple[int, list[int], bool]]:
        """The readers that write into ``stream``: per layer, (layer, its heads, whether its MLP)."""
        return [(l, list(range(self.n_heads)), self.has_mlp and 2 * l + 2 <= stream)
                for l in range(self.n_layers) if self.head_enters(l) <= stream]


@dataclass(order=True)
class _Queued:
    """A suffix not yet expanded: one reader ahead of an expanded one."""

    priority: float  # minus the suffix's weight (see `dpa_paths`'s ``order``)
    tie: int
    parent: int  # index of the expanded suffix it extends
    layer: int
    head: int | None  # None: the MLP
    label: str  # q, k, v, mlp


@typechecked
def search_paths(
    fwd: CachedForward,
    start: Float[Tensor, "batch pos d_model"],
    mu: Mu,
    *,
    root: Root | None = None,
    k: int | None = 20,
    max_depth: int = 4,
    per_position_source: bool = True,
    order: Order = "positions",
    max_expansions: int | None = 400,
    progress: bool = False,
) -> list[list[Path]]:
    """Best-first search of DPA's paths for every row of a cached forward (see `dpa_paths`).

    ``start`` is the target at the root: the final stream, or the stream or head output of ``root``."""
    view = fwd.view
    geo = _Geometry(view.n_layers, view.n_heads, view.rules.parallel, view.rules.has_mlp)
    outs = all_writer_outputs(fwd)
    search = _Search(fwd, Propagator(fwd, mu), geo, outs, root, k, max_depth, per_position_source, order)
    max_expansions = None if k is None else max_expansions
    return [search.row(start, row, max_expansions, progress) for row in range(fwd.batch)]


class _Search:
    """The best-first search over one cached forward, row by row."""

    def __init__(self, fwd: CachedForward, rules: Propagator, geo: _Geometry, outs: Tensor, root: Root | None, k: int | None,
                 max_depth: int, per_position_source: bool, order: Order):
        self.fwd, self.rules, self.geo, self.outs, self.root = fwd, rules, geo, outs, root
        self.k, self.max_depth, self.per_position_source, self.order = k, max_depth, per_position_source, order
        self.names = Graph(geo.n_layers, geo.n_heads, geo.parallel, geo.has_mlp).writers  # embed, then each layer's heads and MLP
        self.enters = torch.tensor([entry_stream(n, geo.parallel) for n in self.names], device=fwd.device)
        # the bias-free stream at every stream index: the writers that entered at or before it
        self.streams = torch.stack([outs[:, :, self.enters <= s].sum(2) for s in range(2 * geo.n_layers + 1)])  # [stream, b, pos, d]
        self.tie = itertools.count()

    def row(self, start: Tensor, row: int, max_expansions: int | None, progress: bool) -> list[Path]:
        geo, rules, root = self.geo, self.rules, self.root
        self.b, self.strs = row, (self.fwd.inputs.str_tokens[row] if self.fwd.inputs.str_tokens else None)
        self.expanded: list[tuple[Tensor, tuple[Hop, ...]]] = []  # (field [batch, pos, d_model], hops from its first reader)
        self.found: list[tuple[float, int, Path]] = []  # min-heap on |score| of the best paths (every path when k is None)
        self.queue: list[_Queued] = []
        field = torch.zeros_like(start)
        field[row] = start[row]
        suffix = (Hop("logit", "logit", int(self.fwd.positions[row])),)
        if root is not None and root.head is not None:  # the quantity is one head's output: only that head reads it
            only = torch.tensor([n == root.name for n in self.names], device=self.enters.device)
            self.expand(field, suffix, only, [(root.layer, [root.head], False)])
        else:
            stream = 2 * geo.n_layers if root is None else root.stream
            self.expand(field, suffix, self.enters <= stream, geo.readers(stream))
        with tqdm(total=max_expansions, desc="DPA paths", disable=not progress, leave=False) as bar:
            while self.queue and (max_expansions is None or len(self.expanded) <= max_expansions):
                q = heapq.heappop(self.queue)
                if self.k is not None and len(self.found) >= self.k and -q.priority <= self.found[0][0]:
                    break  # no queued suffix weighs more than the k-th path's |score|
                parent, suffix = self.expanded[q.parent]
                home = self.fwd.device  # a split model's steps run on their layers' devices; the search keeps its fields here
                if q.head is None:
                    field, node, stream = rules.mlp(q.layer, parent).update.to(home), mlp_name(q.layer), geo.mlp_reads(q.layer)
                else:
                    field = rules.attention(q.layer, parent, readers=True).readers[:, :, q.head, PATH_LABELS.index(q.label)].to(home)
                    node, stream = head_name(q.layer, q.head), 2 * q.layer
                self.expand(field, (Hop(node, q.label), *suffix), self.enters <= stream, geo.readers(stream))
                bar.update()
        return [p for _, _, p in sorted(self.found, key=lambda item: (-item[0], item[1]))]

    def expand(self, field: Tensor, suffix: tuple[Hop, ...], writers: Tensor, readers: list[tuple[int, list[int], bool]]) -> None:
        """Score every path ``writer → suffix`` (for the ``writers`` that may read ``field``), and queue the
        suffix's extensions by ``readers`` (as `_Geometry.readers` gives them) that carry anything."""
        index, b = len(self.expanded), self.b
        self.expanded.append((field, suffix))
        self.score_paths(field[b], suffix, writers)
        if len(suffix) > self.max_depth:  # the logit hop is not a reader
            return
        for layer, heads, with_mlp in readers:
            split = self.rules.attention(layer, field, readers=True).readers[b].to(field.device)  # [pos, head, (q, k, v), d_model]
            weights = self.weights(2 * layer, split.flatten(1, 2)).view(-1, 3).tolist()
            carries = (split.abs().amax(dim=(0, 3)) > 0).tolist()
            for h in heads:
                for j, label in enumerate(PATH_LABELS):
                    if carries[h][j]:
                        heapq.heappush(self.queue, _Queued(-weights[h][j], next(self.tie), index, layer, h, label))
            if with_mlp:
                update = self.rules.mlp(layer, field).update[b].to(field.device)
                if bool(update.abs().max() > 0):
                    weight = float(self.weights(self.geo.mlp_reads(layer), update[:, None])[0])
                    heapq.heappush(self.queue, _Queued(-weight, next(self.tie), index, layer, None, "mlp"))

    def weights(self, stream: int, fields: Tensor) -> Tensor:
        """How much the suffixes with ``fields [pos, suffix, d_model]`` at ``stream`` weigh (``order``)."""
        if self.order == "writers":  # Σ |score| of the paths one writer longer
            return torch.einsum("pwd,psd->pws", self.outs[self.b][:, self.enters <= stream], fields).abs().sum((0, 1))
        flow = torch.einsum("pd,psd->ps", self.streams[stream, self.b], fields)  # per position: Σ of the paths through it
        return flow.sum(0).abs() if self.order == "flow" else flow.abs().sum(0)

    def score_paths(self, field: Tensor, suffix: tuple[Hop, ...], writers: Tensor) -> None:
        """Keep the paths ``writer@p → suffix`` that rank among the best found."""
        scores = torch.einsum("pwd,pd->pw", self.outs[self.b][:, writers], field)  # [pos, writer]
        if not self.per_position_source:
            scores = scores.sum(0, keepdim=True)
        names = [n for n, w in zip(self.names, writers.tolist()) if w]
        flat = scores.flatten()
        for i in flat.abs().topk(flat.numel() if self.k is None else min(self.k, flat.numel())).indices.tolist():
            score = float(flat[i])
            full = self.k is not None and len(self.found) >= self.k
            if full and abs(score) <= self.found[0][0]:
                break
            p, w = divmod(i, scores.shape[1])
            pos = p if self.per_position_source else None
            path = Path(hops=(Hop(names[w], None, pos), *suffix), score=score, method="dpa",
                        source_token=self.strs[pos] if self.strs is not None and pos is not None else None)
            (heapq.heapreplace if full else heapq.heappush)(self.found, (abs(score), next(self.tie), path))
