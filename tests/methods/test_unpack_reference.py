"""The float64 Unpack reference (tests/oracles/unpack_ref.py) on its own, on tiny GPT-2 and GPT-NeoX.

It checks the reference's closure invariants (at the reference's tolerances and at float64
precision), that its paths are well formed, that its credit percentages have their documented
form, that the flow sweep is the unpruned recursion, and that with consistent rules and β = 0 every
split conserves credit.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from dpa_lens.models.testing import tiny_tokenizer
from tests.helpers import IOI_PROMPT, make_tiny
from tests.oracles import unpack_ref as U

PRESETS = ["kqv_aligned", "k_only_weighted", "kqv_l2"]
TIGHT = 1e-9  # float64 closures hold to rounding
_MODELS: dict[str, tuple] = {}


@pytest.fixture(params=["gpt2", "neox"])
def tiny(request):
    """(HF reference model, prompt ids [n], target id, distractor id) for a tiny model of the family."""
    if request.param not in _MODELS:
        _, ref = make_tiny(request.param, seed=0)
        tok = tiny_tokenizer()
        ids = tok(IOI_PROMPT, return_tensors="pt")["input_ids"][0]
        _MODELS[request.param] = (ref, ids, tok.encode(" Mary")[0], tok.encode(" John")[0])
    return _MODELS[request.param]


def _ln(x, g, b, eps):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], g, b, eps)


def test_safe_denominator():
    assert U.safe_denominator([3.0, -1.0], 0.8) == pytest.approx(3.2)  # |Σ| = 2 < β·Σ|v| = 3.2
    assert U.safe_denominator([-3.0, 0.1], 0.8) == pytest.approx(-2.9)  # sign of Σ; |Σ| = 2.9 > β·Σ|v| = 2.48
    assert U.safe_denominator([1.0, -1.0], 0.8) == pytest.approx(1.6)  # Σ = 0 counts as positive
    assert U.safe_denominator([1e-12, -1e-12], 0.8) is None


def test_presets():
    assert set(U.PRESETS) == {"kqv_aligned", "k_only_weighted", "k_only_l2", "k_only_aligned", "kqv_weighted", "kqv_l2"}
    assert all(p.beta == 0.8 for p in U.PRESETS.values())
    kqv, k = U.PRESETS["kqv_aligned"], U.PRESETS["k_only_l2"]
    assert U.branch_weights(kqv, quirks=True, flow=False) == {"K": 0.333, "Q": 0.333, "V": 0.333}
    assert U.branch_weights(k, quirks=True, flow=False) == {"K": 0.333}
    assert U.branch_weights(k, quirks=True, flow=True) == {"K": 0.3}
    assert U.branch_weights(k, quirks=False, flow=True) == {"K": 1.0}


def test_forward_is_the_models(tiny):
    ref, ids, target, _ = tiny
    D = U.decompose(ref, ids, target)
    with torch.no_grad():
        out = ref(ids[None], output_hidden_states=True)
    scale = out.logits.abs().max()
    assert float((D.logits - out.logits[0].double()).abs().max() / scale) < 1e-5
    for L, x in enumerate(D.resid_pre):
        assert torch.allclose(x, out.hidden_states[L][0].double(), atol=1e-4, rtol=1e-4)
    g, b, eps = D.ln_f
    assert torch.allclose(_ln(D.resid_final, g, b, eps), out.hidden_states[-1][0].double(), atol=1e-4)


@pytest.mark.parametrize("quirks", [True, False])
def test_six_closure_checks(tiny, quirks):
    ref, ids, target, distractor = tiny
    errors = U.closure_errors(U.decompose(ref, ids, target, distractor, quirks=quirks))
    assert set(errors) == set(U.CLOSURE_TOLERANCES)
    for name, err in errors.items():
        assert err <= U.CLOSURE_TOLERANCES[name], name
        assert err <= TIGHT, name


def test_sides_add_up_to_scores_and_values(tiny):
    """Σ key-side (or query-side) rows + constants = the real logits; Σ value parts + constants = v."""
    ref, ids, target, _ = tiny
    D = U.decompose(ref, ids, target)
    for L, A in enumerate(D.attn):
        assert torch.allclose(A.key.sum(0) + sum(A.key_extra.values()), A.scores, atol=TIGHT)
        assert torch.allclose(A.query.sum(0) + sum(A.query_extra.values()), A.scores, atol=TIGHT)
        assert torch.allclose(A.value_vec.sum(0) + sum(A.value_vec_extra.values()), A.v, atol=TIGHT)
        assert torch.allclose(A.value.sum(0) + sum(A.value_extra.values()), (A.v * A.v).sum(-1), atol=TIGHT)
        n = A.alpha.shape[-1]
        assert torch.allclose(A.alpha.sum(-1), torch.ones_like(A.alpha[..., 0]))
        assert not A.alpha.triu(1).any(), "causal"
        assert A.key.shape[0] == len(A.up) and all(D.order[nm] < L for nm in A.up)
        assert A.shares0.shape == A.shares_out.shape == (A.alpha.shape[0], n, n)


def test_marginal_norm_adds_up_to_the_mlp_input(tiny):
    """Σ over the components written before an MLP of their marginal norms + the norm's bias = LN(its input)."""
    ref, ids, target, _ = tiny
    D = U.decompose(ref, ids, target, quirks=False)
    blocks = ref.transformer.h if D.family == "GPT2LMHeadModel" else ref.gpt_neox.layers
    for L, M in enumerate(D.mlp):
        real_in = D.resid_pre[L] if D.parallel else D.resid_mid[L]
        assert M.x_in is real_in
        ln = blocks[L].ln_2 if D.family == "GPT2LMHeadModel" else blocks[L].post_attention_layernorm
        g, b = ln.weight.detach().double(), ln.bias.detach().double()
        written = [i for i, nm in enumerate(D.names) if D.order[nm] < D.order[f"mlp_{L}"]]
        total = U.marginal(D.vecs[written], real_in, g, ln.eps).sum(0) + b
        assert torch.allclose(total, _ln(real_in, g, b, ln.eps), atol=TIGHT)
        assert bool(torch.isfinite(M.l2).all()) and bool((M.l2 >= 0).all())


