"""Issue 17, item 7: circuit faithfulness (MIB's CPR and CMD) on dpa_lens's edge graph.

References:

* the edge oracle's forward (``tests/oracles/edges.py``: raw ``transformers`` weights, float64, a private copy
  of the stream for every reader), iterated to its fixed point: every reader's copy is offset by the ablated
  edges' ``out(ablated) − out(current)``, the current outputs those of the previous pass (independent of
  dpa_lens and TransformerLens);
* a one-layer GPT-2 written out by hand;
* exact edge patching (`edge_patching`), which one circuit per edge reproduces exactly (derived in
  `dpa_lens.evaluation.circuit_faithfulness`);
* the model's own clean and corrupted runs at the two ends of the curve.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from dpa_lens.errors import InputError
from dpa_lens.evaluation.circuit_faithfulness import MIB_FRACTIONS, CircuitCurve, circuit_faithfulness, circuit_values, kept_counts
from dpa_lens.graph import graph
from dpa_lens.methods.edge_atp import edge_atp, edge_random
from dpa_lens.methods.edge_patching import edge_patching
from dpa_lens.models import tl
from dpa_lens.models.view import ModelView
from tests.helpers import CORRUPTED, EDGES, IOI_PROMPT, OTHER, OTHER_CORRUPTED, PAIR, edges_for, make_tiny
from tests.oracles.edges import FORWARDS, _Net
from tests.oracles.rewired import DT, _Rewired


@functools.cache
def _model(family: str, line: str, n_layers: int = 2, seed: int = 1):
    return make_tiny(family, line, seed=seed, n_layers=n_layers)


def _metric(model):
    good, bad = (model.to_single_token(t) for t in PAIR)
    return lambda logits: logits[:, -1, good] - logits[:, -1, bad]


def _run_value(model, prompt) -> float:
    with torch.no_grad():
        return float(_metric(model)(model(prompt)))


def _graph(model):
    return graph(model.cfg.n_layers, model.cfg.n_heads, parallel=ModelView(model).rules.parallel)


# ------------------------------------------------------------------------------ the oracle at its fixed point


@dataclass
class _Private(_Net):
    """The oracle forward with the readers' private copies offset (``"L{l}.q"`` [b, n, H, d], ``"L{l}.mlp"``, ``"logit"``)."""

    offsets: dict = field(default_factory=dict)

    def copy(self, key, x, heads=None):
        return super().copy(key, x, heads) + self.offsets.get(key, 0.0)


def _oracle_run(hf, ids, offsets=None):
    """Every writer's output ``[b, n, writer, d]`` (in `graph` order) and the logits."""
    net = _Private(R=_Rewired(mu=(0.25, 0.25, 0.5, 0.5, 0.5), b=ids.shape[0]), offsets=offsets or {})
    logits = FORWARDS[type(hf).__name__](hf, ids, net)
    blocks = [net.embed[:, :, None]] + [torch.cat([h, m[:, :, None]], 2) for h, m in zip(net.R.heads, net.mlp_outs)]
    return torch.cat(blocks, 2).detach(), logits.detach()


def _oracle_values(model, hf, keeps, ablation: str) -> torch.Tensor:
    """m(C) per keep mask ``[k, writer, reader]``: readers read ``x + Σ_ablated (out(ablated) − out(current))``."""
    f = _metric(model)
    clean, corrupted = model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED)
    out_clean, _ = _oracle_run(hf, clean)
    out_corr, _ = _oracle_run(hf, corrupted)
    ablated = out_corr if ablation == "corrupted" else out_clean.mean(1, keepdim=True).expand_as(out_clean)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    b, n, _, d = out_clean.shape
    exists = _graph(model)[2]
    values = []
    for keep in keeps:
        current, previous = out_clean, None
        for _ in range(2 * L + 2):  # each pass settles one more sublayer
            off = torch.einsum("bnwd,wr->bnrd", ablated - current, (exists & ~keep).to(DT))
            offsets = {"logit": off[:, :, -1]}
            for layer in range(L):
                r0 = layer * (3 * H + 1)
                per_path = off[:, :, r0 : r0 + 3 * H].reshape(b, n, H, 3, d)
                offsets.update({f"L{layer}.{p}": per_path[:, :, :, i] for i, p in enumerate("qkv")})
                offsets[f"L{layer}.mlp"] = off[:, :, r0 + 3 * H]
            previous, (current, logits) = current, _oracle_run(hf, clean, offsets)
        assert torch.equal(current, previous)  # the fixed point was reached
        values.append(float(f(logits)))
    return torch.tensor(values, dtype=DT)


