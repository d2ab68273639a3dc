"""Unpack (`dpa_lens.methods.unpack`) against the float64 oracle (tests/oracles/unpack_ref.py).

On tiny GPT-2 and GPT-NeoX, on both TransformerLens lines: token credit, head and MLP flow, and the
strongest paths equal the oracle run on TransformerLens's processed weights (``processed=True``), for
three presets, with and without a distractor, with the reference's quirks and without, and rerooted;
on ``load_model(..., processed=False)`` they equal the oracle run on the raw ``transformers`` model.
Unpack's closure checks hold at the reference's tolerances (and fail on a tampered cache); paths are
well formed; on Llama (grouped-query heads, rotary, RMSNorm, gated MLP), with consistent rules and
β = 0, the tokens get all of the target's credit but what position 0 drops; bad input gets a dpa_lens
error.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest
import torch

import dpa_lens
from dpa_lens import Attribution, InputError, TargetError, UnsupportedModelError
from dpa_lens.graph import LABELS
from dpa_lens.methods.unpack import CLOSURE_TOLERANCES, PRESETS, Preset, unpack, unpack_validate
from dpa_lens.models.testing import tiny_hf_model, tiny_tokenizer
from dpa_lens.results import Hop, Path
from tests.helpers import IOI_PROMPT, PAIR, make_tiny
from tests.oracles import unpack_ref as U

TOL = 1e-4  # relative to the largest score
_MODELS: dict[tuple[str, str], tuple] = {}
_ORACLE: dict[tuple, U.UnpackRef] = {}


def _tiny(family: str, line: str, processed: bool = True):
    """(TL model, HF reference, token ids [1, n], cache, target id, distractor id), built once; the reference
    is the model given to `load_model`, which leaves it as it was."""
    if (family, line, processed) not in _MODELS:
        ref = tiny_hf_model(family, seed=0)
        model = dpa_lens.load_model(ref, tokenizer=tiny_tokenizer(), line=line, processed=processed)
        tokens = model.to_tokens(IOI_PROMPT)
        _, cache = model.run_with_cache(tokens)
        target, distractor = (model.to_single_token(t) for t in PAIR)
        _MODELS[family, line, processed] = (model, ref, tokens, cache, target, distractor)
    return _MODELS[family, line, processed]


def _oracle(family: str, ref, tokens, processed: bool = True, **kw) -> U.UnpackRef:
    """The oracle on TransformerLens's processed weights, or on the raw model's (the same on both lines: run once)."""
    key = (family, processed, tuple(tokens[0].tolist()), tuple(sorted(kw.items())))
    if key not in _ORACLE:
        _ORACLE[key] = U.unpack_reference(ref, tokens[0], processed=processed, top_paths=10**9, **kw)
    return _ORACLE[key]


def _node(name: str) -> str:
    if name in U.EMBEDDINGS:
        return "embed"
    m = re.fullmatch(r"attn_(\d+)_head_(\d+)", name)
    return f"L{m[1]}H{m[2]}" if m else f"L{name.split('_')[1]}.mlp"


def _oracle_paths(o: U.UnpackRef) -> dict[tuple, float]:
    """The oracle's paths in dpa_lens's form (source first, then ``logit`` at the root's position; a
    path's percent), those with the same hops merged."""
    merged: dict[tuple, float] = defaultdict(float)
    for p in o.all_paths:
        hops = tuple((_node(nm), None if lab is None else lab.lower(), pos) for nm, lab, pos in reversed(p.hops))
        merged[hops + (("logit", "logit", p.hops[0][2]),)] += p.score
    return merged


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _same_paths(paths: list[Path], o: U.UnpackRef, k: int = 20) -> None:
    """The top-k paths are the oracle's top-k (by |percent|; ties in any order), with its scores."""
    ref = _oracle_paths(o)
    scale = max(abs(v) for v in ref.values())
    assert len(paths) == min(k, len(ref))
    for p in paths:
        hops = tuple((h.node, h.label, h.position) for h in p.hops)
        assert hops in ref, f"{p} is not among the oracle's paths"
        assert abs(p.extra["percent"] - ref[hops]) <= TOL * scale, str(p)
    mine = [abs(p.extra["percent"]) for p in paths]
    theirs = sorted((abs(v) for v in ref.values()), reverse=True)[:k]
    assert max(abs(a - b) for a, b in zip(mine, theirs)) <= TOL * scale


# ---------------------------------------------------------------------------------------------- the oracle


@pytest.mark.parametrize("family", ["gpt2", "neox"])
@pytest.mark.parametrize("preset,quirks", [("kqv_aligned", True), ("kqv_aligned", False), ("k_only_l2", True), ("kqv_weighted", True)])
@pytest.mark.parametrize("with_distractor", [False, True])
def test_tokens_and_paths_equal_the_oracle(family, preset, quirks, with_distractor, line):
    model, ref, tokens, cache, target, distractor = _tiny(family, line)
    d = distractor if with_distractor else None
    attr = unpack(model, cache, (target, d) if d is not None else target, preset=preset, quirks=quirks)
    o = _oracle(family, ref, tokens, target=target, distractor=d, preset=preset, quirks=quirks)
    assert _rel(attr.tokens[0], o.token_credit) <= TOL
    _same_paths(attr.paths[0], o)
    assert attr.diagnostics.paths_found.tolist() == [len(_oracle_paths(o))]
    assert float(attr.diagnostics.suppress_ratio[0]) == pytest.approx(o.suppress_ratio, abs=TOL)


@pytest.mark.parametrize("family", ["gpt2", "neox"])
def test_head_and_mlp_flow_equal_the_oracles_component_flow(family, line):
    model, ref, tokens, cache, target, _ = _tiny(family, line)
    attr = unpack(model, cache, target, units="logit")
    o = _oracle(family, ref, tokens, target=target, distractor=None, preset="kqv_aligned", quirks=True)
    L, H, n = model.cfg.n_layers, model.cfg.n_heads, tokens.shape[1]
    expected = torch.stack([torch.stack([o.component_flow_pos.get(f"attn_{l}_head_{h}", torch.zeros(n, dtype=torch.float64))
                                         for h in range(H)], -1) for l in range(L)])
    assert _rel(attr.heads[0], expected) <= TOL
    mlp = torch.tensor([o.component_flow[f"mlp_{l}"] for l in range(L)])
    assert _rel(attr.diagnostics.mlp_flow[0], mlp) <= TOL
    assert _rel(attr.tokens[0], o.token_credit_raw) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "neox"])
