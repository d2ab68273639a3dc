"""The notebooks run top to bottom offline (with DPA_LENS_SMALL=1, as in CI) and match their builder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.smollm2, pytest.mark.tl4_only, pytest.mark.slow]

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_ioi_circuit.ipynb", "03_heatmaps.ipynb", "04_circuits.ipynb"]


def test_committed_notebooks_are_what_the_builder_writes(tmp_path):
    import nbformat

    before = {name: nbformat.read(NOTEBOOKS / name, as_version=4) for name in NAMES}
    script = (NOTEBOOKS / "build.py").read_text().replace("HERE = Path(__file__).parent", f"HERE = Path({str(tmp_path)!r})")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    for name in NAMES:
        fresh = nbformat.read(tmp_path / name, as_version=4)
        assert [c.source for c in fresh.cells] == [c.source for c in before[name].cells], f"{name}: run python notebooks/build.py"


# what a committed output must not show: a path of the machine that ran it
MACHINE_PATH = re.compile(r"(/work/|/tmp/|/home/|/root/|/Users/|/private/var/|site-packages|dist-packages|[A-Z]:\\\\)")


def _texts(output) -> list[str]:
    """Every text an output shows (its images excluded: base64 may hold any letters)."""
    texts = [output.get("text", ""), output.get("evalue", ""), *output.get("traceback", [])]
    for mime, value in output.get("data", {}).items():
        if not mime.startswith("image/"):
            texts.append(value if isinstance(value, str) else json.dumps(value))
    return texts


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_carry_their_outputs(name):
    """GitHub and Colab show the committed notebooks before anyone runs them: every code cell was run,
    in order, in one kernel, none failed, every plotly figure also carries a PNG (GitHub shows no plotly
    output), and no output shows a warning or a path of the machine that ran it."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    hint = "run python notebooks/build.py --execute"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), hint
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, "the notebook should draw plotly figures"
    assert all("image/png" in o["data"] for o in figures), f"{name}: a figure without a static image; {hint}"
    shown = [t for o in outputs for t in _texts(o)]
    assert not [t for t in shown if MACHINE_PATH.search(t)], f"{name}: an output shows a machine's path"
    assert not [t for t in shown if "Warning" in t], f"{name}: an output shows a warning"


def test_the_output_checks_catch_what_they_look_for():
    assert MACHINE_PATH.search("saved to /home/me/attr.pt") and MACHINE_PATH.search("lib/python3.12/site-packages/x.py")
    assert not MACHINE_PATH.search("L3H4 reads from ' Mary' (pos 2/15)")
    bad = {"output_type": "stream", "name": "stderr", "text": "/work/x.py:3: TqdmWarning: IProgress not found"}
    assert MACHINE_PATH.search(_texts(bad)[0]) and "Warning" in _texts(bad)[0]
    png = {"output_type": "display_data", "data": {"image/png": "ab/tmp/cd", "text/plain": "Figure"}}
    assert _texts(png)[-1] == "Figure" and not any(MACHINE_PATH.search(t) for t in _texts(png))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DPA_LENS_SMALL", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "colab-badge" in nb.cells[0].source and "pip install" in nb.cells[1].source
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, "the notebook should draw plotly figures"
