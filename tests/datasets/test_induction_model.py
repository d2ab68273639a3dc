"""The committed 2-layer induction model: it loads on every line, it copies, and its circuit is the textbook one.

Ground truth for circuit edges: a previous-token head in layer 0 (`PREVIOUS_TOKEN_HEAD`) and an
induction head in layer 1 (`INDUCTION_HEAD`), both read here from attention patterns, with no
attribution method involved.
"""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens.datasets.induction import (
    INDUCTION_HEAD,
    PREVIOUS_TOKEN_HEAD,
    head_roles,
    induction_hf,
    induction_model,
    repeated_tokens,
    segment_losses,
)

_MODELS: dict[str, object] = {}


@pytest.fixture
def model(line):
    """The committed model on one line (loaded once per line)."""
    if line not in _MODELS:
        _MODELS[line] = induction_model(line=line)
    return _MODELS[line]


@pytest.fixture
def data(model):
    """16 rows of 24 tokens: BOS, distinct random ids, an 8-token segment repeated once at random places."""
    return repeated_tokens(model, n_prompts=16, segment=8, seq_len=24, seed=0)


def test_loads_and_matches_transformers(model, data):
    hf, _ = induction_hf()
    tokens = data.tokens.cpu()
    with torch.no_grad():
        logits, cache = model.run_with_cache(data.tokens, names_filter=lambda name: name.endswith("hook_mlp_out"))
        ref = hf(tokens, attention_mask=torch.ones_like(tokens)).logits
    # TransformerLens centres the unembedding, which shifts each position's logits by a constant
    torch.testing.assert_close(logits.float().cpu().log_softmax(-1), ref.log_softmax(-1), rtol=0, atol=5e-4)
    assert not model.cfg.attn_only and model.cfg.d_mlp == 16  # as the README says: MLPs that are there, and add nothing
    for layer in range(model.cfg.n_layers):  # attention-only: the MLPs add exactly zero
        assert float(cache[f"blocks.{layer}.hook_mlp_out"].abs().max()) == 0.0


def test_repeat_loss_far_below_first(model, data):
    with torch.no_grad():
        first, repeat = segment_losses(model(data.tokens), data)
    # trained on repeats only, the model predicts a copy everywhere: confidently wrong on the first
    # occurrence (~14 nats, more than log 128), right on the repeat (~0.002)
    assert float(repeat) < 0.02
    assert float(first) > 1000 * float(repeat)


def test_head_roles_from_attention(model, data):
    roles = head_roles(model, data)
    prev, ind = roles.previous_token, roles.induction  # [layer, head]
    assert roles.top("previous_token") == PREVIOUS_TOKEN_HEAD
    assert roles.top("induction") == INDUCTION_HEAD
    assert prev[PREVIOUS_TOKEN_HEAD] > 0.6 and ind[INDUCTION_HEAD] > 0.9
    assert float(_others(prev, PREVIOUS_TOKEN_HEAD).max()) < 0.25  # every other head is far from either role
    assert float(_others(ind, INDUCTION_HEAD).max()) < 0.15


