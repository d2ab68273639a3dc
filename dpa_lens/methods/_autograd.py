"""One way to get activations and gradients for every gradient-based method.

``forward_with_grads`` runs the model once with the embeddings as the only leaf that requires
grad (parameters are frozen for the call, so no weight gradients are computed), records the
activations of the hooks asked for, backpropagates the sum over rows of the target quantity,
and records each hook's gradient under the name that was asked for (backward hooks report other
names on the bridge, see the TransformerLens notes). The target is a `Target`, or a metric of
the logits (`MetricTarget`, TransformerLens's ``metric(logits)`` convention, applied row by row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpa_lens.errors import TargetError
from dpa_lens.inputs import RunInputs, inputs_from_tokens, prepare_tokens, resolve_positions
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.targets import MetricTarget, Target, final_input, resolve_target
from dpa_lens.types import PositionLike, PromptLike, TargetLike, TLModel
from dpa_lens.validation import require_eval


def prepare_run(
    model: TLModel, text: PromptLike, target: TargetLike, position: PositionLike, attention_mask: Tensor | None, logit: str, method: str
) -> tuple[ModelView, Tensor, Tensor | None, RunInputs, Tensor, Target | MetricTarget]:
    """The prelude of every method that runs the model itself: eval mode checked, tokens and
    padding, answer positions, target (a metric of the logits allowed)."""
    view = ModelView(model)
    require_eval(model, method)
    tokens, mask = prepare_tokens(model, text, attention_mask)
    inputs = inputs_from_tokens(view, tokens, mask)
    positions = resolve_positions(position, inputs)
    resolved = resolve_target(model, view, target, inputs.batch, logit=logit, metric=True)
    return view, tokens, mask, inputs, positions, resolved


@contextmanager
def frozen_parameters(model: Any) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@dataclass
class GradRun:
    value: Tensor  # [batch] target quantity
    embed: Tensor  # [batch, pos, d_model] the embeddings fed to the blocks (the leaf)
    embed_grad: Tensor  # [batch, pos, d_model]
    acts: dict[str, Tensor]
    grads: dict[str, Tensor]


def forward_with_grads(
    model: Any,
    view: ModelView,
    tokens: Tensor,
    target: Target | MetricTarget,
    positions: Tensor,
    names: Iterable[str] = (),
    *,
    attention_mask: Tensor | None = None,
    embed_override: Callable[[Tensor], Tensor] | None = None,
    extra_fwd_hooks: list[tuple[str, Callable]] = (),
    act_only: Iterable[str] = (),
) -> GradRun:
    """Forward, then backward of the target quantity; activations and gradients at ``names``.

    The target quantity is ``ln_final(resid_final) · direction + bias`` at each row's answer
    position, read from ``ln_final.hook_normalized`` (gradients flow through the final norm,
    scale included, exactly as through the logits); for a `MetricTarget`, the metric of each row's
    logits (``positions`` unused). Rows are independent, so the gradient of
    the sum over rows is each row's own gradient. ``embed_override`` maps the token embeddings
    to what the blocks receive (integrated gradients' interpolation). ``act_only`` names are
    recorded in ``acts`` without a gradient (constants such as rotary cos/sin).
    """
    names = list(dict.fromkeys(names))
    act_only = [n for n in dict.fromkeys(act_only) if n not in names]
    acts: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    captured: dict[str, Tensor] = {}

    def embed_leaf(x: Tensor, hook: Any) -> Tensor:
        x = embed_override(x) if embed_override is not None else x
        captured["embed"] = x.detach().requires_grad_(True)
        return captured["embed"]

    def save(name: str) -> Callable[[Tensor, Any], None]:
        def fn(x: Tensor, hook: Any) -> None:
            acts[name] = x.detach()

        return fn

    def save_grad(name: str) -> Callable[[Tensor, Any], None]:
        def fn(g: Tensor, hook: Any) -> None:
            grads[name] = g.detach()

        return fn

    def keep_normalized(x: Tensor, hook: Any) -> None:
        captured["normalized"] = x

    fwd = [(hooks.EMBED, embed_leaf), *extra_fwd_hooks]
    fwd += [(n, save(n)) for n in names + act_only] + [(hooks.FINAL_NORMALIZED, keep_normalized)]
    bwd = [(n, save_grad(n)) for n in names]
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    metric = isinstance(target, MetricTarget)
    with torch.enable_grad(), frozen_parameters(model), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = model(tokens, return_type="logits" if metric else None, **kwargs)
        if metric:
            value = target.of_logits(logits)
            if not value.requires_grad:
                raise TargetError(f"the metric {target.name} returned a value that does not depend on the logits through "
                                  "torch operations (.item(), .detach() or numpy inside?); gradient methods need one that does")
        else:
            value = target.value(final_input(captured["normalized"], positions, view.norm_weight("ln_final")))
        value.sum().backward()
    missing = [n for n in names if n not in grads]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}; please report this")
    embed = captured["embed"]
    return GradRun(value=value.detach(), embed=embed.detach(), embed_grad=embed.grad.detach(), acts=acts, grads=grads)
