"""Exact activation patching: the ground truth that AtP and DPA are compared against.

Denoising, as AtP: run the corrupted input, patch one unit's clean activation in, and score the
unit by how much the target moves, ``f(corrupted with unit patched) − f(corrupted)``. One patched
forward per unit, many units per forward (a batch of copies of the corrupted input, each with its
own patch), with a progress bar.

Units:

* ``"heads_by_pos"``: one head's output ``hook_z`` at one position -> ``heads [batch, layer, pos, head]``;
* ``"heads"``: one head's output at every position -> ``head_totals [batch, layer, head]``;
* ``"neurons"``: one MLP neuron at every position, in the ``layers`` given
  -> ``neuron_totals [batch, layer, d_mlp]`` (NaN in layers not measured);
* ``"tokens"``: one position's token embedding -> ``tokens [batch, pos]``.

Padding positions are not patched (their score is 0). ``target`` may also be a metric
``metric(logits) -> scalar``, as for TransformerLens's ``patching`` functions, applied to each row's
logits (each patched copy's) ``[1, pos, vocab]`` on its own; a unit's score is then
``metric(patched) − metric(corrupted)`` (TransformerLens's functions return ``metric(patched)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import Tensor

from dpa_lens.deprecation import renamed
from dpa_lens.errors import CacheError, InputError
from dpa_lens.forward import read_pair
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.models import hooks
from dpa_lens.progress import progress_bar as tqdm
from dpa_lens.results import Attribution, Diagnostics
from dpa_lens.targets import Metric, MetricTarget, target_values
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel

Unit = Literal["heads_by_pos", "heads", "neurons", "tokens"]
UNITS: tuple[str, ...] = ("heads_by_pos", "heads", "neurons", "tokens")


def _hook_name(unit: str, layer: int | None) -> str:
    if unit == "tokens":
        return hooks.EMBED
    if unit == "neurons":
        return hooks.mlp(layer, "post")
    return hooks.attn(layer, "z")


def _units(unit: str, layers: list[int], real: Tensor, n_heads: int, d_mlp: int) -> list[tuple[int | None, int | None, int | None]]:
    """(layer, position or None for all, head/neuron or None) for one row."""
    positions = torch.nonzero(real).flatten().tolist()
    if unit == "tokens":
        return [(None, p, None) for p in positions]
    if unit == "heads_by_pos":
        return [(l, p, h) for l in layers for p in positions for h in range(n_heads)]
    if unit == "heads":
        return [(l, None, h) for l in layers for h in range(n_heads)]
    return [(l, None, i) for l in layers for i in range(d_mlp)]


def _patch_hook(unit: str, copies: Tensor, pos: Tensor, idx: Tensor, clean: Tensor):
    """A forward hook writing the clean activation of each copy's unit into that copy."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        x = x.clone()
        src = clean.to(x.device, x.dtype)
        if unit == "tokens":
            x[copies, pos] = src[pos]
        elif unit == "heads_by_pos":
            x[copies, pos, idx] = src[pos, idx]
        else:  # all positions of one head (z: [pos, head, d_head]) or one neuron (post: [pos, d_mlp])
            x[copies, :, idx] = src[:, idx].transpose(0, 1)
        return x

    return hook


@register(MethodSpec(name="activation_patching", input="pair", scores=("heads",), reference=True, metric=True,
                     summary="exact denoising patching: f(corrupted with the unit's clean value) − f(corrupted)"))
