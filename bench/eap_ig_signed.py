"""Why EAP-IG-activations' signed ranking fails MIB's CPR on SmolLM2: the edge that brings the input into layer 0's
MLP, scored by both forms of EAP-IG and by exact edge patching, and the held-out faithfulness of the activations
form's circuit with that edge's score taken from the inputs form.

Scores averaged over the first 4 train prompts of MIB's section (bench/circuits.py --mib-only), faithfulness
(corrupted ablation, signed ranking, MIB's grid) on its first 4 held-out prompts.

    python -m bench.eap_ig_signed      # ~8 min on 2 CPU cores; writes bench/results/eap_ig_signed.md and .json
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from bench.circuits import ioi_prompts
from bench.common import first_token, write_results

OUT = Path(__file__).parent / "results" / "eap_ig_signed"
TRAIN, TEST, MIB_TRAIN = 4, 4, 11  # MIB's held-out prompts follow its 11 train prompts
EDGE = ("embed", "L0.mlp", "mlp")


def rank(circuit, edge) -> int:
    """The edge's place in the circuit's signed ranking (1: highest), among the graph's edges."""
    w, r = circuit.writers.index(edge[0]), circuit.readers.index(edge[1:])
    scores = circuit.scores[0].masked_fill(~circuit.in_graph, float("-inf"))
    return int((scores > scores[w, r]).sum()) + 1


def measure() -> dict:
    import torch

    import dpa_lens
    from dpa_lens.evaluation.circuit_faithfulness import circuit_faithfulness

    warnings.simplefilter("ignore")
    model = dpa_lens.load_model("smollm2-135m")
    items = ioi_prompts(model, MIB_TRAIN + TEST)
    train, test = items[:TRAIN], items[MIB_TRAIN : MIB_TRAIN + TEST]
    target = lambda its: [(first_token(model, i.correct), first_token(model, i.incorrect)) for i in its]  # noqa: E731
    args = (model, [i.prompt for i in train], target(train))
    circuits = {label: dpa_lens.run(name, *args, corrupted=[i.corrupted for i in train], progress=False).mean()
                for label, name in (("EAP-IG (inputs)", "eap_ig"), ("EAP-IG (activations)", "eap_ig_activations"))}
    exact = [dpa_lens.edge_patching(model, i.prompt, i.corrupted, t, edges=[EDGE], progress=False).edge(*EDGE)
             for i, t in zip(train, target(train))]
    inputs, acts = circuits["EAP-IG (inputs)"], circuits["EAP-IG (activations)"]
    w, r = acts.writers.index(EDGE[0]), acts.readers.index(EDGE[1:])
    scores = acts.scores.clone()
    scores[:, w, r] = inputs.scores[:, w, r]
    mended = dataclasses.replace(acts, scores=scores)
    curves = circuit_faithfulness(model, [i.prompt for i in test], [i.corrupted for i in test], target(test),
                                  [inputs, acts, mended], ablation="corrupted", absolute=False, progress=False)
    labels = ["EAP-IG (inputs)", "EAP-IG (activations)", "EAP-IG (activations), the edge scored as by the inputs form"]
    top = {}
    for label, c in circuits.items():
        R = len(c.readers)
        best = c.scores[0].masked_fill(~c.in_graph, float("-inf")).flatten().topk(5)
        top[label] = [[c.writers[i // R], *c.readers[i % R], v] for v, i in zip(best.values.tolist(), best.indices.tolist())]
    return {"edge": list(EDGE), "train": TRAIN, "test": TEST, "n_edges": int(acts.in_graph.sum()),
            "scores": {label: {"score": c.edge(*EDGE), "rank": rank(c, EDGE)} for label, c in circuits.items()},
            "exact": float(torch.tensor(exact).mean()), "fractions": curves[0].fractions.tolist(),
            "faithfulness": {label: {"cpr": cv.cpr(raw=True), "curve": cv.curve().tolist()} for label, cv in zip(labels, curves)},
            "top": top}


def markdown(r: dict) -> str:
    writer, reader, _ = r["edge"]
    lines = [f"# SmolLM2-135M: EAP-IG-activations' signed ranking and the edge {writer} → {reader}", "",
             f"Scores: the mean over the first {r['train']} train prompts of MIB's section; faithfulness: its first {r['test']} "
             "held-out prompts (corrupted ablation, edges ranked by signed score, MIB's grid of edge fractions). Produced by "
             "`python -m bench.eap_ig_signed`.", "",
             f"| {writer} → {reader} | score | signed rank (of {r['n_edges']:,}) |", "|---|---:|---:|"]
    for label, x in r["scores"].items():
        lines.append(f"| {label} | {x['score']:+.3f} | {x['rank']:,} |")
    lines.append(f"| exact edge patching (mean of the {r['train']} prompts) | {r['exact']:+.3f} | — |")
    fractions = ", ".join(f"{f:g}" for f in r["fractions"])
    lines += ["", f"Faithfulness f at the edge fractions {fractions}:", "", "| circuit | CPR | f |", "|---|---:|---|"]
    for label, x in r["faithfulness"].items():
        lines.append(f"| {label} | {x['cpr']:.3f} | " + ", ".join(f"{f:.2f}" for f in x["curve"]) + " |")
    for label, edges in r["top"].items():
        lines += ["", f"{label}, highest signed scores: " + "; ".join(f"{w} → {rd} ({p}) {v:+.2f}" for w, rd, p, v in edges) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    write_results(OUT, measure(), markdown)


if __name__ == "__main__":
    main()
