"""Self-consistency of the edge oracle (tests/oracles/edges.py) on tiny models of every family.

Only the untouched ``transformers`` references are used (no dpa_lens computation), so these tests
are the same on both TransformerLens lines; the TransformerLens model only tokenizes the prompt.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dpa_lens.models.testing import FAMILIES
from tests.helpers import IOI_PROMPT, make_tiny, rel_err
from tests.oracles.edges import EdgeScores, edge_scores
from tests.oracles.rewired import rewired_scores

MUS = {
    "paper_default": (0.25, 0.25, 0.5, 0.5, 0.5),
    "content_only": (0.0, 0.0, 1.0, 0.0, 1.0),
    "lopsided": (0.6, 0.1, 0.3, 0.8, 0.2),
}
EXACT = 1e-10  # float64 against float64


@functools.cache
def _setup(family: str):
    """(transformers reference, tokens [1, n] with BOS, target function: the " Mary" logit at the last position)."""
    model, ref = make_tiny(family, seed=3)
    tokens = model.to_tokens(IOI_PROMPT)
    y = model.to_single_token(" Mary")
    return ref, tokens, lambda logits: logits[:, -1, y]


@functools.cache
def _oracle(family: str, mu_name: str) -> EdgeScores:
    ref, tokens, fn = _setup(family)
    return edge_scores(ref, tokens, fn, mu=MUS[mu_name], neurons=True)


def _by_writer(o: EdgeScores) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    for (w, _, _), s in o.edges.items():
        sums[w] = sums.get(w, 0) + s
    return sums


def _by_reader(o: EdgeScores, edges: dict) -> dict[tuple[str, str], torch.Tensor]:
    sums: dict[tuple[str, str], torch.Tensor] = {}
    for (_, r, p), s in edges.items():
        sums[(r, p)] = sums.get((r, p), 0) + s
    return sums


def _stack(o: EdgeScores, names: list[str]) -> torch.Tensor:
    return torch.stack([o.nodes[w] for w in names], -1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mu_name", list(MUS))
def test_logits_are_the_models(family, mu_name):
    ref, tokens, fn = _setup(family)
    o = _oracle(family, mu_name)
    with torch.no_grad():
        logits = ref(tokens).logits.double()
    assert rel_err(o.logits, logits) < 1e-5  # a float32 model against a float64 oracle
    assert torch.equal(o.value, fn(o.logits))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mu_name", list(MUS))
def test_outgoing_edges_sum_to_node_scores(family, mu_name):
    o = _oracle(family, mu_name)
    sums = _by_writer(o)
    names = o.writers + o.neuron_writers
    assert set(sums) == set(names)
    got = torch.stack([sums[w] for w in names], -1)  # [b, n, writer]: per position
    assert rel_err(got, _stack(o, names)) < EXACT
    assert rel_err(o.dense.sum(-1), _stack(o, o.writers)) < EXACT


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mu_name", list(MUS))
def test_node_scores_are_the_node_oracles(family, mu_name):
    ref, tokens, fn = _setup(family)
    o = _oracle(family, mu_name)
    rw = rewired_scores(ref, tokens, fn, mu=MUS[mu_name], positions=torch.tensor([tokens.shape[1] - 1]))
    L, H, m = rw.heads.shape[1], rw.heads.shape[3], rw.neurons.shape[3]
    heads = torch.stack([_stack(o, [f"L{li}H{h}" for h in range(H)]) for li in range(L)], 1)
    mlps = torch.stack([o.nodes[f"L{li}.mlp"] for li in range(L)], 1)
    neurons = torch.stack([_stack(o, [f"L{li}N{i}" for i in range(m)]) for li in range(L)], 1)
    assert rel_err(o.nodes["embed"], rw.tokens) < EXACT
    assert rel_err(heads, rw.heads) < EXACT
    assert rel_err(mlps, rw.neurons.sum(-1)) < EXACT
    assert rel_err(neurons, rw.neurons) < EXACT
    assert float((o.bias - rw.bias).abs().max()) < EXACT * max(1.0, float(rw.bias.abs().max()))
    assert float((o.value - rw.value).abs().max()) < EXACT * max(1.0, float(rw.value.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mu_name", list(MUS))
def test_incoming_edges_and_biases_sum_to_the_read_stream(family, mu_name):
    """Σ_u edge(u -> r) + stream biases -> r = x_r · ∂F/∂e_r: each reader's writers are exactly those in its stream."""
    o = _oracle(family, mu_name)
    edges = {k: v for k, v in o.edges.items() if k[0] not in set(o.neuron_writers)}
    got, bias = _by_reader(o, edges), _by_reader(o, o.bias_edges)
    assert set(got) == set(o.readers)
    total = torch.stack([got[r] + bias.get(r, 0) for r in o.readers], -1)
    assert rel_err(total, torch.stack([o.reader_inputs[r] for r in o.readers], -1)) < EXACT


@pytest.mark.parametrize("family", FAMILIES)
def test_content_only_has_no_query_key_edges(family):
    o, default = _oracle(family, "content_only"), _oracle(family, "paper_default")
    for path, expect_zero in [("q", True), ("k", True), ("v", False), ("mlp", False), ("logit", False)]:
        scores = torch.stack([s for (_, _, p), s in o.edges.items() if p == path])
        assert bool((scores == 0).all()) == expect_zero, path
        if path in "qk":  # the control paths do carry edges under the default mu
            assert torch.stack([s for (_, _, p), s in default.edges.items() if p == path]).abs().max() > 1e-3
    # content-only is complete: the embedding and the biases explain the target exactly
    assert float((o.nodes["embed"].sum(-1) + o.bias - o.value).abs().max()) < EXACT * max(1.0, float(o.value.abs().max()))


@pytest.mark.parametrize("mu_name", list(MUS))
def test_parallel_block_head_does_not_feed_its_own_mlp(mu_name):
    o = _oracle("neox", mu_name)
    heads = [w for w in o.writers if "H" in w]
    for w in heads:
        layer = w.split("H")[0]
        assert not any(k[0] == w and k[1] == f"{layer}.mlp" for k in o.edges)
        assert not o.mask[o.writers.index(w), o.readers.index((f"{layer}.mlp", "mlp"))]
        # the same-layer MLP really does not read it: including it would break that MLP's incoming sum
        would_be = (o.outputs[w] * o.reader_grads[(f"{layer}.mlp", "mlp")]).sum(-1)
        assert would_be.abs().max() > 1e-6
    # a sequential block does feed its MLP
    seq = _oracle("gpt2", mu_name)
    same = [s for (w, r, _), s in seq.edges.items() if "H" in w and r == w.split("H")[0] + ".mlp"]
    assert len(same) == len([w for w in seq.writers if "H" in w]) and torch.stack(same).abs().max() > 1e-6


def test_frame():
    o = _oracle("qwen2", "paper_default")
    df = o.frame(neurons=False)
    assert list(df.columns) == ["writer", "reader", "path", "score"]
    assert len(df) == int(o.mask.sum())
    assert abs(df.score.sum() - float(o.dense.sum())) < 1e-9
    per = o.frame(per_position=True)
    assert list(per.columns) == ["writer", "reader", "path", "position", "score"]
    assert len(per) == len(o.edges) * o.logits.shape[1]
    row = per[(per.writer == "L0H1") & (per.reader == "L1H2") & (per.path == "k") & (per.position == 3)]
    assert float(row.score.iloc[0]) == float(o.edges[("L0H1", "L1H2", "k")][0, 3])
