"""Issue 31, part 1: EAP-IG (both of MIB's forms) as the registered edge methods ``eap_ig`` and ``eap_ig_activations``.

References:

* edge AtP: with one step the inputs form's only run is the corrupted run, so it *is* `edge_atp`, bit for bit;
* an independent float64 reimplementation from the definition (`tests/oracles/eap_ig.py`: the Llama forward
  written out on the untouched ``transformers`` weights, plain autograd), both forms;
* completeness: every path from the token embeddings to f passes through a reader's copy of the stream, so the
  edges out of ``embed`` add up to the integrated gradients of the embeddings (the same left Riemann sum), which
  tend to ``f(clean) − f(corrupted)`` as the steps grow;
* convergence of the Riemann sums as the steps double.
"""

from __future__ import annotations

import functools

import pytest
import torch

import dpa_lens
from dpa_lens.errors import InputError
from dpa_lens.methods.eap_ig import eap_ig
from dpa_lens.methods.edge_atp import edge_atp
from dpa_lens.models.testing import FAMILIES
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny, rel_err
from tests.oracles import eap_ig as oracle


@functools.cache
def _model(family: str, line: str, dtype: torch.dtype = torch.float32, **kwargs):
    return make_tiny(family, line, seed=1, dtype=dtype, **kwargs)


def _metric(model):
    good, bad = (model.to_single_token(t) for t in PAIR)
    return lambda logits: logits[:, -1, good] - logits[:, -1, bad]


def _dense(circuit, scores: dict) -> torch.Tensor:
    """The oracle's scores in the circuit's [writer, reader] order, on the circuit's edges."""
    out = torch.zeros(len(circuit.writers), len(circuit.readers), dtype=torch.float64)
    for i, w in enumerate(circuit.writers):
        for j, (r, p) in enumerate(circuit.readers):
            if bool(circuit.in_graph[i, j]):
                out[i, j] = scores[(w, r, p)]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_of_the_inputs_form_is_edge_atp_and_both_forms_run_on_every_family(family, line):
    """The grid k/S, k = 0 … S−1, starts at the corrupted end: one step is the corrupted run's gradient."""
    model, _ = _model(family, line)
    atp = edge_atp(model, [IOI_PROMPT, CORRUPTED], [CORRUPTED, IOI_PROMPT], PAIR)
    one = eap_ig(model, [IOI_PROMPT, CORRUPTED], [CORRUPTED, IOI_PROMPT], PAIR, steps=1, progress=False)
    assert torch.equal(one.scores, atp.scores) and torch.equal(one.target_value, atp.target_value)
    act = eap_ig(model, IOI_PROMPT, CORRUPTED, PAIR, mode="activations", steps=2, progress=False)
    assert act.method == "eap_ig_activations" and act.settings == {"mode": "activations", "steps": 2}
    assert torch.isfinite(act.scores).all() and float(act.scores.abs().max()) > 0
    torch.testing.assert_close(act.target_value, atp.target_value[:1])


@pytest.mark.parametrize("mode, steps", [("inputs", 3), ("activations", 2), ("inputs", 1), ("activations", 1)])
def test_equals_the_float64_reimplementation(mode, steps, line):
    """Both forms against `tests/oracles/eap_ig.py` on a grouped-query Llama in float64 (edges and f(clean) − f(corrupted))."""
    model, hf = _model("llama", line, torch.float64)
    circuit = eap_ig(model, IOI_PROMPT, CORRUPTED, PAIR, mode=mode, steps=steps, progress=False)
    scores, target, _ = oracle.eap_ig(hf, model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED), _metric(model), mode, steps)
    want = _dense(circuit, scores)
    assert float(want.abs().max()) > 1e-2
    assert rel_err(circuit.scores[0], want) < 1e-5
    assert float(circuit.target_value[0]) == pytest.approx(target, rel=1e-5, abs=1e-8)


def test_the_edges_out_of_the_embeddings_are_its_integrated_gradients_and_complete(line):
    """Σ_r edge(embed → r) = Σ_k Δ_e · ∂f/∂e(k) / S for every S (the oracle's gradient of the embedding itself), and the
    left Riemann sum's gap to f(clean) − f(corrupted) shrinks as 1/S (Richardson: 2·I(2S) − I(S) is within 1 %)."""
    model, hf = _model("llama", line, torch.float64)
    clean, corrupted = model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED)
    sums = {}
    for steps in (8, 16, 32):
        circuit = eap_ig(model, IOI_PROMPT, CORRUPTED, PAIR, steps=steps, progress=False)
        sums[steps] = float(circuit.outgoing(0)[0])
        if steps == 8:
            _, _, ig = oracle.eap_ig(hf, clean, corrupted, _metric(model), "inputs", steps)
            assert sums[steps] == pytest.approx(ig, rel=1e-5)  # the offsets' gradients are float32
    target = float(circuit.target_value[0])
    gaps = {s: abs(v - target) for s, v in sums.items()}
    assert gaps[32] < gaps[16] < gaps[8]
    assert gaps[32] < 0.6 * gaps[16]
    assert abs(2 * sums[32] - sums[16] - target) < 0.01 * abs(target)


