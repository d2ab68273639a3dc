"""``dpa-lens attribute``: every argument checked before a model loads; a run, a resume and Ctrl-C from the command line."""

from __future__ import annotations

import json
import time

import pytest

import dpa_lens
from dpa_lens import cli
from dpa_lens.models.testing import tiny_hf_model, tiny_tokenizer
from tests.runs.test_runner import ioi_records, write_jsonl


@pytest.fixture
def files(tmp_path):
    data = write_jsonl(tmp_path / "records.jsonl", [{k: v for k, v in r.items() if k != "corrupted"} for r in ioi_records(4)])
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path, data


@pytest.mark.parametrize("extra, message", [
    (["--method", "lime"], "unknown; choose among"),
    (["--method", "dpa", "--option", "bogus=1"], "has no option bogus"),
    (["--method", "atp*", "--option", "qk_fix=false"], "fixes qk_fix"),
    (["--method", "dpa", "--option", "flow"], "expected KEY=VALUE"),
    (["--method", "dpa", "--batch-size", "0"], "positive integer"),
    (["--method", "dpa", "--data", "{tmp}/missing.jsonl"], "does not exist"),
    (["--method", "dpa", "--data", "{tmp}/model/config.json"], "no usable record"),
    (["--method", "dpa", "--out", "{tmp}/model"], "not empty"),
    (["--method", "dpa", "--out", "{data}"], "is a file"),
    (["--method", "dpa", "--out", "/no/such/folder/run"], "does not exist"),
])
def test_attribute_checks_arguments_before_loading_a_model(files, extra, message, capsys, monkeypatch):
    tmp_path, data = files
    monkeypatch.setattr(dpa_lens, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the arguments were checked"))
    argv = ["attribute", "--model", str(tmp_path / "model"), "--data", data, "--out", str(tmp_path / "run"), *extra]
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main([a.replace("{tmp}", str(tmp_path)).replace("{data}", data) for a in argv])
    assert exit_.value.code == 2 and time.perf_counter() - started < 1.0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_attribute_refuses_a_folder_of_another_run_before_loading(files, capsys, monkeypatch):
    tmp_path, data = files
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"format": "dpa_lens_dataset", "version": 1, "method": "dla", "options": {},
                                                   "position": -1, "model_name": "x"}))
    monkeypatch.setattr(dpa_lens, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit):
        cli.main(["attribute", "--model", str(tmp_path / "model"), "--method", "dpa", "--data", data, "--out", str(run)])
    assert "other settings" in capsys.readouterr().err


def test_attribute_runs_resumes_and_stops_on_ctrl_c(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "model"
    tiny_hf_model("llama", seed=2).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = write_jsonl(tmp_path / "records.jsonl", [{k: v for k, v in r.items() if k != "corrupted"} for r in ioi_records(5)])
    argv = ["attribute", "--model", str(folder), "--method", "dpa", "--data", data, "--out", str(tmp_path / "run"),
            "--batch-size", "2", "--option", "flow=true", "--no-progress"]
    from dpa_lens.runs.store import Store

    real = Store.write_shard
    calls = {"n": 0}

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(Store, "write_shard", interrupted)
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: the records written are kept" in err and "Traceback" not in err
    assert len(dpa_lens.load_results(tmp_path / "run")) == 2
    monkeypatch.setattr(Store, "write_shard", real)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "5 records written" in out
    res = dpa_lens.load_results(tmp_path / "run")
    assert res.complete and sorted(res.ids) == [f"r{i}" for i in range(5)] and res["r3"].flow is not None
