"""Checkpointed DPA (``dpa_names_filter(model, checkpoint=True)``): only the residual streams cached,
each layer recomputed in the sweep. The scores must be the full cache's, the recomputation checked."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens.methods.dpa.checkpoint import RecomputedCache, recomputed
from dpa_lens.methods.dpa.hooks import checkpoint_hook_names
from dpa_lens.models import hooks, tl
from dpa_lens.models.view import ModelView
from tests.helpers import IOI_PROMPT, PAIR, make_tiny, rel_err

CHECKPOINTABLE = ("llama", "qwen2", "qwen3", "gpt2", "neox")
REFUSED = {"mistral": "sliding-window", "gemma2": "soft-capped", "gemma3": "sliding-window"}
PROMPTS = [IOI_PROMPT, "The Eiffel Tower is in the city of"]


def _caches(model, inputs, **kwargs):
    with torch.no_grad():
        _, full = model.run_with_cache(inputs, names_filter=dpa_lens.dpa_names_filter(model, flow=True), **kwargs)
        _, lean = model.run_with_cache(inputs, names_filter=dpa_lens.dpa_names_filter(model, checkpoint=True), **kwargs)
    return full, lean


def _assert_same(a, b, tol=1e-5):
    for kind in ("tokens", "heads", "neurons", "head_keys", "flow"):
        x, y = getattr(a, kind), getattr(b, kind)
        assert (x is None) == (y is None), kind
        if x is not None and x.numel():
            assert rel_err(y, x) <= tol, (kind, rel_err(y, x))
    assert torch.allclose(a.bias, b.bias, rtol=tol, atol=tol * float(a.target_value.abs().max()))
    assert torch.allclose(a.target_value, b.target_value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", CHECKPOINTABLE)
@pytest.mark.parametrize("side", ["left", "right"])
def test_the_scores_are_the_full_caches(family, side, line):
    """Tokens, heads, neurons, per-key head scores and flow equal the full cache's within 1e-5 on a
    padded batch, for the paper's path weights and content only."""
    model, _ = make_tiny(family, line=line)
    full, lean = _caches(model, PROMPTS, padding_side=side)
    for mu in (dpa_lens.Mu.paper_default(), dpa_lens.Mu.content_only()):
        kwargs = {"mu": mu, "head_keys": True, "flow": True}
        a, b = dpa_lens.dpa(model, full, PAIR, **kwargs), dpa_lens.dpa(model, lean, PAIR, **kwargs)
        assert not bool(a.mask.all())  # the batch is padded
        _assert_same(a, b)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rerooted_sweeps_are_the_full_caches(family, line):
    """Rerooting at a head or at a residual stream reads the recomputed layers the same way."""
    model, _ = make_tiny(family, line=line)
    full, lean = _caches(model, PROMPTS[0])
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    for root in ("L1H0", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"):
        _assert_same(dpa_lens.dpa(model, full, direction, root=root), dpa_lens.dpa(model, lean, direction, root=root))


def test_the_cache_holds_the_streams_only(line):
    """The checkpointed cache holds the streams (and rotary positions) only, and the sweep holds one layer at a time."""
    model, _ = make_tiny("llama", line=line)
    full, lean = _caches(model, PROMPTS[0])
    view = ModelView(model)
    assert set(checkpoint_hook_names(view)) <= set(lean.keys())
    assert not any(name.endswith(("hook_v", "hook_z", "hook_pre", "hook_scale")) and name.startswith("blocks.") for name in lean.keys())
    above = {name.removeprefix("blocks.1.") for name in lean.keys() if name.startswith("blocks.1.")}  # above layer 0's rotary check
    assert above <= {"hook_resid_pre", "hook_resid_post", "attn.hook_cos", "attn.hook_sin"}
    fwd = dpa_lens.forward.read_forward(model, lean, PAIR, method="DPA", hook_names=checkpoint_hook_names(view),
                                        filter_hint="", check_model=False)
    cache = recomputed(fwd).cache
    assert isinstance(cache, RecomputedCache)
    v1, v0 = cache[hooks.attn(1, "v")], cache[hooks.attn(0, "v")]
    assert torch.allclose(v1, full[hooks.attn(1, "v")], atol=1e-5) and torch.allclose(v0, full[hooks.attn(0, "v")], atol=1e-5)
    assert cache.acts and all(hooks.layer_of(name) == 0 for name in cache.acts)  # layer 1's internals were let go
    assert hooks.attn(0, "pattern") not in cache and hooks.mlp(0, "pre") in cache


def test_a_stream_that_the_layers_do_not_produce_is_refused(line):
    """A cached stream that the recomputed layer below does not reproduce raises instead of scoring."""
    model, _ = make_tiny("llama", line=line)
    _, lean = _caches(model, PROMPTS[0])
    name = hooks.resid_pre(1)
    lean.cache_dict[name] = lean[name] + 0.5 * lean[name].std()
    with pytest.raises(dpa_lens.CacheError, match="recomputed from its cached input stream"):
        dpa_lens.dpa(model, lean, PAIR)


def test_the_cache_of_another_model_is_refused(line):
    """Another checkpoint's streams: the first recomputed layer does not reproduce them."""
    model, _ = make_tiny("llama", line=line)
    other, _ = make_tiny("llama", line=line, seed=1)
    _, lean = _caches(other, PROMPTS[0])
    with pytest.raises(dpa_lens.CacheError, match="another model"):
        dpa_lens.dpa(model, lean, PAIR)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_models_whose_layers_are_not_recomputed_are_refused(family, line):
    model, _ = make_tiny(family, line=line)
    with pytest.raises(dpa_lens.UnsupportedModelError, match=REFUSED[family]):
        dpa_lens.dpa_names_filter(model, checkpoint=True)


@pytest.mark.skipif(tl.hooked_transformer_class() is None, reason="hand-built HookedTransformer configs are TransformerLens 3.x")
@pytest.mark.parametrize("norm, attn_only", [("LN", False), ("LN", True), ("RMS", False)])
def test_a_hand_built_model(norm, attn_only):
    """Unfolded LayerNorm gains and biases, attention-only blocks: recomputed from the model's own weights."""
    from tests.helpers import hand_built

    model = hand_built(norm, attn_only)
    tokens = torch.randint(1, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    full, lean = _caches(model, tokens)
    _assert_same(dpa_lens.dpa(model, full, 7, flow=True), dpa_lens.dpa(model, lean, 7, flow=True))


@pytest.mark.smollm2
def test_smollm2(smollm2):
    """The real model (30 layers, grouped-query attention): the same IOI scores from the streams alone."""
    full, lean = _caches(smollm2, IOI_PROMPT)
    _assert_same(dpa_lens.dpa(smollm2, full, PAIR, flow=True), dpa_lens.dpa(smollm2, lean, PAIR, flow=True))
