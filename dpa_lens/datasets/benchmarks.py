"""The authors' benchmark prompts (Known 1000 and IOI), shipped with dpa_lens, and their filter.

``known_1000()`` and ``ioi_benchmark()`` read the packaged copies (or a path you give, e.g.
``../shared/data/known_1000.json``); ``answered_correctly`` keeps the prompts a model gets right
the way the authors did: the answer's first token is the model's top-1 prediction with
probability above 0.1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Fact:
    """A Known 1000 fact: ``prompt`` should be completed by ``answer`` (leading space included)."""

    prompt: str
    answer: str
    subject: str
    relation: str


@dataclass(frozen=True)
class IOIItem:
    """An IOI prompt of the benchmark, with the subject and a corrupted partner (subject's second
    mention replaced by the indirect object, so the answer flips)."""

    prompt: str
    corrupted: str
    correct: str
    incorrect: str

    @property
    def target(self) -> tuple[str, str]:
        return (self.correct, self.incorrect)


def _read(name: str, path: str | Path | None) -> list[dict[str, Any]]:
    source = Path(path) if path is not None else files("dpa_lens.datasets") / "data" / name
    return json.loads(source.read_text(encoding="utf-8"))


def known_1000(path: str | Path | None = None) -> list[Fact]:
    """The Known 1000 facts (1209 prompts) of ROME, as the DPA authors used them."""
    return [Fact(d["prompt"], " " + d["attribute"], d["subject"], d["relation_id"]) for d in _read("known_1000.json", path)]


def ioi_benchmark(path: str | Path | None = None) -> list[IOIItem]:
    """The authors' IOI prompts (841), each with its subject and a flipped corrupted partner."""
    items = []
    for d in _read("ioi.json", path):
        prompt, io = d["prompt"], d["answer"]
        names = re.findall(r"\b[A-Z][a-z]+\b", prompt)
        subjects = [n for n in set(names) if n != io and names.count(n) >= 2]
        if len(subjects) != 1:
            continue
        s = subjects[0]
        start = prompt.rfind(s)
        corrupted = prompt[:start] + io + prompt[start + len(s) :]
        items.append(IOIItem(prompt, corrupted, " " + io, " " + s))
    return items


def answered_correctly(model: Any, prompts: Sequence[str], answers: Sequence[str], min_prob: float = 0.1) -> list[int]:
    """Indices of the prompts whose answer's first token is the top-1 prediction with p > ``min_prob``."""
    keep = []
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        first = model.tokenizer.encode(answer, add_special_tokens=False)[0]
        with torch.no_grad():
            probs = model(prompt)[0, -1].float().softmax(-1)
        if int(probs.argmax()) == first and float(probs[first]) > min_prob:
            keep.append(i)
    return keep
