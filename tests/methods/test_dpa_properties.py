"""DPA's own guarantees: completeness, additivity, batching/padding, dtypes, both TransformerLens lines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.models import tl
from dpa_lens.models.testing import FAMILIES, tiny_hf_model, tiny_tokenizer
from tests.helpers import IOI_PROMPT, LINES, make_tiny, rel_err

PROMPTS = [IOI_PROMPT, "The Eiffel Tower is in", "After Alice and Bob went to the park, Bob gave a ball to"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target", [" Mary", (" Mary", " John"), 7])
def test_content_only_is_complete(family, target, line):
    """With μ_v = μ_up = 1 the re-wired network is linear in the embeddings: tokens + bias = target."""
    model, _ = make_tiny(family, line=line, seed=5)
    _, cache = model.run_with_cache(IOI_PROMPT)
    attr = dpa_lens.dpa(model, cache, target, mu=Mu.content_only())
    assert torch.allclose(attr.tokens.sum(-1) + attr.bias, attr.target_value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_content_only_tokens_sum_to_the_transformers_logit(family, line):
    """Token scores (learned positions and Gemma's embedding scale included) plus the bias terms are
    the logit of the untouched transformers model (after its final soft cap, if any)."""
    model, ref = make_tiny(family, line=line, seed=6)
    tokens = model.to_tokens(IOI_PROMPT)
    _, cache = model.run_with_cache(tokens)
    attr = dpa_lens.dpa(model, cache, " Mary", mu=Mu.content_only())
    with torch.no_grad():
        logit = ref(tokens).logits[0, -1, model.to_single_token(" Mary")]
    total = attr.tokens.sum() + attr.bias.sum()
    assert abs(float(total - logit)) < 1e-5 * max(1.0, abs(float(logit)))
    assert attr.bias.abs().max() < 0.5 * attr.tokens.abs().sum()  # the tokens carry the logit, not the bias


def test_other_mu_are_not_complete(line):
    """Completeness is a property of content-only DPA; the control paths break it (a sanity check
    that the completeness test above can fail)."""
    model, _ = make_tiny("llama", line=line, seed=5)
    _, cache = model.run_with_cache(IOI_PROMPT)
    attr = dpa_lens.dpa(model, cache, " Mary", mu=Mu.paper_default())
    assert (attr.tokens.sum(-1) + attr.bias - attr.target_value).abs().max() > 1e-3


def test_scores_are_additive(line):
    """Heads sum to their attention layer's score, neurons to their MLP's (plus the bias terms)."""
    model, _ = make_tiny("qwen2", line=line, seed=4)
    _, cache = model.run_with_cache(IOI_PROMPT)
    attr = dpa_lens.dpa(model, cache, (" Mary", " John"), effective_targets=True)
    L = model.cfg.n_layers
    for layer in range(L):
        t_mid = attr.effective_targets[f"blocks.{layer}.hook_resid_mid"]
        t_post = (
            attr.effective_targets[f"blocks.{layer + 1}.hook_resid_pre"]
            if layer + 1 < L
            else attr.effective_targets[f"blocks.{L - 1}.hook_resid_post"]
        )
        attn_layer = (cache[f"blocks.{layer}.hook_attn_out"] * t_mid).sum(-1)  # [batch, pos]
        b_O = model.blocks[layer].attn.b_O
        heads = attr.heads[:, layer].sum(-1) + (t_mid * b_O).sum(-1)
        assert torch.allclose(heads, attn_layer, rtol=1e-4, atol=1e-5)
        mlp_layer = (cache[f"blocks.{layer}.hook_mlp_out"] * t_post).sum(-1)
        assert torch.allclose(attr.neurons[:, layer].sum(-1), mlp_layer, rtol=1e-4, atol=1e-5)


@pytest.mark.smollm2
def test_smollm2_completeness_and_additivity(smollm2):
    _, cache = smollm2.run_with_cache(IOI_PROMPT)
    attr = dpa_lens.dpa(smollm2, cache, " Mary", mu=Mu.content_only(), effective_targets=True)
    assert attr.target["logit"] == ["raw"]
    assert abs(float(attr.tokens.sum() + attr.bias - attr.target_value)) < 1e-4 * float(attr.target_value.abs())
    layer = 17
    t_mid = attr.effective_targets[f"blocks.{layer}.hook_resid_mid"]
    t_post = attr.effective_targets[f"blocks.{layer + 1}.hook_resid_pre"]
    assert torch.allclose(attr.heads[:, layer].sum(-1), (cache[f"blocks.{layer}.hook_attn_out"] * t_mid).sum(-1), rtol=1e-4, atol=1e-5)
    assert torch.allclose(attr.neurons[:, layer].sum(-1), (cache[f"blocks.{layer}.hook_mlp_out"] * t_post).sum(-1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_single_rows(side, line):
    model, _ = make_tiny("qwen2", line=line, seed=6)
    singles = []
    for prompt in PROMPTS:
        _, cache = model.run_with_cache(prompt)
        singles.append(dpa_lens.dpa(model, cache, " Paris", head_keys=True))
    _, cache = model.run_with_cache(PROMPTS, padding_side=side)
    batch = dpa_lens.dpa(model, cache, " Paris", head_keys=True)
    n = batch.tokens.shape[1]
    assert len({s.tokens.shape[1] for s in singles}) > 1  # the batch really is padded
    for i, single in enumerate(singles):
        k = single.tokens.shape[1]
        cols = slice(0, k) if side == "right" else slice(n - k, n)
        pads = torch.ones(n, dtype=torch.bool)
        pads[cols] = False
        assert int(batch.positions[i]) == (k - 1 if side == "right" else n - 1)
        torch.testing.assert_close(batch.target_value[i], single.target_value[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.tokens[i, cols], single.tokens[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.heads[i, :, cols], single.heads[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.neurons[i, :, cols], single.neurons[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch.head_keys[i, :, :, cols, cols], single.head_keys[0], rtol=1e-4, atol=1e-5)
        assert batch.tokens[i, pads].abs().sum() == 0
        assert batch.heads[i][:, pads].abs().sum() == 0


def test_per_row_targets_equal_separate_runs(line):
    model, _ = make_tiny("llama", line=line, seed=7)
    _, cache = model.run_with_cache(PROMPTS[:2], padding_side="left")
    targets = [(" Mary", " John"), " Paris"]
    both = dpa_lens.dpa(model, cache, targets)
    for i, target in enumerate(targets):
        one = dpa_lens.dpa(model, cache, target)
        torch.testing.assert_close(both.tokens[i], one.tokens[i])
        torch.testing.assert_close(both.heads[i], one.heads[i])
    assert both.target["labels"] == ["' Mary' − ' John'", "' Paris'"]


def test_explicit_position(line):
    model, _ = make_tiny("llama", line=line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    last = dpa_lens.dpa(model, cache, " Mary")
    n = last.tokens.shape[1]
    same = dpa_lens.dpa(model, cache, " Mary", position=n - 1)
    torch.testing.assert_close(same.tokens, last.tokens)
    earlier = dpa_lens.dpa(model, cache, " Mary", position=5)
    assert int(earlier.positions[0]) == 5
    assert earlier.tokens[0, 6:].abs().max() == 0  # causal: nothing after the answer position
    assert earlier.heads[0, :, 6:].abs().max() == 0


def test_works_with_grad_disabled(line):
    model, _ = make_tiny("llama", line=line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    expected = dpa_lens.dpa(model, cache, " Mary")
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        _, cache = model.run_with_cache(IOI_PROMPT)
        attr = dpa_lens.dpa(model, cache, " Mary")
    finally:
        torch.set_grad_enabled(previous)
    torch.testing.assert_close(attr.heads, expected.heads)
    assert not attr.heads.requires_grad


def test_names_filter_caches_enough_and_agrees(line):
    model, _ = make_tiny("qwen2", line=line)
    _, full = model.run_with_cache(IOI_PROMPT)
    _, small = model.run_with_cache(IOI_PROMPT, names_filter=dpa_lens.dpa_names_filter(model))
    assert len(small) < len(full)
    a, b = dpa_lens.dpa(model, full, " Mary"), dpa_lens.dpa(model, small, " Mary")
    torch.testing.assert_close(a.neurons, b.neurons)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype, line):
    """The sweep runs in float32 on half-precision activations; numbers stay near float32's."""
    model32, _ = make_tiny("llama", line=line, seed=8, init_scale=0.1)
    model16, _ = make_tiny("llama", line=line, seed=8, init_scale=0.1, dtype=dtype)
    assert model16.W_Q.dtype == dtype
    _, c32 = model32.run_with_cache(IOI_PROMPT)
    _, c16 = model16.run_with_cache(IOI_PROMPT)
    a32 = dpa_lens.dpa(model32, c32, (" Mary", " John"))
    a16 = dpa_lens.dpa(model16, c16, (" Mary", " John"))
    assert a16.heads.dtype == torch.float32 and a16.tokens.dtype == torch.float32
    assert rel_err(a16.heads, a32.heads) < 0.05
    assert rel_err(a16.tokens, a32.tokens) < 0.05
    content = dpa_lens.dpa(model16, c16, (" Mary", " John"), mu=Mu.content_only())
    assert abs(float(content.tokens.sum() + content.bias - content.target_value)) < 0.05 * float(content.target_value.abs()) + 0.02


# ------------------------------------------------------------------ TransformerLens 3.x = 4.x


@pytest.mark.skipif(len(LINES) < 2, reason="needs HookedTransformer and TransformerBridge (TransformerLens 3.x)")
@pytest.mark.parametrize("family", FAMILIES)
def test_hooked_transformer_equals_bridge(family):
    """The same weights through HookedTransformer and TransformerBridge give the same scores."""
    hooked, _ = make_tiny(family, line="hooked", seed=9)
    bridge, _ = make_tiny(family, line="bridge", seed=9)
    results = []
    for model in (hooked, bridge):
        _, cache = model.run_with_cache(PROMPTS, padding_side="left")
        results.append(dpa_lens.dpa(model, cache, (" Mary", " John"), head_keys=True))
    for kind in ("tokens", "heads", "neurons", "head_keys"):
        assert rel_err(getattr(results[0], kind), getattr(results[1], kind)) < 1e-5, kind


@pytest.mark.smollm2
@pytest.mark.skipif(len(LINES) < 2, reason="needs HookedTransformer and TransformerBridge (TransformerLens 3.x)")
def test_smollm2_hooked_transformer_equals_bridge(smollm2_on):
    results = []
    for line_ in ("hooked", "bridge"):
        model = smollm2_on(line_)
        _, cache = model.run_with_cache(IOI_PROMPT)
        results.append(dpa_lens.dpa(model, cache, (" Mary", " John")))
    for kind in ("tokens", "heads", "neurons"):
        assert rel_err(getattr(results[0], kind), getattr(results[1], kind)) < 1e-4, kind


XLINE_DIR = os.environ.get("DPA_LENS_XLINE_DIR")


def _xline_attr(family: str) -> dpa_lens.Attribution:
    model = dpa_lens.load_model(tiny_hf_model(family, seed=11), tokenizer=tiny_tokenizer())
    _, cache = model.run_with_cache(PROMPTS, padding_side="left")
    return dpa_lens.dpa(model, cache, (" Mary", " John"))


@pytest.mark.skipif(XLINE_DIR is None, reason="set DPA_LENS_XLINE_DIR to compare TransformerLens lines across environments")
@pytest.mark.parametrize("family", FAMILIES)
def test_same_numbers_across_transformer_lens_versions(family):
    """CI runs the suite on TransformerLens 4.x first, which writes its scores; the 3.x run
    (HookedTransformer) must reproduce them."""
    path = Path(XLINE_DIR) / f"dpa_{family}.pt"
    attr = _xline_attr(family)
    if tl.TL_MAJOR >= 4:
        path.parent.mkdir(parents=True, exist_ok=True)
        attr.save(path)
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: run the suite on TransformerLens 4.x first with the same DPA_LENS_XLINE_DIR")
    ref = dpa_lens.Attribution.load(path)
    for kind in ("tokens", "heads", "neurons"):
        assert rel_err(getattr(attr, kind), getattr(ref, kind)) < 1e-5, kind


@pytest.mark.parametrize("side", ["right", "left"])
def test_patterns_recomputed_when_not_cached(side, line):
    """dpa_names_filter(model, patterns=False) saves the patterns' memory: DPA recomputes them from
    the cached queries and keys (checked against the cached head outputs) with the same numbers."""
    model, _ = make_tiny("qwen2", line=line, seed=15)
    _, full = model.run_with_cache(PROMPTS, padding_side=side)
    _, lean = model.run_with_cache(PROMPTS, padding_side=side, names_filter=dpa_lens.dpa_names_filter(model, patterns=False))
    assert not any(k.endswith("hook_pattern") for k in lean.keys())
    a = dpa_lens.dpa(model, full, (" Mary", " John"), head_keys=True)
    b = dpa_lens.dpa(model, lean, (" Mary", " John"), head_keys=True)
    for kind in ("tokens", "heads", "neurons", "head_keys"):
        torch.testing.assert_close(getattr(b, kind), getattr(a, kind), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("patterns", [True, False])
@pytest.mark.parametrize("blocks", [("BLOCK_ELEMENTS", 1), ("BLOCK_ROWS", 3)], ids=["one-row", "three-rows"])
def test_attention_in_query_blocks_equals_one_block(family, patterns, blocks, line, monkeypatch):
    """The attention rule processed a few query rows at a time (one; three, so that blocks straddle the
    causal mask's diagonal) gives the same numbers as in one block, per-key scores and circuit readers
    included, with patterns cached or recomputed."""
    from dpa_lens.methods.dpa import attention_blocks

    model, _ = make_tiny(family, line=line, seed=17)
    if family.startswith("gemma"):
        patterns = True  # sliding windows: the patterns must be cached
    _, cache = model.run_with_cache(PROMPTS, padding_side="left",
                                    names_filter=dpa_lens.dpa_names_filter(model, patterns=patterns))
    assert cache["hook_embed"].shape[1] <= attention_blocks.BLOCK_ROWS  # the reference is one block
    whole = dpa_lens.dpa(model, cache, (" Mary", " John"), head_keys=patterns)
    whole_edges = dpa_lens.dpa_edges(model, cache, " Mary").to_dataframe()
    monkeypatch.setattr(attention_blocks, *blocks)
    rows = dpa_lens.dpa(model, cache, (" Mary", " John"), head_keys=patterns)
    row_edges = dpa_lens.dpa_edges(model, cache, " Mary").to_dataframe()
    for kind in ("tokens", "heads", "neurons") + (("head_keys",) if patterns else ()):
        torch.testing.assert_close(getattr(rows, kind), getattr(whole, kind), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(row_edges["score"].values), torch.tensor(whole_edges["score"].values),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("check_rows", [None, 3])
def test_a_wrong_recomputed_pattern_is_refused(check_rows, line, monkeypatch):
    """Refused when all rows are checked, and when a few spread rows are (as on long inputs)."""
    from dpa_lens.methods.dpa import attention_blocks

    if check_rows is not None:
        monkeypatch.setattr(attention_blocks, "PATTERN_CHECK_ROWS", check_rows)
    model, _ = make_tiny("llama", line=line, seed=16)
    _, lean = model.run_with_cache(IOI_PROMPT, names_filter=dpa_lens.dpa_names_filter(model, patterns=False))
    keys = lean["blocks.1.attn.hook_rot_k"]
    tampered = keys.clone()
    tampered[:, 5] = keys[:, 6]  # one key not what the model used
    lean.cache_dict["blocks.1.attn.hook_rot_k"] = tampered
    with pytest.raises(dpa_lens.CacheError, match="could not be recomputed"):
        dpa_lens.dpa(model, lean, " Mary")
