"""What people really pass, wrong or unusual, and what they get back: a dpa_lens error that names the
problem and the fix, or a warning, never a silent wrong number or a traceback from torch, TransformerLens
or Python internals. Grouped by the public function that receives the input."""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np
import pytest
import torch

import dpa_lens
from dpa_lens import Attribution, CacheError, DpaLensError, InputError, TargetError, cli, plot
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny


@pytest.fixture(scope="module")
def tiny():
    model, hf = make_tiny("llama", seed=41)
    _, cache = model.run_with_cache(IOI_PROMPT)
    return model, hf, cache


# ------------------------------------------------------------------------------ the cache (dpa, dla)


def test_every_error_is_a_dpa_lens_error():
    for cls in (CacheError, TargetError, InputError, dpa_lens.PairError, dpa_lens.UnsupportedModelError,
                dpa_lens.ModelNotAvailableError, dpa_lens.TrainModeError):
        assert issubclass(cls, DpaLensError)
    assert issubclass(CacheError, ValueError) and issubclass(dpa_lens.UnsupportedModelError, NotImplementedError)


def test_a_cache_of_the_same_architecture_with_other_weights_is_refused(tiny, line):
    model, hf, _ = tiny
    other_hf = copy.deepcopy(hf)
    with torch.no_grad():
        for p in other_hf.model.layers[1].parameters():
            p.mul_(1.1)  # only the last layer differs
    other = dpa_lens.load_model(other_hf, tokenizer=model.tokenizer, line=line)
    mine = dpa_lens.load_model(copy.deepcopy(hf), tokenizer=model.tokenizer, line=line)
    _, cache = other.run_with_cache(IOI_PROMPT)
    with pytest.raises(CacheError, match="weights at layer 1"):
        dpa_lens.dpa(mine, cache, " Mary")
    _, dla_cache = other.run_with_cache(IOI_PROMPT, names_filter=dpa_lens.names_filter(other, "dla"))
    with pytest.raises(CacheError, match="weights at layer 1"):
        dpa_lens.dla(mine, dla_cache, " Mary")


