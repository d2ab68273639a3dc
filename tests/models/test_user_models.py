"""Every model a TransformerLens user brings, through every method (issue 18).

Model builders, on each TransformerLens line where they exist:

* ``processed``: `load_model` (fold_ln, centred writing weights and unembedding, value biases folded);
* ``unprocessed``: the weights as ``transformers`` has them, norms and biases unfolded (a bridge with
  ``enable_compatibility_mode(no_processing=True)``; ``HookedTransformer.from_pretrained_no_processing``);
* ``fold_ln_false``: ``HookedTransformer.from_pretrained(..., fold_ln=False)`` (centring on, norms unfolded);
* a ``HookedTransformer(cfg)`` built by hand from a ``HookedTransformerConfig``, with or without MLPs;
* the hook flags ``use_split_qkv_input``, ``use_attn_in``, ``use_attn_result``, ``use_hook_mlp_in``;
* a left-padded batch from ``model.to_tokens``, with and without its attention mask;
* ``load_model`` on fresh Llama models of several vocabulary sizes, tied and untied.

References: the re-wired autograd oracle from the raw ``transformers`` weights (DPA), and the same
method on the processed model of the same weights (the others): TransformerLens's processing changes
the parametrisation, not the network, so every score but a centred logit must be the same.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings

import pytest
import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.errors import CacheError, UnsupportedModelError
from dpa_lens.graph import Graph
from dpa_lens.models import tl
from dpa_lens.models.convert import _record_unembed_offset, _reloadable_tokenizer, unembed_tolerance, wrap
from dpa_lens.models.testing import FAMILIES, tiny_hf_model, tiny_tokenizer
from dpa_lens.models.view import ModelView
from tests.helpers import CORRUPTED, IOI_PROMPT, LINES, PAIR, assert_matches, hand_built, oracle_for, rel_err

HOOKED = tl.hooked_transformer_class() is not None
OFF = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False, "fold_value_biases": False}
BUILDS = {"processed": None, "unprocessed": OFF, "fold_ln_false": {"fold_ln": False}}
FAST = {"integrated_gradients": {"steps": 16, "warn_gap": float("inf")}, "activation_patching": {"batch_size": 64}}
# The methods whose modules this file's cases were made for must give the numbers; any other method may
# instead refuse a model it has no rules for (UnsupportedModelError: DePass and Unpack on attention-only
# models, Unpack outside its families), never crash.
COVERED_MODULES = {"dpa_lens.methods.dpa.method", "dpa_lens.methods.dla", "dpa_lens.methods.atp", "dpa_lens.methods.patching",
                   "dpa_lens.methods.gradients", "dpa_lens.methods.integrated_gradients", "dpa_lens.methods.attention",
                   "dpa_lens.methods.dpa.edges", "dpa_lens.methods.edge_atp", "dpa_lens.methods.edge_patching"}
METHODS = dpa_lens.available_methods()
EDGES = dpa_lens.available_methods(returns="edges")
SHORT = "When Tom and Anna went to the park, Tom gave a ball to"


def builds_for(line: str) -> list[str]:
    """`from_pretrained(fold_ln=False)` is HookedTransformer's; the bridge has no_processing and full processing."""
    return ["processed", "unprocessed"] + (["fold_ln_false"] if line == "hooked" else [])


MATRIX = [(line, build) for line in LINES for build in builds_for(line)]


def build_model(build: str, family: str, line: str, seed: int = 3):
    """(model, untouched transformers reference) of a tiny model, processed as ``build`` says."""
    hf = tiny_hf_model(family, seed=seed)
    ref = copy.deepcopy(hf)
    return wrap(hf, tiny_tokenizer(), f"tiny-{family}", line=line, device=None, dtype=torch.float32,
                processing=BUILDS[build]), ref


@functools.cache
def built(build: str, family: str, line: str, seed: int = 3):
    """`build_model`, cached: tests must not change the model."""
    return build_model(build, family, line, seed)


