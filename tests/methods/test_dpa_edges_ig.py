"""Integrated DPA edges (`dpa_lens.dpa_edges_ig`) against the float64 edge oracle on interpolated runs.

The oracle (tests/oracles/edges.py) is the re-wired forward of the untouched ``transformers`` model: its readers'
gradients on a run are DPA's reader terms there. A run whose token embeddings lie ``α`` of the way from the corrupted
prompt's to the clean prompt's is made by giving the reference model one extra vocabulary row per position holding
that interpolated embedding (the unembedding untouched), so the oracle needs no change. Expected edges:
``Σ_p (out_u(clean) − out_u(corrupted))[p] · mean_α ∂F/∂e_r^(α)[p]``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.errors import InputError
from tests.helpers import make_tiny, rel_err
from tests.oracles.edges import edge_scores

CLEAN = "When Mary and John went to the store, John gave"
CORRUPTED = "When Mary and John went to the store, Mary gave"
MU = Mu(q=0.6, k=0.1, v=0.3, gate=0.8, up=0.2)
TOL = 1e-4  # float32 sweeps against float64 oracles


@functools.cache
def _setup(family: str, line: str):
    model, ref = make_tiny(family, line=line, seed=3)
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    assert clean.shape == corrupted.shape and not torch.equal(clean, corrupted)
    pair = (model.to_single_token(" Mary"), model.to_single_token(" John"))
    return model, ref, clean, corrupted, pair


def _interpolated(ref, clean: torch.Tensor, corrupted: torch.Tensor, alpha: float):
    """(a copy of ``ref`` with one more embedding row per position, the ids that read them): the run whose token
    embeddings are ``e' + α (e − e')``."""
    out = copy.deepcopy(ref)
    E = out.get_input_embeddings().weight.detach()
    rows = E[corrupted[0]] + alpha * (E[clean[0]] - E[corrupted[0]])
    out.set_input_embeddings(torch.nn.Embedding.from_pretrained(torch.cat([E, rows]), freeze=True))  # lm_head keeps its weight
    return out, (E.shape[0] + torch.arange(clean.shape[1]))[None]


def _expected(family: str, line: str, steps: int, mu: Mu) -> dict[tuple[str, str, str], float]:
    _, ref, clean, corrupted, (y, z) = _setup(family, line)

    def fn(logits):
        return logits[:, -1, y] - logits[:, -1, z]

    m = (mu.q, mu.k, mu.v, mu.gate, mu.up)
    on_clean, on_corrupted = edge_scores(ref, clean, fn, mu=m), edge_scores(ref, corrupted, fn, mu=m)
    grads: dict = {}
    for k in range(steps):
        model_k, ids = _interpolated(ref, clean, corrupted, (k + 0.5) / steps)
        for key, g in edge_scores(model_k, ids, fn, mu=m).reader_grads.items():
            grads[key] = grads.get(key, 0) + g / steps
    return {(w, r, p): float(((on_clean.outputs[w] - on_corrupted.outputs[w]) * grads[(r, p)]).sum())
            for (w, r, p) in on_clean.edges}


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox", "gemma3"])
@pytest.mark.parametrize("steps", [1, 3])
def test_edges_are_the_oracles_readers_averaged_along_the_path(family, steps, line):
    """Grouped-query Llama, LayerNorm GPT-2 with learned positions, parallel NeoX, Gemma 3's output and query-key norms."""
    model, _, clean, corrupted, pair = _setup(family, line)
    circuit = dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, mu=MU, steps=steps, progress=False)
    want = _expected(family, line, steps, MU)
    keys = list(want)
    got = torch.tensor([circuit.edge(*key) for key in keys], dtype=torch.float64)
    assert rel_err(got, torch.tensor([want[key] for key in keys])) < TOL
    # every edge the oracle has is in the graph, and nothing else is scored
    assert int(circuit.in_graph.sum()) == len(keys)
    assert circuit.method == "dpa_edges_ig" and circuit.settings["steps"] == steps
    with torch.no_grad():
        logits = [model(t)[0, -1] for t in (clean, corrupted)]
    assert float(circuit.target_value[0]) == pytest.approx(float(logits[0][pair[0]] - logits[0][pair[1]]
                                                                 - logits[1][pair[0]] + logits[1][pair[1]]), abs=1e-4)


