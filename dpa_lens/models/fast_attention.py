"""`fused_attention`: a cache forward whose attention never materialises a pattern.

TransformerLens 4's bridge recomputes every attention layer eagerly so that ``hook_attn_scores``
and ``hook_pattern`` can fire: per layer it builds ``[batch, head, query, key]`` scores, a causal
mask, a masked softmax and a NaN scrub. DPA does not need those tensors (it recomputes each
pattern from the cached rotated queries and keys), so inside ``with fused_attention(model):`` an
attention layer whose pattern and scores nobody hooks runs PyTorch's fused
``scaled_dot_product_attention`` instead. Every other hook fires on the same tensor as before
(``hook_in``, ``hook_q``/``hook_k``/``hook_v``, query-key norms, ``hook_cos``/``hook_sin``,
``hook_rot_q``/``hook_rot_k``, ``hook_z``, ``hook_out``); the head outputs agree with the eager
ones to float rounding.

A layer falls back to the bridge's own forward whenever the fused path would not compute the
same thing: a hook on its scores or pattern, a padding or other non-causal mask, a KV cache,
sliding windows, soft-capping, attention sinks, split or gated inputs, partial or interleaved
rotary, and any bridge subclass that overrides the forward. In practice the layers of Llama,
Mistral (without a sliding window) and Qwen 2/3 models on TransformerLens 4 run fused; GPT-2 and
GPT-NeoX (joint query-key-value bridges), Gemma (sliding windows: DPA caches their patterns) and
everything on TransformerLens 3.x keep the forward they have.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from dpa_lens.models import tl
from dpa_lens.types import TLModel

_CONFIG_FLAGS = ("use_split_qkv_input", "use_attn_in", "gated_q_proj", "use_attn_result", "rotary_interleaved_cos_sin",
                 "rotary_adjacent_pairs", "qk_norm_after_rope")
_HF_ATTRIBUTES = ("key_multiplier", "attn_logit_softcapping", "sinks", "sliding_window")
# the bridge internals the fused forward calls (TransformerLens 4.x); a bridge without them keeps its own forward
_BRIDGE_MEMBERS = ("hook_in", "hook_out", "q", "k", "v", "o", "submodules", "_qk_norm_phase", "_qk_norm_per_head",
                   "_apply_position_embedding_hooks", "_update_kv_cache", "is_causal")


def _bridge_attention_class() -> type | None:
    try:
        from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
            PositionEmbeddingsAttentionBridge,
        )
    except ImportError:
        return None
    return PositionEmbeddingsAttentionBridge


def _hooked(hook_point: Any) -> bool:
    return hook_point is not None and bool(hook_point._forward_hooks or hook_point._forward_pre_hooks
                                           or hook_point._backward_hooks or getattr(hook_point, "bwd_hooks", None))


def _layer_supported(module: Any, base: type) -> bool:
    """Whether this attention layer's structure is one the fused path computes exactly."""
    cls = type(module)
    if not all(hasattr(module, name) for name in _BRIDGE_MEMBERS):
        return False
    if cls.forward is not base.forward or cls._pre_output_projection is not base._pre_output_projection:
        return False
    config, hf_attn = module.config, module.original_component
    if hf_attn is None or any(bool(getattr(config, flag, False)) for flag in _CONFIG_FLAGS):
        return False
    if any(getattr(hf_attn, name, None) is not None for name in _HF_ATTRIBUTES):
        return False
    if getattr(getattr(hf_attn, "config", None), "clip_qkv", None) is not None:
        return False
    rope = getattr(getattr(hf_attn, "config", None), "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("llama_4_scaling_beta") is not None:
        return False
    if module._modules.get("gate") is not None or module._qk_norm_phase not in (None, "post_reshape"):
        return False
    return bool(module.is_causal) and not getattr(module, "is_cross_attention", False)


_CHECKED: list = [None, None]  # the last mask checked (a weak reference and its version) and the answer


def _causal(mask: torch.Tensor | None, q_len: int, k_len: int) -> bool:
    """True when ``mask`` (None or a HuggingFace mask) lets each query see exactly the keys up to itself.
    Every layer of a forward gets the same mask tensor: it is read once (the answer is kept for that
    tensor while it is unchanged), not once per layer, as the check is quadratic in the length."""
    if mask is None:
        return q_len == k_len
    if mask.ndim != 4 or q_len != k_len or mask.shape[-2] != q_len or mask.shape[-1] < k_len:
        return False
    key = (mask._version, q_len, k_len)
    last, answer = _CHECKED
    if last is not None and last[0]() is mask and last[1] == key:
        return answer
    allowed = mask[..., :k_len] if mask.dtype == torch.bool else mask[..., :k_len] == 0
    expected = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()
    answer = bool((allowed == expected).all())
    _CHECKED[:] = [(weakref.ref(mask), key), answer]
    return answer


def _empty_kv_cache(module: Any, kwargs: dict) -> bool:
    """True without a KV cache, or with one that holds nothing yet for this layer (a first forward)."""
    cached = kwargs.get("past_key_values")
    cached = kwargs.get("layer_past") if cached is None else cached
    if cached is None:
        return True
    layer = getattr(module, "_layer_idx", None)
    try:
        return layer is not None and cached.get_seq_length(layer + kwargs.get("cycle_offset", 0)) == 0
    except (AttributeError, IndexError, TypeError):
        return False


def _fused_forward(module: Any, base: type, *args: Any, **kwargs: Any) -> Any:
    """The bridge attention forward with SDPA in place of the eager scores, softmax and pattern."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    mask = kwargs.get("attention_mask")
    cos_sin = kwargs.get("position_embeddings")
    eligible = (isinstance(hidden, torch.Tensor) and isinstance(cos_sin, tuple) and len(cos_sin) == 2 and _empty_kv_cache(module, kwargs)
                and not _hooked(getattr(module, "hook_attn_scores", None)) and not _hooked(getattr(module, "hook_pattern", None))
                and not (module.training and getattr(module.original_component, "attention_dropout", 0.0) > 0.0)
                and _causal(mask, hidden.shape[-2], hidden.shape[-2]))
    if not eligible:
        return base.forward(module, *args, **kwargs)
    hf_attn = module.original_component
    head_dim = hf_attn.head_dim
    if cos_sin[0].shape[-1] != head_dim:  # partial or half-width rotary: the bridge's own branches
        return base.forward(module, *args, **kwargs)

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hidden = module.hook_in(hidden)
    batch_pos = hidden.shape[:-1]
    q, k, v = (proj(hidden).view(*batch_pos, -1, head_dim).transpose(1, 2) for proj in (module.q, module.k, module.v))
    if module._qk_norm_phase == "post_reshape":
        if module._qk_norm_per_head:
            q = module.hook_q_normed(module.q_norm(q.transpose(1, 2)).transpose(1, 2))
            if "k_norm" in module.submodules:
                k = module.hook_k_normed(module.k_norm(k.transpose(1, 2)).transpose(1, 2))
        else:
            q = module.hook_q_normed(module.q_norm(q))
            if "k_norm" in module.submodules:
                k = module.hook_k_normed(module.k_norm(k))
    cos, sin = module._apply_position_embedding_hooks(cos_sin)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if hasattr(module, "hook_rot_q"):
        q = module.hook_rot_q(q)
    if hasattr(module, "hook_rot_k"):
        k = module.hook_rot_k(k)
    k, v = module._update_kv_cache(k, v, **kwargs)  # fills a HuggingFace KV cache as the bridge does
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = getattr(hf_attn, "scaling", head_dim**-0.5)
    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    z = z.transpose(1, 2).reshape(*batch_pos, -1)
    o_weight = getattr(getattr(module.o, "original_component", None), "weight", None)
    if isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point and z.dtype != o_weight.dtype:
        z = z.to(o_weight.dtype)
    return module.hook_out(module.o(z)), None


@contextmanager
def fused_attention(model: TLModel) -> Iterator[int]:
    """Run the bridge's attention layers with fused attention while the block is open.

    Yields how many layers take the fused path (0 for a ``HookedTransformer`` or a model none of whose
    layers qualifies). Use it around the cache forward DPA needs (`dpa_lens.cache_for` does)::

        with dpa_lens.fused_attention(model):
            _, cache = model.run_with_cache(tokens, names_filter=dpa_lens.dpa_names_filter(model, patterns=False))

    Each layer still checks at every call that nothing hooks its scores or pattern and that the mask
    is causal, and otherwise runs the bridge's own forward, so asking for patterns inside the block
    still caches them.
    """
    base = _bridge_attention_class()
    patched = []
    if base is not None and tl.is_bridge(model):
        for module in model.modules():
            if isinstance(module, base) and _layer_supported(module, base):
                # the bridge forwards attribute writes to the wrapped HF module: write the instance's own
                module.__dict__["forward"] = lambda *a, _m=module, **kw: _fused_forward(_m, base, *a, **kw)
                patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