def run(name, model, prompt=IOI_PROMPT, corrupted=CORRUPTED, target=PAIR, **extra):
    """The method's attribution; None where a method of another module refuses the model."""
    try:
        spec = dpa_lens.get_method(name)
        corrupted = corrupted if spec.input == "pair" else None
        return dpa_lens.run(name, model, prompt, target, corrupted=corrupted, progress=False, **{**FAST.get(name, {}), **extra})
    except UnsupportedModelError:
        if dpa_lens.get_method(name).fn.__module__ in COVERED_MODULES:
            raise
        return None


def assert_same(a, b, kinds=("tokens", "heads", "neurons", "head_totals", "neuron_totals", "bias", "target_value"), tol=1e-4):
    """The scores of two results agree (of a `Circuit`: its edges, node scores, bias and value)."""
    if isinstance(a, dpa_lens.Circuit):
        assert isinstance(b, dpa_lens.Circuit) and a.writers == b.writers and a.readers == b.readers
        kinds = [k for k in ("scores", "nodes", "bias", "target_value") if k in kinds or "heads" in kinds]
    for name in kinds:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol * max(1.0, float(y.abs().max())), equal_nan=True,
                                       msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------ unprocessed models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("line, build", [(l, b) for l, b in MATRIX if b != "processed"])
