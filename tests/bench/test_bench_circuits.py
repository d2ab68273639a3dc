"""bench.circuits runs (quick mode), and the committed table is what it renders from the committed results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.circuits import markdown

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"


def _markdown():
    return markdown


def test_committed_table_is_rendered_from_the_committed_results():
    results = BENCH / "results"
    data = json.loads((results / "circuits_smollm2.json").read_text())
    assert not data["settings"]["quick"]
    assert (results / "circuits_smollm2.md").read_text() == _markdown()(data)


@pytest.mark.smollm2
@pytest.mark.tl4_only
def test_bench_quick_run(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "bench.circuits", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    stem = tmp_path / "circuits_smollm2_quick"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert stem.with_suffix(".md").read_text() == _markdown()(data)
    assert data["settings"]["quick"] and data["grid"]["prompts"] == 1 and data["grid"]["n_total"] == 123211
    methods = {"DPA", "contrastive DPA", "edge AtP", "random"}
    faith = data["faithfulness"]["corrupted"]
    assert set(faith) == methods and all(0 <= v["cmd"] for v in faith.values())
    assert all(abs(v["curve"][-1] - 1) < 1e-6 for v in faith.values())  # every edge kept: the clean run
    assert set(data["agreement"]["methods"]) == methods and data["agreement"]["prompts"] == 1
    rows = data["cost"]
    assert {r["measurement"] for r in rows} == {"dpa", "dpa_edges", "edge_atp", "edge_patching"}
    assert all("error" not in r and r["seconds"] > 0 for r in rows)
    patching = next(r for r in rows if r["measurement"] == "edge_patching")
    assert patching["patched_edges"] == 123211 - 301 and patching["extrapolated_seconds"] > patching["seconds"]
