"""TransformerLens hook names, written once.

Both TransformerLens lines (HookedTransformer in compatibility with TransformerBridge) name their
hooks the same way; every hook name dpa_lens reads or writes is built here::

    hooks.resid_pre(3)            'blocks.3.hook_resid_pre'
    hooks.attn(3, "v")            'blocks.3.attn.hook_v'
    hooks.mlp(3, "post")          'blocks.3.mlp.hook_post'
    hooks.norm_scale(3, "ln1")    'blocks.3.ln1.hook_scale'
    hooks.qk_norm_scale(3, "q")   'blocks.3.attn.q_norm.hook_scale'
"""

from __future__ import annotations

from typing import Any

EMBED = "hook_embed"
POS_EMBED = "hook_pos_embed"
TOKENS = "embed.hook_in"  # the input token ids, cached by the bridge
FINAL_SCALE = "ln_final.hook_scale"
FINAL_NORMALIZED = "ln_final.hook_normalized"


def cached(cache: Any, name: str) -> bool:
    """Whether ``cache`` (an ``ActivationCache`` or a dict) holds the hook ``name``. Asked of its dictionary:
    ``name in cache`` walks every key of an ``ActivationCache`` (36 µs on a TransformerLens 4 bridge of
    SmolLM2, 1,333 keys; a DPA call asks about 1,400 times)."""
    return name in getattr(cache, "cache_dict", cache)


def block(layer: int, name: str) -> str:
    return f"blocks.{layer}.{name}"


def resid_pre(layer: int) -> str:
    return block(layer, "hook_resid_pre")


def resid_mid(layer: int) -> str:
    return block(layer, "hook_resid_mid")


def resid_post(layer: int) -> str:
    return block(layer, "hook_resid_post")


def attn_out(layer: int) -> str:
    return block(layer, "hook_attn_out")


def mlp_out(layer: int) -> str:
    return block(layer, "hook_mlp_out")


def attn(layer: int, name: str) -> str:
    """``blocks.L.attn.hook_<name>``: q, k, v, z, rot_q, rot_k, pattern, attn_scores, cos, sin, result."""
    return block(layer, f"attn.hook_{name}")


def mlp(layer: int, name: str) -> str:
    """``blocks.L.mlp.hook_<name>``: pre (the gate, or the only input), pre_linear (the up projection), post."""
    return block(layer, f"mlp.hook_{name}")


def norm_scale(layer: int, norm: str) -> str:
    """The frozen scale of ``ln1``, ``ln2``, ``ln1_post`` or ``ln2_post`` of a layer."""
    return block(layer, f"{norm}.hook_scale")


def qk_norm(layer: int, which: str, name: str = "scale") -> str:
    """``blocks.L.attn.{q,k}_norm.hook_<name>`` of a query-key norm (Qwen3, Gemma 3)."""
    return block(layer, f"attn.{which}_norm.hook_{name}")


def layer_of(name: str) -> int | None:
    """The layer of a ``blocks.L...`` hook name, None for the others."""
    if not name.startswith("blocks."):
        return None
    return int(name.split(".")[1])
