"""Issue 4: the baselines, each against an independent reference."""

from __future__ import annotations

import pytest
import torch

import dpa_lens
from dpa_lens.methods import atp as atp_module
from dpa_lens.models.testing import FAMILIES
from tests.helpers import CORRUPTED, IOI_PROMPT, PAIR, make_tiny, rel_err


def _metric_fn(model, target=PAIR):
    good, bad = (model.to_single_token(t) for t in target)
    return lambda logits: logits[0, -1, good] - logits[0, -1, bad]


# ------------------------------------------------------------------------------ DLA


@pytest.mark.parametrize("target, incorrect", [(PAIR, True), (" Mary", False)])
def test_dla_equals_transformer_lens_logit_attrs(target, incorrect, line):
    model, _ = make_tiny("qwen2", line=line, seed=1)
    prompts = [IOI_PROMPT, "After Alice and Bob went to the park, Bob gave a ball to"]
    _, cache = model.run_with_cache(prompts)
    attr = dpa_lens.dla(model, cache, target, logit="centered")
    assert not any("hook_result" in k for k in cache.keys())  # the user's cache is left as it was
    good = torch.tensor([model.to_single_token(" Mary")] * 2)
    bad = torch.tensor([model.to_single_token(" John")] * 2) if incorrect else None
    ref = cache.logit_attrs(cache.stack_head_results(layer=-1, pos_slice=-1), tokens=good, incorrect_tokens=bad, pos_slice=-1)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    torch.testing.assert_close(attr.heads[:, :, -1].reshape(2, L * H).T, ref.float(), rtol=1e-5, atol=1e-5)
    assert attr.heads[:, :, :-1].abs().sum() == 0  # only the answer position


@pytest.mark.parametrize("target", [PAIR, " Mary", 17])
@pytest.mark.parametrize("family", FAMILIES)
def test_dla_sums_to_the_target_with_the_remainder(family, target, line):
    """Every family: output norms (Gemma), learned positions (GPT-2), parallel blocks (NeoX) and
    the final soft cap (Gemma 2) included."""
    model, _ = make_tiny(family, line=line, seed=2)
    _, cache = model.run_with_cache([IOI_PROMPT, "The Eiffel Tower is in"], padding_side="left")
    attr = dpa_lens.dla(model, cache, target)
    total = attr.tokens.sum(-1) + attr.heads.sum((1, 2, 3)) + attr.neurons.sum((1, 2, 3)) + attr.bias
    torch.testing.assert_close(total, attr.target_value, rtol=1e-4, atol=1e-4)
    if family in ("qwen2", "gpt2", "neox"):  # output biases: the remainder is not empty
        assert attr.bias.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_last_neurons_are_dpa_direct_paths(family, line):
    """DLA of the last layer's neurons is what DPA gives them: nothing lies downstream of them."""
    model, _ = make_tiny(family, line=line, seed=3)
    _, cache = model.run_with_cache(IOI_PROMPT)
    d = dpa_lens.dla(model, cache, PAIR)
    p = dpa_lens.dpa(model, cache, PAIR, mu=dpa_lens.Mu.content_only(), effective_targets=True)
    # DPA scores the last MLP against t_post; its neurons there are direct effects too
    torch.testing.assert_close(d.neurons[:, -1, -1], p.neurons[:, -1, -1], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ AtP


def _tl_attribution_patch(model, clean, corrupted):
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    return attribution_patch(model, model.to_tokens(clean), model.to_tokens(corrupted), _metric_fn(model)).node_scores


def test_atp_equals_transformer_lens_attribution_patch():
    """TransformerLens's attribution_patch targets the TransformerBridge API (3.9 and 4.x)."""
    model, _ = make_tiny("llama", line="bridge", seed=4)
    attr = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    nodes = _tl_attribution_patch(model, IOI_PROMPT, CORRUPTED)
    kinds = set()
    for node, score in nodes.items():
        kinds.add(node.kind)
        if node.kind == "attn_head_out":
            ours = attr.heads[0, node.layer, node.position, node.head]
        elif node.kind == "embed":
            ours = attr.tokens[0, node.position]
        else:  # mlp_out: the sum of its neurons (mlp_out is linear in them)
            ours = attr.neurons[0, node.layer, node.position].sum()
        assert float(ours) == pytest.approx(float(score), rel=1e-4, abs=1e-5), node
    assert kinds == {"attn_head_out", "embed", "mlp_out"}


def _patched_value(model, corrupted, hook_name, edit, target=PAIR):
    """f(corrupted with one activation edited), through the logits."""
    def hook(x, hook):
        x = x.clone()
        edit(x)
        return x

    with torch.no_grad():
        logits = model.run_with_hooks(model.to_tokens(corrupted), fwd_hooks=[(hook_name, hook)])
    return float(_metric_fn(model, target)(logits))


def test_atp_matches_finite_differences(line):
    model, _ = make_tiny("llama", line=line, seed=5, init_scale=0.1)
    attr = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    _, clean = model.run_with_cache(IOI_PROMPT)
    _, corr = model.run_with_cache(CORRUPTED)
    eps = 1e-2
    cases = [
        ("blocks.1.attn.hook_z", (0, 11, 2), attr.heads[0, 1, 11, 2]),
        ("blocks.0.attn.hook_z", (0, 10, 1), attr.heads[0, 0, 10, 1]),
        ("blocks.0.mlp.hook_post", (0, 10, 7), attr.neurons[0, 0, 10, 7]),
        ("hook_embed", (0, 10), attr.tokens[0, 10]),
    ]
    for name, idx, ours in cases:
        delta = clean[name][idx] - corr[name][idx]

        def shift(sign):
            def edit(x):
                x[idx] = x[idx] + sign * eps * delta
            return edit

        fd = (_patched_value(model, CORRUPTED, name, shift(1)) - _patched_value(model, CORRUPTED, name, shift(-1))) / (2 * eps)
        assert float(ours) == pytest.approx(fd, rel=2e-2, abs=1e-4), name


def test_atp_accepts_the_clean_cache(line):
    model, _ = make_tiny("llama", line=line, seed=6)
    _, clean_cache = model.run_with_cache(IOI_PROMPT)
    a = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR)
    b = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR, clean_cache=clean_cache)
    torch.testing.assert_close(a.heads, b.heads)
    torch.testing.assert_close(a.target_value, b.target_value)
    _, other = model.run_with_cache("The Eiffel Tower is in")
    with pytest.raises(dpa_lens.CacheError):
        dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR, clean_cache=other)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "neox"])