@pytest.mark.parametrize("mode, grid", [("inputs", (4, 8, 16, 32)), ("activations", (2, 4, 8))])
def test_the_riemann_sums_converge(mode, grid, line):
    """Doubling the steps moves the scores less each time."""
    model, _ = _model("llama", line, n_layers=1) if mode == "activations" else _model("llama", line)
    runs = [eap_ig(model, IOI_PROMPT, CORRUPTED, PAIR, mode=mode, steps=s, progress=False).scores for s in grid]
    moves = [float((b - a).norm()) for a, b in zip(runs, runs[1:])]
    assert all(later < 0.75 * earlier for earlier, later in zip(moves, moves[1:])), moves


@pytest.mark.parametrize("family", ["llama", "gemma3", "neox"])
@pytest.mark.parametrize("mode", ["inputs", "activations"])
def test_runs_batched_together_give_the_scores_of_runs_one_at_a_time(family, mode, line):
    """``chunk`` runs of the path in one batch (run-major) are the same sum as one run per pass: a partial last
    chunk and a padded batch of two prompts included."""
    model, _ = _model(family, line)
    prompts, corrupted = [IOI_PROMPT, "Then Mary gave a book to"], [CORRUPTED, "Then John gave a book to"]
    one = eap_ig(model, prompts, corrupted, PAIR, mode=mode, steps=3, chunk=1, progress=False)
    for chunk in (2, None):
        got = eap_ig(model, prompts, corrupted, PAIR, mode=mode, steps=3, chunk=chunk, progress=False)
        assert rel_err(got.scores, one.scores) < 1e-5, (chunk, rel_err(got.scores, one.scores))
        torch.testing.assert_close(got.target_value, one.target_value)


def test_run_gives_both_forms_and_bad_options_are_refused(line):
    model, _ = _model("llama", line)
    inputs = dpa_lens.run("eap_ig", model, IOI_PROMPT, PAIR, corrupted=CORRUPTED, progress=False)
    assert inputs.method == "eap_ig" and inputs.settings == {"mode": "inputs", "steps": 5}
    with pytest.raises(InputError, match="cannot be changed"):
        dpa_lens.run("eap_ig_activations", model, IOI_PROMPT, PAIR, corrupted=CORRUPTED, mode="inputs")
    for options, message in [({"mode": "outputs"}, "mode must be"), ({"steps": 0}, "steps must be"),
                             ({"steps": 2.5}, "steps must be"), ({"steps": True}, "steps must be"),
                             ({"chunk": 0}, "chunk must be"), ({"chunk": 1.0}, "chunk must be")]:
        with pytest.raises(InputError, match=message):
            eap_ig(model, IOI_PROMPT, CORRUPTED, PAIR, **options)
    per_position = eap_ig(model, IOI_PROMPT, CORRUPTED, PAIR, steps=2, per_position=True, progress=False)
    torch.testing.assert_close(per_position.per_position.sum(1), per_position.scores)


def test_a_model_configured_as_mib_configures_it_gives_the_same_scores(line):
    """MIB and the reference set ``use_split_qkv_input``, ``use_attn_result`` and ``use_hook_mlp_in``: same numbers.
    (With ``ungroup_grouped_query_attention`` too, every method: tests/models/test_mib_config.py.)"""
    plain, _ = _model("llama", line)
    model, _ = make_tiny("llama", line, seed=1)
    for flag in ("set_use_split_qkv_input", "set_use_attn_result", "set_use_hook_mlp_in"):
        getattr(model, flag)(True)
    for mode in ("inputs", "activations"):
        want = eap_ig(plain, IOI_PROMPT, CORRUPTED, PAIR, mode=mode, steps=2, progress=False)
        got = eap_ig(model, IOI_PROMPT, CORRUPTED, PAIR, mode=mode, steps=2, progress=False)
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["eap_ig", "eap_ig_activations"])
def test_a_mixture_of_experts_model_is_refused(name):
    """Like edge AtP: an MoE layer's MLP is no one writer of the graph."""
    import transformers

    from dpa_lens.models.testing import tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64)
    cfg.architectures = ["MixtralForCausalLM"]
    model = dpa_lens.load_model(transformers.MixtralForCausalLM(cfg).eval(), tokenizer=tiny_tokenizer())
    with pytest.raises(dpa_lens.UnsupportedModelError, match="mixture of experts"):
        dpa_lens.run(name, model, IOI_PROMPT, PAIR, corrupted=CORRUPTED, progress=False)