@pytest.mark.parametrize("quirks", [True, False])
def test_seeds_add_up_to_the_logit(tiny, quirks):
    """Σ seeds + the final norm's bias term = the target logit minus the vocabulary mean (or the distractor's)."""
    ref, ids, target, distractor = tiny
    for dis in (None, distractor):
        D = U.decompose(ref, ids, target, dis, quirks=quirks)
        direction = D.direction if (dis is None or not quirks) else U._direction(D.W_U.shape[1], target, None)
        value = float(D.logits[D.position] @ direction)
        bias_term = float(D.ln_f[1] @ (D.W_U @ direction))
        assert sum(D.seeds.values()) + bias_term == pytest.approx(value, rel=1e-9, abs=1e-9)


def test_reference_seeds_ignore_the_distractor(tiny):
    """A quirk kept on purpose: the reference's seeds score target − vocabulary mean even with a distractor."""
    ref, ids, target, distractor = tiny
    with_d, without = U.decompose(ref, ids, target, distractor), U.decompose(ref, ids, target)
    assert with_d.seeds == without.seeds
    assert not torch.allclose(with_d.d_t, without.d_t)


def _check_path(D, path, preset, root_pos):
    """A path runs from the root down to an embedding: layers decrease, K/V move to a source position."""
    hops = path.hops
    assert hops[0][2] == root_pos
    name, label, pos = hops[-1]
    assert name in U.EMBEDDINGS and label is None
    for (a, lab, p), (b, _, p_next) in zip(hops, hops[1:]):
        assert lab in ("K", "Q", "V", "mlp")
        assert (lab == "mlp") == a.startswith("mlp_") and (lab != "mlp") == a.startswith("attn_")
        assert "bias" not in a and "bias" not in b
        assert D.order[b] < D.order[a], "layers decrease along a path"
        if lab in ("Q", "mlp"):
            assert p_next == p
        else:
            assert p_next <= p
    if preset.branches == "k":
        assert set(path.modes) <= {"K"}
    assert path.depth == len(hops) - 1
    parsed = [re.fullmatch(r"([a-z_0-9]+)(?:\[([KQV])\])?@(\d+)", part) for part in path.chain.split("→")]
    assert all(parsed) and [(m.group(1), int(m.group(3))) for m in parsed] == [(h[0], h[2]) for h in hops]
    assert [m.group(2) for m in parsed if m.group(2)] == path.modes


