"""The README's numbers, rendered from the committed result files: ``python -m bench.readme``.

The README holds blocks between ``<!-- generated: NAME -->`` and ``<!-- /generated -->``; this script
rewrites each from its result file, so no number in them is typed by hand.
``python -m bench.readme --check`` fails when the README differs from what the results say
(tests/bench/test_bench.py runs it).

Blocks: ``faithfulness`` (bench/results/faithfulness_smollm2.json, with Gemma 3 270M's columns from
faithfulness_gemma3.json), ``faithfulness-bos`` (their BOS sections), ``speed``, ``speed-summary``, ``speed-checkpoint``,
``speed-answer``, ``speed-fixed`` and ``speed-gemma3``, ``speed-answer-gemma3`` (bench/results/speed_{smollm2,gemma3}.json),
``circuits`` (bench/results/circuits_smollm2.json), ``ioi-heads`` (the agreement section of
bench/results/faithfulness_smollm2.json), ``notebooks`` (bench/results/notebooks.json, written by
``python notebooks/build.py --execute``), ``loading`` (bench/results/loading.json), ``datasets``
(bench/results/datasets_smollm2.json).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from bench.common import find_row as _row

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def faithfulness(r: dict, gemma: dict | None = None) -> str:
    s = r["settings"]
    known, ioi, comp, agree = r["tokens"]["known_1000"], r["tokens"]["ioi"], r["components"], r["agreement"]
    heads = r.get("heads", {})
    methods = sorted(set(known) | set(ioi) | set(comp) | set(heads), key=lambda m: (-known.get(m, ioi.get(m, {})).get("total", -1e9), m))
    f = lambda d, m, k: f"{d[m][k]:.1f}" if m in d else ""  # noqa: E731
    g_known, g_ioi = (gemma["tokens"]["known_1000"], gemma["tokens"]["ioi"]) if gemma else ({}, {})
    g_head = " Gemma 3 270M, tokens: Known 1000 / IOI total |" if gemma else ""

    def g_cell(m: str) -> str:
        if not gemma:
            return ""
        if m not in g_known and m not in g_ioi:
            return "  |"
        return f" {f(g_known, m, 'total') or '—'} / {f(g_ioi, m, 'total') or '—'} |"

    lines = [
        f"Every method on the authors' benchmarks with SmolLM2-135M, on {s['known_1000_prompts']} Known 1000 and "
        f"{s['ioi_prompts']} IOI prompts that the model answers correctly "
        "([`bench/results/faithfulness_smollm2.md`](bench/results/faithfulness_smollm2.md), `python -m bench.faithfulness`, "
        f"{s['seconds'] / 60:.0f} min on {r.get('machine', {}).get('cpu_count', 2)} CPU cores). Totals are recovery AUC minus "
        "disruption AUC (×100; higher is better) with zero ablation. The last column compares head scores with exact "
        f"patching of each head, on the IO − S logit difference ({s['agreement_prompts']} prompts).",
        "",
        "| method | tokens, Known 1000: total | tokens, IOI: total | components, IOI: total (linear / log axis) "
        + ("| heads × positions, IOI: total (linear / log axis) " if heads else "")
        + "| heads vs exact patching: Pearson / Spearman |" + g_head,
        "|---|---:|---:|---:|---:|" + ("---:|" if heads else "") + ("---:|" if gemma else ""),
    ]
    for m in methods:
        c = f"{comp[m]['total (linear)']:.1f} / {comp[m]['total (log)']:.1f}" if m in comp else ""
        h = (f" {heads[m]['total (linear)']:.1f} / {heads[m]['total (log)']:.1f} |" if m in heads else "  |") if heads else ""
        a = f"{agree[m]['pearson']:.2f} / {agree[m]['spearman']:.2f}" if m in agree else ""
        lines.append(f"| {m} | {f(known, m, 'total')} | {f(ioi, m, 'total')} | {c} |{h} {a} |" + g_cell(m))
    gap = s["integrated_gradients_gap"]
    lines += ["", f"Integrated gradients ({s['integrated_gradients'].split(',')[0]}) were complete within "
                  f"{gap['median']:.1%} at the median ({gap['max']:.0%} at worst)."]
    if gemma:
        gs = gemma["settings"]
        lines += ["", f"Gemma 3 270M's column: {gs['known_1000_prompts']} Known 1000 and {gs['ioi_prompts']} IOI prompts "
                      "([`bench/results/faithfulness_gemma3.md`](bench/results/faithfulness_gemma3.md), "
                      f"`{gs['command']}`" + ("" if gs.get("note") else f", {gs['seconds'] / 60:.0f} min") + ")"
                      + "".join(f"; {why}" for why in gs.get("unsupported", {}).values()) + "."]
    return "\n".join(lines) + "\n"


def _lengths(rows: list[dict], section: str) -> list[int]:
    return sorted({x["length"] for x in rows if x.get("section") == section and "error" not in x})


def _secs(x: dict | None, base: float | None = None) -> str:
    if x is None:
        return ""
    return f"{x['seconds']:.3g} s" + (f" ({x['seconds'] / base:.2f}×)" if base else "")


def _floor(rows: list[dict], n: int, option: str = "") -> tuple[float | None, float | None, float | None]:
    """Seconds of the model's forward, forward + backward, and backward (their difference) at ``n`` tokens
    (``option="answer"``: with the logits at the answer position only)."""
    f, fb = _row(rows, "hf_forward", n, option), _row(rows, "hf_forward_backward", n, option)
    return (f and f["seconds"]), (fb and fb["seconds"]), (fb["seconds"] - f["seconds"] if f and fb else None)


def speed(r: dict) -> str:
    rows = r["rows"]
    get = functools.partial(_row, rows)

    def method(m: str, n: int) -> str:
        """A method's seconds, or why a measurement has none: over the time limit, unsupported, out of memory."""
        if (x := get(m, n)) is not None:
            return _secs(x)
        err = next((x["error"] for x in rows if x["measurement"] == m and x["length"] == n and "error" in x), "")
        if limit := re.search(r"stopped after (\d+) s", err):
            return f"> {limit[1]} s"
        return "unsupported" if "UnsupportedModelError" in err else "out of memory" if "out of memory" in err else ""

    lines = ["| tokens | model forward + backward (SDPA) | DPA total (× that) | DPA peak memory | cache forward (× model forward) "
             "| sweep (× model backward) | DPA edges | AtP | DePass | Unpack |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in _lengths(rows, "floor"):
        (f, fb, back), d = _floor(rows, n), get("dpa", n)
        mem = f"{d['peak_bytes'] / 2**20:,.0f} MiB" if d else ""
        lines.append(f"| {n} | {_secs(get('hf_forward_backward', n))} | {_secs(d, fb)} | {mem} | "
                     f"{_secs(get('cache_forward', n), f)} | {_secs(get('dpa_sweep', n), back)} | "
                     f"{method('dpa_edges', n)} | {method('atp', n)} | {method('depass', n)} | {method('unpack', n)} |")
    return "\n".join(lines) + "\n"


def _ratios(rows: list[dict], m: str, base: int, lengths: list[int]) -> str:
    """``m``'s seconds over the floor's (0: forward, 1: forward + backward, 2: backward) at each length."""
    cells = [f"{x['seconds'] / b:.2f}× at {n}" for n in lengths if (x := _row(rows, m, n)) and (b := _floor(rows, n)[base])]
    return ", ".join(cells)


def _gib(x: dict | None) -> str:
    return "" if x is None else f"{x['peak_bytes'] / 2**30:.2f} GiB"


def speed_summary(r: dict) -> str:
    """DPA's parts against the floor at every length, and its peak memory at the longest."""
    rows = r["rows"]
    lengths = _lengths(rows, "floor")
    longest = lengths[-1]
    full, lean = _row(rows, "dpa", longest), _row(rows, "dpa", longest, "checkpoint")
    memory = f"DPA's peak memory above the model at {longest} tokens: {_gib(full)} with the full cache"
    memory += f", {_gib(lean)} checkpointed (below)" if lean else ""
    return (f"DPA total / the model's forward + backward: {_ratios(rows, 'dpa', 1, lengths)} tokens. The sweep / the model's "
            f"backward: {_ratios(rows, 'dpa_sweep', 2, lengths)}. The cache forward / the model's forward: "
            f"{_ratios(rows, 'cache_forward', 0, lengths)}. {memory}.\n")


def speed_answer(r: dict) -> str:
    """The floor and DPA with the logits at the answer position only (the floor with ``logits_to_keep=1``,
    DPA's cache forward by ``cache_for``), beside the floor with every position's logits."""
    rows = r["rows"]
    host = any(x["measurement"] == "tl_forward" for x in rows)  # TransformerLens's own forward, where measured
    lines = ["| tokens | model forward + backward, answer's logits only (all logits) | DPA total, `cache_for` + sweep (× that) | "
             "cache forward by `cache_for` (× model forward, answer's logits) | "
             + ("TransformerLens's forward alone, no hooks (× the same) | " if host else "")
             + "sweep (× model backward, answer's logits) |",
             "|---:|---:|---:|---:|" + ("---:|" if host else "") + "---:|"]
    for n in _lengths(rows, "answer"):
        (f, fb, back), full = _floor(rows, n, "answer"), _row(rows, "hf_forward_backward", n)
        lines.append(f"| {n} | {_secs(_row(rows, 'hf_forward_backward', n, 'answer'))} ({_secs(full)}) | "
                     f"{_secs(_row(rows, 'dpa', n, 'answer'), fb)} | {_secs(_row(rows, 'cache_forward', n, 'answer'), f)} | "
                     + (f"{_secs(_row(rows, 'tl_forward', n, 'answer'), f)} | " if host else "")
                     + f"{_secs(_row(rows, 'dpa_sweep', n), back)} |")
    return "\n".join(lines) + "\n"


def speed_fixed(r: dict) -> str:
    """What a short input pays whatever its length: TransformerLens's own forward against the model's,
    and the check of the cache against the model's weights against the sweep."""
    rows = r["rows"]
    cells = []
    for n in _lengths(rows, "answer"):
        tl, cf, f = _row(rows, "tl_forward", n, "answer"), _row(rows, "cache_forward", n, "answer"), _floor(rows, n, "answer")[0]
        if tl and cf and f:
            cells.append(f"{tl['seconds'] / f:.2f}× and {cf['seconds'] / f:.2f}× at {n}")
    checks = [f"{c['seconds']:.3g} s of {s['seconds']:.3g} s at {n}" for n in _lengths(rows, "floor")
              if (c := _row(rows, "cache_check", n)) and (s := _row(rows, "dpa_sweep", n))]
    return ("TransformerLens's forward alone (no hook, no cache, fused attention, the answer's logits) and the cache forward by "
            f"`cache_for`, over the model's forward: {'; '.join(cells)} tokens. The check of the cache against the model's "
            f"weights, within the sweep: {'; '.join(checks)} tokens.\n")


def speed_checkpoint(r: dict) -> str:
    """DPA with the streams cached only (each layer recomputed in the sweep) beside DPA with the full cache."""
    rows = r["rows"]
    lines = ["| tokens | DPA total, streams cached (× model forward + backward) | its peak memory | "
             "DPA total, full cache | its peak memory | cache forward, streams only (× model forward) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n in _lengths(rows, "checkpoint"):
        (f, fb, _), c, d = _floor(rows, n), _row(rows, "dpa", n, "checkpoint"), _row(rows, "dpa", n)
        lines.append(f"| {n} | {_secs(c, fb)} | {_gib(c)} | {_secs(d, fb)} | {_gib(d)} | {_secs(_row(rows, 'cache_forward', n, 'checkpoint'), f)} |")
    return "\n".join(lines) + "\n"


def circuits(r: dict, signed: dict | None = None) -> str:
    s, g, a = r["settings"], r["grid"], r["agreement"]
    faith = r["faithfulness"]
    ablations = [x for x in ("corrupted", "mean") if x in faith]
    lines = [f"Circuit faithfulness on {g['prompts']} IOI prompts of SmolLM2-135M (MIB's protocol: keep the top x % of the "
             f"{g['n_total']:,} edges by |score|, ablate the rest; CPR higher is better, CMD lower is better, MIB's linear axis) "
             f"and agreement with exact edge patching ({a['prompts']} prompts, {a['edges_per_prompt']:.0f} edges each), from "
             "[`bench/results/circuits_smollm2.md`](bench/results/circuits_smollm2.md) (`python -m bench.circuits`, "
             f"{s['seconds'] / 60:.0f} min on {s['machine']['cpu_count']} CPU cores):",
             "",
             "| edges by | " + " | ".join(f"CPR / CMD, {x} ablation" for x in ablations)
             + " | vs exact edge patching: Pearson / Spearman / top-10 |",
             "|---|" + "---:|" * len(ablations) + "---:|"]
    for m in sorted(faith["corrupted"], key=lambda m: -faith["corrupted"][m]["cpr"]):
        cells = [f"{faith[x][m]['cpr']:.2f} / {faith[x][m]['cmd']:.2f}" for x in ablations]
        v = a["methods"].get(m)
        agree = f"{v['pearson']:.2f} / {v['spearman']:.2f} / {v['top10_overlap']:.1f}" if v else ""
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {agree} |")
    get = lambda m, n: next((x for x in r["cost"] if x["measurement"] == m and x["length"] == n and "error" not in x), None)  # noqa: E731
    costs = []
    for n in sorted({x["length"] for x in r["cost"]}):
        e, d, atp = get("dpa_edges", n), get("dpa", n), get("edge_atp", n)
        if e and d:
            costs.append(f"{n} tokens: {e['seconds']:.3g} s ({e['seconds'] / d['seconds']:.2f}× node DPA"
                         + (f"; edge AtP {atp['seconds']:.3g} s" if atp else "") + ")")
    if costs:
        lines += ["", "Every edge with its q/k/v label from one sweep: " + "; ".join(costs) + "."]
    if "mib" in r:
        lines += ["", *mib_protocol(r, signed)]
    return "\n".join(lines) + "\n"


def signed_cause(signed: dict) -> tuple[str, str]:
    """The figures of a diagnosis of EAP-IG-activations' signed ranking (bench/results/eap_ig_signed*.json), as two
    clauses: the edge's scores and ranks, and the signed CPR with that edge scored as by the inputs form."""
    (writer, reader, _), x, f = signed["edge"], signed["scores"], signed["faithfulness"]
    acts, inputs = x["EAP-IG (activations)"], x["EAP-IG (inputs)"]
    rescored = next(v for k, v in f.items() if "scored as by the inputs form" in k)
    return (f"EAP-IG (activations) scores the edge {writer} → {reader} {acts['score']:+.3f} (signed rank {acts['rank']:,} of "
            f"{signed['n_edges']:,}), where EAP-IG (inputs) scores it {inputs['score']:+.3f} (rank {inputs['rank']:,}) and exact "
            f"edge patching {signed['exact']:+.3f}",
            f"With that one edge scored as by the inputs form its signed CPR on those prompts goes from "
            f"{f['EAP-IG (activations)']['cpr']:.3f} to {rescored['cpr']:.3f} (EAP-IG (inputs) {f['EAP-IG (inputs)']['cpr']:.3f})")


def mib_protocol(r: dict, signed: dict | None = None) -> list[str]:
    """MIB's protocol (a circuit averaged over train prompts, evaluated on held-out prompts) with each method's cost;
    ``signed``: bench/results/eap_ig_signed.json, why EAP-IG-activations' signed ranking fails."""
    m = r["mib"]
    get = lambda name, n: next((x for x in r["cost"] if x["measurement"] == name and x["length"] == n and "error" not in x), None)  # noqa: E731
    lengths = sorted({x["length"] for x in r["cost"]})
    lines = [f"MIB's protocol: each method's edge scores averaged over {m['train']} IOI prompts, the circuit evaluated on "
             f"{m['test']} held-out prompts (corrupted ablation), CPR from the signed ranking and CMD from the |score| ranking "
             "as MIB's leaderboard reports them (raw areas), with the cost of one prompt of random tokens (fresh processes):",
             "", "| edges by | CPR | CMD | f at 0.1 % / 1 % of the edges | " + " | ".join(f"s at {n} tokens" for n in lengths) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(lengths)]
    for label, v in sorted(m["methods"].items(), key=lambda kv: -kv[1]["cpr"]):
        name = v["method"]
        steps = v["options"].get("steps")
        default = name != "dpa_edges_ig" or steps is None or steps == r["settings"].get("dpa_edges_ig_steps")
        cost = [get(name, n) if default and label != "contrastive DPA" else None for n in lengths]
        curve = v["curve_signed"]
        lines.append(f"| {label} | {v['cpr']:.3f} | {v['cmd']:.3f} | {curve[0]:.2f} / {curve[3]:.2f} | "
                     + " | ".join(f"{c['seconds']:.3g}" if c else "" for c in cost) + " |")
    failed = [f"{x['measurement']} at {x['length']} tokens ({'out of memory' if 'out of memory' in x['error'] else 'failed'}, "
              "on this machine's 23 GiB)" for x in r["cost"] if "error" in x]
    activations = get("eap_ig_activations", 32)
    notes = failed + (
        [f"EAP-IG (activations) is not in the table: {activations['seconds']:.0f} s a prompt at 32 tokens (305 passes)"]
        if activations and "EAP-IG (activations)" in m.get("not_run", []) else [])
    act = m["methods"].get("EAP-IG (activations)")
    after = ([f"EAP-IG (activations) ranked by |score| has CPR {act['cpr_abs']:.3f}: its signed ranking keeps edges that "
              "carry little of the clean run to the logits (f near 0 up to half of the edges), where its |score| ranking "
              "does not" + (f"; its cost ({activations['seconds']:.0f} s at 32 tokens) was measured with one run of the "
                            "path per pass, before runs were batched (`chunk`)" if activations and not activations.get("batched_runs")
                            else "") + "."]
             if act else [])
    if act and signed:
        edge, rescored = signed_cause(signed)
        after.append(
            f"Why ([`bench/results/eap_ig_signed.md`](bench/results/eap_ig_signed.md), `python -m bench.eap_ig_signed`, "
            f"{signed['train']} train and {signed['test']} held-out prompts of this section): {edge}. Every circuit of its "
            "signed ranking short of the full graph leaves that edge out, so layer 0's MLP, which the value edges it keeps on "
            f"top read, gets the corrupted input. {rescored}. The activations form averages each reader's gradient over runs that "
            "each interpolate one group of writers between the corrupted and the clean output and keep the others clean (the "
            "reference's rule): that MLP's input is the clean run's in all of them but those of the embeddings and layer 0's "
            "attention, where the inputs form's runs go from the corrupted input to the clean one.")
    return lines + (["", "Not shown: " + "; ".join(notes) + "."] if notes else []) + (["", *after] if after else [])


def mib_second_model(r: dict, signed: dict | None = None) -> str:
    """MIB's protocol on a second model (``python -m bench.circuits --model ... --mib-only``); ``signed``: its
    bench/results/eap_ig_signed_gemma3.json, the diagnosis of EAP-IG-activations' signed ranking there."""
    m, name = r["mib"], r["settings"]["model"].split(" (")[0]
    lines = [f"The same protocol on {name} ({m['train']} train and {m['test']} held-out IOI prompts that it answers correctly, "
             f"{m['n_total']:,} edges), from [`bench/results/circuits_gemma3.md`](bench/results/circuits_gemma3.md) "
             f"(`python -m bench.circuits --model {r['settings']['model_name']} --mib-only`, {m['seconds'] / 60:.0f} min):", "",
             "| edges by | CPR | CMD | f at 0.1 % / 1 % of the edges (signed) | CPR, \\|score\\| ranking |", "|---|---:|---:|---:|---:|"]
    for label, v in sorted(m["methods"].items(), key=lambda kv: -kv[1]["cpr"]):
        curve = v["curve_signed"]
        lines.append(f"| {label} | {v['cpr']:.3f} | {v['cmd']:.3f} | {curve[0]:.2f} / {curve[3]:.2f} | {v['cpr_abs']:.3f} |")
    act = m["methods"].get("EAP-IG (activations)")
    if act:
        lines += ["", f"EAP-IG (activations)' signed ranking fails here as on SmolLM2 (CPR {act['cpr']:.3f}; f at most "
                  f"{max(act['curve_signed'][:-1]):.2f} short of the full graph), while its |score| ranking has CPR {act['cpr_abs']:.3f} "
                  f"and CMD {act['cmd']:.3f} ({act['seconds_per_train_prompt']:.0f} s a train prompt, "
                  f"{m['eap_ig_activations_passes']} runs of the model each, on a shared machine)."]
        if signed:
            edge, rescored = signed_cause(signed)
            lines[-1] += (f" The same edge is the cause ([`bench/results/eap_ig_signed_gemma3.md`](bench/results/eap_ig_signed_gemma3.md), "
                          f"`python -m bench.eap_ig_signed --model {r['settings']['model_name']}`, {signed['train']} train and "
                          f"{signed['test']} held-out prompts): {edge}. {rescored}.")
    return "\n".join(lines) + "\n"


def ioi_heads(r: dict) -> str:
    a, n = r["agreement"], r["settings"]["agreement_prompts"]
    return (f"Over the {n} IOI prompts of the faithfulness benchmark, AtP tracks exact patching of whole heads with Pearson "
            f"r = {a['atp']['pearson']:.2f} (Spearman {a['atp']['spearman']:.2f}) and DPA with r = {a['dpa']['pearson']:.2f} "
            f"(Spearman {a['dpa']['spearman']:.2f}).\n")


def faithfulness_bos(*results: dict | None) -> str:
    """Token totals with the BOS kept, beside the authors' protocol, per model; and where DPA ranks the BOS."""
    runs = [(r["settings"]["model"].split(" (")[0], r) for r in results if r and r.get("bos")]
    lines = ["Token totals with the leading BOS never ranked or ablated (`keep_bos=True`); in parentheses the authors' "
             "protocol of the table above, where the BOS is zeroed like any token:", "",
             "| method | " + " | ".join(f"{name}: Known 1000 / IOI" for name, _ in runs) + " |", "|---|" + "---:|" * len(runs)]
    methods = sorted({m for _, r in runs for t in r["bos"].values() for m in t["methods"]},
                     key=lambda m: (-runs[0][1]["bos"]["known_1000"]["methods"].get(m, {}).get("total", -1e9), m))
    for m in methods:
        cells = []
        for _, r in runs:
            kept = [r["bos"].get(t, {}).get("methods", {}).get(m) for t in ("known_1000", "ioi")]
            plain = [r["tokens"][t].get(m) for t in ("known_1000", "ioi")]
            cells.append(" / ".join(f"{k['total']:.1f}" if k else "—" for k in kept)
                         + " (" + " / ".join(f"{p['total']:.1f}" if p else "—" for p in plain) + ")" if any(kept) else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    facts = []
    for name, r in runs:
        k, i = r["bos"]["known_1000"], r["bos"]["ioi"]
        rank = [t["methods"]["dpa"]["bos_rank"] for t in (k, i) if "dpa" in t["methods"]]
        facts.append(f"on {name}, zeroing the BOS embedding alone leaves p(answer) at {k['p_ratio_bos_zeroed_median']:.2f} / "
                     f"{i['p_ratio_bos_zeroed_median']:.2f} of its clean value (median, Known 1000 / IOI), and DPA ranks the BOS "
                     + " / ".join(f"{x:.2f}" for x in rank) + " of the way down the prompt's tokens (0 first, 1 last)")
    text = "; ".join(facts)
    return "\n".join(lines) + "\n\n" + text[:1].upper() + text[1:] + ".\n"


def notebooks(r: dict) -> str:
    names = sorted(r)
    cpus = {r[n]["cpus"] for n in names}
    times = ", ".join(f"`{n.split('_')[0]}` {r[n]['seconds'] / 60:.1f} min" for n in names)
    return (f"Each runs top to bottom with its default settings in under {math.ceil(max(r[n]['seconds'] for n in names) / 60)} minutes on "
            f"{'/'.join(map(str, sorted(cpus)))} CPU cores, kernel start and model load included ({times}; "
            "[`bench/results/notebooks.md`](bench/results/notebooks.md)).\n")


def loading(r: dict) -> str:
    i, loads = r["imports"], r["loads"]
    names = {"smollm2-135m": "SmolLM2-135M", "gemma3-270m": "Gemma 3 270M"}
    first = "; ".join(f"{names.get(k, k)} {v['first']:.0f} s the first time, {v['later']:.0f} s later" for k, v in loads.items())
    return (f"Loading a bundled model on {r['machine']['cpu_count']} CPU cores: {first} "
            f"([`bench/results/loading.md`](bench/results/loading.md), `python -m bench.loading`). `import dpa_lens` takes "
            f"{i['import dpa_lens']:.1f} s, `import transformer_lens` alone {i['import transformer_lens']:.1f} s "
            f"(`import torch` {i['import torch']:.1f} s); `dpa-lens --help` {i['dpa-lens --help']:.1f} s.\n")


def datasets(r: dict) -> str:
    rows = r["rows"]
    ok = [x for x in rows if "error" not in x]
    find = lambda sec, m, b: next((x for x in ok if (x["section"], x["measurement"], x["batch"]) == (sec, m, b)), None)  # noqa: E731
    per = lambda x: x["seconds"] / x["records"]  # noqa: E731
    cells = []
    for b in sorted({x["batch"] for x in ok if x["section"] == "speed"}):
        floor, dpa, edges = find("speed", "floor", b), find("speed", "dpa", b), find("speed", "dpa_edges", b)
        if floor is None or dpa is None:
            continue
        edge = f"; DPA edges {per(edges) * 1000:.0f} ms ({per(edges) / per(dpa):.2f}× node DPA)" if edges else ""
        cells.append(f"batch {b}: DPA {per(dpa) * 1000:.0f} ms a record, {per(dpa) / per(floor):.2f}× the floor's "
                     f"{per(floor) * 1000:.0f} ms{edge}")
    text = (f"Over a dataset of SmolLM2-135M IOI and Known 1000 prompts on {r['machine']['cpu_count']} CPU cores "
            f"([`bench/results/datasets_smollm2.md`](bench/results/datasets_smollm2.md), `python -m bench.datasets`; the floor "
            "is the model's own forward and backward in transformers, SDPA, on the same batches; times include tokenizing "
            "and writing the shards): " + "; ".join(cells) + ".")
    two = next((x for x in ok if x["section"] == "processes"), None)
    one = find("speed", two["measurement"], two["batch"]) if two else None
    if two and one:
        text += (f" Two processes under torchrun with {two.get('threads_each', '?')} thread each: {two['seconds'] / one['seconds']:.2f}× "
                 f"the time of one process with {one.get('threads', '?')} ({two['records']} records).")
    for x in (x for x in ok if x["section"] == "breakdown"):
        st = x["stages"]
        text += (f" Where the time of batch {x['batch']} goes (one process, the stages timed in turn): DPA's calls as the runner "
                 f"makes them take {st['method_calls'] / st['floor']:.2f}× the floor (its cache forward "
                 f"{st['cache_forward'] / st['floor_forward']:.2f}× the floor's forward), the whole dataset call "
                 f"{st['dataset_call'] / st['floor']:.2f}×: tokenizing, batching and writing the Parquet shards add "
                 f"{(st['dataset_call'] - st['method_calls']) / st['floor']:.2f}× of the floor.")
    for kind, label in (("memory-one-length", "records of one length, every full batch of the warm-up's shape"),
                        ("memory", "records of mixed lengths, whose batches take more shapes as records are added, each "
                                   "keeping some native memory under torch")):
        memory = sorted((x for x in ok if x["section"] == kind), key=lambda x: x["records"])
        if len(memory) >= 2:
            text += (f" Peak memory above the model ({label}): "
                     + ", ".join(f"{x['peak_bytes'] / 2**20:,.0f} MiB for {x['records']:,} records" for x in memory) + ".")
    return text + "\n"


# block -> (its result files, the renderer that takes them in that order; a missing optional file is None)
SOURCES: dict[str, tuple[tuple[Path, ...], Callable[..., str]]] = {
    "faithfulness": ((RESULTS / "faithfulness_smollm2.json", RESULTS / "faithfulness_gemma3.json"), faithfulness),
    "faithfulness-bos": ((RESULTS / "faithfulness_smollm2.json", RESULTS / "faithfulness_gemma3.json"), faithfulness_bos),
    "speed": ((RESULTS / "speed_smollm2.json",), speed),
    "speed-gemma3": ((RESULTS / "speed_gemma3.json",), speed),
    "speed-checkpoint": ((RESULTS / "speed_smollm2.json",), speed_checkpoint),
    "speed-summary": ((RESULTS / "speed_smollm2.json",), speed_summary),
    "speed-answer": ((RESULTS / "speed_smollm2.json",), speed_answer),
    "speed-fixed": ((RESULTS / "speed_smollm2.json",), speed_fixed),
    "speed-answer-gemma3": ((RESULTS / "speed_gemma3.json",), speed_answer),
    "ioi-heads": ((RESULTS / "faithfulness_smollm2.json",), ioi_heads),
    "circuits": ((RESULTS / "circuits_smollm2.json", RESULTS / "eap_ig_signed.json"), circuits),
    "circuits-gemma3": ((RESULTS / "circuits_gemma3.json", RESULTS / "eap_ig_signed_gemma3.json"), mib_second_model),
    "notebooks": ((RESULTS / "notebooks.json",), notebooks),
    "loading": ((RESULTS / "loading.json",), loading),
    "datasets": ((RESULTS / "datasets_smollm2.json",), datasets),
}
OPTIONAL = {RESULTS / "faithfulness_gemma3.json", RESULTS / "eap_ig_signed.json", RESULTS / "eap_ig_signed_gemma3.json"}


def render(text: str) -> str:
    """The README with every generated block rewritten from its result file."""

    def block(m: re.Match) -> str:
        name = m.group("name")
        if name not in SOURCES:
            raise SystemExit(f"README has an unknown generated block {name!r}")
        paths, fn = SOURCES[name]
        return m.group(1) + fn(*(_load(p) if p.exists() or p not in OPTIONAL else None for p in paths)) + m.group(4)

    return BLOCK.sub(block, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the README differs from the results")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old)
    if args.check:
        if new != old:
            sys.exit("README.md is out of date with the committed results: run python -m bench.readme")
        return
    readme.write_text(new)


if __name__ == "__main__":
    main()
