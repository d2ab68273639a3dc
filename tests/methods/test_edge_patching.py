"""Issue 17, parts 4 and 6: exact edge patching (the ground truth for edges), edge AtP and the random edge baseline.

References:

* patches written by hand on the untouched ``transformers`` model, in float64: the forward of
  ``tests/oracles/edges.py`` gives every reader a private copy of the stream; here the copy of one reader
  is offset by the writer's clean-minus-corrupted output (independent of dpa_lens and TransformerLens);
* TransformerLens 4.3's ``get_act_patch_direct_path`` (head → later head's q/k/v; it refuses grouped
  keys and values and output norms) and its edge ``attribution_patch`` (EAP; same refusals);
* finite differences of dpa_lens's own private-input forward (AtP is its derivative at zero offset);
* `dpa_lens.atp`'s node scores (a writer's outgoing AtP edges add up to its AtP node score).

No edge is linear in its patch: every reader starts with a norm whose scale moves with its input (and
the last layer's heads still feed its MLP and the final norm), so exact patching and AtP need not agree
on any edge; they agree to first order, which the finite-difference test checks.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch

import dpa_lens
from dpa_lens import interventions
from dpa_lens.errors import CacheError, InputError, PairError, TrainModeError
from dpa_lens.graph import graph, writer_deltas
from dpa_lens.methods.edge_atp import edge_atp, edge_random
from dpa_lens.methods.edge_patching import edge_patching
from dpa_lens.models import hooks, tl
from dpa_lens.models.testing import FAMILIES
from tests.helpers import CORRUPTED, EDGES, IOI_PROMPT, OTHER, OTHER_CORRUPTED, PAIR, edges_for, make_tiny
from tests.oracles.edges import FORWARDS, _Net
from tests.oracles.rewired import _Rewired

TL43 = pytest.mark.skipif(tl.TL_MAJOR < 4, reason="TransformerLens 3.9's get_act_patch_direct_path is a frozen-scale "
                          "linearisation, not the exact patch, and its attribution_patch has no edge granularity")


@functools.cache
def _model(family: str, line: str, mha: bool = False, dtype: torch.dtype = torch.float32):
    return make_tiny(family, line, seed=1, dtype=dtype, **({"n_kv_heads": 4} if mha else {}))


def _metric(model):
    good, bad = (model.to_single_token(t) for t in PAIR)
    return lambda logits: logits[:, -1, good] - logits[:, -1, bad]


# ------------------------------------------------------------------------------ patches written by hand


@dataclass
class _Patched(_Net):
    """The oracle forward with the private copy ``key`` (``"L{l}.q"``, ``"L{l}.mlp"``, ``"logit"``...) offset."""

    patches: dict = field(default_factory=dict)

    def copy(self, key, x, heads=None):
        out = super().copy(key, x, heads)
        return out + self.patches[key] if key in self.patches else out


def _oracle(hf, ids, patches=None):
    net = _Patched(R=_Rewired(mu=(0.25, 0.25, 0.5, 0.5, 0.5), b=ids.shape[0]), patches=patches or {})
    logits = FORWARDS[type(hf).__name__](hf, ids, net)
    outs = {"embed": net.embed.detach()}
    for layer, heads in enumerate(net.R.heads):
        outs.update({f"L{layer}H{h}": heads[:, :, h].detach() for h in range(heads.shape[2])})
        outs[f"L{layer}.mlp"] = net.mlp_outs[layer].detach()
    return outs, logits.detach()


@functools.cache
def _hand_patched(family: str, edges: tuple) -> tuple[torch.Tensor, float]:
    """f(corrupted with the edge patched) − f(corrupted) per edge, and f(clean) − f(corrupted), in float64."""
    model, hf = _model(family, tl.default_line())
    f = _metric(model)
    clean, corrupted = model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED)
    out_clean, logits_clean = _oracle(hf, clean)
    out_corr, logits_corr = _oracle(hf, corrupted)
    effects = []
    for writer, reader, path in edges:
        delta = out_clean[writer] - out_corr[writer]
        if path in ("mlp", "logit"):
            key, patch = ("logit" if path == "logit" else reader), delta
        else:
            layer, head = reader[1:].split("H")
            key = f"L{layer}.{path}"
            patch = torch.zeros(*delta.shape[:2], model.cfg.n_heads, delta.shape[-1], dtype=delta.dtype)
            patch[:, :, int(head)] = delta
        effects.append(float(f(_oracle(hf, corrupted, {key: patch})[1]) - f(logits_corr)))
    return torch.tensor(effects, dtype=torch.float64), float(f(logits_clean) - f(logits_corr))


@pytest.mark.parametrize("family", FAMILIES)
def test_edge_patching_equals_patches_written_by_hand(family, line):
    """Every label (q, k, v, mlp, logit) on every family: grouped-query heads each with their own keys and
    values, query-key norms, soft caps, output norms, sliding windows, parallel blocks."""
    model, _ = _model(family, line)
    edges = edges_for(family)
    circuit = edge_patching(model, IOI_PROMPT, CORRUPTED, PAIR, edges=edges, batch_size=5, progress=False)
    want, target_value = _hand_patched(family, tuple(edges))
    got = torch.tensor([circuit.edge(*e) for e in edges], dtype=torch.float64)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert abs(float(circuit.target_value[0]) - target_value) < 1e-4 * max(1.0, abs(target_value))
    assert circuit.in_graph.sum() == len(edges) and circuit.method == "edge_patching"
    assert float(circuit.scores[0][~circuit.in_graph].abs().max()) == 0.0
    labels = {p for _, _, p in edges}
    assert labels == {"q", "k", "v", "mlp", "logit"}


def test_every_edge_of_a_grouped_query_model(line):
    """edges=None measures every existing edge, many copies and layers per forward."""
    model, _ = _model("llama", line)
    circuit = edge_patching(model, IOI_PROMPT, CORRUPTED, PAIR, progress=False)
    assert torch.equal(circuit.in_graph, graph(2, 4, parallel=False)[2])
    want, _ = _hand_patched("llama", tuple(EDGES))
    got = torch.tensor([circuit.edge(*e) for e in EDGES], dtype=torch.float64)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert int((circuit.scores[0].abs() > 1e-3).sum()) > 40  # most edges of this model matter
    # keys of one group, read by two query heads, are two edges with different effects
    assert abs(circuit.edge("L0H1", "L1H0", "k") - circuit.edge("L0H1", "L1H1", "k")) > 1e-2


def test_rows_are_independent(line):
    model, _ = _model("qwen3", line)
    edges = edges_for("qwen3")
    both = edge_patching(model, [IOI_PROMPT, OTHER], [CORRUPTED, OTHER_CORRUPTED], PAIR, edges=edges, batch_size=7, progress=False)
    second = edge_patching(model, OTHER, OTHER_CORRUPTED, PAIR, edges=edges, progress=False)
    torch.testing.assert_close(both.scores[1], second.scores[0], rtol=1e-4, atol=1e-5)
    atp_both, atp_second = edge_atp(model, [IOI_PROMPT, OTHER], [CORRUPTED, OTHER_CORRUPTED], PAIR), edge_atp(model, OTHER, OTHER_CORRUPTED, PAIR)
    torch.testing.assert_close(atp_both.scores[1], atp_second.scores[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(atp_both.target_value, both.target_value, rtol=1e-5, atol=1e-5)


@TL43
@pytest.mark.parametrize("family, mha, components", [("gpt2", False, "qkv"), ("llama", True, "qkv"), ("neox", False, "qkv"),
                                                     ("llama", False, "q")])
def test_edge_patching_equals_transformer_lens_direct_path(family, mha, components):
    """Head → later head through q, k, v where TransformerLens runs it (only q on grouped-query models)."""
    from transformer_lens.patching import get_act_patch_direct_path

    model, _ = _model(family, "bridge", mha)
    metric = lambda logits: _metric(model)(logits)[0]  # noqa: E731
    clean, corrupted = model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED)
    _, clean_cache = model.run_with_cache(clean)
    logits, corr_cache = model.run_with_cache(corrupted)
    H = model.cfg.n_heads
    sources = (1, 3)
    edges = [(f"L0H{s}", f"L1H{d}", c) for c in components for s in sources for d in range(H)]
    circuit = edge_patching(model, clean, corrupted, PAIR, edges=edges, clean_cache=clean_cache, progress=False)
    got = torch.tensor([circuit.edge(*e) for e in edges])
    with torch.no_grad():
        want = torch.cat([get_act_patch_direct_path(model, corrupted, clean_cache, corr_cache, metric, 0, s, c, verbose=False)[1]
                          for c in components for s in sources]) - metric(logits)
    assert float(want.abs().max()) > 1e-2
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ edge AtP


def _private_values(model, edges: list[tuple[str, str, str]], scale: float) -> torch.Tensor:
    """Per edge, f(corrupted with ``scale`` × the writer's Δ in the reader's private copy) − f(corrupted): dpa_lens's
    own private-input forward, read in float64."""
    pair, clean, corr = interventions.pair_forwards(
        model, IOI_PROMPT, CORRUPTED, PAIR, -1, clean_cache=None, attention_mask=None, logit="auto", method="test", run_corrupted=True)
    view, tokens, target = pair.view, pair.corrupted_tokens, pair.target
    writers = graph(view.n_layers, view.n_heads, parallel=view.rules.parallel)[0]
    deltas = writer_deltas(clean, corr)[0].double() * scale
    gain = view.norm_weight("ln_final")
    value = lambda x: target.value(x[:, -1].double() * (1.0 if gain is None else gain.double()))  # noqa: E731
    rows = torch.zeros(1, dtype=torch.long)
    out = []
    for writer, reader, path in edges:
        delta = deltas[:, writers.index(writer)]
        if path == "logit":
            out.append(float(interventions.final_value_change(corr, target, rows, delta[-1:])))
            continue
        layer = int(reader[1:].split("H")[0].split(".")[0])
        heads, mlps = {}, {}
        if path == "mlp":
            mlps[layer] = (rows, delta[None])
        else:
            d = delta.new_zeros(1, delta.shape[0], view.n_heads, view.d_model)
            d[0, :, int(reader.split("H")[1])] = delta
            heads[layer] = (rows, tuple(d if p == path else None for p in "qkv"))
        captured = {}
        fwd_hooks = interventions.private_input_hooks(corr, rows, heads, mlps)
        fwd_hooks.append((hooks.FINAL_NORMALIZED, lambda x, hook, captured=captured: captured.__setitem__("x", x)))
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type=None)
        out.append(float(value(captured["x"]) - value(corr.cache[hooks.FINAL_NORMALIZED])))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "neox"])
def test_edge_atp_is_the_derivative_of_the_private_input_forward(family, line):
    """Central differences of patching ±ε Δ into the reader's private copy (a float64 model)."""
    model, _ = _model(family, line, dtype=torch.float64)
    circuit = edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    edges = edges_for(family)
    eps = 1e-2
    fd = (_private_values(model, edges, eps) - _private_values(model, edges, -eps)) / (2 * eps)
    got = torch.tensor([circuit.edge(*e) for e in edges], dtype=torch.float64)
    assert float(got.abs().max()) > 1e-2
    assert float((got - fd).abs().max()) < 2e-3 * float(got.abs().max())


