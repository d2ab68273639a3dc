"""The DePass reference (tests/oracles/depass_ref.py) on its own, and against DPA.

Completeness by construction: the parts add up to the real residual stream at every layer, for every
level and MLP rule, and their scores plus the remainder's add up to the target. With the ``taylor``
rule the decomposed network is linear: it is the network whose gradient is DPA with
``Mu(q=0, k=0, v=1, gate=1, up=0)`` (frozen patterns and value path; each neuron's gate path with the
up projection frozen; a plain MLP's secant), so the parts' scores are DPA's scores and the remainder
is DPA's bias. That is checked against the re-wired autograd oracle and against ``dpa_lens.dpa``.
"""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.models.testing import FAMILIES, tiny_hf_model, tiny_tokenizer
from tests.helpers import IOI_PROMPT, make_tiny, rel_err
from tests.oracles.depass_ref import DT, RULES, depass_reference, frozen_forward, logit_fn, mlp_shares
from tests.oracles.rewired import rewired_scores

VALUE_PATH = Mu(q=0, k=0, v=1, gate=1, up=0)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    """The IOI prompt with a leading BOS (id 0), as ``model.to_tokens`` gives it."""
    return torch.tensor([[0] + tiny_tokenizer()(IOI_PROMPT)["input_ids"]])


def _target(ids: torch.Tensor):
    tok = tiny_tokenizer()
    mary, john = tok(" Mary")["input_ids"][0], tok(" John")["input_ids"][0]
    return logit_fn(ids.shape[1] - 1, mary, john)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_forward_is_the_model(family, ids):
    hf = tiny_hf_model(family, seed=3)
    with torch.no_grad():
        logits = hf(ids).logits.to(DT)
    # transformers computes RMSNorm in float32 even for a float64 model: compare with float32
    assert _max_rel(frozen_forward(hf, ids).logits, logits) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", ["tokens", "heads", "neurons"])
def test_parts_add_up_at_every_layer(family, level, ids):
    hf = tiny_hf_model(family, seed=3)
    fn = _target(ids)
    for rule in RULES if level == "tokens" else ("softmax", "taylor"):
        ref = depass_reference(hf, ids, fn, level=level, mlp_rule=rule)
        for run in ref.runs:
            assert run.streams, "nothing recorded"
            for name, parts in run.streams.items():
                assert _max_rel(parts.sum(0), run.real[name]) < 1e-12, (rule, name)
            # each run's scores (the remainder's included) add up to the target
            assert float((run.scores.sum(0) - ref.value).abs().max()) < 1e-12 * max(1.0, float(ref.value.abs().max()))
        if level == "tokens":
            assert torch.allclose(ref.scores.sum(-1) + ref.remainder, ref.value, rtol=0, atol=1e-12)
    if level == "tokens":  # parts of a later layer's input
        run = depass_reference(hf, ids, fn, start_layer=1).runs[0]
        assert "blocks.0.hook_resid_pre" not in run.streams
        for name, parts in run.streams.items():
            assert _max_rel(parts.sum(0), run.real[name]) < 1e-12, name


def test_mlp_shares_by_hand():
    """Parts (first, token 1, token 2, remainder) at positions 0 and 1, two neurons."""
    g = torch.zeros(4, 1, 2, 2, dtype=DT)
    g[:, 0, 0, 0] = torch.tensor([-0.3, 0.0, 0.0, 0.0])  # position 0: only the first part (pinned to 1)
    g[:, 0, 1, 0] = torch.tensor([0.8, 0.2, -0.1, 3e-6])  # first ignored, remainder below 1e-5
    g[:, 0, 1, 1] = torch.tensor([0.5, 0.0, 0.0, 0.0])  # nothing left but the ignored first: remainder
    e2, e_1 = torch.exp(torch.tensor(2.0, dtype=DT)), torch.exp(torch.tensor(-1.0, dtype=DT))
    expected = {
        "softmax": [e2 / (e2 + e_1), e_1 / (e2 + e_1)],
        "max": [1.0, 0.0],
        "relu": [0.2 / (0.2 + 1e-6), 0.0],
        "linear": [0.3 / (0.3 + 1e-6), 0.0],
    }
    for rule, (s1, s2) in expected.items():
        s = mlp_shares(g, rule, 0.1, first=0, ignore_first=True)
        top = 1 / (1 + 1e-6) if rule in ("relu",) else 1.0
        assert torch.allclose(s[:, 0, 0, 0], torch.tensor([top, 0, 0, 0], dtype=DT)), rule
        assert torch.allclose(s[:, 0, 1, 0], torch.tensor([0, s1, s2, 0], dtype=DT)), rule
        assert torch.allclose(s[:, 0, 1, 1], torch.tensor([0, 0, 0, top], dtype=DT)), rule
    # without ignore_first the first part competes at every position
    s = mlp_shares(g, "max", 0.1, first=0, ignore_first=False)
    assert s[0, 0, 1, 0] == 1 and s[0, 0, 1, 1] == 1


