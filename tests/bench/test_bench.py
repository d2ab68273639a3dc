"""The benchmark scripts run (quick mode) and the committed tables are what they produce."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import quick_run

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _module(name: str):
    return importlib.import_module(f"bench.{name}")


@pytest.mark.parametrize("stem", ["faithfulness_smollm2", "speed_smollm2", "faithfulness_gemma3", "speed_gemma3", "datasets_smollm2"])
def test_committed_tables_are_rendered_from_the_committed_results(stem):
    results = BENCH / "results"
    data = json.loads((results / f"{stem}.json").read_text())
    assert not data.get("quick", data.get("settings", {}).get("quick"))
    markdown = _module(stem.split("_")[0]).markdown
    assert (results / f"{stem}.md").read_text() == markdown(data)


@pytest.mark.parametrize("stem", ["eap_ig_signed", "eap_ig_signed_gemma3"])
def test_the_eap_ig_signed_table_is_rendered_from_its_committed_results(stem):
    data = json.loads((BENCH / "results" / f"{stem}.json").read_text())
    assert (BENCH / "results" / f"{stem}.md").read_text() == _module("eap_ig_signed").markdown(data)


def test_the_eap_ig_signed_edge_is_the_embeddings_edge_into_an_mlp_the_inputs_form_scores_highest():
    import types

    import torch

    readers = [("L0.mlp", "mlp"), ("L1H0", "q"), ("L1.mlp", "mlp"), ("logit", "logit")]
    scores = torch.tensor([[[1.0, 9.0, 2.0, 8.0], [5.0, 0.0, 7.0, 0.0]]])  # [row, writer, reader]
    circuit = types.SimpleNamespace(writers=["embed", "L0.mlp"], readers=readers, scores=scores)
    assert _module("eap_ig_signed").embedding_to_mlp(circuit) == ("embed", "L1.mlp", "mlp")


def test_failures_are_reported_by_their_first_sentence_and_readme_cells_say_why():
    short_error = _module("common").short_error
    trace = "Traceback ...\ndpa_lens.errors.UnsupportedModelError: Unpack does not support this model (x, y). " + "More. " * 60
    assert short_error(trace) == "UnsupportedModelError: Unpack does not support this model (x, y)."
    assert short_error("stopped after 600 s (the --timeout of one measurement)").startswith("stopped after 600 s")
    rows = [{"measurement": m, "length": 32, "option": "", "section": "floor", "seconds": 1.0, "peak_bytes": 2**20}
            for m in ("hf_forward", "hf_forward_backward", "dpa", "cache_forward", "dpa_sweep", "atp")]
    rows += [{"measurement": "depass", "length": 32, "option": "", "section": "methods", "error": "stopped after 600 s (limit)"},
             {"measurement": "unpack", "length": 32, "option": "", "section": "methods", "error": trace},
             {"measurement": "dpa", "length": 64, "option": "", "section": "floor", "error": "stopped by hand"}]
    table = _module("readme").speed({"rows": rows})
    cells = [c.strip() for c in table.splitlines()[-1].strip("|").split("|")]
    assert cells[0] == "32" and cells[-4:] == ["", "1 s", "> 600 s", "unsupported"]
    assert "| 64 |" not in table  # a length with no floor measurement has no row


def test_rounds_keep_each_rows_fastest_process_and_its_largest_peak():
    fastest = _module("speed").fastest
    row = lambda m, s, peak, **kw: {"measurement": m, "length": 32, "option": "", "seconds": s, "peak_bytes": peak, **kw}  # noqa: E731
    runs = [row("dpa", 2.0, 10), row("hf_forward", 1.0, 5), row("dpa", 1.5, 7), row("hf_forward", 1.2, 9),
            {"measurement": "depass", "length": 32, "option": "", "error": "stopped after 600 s"},
            {"measurement": "atp", "length": 32, "option": "", "error": "killed"}, row("atp", 3.0, 4)]
    rows = {r["measurement"]: r for r in fastest(runs)}
    assert len(fastest(runs)) == 4
    assert (rows["dpa"]["seconds"], rows["dpa"]["peak_bytes"], rows["dpa"]["runs"]) == (1.5, 10, 2)
    assert (rows["hf_forward"]["seconds"], rows["hf_forward"]["peak_bytes"]) == (1.0, 9)
    assert rows["atp"]["seconds"] == 3.0 and rows["atp"]["runs"] == 1  # one failed round, one success
    assert rows["depass"]["error"].startswith("stopped")


@pytest.mark.smollm2
@pytest.mark.tl4_only
@pytest.mark.parametrize("script", ["faithfulness", "speed"])
def test_bench_quick_run(script, tmp_path):
    smoke = ["--in-process"] if script == "speed" else ["--known", "1", "--ioi", "1"]  # the code paths, in seconds
    data, text = quick_run(script, tmp_path, *smoke)
    if script == "faithfulness":
        assert data["settings"]["known_1000_prompts"] == 1 and data["settings"]["ioi_prompts"] == 1
        methods = set(data["tokens"]["ioi"])
        assert {"dpa", "dla", "atp", "atp*", "gradient", "input_x_gradient", "integrated_gradients", "random"} <= methods
        assert all(0 <= v["recovery"] for v in data["tokens"]["known_1000"].values())
        assert set(data["agreement"]) >= {"dpa", "atp", "random"}
    else:
        rows = [r for r in data["rows"] if "error" not in r]
        assert len(rows) == len(data["rows"]) and all(r["seconds"] > 0 for r in rows)
        assert "## DPA against the model's own forward and backward" in text and "| 128 |" in text
        assert {r["measurement"] for r in rows if r.get("section") == "floor" and r["length"] == 128} == {
            "hf_forward", "hf_forward_backward", "cache_forward", "dpa_sweep", "cache_check", "dpa"}
        assert "## Activation checkpointing" in text and {r["measurement"] for r in rows if r["option"] == "checkpoint"} == {
            "cache_forward", "dpa"}
        assert "## The same with the logits at the answer position only" in text
        ab = next(r for r in rows if r["measurement"] == "probe_ab")  # the probe's A/B in one process
        assert ab["rounds"] == 2 and ab["noprobe_seconds"] > 0 and "In one process (`probe_ab`" in text and "| 128 | 2 |" in text
        assert {r["measurement"] for r in rows if r["option"] == "answer"} == {"hf_forward_backward", "tl_forward",
                                                                                 "cache_forward", "dpa"}
        profile = next(r for r in rows if r["measurement"] == "profile")
        assert any(k.startswith("dpa.attention") for k in profile["rules"]) and any(k.startswith("dpa.mlp") for k in profile["rules"])
        assert profile["rules"]["dpa_lens.checks"] > 0


@pytest.mark.smollm2
@pytest.mark.tl4_only
def test_datasets_bench_quick_run(tmp_path):
    """Every section's code path (the floor, DPA and its edges through attribute_dataset, two processes under torchrun)."""
    data, text = quick_run("datasets", tmp_path)
    assert [r for r in data["rows"] if "error" in r] == []
    assert all(r["written"] == r["records"] for r in data["rows"] if r["measurement"] != "floor")
    assert "| 2 | 4 |" in text and "## One process or two" in text and "## Where a dataset run's time goes" in text
    stages = next(r for r in data["rows"] if r["section"] == "breakdown")["stages"]
    assert set(stages) == {"floor", "floor_forward", "cache_forward", "method_calls", "dataset_call"}
    assert stages["floor_forward"] < stages["floor"] and stages["cache_forward"] < stages["method_calls"]


