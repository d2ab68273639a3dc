"""Plotly figures of `Attribution` objects. Every function returns a ``plotly`` figure.

Colours: one diverging scale centred on zero everywhere, red for scores that push the target up
and blue for scores that push it down (white is zero). The functions know nothing about how an
attribution was made; several methods can be compared side by side.

    dpa_lens.plot.heads(attr)                      # layer × head heatmap
    dpa_lens.plot.heads([dpa, atp, patching])      # one facet per method
    dpa_lens.plot.tokens(attr)                     # the prompt, coloured by score
    dpa_lens.plot.tokens_by_method([dpa, ig, atp]) # method × token grid
    dpa_lens.plot.neurons_top(attr, k=20), dpa_lens.plot.neurons_overview(attr)
    dpa_lens.plot.flow(attr)                       # layer × position (dpa(..., flow=True))
    dpa_lens.plot.scatter(dpa, patching)           # two methods' scores, with their correlation
    dpa_lens.plot.faithfulness([curves_dpa, curves_atp])  # disruption and recovery curves
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from dpa_lens.attribution import Attribution
from dpa_lens.errors import InputError
from dpa_lens.evaluation.agreement import correlation

COLORSCALE = "RdBu_r"  # red positive, blue negative, white at zero
Positions = Literal["sum", "answer"] | int | Sequence[int]


def _as_list(attrs: Attribution | Sequence[Attribution]) -> list[Attribution]:
    return [attrs] if isinstance(attrs, Attribution) else list(attrs)


def _label(attr: Attribution) -> str:
    if attr.method == "activation_patching":
        return f"patching ({attr.settings.get('unit', '')})"
    return attr.method


def _symmetric(values: Iterable[Tensor]) -> float:
    m = max((float(v.abs().nan_to_num(0).max()) for v in values if v.numel()), default=0.0)
    return m if m > 0 else 1.0


def _token_text(token: str) -> str:
    """A token as it should read in a figure: visible spaces and newlines, no raw HTML."""
    return html.escape(token.replace("\n", "⏎").replace(" ", "␣") if token.strip() == "" else token.replace("\n", "⏎"))


def _select_positions(attr: Attribution, kind: str, row: int, positions: Positions) -> tuple[Tensor, str]:
    """One row's ``[layer, unit]`` scores of heads or neurons, at or over the positions asked for."""
    if positions == "sum":
        return attr.totals(kind)[row].detach().float().cpu(), "summed over positions"
    t = attr.scores(kind)[row].detach().float().cpu()  # [layer, pos, unit]
    n = t.shape[1]
    if positions == "answer":
        p = int(attr.positions[row])
        return t[:, p], f"at the answer position {p}"
    idx = [positions] if isinstance(positions, int) else list(positions)
    bad = [p for p in idx if not -n <= p < n]
    if bad:
        raise InputError(f"positions {bad} are out of range for {n} positions")
    if isinstance(positions, int):
        return t[:, positions], f"at position {positions}"
    return t[:, idx].sum(1), f"summed over positions {idx}"


