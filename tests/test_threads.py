"""One model shared by several threads: each call gets its own prompt's result, as if it ran alone.

TransformerLens keeps a forward's hooks on the model, so two threads' forwards at once would cache or
patch each other's activations; dpa_lens holds a lock per model for the whole of each call."""

from __future__ import annotations

import sys
import threading

import torch

import dpa_lens
from tests.helpers import make_tiny

# (prompt, corrupted prompt of the same length, target): other lengths and answers
PROMPTS = [
    ("When Mary and John went to the store, John gave a drink to", "When Mary and John went to the store, Mary gave a drink to", " Mary"),
    ("After Alice and Bob went to the park, Alice gave the ball to", "After Alice and Bob went to the park, Bob gave the ball to", " Bob"),
    ("When Tom and Anna went to the school, Anna gave a book to", "When Tom and Anna went to the school, Tom gave a book to", " Tom"),
    ("When Sarah and James went to the library, James gave a bag to", "When Sarah and James went to the library, Sarah gave a bag to",
     " Sarah"),
]
METHODS = ("dpa", "atp", "activation_patching")


def _call(model, method: str, prompt: str, corrupted: str, target: str):
    return dpa_lens.run(method, model, prompt, target, corrupted=None if method == "dpa" else corrupted, progress=False)


def _same(a, b) -> bool:
    return (a.str_tokens == b.str_tokens and a.target == b.target and torch.equal(a.positions, b.positions)
            and all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in ((a.tokens, b.tokens), (a.heads, b.heads))
                    if x is not None and y is not None))


def test_a_model_shared_by_threads_gives_each_call_its_own_prompts_result(line):
    model, _ = make_tiny("llama", line=line, seed=7)
    jobs = [(m, *p) for m in METHODS for p in PROMPTS]
    expected = {job: _call(model, *job) for job in jobs}  # one thread
    n_threads, rounds = 4, 1
    start = threading.Barrier(n_threads)
    wrong: list[str] = []

    def work(k: int) -> None:
        start.wait()
        for i in range(rounds * len(jobs)):
            job = jobs[(i * (k + 1) + k) % len(jobs)]  # each thread its own order
            try:
                if not _same(_call(model, *job), expected[job]):
                    wrong.append(f"{job[0]} on {job[1]!r}: another result")
            except Exception as err:  # what a race raises, reported below
                wrong.append(f"{job[0]} on {job[1]!r}: {type(err).__name__}: {err}"[:300])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a busy server does
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} of {n_threads * rounds * len(jobs)} calls: " + "; ".join(wrong[:5])


def test_the_lock_is_the_models_own_and_reentrant(line):
    """One lock per model (another model's call does not wait for it), taken again by a method that calls
    another in the same thread; a call made while another thread holds it waits."""
    from dpa_lens.models.tl import model_lock

    model, _ = make_tiny("llama", line=line, seed=7)
    other, _ = make_tiny("llama", line=line, seed=8)
    assert model_lock(model) is model_lock(model) and model_lock(model) is not model_lock(other)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with model_lock(model):
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        dpa_lens.run("dpa", other, PROMPTS[0][0], PROMPTS[0][2])  # another model: runs at once
        result: list = []
        waiter = threading.Thread(target=lambda: result.append(dpa_lens.run("dpa", model, PROMPTS[0][0], PROMPTS[0][2])))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not result  # waits for the holder
    finally:
        done.set()
        holder.join()
    waiter.join(30)
    assert result and _same(result[0], dpa_lens.run("dpa", model, PROMPTS[0][0], PROMPTS[0][2]))
    with model_lock(model):  # re-entrant: a call made while this thread holds the lock runs
        dpa_lens.dpa(model, dpa_lens.cache_for(model, model.to_tokens(PROMPTS[0][0])), PROMPTS[0][2])
