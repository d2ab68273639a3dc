"""DPA equals the gradient of the re-wired forward (tests/oracles/rewired.py), written from the raw
transformers weights: independent of dpa_lens's sweep and of TransformerLens."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.models.testing import FAMILIES
from tests.helpers import IOI_PROMPT, MUS, TOL, assert_matches, make_tiny, oracle_for, rel_err


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mu_name", list(MUS))
def test_tiny_models_equal_the_oracle(family, mu_name, line):
    mu = MUS[mu_name]
    model, ref = make_tiny(family, line=line, seed=3)
    tokens = model.to_tokens(IOI_PROMPT)
    _, cache = model.run_with_cache(tokens)
    attr = dpa_lens.dpa(model, cache, " Mary", mu=mu, head_keys=True)
    oracle = oracle_for(attr, ref, tokens, mu, pair=False)
    assert_matches(attr, oracle)
    assert rel_err(attr.head_keys, oracle.head_keys) < TOL


def test_effective_targets_are_the_oracle_gradients(line):
    mu = Mu.paper_default()
    model, ref = make_tiny("qwen2", line=line, seed=1)
    tokens = model.to_tokens(IOI_PROMPT)
    _, cache = model.run_with_cache(tokens)
    attr = dpa_lens.dpa(model, cache, (" Mary", " John"), mu=mu, effective_targets=True)
    oracle = oracle_for(attr, ref, tokens, mu, pair=True)
    for layer in range(model.cfg.n_layers):
        got = attr.effective_targets[f"blocks.{layer}.hook_resid_pre"]
        assert rel_err(got, oracle.grad_resid_pre[layer]) < TOL
        got = attr.effective_targets[f"blocks.{layer}.hook_resid_mid"]
        assert rel_err(got, oracle.grad_resid_mid[layer]) < TOL


def test_neuron_target_mid_is_the_authors_convention(line):
    mu = Mu.paper_default()
    model, ref = make_tiny("llama", line=line, seed=2)
    tokens = model.to_tokens(IOI_PROMPT)
    _, cache = model.run_with_cache(tokens)
    post = dpa_lens.dpa(model, cache, " Mary", mu=mu)
    mid = dpa_lens.dpa(model, cache, " Mary", mu=mu, neuron_target="mid")
    oracle = oracle_for(post, ref, tokens, mu, pair=False)
    assert rel_err(mid.neurons, oracle.neurons_mid) < TOL
    assert rel_err(mid.neurons, post.neurons) > 1e-3  # the two conventions really differ
    assert torch.equal(mid.heads, post.heads) and torch.equal(mid.tokens, post.tokens)


@pytest.mark.smollm2
@pytest.mark.parametrize("mu_name", ["paper_default", "content_only", "lopsided"])
def test_smollm2_equals_the_oracle(smollm2, smollm2_hf, mu_name):
    mu = MUS[mu_name]
    hf, _ = smollm2_hf
    tokens = smollm2.to_tokens(IOI_PROMPT)
    _, cache = smollm2.run_with_cache(tokens, names_filter=dpa_lens.dpa_names_filter(smollm2))
    attr = dpa_lens.dpa(smollm2, cache, (" Mary", " John"), mu=mu)
    assert_matches(attr, oracle_for(attr, hf, tokens, mu, pair=True))


@pytest.mark.smollm2
def test_smollm2_raw_logit_equals_the_oracle(smollm2, smollm2_hf):
    """A token target explains the raw logit of the transformers model, not the centred one."""
    hf, _ = smollm2_hf
    tokens = smollm2.to_tokens("The Eiffel Tower is located in the city of")
    _, cache = smollm2.run_with_cache(tokens)
    attr = dpa_lens.dpa(smollm2, cache, " Paris")
    assert attr.target["logit"] == ["raw"]
    assert_matches(attr, oracle_for(attr, hf, tokens, Mu.paper_default(), pair=False))
