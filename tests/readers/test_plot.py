"""Figures: their data, not just their existence."""

from __future__ import annotations

import html

import numpy as np
import pytest
import torch

import dpa_lens
from dpa_lens import plot
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny


@pytest.fixture(scope="module")
def attrs():
    model, _ = make_tiny("llama", seed=21)
    with torch.no_grad():
        _, cache = model.run_with_cache(IOI_PROMPT)
    dpa = dpa_lens.dpa(model, cache, PAIR, flow=True)
    content = dpa_lens.dpa(model, cache, " Mary", mu=dpa_lens.Mu.content_only(), flow=True)
    dla = dpa_lens.dla(model, cache, PAIR)
    atp = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    roll = dpa_lens.attention_rollout(model, cache)
    return {"dpa": dpa, "content": content, "dla": dla, "atp": atp, "rollout": roll}


def _centred(fig, trace=0):
    """The colour scale of a figure is centred on zero (cmid/zmid 0 and symmetric limits)."""
    if fig.layout.coloraxis.cmid is not None:
        c = fig.layout.coloraxis
        return c.cmid == 0 and c.cmin == -c.cmax
    t = fig.data[trace]
    return t.zmid == 0 and t.zmin == -t.zmax


def test_head_heatmap_shows_the_scores(attrs):
    a = attrs["dpa"]
    fig = plot.heads(a)
    np.testing.assert_allclose(fig.data[0].z, a.heads[0].sum(1).numpy(), rtol=1e-6)
    assert _centred(fig)
    assert fig.layout.coloraxis.cmax == pytest.approx(float(a.heads[0].sum(1).abs().max()))
    assert fig.data[0].customdata[1][3] == "L1H3"
    answer = plot.heads(a, positions="answer")
    np.testing.assert_allclose(answer.data[0].z, a.heads[0, :, -1].numpy(), rtol=1e-6)
    at5 = plot.heads(a, positions=5)
    np.testing.assert_allclose(at5.data[0].z, a.heads[0, :, 5].numpy(), rtol=1e-6)


def test_head_facets_are_normalised_per_method(attrs):
    fig = plot.heads([attrs["dpa"], attrs["atp"], attrs["dla"]])
    assert len(fig.data) == 3
    for trace, a in zip(fig.data, (attrs["dpa"], attrs["atp"], attrs["dla"])):
        z = a.heads[0].sum(1)
        np.testing.assert_allclose(trace.z, (z / z.abs().max()).numpy(), rtol=1e-6)
        assert np.abs(trace.z).max() == pytest.approx(1.0)
    assert _centred(fig) and fig.layout.coloraxis.cmax == pytest.approx(1.0)
    assert [a.text for a in fig.layout.annotations] == ["dpa", "atp", "dla"]


def test_heads_of_whole_head_results(attrs):
    """Means over different prompts and whole-head patching keep only each head's total: plotted as such."""
    model, _ = make_tiny("llama", seed=21)
    with torch.no_grad():
        _, cache = model.run_with_cache("The Eiffel Tower is in the city of")
    other = dpa_lens.dpa(model, cache, PAIR)
    with pytest.warns(UserWarning, match="flow is in 1 of the 2 parts only"):  # the first was computed with flow=True
        both = dpa_lens.Attribution.concat([attrs["dpa"], other])
    with pytest.warns(UserWarning, match="dropped the per-position tokens, heads, neurons"):  # prompts of other lengths
        mean = both.mean()
    assert mean.heads is None and mean.head_totals is not None
    fig = plot.heads([mean, attrs["dla"]], normalize=False)
    np.testing.assert_allclose(fig.data[0].z, mean.totals("heads")[0].numpy(), rtol=1e-6)
    assert fig.layout.height > 0


def test_token_heatmap(attrs):
    a = attrs["dpa"]
    fig = plot.tokens(a, width=6)
    z = np.asarray(fig.data[0].z, dtype=float).flatten()
    n = a.tokens.shape[1]
    np.testing.assert_allclose(z[:n], a.tokens[0].numpy(), rtol=1e-6)
    assert np.isnan(z[n:]).all()
    text = [html.unescape(t) for line in fig.data[0].text for t in line][:n]  # tokens are HTML-escaped for plotly
    assert text == a.str_tokens[0]
    assert "Mary" in text[a.str_tokens[0].index(" Mary")]
    assert _centred(fig)


