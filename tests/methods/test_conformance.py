"""Every registered method through the same checks (the method contract of `dpa_lens.run`).

For each method of `dpa_lens.available_methods()`, node or edge: it returns and scores what its
`MethodSpec` says, with the documented shapes; `run` gives what calling the function gives; a padded
batch gives each row's numbers alone; ``result[i]`` and ``concat`` undo each other; save/load keeps
everything; and bad input gets a dpa_lens error. Edge methods also: the edges stay inside the model's
graph, and where a method gives node scores each writer's outgoing edges add up to them. A newly
registered method is checked without touching this file.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch

import dpa_lens
from dpa_lens import Attribution, Circuit, InputError
from dpa_lens.graph import Graph
from dpa_lens.models.view import ModelView
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny

SHORT = "When Tom and Anna went to the park, Tom gave a ball to"
SHORT_CORRUPTED = "When Tom and Anna went to the park, Anna gave a ball to"
# options that keep the slow methods quick on a tiny model
FAST = {"integrated_gradients": {"steps": 16, "warn_gap": float("inf")}, "eap_ig": {"steps": 2}, "eap_ig_activations": {"steps": 2}}
METHODS = dpa_lens.available_methods()


@pytest.fixture(scope="module", params=["bridge"] + (["hooked"] if dpa_lens.models.tl.hooked_transformer_class() else []))
def tiny(request):
    model, _ = make_tiny("llama", line=request.param, seed=21)
    return model


NODES = dpa_lens.available_methods(returns="units")
EDGES = dpa_lens.available_methods(returns="edges")
# what each score field of a result is compared on ("pos" axes cut to a row's own length)
SCORES = {Attribution: ("tokens", "heads", "neurons", "head_totals", "neuron_totals", "bias", "target_value"),
          Circuit: ("scores", "nodes", "bias", "target_value")}


def _run(name, model, prompt, corrupted, **extra):
    """``run`` with the corrupted prompt where the method needs one (and only there)."""
    spec = dpa_lens.get_method(name)
    corrupted = corrupted if spec.input == "pair" else None
    return dpa_lens.run(name, model, prompt, PAIR, corrupted=corrupted, progress=False, **{**FAST.get(name, {}), **extra})


def _same(a, b, rows_b: slice | None = None, n: int | None = None) -> None:
    """Scores of ``a`` equal those of ``b`` (of its rows ``rows_b``, first ``n`` positions)."""
    assert type(a) is type(b)
    for name in SCORES[type(a)]:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        if rows_b is not None:
            y = y[rows_b]
        if n is not None and name in ("tokens", "heads", "neurons"):
            y = y[:, :n] if name == "tokens" else y[:, :, :n]
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=2e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("name", METHODS)
def test_returns_what_the_spec_says(name, tiny):
    spec = dpa_lens.get_method(name)
    result = _run(name, tiny, IOI_PROMPT, CORRUPTED)
    assert isinstance(result, {"units": Attribution, "edges": Circuit}[spec.returns])
    assert result.method == name and result.batch == 1
    n = tiny.to_tokens(IOI_PROMPT).shape[1]
    assert result.positions.tolist() == [n - 1]
    assert result.str_tokens is not None and len(result.str_tokens[0]) == n
    if spec.target:
        assert result.target["token_ids"] == [list(PAIR_IDS(tiny))]


@pytest.mark.parametrize("name", EDGES)
def test_edges_stay_in_the_graph_and_add_up_to_the_nodes(name, tiny):
    circuit = _run(name, tiny, IOI_PROMPT, CORRUPTED)
    graph = Graph.of(ModelView(tiny))
    assert circuit.writers == graph.writers and circuit.readers == graph.readers
    assert tuple(circuit.scores.shape) == (1, len(graph.writers), len(graph.readers))
    assert not bool((circuit.in_graph & ~graph.mask).any()), "an edge outside the model's graph"
    assert float(circuit.scores[0][~circuit.in_graph].abs().max()) == 0.0
    assert torch.isfinite(circuit.scores).all()
    if circuit.target_value is not None:
        assert torch.isfinite(circuit.target_value).all()
    if circuit.nodes is not None:  # a writer's outgoing edges add up to its node score
        torch.testing.assert_close(circuit.outgoing(0), circuit.nodes[0], rtol=1e-4, atol=1e-5)


def test_an_edge_method_with_a_contrast_takes_the_corrupted_prompt(tiny):
    """``run(name, corrupted=...)`` gives a cache method with a ``contrast`` option the corrupted prompt's cache."""
    for name in EDGES + NODES:
        spec = dpa_lens.get_method(name)
        if spec.contrast is None:
            continue
        via_run = dpa_lens.run(name, tiny, IOI_PROMPT, PAIR, corrupted=CORRUPTED)
        _, clean = tiny.run_with_cache(IOI_PROMPT)
        _, corrupted = tiny.run_with_cache(CORRUPTED)
        _same(via_run, spec.fn(tiny, clean, PAIR, **{spec.contrast: corrupted}))
        assert via_run.method != name  # the contrastive form says so


