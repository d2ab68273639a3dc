"""What DPA reads from the cache, and the ``names_filter`` that caches exactly that."""

from __future__ import annotations

from collections.abc import Callable

from dpa_lens.errors import UnsupportedModelError
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.types import TLModel


def _layer_hooks(view: ModelView, layer: int, patterns: bool = True) -> list[str]:
    """One layer's hooks DPA reads (an attention-only block has no ``ln2`` and no MLP hooks)."""
    rules = view.rules
    names = [hooks.norm_scale(layer, "ln1"), hooks.attn(layer, "v"), hooks.attn(layer, "z")]
    if rules.has_mlp:
        names += [hooks.norm_scale(layer, "ln2"), hooks.mlp(layer, "pre")] + ([hooks.mlp(layer, "pre_linear")] if rules.gated else [])
    if patterns:
        names.append(hooks.attn(layer, "pattern"))
    names += view.qk_hook_names(layer)
    if rules.rotary and view.rotary_from_cache():  # the cos/sin that un-rotate the query and key paths
        names += [hooks.attn(layer, "cos"), hooks.attn(layer, "sin")]
    if rules.qk_norm:
        names += [hooks.qk_norm(layer, "q"), hooks.qk_norm(layer, "k")]
    if rules.post_norms:
        names += [hooks.norm_scale(layer, "ln1_post"), hooks.norm_scale(layer, "ln2_post")]
    return names


def layer_internals(view: ModelView, layer: int) -> list[str]:
    """What DPA reads of one layer besides its streams and rotary (what checkpointing recomputes)."""
    return [n for n in _layer_hooks(view, layer, patterns=False) if not n.endswith(("hook_cos", "hook_sin"))]


def checkpoint_hook_names(view: ModelView) -> list[str]:
    """What a checkpointed DPA cache holds (``dpa_names_filter(model, checkpoint=True)``): every layer's
    input stream and the last output, the embeddings, the final norm, and what fixes the rotary
    positions (the bridge's per-layer ``cos`` and ``sin``; HookedTransformer's first queries, rotated
    and not)."""
    rules = view.rules
    names = [hooks.EMBED, hooks.FINAL_SCALE, hooks.FINAL_NORMALIZED] + flow_hooks(view)
    if view.is_bridge:
        names.append(hooks.TOKENS)
        if rules.rotary:
            names += [hooks.attn(l, n) for l in range(view.n_layers) for n in ("cos", "sin")]
    elif rules.rotary:
        names += [hooks.attn(0, "q"), hooks.attn(0, "rot_q")] + ([hooks.qk_norm(0, "q", "normalized")] if rules.qk_norm else [])
    return names


def check_checkpointable(view: ModelView) -> None:
    """Raise `UnsupportedModelError` for models whose layers checkpointed DPA does not recompute."""
    rules = view.rules
    problems = [what for what, present in (("sliding-window attention", rules.sliding_window),
                                          ("soft-capped attention scores", rules.attn_softcap is not None),
                                          ("norms after the sublayers", rules.post_norms)) if present]
    if problems:
        raise UnsupportedModelError(
            f"checkpointed DPA does not recompute this model's layers ({', '.join(problems)}): cache the layer "
            "internals, names_filter=dpa_lens.dpa_names_filter(model)"
        )


def flow_hooks(view: ModelView) -> list[str]:
    """The residual streams that ``dpa(..., flow=True)`` reads."""
    return [hooks.resid_pre(l) for l in range(view.n_layers)] + [hooks.resid_post(view.n_layers - 1)]


def dpa_hook_names(model: TLModel, flow: bool = False, patterns: bool = True, checkpoint: bool = False) -> list[str]:
    """Every hook name DPA reads from the cache for this model.

    The residual streams entering each layer (and leaving the last) are always included: they check
    the cache against the model's weights at every layer, and give ``dpa(..., flow=True)`` (``flow`` is
    kept for compatibility and adds nothing). ``patterns=False``
    leaves out the attention patterns (``[batch, head, pos, pos]`` per layer, most of the cache's
    memory at long contexts): DPA then recomputes each layer's pattern from the cached queries and
    keys, and checks it against the cached head outputs. Sliding-window models always cache their
    patterns (the window is the model's, not a causal mask dpa_lens can rebuild for every line).

    ``checkpoint=True`` caches only the residual streams (and what fixes the rotary positions): DPA then
    recomputes each layer's internals from its input stream as the sweep reaches it (activation
    checkpointing, `dpa_lens.methods.dpa.checkpoint`), for about one more forward pass and a fraction of the memory.
    """
    view = ModelView(model)
    if checkpoint:
        check_checkpointable(view)
        return checkpoint_hook_names(view)
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


def dpa_names_filter(model: TLModel, flow: bool = False, patterns: bool = True, checkpoint: bool = False) -> Callable[[str], bool]:
    """A ``names_filter`` for ``run_with_cache`` that caches exactly what `dpa` needs (see `dpa_hook_names`;
    ``checkpoint=True``: the residual streams only, each layer's internals recomputed by `dpa`)."""
    wanted = frozenset(dpa_hook_names(model, flow=flow, patterns=patterns, checkpoint=checkpoint))
    return lambda name: name in wanted


def required_hooks(view: ModelView, flow: bool) -> list[str]:
    """What must be in the cache (patterns can be recomputed, except with sliding windows)."""
    return dpa_hook_names(view.model, flow=flow, patterns=view.rules.sliding_window)
