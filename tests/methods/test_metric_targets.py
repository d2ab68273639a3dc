"""Metric callables as targets (issue 18, part 2): ``metric(logits) -> scalar``, as TransformerLens users
write them for ``transformer_lens.patching`` and ``attribution_patch``, applied to each batch row's
logits ``[1, pos, vocab]`` on its own."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens.errors import TargetError
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny

SHORT = "When Tom and Anna went to the park, Tom gave a ball to"
SHORT_CORRUPTED = "When Tom and Anna went to the park, Anna gave a ball to"
KINDS = ("tokens", "heads", "neurons", "head_totals", "neuron_totals", "bias", "target_value")


def logit_diff_metric(model, pair=PAIR):
    good, bad = (model.to_single_token(t) for t in pair)

    def logit_diff(logits):
        return logits[0, -1, good] - logits[0, -1, bad]

    return logit_diff


@pytest.fixture(scope="module", params=["bridge"] + (["hooked"] if dpa_lens.models.tl.hooked_transformer_class() else []))
def tiny(request):
    model, _ = make_tiny("qwen2", line=request.param, seed=5)  # biases everywhere
    return model


def assert_same(a, b, tol=1e-4):
    for name in KINDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol * max(1.0, float(y.abs().max())),
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("qk_fix", [False, True])
def test_atp_with_a_metric_equals_atp_with_the_pair(tiny, qk_fix):
    metric = logit_diff_metric(tiny)
    got = dpa_lens.atp(tiny, IOI_PROMPT, CORRUPTED, metric, qk_fix=qk_fix)
    want = dpa_lens.atp(tiny, IOI_PROMPT, CORRUPTED, PAIR, qk_fix=qk_fix)
    assert_same(got, want)
    assert got.target == {"labels": ["metric logit_diff"], "token_ids": [[-1, -1]], "logit": ["metric"]}
    assert "metric logit_diff (metric)" in repr(got)
    torch.testing.assert_close(got.diagnostics.clean_value, want.diagnostics.clean_value, rtol=1e-5, atol=1e-5)
    _, clean_cache = tiny.run_with_cache(IOI_PROMPT)  # the clean cache saves nothing here but must give the same
    assert_same(dpa_lens.atp(tiny, IOI_PROMPT, CORRUPTED, metric, clean_cache=clean_cache, qk_fix=qk_fix), want)


def test_patching_with_a_metric_equals_transformer_lens_patching(tiny):
    """TransformerLens's patching returns metric(patched); dpa_lens's score is metric(patched) − metric(corrupted)."""
    from transformer_lens import patching

    metric = logit_diff_metric(tiny)
    corrupted = tiny.to_tokens(CORRUPTED)
    _, clean_cache = tiny.run_with_cache(IOI_PROMPT)
    ref = patching.get_act_patch_attn_head_out_by_pos(tiny, corrupted, clean_cache, metric)
    with torch.no_grad():
        base = metric(tiny(corrupted))
    ours = dpa_lens.activation_patching(tiny, IOI_PROMPT, CORRUPTED, metric, unit="heads_by_pos", batch_size=16, progress=False)
    torch.testing.assert_close(ours.heads[0], (ref - base).float(), rtol=1e-4, atol=1e-5)
    assert_same(ours, dpa_lens.activation_patching(tiny, IOI_PROMPT, CORRUPTED, PAIR, unit="heads_by_pos", batch_size=16, progress=False))
    with_cache = dpa_lens.activation_patching(tiny, IOI_PROMPT, CORRUPTED, metric, unit="tokens", clean_cache=clean_cache,
                                              progress=False)
    assert_same(with_cache, dpa_lens.activation_patching(tiny, IOI_PROMPT, CORRUPTED, PAIR, unit="tokens", progress=False))


@pytest.mark.parametrize("name", ["gradient", "input_x_gradient", "integrated_gradients"])
def test_gradient_methods_with_a_metric_equal_the_pair(tiny, name):
    options = {"steps": 16, "warn_gap": float("inf"), "progress": False} if name == "integrated_gradients" else {}
    fn = dpa_lens.get_method(name).fn
    assert_same(fn(tiny, IOI_PROMPT, logit_diff_metric(tiny), **options), fn(tiny, IOI_PROMPT, PAIR, **options))


def test_a_metric_is_applied_to_each_row_alone(tiny):
    """Two prompts whose answers differ: one value per row, each the row's own, and ``run`` passes the
    metric through like any target."""
    prompts, corrupted = [IOI_PROMPT, SHORT], [CORRUPTED, SHORT_CORRUPTED]
    assert tiny.to_tokens(prompts).shape[0] == 2 and tiny.to_tokens(IOI_PROMPT).shape == tiny.to_tokens(SHORT).shape
    got = dpa_lens.run("atp", tiny, prompts, logit_diff_metric(tiny), corrupted=corrupted)
    want = dpa_lens.run("atp", tiny, prompts, PAIR, corrupted=corrupted)
    assert got.target_value.shape == (2,)
    assert_same(got, want)
    second = dpa_lens.atp(tiny, SHORT, SHORT_CORRUPTED, logit_diff_metric(tiny))
    assert_same(got[1], second)
    assert got.target["labels"] == ["metric logit_diff"] * 2


def test_cache_methods_refuse_a_metric(tiny):
    _, cache = tiny.run_with_cache(IOI_PROMPT)
    for name in ("dpa", "dla"):
        with pytest.raises(TargetError, match=r"linear target direction.*token.*pair.*direction"):
            dpa_lens.get_method(name).fn(tiny, cache, logit_diff_metric(tiny))
        with pytest.raises(TargetError, match="cannot be explained from a cache"):
            dpa_lens.run(name, tiny, IOI_PROMPT, logit_diff_metric(tiny), cache=cache)


def test_a_metric_that_is_not_a_scalar_tensor_of_the_logits_is_refused(tiny):
    with pytest.raises(TargetError, match="must return a scalar tensor"):
        dpa_lens.gradient(tiny, IOI_PROMPT, lambda logits: logits[0, -1])
    with pytest.raises(TargetError, match="must return a scalar tensor"):
        dpa_lens.activation_patching(tiny, IOI_PROMPT, CORRUPTED, lambda logits: float(logits[0, -1, 0]), progress=False)
    with pytest.raises(TargetError, match="does not depend on the logits"):
        dpa_lens.gradient(tiny, IOI_PROMPT, lambda logits: logits[0, -1, 0].detach())


@pytest.mark.parametrize("name", dpa_lens.available_methods(metric=True))
def test_a_metric_that_returns_nan_is_refused(tiny, name):
    """Every method that takes a metric: a NaN (or infinite) metric value is an error, not NaN scores."""
    nan = lambda logits: logits[0, -1, 0] * float("nan")  # noqa: E731
    corrupted = CORRUPTED if dpa_lens.get_method(name).input == "pair" else None
    with pytest.raises(TargetError, match="not finite"):
        dpa_lens.run(name, tiny, IOI_PROMPT, nan, corrupted=corrupted, progress=False, **({"steps": 4} if "integrated" in name else {}))
