"""Results as Arrow tables (`dpa_lens.results.table`) and the streaming mean (`RunningMean`).

A stored batch reads back as it was (rows of one length) or as ``concat`` of its rows computed alone
(padding trimmed, on either side); Parquet files of it are plain Arrow for pandas; `RunningMean` over
parts equals ``concat(parts).mean()``, warnings and refusals included."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dpa_lens
from dpa_lens import Attribution, Circuit, Diagnostics, Hop, InputError, Path
from dpa_lens.results import RunningMean
from dpa_lens.results.table import KEY, from_arrow, metadata, to_arrow
from tests.helpers import CORRUPTED, IOI_PROMPT, OTHER, OTHER_CORRUPTED, PAIR, make_tiny

EIFFEL, EIFFEL_CORRUPTED = "The Eiffel Tower is in the city of", "The Eiffel Tower is in the city to"  # 12 tokens; IOI: 15
TEMPLATE = [IOI_PROMPT, "When Tom and Anna went to the park, Tom gave a ball to", "When Anna and Bob went to the store, Bob gave a drink to",
            "When Mary and John went to the park, Mary gave a ball to"]  # one template: 15 tokens each
# methods of each kind of result field: flow, head keys and effective targets; diagnostics; whole-unit
# scores; paths and Unpack's diagnostics; edges per position with paths; edges with the corrupted tokens
METHODS = {"dpa": {"flow": True, "head_keys": True, "effective_targets": True}, "atp": {}, "activation_patching": {"unit": "heads"},
           "unpack": {}, "dpa_edges": {"per_position": True, "paths": 3}, "edge_atp": {}}


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", seed=21)[0]


def _run(name, model, prompts, corrupted=None, target=PAIR, side="right", **options):
    """``dpa_lens.run`` with the options of `METHODS` (or ``options``), the corrupted prompts where the method takes them,
    padded on ``side``."""
    old = model.tokenizer.padding_side
    model.tokenizer.padding_side = side
    try:
        pair = dpa_lens.get_method(name).input == "pair"
        return dpa_lens.run(name, model, prompts, target, corrupted=corrupted if pair else None, progress=False,
                             **{**METHODS.get(name, {}), **options})
    finally:
        model.tokenizer.padding_side = old


def assert_same(a, b, exact: bool = True, rtol: float = 1e-4, atol: float = 2e-5) -> None:
    """``a`` and ``b`` hold the same: every tensor (dtype and shape too; floats to tolerance unless ``exact``),
    tokens, targets, settings, paths, diagnostics and a circuit's graph."""
    assert type(a) is type(b) and a.method == b.method and a.model_name == b.model_name and a.settings == b.settings
    assert a.str_tokens == b.str_tokens and a.target == b.target

    def same(x, y, what):
        assert (x is None) == (y is None), what
        if x is None:
            return
        assert x.dtype == y.dtype and x.shape == y.shape, f"{what}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"
        tol = {"rtol": 0, "atol": 0} if exact or not x.dtype.is_floating_point else {"rtol": rtol, "atol": atol}
        torch.testing.assert_close(x.cpu(), y.cpu(), equal_nan=True, msg=what, **tol)

    for name in a.AXES:
        same(getattr(a, name), getattr(b, name), name)
    for name in a.ROW_DICTS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or x.keys() == y.keys()), name
        for key in x or {}:
            same(x[key], y[key], f"{name}[{key}]")
    assert a.diagnostics.as_dict().keys() == b.diagnostics.as_dict().keys()
    for name, x in a.diagnostics.as_dict().items():
        y = getattr(b.diagnostics, name)
        if isinstance(x, torch.Tensor):
            same(x, y, f"diagnostics.{name}")
        else:
            assert x == y, name
    if exact or a.paths is None:
        assert a.paths == b.paths
    else:
        assert [[(p.hops, p.source_token) for p in row] for row in a.paths] == [[(p.hops, p.source_token) for p in row] for row in b.paths]
        for ra, rb in zip(a.paths, b.paths):
            torch.testing.assert_close(torch.tensor([p.score for p in ra]), torch.tensor([p.score for p in rb]), rtol=rtol, atol=atol)
    if isinstance(a, Circuit):
        assert a.writers == b.writers and a.readers == b.readers and torch.equal(a.in_graph.cpu(), b.in_graph.cpu())


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", list(METHODS))
def test_a_batch_of_one_length_reads_back_exactly(name, model):
    result = _run(name, model, [IOI_PROMPT, OTHER], [CORRUPTED, OTHER_CORRUPTED])
    table = to_arrow(result, ["ioi", "other"], {"prompt": [IOI_PROMPT, OTHER], "index": [3, 4]})
    back, ids = from_arrow(table)
    assert ids == ["ioi", "other"] and table.column_names[:3] == ["id", "prompt", "index"]
    assert_same(back, result)
    meta = json.loads(table.schema.metadata[KEY])
    assert meta["class"] == type(result).__name__ and meta["method"] == name and meta["format"] == 1
    if isinstance(result, Circuit):
        assert meta["writers"] == result.writers and meta["readers"] == [list(r) for r in result.readers]
        assert table.schema.field("scores").type == pa.list_(pa.float32())
    else:
        assert table.schema.field("target_value").type == pa.float32() and table.schema.field("positions").type == pa.int64()
        assert table.schema.field("mask").type == pa.list_(pa.bool_()) and table.schema.field("token_ids").type == pa.list_(pa.int64())
    assert json.loads(table.column("target")[1].as_py()) == result[1].target


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", ["dpa", "atp", "unpack"])
def test_a_padded_batch_reads_back_as_its_rows_alone(name, side, model):
    """Padding is cut from every position axis (and the answer position, the paths' positions and the corrupted
    tokens follow): a stored row is the prompt's result alone, and the table reads back as their concat."""
    prompts, corrupted = [IOI_PROMPT, EIFFEL], [CORRUPTED, EIFFEL_CORRUPTED]
    batch = _run(name, model, prompts, corrupted, side=side)
    assert not bool(batch.mask.all())
    table = to_arrow(batch, ["long", "short"])
    alone = [_run(name, model, p, c) for p, c in zip(prompts, corrupted)]
    assert table.column("tokens__shape" if batch.tokens is not None else "token_ids__shape").to_pylist() == [[15], [12]]
    assert table.column("positions").to_pylist() == [14, 11]
    back, _ = from_arrow(table)
    assert_same(back, Attribution.concat(alone), exact=False)
    row, _ = from_arrow(table.slice(1))
    assert_same(row, alone[1], exact=False)


