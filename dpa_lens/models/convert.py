"""Turning a ``transformers`` model into a TransformerLens model of either line, without the hub.

* `wrap`: ``TransformerBridge`` in compatibility mode (TransformerLens 4.x, also 3.x) or a processed
  ``HookedTransformer`` (3.x; its config built from the ``transformers`` config, Gemma 2/3 included).
* Before TransformerLens centres the unembedding, the raw one is probed and the offset that
  centring removes is recorded on the model (`ModelView.raw_unembed_offset` reads it), so token
  targets can explain the model's raw logit.
* A square unembedding (``d_vocab == d_model``) is left uncentred on the bridge: TransformerLens's
  bridge tells the vocabulary axis from the other by their sizes, and centres a square one along
  ``d_model``, which changes the logits by more than a constant per position.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from typing import Any, Literal

import torch

from dpa_lens.models import tl
from dpa_lens.models.view import UNEMBED_OFFSET_ATTR, ModelView

Line = Literal["hooked", "bridge"]
_PROBE = 64.0  # amplitude of the final-norm probe in `_raw_unembedding`
# TransformerLens's weight processing, as `load_model` applies it (both lines take these four switches)
PROCESSING: dict[str, bool] = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}


def resolve_line(line: Line | None) -> Line:
    if line is None:
        return tl.default_line()
    if line not in ("hooked", "bridge"):
        raise ValueError(f"line must be 'hooked', 'bridge' or None, got {line!r}")
    if line == "hooked" and tl.hooked_transformer_class() is None:
        raise ValueError(
            f"line='hooked' needs HookedTransformer, which TransformerLens {tl.TL_VERSION} removed; "
            "use line='bridge' (or install 'transformer-lens<4')."
        )
    if line == "bridge" and tl.bridge_class() is None:
        raise ValueError(f"TransformerLens {tl.TL_VERSION} has no TransformerBridge; use line='hooked'.")
    return line


def _reloadable_tokenizer(tok: Any) -> Any:
    """TransformerLens re-loads the tokenizer by its ``name_or_path`` (to add a BOS token).

    A tokenizer built in memory has no such path; save it to a folder so the reload works offline.
    """
    if getattr(tok, "name_or_path", "") and "name_or_path" in getattr(tok, "init_kwargs", {}):
        return tok
    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix="dpa_lens_tok_")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def wrap(hf_model: Any, tok: Any, name: str, *, line: Line, device, dtype: torch.dtype,
         processing: Mapping[str, bool] | None = None) -> Any:
    """The TransformerLens model of ``line`` around a ``transformers`` model (eval mode).

    ``processing`` overrides switches of `PROCESSING` (``fold_ln``, ``center_writing_weights``,
    ``center_unembed``, ``fold_value_biases``), as ``enable_compatibility_mode`` and
    ``HookedTransformer.from_pretrained`` take them; all off is ``no_processing=True``
    (``from_pretrained_no_processing``): the weights as ``transformers`` has them."""
    unknown = set(processing or {}) - set(PROCESSING)
    if unknown:
        raise ValueError(f"unknown processing switches {sorted(unknown)}; known: {sorted(PROCESSING)}")
    switches = {**PROCESSING, **(processing or {})}
    hf_model.eval()
    tok = _reloadable_tokenizer(tok)
    if line == "bridge":
        model = _wrap_bridge(hf_model, tok, name, device=device, dtype=dtype, switches=switches)
    else:
        model = _wrap_hooked(hf_model, tok, name, device=device, dtype=dtype, switches=switches)
    model.eval()
    return model


def _final_norm(hf_model: Any) -> Any:
    base = getattr(hf_model, "base_model", hf_model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        module = getattr(base, name, None)
        if module is not None:
            return module
    raise RuntimeError(f"dpa_lens cannot find the final norm of {type(hf_model).__name__}; please report this")


def _raw_unembedding(hf_model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw unembedding with the final norm's gain and bias folded in: ``(W [d_model, vocab], b [vocab])``.

    Raw logits are ``x̂ · W + b`` with ``x̂`` the final norm's input normalised without its gain
    (what TransformerLens's processed models feed their unembedding). The gain is probed through
    the norm module itself, so every convention (``w``, ``1 + w``, LayerNorm with a bias) is right.
    """
    norm = _final_norm(hf_model)
    out = hf_model.get_output_embeddings()
    W = out.weight.detach().float().T  # [d, vocab]
    d = W.shape[0]
    if d % 2:
        raise RuntimeError("dpa_lens's norm probe needs an even d_model; please report this")
    # ±64 in turn: zero mean, so the norm only scales it, by 1/sqrt(1 + ε/64²); for any ε ≤ 1e-5 that
    # is 1 within 2⁻²⁹, below float32 rounding (and 64² stays finite in float16)
    x = torch.full((1, d), _PROBE, device=W.device)
    x[:, 1::2] = -_PROBE
    dtype = next(norm.parameters(), torch.zeros(())).dtype
    with torch.no_grad():
        plus, minus = norm(x.to(dtype)).float(), norm((-x).to(dtype)).float()
    gain = ((plus - minus) / (2 * x / _PROBE))[0]
    shift = ((plus + minus) / 2)[0]
    b = torch.zeros(W.shape[1], device=W.device) if getattr(out, "bias", None) is None else out.bias.detach().float().clone()
    return W * gain[:, None], b + shift @ W


