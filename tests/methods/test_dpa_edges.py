"""DPA circuits beyond edges: exact paths, rerooting, the circuit figures and TransformerLens interop.

Independent references: the edge oracle (tests/oracles/edges.py: every path sum grouped by its first
hop is an edge) and the rerooted re-wired forward (tests/oracles/reroot.py: DPA of ``x · d`` at any
residual location or head output is the gradient of that quantity there).
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np
import pytest
import torch

import dpa_lens
from dpa_lens import Mu, plot
from dpa_lens.errors import CacheError, InputError, TargetError
from dpa_lens.evaluation.interop import circuit_to_transformer_lens
from dpa_lens.methods.dpa import dpa_edges, dpa_paths
from dpa_lens.models import tl
from dpa_lens.results import Path
from tests.helpers import make_tiny, rel_err
from tests.oracles.edges import edge_scores
from tests.oracles.reroot import rerooted_scores

PROMPT = "When Mary and John went to the store, John gave"
MUS = {
    "paper_default": Mu.paper_default(),
    "content_only": Mu.content_only(),
    "lopsided": Mu(q=0.6, k=0.1, v=0.3, gate=0.8, up=0.2),
}
TOL = 1e-4  # float32 sweeps against float64 oracles


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Exhaustive path enumeration runs thousands of tiny products: one thread avoids oversubscribing the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@functools.cache
def _setup(family: str, line: str):
    """(TL model, transformers reference, tokens [1, n], cache) of a tiny 2-layer model."""
    model, ref = make_tiny(family, line=line, seed=3)
    tokens = model.to_tokens(PROMPT)
    _, cache = model.run_with_cache(tokens)
    return model, ref, tokens, cache


def _mu(mu: Mu) -> tuple[float, float, float, float, float]:
    return (mu.q, mu.k, mu.v, mu.gate, mu.up)


# ---------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize(("family", "mu_name"), [("llama", "paper_default"), ("llama", "lopsided"), ("neox", "paper_default"),
                                                 ("neox", "content_only"), ("gpt2", "lopsided"), ("gemma2", "paper_default")])
def test_every_path_adds_up_to_the_node_scores_and_the_oracle_edges(family, mu_name, line):
    """Exhaustive enumeration on a 2-layer model (GQA llama, parallel neox, LayerNorm gpt2, Gemma's output norms)."""
    model, ref, tokens, cache = _setup(family, line)
    mu = MUS[mu_name]
    paths = dpa_paths(model, cache, " Mary", mu=mu, k=None, max_depth=8)[0]
    circuit = dpa_edges(model, cache, " Mary", mu=mu)
    n = tokens.shape[1]
    for p in paths:
        p.check()
        assert p.source.label is None and isinstance(p.source_pos, int) and p.hops[-1].position == n - 1
        assert all(h.position is None for h in p.hops[1:-1])
    assert [abs(p.score) for p in paths] == sorted((abs(p.score) for p in paths), reverse=True)
    assert len({str(p) for p in paths}) == len(paths)
    # a writer's paths add up to its DPA node score
    by_writer = collections.defaultdict(float)
    for p in paths:
        by_writer[p.source.node] += p.score
    assert rel_err(torch.tensor([by_writer[w] for w in circuit.writers]), circuit.nodes[0]) < 1e-5
    # grouped by source position and first hop, they are the oracle's per-position edges
    y = model.to_single_token(" Mary")
    oracle = edge_scores(ref, tokens, lambda logits: logits[:, -1, y], mu=_mu(mu))
    first = collections.defaultdict(lambda: torch.zeros(n, dtype=torch.float64))
    for p in paths:
        first[(p.source.node, p.hops[1].node, p.hops[1].label)][p.source_pos] += p.score
    assert set(first) <= set(oracle.edges)
    keys = list(oracle.edges)
    got = torch.stack([first[key] if key in first else torch.zeros(n, dtype=torch.float64) for key in keys])
    assert rel_err(got, torch.stack([oracle.edges[key][0] for key in keys])) < TOL
    if mu_name == "content_only":  # the control paths carry nothing
        assert not any(label in ("q", "k") for p in paths for label in p.labels)


def test_top_paths_are_exact_and_sorted(line):
    model, _, tokens, cache = _setup("llama", line)
    exhaustive = {str(p): p.score for p in dpa_paths(model, cache, " Mary", k=None, max_depth=8)[0]}
    truth = sorted(exhaustive, key=lambda s: -abs(exhaustive[s]))
    for order in ("positions", "writers", "flow"):
        top = dpa_paths(model, cache, " Mary", k=10, max_depth=8, order=order)[0]
        assert len(top) == 10 and all(isinstance(p, Path) and p.method == "dpa" for p in top)
        assert [abs(p.score) for p in top] == sorted((abs(p.score) for p in top), reverse=True)
        for p in top:  # the search is a heuristic, its scores are exact
            p.check()
            assert p.score == pytest.approx(exhaustive[str(p)], rel=1e-5, abs=1e-6)
            assert p.source_token == model.to_str_tokens(tokens[0])[p.source_pos]
    writers = dpa_paths(model, cache, " Mary", k=10, max_depth=8, order="writers")[0]
    assert [str(p) for p in writers] == truth[:10]  # this order finds the true top 10 here
    # sources summed over positions
    summed = dpa_paths(model, cache, " Mary", k=5, max_depth=8, per_position_source=False)[0]
    for p in summed:
        assert p.source_pos is None
        prefix, suffix = p.hops[0].node + "@", " → ".join(str(h) for h in p.hops[1:])
        total = sum(v for s, v in exhaustive.items() if s.startswith(prefix) and s.split(" → ", 1)[1] == suffix)
        assert p.score == pytest.approx(total, rel=1e-5, abs=1e-6)
    # no readers: the direct paths, which are the logit edges
    direct = dpa_paths(model, cache, " Mary", k=5, max_depth=0)[0]
    assert all(len(p.hops) == 2 for p in direct)
    circuit = dpa_edges(model, cache, " Mary", per_position=True, paths=5)
    for p in direct:
        w = circuit.writers.index(p.source.node)
        assert p.score == pytest.approx(float(circuit.per_position[0, p.source_pos, w, -1]), rel=1e-5, abs=1e-6)
    assert [str(p) for p in circuit.paths[0]] == [str(p) for p in dpa_paths(model, cache, " Mary", k=5)[0]]


def test_path_arguments_are_checked(line):
    model, _, _, cache = _setup("llama", line)
    for bad in ({"k": 0}, {"max_depth": -1}, {"order": "best"}, {"max_expansions": -2}):
        with pytest.raises(InputError):
            dpa_paths(model, cache, " Mary", **bad)
    with pytest.raises(InputError, match="paths"):
        dpa_edges(model, cache, " Mary", paths=-1)
    with pytest.raises(InputError, match="clean"):
        dpa_edges(model, cache, " Mary", paths=3, corrupted_cache=cache)


# ---------------------------------------------------------------------------------------------- rerooting
ROOTS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.0.hook_resid_post",
         "blocks.1.hook_resid_post", "L0H1", "L1H2", "L1H3"]


