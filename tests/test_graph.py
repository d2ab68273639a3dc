"""The residual graph: its node lists and the index arithmetic every edge method reads instead of counting."""

from __future__ import annotations

import pytest
import torch

from dpa_lens import InputError
from dpa_lens.graph import Graph, entry_stream, graph, node_layer, writer_kind


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("has_mlp", [True, False])
def test_the_index_arithmetic_is_the_order_of_the_lists(parallel, has_mlp):
    g = Graph(3, 4, parallel, has_mlp)
    H = 4
    assert len(g.writers) == g.n_units == 1 + 3 * (H + has_mlp) and g.readers[g.logit_reader] == ("logit", "logit")
    assert len(g.reader_slots()) == len(g.readers)
    for layer in range(3):
        heads = g.readers[g.head_readers(layer)]
        assert heads == [(f"L{layer}H{h}", p) for h in range(H) for p in "qkv"]
        assert g.writers[g.read_by_heads(layer) - 1] == ("embed" if layer == 0 else (f"L{layer - 1}.mlp" if has_mlp else f"L{layer - 1}H{H - 1}"))
        # a head reads exactly the writers before ``read_by_heads`` (the mask agrees with the count)
        r = g.head_readers(layer).start
        assert int(g.mask[:, r].sum()) == g.read_by_heads(layer) and bool(g.mask[: g.read_by_heads(layer), r].all())
        if has_mlp:
            m = g.mlp_reader(layer)
            assert g.readers[m] == (f"L{layer}.mlp", "mlp")
            assert int(g.mask[:, m].sum()) == g.read_by_mlp(layer) == g.read_by_heads(layer) + (0 if parallel else H)
        else:
            assert not any(w.endswith(".mlp") for w in g.writers)
            with pytest.raises(InputError, match="attention-only"):
                g.mlp_reader(layer)
        for w in range(g.read_by_heads(layer), g.read_by_heads(layer) + H):
            assert g.writer_unit(w) == (layer, w - g.read_by_heads(layer))
    assert bool(g.mask[:, -1].all())  # every writer reaches the logit
    assert (g.writers, g.readers) == graph(3, 4, parallel=parallel, has_mlp=has_mlp)[:2]
    assert torch.equal(g.mask, graph(3, 4, parallel=parallel, has_mlp=has_mlp)[2])


def test_edge_masks_name_their_edges():
    g = Graph(2, 2, False)
    chosen = g.edge_mask([("L0H1", "L1H0", "k"), ("embed", "logit", "logit")])
    assert int(chosen.sum()) == 2 and bool(chosen[g.writers.index("L0H1"), g.readers.index(("L1H0", "k"))])
    with pytest.raises(InputError, match="no edge L1H0"):
        g.edge_mask([("L1H0", "L0H0", "q")])  # upstream
    with pytest.raises(InputError, match="unknown writer"):
        g.edge_mask([("L9H0", "logit", "logit")])
    with pytest.raises(InputError, match="empty"):
        g.edge_mask([])
    assert torch.equal(g.edge_mask(None), g.mask)


def test_node_names():
    assert [node_layer(n) for n in ("embed", "L2H3", "L2.mlp", "L2N7", "logit")] == [-1.0, 2.0, 2.5, 2.5, float("inf")]
    assert [writer_kind(n) for n in ("embed", "L2H3", "L2.mlp", "L2N7")] == ["embed", "head", "mlp", "neuron"]
    assert [entry_stream(n, parallel=False) for n in ("embed", "L1H0", "L1.mlp")] == [0, 3, 4]
    assert [entry_stream(n, parallel=True) for n in ("embed", "L1H0", "L1.mlp")] == [0, 4, 4]