def test_neuron_edges_are_the_oracles(line):
    """Neuron writers: the activation difference times the averaged reader term through ``W_out``."""
    model, ref, clean, corrupted, (y, z) = _setup("llama", line)
    steps = 2
    circuit = dpa_lens.dpa_edges_ig(model, clean, corrupted, (y, z), mu=MU, steps=steps, neurons=[0], progress=False)

    def fn(logits):
        return logits[:, -1, y] - logits[:, -1, z]

    m = (MU.q, MU.k, MU.v, MU.gate, MU.up)
    grads: dict = {}
    for k in range(steps):
        model_k, ids = _interpolated(ref, clean, corrupted, (k + 0.5) / steps)
        for key, g in edge_scores(model_k, ids, fn, mu=m).reader_grads.items():
            grads[key] = grads.get(key, 0) + g / steps
    # a neuron's edge: its activation difference times the reader's averaged term through its W_out row
    W_out = ref.model.layers[0].mlp.down_proj.weight.detach().double().T  # [d_mlp, d]
    diff = _post(ref, clean, 0) - _post(ref, corrupted, 0)  # [b, n, d_mlp]
    for reader in [("L1H0", "k"), ("L1.mlp", "mlp"), ("logit", "logit")]:
        lam = grads[reader] @ W_out.T  # [b, n, d_mlp]
        want = (diff * lam).sum((0, 1))
        got = torch.tensor([circuit.edge(f"L0N{i}", *reader) for i in range(W_out.shape[0])], dtype=torch.float64)
        assert rel_err(got, want) < TOL


def _post(ref, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """A Llama layer's MLP activations ``silu(gate) * up`` on ``ids`` (float64, from a hook on the reference)."""
    out = {}
    mlp = ref.model.layers[layer].mlp
    handle = mlp.down_proj.register_forward_hook(lambda mod, args, _: out.__setitem__("post", args[0].detach().double()))
    try:
        with torch.no_grad():
            ref(ids)
    finally:
        handle.remove()
    return out["post"]


def test_no_difference_scores_nothing_and_the_grid_matters(line):
    """With the corrupted prompt equal to the clean one no writer's output differs: every edge is zero; one step (the
    halfway run) and two (the runs at 1/4 and 3/4) differ."""
    model, _, clean, corrupted, pair = _setup("llama", line)
    same = dpa_lens.dpa_edges_ig(model, clean, clean, pair, steps=2, progress=False)
    assert float(same.scores.abs().max()) == 0.0
    one = dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, steps=1, progress=False)
    two = dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, steps=2, progress=False)
    assert not torch.allclose(one.scores, two.scores)


def test_padded_rows_are_the_prompts_alone(line):
    model, _, clean, corrupted, pair = _setup("llama", line)
    short_clean, short_corrupted = "When Mary and John left, John gave", "When Mary and John left, Mary gave"
    both = dpa_lens.dpa_edges_ig(model, [CLEAN, short_clean], [CORRUPTED, short_corrupted], [pair, pair], steps=2, progress=False)
    for row, (c, k) in enumerate(((CLEAN, CORRUPTED), (short_clean, short_corrupted))):
        alone = dpa_lens.dpa_edges_ig(model, c, k, pair, steps=2, progress=False)
        assert rel_err(both.scores[row], alone.scores[0]) < 1e-4  # float32: padded attention sums in another order


def test_runs_in_chunks_give_the_same_edges(line):
    """All runs of the path in one batch (the default) or a chunk at a time: the same mean of the reader terms."""
    model, _, clean, corrupted, pair = _setup("gemma3", line)
    together = dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, steps=3, per_position=True, neurons=[0], progress=False)
    for chunk in (1, 2):
        parts = dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, steps=3, per_position=True, neurons=[0], chunk=chunk, progress=False)
        assert rel_err(parts.scores, together.scores) < 1e-5 and rel_err(parts.per_position, together.per_position) < 1e-5
    units = [i for i, w in enumerate(together.writers) if "N" not in w]  # per-position scores: heads, MLPs, embed
    torch.testing.assert_close(together.per_position.sum(1)[:, units], together.scores[:, units], rtol=1e-4, atol=1e-6)


def test_arguments_are_checked(line):
    model, _, clean, corrupted, pair = _setup("llama", line)
    for steps in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="steps"):
            dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, steps=steps)
    for chunk in (0, 1.5, True):
        with pytest.raises(InputError, match="chunk"):
            dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, chunk=chunk)
    with pytest.raises(InputError, match="neurons"):
        dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, neurons="all")
    with pytest.raises(TypeError, match="Mu"):
        dpa_lens.dpa_edges_ig(model, clean, corrupted, pair, mu=(0.25, 0.25, 0.5, 0.5, 0.5))
