"""What DPA reads from the cache, and the ``names_filter`` that caches exactly that."""

from __future__ import annotations

from collections.abc import Callable

from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.types import TLModel


def _layer_hooks(view: ModelView, layer: int, patterns: bool = True) -> list[str]:
    rules = view.rules
    names = [hooks.norm_scale(layer, "ln1"), hooks.norm_scale(layer, "ln2"), hooks.attn(layer, "v"), hooks.attn(layer, "z"),
             hooks.mlp(layer, "pre")]
    if patterns:
        names.append(hooks.attn(layer, "pattern"))
    names += view.qk_hook_names(layer)
    if rules.rotary and view.rotary_from_cache():  # the cos/sin that un-rotate the query and key paths
        names += [hooks.attn(layer, "cos"), hooks.attn(layer, "sin")]
    if rules.gated:
        names.append(hooks.mlp(layer, "pre_linear"))
    if rules.qk_norm:
        names += [hooks.qk_norm(layer, "q"), hooks.qk_norm(layer, "k")]
    if rules.post_norms:
        names += [hooks.norm_scale(layer, "ln1_post"), hooks.norm_scale(layer, "ln2_post")]
    return names


def flow_hooks(view: ModelView) -> list[str]:
    """The residual streams that ``dpa(..., flow=True)`` reads."""
    return [hooks.resid_pre(l) for l in range(view.n_layers)] + [hooks.resid_post(view.n_layers - 1)]


def dpa_hook_names(model: TLModel, flow: bool = False, patterns: bool = True) -> list[str]:
    """Every hook name DPA reads from the cache for this model.

    The residual streams entering each layer (and leaving the last) are always included: they check
    the cache against the model's weights at every layer, and give ``dpa(..., flow=True)`` (``flow`` is
    kept for compatibility and adds nothing). ``patterns=False``
    leaves out the attention patterns (``[batch, head, pos, pos]`` per layer, most of the cache's
    memory at long contexts): DPA then recomputes each layer's pattern from the cached queries and
    keys, and checks it against the cached head outputs. Sliding-window models always cache their
    patterns (the window is the model's, not a causal mask dpa_lens can rebuild for every line).
    """
    view = ModelView(model)
    rules = view.rules
    patterns = patterns or rules.sliding_window
    names = [hooks.EMBED, hooks.resid_pre(0), hooks.FINAL_SCALE, hooks.FINAL_NORMALIZED]
    if view.is_bridge:
        names.append(hooks.TOKENS)  # the input tokens, cached by the bridge
    elif rules.rotary:  # to check the rotary positions of the forward
        names += [hooks.attn(0, "q")] + ([hooks.qk_norm(0, "q", "normalized")] if rules.qk_norm else [])
    for layer in range(view.n_layers):
        names += _layer_hooks(view, layer, patterns)
    names += flow_hooks(view)
    return list(dict.fromkeys(names))


def dpa_names_filter(model: TLModel, flow: bool = False, patterns: bool = True) -> Callable[[str], bool]:
    """A ``names_filter`` for ``run_with_cache`` that caches exactly what `dpa` needs (see `dpa_hook_names`)."""
    wanted = frozenset(dpa_hook_names(model, flow=flow, patterns=patterns))
    return lambda name: name in wanted


def required_hooks(view: ModelView, flow: bool) -> list[str]:
    """What must be in the cache (patterns can be recomputed, except with sliding windows)."""
    return dpa_hook_names(view.model, flow=flow, patterns=view.rules.sliding_window)