@pytest.mark.parametrize("name", NODES)
def test_scores_what_the_spec_says_with_the_documented_shapes(name, tiny):
    spec = dpa_lens.get_method(name)
    attr = _run(name, tiny, IOI_PROMPT, CORRUPTED)
    n, L, H, M = tiny.to_tokens(IOI_PROMPT).shape[1], tiny.cfg.n_layers, tiny.cfg.n_heads, tiny.cfg.d_mlp
    assert attr.method == name and attr.batch == 1
    shapes = {"tokens": (1, n), "heads": (1, L, n, H), "neurons": (1, L, n, M)}
    whole = {"heads": (1, L, H), "neurons": (1, L, M)}
    for kind in spec.scores:
        assert attr.has(kind), f"{name} says it scores {kind}"
        if getattr(attr, kind) is not None:
            assert tuple(getattr(attr, kind).shape) == shapes[kind]
        assert tuple(attr.totals(kind).shape) == (shapes[kind] if kind == "tokens" else whole[kind])
    assert attr.positions.tolist() == [n - 1]
    assert attr.str_tokens is not None and len(attr.str_tokens[0]) == n
    if spec.target:
        assert attr.target["token_ids"] == [list(PAIR_IDS(tiny))]
        assert attr.target_value is not None and torch.isfinite(attr.target_value).all()


def PAIR_IDS(model) -> tuple[int, int]:
    return tuple(model.to_single_token(t) for t in PAIR)


@pytest.mark.parametrize("name", METHODS)
def test_run_equals_calling_the_function(name, tiny):
    spec = dpa_lens.get_method(name)
    options = {**FAST.get(name, {}), **spec.fixed}
    if "progress" in inspect.signature(spec.fn).parameters:
        options["progress"] = False
    if spec.input == "cache":
        _, cache = tiny.run_with_cache(IOI_PROMPT)
        direct = spec.fn(tiny, cache, PAIR, **options)
        via_run = dpa_lens.run(name, tiny, IOI_PROMPT, PAIR, cache=cache, progress=False, **FAST.get(name, {}))
    elif spec.input == "tokens":
        direct = spec.fn(tiny, IOI_PROMPT, PAIR, **options)
        via_run = _run(name, tiny, IOI_PROMPT, None)
    else:
        direct = spec.fn(tiny, IOI_PROMPT, CORRUPTED, PAIR, **options)
        via_run = _run(name, tiny, IOI_PROMPT, CORRUPTED)
    _same(via_run, direct)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("random", "edge_random")])  # random draws per batch, not per row
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_gives_each_rows_numbers(name, side, tiny):
    prompts, corrupted = [IOI_PROMPT, SHORT], [CORRUPTED, SHORT_CORRUPTED]
    old = tiny.tokenizer.padding_side
    tiny.tokenizer.padding_side = side
    try:
        batch = _run(name, tiny, prompts, corrupted)
    finally:
        tiny.tokenizer.padding_side = old
    n = batch.seq_len
    for i, (p, c) in enumerate(zip(prompts, corrupted)):
        alone = _run(name, tiny, p, c)
        m = alone.seq_len
        row = batch[i]
        if isinstance(row, Circuit):  # edge scores are sums over positions: padding adds nothing
            _same(alone, row)
            continue
        assert int(row.mask.sum()) == m
        if side == "left":  # move the real tokens to the front, as the row alone has them
            keep = torch.arange(n - m, n)
            row = Attribution(method=row.method, **{k: _take(getattr(row, k), k, keep) for k in
                              ("tokens", "heads", "neurons", "head_totals", "neuron_totals", "bias", "target_value")})
        _same(alone, row, n=m)


def _take(t, name, keep):
    if t is None or name not in ("tokens", "heads", "neurons"):
        return t
    return t[:, keep.to(t.device)] if name == "tokens" else t[:, :, keep.to(t.device)]