def _others(scores: torch.Tensor, where: tuple[int, int]) -> torch.Tensor:
    """The scores of every head but ``where`` ([layer, head] -> [n_layers * n_heads - 1])."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[where] = False
    return scores[keep]


def test_dpa_ranks_the_induction_head_first(model, data):
    """At a repeated position, DPA of the correct next token puts the induction head on top, via key e + 1."""
    rows, later, earlier = data.pairs(predictable=True)
    batch = torch.arange(len(data.tokens))
    middle = torch.stack([torch.nonzero(rows == r)[len(torch.nonzero(rows == r)) // 2, 0] for r in batch.tolist()])
    position, key = later[middle], earlier[middle] + 1  # [batch]: mid-repeat, and the key an induction head reads
    target = data.tokens[batch, position + 1].tolist()  # the correct next tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens, names_filter=dpa_lens.dpa_names_filter(model))
    attr = dpa_lens.dpa(model, cache, target, position=position, head_keys=True)
    heads = attr.heads.cpu()[batch, :, position]  # [batch, layer, head]
    layer, head = INDUCTION_HEAD
    top = heads.flatten(1).argmax(dim=1)  # [batch]
    assert bool((top == layer * heads.shape[-1] + head).all())
    value = attr.target_value.cpu()
    assert bool((heads[:, layer, head] > 0.8 * value).all())  # it carries most of the logit
    per_key = attr.head_keys.cpu()[batch, layer, head, position]  # [batch, key]
    assert bool((per_key[batch, key] > 0.9 * per_key.sum(-1)).all())  # through the key after the earlier occurrence


def _answer_positions(data):
    """Per row: a mid-repeat query position, the key an induction head reads there, the correct next token."""
    rows, later, earlier = data.pairs(predictable=True)
    batch = torch.arange(len(data.tokens))
    middle = torch.stack([torch.nonzero(rows == r)[len(torch.nonzero(rows == r)) // 2, 0] for r in batch.tolist()])
    position, key = later[middle], earlier[middle] + 1
    return position, key, data.tokens[batch, position + 1].tolist()


def _head_to_head(circuit, paths):
    """``[batch, edges]`` scores of the head → head edges whose path is in ``paths``, and their names."""
    names = [(w, r, p) for w in circuit.writers for (r, p) in circuit.readers
             if w.startswith("L") and "H" in w and r.startswith("L") and "H" in r and p in paths]
    cols = torch.tensor([[circuit.writers.index(w), circuit.readers.index((r, p))] for w, r, p in names])
    return circuit.scores.cpu()[:, cols[:, 0], cols[:, 1]], names


def test_dpa_edges_find_the_k_composition(model, data):
    """The textbook wiring: previous-token head → induction head through the induction head's key.

    With the default μ the largest head → head edges are value edges into the induction head (the
    layer-0 heads mix the current token into their output, and the induction head copies it: content
    DPA counts in full), and the key edge is small because the induction head's softmax is saturated
    (α ≈ 0.995 at the key it reads; DPA's key path is α (v − z)·λ). Among the control edges (q and k)
    the key edge from the previous-token head is the largest on average over the prompts (five times
    the next), though not in every row (8 of these 16)."""
    position, key, target = _answer_positions(data)
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens)
    circuit = dpa_lens.dpa_edges(model, cache, target, position=position)
    want = (f"L{PREVIOUS_TOKEN_HEAD[0]}H{PREVIOUS_TOKEN_HEAD[1]}", f"L{INDUCTION_HEAD[0]}H{INDUCTION_HEAD[1]}", "k")
    control, names = _head_to_head(circuit, {"q", "k"})
    mean = control.mean(0).abs()
    assert names[int(mean.argmax())] == want
    ordered = mean.sort(descending=True).values
    assert float(ordered[0]) > 3 * float(ordered[1])
    every, _ = _head_to_head(circuit, {"q", "k", "v"})
    assert float(every.mean(0).abs().max()) > 10 * float(ordered[0])  # the value edges dominate (see above)
    assert float(control[:, names.index(want)].mean()) > 0  # the key edge raises the correct token
    # content-only DPA has no control paths: the key edge is exactly zero
    content = dpa_lens.dpa_edges(model, cache, target, position=position, mu=dpa_lens.Mu.content_only())
    scores, names_c = _head_to_head(content, {"k"})
    assert float(scores.abs().max()) == 0.0


def _corrupted(data):
    """The prompts with the first copy of each row's segment replaced by ids the row does not use (seeded)."""
    corrupted = data.tokens.clone()
    gen = torch.Generator().manual_seed(1)
    for r, (start, n) in enumerate(zip(data.first.tolist(), data.length.tolist())):
        unused = torch.tensor(sorted(set(range(1, 129)) - set(data.tokens[r].tolist())))
        corrupted[r, start:start + n] = unused[torch.randperm(len(unused), generator=gen)[:n]].to(corrupted)
    return corrupted


def test_edge_atp_ranks_the_k_composition_first(model, data):
    """Edge AtP against a corrupted prompt whose first copy of the segment is replaced by unused ids."""
    position, key, target = _answer_positions(data)
    corrupted = _corrupted(data)
    circuit = dpa_lens.edge_atp(model, data.tokens, corrupted, target, position=position)
    scores, names = _head_to_head(circuit, {"q", "k", "v"})
    want = (f"L{PREVIOUS_TOKEN_HEAD[0]}H{PREVIOUS_TOKEN_HEAD[1]}", f"L{INDUCTION_HEAD[0]}H{INDUCTION_HEAD[1]}", "k")
    assert names[int(scores.mean(0).abs().argmax())] == want


def test_integrated_dpa_ranks_the_k_composition_first(model, data):
    """Integrated DPA (`dpa_edges_ig`, its default steps) against the corrupted prompt of the edge AtP test: DPA's reader
    terms on runs between the corrupted and the clean embeddings, where the induction head is not yet saturated, rank
    the previous-token → induction head key edge first among head → head edges; contrastive DPA, whose reader terms
    are the clean run's (saturated), does not."""
    position, key, target = _answer_positions(data)
    corrupted = _corrupted(data)
    want = (f"L{PREVIOUS_TOKEN_HEAD[0]}H{PREVIOUS_TOKEN_HEAD[1]}", f"L{INDUCTION_HEAD[0]}H{INDUCTION_HEAD[1]}", "k")
    integrated = dpa_lens.dpa_edges_ig(model, data.tokens, corrupted, target, position=position, progress=False)
    scores, names = _head_to_head(integrated, {"q", "k", "v"})
    assert names[int(scores.mean(0).abs().argmax())] == want
    contrastive = dpa_lens.run("dpa_edges", model, data.tokens, target, corrupted=corrupted, position=position)
    scores, names = _head_to_head(contrastive, {"q", "k", "v"})
    assert names[int(scores.mean(0).abs().argmax())] != want
