"""DPA equals the gradient of the re-wired forward (tests/oracles/rewired.py), written from the raw
transformers weights: independent of dpa_lens's sweep and of TransformerLens."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.models.testing import FAMILIES

from .conftest import IOI_PROMPT, make_tiny, rel_err
from .oracles.rewired import rewired_scores

MUS = {
    "paper_default": Mu.paper_default(),
    "content_only": Mu.content_only(),
    "control_heavy": Mu.control_content(0.1),
    "query_only": Mu.query_key(1.0),
    "key_only": Mu.query_key(0.0),
    "lopsided": Mu(q=0.6, k=0.1, v=0.3, gate=0.8, up=0.2),
}

TOL = 1e-4


def oracle_for(attr: dpa_lens.Attribution, ref, tokens, mu: Mu, pair: bool):
    ids = attr.target["token_ids"][0]
    pos = attr.positions
    rows = torch.arange(tokens.shape[0])
    if pair:
        fn = lambda lg: lg[rows, pos, ids[0]] - lg[rows, pos, ids[1]]  # noqa: E731
    else:
        fn = lambda lg: lg[rows, pos, ids[0]]  # noqa: E731
    return rewired_scores(ref, tokens, fn, mu=(mu.q, mu.k, mu.v, mu.gate, mu.up), positions=pos)


def assert_matches(attr, oracle):
    # float32 model against a float64 oracle: 1e-5 relative, or absolute for logits near zero
    assert float((attr.target_value.double() - oracle.value).abs().max()) < 1e-5 * max(1.0, float(oracle.value.abs().max()))
    assert rel_err(attr.tokens, oracle.tokens) < TOL
    assert rel_err(attr.heads, oracle.heads) < TOL
    assert rel_err(attr.neurons, oracle.neurons) < TOL
    assert rel_err(attr.bias, oracle.bias) < TOL if oracle.bias.abs().max() > 0 else attr.bias.abs().max() < 1e-5


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