@pytest.mark.parametrize("ablation", ["corrupted", "mean"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "neox", "gemma2"])
def test_circuit_values_equal_the_oracle(family, ablation, line):
    """Random circuits on grouped-query heads, learned positions and biases, parallel blocks, output norms."""
    model, hf = _model(family, line)
    exists = _graph(model)[2]
    gen = torch.Generator().manual_seed(0)
    keeps = torch.stack([(torch.rand(exists.shape, generator=gen) < p) & exists for p in (0.2, 0.5, 0.9)])
    got = circuit_values(model, IOI_PROMPT, CORRUPTED, PAIR, keeps, ablation=ablation, batch_size=2, progress=False)
    want = _oracle_values(model, hf, keeps, ablation)
    assert got.shape == (1, 3)
    assert float((got[0].double() - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    assert float(want.max() - want.min()) > 1e-2  # the circuits differ


# ------------------------------------------------------------------------------ the ends of the curve


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_all_edges_give_the_clean_run_and_none_the_corrupted_run(family, line):
    model, _ = _model(family, line)
    circuit = edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    curve = circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, progress=False)
    clean, corrupted = _run_value(model, IOI_PROMPT), _run_value(model, CORRUPTED)
    tol = 1e-5 * max(1.0, abs(clean), abs(corrupted))
    assert abs(float(curve.full[0]) - clean) < tol and abs(float(curve.values[0, -1]) - clean) < tol
    assert abs(float(curve.empty[0]) - corrupted) < tol  # m(∅) is the corrupted run: exactly, to float rounding
    every = circuit_values(model, IOI_PROMPT, CORRUPTED, PAIR, circuit.in_graph[None], progress=False)
    assert abs(float(every[0, 0]) - clean) < tol  # keeping every edge changes nothing
    assert abs(float(curve.faithfulness[0, -1]) - 1.0) < 1e-4
    n = int(_graph(model)[2].sum())
    assert curve.n_total == n and curve.n_edges.tolist() == [int(x * n + 1e-9) for x in MIB_FRACTIONS]
    zero = curve.n_edges == 0  # ⌊0.1 % of a tiny model's edges⌋ = 0: nothing kept
    assert bool(zero.any()) and float((curve.faithfulness[0, zero]).abs().max()) < 1e-4
    assert curve.method == "edge_atp" and curve.ablation == "corrupted"


def test_mean_ablation_has_its_own_empty_circuit(line):
    model, hf = _model("llama", line)
    curve = circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR),
                                 fractions=(0.5, 1.0), ablation="mean", progress=False)
    empty = _oracle_values(model, hf, torch.zeros(1, *_graph(model)[2].shape, dtype=torch.bool), "mean")
    assert abs(float(curve.empty[0]) - float(empty[0])) < 1e-4 * max(1.0, abs(float(empty[0])))
    assert abs(float(curve.faithfulness[0, -1]) - 1.0) < 1e-4


# ------------------------------------------------------------------------------ one edge, and exact edge patching


