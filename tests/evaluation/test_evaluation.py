"""Issue 6: faithfulness curves, agreement, TransformerLens interop, and the shipped datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpa_lens
from dpa_lens import plot
from dpa_lens.evaluation import Curves, agreement, circuit_edges, faithfulness_curves, to_transformer_lens
from dpa_lens.models import tl
from dpa_lens.models.testing import FAMILIES
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny


@pytest.fixture(scope="module")
def tiny():
    model, _ = make_tiny("llama", seed=41)
    with torch.no_grad():
        _, cache = model.run_with_cache(IOI_PROMPT)
    return model, cache


def _prob(model, edits):
    """p(' Mary') at the last position with activations edited by hand: edits = [(hook, fn(x))]."""
    hooks = [(name, lambda x, hook, fn=fn: fn(x.clone())) for name, fn in edits]
    with torch.no_grad():
        logits = model.run_with_hooks(IOI_PROMPT, fwd_hooks=hooks)
    return float(logits[0, -1].softmax(-1)[model.to_single_token(" Mary")])


def test_token_curves_equal_ablations_by_hand(tiny):
    model, cache = tiny
    attr = dpa_lens.dpa(model, cache, PAIR)
    curves = faithfulness_curves(model, IOI_PROMPT, attr, unit="tokens", fractions=[0.2, 0.5])
    n = attr.tokens.shape[1]
    p_clean = _prob(model, [])
    order = attr.tokens[0].argsort(descending=True)
    for j, f in enumerate([0.2, 0.5]):
        k = int(np.ceil(f * n))
        top = order[:k]

        def zero(x, pos):
            x[0, pos] = 0
            return x

        disrupted = _prob(model, [("hook_embed", lambda x: zero(x, top))]) / p_clean
        rest = torch.tensor([i for i in range(n) if i not in set(top.tolist())])
        recovered = _prob(model, [("hook_embed", lambda x: zero(x, rest))]) / p_clean
        assert float(curves.disruption[0, j]) == pytest.approx(disrupted, rel=1e-4)
        assert float(curves.recovery[0, j]) == pytest.approx(recovered, rel=1e-4)
    assert curves.n_units == [n]


def test_keep_bos_never_ranks_or_ablates_the_leading_bos(tiny):
    model, cache = tiny
    tokens = model.to_tokens(IOI_PROMPT)
    assert int(tokens[0, 0]) == model.tokenizer.bos_token_id  # the tiny models prepend a BOS
    attr = dpa_lens.dpa(model, cache, PAIR)
    curves = faithfulness_curves(model, IOI_PROMPT, attr, unit="tokens", fractions=[0.25], keep_bos=True)
    n = tokens.shape[1]
    assert curves.n_units == [n - 1]
    order = attr.tokens[0, 1:].argsort(descending=True) + 1  # ranked without the BOS
    k = int(np.ceil(0.25 * (n - 1)))
    top, rest = order[:k], order[k:]

    def zero(x, pos):
        x[0, pos] = 0
        return x

    p_clean = _prob(model, [])
    assert float(curves.disruption[0, 0]) == pytest.approx(_prob(model, [("hook_embed", lambda x: zero(x, top))]) / p_clean, rel=1e-4)
    assert float(curves.recovery[0, 0]) == pytest.approx(_prob(model, [("hook_embed", lambda x: zero(x, rest))]) / p_clean, rel=1e-4)
    heads = faithfulness_curves(model, IOI_PROMPT, attr, unit="heads", fractions=[1.0], keep_bos=True)
    assert heads.n_units == [(n - 1) * model.cfg.n_layers * model.cfg.n_heads]
    without = faithfulness_curves(model, IOI_PROMPT, attr, unit="tokens", fractions=[0.25])
    assert without.n_units == [n]  # the authors' protocol ranks the BOS like any token


@pytest.mark.parametrize("family", FAMILIES)
def test_curves_measure_the_answer_position_on_every_family(family, line):
    """The curves unembed only the answer position: equal to full forwards by hand on every
    architecture (final soft caps, LayerNorm, parallel blocks), with right padding in the batch."""
    model, _ = make_tiny(family, line=line, seed=43)
    prompts = [IOI_PROMPT, "The Eiffel Tower is in"]
    tok = model.to_tokens(prompts, padding_side="right")
    with torch.no_grad():
        _, cache = model.run_with_cache(tok)
    attr = dpa_lens.dla(model, cache, " Mary")
    curves = faithfulness_curves(model, tok, attr, unit="neurons", fractions=[0.01, 0.5, 1.0])
    row, answer = 1, int(attr.positions[1])
    assert answer < tok.shape[1] - 1  # the answer is not the last position of the padded batch
    n = answer + 1  # the units counted: real positions up to the answer
    y = model.to_single_token(" Mary")
    L, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    scores = attr.neurons[row, :, :n].reshape(-1)
    order = scores.argsort(descending=True, stable=True)
    k = int(np.ceil(0.5 * len(order)))
    top = torch.zeros(len(order), dtype=torch.bool)
    top[order[:k]] = True
    top = top.view(L, n, d_mlp)

    def prob(mask):
        hooks = []
        for layer in range(L):
            def zero(x, hook, m=mask[layer]):
                x = x.clone()
                x[row, :n][m.to(x.device)] = 0
                return x
            hooks.append((f"blocks.{layer}.mlp.hook_post", zero))
        with torch.no_grad():
            logits = model.run_with_hooks(tok, fwd_hooks=hooks)
        return float(logits[row, answer].float().softmax(-1)[y])

    p_clean = prob(torch.zeros_like(top))
    assert float(curves.disruption[row, 1]) == pytest.approx(prob(top) / p_clean, rel=1e-4, abs=1e-6)
    assert float(curves.recovery[row, 1]) == pytest.approx(prob(~top) / p_clean, rel=1e-4, abs=1e-6)
    assert float(curves.disruption[row, 2]) == pytest.approx(prob(torch.ones_like(top)) / p_clean, rel=1e-4, abs=1e-6)
    assert float(curves.recovery[row, 2]) == 1.0


def test_component_units_and_ablations_by_hand(tiny):
    model, cache = tiny
    attr = dpa_lens.dpa(model, cache, PAIR, head_keys=True)
    n = attr.tokens.shape[1]
    p_clean = _prob(model, [])
    # one unit ablated: the top head (layer, pos, head), by zero and by mean
    curves = faithfulness_curves(model, IOI_PROMPT, attr, unit="heads", fractions=[1e-9])
    flat = attr.heads[0].flatten().argmax()
    layer, pos, head = np.unravel_index(int(flat), attr.heads[0].shape)

    def set_z(value):
        def fn(x):
            x[0, pos, head] = value
            return x
        return fn

    assert float(curves.disruption[0, 0]) == pytest.approx(_prob(model, [(f"blocks.{layer}.attn.hook_z", set_z(0.0))]) / p_clean, rel=1e-4)
    mean = faithfulness_curves(model, IOI_PROMPT, attr, unit="heads", fractions=[1e-9], ablation="mean")
    z_mean = cache[f"blocks.{layer}.attn.hook_z"][0, :, head].mean(0)
    assert float(mean.disruption[0, 0]) == pytest.approx(_prob(model, [(f"blocks.{layer}.attn.hook_z", set_z(z_mean))]) / p_clean, rel=1e-4)
    # resample: the corrupted run's value
    _, corr = model.run_with_cache(CORRUPTED)
    res = faithfulness_curves(model, IOI_PROMPT, attr, unit="heads", fractions=[1e-9], ablation="resample", corrupted=CORRUPTED)
    z_corr = corr[f"blocks.{layer}.attn.hook_z"][0, pos, head]
    assert float(res.disruption[0, 0]) == pytest.approx(_prob(model, [(f"blocks.{layer}.attn.hook_z", set_z(z_corr))]) / p_clean, rel=1e-4)
    # attention entries: only causal ones are units; the top one zeroed by hand
    att = faithfulness_curves(model, IOI_PROMPT, attr, unit="attention", fractions=[1e-9])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    assert att.n_units == [L * H * n * (n + 1) // 2]
    keys = attr.head_keys[0].clone()
    keys[..., torch.ones(n, n, dtype=torch.bool).triu(1)] = -float("inf")
    l, h, q, k = np.unravel_index(int(keys.flatten().argmax()), keys.shape)

    def zero_entry(x):
        x[0, h, q, k] = 0.0
        return x

    assert float(att.disruption[0, 0]) == pytest.approx(_prob(model, [(f"blocks.{l}.attn.hook_pattern", zero_entry)]) / p_clean, rel=1e-4)
    both = faithfulness_curves(model, IOI_PROMPT, attr, unit="components", fractions=[1.0])
    assert both.n_units == [L * n * (H + 96)]


def test_a_ranking_by_true_effects_beats_its_reverse(tiny):
    """Rank tokens by the probability drop each causes alone: disrupting in that order must drop the
    probability at least as fast as in the reverse order (a check that the curves can tell rankings apart)."""
    model, cache = tiny
    attr = dpa_lens.dpa(model, cache, PAIR)
    n = attr.tokens.shape[1]
    p_clean = _prob(model, [])
    drops = []
    for pos in range(n):
        def zero(x, pos=pos):
            x[0, pos] = 0
            return x
        drops.append(p_clean - _prob(model, [("hook_embed", zero)]))
    meta = dict(positions=attr.positions, token_ids=attr.token_ids, target=attr.target)
    good = dpa_lens.Attribution(method="true", tokens=torch.tensor([drops]), **meta)
    bad = dpa_lens.Attribution(method="reverse", tokens=-torch.tensor([drops]), **meta)
    g = faithfulness_curves(model, IOI_PROMPT, good, unit="tokens").auc()
    b = faithfulness_curves(model, IOI_PROMPT, bad, unit="tokens").auc()
    assert g["disruption"] < b["disruption"]
    assert g["total"] > b["total"]


def test_auc_is_a_normalised_trapezoid():
    fr = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    c = Curves("m", "tokens", "zero", fr, torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.0, 1.0, 1.0]]), [10])
    auc = c.auc()
    assert auc["disruption"] == pytest.approx(np.trapezoid([1.0, 0.5, 0.0], [0.1, 0.5, 1.0]) / 0.9 * 100)
    assert auc["total"] == pytest.approx(auc["recovery"] - auc["disruption"])
    log = c.auc("log")
    x = np.log10([0.1, 0.5, 1.0])
    assert log["recovery"] == pytest.approx(np.trapezoid([0.0, 1.0, 1.0], x) / (x[-1] - x[0]) * 100)
    both = Curves.concat([c, c])
    assert both.disruption.shape == (2, 3) and both.auc() == pytest.approx(auc)


def test_curve_errors(tiny):
    model, cache = tiny
    attr = dpa_lens.dpa(model, cache, PAIR)
    with pytest.raises(ValueError, match="head_keys=True"):
        faithfulness_curves(model, IOI_PROMPT, attr, unit="attention")
    with pytest.raises(ValueError, match="pass corrupted="):
        faithfulness_curves(model, IOI_PROMPT, attr, unit="heads", ablation="resample")
    with pytest.raises(ValueError, match="fractions"):
        faithfulness_curves(model, IOI_PROMPT, attr, fractions=[0.0, 0.5])
    with pytest.raises(ValueError, match="token target"):
        faithfulness_curves(model, IOI_PROMPT, dpa_lens.dpa(model, cache, model.W_U[:, 3].detach()))
    with pytest.raises(ValueError, match="tokens differ"):
        faithfulness_curves(model, CORRUPTED, attr)


def test_agreement_against_numpy(tiny):
    model, cache = tiny
    a = dpa_lens.dpa(model, cache, PAIR)
    b = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    got = agreement(a, b, "heads", k=3)
    x, y = a.heads[0].sum(1).flatten().numpy(), b.heads[0].sum(1).flatten().numpy()
    assert got["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-6)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert got["spearman"] == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-6)
    top = lambda v: set(np.argsort(-np.abs(v))[:3])  # noqa: E731
    assert got["top3_overlap"] == pytest.approx(len(top(x) & top(y)) / 3)
    assert agreement(a, a, "tokens")["pearson"] == pytest.approx(1.0)
    # units the reference did not measure are left out, not counted as zero
    patched = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="neurons", layers=[1], progress=False)
    part = agreement(a, patched, "neurons")
    full = np.corrcoef(a.neurons[0, 1].sum(0).numpy(), patched.neuron_totals[0, 1].numpy())[0, 1]
    assert part["pearson"] == pytest.approx(full, abs=1e-6)


def test_transformer_lens_nodes(tiny):
    model, cache = tiny
    attr = dpa_lens.dpa(model, cache, PAIR)
    result = to_transformer_lens(attr)
    from transformer_lens.tools.analysis.attribution_patching import Node

    assert result.node_scores[Node("attn_head_out", 5, 1, 2)] == pytest.approx(float(attr.heads[0, 1, 5, 2]))
    assert result.node_scores[Node("mlp_out", 7, 0)] == pytest.approx(float(attr.neurons[0, 0, 7].sum()), rel=1e-5)
    assert result.node_scores[Node("embed", 3)] == pytest.approx(float(attr.tokens[0, 3]))
    best, score = result.top_nodes(1)[0]
    assert abs(score) == pytest.approx(max(abs(v) for v in result.node_scores.values()))


@pytest.mark.skipif(tl.TL_MAJOR < 4, reason="TransformerLens 3.x has no edge graph or faithfulness tooling")
def test_transformer_lens_faithfulness_of_a_dpa_circuit():
    """TransformerLens's faithfulness (which refuses GQA) on a tiny model without grouped heads."""
    from transformer_lens.tools.analysis.attribution_patching import faithfulness

    model, _ = make_tiny("llama", seed=42, n_kv_heads=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(IOI_PROMPT)
    attr = dpa_lens.dpa(model, cache, PAIR)
    nodes = [n for n, _ in to_transformer_lens(attr).top_nodes(40)]
    clean, corrupt = model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED)
    edges = circuit_edges(model, clean, nodes)
    assert edges and all(w in set(nodes) for w, _ in edges)
    good, bad = model.to_single_token(" Mary"), model.to_single_token(" John")
    metric = lambda logits: logits[0, -1, good] - logits[0, -1, bad]  # noqa: E731
    everything = circuit_edges(model, clean, list(to_transformer_lens(attr).node_scores))
    assert faithfulness(model, clean, corrupt, metric, everything).recovered == pytest.approx(1.0, abs=1e-4)
    assert -5 < faithfulness(model, clean, corrupt, metric, edges).recovered < 5


