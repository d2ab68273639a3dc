"""Where integrated DPA and edge AtP part from EAP-IG on Gemma 3 270M: EAP-IG's top 15 edges of the first held-out
IOI prompt of MIB's section (bench/circuits.py --model gemma3-270m), each method's score beside exact edge patching.

    python -m bench.gemma_edges      # ~3 min on 2 CPU cores; writes bench/results/gemma_edges.md
"""

from __future__ import annotations

import warnings
from pathlib import Path

from bench.circuits import ioi_prompts
from bench.common import first_token

OUT = Path(__file__).parent / "results" / "gemma_edges.md"
TRAIN = 11  # the first held-out prompt of MIB's section follows its 11 train prompts


def main() -> None:
    import torch

    import dpa_lens
    from dpa_lens.evaluation import correlation

    warnings.simplefilter("ignore")
    model = dpa_lens.load_model("gemma3-270m")
    item = ioi_prompts(model, TRAIN + 1)[TRAIN]
    target = (first_token(model, item.correct), first_token(model, item.incorrect))
    args = (model, item.prompt, item.corrupted, target)
    circuits = {"EAP-IG (inputs)": dpa_lens.eap_ig(*args, progress=False),
                "integrated DPA (3 steps)": dpa_lens.dpa_edges_ig(*args, progress=False),
                "integrated DPA (1 step)": dpa_lens.dpa_edges_ig(*args, steps=1, progress=False),
                "edge AtP": dpa_lens.edge_atp(*args)}
    ig = circuits["EAP-IG (inputs)"]
    R = len(ig.readers)
    top = ig.scores[0].abs().masked_fill(~ig.in_graph, -1).flatten().argsort(descending=True)[:15].tolist()
    edges = [(ig.writers[i // R], *ig.readers[i % R]) for i in top]
    exact = dpa_lens.edge_patching(*args, edges=edges, batch_size=16, progress=False)
    truth = torch.tensor([exact.edge(*e) for e in edges], dtype=torch.float64)
    lines = ["# Gemma 3 270M: EAP-IG's top 15 edges on one held-out IOI prompt, each method against exact edge patching", "",
             f"Prompt: {item.prompt!r} (corrupted: {item.corrupted!r}). Produced by `python -m bench.gemma_edges`.", "",
             "| edge | exact patching | " + " | ".join(circuits) + " |", "|---|---:|" + "---:|" * len(circuits)]
    for e, t in zip(edges, truth.tolist()):
        lines.append(f"| {e[0]} → {e[1]} ({e[2]}) | {t:+.3f} | " + " | ".join(f"{c.edge(*e):+.3f}" for c in circuits.values()) + " |")
    lines += ["", "| method | Pearson r | Spearman ρ |", "|---|---:|---:|"]
    for name, c in circuits.items():
        p, s = correlation(torch.tensor([c.edge(*e) for e in edges], dtype=torch.float64), truth)
        lines.append(f"| {name} | {p:.2f} | {s:.2f} |")
    OUT.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