def _closure(model, writer: str, reader: str, path: str) -> torch.Tensor:
    """The circuit whose value is exact patching of ``writer → (reader, path)``: that edge, every edge into the
    writer's ancestors and the writer itself (so that it writes its clean output), and every edge out of the
    reader's node and the nodes downstream of it (so that the reader's change reaches the logit as in a
    normal forward)."""
    writers, readers, exists = _graph(model)
    node_of = [r for r, _ in readers]
    u, r = writers.index(writer), readers.index((reader, path))

    def feeds(source: int, node: str) -> bool:  # does writer ``source`` feed some reader of ``node``
        return any(bool(exists[source, j]) for j, name in enumerate(node_of) if name == node)

    upstream = {writers[w] for w in range(len(writers)) if feeds(w, writer)} | {writer}
    keep = exists & torch.tensor([name in upstream for name in node_of])[None, :]
    if reader != "logit":
        source = writers.index(reader)
        downstream = torch.tensor([w == source or feeds(source, writers[w]) for w in range(len(writers))])
        keep |= exists & downstream[:, None]
    keep[u, r] = True
    return keep


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_one_edge_with_its_closure_is_exact_edge_patching(family, line):
    """Every label, grouped keys and values read by two query heads, head → its own layer's MLP, logit edges."""
    model, _ = _model(family, line)
    edges = edges_for(family)
    keeps = torch.stack([_closure(model, *e) for e in edges])
    got = circuit_values(model, IOI_PROMPT, CORRUPTED, PAIR, keeps, batch_size=8, progress=False)[0]
    patched = edge_patching(model, IOI_PROMPT, CORRUPTED, PAIR, edges=edges, progress=False)
    want = torch.tensor([patched.edge(*e) for e in edges])
    corrupted = _run_value(model, CORRUPTED)
    assert float(want.abs().max()) > 1e-2
    assert float((got - corrupted - want).abs().max()) < 1e-4 * max(1.0, abs(corrupted))


def test_one_edge_alone_moves_the_metric_only_from_embed_to_logit(line):
    """Kept alone, ``u → r`` carries ``out_u(current) − out_u(corrupted)``, zero unless u = embed (u's own inputs
    are ablated), and reaches the metric only if r = logit (edges out of r are ablated): of the single edges
    only ``embed → logit`` differs from m(∅), by exactly its edge patching score (nonzero here: the corrupted
    prompt also changes the token at the answer position, the only one the readout reads)."""
    model, _ = _model("llama", line)
    clean, corrupted = model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED)
    corrupted[0, -1] = model.to_single_token(" the")
    writers, readers, exists = _graph(model)
    edges = EDGES + [("embed", "L1H2", "q"), ("L0H1", "L1.mlp", "mlp")]
    keeps = torch.zeros(len(edges), *exists.shape, dtype=torch.bool)
    for i, (w, r, p) in enumerate(edges):
        keeps[i, writers.index(w), readers.index((r, p))] = True
    with torch.no_grad():
        base = float(_metric(model)(model(corrupted)))
    got = circuit_values(model, clean, corrupted, PAIR, keeps, progress=False)[0] - base
    moved = [e for e, v in zip(edges, got.tolist()) if abs(v) > 1e-5]
    assert moved == [("embed", "logit", "logit")]
    want = edge_patching(model, clean, corrupted, PAIR, edges=moved, progress=False).edge(*moved[0])
    assert abs(want) > 1e-2 and abs(float(got[edges.index(moved[0])]) - want) < 1e-5 * max(1.0, abs(want))


# ------------------------------------------------------------------------------ a one-layer GPT-2 by hand