@pytest.mark.parametrize("name", METHODS)
def test_rows_concat_and_save_load_round_trip(name, tiny, tmp_path):
    attr = _run(name, tiny, [IOI_PROMPT, SHORT], [CORRUPTED, SHORT_CORRUPTED])
    kind = type(attr)
    again = kind.concat([attr[0], attr[1]])
    _same(again, attr)
    assert again.str_tokens == attr.str_tokens and again.target == attr.target
    assert attr[-1].str_tokens == attr.str_tokens[1:]
    for field in ("clean_value", "corrupted_value", "completeness_gap"):
        value = getattr(attr.diagnostics, field)
        if value is not None:
            torch.testing.assert_close(getattr(attr[1].diagnostics, field), value[1:])
    path = attr.save(tmp_path / "a.pt")
    back = kind.load(path)
    _same(back, attr)
    assert back.target == attr.target and back.settings == attr.settings and back.str_tokens == attr.str_tokens
    assert back.diagnostics.as_dict().keys() == attr.diagnostics.as_dict().keys()
    if kind is Circuit:
        assert back.writers == attr.writers and back.readers == attr.readers and torch.equal(back.in_graph, attr.in_graph)
        mean = attr.mean()  # the circuit of both prompts: edges averaged
        assert mean.batch == 1
        torch.testing.assert_close(mean.scores[0], attr.scores.float().mean(0))
        return
    mean = attr.mean()  # two IOI prompts of one template: slot by slot, every score is averaged
    assert mean.batch == 1
    for field in ("tokens", "heads", "neurons", "head_totals", "neuron_totals"):
        if getattr(attr, field) is not None:
            torch.testing.assert_close(getattr(mean, field)[0], getattr(attr, field).float().mean(0), equal_nan=True)
    longer = kind.concat([attr[0], _run(name, tiny, "The Eiffel Tower is in the city of", "The Eiffel Tower is in the city to")])
    if not any(k != "tokens" for k in dpa_lens.get_method(name).scores):  # other lengths: token scores cannot be averaged
        with pytest.raises(InputError, match="other lengths"):
            longer.mean()
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        whole = longer.mean()
    per_position = [f for f in ("tokens", "heads", "neurons") if getattr(longer, f) is not None]
    assert any("dropped the per-position" in str(w.message) for w in caught) == bool(per_position)
    for kind_ in ("heads", "neurons"):  # only whole-unit totals survive the mean of prompts of other lengths
        if longer.has(kind_):
            torch.testing.assert_close(whole.totals(kind_)[0], longer.totals(kind_).float().mean(0), equal_nan=True)


@pytest.mark.parametrize("name", METHODS)
def test_bad_input_gets_a_dpa_lens_error(name, tiny):
    spec = dpa_lens.get_method(name)
    with pytest.raises(InputError, match="no option"):
        _run(name, tiny, IOI_PROMPT, CORRUPTED, not_an_option=1)
    with pytest.raises(InputError, match="row 3 is out of range"):
        _run(name, tiny, IOI_PROMPT, CORRUPTED)[3]
    corrupted = CORRUPTED if spec.input == "pair" else None
    if spec.input == "pair":
        with pytest.raises(InputError, match="corrupted"):
            dpa_lens.run(name, tiny, IOI_PROMPT, PAIR)
    if not spec.takes_corrupted:  # never silently ignored
        with pytest.raises(InputError, match="takes no corrupted prompt"):
            dpa_lens.run(name, tiny, IOI_PROMPT, PAIR, corrupted=CORRUPTED)
    if not spec.uses_cache:  # a method that runs the model itself on the prompt: a cache would be ignored
        _, cache = tiny.run_with_cache(IOI_PROMPT)
        with pytest.raises(InputError, match="takes no cache"):
            dpa_lens.run(name, tiny, IOI_PROMPT, PAIR, corrupted=corrupted, cache=cache)
    if spec.target:
        with pytest.raises(dpa_lens.TargetError):
            dpa_lens.run(name, tiny, IOI_PROMPT, "not one token at all", corrupted=corrupted, **FAST.get(name, {}))
        with pytest.raises(InputError, match="explains a target"):
            dpa_lens.run(name, tiny, IOI_PROMPT, None, corrupted=corrupted)
    for fixed, value in spec.fixed.items():
        with pytest.raises(InputError, match="cannot be changed"):
            _run(name, tiny, IOI_PROMPT, CORRUPTED, **{fixed: not value})


def test_every_method_says_what_it_is():
    table = dpa_lens.method_table()
    assert [row["method"] for row in table] == METHODS
    for row in table:
        assert row["summary"] and row["input"] in ("cache", "tokens", "pair") and row["returns"] in ("units", "edges")
    assert set(EDGES) >= {"dpa_edges", "edge_atp", "edge_patching", "edge_random"}
    assert dpa_lens.get_method("atp*").fixed == {"qk_fix": True}
    with pytest.raises(InputError, match="no attribution method 'lime'"):
        dpa_lens.run("lime", None, IOI_PROMPT, PAIR)
