"""Train the 2-layer induction model shipped in ``dpa_lens/datasets/data/induction_2l``.

    HF_HUB_OFFLINE=1 python scripts/train_induction.py        # 2-3 minutes on one idle CPU core

The model is a ``GPT2LMHeadModel``: 2 layers, 4 heads of 32, d_model 128, LayerNorm, the tiny test
tokenizer's 445 ids (embedding tied to the unembedding), 32 positions. It is attention-only in
effect: the MLP output projections (``mlp.c_proj``) are zero, and the MLPs and ``ln_2`` are frozen.
Weights are initialised with standard deviation 0.08 (GPT-2's 0.02 is meant for d_model 768; at
128 it leaves the attention uniform for many hundreds of steps).

Data: `dpa_lens.datasets.induction.sample_repeats`, fresh batches of 64 rows of 32 tokens (BOS,
then distinct ids drawn from ``TOKEN_IDS``) in which a segment of 3..10 tokens recurs once at a
random later place. The loss is the next-token cross-entropy on the predictable tokens of the
repeat only (the rest of a row is unpredictable noise that only slows learning).

Three choices make one clean circuit form in a few hundred steps instead of many thousands:

* the random tokens come from 128 ids (`TOKEN_IDS`), not all 445: the other ids never occur;
* the position table holds fixed sinusoids (not trained; amplitude 0.2, 64 frequencies from 3 to
  0.05 radians per position), so that a previous-token head learned at some positions works at all
  of them, and sharply (high frequencies tell i - 1 from i - 2);
* in each layer, one head (layer 0: head `PREVIOUS_TOKEN_HEAD`, layer 1: head `INDUCTION_HEAD`)
  trains at the full learning rate and the other three at a tenth of it (their weights are
  reparametrised as 0.1 x a trained tensor while training, which is folded back before saving).
  With equal rates all four layer-1 heads become identical induction heads; with this, the fast
  head forms the circuit first and the slow heads are left with nothing to learn.

AdamW (lr 3e-3, 100 warm-up steps, cosine decay, weight decay 0.01 on matrices), 2000 steps, seed
0, one thread, deterministic algorithms: a re-run writes a byte-identical ``model.safetensors`` with
the same torch build. Prints the loss on the first occurrence of the segment and on its repeat
(the same tokens, predicted from the tokens before them) on held-out rows, and the head roles.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.utils.parametrize as parametrize

from dpa_lens.datasets.induction import (
    INDUCTION_HEAD,
    PREVIOUS_TOKEN_HEAD,
    TOKEN_IDS,
    RepeatedTokens,
    sample_repeats,
    segment_losses,
)
from dpa_lens.models.testing import tiny_tokenizer

OUT = Path(__file__).resolve().parents[1] / "dpa_lens" / "datasets" / "data" / "induction_2l"

SEED = 0
SEQ_LEN = 32
SEGMENT = (3, 10)
BATCH = 64
STEPS = 2000
LR = 3e-3
WARMUP = 100
WEIGHT_DECAY = 0.01
SLOW = 0.1  # learning-rate factor of the heads other than the two circuit heads
D_MODEL, N_HEADS, N_LAYERS, D_MLP = 128, 4, 2, 16
INIT_STD = 0.08
POS_SCALE = 0.2  # amplitude of the fixed sinusoidal positions
FREQUENCIES = (3.0, 0.05)  # radians per position, highest and lowest (geometric in between)


class _Scale(torch.nn.Module):
    """Parametrisation ``weight = scale * trained``: scales what the optimiser's steps do to ``weight``."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale)

    def forward(self, trained: torch.Tensor) -> torch.Tensor:
        return trained * self.scale


