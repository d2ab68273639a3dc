"""The HTML report and the command line: self-contained, and drawn by a real browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from dpa_lens import cli
from dpa_lens.report import build_report
from tests.helpers import CORRUPTED, IOI_PROMPT, make_tiny

METHODS = ("dpa", "dla", "input_x_gradient", "attention_rollout", "atp", "atp*", "activation_patching")


@pytest.fixture(scope="module")
def report():
    model, _ = make_tiny("llama", seed=31)
    return build_report(model, IOI_PROMPT, (" Mary", " John"), corrupted=CORRUPTED, methods=METHODS, quiet=True)


def test_report_runs_every_method_and_is_self_contained(report):
    assert list(report.attributions) == list(METHODS)
    page = report.html()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js is inline, nothing is fetched
    assert not re.search(r"<link[^>]+href=['\"]?https?:", page)
    assert page.count("class=\"plotly-graph-div\"") == len(report.figures) >= 8
    for name in METHODS:
        assert f"<h3>{name}</h3>" in page
    assert "L1H" in page  # the head tables


def test_edge_methods_are_drawn_as_circuits_and_listed_as_edges():
    """Any registered method: an edge method's result is a circuit figure and a table of its top edges, chosen
    from what the result holds (a cache method and a pair method, as `run` gives them what they take)."""
    model, _ = make_tiny("llama", seed=31)
    r = build_report(model, IOI_PROMPT, (" Mary", " John"), corrupted=CORRUPTED, methods=("dpa_edges", "edge_atp", "dla"), quiet=True)
    assert [type(a).__name__ for a in r.attributions.values()] == ["Circuit", "Circuit", "Attribution"]
    assert r.attributions["dpa_edges"].method == "dpa_edges"  # not contrastive: the corrupted prompt is a pair method's
    titles = [t for t, _ in r.figures]
    assert "Circuit (dpa_edges, strongest edges)" in titles and "Circuit (edge_atp, strongest edges)" in titles
    page = r.html(top=5)
    assert page.count("<b>edges</b>") == 2 and "<th>writer</th>" in page
    text = cli.summary(r, 5)
    assert "Top 5 edges (dpa_edges, by |score|)" in text and " -> " in text


def test_pair_methods_are_skipped_without_a_corrupted_prompt():
    model, _ = make_tiny("llama", seed=31)
    r = build_report(model, IOI_PROMPT, " Mary", methods=("dpa", "atp"), quiet=True)
    assert list(r.attributions) == ["dpa"]
    with pytest.raises(ValueError, match="no attribution method .lime."):
        build_report(model, IOI_PROMPT, " Mary", methods=("dpa", "lime"), quiet=True)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.tl4_only
def test_report_draws_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("DPA_LENS_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    path = tmp_path / "report.html"
    path.write_text(report.html(), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=180).stdout
    # plotly draws each figure into an <svg class="main-svg">; a failed script leaves the divs empty
    drawn = len(re.findall(r'<div[^>]*class="[^"]*js-plotly-plot', dom))
    assert drawn == len(report.figures)
    assert dom.count('class="main-svg"') >= len(report.figures)
    assert dom.count("heatmaplayer") + dom.count("hm") > 0
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1300,2000", path.as_uri()], capture_output=True, timeout=180)
    assert shot.exists() and shot.stat().st_size > 20_000


@pytest.mark.smollm2
@pytest.mark.tl4_only
def test_demo_command(tmp_path, capsys):
    out = tmp_path / "demo.html"
    assert cli.main(["demo", "--out", str(out), "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "predicted  ' Mary'" in text
    assert "L23H3" in text  # SmolLM2's top IOI head by DPA
    assert out.stat().st_size > 1_000_000  # plotly.js is in the file