def test_atp_star_parts_are_exact_single_patches(family, line):
    """AtP*'s query, key and value estimates of a head equal ∂f/∂z · Δz, where Δz comes from a real
    forward with only that query, key or value patched: the softmax (soft cap included) is
    recomputed, not linearised."""
    from dpa_lens.models.view import ModelView
    from dpa_lens.targets import resolve_target

    model, _ = make_tiny(family, line=line, seed=7)
    view = ModelView(model)
    layer, head, G = 1, 2, view.n_heads // view.n_kv_heads
    kv = head // G
    group = slice(kv * G, (kv + 1) * G)
    clean_tok, tokens = model.to_tokens(IOI_PROMPT), model.to_tokens(CORRUPTED)
    resolved = resolve_target(model, view, PAIR, 1)
    names = atp_module.atp_names(view, qk_fix=True)
    run = atp_module.corrupted_run(model, view, tokens, resolved, torch.tensor([tokens.shape[1] - 1]), names)
    clean = atp_module.clean_activations(model, view, clean_tok, None, names, None)
    value, query, key = atp_module.qk_fixed_parts(view, layer, run, clean)
    z_name = f"blocks.{layer}.attn.hook_z"
    g, z0 = run.grads[z_name][0], run.acts[z_name][0]

    def dz(name, index):
        out = {}

        def patch(x, hook):
            x = x.clone()
            x[(0,) + index] = clean[name][(0,) + index]
            return x

        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(name, patch), (z_name, lambda x, hook: out.__setitem__("z", x.clone()))])
        return out["z"][0] - z0

    q_pos, k_pos = 11, 10
    q_hook, k_hook = view.qk_hook_names(layer)[:2]  # rotated queries and keys, or the un-rotated ones
    d = dz(q_hook, (q_pos, head))
    assert float(query[0, q_pos, head]) == pytest.approx(float((g[:, head] * d[:, head]).sum()), rel=1e-3, abs=1e-6)
    d = dz(k_hook, (k_pos, kv))
    assert float(key[0, k_pos, group].sum()) == pytest.approx(float((g[:, group] * d[:, group]).sum()), rel=1e-3, abs=1e-6)
    d = dz(f"blocks.{layer}.attn.hook_v", (k_pos, kv))
    assert float(value[0, k_pos, group].sum()) == pytest.approx(float((g[:, group] * d[:, group]).sum()), rel=1e-3, abs=1e-6)
    star = dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR, qk_fix=True)
    torch.testing.assert_close(star.heads[:, layer], value + query + key)
    assert star.method == "atp*"


