"""bench.circuits runs (quick mode), and the committed table is what it renders from the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.circuits import markdown
from tests.bench import quick_run

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _markdown():
    return markdown


def test_committed_table_is_rendered_from_the_committed_results():
    results = BENCH / "results"
    data = json.loads((results / "circuits_smollm2.json").read_text())
    assert not data["settings"]["quick"]
    assert (results / "circuits_smollm2.md").read_text() == _markdown()(data)


def test_committed_second_model_table_is_rendered_from_its_results():
    from bench.circuits import mib_only_markdown

    data = json.loads((BENCH / "results" / "circuits_gemma3.json").read_text())
    assert not data["settings"]["quick"] and data["settings"]["model_name"] == "gemma3-270m"
    assert (BENCH / "results" / "circuits_gemma3.md").read_text() == mib_only_markdown(data)


@pytest.mark.smollm2
@pytest.mark.tl4_only
def test_bench_quick_run(tmp_path):
    data, _ = quick_run("circuits", tmp_path, timeout=1800)
    assert data["settings"]["quick"] and data["grid"]["prompts"] == 1 and data["grid"]["n_total"] == 123211
    methods = {"DPA", "contrastive DPA", "integrated DPA", "edge AtP", "EAP-IG (inputs)", "random"}
    faith = data["faithfulness"]["corrupted"]
    assert set(faith) == methods and all(0 <= v["cmd"] for v in faith.values())
    assert all(abs(v["curve"][-1] - 1) < 1e-6 for v in faith.values())  # every edge kept: the clean run
    assert set(data["agreement"]["methods"]) == methods and data["agreement"]["prompts"] == 1
    rows = data["cost"]
    assert {r["measurement"] for r in rows} == {"dpa", "dpa_edges", "dpa_edges_ig", "edge_atp", "eap_ig", "edge_patching"}
    assert all("error" not in r and r["seconds"] > 0 for r in rows)
    patching = next(r for r in rows if r["measurement"] == "edge_patching")
    assert patching["patched_edges"] == 123211 - 301 and patching["extrapolated_seconds"] > patching["seconds"]
    mib = data["mib"]  # MIB's protocol: a circuit of the train prompts, scored on the held-out ones
    assert (mib["train"], mib["test"]) == (2, 2) and mib["not_run"] == ["EAP-IG (activations)", "integrated DPA (3 steps)",
                                                                         "integrated DPA (5 steps)", "contrastive DPA", "edge AtP"]
    assert set(mib["methods"]) == {"EAP-IG (inputs)", "integrated DPA (1 step)", "DPA", "random"}
    assert all(abs(v["curve_signed"][-1] - 1) < 1e-6 and abs(v["curve_abs"][-1] - 1) < 1e-6 for v in mib["methods"].values())
    assert mib["methods"]["random"]["cpr"] < mib["methods"]["EAP-IG (inputs)"]["cpr"]


def test_methods_run_alone_join_the_committed_section_only_on_the_same_splits():
    """``--mib-only --mib-methods X`` adds X's rows to a section of the same train and held-out prompts, and replaces
    a section of other prompts."""
    from types import SimpleNamespace

    from bench.circuits import MIB_METHODS, merged_mib

    def section(methods, seconds, prompts=("a", "b")):
        return {"train": 2, "test": 2, "batch": 4, "test_prompts": list(prompts), "n_total": 10, "fractions": [0.5, 1.0],
                "methods": {m: {"cpr": 1.0} for m in methods}, "not_run": [m for m in MIB_METHODS if m not in methods],
                "seconds": seconds, "eap_ig_activations_passes": 305}

    earlier = section(["DPA", "random"], 100)
    new = section(["EAP-IG (activations)"], 50)
    alone = SimpleNamespace(mib_methods=["EAP-IG (activations)"])
    joined = merged_mib(earlier, new, alone)
    assert set(joined["methods"]) == {"DPA", "random", "EAP-IG (activations)"} and joined["seconds"] == 150
    assert "EAP-IG (activations)" not in joined["not_run"] and "DPA" not in joined["not_run"]
    assert merged_mib(earlier, section(["EAP-IG (activations)"], 50, prompts=("c", "d")), alone)["methods"].keys() == {"EAP-IG (activations)"}
    assert merged_mib(earlier, new, SimpleNamespace(mib_methods=None)) is new
