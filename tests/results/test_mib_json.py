"""MIB's graph JSON (`Circuit.to_mib_json`, `Circuit.from_mib_json`) against the reference's graph as
`tests.oracles.mib_graph` builds and parses it from ``hannamw/EAP-IG``'s ``src/eap/graph.py``."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch

import dpa_lens
from dpa_lens import Circuit, InputError
from dpa_lens.evaluation import circuit_faithfulness
from dpa_lens.graph import Graph
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny
from tests.oracles.mib_graph import node_flags, parse_like_from_json, reference_names, top_n_names, write_like_to_json

D_MODEL = 64  # the tiny models' residual width
FAMILIES = {"gpt2": False, "llama": False, "neox": True}  # family → parallel attention and MLP


@pytest.fixture(scope="module")
def models():
    made: dict[str, object] = {}

    def get(family: str):
        if family not in made:
            made[family] = make_tiny(family, seed=3)[0]
        return made[family]

    return get


@pytest.fixture(scope="module")
def atp(models):
    made: dict[str, Circuit] = {}

    def get(family: str) -> Circuit:
        if family not in made:
            made[family] = dpa_lens.edge_atp(models(family), IOI_PROMPT, CORRUPTED, PAIR)
        return made[family]

    return get


def dpa_edge(name: str) -> tuple[str, str, str]:
    """dpa_lens's ``(writer, reader, path)`` of a MIB edge name, written out here (not with dpa_lens's mib module)."""
    parent, child = name.split("->")

    def node(n: str) -> str:
        if n == "input":
            return "embed"
        head = re.fullmatch(r"a(\d+)\.h(\d+)", n)
        return f"L{head[1]}H{head[2]}" if head else f"L{n[1:]}.mlp"

    if child == "logits":
        return node(parent), "logit", "logit"
    head = re.fullmatch(r"(a\d+\.h\d+)<([qkv])>", child)
    if head:
        return node(parent), node(head[1]), head[2]
    return node(parent), node(child), "mlp"


def graph_rank(name: str, cfg: dict) -> tuple[int, int]:
    """Where an edge sits in dpa_lens's graph order (writer-major, then reader): the order ties are broken in."""
    nodes, _ = reference_names(cfg)
    H = cfg["n_heads"]
    parent, child = name.split("->")
    if child == "logits":
        reader = 10**9
    elif child.startswith("m"):
        reader = int(child[1:]) * (3 * H + 1) + 3 * H
    else:
        layer, head, x = re.fullmatch(r"a(\d+)\.h(\d+)<([qkv])>", child).groups()
        reader = int(layer) * (3 * H + 1) + 3 * int(head) + "qkv".index(x)
    return nodes.index(parent), reader