def heads(
    attrs: Attribution | Sequence[Attribution],
    *,
    row: int = 0,
    positions: Positions = "sum",
    normalize: bool | None = None,
    title: str | None = None,
) -> go.Figure:
    """Layer × head heatmap of head scores; one facet per attribution.

    Args:
        positions: ``"sum"`` over query positions (default), ``"answer"``, a position, or a list.
        normalize: divide each facet by its largest absolute score (default: when there are
            several facets, whose scores have different units).
    """
    attrs = _as_list(attrs)
    normalize = len(attrs) > 1 if normalize is None else normalize
    grids, notes = [], []
    for a in attrs:
        z, note = _select_positions(a, "heads", row, positions)
        grids.append(z / _symmetric([z]) if normalize else z)
        notes.append(note)
    zmax = _symmetric(grids)
    cols = min(len(attrs), 4)
    rows = math.ceil(len(attrs) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[_label(a) for a in attrs], horizontal_spacing=0.06,
                        vertical_spacing=0.12 if rows > 1 else 0.0)
    for i, (a, z) in enumerate(zip(attrs, grids)):
        L, H = z.shape
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(
            go.Heatmap(
                z=z.numpy(),
                x=list(range(H)),
                y=list(range(L)),
                coloraxis="coloraxis",
                customdata=[[f"L{l}H{h}" for h in range(H)] for l in range(L)],
                hovertemplate="%{customdata}<br>layer %{y}, head %{x}<br>score %{z:.4g}<extra>" + _label(a) + "</extra>",
            ),
            row=r,
            col=c,
        )
        fig.update_xaxes(title_text="head", row=r, col=c)
        if c == 1:
            fig.update_yaxes(title_text="layer", row=r, col=c)
    n_layers = attrs[0].scores("heads").shape[1]
    fig.update_layout(
        coloraxis=dict(colorscale=COLORSCALE, cmin=-zmax, cmax=zmax, cmid=0.0, colorbar=dict(title="relative" if normalize else "score")),
        title=title or f"Head scores ({notes[0]}){' — normalised per method' if normalize else ''}",
        height=rows * max(300, 16 * n_layers + 110) + 60,
        width=max(450, 290 * cols + 120),
    )
    return fig


def tokens(attr: Attribution, *, row: int = 0, width: int = 12, normalize: bool = False, title: str | None = None) -> go.Figure:
    """The prompt laid out in lines of ``width`` tokens, each cell coloured by its score."""
    scores = attr.scores("tokens")[row].detach().float().cpu()
    if normalize:
        scores = scores / _symmetric([scores])
    strs = attr.str_tokens[row] if attr.str_tokens else [str(i) for i in range(len(scores))]
    n = len(scores)
    lines = math.ceil(n / width)
    z = torch.full((lines, width), float("nan"))
    z.view(-1)[:n] = scores
    text = [["" for _ in range(width)] for _ in range(lines)]
    hover = [["" for _ in range(width)] for _ in range(lines)]
    for i, (tok, s) in enumerate(zip(strs, scores.tolist())):
        text[i // width][i % width] = _token_text(tok)
        hover[i // width][i % width] = f"position {i}: {tok!r}<br>score {s:.4g}"
    zmax = _symmetric([scores])
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            text=text,
            texttemplate="%{text}",
            textfont=dict(size=13),
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=COLORSCALE,
            zmin=-zmax,
            zmax=zmax,
            zmid=0.0,
            xgap=2,
            ygap=2,
            colorbar=dict(title="relative" if normalize else "score", len=1.0, thickness=14),
        )
    )
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    target = (attr.target.get("labels") or [""])[row] if attr.target.get("labels") else ""
    fig.update_layout(
        title=title or f"{_label(attr)}: token scores" + (f" for {target}" if target else ""),
        height=max(220, 130 + 40 * lines),
        width=max(500, 82 * width + 100),
        plot_bgcolor="white",
    )
    return fig


def tokens_by_method(attrs: Sequence[Attribution], *, row: int = 0, normalize: bool = True, title: str | None = None) -> go.Figure:
    """Method × token grid for one prompt; each row normalised to its largest absolute score."""
    attrs = _as_list(attrs)
    strs = attrs[0].str_tokens[row] if attrs[0].str_tokens else None
    rows = []
    for a in attrs:
        s = a.scores("tokens")[row].detach().float().cpu()
        rows.append(s / _symmetric([s]) if normalize else s)
    z = torch.stack(rows)
    zmax = _symmetric([z])
    n = z.shape[1]
    xlabels = [f"{i}:{_token_text(t)}" for i, t in enumerate(strs)] if strs else [str(i) for i in range(n)]
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            x=xlabels,
            y=[_label(a) for a in attrs],
            colorscale=COLORSCALE,
            zmin=-zmax,
            zmax=zmax,
            zmid=0.0,
            xgap=1,
            ygap=1,
            hovertemplate="%{y}<br>%{x}<br>%{z:.3f}<extra></extra>",
            colorbar=dict(title="relative" if normalize else "score"),
        )
    )
    fig.update_layout(title=title or "Token scores by method" + (" (normalised per method)" if normalize else ""),
                      height=170 + 40 * len(attrs), width=max(600, 60 * n + 200), xaxis=dict(tickangle=-45),
                      yaxis=dict(autorange="reversed"))
    return fig


