"""Types of dpa_lens's public signatures, and the switch that checks tensor shapes at test time.

* `TLModel`: a TransformerLens model of either line (``HookedTransformer`` on 3.x,
  ``TransformerBridge`` on 4.x). Both have ``cfg``, ``run_with_cache`` and ``to_tokens``.
* `Cache`: TransformerLens's ``ActivationCache`` (what ``run_with_cache`` returns second).
* `TargetLike`, `PromptLike`, `PositionLike`: the accepted forms of ``target``, prompts and answer
  positions (see `dpa_lens.targets` and `dpa_lens.inputs`).

Tensor shapes are written with jaxtyping (``Float[Tensor, "batch pos"]``). Functions decorated
with `typechecked` have them checked by beartype when ``DPA_LENS_TYPECHECK=1`` (the test suite sets
it): a wrong shape or dtype is then an error at the call. Without it the decorator does nothing,
so users pay no cost. Public functions check their arguments themselves (`dpa_lens.validation`),
so that a user sees dpa_lens's message rather than a type checker's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover - for readers and type checkers only
    from transformer_lens import ActivationCache as Cache
else:
    try:
        from transformer_lens import ActivationCache as Cache
    except ImportError:  # pragma: no cover - every supported TransformerLens has it
        Cache = Any


@runtime_checkable
class TLModel(Protocol):
    """A TransformerLens model: ``HookedTransformer`` (3.x) or ``TransformerBridge`` (4.x)."""

    cfg: Any

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, *args: Any, **kwargs: Any) -> Any: ...


TokenLike = int | str | Tensor
"""One token: an id, or a string that is exactly one token (mind the leading space)."""

TargetLike = TokenLike | tuple | Sequence[Any] | Callable[[Tensor], Tensor]
"""A token, a ``(correct, incorrect)`` pair, a direction ``[d_model]``, a list with one per row, or (for the methods
that run the model) a metric ``metric(logits) -> scalar``."""

PromptLike = str | Sequence[str] | Tensor
"""A prompt, a list of prompts (padded as ``model.to_tokens`` pads), or token ids ``[batch, pos]``."""

PositionLike = int | Sequence[int] | Tensor
"""An answer position (negative: from each row's last real token), or one per row."""

F = TypeVar("F", bound=Callable[..., Any])

TYPECHECK = os.environ.get("DPA_LENS_TYPECHECK") == "1"


def typechecked(fn: F) -> F:
    """Check ``fn``'s jaxtyping annotations with beartype when ``DPA_LENS_TYPECHECK=1``; else return it as is."""
    if not TYPECHECK:
        return fn
    from beartype import beartype
    from jaxtyping import jaxtyped

    return jaxtyped(typechecker=beartype)(fn)  # type: ignore[return-value]


__all__ = ["Cache", "PositionLike", "PromptLike", "TLModel", "TargetLike", "TokenLike", "typechecked"]
