"""`cache_for`: the cache a method reads, from one forward that computes no logits at every position."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens.errors import InputError
from dpa_lens.inputs import prepare_tokens
from dpa_lens.models import tl
from dpa_lens.models.testing import FAMILIES
from tests.helpers import IOI_PROMPT, PAIR, make_tiny, rel_err

PROMPTS = [IOI_PROMPT, "The Eiffel Tower is in the city of"]


def _reference(model, tokens, names_filter, **kwargs):
    with torch.no_grad():
        return model.run_with_cache(tokens, names_filter=names_filter, **kwargs)[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_cache_is_run_with_caches_and_the_unembedding_sees_one_position_at_most(line, family):
    """Same hooks and values as ``run_with_cache`` with DPA's lean filter (padded rows, a mask); the
    unembedding runs on the last position only (bridge) or not at all (HookedTransformer); same DPA scores."""
    model, _ = make_tiny(family, line=line)
    tokens, mask = prepare_tokens(model, PROMPTS)
    assert mask is not None  # the rows differ in length: the mask matters
    rows = []
    handle = model.unembed.register_forward_hook(lambda module, args, out: rows.append(out.shape[-2]))
    try:
        cache = dpa_lens.cache_for(model, tokens, attention_mask=mask)
    finally:
        handle.remove()
    assert rows == ([1] if tl.is_bridge(model) else []), rows  # a bridge: the last position's logits; a HookedTransformer: none
    ref = _reference(model, tokens, dpa_lens.dpa_names_filter(model, patterns=False), attention_mask=mask)
    assert sorted(cache.keys()) == sorted(ref.keys())
    for name in ref.keys():
        assert rel_err(cache[name], ref[name]) < 1e-5, name
    a, b = dpa_lens.dpa(model, cache, PAIR, attention_mask=mask), dpa_lens.dpa(model, ref, PAIR, attention_mask=mask)
    for kind in ("tokens", "heads", "neurons"):
        assert (a.scores(kind) - b.scores(kind)).abs().max() < 1e-5, kind


def test_methods_and_names_filter_choose_what_is_cached(line):
    model, _ = make_tiny("llama", line=line)
    tokens = model.to_tokens(IOI_PROMPT)
    both = dpa_lens.cache_for(model, tokens, "dpa", "dla")
    assert sorted(both.keys()) == sorted(_reference(model, tokens, dpa_lens.names_filter(model, "dpa", "dla")).keys())
    assert "blocks.0.mlp.hook_post" in both.keys()  # DLA reads it, DPA does not
    streams = dpa_lens.cache_for(model, tokens, names_filter=dpa_lens.dpa_names_filter(model, checkpoint=True))
    assert sorted(streams.keys()) == sorted(_reference(model, tokens, dpa_lens.dpa_names_filter(model, checkpoint=True)).keys())
    full = dpa_lens.dpa(model, both, PAIR)
    assert rel_err(dpa_lens.dpa(model, streams, PAIR).heads, full.heads) < 1e-4


def test_run_gives_dpa_on_the_full_cache():
    model, _ = make_tiny("llama")
    with torch.no_grad():
        _, full = model.run_with_cache(model.to_tokens(IOI_PROMPT))
    via_run, direct = dpa_lens.run("dpa", model, IOI_PROMPT, PAIR), dpa_lens.dpa(model, full, PAIR)
    for kind in ("tokens", "heads", "neurons"):
        assert rel_err(via_run.scores(kind), direct.scores(kind)) < 1e-5, kind


def test_bad_inputs_say_what_to_pass():
    model, _ = make_tiny("llama")
    with pytest.raises(InputError, match="to_tokens"):
        dpa_lens.cache_for(model, IOI_PROMPT)
    with pytest.raises(InputError, match="not both"):
        dpa_lens.cache_for(model, model.to_tokens(IOI_PROMPT), "dpa", names_filter=lambda name: True)
    with pytest.raises(InputError, match="read no cache"):
        dpa_lens.cache_for(model, model.to_tokens(IOI_PROMPT), "atp")


def test_run_checks_a_cache_given_not_one_it_made(line, monkeypatch):
    """A cache `run` makes from the model (and its corrupted prompt's) is not checked against the weights again; a cache
    given is, and the skip ends with the call."""
    from dpa_lens import forward

    model, _ = make_tiny("llama", line=line)
    calls = []
    real = forward.check_cache_model
    monkeypatch.setattr(forward, "check_cache_model", lambda view, cache, *a, **k: calls.append(id(cache)) or real(view, cache, *a, **k))
    dpa_lens.run("dpa", model, IOI_PROMPT, PAIR)
    dpa_lens.run("dpa_edges", model, IOI_PROMPT, PAIR, corrupted="When Mary and John went to the store, Mary gave a drink to")
    assert calls == []
    cache = dpa_lens.cache_for(model, model.to_tokens(IOI_PROMPT))
    dpa_lens.run("dpa", model, IOI_PROMPT, PAIR, cache=cache)
    dpa_lens.dpa(model, cache, PAIR)
    assert calls == [id(cache), id(cache)]


def test_run_checks_the_models_mode_once_per_cache(line, monkeypatch):
    """The eval-mode check (a walk over the model's modules) runs once per cache: in `cache_for` for a cache `run` makes
    (not again when the method reads it), in the method for a cache given."""
    from dpa_lens import forward
    from dpa_lens.methods import registry

    model, _ = make_tiny("llama", line=line)
    calls = []
    for module in (forward, registry):
        monkeypatch.setattr(module, "require_eval",
                            lambda model, method, *a, real=module.require_eval, **k: calls.append(method) or real(model, method, *a, **k))
    dpa_lens.run("dpa", model, IOI_PROMPT, PAIR)
    assert len(calls) == 1, calls
    calls.clear()
    dpa_lens.run("dpa_edges", model, IOI_PROMPT, PAIR, corrupted="When Mary and John went to the store, Mary gave a drink to")
    assert len(calls) == 2, calls  # the prompt's cache and the corrupted prompt's
    cache = dpa_lens.cache_for(model, model.to_tokens(IOI_PROMPT))
    calls.clear()
    dpa_lens.run("dpa", model, IOI_PROMPT, PAIR, cache=cache)
    dpa_lens.dpa(model, cache, PAIR)
    assert len(calls) == 2, calls  # a cache given is checked by the method, in each call
