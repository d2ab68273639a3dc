"""Rerooting: DPA of ``x · direction`` at any residual location, or at one head's output.

DPA's sweep is a linear map of the target, so it can start anywhere, not only at the logit. With
``root=`` (`dpa_lens.dpa`, `dpa_lens.dpa_edges`, `dpa_lens.dpa_paths`), ``target`` is a direction
``d [d_model]`` (a linear probe, an SAE latent's encoder row, a head's output direction; or one per
batch row) and ``position`` the position where it is read. The explained quantity is

* at a residual hook, ``"blocks.{l}.hook_resid_pre"``, ``"blocks.{l}.hook_resid_mid"`` (sequential
  blocks) or ``"blocks.{l}.hook_resid_post"``: ``resid[position] · d``, on the raw stream (no norm);
* at a head, ``"L{l}H{h}"`` (a query head): ``head_out[position] · d``, where ``head_out = z_h W_O[h]``
  is what the head adds to the residual stream (through the model's attention output norm, scale
  frozen, where it has one; the output bias belongs to no head and is left out). The sweep starts
  with that head's own query, key and value rules: it asks what feeds the head.

Every score is then in the units of that quantity: writers above the root score zero, the root head
(a head root) scores the whole quantity, and ``target_value`` is the quantity as the forward computed
it (from the cached stream, or the head's cached ``z``). With ``Mu.content_only()`` the token scores
plus ``bias`` add up to it. In paths (`dpa_lens.dpa_paths`) and edges, the terminal node ``logit``
stands for the root's own read of the quantity.

The stream is TransformerLens's: in a LayerNorm model loaded with centred writing weights (as
`dpa_lens.load_model` does) it is the original model's stream minus its mean over ``d_model``, so a
direction's mean does not count there (compare with the original model through a mean-free direction).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.errors import InputError, TargetError
from dpa_lens.forward import CachedForward
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.ops import push_norm
from dpa_lens.types import typechecked

_RESID = re.compile(r"blocks\.(\d+)\.hook_resid_(pre|mid|post)")
_HEAD = re.compile(r"L(\d+)H(\d+)")


@dataclass(frozen=True)
class Root:
    """A parsed root: where the sweep starts and what it explains.

    ``stream`` places the root in depth: ``2l`` is ``resid_pre(l)``, ``2l + 1`` is ``resid_mid(l)``,
    ``2l + 2`` is ``resid_post(l)``; a head root sits at the stream its layer reads, ``2l``.
    """

    name: str
    layer: int  # the sweep's top layer (-1: the embeddings' stream, nothing to sweep)
    start_at: Literal["post", "mid"] | int  # see `sweep`
    stream: int
    head: int | None = None
    hook: str | None = None  # the cached stream the quantity is read from (None for a head)

    @property
    def hooks(self) -> list[str]:
        return [] if self.hook is None else [self.hook]

    @property
    def sweep_args(self) -> dict[str, Any]:
        return {"top_layer": self.layer, "start_at": self.start_at}

    @property
    def filter_hint(self) -> str:
        if self.start_at != "mid":  # DPA's names_filter caches every resid_pre and the last resid_post
            return "dpa_lens.dpa_names_filter(model)"
        return f"lambda name: dpa_lens.dpa_names_filter(model)(name) or name == {self.hook!r}"

    def direction(self, fwd: CachedForward) -> Float[Tensor, "batch d_model"]:
        if fwd.target is None or any(kind != "direction" for kind in fwd.target.logit):
            raise TargetError(f"with root={self.name!r} the target must be a direction [d_model] (a probe, an SAE encoder "
                              "row) or one per row: the quantity explained is the stream (or head output) · direction")
        return fwd.target.directions.to(fwd.device)

    @typechecked
    def start(self, fwd: CachedForward) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, " batch"]]:
        """The target at the root (the direction at each row's position, zero elsewhere) and its own bias (none)."""
        rows, pos = torch.arange(fwd.batch, device=fwd.device), fwd.positions.to(fwd.device)
        start = torch.zeros(fwd.batch, fwd.seq_len, fwd.view.d_model, device=fwd.device)
        start[rows, pos] = self.direction(fwd)
        return start, torch.zeros(fwd.batch, device=fwd.device)

    @typechecked
    def value(self, fwd: CachedForward) -> Float[Tensor, " batch"]:
        """The explained quantity as the forward computed it."""
        x = fwd.act(self.hook) if self.head is None else head_output(fwd, self.layer, self.head)
        rows, pos = torch.arange(fwd.batch, device=x.device), fwd.positions.to(x.device)  # where its layer is
        return (x[rows, pos].to(fwd.device) * self.direction(fwd)).sum(-1)

    def describe(self, fwd: CachedForward) -> dict[str, Any]:
        where = [f"{self.name}@{int(p)}" for p in fwd.positions]
        return {**fwd.target.describe(), "labels": [f"direction at {w}" for w in where], "root": self.name}


def parse_root(view: ModelView, root: str) -> Root:
    """Read a root name (see the module docstring) for this model."""
    L, H = view.n_layers, view.n_heads
    if not isinstance(root, str):
        raise InputError(f"root must be a residual hook name or a head 'L{{layer}}H{{head}}', got {type(root).__name__}")
    if m := _RESID.fullmatch(root):
        layer, where = int(m[1]), m[2]
        if not 0 <= layer < L:
            raise InputError(f"root {root!r}: layer {layer} is out of range (the model has {L} layers)")
        if where == "mid" and view.rules.parallel:
            raise InputError(f"root {root!r}: this model's blocks are parallel (attention and MLP read the same stream), "
                             "they have no resid_mid: use hook_resid_pre or hook_resid_post")
        if where == "pre":
            return Root(root, layer - 1, "post", 2 * layer, hook=hooks.resid_pre(layer))
        if where == "mid":
            return Root(root, layer, "mid", 2 * layer + 1, hook=hooks.resid_mid(layer))
        # resid_post(l) is resid_pre(l + 1), which DPA's names_filter caches
        return Root(root, layer, "post", 2 * layer + 2, hook=hooks.resid_pre(layer + 1) if layer + 1 < L else root)
    if m := _HEAD.fullmatch(root):
        layer, head = int(m[1]), int(m[2])
        if not (0 <= layer < L and 0 <= head < H):
            raise InputError(f"root {root!r} is out of range (the model has {L} layers of {H} query heads)")
        return Root(root, layer, head, 2 * layer, head=head)
    raise InputError(f"root {root!r} is neither a residual hook ('blocks.5.hook_resid_pre', 'blocks.5.hook_resid_mid', "
                     "'blocks.5.hook_resid_post') nor a head ('L5H1')")


@typechecked
def head_output(fwd: CachedForward, layer: int, head: int) -> Float[Tensor, "batch pos d_model"]:
    """What one head adds to the residual stream, ``z_h W_O[h]`` (through the output norm with its scale frozen)."""
    view = fwd.view
    out = fwd.act(hooks.attn(layer, "z"))[:, :, head] @ view.attn(layer).W_O[head]
    if view.rules.post_norms:
        out = push_norm(out, fwd.act(hooks.norm_scale(layer, "ln1_post")), view.norm_weight("ln1_post", layer), center=False)
    return out
