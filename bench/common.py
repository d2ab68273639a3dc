"""What the benchmark scripts share: peak-memory measurement, timed calls, child processes, machine facts,
and the inputs several of them use (random token pairs, the prompts a model answers correctly)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

# the bundled models a benchmark can run on: name -> (file stem, how the results name it)
MODELS = {"smollm2-135m": ("smollm2", "SmolLM2-135M-Instruct"), "gemma3-270m": ("gemma3", "Gemma 3 270M")}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the level at entry (RSS sampled every ms on CPU; the CUDA allocator on GPU)."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            # hand memory freed earlier (model loading) back to the OS, or new tensors would reuse
            # it without raising the resident size
            gc.collect()
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, _rss() - self.base)


def find_row(rows: list[dict], m: str, n: int, o: str = "") -> dict | None:
    """The successful measurement ``m`` (option ``o``) at ``n`` tokens of a speed result's rows, or None."""
    return next((r for r in rows if r["measurement"] == m and r["length"] == n and r["option"] == o and "error" not in r), None)


def cost_cell(r: dict | None, base: dict | None = None) -> str:
    """A measurement as a table cell: "seconds (ratio to base), peak MiB", or "—" when there is none."""
    if r is None:
        return "—"
    ratio = f" ({r['seconds'] / base['seconds']:.2f}×)" if base is not None else ""
    return f"{r['seconds']:.3g} s{ratio}, {r['peak_bytes'] / 2**20:,.0f} MiB"


ROOT = Path(__file__).resolve().parent.parent  # the repository, where ``python -m bench.<name>`` runs


def run_child(module: str, args: list[str], timeout: float | None = None) -> dict:
    """Run ``python -m MODULE --child ARGS`` in a fresh process and return the JSON it prints last."""
    try:
        out = subprocess.run([sys.executable, "-m", module, "--child", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s (the --timeout of one measurement)"}
    if out.returncode < 0:  # a signal: the kernel's out-of-memory killer, most often
        why = " (SIGKILL: out of memory)" if out.returncode == -9 else ""
        return {"error": f"killed by signal {-out.returncode}{why}"}
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        return {"error": tail or f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformer_lens": version("transformer_lens"),
        "dpa_lens": version("dpa-lens"),
        "python": platform.python_version(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def short_error(text: str, limit: int = 200) -> str:
    """The last line of a failure, without the exception's module path, cut at a sentence when long."""
    line = text.strip().splitlines()[-1] if text.strip() else "unknown error"
    line = re.sub(r"^(?:\w+\.)+(\w+(?:Error|Exception|Exit)):", r"\1:", line)
    if len(line) > limit:
        cut = line.find(". ", 0, limit)
        line = line[: cut + 1] if cut > 0 else line[:limit] + "…"
    return line


def write_results(stem: Path, result: dict, markdown: Callable[[dict], str]) -> None:
    """Write ``stem.json`` and ``stem.md`` (the markdown rendering), and print the markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(text)


def time_calls(once: Callable[[], object], device: str, repeats: int) -> tuple[list[float], int]:
    """Seconds of ``once()`` and its peak memory: a warm-up (whose peak is the measurement's: the peak above
    the level at entry), then up to ``repeats`` timed calls, fewer once they add up to 20 s, none after a
    warm-up over a minute or with ``repeats=0`` (the warm-up is then the measurement)."""
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        once()
        first = time.perf_counter() - start
    times = [first]
    if first < 60 and repeats > 0:
        times = []
        while len(times) < repeats and (not times or sum(times) < 20):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return times, mem.peak


def random_pair(model, length: int, device: str = "cpu"):
    """Random token ids ``[1, length]`` (BOS first) and a corrupted copy with the middle token changed, seeded by the length."""
    import torch

    gen = torch.Generator().manual_seed(length)
    clean = torch.randint(100, model.cfg.d_vocab, (1, length), generator=gen)
    clean[0, 0] = model.tokenizer.bos_token_id
    corrupted = clean.clone()
    corrupted[0, length // 2] = (corrupted[0, length // 2] + 1) % model.cfg.d_vocab
    return clean.to(device), corrupted.to(device)


def correct_subset(model, prompts: list[str], answers: list[str], n: int, usable=lambda i: True) -> list[int]:
    """Indices of the first ``n`` usable prompts the model answers correctly (authors' filter)."""
    from dpa_lens.datasets import answered_correctly

    keep, start = [], 0
    while len(keep) < n and start < len(prompts):
        chunk = [i for i in range(start, min(start + 4 * n, len(prompts))) if usable(i)]
        keep += [chunk[i] for i in answered_correctly(model, [prompts[j] for j in chunk], [answers[j] for j in chunk])]
        start += 4 * n
    return keep[:n]


def first_token(model, answer: str) -> int:
    """The answer's first token: the authors attribute (and measure) it when an answer has several."""
    return model.tokenizer.encode(answer, add_special_tokens=False)[0]