# ------------------------------------------------------------------------------ gradients


def _hf_reference(ref, tokens, target_ids):
    """Activations and gradients from the raw transformers model (independent of TransformerLens)."""
    good, bad = target_ids
    captured = {"z": [], "post": []}
    hooks = []
    for layer in ref.model.layers:
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: captured["z"].append(args[0])))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: captured["post"].append(args[0])))
    embeds = ref.model.embed_tokens(tokens).detach().requires_grad_(True)
    try:
        logits = ref(inputs_embeds=embeds).logits
    finally:
        for h in hooks:
            h.remove()
    value = logits[0, -1, good] - logits[0, -1, bad]
    grads = torch.autograd.grad(value, [embeds] + captured["z"] + captured["post"])
    L = len(ref.model.layers)
    return embeds.detach(), grads[0], captured["z"], grads[1 : 1 + L], captured["post"], grads[1 + L :]


@pytest.mark.parametrize("signed", [False, True])
def test_gradient_methods_equal_autograd_on_the_transformers_model(signed, line):
    model, ref = make_tiny("llama", line=line, seed=8)
    tokens = model.to_tokens(IOI_PROMPT)
    ids = (model.to_single_token(" Mary"), model.to_single_token(" John"))
    fn = dpa_lens.input_x_gradient if signed else dpa_lens.gradient
    attr = fn(model, IOI_PROMPT, PAIR)
    E, gE, zs, gz, posts, gp = _hf_reference(ref, tokens, ids)
    H = model.cfg.n_heads
    if signed:
        ref_tokens = (E * gE).sum(-1)
        ref_heads = torch.stack([(z * g).view(1, -1, H, z.shape[-1] // H).sum(-1) for z, g in zip(zs, gz)], 1)
        ref_neurons = torch.stack([p * g for p, g in zip(posts, gp)], 1)
    else:
        ref_tokens = gE.norm(dim=-1)
        ref_heads = torch.stack([g.view(1, -1, H, g.shape[-1] // H).norm(dim=-1) for g in gz], 1)
        ref_neurons = torch.stack([g.abs() for g in gp], 1)
    assert rel_err(attr.tokens, ref_tokens) < 1e-4
    assert rel_err(attr.heads, ref_heads) < 1e-4
    assert rel_err(attr.neurons, ref_neurons) < 1e-4
    if not signed:
        assert attr.heads.min() >= 0


@pytest.mark.filterwarnings("ignore:integrated gradients are incomplete")
@pytest.mark.parametrize("keep_bos", [False, True])
def test_integrated_gradients_equal_a_reference_riemann_sum(keep_bos, line):
    model, ref = make_tiny("llama", line=line, seed=9, init_scale=0.05)
    tokens = model.to_tokens(IOI_PROMPT)
    assert int(tokens[0, 0]) == model.tokenizer.bos_token_id
    good, bad = model.to_single_token(" Mary"), model.to_single_token(" John")
    steps = 16
    attr = dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, steps=steps, quadrature="riemann_right", keep_bos=keep_bos,
                                         batch_size=5, progress=False)
    E = ref.model.embed_tokens(tokens).detach()
    base = torch.zeros_like(E)
    if keep_bos:
        base[:, 0] = E[:, 0]
    total = torch.zeros_like(E)
    for k in range(1, steps + 1):
        x = (base + k / steps * (E - base)).requires_grad_(True)
        logits = ref(inputs_embeds=x).logits
        (g,) = torch.autograd.grad(logits[0, -1, good] - logits[0, -1, bad], [x])
        total += g / steps
    expected = ((E - base) * total).sum(-1)
    assert rel_err(attr.tokens, expected) < 1e-4
    with torch.no_grad():
        f0 = ref(inputs_embeds=base).logits[0, -1]
    assert float(attr.bias[0]) == pytest.approx(float(f0[good] - f0[bad]), abs=1e-4)
    assert (float(attr.tokens[0, 0]) == 0.0) == keep_bos


@pytest.mark.parametrize("baseline", ["zero", "zero_all", "tensor"])
def test_integrated_gradients_are_complete_on_a_tiny_model(baseline, line):
    model, _ = make_tiny("llama", line=line, seed=10, init_scale=0.05)
    prompts = [IOI_PROMPT, "The Eiffel Tower is in"]
    if baseline == "zero":  # the default: adaptive, BOS kept
        options = dict(steps=128)
    elif baseline == "zero_all":  # the stiff start from an all-zero input, resolved decade by decade
        options = dict(keep_bos=False, quadrature="log", alpha_min=1e-8, steps=256)
    else:  # a real embedding as the baseline: a smooth path
        the = model.W_E[model.to_single_token(" the")].detach()
        prompts, options = [IOI_PROMPT], dict(baseline=the, quadrature="gausslegendre", steps=64)
    attr = dpa_lens.integrated_gradients(model, prompts, PAIR, progress=False, **options)
    gap = attr.diagnostics.completeness_gap.cpu()
    assert gap.abs().max() < 0.01
    # the reported gap is what the scores give
    recomputed = (attr.tokens.sum(-1) - (attr.target_value - attr.bias)) / (attr.target_value - attr.bias).abs()
    torch.testing.assert_close(recomputed.double().cpu(), gap.double(), rtol=1e-3, atol=1e-4)


def test_adaptive_integrated_gradients_resolve_a_jump():
    """A path with a steep step that fixed rules step over: the adaptive rule finds it and is
    complete, and its scores equal the exact integral of a path whose gradient is known."""
    model, _ = make_tiny("llama", seed=10, init_scale=0.05)
    from dpa_lens.methods.quadrature import adaptive_rule as _adaptive_rule

    centre, width = 3.3e-4, 2e-6  # f(α) = s · sigmoid((α − centre)/width) + α · t, per token

    class Path:
        s = torch.tensor([[0.0, 2.0, -1.0, 3.0]], dtype=torch.float64)
        t = torch.tensor([[0.0, 0.5, 0.25, -0.5]], dtype=torch.float64)

        def __call__(self, rows, alphas):
            z = (alphas[:, None] - centre) / width
            f = (self.s * torch.sigmoid(z) + alphas[:, None] * self.t).sum(-1)
            shares = self.s * torch.sigmoid(z) * torch.sigmoid(-z) / width + self.t
            return f, shares

    path = Path()
    exact = path.s * (torch.sigmoid(torch.tensor((1 - centre) / width)) - torch.sigmoid(torch.tensor(-centre / width))) + path.t
    scores, f0, f1 = _adaptive_rule(path, 1, steps=256, alpha_min=1e-4, batch_size=16)
    assert float((scores.sum() - (f1 - f0)).abs() / (f1 - f0).abs()) < 1e-3
    torch.testing.assert_close(scores, exact, rtol=1e-3, atol=1e-3)
    # a fixed geometric grid with as many nodes misses the step's location by far
    from dpa_lens.methods.quadrature import fixed_rule as _fixed_rule
    from dpa_lens.methods.quadrature import quadrature_rule

    scores_fixed, _, _ = _fixed_rule(lambda rows, a: path(rows, a), 1, *quadrature_rule(256, "riemann_right"))
    assert float((scores_fixed.sum() - (f1 - f0)).abs() / (f1 - f0).abs()) > 0.5


def test_integrated_gradients_warn_when_incomplete(line):
    model, _ = make_tiny("llama", line=line, seed=10, init_scale=0.05)
    with pytest.warns(UserWarning, match="incomplete by"):
        attr = dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, steps=4, quadrature="riemann_right", progress=False)
    assert abs(float(attr.diagnostics.completeness_gap[0])) > 0.05


def test_integrated_gradients_bad_options(line):
    model, _ = make_tiny("llama", line=line)
    with pytest.raises(ValueError, match="baseline must be"):
        dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, baseline="blur")
    with pytest.raises(ValueError, match="broadcast"):
        dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, baseline=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="finite"):
        dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, baseline=torch.full((model.cfg.d_model,), float("nan")))
    with pytest.raises(ValueError, match="alpha_min"):
        dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, alpha_min=0.0)
    with pytest.raises(ValueError, match="quadrature"):
        dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, quadrature="simpson")
    with pytest.raises(ValueError, match="at least 2 steps"):
        dpa_lens.integrated_gradients(model, IOI_PROMPT, PAIR, steps=1)


