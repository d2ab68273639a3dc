"""Why EAP-IG-activations' signed ranking fails MIB's CPR: the edge that brings the input into an early MLP, scored
by both forms of EAP-IG and by exact edge patching, and the held-out faithfulness of the activations form's circuit
with that edge's score taken from the inputs form.

The edge: of the embeddings' edges into an MLP, the one EAP-IG-inputs scores highest (on SmolLM2, embeddings → layer
0's MLP, its top edge overall). Scores averaged over the first 4 train prompts of MIB's section (bench/circuits.py
--mib-only), faithfulness (corrupted ablation, signed ranking, MIB's grid) on its first 4 held-out prompts.

    python -m bench.eap_ig_signed                        # ~8 min on 2 CPU cores: bench/results/eap_ig_signed.md, .json
    python -m bench.eap_ig_signed --model gemma3-270m    # bench/results/eap_ig_signed_gemma3.md, .json
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path

from bench.circuits import MODEL_TITLES, MODELS, ioi_prompts
from bench.common import first_token, write_results

RESULTS = Path(__file__).parent / "results"
TRAIN, TEST, MIB_TRAIN = 4, 4, 11  # MIB's held-out prompts follow its 11 train prompts


def stem(model: str) -> Path:
    """Where a model's results go (SmolLM2's keep their first name)."""
    return RESULTS / ("eap_ig_signed" if model == "smollm2-135m" else f"eap_ig_signed_{MODELS[model]}")


def embedding_to_mlp(circuit) -> tuple[str, str, str]:
    """Of the embeddings' edges into an MLP, the one ``circuit`` scores highest."""
    w = circuit.writers.index("embed")
    mlps = [i for i, (_, label) in enumerate(circuit.readers) if label == "mlp"]
    best = max(mlps, key=lambda i: float(circuit.scores[0, w, i]))
    return ("embed", *circuit.readers[best])


def in_graph(circuit):
    """The circuit's scores ``[writer, reader]`` (one row), edges outside its graph at -inf."""
    return circuit.scores[0].masked_fill(~circuit.in_graph, float("-inf"))


def rank(circuit, edge) -> int:
    """The edge's place in the circuit's signed ranking (1: highest), among the graph's edges."""
    w, r = circuit.writers.index(edge[0]), circuit.readers.index(edge[1:])
    scores = in_graph(circuit)
    return int((scores > scores[w, r]).sum()) + 1


def measure(name: str = "smollm2-135m") -> dict:
    import torch

    import dpa_lens
    from dpa_lens.evaluation.circuit_faithfulness import circuit_faithfulness

    warnings.simplefilter("ignore")
    model = dpa_lens.load_model(name)
    items = ioi_prompts(model, MIB_TRAIN + TEST)
    train, test = items[:TRAIN], items[MIB_TRAIN : MIB_TRAIN + TEST]
    target = lambda its: [(first_token(model, i.correct), first_token(model, i.incorrect)) for i in its]  # noqa: E731
    args = (model, [i.prompt for i in train], target(train))
    circuits = {label: dpa_lens.run(name, *args, corrupted=[i.corrupted for i in train], progress=False).mean()
                for label, name in (("EAP-IG (inputs)", "eap_ig"), ("EAP-IG (activations)", "eap_ig_activations"))}
    inputs, acts = circuits["EAP-IG (inputs)"], circuits["EAP-IG (activations)"]
    edge = embedding_to_mlp(inputs)
    exact = [dpa_lens.edge_patching(model, i.prompt, i.corrupted, t, edges=[edge], progress=False).edge(*edge)
             for i, t in zip(train, target(train))]
    w, r = acts.writers.index(edge[0]), acts.readers.index(edge[1:])
    scores = acts.scores.clone()
    scores[:, w, r] = inputs.scores[:, w, r]
    mended = dataclasses.replace(acts, scores=scores)
    curves = circuit_faithfulness(model, [i.prompt for i in test], [i.corrupted for i in test], target(test),
                                  [inputs, acts, mended], ablation="corrupted", absolute=False, progress=False)
    labels = ["EAP-IG (inputs)", "EAP-IG (activations)", "EAP-IG (activations), the edge scored as by the inputs form"]
    top = {}
    for label, c in circuits.items():
        R = len(c.readers)
        best = in_graph(c).flatten().topk(5)
        top[label] = [[c.writers[i // R], *c.readers[i % R], v] for v, i in zip(best.values.tolist(), best.indices.tolist())]
    return {"model": MODEL_TITLES[name], "edge": list(edge), "train": TRAIN, "test": TEST, "n_edges": int(acts.in_graph.sum()),
            "scores": {label: {"score": c.edge(*edge), "rank": rank(c, edge)} for label, c in circuits.items()},
            "exact": float(torch.tensor(exact).mean()), "fractions": curves[0].fractions.tolist(),
            "faithfulness": {label: {"cpr": cv.cpr(raw=True), "curve": cv.curve().tolist()} for label, cv in zip(labels, curves)},
            "top": top}


def markdown(r: dict) -> str:
    writer, reader, _ = r["edge"]
    model = r.get("model", "SmolLM2-135M-Instruct")
    option = "" if model.startswith("SmolLM2") else f" --model {next(k for k, v in MODEL_TITLES.items() if v == model)}"
    lines = [f"# {model}: EAP-IG-activations' signed ranking and the edge {writer} → {reader}", "",
             f"The edge: of the embeddings' edges into an MLP, the one EAP-IG (inputs) scores highest. Scores: the mean over "
             f"the first {r['train']} train prompts of MIB's section; faithfulness: its first {r['test']} "
             "held-out prompts (corrupted ablation, edges ranked by signed score, MIB's grid of edge fractions). Produced by "
             f"`python -m bench.eap_ig_signed{option}`.", "",
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="smollm2-135m")
    args = parser.parse_args()
    write_results(stem(args.model), measure(args.model), markdown)


if __name__ == "__main__":
    main()
