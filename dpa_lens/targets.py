"""What an attribution explains: target forms, turned into directions in the unembedding's space.

Accepted target forms (``target=`` of every method):

* a token id (``int``), or a single-token string such as ``" Mary"``: that token's logit;
* a tuple ``(correct, incorrect)`` of two such tokens: the logit difference, as IOI uses;
* a direction, a float tensor ``[d_model]``: the quantity ``ln_final(resid) · direction``
  (a token target is the special case ``direction = W_U[:, id]``);
* one of these per batch row: a ``list`` of length batch, an int tensor ``[batch]`` (ids),
  ``[batch, 2]`` (pairs) or a float tensor ``[batch, d_model]`` (directions);
* for the methods that run the model (``dpa_lens.available_methods(metric=True)``: AtP, activation
  patching, the gradient methods), a metric as TransformerLens users write them,
  ``metric(logits) -> scalar tensor`` (`MetricTarget`). It is applied to each batch row's logits
  ``[1, pos, vocab]`` on its own (the row as it was run, padding included), so values stay per row;
  it reads the positions it wants (``position`` does not reach it) and must be differentiable for
  the gradient methods. Cache methods (DPA, DLA) follow a linear direction and cannot take one.

Tuples are pairs and lists are per-row targets, so ``(a, b)`` is always a logit difference.

Which logit: TransformerLens centres the unembedding (``W_U`` minus its mean over the vocabulary),
which shifts every logit at a position by the same amount. A token target explains the model's
**raw** logit when that shift is known (models from `dpa_lens.load_model`, or an uncentred
``W_U``), else the centred logit; ``Target.logit`` says which. Differences are unaffected.

Where processing left the final LayerNorm's bias ``β`` (``fold_ln=False``), the target's biases hold
its share (``β·W_U[:, y]``, ``β·direction``), as ``fold_ln`` puts it in ``b_U``: ``x̂``, what the
target is applied to, is the final norm's output before its bias.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from dpa_lens.errors import TargetError
from dpa_lens.models.view import ModelView
from dpa_lens.ops import softcap_ratio
from dpa_lens.types import typechecked

LogitKind = Literal["raw", "centered", "difference", "direction"]
Metric = Callable[[Tensor], Tensor]


@typechecked
@dataclass
class Target:
    """A resolved target, one row per batch element.

    The explained quantity of a row is ``Σ_k signs[k]·cap(x̂ · columns[k] + column_bias[k])`` for
    token targets (``cap`` is the model's final-logit soft cap, or nothing), and ``x̂ · direction +
    bias`` for a direction, where ``x̂`` is the final norm's output at the answer position (before the
    norm's bias, whose share the biases hold; zero unless processing left the bias).
    """

    directions: Float[Tensor, "batch d_model"]  # Σ signs·columns (uncapped), or the direction
    bias: Float[Tensor, " batch"]
    labels: list[str]
    token_ids: Int[Tensor, "batch 2"]  # (correct, incorrect); -1 where not a token
    logit: list[LogitKind]
    columns: Float[Tensor, "batch 2 d_model"] | None = None
    column_bias: Float[Tensor, "batch 2"] | None = None
    signs: Float[Tensor, "batch 2"] | None = None  # +1, -1, or 0 where unused (direction rows)
    final_softcap: float | None = None

    @property
    def batch(self) -> int:
        return self.directions.shape[0]

    def rows(self, index: Tensor) -> Target:
        """The target of some rows (``index`` may repeat rows, e.g. one per integration step)."""
        idx = index.tolist()
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return Target(
            directions=pick(self.directions),
            bias=pick(self.bias),
            labels=[self.labels[i] for i in idx],
            token_ids=self.token_ids[index.cpu()],
            logit=[self.logit[i] for i in idx],
            columns=pick(self.columns),
            column_bias=pick(self.column_bias),
            signs=pick(self.signs),
            final_softcap=self.final_softcap,
        )

    def value(self, x: Float[Tensor, "batch d_model"]) -> Float[Tensor, " batch"]:
        """The explained quantity from the final norm's output at the answer positions (differentiable)."""
        plain = (x * self.directions.to(x)).sum(-1) + self.bias.to(x)
        if self.final_softcap is None:
            return plain
        logits = torch.einsum("bd,bkd->bk", x, self.columns.to(x)) + self.column_bias.to(x)
        capped = self.final_softcap * torch.tanh(logits / self.final_softcap)
        tokens = (self.signs.to(x) * capped).sum(-1)
        return torch.where(self.signs.to(x).abs().sum(-1) > 0, tokens, plain)

    def linearized(self, x: Float[Tensor, "batch d_model"]) -> tuple[Tensor, Tensor]:
        """Direction and bias with the final soft cap replaced by its secant at ``x`` (DPA's rule):
        ``x̂·direction + bias`` equals `value`."""
        if self.final_softcap is None:
            return self.directions, self.bias
        logits = torch.einsum("bd,bkd->bk", x, self.columns.to(x)) + self.column_bias.to(x)
        weight = self.signs.to(x) * softcap_ratio(logits, self.final_softcap)
        token_rows = self.signs.to(x).abs().sum(-1) > 0
        directions = torch.where(token_rows[:, None], torch.einsum("bk,bkd->bd", weight, self.columns.to(x)), self.directions.to(x))
        bias = torch.where(token_rows, (weight * self.column_bias.to(x)).sum(-1), self.bias.to(x))
        return directions, bias

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels, "token_ids": self.token_ids.tolist(), "logit": self.logit}