def test_one_layer_gpt2_by_hand(line):
    """Kept: embed → L0H1 (key), L0H1 → L0.mlp, L0H1 → logit, L0.mlp → logit. Head 1's keys read the clean
    embedding, its queries and values the corrupted one; the MLP reads the corrupted stream moved by head 1's
    change; the readout reads the corrupted stream moved by both."""
    model, hf = _model("gpt2", line, n_layers=1, seed=0)  # a seed whose head 1 reads the names through its keys
    hf = hf.double()
    tr, block = hf.transformer, hf.transformer.h[0]
    d, H = hf.config.n_embd, hf.config.n_head
    dh, eps = d // H, hf.config.layer_norm_epsilon
    ln = lambda x, m: F.layer_norm(x, (d,), m.weight, m.bias, eps)  # noqa: E731
    W_qkv, b_qkv, W_O = block.attn.c_attn.weight, block.attn.c_attn.bias, block.attn.c_proj.weight.view(H, dh, d)

    def head(h: int, x_q, x_k, x_v):
        q, k, v = ((ln(x, block.ln_1) @ W_qkv + b_qkv)[:, i * d + h * dh : i * d + (h + 1) * dh] for i, x in enumerate((x_q, x_k, x_v)))
        n = q.shape[0]
        scores = (q @ k.T / dh**0.5).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return scores.softmax(-1) @ v @ W_O[h]

    def mlp(x):
        return F.gelu(ln(x, block.ln_2) @ block.mlp.c_fc.weight + block.mlp.c_fc.bias, approximate="tanh") @ block.mlp.c_proj.weight

    def embed(prompt):
        ids = model.to_tokens(prompt)[0]
        return tr.wte.weight[ids] + tr.wpe.weight[: len(ids)]

    good, bad = (model.to_single_token(t) for t in PAIR)
    value = lambda x: float((ln(x[-1], tr.ln_f) @ hf.lm_head.weight.T)[[good, bad]] @ torch.tensor([1.0, -1.0], dtype=DT))  # noqa: E731
    with torch.no_grad():
        x_clean, x = embed(IOI_PROMPT), embed(CORRUPTED)
        heads = [head(h, x, x, x) for h in range(H)]
        mid = x + sum(heads) + block.attn.c_proj.bias
        final = mid + mlp(mid) + block.mlp.c_proj.bias
        assert abs(value(final) - _run_value(model, CORRUPTED)) < 1e-4  # the hand-written layer is the model
        moved_head = head(1, x, x_clean, x) - heads[1]
        moved_mlp = mlp(mid + moved_head) - mlp(mid)
        want = value(final + moved_head + moved_mlp)

    writers, readers, exists = _graph(model)
    keep = torch.zeros(1, *exists.shape, dtype=torch.bool)
    for w, r in [("embed", ("L0H1", "k")), ("L0H1", ("L0.mlp", "mlp")), ("L0H1", ("logit", "logit")), ("L0.mlp", ("logit", "logit"))]:
        keep[0, writers.index(w), readers.index(r)] = True
    got = float(circuit_values(model, IOI_PROMPT, CORRUPTED, PAIR, keep, progress=False)[0, 0])
    assert abs(want - _run_value(model, CORRUPTED)) > 0.1
    assert abs(got - want) < 1e-4 * max(1.0, abs(want))


# ------------------------------------------------------------------------------ the curve, rows, areas


