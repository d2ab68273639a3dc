"""Renders the README's pictures with headless Chromium: ``python docs/screenshots.py``.

The report of ``dpa-lens demo`` and the main figures of the notebooks (IOI heads by method, scatter
against exact patching, tokens by method, information flow, the IOI and induction circuits), each
drawn by the browser from the same HTML that users open. ``--only circuits`` redraws the circuits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import dpa_lens
from dpa_lens import plot
from dpa_lens.datasets import ioi_dataset
from dpa_lens.report import DEFAULT_METHODS, build_report

OUT = Path(__file__).parent / "images"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=30000"]


def shoot(html: str, name: str, width: int, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("needs chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html, encoding="utf-8")
        subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp}/profile", f"--window-size={width},{height}",
                        f"--screenshot={OUT / name}", page.as_uri()], check=True, capture_output=True, timeout=300)
    print("wrote", OUT / name)


def figure(fig, name: str) -> None:
    w, h = int(fig.layout.width or 700), int(fig.layout.height or 500)
    shoot(fig.to_html(include_plotlyjs=True, full_html=True, config={"displayModeBar": False}), name, w + 20, h + 20)


def circuits(model) -> None:
    """DPA's edges of the classic IOI prompt (SmolLM2), and of the trained induction model (16 repeats)."""
    from dpa_lens.datasets.induction import induction_model, repeated_tokens

    prompt = "When Mary and John went to the store, John gave a drink to"
    _, cache = model.run_with_cache(prompt)
    circ = dpa_lens.dpa_edges(model, cache, (" Mary", " John"))
    fig = plot.circuit(circ, top_n=30, title="DPA edges of SmolLM2-135M, IOI: the 30 strongest (IO − S logit difference)")
    fig.update_layout(width=1100, height=620)
    figure(fig, "circuit_ioi.png")
    toy = induction_model()
    data = repeated_tokens(toy, n_prompts=16, segment=8, seq_len=24, seed=0)
    rows, later, _ = data.pairs(predictable=True)
    middle = torch.stack([torch.nonzero(rows == r)[len(torch.nonzero(rows == r)) // 2, 0] for r in range(16)])
    position = later[middle]
    _, toy_cache = toy.run_with_cache(data.tokens)
    induction = dpa_lens.dpa_edges(toy, toy_cache, data.tokens[torch.arange(16), position + 1].tolist(), position=position)
    fig = plot.circuit(induction, top_n=12, title="DPA edges of the 2-layer induction model (one repeated sequence)")
    fig.update_layout(width=700, height=480)
    figure(fig, "circuit_induction.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    model = dpa_lens.load_model("smollm2-135m")
    circuits(model)
    if sys.argv[1:] == ["--only", "circuits"]:
        return
    prompt = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Mary and John went to the store, Mary gave a drink to"
    report = build_report(model, prompt, (" Mary", " John"), corrupted=corrupted, methods=DEFAULT_METHODS, model_name="smollm2-135m")
    shoot(report.html(), "report.png", 1300, 1150)
    attrs = report.attributions
    figure(plot.tokens_by_method([attrs[m] for m in ("dpa", "input_x_gradient", "atp", "attention_rollout", "dla")]), "tokens_by_method.png")
    figure(plot.flow(attrs["dpa"]), "flow.png")

    prompts = ioi_dataset(model, n=16, seed=0)
    methods = {"dpa": "dpa", "atp": "atp", "activation_patching": "exact patching"}
    runs = {m: [] for m in methods}
    for p in prompts:
        for m in methods:
            runs[m].append(dpa_lens.run(m, model, p.clean, p.target, corrupted=p.corrupted, progress=False))
    mean = {m: dpa_lens.Attribution.concat(r).mean() for m, r in runs.items()}
    figure(plot.heads(list(mean.values()), title="IOI heads, 16 prompts: DPA, AtP and exact patching (normalised per method)"), "ioi_heads.png")
    agreement = {}
    for m in ("atp", "dpa"):
        fig = plot.scatter(mean[m], mean["activation_patching"])
        figure(fig, f"scatter_{m}.png")
        agreement[m] = {"pearson": round(fig.layout.meta["pearson"], 4), "spearman": round(fig.layout.meta["spearman"], 4)}
    # the pictures' own numbers (the README's agreement sentence comes from the faithfulness results)
    (OUT / "ioi_heads.json").write_text(json.dumps({"prompts": len(prompts), "against_exact_patching": agreement}, indent=2) + "\n")


if __name__ == "__main__":
    main()
