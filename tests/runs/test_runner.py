"""Dataset runs: records read and checked, results on disk per record, resumed, divided among processes."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import dpa_lens
from dpa_lens.errors import InputError
from dpa_lens.runs import runner as runner_module
from dpa_lens.runs.records import read_records
from dpa_lens.runs.store import Store
from tests.helpers import make_tiny, rel_err

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna"]


def ioi_records(n: int) -> list[dict]:
    """IOI-like records of a few lengths, with corrupted partners (the subject's second mention flipped)."""
    out = []
    for i in range(n):
        a, b = NAMES[i % 6], NAMES[(i + 1) % 6]
        place = ["store", "old market square", "park"][i % 3]
        prompt = f"When {a} and {b} went to the {place}, {b} gave a drink to"
        out.append({"id": f"r{i}", "prompt": prompt, "target": [f" {a}", f" {b}"],
                    "corrupted": prompt[: prompt.rfind(b)] + a + prompt[prompt.rfind(b) + len(b):]})
    return out


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny():
    model, _ = make_tiny("llama", seed=3)
    return model


def alone(model, method, record, **options):
    target = tuple(record["target"]) if isinstance(record["target"], list) else record["target"]
    corrupted = record.get("corrupted") if dpa_lens.get_method(method).takes_corrupted else None
    return dpa_lens.run(method, model, record["prompt"], target, corrupted=corrupted, **options)


# ---------------------------------------------------------------------------------------------- records
def test_read_records_skips_bad_lines_and_refuses_repeated_ids(tmp_path):
    rows = [{"id": 1, "prompt": "a b", "target": " c"}, "{not json", {"id": "x"}, {"id": "y", "prompt": "p", "target": [" a"]},
            {"id": "z", "prompt": "p", "target": [" a", " b"], "corrupted": "q"}]
    records, skipped = read_records(write_jsonl(tmp_path / "r.jsonl", rows))
    assert [r.id for r in records] == ["1", "z"] and records[1].target == (" a", " b") and records[1].corrupted == "q"
    assert [s.id for s in skipped] == ["line 2", "line 3", "line 4"]
    assert "not JSON" in skipped[0].reason and "prompt" in skipped[1].reason and "pair" in skipped[2].reason
    with pytest.raises(InputError, match="unique"):
        read_records([{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}])
    with pytest.raises(InputError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="no usable record"):
        read_records(write_jsonl(tmp_path / "bad.jsonl", ["[1, 2]"]))


# ---------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("method, options", [("dpa", {}), ("atp", {}), ("dpa_edges", {})])
def test_each_record_is_its_result_alone(tiny, tmp_path, method, options):
    records = ioi_records(7)
    if not dpa_lens.get_method(method).takes_corrupted:
        records = [{k: v for k, v in r.items() if k != "corrupted"} for r in records]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny random models do not predict the targets
        res = dpa_lens.attribute_dataset(tiny, method, records, tmp_path / "run", batch_size=3, progress=False, **options)
    assert res.complete and res.ids == [r["id"] for r in records] and res.skipped == []
    assert len(list((tmp_path / "run" / "shards").glob("part-*.parquet"))) == 3  # lengths 3 + 3 + 1 records
    whole = res.result()
    assert whole.batch == len(records)
    for record in records:
        ref = alone(tiny, method, record, **options)
        got = res[record["id"]]
        field = "scores" if method == "dpa_edges" else "heads"
        assert rel_err(getattr(got, field), getattr(ref, field)) < 2e-5, record["id"]  # float32: a batch sums in another order
        assert torch.allclose(got.target_value, ref.target_value, atol=1e-5)
        assert torch.equal(got.token_ids, ref.token_ids.cpu()) and got.str_tokens == ref.str_tokens  # no padding kept
    expected = type(whole).concat([alone(tiny, method, r, **options) for r in records])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mean, ref_mean = res.mean(), expected.mean()
    field = "scores" if method == "dpa_edges" else "head_totals"
    assert rel_err(getattr(mean, field), getattr(ref_mean, field)) < 1e-5
    assert isinstance(mean, dpa_lens.Circuit if method == "dpa_edges" else dpa_lens.Attribution)
    if method == "dpa_edges":  # the dataset's circuit scores any prompt's faithfulness as it is
        first = ioi_records(1)[0]
        curve = dpa_lens.circuit_faithfulness(tiny, first["prompt"], first["corrupted"], tuple(first["target"]), mean,
                                              fractions=[0.5, 1.0], progress=False)
        assert float(curve.faithfulness[0, -1]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_records_are_tokenized_once_and_padded_batches_are_each_record_alone(tiny, tmp_path, monkeypatch, side):
    """Each prompt is tokenized once (when its record is read); a batch's rows are padded as `prepare_tokens` pads them,
    and a padded batch, given to `run` as token ids and mask (atp) or as text (dpa: `run` makes the cache), gives each
    record's result alone."""
    from dpa_lens.inputs import prepare_tokens
    from dpa_lens.runs.records import batch_tokens, prepare

    records = [dict(r, id=f"{r['id']}-{side}") for r in ioi_records(6)]
    parsed, _ = read_records(records)
    monkeypatch.setattr(tiny.tokenizer, "padding_side", side)
    rows = [prepare(tiny, r, needs_target=True, needs_corrupted=True, takes_corrupted=True) for r in parsed]
    tokens, mask = batch_tokens(tiny, [p.tokens for p in rows])
    ref_tokens, ref_mask = prepare_tokens(tiny, [r.prompt for r in parsed])
    assert mask is not None and torch.equal(tokens, ref_tokens.cpu()) and torch.equal(mask, ref_mask.cpu())
    assert torch.equal(batch_tokens(tiny, [p.corrupted_tokens for p in rows])[0], prepare_tokens(tiny, [r.corrupted for r in parsed])[0].cpu())
    calls = {"n": 0}
    real_to_tokens = tiny.to_tokens

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real_to_tokens(*args, **kwargs)

    monkeypatch.setattr(tiny, "to_tokens", counting)
    for method, per_record in (("atp", 2), ("dpa", 1)):
        data = records if method == "atp" else [{k: v for k, v in r.items() if k != "corrupted"} for r in records]
        calls["n"] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = dpa_lens.attribute_dataset(tiny, method, data, tmp_path / method, batch_size=len(data), progress=False)
        padded = 1 if method == "dpa" else 0  # a cache method's padded batch goes to `run` as text
        assert calls["n"] == per_record * len(data) + padded * len(data), (method, calls["n"])
        for record in data:
            ref = alone(tiny, method, record)
            got = res[record["id"]]
            assert rel_err(got.heads, ref.heads) < 1e-5, record["id"]
            assert torch.allclose(got.target_value, ref.target_value, atol=1e-5)
            assert torch.equal(got.token_ids, ref.token_ids.cpu()) and got.str_tokens == ref.str_tokens


def test_bad_records_are_skipped_with_their_id(tiny, tmp_path):
    good = ioi_records(3)
    long_prompt = "word " * (tiny.cfg.n_ctx + 5)
    bad = [
        {"id": "two-tokens", "prompt": good[0]["prompt"], "target": [" Maryxyzzy", " John"], "corrupted": good[0]["corrupted"]},
        {"id": "too-long", "prompt": long_prompt, "target": [" Mary", " John"], "corrupted": long_prompt},
        {"id": "other-length", "prompt": good[1]["prompt"], "target": [" Mary", " John"], "corrupted": good[1]["corrupted"] + " and more"},
        {"id": "no-corrupted", "prompt": good[2]["prompt"], "target": [" Mary", " John"]},
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = dpa_lens.attribute_dataset(tiny, "atp", good + bad, tmp_path / "run", batch_size=4, progress=False)
    assert res.ids == ["r0", "r1", "r2"]
    reasons = {s["id"]: s["reason"] for s in res.skipped}
    assert set(reasons) == {"two-tokens", "too-long", "other-length", "no-corrupted"}
    assert "tokens" in reasons["two-tokens"] and "context" in reasons["too-long"]
    assert "align" in reasons["other-length"] and "corrupted" in reasons["no-corrupted"]
    assert any("4 record(s) skipped" in str(w.message) for w in caught)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["written"] == 3


# ---------------------------------------------------------------------------------------------- resuming
def test_a_killed_run_resumes_with_every_id_once(tiny, tmp_path, monkeypatch):
    records = ioi_records(9)
    out = tmp_path / "run"
    writes = {"n": 0}
    real_write = Store.write_shard

    def dies_after_two(self, result, recs, *args):
        if writes["n"] == 2:
            raise KeyboardInterrupt  # killed while computing its third batch
        writes["n"] += 1
        return real_write(self, result, recs, *args)

    monkeypatch.setattr(Store, "write_shard", dies_after_two)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(KeyboardInterrupt):
            dpa_lens.attribute_dataset(tiny, "dpa", records, out, batch_size=2, progress=False)
    partial = dpa_lens.load_results(out)
    assert not partial.complete and len(partial) == 4
    written_before = set(partial.ids)
    monkeypatch.setattr(Store, "write_shard", real_write)
    computed = []
    real_call = runner_module._call
    monkeypatch.setattr(runner_module, "_call",
                        lambda model, spec, batch, *a: computed.extend(p.record.id for p in batch) or real_call(model, spec, batch, *a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = dpa_lens.attribute_dataset(tiny, "dpa", records, out, batch_size=2, progress=False)
        assert sorted(computed) == sorted({r["id"] for r in records} - written_before)  # only what was missing
        fresh = dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "fresh", batch_size=2, progress=False)
        assert res.complete and sorted(res.ids) == sorted(r["id"] for r in records)
        assert res.to_pandas(["id"])["id"].is_unique
        assert rel_err(res.mean().head_totals, fresh.mean().head_totals) < 1e-6
        again = dpa_lens.attribute_dataset(tiny, "dpa", records, out, batch_size=5, progress=False)  # nothing left to do
    assert again.ids == res.ids and len(computed) == 9 - 4 + 9  # the fresh run's nine


def test_a_folder_of_another_run_or_other_data_is_refused(tiny, tmp_path):
    records = ioi_records(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "run", progress=False)
        with pytest.raises(InputError, match="other settings"):
            dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "run", progress=False, flow=True)
        with pytest.raises(InputError, match="other settings"):
            dpa_lens.attribute_dataset(tiny, "dla", records, tmp_path / "run", progress=False)
        changed = [dict(records[0], prompt=records[0]["prompt"] + " him"), records[1]]
        with pytest.raises(InputError, match="another prompt"):
            dpa_lens.attribute_dataset(tiny, "dpa", changed, tmp_path / "run", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "other", progress=False)
    with pytest.raises(InputError, match="no option"):
        dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "new", progress=False, bogus=1)
    with pytest.raises(InputError, match="no manifest"):
        dpa_lens.load_results(tmp_path / "other")


def test_a_damaged_shard_is_named(tiny, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = dpa_lens.attribute_dataset(tiny, "dla", ioi_records(2), tmp_path / "run", progress=False)
    shard = next((tmp_path / "run" / "shards").glob("part-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(InputError, match=shard.name):
        res.mean()


# ---------------------------------------------------------------------------------------------- processes
def test_two_processes_give_the_records_of_one(tiny, tmp_path):
    """The records dealt to rank 0 and rank 1 (run one after the other here: torchrun runs them at once,
    tests/runs/test_torchrun.py) are written once each, with the numbers one process gives."""
    records = ioi_records(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "one", batch_size=2, progress=False)
        dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "two", batch_size=2, progress=False, rank=1, world_size=2)
        two = dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "two", batch_size=2, progress=False, rank=0, world_size=2)
    assert two.ids == one.ids
    for rid in one.ids:
        assert rel_err(two[rid].heads, one[rid].heads) < 1e-5
    with pytest.raises(InputError, match="rank"):
        dpa_lens.attribute_dataset(tiny, "dpa", records, tmp_path / "bad", rank=2, world_size=2)