def _direction(model, family: str) -> torch.Tensor:
    d = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    # LayerNorm models are loaded with centred writing weights: their stream is the original one minus its mean,
    # so only a mean-free direction reads the same number from both
    return d - d.mean() if family in ("gpt2", "neox") else d


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gpt2", "neox"])
def test_rerooted_dpa_is_the_gradient_at_the_root(family, line):
    model, ref, tokens, cache = _setup(family, line)
    d = _direction(model, family)
    mu = MUS["lopsided"]
    for root in ROOTS:
        if family == "neox" and "mid" in root:
            continue
        attr = dpa_lens.dpa(model, cache, d, position=-3, mu=mu, root=root)
        o = rerooted_scores(ref, tokens, root, d, attr.positions, mu=_mu(mu))
        assert float((attr.target_value.double() - o.value).abs().max()) < 1e-5 * max(1.0, float(o.value.abs().max())), root
        assert rel_err(attr.tokens, o.tokens) < TOL, root
        assert rel_err(attr.heads, o.heads) < TOL, root
        assert rel_err(attr.neurons, o.neurons) < TOL if o.neurons.abs().max() > 0 else attr.neurons.abs().max() == 0, root
        assert float((attr.bias.double() - o.bias).abs().max()) < 1e-5 * max(1.0, float(o.value.abs().max())), root
        assert attr.settings["root"] == root and attr.target["root"] == root
    # content-only DPA stays complete at any root: tokens + biases = the quantity
    for root in ("blocks.1.hook_resid_post", "L1H2"):
        attr = dpa_lens.dpa(model, cache, d, position=-3, mu=MUS["content_only"], root=root)
        assert float(attr.tokens.sum() + attr.bias.sum()) == pytest.approx(float(attr.target_value), rel=1e-5, abs=1e-5)