@pytest.mark.parametrize("preset", PRESETS)
def test_paths_and_percentages(tiny, preset):
    ref, ids, target, distractor = tiny
    r = U.unpack_reference(ref, ids, target, distractor, preset=preset, top_paths=20)
    D, P = r.decomposition, r.preset
    assert r.root == "target" and r.all_paths
    for path in r.all_paths:
        _check_path(D, path, P, D.position)
        assert abs(path.raw) >= 1e-4
    # top paths: the first ones of all paths sorted by |score|
    assert r.paths == r.all_paths[:20]
    scores = [abs(p.score) for p in r.all_paths]
    assert scores == sorted(scores, reverse=True)
    # path % = raw / the recursion's positive token mass; per position they add up to its token credit
    rec_pos = float(r.path_credit_raw.clamp_min(0).sum())
    per_pos = torch.zeros_like(r.path_credit_raw)
    for p in r.all_paths:
        assert p.score == pytest.approx(p.raw / rec_pos * 100)
        per_pos[p.source_pos] += p.score
    assert torch.allclose(per_pos, r.path_credit_raw / rec_pos * 100)
    # token credit: % of the flow's positive mass (positives add up to 100, none above 100)
    pct = r.token_credit
    assert float(pct.clamp_min(0).sum()) == pytest.approx(100.0)
    assert float(pct.max()) <= 100.0 + 1e-9
    assert torch.allclose(pct, r.token_credit_raw / r.token_credit_raw.clamp_min(0).sum() * 100)
    neg, pos = float(-r.token_credit_raw.clamp_max(0).sum()), float(r.token_credit_raw.clamp_min(0).sum())
    assert 0.0 <= r.suppress_ratio < 1.0 and r.suppress_ratio == pytest.approx(neg / (pos + neg))
    # component flow: what reached the embeddings is the token credit; no bias carries flow
    embedded = sum(r.component_flow.get(nm, 0.0) for nm in U.EMBEDDINGS)
    assert embedded == pytest.approx(float(r.token_credit_raw.sum()), abs=1e-12)
    assert not any("bias" in nm for nm in r.component_flow)


@pytest.mark.parametrize("preset", ["kqv_aligned", "k_only_l2"])
@pytest.mark.parametrize("quirks", [True, False])
def test_flow_is_the_unpruned_recursion(tiny, preset, quirks):
    ref, ids, target, distractor = tiny
    D = U.decompose(ref, ids[:5], target, distractor, quirks=quirks)
    P = U.PRESETS[preset]
    _, credit = U.flow_sweep(D, P, D.seeds, D.position, quirks=quirks)
    paths = U.walk_paths(D, P, D.seeds, D.position, quirks=quirks, min_frac=0.0, flow_rules=True)
    from_paths = torch.zeros_like(credit)
    for p in paths:
        from_paths[p.source_pos] += p.raw
    assert torch.allclose(from_paths, credit, atol=1e-12)


@pytest.mark.parametrize("preset", list(U.PRESETS))
def test_consistent_rules_conserve_credit(tiny, preset):
    """quirks=False, β = 0: every split hands on exactly what it got, so the tokens get the seeds' credit.

    Except at query position 0, which sees one key only: its centred K and Q logits are all zero,
    so those branches cannot split and their share is dropped (as in the reference).
    """
    ref, ids, target, distractor = tiny
    D = U.decompose(ref, ids[:8], target, distractor, quirks=False)
    P = dataclasses.replace(U.PRESETS[preset], beta=0.0)
    w_dropped = 2 / 3 if P.branches == "kqv" else 1.0
    for root in (None, "attn_1_head_2@5"):
        r = U.unpack_reference(ref, ids[:8], preset=P, quirks=False, decomposition=D, root=root)
        seeded = sum(v for nm, v in r.seeds.items() if "bias" not in nm)
        at_first = sum(float(v[0]) for nm, v in r.component_flow_pos.items() if nm.startswith("attn_"))
        assert float(r.token_credit_raw.sum()) + w_dropped * at_first == pytest.approx(seeded, rel=1e-9, abs=1e-12)


def test_rerooting(tiny):
    ref, ids, target, distractor = tiny
    D = U.decompose(ref, ids, target, distractor)
    q = D.position - 2
    r = U.unpack_reference(ref, ids, preset="kqv_aligned", root=f"attn_1_head_2@{q}", decomposition=D)
    assert r.root == f"attn_1_head_2@{q}" and r.seeds == {"attn_1_head_2": 1.0}
    assert r.all_paths and all(p.hops[0][0] == "attn_1_head_2" for p in r.all_paths)
    for p in r.all_paths:
        _check_path(D, p, r.preset, q)
    default = U.unpack_reference(ref, ids, root="mlp_1", decomposition=D)
    assert default.root == f"mlp_1@{D.position}"
    with pytest.raises(ValueError):
        U.unpack_reference(ref, ids, root="attn_9_head_0", decomposition=D)