def test_every_position_axis_is_trimmed(model):
    batch = _run("dpa", model, ["a longer prompt here", "short"], target=" the", side="left")
    row, _ = from_arrow(to_arrow(batch, ["a", "b"]).slice(1))
    alone = _run("dpa", model, "short", target=" the")
    assert row.head_keys.shape[-2:] == (5, 5) and row.flow.shape[-1] == 5 and row.effective_targets["blocks.0.hook_resid_pre"].shape[1] == 5
    assert_same(row, alone, exact=False)


def test_a_circuit_keeps_a_methods_padding_and_loses_concats(model):
    """A circuit has no mask: the -1 ids `concat` pads with are cut, a method's own padding (pad-token ids) is not."""
    batch = _run("dpa_edges", model, [IOI_PROMPT, EIFFEL], paths=0)
    assert_same(from_arrow(to_arrow(batch, ["a", "b"]))[0], batch)
    joined = Circuit.concat([_run("dpa_edges", model, p, paths=0) for p in (IOI_PROMPT, EIFFEL)])
    table = to_arrow(joined, ["a", "b"])
    assert table.column("per_position__shape").to_pylist()[1][0] == 12 and -1 not in table.column("token_ids")[1].as_py()
    assert_same(from_arrow(table)[0], joined)
    pair = Circuit.concat([_run("edge_atp", model, p, c) for p, c in ((IOI_PROMPT, CORRUPTED), (EIFFEL, EIFFEL_CORRUPTED))])
    table = to_arrow(pair, ["a", "b"])
    assert len(table.column("diagnostics.corrupted_str_tokens")[1].as_py()) == 12
    assert_same(from_arrow(table)[0], pair)


