"""IOI prompts: generated ones, and a user's own sentence with its corrupted partner."""

from __future__ import annotations

import pytest

from dpa_lens import InputError
from dpa_lens.datasets import corrupt, ioi_dataset
from tests.helpers import make_tiny


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=2)[0]


def test_a_users_sentence_gets_its_corrupted_partner(model):
    p = corrupt("When Mary and John went to the store, John gave a drink to", "Mary", "John", model=model)
    assert p.corrupted == "When Mary and John went to the store, Mary gave a drink to"
    assert p.target == (" Mary", " John") and p.order == "ABB"
    bab = corrupt("Then John and Mary met at the park. John handed it to", " Mary", " John")
    assert bab.order == "BAB" and bab.corrupted == "Then John and Mary met at the park. Mary handed it to"
    abc = corrupt("When Mary and John went to the store, John gave a drink to", "Mary", "John", corruption="abc", third="Anna")
    assert abc.corrupted.endswith("store, Anna gave a drink to") and abc.target == (" Mary", " John")


def test_a_sentence_that_is_not_ioi_is_refused(model):
    with pytest.raises(InputError, match="names 'Mary' 1 time"):
        corrupt("When Mary and John went to the store, Bob gave a drink to", "Mary", "John")
    with pytest.raises(InputError, match="third="):
        corrupt("When Mary and John went, John gave it to", "Mary", "John", corruption="abc")
    with pytest.raises(InputError, match="corruption must be"):
        corrupt("When Mary and John went, John gave it to", "Mary", "John", corruption="swap")
    with pytest.raises(InputError, match="not one token"):
        corrupt("When Maryanne and John went, John gave it to", "Maryanne", "John", model=model)


def test_the_generated_prompts_are_their_sentences_corrupted(model):
    for p in ioi_dataset(model, n=4, seed=1):
        assert model.to_tokens(p.clean).shape == model.to_tokens(p.corrupted).shape
        assert corrupt(p.clean, p.correct, p.incorrect).corrupted == p.corrupted
