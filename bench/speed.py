"""Seconds and peak memory per example of every costly method, on SmolLM2-135M.

    python bench/speed.py            # the full run (~27 min on 2 CPU cores, 11 of them at 8192 tokens)
    python bench/speed.py --quick    # a few points, for CI
    python bench/speed.py --device cuda

Three tables:

1. time and peak memory per example against one plain forward+backward, at 32 … 2048 tokens:
   DPA (tokens, heads and neurons, the cache forward included), AtP (clean forward, corrupted
   forward and backward), integrated gradients (128 steps) and exact activation patching of every
   head (both at 32 and 256 tokens);
2. scaling in the number of components attributed, at 256 tokens: DPA scoring only tokens, adding
   heads, neurons and per-key head scores, against exact patching of 9, 90 and 270 heads;
3. the longest context DPA handles within 24 GiB (patterns recomputed, not cached), trying
   SmolLM2's maximum of 8192 tokens first, then 4096 and 2048.

Each measurement is a warm-up (whose peak memory is recorded) and then up to --repeats timed runs
(fewer once they add up to 20 s; none after a warm-up over a minute).

Each measurement runs in a fresh process (see _common.PeakMemory). Writes
bench/results/speed_smollm2[_cuda].md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, machine, run_child, write_results

RESULTS = Path(__file__).parent / "results"
LIMIT_BYTES = 24 * 2**30


def run_one(measurement: str, length: int, repeats: int, device: str, option: str) -> dict:
    import torch

    import dpa_lens

    model = dpa_lens.load_model("smollm2-135m", device=device)
    gen = torch.Generator().manual_seed(length)
    clean = torch.randint(100, model.cfg.d_vocab, (1, length), generator=gen)
    clean[0, 0] = model.tokenizer.bos_token_id
    corrupted = clean.clone()
    corrupted[0, length // 2] = (corrupted[0, length // 2] + 1) % model.cfg.d_vocab
    clean, corrupted = clean.to(model.cfg.device), corrupted.to(model.cfg.device)
    target = (model.to_single_token(" Mary"), model.to_single_token(" John"))

    def once():
        if measurement == "forward+backward":
            logits = model(clean)
            (logits[0, -1, target[0]] - logits[0, -1, target[1]]).backward()
            model.zero_grad(set_to_none=True)
        elif measurement == "dpa":
            kinds = {"tokens": ("tokens",), "tokens+heads": ("tokens", "heads")}.get(option, ("tokens", "heads", "neurons"))
            patterns = option != "no-patterns"
            with torch.no_grad():
                _, cache = model.run_with_cache(clean, names_filter=dpa_lens.dpa_names_filter(model, patterns=patterns))
                dpa_lens.dpa(model, cache, target, kinds=kinds, head_keys=option == "head_keys")
        elif measurement == "atp":
            dpa_lens.atp(model, clean, corrupted, target)
        elif measurement == "integrated_gradients":
            dpa_lens.integrated_gradients(model, clean, target, steps=128, batch_size=max(1, 1024 // length), progress=False, warn_gap=float("inf"))
        elif measurement == "patching":
            layers = {"9": [0], "90": list(range(10))}.get(option)
            dpa_lens.activation_patching(model, clean, corrupted, target, unit="heads", layers=layers, progress=False)
        else:
            raise ValueError(measurement)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with PeakMemory(device) as mem:
        start = time.perf_counter()
        once()  # warm-up, whose peak is the measurement's peak
        first = time.perf_counter() - start
    times = [first]
    if first < 60:  # long runs: the warm-up is the measurement
        times = []
        while len(times) < repeats and (not times or sum(times) < 20):  # at most ~20 s of repeats
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return {"measurement": measurement, "length": length, "option": option, "seconds": statistics.median(times), "peak_bytes": mem.peak}


def plan(quick: bool) -> tuple[list, list, list]:
    if quick:
        lengths = [32, 128]
        main = [(m, n, "") for n in lengths for m in ("forward+backward", "dpa", "atp")] + [("integrated_gradients", 32, ""), ("patching", 32, "")]
        scaling = [("dpa", 128, "tokens")]
        longest = [("dpa", 512, "no-patterns")]
        return main, scaling, longest
    lengths = [32, 256, 1024, 2048]
    main = [(m, n, "") for n in lengths for m in ("forward+backward", "dpa", "atp")]
    main += [(m, n, "") for m in ("integrated_gradients", "patching") for n in (32, 256)]
    # at 256 tokens the main table already has DPA with every kind and patching of all 270 heads
    scaling = [("dpa", 256, o) for o in ("tokens", "tokens+heads", "head_keys")] + [("patching", 256, o) for o in ("9", "90")]
    longest = [("dpa", n, "no-patterns") for n in (8192, 4096, 2048)]  # from the model's maximum down
    return main, scaling, longest


def mib(row: dict) -> str:
    return f"{row['peak_bytes'] / 2**20:,.0f} MiB"


def markdown(result: dict) -> str:
    rows = result["rows"]
    mach = result["machine"]
    where = mach.get("gpu") or f"{mach['cpu_count']} CPU cores"
    get = lambda m, n, o="": next((r for r in rows if r["measurement"] == m and r["length"] == n and r["option"] == o and "error" not in r), None)  # noqa: E731
    lines = [
        "# Speed and memory of dpa_lens's methods on SmolLM2-135M",
        "",
        f"Device: {mach['device']} ({where}); torch {mach['torch']}, TransformerLens {mach['transformer_lens']}. "
        f"Median of up to {result['repeats']} runs after a warm-up (fewer once they add up to 20 s; the warm-up alone when "
        "it takes over a minute); peak memory above "
        "the loaded model. Per example (one prompt). Produced by `python bench/speed.py"
        + (" --quick`." if result["quick"] else "`."),
        "",
        "## Per example, against one forward+backward",
        "",
        "| tokens | forward+backward | DPA | AtP | integrated gradients (128 steps) | exact patching, 270 heads |",
        "|---:|---|---|---|---|---|",
    ]
    for n in sorted({r["length"] for r in rows if r["option"] == "" and r["measurement"] == "forward+backward"}):
        base = get("forward+backward", n)
        cells = []
        for m in ("forward+backward", "dpa", "atp", "integrated_gradients", "patching"):
            r = get(m, n)
            if r is None:
                cells.append("not run" if m in ("integrated_gradients", "patching") else "failed")
                continue
            ratio = f" ({r['seconds'] / base['seconds']:.2f}×)" if base and m != "forward+backward" else ""
            cells.append(f"{r['seconds']:.2f} s{ratio}, {mib(r)}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    scaling = [r for r in rows if r.get("section") == "scaling"]
    if scaling:
        n = scaling[0]["length"]
        order = [("dpa", "tokens"), ("dpa", "tokens+heads"), ("dpa", ""), ("dpa", "head_keys"), ("patching", "9"), ("patching", "90"), ("patching", "")]
        scaling = [r for key in order for r in rows if (r["measurement"], r["option"]) == key and r["length"] == n
                   and r.get("section") in ("scaling", "main")]
        lines += ["", f"## Scaling in the number of components attributed ({n} tokens)", "",
                  "| method | units scored | seconds | peak memory |", "|---|---|---:|---:|"]
        names = {("dpa", "tokens"): "tokens", ("dpa", "tokens+heads"): "tokens + 270 heads × positions",
                 ("dpa", ""): "tokens + heads × positions + 46,080 neurons × positions",
                 ("dpa", "head_keys"): "… + heads × query × key positions",
                 ("patching", "9"): "9 heads", ("patching", "90"): "90 heads", ("patching", ""): "270 heads"}
        for r in scaling:
            if "error" in r:
                continue
            lines.append(f"| {'DPA' if r['measurement'] == 'dpa' else 'exact patching'} | {names[(r['measurement'], r['option'])]} | {r['seconds']:.2f} | {mib(r)} |")
    longest = [r for r in rows if r.get("section") == "longest"]
    if longest:
        lines += ["", "## Longest context within 24 GiB (DPA, patterns recomputed in the sweep)", "",
                  "| tokens | seconds | peak memory | within 24 GiB |", "|---:|---:|---:|---|"]
        for r in longest:
            if "error" in r:
                lines.append(f"| {r['length']} | failed | | no ({r['error'].splitlines()[-1][:80]}) |")
            else:
                lines.append(f"| {r['length']} | {r['seconds']:.1f} | {mib(r)} | {'yes' if r['peak_bytes'] < LIMIT_BYTES else 'no'} |")
        ok = [r["length"] for r in longest if "error" not in r and r["peak_bytes"] < LIMIT_BYTES]
        lines += ["", f"Longest context measured within 24 GiB: **{max(ok) if ok else 'none'} tokens**"
                  + (" (SmolLM2's maximum is 8192)." if ok and max(ok) == 8192 else ".")]
    lines += ["", "DPA's time does not grow with the number of units it scores (one sweep gives all of them); exact "
              "patching's grows linearly with it. Random token ids are used as prompts: the cost does not depend on the text.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=3, metavar=("MEASUREMENT", "LENGTH", "OPTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        m, n, o = args.child
        print(json.dumps(run_one(m, int(n), args.repeats, args.device, o if o != "-" else "")))
        return
    main_rows, scaling, longest = plan(args.quick)
    jobs = [(j, "main") for j in main_rows] + [(j, "scaling") for j in scaling] + [(j, "longest") for j in longest]
    rows = []
    for i, ((m, n, o), section) in enumerate(jobs, 1):
        if section == "longest" and any(r.get("section") == "longest" and "error" not in r and r["peak_bytes"] < LIMIT_BYTES for r in rows):
            break  # a longer context already fits
        print(f"[{i}/{len(jobs)}] {m} {o} at {n} tokens ...", file=sys.stderr, flush=True)
        row = run_child(__file__, [m, str(n), o or "-", "--repeats", str(args.repeats), "--device", args.device])
        row.update({"measurement": m, "length": n, "option": o, "section": section})
        rows.append(row)
        print(f"      {row.get('seconds', float('nan')):.2f} s, {row.get('peak_bytes', 0) / 2**20:,.0f} MiB" if "error" not in row
              else f"      failed: {row['error'].splitlines()[-1][:120]}", file=sys.stderr, flush=True)
    result = {"model": "SmolLM2-135M-Instruct (bundled GGUF, float32)", "machine": machine(args.device), "repeats": args.repeats,
              "quick": args.quick, "rows": rows}
    suffix = "" if args.device == "cpu" else "_" + args.device.split(":")[0]
    write_results(args.out / f"speed_smollm2{suffix}{'_quick' if args.quick else ''}", result, markdown)


if __name__ == "__main__":
    main()
