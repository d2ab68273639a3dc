"""Tests of the benchmark scripts (`quick_run`: one of them in quick mode)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def quick_run(script: str, out: Path, *args: str, timeout: int = 1200) -> tuple[dict[str, Any], str]:
    """``python -m bench.<script> --quick *args --out <out>`` from the repository root, warnings off: checks that it
    succeeds and that the Markdown it writes is what ``bench.<script>.markdown`` renders from the JSON it writes, and
    returns (the JSON's data, the Markdown's text) of ``<script>_smollm2_quick``."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", f"bench.{script}", "--quick", *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    stem = Path(out) / f"{script}_smollm2_quick"
    data = json.loads(stem.with_suffix(".json").read_text())
    text = stem.with_suffix(".md").read_text()
    assert text == importlib.import_module(f"bench.{script}").markdown(data)
    return data, text
