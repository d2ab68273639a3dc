"""Faithfulness of every method on a bundled model (SmolLM2-135M by default), on the authors' benchmarks.

    python -m bench.faithfulness            # ~31 min on 2 CPU cores
    python -m bench.faithfulness --quick    # a few prompts, for CI
    python -m bench.faithfulness --methods depass unpack --update   # add or redo some methods' rows
    python -m bench.faithfulness --sections heads agreement --update   # add or redo some sections
    python -m bench.faithfulness --model gemma3-270m --known 30 --ioi 12   # the second model

1. Token level on Known 1000 and on IOI (the prompts the model answers correctly: top-1 with
   p > 0.1): disruption and recovery curves with token embeddings zeroed, fractions 0.1 … 1.0,
   AUC on a linear axis (the authors' protocol). Target and metric: the answer token.
2. Component level on IOI: heads × positions and neurons × positions ranked together and zeroed,
   fractions on the authors' log grid from 4e-8 to 0.45, AUC on a linear axis (theirs) and on a
   log axis (where the curves live). DPA is also scored on the authors' exact component units,
   attention probabilities and neurons (only DPA has per-key head scores to rank them).
3. Heads × positions alone on IOI, the same way: every method with per-position head scores,
   DePass and Unpack included (DePass's neurons × positions cost one run of the rest of the
   network per layer with positions × d_mlp parts, hours per prompt on a CPU: it is not in 2.).
4. Agreement with exact patching of whole heads on IOI (target: the IO − S logit difference):
   Pearson, Spearman and top-10 overlap of heads summed over positions (DePass: its head level).
5. ``bos`` (models that prepend a BOS): 1. again with the BOS never ranked or ablated
   (``keep_bos=True``), the answer's probability with the BOS embedding alone zeroed, and where
   each method ranks the BOS among the prompt's tokens.

Methods that do not support the model (Unpack on Gemma 3) are listed as such in the results.
Writes bench/results/faithfulness_{smollm2,gemma3}.md and .json (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import dpa_lens
from bench.common import MODELS, correct_subset, first_token, write_results
from dpa_lens.datasets import ioi_benchmark, known_1000
from dpa_lens.evaluation import COMPONENT_FRACTIONS, TOKEN_FRACTIONS, Curves, agreement, faithfulness_curves
from dpa_lens.inputs import leading_bos

RESULTS = Path(__file__).parent / "results"
# every registered approximation (exact patching is the reference of the agreement table)
METHODS = tuple(m for m in dpa_lens.available_methods(returns="units") if not dpa_lens.get_method(m).reference)
# each method's options here: DPA's per-key head scores rank the authors' attention-entry units
OPTIONS = {"dpa": {"head_keys": True}, "integrated_gradients": {"warn_gap": float("inf")}}
# methods whose head scores come from another call than their token scores: heads × positions, heads
HEAD_OPTIONS = {"depass": {"level": "heads", "by_position": True}}
AGREEMENT_OPTIONS = {"depass": {"level": "heads"}}
SECTIONS = ("tokens", "components", "heads", "agreement", "bos")
# the fraction grids of the curves: tokens, and every other unit (--quick: a few points of each, the code paths in seconds)
GRIDS = {"tokens": TOKEN_FRACTIONS, "units": COMPONENT_FRACTIONS}


def curve_of(model, prompt: str, attr: dpa_lens.Attribution, unit: str, **options) -> Curves:
    """`faithfulness_curves` on this benchmark's grid for the unit."""
    return faithfulness_curves(model, prompt, attr, unit=unit, fractions=GRIDS["tokens" if unit == "tokens" else "units"], **options)


def unpaired(methods) -> list[str]:
    """The methods that need no corrupted prompt (Known 1000 has none)."""
    return [m for m in methods if dpa_lens.get_method(m).input != "pair"]


def head_methods(methods) -> list[str]:
    """The methods that score heads (per position, or whole heads with `HEAD_OPTIONS`)."""
    return [m for m in methods if "heads" in dpa_lens.get_method(m).scores or m in HEAD_OPTIONS]


