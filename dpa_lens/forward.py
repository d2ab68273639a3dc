"""The forward pass behind a cache, as the methods that read a cache see it; and the prelude of the
methods that compare a clean and a corrupted prompt.

`read_forward` is the one prelude of every cache-based method (DPA, DLA, attention baselines,
DePass, Unpack, circuits): it checks that the cache holds what the method reads and was made by
this model, reads the input tokens and padding, resolves answer positions and the target, and
returns a `CachedForward`. That object then answers, per layer, what the forward computed:
activations in float32 (each on its layer's device, see below), attention patterns (cached, or
recomputed from the cached queries and keys and checked against the head outputs), the rotary
``cos``/``sin`` the forward used, and rotated queries and keys. `read_pair` is the prelude of every
method that runs the model on a clean/corrupted pair (patching, AtP, their edge forms): checks,
aligned tokens, answer positions and target.

Devices. A forward's ``device`` is where the cache holds ``hook_embed``: the device of the model's
embedding, where methods gather their results. On a model whose weights are on one device, every
activation is read there, as it always was. On a model split across devices (`ModelView.split`:
TransformerLens's ``n_devices``, a bridge's ``device_map``), ``layer_devices`` holds each layer's
device (`ModelView.layer_device`, where its weights are) and `CachedForward.act` reads a hook of layer
``l`` on layer ``l``'s device (outside the blocks, on ``device``), so that each layer's step runs where
its weights are; methods move only what flows from layer to layer (DPA's effective target), never weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from torch.profiler import record_function

from dpa_lens.blocks import attention_scores, masked_softmax
from dpa_lens.errors import CacheError
from dpa_lens.inputs import RunInputs, prepare_pair, read_inputs, resolve_positions
from dpa_lens.models import hooks
from dpa_lens.models.tl import grouped_cache
from dpa_lens.models.view import ModelView
from dpa_lens.ops import rotate
from dpa_lens.targets import MetricTarget, Target, final_input, resolve_target, target_values, warn_if_not_predicted
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel, typechecked
from dpa_lens.validation import (
    WeightProbe,
    check_cache_model,
    check_cache_object,
    check_cache_shape,
    check_finite,
    check_hooks,
    check_padding,
    require_eval,
)

Rotary = Callable[[int], tuple[Tensor, Tensor]]


@dataclass
class CachedForward:
    """One cached forward pass of a model, read in dpa_lens's conventions.

    ``positions [batch]`` are the answer positions, ``target`` the resolved target (None for
    methods that take none). ``device`` is where the cache holds ``hook_embed`` (results are gathered
    there); ``layer_devices`` each layer's device on a model split across devices (see the module's note).
    """

    view: ModelView
    cache: Cache
    inputs: RunInputs
    positions: Int[Tensor, " batch"]
    target: Target | None
    device: torch.device
    layer_devices: tuple[torch.device, ...] | None = None  # per layer, where its step runs (a split model); None: all on device
    weight_probe: WeightProbe | None = field(default=None, repr=False)  # DPA's check of the weights its sweep reads
    _rotary: Rotary | None = field(default=None, repr=False)
    _rotary_read: bool = field(default=False, repr=False)

    @property
    def batch(self) -> int:
        return self.inputs.batch

    @property
    def seq_len(self) -> int:
        return self.inputs.seq_len

    def result_fields(self) -> dict:
        """The fields every `Attribution` made from this forward shares: answer positions, the input's
        token ids and strings, the real-token mask and the model's name."""
        return {"positions": self.positions, "token_ids": self.inputs.tokens, "str_tokens": self.inputs.str_tokens,
                "mask": self.inputs.real, "model_name": self.view.name}

    def layer_device(self, layer: int) -> torch.device:
        """Where layer ``layer``'s step runs: its weights' device on a split model, else this forward's device."""
        return self.device if self.layer_devices is None else self.layer_devices[layer]

    @property
    def unembed_device(self) -> torch.device:
        """Where what reads the unembedding runs: its weights' device on a split model, else this forward's device."""
        return self.device if self.layer_devices is None else self.view.unembed_device

    def verify_weights(self) -> None:
        """After a sweep that recorded into ``weight_probe``: `WeightProbe.verify` against this forward's cache
        (`CacheError` where the weights it multiplied are not the cached forward's); nothing without a probe."""
        if self.weight_probe is not None:
            self.weight_probe.verify(self.cache, self.rotary, self.inputs.real)

    def device_for(self, name: str) -> torch.device:
        """Where `act` reads the hook ``name``: a block's hook on its layer's device, any other on this forward's."""
        if self.layer_devices is None:
            return self.device
        layer = hooks.layer_of(name)
        return self.device if layer is None else self.layer_devices[layer]

    def act(self, name: str) -> Tensor:
        """A cached activation, float32, on the device of its layer (`device_for`). With ``use_split_qkv_input`` or
        ``use_attn_in``, HookedTransformer normalises one (equal) copy of the stream per head and caches
        ``ln1``'s scale and output per head: they are read as the one stream's."""
        t = self.cache[name]
        if t.ndim == 4 and name.endswith(("ln1.hook_scale", "ln1.hook_normalized")):
            t = t[:, :, 0]
        return t.to(self.device_for(name)).float()

    @typechecked
    def final_input(self) -> Float[Tensor, "batch d_model"]:
        """What the unembedding reads at each row's answer position (the final norm's output, gain applied)."""
        return final_input(self.cache[hooks.FINAL_NORMALIZED], self.positions, self.view.norm_weight("ln_final")).to(self.device)

    @typechecked
    def target_value(self, target: Target | None = None, positions: Int[Tensor, " batch"] | None = None) -> Float[Tensor, " batch"]:
        """The explained quantity as this forward computed it, from its final norm's cached output: ``target``
        (default this forward's) at ``positions`` (default its answer positions)."""
        target = self.target if target is None else target
        if target is None:
            raise ValueError("this forward explains no target: pass one")
        positions = self.positions if positions is None else positions
        return target_values(target, self.act(hooks.FINAL_NORMALIZED), positions, self.view.norm_weight("ln_final"))

    @typechecked
    def answer_scale(self, name: str = hooks.FINAL_SCALE) -> Float[Tensor, "batch 1"]:
        """A norm's cached scale at each row's answer position."""
        rows = torch.arange(self.batch, device=self.device)
        return self.act(name)[rows, self.positions.to(self.device)]

    # ------------------------------------------------------------------ attention
    @typechecked
    def pattern_mass(self, layer: int) -> Float[Tensor, "batch pos head"]:
        """Σ_j α_ij per query and head: 1 where a query attends anywhere, 0 on padding rows (a value bias
        reaches a head's output times this)."""
        name = hooks.attn(layer, "pattern")
        if hooks.cached(self.cache, name):
            return self.act(name).sum(-1).transpose(1, 2)
        real = self.inputs.real.to(self.layer_device(layer))
        attends = (real.cumsum(-1) > 0).float()  # some real key at or before the query
        return attends[:, :, None].expand(self.batch, self.seq_len, self.view.n_heads)

    def rotary(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """``(cos, sin)`` ``[batch or 1, pos, 1, rotary_dim]`` the forward used at ``layer``, or None."""
        if not self.view.rules.rotary:
            return None
        if not self._rotary_read:
            self._rotary = _rotary_source(self.view, self.cache, self.inputs, self.layer_device)
            self._rotary_read = True
        return self._rotary(layer)

    @typechecked
    def queries_keys(self, layer: int) -> tuple[Float[Tensor, "batch pos head d_head"], Float[Tensor, "batch pos kv_head d_head"]]:
        """Queries and keys as the attention scores see them (after query-key norms and rotary)."""
        names = self.view.qk_hook_names(layer)[:2]
        return self.view.rotated_qk({n: self.act(n) for n in names}, layer, self.rotary(layer))

    @typechecked
    def pattern(self, layer: int, q: Tensor | None = None, k: Tensor | None = None) -> Float[Tensor, "batch head query key"]:
        """The layer's attention pattern: cached, or recomputed from the queries and keys (``q``, ``k``
        if given) with a causal and padding mask, then checked against the cached head outputs."""
        name = hooks.attn(layer, "pattern")
        if hooks.cached(self.cache, name):
            return self.act(name)
        if q is None or k is None:
            q, k = self.queries_keys(layer)
        return _recompute_pattern(self, layer, q, k)


def _recompute_pattern(fwd: CachedForward, layer: int, q: Tensor, k: Tensor) -> Tensor:
    view, real = fwd.view, fwd.inputs.real.to(q.device)
    H, K = view.n_heads, view.n_kv_heads
    n = q.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None, None] & real[:, None, None, :]
    pattern = masked_softmax(attention_scores(view, layer, q, k.repeat_interleave(H // K, dim=2)), ~allowed)
    z = fwd.act(hooks.attn(layer, "z"))
    v = fwd.act(hooks.attn(layer, "v")).repeat_interleave(H // K, dim=2)
    z_hat = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
    err = float(((z_hat - z).abs() * real[:, :, None, None]).max())
    low_precision = fwd.cache[hooks.attn(layer, "z")].dtype in (torch.float16, torch.bfloat16)
    if err > (3e-2 if low_precision else 1e-3) * float(z.abs().max()) + 1e-6:
        raise CacheError(
            f"layer {layer}'s attention pattern could not be recomputed from the cached queries and keys "
            f"(its outputs differ by {err:.2e}): cache the patterns, names_filter=dpa_lens.dpa_names_filter(model)"
        )
    return pattern


def _rotary_source(view: ModelView, cache: Cache, inputs: RunInputs, device_of: Callable[[int], torch.device]) -> Rotary:
    """Per layer, the ``(cos, sin)`` ``[batch or 1, pos, 1, rotary_dim]`` that the forward used, on ``device_of(layer)``."""
    if view.rotary_from_cache():

        def from_cache(layer: int) -> tuple[Tensor, Tensor]:
            cos = cache[hooks.attn(layer, "cos")].to(device_of(layer)).float()
            sin = cache[hooks.attn(layer, "sin")].to(device_of(layer)).float()
            return cos.unsqueeze(2), sin.unsqueeze(2)

        return from_cache

    # HookedTransformer: buffers indexed by the position ids its forward used. With left padding
    # (an attention mask) those start at each row's first real token; check against the cache.
    if hooks.cached(cache, hooks.attn(0, "pattern")):
        pattern = cache[hooks.attn(0, "pattern")]
        attended = pattern.detach().amax(dim=(1, 2)) > 0  # [batch, key]: padded keys get no attention
    else:
        attended = inputs.real.to(cache[hooks.attn(0, "rot_q")].device)
    device = attended.device
    candidates = [(attended.long().cumsum(-1) - 1).clamp(min=0)]
    candidates.append(torch.arange(inputs.seq_len, device=device).expand(inputs.batch, -1))
    rot_q = cache[hooks.attn(0, "rot_q")]
    rel = 1e-3 if rot_q.dtype not in (torch.float16, torch.bfloat16) else 3e-2
    b, n, H, dh = rot_q.shape
    if view.rules.qk_norm:  # the rotation acts on the normalised query
        q = cache[hooks.qk_norm(0, "q", "normalized")].float().reshape(b, n, H, dh)
        gain = view.qk_norm_weight(0, "q")
        q = q * gain.to(q.device) if gain is not None else q
    else:
        q = cache[hooks.attn(0, "q")].float()
    rot_q = rot_q.float()
    cos_buf, sin_buf = view.rotary_buffers(0)
    tol = rel * float(rot_q.abs().max()) + 1e-6
    for pos_ids in candidates:
        pos_ids = pos_ids.to(cos_buf.device)
        cos, sin = cos_buf[pos_ids].float().unsqueeze(2), sin_buf[pos_ids].float().unsqueeze(2)
        pred = rotate(q, cos.to(q.device), sin.to(q.device), view.adjacent_pairs)
        real = attended.to(q.device)[..., None, None]
        if float(((pred - rot_q).abs() * real).max()) <= tol:

            def from_buffers(layer: int, pos_ids: Tensor = pos_ids) -> tuple[Tensor, Tensor]:
                c, s = view.rotary_buffers(layer)
                at, to = pos_ids.to(c.device), device_of(layer)  # each layer's buffers are on its own device
                return c[at].float().unsqueeze(2).to(to), s[at].float().unsqueeze(2).to(to)

            return from_buffers
    raise CacheError(
        "could not reproduce the rotary positions this HookedTransformer forward used (checked "
        "blocks.0.attn.hook_q against hook_rot_q); pass attention_mask= as given to the forward"
    )


def check_cache_shapes(view: ModelView, cache: Cache, inputs: RunInputs) -> None:
    """The cache must hold one run of this model on these inputs (checked where the hooks are cached)."""
    b, n = inputs.batch, inputs.seq_len
    expected = {
        view.q_hook(0): (b, n, view.n_heads, view.d_head),
        hooks.attn(0, "v"): (b, n, view.n_kv_heads, view.d_head),
        hooks.mlp(view.n_layers - 1, "pre"): (b, n, view.d_mlp),
        hooks.FINAL_SCALE: (b, n, 1),
    }
    for name, shape in expected.items():
        if not hooks.cached(cache, name):
            continue
        got = tuple(cache[name].shape)
        if got != shape:
            raise CacheError(
                f"cache[{name!r}] has shape {got}, expected {shape}: the cache was made by another "
                "model or on another input"
            )


_MADE_HERE: ContextVar[frozenset[int]] = ContextVar("dpa_lens_caches_made_here", default=frozenset())


@contextmanager
def made_here(*caches: Cache) -> Iterator[None]:
    """Within it, `read_forward` does not check ``caches`` against the model's weights, nor the model's eval mode:
    `dpa_lens.run` made them from the model a moment ago (`cache_for`, which checked the mode) and hands them to no
    one else, so the checks could only pass."""
    token = _MADE_HERE.set(_MADE_HERE.get() | {id(c) for c in caches})
    try:
        yield
    finally:
        _MADE_HERE.reset(token)


def read_forward(
    model: TLModel,
    cache: Cache,
    target: TargetLike | None,
    position: PositionLike = -1,
    *,
    method: str,
    hook_names: Iterable[str],
    filter_hint: str,
    tokens: Tensor | None = None,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    check_model: bool = True,
    weights: Literal["probe", "every", "default"] = "default",
) -> CachedForward:
    """The prelude of every cache-based method: checks, inputs, positions and target.

    Args:
        method: the method's name, for error messages.
        hook_names: what the method reads from the cache (checked to be there).
        filter_hint: the ``names_filter`` expression that caches them (shown in the error).
        target: the target, or None for methods that explain no target.
        check_model: check that the cache was made by this model's weights (not for a cache `run` made, see `made_here`).
        weights: which weights that check covers beyond ``W_V``, ``W_O`` and ``W_out`` (`check_cache_model`):
            ``"every"``, the queries', keys' and MLP inputs' too (for a method that reads them); ``"probe"``, those
            through the forward's `WeightProbe` (``weight_probe``: the method's sweep records into it and calls its
            ``verify``); ``"default"``, as ``DPA_LENS_CHECK`` says.
    """
    view = ModelView(model)
    made = id(cache) in _MADE_HERE.get()  # by `cache_for` in this call, which checked the mode and the model
    with record_function("dpa_lens.checks"):
        if not made:
            require_eval(model, method, dropout_only=True)  # a forward with dropout made a random cache
        check_cache_object(cache, method)
        cache = grouped_cache(cache, view.n_heads, view.n_kv_heads)  # a cache made with MIB's ungroup_grouped_query_attention
        hook_names = [n for n in hook_names if n != hooks.TOKENS]
        check_cache_shape(view, cache, hook_names)
        check_hooks(cache, hook_names, method=method, filter_hint=filter_hint)
        inputs = read_inputs(view, cache, tokens=tokens, attention_mask=attention_mask)
        check_cache_shapes(view, cache, inputs)
        check_finite(cache, hook_names, method)
        check_padding(inputs.real, cache, given_mask=attention_mask is not None)
        checked = check_model and not made
        if checked:
            check_cache_model(view, cache, every_weight=True if weights == "every" else None)
    positions = resolve_positions(position, inputs)
    resolved = None if target is None else resolve_target(model, view, target, inputs.batch, logit=logit)
    device = cache[hooks.EMBED].device
    layer_devices = tuple(view.layer_device(l) for l in range(view.n_layers)) if view.split else None
    fwd = CachedForward(view=view, cache=cache, inputs=inputs, positions=positions, target=resolved, device=device,
                        layer_devices=layer_devices, weight_probe=WeightProbe(view) if checked and weights == "probe" else None)
    if resolved is not None and hooks.cached(cache, hooks.FINAL_NORMALIZED):  # the logits where the unembedding is (never moved)
        warn_if_not_predicted(model, resolved, fwd.final_input().to(fwd.unembed_device))
    return fwd


@dataclass
class Pair:
    """A clean/corrupted pair of inputs, aligned position by position, with what to explain.

    ``tokens``/``corrupted_tokens [batch, pos]`` are the ids as run, ``mask`` the attention mask both
    runs take (None without padding), ``clean``/``corrupted`` what `RunInputs` says of each, ``positions
    [batch]`` the answer positions and ``target`` the resolved target.
    """

    view: ModelView
    tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"] | None
    clean: RunInputs
    corrupted: RunInputs
    positions: Int[Tensor, " batch"]
    target: Target | MetricTarget

    @property
    def forward_kwargs(self) -> dict:
        """The keyword arguments a forward of these tokens takes (the attention mask, where there is one)."""
        return {} if self.mask is None else {"attention_mask": self.mask}

    def rows(self, index: Int[Tensor, " rows"]) -> Pair:
        """The pair of some rows (``index`` may repeat rows, e.g. one per integration step)."""
        pick = lambda t: t[index.to(t.device)]  # noqa: E731
        return Pair(view=self.view, tokens=pick(self.tokens), corrupted_tokens=pick(self.corrupted_tokens),
                    mask=None if self.mask is None else pick(self.mask), clean=self.clean.rows(index),
                    corrupted=self.corrupted.rows(index), positions=pick(self.positions), target=self.target.rows(index))


def reduce_runs(x: Tensor, runs: int, how: Literal["sum", "mean"] = "sum") -> Tensor:
    """``x [runs·b, ...]``, rows run-major (as `Pair.rows` of ``arange(b).repeat(runs)`` gives them), summed or
    averaged over its runs: ``[b, ...]``."""
    if runs == 1:
        return x
    x = x.reshape(runs, x.shape[0] // runs, *x.shape[1:])
    return x.sum(0) if how == "sum" else x.mean(0)


def read_pair(
    model: TLModel,
    prompt: PromptLike,
    corrupted: PromptLike,
    target: TargetLike,
    position: PositionLike = -1,
    *,
    method: str,
    attention_mask: Tensor | None = None,
    logit: str = "auto",
    metric: bool = False,
    supported: bool = False,
    runs: bool = True,
) -> Pair:
    """The prelude of every method on a clean/corrupted pair: checks, aligned tokens, positions, target.

    Args:
        method: the method's name, for error messages.
        metric: the method accepts a metric callable as its target (`dpa_lens.targets.MetricTarget`).
        supported: the method follows the model's rules (DPA's graph): refuse models it does not cover.
        runs: the method runs the model (which must then be in eval mode).
    """
    view = ModelView(model)
    if supported:
        view.check_supported(method)
    if runs:
        require_eval(model, method)
    tokens, corrupted_tokens, mask, clean_in, corr_in = prepare_pair(model, view, prompt, corrupted, attention_mask)
    positions = resolve_positions(position, corr_in)
    resolved = resolve_target(model, view, target, corr_in.batch, logit=logit, metric=metric)
    return Pair(view=view, tokens=tokens, corrupted_tokens=corrupted_tokens, mask=mask, clean=clean_in, corrupted=corr_in,
                positions=positions, target=resolved)