def test_a_head_root_scores_the_head_itself(line):
    model, _, _, cache = _setup("llama", line)
    d = _direction(model, "llama")
    attr = dpa_lens.dpa(model, cache, d, position=-3, root="L1H2")
    assert float(attr.heads[0, 1, -3, 2]) == pytest.approx(float(attr.target_value), rel=1e-5)
    others = attr.heads.clone()
    others[0, 1, -3, 2] = 0
    assert float(others[0, 1].abs().max()) == 0 and float(attr.neurons[0, 1].abs().max()) == 0


@pytest.mark.parametrize(("family", "root"), [("llama", "blocks.1.hook_resid_mid"), ("llama", "L1H2"), ("neox", "L1H0"),
                                              ("gemma2", "blocks.1.hook_resid_pre")])
def test_rerooted_edges_and_paths_add_up_to_the_rerooted_nodes(family, root, line):
    model, _, _, cache = _setup(family, line)
    d = _direction(model, family)
    attr = dpa_lens.dpa(model, cache, d, position=-3, root=root)
    circuit = dpa_edges(model, cache, d, position=-3, root=root, per_position=True)
    nodes = torch.cat([attr.tokens.sum(-1, keepdim=True),
                       torch.cat([attr.heads.sum(2), attr.neurons.sum((2, 3))[:, :, None]], -1).reshape(1, -1)], 1)
    assert rel_err(circuit.nodes, nodes) < 1e-6
    assert rel_err(circuit.outgoing(), nodes[0]) < 1e-5
    assert float(circuit.target_value) == pytest.approx(float(attr.target_value))
    # the graph keeps what is upstream of the root: layer 0, and in layer 1 the heads that write into resid_mid, or the root head
    kept = {r for (r, _), keep in zip(circuit.readers, circuit.in_graph.any(0).tolist()) if keep}
    in_layer_1 = {"mid": {f"L1H{h}" for h in range(model.cfg.n_heads)}, "pre": set()}.get(root[-3:], {root})
    assert kept == {r for r, _ in circuit.readers if r.startswith("L0")} | {"logit"} | in_layer_1
    if "H" in root and not root.startswith("blocks"):  # a head root: only that head reads the quantity
        read = circuit.in_graph[:, -1].nonzero().flatten().tolist()
        assert [circuit.writers[i] for i in read] == [root]
        assert circuit.edge(root, "logit", "logit") == pytest.approx(float(attr.target_value), rel=1e-5)
    paths = dpa_paths(model, cache, d, position=-3, root=root, k=None, max_depth=8)[0]
    by_writer = collections.defaultdict(float)
    for p in paths:
        p.check()
        by_writer[p.source.node] += p.score
    assert rel_err(torch.tensor([by_writer[w] for w in circuit.writers]), nodes[0]) < 1e-5