@dataclass
class MetricTarget:
    """A metric as the target: ``metric(logits) -> scalar``, TransformerLens's convention
    (``transformer_lens.patching``, ``attribution_patch``), applied to each batch row's logits
    ``[1, pos, vocab]`` on its own so that the explained value stays one per row."""

    metric: Metric
    name: str
    batch: int

    def rows(self, index: Tensor) -> MetricTarget:
        """The target of some rows (the same metric)."""
        return MetricTarget(self.metric, self.name, len(index))

    def of_logits(self, logits: Float[Tensor, "batch pos vocab"]) -> Float[Tensor, " batch"]:
        """The metric of each row's logits (differentiable when the metric is)."""
        values = []
        for row in logits.split(1):
            value = self.metric(row)
            if not isinstance(value, Tensor) or value.numel() != 1:
                got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise TargetError(f"the metric {self.name} must return a scalar tensor for one row's logits [1, pos, vocab], "
                                  f"got {got}")
            values.append(value.reshape(()).float())
        out = torch.stack(values)
        if not bool(torch.isfinite(out.detach()).all()):
            raise TargetError(f"the metric {self.name} returned {out.detach().tolist()} (not finite) for these logits: its scores "
                              "would be NaN; check the metric (a division by zero, a log of 0?)")
        return out

    def describe(self) -> dict[str, Any]:
        return {"labels": [f"metric {self.name}"] * self.batch, "token_ids": [[-1, -1]] * self.batch, "logit": ["metric"] * self.batch}


def _metric_name(metric: Any) -> str:
    name = getattr(metric, "__name__", None) or getattr(getattr(metric, "func", None), "__name__", None)  # functools.partial
    return name or type(metric).__name__


def token_id(model: Any, token: int | str | Tensor, d_vocab: int) -> int:
    """A single token id from an int or a string that tokenizes to exactly one token."""
    if isinstance(token, Tensor):
        if token.numel() != 1 or token.dtype.is_floating_point:
            raise TargetError(f"a token tensor must hold one integer id, got shape {tuple(token.shape)} {token.dtype}")
        token = int(token.item())
    if isinstance(token, bool):
        raise TargetError("a target cannot be a bool")
    if isinstance(token, np.integer):  # an id from numpy (argmax over numpy logits, say)
        token = int(token)
    if isinstance(token, int):
        if not 0 <= token < d_vocab:
            raise TargetError(f"token id {token} is out of the vocabulary (0 .. {d_vocab - 1})")
        return token
    if isinstance(token, str):
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise TargetError("the model has no tokenizer, so string targets cannot be read; pass token ids")
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            pieces = [tokenizer.decode([i]) for i in ids]
            hint = ""
            if not token.startswith(" ") and len(tokenizer.encode(" " + token, add_special_tokens=False)) == 1:
                hint = f" Did you mean {' ' + token!r} (with a leading space)?"
            raise TargetError(
                f"target {token!r} is {len(ids)} tokens, {pieces} (ids {ids}); a target must be one "
                f"token. Pass one of these ids, or a single-token string.{hint}"
            )
        return int(ids[0])
    raise TargetError(f"cannot read a token from {type(token).__name__}: {token!r}")


