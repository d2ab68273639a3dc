"""`ModelView`: weights and cached activations in one convention for both TransformerLens lines.

Attribution methods never touch ``HookedTransformer`` or ``TransformerBridge`` directly; they ask a
`ModelView` for

* the model's `BlockRules`, decided once from its config: RMSNorm or LayerNorm, gated or plain MLP
  and its activation, sequential or parallel attention and MLP, rotary dimensions, query-key norms,
  norms after the sublayers, soft-capping;
* attention weights with grouped key/value heads (``W_K``/``W_V`` are ``[n_kv_heads, d_model,
  d_head]`` whatever the line stores), absent biases as ``None``; MLP weights;
* the gains of the norms that processing did not fold (``None`` when folded), in one convention
  (RMSNorm "with offset" stores ``w`` for a gain of ``1 + w``); a LayerNorm bias that processing did
  not fold is a bias of the maps that read the norm (``b + β·W``, as ``fold_ln`` would book it), so
  every method reads ``hook_normalized`` times the gain and the weights here, processed or not;
* the rotary ``cos``/``sin`` the forward actually used (the bridge caches them; for
  ``HookedTransformer`` they come from its buffers at the positions its forward used);
* the unembedding, and the offset that turns a centred logit back into the model's raw logit;
* where each part's weights are (`ModelView.layer_device`, `ModelView.split`): a model split across
  devices (TransformerLens's ``n_devices``, a bridge's ``device_map``) runs each layer's step of every
  method on that layer's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from dpa_lens.errors import InputError, UnsupportedModelError
from dpa_lens.models import hooks, tl
from dpa_lens.ops import ACTIVATIONS, rotate

# Architectures whose blocks dpa_lens's rules cover, each tested against its own autograd oracle.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "Llama (incl. SmolLM2, Llama 2/3)",
    "MistralForCausalLM": "Mistral (sliding-window attention)",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5",
    "Qwen3ForCausalLM": "Qwen3 (query-key norm)",
    "GPT2LMHeadModel": "GPT-2 (LayerNorm, GELU MLP, learned positions)",
    "GPTNeoXForCausalLM": "GPT-NeoX / Pythia (parallel attention and MLP, partial rotary)",
    "Gemma2ForCausalLM": "Gemma 2 (GeGLU, norms after the sublayers, soft-capping, sliding windows)",
    "Gemma3ForCausalLM": "Gemma 3 text (Gemma 2's rules plus query-key norm)",
}
# Where `dpa_lens.load_model` records the mean that TransformerLens's centring removed from the
# unembedding (see `ModelView.raw_unembed_offset`).
UNEMBED_OFFSET_ATTR = "_dpa_lens_unembed_offset"


@dataclass(frozen=True)
class BlockRules:
    """What a block computes, as far as DPA's propagation rules care."""

    norm: str  # "rms" or "ln" (LayerNorm keeps its centring)
    norm_offset: bool  # RMSNorm gains stored as w for 1 + w (Gemma on the bridge)
    gated: bool  # gated MLP (SwiGLU, GeGLU) or plain (GPT-2's GELU)
    act: str
    parallel: bool  # attention and MLP both read the block's input (GPT-NeoX)
    rotary: bool
    rot_hooks: bool  # the cache holds rotated queries and keys (else they are rotated here)
    qk_norm: bool
    post_norms: bool  # norms on the sublayers' outputs (Gemma 2/3)
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: bool  # some layers attend within a window: patterns must be cached
    has_mlp: bool = True  # False for attention-only models (no ln2, no MLP hooks, no neurons)


@dataclass
class AttnWeights:
    W_Q: Float[Tensor, "head d_model d_head"]
    W_K: Float[Tensor, "kv_head d_model d_head"]
    W_V: Float[Tensor, "kv_head d_model d_head"]
    W_O: Float[Tensor, "head d_head d_model"]
    b_Q: Float[Tensor, "head d_head"] | None
    b_K: Float[Tensor, "kv_head d_head"] | None
    b_V: Float[Tensor, "kv_head d_head"] | None
    b_O: Float[Tensor, " d_model"] | None


