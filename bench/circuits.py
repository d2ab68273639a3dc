"""Circuit edges on SmolLM2-135M: faithfulness (MIB's CPR and CMD), agreement with exact edge patching, and cost.

    python -m bench.circuits            # the full run (see EXPECTED_MINUTES; deterministic but for the timings)
    python -m bench.circuits --quick    # one prompt, a small edge set, 32 tokens: for CI

1. Circuit faithfulness on IOI (the authors' prompts that the model answers correctly, whose corrupted partner
   aligns token by token and whose two names start with different tokens; target: the IO − S logit difference
   of the names' first tokens). Each method's edges of each prompt are ranked by |score|; the top 0.1 % … 100 %
   of the 123,211 edges are kept and the rest ablated (`dpa_lens.evaluation.circuit_faithfulness`), with the
   corrupted prompt's writer outputs (MIB's patching) and with each writer's mean over the prompt's positions.
   CPR (area under the faithfulness curve; higher is better) and CMD (area under |1 − f|; lower is better),
   on MIB's linear fraction axis and on a log axis.
2. Agreement with exact edge patching on IOI: on the union of the top 50 edges by |DPA|, by |contrastive DPA|
   and by |edge AtP| and 50 random existing head → head edges (seeded), Pearson, Spearman and top-10 overlap of
   each method's scores against `dpa_lens.edge_patching`, overall and per reader label (q, k, v, mlp, logit).
3. Cost per prompt of random token ids at 32, 256 and 1024 tokens, each measurement in a fresh process (a
   warm-up, whose peak memory is recorded, then up to 3 timed runs, fewer once they add up to 20 s; none
   after a warm-up over a minute; the minimum is reported): every DPA edge (`dpa_edges`, its cache forward
   included) against node DPA (`dpa`, its cache forward included), edge AtP, and exact edge patching, timed on
   a sample of edges and extrapolated to all of them (labelled as such).

Writes bench/results/circuits_smollm2.md and .json (``_quick`` with --quick).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
import time
import warnings
from pathlib import Path

from bench.common import correct_subset, cost_cell, first_token, machine, random_pair, run_child, short_error, time_calls, write_results

RESULTS = Path(__file__).parent / "results"
EXPECTED_MINUTES = 30  # the full run on 2 quiet CPU cores (faithfulness ~15, agreement ~4, cost ~8)
# label -> (registered edge method, whether it is given the corrupted prompt, its options for the prompt of this index):
# the random baseline is seeded by the prompt
NO_OPTIONS = lambda index: {}  # noqa: E731
METHODS = {"DPA": ("dpa_edges", False, NO_OPTIONS), "contrastive DPA": ("dpa_edges", True, NO_OPTIONS),
           "integrated DPA": ("dpa_edges_ig", True, NO_OPTIONS), "edge AtP": ("edge_atp", True, NO_OPTIONS),
           "EAP-IG (inputs)": ("eap_ig", True, NO_OPTIONS), "random": ("edge_random", True, lambda index: {"seed": index})}
LABELS = ("q", "k", "v", "mlp", "logit")
COST = {"dpa": "node DPA (cache forward + sweep: tokens, heads, neurons)", "dpa_edges": "DPA edges, all (cache forward + sweep)",
        "dpa_edges_ig": "integrated DPA edges, 3 steps (a forward of each prompt; one cache forward + sweep of the 3 runs as a batch)",
        "edge_atp": "edge AtP, all (clean forward, corrupted forward + backward)",
        "eap_ig": "EAP-IG (inputs), 5 steps (clean forward; a forward + backward per batch of runs, `chunk` by default)",
        "eap_ig_activations": "EAP-IG (activations), 5 steps (2 forwards; (1 + 2·30)·5 runs, a forward + backward per batch of runs)",
        "edge_patching": "exact edge patching, per edge (sample)"}
MODELS = {"smollm2-135m": "smollm2", "gemma3-270m": "gemma3"}  # --model -> the results file's stem
MODEL_TITLES = {"smollm2-135m": "SmolLM2-135M-Instruct", "gemma3-270m": "Gemma 3 270M"}
COST_LENGTHS = {"eap_ig_activations": (32,)}  # 305 passes a prompt: at 256 tokens and beyond, hours of a 2-core machine


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- IOI sections
def ioi_prompts(model, n: int) -> list:
    """The first ``n`` usable IOI items: answered correctly (the authors' filter, as bench/faithfulness.py), the
    corrupted partner aligned, the two names' first tokens different (else the logit difference is 0)."""
    from dpa_lens.datasets import ioi_benchmark

    items = ioi_benchmark()

    def usable(i: int) -> bool:
        it = items[i]
        return (model.to_tokens(it.prompt).shape == model.to_tokens(it.corrupted).shape
                and first_token(model, it.correct) != first_token(model, it.incorrect))

    return [items[i] for i in correct_subset(model, [i.prompt for i in items], [i.correct for i in items], n, usable=usable)]


def edge_circuits(model, item, index: int) -> tuple[tuple[int, int], dict]:
    """The target and each method's circuit for one IOI item (the random baseline seeded by the item's index)."""
    import dpa_lens

    target = (first_token(model, item.correct), first_token(model, item.incorrect))
    out = {}
    for label, (name, contrast, options) in METHODS.items():
        out[label] = dpa_lens.run(name, model, item.prompt, target, corrupted=item.corrupted if contrast else None, progress=False,
                                  **options(index))
    return target, out


def agreement_edges(circuits: dict, top: int, n_random: int, seed: int) -> list[tuple[str, str, str]]:
    """Top ``top`` edges by |score| of DPA, contrastive DPA and edge AtP, and ``n_random`` random head → head edges."""
    import torch

    first = circuits["DPA"]
    chosen: dict[tuple[int, int], None] = {}
    for name in ("DPA", "contrastive DPA", "edge AtP"):
        flat = circuits[name].scores[0].abs().masked_fill(~first.in_graph, -1.0).flatten()
        chosen.update(dict.fromkeys(divmod(int(i), len(first.readers)) for i in flat.argsort(descending=True, stable=True)[:top]))
    is_head = lambda n: n.startswith("L") and "H" in n  # noqa: E731
    pool = [(w, r) for w, r in torch.nonzero(first.in_graph).tolist()
            if is_head(first.writers[w]) and is_head(first.readers[r][0]) and (w, r) not in chosen]
    gen = torch.Generator().manual_seed(seed)
    chosen.update(dict.fromkeys(pool[i] for i in torch.randperm(len(pool), generator=gen)[:n_random].tolist()))
    return [(first.writers[w], *first.readers[r]) for w, r in chosen]


def agreement_rows(circuits: dict, exact, edges: list) -> dict:
    """Per method: Pearson, Spearman, top-10 overlap over the edge set, and Pearson/Spearman per reader label."""
    import torch

    from dpa_lens.evaluation import correlation

    truth = torch.tensor([exact.edge(*e) for e in edges], dtype=torch.float64)
    labels = [p for _, _, p in edges]
    out = {}
    for name, c in circuits.items():
        x = torch.tensor([c.edge(*e) for e in edges], dtype=torch.float64)
        pearson, spearman = correlation(x, truth)
        top_x, top_y = set(x.abs().argsort(descending=True)[:10].tolist()), set(truth.abs().argsort(descending=True)[:10].tolist())
        row = {"pearson": pearson, "spearman": spearman, "top10_overlap": len(top_x & top_y) / 10, "labels": {}}
        for label in LABELS:
            keep = torch.tensor([lab == label for lab in labels])
            if int(keep.sum()) >= 3:
                p, s = correlation(x[keep], truth[keep])
                row["labels"][label] = {"pearson": p, "spearman": s, "n": int(keep.sum())}
        out[name] = row
    return out


def mean_rows(rows: list[dict]) -> dict:
    """The mean of nested dicts of numbers over prompts (a key missing from some prompts: the mean of those that have it)."""
    out = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [r[key] for r in rows if key in r]
        out[key] = mean_rows(values) if isinstance(values[0], dict) else sum(values) / len(values)
    return out


def ioi_sections(args) -> tuple[dict, dict, dict]:
    import torch

    import dpa_lens
    from dpa_lens.evaluation.circuit_faithfulness import MIB_FRACTIONS, CircuitCurve, circuit_faithfulness

    model = dpa_lens.load_model("smollm2-135m")
    items = ioi_prompts(model, max(args.ioi, args.agree))
    ablations = ("corrupted",) if args.quick else ("corrupted", "mean")
    curves: dict[str, dict[str, list[CircuitCurve]]] = {a: {m: [] for m in METHODS} for a in ablations}
    agree, sizes, prompt_seconds = [], [], []
    for i, item in enumerate(items):
        start = time.perf_counter()
        log(f"[IOI {i + 1}/{len(items)}] {item.prompt!r} -> {item.correct!r}")
        target, circuits = edge_circuits(model, item, i)
        if i < args.ioi:
            for ablation in ablations:
                got = circuit_faithfulness(model, item.prompt, item.corrupted, target, [circuits[m] for m in METHODS],
                                           ablation=ablation, progress=False)
                for m, curve in zip(METHODS, got):
                    curves[ablation][m].append(curve)
        if i < args.agree:
            edges = agreement_edges(circuits, args.top, args.top, seed=i)
            exact = dpa_lens.edge_patching(model, item.prompt, item.corrupted, target, edges=edges, batch_size=16, progress=False)
            agree.append(agreement_rows(circuits, exact, edges))
            sizes.append(len(edges))
        prompt_seconds.append(time.perf_counter() - start)
        log(f"      {prompt_seconds[-1]:.0f} s")
    agreement = {"prompts": len(agree), "edges_per_prompt": sum(sizes) / max(1, len(sizes)), "methods": mean_rows(agree)}
    if not args.ioi:  # the agreement section alone (--agree-only)
        return {}, {}, agreement
    faith = {}
    for ablation, per_method in curves.items():
        faith[ablation] = {}
        for m, cs in per_method.items():
            joined = CircuitCurve.concat(cs)
            faith[ablation][m] = {"cpr": joined.cpr(), "cmd": joined.cmd(), "cpr_log": joined.cpr("log"), "cmd_log": joined.cmd("log"),
                                  "curve": joined.curve().tolist(), "empty_minus_full": float((joined.empty - joined.full).mean())}
    first = curves["corrupted"]["DPA"][0]
    grid = {"fractions": list(MIB_FRACTIONS), "n_edges": first.n_edges.tolist(), "n_total": first.n_total,
            "prompts": min(args.ioi, len(items)), "logit_difference_clean": float(torch.cat([c.full for c in curves["corrupted"]["DPA"]]).mean()),
            "logit_difference_corrupted": float(torch.cat([c.empty for c in curves["corrupted"]["DPA"]]).mean()),
            "seconds_per_prompt": sum(prompt_seconds) / len(prompt_seconds)}
    return faith, grid, agreement


# ---------------------------------------------------------------------------------------------- MIB's protocol
# label -> (registered edge method, its options): every one is given the corrupted prompts (the methods that take
# none ignore them); the random baseline is seeded
MIB_METHODS = {"EAP-IG (inputs)": ("eap_ig", {}), "EAP-IG (activations)": ("eap_ig_activations", {}),
               "integrated DPA (1 step)": ("dpa_edges_ig", {"steps": 1}), "integrated DPA (3 steps)": ("dpa_edges_ig", {"steps": 3}),
               "integrated DPA (5 steps)": ("dpa_edges_ig", {"steps": 5}),
               "contrastive DPA": ("dpa_edges", {}), "DPA": ("dpa_edges", {}), "edge AtP": ("edge_atp", {}),
               "random": ("edge_random", {"seed": 0})}


def mib_section(args) -> dict:
    """MIB's protocol: each method's edge scores averaged over a train split of IOI prompts (one circuit), kept at MIB's
    edge-count grid and evaluated on held-out prompts with corrupted ablation; CPR and CMD of the held-out prompts."""

    import dpa_lens
    from dpa_lens.evaluation.circuit_faithfulness import circuit_faithfulness

    model = dpa_lens.load_model(args.model)
    items = ioi_prompts(model, args.mib_train + args.mib_test)
    train, test = items[: args.mib_train], items[args.mib_train :]
    target = lambda its: [(first_token(model, i.correct), first_token(model, i.incorrect)) for i in its]  # noqa: E731
    batches = [train[i : i + args.mib_batch] for i in range(0, len(train), args.mib_batch)]
    circuits, seconds = {}, {}
    for label, (name, options) in MIB_METHODS.items():
        if args.mib_methods and label not in args.mib_methods:
            continue
        start = time.perf_counter()
        contrast = label != "DPA"
        parts = [dpa_lens.run(name, model, [i.prompt for i in b], target(b), corrupted=[i.corrupted for i in b] if contrast else None,
                              progress=False, **options) for b in batches]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the rows are other prompts: only the edges' totals are averaged, as wanted
            circuits[label] = type(parts[0]).concat(parts).mean()
        seconds[label] = (time.perf_counter() - start) / len(train)
        log(f"[MIB] {label}: {seconds[label]:.2f} s per train prompt")
    labels = list(circuits)
    prompts, corrupted, targets = [i.prompt for i in test], [i.corrupted for i in test], target(test)
    curves = {absolute: circuit_faithfulness(model, prompts, corrupted, targets, [circuits[m] for m in labels], ablation="corrupted",
                                             absolute=absolute, progress=False) for absolute in (False, True)}
    out = {}
    for i, label in enumerate(labels):
        signed, by_size = curves[False][i], curves[True][i]
        out[label] = {"cpr": signed.cpr(raw=True), "cmd": by_size.cmd(raw=True), "cpr_abs": by_size.cpr(raw=True),
                      "cmd_signed": signed.cmd(raw=True), "curve_signed": signed.curve().tolist(), "curve_abs": by_size.curve().tolist(),
                      "seconds_per_train_prompt": seconds[label], "method": MIB_METHODS[label][0], "options": MIB_METHODS[label][1]}
    first = curves[True][0]
    return {"train": len(train), "test": len(test), "batch": args.mib_batch, "fractions": first.fractions.tolist(),
            "n_edges": first.n_edges.tolist(), "n_total": first.n_total, "full": float(first.full.mean()),
            "empty": float(first.empty.mean()), "methods": out, "not_run": [label for label in MIB_METHODS if label not in circuits],
            "test_prompts": [i.prompt for i in test][:3], "seconds": None,
            "eap_ig_activations_passes": (1 + 2 * model.cfg.n_layers) * 5}


def merged_mib(earlier: dict | None, new: dict, args) -> dict:
    """With ``--mib-methods``, the new methods' rows added to the committed section (the same splits, the same
    held-out prompts: each method's circuit is evaluated on its own, so the rows are comparable); else ``new``."""
    same = ("train", "test", "batch", "test_prompts", "n_total", "fractions")
    if not args.mib_methods or earlier is None or any(earlier.get(k) != new[k] for k in same):
        return new
    methods = {**earlier["methods"], **new["methods"]}
    return {**earlier, "methods": methods, "not_run": [m for m in MIB_METHODS if m not in methods],
            "seconds": earlier["seconds"] + new["seconds"], "eap_ig_activations_passes": new["eap_ig_activations_passes"]}


# ---------------------------------------------------------------------------------------------- cost
# what each cost row runs: its options, beside the sample of edges exact patching is timed on; a DPA row computes no
# flow, as a user's DPA call does not by default, and includes the cache forward a user runs for it
COST_OPTIONS = {"dpa": {"flow": False}, "edge_patching": {"batch_size": 16}}


def integrated_steps() -> int:
    """The default ``steps`` of integrated DPA edges (what its cost rows measure)."""
    from dpa_lens.methods.dpa.integrated import DEFAULT_STEPS

    return DEFAULT_STEPS


def cost_one(measurement: str, length: int, sample: int, repeats: int) -> dict:
    """One cost measurement in this (fresh) process."""
    import torch

    import dpa_lens
    from dpa_lens.graph import Graph
    from dpa_lens.models.view import ModelView

    model = dpa_lens.load_model("smollm2-135m")
    clean, corrupted = random_pair(model, length)
    target = (model.to_single_token(" Mary"), model.to_single_token(" John"))
    g = Graph.of(ModelView(model))
    writers, readers, exists = g.writers, g.readers, g.mask
    patched = torch.nonzero(exists[:, :-1]).tolist()  # edges that take a forward (logit edges are free)
    gen = torch.Generator().manual_seed(length)
    edges = [(writers[w], *readers[r]) for w, r in (patched[i] for i in torch.randperm(len(patched), generator=gen)[:sample].tolist())]
    names = dpa_lens.dpa_names_filter(model, patterns=False)
    spec = dpa_lens.get_method(measurement)
    options = {**COST_OPTIONS.get(measurement, {}), **({"edges": edges} if "edges" in inspect.signature(spec.fn).parameters else {})}

    def once():
        with torch.no_grad() if spec.input == "cache" else contextlib.nullcontext():
            cache = model.run_with_cache(clean, names_filter=names)[1] if spec.input == "cache" else None
            dpa_lens.run(measurement, model, clean, target, corrupted=corrupted if spec.input == "pair" else None, cache=cache,
                         progress=False, **options)

    times, peak = time_calls(once, "cpu", repeats)
    row = {"measurement": measurement, "length": length, "seconds": min(times), "peak_bytes": peak}
    if measurement.startswith("eap_ig"):  # several runs of the path in one pass (`chunk`), since that was added
        row["batched_runs"] = True
    if "edges" in options:  # timed on a sample of the edges: extrapolated to all of them
        row.update(sample=len(edges), edges=len(patched) + int(exists[:, -1].sum()), patched_edges=len(patched),
                   seconds_per_edge=row["seconds"] / len(edges), extrapolated_seconds=row["seconds"] / len(edges) * len(patched))
    return row


def cost_section(args) -> list[dict]:
    lengths = (32,) if args.quick else (32, 256, 1024)
    rows = []
    jobs = [(m, n) for n in lengths for m in COST if (not args.measurements or m in args.measurements) and n in COST_LENGTHS.get(m, (n,))
            and not (args.quick and m == "eap_ig_activations")]
    for i, (m, n) in enumerate(jobs, 1):
        sample = 8 if args.quick else (16 if n >= 1024 else 32)
        log(f"[cost {i}/{len(jobs)}] {m} at {n} tokens ...")
        row = run_child("bench.circuits", [m, str(n), str(sample), "--repeats", str(args.repeats)])
        row.update({"measurement": m, "length": n})
        rows.append(row)
        log(f"      {row['seconds']:.3g} s, {row['peak_bytes'] / 2**20:,.0f} MiB" if "error" not in row
            else f"      failed: {short_error(row['error'])}")
    return rows


# ---------------------------------------------------------------------------------------------- markdown
def mib_markdown(m: dict, per_prompt_section: bool = True) -> list[str]:
    lines = ["## MIB's protocol on IOI: a circuit found on train prompts, evaluated on held-out prompts", "",
             f"Each method's edge scores are averaged over {m['train']} IOI prompts (the train split; {m['batch']} prompts per "
             f"call) into one circuit, whose top ⌊x·N⌋ of the {m['n_total']:,} edges are kept at MIB's grid and evaluated on "
             f"{m['test']} other IOI prompts (held out) with corrupted ablation (MIB's patching; m(M) {m['full']:.2f}, "
             f"m(∅) {m['empty']:.2f}: the held-out prompts' mean IO − S logit difference, clean and corrupted). "
             + ("Prompts as in the per-prompt section below (the train split is its first prompts). " if per_prompt_section else
                "Prompts: the authors' IOI benchmark items that the model answers correctly (top-1 with p > 0.1), whose corrupted "
                "partner tokenizes to the same length and whose two names start with different tokens, in the benchmark's order "
                "(the train split first). ")
             + "As MIB's leaderboard reports them: **CPR** from "
             "the edges ranked by signed score, highest first, **CMD** from the edges ranked by |score|, both MIB's raw areas "
             "(trapezoids on the linear fraction axis, not divided by its width 0.999). Cost: see the cost section"
             + ("" if per_prompt_section else " of bench/results/circuits_smollm2.md (SmolLM2)")
             + f" (this section's wall times are not measurements: other work shared the 2 cores). The section took {m['seconds'] / 60:.0f} min.",
             "", "| method | CPR (signed ranking) | CMD (\\|score\\| ranking) | CPR (\\|score\\|) | CMD (signed) |",
             "|---|---:|---:|---:|---:|"]
    for label, v in sorted(m["methods"].items(), key=lambda kv: -kv[1]["cpr"]):
        lines.append(f"| {label} | {v['cpr']:.3f} | {v['cmd']:.3f} | {v['cpr_abs']:.3f} | {v['cmd_signed']:.3f} |")
    if m.get("not_run"):
        lines += ["", "Not run in this section: " + ", ".join(m["not_run"]) + "." + (
            f" EAP-IG-activations takes {m.get('eap_ig_activations_passes', 305)} forward and backward passes a prompt (1 + 2 per "
            "layer, 5 steps each)" + ("" if "eap_ig_activations_passes" in m else ": one batch of 4 train prompts ran over 40 minutes "
                                      "here (other work shared the 2 cores) and was stopped") + "; its cost per prompt of SmolLM2 is in "
            "the cost section of bench/results/circuits_smollm2.md." if "EAP-IG (activations)" in m["not_run"] else "")]
    header = "| method | " + " | ".join(f"{100 * x:g} % ({n:,})" for x, n in zip(m["fractions"], m["n_edges"])) + " |"
    for key, title in (("curve_signed", "signed ranking"), ("curve_abs", "|score| ranking")):
        lines += ["", f"Faithfulness f on the held-out prompts at each fraction of edges kept ({title}):", "", header,
                  "|---|" + "---:|" * len(m["fractions"])]
        lines += [f"| {label} | " + " | ".join(f"{y:.2f}" for y in v[key]) + " |" for label, v in m["methods"].items()]
    return lines + [""]


def mib_only_markdown(r: dict) -> str:
    """The results of a model whose only section is MIB's protocol (``--model gemma3-270m --mib-only``)."""
    s, m = r["settings"], r["mib"]
    lines = [f"# Circuit edges on {s['model']}: MIB's protocol on IOI", "",
             f"Produced by `python -m bench.circuits --model {s['model_name']} --mib-only` in {m['seconds'] / 60:.0f} min on "
             f"{s['machine']['cpu_count']} CPU cores (torch {s['machine']['torch']}, TransformerLens {s['machine']['transformer_lens']}). "
             f"Graph: {m['n_total']:,} edges (writers: embeddings, heads, MLPs; readers: each head's q, k, v, each MLP, the logit). "
             "On a model with output norms (Gemma) a head's output is taken after its norm, with the scale of each run frozen "
             "(`dpa_lens.graph`), where the reference implementation of EAP-IG differences the outputs before the norm.", ""]
    return "\n".join(lines + mib_markdown(m, per_prompt_section=False))


def markdown(r: dict) -> str:
    s, g = r["settings"], r["grid"]
    quick = " --quick" if s["quick"] else ""
    lines = [
        "# Circuit edges on SmolLM2-135M: faithfulness, agreement with exact edge patching, cost",
        "",
        f"Produced by `python -m bench.circuits{quick}` in {s['seconds'] / 60:.0f} min on {s['machine']['cpu_count']} CPU cores "
        f"(torch {s['machine']['torch']}, TransformerLens {s['machine']['transformer_lens']}). Graph: {g['n_total']:,} edges "
        "(writers: embeddings, 270 heads, 30 MLPs; readers: each head's q, k, v, each MLP, the logit).",
        "",
    ]
    lines += mib_markdown(r["mib"]) if "mib" in r else []
    lines += [
        "## Circuit faithfulness on IOI, per prompt (MIB's CPR and CMD)",
        "",
        f"{g['prompts']} IOI prompts of the authors' benchmark that the model answers correctly (top-1 with p > 0.1), whose "
        "corrupted partner (the subject's second mention swapped for the indirect object) tokenizes to the same length and "
        "whose two names start with different tokens. Target m: the IO − S logit difference of the names' first tokens "
        f"(mean {g['logit_difference_clean']:.2f} clean, {g['logit_difference_corrupted']:.2f} corrupted). Each method's edges of "
        "each prompt are ranked by |score|; the top ⌊x·N⌋ are kept and every other edge is ablated: its reader reads the "
        "writer's ablated output instead of its output in the current forward. f = (m(C) − m(∅)) / (m(M) − m(∅)) of the "
        "prompts' means (MIB). CPR: area under f (higher is better); CMD: area under |1 − f| (lower is better); trapezoids over "
        "the fraction grid divided by its width. Linear axis: MIB's (its `evaluate_area_under_curve` default), where the "
        "points at or below 10 % span a tenth of the width; log axis: each decade of the grid weighs the same."
        + (f" This section was re-run alone (`--faith-only`, {s['faithfulness_seconds'] / 60:.0f} min), with integrated DPA and "
           "EAP-IG added." if "faithfulness_seconds" in s else ""),
        "",
    ]
    titles = (("corrupted", "corrupted ablation (MIB's patching)"),
              ("mean", "mean ablation (each writer's mean over the prompt's positions)"))
    for ablation, title in titles:
        if ablation not in r["faithfulness"]:
            continue
        rows = r["faithfulness"][ablation]
        lines += [f"### {title[0].upper() + title[1:]}", "", "| method | CPR (linear) | CMD (linear) | CPR (log) | CMD (log) |",
                  "|---|---:|---:|---:|---:|"]
        for m, v in sorted(rows.items(), key=lambda kv: -kv[1]["cpr"]):
            lines.append(f"| {m} | {v['cpr']:.3f} | {v['cmd']:.3f} | {v['cpr_log']:.3f} | {v['cmd_log']:.3f} |")
        lines += ["", "Faithfulness f at each fraction of edges kept:", "",
                  "| method | " + " | ".join(f"{100 * x:g} % ({n:,})" for x, n in zip(g["fractions"], g["n_edges"])) + " |",
                  "|---|" + "---:|" * len(g["fractions"])]
        for m, v in rows.items():
            lines.append(f"| {m} | " + " | ".join(f"{y:.2f}" for y in v["curve"]) + " |")
        lines.append("")
    a = r["agreement"]
    lines += ["## Agreement with exact edge patching on IOI", "",
              f"Mean over {a['prompts']} IOI prompt(s) (the first of the section above) of each method's agreement with "
              f"`edge_patching` (f(corrupted with the edge patched) − f(corrupted)) on {a['edges_per_prompt']:.0f} edges per prompt: "
              f"the top {s['agreement_top']} by |DPA|, by |contrastive DPA| and by |edge AtP|, and {s['agreement_top']} random "
              "head → head edges. DPA explains the clean logit difference, not the patch: the other methods (contrastive and "
              "integrated DPA, edge AtP, EAP-IG) estimate the same quantity as patching."
              + (f" This section was re-run alone (`--agree-only`, {s['agreement_seconds'] / 60:.0f} min), with integrated DPA and "
                 "EAP-IG added." if "agreement_seconds" in s else ""), "",
              "| method | Pearson r | Spearman ρ | top-10 overlap |", "|---|---:|---:|---:|"]
    methods = a["methods"]
    for m, v in sorted(methods.items(), key=lambda kv: -kv[1]["pearson"]):
        lines.append(f"| {m} | {v['pearson']:.3f} | {v['spearman']:.3f} | {v['top10_overlap']:.2f} |")
    counts = {lab: next((v["labels"][lab]["n"] for v in methods.values() if lab in v["labels"]), 0) for lab in LABELS}
    present = [lab for lab in LABELS if counts[lab]]
    lines += ["", "Per reader label, Pearson r / Spearman ρ (mean edges per prompt in brackets):", "",
              "| method | " + " | ".join(f"{lab} ({counts[lab]:.0f})" for lab in present) + " |", "|---|" + "---:|" * len(present)]
    for m, v in methods.items():
        cells = [f"{v['labels'][lab]['pearson']:.2f} / {v['labels'][lab]['spearman']:.2f}" if lab in v["labels"] else "—" for lab in present]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    rows = r["cost"]
    get = lambda m, n: next((x for x in rows if x["measurement"] == m and x["length"] == n and "error" not in x), None)  # noqa: E731
    lengths = sorted({x["length"] for x in rows})
    lines += ["", "## Cost per prompt (random token ids)", "",
              "Each measurement in a fresh process: a warm-up (its peak memory above the loaded model is reported), then up to "
              f"{s['repeats']} timed runs (fewer once they add up to 20 s, none after a warm-up over a minute); the minimum. "
              "Ratios to node DPA at the same length. Exact edge patching is timed on a random sample of edges (its clean and "
              "corrupted forwards included, 16 patched copies per forward) and **extrapolated** to every edge that needs a "
              "forward (the logit edges are free)."
              + (f" Its rows were re-measured alone on a quiet machine (`--cost-only`; the last such run, of the rows it was "
                 f"given, took {s['cost_seconds'] / 60:.0f} min)." if "cost_seconds" in s else ""), "",
              "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
    for m in ("dpa", "dpa_edges", "dpa_edges_ig", "edge_atp", "eap_ig", "eap_ig_activations"):
        if any(get(m, n) for n in lengths):
            lines.append(f"| {COST[m]} | " + " | ".join(cost_cell(get(m, n), get("dpa", n)) for n in lengths) + " |")
    cells = []
    for n in lengths:
        x = get("edge_patching", n)
        cells.append("—" if x is None else f"{x['seconds_per_edge']:.3g} s per edge ({x['sample']} edges in {x['seconds']:.3g} s, "
                                           f"{x['peak_bytes'] / 2**20:,.0f} MiB)")
    lines.append(f"| {COST['edge_patching']} | " + " | ".join(cells) + " |")
    cells = []
    for n in lengths:
        x, base = get("edge_patching", n), get("dpa", n)
        cells.append("—" if x is None else f"**extrapolated**: {x['extrapolated_seconds'] / 3600:,.1f} h for {x['patched_edges']:,} edges"
                     + (f" ({x['extrapolated_seconds'] / base['seconds']:,.0f}×)" if base else ""))
    lines.append("| exact edge patching, all edges | " + " | ".join(cells) + " |")
    n = 256 if 256 in lengths else lengths[-1]
    e, d = get("dpa_edges", n), get("dpa", n)
    if e and d:
        ratio = e["seconds"] / d["seconds"]
        lines += ["", f"DPA edges against node DPA at {n} tokens: **{ratio:.2f}×** the time (goal: at most 3×: "
                  f"{'met' if ratio <= 3 else 'not met'}), {e['peak_bytes'] / max(1, d['peak_bytes']):.2f}× the peak memory."]
    pairs = [(n, get("dpa_edges_ig", n), get("eap_ig", n)) for n in lengths]
    pairs = [(n, i["seconds"] / e["seconds"]) for n, i, e in pairs if i and e]
    if pairs:
        lines += ["", "Integrated DPA edges against EAP-IG (inputs, 5 steps): "
                  + ", ".join(f"**{r:.2f}×** the time at {n} tokens" for n, r in pairs)
                  + f" (goal: at most 0.5×: {'met' if all(r <= 0.5 for _, r in pairs) else 'not met'})."]
    failed = [x for x in rows if "error" in x]
    if failed:
        lines += ["", "Failed measurements:", ""]
        lines += [f"- {x['measurement']} at {x['length']} tokens: {short_error(x['error'])}" for x in failed]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one prompt, a small edge set, 32 tokens (CI)")
    parser.add_argument("--ioi", type=int, default=None, help="IOI prompts for faithfulness (default 8, quick 1)")
    parser.add_argument("--agree", type=int, default=None, help="IOI prompts for agreement (default 3, quick 1)")
    parser.add_argument("--top", type=int, default=None, help="edges per method in the agreement set (default 50, quick 10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cost-only", action="store_true",
                        help="re-measure only the cost section, into the existing results (timings want a quiet machine)")
    parser.add_argument("--measurements", nargs="+", choices=list(COST), default=None,
                        help="with --cost-only: re-measure only these (the other rows are kept)")
    parser.add_argument("--agree-only", action="store_true", help="re-run only the agreement section, into the existing results")
    parser.add_argument("--mib-only", action="store_true", help="run only MIB's protocol section, into the existing results")
    parser.add_argument("--faith-only", action="store_true",
                        help="re-run only the per-prompt faithfulness section, into the existing results")
    parser.add_argument("--mib-train", type=int, default=None, help="IOI prompts whose edge scores are averaged (default 11, quick 2)")
    parser.add_argument("--mib-test", type=int, default=None, help="held-out IOI prompts the circuits are evaluated on (default 12, quick 2)")
    parser.add_argument("--mib-batch", type=int, default=4, help="train prompts per method call")
    parser.add_argument("--mib-methods", nargs="+", choices=list(MIB_METHODS), default=None, help="only these methods in MIB's section")
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m",
                        help="the model of MIB's section (another than SmolLM2 only with --mib-only, into its own results file)")
    parser.add_argument("--child", nargs=3, metavar=("MEASUREMENT", "LENGTH", "SAMPLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.child:
        m, n, sample = args.child
        print(json.dumps(cost_one(m, int(n), int(sample), args.repeats)))
        return
    args.ioi = args.ioi if args.ioi is not None else (1 if args.quick else 8)
    args.agree = args.agree if args.agree is not None else (1 if args.quick else 3)
    args.top = args.top if args.top is not None else (10 if args.quick else 50)
    args.mib_train = args.mib_train if args.mib_train is not None else (2 if args.quick else 11)
    args.mib_test = args.mib_test if args.mib_test is not None else (2 if args.quick else 12)
    if args.quick and args.mib_methods is None:  # EAP-IG-activations alone takes (1 + 2L)·5 passes a prompt
        args.mib_methods = ["EAP-IG (inputs)", "integrated DPA (1 step)", "DPA", "random"]
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    stem = args.out / f"circuits_smollm2{'_quick' if args.quick else ''}"
    if args.agree_only:
        result = json.loads(stem.with_suffix(".json").read_text())
        args.ioi = 0
        _, _, result["agreement"] = ioi_sections(args)
        result["settings"]["agreement_seconds"] = round(time.perf_counter() - started)
        write_results(stem, result, markdown)
        return
    if args.model != "smollm2-135m":
        if not args.mib_only:
            parser.error("--model other than smollm2-135m runs MIB's section only: add --mib-only")
        stem = args.out / f"circuits_{MODELS[args.model]}{'_quick' if args.quick else ''}"
        mib = mib_section(args)
        mib["seconds"] = round(time.perf_counter() - started)
        earlier = json.loads(stem.with_suffix(".json").read_text())["mib"] if stem.with_suffix(".json").exists() else None
        result = {"settings": {"model": f"{MODEL_TITLES[args.model]} (bundled GGUF, float32)", "model_name": args.model,
                               "quick": args.quick, "machine": machine("cpu")}, "mib": merged_mib(earlier, mib, args)}
        write_results(stem, result, mib_only_markdown)
        return
    if args.faith_only:
        result = json.loads(stem.with_suffix(".json").read_text())
        args.agree = 0
        result["faithfulness"], result["grid"], _ = ioi_sections(args)
        result["settings"]["faithfulness_seconds"] = round(time.perf_counter() - started)
        write_results(stem, result, markdown)
        return
    if args.mib_only:
        result = json.loads(stem.with_suffix(".json").read_text())
        mib = mib_section(args)
        mib["seconds"] = round(time.perf_counter() - started)
        result["mib"] = merged_mib(result.get("mib"), mib, args)
        write_results(stem, result, markdown)
        return
    if args.cost_only:
        result = json.loads(stem.with_suffix(".json").read_text())
        new = cost_section(args)
        redone = {(x["measurement"], x["length"]) for x in new}
        result["cost"] = [x for x in result["cost"] if (x["measurement"], x["length"]) not in redone] + new
        result["settings"]["cost_seconds"] = round(time.perf_counter() - started)
        result["settings"]["dpa_edges_ig_steps"] = integrated_steps()
        write_results(stem, result, markdown)
        return
    faith, grid, agree = ioi_sections(args)
    mib_started = time.perf_counter()
    mib = mib_section(args)
    mib["seconds"] = round(time.perf_counter() - mib_started)
    cost = cost_section(args)
    result = {"mib": mib, "settings": {"model": "SmolLM2-135M-Instruct (bundled GGUF, float32)", "quick": args.quick, "agreement_top": args.top,
                           "repeats": args.repeats, "machine": machine("cpu"), "seconds": round(time.perf_counter() - started),
                           "dpa_edges_ig_steps": integrated_steps()},
              "grid": grid, "faithfulness": faith, "agreement": agree, "cost": cost}
    write_results(stem, result, markdown)


if __name__ == "__main__":
    main()
