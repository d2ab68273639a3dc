"""Hand an `Attribution` to TransformerLens's own circuit tooling.

``to_transformer_lens(attr)`` gives a ``transformer_lens.tools.analysis.attribution_patching.
AttributionResult`` whose ``node_scores`` use TransformerLens's ``Node`` keys (embed per position,
``attn_head_out`` per layer, position and head, ``mlp_out`` per layer and position: the sum of the
layer's neurons there), so its ``top_nodes`` ranks them as TransformerLens ranks AtP.
``circuit_edges(model, nodes)`` turns chosen nodes into the edge set that
TransformerLens's ``faithfulness`` keeps (every edge leaving a chosen writer).
``circuit_to_transformer_lens(circuit)`` hands a `Circuit`'s per-position edges over as an
edge-granularity ``AttributionResult`` (TransformerLens 4.x).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, get_args

import torch

from dpa_lens.deprecation import renamed
from dpa_lens.errors import InputError
from dpa_lens.graph import node_layer, writer_kind
from dpa_lens.results import Attribution, Circuit


def _tl():
    from transformer_lens.tools.analysis import attribution_patching

    return attribution_patching


def to_transformer_lens(attr: Attribution, row: int = 0) -> Any:
    """TransformerLens ``AttributionResult`` of one row of ``attr`` (node granularity)."""
    ap = _tl()
    scores: dict[Any, float] = {}
    if attr.tokens is not None:
        for pos, s in enumerate(attr.tokens[row].tolist()):
            scores[ap.Node("embed", pos)] = float(s)
    if attr.heads is None and attr.head_totals is not None:
        raise InputError(f"{attr.method} scored whole heads (no positions); TransformerLens nodes are per position")
    if attr.heads is not None:
        heads = attr.heads[row]
        L, P, H = heads.shape
        for layer in range(L):
            for pos in range(P):
                for head in range(H):
                    scores[ap.Node("attn_head_out", pos, layer, head)] = float(heads[layer, pos, head])
    if attr.neurons is not None:
        per_layer = attr.neurons[row].nansum(-1)  # [L, pos]
        for layer in range(per_layer.shape[0]):
            for pos in range(per_layer.shape[1]):
                scores[ap.Node("mlp_out", pos, layer)] = float(per_layer[layer, pos])
    return ap.AttributionResult(node_scores=scores)


@renamed(clean_tokens="prompt")
def circuit_edges(model: Any, prompt: Any, nodes: Iterable[Any]) -> list[tuple[Any, Any]]:
    """All edges of TransformerLens's graph whose writer is one of ``nodes`` (a node circuit as edges).

    For ``transformer_lens.tools.analysis.attribution_patching.faithfulness`` (TransformerLens 4.x,
    which refuses grouped-query attention there).
    """
    ap = _tl()
    if not hasattr(ap, "enumerate_edges"):
        from importlib.metadata import version

        raise NotImplementedError(f"TransformerLens {version('transformer_lens')} has no edge graph or faithfulness tooling (4.x does)")
    keep = set(nodes)
    names = ap._edge_hook_names(model.cfg.n_layers)
    with ap._edge_hook_flags(model):
        cache = ap.cache_activation_and_gradient(model, prompt, lambda logits: logits[0, -1].sum(),
                                                 names_filter=lambda n: n in names, compute_gradient=False)
        edges = ap.enumerate_edges(model, cache)
    return [(w, r) for w, r in edges if w in keep]


def circuit_to_transformer_lens(circuit: Circuit, row: int = 0) -> Any:
    """TransformerLens ``AttributionResult`` of one row of a `Circuit`, at edge granularity.

    ``edge_scores`` holds every edge of the circuit's graph at every position, keyed by
    TransformerLens's ``(writer, reader)`` nodes: ``Node("embed", p)``, ``Node("attn_head_out", p,
    layer, head)`` or ``Node("mlp_out", p, layer)`` to ``Node("q_input" | "k_input" | "v_input", p,
    layer, head)``, ``Node("mlp_in", p, layer)`` or ``Node("logits", p, n_layers - 1)``. As in
    TransformerLens's own edge graph, writer and reader share the position ``p`` where the stream is
    read: a key or value edge sits at the key position, whichever query pulled it (what
    ``Circuit.per_position`` holds). ``node_scores`` are each writer's outgoing edges summed at its
    position (for DPA, its node score there). Neuron writers have no TransformerLens node and are left
    out (their MLP's edges already hold them).

    Raises:
        InputError: the circuit has no per-position scores.
        NotImplementedError: TransformerLens 3.x, whose ``Node`` has no reader kinds.
    """
    ap = _tl()
    if "q_input" not in get_args(ap.NodeKind):
        from importlib.metadata import version

        raise NotImplementedError(f"TransformerLens {version('transformer_lens')} has no edge-granularity nodes (q_input, k_input, ...): "
                                  "circuit_to_transformer_lens needs TransformerLens 4.x (pip install 'transformer-lens>=4.3')")
    if circuit.per_position is None:
        raise InputError("TransformerLens keys edges per position: make the circuit with per_position=True")
    b = circuit.row_index(row)
    n_layers = max(int(node_layer(w)) for w in circuit.writers if w != "embed") + 1
    kinds = {"q": "q_input", "k": "k_input", "v": "v_input", "mlp": "mlp_in"}

    def writer_node(name: str, p: int) -> Any:
        if name == "embed":
            return ap.Node("embed", p)
        layer = int(node_layer(name))
        return ap.Node("attn_head_out", p, layer, int(name.split("H")[1])) if "H" in name else ap.Node("mlp_out", p, layer)

    def reader_node(name: str, label: str, p: int) -> Any:
        if label == "logit":
            return ap.Node("logits", p, n_layers - 1)
        layer = int(node_layer(name))
        return ap.Node(kinds[label], p, layer, int(name.split("H")[1])) if "H" in name else ap.Node("mlp_in", p, layer)

    mask = circuit.in_graph.clone()
    mask[[i for i, w in enumerate(circuit.writers) if writer_kind(w) == "neuron"]] = False
    scores = circuit.per_position[b].detach().double().cpu()  # [pos, writer, reader]
    w_idx, r_idx = torch.nonzero(mask, as_tuple=True)
    writers = sorted(set(w_idx.tolist()))
    edges, nodes = {}, {}
    for p in range(scores.shape[0]):
        at = scores[p]
        for w in writers:
            nodes[writer_node(circuit.writers[w], p)] = float(at[w][mask[w]].sum())
        for w, r, s in zip(w_idx.tolist(), r_idx.tolist(), at[w_idx, r_idx].tolist()):
            edges[(writer_node(circuit.writers[w], p), reader_node(*circuit.readers[r], p))] = s
    return ap.AttributionResult(node_scores=nodes, edge_scores=edges)