def cfg_of(parallel: bool, n_layers: int = 2, n_heads: int = 4) -> dict:
    return {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": parallel, "d_model": D_MODEL}


# ------------------------------------------------------------------------------ the file is the reference's graph


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_is_the_reference_graph(family, atp, tmp_path):
    """GPT-2 (sequential), Llama (grouped-query heads split per query head), NeoX (parallel attention and MLP)."""
    circuit = atp(family)
    path = circuit.to_mib_json(tmp_path / "c.json", cfg={"d_model": D_MODEL})
    got = parse_like_from_json(path)
    cfg = cfg_of(FAMILIES[family])
    assert got.cfg == cfg  # n_heads: the query heads (4), not the key/value heads (2) of the Llama
    assert got.listed_nodes == got.nodes and got.listed == got.edges  # every node and edge, in the reference's order
    assert len(got.edges) == int(circuit.in_graph.sum())
    if family == "llama":
        assert {"a0.h0->a1.h1<k>", "a0.h0->a1.h0<k>", "a0.h3->a1.h2<v>"} <= set(got.edges)
    assert ("a0.h2->m0" in got.edges) == (not FAMILIES[family])
    for name in got.edges:  # each score is the circuit's, exactly
        assert got.scores[name] == float(circuit.edge(*dpa_edge(name))), name
    assert all(got.in_graph.values()) and all(got.node_in_graph.values())  # keep=None: every edge scored
    assert json.loads(path.read_text())["nodes"]["logits"] == {"in_graph": True}


def test_export_on_either_line(line, tmp_path):
    model = make_tiny("llama", line=line, seed=4)[0]
    circuit = dpa_lens.edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    got = parse_like_from_json(circuit.to_mib_json(tmp_path / "c.json", cfg={"d_model": model.cfg.d_model}))
    assert got.edges == reference_names(cfg_of(False))[1]
    assert [got.scores[e] for e in got.edges] == [float(circuit.edge(*dpa_edge(e))) for e in got.edges]


@pytest.mark.parametrize("parallel", [False, True])
def test_reading_a_reference_file_of_another_graph(parallel, tmp_path):
    """A file written as the reference writes it, for 3 layers of 5 heads: a Circuit on that graph, and back."""
    cfg = {**cfg_of(parallel, n_layers=3, n_heads=5), "d_model": 768}
    _, edges = reference_names(cfg)
    gen = torch.Generator().manual_seed(1)
    values = (torch.randn(len(edges), generator=gen) * 10.0 ** torch.randint(-6, 2, (len(edges),), generator=gen)).tolist()
    scores = dict(zip(edges, values))
    flags = dict(zip(edges, (torch.rand(len(edges), generator=gen) < 0.05).tolist()))
    write_like_to_json(tmp_path / "ref.json", cfg, scores, flags)

    read = Circuit.from_mib_json(tmp_path / "ref.json")
    graph = Graph(3, 5, parallel)
    assert read.writers == graph.writers and read.readers == graph.readers
    assert torch.equal(read.in_graph, graph.mask) and read.batch == 1
    assert all(read.edge(*dpa_edge(e)) == scores[e] for e in edges)
    kept = Circuit.from_mib_json(tmp_path / "ref.json", edges="kept")
    assert {e for e in edges if kept.in_graph[read.writers.index(dpa_edge(e)[0]), read.readers.index(dpa_edge(e)[1:])]} \
        == {e for e in edges if flags[e]}
    assert all(kept.edge(*dpa_edge(e)) == (scores[e] if flags[e] else 0.0) for e in edges)
    assert kept.settings["pruned_from"] == len(edges) and read.settings["mib_cfg"] == cfg

    # written again (its cfg remembered, the file's circuit kept): the same file, node flags included
    again = read.to_mib_json(tmp_path / "again.json", keep=kept.in_graph)
    assert json.loads(again.read_text()) == json.loads((tmp_path / "ref.json").read_text())
    # the kept circuit alone gives the same flags
    assert json.loads(kept.to_mib_json(tmp_path / "k.json").read_text())["nodes"] == json.loads(again.read_text())["nodes"]


# ------------------------------------------------------------------------------ round trips and keep


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_scores_and_in_graph_round_trip_exactly(family, models, atp, tmp_path):
    model = models(family)
    for circuit in (atp(family), dpa_lens.run("dpa_edges", model, IOI_PROMPT, PAIR)):
        gen = torch.Generator().manual_seed(0)
        keep = (torch.rand(circuit.in_graph.shape, generator=gen) < 0.3) & circuit.in_graph
        path = circuit.to_mib_json(tmp_path / "c.json", keep=keep, cfg={"d_model": D_MODEL})
        read = Circuit.from_mib_json(path)
        assert read.writers == circuit.writers and read.readers == circuit.readers
        assert torch.equal(read.in_graph, circuit.in_graph)
        assert torch.equal(read.scores.float(), circuit.scores) and read.scores.dtype == torch.float64
        kept = Circuit.from_mib_json(path, edges="kept")
        assert torch.equal(kept.in_graph, keep) and torch.equal(kept.scores.float(), circuit.scores * keep)
        assert read.to_mib_json(tmp_path / "again.json", keep=keep).read_text() == path.read_text()  # byte for byte
        loaded = Circuit.load(read.save(tmp_path / "read.pt"))  # its MIB cfg is kept with it: no cfg needed again
        assert loaded.to_mib_json(tmp_path / "loaded.json", keep=keep).read_text() == path.read_text()
        got = parse_like_from_json(path)
        assert got.node_in_graph == node_flags(got.in_graph, got.nodes)
        assert read.method == "mib" and read.settings["mib_cfg"]["parallel_attn_mlp"] == FAMILIES[family]


def test_a_pruned_circuit_writes_its_edges(atp, tmp_path):
    circuit = atp("gpt2").prune(top_n=9)
    path = circuit.to_mib_json(tmp_path / "c.json", cfg={"d_model": D_MODEL, "parallel_attn_mlp": False})
    got = parse_like_from_json(path)
    assert len(got.edges) == int(atp("gpt2").in_graph.sum())  # every edge of the graph, those outside the circuit at 0
    assert sum(got.in_graph.values()) == 9 and all(got.scores[e] == 0.0 for e in got.edges if not got.in_graph[e])
    assert torch.equal(Circuit.from_mib_json(path, edges="kept").in_graph, circuit.in_graph)
    assert got.node_in_graph == node_flags(got.in_graph, got.nodes)
    assert not all(got.node_in_graph[n] for n in got.nodes if n != "logits")  # some nodes are out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keep_n_marks_the_top_n_by_absolute_score(family, atp, tmp_path):
    circuit = atp(family)
    cfg = cfg_of(FAMILIES[family])
    n_edges = int(circuit.in_graph.sum())
    for n in (0, 1, 7, 40, n_edges):
        got = parse_like_from_json(circuit.to_mib_json(tmp_path / "c.json", keep=n, cfg={"d_model": D_MODEL}))
        in_order = dict(sorted(got.scores.items(), key=lambda kv: graph_rank(kv[0], cfg)))
        assert {e for e, flag in got.in_graph.items() if flag} == top_n_names(in_order, n), n
        assert got.node_in_graph == node_flags(got.in_graph, got.nodes)
        if n == 0:  # no edge kept: only the logits are in the graph, as the reference has them
            assert [name for name, flag in got.node_in_graph.items() if flag] == ["logits"]
    # the top 7 are the 7 largest |scores|
    got = parse_like_from_json(circuit.to_mib_json(tmp_path / "c.json", keep=7, cfg={"d_model": D_MODEL}))
    kept = sorted(abs(got.scores[e]) for e in got.edges if got.in_graph[e])
    assert kept[0] >= max(abs(got.scores[e]) for e in got.edges if not got.in_graph[e])


def test_keep_n_with_absolute_false_marks_the_top_n_by_signed_score(atp, tmp_path):
    circuit = atp("llama")
    cfg = cfg_of(FAMILIES["llama"])
    held = circuit.scores[0][circuit.in_graph]
    assert bool((held < 0).any()) and bool((held > 0).any())  # both signs: the two rankings differ
    for n in (1, 7, 40):
        got = parse_like_from_json(circuit.to_mib_json(tmp_path / "c.json", keep=n, absolute=False, cfg={"d_model": D_MODEL}))
        in_order = dict(sorted(got.scores.items(), key=lambda kv: graph_rank(kv[0], cfg)))
        # the file lists every edge of the graph; the circuit holds all of them here (edge AtP scores every edge)
        kept = {e for e, flag in got.in_graph.items() if flag}
        assert kept == top_n_names(in_order, n, absolute=False), n
        assert min(got.scores[e] for e in kept) >= max(got.scores[e] for e in got.edges if e not in kept)
    absolute = parse_like_from_json(circuit.to_mib_json(tmp_path / "a.json", keep=40, cfg={"d_model": D_MODEL}))
    assert {e for e, f in absolute.in_graph.items() if f} != kept  # the default ranks by |score|
    with pytest.raises(InputError, match="absolute"):
        circuit.to_mib_json(tmp_path / "c.json", keep=3, absolute="signed", cfg={"d_model": D_MODEL})


def test_keep_n_breaks_ties_in_graph_order(atp, tmp_path):
    base = atp("gpt2")
    # three levels of |score|, many ties, signs mixed: ties go to the earlier edge of dpa_lens's graph order
    gen = torch.Generator().manual_seed(2)
    level = torch.randint(0, 3, base.scores.shape, generator=gen).float()
    sign = torch.where(torch.rand(base.scores.shape, generator=gen) < 0.5, -1.0, 1.0)
    circuit = replace(base, scores=(level * sign) * base.in_graph)
    cfg = cfg_of(False)
    differs = []
    for n in (5, 33, 60):
        got = parse_like_from_json(circuit.to_mib_json(tmp_path / "c.json", keep=n, cfg={"d_model": D_MODEL}))
        in_order = dict(sorted(got.scores.items(), key=lambda kv: graph_rank(kv[0], cfg)))
        assert {e for e, flag in got.in_graph.items() if flag} == top_n_names(in_order, n)
        differs.append(top_n_names(got.scores, n) != top_n_names(in_order, n))  # ties broken in the file's order
    assert any(differs)  # the ties decide something: this test can tell the two orders apart


def test_a_file_read_back_feeds_circuit_faithfulness(models, atp, tmp_path):
    model, circuit = models("llama"), atp("llama")
    read = Circuit.from_mib_json(circuit.to_mib_json(tmp_path / "c.json", cfg={"d_model": D_MODEL}))
    fractions = (0.1, 0.5, 1.0)
    curve = circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, read, fractions=fractions, progress=False)
    assert abs(float(curve.faithfulness[0, -1]) - 1.0) < 1e-4  # every edge: the clean run
    original = circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, fractions=fractions, progress=False)
    assert torch.equal(curve.values, original.values)  # the same ranking
    assert float((curve.values[0, 0] - curve.values[0, -1]).abs()) > 1e-3  # the curve is not flat
    assert curve.method == "mib"


