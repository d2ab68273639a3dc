"""The shared result type."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import dpa_lens
from dpa_lens import Attribution
from tests.helpers import IOI_PROMPT, make_tiny


@pytest.fixture(scope="module")
def attr():
    model, _ = make_tiny("llama", seed=4)
    _, cache = model.run_with_cache([IOI_PROMPT, "The Eiffel Tower is in"], padding_side="left")
    return dpa_lens.dpa(model, cache, (" Mary", " John"), head_keys=True, effective_targets=True)


def test_shapes_and_metadata(attr):
    b, n = attr.tokens.shape
    assert attr.heads.shape == (b, 2, n, 4)
    assert attr.neurons.shape == (b, 2, n, 96)
    assert attr.head_keys.shape == (b, 2, 4, n, n)
    assert len(attr.str_tokens) == b and len(attr.str_tokens[0]) == n
    assert attr.method == "dpa" and attr.settings["mu"]["v"] == 0.5
    assert "heads=[2, 2, 15, 4]" in repr(attr)


def test_top_heads_are_sorted_and_labelled(attr):
    top = attr.top(5, "heads")
    assert list(top.columns[:1]) == ["unit"] and len(top) == 5
    assert top["score"].abs().is_monotonic_decreasing
    flat = attr.heads[0].flatten()
    assert top["score"].iloc[0] == pytest.approx(float(flat[flat.abs().argmax()]))
    row = top.iloc[0]
    assert row["unit"] == f"L{row['layer']}H{row['head']}@{row['pos']}"
    assert attr.heads[0, row["layer"], row["pos"], row["head"]] == pytest.approx(row["score"])


def test_top_ranks_by_absolute_score_unless_signed_is_asked_for(attr):
    """The strongest negative units are as much the answer as the positive ones: |score| by default,
    as Circuit.top, the CLI and the report rank."""
    heads = torch.tensor([[[0.5, -1.3, 0.1], [1.0, -0.2, -0.9]]])  # [batch, layer, head]
    totals = Attribution(method="x", head_totals=heads)
    assert totals.top(3, "heads")["unit"].tolist() == ["L0H1", "L1H0", "L1H2"]
    assert totals.top(3, "heads")["score"].tolist() == pytest.approx([-1.3, 1.0, -0.9])
    assert totals.top(3, "heads", absolute=False)["unit"].tolist() == ["L1H0", "L0H0", "L0H2"]
    assert dpa_lens.run("dla", *_tiny_run()).top(5, "heads", sum_positions=True)["score"].abs().is_monotonic_decreasing
    top = attr.top(3, "neurons", row=1)
    assert top["score"].abs().iloc[0] == pytest.approx(float(attr.neurons[1].abs().max()))


def _tiny_run():
    model, _ = make_tiny("llama", seed=4)
    return model, IOI_PROMPT, (" Mary", " John")


def test_top_tokens(attr):
    top = attr.top(3, "tokens", absolute=False)
    assert top["score"].iloc[0] == pytest.approx(float(attr.tokens[0].max()))
    assert top["token"].iloc[0] == attr.str_tokens[0][top["pos"].iloc[0]]


def test_dataframe_round_trip(attr):
    df = attr.to_dataframe()
    assert set(df["kind"]) == {"tokens", "heads", "neurons"}
    heads = df[df["kind"] == "heads"]
    assert len(heads) == attr.heads.numel()
    assert heads["score"].sum() == pytest.approx(float(attr.heads.sum()), rel=1e-4)
    r = heads.iloc[37]
    assert attr.heads[r["row"], r["layer"], r["pos"], r["head"]] == pytest.approx(r["score"])


def test_totals_and_row_selection(attr):
    torch.testing.assert_close(attr.total("heads"), attr.heads.sum(dim=(1, 2, 3)))
    one = attr[1]
    assert one.batch == 1 and one.str_tokens == attr.str_tokens[1:]
    torch.testing.assert_close(one.heads[0], attr.heads[1])
    assert one.target["labels"] == attr.target["labels"][1:]
    assert one.effective_targets["blocks.0.hook_resid_pre"].shape[0] == 1


def test_missing_kind_is_a_clear_error(attr):
    only_tokens = Attribution(method="x", tokens=attr.tokens)
    with pytest.raises(ValueError, match="no heads scores"):
        only_tokens.top(3, "heads")
    with pytest.raises(ValueError, match="kind must be"):
        attr.scores("edges")


def test_save_and_load(attr, tmp_path):
    path = tmp_path / "attr.pt"
    attr.save(path)
    back = Attribution.load(path)
    for name in ("tokens", "heads", "neurons", "head_keys", "bias", "target_value", "positions", "token_ids"):
        torch.testing.assert_close(getattr(back, name), getattr(attr, name))
    assert back.str_tokens == attr.str_tokens
    assert back.target == attr.target and back.settings == attr.settings
    torch.testing.assert_close(back.effective_targets["blocks.1.hook_resid_mid"], attr.effective_targets["blocks.1.hook_resid_mid"])
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved dpa_lens Attribution"):
        Attribution.load(tmp_path / "other.pt")


def test_concat_refuses_what_does_not_belong_together(attr):
    """Results of other settings (another mu) or with other kinds of scores are not merged under the first's name;
    a part without padding (no mask) joins a padded one as all real tokens."""
    model, _ = make_tiny("llama", seed=4)
    _, cache = model.run_with_cache(IOI_PROMPT)
    lopsided = dpa_lens.dpa(model, cache, (" Mary", " John"), mu=dpa_lens.Mu(q=0.6, k=0.1, v=0.3, gate=0.8, up=0.2))
    plain = dpa_lens.dpa(model, cache, (" Mary", " John"))
    with pytest.raises(dpa_lens.InputError, match="same settings"):
        Attribution.concat([plain, lopsided])
    tokens_only = dpa_lens.dpa(model, cache, (" Mary", " John"), kinds=("tokens",))
    with pytest.raises(dpa_lens.InputError, match="same scores: heads"):
        Attribution.concat([plain, tokens_only])
    padded = dataclasses.replace(attr[1], head_keys=None, effective_targets=None)  # a row of a padded batch: a mask
    unmasked = dataclasses.replace(plain, mask=None)  # a prompt run alone
    both = Attribution.concat([padded, unmasked])
    assert torch.equal(both.mask[0], padded.mask[0]) and bool(both.mask[1, : unmasked.seq_len].all())
    with pytest.raises(dpa_lens.InputError, match="kind must be"):
        attr.top(5, "bogus")


def test_mean_of_prompts_of_one_template_keeps_tokens_and_positions():
    """IOI prompts of one template line up slot by slot: their mean keeps token and per-position scores
    (plot.tokens draws it), labelled "a|b" where the names differ; prompts of other lengths keep only
    unit totals, and say so."""
    model, _ = make_tiny("llama", seed=4)
    prompts = ["When Mary and John went to the store, John gave a drink to",
               "When Anna and Bob went to the store, Bob gave a drink to"]
    toks = model.to_tokens(prompts)
    assert toks.shape[1] == model.to_tokens(prompts[0]).shape[1], "the two prompts should tokenise to one length"
    _, cache = model.run_with_cache(toks)
    a = dpa_lens.dpa(model, cache, [(" Mary", " John"), (" Anna", " Bob")], flow=True)
    mean = a.mean()
    torch.testing.assert_close(mean.tokens[0], a.tokens.mean(0))
    torch.testing.assert_close(mean.heads[0], a.heads.mean(0))
    torch.testing.assert_close(mean.flow[0], a.flow.mean(0))
    labels = mean.str_tokens[0]
    assert labels[0] == a.str_tokens[0][0] and any(lab == f"{x}|{y}" for lab, x, y in zip(labels, *a.str_tokens) if x != y)
    assert mean.token_ids is None and mean.positions.tolist() == a.positions[:1].tolist()
    from dpa_lens import plot

    assert plot.tokens(mean) is not None
    _, other = model.run_with_cache([prompts[0], "The Eiffel Tower is in"], padding_side="left")
    b = dpa_lens.dpa(model, other, " Mary")
    with pytest.warns(UserWarning, match="dropped the per-position tokens, heads, neurons"):
        whole = b.mean()
    assert whole.tokens is None and whole.heads is None
    torch.testing.assert_close(whole.head_totals[0], b.totals("heads").mean(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        totals = b.mean(per_position=False)
        assert totals.tokens is None and torch.equal(totals.head_totals, whole.head_totals)
        assert a.mean(per_position=False).tokens is None
    with pytest.raises(dpa_lens.InputError, match="per_position=True"):
        b.mean(per_position=True)
