"""Target forms and which logit they explain."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens import TargetError
from dpa_lens.models.view import UNEMBED_OFFSET_ATTR
from tests.helpers import IOI_PROMPT, make_tiny


@pytest.fixture
def tiny(line):
    model, ref = make_tiny("qwen2", line=line, seed=2)
    tokens = model.to_tokens([IOI_PROMPT, "After Alice and Bob went to the park, Bob gave a ball to"])
    logits, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        raw = ref(tokens).logits
    return model, cache, logits, raw


def test_token_forms_agree(tiny):
    model, cache, _, _ = tiny
    mary = model.to_single_token(" Mary")
    by_string = dpa_lens.dpa(model, cache, " Mary")
    for form in (mary, torch.tensor(mary), [mary, mary], torch.tensor([mary, mary])):
        other = dpa_lens.dpa(model, cache, form)
        torch.testing.assert_close(other.heads, by_string.heads)
    assert by_string.target["token_ids"] == [[mary, -1], [mary, -1]]


def test_target_value_is_the_raw_logit(tiny):
    model, cache, _, raw = tiny
    attr = dpa_lens.dpa(model, cache, " Mary")
    mary = model.to_single_token(" Mary")
    assert attr.target["logit"] == ["raw", "raw"]
    torch.testing.assert_close(attr.target_value, raw[:, -1, mary], rtol=1e-5, atol=1e-4)


def test_centered_logit_on_request(tiny):
    model, cache, logits, _ = tiny
    attr = dpa_lens.dpa(model, cache, " Mary", logit="centered")
    mary = model.to_single_token(" Mary")
    assert attr.target["logit"] == ["centered", "centered"]
    torch.testing.assert_close(attr.target_value, logits[:, -1, mary], rtol=1e-5, atol=1e-4)


def test_pairs_explain_the_logit_difference_either_way(tiny):
    model, cache, logits, raw = tiny
    pair = dpa_lens.dpa(model, cache, (" Mary", " John"))
    centred = dpa_lens.dpa(model, cache, (" Mary", " John"), logit="centered")
    m, j = model.to_single_token(" Mary"), model.to_single_token(" John")
    torch.testing.assert_close(pair.target_value, raw[:, -1, m] - raw[:, -1, j], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pair.heads, centred.heads)
    assert pair.target["logit"] == ["difference", "difference"]
    # a pair is the difference of its two token attributions
    a, b = dpa_lens.dpa(model, cache, " Mary"), dpa_lens.dpa(model, cache, " John")
    torch.testing.assert_close(pair.heads, a.heads - b.heads, rtol=1e-4, atol=1e-5)


def test_direction_target(tiny):
    model, cache, logits, _ = tiny
    mary = model.to_single_token(" Mary")
    direction = model.W_U[:, mary].detach()
    by_direction = dpa_lens.dpa(model, cache, direction)
    centred = dpa_lens.dpa(model, cache, " Mary", logit="centered")
    torch.testing.assert_close(by_direction.heads, centred.heads)
    assert by_direction.target["logit"] == ["direction", "direction"]
    per_row = dpa_lens.dpa(model, cache, torch.stack([direction, -direction]))
    torch.testing.assert_close(per_row.heads[1], -centred.heads[1])


def test_per_row_pairs_as_tensor(tiny):
    model, cache, _, _ = tiny
    m, j = model.to_single_token(" Mary"), model.to_single_token(" John")
    as_tensor = dpa_lens.dpa(model, cache, torch.tensor([[m, j], [j, m]]))
    as_list = dpa_lens.dpa(model, cache, [(m, j), (j, m)])
    torch.testing.assert_close(as_tensor.heads, as_list.heads)
    torch.testing.assert_close(as_tensor.heads[0], -dpa_lens.dpa(model, cache, (j, m)).heads[0])


def test_centred_model_without_record_warns_or_refuses(tiny):
    model, cache, logits, _ = tiny
    saved = getattr(model, UNEMBED_OFFSET_ATTR)
    delattr(model, UNEMBED_OFFSET_ATTR)
    try:
        with pytest.warns(UserWarning, match="centred logit"):
            attr = dpa_lens.dpa(model, cache, " Mary")
        assert attr.target["logit"] == ["centered", "centered"]
        with pytest.raises(TargetError, match="raw logit cannot be recovered"):
            dpa_lens.dpa(model, cache, " Mary", logit="raw")
    finally:
        setattr(model, UNEMBED_OFFSET_ATTR, saved)


def test_a_pair_of_one_token_is_refused(tiny):
    """(" Mary", " Mary"), or two names whose first token is the same, would explain a logit
    difference that is 0 whatever the model does."""
    model, cache, _, _ = tiny
    m = model.to_single_token(" Mary")
    with pytest.raises(TargetError, match="same token twice"):
        dpa_lens.dpa(model, cache, (" Mary", m))
    with pytest.raises(TargetError, match="same token twice"):
        dpa_lens.dla(model, cache, [(m, m), (" Mary", " John")])