def test_node_scores_of_a_node_level_file_are_read(tmp_path):
    cfg = cfg_of(False)
    nodes, edges = reference_names(cfg)
    data = {"cfg": cfg, "nodes": {n: {"in_graph": True, "score": float(i)} for i, n in enumerate(nodes) if n not in ("a1.h2", "logits")},
            "edges": {e: {"score": 0.0, "in_graph": True} for e in edges}}
    data["nodes"]["logits"] = {"in_graph": True}
    (tmp_path / "n.json").write_text(json.dumps(data))
    read = Circuit.from_mib_json(tmp_path / "n.json")
    assert read.nodes.shape == (1, len(nodes) - 1)
    want = [float("nan") if n == "a1.h2" else float(i) for i, n in enumerate(nodes[:-1])]
    assert all((math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(read.nodes[0].tolist(), want))


# ------------------------------------------------------------------------------ refusals


def test_export_refuses_what_mib_cannot_hold(models, atp, tmp_path):
    circuit = atp("gpt2")
    path = tmp_path / "c.json"
    path.write_text("earlier")
    with pytest.raises(InputError, match="'d_model'"):
        circuit.to_mib_json(path)
    with pytest.raises(InputError, match="neuron"):
        dpa_lens.run("dpa_edges", models("llama"), IOI_PROMPT, PAIR, neurons=[0]).to_mib_json(path, cfg={"d_model": D_MODEL})
    with pytest.raises(InputError, match="rerooted"):
        replace(circuit, settings={**circuit.settings, "root": "blocks.1.hook_resid_post"}).to_mib_json(path, cfg={"d_model": D_MODEL})
    attn_only = Graph(2, 4, False, has_mlp=False)
    bare = Circuit(method="x", writers=attn_only.writers, readers=attn_only.readers,
                   scores=torch.ones(1, *attn_only.mask.shape) * attn_only.mask, in_graph=attn_only.mask)
    with pytest.raises(InputError, match="attention-only"):
        bare.to_mib_json(path, cfg={"d_model": D_MODEL})
    with pytest.raises(InputError, match="NaN"):
        replace(circuit, scores=circuit.scores.masked_fill(circuit.in_graph, float("nan"))).to_mib_json(path, cfg={"d_model": D_MODEL})
    with pytest.raises(InputError, match="n_layers"):
        circuit.to_mib_json(path, cfg={"d_model": D_MODEL, "n_layers": 3})
    with pytest.raises(InputError, match="parallel_attn_mlp"):  # a pruned circuit without head → own MLP edges cannot tell
        replace(circuit, in_graph=circuit.in_graph & Graph(2, 4, True).mask,
                settings={**circuit.settings, "pruned_from": 1}).to_mib_json(path, cfg={"d_model": D_MODEL})
    with pytest.raises(InputError, match="parallel block"):
        circuit.to_mib_json(path, cfg={"d_model": D_MODEL, "parallel_attn_mlp": True})
    with pytest.raises(InputError, match="d_model"):
        circuit.to_mib_json(path, cfg={"d_model": 0})
    with pytest.raises(InputError, match="JSON"):
        circuit.to_mib_json(path, cfg={"d_model": D_MODEL, "dtype": torch.float32})
    with pytest.raises(InputError, match="row 2"):
        circuit.to_mib_json(path, row=2, cfg={"d_model": D_MODEL})
    with pytest.raises(InputError, match="does not exist"):
        circuit.to_mib_json(tmp_path / "no" / "c.json", cfg={"d_model": D_MODEL})
    for bad in (-1, int(circuit.in_graph.sum()) + 1, True, 1.5, "10"):
        with pytest.raises(InputError, match="keep"):
            circuit.to_mib_json(path, keep=bad, cfg={"d_model": D_MODEL})
    with pytest.raises(InputError, match="does not hold"):
        circuit.to_mib_json(path, keep=~circuit.in_graph, cfg={"d_model": D_MODEL})
    with pytest.raises(InputError, match="bool mask"):
        circuit.to_mib_json(path, keep=circuit.in_graph.float(), cfg={"d_model": D_MODEL})
    assert path.read_text() == "earlier"  # a refused export leaves the earlier file
    # extra cfg values are written as given, the derived ones win nowhere against a consistent override
    written = json.loads(circuit.to_mib_json(path, cfg={"d_model": D_MODEL, "n_heads": 4, "model_name": "tiny"}).read_text())
    assert written["cfg"] == {**cfg_of(False), "model_name": "tiny"}


def _file(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _good(parallel=False) -> dict:
    cfg = cfg_of(parallel)
    nodes, edges = reference_names(cfg)
    return {"cfg": cfg, "nodes": {n: {"in_graph": True} for n in nodes}, "edges": {e: {"score": 0.5, "in_graph": True} for e in edges}}


def _with_edge(name: str, parallel=False, **info) -> dict:
    data = _good(parallel)
    data["edges"][name] = {"score": 1.0, "in_graph": True, **info}
    return data


def test_bad_files_are_refused_by_name(tmp_path):
    cases = [
        ("not json {", "not JSON"),
        ([1, 2], "JSON object"),
        ({k: v for k, v in _good().items() if k != "edges"}, "'edges'"),
        ({**_good(), "cfg": {k: v for k, v in cfg_of(False).items() if k != "d_model"}}, "'d_model'"),
        ({**_good(), "cfg": {**cfg_of(False), "parallel_attn_mlp": "no"}}, "parallel_attn_mlp"),
        ({**_good(), "cfg": {**cfg_of(False), "n_heads": 0}}, "n_heads"),
        ({**_good(), "nodes": {**_good()["nodes"], "x7": {"in_graph": True}}}, "unknown node 'x7'"),
        ({**_good(), "nodes": {**_good()["nodes"], "a2.h0": {"in_graph": True}}}, "'a2.h0' is not in a graph of 2 layers"),
        ({**_good(), "nodes": {**_good()["nodes"], "m0": {"score": 1.0}}}, "'m0' has no 'in_graph'"),
        ({**_good(), "nodes": {**_good()["nodes"], "m0": {"in_graph": True, "neurons": [True] * D_MODEL}}}, "neuron-level"),
        (_with_edge("a0.h9->m1"), "'a0.h9' is not in a graph"),
        (_with_edge("m1->a0.h0<q>"), "'m1->a0.h0<q>' cannot exist"),
        (_with_edge("a0.h0->m0", parallel=True), "'a0.h0->m0' cannot exist in this graph \\(parallel"),
        (_with_edge("a1.h0->a1.h1<q>"), "cannot exist"),
        (_with_edge("logits->m1"), "logits write to no node"),
        (_with_edge("m0->input"), "input reads no node"),
        (_with_edge("input->a1.h0"), "<q>, <k> or <v>"),
        (_with_edge("input->a1.h0<z>"), "<q>, <k> or <v>"),
        (_with_edge("input->m1<q>"), "only edges into heads"),
        (_with_edge("input-m1"), "not named 'parent->child'"),
        (_with_edge("input->m1", score=None), "'input->m1'.s score must be a finite number"),
        (_with_edge("input->m1", score=float("nan")), "finite number"),
        (_with_edge("input->m1", score=True), "finite number"),
        (_with_edge("input->m1", in_graph="yes"), "in_graph must be true or false"),
        ({**_good(), "edges": {"input->m1": {"score": 1.0}}}, "'score' and 'in_graph'"),
    ]
    for i, (data, message) in enumerate(cases):
        with pytest.raises(InputError, match=message):
            Circuit.from_mib_json(_file(tmp_path, data, f"bad{i}.json"))
    for name in ("m1->a0.h0<q>", "a0.h9->m1", "input->a1.h0"):  # the reference fails on these too
        with pytest.raises(KeyError):
            parse_like_from_json(_file(tmp_path, _with_edge(name), "ref.json"))
    with pytest.raises(InputError, match="edges must be"):
        Circuit.from_mib_json(_file(tmp_path, _good()), edges="some")
    with pytest.raises(FileNotFoundError):
        Circuit.from_mib_json(tmp_path / "missing.json")
    # a file listing only some edges: those are the circuit's edges, the others unscored
    partial = _good()
    partial["edges"] = dict(list(partial["edges"].items())[:10])
    read = Circuit.from_mib_json(_file(tmp_path, partial, "partial.json"))
    assert int(read.in_graph.sum()) == 10 and float(read.scores.sum()) == 5.0
