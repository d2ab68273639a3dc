"""The residual graph every edge method scores: its nodes' names, its edges, and what each writer writes.

A **writer** adds to the residual stream: the token embeddings ``"embed"`` (with learned positions where
the model has them), a head ``"L{layer}H{head}"`` (its ``z W_O``), an MLP ``"L{layer}.mlp"`` (its ``post
W_out``), or a neuron ``"L{layer}N{neuron}"`` on request; through the sublayers' output norms with their
scales frozen where the model has them (Gemma); biases are no writer's. A **reader** reads the stream
through one input: a head ``(L{layer}H{head}, q|k|v)`` (grouped key/value heads split by the query head
that pulls them), an MLP ``(L{layer}.mlp, mlp)``, or the final readout ``(logit, logit)``. An edge exists
when the reader is downstream of the writer: a later layer; in sequential blocks also the writer's own
layer's MLP for a head; the logit for every writer.

`Graph` holds the node lists in one order, writers ``embed, L0H0 … L0H{H-1}, L0.mlp, L1H0 …`` and readers
``(L0H0, q), (L0H0, k), (L0H0, v), (L0H1, q) … (L0.mlp, mlp), (L1H0, q) … (logit, logit)`` (an attention-only
model has no MLP nodes), and the index arithmetic on that order, so that no module counts ``layer·(3H + 1)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from dpa_lens.blocks import mlp_post
from dpa_lens.errors import InputError
from dpa_lens.forward import CachedForward
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import push_norm
from dpa_lens.types import typechecked

Label = Literal["q", "k", "v", "mlp", "logit"]
LABELS: tuple[str, ...] = ("q", "k", "v", "mlp", "logit")
Edge = tuple[str, str, str]  # (writer, reader, path label)


# ---------------------------------------------------------------------------------------------- names
def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def mlp_name(layer: int) -> str:
    return f"L{layer}.mlp"


def neuron_name(layer: int, neuron: int) -> str:
    return f"L{layer}N{neuron}"


def unit_name(kind: str, layer: int, unit: int, position: int | None = None) -> str:
    """``L5H1`` (kind ``"heads"``), ``L9N200`` (``"neurons"``), with ``@position`` when given."""
    name = head_name(layer, unit) if kind == "heads" else neuron_name(layer, unit)
    return name if position is None else f"{name}@{position}"


def node_layer(name: str) -> float:
    """Where a node sits in depth: -1 for the embeddings, L for layer L's heads, L + 0.5 for its MLP
    and neurons, infinity for the logit (parallel blocks compare heads and MLPs by ``int``)."""
    if name == "embed":
        return -1.0
    if name == "logit":
        return float("inf")
    layer = int(name[1:].split("H")[0].split(".")[0].split("N")[0])
    return layer + (0.0 if "H" in name else 0.5)


def writer_kind(name: str) -> str:
    """``"embed"``, ``"head"``, ``"mlp"`` or ``"neuron"``."""
    if name == "embed":
        return "embed"
    return "mlp" if name.endswith(".mlp") else ("head" if "H" in name else "neuron")


def entry_stream(node: str, parallel: bool) -> int:
    """Where a writer's output enters the residual stream, as a stream index: ``2l`` is ``resid_pre(l)``,
    ``2l + 1`` ``resid_mid(l)``, ``2l + 2`` ``resid_post(l)`` (a reader's output enters where its node's does)."""
    if node == "embed":
        return 0
    return 2 * int(node_layer(node)) + (1 if "H" in node and not parallel else 2)


# ---------------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True)
class Graph:
    """The writers, readers and edges of a model's residual graph, and the index arithmetic on them."""

    n_layers: int
    n_heads: int
    parallel: bool
    has_mlp: bool = True  # False for attention-only models: no MLP writers or readers
    neuron_layers: tuple[int, ...] = ()  # layers whose neurons are writers too (after the others)
    d_mlp: int = 0
    writers: list[str] = field(init=False, compare=False)
    readers: list[tuple[str, str]] = field(init=False, compare=False)
    mask: Bool[Tensor, "writer reader"] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        L, H = self.n_layers, self.n_heads
        writers = ["embed"]
        readers: list[tuple[str, str]] = []
        for layer in range(L):
            readers += [(head_name(layer, h), p) for h in range(H) for p in ("q", "k", "v")]
            writers += [head_name(layer, h) for h in range(H)]
            if self.has_mlp:
                readers.append((mlp_name(layer), "mlp"))
                writers.append(mlp_name(layer))
        readers.append(("logit", "logit"))
        n_units = len(writers)
        writers += [neuron_name(layer, i) for layer in self.neuron_layers for i in range(self.d_mlp)]
        w_depth = torch.tensor([node_layer(w) for w in writers[:n_units]])
        r_depth = torch.tensor([node_layer(r) if r != "logit" else float("inf") for r, _ in readers])
        r_is_mlp = torch.tensor([p == "mlp" for _, p in readers])
        # a reader reads the writers above it in depth: a head those of earlier layers, an MLP also its own
        # layer's heads unless the block is parallel, the logit all. Neuron writers get their edges where a
        # method scores them (none by default).
        mask = w_depth[:, None] < r_depth[None, :]
        if self.parallel:
            mask &= ~((w_depth[:, None] == (r_depth[None, :] - 0.5)) & r_is_mlp[None, :])
        mask = torch.cat([mask, torch.zeros(len(writers) - n_units, len(readers), dtype=torch.bool)])
        object.__setattr__(self, "writers", writers)
        object.__setattr__(self, "readers", readers)
        object.__setattr__(self, "mask", mask)

    @classmethod
    def of(cls, view: ModelView, neuron_layers: Sequence[int] = ()) -> Graph:
        """The graph of a model (with the neurons of ``neuron_layers`` as writers)."""
        if neuron_layers and not view.rules.has_mlp:
            raise InputError("this model is attention-only (attn_only=True): it has no neurons to score as writers")
        return cls(view.n_layers, view.n_heads, view.rules.parallel, view.rules.has_mlp, tuple(neuron_layers),
                   view.d_mlp if neuron_layers else 0)

    # ------------------------------------------------------------------ index arithmetic
    @property
    def _m(self) -> int:
        return 1 if self.has_mlp else 0

    @property
    def n_units(self) -> int:
        """Writers that are not neurons: ``embed``, every head and every MLP."""
        return 1 + self.n_layers * (self.n_heads + self._m)

    @property
    def logit_reader(self) -> int:
        return len(self.readers) - 1

    def head_readers(self, layer: int) -> slice:
        """The readers of a layer's heads, ``(h, q), (h, k), (h, v)`` head by head."""
        r0 = layer * (3 * self.n_heads + self._m)
        return slice(r0, r0 + 3 * self.n_heads)

    def mlp_reader(self, layer: int) -> int:
        """The reader of a layer's MLP (right after its heads' readers)."""
        if not self.has_mlp:
            raise InputError("this model is attention-only (attn_only=True): its layers have no MLP")
        return layer * (3 * self.n_heads + 1) + 3 * self.n_heads

    def read_by_heads(self, layer: int) -> int:
        """How many writers a layer's heads read: a prefix of the writers (embed and earlier layers)."""
        return 1 + layer * (self.n_heads + self._m)

    def read_by_mlp(self, layer: int) -> int:
        """How many writers a layer's MLP reads: also its own layer's heads unless the block is parallel."""
        self.mlp_reader(layer)  # an attention-only model's layers have none
        return self.read_by_heads(layer) + (0 if self.parallel else self.n_heads)

    def writer_unit(self, writer: int) -> tuple[int, int]:
        """``(layer, unit)`` of a head or MLP writer index (unit ``H`` is the MLP); ``(-1, 0)`` for ``embed``."""
        return (-1, 0) if writer == 0 else divmod(writer - 1, self.n_heads + self._m)

    def reader_slots(self) -> list[tuple[int, str, int]]:
        """Per reader: ``(layer, path, head)`` (head -1 for MLPs; layer ``n_layers`` and head -1 for the logit)."""
        slots = []
        for layer in range(self.n_layers):
            slots += [(layer, p, h) for h in range(self.n_heads) for p in ("q", "k", "v")] + [(layer, "mlp", -1)] * self._m
        return slots + [(self.n_layers, "logit", -1)]

    def edge_mask(self, edges: Iterable[Edge] | None) -> Bool[Tensor, "writer reader"]:
        """The edges ``(writer, reader, path)`` asked for as a ``[writer, reader]`` mask (every edge for None)."""
        if edges is None:
            return self.mask.clone()
        chosen = torch.zeros_like(self.mask)
        w_index, r_index = {w: i for i, w in enumerate(self.writers)}, {r: i for i, r in enumerate(self.readers)}
        for edge in edges:
            if not (isinstance(edge, Sequence) and len(edge) == 3 and all(isinstance(s, str) for s in edge)):
                raise InputError(f"an edge is a tuple (writer, reader, path) of strings such as ('L0H1', 'L2H3', 'k'), got {edge!r}")
            writer, reader, path = edge
            if writer not in w_index:
                raise InputError(f"unknown writer {writer!r}: writers are 'embed', 'L{{layer}}H{{head}}'"
                                 + (" and 'L{layer}.mlp'" if self.has_mlp else " (an attention-only model: no MLPs)")
                                 + " "
                                 f"({len(self.writers)} in this model, from {self.writers[0]!r} to {self.writers[-1]!r})")
            if (reader, path) not in r_index:
                raise InputError(f"unknown reader {reader!r} with path {path!r}: readers are ('L{{layer}}H{{head}}', 'q'|'k'|'v'), "
                                 "('L{layer}.mlp', 'mlp') and ('logit', 'logit')")
            w, r = w_index[writer], r_index[(reader, path)]
            if not bool(self.mask[w, r]):
                raise InputError(f"there is no edge {writer} → {reader} [{path}]: {reader} does not read {writer} "
                                 "(a reader reads only writers upstream of it)")
            chosen[w, r] = True
        if not bool(chosen.any()):
            raise InputError("edges is empty: pass None for every edge, or a list of (writer, reader, path)")
        return chosen