def neurons_top(
    attr: Attribution, k: int = 20, *, row: int = 0, sum_positions: bool = True, absolute: bool = True, title: str | None = None
) -> go.Figure:
    """Bar chart of the k top neurons, labelled ``L{layer}N{neuron}`` (and position)."""
    table = attr.top(k, "neurons", row=row, sum_positions=sum_positions, absolute=absolute)
    labels = table["unit"].tolist()
    if not sum_positions:
        labels = [f"{u} {t!r}" for u, t in zip(labels, table["token"])]
    colors = ["#b2182b" if s > 0 else "#2166ac" for s in table["score"]]
    fig = go.Figure(go.Bar(x=table["score"][::-1], y=labels[::-1], orientation="h", marker_color=colors[::-1],
                           hovertemplate="%{y}<br>score %{x:.4g}<extra></extra>"))
    fig.update_layout(title=title or f"{_label(attr)}: top {k} neurons" + (" (summed over positions)" if sum_positions else ""),
                      xaxis_title="score", height=120 + 22 * len(labels), width=650)
    return fig


def neurons_overview(attr: Attribution, *, row: int = 0, title: str | None = None) -> go.Figure:
    """Layer × neuron heatmap of neuron scores summed over positions."""
    z = attr.totals("neurons")[row].detach().float().cpu()
    zmax = _symmetric([z])
    fig = go.Figure(
        go.Heatmap(z=z.numpy(), colorscale=COLORSCALE, zmin=-zmax, zmax=zmax, zmid=0.0,
                   hovertemplate="L%{y}N%{x}<br>score %{z:.4g}<extra></extra>", colorbar=dict(title="score"))
    )
    fig.update_layout(title=title or f"{_label(attr)}: neurons (summed over positions)", xaxis_title="neuron",
                      yaxis_title="layer", height=max(350, 14 * z.shape[0] + 150), width=900)
    return fig


def flow(attr: Attribution, *, row: int = 0, title: str | None = None) -> go.Figure:
    """Layer × position heatmap of the target's share in the residual stream (``dpa(..., flow=True)``)."""
    if attr.flow is None:
        raise ValueError("this attribution has no flow: run dpa(..., flow=True) with dpa_names_filter(model, flow=True)")
    z = attr.flow[row].detach().float().cpu()  # [layer + 1, pos]
    zmax = _symmetric([z])
    strs = attr.str_tokens[row] if attr.str_tokens else [str(i) for i in range(z.shape[1])]
    L = z.shape[0] - 1
    fig = go.Figure(
        go.Heatmap(
            z=z.numpy(),
            x=[f"{i}:{_token_text(t)}" for i, t in enumerate(strs)],
            y=[f"L{l} in" for l in range(L)] + ["out"],
            colorscale=COLORSCALE,
            zmin=-zmax,
            zmax=zmax,
            zmid=0.0,
            hovertemplate="%{y}, %{x}<br>%{z:.4g}<extra></extra>",
            colorbar=dict(title="score"),
        )
    )
    fig.update_layout(title=title or f"{_label(attr)}: where the target's evidence sits, layer by layer",
                      height=max(400, 16 * (L + 1) + 160), width=max(600, 55 * z.shape[1]), xaxis=dict(tickangle=-45))
    return fig


