"""Which TransformerLens line is installed, and which kind of model we were handed.

TransformerLens 3.x has ``HookedTransformer`` (and an early ``TransformerBridge``); 4.x removed
``HookedTransformer`` and keeps only ``TransformerBridge``. Everything else in dpa_lens asks
these helpers instead of importing either class directly.
"""

from __future__ import annotations

import inspect
from functools import cache
from importlib.metadata import version
from typing import Any

import transformer_lens

TL_VERSION: str = version("transformer_lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])


@cache
def hooked_transformer_class() -> type | None:
    """``HookedTransformer`` on TransformerLens 3.x, None on 4.x (where it was removed)."""
    try:
        from transformer_lens import HookedTransformer  # type: ignore[attr-defined]
    except ImportError:
        return None
    return HookedTransformer


@cache
def bridge_class() -> type | None:
    """``TransformerBridge`` where this TransformerLens has one."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


def is_hooked_transformer(model: Any) -> bool:
    cls = hooked_transformer_class()
    return cls is not None and isinstance(model, cls)


def is_bridge(model: Any) -> bool:
    cls = bridge_class()
    return cls is not None and isinstance(model, cls)


def is_tl_model(model: Any) -> bool:
    return is_hooked_transformer(model) or is_bridge(model)


def lean_logits(model: Any) -> dict[str, Any]:
    """Keyword arguments to ``model``'s forward that skip the ``[pos, vocab]`` logits: a
    ``HookedTransformer`` stops before the unembedding (``return_type=None``), a bridge whose
    ``transformers`` forward takes ``logits_to_keep`` computes the last position's only."""
    if not is_bridge(model):
        return {"return_type": None}
    hf = getattr(model, "original_model", None)
    return {"logits_to_keep": 1} if hf is not None and "logits_to_keep" in inspect.signature(hf.forward).parameters else {}


def default_line() -> str:
    """The model class `load_model` builds: "hooked" on 3.x, "bridge" on 4.x."""
    return "hooked" if hooked_transformer_class() is not None else "bridge"


__all__ = [
    "TL_VERSION",
    "TL_MAJOR",
    "bridge_class",
    "default_line",
    "hooked_transformer_class",
    "is_bridge",
    "is_hooked_transformer",
    "is_tl_model",
    "lean_logits",
    "transformer_lens",
]