def component_methods(methods) -> list[str]:
    """The methods that score heads and neurons per position (the component benchmark's units)."""
    return [m for m in methods if {"heads", "neurons"} <= set(dpa_lens.get_method(m).scores)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


UNSUPPORTED: dict[str, str] = {}  # method -> why it does not run on this benchmark's model


def attributions(model, prompt: str, target, corrupted: str | None, methods, options=None) -> dict[str, dpa_lens.Attribution]:
    """Each method's attribution of one prompt (``options``: per-method options that replace `OPTIONS`)."""
    options = {**OPTIONS, **(options or {})}
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt)
    out = {}
    for m in methods:
        if m in UNSUPPORTED:
            continue
        try:
            spec = dpa_lens.get_method(m)
            out[m] = dpa_lens.run(m, model, prompt, target, corrupted=corrupted if spec.input == "pair" else None,
                                  cache=cache if spec.uses_cache else None, progress=False, **options.get(m, {}))
        except dpa_lens.UnsupportedModelError as e:
            UNSUPPORTED[m] = str(e).split(". ")[0]
            log(f"{m} does not support this model: {UNSUPPORTED[m]}")
    return out


def agreement_with_patching(model, item, methods=METHODS) -> dict[str, dict[str, float]]:
    """Each component method against exact patching of whole heads, on the IO − S logit difference
    (empty when both names start with the same token: that difference is 0 whatever the model does)."""
    answer, subject = first_token(model, item.correct), first_token(model, item.incorrect)
    if answer == subject:
        return {}
    if not head_methods(methods):
        return {}
    pair = attributions(model, item.prompt, (answer, subject), item.corrupted, head_methods(methods), AGREEMENT_OPTIONS)
    exact = dpa_lens.run("activation_patching", model, item.prompt, (answer, subject), corrupted=item.corrupted, progress=False)
    return {name: agreement(a, exact, "heads", k=10) for name, a in pair.items()}


def bos_facts(model, prompt: str, answer: int, attrs: dict[str, dpa_lens.Attribution]) -> dict | None:
    """p(answer) with the BOS embedding alone zeroed (relative to clean), and each method's rank of
    the BOS among the prompt's tokens (0: first, 1: last); None without a leading BOS."""
    tokens = model.to_tokens(prompt)
    if not bool(leading_bos(model, tokens, torch.ones_like(tokens, dtype=torch.bool))[0, 0]):
        return None

    def zero_bos(x, hook):
        x = x.clone()
        x[:, 0] = 0
        return x

    with torch.no_grad():
        clean = model(tokens)[0, -1].float().softmax(-1)[answer]
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", zero_bos)])[0, -1].float().softmax(-1)[answer]
    ranks = {}
    for name, a in attrs.items():
        t = a.scores("tokens")[0, : int(a.positions[0]) + 1].float()
        ranks[name] = float((t > t[0]).sum()) / max(1, len(t) - 1)
    return {"p_ratio_bos_zeroed": float(zeroed / clean), "bos_rank": ranks}


def bos_section(model, prompt: str, answer: int, attrs: dict, curves: dict[str, list[Curves]], rows: list[dict]) -> None:
    """Section 5 for one prompt: token curves with the BOS kept, and `bos_facts` (nothing without a BOS)."""
    facts = bos_facts(model, prompt, answer, attrs)
    if facts is None:
        return
    rows.append(facts)
    for name, a in attrs.items():
        curves.setdefault(name, []).append(curve_of(model, prompt, a, "tokens", keep_bos=True))


