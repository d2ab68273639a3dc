"""One self-contained HTML page explaining one prediction with several methods.

``build_report`` runs the methods (any registered method, node or edge), draws the figures of
`dpa_lens.plot` and the top-k tables, and returns a single HTML document with plotly.js embedded: it
opens offline, nothing is fetched. ``dpa-lens explain ... --out report.html`` and ``dpa-lens demo``
call it. What is drawn is chosen from what the results hold, never from the methods' names.
"""

from __future__ import annotations

import datetime
import html
import inspect
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dpa_lens import plot
from dpa_lens.methods.registry import get_method, names_filter, run
from dpa_lens.models import hooks
from dpa_lens.models.fast_attention import fused_attention
from dpa_lens.models.tl import locked
from dpa_lens.results import KINDS, Attribution, Circuit
from dpa_lens.types import TargetLike, TLModel

DEFAULT_METHODS = ("dpa", "dla", "input_x_gradient", "attention_rollout", "atp", "atp*", "activation_patching")


@dataclass
class Report:
    """Everything the page shows; ``html`` renders it."""

    model_name: str
    prompt: str
    target_label: str
    predicted: str
    corrupted: str | None
    attributions: dict[str, Attribution | Circuit] = field(default_factory=dict)  # by method
    timings: dict[str, float] = field(default_factory=dict)
    figures: list[tuple[str, Any]] = field(default_factory=list)

    def html(self, top: int = 10) -> str:
        return _render(self, top)


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


@locked
def build_report(
    model: TLModel,
    prompt: str,
    target: TargetLike,
    *,
    corrupted: str | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    model_name: str | None = None,
    quiet: bool = False,
) -> Report:
    """Run ``methods`` on one prompt and collect their attributions and figures.

    Cache methods share one forward pass (caching what they read); pair methods run their own clean and
    corrupted forwards. Methods that need a corrupted prompt are skipped without one; the others never get it.
    """
    specs = [get_method(m) for m in methods]  # unknown names fail here, before any work
    if corrupted is None:
        skipped = [s.name for s in specs if s.input == "pair"]
        if skipped:
            _log(f"   (no corrupted prompt: skipping {', '.join(skipped)})", quiet)
        specs = [s for s in specs if s.input != "pair"]
    steps = len(specs) + 1
    _log(f"[0/{steps}] forward pass with cache ...", quiet)
    start = time.perf_counter()
    cached = [s.name for s in specs if s.input == "cache"]
    wanted = names_filter(model, *cached) if cached else (lambda name: False)
    with torch.no_grad(), fused_attention(model):  # layers whose pattern is cached stay eager
        logits, cache = model.run_with_cache(prompt, names_filter=lambda n: wanted(n) or n == hooks.EMBED)
    report = Report(
        model_name=model_name or getattr(model.cfg, "model_name", ""),
        prompt=prompt,
        target_label="",
        predicted=model.to_string(logits[0, -1].argmax()),
        corrupted=corrupted,
    )
    report.timings["forward"] = time.perf_counter() - start
    for done, spec in enumerate(specs, 1):
        _log(f"[{done}/{steps}] {spec.name} ...", quiet)
        start = time.perf_counter()
        report.attributions[spec.name] = run(spec.name, model, prompt, target, corrupted=corrupted if spec.input == "pair" else None,
                                             cache=cache if spec.input == "cache" else None, progress=not quiet,
                                             **({"flow": True} if "flow" in inspect.signature(spec.fn).parameters else {}))
        report.timings[spec.name] = time.perf_counter() - start
    explained = next((a for a in report.attributions.values() if a.target.get("labels")), None)
    if explained is not None:
        label, kind = explained.target["labels"][0], (explained.target.get("logit") or [""])[0]
        report.target_label = f"{label} ({'logit difference' if kind == 'difference' else kind + ' logit'})"
    report.figures = _figures(report.attributions)
    return report