def test_rows_and_rankings(line):
    """Two prompts at once equal each alone; one circuit row ranks for every prompt, or one row per prompt."""
    model, _ = _model("qwen3", line)
    prompts, corrupted = [IOI_PROMPT, OTHER], [CORRUPTED, OTHER_CORRUPTED]
    fractions = (0.05, 0.2, 0.5, 1.0)
    per_row = edge_atp(model, prompts, corrupted, PAIR)
    both = circuit_faithfulness(model, prompts, corrupted, PAIR, per_row, fractions=fractions, batch_size=3, progress=False)
    second = circuit_faithfulness(model, OTHER, OTHER_CORRUPTED, PAIR, per_row[1], fractions=fractions, progress=False)
    torch.testing.assert_close(both.values[1], second.values[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both.empty[1], second.empty[0], rtol=1e-4, atol=1e-5)
    shared = circuit_faithfulness(model, prompts, corrupted, PAIR, per_row[0], fractions=fractions, progress=False)
    torch.testing.assert_close(shared.values[0], both.values[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(shared.values[1], both.values[1])
    joined = CircuitCurve.concat([both, second])
    assert joined.values.shape == (3, 4)
    together = circuit_faithfulness(model, prompts, corrupted, PAIR, [per_row, per_row[0]], fractions=fractions, progress=False)
    assert [c.method for c in together] == ["edge_atp", "edge_atp"]
    torch.testing.assert_close(together[0].values, both.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[1].values, shared.values, rtol=1e-4, atol=1e-5)


def test_ranking_keeps_the_top_edges_by_absolute_score(line):
    """Keeping the top k by |score| is `circuit_values` of exactly those edges."""
    model, _ = _model("gpt2", line)
    circuit = edge_random(model, IOI_PROMPT, CORRUPTED, PAIR, seed=3)
    curve = circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, fractions=(0.1, 0.3), progress=False)
    exists = circuit.in_graph
    k = kept_counts([0.1, 0.3], int(exists.sum()))
    flat = circuit.scores[0].abs().masked_fill(~exists, -1.0).flatten()
    keeps = torch.zeros(2, *exists.shape, dtype=torch.bool)
    for i, n in enumerate(k):
        keeps[i].view(-1)[flat.argsort(descending=True)[:n]] = True
    want = circuit_values(model, IOI_PROMPT, CORRUPTED, PAIR, keeps, progress=False)
    torch.testing.assert_close(curve.values, want)
    assert curve.n_edges.tolist() == k


def test_signed_ranking_keeps_the_highest_scores(line):
    """``absolute=False`` (MIB's CPR ranking) keeps the top k by signed score: the negative edges come last."""
    model, _ = _model("gpt2", line)
    circuit = edge_atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    exists = circuit.in_graph
    scores = circuit.scores[0].masked_fill(~exists, float("-inf"))
    assert float(scores[exists].min()) < 0 < float(scores[exists].max())  # both signs: the rankings differ
    fractions = (0.1, 0.3)
    k = kept_counts(list(fractions), int(exists.sum()))
    keeps = torch.zeros(2, *exists.shape, dtype=torch.bool)
    for i, n in enumerate(k):
        keeps[i].view(-1)[scores.flatten().argsort(descending=True, stable=True)[:n]] = True
    signed = circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, fractions=fractions, absolute=False, progress=False)
    torch.testing.assert_close(signed.values, circuit_values(model, IOI_PROMPT, CORRUPTED, PAIR, keeps, progress=False))
    by_size = circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, fractions=fractions, progress=False)
    assert signed.absolute is False and by_size.absolute is True and not torch.allclose(signed.values, by_size.values)
    with pytest.raises(InputError, match="ranking"):
        CircuitCurve.concat([signed, by_size])
    with pytest.raises(InputError, match="absolute"):
        circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, absolute="yes", progress=False)


def test_raw_areas_are_mibs():
    """``raw=True``: MIB's ``evaluate_area_under_curve`` (trapezoids, no division; natural log on its log axis)."""
    f = [0.2, 0.3, 0.5, 0.6, 0.7, 0.9, 1.1, 0.95, 1.0, 1.0]
    curve = CircuitCurve("m", "corrupted", torch.tensor(MIB_FRACTIONS, dtype=torch.float64), torch.tensor([f]),
                         torch.ones(1), torch.zeros(1), torch.zeros(10, dtype=torch.long), 1000)
    under = from_1 = under_log = 0.0
    for i in range(9):  # MIB's loop, written out
        x1, x2 = MIB_FRACTIONS[i], MIB_FRACTIONS[i + 1]
        under += (x2 - x1) * (f[i] + f[i + 1]) / 2
        from_1 += (x2 - x1) * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
        under_log += (math.log(x2) - math.log(x1)) * (f[i] + f[i + 1]) / 2
    assert abs(curve.cpr(raw=True) - under) < 1e-6 and abs(curve.cmd(raw=True) - from_1) < 1e-6
    assert abs(curve.cpr("log", raw=True) - under_log) < 1e-6
    assert abs(curve.cpr() - under / 0.999) < 1e-6