# ------------------------------------------------------------------------------ attention


def test_attention_baselines(line):
    model, _ = make_tiny("llama", line=line, seed=11)
    _, cache = model.run_with_cache([IOI_PROMPT, "The Eiffel Tower is in"], padding_side="right")
    last = dpa_lens.attention_last(model, cache, PAIR)
    mean = dpa_lens.attention_mean(model, cache)
    roll = dpa_lens.attention_rollout(model, cache)
    L = model.cfg.n_layers
    p = [cache[f"blocks.{l}.attn.hook_pattern"].mean(1) for l in range(L)]  # [batch, q, k]
    for row, pos in enumerate(last.positions.tolist()):
        torch.testing.assert_close(last.tokens[row], p[-1][row, pos])
        torch.testing.assert_close(mean.tokens[row], sum(x[row, pos] for x in p) / L)
        # rollout by hand, one matrix at a time
        n = p[0].shape[-1]
        flow = torch.eye(n)
        for x in p:
            a = 0.5 * x[row] + 0.5 * torch.eye(n)
            a = a / a.sum(-1, keepdim=True)
            flow = a @ flow
        torch.testing.assert_close(roll.tokens[row], flow[pos])
        assert float(roll.tokens[row].sum()) == pytest.approx(1.0, abs=1e-5)


