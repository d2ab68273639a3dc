"""``torchrun --nproc_per_node 2 -m dpa_lens attribute ...``: two processes (gloo, CPU) at once give the records of one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

import dpa_lens
from dpa_lens.models.testing import tiny_hf_model, tiny_tokenizer
from tests.helpers import rel_err
from tests.runs.test_runner import ioi_records, write_jsonl


@pytest.mark.parametrize("method", ["dpa", "dpa_edges"])
def test_torchrun_two_processes(tmp_path, method):
    folder = tmp_path / "model"
    tiny_hf_model("llama", seed=5).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = write_jsonl(tmp_path / "records.jsonl", [{k: v for k, v in r.items() if k != "corrupted"} for r in ioi_records(9)])
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dpa_lens", "attribute",
           "--model", str(folder), "--method", method, "--data", data, "--out", str(out), "--batch-size", "2", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "9 records written" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["complete"] and manifest["written"] == 9
    two = dpa_lens.load_results(out)
    model = dpa_lens.load_model(str(folder), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = dpa_lens.attribute_dataset(model, method, data, tmp_path / "one", batch_size=2, progress=False)
    assert two.ids == one.ids
    field = "scores" if method == "dpa_edges" else "heads"
    for rid in one.ids:
        assert rel_err(getattr(two[rid], field), getattr(one[rid], field)) < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel_err(getattr(two.mean(), "scores" if method == "dpa_edges" else "head_totals"),
                       getattr(one.mean(), "scores" if method == "dpa_edges" else "head_totals")) < 1e-5
