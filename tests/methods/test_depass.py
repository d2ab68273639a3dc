"""`dpa_lens.depass` against the float64 reference on raw ``transformers`` weights
(tests/oracles/depass_ref.py), against DPA, and on its own: completeness at every layer, padding,
blocks, bad input.

TransformerLens processes the weights (folded norms, centred writing weights on LayerNorm models,
value biases folded into the output bias). None of it changes a DePass score: a centred part
differs from the raw one by a multiple of the all-ones vector, which every LayerNorm (the MLP's,
the attention's, the final one) removes, and a folded bias stays the remainder's. So the scores are
compared with the reference's as they are; the parts are compared with TransformerLens's own
(centred) residual streams.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dpa_lens
import dpa_lens.methods.depass as depass_module
from dpa_lens import CacheError, InputError, Mu, UnsupportedModelError
from dpa_lens.methods.depass import RULES, depass
from dpa_lens.models.testing import FAMILIES
from tests.helpers import IOI_PROMPT, PAIR, make_tiny, rel_err
from tests.oracles.depass_ref import depass_reference, logit_fn

SHORT = "When Tom and Anna went to the park, Tom gave a ball to"
VALUE_PATH = Mu(q=0, k=0, v=1, gate=1, up=0)  # DePass's taylor rule is DPA on this path
TOL = 1e-4


@functools.cache
def _setup(family: str, line: str, seed: int = 3):
    """(TL model, transformers reference, tokens, cache) of the IOI prompt."""
    model, hf = make_tiny(family, line=line, seed=seed)
    tokens = model.to_tokens(IOI_PROMPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    return model, hf, tokens, cache


def _run(family, line, **options):
    model, hf, tokens, cache = _setup(family, line)
    attr = depass(model, cache, PAIR, progress=False, **options)
    correct, wrong = attr.target["token_ids"][0]
    return attr, hf, tokens, logit_fn(int(attr.positions[0]), correct, wrong)


def _scores(attr, level):
    if level == "tokens":
        return attr.tokens, attr.bias
    return (attr.heads if level == "heads" else attr.neurons) if attr.settings["by_position"] else attr.totals(level), attr.diagnostics.remainder


def _compare(family, line, level="tokens", reference=None, **options):
    """DePass's scores and remainder equal the reference's (to TOL of the largest score)."""
    attr, hf, tokens, fn = _run(family, line, level=level, **options)
    ref = depass_reference(hf, tokens.cpu(), fn, level=level, record=False, **(reference or {}), **{
        k: v for k, v in options.items() if k != "unassigned"})
    scores, remainder = _scores(attr, level)
    assert float((attr.target_value.double() - ref.value).abs().max()) < TOL * max(1.0, float(ref.value.abs().max()))
    assert rel_err(scores, ref.scores) < TOL, (family, level, options)
    scale = max(1.0, float(ref.value.abs().max()), float(ref.scores.abs().max()))
    assert float((remainder.double().cpu() - ref.remainder).abs().max()) < TOL * scale, (family, level, options)
    return attr, ref


# ------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_equal_the_reference_for_every_rule(family, line):
    for rule in RULES:
        _compare(family, line, mlp_rule=rule)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", ["heads", "neurons"])
def test_units_equal_the_reference_for_every_rule(family, level, line):
    for rule in RULES:
        _compare(family, line, level, mlp_rule=rule)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "neox"])
def test_options_equal_the_reference(family, line):
    _compare(family, line, temperature=1.0)
    _compare(family, line, ignore_first=False)
    _compare(family, line, start_layer=1)
    _compare(family, line, mlp_rule="relu", unassigned="drop", reference={"lost_to_remainder": False})
    _compare(family, line, mlp_rule="linear", unassigned="drop", reference={"lost_to_remainder": False})
    for level in ("heads", "neurons"):
        _compare(family, line, level, by_position=True)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_chunks_equal_the_reference(family, line):
    """Chunks of 4 (the other positions lumped into the remainder): the scores depend on the chunk
    size for every rule but taylor."""
    whole, _ = _compare(family, line)
    for ignore_first in (True, False):
        chunked, _ = _compare(family, line, chunk_size=4, ignore_first=ignore_first)
    assert rel_err(chunked.tokens, whole.tokens) > 1e-3
    taylor = _run(family, line, mlp_rule="taylor")[0]
    assert rel_err(_run(family, line, mlp_rule="taylor", chunk_size=4)[0].tokens, taylor.tokens) < 1e-5


def test_component_runs_from_start_layer(line):
    attr, hf, tokens, fn = _run("llama", line, level="heads", start_layer=1)
    L = hf.config.num_hidden_layers
    ref = depass_reference(hf, tokens.cpu(), fn, level="heads", layers=list(range(1, L)), record=False)
    assert rel_err(attr.head_totals[:, 1:], ref.scores) < TOL
    assert torch.isnan(attr.head_totals[:, 0]).all() and torch.isnan(attr.diagnostics.remainder[:, 0]).all()


# ------------------------------------------------------------------ completeness


@pytest.mark.parametrize("family", FAMILIES)
def test_parts_add_up_to_the_stream_at_every_layer(family, line):
    """The recorded parts add up to the cached residual stream at every checkpoint, and each run's
    scores plus its remainder to the target value."""
    model, _, _, cache = _setup(family, line)
    for level in ("tokens", "heads", "neurons"):
        for rule in ("softmax", "relu"):
            seen = []

            def record(name, parts, seen=seen):
                real = cache[name].float()
                assert rel_err(parts.sum(0), real) < 1e-5, (level, rule, name)
                seen.append(name)

            attr = depass(model, cache, PAIR, level=level, mlp_rule=rule, progress=False, record=record)
            L = model.cfg.n_layers
            assert {f"blocks.{l}.hook_resid_{at}" for l in range(L) for at in ("pre", "post")} <= set(seen) or level != "tokens"
            assert len(seen) >= L
            value = attr.target_value
            if level == "tokens":
                total = attr.tokens.sum(-1) + attr.bias
                torch.testing.assert_close(total, value, rtol=1e-5, atol=1e-5)
            else:
                total = attr.totals(level).sum(-1) + attr.diagnostics.remainder  # every layer's run
                torch.testing.assert_close(total, value[:, None].expand_as(total), rtol=1e-5, atol=1e-5)


def test_drop_loses_what_relu_leaves_unassigned(line):
    kept = _run("llama", line, mlp_rule="relu")[0]
    dropped = _run("llama", line, mlp_rule="relu", unassigned="drop")[0]
    gap = dropped.target_value - dropped.tokens.sum(-1) - dropped.bias
    assert float(gap.abs().max()) > 1e-3 * float(kept.target_value.abs().max())
    torch.testing.assert_close(kept.tokens.sum(-1) + kept.bias, kept.target_value)


# ------------------------------------------------------------------ against DPA


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_is_dpa_on_the_value_path(family, line):
    """With the taylor rule the decomposed network is linear: DePass's token, per-position head and
    neuron scores are DPA's with Mu(q=0, k=0, v=1, gate=1, up=0), its remainder DPA's bias."""
    model, _, _, cache = _setup(family, line)
    dpa = dpa_lens.dpa(model, cache, PAIR, mu=VALUE_PATH)
    tokens = depass(model, cache, PAIR, mlp_rule="taylor", progress=False)
    assert rel_err(tokens.tokens, dpa.tokens) < 1e-5
    torch.testing.assert_close(tokens.bias, dpa.bias, rtol=1e-5, atol=1e-5)
    for level in ("heads", "neurons"):
        units = depass(model, cache, PAIR, level=level, mlp_rule="taylor", by_position=True, progress=False)
        assert rel_err(getattr(units, level), getattr(dpa, level)) < 1e-5, level
    softmax = depass(model, cache, PAIR, progress=False)
    assert rel_err(softmax.tokens, dpa.tokens) > 1e-2  # the rules differ from the secant


# ------------------------------------------------------------------ batches, blocks, registration


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_padded_batch_equals_each_row_alone(side, line):
    model = _setup("gpt2", line)[0]
    old = model.tokenizer.padding_side
    model.tokenizer.padding_side = side
    try:
        cases = [{}, {"chunk_size": 4}, {"level": "heads"}]
        batch = [dpa_lens.run("depass", model, [IOI_PROMPT, SHORT], PAIR, progress=False, **c) for c in cases]
    finally:
        model.tokenizer.padding_side = old
    for i, prompt in enumerate([IOI_PROMPT, SHORT]):
        for case, both in zip(cases, batch):
            alone = dpa_lens.run("depass", model, prompt, PAIR, progress=False, **case)
            row = both[i]
            m = alone.seq_len
            keep = torch.arange(row.seq_len - m, row.seq_len) if side == "left" else torch.arange(m)
            torch.testing.assert_close(row.target_value, alone.target_value, rtol=1e-4, atol=1e-5)
            if alone.tokens is not None:
                torch.testing.assert_close(row.tokens[:, keep], alone.tokens, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(row.tokens.sum(-1), alone.tokens.sum(-1), rtol=1e-4, atol=1e-5)  # pads score 0
                torch.testing.assert_close(row.bias, alone.bias, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(row.head_totals, alone.head_totals, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(row.diagnostics.remainder, alone.diagnostics.remainder, rtol=1e-4, atol=1e-5)


def test_every_target_form(line):
    """A token, a pair, a direction and per-row targets: each split exactly (tokens + remainder =
    target value). A pair is the difference of its tokens' runs, a token's unembedding column as a
    direction is that token's centred logit, and each row of a per-row target is that row's own run."""
    model, _, tokens, _ = _setup("gpt2", line)
    rows = torch.cat([tokens, tokens])
    with torch.no_grad():
        _, cache = model.run_with_cache(rows)
    mary, john = (model.to_single_token(t) for t in PAIR)
    run = functools.partial(depass, model, cache, progress=False)
    by_token = {t: run(t) for t in (mary, john)}
    pair = run((mary, john))
    direction = model.W_U[:, mary].detach()
    by_direction = run(direction)
    per_row = run([(mary, john), (john, mary)])
    per_row_direction = run(torch.stack([direction, -direction]))
    for attr in (*by_token.values(), pair, by_direction, per_row, per_row_direction):
        torch.testing.assert_close(attr.tokens.sum(-1) + attr.bias, attr.target_value, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(pair.tokens, by_token[mary].tokens - by_token[john].tokens, rtol=1e-4, atol=1e-5)
    centred = run(mary, logit="centered")  # the unembedding's column as the model holds it
    torch.testing.assert_close(by_direction.tokens, centred.tokens, rtol=1e-4, atol=1e-5)
    assert by_direction.target["logit"] == ["direction", "direction"]
    torch.testing.assert_close(per_row.tokens[0], pair.tokens[0])
    torch.testing.assert_close(per_row.tokens[1], -pair.tokens[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(per_row_direction.tokens[1], -by_direction.tokens[1], rtol=1e-4, atol=1e-5)


def test_a_progress_bar_over_the_layers(line, capsys):
    model, _, _, cache = _setup("llama", line)
    depass(model, cache, PAIR, progress=True)
    shown = capsys.readouterr().err
    assert "DePass tokens" in shown and f"/{model.cfg.n_layers} [" in shown  # a bar over the layers
    depass(model, cache, PAIR, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("family", ["gemma2", "neox"])
def test_blocks_do_not_change_the_numbers(family, line, monkeypatch):
    """Tiny blocks (one part in attention, one position in the MLP) give the numbers of one block."""
    model, _, _, cache = _setup(family, line)
    cases = [{}, {"mlp_rule": "max"}, {"level": "heads", "by_position": True}]
    whole = [depass(model, cache, PAIR, progress=False, **c) for c in cases]
    monkeypatch.setattr(depass_module, "BLOCK_ELEMENTS", 1)
    for case, expected in zip(cases, whole):
        got = depass(model, cache, PAIR, progress=False, **case)
        for name in ("tokens", "heads", "bias"):
            if getattr(expected, name) is not None:
                torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-6)


def test_registered_and_cached_with_its_names_filter(line):
    model, _, tokens, full = _setup("qwen2", line)
    spec = dpa_lens.get_method("depass")
    assert spec.input == "cache" and spec.scores == ("tokens",)
    _, cache = model.run_with_cache(tokens, names_filter=dpa_lens.names_filter(model, "depass"))
    assert len(cache.keys()) < len(full.keys())
    for level in ("tokens", "heads"):
        direct = depass(model, full, PAIR, level=level, progress=False)
        filtered = dpa_lens.run("depass", model, IOI_PROMPT, PAIR, cache=cache, level=level, progress=False)
        torch.testing.assert_close(filtered.totals(level), direct.totals(level))
    assert direct.head_totals.shape == (1, model.cfg.n_layers, model.cfg.n_heads) and direct.heads is None
    assert direct.diagnostics.remainder.shape == (1, model.cfg.n_layers)


# ------------------------------------------------------------------ bad input


def test_bad_options_get_a_dpa_lens_error(line):
    model, _, _, cache = _setup("llama", line)
    L = model.cfg.n_layers
    bad = [
        ({"mlp_rule": "gelu"}, "mlp_rule must be one of"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"start_layer": L}, f"start_layer must be an int in 0 .. {L - 1}"),
        ({"start_layer": -1}, "start_layer"),
        ({"level": "layers"}, "level must be one of"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"chunk_size": 4, "level": "heads"}, "does not apply to level='heads'"),
        ({"by_position": True}, "token scores are per position already"),
        ({"unassigned": "keep"}, "unassigned must be"),
    ]
    for options, message in bad:
        with pytest.raises(InputError, match=message):
            depass(model, cache, PAIR, progress=False, **options)


def test_a_cache_without_what_depass_reads_names_the_hooks_and_the_filter(line):
    model, _, tokens, _ = _setup("llama", line)
    _, cache = model.run_with_cache(tokens, names_filter=dpa_lens.names_filter(model, "dla"))
    with pytest.raises(CacheError, match=r"(?s)blocks\.0\.hook_resid_post.*names_filter\(model, 'depass'\)"):
        depass(model, cache, PAIR, progress=False)


def test_unsupported_architecture(line):
    import transformers

    from dpa_lens.models.testing import tiny_tokenizer

    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64)
    cfg.architectures = ["MixtralForCausalLM"]
    model = dpa_lens.load_model(transformers.MixtralForCausalLM(cfg).eval(), tokenizer=tiny_tokenizer(), line=line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    with pytest.raises(UnsupportedModelError, match="DePass in dpa_lens does not support this model") as info:
        depass(model, cache, " Mary", progress=False)
    assert "MixtralForCausalLM" in str(info.value)
