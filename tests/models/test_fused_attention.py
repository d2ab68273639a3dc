"""`fused_attention`: the cache DPA reads is the same with fused attention, and the bridge's own
forward runs wherever the fused path would not compute the same thing."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens.models import fast_attention, tl
from dpa_lens.models.testing import FAMILIES
from tests.helpers import IOI_PROMPT, PAIR, make_tiny, rel_err

PROMPTS = [IOI_PROMPT, "The Eiffel Tower is in the city of Paris, and the Colosseum is in"]
FUSED_FAMILIES = ("llama", "qwen2", "qwen3")  # plain causal rotary attention: every layer fused


def _lean_cache(model, tokens, **kwargs):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=dpa_lens.dpa_names_filter(model, patterns=False), **kwargs)


def _bridge_base():
    base = fast_attention._bridge_attention_class()
    if base is None or tl.TL_MAJOR < 4:
        pytest.skip("fused attention takes over TransformerLens 4's attention bridge only")
    return base


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cache_and_dpa_are_unchanged_on_every_family(family):
    """Every cached activation within 1e-5 (relative to its largest entry) and DPA's scores within 1e-5."""
    model, _ = make_tiny(family, line="bridge")
    tokens = model.to_tokens(PROMPTS[:1])
    eager_logits, eager = _lean_cache(model, tokens)
    with dpa_lens.fused_attention(model) as n_fused:
        fused_logits, fused = _lean_cache(model, tokens)
    if family in FUSED_FAMILIES and tl.TL_MAJOR >= 4:
        assert n_fused == model.cfg.n_layers
    assert sorted(fused.keys()) == sorted(eager.keys())
    assert rel_err(fused_logits, eager_logits) < 1e-5
    for name in eager.keys():
        assert rel_err(fused[name], eager[name]) < 1e-5, name
    a, b = dpa_lens.dpa(model, eager, PAIR), dpa_lens.dpa(model, fused, PAIR)
    for kind in ("tokens", "heads", "neurons"):
        assert (a.scores(kind) - b.scores(kind)).abs().max() < 1e-5, kind


def test_the_fused_path_runs_no_eager_attention(monkeypatch):
    """Inside the block, a lean cache forward never calls the bridge's eager forward."""
    base = _bridge_base()
    model, _ = make_tiny("llama", line="bridge")
    tokens = model.to_tokens(PROMPTS[:1])
    _, eager = _lean_cache(model, tokens)
    calls = []
    original = base.forward
    monkeypatch.setattr(base, "forward", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    with dpa_lens.fused_attention(model) as n_fused:
        _, fused = _lean_cache(model, tokens)
    assert n_fused == model.cfg.n_layers and calls == []
    assert rel_err(fused["blocks.1.attn.hook_z"], eager["blocks.1.attn.hook_z"]) < 1e-5
    _lean_cache(model, tokens)  # after the block, the bridge's own forward again
    assert len(calls) == model.cfg.n_layers


def test_hooked_patterns_padding_and_kv_caches_take_the_bridge_forward():
    """Asking for patterns, a left-padded batch or generation with a KV cache gives exactly the
    bridge's own results inside the block."""
    _bridge_base()
    model, _ = make_tiny("llama", line="bridge")
    tokens = model.to_tokens(PROMPTS[:1])
    with torch.no_grad():
        _, eager = model.run_with_cache(tokens)
        _, eager_padded = model.run_with_cache(PROMPTS, padding_side="left")
        with dpa_lens.fused_attention(model) as n_fused:
            _, full = model.run_with_cache(tokens)
            _, padded = model.run_with_cache(PROMPTS, padding_side="left")
    assert n_fused == model.cfg.n_layers
    assert torch.equal(full["blocks.0.attn.hook_pattern"], eager["blocks.0.attn.hook_pattern"])
    assert torch.equal(full["blocks.1.attn.hook_z"], eager["blocks.1.attn.hook_z"])
    assert torch.equal(padded["blocks.1.attn.hook_z"], eager_padded["blocks.1.attn.hook_z"])
    torch.manual_seed(0)
    expected = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    with dpa_lens.fused_attention(model):
        generated = model.generate(tokens, max_new_tokens=4, do_sample=False, verbose=False)
    assert torch.equal(generated, expected)


def test_the_block_leaves_the_model_as_it_found_it():
    base = _bridge_base()
    model, _ = make_tiny("qwen3", line="bridge")
    with dpa_lens.fused_attention(model) as n_fused:
        assert n_fused > 0
        with pytest.raises(RuntimeError, match="inside"):
            raise RuntimeError("an error inside the block")
    for module in model.modules():
        assert "forward" not in module.__dict__
        if isinstance(module, base):
            assert "forward" not in module.original_component.__dict__


def test_sliding_window_and_hooked_transformer_models_are_left_alone():
    """Gemma 3 caches its patterns for DPA (sliding windows), so its layers all take the bridge
    forward; a HookedTransformer has no bridge layers at all."""
    model, _ = make_tiny("gemma3", line="bridge")
    tokens = model.to_tokens(PROMPTS[:1])
    _, eager = _lean_cache(model, tokens)
    with dpa_lens.fused_attention(model):
        _, fused = _lean_cache(model, tokens)
    for name in eager.keys():
        assert torch.equal(fused[name], eager[name]), name
    if tl.hooked_transformer_class() is not None:
        hooked, _ = make_tiny("llama", line="hooked")
        with dpa_lens.fused_attention(hooked) as n_fused:
            assert n_fused == 0


def test_the_causal_check_reads_each_mask_once_and_sees_changes():
    """The answer is kept for one unchanged mask tensor (every layer gets the same one), not for another
    mask of the same shape, nor for the same mask edited in place."""
    n = 6
    causal = torch.zeros(1, 1, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    assert fast_attention._causal(causal, n, n)
    padded = causal.clone()
    padded[..., 0] = float("-inf")  # a masked first key (left padding)
    assert not fast_attention._causal(padded, n, n)
    assert fast_attention._causal(causal, n, n)
    causal[..., 0, 0] = float("-inf")  # the same tensor, edited
    assert not fast_attention._causal(causal, n, n)
