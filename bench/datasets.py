"""Datasets at scale: records per second of `dpa_lens.attribute_dataset` against the floor, one process or two,
and peak memory against the number of records.

    python -m bench.datasets            # the full run (~25 min on 2 CPU cores)
    python -m bench.datasets --quick    # a few small rows, for CI
    python -m bench.datasets --device cuda   # a GPU section (float32 and bfloat16), when there is a GPU

The records are the authors' benchmark prompts, alternating IOI (target: the IO − S logit difference of
the names' first tokens) and Known 1000 (target: the answer's first token), without corrupted prompts. Every row runs in a fresh
process and times the whole dataset call after a warm-up on other records: tokenizing, batching by
length, the method, and writing the Parquet shards.

1. DPA (tokens, heads, neurons) and DPA edges at batch 1, 8 and 16, against the floor at the same
   batch: the same model in ``transformers`` with SDPA attention, the same batches (records grouped by
   length, padded on the right), one forward and a backward to the input embeddings of the batch's
   targets (parameters frozen);
2. one process with every core's threads against ``torchrun --nproc_per_node 2`` with half the
   threads each (DPA, batch 8; the records dealt between the processes);
3. where the time of a batch-8 DPA run goes (``breakdown``): in one process, the floor, its forward alone, DPA's
   cache forward, DPA's calls as the runner makes them, and the whole dataset call, timed in turn for 4 rounds;
4. peak memory above the loaded model of DPA over 10, 100 and 1,000 records (batch 8), two ways:
   ``memory-one-length``: 16 records of one token length cycled (each copy its own id), after a warm-up on 8
   other records of that length: every full batch has the shape of the warm-up's (10 and 100 records end on a
   shorter one, of 2 and 4), so what grows with the number of records shows (the goal's measure);
   ``memory``: 16 records of different lengths cycled. Batching by length puts the copies of a record
   together, so 1,000 records meet more (batch, length) shapes than 10, and the native libraries under torch
   keep some memory for each shape met (measured: a matmul forward and backward over 120 shapes keeps 18 MiB
   after ``malloc_trim``, one shape 0); this row shows that, and that it levels off.

Writes bench/results/datasets_smollm2[_cuda].md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import ROOT, PeakMemory, machine, run_child, short_error, write_results

RESULTS = Path(__file__).parent / "results"
NAME = "smollm2-135m"
WARMUP = 8  # records run before the timed call (other records than the timed ones)


def records(model, n: int, skip: int = 0) -> list[dict]:
    """``n`` records alternating IOI and Known 1000 (after the first ``skip`` of each), without corrupted prompts."""
    from dpa_lens.datasets import ioi_benchmark, known_1000

    first = lambda text: int(model.tokenizer.encode(text, add_special_tokens=False)[0])  # noqa: E731
    ioi = [item for item in ioi_benchmark() if first(item.correct) != first(item.incorrect)]
    known = known_1000()
    out = []
    for i in range(n):
        k = skip + i // 2
        if i % 2 == 0:  # names of several tokens: their first tokens, as the authors explain the answer's first token
            item = ioi[k % len(ioi)]
            out.append({"id": f"ioi-{k}", "prompt": item.prompt, "target": [first(item.correct), first(item.incorrect)]})
        else:
            fact = known[k % len(known)]
            out.append({"id": f"known-{k}", "prompt": fact.prompt, "target": first(fact.answer)})
    return out


def load(device: str, dtype: str):
    import torch

    import dpa_lens

    return dpa_lens.load_model(NAME, device=device, dtype=getattr(torch, dtype))


def floor_batches(model, recs: list[dict], batch: int):
    """The runner's batches of ``recs`` (by length), as padded token ids, masks, answer positions and targets."""
    import torch

    from dpa_lens.runs.records import Prepared, batches, prepare, read_records

    parsed, _ = read_records(recs)
    prepared = [p for p in (prepare(model, r, needs_target=True, needs_corrupted=False, takes_corrupted=False) for r in parsed)
                if isinstance(p, Prepared)]
    out = []
    for group in batches(prepared, batch):
        rows = [model.to_tokens(p.record.prompt, truncate=False)[0].cpu() for p in group]
        n = max(len(r) for r in rows)
        tokens = torch.full((len(rows), n), model.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)], mask[i, : len(r)] = r, 1
        last = mask.sum(1) - 1
        targets = []
        for p in group:
            t = p.record.target
            ids = [model.to_single_token(x) if isinstance(x, str) else int(x) for x in (t if isinstance(t, tuple) else (t,))]
            targets.append((ids[0], ids[1] if len(ids) > 1 else None))
        out.append((tokens, mask, last, targets))
    return out


