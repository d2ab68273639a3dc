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
    dpa_lens.plot.circuit(circuit)                 # the strongest edges, layers left to right
    dpa_lens.plot.circuit_positions(circuit)       # the strongest edges by position
    dpa_lens.plot.paths(circuit.paths[0])          # the strongest paths

Circuit figures colour edges by the input they reach (`PATH_COLORS`: query, key, value, MLP, logit),
not by sign: their width is ``|score|`` and a negative edge is dotted.
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

from dpa_lens.errors import InputError
from dpa_lens.evaluation.agreement import correlation
from dpa_lens.evaluation.circuit_faithfulness import CircuitCurve
from dpa_lens.evaluation.faithfulness import Curves
from dpa_lens.graph import head_name, node_layer
from dpa_lens.results import Attribution, Circuit, Path
from dpa_lens.results.rows import register_figure

COLORSCALE = "RdBu_r"  # red positive, blue negative, white at zero
PATH_COLORS = {"q": "#d1495b", "k": "#edae49", "v": "#00798c", "mlp": "#66a182", "logit": "#30638e"}
_PORTS = {"q": -0.22, "k": 0.0, "v": 0.22, "mlp": 0.0, "logit": 0.0}  # where each input enters a node, vertically
Positions = Literal["sum", "answer"] | int | Sequence[int]


def _as_list(attrs: Attribution | Sequence[Attribution]) -> list[Attribution]:
    out = [attrs] if isinstance(attrs, Attribution) else list(attrs)
    if not out:
        raise InputError("nothing to plot: pass an Attribution or a non-empty list of them")
    bad = [type(a).__name__ for a in out if not isinstance(a, Attribution)]
    if bad:
        raise InputError(f"expected Attribution objects, got {bad[0]}")
    return out


def _label(attr: Attribution) -> str:
    """A method's name, with the unit it measured where it measures one of several (``activation_patching (heads)``)."""
    unit = attr.settings.get("unit")
    return f"{attr.method} ({unit})" if isinstance(unit, str) else attr.method


def _symmetric(values: Iterable[Tensor]) -> float:
    m = max((float(v.abs().nan_to_num(0).max()) for v in values if v.numel()), default=0.0)
    return m if m > 0 else 1.0


def _token_text(token: str) -> str:
    """A token as it should read in a figure: visible spaces and newlines, no raw HTML."""
    return html.escape(token.replace("\n", "⏎").replace(" ", "␣") if token.strip() == "" else token.replace("\n", "⏎"))


def _select_positions(attr: Attribution, kind: str, row: int, positions: Positions) -> tuple[Tensor, str]:
    """One row's ``[layer, unit]`` scores of heads or neurons, at or over the positions asked for."""
    row = attr.row_index(row)
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
                customdata=[[head_name(l, h) for h in range(H)] for l in range(L)],
                hovertemplate="%{customdata}<br>layer %{y}, head %{x}<br>score %{z:.4g}<extra>" + _label(a) + "</extra>",
            ),
            row=r,
            col=c,
        )
        fig.update_xaxes(title_text="head", row=r, col=c)
        if c == 1:
            fig.update_yaxes(title_text="layer", row=r, col=c)
    n_layers = grids[0].shape[0]
    fig.update_layout(
        coloraxis=dict(colorscale=COLORSCALE, cmin=-zmax, cmax=zmax, cmid=0.0, colorbar=dict(title="relative" if normalize else "score")),
        title=title or f"Head scores ({notes[0]}){' — normalised per method' if normalize else ''}",
        height=rows * max(300, 16 * n_layers + 110) + 60,
        width=max(450, 290 * cols + 120),
    )
    return fig


def tokens(attr: Attribution, *, row: int = 0, width: int = 12, normalize: bool = False, title: str | None = None) -> go.Figure:
    """The prompt laid out in lines of ``width`` tokens, each cell coloured by its score."""
    row = attr.row_index(row)
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
            # a horizontal colour bar of fixed length under the strip: a one-line strip is too short for a vertical one
            colorbar=dict(title=dict(text="relative" if normalize else "score", side="right"), orientation="h", lenmode="pixels",
                          len=320, thickness=12, x=0.5, xanchor="center", y=0, yanchor="top", ypad=8),
        )
    )
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_xaxes(showticklabels=False)
    target = (attr.target.get("labels") or [""])[row] if attr.target.get("labels") else ""
    fig.update_layout(
        title=title or f"{_label(attr)}: token scores" + (f" for {target}" if target else ""),
        height=max(240, 170 + 40 * lines),
        width=max(500, 82 * width + 100),
        plot_bgcolor="white",
        margin=dict(b=80),
    )
    return fig


