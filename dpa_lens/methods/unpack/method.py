"""`unpack`: Unpack (arXiv 2605.23393, "Every Component is a Lookup") over a TransformerLens cache,
and `unpack_validate`, its closure checks."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from dpa_lens.errors import InputError, TargetError, UnsupportedModelError
from dpa_lens.forward import CachedForward, read_forward
from dpa_lens.graph import head_name, mlp_name
from dpa_lens.methods.registry import MethodSpec, register
from dpa_lens.methods.unpack.decomposition import AttentionLayer, Decomposition
from dpa_lens.methods.unpack.rules import DT, PRESETS, Preset, normalized, rotate_at
from dpa_lens.methods.unpack.sweep import RowTrace, trace
from dpa_lens.models import hooks
from dpa_lens.models.view import ModelView
from dpa_lens.results import Attribution, Diagnostics, Hop, Path
from dpa_lens.targets import token_id
from dpa_lens.types import Cache, PositionLike, TargetLike, TLModel

# families whose blocks Unpack's rules cover here (the reference's own: GPT-2 and GPT-NeoX)
UNPACK_ARCHITECTURES: dict[str, str] = {
    "GPT2LMHeadModel": "GPT-2",
    "GPTNeoXForCausalLM": "GPT-NeoX / Pythia",
    "LlamaForCausalLM": "Llama (incl. SmolLM2)",
    "Qwen2ForCausalLM": "Qwen2 / Qwen2.5",
}
UNITS = ("percent", "logit")
# the reference's tolerances for its six closure checks (``unpack/validate.py``)
CLOSURE_TOLERANCES: dict[str, float] = {"residual": 1e-4, "key": 1e-2, "query": 1e-2, "qk": 1e-2, "value": 1e-3, "mlp": 0.5}


def unpack_hook_names(model: TLModel) -> list[str]:
    """What Unpack (and `unpack_validate`) read from the cache."""
    view = ModelView(model)
    rules = view.rules
    names = [hooks.EMBED, hooks.FINAL_SCALE, hooks.FINAL_NORMALIZED]
    if _learned_positions(view):
        names.append(hooks.POS_EMBED)
    if view.is_bridge:
        names.append(hooks.TOKENS)
    elif rules.rotary:  # to check the rotary positions of the forward
        names.append(hooks.attn(0, "q"))
    for layer in range(view.n_layers):
        names += [hooks.norm_scale(layer, "ln1"), hooks.norm_scale(layer, "ln2"), hooks.attn(layer, "v"),
                  hooks.attn(layer, "z"), hooks.attn(layer, "pattern"), hooks.mlp(layer, "pre"), hooks.mlp_out(layer),
                  hooks.resid_pre(layer)]
        names += view.qk_hook_names(layer)
        if rules.rotary and view.rotary_from_cache():
            names += [hooks.attn(layer, "cos"), hooks.attn(layer, "sin")]
        if rules.gated:
            names.append(hooks.mlp(layer, "pre_linear"))
        if not rules.parallel:  # the reference reads a sequential MLP at the block input (quirks)
            names += [normalized(layer, "ln1"), normalized(layer, "ln2")]
    names.append(hooks.resid_post(view.n_layers - 1))
    return list(dict.fromkeys(names))


def _learned_positions(view: ModelView) -> bool:
    return getattr(view.cfg, "positional_embedding_type", None) == "standard"


def _check_model(view: ModelView) -> None:
    view.check_supported("Unpack")
    rules = view.rules
    problems = [what for what, has in (("sliding-window attention", rules.sliding_window), ("query-key norms", rules.qk_norm),
                                       ("norms after the sublayers", rules.post_norms),
                                       ("soft caps", rules.attn_softcap is not None or rules.final_softcap is not None),
                                       ("no MLPs (attention only)", not rules.has_mlp)) if has]
    if view.architecture not in UNPACK_ARCHITECTURES or problems:
        what = ", ".join(problems) or f"architecture {view.architecture}"
        raise UnsupportedModelError(f"Unpack in dpa_lens does not support this model ({what}). Supported: "
                                    f"{', '.join(UNPACK_ARCHITECTURES.values())}.")


def _read(model: TLModel, cache: Cache, target: TargetLike | None, position: PositionLike, tokens: Tensor | None,
          attention_mask: Tensor | None) -> CachedForward:
    _check_model(ModelView(model))
    return read_forward(model, cache, target, position, method="Unpack",
                        hook_names=unpack_hook_names(model), filter_hint="dpa_lens.names_filter(model, 'unpack')",
                        tokens=tokens, attention_mask=attention_mask, logit="centered", weights="every")  # it reads W_in, W_gate


def _preset(preset: str | Preset) -> tuple[str, Preset]:
    if isinstance(preset, Preset):
        return repr(preset), preset
    if preset == "default":
        preset = "kqv_aligned"
    if not isinstance(preset, str) or preset not in PRESETS:
        raise InputError(f"unknown Unpack preset {preset!r}; choose one of {', '.join(PRESETS)} (or pass a Preset)")
    return preset, PRESETS[preset]


_ROOT = re.compile(r"L(\d+)(?:H(\d+)|\.mlp)(?:@(\d+))?")


def _parse_root(root: str, view: ModelView) -> tuple[str, int | None]:
    """``"L{layer}H{head}[@pos]"`` or ``"L{layer}.mlp[@pos]"`` -> (node name, position or None)."""
    m = _ROOT.fullmatch(root) if isinstance(root, str) else None
    if m is None:
        raise InputError(f"root must name a head or an MLP, as 'L{{layer}}H{{head}}' or 'L{{layer}}.mlp', optionally "
                         f"with '@{{position}}' (e.g. 'L1H2@5'); got {root!r}")
    layer, head, pos = int(m[1]), m[2], m[3]
    if layer >= view.n_layers or (head is not None and int(head) >= view.n_heads):
        raise InputError(f"root {root!r} names no unit of this model ({view.n_layers} layers of {view.n_heads} heads)")
    return (head_name(layer, int(head)) if head is not None else mlp_name(layer)), (None if pos is None else int(pos))


def _targets(model: TLModel, fwd: CachedForward, distractor: TargetLike | None) -> tuple[list[int], list[int | None]]:
    """Per row: the target token and the distractor (None), from the target given or the top prediction."""
    view = fwd.view
    if fwd.target is None:
        targets: list[int] = _logits(fwd).argmax(-1).tolist()
        others: list[int | None] = [None] * fwd.batch
    else:
        if any(kind == "direction" for kind in fwd.target.logit):
            raise TargetError("Unpack explains a token's logit (or a (target, distractor) pair), not a direction")
        ids = fwd.target.token_ids.tolist()
        targets = [t for t, _ in ids]
        others = [d if d >= 0 else None for _, d in ids]
    if distractor is not None:
        if any(d is not None for d in others):
            raise InputError("the target is already a (target, distractor) pair: do not pass distractor= as well")
        d = token_id(model, distractor, view.d_vocab)
        others = [d] * fwd.batch
    for t, d in zip(targets, others):
        if t == d:
            raise TargetError(f"the distractor is the target itself (token {t}): pass another token")
    return targets, others


@register(MethodSpec(name="unpack", input="cache", scores=("tokens", "heads"), hook_names=unpack_hook_names,
                     summary="Unpack: the target's credit split back through K/Q/V and MLP reads to tokens, with named paths"))
def unpack(
    model: TLModel,
    cache: Cache,
    target: TargetLike | None,
    position: PositionLike = -1,
    *,
    preset: str | Preset = "kqv_aligned",
    root: str | None = None,
    top_paths: int = 20,
    distractor: TargetLike | None = None,
    min_frac: float = 1e-4,
    max_depth: int = 50,
    quirks: bool = True,
    units: str = "percent",
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    progress: bool = True,
) -> Attribution:
    """Unpack: the target's credit split backwards through what every component read, down to the tokens.

    Credit starts at every component's logit-lens score at the answer position (or 1 on ``root``).
    Each component hands its credit to the components it read: a head to its source positions, then
    through its keys, queries and values; an MLP along a direction in its input. Biases drop their
    share. A token's score is the credit that reaches its embedding; paths are the strongest chains.

    Args:
        model: the TransformerLens model that made the cache (GPT-2, GPT-NeoX, Llama or Qwen2 blocks).
        cache: ``ActivationCache`` of ``model.run_with_cache(tokens)`` (all hooks, or
            ``names_filter=dpa_lens.names_filter(model, "unpack")``).
        position, tokens, attention_mask: as for `dpa_lens.dpa`.
        target: a token, or a ``(target, distractor)`` pair (the same as ``distractor=``); None: the
            top prediction. A distractor turns the depth-0 splits toward target minus distractor.
        preset: one of `PRESETS` (``"kqv_aligned"``, Unpack's default; ``"k_only_weighted"``,
            ``"k_only_l2"``, ``"k_only_aligned"``, ``"kqv_weighted"``, ``"kqv_l2"``) or a `Preset`.
        root: explain a unit instead of the target: ``"L{layer}H{head}"`` or ``"L{layer}.mlp"``,
            optionally ``"@{position}"`` (default: the answer position). It gets credit 1 and is split
            with the depth-0 rules (still toward the target).
        top_paths: how many paths to keep per row (strongest first).
        distractor: a token to explain the target against (not with a ``(target, distractor)`` pair).
        min_frac: the recursion's pruning threshold on a path's credit, in logit units (absolute, as
            the reference's; it does not prune token credit).
        max_depth: the deepest hop a path may take.
        quirks: reproduce Unpack's reference code (default), or its consistent variant (the
            differences are in docs/methods/unpack.md).
        units: ``"percent"``: every score in % of the positive token mass (Unpack's token
            attribution; the tokens' positive scores add up to 100); ``"logit"``: raw credit, in units
            of the explained logit.
        progress: a progress bar over layers (per row).

    Returns:
        An `Attribution`:

        * ``tokens [batch, pos]``: token credit (0 at padding);
        * ``heads [batch, layer, pos, head]``: the credit that reached each head at each query
          position (Unpack's component flow; ``totals("heads")`` sums it over positions);
        * ``target_value``: the explained quantity, the target's logit minus the vocabulary mean
          (without quirks and with a distractor: the logit difference);
        * ``paths``: per row, the ``top_paths`` strongest paths, ``embed@s → … → L{l}H{h}[k]@q →
          logit@t``: each hop names the unit that read the previous one, through ``q``, ``k``, ``v``
          or ``mlp``, at its (query) position. ``score`` is in ``units``, ``extra`` has ``"percent"``
          and ``"logit"``. A path's percent is over the positive mass of the recursion's token credit
          (one path can exceed 100). A rerooted path ends with its root, then ``logit``, which stands
          for the root's credit (``… → L1H2[v]@9 → logit@9``), as in `dpa_lens.dpa_paths`;
        * ``settings``: the options; ``diagnostics``: per row ``mlp_flow [batch, layer]`` (credit through
          each layer's MLP, summed over positions, in ``units``), ``suppress_ratio`` (negative over total
          token mass) and ``paths_found``.

    Unpack reads the model's weights as they are: on a processed model (`load_model`'s default) it is
    Unpack of the processed model; on ``load_model(..., processed=False)`` it is Unpack of the raw
    ``transformers`` model, as the reference implementation computes it. See docs/methods/unpack.md for
    the rules, the quirks of the reference code, processed weights and the families beyond GPT-2 and GPT-NeoX.
    """
    name, P = _preset(preset)
    if units not in UNITS:
        raise InputError(f"units must be one of {UNITS}, got {units!r}")
    if isinstance(min_frac, bool) or not isinstance(min_frac, (int, float)) or not min_frac > 0:
        raise InputError(f"min_frac must be a positive number (the pruning threshold in logit units), got {min_frac!r}")
    for what, value in (("top_paths", top_paths), ("max_depth", max_depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{what} must be a non-negative int, got {value!r}")
    fwd = _read(model, cache, target, position, tokens, attention_mask)
    view = fwd.view
    root_node, root_pos = _parse_root(root, view) if root is not None else (None, None)
    targets, others = _targets(model, fwd, distractor)
    b, n, L, H = fwd.batch, fwd.seq_len, view.n_layers, view.n_heads
    dev = fwd.device
    token_scores = torch.zeros(b, n, dtype=DT, device=dev)
    head_scores = torch.zeros(b, L, n, H, dtype=DT, device=dev)
    paths: list[list[Path]] = []
    mlp_flow, suppress, found = [], [], []
    with torch.no_grad():
        for row in range(b):
            dec = Decomposition(fwd, row, P, quirks)
            t = dec.r.local(int(fwd.positions[row]))
            seeds, d_t = dec.target(t, targets[row], others[row])
            q0 = t
            if root_node is not None:
                q0 = t if root_pos is None else dec.r.local(root_pos)
                if q0 is None:
                    raise InputError(f"root position {root_pos} is not a real token of row {row} (sequence of {n}, padding excluded)")
                seeds = torch.zeros_like(seeds)
                seeds[dec.names.index(root_node)] = 1.0
            result = trace(dec, seeds, q0, d_t, min_frac=float(min_frac), max_depth=max_depth, top_paths=top_paths,
                           progress=progress)
            credit = result.credit
            positive, negative = float(credit.clamp_min(0).sum()), float(-credit.clamp_max(0).sum())
            scale = (100.0 / positive if positive > 0 else 0.0) if units == "percent" else 1.0
            idx = dec.r.idx
            token_scores[row, idx] = credit * scale
            for layer in range(L):
                head_scores[row, layer][idx] = result.flow[dec.head_index[layer]].T * scale
            mlp_flow.append([float(result.flow[i].sum()) * scale for i in dec.mlp_index])
            suppress.append(negative / (positive + negative) if positive + negative > 0 else 0.0)
            found.append(result.found)
            paths.append(_paths(result, idx.tolist(), fwd.inputs.str_tokens[row], units, positive > 0))
        value = _target_values(fwd, targets, others, quirks)
    labels = [_label(model, t, d, quirks) for t, d in zip(targets, others)]
    kinds = ["difference" if d is not None and not quirks else "centered" for d in others]
    return Attribution(
        method="unpack",
        tokens=token_scores.float(),
        heads=head_scores.float(),
        target_value=value.float(),
        **fwd.result_fields(),
        paths=paths,
        target={"labels": labels, "token_ids": [[t, -1 if d is None else d] for t, d in zip(targets, others)], "logit": kinds},
        diagnostics=Diagnostics(mlp_flow=torch.tensor(mlp_flow, dtype=torch.float32).reshape(b, -1),
                                suppress_ratio=torch.tensor(suppress, dtype=torch.float32), paths_found=torch.tensor(found)),
        settings={"preset": name, "quirks": quirks, "units": units, "root": root, "top_paths": top_paths, "min_frac": min_frac,
                  "max_depth": max_depth, "beta": P.beta},
    )


def _paths(result: RowTrace, idx: list[int], strs: list[str], units: str, any_credit: bool) -> list[Path]:
    """One row's paths as `Path` objects (positions of the padded sequence), scored in ``units``; a
    path's percent is over the recursion's positive token mass."""
    mass = float(result.path_credit.clamp_min(0).sum())
    out = []
    for hops, raw in result.paths:
        pct = raw / mass * 100 if mass > 0 and any_credit else 0.0
        at = tuple(Hop(node, label, idx[p]) for node, label, p in hops)
        out.append(Path(hops=at, score=pct if units == "percent" else raw, method="unpack", source_token=strs[at[0].position],
                        extra={"percent": pct, "logit": raw}))
    return out


def _label(model: TLModel, t: int, d: int | None, quirks: bool) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    say = (lambda i: repr(tokenizer.decode([i]))) if tokenizer is not None else (lambda i: f"#{i}")
    if d is None:
        return say(t)
    return f"{say(t)} (distractor {say(d)})" if quirks else f"{say(t)} − {say(d)}"


def _logits(fwd: CachedForward) -> Tensor:
    """The logits ``[batch, vocab]`` at each row's answer position (float64)."""
    view, dev = fwd.view, fwd.unembed_device  # where the unembedding is (a split model's last device)
    logits = fwd.final_input().to(dev, DT) @ view.W_U.detach().to(dev, DT)
    logits = logits if view.b_U is None else logits + view.b_U.detach().to(dev, DT)
    return logits.to(fwd.device)


def _target_values(fwd: CachedForward, targets: list[int], others: list[int | None], quirks: bool) -> Tensor:
    """The explained quantity: the target's logit minus the vocabulary mean (or minus the distractor's)."""
    logits = _logits(fwd)
    rows = torch.arange(fwd.batch, device=fwd.device)
    value = logits[rows, torch.tensor(targets, device=fwd.device)]
    against = torch.stack([logits[i].mean() if (d is None or quirks) else logits[i, d] for i, d in enumerate(others)])
    return value - against


# ---------------------------------------------------------------------------------------------- closure checks


@dataclass(frozen=True)
class UnpackClosure:
    """Unpack's six closure checks on a cache (``unpack/validate.py``): each error and its tolerance.

    * ``residual``: the components written before each layer add up to the stream it reads (and all
      of them to the final stream): ``max(|Σ − stream| − 1e-5·|stream|)``, as ``allclose``;
    * ``key`` / ``query``: the key-side (query-side) rows of every component, centred, plus the
      constant terms (norm and projection biases), through the masked softmax, against the pattern:
      max absolute difference; ``qk``: the two reconstructions against each other;
    * ``value``: ``Σ_c <v_c, v>`` plus the constant terms against ``‖v‖²``, over the largest ``‖v‖²``;
    * ``mlp``: 0 when every L2 row is finite and non-negative, else 1.
    """

    errors: dict[str, float]
    tolerances: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(self.errors[k] <= self.tolerances[k] for k in self.errors)

    def failed(self) -> list[str]:
        return [k for k in self.errors if not self.errors[k] <= self.tolerances[k]]


def _closure_layer(A: AttentionLayer, layer: int) -> dict[str, float]:
    """The attention checks of one layer (see `UnpackClosure`): key, query, qk and value errors."""
    view = A.dec.view
    a = view.attn(layer)
    H = view.n_heads
    g = torch.arange(H, device=A.q.device) // A.group
    rows = A.rows(list(range(H)))
    n = A.q.shape[0]

    def bias(b: Tensor | None) -> Tensor:  # a projection's bias per head and position [n, H, d_head], rotated
        b = torch.zeros(n, H, view.d_head, dtype=DT, device=A.q.device) + (0.0 if b is None else b.to(A.q))
        return b if A.cos is None else rotate_at(b, A.cos[:, None], A.sin[:, None], A.adjacent)

    k = A.k[:, g]
    key = A.centred(rows["k"].sum(1) + torch.einsum("qhe,she->hqs", A.q, bias(None if a.b_K is None else a.b_K[g])) / A.scale)
    query = A.centred(rows["q"].sum(1) + torch.einsum("qhe,she->hqs", bias(a.b_Q), k) / A.scale)
    k_rec, q_rec = (x.masked_fill(~A.causal, float("-inf")).softmax(-1) for x in (key, query))
    value = rows["v"].sum(1) + (0.0 if a.b_V is None else torch.einsum("she,he->hs", A.v[:, g], a.b_V[g].to(A.v)))
    norm2 = A.v[:, g].square().sum(-1).T
    return {"key": float((k_rec - A.alpha).abs().max()), "query": float((q_rec - A.alpha).abs().max()),
            "qk": float((k_rec - q_rec).abs().max()), "value": float((value - norm2).abs().max() / norm2.abs().max().clamp_min(1e-12))}


def unpack_validate(model: TLModel, cache: Cache, *, tokens: Tensor | None = None, attention_mask: Tensor | None = None) -> UnpackClosure:
    """Unpack's six closure checks on this cache (every row, real positions), with the reference's
    tolerances (`CLOSURE_TOLERANCES`); ``result.passed`` says whether all hold."""
    fwd = _read(model, cache, None, -1, tokens, attention_mask)
    view = fwd.view
    err = dict.fromkeys(CLOSURE_TOLERANCES, 0.0)
    with torch.no_grad():
        for row in range(fwd.batch):
            dec = Decomposition(fwd, row, PRESETS["kqv_l2"], quirks=False)
            zero = torch.zeros(view.d_model, dtype=DT, device=fwd.device)
            for layer in range(view.n_layers + 1):
                last = layer == view.n_layers
                written = dec.vecs[dec.order < layer].sum(0) if not last else dec.vecs.sum(0)
                stream = dec.r.act(hooks.resid_post(layer - 1) if last else hooks.resid_pre(layer)).to(written.device)
                err["residual"] = max(err["residual"], float(((written - stream).abs() - 1e-5 * stream.abs()).max()))
                if last:
                    break
                for name, e in _closure_layer(dec.attention(layer, zero), layer).items():
                    err[name] = max(err[name], e)
                _, _, l2 = dec.mlp_rows(layer, zero)
                err["mlp"] = max(err["mlp"], 0.0 if bool(torch.isfinite(l2).all() and (l2 >= 0).all()) else 1.0)
    return UnpackClosure(errors=err, tolerances=dict(CLOSURE_TOLERANCES))