def test_root_errors(line):
    model, _, tokens, cache = _setup("llama", line)
    d = torch.randn(model.cfg.d_model)
    with pytest.raises(TargetError, match="direction"):
        dpa_lens.dpa(model, cache, " Mary", root="blocks.1.hook_resid_pre")
    for bad in ("blocks.7.hook_resid_pre", "blocks.1.hook_resid_out", "L1H9", "L5H0", "head 3"):
        with pytest.raises(InputError, match="root"):
            dpa_lens.dpa(model, cache, d, root=bad)
    with pytest.raises(InputError, match="flow"):
        dpa_lens.dpa(model, cache, d, root="L1H0", flow=True)
    with pytest.raises(InputError):
        dpa_edges(model, cache, d, root="L1H0", corrupted_cache=cache)
    neox = _setup("neox", line)
    with pytest.raises(InputError, match="parallel"):
        dpa_lens.dpa(neox[0], neox[3], d, root="blocks.1.hook_resid_mid")
    _, lean = model.run_with_cache(tokens, names_filter=dpa_lens.dpa_names_filter(model))
    with pytest.raises(CacheError, match="hook_resid_mid"):
        dpa_lens.dpa(model, lean, d, root="blocks.1.hook_resid_mid")
    attr = dpa_lens.dpa(model, lean, d, root="blocks.0.hook_resid_post")  # read from resid_pre(1), which DPA caches
    assert float(attr.target_value) == pytest.approx(float(lean["blocks.1.hook_resid_pre"][0, -1] @ d), rel=1e-4)


# ---------------------------------------------------------------------------------------------- figures
@pytest.fixture(scope="module")
def circuit():
    model, _, _, cache = _setup("llama", "bridge")
    return dpa_edges(model, cache, (" Mary", " John"), per_position=True, paths=8)


def test_circuit_figure_draws_the_top_edges(circuit):
    fig = plot.circuit(circuit, top_n=12)
    edges = [t for t in fig.data if t.name and "→" in t.name]
    top = circuit.top(12)
    assert len(edges) == 12
    for trace, (w, r, label, score) in zip(edges, top[["writer", "reader", "path", "score"]].itertuples(index=False)):
        assert trace.name == f"{w} → {r} [{label}]"
        assert trace.line.color == plot.PATH_COLORS[label]
        assert trace.line.dash == ("solid" if score >= 0 else "dot")
        assert f"score {score:.4g}" in trace.text[0] and trace.legendgroup == label and not trace.showlegend
    widths = [t.line.width for t in edges]
    assert widths[0] == pytest.approx(8.0) and widths == sorted(widths, reverse=True)
    legend = [t for t in fig.data if t.showlegend is not False and t.name in plot.PATH_COLORS]
    assert sorted(t.name for t in legend) == sorted(set(top["path"]))
    assert all(t.line.color == plot.PATH_COLORS[t.name] for t in legend)
    nodes = next(t for t in fig.data if t.name == "nodes")
    assert {"embed", "logit", *top["writer"], *top["reader"]} == set(nodes.text)
    assert [e["score"] for e in fig.layout.meta["edges"]] == pytest.approx(top["score"].tolist())
    strong = plot.circuit(circuit, top_n=None, threshold=float(top["score"].abs().iloc[3]))
    assert len([t for t in strong.data if t.name and "→" in t.name]) == 4
    # sized to its container (a width for a static image on request); crowded bottom-row labels alternate sides
    assert fig.layout.autosize and fig.layout.width is None and plot.circuit(circuit, width=900).layout.width == 900
    bottom = [p for n, p, y in zip(nodes.text, nodes.textposition, nodes.y) if y == -1.0]
    assert tuple(bottom[:2]) == ("top center", "bottom center")[: len(bottom[:2])]
    assert "embed" not in fig.layout.xaxis.ticktext and fig.layout.xaxis.ticktext[0] == "L0"