@TL43
@pytest.mark.parametrize("family, mha", [("gpt2", False), ("llama", True), ("neox", False)])
def test_edge_atp_equals_transformer_lens_edge_attribution(family, mha):
    """TransformerLens's EAP scores (writer, position) → (reader, position); per position and summed."""
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch

    model, _ = _model(family, "bridge", mha)
    circuit = edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR, per_position=True)
    result = attribution_patch(model, model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED), lambda lg: _metric(model)(lg)[0],
                               EdgeAttributionConfig(granularity="edge"))
    writer = lambda n: {"embed": "embed", "attn_head_out": f"L{n.layer}H{n.head}", "mlp_out": f"L{n.layer}.mlp"}[n.kind]  # noqa: E731
    path = {"q_input": "q", "k_input": "k", "v_input": "v", "mlp_in": "mlp", "logits": "logit"}
    reader = lambda n: ("logit" if n.kind == "logits" else f"L{n.layer}.mlp" if n.kind == "mlp_in" else f"L{n.layer}H{n.head}", path[n.kind])  # noqa: E731
    w_index, r_index = {w: i for i, w in enumerate(circuit.writers)}, {r: i for i, r in enumerate(circuit.readers)}
    want = torch.zeros_like(circuit.per_position[0])
    for (u, r), score in result.edge_scores.items():
        assert u.position == r.position
        want[u.position, w_index[writer(u)], r_index[reader(r)]] = score
    torch.testing.assert_close(circuit.per_position[0], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(circuit.scores[0], want.sum(0), rtol=1e-4, atol=1e-6)
    assert float(want.abs().max()) > 0.1


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "neox"])
def test_edge_atp_outgoing_edges_sum_to_atp_node_scores(family, line):
    """Σ_r Δ_u · ∂f/∂x_r = Δ_u · ∂f/∂stream: the node AtP of `dpa_lens.atp` (models without output norms, whose
    node AtP takes the norm's full Jacobian where the writers freeze its scale)."""
    model, _ = _model(family, line)
    circuit = edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    nodes = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    want = torch.cat([nodes.tokens.sum(-1, keepdim=True),
                      torch.cat([nodes.heads.sum(2), nodes.neurons.sum((2, 3))[:, :, None]], -1).reshape(1, L * (H + 1))], -1)
    torch.testing.assert_close(circuit.outgoing(), want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(circuit.target_value, nodes.target_value)


# ------------------------------------------------------------------------------ random baseline, errors


def test_edge_random_is_seeded_and_on_existing_edges():
    model, _ = _model("neox", tl.default_line())
    a, b = edge_random(model, IOI_PROMPT, CORRUPTED, PAIR), edge_random(model, IOI_PROMPT, CORRUPTED, PAIR)
    c = edge_random(model, IOI_PROMPT, CORRUPTED, PAIR, seed=1)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    assert torch.equal(a.in_graph, graph(2, 4, parallel=True)[2])
    assert float(a.scores[0][~a.in_graph].abs().max()) == 0.0 and bool((a.scores[0][a.in_graph] != 0).all())
    assert a.method == "edge_random" and a.target_value is None


@pytest.mark.parametrize("edges, message", [
    ([("L9H0", "logit", "logit")], "unknown writer"),
    ([("L0H0", "L1H0", "x")], "unknown reader"),
    ([("L1H0", "L0H1", "q")], "no edge L1H0"),
    ([("L0H0", "L0.mlp")], r"tuple \(writer, reader, path\)"),
    ([], "edges is empty"),
])
def test_bad_edges(edges, message):
    model, _ = _model("llama", tl.default_line())
    with pytest.raises(InputError, match=message):
        edge_patching(model, IOI_PROMPT, CORRUPTED, PAIR, edges=edges, progress=False)


def test_bad_inputs():
    model, _ = _model("gpt2", tl.default_line())
    short = "When Mary and John went to the store"
    for method in (edge_patching, edge_atp, edge_random):
        with pytest.raises(PairError, match="aligned position by position"):
            method(model, IOI_PROMPT, short, PAIR)
    with pytest.raises(InputError, match="batch_size"):
        edge_patching(model, IOI_PROMPT, CORRUPTED, PAIR, batch_size=0)
    _, other_cache = model.run_with_cache(OTHER)
    with pytest.raises(CacheError):
        edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR, clean_cache=other_cache)
    model.train()
    try:
        with pytest.raises(TrainModeError):
            edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    finally:
        model.eval()
