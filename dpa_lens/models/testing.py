"""Tiny randomly initialised models, built offline, for tests and examples.

``tiny_hf_model("llama")`` builds a small ``transformers`` model of a family from its config
(no hub); ``tiny_model("llama")`` wraps it with `load_model` on the installed TransformerLens
line. Weights are scaled up from the HuggingFace default so that attention patterns are peaked
and the gates non-linear (a default-initialised tiny model attends almost uniformly, which would
let a wrong query/key rule pass unnoticed); norm weights and biases are random for the same reason.
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any

import torch

from dpa_lens.models.load import Line, load_model

# A small corpus for the tiny tokenizer: IOI-style sentences, facts, filler. Byte-level BPE keeps
# every string encodable; common words and names become single tokens with a leading space.
_NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Anna", "James", "Sarah", "Paul", "Lisa"]
_PLACES = ["store", "park", "school", "office", "garden", "station", "market", "library"]
_OBJECTS = ["drink", "ball", "book", "letter", "gift", "key", "bag", "ring"]


def _corpus() -> list[str]:
    lines = []
    for i, a in enumerate(_NAMES):
        b = _NAMES[(i + 3) % len(_NAMES)]
        for place, obj in zip(_PLACES, _OBJECTS):
            lines.append(f"When {a} and {b} went to the {place}, {b} gave a {obj} to {a}.")
            lines.append(f"After {a} and {b} went to the {place}, {a} gave the {obj} to {b}.")
    lines += [
        "The Eiffel Tower is in Paris.",
        "The Colosseum is in Rome.",
        "The capital of France is Paris.",
        "Hello world! This is a small test of the tokenizer, with numbers 0 1 2 3 4 5 6 7 8 9.",
    ]
    return lines * 3


@functools.cache
def _tokenizer_folder(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    special = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=special, eos_token=special, pad_token=special, unk_token=special
    )
    folder = tempfile.mkdtemp(prefix="dpa_lens_tiny_tok_")
    tok.save_pretrained(folder)
    return folder


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on a built-in corpus (deterministic, offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_folder(vocab_size))


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2", "neox")
SLIDING_WINDOW = 4  # tiny windows, so that prompts of a dozen tokens reach past them


def _config(family: str, *, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, d_mlp: int,
            vocab_size: int, init_scale: float) -> tuple[Any, Any]:
    import transformers as hf

    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=init_scale,
        **ids,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if family == "llama":
        return hf.LlamaConfig(**common, rope_parameters=rope), hf.LlamaForCausalLM
    if family == "mistral":  # every layer attends within the window
        return hf.MistralConfig(**common, rope_parameters=rope, sliding_window=SLIDING_WINDOW), hf.MistralForCausalLM
    if family == "qwen2":  # biases on q, k, v
        return hf.Qwen2Config(**common, rope_parameters=rope, use_sliding_window=False), hf.Qwen2ForCausalLM
    if family == "qwen3":  # query-key norm, head_dim apart from d_model / n_heads
        return hf.Qwen3Config(**common, rope_parameters=rope, head_dim=24, use_sliding_window=False), hf.Qwen3ForCausalLM
    if family == "gemma2":  # GeGLU, norms around the sublayers, both soft caps, sliding windows
        config = hf.Gemma2Config(
            **common, rope_parameters=rope, head_dim=16, query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh",
            sliding_window=SLIDING_WINDOW, layer_types=alternating, attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
        )
        return config, hf.Gemma2ForCausalLM
    if family == "gemma3":  # Gemma 2 plus query-key norm, local and global rotary bases
        config = hf.Gemma3TextConfig(
            **common, head_dim=16, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh",
            sliding_window=SLIDING_WINDOW, layer_types=alternating,
            rope_parameters={"full_attention": dict(rope, rope_theta=100000.0), "sliding_attention": rope},
        )
        return config, hf.Gemma3ForCausalLM
    if family == "gpt2":  # LayerNorm, GELU MLP, learned positions, biases everywhere
        config = hf.GPT2Config(
            vocab_size=vocab_size, n_positions=256, n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp,
            activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=init_scale, **ids,
        )
        return config, hf.GPT2LMHeadModel
    if family == "neox":  # parallel attention and MLP, partial rotary (Pythia)
        config = hf.GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=d_mlp, hidden_act="gelu", max_position_embeddings=256, layer_norm_eps=1e-5,
            initializer_range=init_scale, use_parallel_residual=True,
            rope_parameters=dict(rope, partial_rotary_factor=0.5), **ids,
        )
        return config, hf.GPTNeoXForCausalLM
    raise ValueError(f"unknown tiny model family {family!r}; choose from {FAMILIES}")


def tiny_hf_model(
    family: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 96,
    vocab_size: int = 512,
    init_scale: float = 0.2,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A small random ``transformers`` causal LM of the given family (see `FAMILIES`), in eval mode.

    Norm gains and biases are random (not 1 and 0), and the embedding of the pad token (id 0, also
    BOS) is not zero, so that every term of every family's forward is exercised.
    """
    config, cls = _config(family, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                          d_mlp=d_mlp, vocab_size=vocab_size, init_scale=init_scale)
    config.architectures = [cls.__name__]
    config._name_or_path = f"tiny-{family}"
    torch.manual_seed(seed)
    model = cls(config)
    gen = torch.Generator().manual_seed(seed + 1)
    offset = 0.0 if family.startswith("gemma") else 1.0  # Gemma's RMSNorm stores w for a gain of 1 + w
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                if name.endswith("bias"):
                    param.copy_(0.2 * torch.randn(param.shape, generator=gen))
                else:
                    param.copy_(offset + 0.3 * torch.randn(param.shape, generator=gen))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
        embed = model.get_input_embeddings().weight
        embed[0] = init_scale * torch.randn(embed.shape[1], generator=gen)
    return model.to(dtype).eval()


def tiny_model(family: str = "llama", *, line: Line | None = None, seed: int = 0, **kwargs: Any) -> Any:
    """`tiny_hf_model` wrapped by `load_model` (a bridge on TransformerLens 4.x)."""
    dtype = kwargs.get("dtype", torch.float32)
    return load_model(tiny_hf_model(family, seed=seed, **kwargs), tokenizer=tiny_tokenizer(), line=line, dtype=dtype)