def test_method_by_token_grid(attrs):
    chosen = [attrs["dpa"], attrs["atp"], attrs["rollout"]]
    fig = plot.tokens_by_method(chosen)
    z = np.asarray(fig.data[0].z)
    for row, a in zip(z, chosen):
        s = a.tokens[0]
        np.testing.assert_allclose(row, (s / s.abs().max()).numpy(), rtol=1e-6)
    assert list(fig.data[0].y) == ["dpa", "atp", "attention_rollout"]
    assert _centred(fig)


def test_neuron_figures(attrs):
    a = attrs["dpa"]
    top = plot.neurons_top(a, k=5)
    table = a.top(5, "neurons", sum_positions=True, absolute=True)
    np.testing.assert_allclose(list(top.data[0].x)[::-1], table["score"].to_numpy(), rtol=1e-6)
    assert list(top.data[0].y)[::-1] == table["unit"].tolist()
    overview = plot.neurons_overview(a, k=4)  # each layer's 4 strongest neurons, in order of |score|
    totals = a.neurons[0].sum(1)
    best = totals.gather(1, totals.abs().argsort(dim=1, descending=True)[:, :4])
    np.testing.assert_allclose(overview.data[0].z, best.numpy(), rtol=1e-5, atol=1e-7)
    assert _centred(overview)


def test_flow_figure_and_flow_completeness(attrs):
    a = attrs["content"]
    fig = plot.flow(a)
    np.testing.assert_allclose(fig.data[0].z, a.flow[0].numpy(), rtol=1e-6)
    assert list(fig.data[0].y)[-1] == "out"
    # content-only DPA is complete at every depth: each layer's row adds up to the target (no biases here)
    totals = a.flow[0].sum(-1)
    torch.testing.assert_close(totals, a.target_value[0].expand_as(totals), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.flow[0, 0], a.tokens[0])  # layer 0's input is the embeddings
    with pytest.raises(ValueError, match="flow=True"):
        plot.flow(attrs["dla"])


def test_scatter_reports_the_correlations(attrs):
    a, b = attrs["dpa"], attrs["atp"]
    fig = plot.scatter(a, b, "heads")
    x, y = a.heads[0].sum(1).flatten().numpy(), b.heads[0].sum(1).flatten().numpy()
    np.testing.assert_allclose(fig.data[1].x, x, rtol=1e-6)
    pearson = np.corrcoef(x, y)[0, 1]
    spearman = np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1]
    assert fig.layout.meta["pearson"] == pytest.approx(pearson, abs=1e-6)
    assert fig.layout.meta["spearman"] == pytest.approx(spearman, abs=1e-6)
    assert f"{pearson:.3f}" in fig.layout.title.text
    labelled = [t for t in fig.data[1].text if t]  # the units farthest out are named on the figure itself
    x, names = a.flat("heads")
    y, _ = b.flat("heads")
    assert len(labelled) == 6 and set(labelled) <= set(names)
    assert names[int((x.abs() / x.abs().max() + y.abs() / y.abs().max()).argmax())] in labelled
    per_pos = plot.scatter(a, b, "heads", sum_positions=False)
    assert len(per_pos.data[1].x) == a.heads[0].numel()


def test_show_returns_the_figure(attrs):
    a = attrs["dpa"]
    assert a.show("tokens").data[0].type == "heatmap"
    assert a.show().layout.coloraxis.cmid == 0
    with pytest.raises(ValueError, match="kind must be"):
        a.show("edges")


def test_circuit_faithfulness_curves_are_drawn_with_their_scores():
    """`plot.faithfulness` of `dpa_lens.circuit_faithfulness`'s curves: f per fraction, CPR/CMD in the legend."""
    model, _ = make_tiny("llama", seed=21)
    circuits = [dpa_lens.run(m, model, IOI_PROMPT, PAIR, corrupted=CORRUPTED, progress=False) for m in ("edge_atp", "edge_random")]
    curves = dpa_lens.circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuits, fractions=(0.1, 0.5, 1.0), progress=False)
    fig = plot.faithfulness(curves)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == [f"{c.method} (CPR {c.cpr():.2f}, CMD {c.cmd():.2f})" for c in curves]
    for t, c in zip(lines, curves):
        np.testing.assert_allclose(t.y, c.curve().numpy(), rtol=1e-6)
        np.testing.assert_allclose(t.x, [0.1, 0.5, 1.0])
    assert fig.layout.xaxis.type == "log" and lines[0].y[-1] == pytest.approx(1.0)  # every edge kept: the clean run
    assert plot.faithfulness(curves[0]).data[-1].name == lines[0].name  # one curve alone
    with pytest.raises(dpa_lens.InputError, match="one kind at a time"):
        plot.faithfulness([curves[0], "not a curve"])