def test_dtypes_gaps_and_settings_of_a_hand_made_attribution():
    """Float16/bfloat16/float64 come back as they were; a row whose real tokens have a gap is kept whole; settings
    come back as JSON holds them (tuples as lists, other objects as their repr)."""
    mask = torch.tensor([[False, True, True], [True, False, True]])
    attr = Attribution(
        method="hand", tokens=torch.randn(2, 3).to(torch.bfloat16), heads=torch.randn(2, 1, 3, 2, dtype=torch.float64),
        head_totals=torch.randn(2, 1, 2).half(), bias=torch.tensor([0.5, float("nan")]), target_value=torch.randn(2, dtype=torch.float64),
        positions=torch.tensor([2, 2]), token_ids=torch.tensor([[0, 5, 6], [7, 0, 8]]), mask=mask,
        str_tokens=[["<pad>", "a", "b"], ["c", "<pad>", "d"]],
        paths=[[Path((Hop("embed", None, 1), Hop("logit", "logit", 2)), 0.25, "hand", "a", {"pct": 1.5})], []],
        target={"labels": ["x", "y"], "shared": 3}, settings={"pair": (1, 2), "mu": dpa_lens.Mu.paper_default(), "none": None},
        diagnostics=Diagnostics(remainder=torch.randn(2, 1), paths_found=torch.tensor([1, 0]),
                                corrupted_str_tokens=[["p", "q", "r"], ["s", "t", "u"]]),
        model_name="none")
    table = to_arrow(attr, ["0", "1"])
    assert table.column("tokens__shape").to_pylist() == [[2], [3]] and table.column("positions").to_pylist() == [1, 2]
    assert table.column("diagnostics.corrupted_str_tokens").to_pylist() == [["q", "r"], ["s", "t", "u"]]
    assert json.loads(table.column("paths")[0].as_py())[0]["hops"] == [["embed", None, 0], ["logit", "logit", 1]]
    back, _ = from_arrow(table)
    assert back.settings == {"pair": [1, 2], "mu": repr(attr.settings["mu"]), "none": None}
    assert back.tokens.dtype == torch.bfloat16 and back.heads.dtype == torch.float64 and back.head_totals.dtype == torch.float16
    assert torch.equal(back.mask, torch.tensor([[True, True, False], [True, False, True]]))  # row 0 left-aligned, then padded by concat
    assert torch.equal(back.tokens[0, :2], attr.tokens[0, 1:]) and torch.equal(back.tokens[1], attr.tokens[1])
    assert back.paths[0][0].hops[0].position == 0 and back.paths[0][0].extra == {"pct": 1.5}
    assert back.str_tokens == [["a", "b", ""], attr.str_tokens[1]] and back.target == attr.target
    assert_same(from_arrow(table.slice(1))[0], dataclasses.replace(attr[1], settings=back.settings))


def test_parquet_files_are_plain_arrow(model, tmp_path):
    result = _run("dpa", model, [IOI_PROMPT, EIFFEL])
    path = tmp_path / "part-0.parquet"
    pq.write_table(to_arrow(result, ["a", "b"], {"prompt": [IOI_PROMPT, EIFFEL]}), path)
    df = pytest.importorskip("pandas").read_parquet(path)
    assert list(df["id"]) == ["a", "b"] and list(df["prompt"]) == [IOI_PROMPT, EIFFEL]
    assert df["tokens"][1].dtype == "float32" and len(df["tokens"][1]) == 12 and list(df["heads__shape"][0]) == [2, 15, 4]
    assert list(df["str_tokens"][1]) == result.str_tokens[1][:12] and df["target_value"].dtype == "float32"
    assert metadata(pq.read_schema(path))["method"] == "dpa"
    back, ids = from_arrow(pq.read_table(path))
    assert_same(back, from_arrow(to_arrow(result, ids))[0])
    streamed = [from_arrow(b) for b in pq.ParquetFile(path).iter_batches(batch_size=1)]  # batches keep the metadata
    assert [ids for _, ids in streamed] == [["a"], ["b"]]
    assert_same(Attribution.concat([r for r, _ in streamed]), back)