@dataclass
class MLPWeights:
    W_in: Float[Tensor, "d_model d_mlp"]
    W_out: Float[Tensor, "d_mlp d_model"]
    W_gate: Float[Tensor, "d_model d_mlp"] | None  # gated MLPs only
    b_in: Float[Tensor, " d_mlp"] | None  # plain MLPs only (a gated one with b_in is refused)
    b_out: Float[Tensor, " d_model"] | None


def _nonzero_or_none(t: Tensor | None) -> Tensor | None:
    if t is None or not isinstance(t, Tensor):
        return None
    return t if bool((t != 0).any()) else None


def _get(module: Any, name: str) -> Tensor | None:
    try:
        value = getattr(module, name)
    except AttributeError:
        return None
    return value if isinstance(value, Tensor) else None


def module_device(module: Any) -> torch.device | None:
    """The device of a module's weights: of its first parameter (or buffer); None when it has none."""
    for tensors in (module.parameters(), module.buffers()):
        for t in tensors:
            return t.device
    return None


def _float(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float()


def _read_bias(bias: Tensor | None, beta: Tensor | None, W: Tensor) -> Tensor | None:
    """A map's bias plus what a norm's bias ``β [d_model]`` adds through its weight ``W [..., d_model, out]``:
    ``b + β·W``, float32; None when zero."""
    total = _float(bias)
    if beta is not None:
        folded = torch.einsum("d,...do->...o", beta.to(W), W)
        total = folded if total is None else total + folded.to(total)
    return _nonzero_or_none(total)


# HookedTransformerConfig fields that change the forward in ways `BlockRules` does not follow, with the
# test that says a value is such a change.
_UNCOVERED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "positional_embedding_type": lambda v: v not in ("standard", "rotary"),
    "attention_dir": lambda v: v != "causal",
    "post_embedding_ln": bool,
    "clip_qkv": lambda v: v is not None,
    "use_logn_attn": bool,
    "use_dynamic_ntk_rope": bool,
    "use_yarn_rope": bool,
    "use_attention_sinks": bool,
}


def _uncovered_config(cfg: Any) -> list[str]:
    """``field=value`` for each field of a HookedTransformer config that the rules do not follow."""
    return [f"{name}={getattr(cfg, name)!r}" for name, bad in _UNCOVERED_FIELDS.items() if hasattr(cfg, name) and bad(getattr(cfg, name))]