def test_areas_by_hand():
    """CPR and CMD: trapezoids over the fraction axis divided by its width; the curve is MIB's ratio of means."""
    fractions = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    full, empty = torch.tensor([2.0, 4.0]), torch.tensor([0.0, 2.0])
    values = torch.tensor([[0.0, 1.0, 2.0], [3.0, 3.0, 4.0]])  # per prompt f: [0, .5, 1] and [.5, .5, 1]
    curve = CircuitCurve("m", "corrupted", fractions, values, full, empty, torch.tensor([1, 5, 10]), 10)
    torch.testing.assert_close(curve.faithfulness, torch.tensor([[0.0, 0.5, 1.0], [0.5, 0.5, 1.0]]))
    f = (torch.tensor([1.5, 2.0, 3.0]) - 1) / 2  # (mean m(C) − mean m(∅)) / (mean m(M) − mean m(∅))
    torch.testing.assert_close(curve.curve(), f)
    area = (0.4 * (f[0] + f[1]) / 2 + 0.5 * (f[1] + f[2]) / 2) / 0.9
    assert abs(curve.cpr() - float(area)) < 1e-6
    gaps = (1 - f).abs()
    assert abs(curve.cmd() - float((0.4 * (gaps[0] + gaps[1]) / 2 + 0.5 * (gaps[1] + gaps[2]) / 2) / 0.9)) < 1e-6
    x = fractions.log10()
    log_area = ((x[1] - x[0]) * (f[0] + f[1]) / 2 + (x[2] - x[1]) * (f[1] + f[2]) / 2) / (x[2] - x[0])
    assert abs(curve.cpr("log") - float(log_area)) < 1e-6
    constant = CircuitCurve("m", "corrupted", torch.tensor(MIB_FRACTIONS, dtype=torch.float64), torch.full((1, 10), 0.25),
                            torch.ones(1), torch.zeros(1), torch.zeros(10, dtype=torch.long), 1000)
    assert abs(constant.cpr() - 0.25) < 1e-9 and abs(constant.cmd() - 0.75) < 1e-9
    with pytest.raises(InputError, match="axis"):
        curve.cpr("loglog")


def test_bad_arguments():
    model, _ = _model("llama", tl.default_line())
    circuit = edge_random(model, IOI_PROMPT, CORRUPTED, PAIR)
    run = functools.partial(circuit_faithfulness, model, IOI_PROMPT, CORRUPTED, PAIR, progress=False)
    with pytest.raises(InputError, match="ablation"):
        run(circuit, ablation="zero")
    for fractions in ((0.5, 0.1), (0.0, 1.0), (1.5,), (), "abc"):
        with pytest.raises(InputError, match="fractions"):
            run(circuit, fractions=fractions)
    with pytest.raises(InputError, match="batch_size"):
        run(circuit, batch_size=0)
    other, _ = _model("llama", tl.default_line(), n_layers=1)
    with pytest.raises(InputError, match="graph"):
        run(edge_random(other, IOI_PROMPT, CORRUPTED, PAIR))
    two = edge_random(model, [IOI_PROMPT, OTHER], [CORRUPTED, OTHER_CORRUPTED], PAIR)
    with pytest.raises(InputError, match="rows"):
        run(edge_random(model, [IOI_PROMPT] * 3, [CORRUPTED] * 3, PAIR))
    with pytest.raises(InputError, match="other prompts"):
        circuit_faithfulness(model, [OTHER, IOI_PROMPT], [OTHER_CORRUPTED, CORRUPTED], PAIR, two, progress=False)
    with pytest.raises(InputError, match="Circuit"):
        run(circuit.scores)
    with pytest.raises(InputError, match="bool tensor"):
        circuit_values(model, IOI_PROMPT, CORRUPTED, PAIR, circuit.scores, progress=False)
    for scores, why in ((circuit.scores * float("nan"), "NaN or infinite"), (circuit.scores * 0, "scores no edge")):
        with pytest.raises(InputError, match=why):
            run(dataclasses.replace(circuit, scores=scores))
    with pytest.raises(InputError, match="scores no edge"):
        run(dataclasses.replace(circuit, in_graph=torch.zeros_like(circuit.in_graph)))
    partial = circuit.prune(top_n=10)  # an edge set with most edges unscored: they rank last, and that is said
    with pytest.warns(UserWarning, match=rf"{int(circuit.in_graph.sum()) - 10} of the model's .* edges are not in the"):
        run(partial, fractions=(0.5, 1.0))