def graph(n_layers: int, n_heads: int, *, parallel: bool, has_mlp: bool = True) -> tuple[list[str], list[tuple[str, str]], Tensor]:
    """``(writers, readers, edges that exist)`` of a model's residual graph (`Graph`, without neurons)."""
    g = Graph(n_layers, n_heads, parallel, has_mlp)
    return g.writers, g.readers, g.mask


# ---------------------------------------------------------------------------------------------- what writers write
def writer_hook_names(view: ModelView) -> list[str]:
    """The hooks from which every writer's output is read (`writer_outputs`), and the residual streams
    against which a cache is checked to be this model's."""
    rules = view.rules
    names = [hooks.EMBED, hooks.FINAL_NORMALIZED, hooks.resid_post(view.n_layers - 1)]
    for layer in range(view.n_layers):
        names += [hooks.resid_pre(layer), hooks.attn(layer, "z")]
        if rules.has_mlp:
            names += [hooks.mlp(layer, "pre")] + ([hooks.mlp(layer, "pre_linear")] if rules.gated else [])
        if rules.post_norms:
            names += [hooks.norm_scale(layer, "ln1_post")] + ([hooks.norm_scale(layer, "ln2_post")] if rules.has_mlp else [])
    return names


def mlp_hidden(fwd: CachedForward, layer: int) -> Float[Tensor, "batch pos d_mlp"]:
    """A layer's MLP activations ``post`` from the cached pre-activations."""
    gated = fwd.view.rules.gated
    return mlp_post(fwd.view.rules, fwd.act(hooks.mlp(layer, "pre")), fwd.act(hooks.mlp(layer, "pre_linear")) if gated else None)


