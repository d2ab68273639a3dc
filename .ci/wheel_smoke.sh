#!/usr/bin/env bash
# Does dpa_lens install and run outside this repository?
#
# Builds the sdist and, from it, the wheel (python -m build, from a copy of the files git tracks or
# would track, so the checkout is never written to); makes a fresh virtual environment in a
# temporary folder; installs torch first (pinned, so pip never pulls CUDA wheels), then the wheel
# with its dependencies from the package index; then, from a temporary folder (never the repo),
# checks that:
#   * dpa_lens imports from the environment, with py.typed and every data file of the source tree
#     (the benchmark datasets, their NOTICE, the induction model when present) installed;
#   * the benchmark datasets read through the package's own API;
#   * a tiny model runs dpa_lens.run("dpa", ...), and content-only DPA is complete;
#   * the `dpa-lens methods` command runs and lists dpa.
# pip's cache is reused between runs; nothing is byte-compiled at install (only what runs is). Usage: .ci/wheel_smoke.sh  (PYTHON, DPA_LENS_TORCH override;
# KEEP=1 keeps the temporary folder.)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH_PIN=${DPA_LENS_TORCH:-2.13.0}
started=$SECONDS

work=$(mktemp -d "${TMPDIR:-/tmp}/dpa_lens_wheel_smoke.XXXXXX")
cleanup() { if [ "${KEEP:-0}" = 1 ]; then echo ">> kept $work" >&2; else rm -rf "$work"; fi; }
trap cleanup EXIT
step() { echo ">> $* ($((SECONDS - started)) s)" >&2; }
pipq() { "$@" --quiet --no-compile --disable-pip-version-check 2>&1 | { grep -v "is ignored" || true; } >&2; }

step "copying the source tree"
mkdir -p "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard \
    | tar -C "$repo" --null --files-from=- --ignore-failed-read -cf - 2>/dev/null \
    | tar -C "$work/src" -xf -

step "building the sdist, then the wheel from it"
"$PYTHON" -m venv "$work/builder"
pipq "$work/builder/bin/python" -m pip install build
"$work/builder/bin/python" -m build --outdir "$work/dist" "$work/src" >"$work/build.log" 2>&1 \
    || { cat "$work/build.log" >&2; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
echo "   $(basename "$sdist"), $(basename "$wheel")" >&2

step "fresh environment: torch==$TORCH_PIN, then the wheel with its dependencies"
"$PYTHON" -m venv "$work/venv"
pipq "$work/venv/bin/python" -m pip install "torch==$TORCH_PIN"
step "torch installed"
pipq "$work/venv/bin/python" -m pip install "$wheel"

step "smoke test from $work/run"
mkdir -p "$work/run"
cd "$work/run"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
"$work/venv/bin/python" - "$work/src/dpa_lens" <<'EOF'
import sys
from pathlib import Path

import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.datasets.benchmarks import ioi_benchmark, known_1000
from dpa_lens.models.testing import tiny_hf_model, tiny_tokenizer

source, installed = Path(sys.argv[1]), Path(dpa_lens.__file__).parent
assert "site-packages" in installed.parts, f"dpa_lens imported from {installed}, not from the environment"

# every file of the source package that is not Python is package data: it must be installed
def data_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
want = data_files(source)
missing = sorted(want - data_files(installed))
assert not missing, f"data files missing from the wheel (add them to [tool.setuptools.package-data]): {missing}"
assert {"py.typed", "datasets/data/ioi.json", "datasets/data/known_1000.json"} <= want
print(f"   {len(want)} data files installed: {', '.join(sorted(want))}")

assert len(ioi_benchmark()) > 800 and len(known_1000()) > 1200
if (installed / "datasets" / "data" / "induction_2l").is_dir():
    from dpa_lens.datasets.induction import induction_model
    assert induction_model().cfg.n_layers == 2
    print("   the induction model loads")

model = dpa_lens.load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer())
prompt = "When Mary and John went to the store, John gave a drink to"
attr = dpa_lens.run("dpa", model, prompt, (" Mary", " John"))
assert attr.tokens.shape == model.to_tokens(prompt).shape and bool(torch.isfinite(attr.heads).all())
complete = dpa_lens.run("dpa", model, prompt, " Mary", mu=Mu.content_only())
assert torch.allclose(complete.tokens.sum(-1) + complete.bias, complete.target_value, rtol=1e-5, atol=1e-5)
print(f"   dpa on a tiny llama: target {float(attr.target_value[0]):+.4f}, content-only complete")
EOF
"$work/venv/bin/dpa-lens" methods >"$work/methods.txt"
grep -qw dpa "$work/methods.txt" || { cat "$work/methods.txt" >&2; echo "dpa-lens methods does not list dpa" >&2; exit 1; }
echo "   dpa-lens methods: $(grep -cw . "$work/methods.txt") lines" >&2

step "wheel smoke test passed"
