"""Indirect object identification (IOI) prompts with corrupted partners, for any tokenizer.

``ioi_dataset(model, n=20, seed=0)`` draws templates, places, objects and two names that are each
a single token (with a leading space) for the model's tokenizer, in both orders: ABB ("When Mary
and John went ..., John gave ... to" -> " Mary") and BAB ("When John and Mary ..."). Each clean
prompt has a corrupted partner of exactly the same token length:

* ``corruption="flip"``: the second subject mention becomes the indirect object (the answer
  flips, so the logit difference changes sign);
* ``corruption="abc"``: the second mention becomes a third name (no repeated name to copy).

The target of a prompt is the pair ``(correct, incorrect)`` = (IO, S). ``corrupt(prompt, io, s)`` makes
the same partner for a sentence of your own.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Literal

from dpa_lens.errors import InputError

TEMPLATES = [
    "When {X} and {Y} went to the {place}, {S2} gave a {obj} to",
    "After {X} and {Y} went to the {place}, {S2} gave a {obj} to",
    "Then, {X} and {Y} went to the {place}. {S2} gave a {obj} to",
    "While {X} and {Y} were working at the {place}, {S2} gave a {obj} to",
    "When {X} and {Y} got a {obj} at the {place}, {S2} decided to give it to",
    "After the lunch, {X} and {Y} went to the {place}. {S2} gave a {obj} to",
    "Friends {X} and {Y} found a {obj} at the {place}. {S2} gave it to",
    "The {place} {X} and {Y} went to had a {obj}. {S2} gave it to",
]
PLACES = ["store", "park", "school", "office", "garden", "station", "market", "library", "beach", "restaurant"]
OBJECTS = ["drink", "book", "ball", "letter", "gift", "key", "bag", "ring", "snack", "computer"]
NAMES = [
    "Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah", "Paul", "Lisa", "David", "Emma",
    "Michael", "Laura", "Daniel", "Kate", "Robert", "Jane", "Chris", "Amy", "Mark", "Rose", "Peter", "Ann",
    "Kevin", "Julia", "Steve", "Helen", "George", "Grace", "Frank", "Alex", "Sam", "Max", "Ben", "Lucy",
]


@dataclass(frozen=True)
class IOIPrompt:
    clean: str
    corrupted: str
    correct: str  # " Mary": the indirect object, the answer of the clean prompt
    incorrect: str  # " John": the subject
    order: Literal["ABB", "BAB"]
    template: int

    @property
    def target(self) -> tuple[str, str]:
        return (self.correct, self.incorrect)


def single_token_names(model: Any, names: list[str] = NAMES) -> list[str]:
    """Names that are one token with a leading space for this model's tokenizer."""
    tok = model.tokenizer
    return [n for n in names if len(tok.encode(" " + n, add_special_tokens=False)) == 1]


def ioi_dataset(
    model: Any, n: int = 20, *, seed: int = 0, corruption: Literal["flip", "abc"] = "flip", templates: list[str] | None = None
) -> list[IOIPrompt]:
    """``n`` IOI prompts with corrupted partners (half ABB, half BAB), reproducible from ``seed``."""
    if corruption not in ("flip", "abc"):
        raise ValueError(f"corruption must be 'flip' or 'abc', got {corruption!r}")
    names = single_token_names(model)
    if len(names) < 3:
        raise ValueError(f"the tokenizer has only {len(names)} single-token names among dpa_lens's list; IOI needs 3")
    templates = templates or TEMPLATES
    rng = random.Random(seed)
    prompts: list[IOIPrompt] = []
    attempts = 0
    while len(prompts) < n:
        attempts += 1
        if attempts > 50 * n:
            raise RuntimeError("could not build IOI prompts whose clean and corrupted versions align; try other templates")
        t = rng.randrange(len(templates))
        io, s, third = rng.sample(names, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        order: Literal["ABB", "BAB"] = "ABB" if len(prompts) % 2 == 0 else "BAB"
        x, y = (io, s) if order == "ABB" else (s, io)
        clean = templates[t].format(X=x, Y=y, S2=s, place=place, obj=obj)
        corrupted = templates[t].format(X=x, Y=y, S2=io if corruption == "flip" else third, place=place, obj=obj)
        if model.to_tokens(clean).shape != model.to_tokens(corrupted).shape:
            continue
        prompts.append(IOIPrompt(clean, corrupted, " " + io, " " + s, order, t))
    return prompts


def corrupt(
    prompt: str, io: str, s: str, *, corruption: Literal["flip", "abc"] = "flip", third: str | None = None, model: Any = None
) -> IOIPrompt:
    """The IOI prompt of a sentence of your own, with its corrupted partner.

    ``prompt`` names the indirect object ``io`` once and the subject ``s`` twice, the second time near the
    end (``"When Mary and John went to the store, John gave a drink to"``, ``io="Mary"``, ``s="John"``).
    The corrupted prompt replaces the last mention of ``s`` by ``io`` (``"flip"``: the answer flips) or by
    ``third`` (``"abc"``). With ``model``, the two prompts must tokenize to the same length (patching
    compares them position by position), and each name must be one token with its leading space.
    """
    if corruption not in ("flip", "abc"):
        raise InputError(f"corruption must be 'flip' or 'abc', got {corruption!r}")
    if corruption == "abc" and not third:
        raise InputError("corruption='abc' replaces the subject's second mention by a third name: pass third='...'")
    io, s = io.strip(), s.strip()
    word = lambda name: re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")  # noqa: E731
    where_io, where_s = [m.start() for m in word(io).finditer(prompt)], [m for m in word(s).finditer(prompt)]
    if len(where_io) != 1 or len(where_s) != 2:
        raise InputError(f"an IOI prompt names the indirect object once and the subject twice; {prompt!r} names {io!r} "
                         f"{len(where_io)} time(s) and {s!r} {len(where_s)} time(s)")
    last = where_s[-1]
    corrupted = prompt[: last.start()] + (io if corruption == "flip" else third.strip()) + prompt[last.end():]
    if model is not None:
        lone = [n for n in (io, s) + ((third.strip(),) if corruption == "abc" else ()) if n not in single_token_names(model, [n])]
        if lone:
            raise InputError(f"{', '.join(repr(' ' + n) for n in lone)} is not one token for this model's tokenizer: the logit "
                             "difference of IOI needs single-token names")
        a, b = model.to_tokens(prompt).shape[-1], model.to_tokens(corrupted).shape[-1]
        if a != b:
            raise InputError(f"the corrupted prompt {corrupted!r} has {b} tokens and the prompt {a}: they must align position "
                             "by position; choose names of the same token length")
    order: Literal["ABB", "BAB"] = "ABB" if where_io[0] < where_s[0].start() else "BAB"
    return IOIPrompt(prompt, corrupted, " " + io, " " + s, order, -1)