def scatter(
    x_attr: Attribution, y_attr: Attribution, kind: Literal["tokens", "heads", "neurons"] = "heads", *, row: int = 0,
    sum_positions: bool = True, title: str | None = None
) -> go.Figure:
    """Scatter of two methods' scores for the same units, with Pearson r and Spearman ρ."""
    x, labels = x_attr.flat(kind, row, sum_positions)
    y, _ = y_attr.flat(kind, row, sum_positions)
    if x.shape != y.shape:
        raise ValueError(f"the two attributions score different units ({tuple(x.shape)} vs {tuple(y.shape)}); "
                         "heads per position against heads summed? use sum_positions=True")
    pearson, spearman = correlation(x, y)
    lim = _symmetric([x, y])
    fig = go.Figure(
        [
            go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", line=dict(color="#bbbbbb", dash="dot"), hoverinfo="skip", showlegend=False),
            go.Scatter(x=x.numpy(), y=y.numpy(), mode="markers", text=labels, marker=dict(size=7, color="#4a6fa5", opacity=0.75),
                       hovertemplate="%{text}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>", showlegend=False),
        ]
    )
    fig.update_layout(
        title=title or f"{kind}: {_label(x_attr)} vs {_label(y_attr)}<br><sup>Pearson r = {pearson:.3f}, Spearman ρ = {spearman:.3f}</sup>",
        xaxis_title=_label(x_attr),
        yaxis_title=_label(y_attr),
        width=560,
        height=520,
    )
    fig.layout.meta = {"pearson": pearson, "spearman": spearman}
    return fig


def faithfulness(curves: Sequence[Any], *, axis: Literal["linear", "log"] | None = None, title: str | None = None) -> go.Figure:
    """Disruption (left) and recovery (right) curves of several methods, mean ± one standard error.

    ``curves``: `dpa_lens.evaluation.Curves`, one per method. The legend gives each method's AUCs
    (on ``axis``: log for component units, linear for tokens, by default).
    """
    curves = list(curves)
    if not curves:
        raise ValueError("no curves to plot")
    axis = axis or ("linear" if curves[0].unit == "tokens" else "log")
    palette = ["#4a6fa5", "#d1495b", "#66a182", "#edae49", "#8d6a9f", "#00798c", "#30638e", "#e07a5f", "#3d405b", "#81b29a", "#f2cc8f"]
    titles = ["disruption: top-k ablated (lower is better)", "recovery: all but top-k ablated (higher is better)"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for i, c in enumerate(curves):
        color = palette[i % len(palette)]
        auc = c.auc(axis)
        name = f"{c.method} (total {auc['total']:.1f})"
        x = c.fractions.numpy()
        for col, y in ((1, c.disruption), (2, c.recovery)):
            y = y.double()
            mean = y.mean(0)
            se = y.std(0) / max(1, y.shape[0]) ** 0.5 if y.shape[0] > 1 else torch.zeros_like(mean)
            fig.add_trace(go.Scatter(x=list(x) + list(x[::-1]), y=list((mean + se).numpy()) + list((mean - se).numpy()[::-1]),
                                     fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                     showlegend=False, legendgroup=c.method), row=1, col=col)
            fig.add_trace(go.Scatter(x=x, y=mean.numpy(), mode="lines+markers", line=dict(color=color), marker=dict(size=4),
                                     name=name, legendgroup=c.method, showlegend=col == 1,
                                     hovertemplate=c.method + "<br>fraction %{x:.3g}<br>p / p_clean %{y:.3f}<extra></extra>"),
                          row=1, col=col)
    for col in (1, 2):
        fig.update_xaxes(title_text=f"fraction of {curves[0].unit}", type="log" if axis == "log" else "linear", row=1, col=col)
    fig.update_yaxes(title_text="p(answer) / p(answer, clean)", row=1, col=1)
    fig.update_layout(title=title or f"Faithfulness: {curves[0].unit}, {curves[0].ablation} ablation, {curves[0].disruption.shape[0]} prompts",
                      width=1100, height=450)
    return fig