def test_unprocessed_dpa_equals_the_oracle(family, line, build):
    """Norm gains and biases left unfolded (LayerNorm's β, RMSNorm's w, Gemma's 1 + w), value biases
    in the values: DPA is the oracle's gradient, and explains the raw logit where the unembedding is
    raw (its mean is recorded where it was centred)."""
    model, ref = built(build, family, line)
    view = ModelView(model)
    if family in ("gpt2", "neox"):  # LayerNorm: the gain and the bias are there
        assert view.norm_weight("ln1", 0) is not None and view.norm_bias("ln1", 0) is not None
        assert view.norm_bias("ln_final") is not None
    else:
        assert view.norm_weight("ln1", 0) is not None
    tokens = model.to_tokens(IOI_PROMPT)
    _, cache = model.run_with_cache(tokens)
    for mu in (Mu.paper_default(), Mu.content_only()):
        attr = dpa_lens.dpa(model, cache, " Mary", mu=mu, head_keys=True)
        assert attr.target["logit"] == ["raw"]
        oracle = oracle_for(attr, ref, tokens, mu, pair=False)
        assert_matches(attr, oracle)
        assert rel_err(attr.head_keys, oracle.head_keys) < 1e-4
    # content only, the token scores and the bias (the norms' share included) add up to the logit
    torch.testing.assert_close(attr.tokens.sum(-1) + attr.bias, attr.target_value, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("line, build", [(l, b) for l, b in MATRIX if b != "processed"])
def test_every_method_gives_the_processed_models_numbers(family, line, build):
    """Processing changes the parametrisation, not the network: every method gives the same numbers
    on the unprocessed model (a raw logit is a raw logit). Input × gradient of heads is the exception:
    ``z·∂f/∂z`` moves with the value bias that fold_value_biases takes out of z. Unpack is another: its
    components are the writes as the model parametrises them (centred or not, value bias in the heads or
    not), and its shares are not invariant to that, in the reference code as here."""
    model, _ = built(build, family, line)
    processed, _ = built("processed", family, line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    _, cache_p = processed.run_with_cache(IOI_PROMPT)
    for name in [m for m in METHODS if m != "unpack"]:
        # input × gradient of heads, and every edge out of a head (z W_O), move with the value bias that
        # fold_value_biases takes out of z
        kinds = ("tokens", "neurons", "target_value") if name == "input_x_gradient" else ("target_value",) if name in EDGES else \
            ("tokens", "heads", "neurons", "head_totals", "neuron_totals", "bias", "target_value")
        got = run(name, model, cache=cache if dpa_lens.get_method(name).input == "cache" else None, target=" Mary")
        want = run(name, processed, cache=cache_p if dpa_lens.get_method(name).input == "cache" else None, target=" Mary")
        if got is None or want is None:
            assert got is want is None, name  # refused both, or neither
            continue
        if name not in ("random", "edge_random"):
            assert_same(got, want, kinds)
        if dpa_lens.get_method(name).target:
            assert got.target["logit"] == want.target["logit"] == ["raw"]


@pytest.mark.parametrize("line", LINES)
def test_dla_of_an_unprocessed_model_adds_up_and_keeps_the_value_bias_out_of_the_heads(line):
    model, _ = built("unprocessed", "gpt2", line)
    assert ModelView(model).attn(0).b_V is not None  # the value bias (and β·W_V) is in the values
    _, cache = model.run_with_cache([IOI_PROMPT, SHORT])
    attr = dpa_lens.dla(model, cache, (" Mary", " John"))
    total = attr.tokens.sum(-1) + attr.heads.sum((1, 2, 3)) + attr.neurons.sum((1, 2, 3)) + attr.bias
    torch.testing.assert_close(total, attr.target_value, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ hook flags


FLAGS = ["set_use_split_qkv_input", "set_use_attn_in", "set_use_attn_result", "set_use_hook_mlp_in"]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("flag", FLAGS)
def test_every_method_works_with_the_hook_flags(flag, family, line):
    """HookedTransformer caches ``ln1``'s scale per head with split inputs; the numbers are those
    without the flag (``use_attn_in`` does not exist with grouped-query attention on 3.x)."""
    plain, _ = built("processed", family, line)
    model, _ = build_model("processed", family, line)
    try:
        getattr(model, flag)(True)
    except (AssertionError, ValueError) as err:  # TransformerLens's own refusal
        pytest.skip(f"{flag} on this model: {err}")
    _, cache = model.run_with_cache(IOI_PROMPT)
    _, plain_cache = plain.run_with_cache(IOI_PROMPT)
    if flag in ("set_use_split_qkv_input", "set_use_attn_in") and not tl.is_bridge(model):
        assert cache["blocks.0.ln1.hook_scale"].ndim == 4  # [batch, pos, head, 1]
    for name in METHODS:
        cached = dpa_lens.get_method(name).input == "cache"
        got = run(name, model, cache=cache if cached else None)
        want = run(name, plain, cache=plain_cache if cached else None)
        if got is None or want is None:
            assert got is want is None, name
            continue
        if name not in ("random", "edge_random"):
            assert_same(got, want)


# ------------------------------------------------------------------------------ models built from a config


HAND_BUILT = [("LN", False), ("LN", True), ("LNPre", False), ("LNPre", True), ("RMS", False), ("RMS", True)]


@pytest.mark.skipif(not HOOKED, reason="HookedTransformer is TransformerLens 3.x")
def test_an_attention_only_config_needs_no_activation():
    """``HookedTransformerConfig(attn_only=True)`` is usually written without an ``act_fn``: it has no MLP to use one."""
    model = hand_built("LN", True, act_fn=None)
    ModelView(model).check_supported()
    _, cache = model.run_with_cache(IOI_PROMPT)
    got = {name: run(name, model, cache=cache if dpa_lens.get_method(name).input == "cache" else None) for name in METHODS}
    refused = sorted(name for name, r in got.items() if r is None)  # by the methods with no rules for it (`run`)
    assert refused == ["depass", "unpack"], refused


@pytest.mark.skipif(not HOOKED, reason="HookedTransformer is TransformerLens 3.x")
@pytest.mark.parametrize("norm, attn_only", HAND_BUILT)
def test_a_hand_built_config_runs_every_method(norm, attn_only):
    model = hand_built(norm, attn_only)
    view = ModelView(model)
    view.check_supported()
    assert view.rules.has_mlp is not attn_only and (view.d_mlp == 0) is attn_only
    _, cache = model.run_with_cache(IOI_PROMPT)
    for name in METHODS:
        attr = run(name, model, cache=cache if dpa_lens.get_method(name).input == "cache" else None)
        if attr is None:
            continue
        if isinstance(attr, dpa_lens.Circuit):  # the model's graph: no MLP nodes in an attention-only model
            assert (not any(w.endswith(".mlp") for w in attr.writers) and ("L0.mlp", "mlp") not in attr.readers) is attn_only, name
            assert attr.writers == Graph.of(view).writers and torch.isfinite(attr.scores).all(), name
            if attr.nodes is not None:  # a writer's outgoing edges add up to its node score
                torch.testing.assert_close(attr.outgoing(0), attr.nodes[0], rtol=1e-4, atol=1e-5)
        elif attn_only:  # no neurons: absent (zero-width for the random baseline)
            assert attr.neuron_totals is None and (attr.neurons is None or attr.neurons.shape[-1] == 0), name
        elif "neurons" in dpa_lens.get_method(name).scores:
            assert attr.has("neurons"), name
    content = dpa_lens.dpa(model, cache, PAIR, mu=Mu.content_only(), effective_targets=True)
    torch.testing.assert_close(content.tokens.sum(-1) + content.bias, content.target_value, rtol=1e-4, atol=1e-4)
    assert any("resid_mid" in k for k in content.effective_targets) is not attn_only
    dla = dpa_lens.dla(model, cache, PAIR)
    total = dla.tokens.sum(-1) + dla.heads.sum((1, 2, 3)) + dla.bias + (0 if attn_only else dla.neurons.sum((1, 2, 3)))
    torch.testing.assert_close(total, dla.target_value, rtol=1e-4, atol=1e-4)
    with pytest.raises(dpa_lens.InputError, match="attention-only") if attn_only else contextlib.nullcontext():
        dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="neurons", layers=[1], progress=False)
    # the circuit functions that are not methods: paths and circuit faithfulness
    paths = dpa_lens.dpa_paths(model, cache, PAIR, k=8)[0]
    assert paths and all(math.isfinite(p.score) for p in paths)
    assert (not any(hop.node.endswith(".mlp") for p in paths for hop in p.hops)) is attn_only
    circuit = dpa_lens.dpa_edges(model, cache, PAIR)
    curve = dpa_lens.circuit_faithfulness(model, IOI_PROMPT, CORRUPTED, PAIR, circuit, fractions=(0.1, 1.0), progress=False)
    assert float(curve.curve()[-1]) == pytest.approx(1.0, abs=1e-3)  # every edge kept: the clean model


@pytest.mark.skipif(not HOOKED, reason="HookedTransformer is TransformerLens 3.x")
@pytest.mark.parametrize("norm, attn_only", [("LN", False), ("LN", True), ("RMS", False)])
def test_a_hand_built_model_scores_as_its_processed_self(norm, attn_only):
    """TransformerLens's own processing of the hand-built model (fold_ln, centring) leaves every DPA
    and DLA score as it was: the unfolded norm gains and biases are read right."""
    model = hand_built(norm, attn_only, seed=1)
    processed = copy.deepcopy(model)
    processed.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)  # value biases folded too
    assert ModelView(processed).norm_bias("ln1", 0) is None
    _, cache = model.run_with_cache(IOI_PROMPT)
    _, cache_p = processed.run_with_cache(IOI_PROMPT)
    for mu in (Mu.paper_default(), Mu.content_only()):
        assert_same(dpa_lens.dpa(model, cache, PAIR, mu=mu), dpa_lens.dpa(processed, cache_p, PAIR, mu=mu))
    assert_same(dpa_lens.dla(model, cache, PAIR), dpa_lens.dla(processed, cache_p, PAIR))


@pytest.mark.skipif(not HOOKED, reason="HookedTransformer is TransformerLens 3.x")
def test_dla_of_an_attention_only_model_equals_transformer_lens_logit_attrs():
    model = hand_built("LNPre", True, seed=2)
    with torch.no_grad():  # no value biases, so that z·W_O is TransformerLens's head result
        for block in model.blocks:
            block.attn.b_V.zero_()
    _, cache = model.run_with_cache(IOI_PROMPT)
    good, bad = (torch.tensor([model.to_single_token(t)]) for t in PAIR)
    ref = cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1), tokens=good, incorrect_tokens=bad, pos_slice=-1)
    attr = dpa_lens.dla(model, cache, PAIR)
    torch.testing.assert_close(attr.heads[0, :, -1].reshape(-1), ref[:, 0].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HOOKED, reason="HookedTransformer is TransformerLens 3.x")