def test_a_timed_row_of_several_rounds_keeps_its_fastest_and_fails_only_when_every_round_did():
    datasets = _module("datasets")
    runs = [{"seconds": 3.0, "written": 4}, {"error": "killed"}, {"seconds": 2.0, "written": 4}]
    assert datasets.fastest(runs) == {"seconds": 2.0, "written": 4, "rounds": [3.0, 2.0]}
    assert datasets.fastest([{"seconds": 5.0}]) == {"seconds": 5.0}
    assert datasets.fastest([{"error": "a"}, {"error": "b"}]) == {"error": "b"}
    rows = [{"section": "speed", "rounds": [2.0, 3.0, 2.5]}, {"section": "memory", "rounds": [1.0, 9.0]}]
    assert "fastest of 3 rounds" in datasets.rounds_note(rows) and "1.50×" in datasets.rounds_note(rows)
    assert datasets.rounds_note([{"section": "speed", "seconds": 1.0}]) == ""


@pytest.mark.smollm2
def test_memory_rows_of_one_length_give_batches_of_one_shape():
    """The records of the goal's memory rows: one token length, the warm-up's records apart from the timed ones,
    16 records cycled, every id once."""
    from dpa_lens.inputs import prepare_tokens

    datasets = _module("datasets")
    model = datasets.load("cpu", "float32")
    warm, recs = datasets.one_length(model, 40)
    assert len({prepare_tokens(model, r["prompt"])[0].shape[-1] for r in warm + recs}) == 1
    assert len({r["id"] for r in warm + recs}) == len(warm) + 40
    cycled = {r["id"].split("#")[0] for r in recs}
    assert len(cycled) == 16 and not cycled & {r["id"] for r in warm}


@pytest.mark.gemma3
@pytest.mark.tl4_only
def test_faithfulness_bench_on_the_second_model(tmp_path):
    """--model gemma3-270m writes its own results; a method that does not support the model is listed, not fatal."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "bench.faithfulness", "--model", "gemma3-270m", "--quick", "--known", "1", "--ioi", "1",
                          "--methods", "dpa", "unpack", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((tmp_path / "faithfulness_gemma3_quick.json").read_text())
    assert data["settings"]["model"].startswith("Gemma 3 270M") and data["settings"]["command"].endswith("--out " + str(tmp_path))
    assert set(data["tokens"]["known_1000"]) == {"dpa"} and "unpack" in data["settings"]["unsupported"]
    text = (tmp_path / "faithfulness_gemma3_quick.md").read_text()
    assert text.startswith("# Faithfulness of attribution methods on Gemma 3 270M") and "Not run: unpack" in text


def test_readme_numbers_are_rendered_from_the_committed_results():
    """Every generated block of the README is what bench/readme.py renders from the committed result files."""
    out = subprocess.run([sys.executable, "-m", "bench.readme", "--check"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:] + out.stdout[-2000:]
