"""Issue 33, item 9: `load_model` leaves the ``transformers`` model it is given as it was (it works on a copy;
``inplace=True`` wraps the model itself), and ``processed=False`` returns the raw model, on which every method runs.

Unpack of the raw model against the reference run on the raw ``transformers`` model is in
``tests/methods/test_unpack.py``; DPA of unprocessed models against its oracle in ``test_user_models.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import dpa_lens
from dpa_lens import InputError, Mu, UnsupportedModelError
from dpa_lens.models import tl
from dpa_lens.models.testing import tiny_hf_model, tiny_tokenizer
from dpa_lens.models.view import UNEMBED_OFFSET_ATTR, ModelView
from tests.helpers import CORRUPTED, IOI_PROMPT, LINES

FAST = {"integrated_gradients": {"steps": 16, "warn_gap": float("inf")}, "activation_patching": {"batch_size": 64}}


def _watched(family: str):
    """A tiny model with a forward hook on every module, the hook counts, and its logits on the IOI prompt."""
    hf = tiny_hf_model(family)
    fired: dict[str, int] = {}
    for name, module in hf.named_modules():
        module.register_forward_hook(lambda m, i, o, name=name: fired.__setitem__(name, fired.get(name, 0) + 1))
    ids = tiny_tokenizer()(IOI_PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = hf(ids).logits
    return hf, fired, ids, logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("processed", [True, False])
def test_the_given_model_is_left_as_it_was(family, processed, line):
    hf, fired, ids, logits = _watched(family)
    modules, state = dict(hf.named_modules()), {k: v.clone() for k, v in hf.state_dict().items()}
    want = dict(fired)
    hf.train()  # its mode is its own too
    model = dpa_lens.load_model(hf, tokenizer=tiny_tokenizer(), line=line, dtype=torch.float64, processed=processed)
    assert hf.training and hf.dtype == torch.float32
    hf.eval()
    assert dict(hf.named_modules()).keys() == modules.keys()
    assert all(module is modules[name] for name, module in hf.named_modules())
    assert all(torch.equal(v, state[k]) for k, v in hf.state_dict().items())
    fired.clear()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, logits)
    assert fired == want  # every hook the user registered fires, once per forward, as before
    fired.clear()
    with torch.no_grad():
        ours = model(ids)
    assert not fired  # the copy carries none of them
    assert not model.training and model.cfg.dtype == torch.float64
    shift = ours.double() - logits.double()  # the model's logits, up to the centred unembedding's constant per position
    if processed:
        shift = shift - shift.mean(-1, keepdim=True)
    assert float(shift.abs().max()) < 1e-4


@pytest.mark.parametrize("line", LINES)
def test_inplace_wraps_the_model_itself(line):
    """``inplace=True`` saves the copy: the bridge replaces the model's modules and processes its weights in
    place (its own logits change); a HookedTransformer reads the weights and leaves the model in eval mode."""
    hf, _, ids, logits = _watched("gpt2")
    modules = dict(hf.named_modules())
    hf.train()
    dpa_lens.load_model(hf, tokenizer=tiny_tokenizer(), line=line, inplace=True)
    assert not hf.training
    with torch.no_grad():
        after = hf(ids).logits
    replaced = [name for name, module in hf.named_modules() if modules.get(name) is not module]
    if line == "bridge":
        assert replaced and not torch.equal(after, logits)
    else:
        assert not replaced and torch.equal(after, logits)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_processed_false_is_the_raw_model(family, line):
    """Logits the ``transformers`` model's (soft cap included), the norms' gains and biases unfolded, the
    unembedding the model's own (no centring offset), the value biases in the values."""
    hf = tiny_hf_model(family)
    model = dpa_lens.load_model(hf, tokenizer=tiny_tokenizer(), line=line, processed=False)
    tokens = model.to_tokens(IOI_PROMPT)
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    assert float((ours - theirs).abs().max()) < 1e-5 * max(1.0, float(theirs.abs().max()))
    view = ModelView(model)
    assert view.norm_weight("ln1", 0) is not None and view.norm_weight("ln_final") is not None
    torch.testing.assert_close(model.W_U.detach(), hf.get_output_embeddings().weight.detach().T, rtol=0, atol=0)
    m, mb = getattr(model, UNEMBED_OFFSET_ATTR)
    assert not m.any() and not mb.any()
    if family == "gpt2":
        assert view.norm_bias("ln1", 0) is not None and view.attn(0).b_V is not None


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_method_runs_on_the_raw_model(family, line):
    """Every registered method, Unpack included, on ``processed=False``; DPA explains the raw logit and, with
    content-only weights, its token scores and bias add up to it."""
    hf = tiny_hf_model(family)
    ref = copy.deepcopy(hf)
    model = dpa_lens.load_model(hf, tokenizer=tiny_tokenizer(), line=line, processed=False)
    for name in dpa_lens.available_methods():
        spec = dpa_lens.get_method(name)
        try:
            result = dpa_lens.run(name, model, IOI_PROMPT, " Mary", corrupted=CORRUPTED if spec.input == "pair" else None,
                                  progress=False, **FAST.get(name, {}))
        except UnsupportedModelError:
            assert family != "gpt2", name  # GPT-2 has the rules of every method
            continue
        parts = [getattr(result, k, None) for k in (*spec.scores, "scores", "target_value")]
        parts = [p for p in parts if isinstance(p, torch.Tensor)]
        assert parts and all(torch.isfinite(p).all() for p in parts), name
        if spec.target and spec.input != "pair" and name != "unpack":  # unpack explains the logit minus the vocabulary mean
            assert result.target["logit"] == ["raw"], name
    with torch.no_grad():
        raw = ref(model.to_tokens(IOI_PROMPT)).logits[0, -1, model.to_single_token(" Mary")]
    attr = dpa_lens.run("dpa", model, IOI_PROMPT, " Mary", mu=Mu.content_only())
    assert float(attr.target_value[0]) == pytest.approx(float(raw), abs=1e-4)
    torch.testing.assert_close(attr.tokens.sum(-1) + attr.bias, attr.target_value, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------ bad combinations


def test_options_that_mean_nothing_for_what_is_given_are_refused():
    model = dpa_lens.load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer(), inplace=True)
    with pytest.raises(InputError, match=r"processed=False\) .*TransformerLens model .*from_pretrained_no_processing"):
        dpa_lens.load_model(model, processed=False)
    with pytest.raises(InputError, match=r"inplace=True\) is for a transformers model"):
        dpa_lens.load_model(model, inplace=True)
    with pytest.raises(InputError, match=r"inplace=True\) is for a transformers model"):
        dpa_lens.load_model("no-such-org/no-such-model", inplace=True)
    for bad in ({"processed": "no"}, {"inplace": 1}, {"processed": None}):
        with pytest.raises(InputError, match=f"{next(iter(bad))} must be True or False"):
            dpa_lens.load_model(tiny_hf_model("llama"), tokenizer=tiny_tokenizer(), **bad)


def test_a_model_that_cannot_be_copied_says_inplace():
    hf = tiny_hf_model("llama")
    hf.scratch = torch.ones(2, requires_grad=True) * 2  # a non-leaf tensor: deepcopy refuses it
    with pytest.raises(InputError, match=r"could not copy the model .*inplace=True"):
        dpa_lens.load_model(hf, tokenizer=tiny_tokenizer())
    assert tl.is_tl_model(dpa_lens.load_model(hf, tokenizer=tiny_tokenizer(), inplace=True))


def test_the_default_is_a_processed_copy():
    hf = tiny_hf_model("gpt2")
    model = dpa_lens.load_model(hf, tokenizer=tiny_tokenizer())
    assert getattr(model, "original_model", None) is not hf and ModelView(model).norm_weight("ln1", 0) is None
