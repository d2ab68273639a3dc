"""Mixture-of-experts models (a tiny Mixtral): a layer's MLP has no one set of neurons, each token's are
its experts'. Methods that score neurons give tokens and heads and no neurons (gradients, AtP, the random
baseline), refuse neurons asked for by name, or refuse the model (DPA, DLA, DePass, Unpack, the edges)."""

from __future__ import annotations

import copy

import pytest
import torch

import dpa_lens
from dpa_lens import InputError, UnsupportedModelError
from tests.helpers import CORRUPTED, IOI_PROMPT, LINES, PAIR


@pytest.fixture(scope="module", params=LINES)
def moe(request):
    """(model, untouched transformers reference) of a two-layer Mixtral with two experts, one per token."""
    import transformers

    from dpa_lens.models.testing import tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64)
    cfg.architectures = ["MixtralForCausalLM"]
    hf = transformers.MixtralForCausalLM(cfg).eval()
    ref = copy.deepcopy(hf)
    return dpa_lens.load_model(hf, tokenizer=tiny_tokenizer(), line=request.param), ref


@pytest.mark.parametrize("name", ["gradient", "input_x_gradient", "atp", "atp*", "random"])
def test_neuron_methods_give_tokens_and_heads_and_no_neurons(moe, name):
    model, _ = moe
    pair = {"corrupted": CORRUPTED} if dpa_lens.get_method(name).input == "pair" else {}
    attr = dpa_lens.run(name, model, IOI_PROMPT, PAIR, **pair)
    n = model.to_tokens(IOI_PROMPT).shape[1]
    assert attr.neurons is None  # not the block's output under the name of neurons
    assert attr.tokens.shape == (1, n) and attr.heads.shape == (1, 2, n, 2)
    assert torch.isfinite(attr.tokens).all() and torch.isfinite(attr.heads).all() and attr.heads.abs().sum() > 0


def test_gradient_of_the_tokens_is_the_transformers_models(moe):
    """An independent reference: the transformers model's gradient at its input embeddings, routing included."""
    model, ref = moe
    tokens = model.to_tokens(IOI_PROMPT).cpu()
    good, bad = (model.to_single_token(t) for t in PAIR)
    embeds = ref.get_input_embeddings()(tokens).detach().requires_grad_()
    logits = ref(inputs_embeds=embeds).logits
    (logits[0, -1, good] - logits[0, -1, bad]).backward()
    attr = dpa_lens.gradient(model, tokens, PAIR)
    torch.testing.assert_close(attr.tokens.cpu(), embeds.grad.norm(dim=-1), rtol=1e-4, atol=1e-6)


def test_neurons_asked_for_by_name_are_refused(moe):
    model, _ = moe
    with pytest.raises(InputError, match=r"mixture of experts.*kinds=\('tokens', 'heads'\)"):
        dpa_lens.gradient(model, IOI_PROMPT, PAIR, kinds=("tokens", "neurons"))
    with pytest.raises(InputError, match="mixture of experts"):
        dpa_lens.run("activation_patching", model, IOI_PROMPT, PAIR, corrupted=CORRUPTED, unit="neurons", layers=[0])
    heads = dpa_lens.gradient(model, IOI_PROMPT, PAIR, kinds=("heads",))
    assert heads.heads is not None and heads.tokens is None and heads.neurons is None


@pytest.mark.parametrize("name", ["dpa", "dla", "depass", "unpack", "dpa_edges", "edge_atp", "edge_patching"])
def test_methods_whose_scores_need_neurons_refuse_the_model(moe, name):
    """DLA's scores add up to the target through each MLP's neurons: it refuses, as DPA does, naming the fix."""
    model, _ = moe
    pair = {"corrupted": CORRUPTED} if dpa_lens.get_method(name).input == "pair" else {}
    with pytest.raises(UnsupportedModelError, match="mixture of experts"):
        dpa_lens.run(name, model, IOI_PROMPT, PAIR, **pair)