def _label(model: Any, tid: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return repr(tokenizer.decode([tid])) if tokenizer is not None else f"#{tid}"


def _per_row(target: Any, batch: int) -> list[Any]:
    if isinstance(target, np.ndarray):
        target = torch.from_numpy(target)
    if isinstance(target, Tensor):
        if target.dtype.is_floating_point:
            if target.ndim == 1:
                return [target] * batch
            if target.ndim == 2:
                if target.shape[0] != batch:
                    raise TargetError(f"{target.shape[0]} direction rows for a batch of {batch}")
                return list(target)
            raise TargetError(f"a direction must be [d_model] or [batch, d_model], got {tuple(target.shape)}")
        if target.ndim == 0:
            return [target] * batch
        if target.ndim == 1:
            if target.shape[0] != batch:
                raise TargetError(f"{target.shape[0]} target ids for a batch of {batch}")
            return list(target)
        if target.ndim == 2 and target.shape[1] == 2:
            if target.shape[0] != batch:
                raise TargetError(f"{target.shape[0]} target pairs for a batch of {batch}")
            return [tuple(row) for row in target]
        raise TargetError(f"an id tensor must be [batch] or [batch, 2], got {tuple(target.shape)}")
    if isinstance(target, list):
        if len(target) != batch:
            raise TargetError(
                f"a list target gives one target per batch row: got {len(target)} for a batch of {batch} "
                "(use a tuple (correct, incorrect) for a logit difference)"
            )
        return target
    return [target] * batch


def resolve_target(model: Any, view: ModelView, target: Any, batch: int, *, logit: str = "auto",
                   metric: bool = False) -> Target | MetricTarget:
    """Turn any accepted target form into per-row directions (float32) on the model's device.

    Args:
        logit: for token targets, ``"raw"`` (error if the raw logit cannot be recovered),
            ``"centered"``, or ``"auto"`` (raw when possible, else centred, with a warning).
        metric: accept a metric ``metric(logits) -> scalar`` (a `MetricTarget`), for methods that
            run the model; otherwise a callable is a `TargetError`.
    """
    if callable(target) and not isinstance(target, (Tensor, np.ndarray)):
        if metric:
            return MetricTarget(target, _metric_name(target), batch)
        raise TargetError(
            f"a metric ({_metric_name(target)}) cannot be explained from a cache: DPA and DLA follow a linear target "
            "direction through the network. Pass a token (' Mary'), a (correct, incorrect) pair or a direction "
            "[d_model]; metrics work with the methods that run the model: dpa_lens.available_methods(metric=True)."
        )
    if logit not in ("auto", "raw", "centered"):
        raise TargetError(f"logit must be 'auto', 'raw' or 'centered', got {logit!r}")
    W_U = view.W_U.detach()
    device = W_U.device
    b_U = view.b_U
    offset = view.raw_unembed_offset() if logit != "centered" else None
    if logit == "raw" and offset is None:
        raise TargetError(
            "the raw logit cannot be recovered: this model's unembedding was centred and dpa_lens does "
            "not know the mean that was removed. Load the model with dpa_lens.load_model, or use "
            "logit='centered' (or a (correct, incorrect) pair, which both agree on)."
        )

    def column(tid: int) -> tuple[Tensor, Tensor]:
        vec = W_U[:, tid].float()
        bias = b_U[tid].float() if b_U is not None else torch.zeros((), device=device)
        return vec, bias

    beta = view.norm_bias("ln_final")  # an unfolded final LayerNorm bias: its share of a direction
    directions, biases, labels, ids, kinds, columns, cbias, signs = [], [], [], [], [], [], [], []
    zero_col, zero = torch.zeros(view.d_model, device=device), torch.zeros((), device=device)
    warned = False
    for row in _per_row(target, batch):
        if isinstance(row, Tensor) and row.dtype.is_floating_point:
            if row.shape != (view.d_model,):
                raise TargetError(f"a direction must have shape [d_model={view.d_model}], got {tuple(row.shape)}")
            if not torch.isfinite(row).all():
                raise TargetError("the direction has non-finite entries")
            directions.append(row.detach().to(device).float())
            biases.append(torch.zeros((), device=device) if beta is None else beta.to(device) @ directions[-1])
            labels.append("direction")
            ids.append((-1, -1))
            kinds.append("direction")
            columns.append(torch.stack([zero_col, zero_col]))
            cbias.append(torch.stack([zero, zero]))
            signs.append((0.0, 0.0))
        elif isinstance(row, tuple):
            if len(row) != 2:
                raise TargetError(f"a tuple target must be (correct, incorrect), got {len(row)} entries")
            good, bad = (token_id(model, t, view.d_vocab) for t in row)
            if good == bad:
                raise TargetError(
                    f"the (correct, incorrect) pair names the same token twice ({_label(model, good)!r}): "
                    "its logit difference is 0 whatever the model does"
                )
            (vg, bg), (vb, bb) = column(good), column(bad)
            directions.append(vg - vb)
            biases.append(bg - bb)
            labels.append(f"{_label(model, good)} − {_label(model, bad)}")
            ids.append((good, bad))
            kinds.append("difference")
            columns.append(torch.stack([vg, vb]))
            cbias.append(torch.stack([bg, bb]))
            signs.append((1.0, -1.0))
        else:
            tid = token_id(model, row, view.d_vocab)
            vec, bias = column(tid)
            if offset is not None:
                vec, bias = vec + offset[0].to(device).float(), bias + offset[1].to(device).float()
                kinds.append("raw")
            else:
                kinds.append("centered")
                if logit == "auto" and not warned:
                    uncentred = ("model.enable_compatibility_mode(center_unembed=False)" if view.is_bridge
                                 else "HookedTransformer.from_pretrained(..., center_unembed=False)")
                    warnings.warn(
                        "explaining the centred logit (TransformerLens centred this model's unembedding and "
                        "the raw one is unknown); to explain the raw logit, load the model with "
                        f"dpa_lens.load_model or build it with {uncentred}; or use a (correct, incorrect) "
                        "pair, the same under both",
                        stacklevel=3,
                    )
                    warned = True
            directions.append(vec)
            biases.append(bias)
            labels.append(_label(model, tid))
            ids.append((tid, -1))
            columns.append(torch.stack([vec, zero_col]))
            cbias.append(torch.stack([bias, zero]))
            signs.append((1.0, 0.0))
    return Target(
        directions=torch.stack(directions),
        bias=torch.stack(biases),
        labels=labels,
        token_ids=torch.tensor(ids, dtype=torch.long),
        logit=kinds,
        columns=torch.stack(columns),
        column_bias=torch.stack(cbias),
        signs=torch.tensor(signs, device=device),
        final_softcap=view.rules.final_softcap,
    )


def target_values(
    target: Target,
    normalized_final: Float[Tensor, "batch pos d_model"],
    positions: Int[Tensor, " batch"],
    ln_final_weight: Float[Tensor, " d_model"] | None = None,
) -> Float[Tensor, " batch"]:
    """The explained quantity as the model computed it, from ``ln_final.hook_normalized``."""
    return target.value(final_input(normalized_final, positions, ln_final_weight))


@typechecked
def final_input(
    normalized_final: Float[Tensor, "batch pos d_model"], positions: Int[Tensor, " batch"], ln_final_weight: Tensor | None = None
) -> Float[Tensor, "batch d_model"]:
    """The final norm's output at each row's answer position (what the unembedding reads)."""
    rows = torch.arange(normalized_final.shape[0], device=normalized_final.device)
    x = normalized_final[rows, positions.to(normalized_final.device)].float()
    return x * ln_final_weight.to(x.device) if ln_final_weight is not None else x


def warn_if_not_predicted(model: Any, target: Target, final: Float[Tensor, "batch d_model"]) -> None:
    """Warn when a token target written without its leading space (``"Mary"``) is not what the model
    predicts but the same word with the space (``" Mary"``) is: the usual slip with word-initial tokens."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return
    slips = [(row, tid, text) for row, ((tid, _), kind) in enumerate(zip(target.token_ids.tolist(), target.logit))
             if kind in ("raw", "centered") and not (text := tokenizer.decode([tid])).startswith(" ")]
    if not slips:  # no row can be the slip: the logits (a [batch, vocab] product) are not needed
        return
    view = ModelView(model)
    logits = final.float() @ view.W_U.detach().float().to(final.device)
    predicted = (logits + (view.b_U.float().to(final.device) if view.b_U is not None else 0.0)).argmax(-1).tolist()
    for row, tid, text in slips:
        if tokenizer.decode([predicted[row]]) == " " + text:
            warnings.warn(f"explaining {text!r} (token {tid}), but the model predicts {' ' + text!r} here: did you mean "
                          f"{' ' + text!r}, with the leading space?", stacklevel=4)
            return
