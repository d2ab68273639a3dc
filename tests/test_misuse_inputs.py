"""Misuse of the inputs around the methods: token ids given to `cache_for`, a checkpointed cache that lacks a
stream, saved results edited by hand or holding what cannot be saved, and a few refusals that were right but
untested. Each is a dpa_lens error that names what was wrong and the fix, never a traceback from torch or
Python internals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dpa_lens
from dpa_lens import Attribution, CacheError, Circuit, InputError
from tests.helpers import IOI_PROMPT, PAIR, make_tiny

_MODELS: dict[tuple[str, str], object] = {}


def tiny(family: str, line: str):
    """One tiny model per family and line for the module (never modified by the tests)."""
    if (family, line) not in _MODELS:
        _MODELS[family, line] = make_tiny(family, line=line, seed=43)[0]
    return _MODELS[family, line]


# ------------------------------------------------------------------------------ cache_for: the tokens


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cache_for_checks_the_tokens_as_run_does(line, family):
    model = tiny(family, line)
    n_ctx = model.cfg.n_ctx
    with pytest.raises(InputError, match=rf"{n_ctx + 5} tokens long and the model's context is {n_ctx}"):
        dpa_lens.cache_for(model, torch.zeros(1, n_ctx + 5, dtype=torch.long))
    with pytest.raises(InputError, match=r"token ids must be in \[0, \d+\).*100000"):
        dpa_lens.cache_for(model, torch.tensor([[1, 2, 100000]]))
    with pytest.raises(InputError, match="token ids must be in"):
        dpa_lens.cache_for(model, torch.tensor([[1, -2, 3]]))
    with pytest.raises(InputError, match="token ids are empty"):
        dpa_lens.cache_for(model, torch.zeros(1, 0, dtype=torch.long))
    tokens = model.to_tokens(IOI_PROMPT)
    cache = dpa_lens.cache_for(model, tokens[0])  # one row without a batch axis, as run takes it
    assert cache["hook_embed"].shape[:2] == tokens.shape
    dpa_lens.dpa(model, dpa_lens.cache_for(model, tokens), PAIR)


# ------------------------------------------------------------------------------ a checkpointed cache missing a stream


def test_a_checkpointed_cache_missing_a_stream_names_it_and_the_filter(line):
    model = tiny("llama", line)
    _, cache = model.run_with_cache(IOI_PROMPT, names_filter=dpa_lens.dpa_names_filter(model, checkpoint=True))
    whole = dpa_lens.dpa(model, cache, PAIR)  # the checkpointed cache as cached
    del cache.cache_dict["blocks.1.hook_resid_pre"]
    with pytest.raises(CacheError, match=r"blocks\.1\.hook_resid_pre") as err:
        dpa_lens.dpa(model, cache, PAIR)
    assert "checkpoint=True" in str(err.value)
    assert "ln1.hook_scale" not in str(err.value) and "hook_v" not in str(err.value)  # not the full cache's hooks
    _, full = model.run_with_cache(IOI_PROMPT)  # a full cache holds the streams too: still read as a full cache
    torch.testing.assert_close(dpa_lens.dpa(model, full, PAIR).heads, whole.heads, rtol=1e-4, atol=1e-5)
    del full.cache_dict["blocks.1.attn.hook_v"]
    with pytest.raises(CacheError, match=r"blocks\.1\.attn\.hook_v") as err:
        dpa_lens.dpa(model, full, PAIR)
    assert "checkpoint=True" not in str(err.value)


# ------------------------------------------------------------------------------ saved results edited by hand


_RESULTS: dict[str, tuple[Attribution, Circuit]] = {}


@pytest.fixture
def results(line):
    """An Attribution and a Circuit of the tiny llama on each line (made once per line)."""
    if line not in _RESULTS:
        model = tiny("llama", line)
        _, cache = model.run_with_cache(IOI_PROMPT)
        _RESULTS[line] = dpa_lens.dpa(model, cache, PAIR), dpa_lens.dpa_edges(model, cache, PAIR)
    return _RESULTS[line]


EDITS = [
    ("diagnostics", 5),
    ("target", 5),
    ("method", 3),
    ("model_name", ["x"]),
    ("settings", "mu=0"),
    ("str_tokens", "When Mary"),
    ("positions", [3]),
]


@pytest.mark.parametrize(("field", "value"), EDITS, ids=[f for f, _ in EDITS])
@pytest.mark.parametrize("kind", ["Attribution", "Circuit"])
def test_a_hand_edited_field_of_a_saved_result_is_named_on_load(results, tmp_path, kind, field, value):
    result = results[0] if kind == "Attribution" else results[1]
    path = result.save(tmp_path / "result.pt")
    state = torch.load(path, weights_only=True)
    state[field] = value
    torch.save(state, path)
    with pytest.raises(InputError, match=rf"result\.pt holds a dpa_lens {kind} that does not read back: its field '{field}' is") as err:
        type(result).load(path)
    assert "edited by hand" in str(err.value) and "\n" not in str(err.value)  # one line, not a type checker's report


@pytest.mark.parametrize("kind", ["Attribution", "Circuit"])
def test_a_saved_result_with_edited_target_labels_or_diagnostics_is_named(results, tmp_path, kind):
    result = results[0] if kind == "Attribution" else results[1]
    cls = type(result)
    path = result.save(tmp_path / "result.pt")
    state = torch.load(path, weights_only=True)
    for edit, words in ((dict(target={**state["target"], "labels": "Mary"}), "'target' has labels a str"),
                        (dict(diagnostics={"clean_value": 1.5}), r"diagnostics\['clean_value'\] is a float"),
                        (dict(diagnostics={"nonsense": torch.zeros(1)}), r"diagnostics\['nonsense'\] is not one of")):
        torch.save({**state, **edit}, path)
        with pytest.raises(InputError, match=words):
            cls.load(path)
    torch.save(state, path)  # the file as saved still loads, and reads as the result
    back = cls.load(path)
    assert repr(back) == repr(result)


def test_a_circuit_with_edited_writers_or_readers_is_named(results, tmp_path):
    circuit = results[1]
    path = circuit.save(tmp_path / "c.pt")
    state = torch.load(path, weights_only=True)
    for field, value in (("writers", "embed"), ("readers", [["logit"]] * len(circuit.readers)), ("readers", [[1, 2]])):
        torch.save({**state, field: value}, path)
        with pytest.raises(InputError, match=f"field '{field}' is"):
            Circuit.load(path)


# ------------------------------------------------------------------------------ saving what cannot be saved


def test_saving_unpicklable_settings_is_an_input_error_and_keeps_the_earlier_file(results, tmp_path):
    attr = results[0]
    path = attr.save(tmp_path / "a.pt")
    before = path.read_bytes()
    bad = dataclasses.replace(attr, settings={**attr.settings, "f": lambda x: x})
    with pytest.raises(InputError, match=r"settings\['f'\] \(a function") as err:
        bad.save(path)
    assert "cannot save the Attribution" in str(err.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]  # no temporary file left
    assert torch.equal(Attribution.load(path).heads, attr.heads)


# ------------------------------------------------------------------------------ refusals already right


def test_concat_of_two_model_families_is_refused(line):
    parts = []
    for family in ("gpt2", "llama"):
        model = tiny(family, line)
        _, cache = model.run_with_cache(IOI_PROMPT)
        parts.append(dpa_lens.dla(model, cache, PAIR))
    with pytest.raises(InputError, match="model"):
        Attribution.concat(parts)


def test_dpa_edges_refuses_neurons_all(line):
    model = tiny("llama", line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    with pytest.raises(InputError, match="neurons"):
        dpa_lens.dpa_edges(model, cache, PAIR, neurons="all")


def test_saving_to_a_folder_is_refused(results, tmp_path):
    with pytest.raises(InputError, match="it is a folder"):
        results[0].save(tmp_path)


def test_circuit_faithfulness_is_importable_as_a_function():
    from dpa_lens.evaluation import circuit_faithfulness

    assert callable(circuit_faithfulness) and circuit_faithfulness.__name__ == "circuit_faithfulness"