def build_model(vocab_size: int, bos_id: int):
    """A freshly initialised GPT-2 (see the module docstring), MLPs zeroed and frozen."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size, n_positions=SEQ_LEN, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        initializer_range=INIT_STD, tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=bos_id,
        attn_implementation="eager",  # the same kernel every run, and attention weights for the report
    )
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        pos = torch.arange(SEQ_LEN, dtype=torch.float32)[:, None]
        high, low = FREQUENCIES
        freq = high * (low / high) ** (torch.arange(D_MODEL // 2, dtype=torch.float32) / (D_MODEL // 2 - 1))
        wpe = model.transformer.wpe.weight
        wpe[:, 0::2] = POS_SCALE * torch.sin(pos * freq)
        wpe[:, 1::2] = POS_SCALE * torch.cos(pos * freq)
    model.transformer.wpe.requires_grad_(False)
    for block in model.transformer.h:
        with torch.no_grad():
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
        for module in (block.mlp, block.ln_2):  # the MLP adds exactly 0, before and after training
            module.requires_grad_(False)
    return model


def slow_down_heads(model) -> None:
    """Reparametrise every head but the circuit heads as ``SLOW x`` a trained tensor (same initial weights)."""
    d_head = D_MODEL // N_HEADS
    for layer, fast in (PREVIOUS_TOKEN_HEAD, INDUCTION_HEAD):
        attn = model.transformer.h[layer].attn
        per_head = torch.full((N_HEADS,), SLOW)
        per_head[fast] = 1.0
        qkv_cols = per_head.repeat_interleave(d_head).repeat(3)  # c_attn output columns: q | k | v
        out_rows = per_head.repeat_interleave(d_head)[:, None]  # c_proj input rows
        with torch.no_grad():
            attn.c_attn.weight.div_(qkv_cols)
            attn.c_attn.bias.div_(qkv_cols)
            attn.c_proj.weight.div_(out_rows)
        parametrize.register_parametrization(attn.c_attn, "weight", _Scale(qkv_cols))
        parametrize.register_parametrization(attn.c_attn, "bias", _Scale(qkv_cols))
        parametrize.register_parametrization(attn.c_proj, "weight", _Scale(out_rows))


def fold_heads(model) -> None:
    """Undo `slow_down_heads`: plain weights equal to what the model computed with."""
    for block in model.transformer.h:
        for module, name in ((block.attn.c_attn, "weight"), (block.attn.c_attn, "bias"), (block.attn.c_proj, "weight")):
            if parametrize.is_parametrized(module, name):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


def repeat_loss(model, batch: RepeatedTokens) -> torch.Tensor:
    """Cross-entropy of the predictable tokens of the repeat (scalar)."""
    logits = model(batch.tokens, attention_mask=torch.ones_like(batch.tokens)).logits
    rows, later, earlier = batch.pairs(predictable=True)
    return torch.nn.functional.cross_entropy(logits[rows, later], batch.tokens[rows, later + 1])


def report(model, held_out: RepeatedTokens) -> str:
    """Held-out losses and the two heads' attention scores, one line."""
    model.eval()
    tokens = held_out.tokens
    with torch.no_grad():
        out = model(tokens, attention_mask=torch.ones_like(tokens), output_attentions=True)
    model.train()
    first, repeat = segment_losses(out.logits, held_out)
    rows, later, earlier = held_out.pairs()
    prev = out.attentions[0].diagonal(offset=-1, dim1=2, dim2=3).mean(dim=(0, 2))  # [head]
    ind = out.attentions[1][rows, :, later, earlier + 1].mean(dim=0)  # [head]
    fmt = lambda t: " ".join(f"{float(x):.2f}" for x in t)  # noqa: E731
    return f"first {float(first):.3f}  repeat {float(repeat):.4f}  L0 previous-token [{fmt(prev)}]  L1 induction [{fmt(ind)}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"where to write the model (default {OUT})")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()

    torch.set_num_threads(1)  # one reduction order: bit-exact re-runs
    torch.use_deterministic_algorithms(True)
    tok = tiny_tokenizer()
    vocab, bos = len(tok), tok.bos_token_id
    model = build_model(vocab, bos)
    slow_down_heads(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=LR, betas=(0.9, 0.98),
    )
    schedule = lambda step: min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / args.steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)

    n_ids = TOKEN_IDS.stop  # sample_repeats draws from range(n_ids) without the BOS, 0
    gen = torch.Generator().manual_seed(SEED)
    held_out = sample_repeats(256, SEQ_LEN, SEGMENT, n_ids, bos_id=bos, generator=torch.Generator().manual_seed(SEED + 1))
    print(f"{sum(p.numel() for p in params)} trained parameters; vocab {vocab}, random tokens from ids 1..{n_ids - 1}")
    start = time.time()
    for step in range(args.steps):
        batch = sample_repeats(BATCH, SEQ_LEN, SEGMENT, n_ids, bos_id=bos, generator=gen)
        loss = repeat_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"step {step:5d}  train {loss.item():.3f}  held-out {report(model, held_out)}  ({time.time() - start:.0f} s)",
                  flush=True)

    fold_heads(model)
    model.eval()
    assert all(float(b.mlp.c_proj.weight.abs().max()) == 0.0 for b in model.transformer.h)
    print(f"final  held-out {report(model, held_out)}  ({time.time() - start:.0f} s)")
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    (args.out / "generation_config.json").unlink(missing_ok=True)
    for path in sorted(args.out.iterdir()):
        print(f"  {path.name:24s} {path.stat().st_size:8d} bytes")
    digest = hashlib.sha256((args.out / "model.safetensors").read_bytes()).hexdigest()
    print(f"model.safetensors sha256 {digest}")


if __name__ == "__main__":
    main()
