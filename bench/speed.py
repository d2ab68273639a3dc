"""Seconds and peak memory per example of dpa_lens's methods on a bundled model, against the honest floor.

    python -m bench.speed               # the full run (~45 min on 2 CPU cores)
    python -m bench.speed --quick       # a few points, for CI
    python -m bench.speed --device cuda # a GPU section (float32 and bfloat16)
    python -m bench.speed --model gemma3-270m --max-length 1024 --max-method-length 256   # the second model
    python -m bench.speed --rows depass:1024 atp:1024 --update   # add or redo some rows of the committed results
    python -m bench.speed --rows hf_forward:1024 dpa:1024 --rounds 3 --update   # each row in 3 processes, interleaved

The floor is the same model in ``transformers`` with SDPA attention: one forward, and one forward and
backward to the input embeddings with the parameters frozen. Against it:

1. DPA, per example: the cache forward DPA needs (``run_with_cache`` with ``dpa_names_filter(model,
   patterns=False)``, under ``torch.no_grad`` and `dpa_lens.fused_attention`), the sweep (tokens, heads
   and neurons), and their total, at 32 … 8192 tokens; the check of the cache against the model's
   weights that a DPA call on a full cache makes before its sweep (``cache_check``, inside the sweep's time), at 32 …
   1024 tokens; the old baseline (TransformerLens's forward and a backward that also computes every
   parameter's gradient) is kept, labelled for what it is;
2. the other methods at 32 and 256 tokens (1024 where feasible): DPA edges, DePass, Unpack, AtP,
   integrated gradients (128 steps) and exact patching of every head;
3. scaling in the number of units scored, at 256 tokens: DPA scoring only tokens, adding heads,
   neurons and per-key scores, against exact patching of 9, 90 and 270 heads;
4. where a DPA call spends its time, per rule (``torch.profiler`` on the labels of
   `dpa_lens.methods.dpa.rules`, and of the checks of the cache before the sweep), at 32 and 1024 tokens;
5. the same floor and DPA with the logits at the answer position only (option ``answer``): the floor's
   forward and backward with ``logits_to_keep=1``, DPA's cache forward by `dpa_lens.cache_for` (no
   logits at every position), at 32 … 8192 tokens. By default both sides compute ``[pos, vocab]``
   logits, and the floor's backward also multiplies their (mostly zero) gradient by the unembedding,
   which DPA never does: this is the leaner floor; and TransformerLens's own forward with no hook and
   no cache (``tl_forward``, at 32 … 1024 tokens), the part of the cache forward that is the host's;
6. activation checkpointing (option ``checkpoint``): the cache forward with
   ``dpa_names_filter(model, checkpoint=True)`` (the residual streams only), the sweep that recomputes
   each layer, and their total, at 256 … 8192 tokens.

Each measurement runs in a fresh process: a warm-up (whose peak memory is recorded: the peak above
the loaded model), then up to ``--repeats`` timed runs (fewer once they add up to 20 s; none after a
warm-up over a minute); the table gives the minimum. With ``--rounds R`` the list of measurements runs R
times over, one after the other (so that the floor and DPA see the same moments of a shared machine),
and each row keeps its fastest process (`fastest`). Writes bench/results/speed_{smollm2,gemma3}[_cuda].md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
import traceback
from pathlib import Path

from bench.common import MODELS, cost_cell, find_row, machine, random_pair, run_child, short_error, time_calls, write_results

RESULTS = Path(__file__).parent / "results"
# measurement -> (what it is, how the table names it)
LABELS = {
    "hf_forward": "transformers forward (SDPA)",
    "hf_forward_backward": "transformers forward + backward to the inputs (SDPA)",
    "tl_forward_backward": "TransformerLens forward + backward with parameter gradients (the old baseline)",
    "cache_forward": "TransformerLens cache forward for DPA (no patterns, no_grad, fused attention)",
    "tl_forward": "TransformerLens forward, no hook and no cache (no_grad, fused attention): the host's own cost",
    "dpa_sweep": "DPA sweep (tokens, heads, neurons)",
    "cache_check": "the check of the cache against the model's weights, part of a DPA call on a full cache before its sweep",
    "dpa": "DPA total (cache forward + sweep)",
}


def dpa_cache(model, tokens, patterns: bool = False, checkpoint: bool = False):
    """The cache forward DPA needs, as a user runs it: lean names filter, no grad, fused attention
    (``checkpoint``: the residual streams only, each layer recomputed by the sweep). Returns
    ``(logits, cache)``; the measurements keep the cache only (the ``[pos, vocab]`` logits, 1.5 GiB at
    8192 tokens on SmolLM2, are not DPA's)."""
    import torch

    import dpa_lens

    with torch.no_grad(), dpa_lens.fused_attention(model):
        return model.run_with_cache(tokens, names_filter=dpa_lens.dpa_names_filter(model, patterns=patterns, checkpoint=checkpoint))


# the options of the method rows (measurement, option) -> dpa_lens.run's options; a DPA row computes no flow,
# as a user's DPA call does not by default
_INF = float("inf")
METHOD_OPTIONS = {
    ("dpa", ""): {"flow": False}, ("dpa", "answer"): {"flow": False}, ("dpa", "checkpoint"): {"flow": False},
    ("dpa", "tokens"): {"flow": False, "kinds": ("tokens",)}, ("dpa", "tokens+heads"): {"flow": False, "kinds": ("tokens", "heads")},
    ("dpa", "head_keys"): {"flow": False, "head_keys": True},
    ("patching", ""): {"unit": "heads"}, ("patching", "9"): {"unit": "heads", "layers": [0]},
    ("patching", "90"): {"unit": "heads", "layers": list(range(10))},
    ("integrated_gradients", ""): {"steps": 128, "warn_gap": _INF},
}
LENGTH_OPTIONS = {"integrated_gradients": lambda length: {"batch_size": max(1, 1024 // length)}}  # options that follow the length
QUICK_OPTIONS = {"integrated_gradients": {"steps": 16}}  # --quick: the code paths in seconds, not the numbers
METHOD_NAMES = {"patching": "activation_patching"}  # rows named otherwise than their method
OWN_CACHE = ("dpa", "dpa_edges")  # rows that include the cache forward a user runs for them (`dpa_cache`)


def method_options(measurement: str, option: str, length: int, quick: bool = False) -> dict:
    """``dpa_lens.run``'s options of a method row."""
    by_length = LENGTH_OPTIONS.get(measurement)
    return {**METHOD_OPTIONS.get((measurement, option), {}), **(by_length(length) if by_length else {}),
            **(QUICK_OPTIONS.get(measurement, {}) if quick else {})}


def run_one(name: str, measurement: str, length: int, repeats: int, device: str, option: str, dtype: str, quick: bool = False) -> dict:
    import torch

    import dpa_lens
    from dpa_lens.models.tl import lean_logits
    from dpa_lens.models.view import ModelView
    from dpa_lens.validation import check_cache_model

    model = load(name, device, dtype)
    clean, corrupted = random_pair(model, length, device)
    target = (model.to_single_token(" Mary"), model.to_single_token(" John"))
    hf = None
    answer = option == "answer"  # the logits at the answer position only, on both sides
    keep = {"logits_to_keep": 1} if answer else {}
    if measurement.startswith("hf_"):
        hf = load_hf(name, device, dtype)
    checkpoint = option == "checkpoint"
    held = dpa_cache(model, clean, checkpoint=checkpoint)[1] if measurement in ("dpa_sweep", "cache_check") else None

    def hf_forward():
        with torch.no_grad():
            hf(clean, **keep)

    def hf_forward_backward():
        embeds = hf.get_input_embeddings()(clean).detach().requires_grad_(True)
        logits = hf(inputs_embeds=embeds, **keep).logits
        (logits[0, -1, target[0]] - logits[0, -1, target[1]]).backward()

    def tl_forward_backward():
        logits = model(clean)
        (logits[0, -1, target[0]] - logits[0, -1, target[1]]).backward()
        model.zero_grad(set_to_none=True)

    def tl_forward():
        with torch.no_grad(), dpa_lens.fused_attention(model):
            model(clean, **(lean_logits(model) if answer else {}))

    # the floor and the parts of a DPA call; every other row is a registered method, run by `dpa_lens.run`
    parts = {
        "hf_forward": hf_forward,
        "hf_forward_backward": hf_forward_backward,
        "tl_forward_backward": tl_forward_backward,
        "tl_forward": tl_forward,
        "cache_forward": lambda: dpa_lens.cache_for(model, clean) if answer else dpa_cache(model, clean, checkpoint=checkpoint),
        "dpa_sweep": lambda: dpa_lens.run("dpa", model, clean, target, cache=held, flow=False),
        "cache_check": lambda: check_cache_model(ModelView(model), held, every_weight=option == "every"),
    }
    if measurement == "dpa_sweep" and option == "noprobe":  # the A/B of DPA's weight probe: a call without it
        import dpa_lens.forward

        dpa_lens.forward.WeightProbe = lambda view: None
    method = METHOD_NAMES.get(measurement, measurement)
    spec = None if measurement in parts else dpa_lens.get_method(method)
    options = {} if spec is None else method_options(measurement, option, length, quick)

    def run_method():
        cache = None
        if measurement in OWN_CACHE and not answer:  # with ``answer``, run's own lean forward (`dpa_lens.cache_for`)
            cache = dpa_cache(model, clean, patterns=option == "head_keys", checkpoint=checkpoint)[1]
        dpa_lens.run(method, model, clean, target, corrupted=corrupted if spec.input == "pair" else None, cache=cache,
                     progress=False, **options)

    def once():
        if measurement in parts:
            parts[measurement]()
        else:
            with torch.no_grad() if measurement in OWN_CACHE else contextlib.nullcontext():
                run_method()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times, peak = time_calls(once, device, repeats)
    return {"measurement": measurement, "length": length, "option": option, "dtype": dtype, "seconds": min(times),
            "median_seconds": sorted(times)[len(times) // 2], "peak_bytes": peak}


def profile_sweep(name: str, length: int, device: str) -> dict:
    """Seconds of a DPA call per rule (the ``record_function`` labels of the DPA rules, and of the checks
    of the cache before the sweep), one run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import dpa_lens

    model = load(name, device, "float32")
    clean, _ = random_pair(model, length, device)
    target = (model.to_single_token(" Mary"), model.to_single_token(" John"))
    with torch.no_grad():
        _, cache = dpa_cache(model, clean)
        dpa_lens.dpa(model, cache, target)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            dpa_lens.dpa(model, cache, target)
            total = time.perf_counter() - start
    rules = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith(("dpa.", "dpa_lens."))}
    return {"measurement": "profile", "length": length, "option": "", "seconds": total, "rules": rules, "peak_bytes": 0}


def probe_ab(name: str, length: int, device: str, rounds: int) -> dict:
    """The weight probe's cost in one process: DPA calls on one full cache with the probe and without it, alternated
    (which goes first alternating too) for ``rounds`` rounds after a warm-up; the fastest and the median of each.
    Processes differ from one another by more than the probe costs on this machine; calls of one process do not."""
    import torch

    import dpa_lens
    import dpa_lens.forward
    from dpa_lens.validation import WeightProbe

    model = load(name, device, "float32")
    clean, _ = random_pair(model, length, device)
    target = (model.to_single_token(" Mary"), model.to_single_token(" John"))
    times: dict[str, list[float]] = {"probe": [], "noprobe": []}
    with torch.no_grad():
        _, cache = dpa_cache(model, clean)
        try:
            for k in range(rounds + 1):
                for arm in ("probe", "noprobe") if k % 2 else ("noprobe", "probe"):
                    dpa_lens.forward.WeightProbe = WeightProbe if arm == "probe" else (lambda view: None)
                    start = time.perf_counter()
                    dpa_lens.run("dpa", model, clean, target, cache=cache, flow=False)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if k:  # the first round warms up
                        times[arm].append(time.perf_counter() - start)
        finally:
            dpa_lens.forward.WeightProbe = WeightProbe
    best, median = ({a: f(sorted(t)) for a, t in times.items()} for f in (lambda t: t[0], lambda t: t[len(t) // 2]))
    return {"measurement": "probe_ab", "length": length, "option": "", "seconds": best["probe"], "noprobe_seconds": best["noprobe"],
            "median_seconds": median["probe"], "noprobe_median_seconds": median["noprobe"], "rounds": rounds, "peak_bytes": 0}


def units(name: str) -> dict:
    """How many heads and neurons the model has (the scaling table's labels)."""
    from dpa_lens.models.bundled import load_bundled_hf

    cfg = load_bundled_hf(name)[0].config
    cfg = getattr(cfg, "text_config", cfg)
    return {"heads": cfg.num_hidden_layers * cfg.num_attention_heads, "heads_per_layer": cfg.num_attention_heads,
            "neurons": cfg.num_hidden_layers * cfg.intermediate_size}


def plan(quick: bool, max_length: int = 8192, max_method_length: int = 1024) -> list[tuple[str, int, str, str]]:
    """(measurement, length, option, section) in run order (the floor up to ``max_length`` tokens, the
    other methods up to ``max_method_length``)."""
    if quick:
        rows = [(m, n, "", "floor") for n in (32, 128) for m in ("hf_forward", "hf_forward_backward", "cache_forward", "dpa_sweep", "dpa")]
        rows += [(m, 32, "", "methods") for m in ("dpa_edges", "atp", "depass", "unpack", "integrated_gradients")]
        rows += [("dpa_sweep", 128, "noprobe", "probe"), ("probe_ab", 128, "", "probe")]
        rows += [("cache_check", 128, "", "floor"), ("dpa", 128, "tokens", "scaling"), ("patching", 128, "9", "scaling"),
                 ("profile", 128, "", "profile")]
        rows += [(m, 128, "checkpoint", "checkpoint") for m in ("cache_forward", "dpa")]
        rows += [(m, 128, "answer", "answer") for m in ("hf_forward_backward", "tl_forward", "cache_forward", "dpa")]
        return rows
    floor = ("hf_forward", "hf_forward_backward", "tl_forward_backward", "cache_forward", "dpa_sweep", "dpa")
    rows = [(m, n, "", "floor") for n in (32, 256, 1024, 4096) for m in floor]
    rows += [(m, 8192, "", "floor") for m in ("hf_forward", "hf_forward_backward", "cache_forward", "dpa_sweep", "dpa")]
    rows += [("cache_check", n, "", "floor") for n in (32, 256, 1024)]  # a fixed cost, inside the sweep's row
    # the A/B of the weight probe (a DPA call with and without it) and the explicit check of the same weights
    rows += [(m, n, o, "probe") for n in (32, 256, 1024) for m, o in (("dpa_sweep", "noprobe"), ("cache_check", "every"), ("probe_ab", ""))]
    rows += [(m, n, "", "methods") for n in (32, 256, 1024) for m in ("dpa_edges", "depass", "atp")]
    rows += [("unpack", n, "", "methods") for n in (32, 256)]  # float64 components × positions × d_mlp per layer: not at 1024
    rows += [(m, n, "", "methods") for n in (32, 256) for m in ("integrated_gradients", "patching")]
    rows += [("dpa", 256, o, "scaling") for o in ("tokens", "tokens+heads", "head_keys")]
    rows += [("patching", 256, o, "scaling") for o in ("9", "90")]
    rows += [("profile", n, "", "profile") for n in (32, 1024)]
    rows += [(m, n, "answer", "answer") for n in (32, 256, 1024, 4096, 8192) for m in ("hf_forward", "hf_forward_backward", "cache_forward", "dpa")]
    rows += [("tl_forward", n, "answer", "answer") for n in (32, 256, 1024)]  # the host's fixed cost, beside the cache forward's
    rows += [(m, n, "checkpoint", "checkpoint") for n in (256, 1024, 4096, 8192) for m in ("cache_forward", "dpa_sweep", "dpa")]
    return [r for r in rows if r[1] <= (max_length if r[3] in ("floor", "probe", "profile", "checkpoint", "answer") else max_method_length)]


_get = find_row


def fastest(runs: list[dict]) -> list[dict]:
    """One row per (measurement, length, option) out of several rounds: the fastest successful run, with
    the largest peak memory of all its runs and ``runs``, how many succeeded; an error only where none did."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["measurement"], r["length"], r["option"]), []).append(r)
    rows = []
    for group in groups.values():
        ok = [r for r in group if "error" not in r]
        if not ok:
            rows.append(group[-1])
            continue
        best = dict(min(ok, key=lambda r: r["seconds"]))
        best.update(peak_bytes=max(r["peak_bytes"] for r in ok), runs=len(ok))
        rows.append(best)
    return rows


def _backward(rows: list[dict], n: int, option: str = "") -> dict | None:
    """The floor's backward at ``n`` tokens: its forward + backward less its forward."""
    fb, f = _get(rows, "hf_forward_backward", n, option), _get(rows, "hf_forward", n, option)
    return None if fb is None or f is None else {"seconds": fb["seconds"] - f["seconds"]}


def markdown(result: dict) -> str:
    rows, mach = result["rows"], result["machine"]
    where = mach.get("gpu") or f"{mach['cpu_count']} CPU cores"
    lines = [
        f"# Speed and memory of dpa_lens's methods on {result['model'].split(' (')[0]}",
        "",
        f"Device: {mach['device']} ({where}); torch {mach['torch']}, TransformerLens {mach['transformer_lens']}, "
        f"{result['dtype']}. Minimum of up to {result['repeats']} runs after a warm-up (the warm-up alone when it takes over a "
        "minute)" + ("; the rows of a command below with `--rounds R` are the fastest of R processes, the "
                     "measurements interleaved" if any("--rounds" in c for c in [result.get("command", "")] + result.get("updates", [])) else "")
        + "; peak memory above the loaded model, per example (one prompt of random tokens: the cost does not depend "
        "on the text; DPA's rows peak over the whole call: the cache, the scores and, while the cache forward runs, its logits). "
        f"Produced by `{result.get('command', 'python -m bench.speed' + (' --quick' if result['quick'] else ''))}`"
        + "".join(f"; rows added by `{u}`" for u in result.get("updates", [])) + ".",
        "",
        "## DPA against the model's own forward and backward",
        "",
        "The floor is the same model in `transformers` with SDPA attention: a forward, and a forward and backward to the "
        "input embeddings with the parameters frozen. DPA total = the cache forward DPA needs + the sweep (tokens, heads, "
        "neurons); the ratio is to the floor's forward + backward (the sweep's: to the floor's backward, their difference).",
        "",
        "| tokens | HF forward | HF forward + backward | TL cache forward (DPA's hooks) | DPA sweep | of which: cache check | "
        "DPA total | TL forward + backward with parameter gradients |",
        "|---:|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["length"] for r in rows if r.get("section") == "floor"}):
        fb, f, back = _get(rows, "hf_forward_backward", n), _get(rows, "hf_forward", n), _backward(rows, n)
        lines.append(f"| {n} | {cost_cell(f)} | {cost_cell(fb)} | {cost_cell(_get(rows, 'cache_forward', n), f)} | "
                     f"{cost_cell(_get(rows, 'dpa_sweep', n), back)} | {cost_cell(_get(rows, 'cache_check', n))} | "
                     f"{cost_cell(_get(rows, 'dpa', n), fb)} | "
                     f"{cost_cell(_get(rows, 'tl_forward_backward', n))} |")
    answer = sorted({r["length"] for r in rows if r.get("section") == "answer"})
    if answer:
        lines += ["", "## The same with the logits at the answer position only", "",
                  "Above, both sides compute the logits at every position (`[pos, vocab]`), and the floor's backward "
                  "also multiplies their gradient, zero but at the answer, by the unembedding, which DPA never does. "
                  "Here neither computes more logits than it needs: the floor with `logits_to_keep=1`, DPA's cache forward "
                  "by `dpa_lens.cache_for`; the sweep is the one above. TL forward: TransformerLens's own forward with no "
                  "hook and no cache (fused attention, the answer's logits only), the part of the cache forward that is the "
                  "host's.", "",
                  "| tokens | HF forward | HF forward + backward | TL forward, no hooks | cache forward (`cache_for`) | DPA sweep | DPA total |",
                  "|---:|---|---|---|---|---|---|"]
        for n in answer:
            fb, f = _get(rows, "hf_forward_backward", n, "answer"), _get(rows, "hf_forward", n, "answer")
            lines.append(f"| {n} | {cost_cell(f)} | {cost_cell(fb)} | {cost_cell(_get(rows, 'tl_forward', n, 'answer'), f)} | "
                         f"{cost_cell(_get(rows, 'cache_forward', n, 'answer'), f)} | "
                         f"{cost_cell(_get(rows, 'dpa_sweep', n), _backward(rows, n, 'answer'))} | "
                         f"{cost_cell(_get(rows, 'dpa', n, 'answer'), fb)} |")
    checkpointed = sorted({r["length"] for r in rows if r.get("section") == "checkpoint"})
    if checkpointed:
        lines += ["", "## Activation checkpointing: the streams cached, each layer recomputed in the sweep", "",
                  "`dpa_names_filter(model, checkpoint=True)` caches only the residual streams; the sweep recomputes each layer "
                  "from its input stream (about one more forward) and checks it against the next. Same scores, same floor; the "
                  "last column is the peak of DPA total with the full cache (above).", "",
                  "| tokens | cache forward (streams only) | DPA sweep (with the recomputation) | DPA total | DPA total, full cache |",
                  "|---:|---|---|---|---|"]
        for n in checkpointed:
            fb, f, back = _get(rows, "hf_forward_backward", n), _get(rows, "hf_forward", n), _backward(rows, n)
            lines.append(f"| {n} | {cost_cell(_get(rows, 'cache_forward', n, 'checkpoint'), f)} | "
                         f"{cost_cell(_get(rows, 'dpa_sweep', n, 'checkpoint'), back)} | {cost_cell(_get(rows, 'dpa', n, 'checkpoint'), fb)} | "
                         f"{cost_cell(_get(rows, 'dpa', n), fb)} |")
    methods = [r for r in rows if r.get("section") == "methods"]
    if methods:
        names = list(dict.fromkeys(r["measurement"] for r in methods))
        lengths = sorted({r["length"] for r in methods})
        lines += ["", "## Other methods, per example", "", "Ratios to DPA total at the same length.", "",
                  "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for m in names:
            lines.append(f"| {m} | " + " | ".join(cost_cell(_get(rows, m, n), _get(rows, "dpa", n)) for n in lengths) + " |")
    scaling = [r for r in rows if r.get("section") == "scaling"]
    if scaling:
        n = scaling[0]["length"]
        u = result.get("units", {"heads": 270, "neurons": 46080, "heads_per_layer": 9})
        order = [("dpa", "tokens", "DPA: tokens"), ("dpa", "tokens+heads", f"DPA: tokens + {u['heads']} heads × positions"),
                 ("dpa", "", f"DPA: tokens + heads × positions + {u['neurons']:,} neurons × positions"),
                 ("dpa", "head_keys", "DPA: … + heads × query × key positions (patterns cached)"),
                 ("patching", "9", f"exact patching: {u['heads_per_layer']} heads (layer 0)"),
                 ("patching", "90", f"exact patching: {10 * u['heads_per_layer']} heads (layers 0-9)"),
                 ("patching", "", f"exact patching: {u['heads']} heads")]
        lines += ["", f"## Scaling in the number of units scored ({n} tokens)", "",
                  "Each row from its own processes (the DPA rows with every unit are the floor table's): differences "
                  "of a tenth or so are within this machine's noise.", "", "| method and units | seconds | peak memory |",
                  "|---|---:|---:|"]
        for m, o, label in order:
            r = _get(rows, m, n, o)
            if r is not None:
                lines.append(f"| {label} | {r['seconds']:.3g} | {r['peak_bytes'] / 2**20:,.0f} MiB |")
    probe = sorted({r["length"] for r in rows if r["measurement"] == "dpa_sweep" and r.get("option") == "noprobe"})
    if probe:
        lines += ["", "## The check of the weights the sweep reads", "",
                  "DPA's sweep multiplies by W_Q, W_K, W_V and the MLP's input weights anyway; one random row more in each of "
                  "those products checks them against the cache "
                  "(`dpa_lens.validation.WeightProbe`, on in every DPA call). "
                  "The A/B: a DPA call on a full cache with the probe and without it (rows measured in the same `--rounds` "
                  "command, interleaved), and, for comparison, the explicit check of the same weights by recomputing the "
                  "queries, keys and MLP inputs at 4 positions (`check_cache_model(every_weight=True)`, what DPA paths, "
                  "DePass and Unpack run; DPA edges use the probe). The rounds of one row differ by up to 45 % on this "
                  "shared 2-core machine, so the ratio of the fastest rounds is a rough guide to the probe's cost.", "",
                  "| tokens | DPA call, probe | DPA call, no probe | probe / no probe | cache check (W_V, W_O, W_out) | "
                  "cache check, every weight |", "|---:|---|---|---:|---|---|"]
        for n in probe:
            a, b = _get(rows, "dpa_sweep", n), _get(rows, "dpa_sweep", n, "noprobe")
            ratio = f"{a['seconds'] / b['seconds']:.3f}" if a and b else "—"
            lines.append(f"| {n} | {cost_cell(a)} | {cost_cell(b)} | {ratio} | {cost_cell(_get(rows, 'cache_check', n))} | "
                         f"{cost_cell(_get(rows, 'cache_check', n, 'every'))} |")
        same = [r for n in probe if (r := _get(rows, "probe_ab", n))]
        if same:
            lines += ["", "In one process (`probe_ab`: DPA calls on one cache, with the probe and without it alternated, "
                      "after a warm-up), where the processes' own differences do not enter:", "",
                      "| tokens | calls of each | probe: fastest, median | no probe: fastest, median | probe / no probe: "
                      "fastest, median |", "|---:|---:|---|---|---|"]
            for r in same:
                lines.append(f"| {r['length']} | {r['rounds']} | {r['seconds']:.3g} s, {r['median_seconds']:.3g} s | "
                             f"{r['noprobe_seconds']:.3g} s, {r['noprobe_median_seconds']:.3g} s | "
                             f"{r['seconds'] / r['noprobe_seconds']:.3f}, {r['median_seconds'] / r['noprobe_median_seconds']:.3f} |")
    profiles = sorted((r for r in rows if r["measurement"] == "profile" and "error" not in r), key=lambda r: r["length"])
    if profiles:
        lines += ["", "## Where a DPA call spends its time", "",
                  "CPU seconds (all threads) per `record_function` label in one run: `dpa_lens.checks`, where present, "
                  "are the checks of the cache before the sweep (its hooks, shapes, finiteness and padding, and the cache "
                  "against the model's weights), the `dpa.` labels the sweep's rules (nested labels are inside their "
                  "parents).", "",
                  "| rule | " + " | ".join(f"{p['length']} tokens (run: {p['seconds']:.3g} s)" for p in profiles) + " |",
                  "|---|" + "---:|" * len(profiles)]
        keys = sorted({k for p in profiles for k in p["rules"]}, key=lambda k: -profiles[-1]["rules"].get(k, 0.0))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(f"{p['rules'][k]:.3g}" if k in p["rules"] else "" for p in profiles) + " |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "## Failed measurements", ""] + [f"- {' '.join(filter(None, (r['measurement'], r['option'])))} at {r['length']} tokens: "
                                                        f"{short_error(r['error'])}" for r in failed]
    lines.append("")
    return "\n".join(lines)


def measure(args: argparse.Namespace, measurement: str, length: int, option: str) -> dict:
    """One row of the plan, in this process."""
    if measurement == "profile":
        return profile_sweep(args.model, length, args.device)
    if measurement == "probe_ab":
        return probe_ab(args.model, length, args.device, 2 if args.quick else 16 if length <= 256 else 6)
    return run_one(args.model, measurement, length, args.repeats, args.device, option, args.dtype, args.quick)


@functools.cache
def load(name: str, device: str, dtype: str):
    """The bundled model on TransformerLens, loaded once per process (each row in a fresh process loads it once)."""
    import torch

    import dpa_lens

    return dpa_lens.load_model(name, device=device, dtype=getattr(torch, dtype))


@functools.cache
def load_hf(name: str, device: str, dtype: str):
    """The same model in ``transformers`` with SDPA attention and frozen parameters: the floor's model."""
    import torch

    from dpa_lens.models.bundled import load_bundled_hf

    hf, _ = load_bundled_hf(name, dtype=getattr(torch, dtype))
    hf.set_attn_implementation("sdpa")
    hf = hf.to(device)
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m", help="the bundled model (default smollm2-135m)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="runs after the warm-up (default 3; --quick: 0, the warm-up is the measurement)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--max-length", type=int, default=8192, help="longest input of the floor section (default 8192)")
    parser.add_argument("--max-method-length", type=int, default=1024,
                        help="longest input for the other methods (default 1024)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed to one measurement (default 900)")
    parser.add_argument("--rows", nargs="+", metavar="MEASUREMENT[/OPTION]:LENGTH",
                        help="only these rows of the full plan (with --update: merged into the existing results)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the list of measurements this many times over, interleaved; keep each row's fastest (default 1)")
    parser.add_argument("--update", action="store_true", help="merge the measured rows into the existing results")
    parser.add_argument("--in-process", action="store_true",
                        help="run every row in this process, the model loaded once (a smoke test of the code: timings and peaks "
                             "are not comparable with fresh processes)")
    parser.add_argument("--child", nargs=3, metavar=("MEASUREMENT", "LENGTH", "OPTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        m, n, o = args.child
        print(json.dumps(measure(args, m, int(n), o if o != "-" else "")))
        return
    if args.repeats is None:
        args.repeats = 0 if args.quick else 3
    slug, label = MODELS[args.model]
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    stem = args.out / f"speed_{slug}{suffix}{'_quick' if args.quick else ''}"
    jobs = plan(args.quick, args.max_length, args.max_method_length)
    if args.rows:
        wanted = {(r.rsplit(":", 1)[0].split("/")[0], int(r.rsplit(":", 1)[1]), r.rsplit(":", 1)[0].partition("/")[2]) for r in args.rows}
        jobs = [j for j in plan(args.quick, 8192, 8192) if j[:3] in wanted]
        missing = wanted - {j[:3] for j in jobs}
        if missing:
            parser.error(f"--rows: not in the plan: {sorted(missing)}")
    if args.update and not stem.with_suffix(".json").exists():
        parser.error(f"--update needs existing results at {stem.with_suffix('.json')}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    runs = []
    for i, (m, n, o, section) in enumerate(jobs * args.rounds, 1):
        print(f"[{i}/{len(jobs) * args.rounds}] {m} {o} at {n} tokens ...", file=sys.stderr, flush=True)
        if args.in_process:
            try:
                row = measure(args, m, n, o)
            except Exception:
                row = {"error": traceback.format_exc()}
        else:
            row = run_child("bench.speed", [m, str(n), o or "-", "--model", args.model, "--repeats", str(args.repeats),
                                            "--device", args.device, "--dtype", args.dtype] + (["--quick"] if args.quick else []),
                            timeout=args.timeout)
        row.update({"measurement": m, "length": n, "option": o, "section": section})
        runs.append(row)
        print(f"      {row.get('seconds', float('nan')):.3g} s, {row.get('peak_bytes', 0) / 2**20:,.0f} MiB" if "error" not in row
              else f"      failed: {short_error(row['error'])}", file=sys.stderr, flush=True)
    rows = fastest(runs)
    command = " ".join(["python -m bench.speed"] + sys.argv[1:])
    if args.update:  # the other rows, and the command and machine they were measured with, stay
        result = json.loads(stem.with_suffix(".json").read_text())
        new = {(r["measurement"], r["length"], r["option"]) for r in rows}
        result["rows"] = [r for r in result["rows"] if (r["measurement"], r["length"], r["option"]) not in new] + rows
        result.setdefault("updates", []).append(command)
        write_results(stem, result, markdown)
        return
    result = {"model": f"{label} (bundled GGUF)", "machine": machine(args.device), "repeats": args.repeats, "units": units(args.model),
              "quick": args.quick, "dtype": args.dtype, "rows": rows,
              "command": command}
    write_results(stem, result, markdown)


if __name__ == "__main__":
    main()