def test_random_baseline_is_seeded(line):
    model, _ = make_tiny("llama", line=line)
    _, cache = model.run_with_cache(IOI_PROMPT)
    a, b = dpa_lens.random_baseline(model, cache, seed=3), dpa_lens.random_baseline(model, cache, seed=3)
    c = dpa_lens.random_baseline(model, cache, seed=4)
    assert torch.equal(a.heads, b.heads) and not torch.equal(a.heads, c.heads)
    assert a.neurons.shape == (1, 2, a.tokens.shape[1], 96)


# ------------------------------------------------------------------------------ exact patching


def test_patching_equals_transformer_lens_patching(line):
    from transformer_lens import patching

    model, _ = make_tiny("llama", line=line, seed=12)
    corrupted = model.to_tokens(CORRUPTED)
    _, clean_cache = model.run_with_cache(IOI_PROMPT)
    metric = _metric_fn(model)
    with torch.no_grad():
        base = float(metric(model(corrupted)))
    ref = patching.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, lambda lg: metric(lg) - base)
    ours = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="heads_by_pos", batch_size=7, progress=False)
    torch.testing.assert_close(ours.heads[0], ref.float(), rtol=1e-4, atol=1e-5)
    ref_all = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, lambda lg: metric(lg) - base)
    heads = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="heads", progress=False)
    torch.testing.assert_close(heads.head_totals[0], ref_all.float(), rtol=1e-4, atol=1e-5)


