"""DPA's cost against one plain forward+backward, on SmolLM2-135M.

    python bench/dpa_speed.py                       # 32, 256, 1024 tokens on CPU
    python bench/dpa_speed.py --device cuda --lengths 32 256 1024 4096

Each (length, measurement) runs in a fresh process, so that peak memory is that measurement's
own: peak resident memory above the level after loading the model on CPU, peak allocated
memory above the model's on CUDA. Times are medians over ``--repeats`` runs after one warm-up.

Measurements:
  forward             model(tokens) without gradients (reference)
  forward+backward    model(tokens), then backward of a logit difference (parameters require
                      grad, as in a default TransformerLens session)
  fwd+bwd (inputs)    the same with the parameters frozen and only the embeddings requiring grad:
                      the cheapest gradient one can get, the floor of any gradient method
  DPA                 run_with_cache under no_grad with dpa_names_filter, then dpa() for tokens,
                      heads and neurons (the user's forward counted in)

Writes bench/results/dpa_speed_<device>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import PeakMemory, machine, run_child, write_results  # noqa: E402

MEASUREMENTS = ("forward", "forward+backward", "fwd+bwd (inputs)", "DPA")
RESULTS = Path(__file__).parent / "results"


def run_one(length: int, measurement: str, repeats: int, device: str, threads: int) -> dict:
    """Body of a child process: load the model, time one measurement, return its numbers."""
    import torch

    import dpa_lens

    if threads:
        torch.set_num_threads(threads)
    model = dpa_lens.load_model("smollm2-135m", device=device)
    gen = torch.Generator().manual_seed(length)
    tokens = torch.randint(100, model.cfg.d_vocab, (1, length), generator=gen).to(model.cfg.device)
    tokens[0, 0] = model.tokenizer.bos_token_id
    good, bad = model.to_single_token(" Mary"), model.to_single_token(" John")
    names = dpa_lens.dpa_names_filter(model)

    def metric(logits):
        return logits[0, -1, good] - logits[0, -1, bad]

    if measurement == "fwd+bwd (inputs)":
        for p in model.parameters():
            p.requires_grad_(False)

    def once():
        if measurement == "forward":
            with torch.no_grad():
                model(tokens)
        elif measurement == "forward+backward":
            metric(model(tokens)).backward()
            model.zero_grad(set_to_none=True)
        elif measurement == "fwd+bwd (inputs)":
            grads = []

            def leaf(x, hook):
                x = x.detach().requires_grad_(True)
                grads.append(x)
                return x

            value = metric(model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", leaf)]))
            value.backward()
            assert grads[0].grad is not None
        else:
            with torch.no_grad():
                _, cache = model.run_with_cache(tokens, names_filter=names)
                attr = dpa_lens.dpa(model, cache, (good, bad))
            del cache, attr
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with PeakMemory(device) as mem:
        once()  # warm-up, whose peak is the measurement's peak
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        times.append(time.perf_counter() - start)
    return {"length": length, "measurement": measurement, "seconds": statistics.median(times), "times": times, "peak_bytes": mem.peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=2, metavar=("LENGTH", "MEASUREMENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_one(int(args.child[0]), args.child[1], args.repeats, args.device, args.threads)))
        return

    rows = []
    jobs = [(n, m) for n in args.lengths for m in MEASUREMENTS]
    for i, (n, m) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] {n} tokens: {m} ...", file=sys.stderr, flush=True)
        row = run_child(__file__, [str(n), m, "--repeats", str(args.repeats), "--device", args.device, "--threads", str(args.threads)])
        if "error" in row:
            sys.exit(f"{n} tokens, {m} failed:\n{row['error']}")
        rows.append(row)
        print(f"      {rows[-1]['seconds']:.3f} s, peak {rows[-1]['peak_bytes'] / 2**20:.0f} MiB", file=sys.stderr, flush=True)

    result = {"model": "SmolLM2-135M-Instruct (bundled GGUF, float32)", "machine": machine(args.device), "repeats": args.repeats, "rows": rows}
    write_results(args.out / f"dpa_speed_{args.device.split(':')[0]}", result, markdown)


def markdown(result: dict) -> str:
    by = {(r["length"], r["measurement"]): r for r in result["rows"]}
    lengths = sorted({r["length"] for r in result["rows"]})
    mach = result["machine"]
    where = mach.get("gpu") or f"{mach['cpu_count']} CPU cores"
    lines = [
        f"# DPA speed on {result['model']}",
        "",
        f"Device: {mach['device']} ({where}); torch {mach['torch']}, TransformerLens {mach['transformer_lens']}, "
        f"median of {result['repeats']} runs after a warm-up; peak memory above the loaded model. "
        "Produced by `python bench/dpa_speed.py`.",
        "",
        "| tokens | forward | forward+backward | fwd+bwd (inputs only) | DPA (forward + sweep) | DPA / fwd+bwd | DPA / fwd+bwd (inputs) | peak mem fwd+bwd | peak mem DPA |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in lengths:
        f, fb, fi, d = (by[(n, m)] for m in MEASUREMENTS)
        mib = lambda r: f"{r['peak_bytes'] / 2**20:.0f} MiB"  # noqa: E731
        lines.append(
            f"| {n} | {f['seconds']:.3f} s | {fb['seconds']:.3f} s | {fi['seconds']:.3f} s | {d['seconds']:.3f} s | "
            f"{d['seconds'] / fb['seconds']:.2f} | {d['seconds'] / fi['seconds']:.2f} | {mib(fb)} | {mib(d)} |"
        )
    lines += [
        "",
        "DPA here includes the user's `run_with_cache` forward (under `torch.no_grad()`, with "
        "`dpa_names_filter`) and scores every token, head (per position) and neuron (per position). "
        "The goal is at most 1.3 × one forward+backward.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
