"""`dpa_lens.models.hooks`: the hook names, and asking a cache whether it holds one."""

from __future__ import annotations

from dpa_lens.models import hooks
from tests.helpers import IOI_PROMPT, make_tiny


def test_cached_answers_as_the_cache_itself_does(line):
    """`hooks.cached` asks the cache's dictionary (``in`` on an ``ActivationCache`` walks every key): the same
    answer as ``in`` on the cache, for an ``ActivationCache`` and for a plain dict of its activations."""
    model, _ = make_tiny("llama", seed=3, line=line)
    _, cache = model.run_with_cache(IOI_PROMPT, names_filter=lambda name: "mlp" not in name)
    plain = {name: cache[name] for name in cache.keys()}
    names = [*cache.keys(), hooks.mlp(0, "post"), hooks.resid_pre(99), "blocks.0.attn", "no_such_hook"]
    answers = [hooks.cached(cache, name) for name in names]
    assert answers == [name in cache for name in names] == [hooks.cached(plain, name) for name in names]
    assert any(answers) and not all(answers)
    assert hooks.cached(cache, hooks.resid_pre(0)) and not hooks.cached(cache, hooks.mlp(0, "post"))
