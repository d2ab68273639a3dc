"""A HookedTransformer configured as MIB and the EAP-IG reference configure it (``use_split_qkv_input``,
``use_attn_result``, ``use_hook_mlp_in``, ``ungroup_grouped_query_attention``): every method gives the plain model's
scores, from a cache dpa_lens makes or one the user made with the flags on (keys and values ungrouped)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dpa_lens
from dpa_lens.models import tl
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny

pytestmark = pytest.mark.skipif(tl.hooked_transformer_class() is None, reason="TransformerLens 4 has no HookedTransformer")

FAST = {"integrated_gradients": {"steps": 8, "warn_gap": float("inf")}, "eap_ig": {"steps": 2}, "eap_ig_activations": {"steps": 1},
        "dpa_edges_ig": {"steps": 1}}


def _mib_configured(model):
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    model.cfg.ungroup_grouped_query_attention = True
    return model


def _run(name, model):
    spec = dpa_lens.get_method(name)
    corrupted = CORRUPTED if spec.input == "pair" or spec.contrast else None
    return dpa_lens.run(name, model, IOI_PROMPT, PAIR, corrupted=corrupted, progress=False, **FAST.get(name, {}))


def _tensors(result) -> dict[str, torch.Tensor]:
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
            if isinstance(getattr(result, f.name), torch.Tensor) and getattr(result, f.name).is_floating_point()}


def _assert_same(got, want, name):
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys() and a, name
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4, msg=f"{name}.{key}")


@pytest.fixture(scope="module")
def models():
    plain, _ = make_tiny("llama", line="hooked", seed=3)
    mib, _ = make_tiny("llama", line="hooked", seed=3)
    assert mib.cfg.n_key_value_heads < mib.cfg.n_heads  # grouped-query: the flag changes the hooks' shapes
    return plain, _mib_configured(mib)


@pytest.mark.parametrize("name", dpa_lens.available_methods())
def test_every_method_gives_the_plain_models_scores(models, name):
    plain, mib = models
    _assert_same(_run(name, mib), _run(name, plain), name)
    assert mib.cfg.ungroup_grouped_query_attention  # the user's setting is back


def test_a_users_ungrouped_cache_is_read_grouped(models):
    plain, mib = models
    tokens = mib.to_tokens(IOI_PROMPT)
    with torch.no_grad():
        _, cache = mib.run_with_cache(tokens)
        _, plain_cache = plain.run_with_cache(tokens)
    assert cache["blocks.0.attn.hook_v"].shape[2] == mib.cfg.n_heads != plain_cache["blocks.0.attn.hook_v"].shape[2]
    _assert_same(dpa_lens.dpa(mib, cache, " Mary"), dpa_lens.dpa(plain, plain_cache, " Mary"), "dpa")
    _assert_same(dpa_lens.dpa_edges(mib, cache, " Mary"), dpa_lens.dpa_edges(plain, plain_cache, " Mary"), "dpa_edges")
    _assert_same(dpa_lens.unpack(mib, cache, " Mary"), dpa_lens.unpack(plain, plain_cache, " Mary"), "unpack")
    assert mib.cfg.ungroup_grouped_query_attention