def test_first_position_and_causality(ids):
    """Softmax on Llama (no biases): the first part owns position 0's MLP output and takes no MLP
    share elsewhere (``ignore_first``); no part reaches a position before its own; the remainder
    stays zero (up to the rounding that ``lost_to_remainder`` hands it)."""
    hf = tiny_hf_model("llama", seed=3)
    ref = depass_reference(hf, ids, _target(ids), mlp_rule="softmax")
    run = ref.runs[0]
    n = ids.shape[1]
    for li in range(hf.config.num_hidden_layers):
        mid, post = f"blocks.{li}.hook_resid_mid", f"blocks.{li}.hook_resid_post"
        mlp = run.streams[post] - run.streams[mid]
        assert torch.equal(mlp[0, :, 1:], torch.zeros_like(mlp[0, :, 1:]))
        assert torch.allclose(mlp[0, :, 0], run.real[post][:, 0] - run.real[mid][:, 0], atol=1e-12)
    for name, parts in run.streams.items():
        for j in range(n):
            assert torch.equal(parts[j, :, :j], torch.zeros_like(parts[j, :, :j])), (name, j)
        assert float(parts[-1].abs().max()) < 1e-12, name
    kept = depass_reference(hf, ids, _target(ids), mlp_rule="softmax", ignore_first=False)
    assert rel_err(kept.scores, ref.scores) > 1e-3  # the switch matters


def test_chunks(ids):
    hf = tiny_hf_model("qwen2", seed=3)
    fn = _target(ids)
    n = ids.shape[1]
    whole = depass_reference(hf, ids, fn, mlp_rule="softmax", record=False)
    assert torch.equal(depass_reference(hf, ids, fn, mlp_rule="softmax", chunk_size=n, record=False).scores, whole.scores)
    chunked = depass_reference(hf, ids, fn, mlp_rule="softmax", chunk_size=4)
    assert len(chunked.runs) == 4 and chunked.runs[1].labels[0] == ("first",)
    for run in chunked.runs:
        for name, parts in run.streams.items():
            assert _max_rel(parts.sum(0), run.real[name]) < 1e-12
    assert rel_err(chunked.scores, whole.scores) > 1e-3  # the rule sees the other chunks as one remainder
    linear = depass_reference(hf, ids, fn, mlp_rule="taylor", record=False)
    assert rel_err(depass_reference(hf, ids, fn, mlp_rule="taylor", chunk_size=4, record=False).scores, linear.scores) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_is_the_gradient_of_the_value_path_network(family, ids):
    """Against the re-wired autograd oracle with mu = (q 0, k 0, v 1, gate 1, up 0)."""
    hf = tiny_hf_model(family, seed=3)
    fn = _target(ids)
    oracle = rewired_scores(hf, ids, fn, mu=(0, 0, 1, 1, 0), positions=torch.tensor([ids.shape[1] - 1]))
    tokens = depass_reference(hf, ids, fn, mlp_rule="taylor", record=False)
    assert rel_err(tokens.scores, oracle.tokens) < 1e-12
    assert float((tokens.remainder - oracle.bias).abs().max()) < 1e-12
    heads = depass_reference(hf, ids, fn, level="heads", mlp_rule="taylor", by_position=True, record=False)
    assert rel_err(heads.scores, oracle.heads) < 1e-12
    per_head = depass_reference(hf, ids, fn, level="heads", mlp_rule="taylor", record=False)
    assert rel_err(per_head.scores, oracle.heads.sum(2)) < 1e-12
    neurons = depass_reference(hf, ids, fn, level="neurons", mlp_rule="taylor", by_position=True, record=False)
    assert rel_err(neurons.scores, oracle.neurons) < 1e-12
    # starting at layer 1: each position's stream times the effective target there
    later = depass_reference(hf, ids, fn, mlp_rule="taylor", start_layer=1, record=False)
    expected = (frozen_forward(hf, ids).layers[1].resid_pre * oracle.grad_resid_pre[1]).sum(-1)
    assert rel_err(later.scores, expected) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_equals_dpa(family, line):
    """DePass with the taylor rule is DPA's value path: tokens, heads and neurons equal
    ``dpa(mu=Mu(q=0, k=0, v=1, gate=1, up=0))``, the remainder its bias."""
    model, hf = make_tiny(family, line=line, seed=3)
    tokens = model.to_tokens(IOI_PROMPT)
    _, cache = model.run_with_cache(tokens)
    attr = dpa_lens.dpa(model, cache, (" Mary", " John"), mu=VALUE_PATH)
    correct, wrong = attr.target["token_ids"][0]
    fn = logit_fn(int(attr.positions[0]), correct, wrong)
    ref = depass_reference(hf, tokens.cpu(), fn, mlp_rule="taylor", record=False)
    assert float((attr.target_value.double() - ref.value).abs().max()) < 1e-5 * max(1.0, float(ref.value.abs().max()))
    assert rel_err(attr.tokens, ref.scores) < 1e-5
    assert float((attr.bias.double() - ref.remainder).abs().max()) < 1e-5 * max(1.0, float(ref.value.abs().max()))
    heads = depass_reference(hf, tokens.cpu(), fn, level="heads", mlp_rule="taylor", by_position=True, record=False)
    assert rel_err(attr.heads, heads.scores) < 1e-5
    neurons = depass_reference(hf, tokens.cpu(), fn, level="neurons", mlp_rule="taylor", by_position=True, record=False)
    assert rel_err(attr.neurons, neurons.scores) < 1e-5