def test_bad_tables_and_arguments_get_dpa_lens_errors(model):
    result = _run("dpa", model, [IOI_PROMPT, OTHER])
    with pytest.raises(InputError, match="one id per row"):
        to_arrow(result, ["a"])
    with pytest.raises(InputError, match="ids must be strings"):
        to_arrow(result, ["a", 2])
    with pytest.raises(InputError, match="name of the result's own"):
        to_arrow(result, ["a", "b"], {"tokens": [1, 2]})
    with pytest.raises(InputError, match="one value per row"):
        to_arrow(result, ["a", "b"], {"prompt": ["x"]})
    with pytest.raises(InputError, match="takes an Attribution or a Circuit"):
        to_arrow("a result", ["a"])
    with pytest.raises(InputError, match="not a dpa_lens result table"):
        from_arrow(pa.table({"id": ["a"]}))
    table = to_arrow(result, ["a", "b"])
    newer = {**json.loads(table.schema.metadata[KEY]), "format": 99}
    with pytest.raises(InputError, match="newer dpa_lens"):
        from_arrow(table.replace_schema_metadata({KEY: json.dumps(newer).encode()}))
    with pytest.raises(InputError, match="no rows"):
        from_arrow(table.slice(0, 0))
    edited = table.set_column(table.column_names.index("tokens__shape"), "tokens__shape", pa.array([[3], [3]], pa.list_(pa.int32())))
    with pytest.raises(InputError, match="does not read back"):
        from_arrow(edited)


