"""Hand an `Attribution` to TransformerLens's own circuit tooling.

``to_transformer_lens(attr)`` gives a ``transformer_lens.tools.analysis.attribution_patching.
AttributionResult`` whose ``node_scores`` use TransformerLens's ``Node`` keys (embed per position,
``attn_head_out`` per layer, position and head, ``mlp_out`` per layer and position: the sum of the
layer's neurons there), so its ``top_nodes`` ranks them as TransformerLens ranks AtP.
``circuit_edges(model, nodes)`` turns chosen nodes into the edge set that
TransformerLens's ``faithfulness`` keeps (every edge leaving a chosen writer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dpa_lens.attribution import Attribution
from dpa_lens.errors import InputError


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


def circuit_edges(model: Any, clean_tokens: Any, nodes: Iterable[Any]) -> list[tuple[Any, Any]]:
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
        cache = ap.cache_activation_and_gradient(model, clean_tokens, lambda logits: logits[0, -1].sum(),
                                                 names_filter=lambda n: n in names, compute_gradient=False)
        edges = ap.enumerate_edges(model, cache)
    return [(w, r) for w, r in edges if w in keep]
