"""Every attribution method by name, with its contract, and one way to run any of them.

Each method registers a `MethodSpec`: what it takes (``"cache"``: a model's ``ActivationCache``;
``"tokens"``: a prompt it runs itself; ``"pair"``: a clean and a corrupted prompt), what it returns
(scores of units, an `Attribution`; or of edges, a `Circuit`), what it scores, the hooks it reads
from a cache, and fixed options for variants (``"atp*"`` is ``atp`` with ``qk_fix=True``). `run`
calls any method the same way, so the report, the command line, the benchmarks and the notebooks
keep no tables of their own::

    dpa_lens.run("dpa", model, prompt, (" Mary", " John"))
    dpa_lens.run("atp*", model, prompt, target, corrupted=corrupted_prompt)
    dpa_lens.run("dla", model, prompt, target, cache=cache)   # reuse a cache you have
    dpa_lens.run("edge_atp", model, prompt, target, corrupted=corrupted_prompt)   # a Circuit

Every registered method, `run` and `cache_for` hold the model's lock (`dpa_lens.models.tl.model_lock`)
for the whole call: TransformerLens keeps a forward's hooks on the model, so a model shared by
threads runs one dpa_lens call at a time, each on its own prompt.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from dpa_lens.errors import InputError
from dpa_lens.forward import made_here
from dpa_lens.models.tl import locked
from dpa_lens.results import Attribution, Circuit, Kind
from dpa_lens.types import Cache, PositionLike, PromptLike, TargetLike, TLModel
from dpa_lens.validation import require_eval

Input = Literal["cache", "tokens", "pair"]
INPUTS: tuple[str, ...] = ("cache", "tokens", "pair")
Returns = Literal["units", "edges"]
RETURNS: tuple[str, ...] = ("units", "edges")
Result = Attribution | Circuit
# the parameters of the three call shapes: not options
_CALL = ("model", "cache", "prompt", "corrupted", "target", "position")


@dataclass(frozen=True)
class MethodSpec:
    """What a method takes and gives.

    Attributes:
        name: the name `run` and `get_method` know it by.
        input: ``"cache"`` (``fn(model, cache, target, position, **options)``), ``"tokens"``
            (``fn(model, prompt, target, position, **options)``) or ``"pair"``
            (``fn(model, prompt, corrupted, target, position, **options)``).
        scores: the kinds of unit scores it returns by default (none for an edge method).
        summary: one line: what a score means.
        returns: ``"units"`` (an `Attribution`) or ``"edges"`` (a `Circuit` on the graph of
            `dpa_lens.graph`).
        hook_names: for cache methods, ``model -> hook names`` it may read (any option included).
        fixed: options that define a variant and cannot be overridden (a method's other options
            keep the function's own defaults: `run` and a direct call give the same result).
        target: whether the score depends on the target (attention baselines do not).
        reference: an exact measurement the approximations are compared with (exact patching).
        metric: it accepts a metric callable ``metric(logits) -> scalar`` as its target.
        contrast: for a cache method that can compare with a corrupted prompt, the option that takes
            the corrupted prompt's cache (`run` makes it from ``corrupted=``).
        fn: the function.
    """

    name: str
    input: Input
    scores: tuple[Kind, ...]
    summary: str
    hook_names: Callable[[TLModel], list[str]] | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)
    target: bool = True
    reference: bool = False
    returns: Returns = "units"
    metric: bool = False
    contrast: str | None = None
    fn: Callable[..., Result] | None = None

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"MethodSpec.input must be one of {INPUTS}, got {self.input!r}")
        if self.returns not in RETURNS:
            raise ValueError(f"MethodSpec.returns must be one of {RETURNS}, got {self.returns!r}")
        if self.input == "cache" and self.hook_names is None:
            raise ValueError(f"cache method {self.name!r} must say which hooks it reads (hook_names)")
        if self.contrast is not None and self.input != "cache":
            raise ValueError(f"contrast names a cache method's option; {self.name!r} takes {self.input!r}")

    @property
    def takes_corrupted(self) -> bool:
        """Whether the method takes a corrupted prompt (it needs one, or it can compare with one)."""
        return self.input == "pair" or self.contrast is not None

    @property
    def uses_cache(self) -> bool:
        """Whether `run` can give the method a cache of the prompt: cache methods read it, pair methods that
        take a clean run (``clean_cache=``) use it as theirs; the others run the model themselves."""
        if self.input == "pair":
            return self.fn is not None and "clean_cache" in inspect.signature(self.fn).parameters
        return self.input == "cache"

    def names_filter(self, model: TLModel) -> Callable[[str], bool]:
        """A ``run_with_cache`` filter caching what this method reads (cache methods only)."""
        if self.hook_names is None:
            raise InputError(f"{self.name} reads no cache (it takes {self.input!r})")
        return _reading(model, [self])


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    """Decorator: make a method findable by ``spec.name``."""

    def add(fn: Callable[..., Result]) -> Callable[..., Result]:
        known = _REGISTRY.get(spec.name)
        if known is not None and getattr(known.fn, "__wrapped__", known.fn) is not fn:
            raise ValueError(f"an attribution method named {spec.name!r} is already registered")
        call = locked(fn)  # one call at a time on a model (TransformerLens's hooks live on it)
        _REGISTRY[spec.name] = replace(spec, fn=call)
        return call

    return add


def register_variant(name: str, base: str, summary: str, **fixed: Any) -> None:
    """Register ``name`` as ``base`` with some options fixed (``register_variant("atp*", "atp", ..., qk_fix=True)``)."""
    spec = get_method(base)
    _REGISTRY[name] = replace(spec, name=name, summary=summary, fixed={**spec.fixed, **fixed})


def get_method(name: str) -> MethodSpec:
    """The `MethodSpec` of a registered method."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(f"no attribution method {name!r}; available: {', '.join(available_methods())}") from None


def available_methods(input: Input | None = None, *, returns: Returns | None = None, metric: bool | None = None) -> list[str]:
    """Names of the registered methods (those taking ``input``, returning ``returns``, accepting a metric, if given)."""
    return sorted(n for n, s in _REGISTRY.items()
                  if (input is None or s.input == input) and (returns is None or s.returns == returns)
                  and (metric is None or s.metric == metric))


def method_table() -> list[dict[str, Any]]:
    """One row per method: name, input, what it returns, scores, summary (for docs and ``dpa-lens methods``)."""
    return [{"method": s.name, "input": s.input, "returns": s.returns, "scores": ", ".join(s.scores) or "edges",
             "summary": s.summary} for s in sorted(_REGISTRY.values(), key=lambda s: s.name)]


def names_filter(model: TLModel, *methods: str) -> Callable[[str], bool]:
    """A ``names_filter`` for ``run_with_cache`` that caches what the given cache-based methods read.

    ``names_filter(model, "dpa", "dla")``; with no method named, what all of them read.
    """
    return _filter(model, methods)


def _filter(model: TLModel, methods: tuple[str, ...]) -> Callable[[str], bool]:
    specs = [get_method(m) for m in methods] if methods else [s for s in _REGISTRY.values() if s.input == "cache"]
    wrong = [s.name for s in specs if s.input != "cache"]
    if wrong:
        raise InputError(f"{wrong} read no cache; cache-based methods: {available_methods('cache')}")
    return _reading(model, specs)


def _reading(model: TLModel, specs: list[MethodSpec]) -> Callable[[str], bool]:
    """The one filter: a hook name passes when one of ``specs`` reads it."""
    wanted = frozenset(n for s in specs for n in s.hook_names(model))
    return lambda name: name in wanted


@locked
def cache_for(
    model: TLModel,
    tokens: Int[Tensor, "batch pos"],
    *methods: str,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    names_filter: Callable[[str], bool] | None = None,
) -> Cache:
    """The ``ActivationCache`` the cache methods ``methods`` read (default ``"dpa"``), from one forward
    of ``tokens`` as lean as the model allows: no autograd graph, fused attention where it applies
    (`dpa_lens.fused_attention`), and no logits at every position (a bridge computes the last
    position's only, a ``HookedTransformer`` none). The methods read the target's value from the
    cached final stream; on a small model the ``[pos, vocab]`` logits are a fifth of the forward's work.

    ``tokens`` are checked as `run` checks them (`dpa_lens.inputs.prepare_tokens`): empty token ids, ids outside the
    vocabulary or more tokens than the model's context are an `InputError`.
    ``names_filter`` caches something else instead, e.g. ``dpa_names_filter(model, checkpoint=True)``.
    ``attention_mask`` goes to the forward as it is (pass the same one to the method)::

        cache = dpa_lens.cache_for(model, tokens)           # what dpa reads
        attr = dpa_lens.dpa(model, cache, (" Mary", " John"))
    """
    from dpa_lens.inputs import prepare_tokens
    from dpa_lens.models import tl
    from dpa_lens.models.fast_attention import fused_attention

    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point():
        raise InputError(f"cache_for takes token ids [batch, pos], got {type(tokens).__name__}: tokenize first, "
                         "tokens = model.to_tokens(prompt) (or dpa_lens.inputs.prepare_tokens(model, prompts) for padded rows)")
    require_eval(model, ", ".join(methods) or "cache_for", dropout_only=True)
    tokens, _ = prepare_tokens(model, tokens)  # run's checks: not empty, ids in the vocabulary, within the context
    if names_filter is None:
        names_filter = _filter(model, methods or ("dpa",))
    elif methods:
        raise InputError("pass methods or names_filter, not both")
    kwargs: dict[str, Any] = tl.lean_logits(model) | ({} if attention_mask is None else {"attention_mask": attention_mask})
    with torch.no_grad(), fused_attention(model):
        _, cache = model.run_with_cache(tokens, names_filter=names_filter, **kwargs)
    return cache


def checked_options(spec: MethodSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options a call of ``spec``'s method gets: ``options`` with the variant's fixed ones; `InputError` for an
    option the method does not have or one its variant fixes (checked before any work: the CLI, dataset runs)."""
    clash = sorted(set(options) & set(spec.fixed))
    if clash:
        raise InputError(f"{spec.name} fixes {', '.join(f'{k}={spec.fixed[k]!r}' for k in clash)}; it cannot be changed")
    merged = {**options, **spec.fixed}
    params = inspect.signature(spec.fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(merged) - set(params))
        if unknown:
            accepted = [p for p in params if p not in _CALL]
            raise InputError(f"{spec.name} has no option {', '.join(unknown)}; its options: {', '.join(accepted)}")
    return merged


@locked
def run(
    method: str,
    model: TLModel,
    prompt: PromptLike,
    target: TargetLike | None,
    *,
    corrupted: PromptLike | None = None,
    cache: Cache | None = None,
    position: PositionLike = -1,
    progress: bool | None = None,
    **options: Any,
) -> Result:
    """Run any registered method on a prompt, the same way for every method.

    Args:
        method: a name of `available_methods` (``"dpa"``, ``"atp*"``, ``"edge_atp"``, ...).
        prompt: a string, a list of strings (padded as ``model.to_tokens`` pads) or token ids.
        target: what to explain (see `dpa_lens.targets`); methods that explain no target accept None.
        corrupted: the corrupted prompt, for methods that take a clean/corrupted pair, and for those
            that can compare with one (``dpa_edges``: contrastive edges).
        cache: an ``ActivationCache`` of ``prompt`` you already have: cache methods read it, pair
            methods use it as the clean run; without one, cache methods run the model once
            (`cache_for`: caching only what they read, computing no logits).
        position: the answer position (see `dpa_lens.inputs.resolve_positions`).
        progress: show (or hide) progress bars, for methods that have them.
        options: the method's own options (see its docstring).

    Returns:
        an `Attribution` (scores of units) or, for an edge method, a `Circuit` (``get_method(name).returns``).
    """
    from dpa_lens.inputs import prepare_tokens

    spec = get_method(method)
    kwargs = checked_options(spec, options)
    if progress is not None and "progress" in inspect.signature(spec.fn).parameters:
        kwargs["progress"] = progress
    if spec.target and target is None:
        raise InputError(f"{spec.name} explains a target: pass one (a token, a (correct, incorrect) pair or a direction)")
    if spec.input == "pair" and corrupted is None:
        raise InputError(f"{spec.name} compares a clean and a corrupted prompt: pass corrupted=...")
    if corrupted is not None and not spec.takes_corrupted:
        raise InputError(f"{spec.name} takes no corrupted prompt (methods that do: "
                         f"{', '.join(n for n in available_methods() if get_method(n).takes_corrupted)})")
    if spec.input == "cache":
        tokens, mask = prepare_tokens(model, prompt)
        made = []  # the caches made here, from this model: not checked against its weights again
        if cache is None:
            cache = cache_for(model, tokens, spec.name, attention_mask=mask)
            made.append(cache)
        elif "tokens" in inspect.signature(spec.fn).parameters:  # a cache given: it must be the prompt's run
            kwargs.setdefault("tokens", tokens)
        if mask is not None:
            kwargs.setdefault("attention_mask", mask)
        if corrupted is not None:
            corrupted_tokens, corrupted_mask = prepare_tokens(model, corrupted)
            kwargs[spec.contrast] = cache_for(model, corrupted_tokens, spec.name, attention_mask=corrupted_mask)
            made.append(kwargs[spec.contrast])
        with made_here(*made):
            return spec.fn(model, cache, target, position, **kwargs)
    if cache is not None and not spec.uses_cache:
        raise InputError(f"{spec.name} takes no cache of the prompt (it runs the model itself, or needs no run): drop cache=")
    if spec.input == "tokens":
        return spec.fn(model, prompt, target, position, **kwargs)
    if cache is not None:
        kwargs.setdefault("clean_cache", cache)
    return spec.fn(model, prompt, corrupted, target, position, **kwargs)


def attribute(method: str, *args: Any, **kwargs: Any) -> Result:
    """Call the function registered as ``method`` with its own signature (see `run` for the uniform one)."""
    spec = get_method(method)
    return spec.fn(*args, **{**kwargs, **spec.fixed})