# ---------------------------------------------------------------------------------------------- RunningMean
def _streamed_and_whole(parts, **options):
    """(RunningMean over ``parts``, its warnings) and (``concat(parts).mean()``, its warnings)."""
    out = []
    for compute in (lambda: _add_all(RunningMean(**options), parts).result(), lambda: type(parts[0]).concat(parts).mean(**options)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = compute()
        out.append((result, [str(w.message) for w in caught]))
    return out


def _add_all(acc, parts):
    for part in parts:
        acc.add(part)
    return acc


def test_running_mean_of_one_template_keeps_every_position(model):
    result = _run("dpa", model, TEMPLATE, target=[(" Mary", " John"), (" Anna", " Tom"), (" Anna", " Bob"), (" John", " Mary")])
    parts = [result[:1], result[1:3], result[3:]]
    (streamed, said), (whole, expected) = _streamed_and_whole(parts)
    assert said == expected == []
    assert_same(streamed, whole, rtol=1e-6, atol=1e-7, exact=False)
    torch.testing.assert_close(streamed.heads[0], result.heads.mean(0))
    torch.testing.assert_close(streamed.effective_targets["blocks.1.hook_resid_mid"][0], result.effective_targets["blocks.1.hook_resid_mid"].mean(0))
    assert streamed.token_ids is None and streamed.str_tokens[0][1] == "When" and "|" in streamed.str_tokens[0][2]
    assert streamed.target == {"labels": ["mean of 4 rows"]} and streamed.settings["mean_of_rows"] == 4


@pytest.mark.parametrize("per_position", [None, False])
def test_running_mean_of_other_lengths_keeps_unit_totals_and_says_so(model, per_position):
    """Rows trimmed from a padded batch, a padded row and rows alone: what aligns is what `concat` (padding on
    the right) lines up, the padded short row with the short prompt alone here, but not the longer rows."""
    padded = _run("dpa", model, [IOI_PROMPT, EIFFEL], side="right")
    trimmed, _ = from_arrow(to_arrow(padded, ["a", "b"]))
    parts = [trimmed[1], padded[1:], _run("dpa", model, [OTHER, TEMPLATE[1]]), trimmed[0]]
    (streamed, said), (whole, expected) = _streamed_and_whole(parts, per_position=per_position)
    assert said == expected and len(said) == (per_position is None)
    assert_same(streamed, whole, rtol=1e-6, atol=1e-7, exact=False)
    assert streamed.heads is None and streamed.head_totals.shape == (1, 2, 4)
    aligned = [trimmed[1], padded[1:]]  # the short prompt alone and padded on the right: its real tokens at one place
    (streamed, said), (whole, expected) = _streamed_and_whole(aligned)
    assert said == expected == [] and streamed.heads is not None
    assert_same(streamed, whole, rtol=1e-6, atol=1e-7, exact=False)
    assert streamed.token_ids is None and streamed.str_tokens[0][-1] == "|<|endoftext|>"  # "" (concat's padding) | the pad token
    left = _run("dpa", model, [IOI_PROMPT, EIFFEL], side="left")[1:]
    (streamed, said), (whole, expected) = _streamed_and_whole([trimmed[1], left])
    assert said == expected and streamed.heads is None  # left padding: other positions once concat pads on the right


def test_running_mean_refuses_what_concat_refuses(model):
    dpa = _run("dpa", model, IOI_PROMPT)
    with pytest.raises(InputError, match="one method"):
        RunningMean().add(dpa).add(_run("atp", model, IOI_PROMPT, CORRUPTED))
    with pytest.raises(InputError, match="same settings"):
        RunningMean().add(dpa).add(dpa_lens.run("dpa", model, IOI_PROMPT, PAIR, mu=dpa_lens.Mu.content_only()))
    with pytest.raises(InputError, match="takes Attribution"):
        RunningMean().add(dpa).add(_run("edge_atp", model, IOI_PROMPT, CORRUPTED))
    with pytest.raises(InputError, match="takes an Attribution or a Circuit"):
        RunningMean().add("not a result")
    with pytest.raises(InputError, match="per_position is an option"):
        RunningMean(per_position=False).add(_run("edge_atp", model, IOI_PROMPT, CORRUPTED))
    with pytest.raises(InputError, match="no rows"):
        RunningMean().result()
    with pytest.raises(InputError, match="per_position must be"):
        RunningMean(per_position="yes")
    with pytest.raises(InputError, match=r"per_position=True"):  # at the part that breaks alignment, not at the end
        RunningMean(per_position=True).add(dpa).add(_run("dpa", model, EIFFEL))
    tokens_only = dpa_lens.run("dpa", model, IOI_PROMPT, PAIR, kinds=("tokens",))
    with pytest.raises(InputError, match="other lengths"):
        RunningMean().add(tokens_only).add(dpa_lens.run("dpa", model, EIFFEL, PAIR, kinds=("tokens",))).result()


def test_running_mean_drops_extras_some_parts_lack_as_concat_does(model):
    plain = dpa_lens.run("dpa", model, TEMPLATE[:2], PAIR)
    (streamed, said), (whole, expected) = _streamed_and_whole([_run("dpa", model, TEMPLATE[2]), plain])
    assert said == expected and any("flow is in 1 of the 2 parts only" in s for s in said)
    assert_same(streamed, whole, rtol=1e-6, atol=1e-7, exact=False)
    assert streamed.flow is None and streamed.heads is not None


def test_running_mean_of_circuits(model):
    same_prompt = _run("dpa_edges", model, [IOI_PROMPT, IOI_PROMPT], target=[PAIR, (" John", " Mary")], paths=0)
    (streamed, said), (whole, expected) = _streamed_and_whole([same_prompt[:1], same_prompt[1:]])
    assert said == expected == [] and streamed.per_position is not None and streamed.token_ids is not None
    assert_same(streamed, whole, rtol=1e-6, atol=1e-7, exact=False)
    torch.testing.assert_close(streamed.scores[0], same_prompt.scores.mean(0))
    others = [same_prompt[:1], _run("dpa_edges", model, [OTHER, EIFFEL], paths=0)]
    (streamed, said), (whole, expected) = _streamed_and_whole(others)
    assert said == expected and "dropped per_position" in said[0] and streamed.per_position is None
    assert_same(streamed, whole, rtol=1e-6, atol=1e-7, exact=False)
    acc = _add_all(RunningMean(), others)
    assert acc.count == 3 and acc.parts == 2
