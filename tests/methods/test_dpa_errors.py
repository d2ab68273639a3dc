"""Bad input gets a clear error, never a silently wrong number."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens import CacheError, Mu, TargetError, UnsupportedModelError
from tests.helpers import IOI_PROMPT, make_tiny


@pytest.fixture
def tiny(line):
    model, _ = make_tiny("llama", line=line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    return model, cache


@pytest.mark.filterwarnings("ignore:run_with_cache. skipped")
def test_missing_hooks_are_named_with_the_filter_that_caches_them(tiny):
    model, _ = tiny
    _, cache = model.run_with_cache(IOI_PROMPT, names_filter=lambda n: "mlp" not in n)
    with pytest.raises(CacheError) as info:
        dpa_lens.dpa(model, cache, " Mary")
    message = str(info.value)
    assert "blocks.0.mlp.hook_pre" in message
    assert "names_filter=dpa_lens.dpa_names_filter(model)" in message


def test_cache_from_another_model(tiny, line):
    model, _ = tiny
    other, _ = make_tiny("llama", line=line, seed=123)  # same shapes, other weights
    _, other_cache = other.run_with_cache(IOI_PROMPT)
    with pytest.raises(CacheError, match="another model"):
        dpa_lens.dpa(model, other_cache, " Mary")


def test_cache_from_a_model_with_other_shapes(tiny, line):
    model, _ = tiny
    other, _ = make_tiny("llama", line=line, seed=1, n_layers=3, d_model=32, n_heads=2, n_kv_heads=1)
    _, other_cache = other.run_with_cache(IOI_PROMPT)
    with pytest.raises(CacheError):
        dpa_lens.dpa(model, other_cache, " Mary")


def test_cache_from_a_model_sharing_the_embedding(line):
    """Same embedding matrix, other layers: caught by the layer-0 value check."""
    model, _ = make_tiny("llama", line=line, seed=1)
    other_hf = __import__("dpa_lens.models.testing", fromlist=["x"]).tiny_hf_model("llama", seed=2)
    other_hf.model.embed_tokens.weight.data.copy_(model.W_E.detach())
    other = dpa_lens.load_model(other_hf, tokenizer=model.tokenizer, line=line)
    _, cache = other.run_with_cache(IOI_PROMPT)
    with pytest.raises(CacheError, match="another model"):
        dpa_lens.dpa(model, cache, " Mary")


def test_cache_from_another_input(tiny):
    model, cache = tiny
    other_tokens = model.to_tokens("When Alice and Bob went to the park, Bob gave a ball to")
    with pytest.raises(CacheError, match="another input"):
        dpa_lens.dpa(model, cache, " Mary", tokens=other_tokens)
    same_length = model.to_tokens(IOI_PROMPT).clone()
    same_length[0, 3] = (same_length[0, 3] + 1) % 100
    with pytest.raises(CacheError, match="another input"):
        dpa_lens.dpa(model, cache, " Mary", tokens=same_length)
    # the right tokens are accepted
    dpa_lens.dpa(model, cache, " Mary", tokens=model.to_tokens(IOI_PROMPT))


def test_multi_token_target_shows_the_pieces(tiny):
    model, cache = tiny
    with pytest.raises(TargetError) as info:
        dpa_lens.dpa(model, cache, " Marianne Smithsonian")
    message = str(info.value)
    assert "17 tokens" in message and "' Smithsonian'" not in message
    assert "'ar', 'i', 'an'" in message  # the pieces, as the tokenizer cut them
    assert isinstance(info.value, ValueError)


def test_missing_leading_space_gets_a_hint(tiny):
    model, cache = tiny
    with pytest.raises(TargetError, match="leading space") as info:
        dpa_lens.dpa(model, cache, "gave")
    assert "' gave'" in str(info.value)


@pytest.mark.parametrize("bad", [-1, 10**6, (3, 10**6)])
def test_out_of_vocabulary_ids(tiny, bad):
    model, cache = tiny
    with pytest.raises(TargetError, match="out of the vocabulary"):
        dpa_lens.dpa(model, cache, bad)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(5), "d_model"),
        (torch.full((64,), float("nan")), "non-finite"),
        ([" Mary", " John"], "one target per batch row"),
        ((1, 2, 3), r"\(correct, incorrect\)"),
        (2.5, "cannot read a token"),
    ],
)
def test_malformed_targets(tiny, bad, match):
    model, cache = tiny
    with pytest.raises(TargetError, match=match):
        dpa_lens.dpa(model, cache, bad)


@pytest.mark.parametrize("position", [15, -16, 100, 2.0])
def test_positions_out_of_range(tiny, position):
    model, cache = tiny
    with pytest.raises(ValueError, match="position"):
        dpa_lens.dpa(model, cache, " Mary", position=position)


def test_position_on_padding_is_refused(line):
    model, _ = make_tiny("llama", line=line)
    _, cache = model.run_with_cache([IOI_PROMPT, "The Eiffel Tower is in"], padding_side="right")
    with pytest.raises(ValueError, match="padding"):
        dpa_lens.dpa(model, cache, " Paris", position=[14, 14])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(q=0.5, k=0.5, v=0.5), "q \\+ k \\+ v must be 1"),
        (dict(gate=0.7, up=0.7), "gate \\+ up must be 1"),
        (dict(q=-0.25, k=0.75, v=0.5), "outside"),
        (dict(v=float("nan")), "finite"),
        (dict(q=True), "finite number"),
    ],
)
def test_invalid_mu(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mu(**kwargs)


def test_mu_must_be_a_mu(tiny):
    model, cache = tiny
    with pytest.raises(TypeError, match="dpa_lens.Mu"):
        dpa_lens.dpa(model, cache, " Mary", mu=(0.25, 0.25, 0.5, 0.5, 0.5))


def test_unsupported_architecture_names_what_is_supported(line):
    """A mixture-of-experts model (Mixtral): its router is no block DPA's rules cover."""
    import transformers

    from dpa_lens.models.testing import tiny_tokenizer

    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64)
    cfg.architectures = ["MixtralForCausalLM"]
    model = dpa_lens.load_model(transformers.MixtralForCausalLM(cfg).eval(), tokenizer=tiny_tokenizer(), line=line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    with pytest.raises(UnsupportedModelError, match="Supported: Llama") as info:
        dpa_lens.dpa(model, cache, " Mary")
    assert "MixtralForCausalLM" in str(info.value) and "GPT-2" in str(info.value)


def test_not_a_transformer_lens_model():
    with pytest.raises(TypeError, match="TransformerLens model"):
        dpa_lens.dpa(torch.nn.Linear(2, 2), {}, 1)


def test_bad_options(tiny):
    model, cache = tiny
    with pytest.raises(ValueError, match="neuron_target"):
        dpa_lens.dpa(model, cache, " Mary", neuron_target="pre")
    with pytest.raises(ValueError, match="kinds"):
        dpa_lens.dpa(model, cache, " Mary", kinds=("tokens", "edges"))
    with pytest.raises(TargetError, match="logit must be"):
        dpa_lens.dpa(model, cache, " Mary", logit="softmax")