def floor_pass(hf, batches, device: str, backward: bool = True) -> None:
    """The floor over `floor_batches`: the transformers model's forward of each batch from its input embeddings and,
    with ``backward``, the backward of the batch's targets to them."""
    import torch

    for tokens, mask, last, targets in batches:
        embeds = hf.get_input_embeddings()(tokens.to(device)).detach().requires_grad_(backward)
        with torch.set_grad_enabled(backward):
            logits = hf(inputs_embeds=embeds, attention_mask=mask.to(device)).logits
            if backward:
                at = logits[torch.arange(len(targets), device=device), last.to(device)]
                sum(at[i, a] - (at[i, b] if b is not None else 0) for i, (a, b) in enumerate(targets)).backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_floor(batch: int, n: int, device: str, dtype: str) -> dict:
    """The floor: transformers (SDPA), forward and backward to the input embeddings, the runner's batches."""
    from bench.speed import load_hf

    model = load(device, dtype)
    hf = load_hf(NAME, device, dtype)

    def run(recs):
        floor_pass(hf, floor_batches(model, recs, batch), device)

    run(records(model, WARMUP, skip=n))
    recs = records(model, n)
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        run(recs)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": mem.peak}


def repeated(model, n: int, k: int = 16) -> list[dict]:
    """``n`` records cycling through the first ``k`` (each copy its own id), of different lengths: batched by length,
    more records meet more batch shapes (see `one_length` for records that all have one)."""
    base = records(model, k)
    return [{**base[i % k], "id": f"{base[i % k]['id']}#{i // k}"} for i in range(n)]


def one_length(model, n: int, k: int = 16, warm: int = WARMUP) -> tuple[list[dict], list[dict]]:
    """``warm`` records and ``n`` records cycling through ``k`` others (each copy its own id), all of the token
    length most common among the benchmark's first 400 records."""
    from dpa_lens.inputs import prepare_tokens

    by_length: dict[int, list[dict]] = {}
    for rec in records(model, 400):
        by_length.setdefault(int(prepare_tokens(model, rec["prompt"])[0].shape[-1]), []).append(rec)
    same = max(by_length.values(), key=len)
    if len(same) < k + warm:
        raise RuntimeError(f"only {len(same)} records of one length, {k + warm} wanted")
    base = same[warm : warm + k]
    return same[:warm], [{**base[i % k], "id": f"{base[i % k]['id']}#{i // k}"} for i in range(n)]