def tokens_by_method(attrs: Sequence[Attribution], *, row: int = 0, normalize: bool = True, title: str | None = None) -> go.Figure:
    """Method × token grid for one prompt; each row normalised to its largest absolute score."""
    attrs = _as_list(attrs)
    strs = attrs[0].str_tokens[row] if attrs[0].str_tokens else None
    rows = []
    for a in attrs:
        s = a.scores("tokens")[a.row_index(row)].detach().float().cpu()
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


def neurons_overview(attr: Attribution, *, row: int = 0, k: int = 10, title: str | None = None) -> go.Figure:
    """The ``k`` strongest neurons of every layer (by |score| summed over positions): a layer × rank
    heatmap, each cell labelled with its neuron. Readable at any width (a layer × d_mlp heatmap of
    thousands of neurons is not)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive int, got {k!r}")
    t = attr.totals("neurons")[attr.row_index(row)].detach().float().cpu()  # [layer, d_mlp]
    k = min(k, t.shape[1])
    order = t.nan_to_num(0.0).abs().argsort(dim=1, descending=True)[:, :k]
    z = t.gather(1, order)
    zmax = _symmetric([z])
    labels = [[f"N{int(i)}" for i in layer] for layer in order]
    fig = go.Figure(
        go.Heatmap(z=z.numpy(), x=[f"#{r + 1}" for r in range(k)], y=list(range(t.shape[0])), text=labels, texttemplate="%{text}",
                   textfont=dict(size=9), colorscale=COLORSCALE, zmin=-zmax, zmax=zmax, zmid=0.0, xgap=1, ygap=1,
                   customdata=labels, hovertemplate="L%{y}%{customdata}<br>score %{z:.4g}<extra></extra>",
                   colorbar=dict(title="score", thickness=14))
    )
    fig.update_layout(title=title or f"{_label(attr)}: top {k} neurons of each layer (summed over positions)",
                      xaxis_title="rank in the layer (by |score|)", yaxis=dict(title="layer", dtick=1),
                      height=max(350, 18 * t.shape[0] + 150), width=max(600, 70 * k + 200))
    return fig


def flow(attr: Attribution, *, row: int = 0, title: str | None = None) -> go.Figure:
    """Layer × position heatmap of the target's share in the residual stream (``dpa(..., flow=True)``)."""
    if attr.flow is None:
        raise ValueError("this attribution has no flow: run dpa(..., flow=True) with dpa_names_filter(model, flow=True)")
    row = attr.row_index(row)
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
    sum_positions: bool = True, labels: int = 6, title: str | None = None
) -> go.Figure:
    """Scatter of two methods' scores for the same units, with Pearson r and Spearman ρ; the ``labels``
    points farthest from the origin carry their unit's name (``L24H5``), so that a static image says which
    units the outliers are (every point names its unit on hover)."""
    x, names = x_attr.flat(kind, row, sum_positions)
    y, _ = y_attr.flat(kind, row, sum_positions)
    if x.shape != y.shape:
        raise ValueError(f"the two attributions score different units ({tuple(x.shape)} vs {tuple(y.shape)}); "
                         "heads per position against heads summed? use sum_positions=True")
    pearson, spearman = correlation(x, y)
    lim = _symmetric([x, y])
    far = set((x.abs() / x.abs().max().clamp_min(1e-30) + y.abs() / y.abs().max().clamp_min(1e-30)).argsort(descending=True)[:labels].tolist())
    fig = go.Figure(
        [
            go.Scatter(x=[-lim, lim], y=[-lim, lim], mode="lines", line=dict(color="#bbbbbb", dash="dot"), hoverinfo="skip", showlegend=False),
            go.Scatter(x=x.numpy(), y=y.numpy(), mode="markers+text", customdata=names,
                       text=[n if i in far else "" for i, n in enumerate(names)], textposition="top center", textfont=dict(size=10),
                       marker=dict(size=7, color="#4a6fa5", opacity=0.75),
                       hovertemplate="%{customdata}<br>x %{x:.4g}<br>y %{y:.4g}<extra></extra>", showlegend=False),
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


_PALETTE = ["#4a6fa5", "#d1495b", "#66a182", "#edae49", "#8d6a9f", "#00798c", "#30638e", "#e07a5f", "#3d405b", "#81b29a", "#f2cc8f"]


def faithfulness(curves: Any, *, axis: Literal["linear", "log"] | None = None, title: str | None = None) -> go.Figure:
    """Faithfulness curves of several methods, mean ± one standard error over the prompts.

    ``curves``: `dpa_lens.evaluation.Curves` (node attributions), one per method: disruption (left) and
    recovery (right), the legend with each method's AUCs (on ``axis``: log for component units, linear
    for tokens, by default). Or `dpa_lens.evaluation.CircuitCurve` (circuits, from
    `dpa_lens.circuit_faithfulness`), one or a list: MIB's faithfulness ``f`` of the circuit against the
    fraction of edges kept, the legend with CPR and CMD (on ``axis``: MIB's linear one by default; the
    fraction axis is drawn on a log scale either way, where the grid's points are spread).
    """
    curves = [curves] if isinstance(curves, (Curves, CircuitCurve)) else list(curves)
    if not curves:
        raise InputError("no curves to plot: pass the Curves or CircuitCurve of each method")
    kinds = {type(c) for c in curves}
    if len(kinds) > 1 or not kinds <= {Curves, CircuitCurve}:
        raise InputError(f"plot.faithfulness takes Curves (node methods) or CircuitCurve (circuits), one kind at a time, got "
                         f"{sorted(k.__name__ for k in kinds)}")
    if kinds == {CircuitCurve}:
        return _circuit_faithfulness(curves, axis or "linear", title)
    axis = axis or ("linear" if curves[0].unit == "tokens" else "log")
    palette = _PALETTE
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


def _circuit_faithfulness(curves: list[CircuitCurve], axis: Literal["linear", "log"], title: str | None) -> go.Figure:
    fig = go.Figure()
    for i, c in enumerate(curves):
        color = _PALETTE[i % len(_PALETTE)]
        x = c.fractions.double().numpy()
        f = c.faithfulness.double()
        mean = c.curve().double()
        se = f.std(0) / f.shape[0] ** 0.5 if f.shape[0] > 1 else torch.zeros_like(mean)
        fig.add_trace(go.Scatter(x=list(x) + list(x[::-1]), y=list((mean + se).numpy()) + list((mean - se).numpy()[::-1]),
                                 fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                 showlegend=False, legendgroup=c.method))
        fig.add_trace(go.Scatter(x=x, y=mean.numpy(), mode="lines+markers", line=dict(color=color), marker=dict(size=5),
                                 name=f"{c.method} (CPR {c.cpr(axis):.2f}, CMD {c.cmd(axis):.2f})", legendgroup=c.method,
                                 customdata=c.n_edges.numpy(),
                                 hovertemplate=c.method + "<br>%{customdata} edges (%{x:.3g})<br>f %{y:.3f}<extra></extra>"))
    fig.add_hline(y=1.0, line=dict(color="#999999", dash="dot"))
    first = curves[0]
    fig.update_xaxes(title_text=f"fraction of the {first.n_total:,} edges kept", type="log")
    fig.update_yaxes(title_text="faithfulness f = (m(C) − m(∅)) / (m(M) − m(∅))")
    fig.update_layout(title=title or f"Circuit faithfulness: {first.ablation} ablation, {first.values.shape[0]} prompt"
                      f"{'s' if first.values.shape[0] != 1 else ''} (CPR/CMD on the {axis} axis)",
                      width=900, height=450, legend=dict(title="edges ranked by"))
    return fig


# ---------------------------------------------------------------------------------------------- circuits
def _node_xy(node: str, n_layers: int, n_heads: int) -> tuple[float, float]:
    """Layers left to right (embed, then each layer's heads and MLP, then the logit): heads stacked
    from the top, the MLPs, embed and logit on one row below them."""
    if node in ("embed", "logit"):
        return (0.0 if node == "embed" else 2.0 * n_layers + 2), -1.0
    x = 1 + 2 * node_layer(node)  # an MLP's depth is its layer + 0.5
    return x, (n_heads - 1 - int(node.split("H")[1]) if "H" in node else -1.0)


def circuit(circ: Circuit, *, row: int = 0, top_n: int | None = 40, threshold: float | None = None, title: str | None = None,
            width: int | None = None) -> go.Figure:
    """The ``top_n`` strongest edges of one row (and/or those with ``|score| ≥ threshold``) as a graph.

    The figure fills its container (a notebook cell, the report) unless ``width`` (pixels) is given, as
    for a static image (``fig.write_image``).

    Layers run left to right (``embed``, each layer's heads then its MLP, ``logit``); an edge goes
    from its writer to the input of its reader it reaches (query, key and value enter a head at three
    heights), coloured by that input (`PATH_COLORS`, one legend entry each), as wide as ``|score|``,
    dotted when negative; hovering shows writer, reader, path and score. ``fig.layout.meta`` holds
    the edges drawn (``writer, reader, path, score``).
    """
    table = circ.prune(top_n=top_n, threshold=threshold, row=row).to_dataframe(row=row)
    table = table.loc[table["score"].abs().sort_values(ascending=False).index].reset_index(drop=True)
    n_heads = max([int(w.split("H")[1]) + 1 for w in circ.writers if "H" in w] or [1])
    n_layers = max([int(node_layer(w)) + 1 for w in circ.writers if w != "embed"] or [0])
    xy = lambda node: _node_xy(node, n_layers, n_heads)  # noqa: E731
    widest = float(table["score"].abs().max()) if len(table) else 1.0
    fig = go.Figure()
    for w, r, label, score in table[["writer", "reader", "path", "score"]].itertuples(index=False):
        (x0, y0), (x1, y1) = xy(w), xy(r)
        bow = -0.35 * (x1 - x0) ** 0.7 if y0 == y1 == -1.0 else 0.0  # along the bottom row: arcs, longer ones lower
        y1 += _PORTS[label]
        text = f"{w} → {r} [{label}]<br>score {score:.4g}"
        fig.add_trace(go.Scatter(
            x=[x0, (x0 + x1) / 2, x1], y=[y0, (y0 + y1) / 2 + bow, y1], mode="lines", name=f"{w} → {r} [{label}]", legendgroup=label,
            showlegend=False, line=dict(color=PATH_COLORS[label], width=1 + 7 * abs(score) / widest,
                                        dash="solid" if score >= 0 else "dot", shape="spline"),
            text=[text] * 3, hovertemplate="%{text}<extra></extra>", opacity=0.85))
    for label in [l for l in PATH_COLORS if l in set(table["path"])]:  # the legend: one solid line per label
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=label, legendgroup=label,
                                 line=dict(color=PATH_COLORS[label], width=3)))
    nodes = sorted({"embed", "logit", *table["writer"], *table["reader"]}, key=lambda n: (xy(n)[0], xy(n)[1]))
    node_scores = dict(zip(circ.writers, circ.nodes[circ.row_index(row)].tolist())) if circ.nodes is not None else {}
    # the bottom row (embed, the MLPs, logit) is crowded: its labels alternate above and below the nodes
    bottom = [n for n in nodes if xy(n)[1] == -1.0]
    where = ["bottom center" if n in bottom and bottom.index(n) % 2 else "top center" for n in nodes]
    fig.add_trace(go.Scatter(
        x=[xy(n)[0] for n in nodes], y=[xy(n)[1] for n in nodes], mode="markers+text", text=nodes, textposition=where,
        marker=dict(size=11, color="#f4f4f4", line=dict(color="#555555", width=1.2)), name="nodes", showlegend=False,
        customdata=[f"{n}" + (f"<br>node score {node_scores[n]:.4g}" if n in node_scores else "") for n in nodes],
        hovertemplate="%{customdata}<extra></extra>"))
    step = max(1, math.ceil(n_layers / 12))  # at most a dozen layer ticks; embed and logit are labelled nodes
    fig.update_xaxes(tickvals=[1 + 2 * l for l in range(0, n_layers, step)], ticktext=[f"L{l}" for l in range(0, n_layers, step)],
                     range=[-1.0, 2.0 * n_layers + 3], showgrid=False, zeroline=False)
    fig.update_yaxes(visible=False, range=[-2.0, n_heads])
    labels, b = circ.target.get("labels") or [], circ.row_index(row)
    fig.update_layout(
        title=title or f"{circ.method}: top {len(table)} edges" + (f" for {labels[b]}" if len(labels) > b else ""),
        autosize=width is None, width=width, height=max(420, 45 * n_heads + 320), plot_bgcolor="white",
        legend=dict(title="path (dotted: negative)"), hovermode="closest")
    fig.layout.meta = {"edges": table.to_dict("records")}
    return fig