def test_faithfulness_plot_shows_the_mean_curves(tiny):
    model, cache = tiny
    curves = [faithfulness_curves(model, [IOI_PROMPT], dpa_lens.dpa(model, cache, PAIR), unit="tokens"),
              faithfulness_curves(model, [IOI_PROMPT], dpa_lens.random_baseline(model, cache, PAIR), unit="tokens")]
    fig = plot.faithfulness(curves)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 4  # two methods × (disruption, recovery)
    np.testing.assert_allclose(lines[0].y, curves[0].disruption.mean(0).numpy())
    np.testing.assert_allclose(lines[1].y, curves[0].recovery.mean(0).numpy())
    assert f"total {curves[0].auc()['total']:.1f}" in lines[0].name


def test_shipped_benchmark_prompts():
    from dpa_lens.datasets import ioi_benchmark, known_1000

    facts = known_1000()
    assert len(facts) == 1209 and facts[0].answer == " Antarctica"
    items = ioi_benchmark()
    assert len(items) == 841
    for item in items[:50]:
        assert item.prompt.count(item.incorrect.strip()) == 2 and item.corrupted.count(item.correct.strip()) == 2
        assert len(item.prompt) == len(item.corrupted) - len(item.correct) + len(item.incorrect)


def test_ioi_generator_aligns_clean_and_corrupted(line):
    from dpa_lens.datasets import ioi_dataset

    model, _ = make_tiny("llama", line=line)
    prompts = ioi_dataset(model, n=6, seed=3)
    assert [p.order for p in prompts] == ["ABB", "BAB"] * 3
    for p in prompts:
        assert model.to_tokens(p.clean).shape == model.to_tokens(p.corrupted).shape
        assert p.clean.count(p.incorrect.strip()) == 2 and p.corrupted.count(p.correct.strip()) == 2
    assert ioi_dataset(model, n=6, seed=3) == prompts
    abc = ioi_dataset(model, n=4, seed=3, corruption="abc")
    assert all(p.corrupted.count(p.correct.strip()) == 1 for p in abc)