@typechecked
def head_outputs(fwd: CachedForward, layer: int) -> Float[Tensor, "batch pos head d_model"]:
    """What each head of a layer adds to the stream, ``z W_O`` (through the attention output norm with its
    scale frozen, where the model has one); known before the layer's MLP runs. A value bias is no head's:
    it reaches every head's output as a constant (times the attention's mass, 1 on real tokens), and is the
    bias's share, as in DPA's node scores."""
    view = fwd.view
    a = view.attn(layer)
    z = fwd.act(hooks.attn(layer, "z"))
    if a.b_V is not None:
        z = z - fwd.pattern_mass(layer)[..., None] * a.b_V.to(z).repeat_interleave(view.n_heads // view.n_kv_heads, dim=0)
    heads = torch.einsum("bnhe,hed->bnhd", z, a.W_O)
    if view.rules.post_norms:
        heads = push_norm(heads, fwd.act(hooks.norm_scale(layer, "ln1_post"))[:, :, None], view.norm_weight("ln1_post", layer), center=False)
    return heads


@typechecked
def writer_outputs(fwd: CachedForward, layer: int) -> Float[Tensor, "batch pos unit d_model"]:
    """What each head of a layer (`head_outputs`), then its MLP (``post W_out``, through the MLP's output
    norm where the model has one), adds to the residual stream; biases left out (an attention-only
    model's layer: its heads only)."""
    view = fwd.view
    if not view.rules.has_mlp:
        return head_outputs(fwd, layer)
    mlp = mlp_hidden(fwd, layer) @ view.mlp(layer).W_out
    if view.rules.post_norms:
        mlp = push_norm(mlp, fwd.act(hooks.norm_scale(layer, "ln2_post")), view.norm_weight("ln2_post", layer), center=False)
    return torch.cat([head_outputs(fwd, layer), mlp[:, :, None]], dim=2)


@typechecked
def all_writer_outputs(fwd: CachedForward) -> Float[Tensor, "batch pos writer d_model"]:
    """``out_u`` of every writer in the order of `Graph` (neurons aside): the stream entering the first
    block, then each layer's heads and MLP (each computed on its layer's device, gathered on ``fwd.device``)."""
    outs = [fwd.act(hooks.resid_pre(0))[:, :, None]] + [writer_outputs(fwd, l) for l in range(fwd.view.n_layers)]
    return torch.cat([out.to(fwd.device) for out in outs], 2)


@typechecked
def writer_deltas(clean: CachedForward, corrupted: CachedForward) -> Float[Tensor, "batch pos writer d_model"]:
    """``out_u(clean) − out_u(corrupted)`` of every writer in the order of `Graph` (zero at padding)."""
    real = corrupted.inputs.real.to(corrupted.device)[:, :, None, None]
    return (all_writer_outputs(clean).to(corrupted.device) - all_writer_outputs(corrupted)) * real
