"""Unpack's two passes over one row, made together from the last layer down.

* The **flow** sweep (token credit): unpruned and linear. Every component holds two credit vectors
  over positions, what it got straight from a seed (split with the depth-0 rules) and what it
  inherited (split with the deeper rules); layer by layer from the top (the MLP before the heads, as
  a sequential MLP reads its own layer's heads), each component hands its credit to its children.
* The **path** recursion: the same splits with the recursion's rule set, following every chain of
  hops whose credit stays ``>= min_frac`` in size at each split (first at the source positions of a
  head, then at each child), down to an embedding. Paths are kept as a tree (each hop points to its
  parent), built one component at a time: a component is expanded once, with all the credit rows
  that reached it, after every component that reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dpa_lens.methods.unpack.decomposition import Decomposition, HeadTables, MLPTables
from dpa_lens.methods.unpack.rules import branch_weights
from dpa_lens.progress import progress_bar as tqdm

LABELS: tuple[str | None, ...] = (None, "k", "q", "v", "mlp")
CODE = {label: i for i, label in enumerate(LABELS)}
CHUNK = 1 << 21  # credit rows x children expanded at once


@dataclass
class RowTrace:
    """One row's result, at its real positions (``n``) and components (``C``).

    ``flow [C, n]``: credit that reached each component at each position (a head's query position),
    raw; ``credit [n]``: token credit (what reached the embeddings), raw; ``path_credit [n]``: the same
    from the pruned recursion; ``paths``: the strongest paths as ``(hops, raw credit)`` with hops
    ``(node, label, local position)`` from the source embedding to the logit; ``found``: how many
    paths the recursion found.
    """

    flow: Tensor
    credit: Tensor
    path_credit: Tensor
    paths: list[tuple[list[tuple[str, str | None, int]], float]]
    found: int


@dataclass
class _Tree:
    """The recursion's hops so far: one row per (component, position) a chain reached, queued by the
    stage that expands it (``stage [C]``: the embeddings 0, then per layer its heads and its MLP)."""

    stage: Tensor
    min_frac: float
    max_depth: int
    parent: list[Tensor] = field(default_factory=list)
    comp: list[Tensor] = field(default_factory=list)
    label: list[Tensor] = field(default_factory=list)
    pos: list[Tensor] = field(default_factory=list)
    depth: list[Tensor] = field(default_factory=list)
    size: int = 0
    pending: dict[int, list[tuple[Tensor, ...]]] = field(default_factory=dict)

    def add(self, parent: Tensor, comp: Tensor, label: int, pos: Tensor, credit: Tensor, depth: Tensor) -> None:
        """Record the hops that pass the gates, and queue them for their stage."""
        keep = (credit.abs() >= self.min_frac) & (depth <= self.max_depth)
        parent, comp, pos, credit, depth = parent[keep], comp[keep], pos[keep], credit[keep], depth[keep]
        m = int(comp.numel())
        if not m:
            return
        ids = torch.arange(self.size, self.size + m, device=comp.device)
        self.size += m
        for table, t in ((self.parent, parent), (self.comp, comp), (self.pos, pos), (self.depth, depth)):
            table.append(t)
        self.label.append(torch.full_like(comp, label))
        stage = self.stage[comp]
        order = torch.argsort(stage, stable=True)
        stages, counts = torch.unique_consecutive(stage[order], return_counts=True)
        chunks = [t[order].split(counts.tolist()) for t in (comp, pos, credit, depth, ids)]
        for i, st in enumerate(stages.tolist()):
            self.pending.setdefault(st, []).append(tuple(chunk[i] for chunk in chunks))

    def take(self, stage: int) -> tuple[Tensor, ...] | None:
        """``(component, pos, credit, depth, id)`` of every hop queued for a stage."""
        rows = self.pending.pop(stage, None)
        return None if rows is None else tuple(torch.cat(parts) for parts in zip(*rows))

    def tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(parent, component, label, position, depth)`` of every hop, by id, on the CPU."""
        return tuple(torch.cat(parts).cpu() for parts in (self.parent, self.comp, self.label, self.pos, self.depth))

    def chains(self, same: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Each hop's chain id: hops with the same chain from the root (components, labels, positions;
        components mapped by ``same [C]`` first) get the same id. Also returns `tables`."""
        parent, comp, label, pos, depth = tables = self.tables()
        chain = torch.empty_like(parent)
        n_comp, n_pos = len(same), int(pos.max()) + 1
        offset = 0
        for d in range(int(depth.max()) + 1):  # a hop's parent is one level up
            at = torch.nonzero(depth == d).flatten()
            up = parent[at]
            key = torch.where(up >= 0, chain[up.clamp_min(0)], -1) + 1
            key = ((key * n_comp + same.cpu()[comp[at]]) * len(LABELS) + label[at]) * n_pos + pos[at]
            unique, inverse = torch.unique(key, return_inverse=True)
            chain[at] = offset + inverse
            offset += len(unique)
        return chain, tables


def _expand_mlp(tree: _Tree, rows: tuple[Tensor, ...], T: MLPTables, children: Tensor) -> None:
    _, pos, credit, depth, ids = rows
    shares = torch.where((depth == 0)[:, None], T.first["paths"][pos], T.deeper["paths"][pos])
    child = credit[:, None] * shares
    i, j = torch.nonzero(child.abs() >= tree.min_frac, as_tuple=True)
    tree.add(ids[i], children[j], CODE["mlp"], pos[i], child[i, j], depth[i] + 1)


def _expand_heads(tree: _Tree, rows: tuple[Tensor, ...], T: HeadTables, head: Tensor, children: Tensor,
                  weights: dict[str, float]) -> None:
    """Expand hops at heads (``head``: each row's index into ``T.heads``)."""
    _, pos, credit, depth, ids = rows
    factors = torch.where((depth == 0)[:, None], T.factors0[head, pos], T.factors[head, pos])
    at_source = credit[:, None] * factors  # [row, s]
    passes = at_source.abs() >= tree.min_frac
    step = max(1, CHUNK // max(1, children.numel()))
    for branch, w in weights.items():
        table, peak = T.shares["paths"][branch], T.peak[branch]
        bound = peak[head, :] if branch == "v" else peak[head, pos]  # [row, s]: the largest share
        r, s = torch.nonzero(passes & (at_source.abs() * w * bound >= tree.min_frac), as_tuple=True)
        for start in range(0, int(r.numel()), step):
            rc, sc = r[start:start + step], s[start:start + step]
            shares = table[head[rc], sc] if branch == "v" else table[head[rc], pos[rc], sc]
            child = at_source[rc, sc][:, None] * w * shares
            i, j = torch.nonzero(child.abs() >= tree.min_frac, as_tuple=True)
            child_pos = pos[rc] if branch == "q" else sc
            tree.add(ids[rc][i], children[j], CODE[branch], child_pos[i], child[i, j], depth[rc][i] + 1)


def _flow_mlp(fresh: Tensor, inherited: Tensor, x: int, T: MLPTables, children: Tensor) -> None:
    handed = fresh[x][:, None] * T.first["flow"] + inherited[x][:, None] * T.deeper["flow"]  # [q, child]
    inherited.index_add_(0, children, handed.T)


def _flow_heads(fresh: Tensor, inherited: Tensor, xs: Tensor, T: HeadTables, children: Tensor, weights: dict[str, float]) -> None:
    at_source = fresh[xs][:, :, None] * T.factors0 + inherited[xs][:, :, None] * T.factors  # [head, q, s]
    for branch, w in weights.items():
        table = T.shares["flow"][branch]
        if branch == "k":
            handed = torch.einsum("hqs,hqsc->cs", at_source, table)
        elif branch == "q":
            handed = torch.einsum("hqs,hqsc->cq", at_source, table)
        else:
            handed = torch.einsum("hs,hsc->cs", at_source.sum(1), table)
        inherited.index_add_(0, children, w * handed)


def trace(
    dec: Decomposition,
    seeds: Tensor,
    q0: int,
    d_t: Tensor,
    *,
    min_frac: float,
    max_depth: int,
    top_paths: int,
    progress: bool,
) -> RowTrace:
    """Both passes from ``seeds [C]`` (credit at local position q0) down to the embeddings. Paths end
    at ``logit@q0``: the quantity explained (the target's logit, or a root's credit)."""
    n, C = dec.r.n, len(dec.names)
    dev = seeds.device
    fresh = torch.zeros(C, n, dtype=seeds.dtype, device=dev)
    inherited = torch.zeros_like(fresh)
    seeded = torch.nonzero((seeds != 0) & ~dec.bias).flatten()  # biases carry no input information
    fresh[seeded, q0] = seeds[seeded]
    # stages: the embeddings 0, layer l's heads 2l + 1, its MLP 2l + 2 (expanded from the top down)
    stage = torch.zeros(C, dtype=torch.long, device=dev)
    for layer, (heads, mlp) in enumerate(zip(dec.head_index, dec.mlp_index)):
        stage[heads] = 2 * layer + 1
        stage[mlp] = 2 * layer + 2
    tree = _Tree(stage, min_frac, max_depth)
    zero = torch.zeros_like(seeded)
    tree.add(torch.full_like(seeded, -1), seeded, CODE[None], zero + q0, seeds[seeded], zero)
    flow_w = branch_weights(dec.preset, quirks=dec.quirks, rule_set="flow")
    path_w = branch_weights(dec.preset, quirks=dec.quirks, rule_set="paths")

    def live(xs: list[int]) -> bool:
        return bool(fresh[xs].any() or inherited[xs].any())

    for layer in tqdm(reversed(range(dec.view.n_layers)), total=dec.view.n_layers, desc="Unpack", disable=not progress, leave=False):
        x = dec.mlp_index[layer]
        rows = tree.take(2 * layer + 2)
        if live([x]) or rows is not None:
            children, T = dec.mlp(layer, d_t)
            T = T.to(dev)  # made on the layer's device (a split model), read where the credit is
            children_t = torch.tensor(children, device=dev, dtype=torch.long)
            _flow_mlp(fresh, inherited, x, T, children_t)
            if rows is not None:
                _expand_mlp(tree, rows, T, children_t)
        first_head = dec.head_index[layer][0]
        rows = tree.take(2 * layer + 1)
        if not live(dec.head_index[layer]) and rows is None:
            continue
        A = dec.attention(layer, d_t)
        children_t = torch.tensor(A.children, device=dev, dtype=torch.long)
        for group in A.groups():
            xs = [first_head + h for h in group]
            in_group = None if rows is None else (rows[0] >= xs[0]) & (rows[0] <= xs[-1])
            if not live(xs) and (in_group is None or not bool(in_group.any())):
                continue
            T = A.heads(group).to(dev)
            _flow_heads(fresh, inherited, torch.tensor(xs, device=dev), T, children_t, flow_w)
            if in_group is not None and bool(in_group.any()):
                mine = tuple(t[in_group] for t in rows)
                _expand_heads(tree, mine, T, mine[0] - xs[0], children_t, path_w)

    flow = fresh + inherited
    embeds = [i for i, nm in enumerate(dec.names) if nm in ("embed", "pos_embed")]
    credit = sum(flow[i] for i in embeds)
    path_credit = torch.zeros(n, dtype=seeds.dtype, device=dev)
    found = tree.take(0)
    if found is None:
        return RowTrace(flow=flow, credit=credit, path_credit=path_credit, paths=[], found=0)
    _, pos, raw, _, ids = found
    path_credit.index_add_(0, pos, raw)
    paths, count = _strongest(tree, dec.names, embeds, ids.cpu(), raw.cpu(), top_paths)
    paths = [(hops + [("logit", "logit", q0)], score) for hops, score in paths]
    return RowTrace(flow=flow, credit=credit, path_credit=path_credit, paths=paths, found=count)


def _strongest(tree: _Tree, names: list[str], embeds: list[int], ids: Tensor, raw: Tensor, top: int):
    """The ``top`` strongest paths ending at the hops ``ids`` (with credit ``raw``), as ``(hops from the
    embedding to the root, credit)``, and how many paths there are. Hops with the same chain are one
    path: a Q read reached from several source positions, the token embedding and the learned position."""
    same = torch.arange(len(names))
    same[embeds] = embeds[0]
    chain, (parent, comp, label, pos, _) = tree.chains(same)
    ends, which = torch.unique(chain[ids], return_inverse=True)
    merged = torch.zeros(len(ends), dtype=raw.dtype).index_add_(0, which, raw)
    one = torch.full((len(ends),), len(which), dtype=torch.long).scatter_reduce_(0, which, torch.arange(len(which)), "amin")
    parent, comp, label, pos = (t.tolist() for t in (parent, comp, label, pos))
    paths = []
    for u in torch.argsort(-merged.abs(), stable=True)[:top].tolist():
        node = int(ids[one[u]])
        hops: list[tuple[str, str | None, int]] = [("embed", None, pos[node])]
        child_label, node = label[node], parent[node]
        while node != -1:  # each hop is read through the label of the hop below it
            hops.append((names[comp[node]], LABELS[child_label], pos[node]))
            child_label, node = label[node], parent[node]
        paths.append((hops, float(merged[u])))
    return paths, len(ends)
