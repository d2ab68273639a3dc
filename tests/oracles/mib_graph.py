"""MIB's graph JSON as the reference implementation defines it (``hannamw/EAP-IG``, ``src/eap/graph.py``),
written from reading that file, independent of dpa_lens (no dpa_lens import at all).

* `reference_names(cfg)`: the node names and the edge names, in the order in which ``Graph.from_model`` creates
  them: a list ``stream`` of the nodes written so far starts as ``[input]``; each layer adds its heads
  ``a{l}.h0 … a{l}.h{H-1}`` and its MLP ``m{l}``; every node of ``stream`` feeds each new head through ``<q>``,
  ``<k>``, ``<v>``; in a parallel block (``parallel_attn_mlp``) every node of ``stream`` also feeds the MLP right
  after the heads, and the layer's heads and MLP join ``stream`` afterwards; in a sequential block the heads join
  ``stream`` first and then every node of it feeds the MLP; at the end every node feeds ``logits``.
* `node_flags(edges_in_graph, ...)`: ``apply_topn``'s rule for nodes after the edges are chosen: a node is in the
  graph when it has an outgoing edge in the graph and an incoming one (``input`` counts as having one); the
  logits node always is.
* `parse_like_from_json(path)`: what ``Graph.from_json`` reads: ``cfg``, ``nodes`` and ``edges`` must be there
  (an ``assert``); the graph is built from ``cfg`` (``n_layers``, ``n_heads``, ``parallel_attn_mlp``, ``d_model``:
  a ``KeyError`` if one is missing); every listed node but ``logits`` sets its ``in_graph``; every listed edge sets
  ``score`` and ``in_graph`` (an unknown name is a ``KeyError``); unlisted edges stay at score 0, not in the graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


def reference_names(cfg: dict) -> tuple[list[str], list[str]]:
    """``(nodes, edges)``: the reference's node names (``input`` first, ``logits`` last) and edge names, in order."""
    n_layers, n_heads, parallel = cfg["n_layers"], cfg["n_heads"], cfg["parallel_attn_mlp"]
    nodes, edges = ["input"], []
    stream = ["input"]
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        mlp = f"m{layer}"
        nodes += heads + [mlp]
        if parallel:
            for parent in stream:
                for head in heads:
                    edges += [f"{parent}->{head}<{x}>" for x in "qkv"]
                edges.append(f"{parent}->{mlp}")
            stream += heads + [mlp]
        else:
            for parent in stream:
                for head in heads:
                    edges += [f"{parent}->{head}<{x}>" for x in "qkv"]
            stream += heads
            edges += [f"{parent}->{mlp}" for parent in stream]
            stream.append(mlp)
    edges += [f"{parent}->logits" for parent in stream]
    nodes.append("logits")
    return nodes, edges


def split_edge(name: str) -> tuple[str, str]:
    """``(parent, child node)`` of an edge name (the ``<q|k|v>`` of a head's input dropped)."""
    parent, child = name.split("->")
    return parent, child.split("<")[0]


def node_flags(edges_in_graph: dict[str, bool], nodes: list[str]) -> dict[str, bool]:
    """Each node's ``in_graph`` by the reference's rule, from the edges' ``in_graph``."""
    has_out, has_in = set(), {"input"}
    for name, flag in edges_in_graph.items():
        if flag:
            parent, child = split_edge(name)
            has_out.add(parent)
            has_in.add(child)
    return {n: (n == "logits") or (n in has_out and n in has_in) for n in nodes}


def top_n_names(scores: dict[str, float], n: int, absolute: bool = True) -> set[str]:
    """The ``n`` edges of largest ``|score|`` (``absolute=False``: signed score; ties: the earlier in the given order first)."""
    ranked = sorted(enumerate(scores.items()), key=lambda item: (-(abs(item[1][1]) if absolute else item[1][1]), item[0]))
    return {name for _, (name, _) in ranked[:n]}


@dataclass
class Parsed:
    cfg: dict
    nodes: list[str]
    edges: list[str]  # every edge of the graph of cfg, in the reference's order
    node_in_graph: dict[str, bool]  # as set from the file (logits: always True)
    scores: dict[str, float]  # every edge of the graph: the file's score, or 0.0
    in_graph: dict[str, bool]  # every edge of the graph: the file's flag, or False
    listed: list[str]  # the edges the file lists, in its order
    listed_nodes: list[str]


def parse_like_from_json(path) -> Parsed:
    """Read a MIB graph JSON as the reference's ``Graph.from_json`` does (its failures: AssertionError, KeyError)."""
    with open(path) as handle:
        d = json.load(handle)
    assert all(k in d for k in ("cfg", "nodes", "edges")), "Bad input JSON format - Missing keys"
    cfg = d["cfg"]
    _ = cfg["d_model"]  # from_model(neuron_level=True) sizes its neuron tensors with it
    nodes, edges = reference_names(cfg)
    node_in_graph = dict.fromkeys(nodes, False)
    node_in_graph["logits"] = True
    for name, info in d["nodes"].items():
        if name == "logits":
            continue
        if name not in node_in_graph:
            raise KeyError(name)
        node_in_graph[name] = bool(info["in_graph"])
    scores, in_graph = dict.fromkeys(edges, 0.0), dict.fromkeys(edges, False)
    for name, info in d["edges"].items():
        if name not in scores:
            raise KeyError(name)
        scores[name] = float(info["score"])
        in_graph[name] = bool(info["in_graph"])
    return Parsed(cfg, nodes, edges, node_in_graph, scores, in_graph, list(d["edges"]), list(d["nodes"]))


def write_like_to_json(path, cfg: dict, scores: dict[str, float], in_graph: dict[str, bool]) -> None:
    """A file as the reference's ``Graph.to_json`` writes it (edge-level: no node scores, no neurons)."""
    nodes, edges = reference_names(cfg)
    flags = node_flags(in_graph, nodes)
    d = {"cfg": dict(cfg), "nodes": {n: {"in_graph": flags[n]} for n in nodes},
         "edges": {e: {"score": float(scores[e]), "in_graph": bool(in_graph[e])} for e in edges}}
    with open(path, "w") as handle:
        json.dump(d, handle)