def circuit_positions(circ: Circuit, *, row: int = 0, top_n: int = 20, title: str | None = None) -> go.Figure:
    """Edge × position heatmap of the ``top_n`` strongest edges of one row (by total ``|score|``),
    split by the position where the writer writes and the reader reads (``Circuit.per_position``)."""
    if circ.per_position is None:
        raise InputError("this circuit has no per-position scores: make it with per_position=True")
    table = circ.top(top_n, row=row)
    b = circ.row_index(row)
    w_idx = [circ.writers.index(w) for w in table["writer"]]
    r_idx = [circ.readers.index((r, p)) for r, p in zip(table["reader"], table["path"])]
    z = circ.per_position[b][:, w_idx, r_idx].T.detach().float().cpu()  # [edge, pos]
    strs = circ.str_tokens[b] if circ.str_tokens else [str(i) for i in range(z.shape[1])]
    zmax = _symmetric([z])
    names = [f"{w} → {r} [{p}]" for w, r, p in zip(table["writer"], table["reader"], table["path"])]
    fig = go.Figure(go.Heatmap(
        z=z.numpy(), x=[f"{i}:{_token_text(t)}" for i, t in enumerate(strs)], y=names, colorscale=COLORSCALE,
        zmin=-zmax, zmax=zmax, zmid=0.0, xgap=1, ygap=1, colorbar=dict(title="score"),
        hovertemplate="%{y}<br>position %{x}<br>score %{z:.4g}<extra></extra>"))
    fig.update_layout(title=title or f"{circ.method}: top {len(names)} edges by position", xaxis=dict(tickangle=-45),
                      yaxis=dict(autorange="reversed"), height=max(300, 24 * len(names) + 180), width=max(650, 45 * z.shape[1] + 360))
    return fig