def unembed_tolerance(W_raw: torch.Tensor, dtype: torch.dtype, layer_norm: bool) -> float:
    """The largest ``|W_U[i, j] + m[i] − W_raw[i, j]|`` float rounding allows, for ``W_raw [d_model, d_vocab]``
    and TransformerLens's processed ``W_U`` stored in ``dtype``.

    With ``u`` the unit roundoff (of ``dtype``, float32 at least) and ``w = max|W_raw|``: each of the
    elementwise steps (the probed gain, two products by it, TransformerLens's subtraction of the mean
    and its storage, our addition of ``m``) rounds once, within ``u·w`` each (8 in all); each mean over
    the ``V`` vocabulary columns (TransformerLens's and ours, ``m``) is within ``(V − 1)·u·w`` whatever
    the summation order (the recursive-summation bound), and with LayerNorm each mean over the ``d``
    model dimensions that both sides then remove, within ``(d − 1)·u·w``."""
    u = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps) / 2
    d, V = W_raw.shape
    return (8 + 2 * (V - 1) + (2 * (d - 1) if layer_norm else 0)) * u * float(W_raw.abs().max())


def _record_unembed_offset(model: Any, raw: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Store on the model the offset ``(m, mb)`` with raw logit = ``x̂·(W_U[:, y] + m) + b_U[y] + mb``
    (``x̂`` the final norm's output before its bias, ``b_U`` as `ModelView.b_U` reads it).

    TransformerLens centres the unembedding (unless it cannot: logit soft-capping), which removes
    the mean of the folded columns; the offset is that mean, or zero when nothing was centred.
    Checked on a few columns within float rounding (`unembed_tolerance`), so a processing dpa_lens
    does not understand is an error, not a silently wrong logit.
    """
    W_raw, b_raw = raw
    W_U = model.W_U.detach().float()
    W_raw = W_raw.to(W_U.device)
    gain = ModelView(model).norm_weight("ln_final")
    if gain is not None:  # fold_ln=False: x̂ carries the final norm's gain, so the raw unembedding reads x̂ / gain
        W_raw = W_raw / gain.to(W_raw)[:, None]
    cols = torch.linspace(0, W_U.shape[1] - 1, 16).long().to(W_U.device)
    ln = str(getattr(model.cfg, "normalization_type", "")).startswith("LN")
    tol = unembed_tolerance(W_raw, model.W_U.dtype, ln)
    candidates = [(W_raw.mean(1), b_raw.mean()), (torch.zeros_like(W_raw[:, 0]), torch.zeros((), device=W_raw.device))]
    for m, mb in candidates:
        got, want = W_U[:, cols] + m[:, None], W_raw[:, cols]
        if ln:  # LayerNorm output has zero mean: folding also drops the columns' mean over d_model
            got, want = got - got.mean(0), want - want.mean(0)
        if float((got - want).abs().max()) <= tol:
            setattr(model, UNEMBED_OFFSET_ATTR, (m.to(W_U.device), mb.to(W_U.device)))
            return
    raise RuntimeError(
        "dpa_lens could not relate the processed unembedding to the raw one "
        "(TransformerLens processed it in an unexpected way); please report this."
    )


def _wrap_bridge(hf_model: Any, tok: Any, name: str, *, device, dtype: torch.dtype, switches: dict[str, bool]) -> Any:
    Bridge = tl.bridge_class()
    raw = _raw_unembedding(hf_model)  # before TransformerLens processes the weights in place
    model = Bridge.boot_transformers(name, hf_model=hf_model, tokenizer=tok, device=device, dtype=dtype)
    d_vocab, d_model = hf_model.get_output_embeddings().weight.shape
    switches = {**switches, "center_unembed": switches["center_unembed"] and d_vocab != d_model}  # see the module's note
    if any(switches.values()):
        model.enable_compatibility_mode(disable_warnings=True, **switches)
    else:
        model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    _record_unembed_offset(model, raw)
    return model


def _rope_theta(config: Any, layer_type: str) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # per layer type (Gemma 3)
        params = params[layer_type]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _hooked_gemma_config(config: Any, *, device, dtype: torch.dtype, fold_ln: bool = True) -> Any:
    """A HookedTransformer config for Gemma 2/3 read from the ``transformers`` config.

    TransformerLens 3.x knows Gemma only by official hub names (it hard-codes their shapes); this
    builds the same fields from any Gemma 2/3 config, so that checkpoints and tiny test models load.
    """
    from transformer_lens import HookedTransformerConfig

    arch = config.architectures[0]
    n = config.num_hidden_layers
    types = list(getattr(config, "layer_types", None) or ["sliding_attention", "full_attention"] * ((n + 1) // 2))[:n]
    soft = lambda v: float(v) if v else -1.0  # noqa: E731
    cfg = dict(
        d_model=config.hidden_size, d_head=config.head_dim, n_heads=config.num_attention_heads,
        n_key_value_heads=config.num_key_value_heads, d_mlp=config.intermediate_size, n_layers=n,
        n_ctx=min(int(config.max_position_embeddings), 8192), eps=config.rms_norm_eps, d_vocab=config.vocab_size,
        act_fn=config.hidden_activation, initializer_range=config.initializer_range,
        normalization_type="RMSPre" if fold_ln else "RMS",  # ln1/ln2 folded, as from_pretrained(fold_ln=True) does
        positional_embedding_type="rotary", rotary_dim=config.head_dim, rotary_base=_rope_theta(config, "full_attention"),
        use_attn_scale=True, attn_scale=float(config.query_pre_attn_scalar) ** 0.5, gated_mlp=True, final_rms=True,
        use_normalization_before_and_after=True, window_size=config.sliding_window, use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in types],
        attn_scores_soft_cap=soft(getattr(config, "attn_logit_softcapping", None)),
        output_logits_soft_cap=soft(getattr(config, "final_logit_softcapping", None)),
        original_architecture=arch, model_name=arch, init_weights=False, device=device, dtype=dtype,
        default_prepend_bos=True, from_checkpoint=False, n_devices=1,
    )
    if arch == "Gemma3ForCausalLM":
        cfg.update(use_qk_norm=True, rotary_base_local=_rope_theta(config, "sliding_attention"))
    return HookedTransformerConfig.from_dict(cfg)


def _wrap_hooked(hf_model: Any, tok: Any, name: str, *, device, dtype: torch.dtype, switches: dict[str, bool]) -> Any:
    """Build a HookedTransformer from a transformers model, without the hub, processed as ``switches`` say.

    TransformerLens 3.x maps a HuggingFace config to its own by architecture when given a local
    folder holding ``config.json``; we write the model's config there and convert its weights.
    """
    import transformer_lens.loading_from_pretrained as loading

    HookedTransformer = tl.hooked_transformer_class()
    config = copy.deepcopy(hf_model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.architectures = [type(hf_model).__name__]
    if not hasattr(config, "n_ctx") and hasattr(config, "n_positions"):
        config.n_ctx = config.n_positions  # TransformerLens 3.x reads GPT-2's old field name
    # TransformerLens picks some architectures by substrings of the name ("llama", "gemma"):
    # keep the folder name free of them so the config decides
    folder = tempfile.mkdtemp(prefix="dpa_lens_cfg_")
    config.save_pretrained(folder)
    if type(hf_model).__name__ in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        cfg = _hooked_gemma_config(config, device=device, dtype=dtype, fold_ln=switches["fold_ln"])
    else:
        try:
            cfg = loading.get_pretrained_model_config(folder, fold_ln=switches["fold_ln"], device=device, dtype=dtype)
        except NotImplementedError as err:
            raise NotImplementedError(
                f"HookedTransformer (TransformerLens {tl.TL_VERSION}) cannot build {type(hf_model).__name__} from a "
                f"config ({err}); it knows that architecture only by its official hub names. Use line='bridge'."
            ) from err
        if getattr(config, "n_inner", None):  # GPT-2 with a non-default MLP width
            cfg.d_mlp = config.n_inner
    cfg.model_name = name.split("/")[-1]
    state_dict = loading.get_pretrained_state_dict(folder, cfg, hf_model, dtype=dtype)
    model = HookedTransformer(cfg, tok, move_to_device=False)
    soft_cap = getattr(cfg, "output_logits_soft_cap", -1.0) > 0  # a soft cap is not shift-invariant: never centred
    model.load_and_process_state_dict(state_dict, **{**switches, "center_unembed": switches["center_unembed"] and not soft_cap})
    model.move_model_modules_to_device()
    _record_unembed_offset(model, _raw_unembedding(hf_model))
    return model