def test_a_cache_made_before_the_weights_were_edited_is_refused(tiny, line):
    """Edit one MLP after caching (as a model-editing notebook does): the next call reads the edited
    weights (no weights kept from an earlier call) and refuses the stale cache."""
    _, hf, _ = tiny
    model = dpa_lens.load_model(copy.deepcopy(hf), tokenizer=tiny[0].tokenizer, line=line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    dpa_lens.dpa(model, cache, " Mary")  # a first call on the unedited model
    with torch.no_grad():
        for p in model.blocks[1].mlp.parameters():
            p.data = p.data * 1.1  # new storage: weights kept from the first call would be the old ones
    with pytest.raises(CacheError, match="weights at layer 1"):
        dpa_lens.dpa(model, cache, " Mary")


EDITED = {"llama": ("W_Q", "W_K", "W_gate", "W_in"), "gpt2": ("W_Q", "W_in"), "neox": ("W_K",), "gemma3": ("W_Q", "W_K", "W_gate"),
          "qwen2": ("W_Q", "W_K", "W_in")}
PARAMETERS = {"W_Q": ("q_proj", "attn.q.", "attn.W_Q"), "W_K": ("k_proj", "attention.k.", "attn._W_K", "attn.W_K"),
              "W_gate": ("gate_proj", "mlp.W_gate"), "W_in": ("up_proj", "c_fc", "mlp.W_in")}  # bridge, then HookedTransformer
# how each check names what it found: DPA's sweep probes the weights it reads (WeightProbe), the others recompute
PROBED = {"W_Q": "W_Q, W_K and W_V applied", "W_K": "W_Q, W_K and W_V applied", "W_gate": "W_in and W_gate applied", "W_in": "W_in"}
RECOMPUTED = {"W_Q": "queries differ from W_Q", "W_K": "keys differ from W_K", "W_gate": "MLP's inputs differ", "W_in": "MLP's inputs differ"}


@pytest.mark.parametrize("family", sorted(EDITED))
def test_a_cache_made_before_the_weights_the_sweep_reads_were_edited_is_refused(family, line, monkeypatch):
    """Queries, keys (rotated by the full or a partial rotary, or not; query-key norms) and the MLP's inputs (gate
    and up, or the one input) are checked against the weights too, not only values and writes: by node DPA through
    its sweep's products (`WeightProbe`), by DPA edges through theirs, by DPA paths by recomputing them; none needs
    DPA_LENS_CHECK."""
    monkeypatch.delenv("DPA_LENS_CHECK", raising=False)
    model, _ = make_tiny(family, line=line, seed=5)
    _, cache = model.run_with_cache(IOI_PROMPT)
    clean = dpa_lens.dpa(model, cache, " Mary")
    for weight in EDITED[family]:
        p = next(p for n, p in model.blocks[1].named_parameters() if any(key in n for key in PARAMETERS[weight]))
        old = p.data
        p.data = old * 1.1  # edited after caching
        with pytest.raises(CacheError, match=f"weights at layer 1 \\({PROBED[weight]}"):
            dpa_lens.dpa(model, cache, " Mary")
        with pytest.raises(CacheError, match=f"weights at layer 1 \\({PROBED[weight]}"):
            dpa_lens.dpa_edges(model, cache, " Mary")
        with pytest.raises(CacheError, match=f"weights at layer 1 \\(.*{RECOMPUTED[weight]}"):
            dpa_lens.dpa_paths(model, cache, " Mary", k=1)
        p.data = old
    assert torch.equal(dpa_lens.dpa(model, cache, " Mary").heads, clean.heads)


@pytest.mark.parametrize("weight", ["W_Q", "W_in"])
def test_contrastive_edges_refuse_a_corrupted_cache_made_before_a_weight_edit(weight, line, monkeypatch):
    """No sweep reads the corrupted cache of contrastive DPA edges, so the probe cannot see it: its queries, keys and
    MLP inputs are recomputed (the clean cache, made after the edit, is the model's own)."""
    monkeypatch.delenv("DPA_LENS_CHECK", raising=False)
    model, _ = make_tiny("llama", line=line, seed=5)
    _, corrupted = model.run_with_cache(CORRUPTED)
    p = next(p for n, p in model.blocks[1].named_parameters() if any(key in n for key in PARAMETERS[weight]))
    p.data = p.data * 1.1
    _, clean = model.run_with_cache(IOI_PROMPT)
    with pytest.raises(CacheError, match=f"^corrupted_cache: .*weights at layer 1 \\(.*{RECOMPUTED[weight]}"):
        dpa_lens.dpa_edges(model, clean, PAIR, corrupted_cache=corrupted)


def test_the_weight_probe_sees_a_small_edit_and_no_float_error(line):
    """The probe's tolerance: a 1 % change of one query head's weights is refused; caches of the model itself,
    at several lengths and batch rows with padding, are not (the float error of both sides stays under it)."""
    model, _ = make_tiny("llama", line=line, seed=6)
    prompts = [IOI_PROMPT, "Then, Alice and Bob had a long day at the office. Bob gave a book to", "A short one"]
    for batch in ([prompts[0]], prompts):
        tokens, mask = dpa_lens.inputs.prepare_tokens(model, batch)
        _, cache = model.run_with_cache(tokens, attention_mask=mask)
        dpa_lens.dpa(model, cache, " Mary", attention_mask=mask)
    _, cache = model.run_with_cache(IOI_PROMPT)
    p = next(p for n, p in model.blocks[0].named_parameters() if any(key in n for key in PARAMETERS["W_Q"]))
    old = p.data
    edited = old.clone()
    rows = slice(0, edited.shape[0] // model.cfg.n_heads) if line == "bridge" else 0  # one head's queries
    edited[rows] *= 1.01
    p.data = edited
    with pytest.raises(CacheError, match="weights at layer 0"):
        dpa_lens.dpa(model, cache, " Mary")
    p.data = old


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_the_weight_probe_checks_every_layer_of_node_and_edge_sweeps(family, line, monkeypatch):
    """Every layer's attention and MLP products reach the probe, in node DPA's sweep and in the sweep by reader of
    DPA edges (its per-head products go through the probe by a row of their own): none is left unchecked."""
    from dpa_lens.validation import WeightProbe

    model, _ = make_tiny(family, line=line, seed=5)
    _, cache = model.run_with_cache(IOI_PROMPT)
    seen = []
    verify = WeightProbe.verify
    monkeypatch.setattr(WeightProbe, "verify", lambda self, *a, **k: (seen.append(set(self._products)), verify(self, *a, **k))[1])
    dpa_lens.dpa(model, cache, " Mary")
    dpa_lens.dpa_edges(model, cache, " Mary")
    every = {(layer, block) for layer in range(model.cfg.n_layers) for block in ("attn", "mlp")}
    assert seen == [every, every]


@pytest.mark.parametrize("name", ["ln_final.hook_scale", "ln_final.hook_normalized", "blocks.1.ln1.hook_scale"])
def test_a_norms_cached_activations_edited_after_caching_are_refused(tiny, name):
    """The final norm's scale and output (at the answer position only) and a layer's input scale: an edit
    of the activations, the weights unchanged, named as such."""
    model, _, cache = tiny
    bad = {k: v.clone() for k, v in cache.items()}
    bad[name][:, -1] *= 1.1
    with pytest.raises(CacheError, match=rf"{name}.*edited after caching"):
        dpa_lens.dpa(model, bad, " Mary")
    with pytest.raises(CacheError, match="edited after caching"):
        dpa_lens.dla(model, bad, " Mary")


def test_cached_activations_edited_after_caching_name_that_cause(tiny):
    model, _, cache = tiny
    bad = {k: v.clone() for k, v in cache.items()}
    bad["blocks.1.attn.hook_v"] *= 1.1
    with pytest.raises(CacheError, match="weights at layer 1.*edited after caching"):
        dpa_lens.dpa(model, bad, " Mary")


def test_a_model_in_train_mode_with_dropout_is_refused_up_front(line):
    """Dropout makes the forward random: refused before the cache is read, with the fix (not as "a cache of
    another model"); a model without dropout (HookedTransformer has none) gives eval mode's scores."""
    model, _ = make_tiny("gpt2", line=line, seed=3)
    _, cache = model.run_with_cache(IOI_PROMPT)
    expected = dpa_lens.dpa(model, cache, " Mary")
    model.train()
    try:
        drops = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
        for call in (lambda: dpa_lens.run("dpa", model, IOI_PROMPT, " Mary"), lambda: dpa_lens.dpa(model, cache, " Mary"),
                     lambda: dpa_lens.cache_for(model, model.to_tokens(IOI_PROMPT))):
            if drops:
                with pytest.raises(dpa_lens.TrainModeError, match=r"call model\.eval\(\)"):
                    call()
        if not drops:
            assert torch.allclose(dpa_lens.run("dpa", model, IOI_PROMPT, " Mary").heads, expected.heads, atol=1e-5)
    finally:
        model.eval()
    assert drops == (line == "bridge")


def test_a_view_keeps_the_weights_only_where_they_are_the_models_own(tiny, line):
    """Float32 weights are read once per view; half-precision ones are converted at each use (a view
    holding float32 copies of every layer would double a bfloat16 model's memory)."""
    from dpa_lens.models.view import ModelView

    _, hf, _ = tiny
    for dtype, kept in ((torch.float32, True), (torch.bfloat16, False)):
        model = dpa_lens.load_model(copy.deepcopy(hf), tokenizer=tiny[0].tokenizer, line=line, dtype=dtype)
        view = ModelView(model)
        assert (view.attn(0) is view.attn(0)) is kept and (view.mlp(1) is view.mlp(1)) is kept, dtype
        assert view.attn(0).W_Q.dtype == torch.float32


def test_non_finite_values_in_the_cache_are_refused(tiny):
    model, _, cache = tiny
    bad = {k: v.clone() for k, v in cache.items()}
    bad["blocks.1.attn.hook_z"][0, 3, 0, 0] = float("nan")
    with pytest.raises(CacheError, match=r"blocks\.1\.attn\.hook_z.*NaN"):
        dpa_lens.dpa(model, bad, " Mary")
    bad["blocks.0.hook_resid_pre"][0, 2, 1] = -float("inf")  # two bad hooks: the first one read is named
    with pytest.raises(CacheError, match=r"blocks\.0\.hook_resid_pre.*NaN or infinite"):
        dpa_lens.dpa(model, bad, " Mary")


def test_an_attention_mask_that_contradicts_the_cache_is_refused(tiny):
    model, _, cache = tiny
    n = cache["hook_embed"].shape[1]
    mask = torch.ones(1, n, dtype=torch.long)
    mask[0, :3] = 0  # real tokens marked as padding
    with pytest.raises(CacheError, match="did not mask them"):
        dpa_lens.dpa(model, cache, " Mary", attention_mask=mask)


def test_padding_the_forward_did_not_mask_is_refused_with_the_fix(line):
    model, _ = make_tiny("llama", seed=41, line=line)
    tokens, mask = dpa_lens.inputs.prepare_tokens(model, [IOI_PROMPT, "The Eiffel Tower is in"], padding_side="left")
    _, unmasked = model.run_with_cache(tokens)  # no attention_mask: the pads are attended on some lines
    _, masked = model.run_with_cache(tokens, attention_mask=mask)
    dpa_lens.dpa(model, masked, " Paris", attention_mask=mask)  # the right way works
    assert bool((unmasked["blocks.0.attn.hook_pattern"][1, :, :, : int((mask[1] == 0).sum())] > 0).any())  # pads attended
    with pytest.raises(CacheError, match="attention_mask=mask"):
        dpa_lens.dpa(model, unmasked, " Paris")
    # explaining the run as it happened, padding included, is allowed
    dpa_lens.dpa(model, unmasked, " Paris", attention_mask=torch.ones_like(tokens))


@pytest.mark.parametrize("what", ["pair", "tensor", "none", "string"])
def test_something_else_as_the_cache_says_what_was_passed(tiny, what):
    model, _, cache = tiny
    logits = model(IOI_PROMPT)
    given = {"pair": (logits, cache), "tensor": logits, "none": None, "string": "cache"}[what]
    expected = {"pair": r"pair \(logits, cache\)", "tensor": "a tensor of shape", "none": "got NoneType", "string": "got str"}[what]
    for method in (dpa_lens.dpa, dpa_lens.dla, dpa_lens.attention_last):
        with pytest.raises(CacheError, match=expected):
            method(model, given, " Mary")


def test_a_cache_of_another_model_says_so(tiny):
    model, _, _ = tiny
    small, _ = make_tiny("llama", seed=41, n_layers=1)
    _, cache = small.run_with_cache(IOI_PROMPT)
    with pytest.raises(CacheError, match="holds layers 0–0 only, and this model has 2"):
        dpa_lens.dpa(model, cache, " Mary")
    with pytest.raises(CacheError, match="at least 2 layers; this model has 1"):
        _, big_cache = model.run_with_cache(IOI_PROMPT)
        dpa_lens.dpa(small, big_cache, " Mary")


# ------------------------------------------------------------------------------ targets


@pytest.mark.smollm2
def test_a_target_without_its_leading_space_warns(smollm2):
    _, cache = smollm2.run_with_cache(IOI_PROMPT, names_filter=dpa_lens.dpa_names_filter(smollm2))
    with pytest.warns(UserWarning, match="did you mean ' Mary'"):
        dpa_lens.dpa(smollm2, cache, "Mary")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dpa_lens.dpa(smollm2, cache, " Mary")


def test_numpy_token_ids_are_targets(tiny):
    model, _, cache = tiny
    tid = model.to_single_token(" Mary")
    a = dpa_lens.dpa(model, cache, np.int64(tid))
    b = dpa_lens.dpa(model, cache, tid)
    torch.testing.assert_close(a.tokens, b.tokens)
    c = dpa_lens.dpa(model, cache, np.array([tid]))
    torch.testing.assert_close(c.tokens, b.tokens)


# ------------------------------------------------------------------------------ methods that run the model


def test_a_cache_where_a_prompt_belongs_is_refused(tiny):
    model, _, cache = tiny
    with pytest.raises(InputError, match="clean_cache="):
        dpa_lens.atp(model, cache, CORRUPTED, PAIR)
    with pytest.raises(InputError, match="got a"):
        dpa_lens.gradient(model, cache, PAIR)
    with pytest.raises(InputError, match="empty"):
        dpa_lens.gradient(model, [], PAIR)


@pytest.mark.parametrize("method", ["dpa", "atp", "edge_atp", "gradient"])
def test_a_prompt_longer_than_the_context_is_refused_with_its_length(tiny, method):
    """``model.to_tokens`` cuts a long prompt to its first ``n_ctx`` tokens: the answer explained would be a filler token's."""
    model = tiny[0]
    n_ctx = model.cfg.n_ctx
    long = " ".join(["word"] * (n_ctx + 10)) + " to"
    corrupted = long if dpa_lens.get_method(method).input == "pair" else None
    with pytest.raises(InputError, match=rf"is \d+ tokens long and the model's context is {n_ctx}"):
        dpa_lens.run(method, model, long, PAIR, corrupted=corrupted, progress=False)
    with pytest.raises(InputError, match=f"context is {n_ctx}"):
        dpa_lens.run(method, model, torch.zeros(1, n_ctx + 1, dtype=torch.long), PAIR,
                     corrupted=torch.zeros(1, n_ctx + 1, dtype=torch.long) if corrupted else None, progress=False)


def test_token_ids_outside_the_vocabulary_or_empty_are_refused(tiny):
    model = tiny[0]
    with pytest.raises(InputError, match=r"token ids must be in \[0, 512\)"):
        dpa_lens.run("dpa", model, torch.tensor([[1, 2, 100000]]), PAIR)
    with pytest.raises(InputError, match="token ids must be in"):
        dpa_lens.run("atp", model, torch.tensor([[1, -3, 2]]), PAIR, corrupted=torch.tensor([[1, 2, 2]]))
    with pytest.raises(InputError, match="empty"):
        dpa_lens.run("dpa", model, torch.zeros(1, 0, dtype=torch.long), PAIR)


def test_random_seed_must_be_an_int(tiny):
    model, _, cache = tiny
    with pytest.raises(InputError, match="seed must be an int"):
        dpa_lens.random_baseline(model, cache, seed="x")


# ------------------------------------------------------------------------------ Attribution


def test_rows_and_top_k_are_checked(tiny, tmp_path):
    model, _, cache = tiny
    attr = dpa_lens.dpa(model, cache, " Mary")
    for k in (-3, 0, 2.5, True):
        with pytest.raises(InputError, match="k must be a positive int"):
            attr.top(k)
    with pytest.raises(InputError, match="row 3 is out of range"):
        attr.top(5, row=3)
    with pytest.raises(InputError, match="row 3 is out of range"):
        attr[3]
    assert attr[-1].batch == 1


def test_row_selection_slices_the_diagnostics(tiny):
    model, _, _ = tiny
    attr = dpa_lens.atp(model, [IOI_PROMPT, IOI_PROMPT], [CORRUPTED, IOI_PROMPT], PAIR)
    one = attr[1]
    torch.testing.assert_close(one.diagnostics.clean_value, attr.diagnostics.clean_value[1:])
    torch.testing.assert_close(one.diagnostics.corrupted_value, attr.diagnostics.corrupted_value[1:])
    assert one.diagnostics.corrupted_str_tokens == attr.diagnostics.corrupted_str_tokens[1:]


def test_save_and_load_say_what_is_wrong(tiny, tmp_path, monkeypatch):
    model, _, cache = tiny
    attr = dpa_lens.dpa(model, cache, " Mary")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="not a saved dpa_lens Attribution"):
        Attribution.load(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="does not exist"):
        attr.save(tmp_path / "missing" / "a.pt")
    monkeypatch.setenv("HOME", str(tmp_path))
    path = attr.save("~/a.pt")
    assert path == tmp_path / "a.pt" and Attribution.load("~/a.pt").method == "dpa"


# ------------------------------------------------------------------------------ plots


def test_plots_check_their_input(tiny):
    model, _, cache = tiny
    attr = dpa_lens.dpa(model, cache, " Mary")
    with pytest.raises(InputError, match="nothing to plot"):
        plot.heads([])
    with pytest.raises(InputError, match="row 5 is out of range"):
        plot.tokens(attr, row=5)
    with pytest.raises(InputError, match="out of range"):
        plot.heads(attr, positions=99)
    with pytest.raises(InputError, match="expected Attribution"):
        plot.heads([attr, "dla"])


def test_neurons_overview_shows_the_top_neurons_of_each_layer(tiny):
    model, _, cache = tiny
    attr = dpa_lens.dpa(model, cache, " Mary")
    fig = plot.neurons_overview(attr, k=5)
    z = np.asarray(fig.data[0].z)
    totals = attr.totals("neurons")[0]
    assert z.shape == (model.cfg.n_layers, 5)
    for layer in range(model.cfg.n_layers):  # each row: the layer's five largest |scores|, strongest first
        best = totals[layer].abs().sort(descending=True).values[:5]
        np.testing.assert_allclose(np.abs(z[layer]), best.numpy(), rtol=1e-5)
        assert fig.data[0].text[layer][0] == f"N{int(totals[layer].abs().argmax())}"


# ------------------------------------------------------------------------------ command line and report


EXPLAIN = ["explain", "--prompt", "x", "--target", " y"]


@pytest.mark.parametrize("argv, message", [
    ([*EXPLAIN, "--methods", "atp"], "add --corrupted"),
    ([*EXPLAIN, "--methods", "dpa,lime"], "unknown method lime"),
    ([*EXPLAIN, "--out", "/no/such/folder/r.html"], "does not exist"),
    ([*EXPLAIN, "--out", "{tmp}"], "it is a folder"),
    (["demo", "--out", "{tmp}"], "it is a folder"),
    ([*EXPLAIN, "--top", "-2"], "positive integer"),
    (["demo", "--top", "0"], "positive integer"),
    ([*EXPLAIN, "--model", "no such model"], "not a bundled model"),
    ([*EXPLAIN, "--model", "./no/such/folder"], "not a bundled model"),
    ([*EXPLAIN, "--model", "{tmp}"], "no config.json"),
    ([*EXPLAIN, "--model", "someone/never-downloaded"], "not in the local HuggingFace cache"),
    (["explain", "--prompt", " ", "--target", " y"], "--prompt is empty"),
    (["explain", "--prompt", "x", "--target", ""], "--target is empty"),
    ([*EXPLAIN, "--contrast", " y"], "the same token as --target"),
    ([*EXPLAIN, "--corrupted", "x", "--methods", "atp"], "is the prompt itself"),
    ([*EXPLAIN, "--corrupted", "z", "--methods", "dpa,dla"], "none of the methods"),
])
def test_the_command_line_checks_arguments_before_loading_a_model(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(dpa_lens, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the arguments were checked"))
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert exit_.value.code == 2 and time.perf_counter() - started < 1.0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def _stub_run(monkeypatch, tmp_path, fail: BaseException | None = None):
    """The command line with a stand-in model folder, model and report (``fail`` raised while building it): no model loads."""
    from types import SimpleNamespace

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(dpa_lens, "load_model", lambda *a, **k: object())
    monkeypatch.setattr(cli, "summary", lambda report, top: "summary")

    def build_report(*args, **kwargs):
        if fail is not None:
            raise fail
        return SimpleNamespace(html=lambda top: "<html>new</html>")

    monkeypatch.setattr("dpa_lens.report.build_report", build_report)
    out = tmp_path / "report.html"
    out.write_text("<html>the earlier report</html>")
    return [*EXPLAIN, "--model", str(tmp_path / "model"), "--out", str(out)], out


@pytest.mark.parametrize("stage", ["build", "write"])
def test_ctrl_c_in_the_command_line_is_one_line_and_exit_130(stage, capsys, monkeypatch, tmp_path):
    """Ctrl-C while explaining or while writing the report: no traceback, no fragment, the earlier report kept."""
    argv, out = _stub_run(monkeypatch, tmp_path, fail=KeyboardInterrupt() if stage == "build" else None)
    if stage == "write":
        def interrupt(fd):
            raise KeyboardInterrupt
        monkeypatch.setattr("dpa_lens.files.os.fsync", interrupt)
    try:
        code = cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped the command line (a traceback)")
    err = capsys.readouterr().err
    assert code == 130 and err.splitlines()[-1] == "interrupted" and err.count("interrupted") == 1 and "Traceback" not in err
    assert out.read_text() == "<html>the earlier report</html>" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.html"]


@pytest.mark.parametrize("fail", ["build", "write"])
def test_a_command_line_run_that_fails_midway_keeps_the_earlier_report(fail, capsys, monkeypatch, tmp_path):
    """A library error while explaining, or a full disk while writing: one line, exit 1, the earlier report as it was."""
    argv, out = _stub_run(monkeypatch, tmp_path, fail=TargetError("' y' is two tokens") if fail == "build" else None)
    if fail == "write":
        def full(fd):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr("dpa_lens.files.os.fsync", full)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("dpa-lens: error: ") and "Traceback" not in err
    assert ("two tokens" if fail == "build" else "No space left") in err
    assert out.read_text() == "<html>the earlier report</html>" and sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.html"]


def test_report_tables_rank_by_absolute_score(tiny):
    from dpa_lens.report import _table

    model, _, cache = tiny
    attr = dpa_lens.dpa(model, cache, " Mary")
    html = _table(attr, "neurons", 3)
    strongest = attr.neurons[0].abs().max()
    value = float(attr.neurons[0].flatten()[attr.neurons[0].abs().argmax()])
    assert f"{value:+.4f}" in html and float(strongest) == abs(value)


def test_a_cache_of_another_prompt_given_to_run_is_refused(tiny):
    """``run(name, model, prompt, cache=...)``: the cache must be the prompt's (it explained the cache's own prompt)."""
    model, _, cache = tiny
    with pytest.raises(CacheError, match="another input"):
        dpa_lens.run("dpa", model, CORRUPTED, PAIR, cache=cache)  # same length, other tokens
    with pytest.raises(CacheError, match="another input"):
        dpa_lens.run("dla", model, [IOI_PROMPT, IOI_PROMPT], PAIR, cache=cache)  # two rows, a cache of one
    same = dpa_lens.run("dpa", model, IOI_PROMPT, PAIR, cache=cache)
    torch.testing.assert_close(same.tokens, dpa_lens.dpa(model, cache, PAIR).tokens)
