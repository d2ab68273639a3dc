"""`Circuit` on the row base every result shares: rows, concat, mean, saving (atomic, old files), old names."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import dpa_lens
from dpa_lens import Circuit, InputError
from tests.helpers import CORRUPTED, IOI_PROMPT, OTHER, OTHER_CORRUPTED, PAIR, make_tiny

SHORT = "When Tom and Anna went to the park, Tom gave a ball to"


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=5)[0]


@pytest.fixture(scope="module")
def circuit(model):
    """Edge AtP of two prompts of different lengths (padded), with its per-row corrupted tokens."""
    return dpa_lens.edge_atp(model, [IOI_PROMPT, SHORT], [CORRUPTED, SHORT.replace("Tom gave", "Anna gave")], PAIR)


def test_rows_concat_and_mean(circuit):
    first, second = circuit[0], circuit[-1]
    assert first.batch == second.batch == 1
    assert second.diagnostics.corrupted_str_tokens == circuit.diagnostics.corrupted_str_tokens[1:]
    again = Circuit.concat([first, second])
    torch.testing.assert_close(again.scores, circuit.scores)
    assert again.target == circuit.target and again.diagnostics.corrupted_str_tokens == circuit.diagnostics.corrupted_str_tokens
    # rows of other lengths: every per-row token list padded like str_tokens
    short_first = Circuit.concat([second, first])
    assert [len(r) for r in short_first.diagnostics.corrupted_str_tokens] == [len(r) for r in short_first.str_tokens] == [again.seq_len] * 2
    mean = circuit.mean()
    torch.testing.assert_close(mean.scores[0], circuit.scores.mean(0))
    torch.testing.assert_close(mean.target_value, circuit.target_value.mean(0, keepdim=True))
    assert mean.token_ids is None and mean.settings["mean_of_rows"] == 2  # different prompts: no positions kept
    assert mean.target["labels"] == [circuit.target["labels"][0]]  # the same target on both rows


def test_concat_refuses_what_does_not_belong_together(model, circuit):
    other_model = make_tiny("qwen2", seed=5)[0]
    elsewhere = dpa_lens.edge_atp(other_model, IOI_PROMPT, CORRUPTED, PAIR)
    with pytest.raises(InputError, match="same"):
        Circuit.concat([circuit[0], elsewhere])
    pruned = circuit[0].prune(top_n=5)
    with pytest.raises(InputError, match="same in_graph"):
        Circuit.concat([circuit[1], pruned])
    with pytest.raises(InputError, match="one method"):
        Circuit.concat([circuit[0], dpa_lens.edge_random(model, IOI_PROMPT, CORRUPTED, PAIR)])
    with pytest.raises(InputError, match="takes Circuit"):
        Circuit.concat([circuit, "not a circuit"])


def test_save_replaces_the_file_whole_or_not_at_all(circuit, tmp_path, monkeypatch):
    path = circuit.save(tmp_path / "c.pt")
    before = path.read_bytes()

    def broken(obj, handle, *args, **kwargs):
        handle.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space"):
        circuit[0].save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no fragment left behind
    back = Circuit.load(path)
    torch.testing.assert_close(back.scores, circuit.scores)
    assert back.readers == circuit.readers and torch.equal(back.in_graph, circuit.in_graph)
    with pytest.raises(InputError, match="is a folder"):
        circuit.save(tmp_path)
    # the mode a plain write gives (mkstemp's files are private), and through a symbolic link, the file it points to
    umask = os.umask(0)
    os.umask(umask)
    fresh = circuit.save(tmp_path / "fresh.pt")
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "link.pt").symlink_to(fresh)
    circuit[0].save(tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink() and Circuit.load(fresh).batch == 1


def test_a_file_of_the_first_format_still_loads(circuit, tmp_path):
    """Version 1 kept the edge set as ``mask`` and the corrupted tokens in ``settings``."""
    state = {"dpa_lens_circuit": 1, "method": circuit.method, "writers": circuit.writers, "readers": [list(r) for r in circuit.readers],
             "scores": circuit.scores, "mask": circuit.in_graph, "target": circuit.target,
             "settings": {"corrupted_str_tokens": circuit.diagnostics.corrupted_str_tokens}, "model_name": circuit.model_name}
    torch.save(state, tmp_path / "old.pt")
    back = Circuit.load(tmp_path / "old.pt")
    assert torch.equal(back.in_graph, circuit.in_graph) and back.settings == {}
    assert back.diagnostics.corrupted_str_tokens == circuit.diagnostics.corrupted_str_tokens
    torch.save({**state, "scores": "not a tensor"}, tmp_path / "edited.pt")
    with pytest.raises(InputError, match="does not read back"):
        Circuit.load(tmp_path / "edited.pt")


def test_old_names_warn_and_still_work(model, circuit):
    with pytest.warns(DeprecationWarning, match="in_graph"):
        assert torch.equal(circuit.mask, circuit.in_graph)
    with pytest.warns(DeprecationWarning, match="kind="):
        old = circuit.top(5, writer_kind="head")
    torch.testing.assert_close(torch.tensor(old["score"].values), torch.tensor(circuit.top(5, kind="heads")["score"].values))
    assert set(circuit.top(50, kind="mlp")["writer"]) <= {w for w in circuit.writers if w.endswith(".mlp")}
    with pytest.raises(InputError, match="kind must be"):
        circuit.top(5, kind="head")
    with pytest.warns(DeprecationWarning, match=r"edge_atp\(clean=\.\.\.\) is now edge_atp\(prompt=\.\.\.\)"):
        renamed = dpa_lens.edge_atp(model, clean=OTHER, corrupted=OTHER_CORRUPTED, target=PAIR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        now = dpa_lens.edge_atp(model, prompt=OTHER, corrupted=OTHER_CORRUPTED, target=PAIR)
    torch.testing.assert_close(renamed.scores, now.scores)
    with pytest.warns(DeprecationWarning, match=r"atp\((clean|corrupted)_tokens=\.\.\.\) is now"):
        atp = dpa_lens.atp(model, clean_tokens=IOI_PROMPT, corrupted_tokens=CORRUPTED, target=PAIR)
    torch.testing.assert_close(atp.heads, dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR).heads)
    with pytest.raises(InputError, match="pass prompt= only"):
        dpa_lens.edge_atp(model, prompt=OTHER, clean=OTHER, corrupted=OTHER_CORRUPTED, target=PAIR)


def test_show_draws_the_registered_figure(circuit):
    fig = circuit.show(top_n=5)
    assert fig.layout.title.text.startswith("edge_atp: top")


def test_reading_a_circuit_refuses_what_it_cannot_answer(circuit):
    with pytest.raises(InputError, match="no neurons writers"):
        circuit.top(5, kind="neurons")
    for bad in (float("nan"), -1.0, "0.1"):
        with pytest.raises(InputError, match="threshold must be"):
            circuit.prune(threshold=bad)
    assert int(circuit.prune(threshold=0.0).in_graph.sum()) == int(circuit.in_graph.sum())