@pytest.mark.parametrize("root,oracle_root", [("L1H2@9", "attn_1_head_2@9"), ("L1.mlp", "mlp_1")])
def test_rerooting_equals_the_oracle(family, root, oracle_root, line):
    model, ref, tokens, cache, target, distractor = _tiny(family, line)
    attr = unpack(model, cache, (target, distractor), root=root, preset="kqv_aligned")
    o = _oracle(family, ref, tokens, target=target, distractor=distractor, preset="kqv_aligned", quirks=True, root=oracle_root)
    assert _rel(attr.tokens[0], o.token_credit) <= TOL
    _same_paths(attr.paths[0], o)
    node, _, pos = root.partition("@")
    pos = int(pos) if pos else tokens.shape[1] - 1
    for p in attr.paths[0]:  # a rerooted path runs from an embedding to the root, then the logit (the root's credit)
        p.check()
        assert p.hops[0].node == "embed" and (p.hops[-2].node, p.hops[-2].position) == (node, pos)
        assert (p.hops[-1].node, p.hops[-1].label, p.hops[-1].position) == ("logit", "logit", pos)


def test_another_answer_position_equals_the_oracle(line):
    model, ref, tokens, cache, target, distractor = _tiny("neox", line)
    t = tokens.shape[1] - 4
    attr = unpack(model, cache, (target, distractor), position=t, preset="kqv_weighted")
    o = _oracle("neox", ref, tokens, target=target, distractor=distractor, preset="kqv_weighted", quirks=True, position=t)
    assert _rel(attr.tokens[0], o.token_credit) <= TOL and not attr.tokens[0, t + 1:].any()
    _same_paths(attr.paths[0], o)


@pytest.mark.parametrize("family", ["gpt2", "neox"])
@pytest.mark.parametrize("preset,quirks", [("kqv_aligned", True), ("kqv_aligned", False), ("k_only_l2", True)])
def test_the_raw_model_equals_the_oracle_on_the_transformers_model(family, preset, quirks, line):
    """``load_model(..., processed=False)``: Unpack of the raw model is the reference run on the raw
    ``transformers`` model (tokens, head and MLP flow, paths), which Unpack of the processed model is not."""
    model, ref, tokens, cache, target, distractor = _tiny(family, line, processed=False)
    attr = unpack(model, cache, (target, distractor), preset=preset, quirks=quirks)
    o = _oracle(family, ref, tokens, processed=False, target=target, distractor=distractor, preset=preset, quirks=quirks)
    assert _rel(attr.tokens[0], o.token_credit) <= TOL
    _same_paths(attr.paths[0], o)
    assert float(attr.diagnostics.suppress_ratio[0]) == pytest.approx(o.suppress_ratio, abs=TOL)
    flow = unpack(model, cache, target, preset=preset, quirks=quirks, units="logit")
    o = _oracle(family, ref, tokens, processed=False, target=target, distractor=None, preset=preset, quirks=quirks)
    L, H, n = model.cfg.n_layers, model.cfg.n_heads, tokens.shape[1]
    heads = torch.stack([torch.stack([o.component_flow_pos.get(f"attn_{l}_head_{h}", torch.zeros(n, dtype=torch.float64))
                                      for h in range(H)], -1) for l in range(L)])
    assert _rel(flow.heads[0], heads) <= TOL and _rel(flow.tokens[0], o.token_credit_raw) <= TOL
    assert _rel(flow.diagnostics.mlp_flow[0], torch.tensor([o.component_flow[f"mlp_{l}"] for l in range(L)])) <= TOL
    processed = _oracle(family, ref, tokens, target=target, distractor=distractor, preset=preset, quirks=quirks)
    assert _rel(attr.tokens[0], processed.token_credit) > 100 * TOL  # the processed model's credit is another