def test_one_unit_patched_by_hand(line):
    model, _ = make_tiny("qwen2", line=line, seed=13)
    _, clean = model.run_with_cache(IOI_PROMPT)
    with torch.no_grad():
        base = float(_metric_fn(model)(model(model.to_tokens(CORRUPTED))))

    def by_hand(name, index):
        def edit(x):
            x[index] = clean[name][index]
        return _patched_value(model, CORRUPTED, name, edit) - base

    heads = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="heads_by_pos", batch_size=64, progress=False)
    assert float(heads.heads[0, 1, 10, 3]) == pytest.approx(by_hand("blocks.1.attn.hook_z", (0, 10, 3)), abs=1e-5)
    neurons = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="neurons", layers=[1], progress=False)
    assert float(neurons.neuron_totals[0, 1, 5]) == pytest.approx(by_hand("blocks.1.mlp.hook_post", (0, slice(None), 5)), abs=1e-5)
    assert torch.isnan(neurons.neuron_totals[0, 0]).all()  # layer 0 was not measured
    toks = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="tokens", progress=False)
    differ = model.to_tokens(IOI_PROMPT)[0] != model.to_tokens(CORRUPTED)[0]
    pos = int(torch.nonzero(differ)[0])
    assert float(toks.tokens[0, pos]) == pytest.approx(by_hand("hook_embed", (0, pos)), abs=1e-5)
    assert toks.tokens[0, ~differ].abs().sum() == 0  # patching a token by itself changes nothing
    assert float(heads.target_value[0]) == pytest.approx(float(toks.target_value[0]))


def test_patching_batches_do_not_change_the_numbers(line):
    model, _ = make_tiny("llama", line=line, seed=14)
    a = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="heads", batch_size=1, progress=False)
    b = dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="heads", batch_size=5, progress=False)
    torch.testing.assert_close(a.heads, b.heads)


# ------------------------------------------------------------------------------ errors and registry


def test_pairs_of_different_lengths_are_refused(line):
    model, _ = make_tiny("llama", line=line)
    for fn in (dpa_lens.atp, dpa_lens.activation_patching):
        with pytest.raises(dpa_lens.PairError, match="aligned position by position"):
            fn(model, IOI_PROMPT, "When Mary went to the store, she gave a drink to", PAIR)


def test_train_mode_is_refused(line):
    model, _ = make_tiny("llama", line=line)
    model.train()
    try:
        with pytest.raises(dpa_lens.TrainModeError, match="eval"):
            dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, PAIR)
        with pytest.raises(dpa_lens.TrainModeError):
            dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR)
        with pytest.raises(dpa_lens.TrainModeError):
            dpa_lens.gradient(model, IOI_PROMPT, PAIR)
    finally:
        model.eval()


@pytest.mark.parametrize("target", [" Marianne Smithsonian", [" Mary", " John", " Tom"], (1, 2, 3)])
def test_targets_the_metric_cannot_use(target, line):
    model, _ = make_tiny("llama", line=line)
    with pytest.raises(dpa_lens.TargetError):
        dpa_lens.atp(model, IOI_PROMPT, CORRUPTED, target)
    with pytest.raises(dpa_lens.TargetError):
        dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, target)


def test_patching_options_are_checked(line):
    model, _ = make_tiny("llama", line=line)
    with pytest.raises(ValueError, match="needs layers"):
        dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="neurons")
    with pytest.raises(ValueError, match="unit must be"):
        dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, unit="edges")
    with pytest.raises(ValueError, match="out of range"):
        dpa_lens.activation_patching(model, IOI_PROMPT, CORRUPTED, PAIR, layers=[5])


def test_registry_runs_methods_by_name(line):
    model, _ = make_tiny("llama", line=line)
    names = set(dpa_lens.available_methods())
    assert {"dpa", "dla", "atp", "gradient", "input_x_gradient", "integrated_gradients", "attention_last",
            "attention_mean", "attention_rollout", "random", "activation_patching"} <= names
    _, cache = model.run_with_cache(IOI_PROMPT, names_filter=dpa_lens.names_filter(model, "dla", "attention_rollout"))
    torch.testing.assert_close(dpa_lens.attribute("dla", model, cache, PAIR).heads, dpa_lens.dla(model, cache, PAIR).heads)
    dpa_lens.attribute("attention_rollout", model, cache)
    with pytest.raises(dpa_lens.InputError, match="available"):
        dpa_lens.attribute("saliency_maps", model, cache, PAIR)
    with pytest.raises(dpa_lens.InputError, match="read no cache"):
        dpa_lens.names_filter(model, "gradient")