def paths(found: Sequence[Path] | Circuit, *, row: int = 0, top_n: int = 20, title: str | None = None) -> go.Figure:
    """Bar chart of the strongest paths (a list of `Path`, or a `Circuit`'s ``paths`` of one row), each
    labelled by its hops and coloured by the input its last hop reaches before the logit."""
    if isinstance(found, Circuit):
        if found.paths is None:
            raise InputError("this circuit has no paths: make it with dpa_edges(..., paths=k)")
        found = found.paths[found.row_index(row)]
    found = sorted(found, key=lambda p: -abs(p.score))[:top_n]
    if not found:
        raise InputError("no paths to plot")
    names = [str(p) for p in found]
    last = [p.hops[-2].label if len(p.hops) > 2 else "logit" for p in found]
    fig = go.Figure()
    for label in [l for l in PATH_COLORS if l in last]:  # one trace per label, for the legend
        sel = [p for p, l in zip(found, last) if l == label]
        fig.add_trace(go.Bar(
            x=[p.score for p in sel], y=[str(p) for p in sel], orientation="h", name=label, marker_color=PATH_COLORS[label],
            customdata=[f"{len(p.hops) - 2} reader(s)" + (f", source token {p.source_token!r}" if p.source_token else "") for p in sel],
            hovertemplate="%{y}<br>score %{x:.4g}<br>%{customdata}<extra></extra>"))
    fig.update_layout(title=title or f"{found[0].method or 'paths'}: top {len(found)} paths", xaxis_title="score",
                      yaxis=dict(categoryorder="array", categoryarray=names[::-1]), legend=dict(title="input read last"),
                      height=140 + 24 * len(found), width=max(650, 9 * max(len(n) for n in names) + 330), margin=dict(l=20))
    return fig


for _kind, _draw in {"heads": heads, "tokens": tokens, "neurons": neurons_top, "flow": flow}.items():
    register_figure("Attribution", _kind, _draw)
register_figure("Circuit", "circuit", circuit)
