"""`Path` and `Hop`: named chains from a writer to the logit, shared by every method that finds paths
(DPA's exact paths, Unpack's). Node names and hop labels are those of `dpa_lens.graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dpa_lens.errors import InputError
from dpa_lens.graph import LABELS, Label, node_layer


@dataclass(frozen=True)
class Hop:
    """One node of a path: ``node`` read the previous hop through ``label`` (None for the source),
    at ``position`` (None where the path is summed over positions)."""

    node: str
    label: Label | None = None
    position: int | None = None

    def __str__(self) -> str:
        s = self.node + (f"[{self.label}]" if self.label not in (None, "logit") else "")
        return s + (f"@{self.position}" if self.position is not None else "")


@dataclass(frozen=True)
class Path:
    """A chain of hops from a source writer to the logit, with its score.

    Attributes:
        hops: source first, ``logit`` last.
        score: the path's share of the explained quantity (same units as node scores).
        method: which method found it (``"dpa"``, ``"unpack"``, ...).
        source_token: the input token at the source position, where it has one.
        extra: method-specific numbers (Unpack's percent credit, say).
    """

    hops: tuple[Hop, ...]
    score: float
    method: str = ""
    source_token: str | None = None
    extra: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def source(self) -> Hop:
        return self.hops[0]

    @property
    def source_pos(self) -> int | None:
        return self.hops[0].position

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(h.label for h in self.hops[1:])

    def __str__(self) -> str:
        return " → ".join(str(h) for h in self.hops)

    def check(self) -> None:
        """Raise `InputError` unless the hops go down in depth toward the logit with valid labels."""
        if len(self.hops) < 2 or self.hops[-1].node != "logit":
            raise InputError(f"a path ends at the logit: {self}")
        for a, b in zip(self.hops, self.hops[1:]):
            if b.label not in LABELS:
                raise InputError(f"hop {b} has no valid label (one of {LABELS})")
            if not node_layer(a.node) < node_layer(b.node):
                raise InputError(f"hop {a} → {b} does not go downstream")


def path_state(p: Path) -> dict[str, Any]:
    return {"hops": [[h.node, h.label, h.position] for h in p.hops], "score": p.score, "method": p.method,
            "source_token": p.source_token, "extra": dict(p.extra)}


def path_from_state(s: dict[str, Any]) -> Path:
    return Path(hops=tuple(Hop(*h) for h in s["hops"]), score=s["score"], method=s["method"], source_token=s["source_token"],
                extra=s["extra"])


