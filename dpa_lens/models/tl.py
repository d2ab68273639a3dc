"""Which TransformerLens line is installed, and which kind of model we were handed.

TransformerLens 3.x has ``HookedTransformer`` (and an early ``TransformerBridge``); 4.x removed
``HookedTransformer`` and keeps only ``TransformerBridge``. Everything else in dpa_lens asks
these helpers instead of importing either class directly.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import threading
import weakref
from collections.abc import Callable
from functools import cache
from importlib.metadata import version
from typing import Any, TypeVar

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


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its RLock, gone with the model
_LOCKS_GUARD = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


def model_lock(model: Any) -> Any:
    """The re-entrant lock that dpa_lens holds on ``model`` while one of its calls runs it.

    TransformerLens keeps a forward's hooks on the model itself: two forwards with hooks at once (two
    threads sharing a model) would each cache, or patch, the other's activations. Holding the lock, a
    second thread's call waits for the first. An object that cannot be a model gets no lock (a
    ``nullcontext``): the call itself then says what is wrong."""
    try:
        with _LOCKS_GUARD:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = _LOCKS[model] = threading.RLock()
            return lock
    except TypeError:  # not hashable or not weakly referable: no model
        return contextlib.nullcontext()


@contextlib.contextmanager
def grouped_hooks(model: Any) -> Any:
    """Within it, a ``HookedTransformer`` configured with ``ungroup_grouped_query_attention`` (as MIB and the EAP-IG
    reference configure grouped-query models) runs with the flag off. The flag changes the shapes of the key and value
    hooks (each key/value head repeated for the query heads that share it), not one value of the forward: dpa_lens's
    methods read and patch the grouped hooks, and the user's flag is restored on the way out."""
    cfg = getattr(model, "cfg", None)
    if not getattr(cfg, "ungroup_grouped_query_attention", False):
        yield
        return
    cfg.ungroup_grouped_query_attention = False
    try:
        yield
    finally:
        cfg.ungroup_grouped_query_attention = True


_UNGROUPED = re.compile(r"blocks\.\d+\.attn\.(hook_k|hook_v|hook_rot_k|k_norm\.hook_scale)")


def grouped_cache(cache: Any, n_heads: int, n_kv_heads: int) -> Any:
    """``cache``, or where it was made with ``ungroup_grouped_query_attention`` (keys and values ``[batch, pos,
    n_heads, ...]``, each key/value head repeated for its query heads) a mapping that reads them grouped, ``[batch, pos,
    n_kv_heads, ...]`` (the first of each group's copies): what a cache of the same model without the flag holds."""
    if n_kv_heads >= n_heads:
        return cache
    names = [n for n in cache.keys() if _UNGROUPED.fullmatch(n) and cache[n].ndim >= 3 and cache[n].shape[2] == n_heads]
    if not names:
        return cache
    group = n_heads // n_kv_heads
    out = {n: cache[n] for n in cache.keys()}
    out.update({n: cache[n][:, :, ::group] for n in names})
    return out


def locked(fn: F) -> F:
    """``fn`` called holding `model_lock` of its ``model`` argument (by position or by name), its model's key and
    value hooks grouped (`grouped_hooks`)."""
    position = list(inspect.signature(fn).parameters).index("model")

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        model = args[position] if len(args) > position else kwargs.get("model")
        with model_lock(model), grouped_hooks(model):
            return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


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
    "locked",
    "model_lock",
    "transformer_lens",
]
