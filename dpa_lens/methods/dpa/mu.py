"""`Mu`: the weights of DPA's content and control paths, with the paper's presets."""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpa_lens.errors import InputError


@dataclass(frozen=True)
class Mu:
    """Weights of DPA's paths: query, key and value (content) in attention; gate and up in the MLP.

    A valid weighting has every weight in [0, 1], ``q + k + v = 1`` and ``gate + up = 1``.
    """

    q: float = 0.25
    k: float = 0.25
    v: float = 0.5
    gate: float = 0.5
    up: float = 0.5

    def __post_init__(self) -> None:
        values = {"q": self.q, "k": self.k, "v": self.v, "gate": self.gate, "up": self.up}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"Mu.{name} must be a finite number, got {value!r}")
            if not 0.0 <= value <= 1.0:
                raise InputError(f"Mu.{name} = {value} is outside [0, 1]")
        if abs(self.q + self.k + self.v - 1.0) > 1e-6:
            raise InputError(f"Mu: q + k + v must be 1 (attention's paths share its output), got {self.q + self.k + self.v}")
        if abs(self.gate + self.up - 1.0) > 1e-6:
            raise InputError(f"Mu: gate + up must be 1 (the MLP's paths share its output), got {self.gate + self.up}")

    @classmethod
    def paper_default(cls) -> Mu:
        """The authors' defaults: q = k = 0.25, v = 0.5, gate = up = 0.5."""
        return cls()

    @classmethod
    def content_only(cls) -> Mu:
        """Only the content paths (v = up = 1): linear in the embeddings, so token scores are complete."""
        return cls(q=0.0, k=0.0, v=1.0, gate=0.0, up=1.0)

    @classmethod
    def control_content(cls, p: float) -> Mu:
        """The paper's main sweep: content weight p everywhere, ((1-p)/2, (1-p)/2, p, 1-p, p)."""
        return cls(q=(1 - p) / 2, k=(1 - p) / 2, v=p, gate=1 - p, up=p)

    @classmethod
    def query_key(cls, p: float) -> Mu:
        """Split attention's control share (0.5) between query (p) and key (1-p); the rest at default."""
        return cls(q=0.5 * p, k=0.5 * (1 - p), v=0.5, gate=0.5, up=0.5)

    @classmethod
    def attention(cls, p: float) -> Mu:
        """Content weight p in attention only ((1-p)/2, (1-p)/2, p); the MLP at default."""
        return cls(q=(1 - p) / 2, k=(1 - p) / 2, v=p, gate=0.5, up=0.5)

    @classmethod
    def mlp(cls, p: float) -> Mu:
        """Content weight p in the MLP only (gate = 1-p, up = p); attention at default."""
        return cls(q=0.25, k=0.25, v=0.5, gate=1 - p, up=p)

    def as_dict(self) -> dict[str, float]:
        return {"q": self.q, "k": self.k, "v": self.v, "gate": self.gate, "up": self.up}