@renamed(clean_tokens="prompt", corrupted_tokens="corrupted")
def activation_patching(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike | Metric,
    position: PositionLike = -1,
    *,
    unit: Unit = "heads",
    layers: Iterable[int] | None = None,
    batch_size: int = 32,
    clean_cache: Cache | None = None,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    progress: bool = True,
) -> Attribution:
    """Exact denoising activation patching, one patched forward per unit (batched).

    Args:
        target: any target form, or a metric ``metric(logits) -> scalar`` (see the module's note).
        unit: ``"heads"`` (default: each head at every position at once), ``"heads_by_pos"``, ``"neurons"`` or ``"tokens"``.
        layers: layers to measure (default all; required for ``"neurons"``, whose cost is one
            forward per neuron).
        batch_size: patched copies per forward pass.
        clean_cache: an ``ActivationCache`` of the clean run, if you have one.

    Returns:
        `Attribution` whose scores are ``f(patched) − f(corrupted)``; ``target_value`` is
        ``f(clean) − f(corrupted)``.
    """
    if unit not in UNITS:
        raise InputError(f"unit must be one of {UNITS}, got {unit!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    pair = read_pair(model, prompt, corrupted, target, position, method="activation patching", attention_mask=attention_mask, logit=logit,
                     metric=True)
    view = pair.view
    L = view.n_layers
    if unit == "neurons" and not view.rules.has_mlp:
        raise InputError("unit='neurons': this model is attention-only (attn_only=True), it has no neurons; patch heads or tokens")
    if unit == "neurons":
        view.check_neurons("unit='neurons'", "patch heads or tokens")
    if unit == "neurons" and layers is None:
        raise InputError(
            f"unit='neurons' needs layers=[...]: it costs one forward per neuron ({view.d_mlp} per layer, "
            f"{L * view.d_mlp} for the whole model)"
        )
    layer_list = list(range(L)) if layers is None else sorted(set(int(l) for l in layers))
    bad = [l for l in layer_list if not 0 <= l < L]
    if bad:
        raise InputError(f"layers {bad} are out of range (the model has {L})")
    clean_tok, corr_tok, mask, resolved, positions = pair.tokens, pair.corrupted_tokens, pair.mask, pair.target, pair.positions
    clean_in, corr_in = pair.clean, pair.corrupted
    metric = isinstance(resolved, MetricTarget)
    ln_f = view.norm_weight("ln_final")

    hook_names = ["hook_embed"] if unit == "tokens" else [_hook_name(unit, l) for l in layer_list]
    wanted = set(hook_names) | ({hooks.FINAL_NORMALIZED} if not metric else set())
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        if clean_cache is None:
            clean_logits, clean_cache = model.run_with_cache(clean_tok, names_filter=lambda n: n in wanted, **kwargs)
        elif metric:
            clean_logits = model(clean_tok, **kwargs)
        corr_logits, corr_cache = model.run_with_cache(corr_tok, names_filter=lambda n: n == hooks.FINAL_NORMALIZED, **kwargs)
    missing = [n for n in wanted if not hooks.cached(clean_cache, n)]
    if missing:
        raise CacheError(f"clean_cache lacks {missing[:3]}; cache the clean run without a names_filter")
    if metric:
        clean_value, corr_value = resolved.of_logits(clean_logits), resolved.of_logits(corr_logits)
    else:
        clean_value = target_values(resolved, clean_cache[hooks.FINAL_NORMALIZED], positions, ln_f)
        corr_value = target_values(resolved, corr_cache[hooks.FINAL_NORMALIZED], positions, ln_f)

    b, n = corr_in.batch, corr_in.seq_len
    device = view.embed_device if view.split else corr_value.device  # a split model's results: on the embedding's device
    corr_value = corr_value.to(device)
    nan = float("nan")
    if unit == "tokens":
        out = torch.zeros(b, n, device=device)
    elif unit == "heads_by_pos":
        out = torch.full((b, L, n, view.n_heads), nan, device=device)
        out[:, layer_list] = 0.0
    elif unit == "heads":
        out = torch.full((b, L, view.n_heads), nan, device=device)
    else:
        out = torch.full((b, L, view.d_mlp), nan, device=device)

    jobs = []
    for row in range(b):
        units = _units(unit, layer_list, corr_in.real[row], view.n_heads, view.d_mlp)
        jobs += [(row, units[i : i + batch_size]) for i in range(0, len(units), batch_size)]
    bar = tqdm(jobs, desc=f"patching {unit}", disable=not progress, leave=False)
    for row, chunk in bar:
        c = len(chunk)
        tokens = corr_tok[row : row + 1].expand(c, -1)
        row_mask = None if mask is None else mask[row : row + 1].expand(c, -1)
        fwd_hooks = []
        for layer in sorted({u[0] for u in chunk}, key=lambda x: -1 if x is None else x):
            members = [k for k, u in enumerate(chunk) if u[0] == layer]
            copies = torch.tensor(members)
            pos = torch.tensor([chunk[k][1] if chunk[k][1] is not None else 0 for k in members])
            idx = torch.tensor([chunk[k][2] if chunk[k][2] is not None else 0 for k in members])
            name = _hook_name(unit, layer)
            fwd_hooks.append((name, _patch_hook(unit, copies, pos, idx, clean_cache[name][row])))
        captured: dict[str, Tensor] = {}
        fwd_hooks.append((hooks.FINAL_NORMALIZED, lambda x, hook, captured=captured: captured.__setitem__("x", x)))
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type="logits" if metric else None,
                                          **({} if row_mask is None else {"attention_mask": row_mask}))
        row_target = resolved.rows(torch.full((c,), row))
        values = row_target.of_logits(logits) if metric else target_values(row_target, captured["x"], positions[row].expand(c), ln_f)
        effects = (values - corr_value[row].to(values.device)).to(device)
        for k, (layer, pos, idx) in enumerate(chunk):
            if unit == "tokens":
                out[row, pos] = effects[k]
            elif unit == "heads_by_pos":
                out[row, layer, pos, idx] = effects[k]
            else:
                out[row, layer, idx] = effects[k]

    field = {"tokens": "tokens", "heads_by_pos": "heads", "heads": "head_totals", "neurons": "neuron_totals"}[unit]
    return Attribution(
        method="activation_patching",
        **{field: out},
        target_value=clean_value.to(device) - corr_value,
        positions=positions,
        token_ids=clean_in.tokens,
        str_tokens=clean_in.str_tokens,
        mask=clean_in.real,
        target=resolved.describe(),
        diagnostics=Diagnostics(clean_value=clean_value.to(device), corrupted_value=corr_value, corrupted_str_tokens=corr_in.str_tokens),
        settings={"unit": unit, "layers": layer_list},
        model_name=view.name,
    )