class ModelView:
    """Uniform, read-only access to a TransformerLens model's weights (float32 on request).

    A view reads each layer's weights and norm gains once and keeps them (the weights only where they
    are the model's own float32 tensors, not float32 copies of half-precision ones): make a new view
    after changing the model's weights (every method makes its own, per call)."""

    def __init__(self, model: Any):
        if not tl.is_tl_model(model):
            raise TypeError(
                "expected a TransformerLens model (HookedTransformer or TransformerBridge; "
                f"dpa_lens.load_model builds one), got {type(model).__name__}"
            )
        self.model = model
        self.is_bridge = tl.is_bridge(model)
        cfg = model.cfg
        self.cfg = cfg
        self.n_layers: int = cfg.n_layers
        self.n_heads: int = cfg.n_heads
        self.n_kv_heads: int = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.d_head: int = cfg.d_head
        self.d_model: int = cfg.d_model
        self.d_mlp: int = 0 if getattr(cfg, "attn_only", False) else cfg.d_mlp
        self.d_vocab: int = cfg.d_vocab
        self.experts: int = getattr(cfg, "num_experts", None) or 0  # a mixture of experts (Mixtral): its MLPs have no one set of neurons
        self.name: str = getattr(cfg, "model_name", "") or type(model).__name__
        self._read: dict[tuple[str, int | None], Any] = {}  # attn, mlp and norm gains, as first read
        first = next(iter(model.parameters()), None)
        self._keep_weights = first is None or first.dtype == torch.float32  # else each read is a float32 copy
        self.architecture: str = (
            getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None) or "unknown"
        )
        self.adjacent_pairs: bool = bool(getattr(cfg, "rotary_adjacent_pairs", False))
        self._hf_config = getattr(getattr(model, "original_model", None), "config", None)

    # ------------------------------------------------------------------ rules and support
    def _soft_cap(self, name: str) -> float | None:
        cap = getattr(self.cfg, name, -1.0)
        return float(cap) if cap is not None and cap > 0 else None

    @cached_property
    def rules(self) -> BlockRules:
        cfg, block = self.cfg, self.model.blocks[0]
        norm = str(getattr(cfg, "normalization_type", None))
        window = getattr(self._hf_config, "sliding_window", None) if self._hf_config is not None else getattr(cfg, "window_size", None)
        local = bool(window) or bool(getattr(cfg, "use_local_attn", False))
        return BlockRules(
            norm="ln" if norm.startswith("LN") else "rms",
            norm_offset=bool(getattr(cfg, "rmsnorm_uses_offset", False)),
            gated=bool(getattr(cfg, "gated_mlp", False)),
            act=str(cfg.act_fn),
            parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
            rotary=getattr(cfg, "positional_embedding_type", None) == "rotary",
            rot_hooks=self._fires_rot_hooks(block.attn),
            qk_norm=getattr(block.attn, "q_norm", None) is not None,
            post_norms=hasattr(block, "ln1_post") or bool(getattr(cfg, "use_normalization_before_and_after", False)),
            attn_softcap=self._soft_cap("attn_scores_soft_cap"),
            final_softcap=self._soft_cap("output_logits_soft_cap"),
            sliding_window=local,
            has_mlp=not getattr(cfg, "attn_only", False),
        )

    @property
    def has_neurons(self) -> bool:
        """Whether each layer's MLP writes through one set of neurons, ``blocks.L.mlp.hook_post [batch, pos,
        d_mlp]``: not in an attention-only model, nor in a mixture of experts (a token's neurons are its experts')."""
        return self.rules.has_mlp and not self.experts

    def check_neurons(self, asked: str, fix: str) -> None:
        """Raise `InputError` when neuron scores (``asked``: the argument) are asked of a mixture of experts."""
        if self.experts:
            raise InputError(f"{asked}: this model is a mixture of experts ({self.experts} a layer), whose MLPs have no one set of "
                             f"neurons (each token's are its experts'); {fix}")

    def _fires_rot_hooks(self, attn: Any) -> bool:
        """Whether the forward fills ``hook_rot_q``/``hook_rot_k``: HookedTransformer's rotary attention
        does; on the bridge only the split-projection rotary attention does (GPT-NeoX's joint
        projection declares the hooks but leaves them empty, and its ``hook_q`` is un-rotated)."""
        if not hasattr(attn, "hook_rot_q"):
            return False
        if not self.is_bridge:
            return True
        return any(cls.__name__ == "PositionEmbeddingsAttentionBridge" for cls in type(attn).__mro__)

    def q_hook(self, layer: int) -> str:
        """The query hook of a layer whose positions DPA reads (rotated where the cache has rotated queries)."""
        return self.qk_hook_names(layer)[0]

    @property
    def embed_scale(self) -> float:
        """The factor between ``hook_embed`` and ``W_E`` rows: Gemma's √d_model (in the model's dtype) on
        the bridge; HookedTransformer folds it into ``W_E``."""
        if self.is_bridge and self.architecture.startswith("Gemma"):
            return float(torch.tensor(self.d_model**0.5, dtype=self.W_E.dtype))
        return 1.0

    def qk_hook_names(self, layer: int) -> list[str]:
        """The hooks from which `rotated_qk` rebuilds a layer's queries and keys as the scores see them."""
        rules = self.rules
        if rules.rotary and rules.rot_hooks:
            return [hooks.attn(layer, "rot_q"), hooks.attn(layer, "rot_k")]
        names = ["q", "k"] + (["cos", "sin"] if rules.rotary else [])
        return [hooks.attn(layer, n) for n in names]

    def rotated_qk(self, acts: Any, layer: int, cos_sin: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Queries ``[batch, pos, head, d_head]`` and keys ``[batch, pos, kv_head, d_head]`` after any
        query-key norm and rotary embedding, from the activations named by `qk_hook_names`.

        ``cos_sin`` (``[batch or 1, pos, 1, rotary_dim]`` each) replaces the cached ``hook_cos`` and
        ``hook_sin`` where the model has no rotated-query hooks (GPT-NeoX on the bridge)."""
        names = self.qk_hook_names(layer)
        q, k = acts[names[0]].float(), acts[names[1]].float()
        if self.rules.rotary and not self.rules.rot_hooks:
            cos, sin = cos_sin if cos_sin is not None else (acts[names[2]].float().unsqueeze(2), acts[names[3]].float().unsqueeze(2))
            cos, sin = cos.to(q.device), sin.to(q.device)  # a split model: where the layer's queries are
            q, k = rotate(q, cos, sin, self.adjacent_pairs), rotate(k, cos, sin, self.adjacent_pairs)
        return q, k

    def check_supported(self, method: str = "DPA") -> None:
        """Raise `UnsupportedModelError` unless the model's blocks are ones dpa_lens implements.

        A bridge runs the ``transformers`` code of its architecture: it must be one of
        `SUPPORTED_ARCHITECTURES`. A ``HookedTransformer`` runs TransformerLens's own blocks, which its
        config describes; one built by hand from a ``HookedTransformerConfig`` (no
        ``original_architecture``) is supported when every field of its config that changes the
        forward is one the rules follow (`BlockRules`), and the message names those that are not."""
        cfg = self.cfg
        if self.is_bridge and not getattr(self.model, "compatibility_mode", False):
            raise UnsupportedModelError(
                "This TransformerBridge is not in compatibility mode; call "
                "model.enable_compatibility_mode() first (dpa_lens.load_model does), so that the "
                "cache has TransformerLens's hook names."
            )
        problems = [] if self.is_bridge else _uncovered_config(cfg)
        by_config = not self.is_bridge and getattr(cfg, "original_architecture", None) is None
        if self.architecture not in SUPPORTED_ARCHITECTURES and not by_config:
            problems.append(f"architecture {self.architecture}")
        if str(getattr(cfg, "normalization_type", None)) not in ("RMS", "RMSPre", "LN", "LNPre"):
            problems.append(f"normalization {getattr(cfg, 'normalization_type', None)}")
        if str(cfg.act_fn) not in ACTIVATIONS and not getattr(cfg, "attn_only", False):  # an attention-only model needs none
            problems.append(f"activation {cfg.act_fn}")
        if self.experts:
            problems.append("mixture of experts")
        if problems:
            supported = "; ".join(SUPPORTED_ARCHITECTURES.values())
            raise UnsupportedModelError(
                f"{method} in dpa_lens does not support this model ({', '.join(problems)}). Supported: {supported}; and a "
                "HookedTransformer built from a HookedTransformerConfig with LayerNorm or RMSNorm, standard or rotary "
                "positions, causal attention, and a plain or gated MLP (or none: attn_only=True)."
            )

    # ------------------------------------------------------------------ weights
    def _block(self, layer: int) -> Any:
        return self.model.blocks[layer]

    def _once(self, kind: str, layer: int | None, read: Callable[[], Any], weights: bool = False) -> Any:
        """``read()`` the first time, kept for later calls (``weights``: unless the model is not float32)."""
        key = (kind, layer)
        if key in self._read:
            return self._read[key]
        value = read()
        if self._keep_weights or not weights:
            self._read[key] = value
        return value

    def attn(self, layer: int) -> AttnWeights:
        """Attention weights of one layer, float32, grouped K/V, absent or zero biases as None.

        The biases are those of the maps as they read ``ln1``'s output before its bias: a LayerNorm
        bias ``β`` that processing did not fold is added as ``β·W_Q``, ``β·W_K``, ``β·W_V``."""
        return self._once("attn", layer, lambda: self._attn(layer), weights=True)

    def _attn(self, layer: int) -> AttnWeights:
        a = self._block(layer).attn
        grouped = _get(a, "_W_K") is not None
        W_Q, W_K, W_V = (_float(w) for w in (a.W_Q, _get(a, "_W_K") if grouped else a.W_K, _get(a, "_W_V") if grouped else a.W_V))
        beta = self.norm_bias("ln1", layer)
        return AttnWeights(
            W_Q=W_Q,
            W_K=W_K,
            W_V=W_V,
            W_O=_float(a.W_O),
            b_Q=_read_bias(_get(a, "b_Q"), beta, W_Q),
            b_K=_read_bias(_get(a, "_b_K") if grouped else _get(a, "b_K"), beta, W_K),
            b_V=_read_bias(_get(a, "_b_V") if grouped else _get(a, "b_V"), beta, W_V),
            b_O=_float(_nonzero_or_none(_get(a, "b_O"))),
        )

    def mlp(self, layer: int) -> MLPWeights:
        """MLP weights of one layer (float32); an unfolded ``ln2`` bias ``β`` is in the input biases
        (``b_in + β·W_in``, see `attn`). Attention-only models have none (`BlockRules.has_mlp`)."""
        if not self.rules.has_mlp:
            raise UnsupportedModelError(f"this model is attention-only (attn_only=True): layer {layer} has no MLP")
        return self._once("mlp", layer, lambda: self._mlp(layer), weights=True)

    def _mlp(self, layer: int) -> MLPWeights:
        m = self._block(layer).mlp
        gated = self.rules.gated
        W_in = _float(m.W_in)
        beta = self.norm_bias("ln2", layer)
        b_in = _read_bias(_get(m, "b_in"), beta, W_in)
        if gated and (b_in is not None or _read_bias(_get(m, "b_gate"), beta, _float(m.W_gate)) is not None):
            raise UnsupportedModelError(f"gated MLP with a non-zero input bias (layer {layer}) is not supported")
        return MLPWeights(
            W_in=W_in,
            W_out=_float(m.W_out),
            W_gate=_float(m.W_gate) if gated else None,
            b_in=None if gated else b_in,
            b_out=_float(_nonzero_or_none(_get(m, "b_out"))),
        )

    def _gain(self, module: Any) -> Tensor | None:
        w = _get(module, "w")
        if w is None:
            return None
        w = w.detach().float()
        if self.rules.norm_offset:
            w = 1.0 + w
        return None if bool((w == 1).all()) else w

    def _norm(self, name: str, layer: int | None) -> Any:
        return self.model.ln_final if name == "ln_final" else getattr(self._block(layer), name)

    def norm_weight(self, name: str, layer: int | None = None) -> Float[Tensor, " d_model"] | None:
        """Gain of ``ln1``/``ln2``/``ln1_post``/``ln2_post`` of a layer or of ``ln_final``; None when one."""
        return self._once(f"gain {name}", layer, lambda: self._gain(self._norm(name, layer)))

    def norm_bias(self, name: str, layer: int | None = None) -> Float[Tensor, " d_model"] | None:
        """Bias of a LayerNorm that processing did not fold (``fold_ln=False``, or a bridge with
        ``no_processing=True``); None when folded, zero or absent (RMSNorm). `attn`, `mlp` and `b_U`
        already hold it as the biases of the maps that read the norm."""
        if self.rules.norm != "ln":
            return None
        return _float(_nonzero_or_none(_get(self._norm(name, layer), "b")))

    @staticmethod
    def stream_scale(scale: Tensor) -> Float[Tensor, "batch pos 1"]:
        """A norm's cached ``hook_scale`` as ``[batch, pos, 1]``. With ``use_split_qkv_input`` or
        ``use_attn_in``, HookedTransformer normalises one copy of the stream per head and caches
        ``ln1``'s scale as ``[batch, pos, head, 1]``: the copies are equal, so any one is the scale."""
        return scale[:, :, 0] if scale.ndim == 4 else scale

    def qk_norm_weight(self, layer: int, which: str) -> Float[Tensor, " d_head"] | None:
        """Gain of the query (``"q"``) or key (``"k"``) norm of a layer; None when one."""
        return self._gain(getattr(self._block(layer).attn, f"{which}_norm"))

    def attn_scale(self, layer: int) -> float:
        """The divisor of q·k in the attention scores."""
        a = self._block(layer).attn
        if self.is_bridge:
            hf_attn = getattr(a, "_original_component", None)
            scaling = getattr(hf_attn, "scaling", None)
            return 1.0 / float(scaling) if scaling else math.sqrt(self.d_head)
        return float(a.attn_scale) if getattr(self.cfg, "use_attn_scale", True) else 1.0

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"] | None:
        """The unembedding's bias as it reads the final norm's output before its bias (an unfolded
        LayerNorm bias ``β`` adds ``β·W_U``, see `attn`); None when zero."""
        return _read_bias(_get(self.model, "b_U"), self.norm_bias("ln_final"), self.W_U.detach().float())

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.model.W_E

    def unembed_is_centred(self) -> bool:
        W = self.W_U.detach()
        return bool(W.float().mean(dim=1).abs().max() <= 1e-5 * W.float().abs().max())

    def raw_unembed_offset(self) -> tuple[Float[Tensor, " d_model"], Tensor] | None:
        """``(m, mb)`` such that the raw logit is ``x̂·(W_U[:, y] + m) + b_U[y] + mb``.

        Zero when the unembedding was never centred; None when it was centred and dpa_lens does not
        know the mean that centring removed (a model not built by `load_model`).
        """
        recorded = getattr(self.model, UNEMBED_OFFSET_ATTR, None)
        if recorded is not None:
            return recorded
        if not self.unembed_is_centred():
            W = self.W_U
            return torch.zeros(self.d_model, device=W.device), torch.zeros((), device=W.device)
        return None

    # ------------------------------------------------------------------ devices
    def layer_device(self, layer: int) -> torch.device:
        """The device of layer ``layer``'s weights, where every method runs that layer's step: the one place
        dpa_lens asks where a layer is (see `split`)."""
        return self._once("device", layer, lambda: self._device(self._block(layer)))

    @property
    def embed_device(self) -> torch.device:
        """The device of the token embedding, where a split model's results are gathered."""
        return self._once("device embed", None, lambda: self._device(self.model.embed))

    @property
    def unembed_device(self) -> torch.device:
        """The device of the unembedding (with the final norm, the last of a split model)."""
        return self._once("device unembed", None, lambda: self._device(self.model.unembed))

    def _device(self, module: Any) -> torch.device:
        found = module_device(module)
        return found if found is not None else torch.device(getattr(self.cfg, "device", None) or "cpu")

    @property
    def split(self) -> bool:
        """Whether the model's weights are on more than one device (its embedding, its layers, its unembedding):
        a model split across devices by TransformerLens's ``n_devices`` or a bridge's ``device_map``. Methods
        then run each layer's step on `layer_device` and move only what flows between layers (the
        effective target, DePass's parts, per-row tensors), never weights; results are gathered on the
        embedding's device."""
        return self._once("split", None, lambda: len({self.embed_device, self.unembed_device,
                                                       *(self.layer_device(l) for l in range(self.n_layers))}) > 1)

    # ------------------------------------------------------------------ hooks and rotary
    def rotary_from_cache(self) -> bool:
        """True when the forward's cos/sin are in the cache (bridge), False when from buffers."""
        return self.is_bridge

    def rotary_buffers(self, layer: int) -> tuple[Tensor, Tensor]:
        a = self._block(layer).attn
        return a.rotary_cos, a.rotary_sin

    def qk_norm_scale(self, cache: Any, layer: int, which: str, batch: int, n: int, heads: int | None = None) -> Tensor:
        """The query/key norm's cached scale as ``[batch, pos, heads, 1]`` (lines lay it out differently); with
        ``heads``, one per query head (a key norm's scale per key head repeated over the query heads of its group)."""
        s = cache[hooks.qk_norm(layer, which)]
        s = s.permute(0, 2, 1, 3) if s.ndim == 4 else s.reshape(batch, n, -1, 1)  # bridge: [batch, heads, pos, 1];
        # HookedTransformer: [(batch pos heads), 1]
        return s if heads is None or s.shape[2] == heads else s.repeat_interleave(heads // s.shape[2], dim=2)