def test_circuit_positions_and_paths_figures(circuit):
    fig = plot.circuit_positions(circuit, top_n=6)
    top = circuit.top(6)
    assert list(fig.data[0].y) == [f"{w} → {r} [{p}]" for w, r, p in zip(top["writer"], top["reader"], top["path"])]
    for i, (w, r, p) in enumerate(zip(top["writer"], top["reader"], top["path"])):
        want = circuit.per_position[0, :, circuit.writers.index(w), circuit.readers.index((r, p))]
        np.testing.assert_allclose(fig.data[0].z[i], want.numpy(), rtol=1e-6)
        assert fig.data[0].z[i].sum() == pytest.approx(float(top["score"].iloc[i]), rel=1e-4, abs=1e-5)
    assert fig.data[0].zmid == 0 and fig.data[0].zmin == -fig.data[0].zmax
    with pytest.raises(InputError, match="per_position"):
        plot.circuit_positions(dataclasses.replace(circuit, per_position=None))
    bars = plot.paths(circuit)
    shown = {y: x for t in bars.data for x, y in zip(t.x, t.y)}
    assert shown == pytest.approx({str(p): p.score for p in circuit.paths[0]})
    for t in bars.data:
        assert t.marker.color == plot.PATH_COLORS[t.name]
    assert list(bars.layout.yaxis.categoryarray)[::-1] == [str(p) for p in circuit.paths[0]]


# ---------------------------------------------------------------------------------------------- TransformerLens
@pytest.mark.skipif(tl.TL_MAJOR < 4, reason="TransformerLens 3.x has no edge nodes")
def test_transformer_lens_edges_round_trip(line):
    from transformer_lens.tools.analysis.attribution_patching import Node

    model, _, _, cache = _setup("llama", line)
    circuit = dpa_edges(model, cache, (" Mary", " John"), per_position=True)
    result = circuit_to_transformer_lens(circuit)
    n = circuit.per_position.shape[1]
    assert len(result.edge_scores) == int(circuit.in_graph.sum()) * n
    back = torch.zeros_like(circuit.per_position[0])
    kinds = {"q_input": "q", "k_input": "k", "v_input": "v", "mlp_in": "mlp", "logits": "logit"}
    for (w, r), s in result.edge_scores.items():
        assert w.position == r.position
        writer = "embed" if w.kind == "embed" else f"L{w.layer}H{w.head}" if w.kind == "attn_head_out" else f"L{w.layer}.mlp"
        reader = "logit" if r.kind == "logits" else f"L{r.layer}H{r.head}" if r.head is not None else f"L{r.layer}.mlp"
        back[r.position, circuit.writers.index(writer), circuit.readers.index((reader, kinds[r.kind]))] = s
    assert torch.equal(back, circuit.per_position[0])
    assert rel_err(back.sum(0), circuit.scores[0]) < 1e-6
    # a writer's node score is its outgoing edges at its position; a key edge sits at the key position
    assert result.node_scores[Node("attn_head_out", 3, 0, 1)] == pytest.approx(float(circuit.per_position[0, 3, 2].sum()), rel=1e-6)
    key = circuit.per_position[0, 2, circuit.writers.index("L0H1"), circuit.readers.index(("L1H3", "k"))]
    assert result.edge_scores[(Node("attn_head_out", 2, 0, 1), Node("k_input", 2, 1, 3))] == float(key)
    assert result.edge_scores[(Node("embed", n - 1), Node("logits", n - 1, 1))] == float(circuit.per_position[0, n - 1, 0, -1])
    assert abs(result.top_edges(1)[0][2]) == pytest.approx(float(circuit.per_position[0].abs().max()))
    with pytest.raises(InputError, match="per_position"):
        circuit_to_transformer_lens(dpa_edges(model, cache, " Mary"))


@pytest.mark.skipif(tl.TL_MAJOR >= 4, reason="TransformerLens 4.x has edge nodes")
def test_transformer_lens_3_has_no_edge_nodes(line):
    model, _, _, cache = _setup("llama", line)
    with pytest.raises(NotImplementedError, match="4"):
        circuit_to_transformer_lens(dpa_edges(model, cache, " Mary", per_position=True))