# ---------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama", "qwen2"])
def test_closure_checks_hold_at_the_references_tolerances(family, line):
    model, _ = make_tiny(family, line, seed=1)
    _, cache = model.run_with_cache(model.to_tokens([IOI_PROMPT, "Hello World!"]))
    report = unpack_validate(model, cache)
    assert report.passed and report.failed() == [] and report.tolerances == CLOSURE_TOLERANCES
    assert set(report.errors) == {"residual", "key", "query", "qk", "value", "mlp"}
    assert all(err <= 1e-5 for err in report.errors.values()), report.errors  # float32 rounding only


def test_closure_checks_fail_on_a_tampered_cache(line):
    model, _, tokens, cache, _, _ = _tiny("gpt2", line)
    tampered = {name: cache[name].clone() for name in cache.keys()}
    tampered["blocks.0.hook_mlp_out"] = tampered["blocks.0.hook_mlp_out"] * 1.5
    report = unpack_validate(model, tampered)
    assert not report.passed  # the stream no longer adds up, nor do layer 1's logits and values
    assert report.failed() == ["residual", "key", "query", "qk", "value"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_paths_are_well_formed(family, line):
    model, _, tokens, cache, target, distractor = _tiny(family, line)
    attr = unpack(model, cache, (target, distractor), top_paths=10**6)
    paths = attr.paths[0]
    assert paths and len(paths) == int(attr.diagnostics.paths_found[0])
    scores = [abs(p.score) for p in paths]
    assert scores == sorted(scores, reverse=True)
    for p in paths:
        p.check()
        assert p.method == "unpack" and p.score == p.extra["percent"]
        assert p.hops[0].node == "embed" and p.hops[0].label is None and set(p.labels) <= set(LABELS)
        assert p.source_token == attr.str_tokens[0][p.source_pos]
        assert p.hops[-1].position == tokens.shape[1] - 1
        for a, b in zip(p.hops, p.hops[1:]):  # Q and MLP reads stay at a position, K and V reads look back
            assert a.position == b.position if b.label in ("q", "mlp", "logit") else a.position <= b.position
    per_position = torch.zeros(tokens.shape[1], dtype=torch.float64)
    for p in paths:
        per_position[p.source_pos] += p.score
    assert float(per_position.clamp_min(0).sum()) == pytest.approx(100.0)  # % of the recursion's positive mass


def test_units_and_target_value(line):
    model, _, tokens, cache, target, distractor = _tiny("neox", line)
    with torch.no_grad():
        logits = model(tokens)[0, -1].double()
    pct = unpack(model, cache, target)
    raw = unpack(model, cache, target, units="logit")
    positive = float(raw.tokens.clamp_min(0).sum())
    torch.testing.assert_close(pct.tokens, raw.tokens / positive * 100)
    torch.testing.assert_close(pct.heads, raw.heads / positive * 100)
    assert float(pct.tokens.clamp_min(0).sum()) == pytest.approx(100.0) and float(pct.tokens.max()) <= 100 + 1e-4
    assert [p.extra["logit"] for p in pct.paths[0]] == [p.score for p in raw.paths[0]]
    assert float(pct.target_value[0]) == pytest.approx(float(logits[target] - logits.mean()), abs=1e-4)
    assert pct.target["logit"] == ["centered"] and pct.target["token_ids"] == [[target, -1]]
    diff = unpack(model, cache, (target, distractor), quirks=False)
    assert float(diff.target_value[0]) == pytest.approx(float(logits[target] - logits[distractor]), abs=1e-4)
    assert diff.target["logit"] == ["difference"]
    top = unpack(model, cache, None)  # the top prediction
    assert top.target["token_ids"] == [[int(logits.argmax()), -1]]
    assert 0 <= float(pct.diagnostics.suppress_ratio[0]) < 1


@pytest.mark.parametrize("preset", [Preset("kqv", True, "weighted", beta=0.0), Preset("k", False, "l2", beta=0.0)])
def test_consistent_rules_conserve_credit_on_a_gated_model(preset, line):
    """Llama (grouped-query heads, rotary, RMSNorm, gated MLP, no biases), quirks=False, β = 0: every split
    hands on what it got, so the tokens get the target's logit difference, except what position 0
    drops (its centred K and Q logits vanish: those branches have nothing to split)."""
    model, _, _, cache, _, _ = _tiny("llama", line)
    attr = unpack(model, cache, PAIR, preset=preset, quirks=False, units="logit")
    dropped = (2 / 3 if preset.branches == "kqv" else 1.0) * float(attr.heads[0, :, 0].sum())
    assert float(attr.tokens.sum()) + dropped == pytest.approx(float(attr.target_value[0]), rel=1e-5, abs=1e-5)


def test_batches_run_and_save(line, tmp_path):
    model, _ = make_tiny("neox", line, seed=3)
    prompts = [IOI_PROMPT, "When Tom and Anna went to the park, Tom gave a ball to"]
    old = model.tokenizer.padding_side
    for side in ("left", "right"):
        model.tokenizer.padding_side = side
        try:
            batch = dpa_lens.run("unpack", model, prompts, PAIR)
        finally:
            model.tokenizer.padding_side = old
        for i, prompt in enumerate(prompts):
            alone = dpa_lens.run("unpack", model, prompt, PAIR)
            real = batch.mask[i]
            torch.testing.assert_close(batch.tokens[i, real], alone.tokens[0], rtol=1e-4, atol=1e-4)
            shift = int(torch.nonzero(real)[0])
            assert [str(p) for p in alone.paths[0]] == [str(_shifted(p, -shift)) for p in batch.paths[i]]
    path = batch.save(tmp_path / "unpack.pt")
    back = Attribution.load(path)
    assert back.paths == batch.paths and back.settings == batch.settings
    torch.testing.assert_close(back.tokens, batch.tokens)


def _shifted(p: Path, by: int) -> Path:
    return Path(tuple(Hop(h.node, h.label, h.position + by) for h in p.hops), p.score)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_gets_a_dpa_lens_error(line):
    model, _, tokens, cache, target, distractor = _tiny("gpt2", line)
    n = tokens.shape[1]
    with pytest.raises(InputError, match="unknown Unpack preset 'fast'"):
        unpack(model, cache, target, preset="fast")
    with pytest.raises(InputError, match="names no unit"):
        unpack(model, cache, target, root="L9H0")
    with pytest.raises(InputError, match="names no unit"):
        unpack(model, cache, target, root="L0H7")
    with pytest.raises(InputError, match="must name a head or an MLP"):
        unpack(model, cache, target, root="attn_0_head_1")
    with pytest.raises(InputError, match="not a real token"):
        unpack(model, cache, target, root=f"L1H0@{n}")
    with pytest.raises(InputError):
        unpack(model, cache, target, position=n)
    with pytest.raises(InputError, match="units"):
        unpack(model, cache, target, units="bits")
    with pytest.raises(InputError, match="min_frac"):
        unpack(model, cache, target, min_frac=0.0)
    with pytest.raises(InputError, match="already a"):
        unpack(model, cache, (target, distractor), distractor=distractor)
    with pytest.raises(TargetError, match="not a direction"):
        unpack(model, cache, torch.randn(model.cfg.d_model))
    assert set(PRESETS) == set(U.PRESETS)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_unsupported_families_are_named(family, line):
    model, _ = make_tiny(family, line, seed=0)
    _, cache = model.run_with_cache(model.to_tokens(IOI_PROMPT))
    with pytest.raises(UnsupportedModelError, match="Supported: GPT-2, GPT-NeoX"):
        unpack(model, cache, PAIR)
    with pytest.raises(UnsupportedModelError):
        unpack_validate(model, cache)


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_closure_and_paths(smollm2):
    _, cache = smollm2.run_with_cache(smollm2.to_tokens(IOI_PROMPT))
    assert unpack_validate(smollm2, cache).passed
    attr = unpack(smollm2, cache, PAIR)
    assert torch.isfinite(attr.tokens).all() and float(attr.tokens.clamp_min(0).sum()) == pytest.approx(100.0, rel=1e-4)
    assert len(attr.paths[0]) == 20
    for p in attr.paths[0]:
        p.check()
