"""What starting costs: ``import dpa_lens`` against ``import transformer_lens``, ``dpa-lens --help``, and each
bundled model's first load (the GGUF file dequantised and a float32 copy kept) against its later loads:
``python -m bench.loading [--models smollm2-135m gemma3-270m] [--repeats 3]``.

Every measurement is a fresh process (nothing imported or cached in memory before it); the import and
``--help`` rows are the fastest of ``--repeats``. A first load runs with ``DPA_LENS_CACHE`` set to an empty
folder, so it pays the whole conversion, as a new user does; the later load reads the copy it kept.
Writes bench/results/loading.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import MODELS, machine, write_results

RESULTS = Path(__file__).resolve().parent / "results" / "loading"
LOAD = "import dpa_lens, time; t = time.perf_counter(); dpa_lens.load_model({name!r}, device='cpu'); print(time.perf_counter() - t)"


def _wall(command: list[str], env: dict[str, str] | None = None) -> float:
    """Seconds from starting the process to its end (interpreter start included)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - start


def _inner(code: str, env: dict[str, str]) -> float:
    """Seconds a child process reports for its own timed part (interpreter and imports excluded)."""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env={**os.environ, **env})
    return float(out.stdout.strip().splitlines()[-1])


def measure(models: list[str], repeats: int) -> dict:
    py = sys.executable
    cli = str(Path(py).with_name("dpa-lens"))
    rows = {
        "python alone": min(_wall([py, "-c", "pass"]) for _ in range(repeats)),
        "import torch": min(_wall([py, "-c", "import torch"]) for _ in range(repeats)),
        "import transformer_lens": min(_wall([py, "-c", "import transformer_lens"]) for _ in range(repeats)),
        "import dpa_lens": min(_wall([py, "-c", "import dpa_lens"]) for _ in range(repeats)),
        "dpa-lens --help": min(_wall([cli, "--help"]) for _ in range(repeats)),
    }
    loads = {}
    for name in models:
        with tempfile.TemporaryDirectory() as empty:
            env = {"DPA_LENS_CACHE": empty, "HF_HUB_OFFLINE": "1"}
            first = _inner(LOAD.format(name=name), env)
            later = min(_inner(LOAD.format(name=name), env) for _ in range(repeats))
        loads[name] = {"first": first, "later": later}
        print(f"{name}: first load {first:.1f} s, later {later:.1f} s", file=sys.stderr)
    return {"imports": rows, "loads": loads, "settings": {"repeats": repeats, "models": models}, "machine": machine("cpu")}


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Start-up costs ({m['cpu_count']} CPU cores, torch {m['torch']}, TransformerLens {m['transformer_lens']})", "",
             f"Fresh processes; imports and `--help` the fastest of {r['settings']['repeats']} (interpreter start included).", "",
             "| what | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["imports"].items()]
    lines += ["", "Bundled models (`dpa_lens.load_model(name)` inside the process, imports excluded): the first load converts the GGUF file "
              "and keeps a float32 copy; later loads read the copy.", "", "| model | first load | later loads |", "|---|---|---|"]
    lines += [f"| {k} | {v['first']:.1f} s | {v['later']:.1f} s |" for k, v in r["loads"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="result files' stem (default bench/results/loading)")
    args = parser.parse_args()
    write_results(args.out, measure(args.models, args.repeats), markdown)


if __name__ == "__main__":
    main()