@pytest.mark.parametrize("fields, named", [
    ({"positional_embedding_type": "shortformer"}, "positional_embedding_type='shortformer'"),
    ({"attention_dir": "bidirectional"}, "attention_dir='bidirectional'"),
    ({"act_fn": "solu_ln"}, "activation solu_ln"),
])
def test_a_config_dpa_lens_does_not_follow_is_named(fields, named):
    model = hand_built("LN", False, **fields)
    with pytest.raises(UnsupportedModelError, match=named.replace("(", r"\(")):
        dpa_lens.dpa(model, model.run_with_cache(IOI_PROMPT)[1], PAIR)


# ------------------------------------------------------------------------------ left padding from to_tokens


PROMPTS = [IOI_PROMPT, "The capital of France is"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_left_padded_batch_without_its_mask(family, line):
    """``model.to_tokens(prompts)`` with ``padding_side="left"``, run without a mask: the bridge attends to
    the padding, and dpa_lens refuses it saying how to pass the mask; HookedTransformer masks left
    padding itself, and the numbers are each row's alone."""
    model, _ = built("processed", family, line)
    old = model.tokenizer.padding_side
    model.tokenizer.padding_side = "left"
    try:
        tokens = model.to_tokens(PROMPTS)
        _, cache = model.run_with_cache(tokens)
    finally:
        model.tokenizer.padding_side = old
    if tl.is_bridge(model):
        for name in ("dpa", "dla"):
            with pytest.raises(CacheError, match="attention_mask=mask"):
                dpa_lens.get_method(name).fn(model, cache, " Mary")
        return
    _assert_rows_alone(model, tokens, cache, None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_left_padded_batch_with_its_mask_gives_each_rows_numbers(family, line):
    model, _ = built("processed", family, line)
    rows = [model.to_tokens(p)[0] for p in PROMPTS]
    n = max(len(r) for r in rows)
    tokens = torch.full((len(rows), n), model.tokenizer.pad_token_id)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, n - len(r):], mask[i, n - len(r):] = r, 1
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    _assert_rows_alone(model, tokens, cache, mask)


def _assert_rows_alone(model, tokens, cache, mask):
    for name in ("dpa", "dla"):
        batch = dpa_lens.get_method(name).fn(model, cache, " Mary", attention_mask=mask)
        for i, prompt in enumerate(PROMPTS):
            _, alone_cache = model.run_with_cache(prompt)
            alone = dpa_lens.get_method(name).fn(model, alone_cache, " Mary")
            m = alone.tokens.shape[1]
            assert int(batch.mask[i].sum()) == m
            torch.testing.assert_close(batch.tokens[i, -m:], alone.tokens[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batch.heads[i, :, -m:], alone.heads[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batch.neurons[i, :, -m:], alone.neurons[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batch.target_value[i], alone.target_value[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ which logit


def _explains_the_raw_logit(model, ref):
    """DPA of " Mary" on ``model``, with no warning: the raw logit, equal to the untouched
    transformers model's, and said so in the result's repr."""
    _, cache = model.run_with_cache(IOI_PROMPT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attr = dpa_lens.dpa(model, cache, " Mary")
    assert attr.target["logit"] == ["raw"] and "(raw logit) = " in repr(attr)
    with torch.no_grad():
        logit = ref(model.to_tokens(IOI_PROMPT).cpu()).logits[0, -1, model.to_single_token(" Mary")]
    assert float(attr.target_value[0]) == pytest.approx(float(logit), abs=1e-4)


@pytest.mark.parametrize("line", LINES)
def test_a_centred_logit_warns_how_to_keep_the_raw_one(line):
    """As load_model builds a model, a token's raw logit is explained and the repr says so. Built by
    hand with TransformerLens's default processing, the model explains the centred logit; the warning
    names the switch that keeps the raw one, and with it the logit is raw."""
    family = "llama"
    loaded, ref = built("processed", family, line)
    _explains_the_raw_logit(loaded, ref)
    centred = copy.deepcopy(loaded)
    delattr(centred, "_dpa_lens_unembed_offset")  # as TransformerLens alone builds it
    _, cache = centred.run_with_cache(IOI_PROMPT)
    switch = "enable_compatibility_mode(center_unembed=False)" if tl.is_bridge(centred) else "center_unembed=False"
    with pytest.warns(UserWarning, match=switch.replace("(", r"\(").replace(")", r"\)")):
        attr = dpa_lens.dpa(centred, cache, " Mary")
    assert attr.target["logit"] == ["centered"] and "centred logit" in repr(attr)
    hf = tiny_hf_model(family, seed=3)  # as advised: the unembedding kept raw
    ref = copy.deepcopy(hf)
    raw = wrap(hf, tiny_tokenizer(), "tiny", line=line, device=None, dtype=torch.float32, processing={"center_unembed": False})
    del raw._dpa_lens_unembed_offset  # nothing recorded: the raw logit is read off the uncentred W_U itself
    _explains_the_raw_logit(raw, ref)


# ------------------------------------------------------------------------------ vocabulary sizes


@pytest.mark.parametrize("vocab", [48, 64, 100, 512])
@pytest.mark.parametrize("tied", [False, True])
def test_load_model_relates_any_unembedding_to_the_raw_one(vocab, tied, line):
    """A fresh ``LlamaForCausalLM`` (default init, d_model 64) of several vocabulary sizes, tied or not:
    `load_model` loads it, and a token target explains its raw logit. 64 is the square unembedding
    that TransformerLens's bridge would centre along d_model (load_model leaves it uncentred)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(vocab)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                      intermediate_size=128, vocab_size=vocab, tie_word_embeddings=tied)).eval()
    ref = copy.deepcopy(hf)
    model = dpa_lens.load_model(hf, tokenizer=tiny_tokenizer(), line=line)
    tokens = torch.tensor([[0, 5, 17, 33, 2, 41, 9, 12]]) % vocab
    with torch.no_grad():
        raw = ref(tokens).logits[0]
        ours = model(tokens.to(model.cfg.device))[0].cpu()
    shift = (raw - ours).mean(-1, keepdim=True)  # centring moves each position's logits together
    torch.testing.assert_close(ours + shift, raw, rtol=1e-4, atol=1e-5)
    _, cache = model.run_with_cache(tokens)
    attr = dpa_lens.dpa(model, cache, 7 % vocab)
    assert attr.target["logit"] == ["raw"]
    assert float(attr.target_value[0]) == pytest.approx(float(raw[-1, 7 % vocab]), abs=1e-5)


def test_a_square_unembedding_centred_along_d_model_is_refused():
    """The tolerance is float rounding (`unembed_tolerance`), not a fudge: what TransformerLens's bridge
    does by default to a square unembedding, centring it over d_model, is far above it and refused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpa_lens.models.convert import _raw_unembedding

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                                      intermediate_size=128, vocab_size=64)).eval()
    raw = _raw_unembedding(hf)
    assert unembed_tolerance(raw[0], torch.float32, layer_norm=False) < 2e-5 * float(raw[0].abs().max())
    bridge = tl.bridge_class().boot_transformers("square", hf_model=hf, tokenizer=_reloadable_tokenizer(tiny_tokenizer()))
    bridge.enable_compatibility_mode(disable_warnings=True)  # TransformerLens's default processing
    W_U = bridge.W_U.detach()
    assert float(W_U.mean(0).abs().max()) < 1e-6 < float(W_U.mean(1).abs().max())  # centred over d_model, not the vocabulary
    with pytest.raises(RuntimeError, match="could not relate"):
        _record_unembed_offset(bridge, raw)