def child_method(method: str, batch: int, n: int, device: str, dtype: str, memory: str | None = None) -> dict:
    """`attribute_dataset` of ``method`` over ``n`` records into a fresh folder, after a warm-up (``memory``:
    "memory", the records of `repeated`; "memory-one-length", those of `one_length`)."""
    import warnings

    import torch

    import dpa_lens

    model = load(device, dtype)
    warnings.simplefilter("ignore")  # "the target is not the model's prediction" for some Known 1000 records
    with tempfile.TemporaryDirectory() as tmp:
        if memory == "memory-one-length":
            warm, recs = one_length(model, n)
        else:
            warm, recs = records(model, WARMUP, skip=n), (repeated(model, n) if memory else records(model, n))
        dpa_lens.attribute_dataset(model, method, warm, Path(tmp) / "warm", batch_size=batch, progress=False)
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            res = dpa_lens.attribute_dataset(model, method, recs, Path(tmp) / "run", batch_size=batch, progress=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        written, skipped = len(res), len(res.skipped)
    return {"seconds": seconds, "peak_bytes": mem.peak, "written": written, "skipped": skipped}


def child_breakdown(batch: int, n: int, device: str, dtype: str, rounds: int = 4) -> dict:
    """Where a dataset run's time goes, in one process, the stages measured in turn for ``rounds`` rounds (fastest
    kept): the floor, the floor's forward alone, the method's cache forward, the method's calls as the runner makes
    them (cache forward included, no files), and the whole `attribute_dataset` call (tokenizing, batching, shards)."""
    import warnings

    import torch

    import dpa_lens
    from bench.speed import load_hf
    from dpa_lens.methods.registry import cache_for, get_method
    from dpa_lens.runs.records import Prepared, batches, prepare, read_records
    from dpa_lens.runs.runner import _call

    model, hf = load(device, dtype), load_hf(NAME, device, dtype)
    warnings.simplefilter("ignore")
    recs = records(model, n)
    padded = [(tokens.to(device), mask.to(device), last, targets) for tokens, mask, last, targets in floor_batches(model, recs, batch)]
    parsed, _ = read_records(recs)
    prepared = [p for p in (prepare(model, r, needs_target=True, needs_corrupted=False, takes_corrupted=False) for r in parsed)
                if isinstance(p, Prepared)]
    groups, spec = list(batches(prepared, batch)), get_method("dpa")

    def forward() -> None:
        for tokens, mask, _, _ in padded:
            cache_for(model, tokens, attention_mask=mask)

    def calls() -> None:
        for group in groups:
            _call(model, spec, group, -1, {})

    written: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        def dataset() -> None:
            folder = Path(tmp) / f"run{len(os.listdir(tmp))}"
            written.append(len(dpa_lens.attribute_dataset(model, "dpa", recs, folder, batch_size=batch, progress=False)))

        stages = {"floor": lambda: floor_pass(hf, padded, device), "floor_forward": lambda: floor_pass(hf, padded, device, backward=False),
                  "cache_forward": forward, "method_calls": calls, "dataset_call": dataset}
        seconds: dict[str, list[float]] = {k: [] for k in stages}
        for _ in range(rounds + 1):  # the first round warms up
            for name, fn in stages.items():
                start = time.perf_counter()
                fn()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
    return {"seconds": min(seconds["dataset_call"][1:]), "written": min(written), "stages": {k: min(v[1:]) for k, v in seconds.items()},
            "rounds": {k: v[1:] for k, v in seconds.items()}}


def child_processes(method: str, batch: int, n: int, device: str, dtype: str) -> dict | None:
    """One of ``torchrun``'s processes: the dataset call between two barriers; rank 0 reports the wall time."""
    import warnings

    import torch

    import dpa_lens
    from dpa_lens.runs.distributed import Processes

    procs = Processes.start()
    model = load(device, dtype)
    warnings.simplefilter("ignore")
    out = Path(os.environ["BENCH_DATASETS_OUT"])
    dpa_lens.attribute_dataset(model, method, records(model, WARMUP, skip=n), out / "warm", batch_size=batch, progress=False)
    procs.barrier()
    start = time.perf_counter()
    res = dpa_lens.attribute_dataset(model, method, records(model, n), out / "run", batch_size=batch, progress=False)
    seconds = time.perf_counter() - start
    procs.stop()
    return {"seconds": seconds, "written": len(res), "threads_each": torch.get_num_threads()} if procs.rank == 0 else None


def run_processes(method: str, batch: int, n: int, device: str, dtype: str, nproc: int, timeout: float) -> dict:
    threads = max(1, (os.cpu_count() or 2) // nproc)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_DATASETS_OUT": tmp}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "bench.datasets",
               "--child", "processes", method, str(batch), str(n), "--device", device, "--dtype", dtype]
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:  # the failing process's own error, not the launcher's summary
        errors = [line for line in done.stderr.splitlines() if re.match(r"^\w+(\.\w+)*(Error|Exception): ", line)
                  and "ChildFailedError" not in line]
        return {"error": short_error(errors[-1] if errors else done.stderr)}
    lines = [line for line in done.stdout.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def fastest(runs: list[dict]) -> dict:
    """One row from its rounds: the fastest run (an error only where every round failed), with every round's seconds."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    best = min(good, key=lambda r: r["seconds"])
    return {**best, "rounds": [r["seconds"] for r in good]} if len(runs) > 1 else best


def plan(quick: bool) -> list[tuple[str, str, int, int]]:
    """(section, measurement, batch, records) of each row."""
    if quick:
        return [("speed", m, 2, 4) for m in ("floor", "dpa", "dpa_edges")] + [("processes", "dpa", 2, 4), ("breakdown", "dpa", 2, 4)]
    rows = [("speed", m, b, 64) for b in (1, 8, 16) for m in ("floor", "dpa")]
    rows += [("speed", m, b, 32) for b in (1, 8) for m in ("floor", "dpa_edges")]
    rows += [("processes", "dpa", 8, 64), ("breakdown", "dpa", 8, 64)]
    rows += [(kind, "dpa", 8, n) for kind in ("memory-one-length", "memory") for n in (10, 100, 1000)]
    return rows


def rounds_note(rows: list[dict]) -> str:
    """What the speed rows' rounds were, where they had several."""
    rounds = [r["rounds"] for r in rows if r["section"] in ("speed", "processes") and "rounds" in r]
    if not rounds:
        return ""
    spread = max(max(x) / min(x) for x in rounds)
    return (f" Each timed row (speed, processes) is the fastest of {len(rounds[0])} rounds, the rows measured in turn in each "
            f"round (a row's slowest round took up to {spread:.2f}× its fastest on this machine).")


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    rows = result["rows"]
    find = lambda sec, meas, b, n: next((r for r in rows if (r["section"], r["measurement"], r["batch"], r["records"]) == (sec, meas, b, n)  # noqa: E731
                                         and "error" not in r), None)
    per = lambda r: r["seconds"] / r["records"]  # noqa: E731
    lines = [
        f"# Datasets at scale: {s['model']}",
        "",
        f"Device: {m['device']} ({m['cpu_count']} CPU cores); torch {m['torch']}, TransformerLens {m['transformer_lens']}, "
        f"{s['dtype']}. Produced by `{s['command']}` in {s['seconds'] / 60:.0f} min. Records alternate IOI (the IO − S "
        "logit difference) and Known 1000 (the answer's first token); each row is a fresh process timing one whole "
        "`attribute_dataset` call (tokenizing, batching by length, the method, writing the Parquet shards) after a "
        "warm-up on other records. The floor: the same model in transformers (SDPA), the same batches, one forward and "
        "a backward to the input embeddings." + rounds_note(rows),
        "",
        "## Seconds per record against the floor",
        "",
        "| batch | records | floor | DPA (tokens, heads, neurons) | DPA / floor | DPA edges | edges / floor | edges / DPA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b in sorted({r["batch"] for r in rows if r["section"] == "speed"}):
        for n in sorted({r["records"] for r in rows if r["section"] == "speed" and r["batch"] == b}):
            floor, dpa, edges = find("speed", "floor", b, n), find("speed", "dpa", b, n), find("speed", "dpa_edges", b, n)
            if floor is None:
                continue
            cell = lambda r: "—" if r is None else f"{per(r) * 1000:.0f} ms"  # noqa: E731
            ratio = lambda r, base: "—" if r is None or base is None else f"{per(r) / per(base):.2f}×"  # noqa: E731
            dpa_same_n = dpa or find("speed", "dpa", b, max((r["records"] for r in rows if r["measurement"] == "dpa" and r["batch"] == b), default=0))
            lines.append(f"| {b} | {n} | {cell(floor)} | {cell(dpa)} | {ratio(dpa, floor)} | {cell(edges)} | {ratio(edges, floor)} | "
                         f"{ratio(edges, dpa_same_n)} |")
    procs = [r for r in rows if r["section"] == "processes"]
    if procs:
        lines += ["", "## One process or two (torchrun, gloo; the same total threads)", "",
                  "| method | batch | records | one process | two processes | two / one |", "|---|---|---|---|---|---|"]
        for r in procs:
            one = find("speed", r["measurement"], r["batch"], r["records"])
            if "error" in r or one is None:
                lines.append(f"| {r['measurement']} | {r['batch']} | {r['records']} | — | {r.get('error', '—')} | — |")
                continue
            lines.append(f"| {r['measurement']} | {r['batch']} | {r['records']} | {one['seconds']:.1f} s ({one.get('threads', '?')} threads) | "
                         f"{r['seconds']:.1f} s ({r.get('threads_each', '?')} threads each) | {r['seconds'] / one['seconds']:.2f}× |")
    breakdown = [r for r in rows if r["section"] == "breakdown" and "error" not in r]
    for r in breakdown:
        st, n = r["stages"], r["records"]
        lines += ["", f"## Where a dataset run's time goes (DPA, batch {r['batch']}, {n} records, one process)", "",
                  f"Each stage timed in turn in one process, {len(r['rounds']['floor'])} rounds after a warm-up round, the "
                  "fastest kept; per record, and against the floor:", "",
                  "| stage | per record | / floor |", "|---|---:|---:|"]
        labels = {"floor": "the floor (transformers forward + backward)", "floor_forward": "the floor's forward alone",
                  "cache_forward": "DPA's cache forward (`cache_for`)", "method_calls": "DPA's calls as the runner makes them "
                  "(cache forward + sweep + checks; no files)", "dataset_call": "the whole `attribute_dataset` call (+ tokenizing, "
                  "batching, Parquet shards)"}
        for k, label in labels.items():
            lines.append(f"| {label} | {st[k] / n * 1000:.0f} ms | {st[k] / st['floor']:.2f}× |")
    memory = {kind: sorted((r for r in rows if r["section"] == kind and "error" not in r), key=lambda r: r["records"])
              for kind in ("memory-one-length", "memory")}
    if any(memory.values()):
        lines += ["", "## Peak memory against the number of records (DPA, batch 8)", "",
                  "Above the loaded model, after a warm-up. *One length*: 16 records of one token length cycled, so "
                  "every full batch has the warm-up's shape (10 and 100 records end on a shorter one; the goal: 10 and 1,000 "
                  "records within 10 %). *Mixed lengths*: 16 "
                  "records of different lengths cycled; 1,000 records meet more batch shapes than 10, and the native "
                  "libraries under torch keep memory for each shape met (it levels off).", "",
                  "| records | records of | peak above the model | seconds per record |", "|---|---|---|---|"]
        for kind, label in (("memory-one-length", "one length"), ("memory", "mixed lengths")):
            for r in memory[kind]:
                lines.append(f"| {r['records']:,} | {label} | {r['peak_bytes'] / 2**20:,.0f} MiB | {per(r) * 1000:.0f} ms |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "Failed rows: " + "; ".join(f"{r['section']}/{r['measurement']} batch {r['batch']}: {r['error']}" for r in failed)]
    if not result["machine"]["device"].startswith("cuda"):
        lines += ["", "No GPU section: this machine has none (run `python -m bench.datasets --device cuda` where there is one)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--sections", nargs="+", choices=["speed", "processes", "breakdown", "memory-one-length", "memory"], default=None,
                        help="measure these sections only (default: all)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="times each timed row (speed, processes) is measured, in interleaved rounds; the fastest is kept "
                        "(default 3, quick 1)")
    parser.add_argument("--update", action="store_true", help="merge the rows measured into the committed results")
    parser.add_argument("--child", nargs=4, metavar=("KIND", "METHOD", "BATCH", "RECORDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, method, batch, n = args.child[0], args.child[1], int(args.child[2]), int(args.child[3])
        try:
            if kind == "processes":
                out = child_processes(method, batch, n, args.device, args.dtype)
            elif kind == "breakdown":
                out = child_breakdown(batch, n, args.device, args.dtype)
            elif method == "floor":
                out = child_floor(batch, n, args.device, args.dtype)
            else:
                out = child_method(method, batch, n, args.device, args.dtype, memory=kind if kind.startswith("memory") else None)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        if out is not None:
            import torch

            print(json.dumps({**out, "threads": torch.get_num_threads()}))
        return
    started = time.perf_counter()
    dtypes = [args.dtype] if not args.device.startswith("cuda") else ["float32", "bfloat16"]
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    rows = []
    for dtype in dtypes:
        todo = [row for row in plan(args.quick) if not args.sections or row[0] in args.sections]
        runs: dict[tuple, list[dict]] = {}
        for k in range(rounds):  # the timed rows measured in turn, round after round: the machine's drift meets them all
            for section, measurement, batch, n in todo:
                if k and section not in ("speed", "processes"):  # memory rows: one round; the breakdown has its own
                    continue
                print(f"{section} {measurement} batch {batch}, {n} records, {dtype} (round {k + 1}) ...", file=sys.stderr, flush=True)
                if section == "processes":
                    got = run_processes(measurement, batch, n, args.device, dtype, 2, args.timeout)
                else:
                    got = run_child("bench.datasets", [section, measurement, str(batch), str(n), "--device", args.device, "--dtype", dtype],
                                    timeout=args.timeout)
                    if "error" in got:
                        got["error"] = short_error(got["error"])
                runs.setdefault((section, measurement, batch, n), []).append(got)
                print(f"  {got}", file=sys.stderr, flush=True)
        for (section, measurement, batch, n), got in runs.items():
            base = {"section": section, "measurement": measurement, "batch": batch, "records": n, "dtype": dtype}
            rows.append({**base, **fastest(got)})
    import torch

    command = "python -m bench.datasets" + (" --quick" if args.quick else "") + (f" --device {args.device}" if args.device != "cpu" else "")
    result = {"machine": {**machine(args.device), "torch_threads": torch.get_num_threads()},
              "settings": {"model": "SmolLM2-135M-Instruct", "dtype": ",".join(dtypes), "quick": args.quick, "command": command,
                           "seconds": time.perf_counter() - started},
              "rows": rows}
    stem = args.out / ("datasets_smollm2" + ("_cuda" if args.device.startswith("cuda") else "") + ("_quick" if args.quick else ""))
    if args.update and stem.with_suffix(".json").exists():  # the rows measured replace their earlier measurements
        old = json.loads(stem.with_suffix(".json").read_text())
        key = lambda r: (r["section"], r["measurement"], r["batch"], r["records"], r["dtype"])  # noqa: E731
        new = {key(r) for r in rows}
        result["rows"] = [r for r in old["rows"] if key(r) not in new] + rows
        again = f"{command} --sections {' '.join(args.sections or [])} --update"
        result["settings"]["command"] = old["settings"]["command"] + f"`; rows updated by `{again}"
        result["settings"]["seconds"] += old["settings"]["seconds"]
    write_results(stem, result, markdown)


if __name__ == "__main__":
    main()