def _figures(results: dict[str, Attribution | Circuit]) -> list[tuple[str, Any]]:
    """The figures the results allow, chosen from what they hold (never from their names): the first
    method's tokens, tokens and heads by method, the first method's neurons and flow, every head-scoring
    method against the exact reference (a method registered with ``reference=True``), and each circuit."""
    figs: list[tuple[str, Any]] = []
    attrs = {name: r for name, r in results.items() if isinstance(r, Attribution)}
    items = list(attrs.items())
    with_tokens = [a for _, a in items if a.tokens is not None]
    with_heads = [a for _, a in items if a.heads is not None or a.head_totals is not None]
    with_neurons = [a for _, a in items if a.neurons is not None]
    if with_tokens:
        figs.append((f"Tokens ({with_tokens[0].method})", plot.tokens(with_tokens[0])))
    if len(with_tokens) > 1:
        figs.append(("Tokens by method", plot.tokens_by_method(with_tokens)))
    if with_heads:
        figs.append(("Heads", plot.heads(with_heads)))
    if with_neurons:
        first = with_neurons[0]
        figs.append((f"Neurons ({first.method})", plot.neurons_top(first, k=20)))
        figs.append((f"Neurons by layer ({first.method}, top per layer)", plot.neurons_overview(first)))
    for name, a in items:
        if a.flow is not None:
            figs.append((f"Information flow ({name})", plot.flow(a)))
    references = [name for name, _ in items if get_method(name).reference]
    others = [a for a in with_heads if a.method not in references]
    for ref in references:
        for a in others:
            figs.append((f"{a.method} vs {ref}", plot.scatter(a, attrs[ref], "heads")))
    if not references and len(others) > 1:
        figs.append((f"{others[0].method} vs {others[1].method}", plot.scatter(others[0], others[1], "heads")))
    for name, c in results.items():
        if isinstance(c, Circuit):
            figs.append((f"Circuit ({name}, strongest edges)", plot.circuit(c)))
    return figs


_CSS = """
body { font-family: -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta td { padding: 2px 12px 2px 0; vertical-align: top; } .meta td:first-child { color: #666; }
.tables { display: flex; flex-wrap: wrap; gap: 1.5em; } .tables div { flex: 0 1 auto; }
table.dataframe { border-collapse: collapse; font-size: 0.85em; } table.dataframe td, table.dataframe th { border: 1px solid #ddd; padding: 2px 6px; }
.pos { color: #b2182b; } .neg { color: #2166ac; } .figure { margin: 1em 0; } code { background: #f4f4f4; padding: 0 3px; }
"""


def _table(attr: Attribution, kind: str, top: int) -> str:
    """The ``top`` units of a kind by absolute score (the sign stays in the score)."""
    df = attr.top(top, kind, sum_positions=kind == "heads", absolute=True)
    cols = ["unit", "token", "score"] if kind == "neurons" and "token" in df else ["unit", "score"]
    return df[cols].to_html(index=False, float_format=lambda v: f"{v:+.4f}", classes="dataframe", border=0)


def _render(report: Report, top: int) -> str:
    from plotly.offline import get_plotlyjs

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>dpa_lens report — {html.escape(report.prompt[:60])}</title>",
        f"<style>{_CSS}</style>",
        f"<script type='text/javascript'>{get_plotlyjs()}</script>",
        "</head><body>",
        "<h1>dpa_lens report</h1>",
        "<table class='meta'>",
        f"<tr><td>model</td><td>{html.escape(report.model_name)}</td></tr>",
        f"<tr><td>prompt</td><td><code>{html.escape(report.prompt)}</code></td></tr>",
    ]
    if report.corrupted:
        parts.append(f"<tr><td>corrupted</td><td><code>{html.escape(report.corrupted)}</code></td></tr>")
    first = next(iter(report.attributions.values()))
    value = float(first.target_value[0]) if first.target_value is not None else float("nan")
    parts += [
        f"<tr><td>prediction</td><td><code>{html.escape(repr(report.predicted))}</code></td></tr>",
        f"<tr><td>explaining</td><td>{html.escape(report.target_label)}</td></tr>",
        f"<tr><td>methods</td><td>{', '.join(f'{html.escape(k)} ({v:.2f}s)' for k, v in report.timings.items())}</td></tr>",
        f"<tr><td>made</td><td>{datetime.datetime.now().isoformat(timespec='seconds')} by dpa_lens</td></tr>",
        "</table>",
        "<p>Red: the unit pushes the explained quantity up; blue: down. DPA scores add up along the "
        "network (content-only DPA is exactly complete); AtP and patching scores estimate the change "
        f"from the corrupted to the clean run. First method's target value: {value:.4f}.</p>",
    ]
    for title, fig in report.figures:
        parts.append(f"<h2>{html.escape(title)}</h2><div class='figure'>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        parts.append("</div>")
    parts.append("<h2>Top units per method</h2>")
    for name, result in report.attributions.items():
        parts.append(f"<h3>{html.escape(name)}</h3><div class='tables'>")
        if isinstance(result, Circuit):
            table = result.top(top)[["writer", "reader", "path", "score"]]
            parts.append("<div><b>edges</b>" + table.to_html(index=False, float_format=lambda v: f"{v:+.4f}", classes="dataframe", border=0)
                         + "</div>")
        for kind in KINDS if isinstance(result, Attribution) else ():
            if result.has(kind):
                parts.append(f"<div><b>{kind}</b>{_table(result, kind, top)}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)