def table(rows: dict[str, dict[str, float]], columns: list[str], sort_by: str | None = None,
          formats: dict[str, str] | None = None, headers: dict[str, str] | None = None) -> list[str]:
    """A markdown table of ``rows`` (method -> column -> value), best ``sort_by`` (default: last column) first."""
    key, formats = sort_by or columns[-1], formats or {}
    lines = ["| method | " + " | ".join((headers or {}).get(c, c) for c in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in sorted(rows.items(), key=lambda kv: -kv[1].get(key, float("-inf"))):
        lines.append(f"| {name} | " + " | ".join(format(values[c], formats.get(c, ".1f")) if c in values else "" for c in columns) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m", help="the bundled model (default smollm2-135m)")
    parser.add_argument("--quick", action="store_true", help="a few prompts (CI)")
    parser.add_argument("--known", type=int, default=None, help="Known 1000 prompts (default 60, quick 2)")
    parser.add_argument("--ioi", type=int, default=None, help="IOI prompts (default 24, quick 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--methods", nargs="+", default=None, help=f"only these methods (default: all of {', '.join(METHODS)})")
    parser.add_argument("--note", default=None, help="a sentence the results print (e.g. what else ran on the machine)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="only these sections (default: all); with --update the others are kept")
    parser.add_argument("--update", action="store_true",
                        help="merge the rows of --methods into the existing results (same prompts; the other rows are kept)")
    args = parser.parse_args()
    methods = tuple(args.methods or METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    slug, label = MODELS[args.model]
    # --quick checks that every section runs, in a few minutes on 2 cores: fewer integration steps, a few points of
    # each fraction grid, and DePass's head level (one forward of the parts per head) left to the full run
    head_ranked = [m for m in methods if not (args.quick and m in HEAD_OPTIONS)]
    if args.quick:
        OPTIONS["integrated_gradients"] = {**OPTIONS.get("integrated_gradients", {}), "steps": 8}
        GRIDS.update(tokens=TOKEN_FRACTIONS[1::4], units=COMPONENT_FRACTIONS[::6])
    stem = args.out / f"faithfulness_{slug}{'_quick' if args.quick else ''}"
    if args.update and not stem.with_suffix(".json").exists():
        parser.error(f"--update needs existing results at {stem.with_suffix('.json')}")
    n_known = args.known if args.known is not None else (2 if args.quick else 60)
    n_ioi = args.ioi if args.ioi is not None else (2 if args.quick else 24)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    started = time.perf_counter()
    model = dpa_lens.load_model(args.model)

    facts = known_1000()
    known_idx = correct_subset(model, [f.prompt for f in facts], [f.answer for f in facts], n_known)
    items = ioi_benchmark()
    aligned = lambda i: model.to_tokens(items[i].prompt).shape == model.to_tokens(items[i].corrupted).shape  # noqa: E731
    ioi_idx = correct_subset(model, [i.prompt for i in items], [i.correct for i in items], n_ioi, usable=aligned)
    log(f"Known 1000: {len(known_idx)} prompts answered correctly; IOI: {len(ioi_idx)}")

    token_curves: dict[str, dict[str, list[Curves]]] = {"known_1000": {}, "ioi": {}}
    bos_curves: dict[str, dict[str, list[Curves]]] = {"known_1000": {}, "ioi": {}}
    bos_rows: dict[str, list[dict]] = {"known_1000": [], "ioi": []}
    comp_curves: dict[str, list[Curves]] = {}
    head_curves: dict[str, list[Curves]] = {}
    agree: dict[str, list[dict[str, float]]] = {}
    gaps, ig_settings = [], {}

    sections = set(args.sections)
    for i, k in enumerate(known_idx if sections & {"tokens", "bos"} else []):
        fact = facts[k]
        log(f"[Known {i + 1}/{len(known_idx)}] {fact.prompt!r} -> {fact.answer!r}")
        attrs = attributions(model, fact.prompt, first_token(model, fact.answer), None, unpaired(methods))
        if "integrated_gradients" in attrs:
            gaps += attrs["integrated_gradients"].diagnostics.completeness_gap.tolist()
            ig_settings = attrs["integrated_gradients"].settings
        for name, a in attrs.items():
            if "tokens" in sections:
                token_curves["known_1000"].setdefault(name, []).append(curve_of(model, fact.prompt, a, "tokens"))
        if "bos" in sections:
            bos_section(model, fact.prompt, first_token(model, fact.answer), attrs, bos_curves["known_1000"], bos_rows["known_1000"])

    for i, k in enumerate(ioi_idx):
        item = items[k]
        log(f"[IOI {i + 1}/{len(ioi_idx)}] {item.prompt!r} -> {item.correct!r}")
        answer = first_token(model, item.correct)
        attrs = attributions(model, item.prompt, answer, item.corrupted, methods) if sections & {"tokens", "components", "bos"} else {}
        if "integrated_gradients" in attrs:
            gaps += attrs["integrated_gradients"].diagnostics.completeness_gap.tolist()
            ig_settings = attrs["integrated_gradients"].settings
        for name, a in attrs.items():
            if "tokens" in sections:
                token_curves["ioi"].setdefault(name, []).append(curve_of(model, item.prompt, a, "tokens"))
            if "components" in sections and name in component_methods(methods):
                comp_curves.setdefault(name, []).append(curve_of(model, item.prompt, a, "components"))
        if "bos" in sections:
            bos_section(model, item.prompt, answer, attrs, bos_curves["ioi"], bos_rows["ioi"])
        if "dpa" in attrs and "components" in sections:
            comp_curves.setdefault("dpa (attention entries + neurons)", []).append(
                curve_of(model, item.prompt, attrs["dpa"], "attention+neurons"))
        if "heads" in sections:
            again = [m for m in head_methods(head_ranked) if m not in attrs or m in HEAD_OPTIONS]
            by_head = {**attrs, **attributions(model, item.prompt, answer, item.corrupted, again, HEAD_OPTIONS)}
            for name in head_methods(head_ranked):
                if name in by_head:
                    head_curves.setdefault(name, []).append(curve_of(model, item.prompt, by_head[name], "heads"))
        if "agreement" in sections:
            for name, row in agreement_with_patching(model, item, head_ranked).items():
                agree.setdefault(name, []).append(row)

    argv = sys.argv[1:]
    if "--note" in argv:  # the command that reproduces the numbers; the note is printed apart
        del argv[argv.index("--note"):argv.index("--note") + 2]
    command = " ".join(["python -m bench.faithfulness"] + argv)
    results = {"settings": {"model": f"{label} (bundled GGUF, float32)", "quick": args.quick, "command": command, "note": args.note,
                            "known_1000_prompts": len(known_idx), "ioi_prompts": len(ioi_idx),
                            "filter": "answer's first token is the top-1 prediction with p > 0.1 (IOI: and the corrupted "
                                      "partner has as many tokens)",
                            "target": "the answer's first token (its raw logit); the metric is its probability",
                            "token_fractions": list(GRIDS["tokens"]), "component_fractions": list(GRIDS["units"]),
                            "ablation": "zero", "dpa_mu": dpa_lens.Mu.paper_default().as_dict(),
                            "integrated_gradients": ", ".join(f"{k} {v}" for k, v in ig_settings.items() if k != "completeness_gap"),
                            "seconds": None, "unsupported": dict(UNSUPPORTED)},
               "tokens": {"known_1000": {}, "ioi": {}}, "components": {}, "heads": {}, "agreement": {}, "bos": {}}
    for task, per_method in token_curves.items():
        results["tokens"][task] = {m: Curves.concat(c).auc("linear") for m, c in per_method.items()}
    for section, curves in (("components", comp_curves), ("heads", head_curves)):
        for m, c in curves.items():
            joined = Curves.concat(c)
            results[section][m] = {**{f"{k} (linear)": v for k, v in joined.auc("linear").items()},
                                   **{f"{k} (log)": v for k, v in joined.auc("log").items()}}
    for task, rows in bos_rows.items():
        if rows:  # the prompts with a leading BOS
            ratios = torch.tensor([r["p_ratio_bos_zeroed"] for r in rows])
            results["bos"][task] = {"prompts": len(rows), "p_ratio_bos_zeroed_median": float(ratios.median()),
                                    "p_ratio_bos_zeroed_below_0.1": int((ratios < 0.1).sum()),
                                    "methods": {m: {**Curves.concat(c).auc("linear"),
                                                    "bos_rank": sum(r["bos_rank"][m] for r in rows if m in r["bos_rank"])
                                                    / sum(m in r["bos_rank"] for r in rows)}
                                                for m, c in bos_curves[task].items()}}
    for m, rows in agree.items():
        results["agreement"][m] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    seconds = round(time.perf_counter() - started)
    if args.update:  # the other methods' rows and the settings they were measured with stay
        import json

        old = json.loads(stem.with_suffix(".json").read_text())
        same = ("known_1000_prompts", "ioi_prompts", "token_fractions", "component_fractions", "ablation")
        if any(old["settings"][k] != results["settings"][k] for k in same):
            sys.exit("--update: the existing results were measured on other prompts or settings; run without --update")
        for section in sections:
            target = old.setdefault(section, {})
            if section == "bos":  # per task, whole: its prompt-level facts belong to the methods run with it
                target.update(results["bos"])
                continue
            for task in (("known_1000", "ioi") if section == "tokens" else (None,)):
                dest, new = (target[task], results[section][task]) if task else (target, results[section])
                for m in [m for m in dest if m in methods or m.startswith(tuple(f"{x} (" for x in methods))]:
                    del dest[m]
                dest.update(new)
        old["settings"].setdefault("updates", []).append({"methods": list(methods), "sections": sorted(sections), "seconds": seconds})
        old["settings"].setdefault("unsupported", {}).update(UNSUPPORTED)
        results = old
    else:
        results["settings"]["agreement_prompts"] = len(agree.get("dpa", []))
        if gaps:
            gap = torch.tensor(gaps).abs()
            results["settings"]["integrated_gradients_gap"] = {"median": float(gap.median()), "mean": float(gap.mean()),
                                                               "max": float(gap.max())}
        results["settings"]["seconds"] = seconds

    write_results(stem, results, markdown)


def update_line(u: dict) -> str:
    """How an ``--update`` added rows: its methods (all when none are named) and sections."""
    every = set(u["methods"]) >= set(METHODS)
    sections = u.get("sections", list(SECTIONS))
    what = (f"the {', '.join(sections)} section{'s' * (len(sections) > 1)}" if every
            else f"rows of {', '.join(u['methods'])}")
    flags = ("" if every else f" --methods {' '.join(u['methods'])}") + (
        f" --sections {' '.join(sections)}" if len(sections) < len(SECTIONS) else "")
    return f"; {what} by `{(flags + ' --update').strip()}` in {u['seconds'] / 60:.0f} min"


def markdown(r: dict) -> str:
    s = r["settings"]
    model, gap = s["model"].split(" (")[0], s.get("integrated_gradients_gap")
    command = s.get("command", "python -m bench.faithfulness" + (" --quick" if s["quick"] else ""))
    lines = [
        f"# Faithfulness of attribution methods on {model}",
        "",
        f"{s['known_1000_prompts']} Known 1000 prompts and {s['ioi_prompts']} IOI prompts of the authors' benchmarks that the "
        f"model answers correctly ({s['filter']}). Ablation: {s['ablation']}. DPA with the paper's default mu"
        + (f"; integrated gradients with {s['integrated_gradients']} (completeness gap: median {gap['median']:.0%}, max {gap['max']:.0%})"
           if gap else "") + ". AUCs are ×100 and divided by the width of the fraction axis: "
        "100 means p(answer) stayed at its clean value (above 100: the kept units alone raise it). "
        "Disruption: lower is better; recovery and total: higher is better. "
        f"Produced by `{command}` in {s['seconds'] / 60:.0f} min"
        + "".join(update_line(u) for u in s.get("updates", [])) + ".",
        "",
    ]
    if s.get("note"):
        lines += [s["note"], ""]
    for m, why in s.get("unsupported", {}).items():
        lines += [f"Not run: {m}. {why}.", ""]
    for task, title in (("known_1000", "Known 1000"), ("ioi", "IOI")):
        lines += [f"## Tokens: {title}", ""] + table(r["tokens"][task], ["disruption", "recovery", "total"]) + [""]
    lines += ["## Components: IOI (heads × positions and neurons × positions)", "",
              "The authors integrate on a linear axis, where the curves' first points weigh nothing (the grid is "
              "logarithmic); the log-axis AUC weighs every decade of the grid equally.", ""]
    lines += table(r["components"], ["disruption (linear)", "recovery (linear)", "total (linear)",
                                     "disruption (log)", "recovery (log)", "total (log)"])
    if r.get("heads"):
        lines += ["", "## Heads × positions alone: IOI", "",
                  "Every method with head scores per position, ranking heads × positions only (neurons are not ablated). "
                  "DePass's are its head level with one part per head and position (`level=\"heads\", by_position=True`).", ""]
        lines += table(r["heads"], ["disruption (linear)", "recovery (linear)", "total (linear)",
                                    "disruption (log)", "recovery (log)", "total (log)"])
    for task, title in (("known_1000", "Known 1000"), ("ioi", "IOI")):
        b = r.get("bos", {}).get(task)
        if not b:
            continue
        lines += ["", f"## Tokens with the BOS kept: {title}", "",
                  f"The same curves with the leading BOS never ranked or ablated (`keep_bos=True`), on the {b['prompts']} "
                  f"prompts that have one. Zeroing the BOS embedding alone leaves p(answer) at {b['p_ratio_bos_zeroed_median']:.3f} "
                  f"of its clean value at the median (below 0.1 on {b['p_ratio_bos_zeroed_below_0.1']} of {b['prompts']} prompts). "
                  "BOS rank: where the method ranks the BOS among the prompt's tokens under the authors' protocol (the tokens sections above), "
                  "0 first, 1 last (mean over prompts).", ""]
        lines += table(b["methods"], ["disruption", "recovery", "total", "bos_rank"], sort_by="total",
                       formats={"bos_rank": ".2f"}, headers={"bos_rank": "BOS rank"})
    lines += ["", "## Agreement with exact patching of whole heads: IOI, logit difference", "",
              f"Mean over the {s['agreement_prompts']} IOI prompts whose two names start with different tokens "
              "(the logit difference of the others is 0 whatever the model does).", "",
              "| method | Pearson r | Spearman ρ | top-10 overlap |", "|---|---:|---:|---:|"]
    for m, v in sorted(r["agreement"].items(), key=lambda kv: -kv[1]["pearson"]):
        lines.append(f"| {m} | {v['pearson']:.3f} | {v['spearman']:.3f} | {v['top10_overlap']:.2f} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
