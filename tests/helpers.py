"""What several test modules share: the prompts, tiny models, the DPA oracle check, a hand-built model, an edge set.

Test modules import from here (``from tests.helpers import ...``), never from one another; fixtures are in
``conftest.py``.
"""

from __future__ import annotations

import copy

import torch

import dpa_lens
from dpa_lens import Mu
from dpa_lens.models import tl
from dpa_lens.models.convert import _reloadable_tokenizer
from dpa_lens.models.load import load_model
from dpa_lens.models.testing import tiny_hf_model, tiny_tokenizer
from tests.oracles.rewired import rewired_scores

LINES = ["bridge"] + (["hooked"] if tl.hooked_transformer_class() is not None else [])

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"  # the answer flips
PAIR = (" Mary", " John")  # the IO − S logit difference


def make_tiny(family: str = "llama", line: str | None = None, seed: int = 0, **kwargs):
    """(TransformerLens model, untouched transformers reference) for a tiny random model."""
    hf = tiny_hf_model(family, seed=seed, **kwargs)
    ref = copy.deepcopy(hf)
    model = load_model(hf, tokenizer=tiny_tokenizer(), line=line, dtype=kwargs.get("dtype", torch.float32))
    return model, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over a whole score tensor (float64)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ------------------------------------------------------------------ DPA against its oracle
TOL = 1e-4  # float32 scores against the float64 oracle, relative over a whole tensor
MUS = {  # path weights the oracle tests run: the paper's, the extremes and lopsided ones
    "paper_default": Mu.paper_default(),
    "content_only": Mu.content_only(),
    "control_heavy": Mu.control_content(0.1),
    "query_only": Mu.query_key(1.0),
    "key_only": Mu.query_key(0.0),
    "lopsided": Mu(q=0.6, k=0.1, v=0.3, gate=0.8, up=0.2),
}


def oracle_for(attr: dpa_lens.Attribution, ref, tokens, mu: Mu, pair: bool):
    """The DPA oracle's scores (`tests.oracles.rewired`) of the target ``attr`` explains, on the reference model."""
    ids = attr.target["token_ids"][0]
    pos = attr.positions
    rows = torch.arange(tokens.shape[0])
    if pair:
        fn = lambda lg: lg[rows, pos, ids[0]] - lg[rows, pos, ids[1]]  # noqa: E731
    else:
        fn = lambda lg: lg[rows, pos, ids[0]]  # noqa: E731
    return rewired_scores(ref, tokens, fn, mu=(mu.q, mu.k, mu.v, mu.gate, mu.up), positions=pos)


def assert_matches(attr, oracle):
    """DPA's scores equal the oracle's (float32 against float64: 1e-5 relative, or absolute for logits near zero)."""
    assert float((attr.target_value.double() - oracle.value).abs().max()) < 1e-5 * max(1.0, float(oracle.value.abs().max()))
    assert rel_err(attr.tokens, oracle.tokens) < TOL
    assert rel_err(attr.heads, oracle.heads) < TOL
    assert rel_err(attr.neurons, oracle.neurons) < TOL
    assert rel_err(attr.bias, oracle.bias) < TOL if oracle.bias.abs().max() > 0 else attr.bias.abs().max() < 1e-5


# ------------------------------------------------------------------ a HookedTransformer built from a config (3.x)
def hand_built(normalization_type: str, attn_only: bool, seed: int = 0, **fields):
    """A ``HookedTransformer(cfg)`` as a user writes it (3.x), with random norm gains and biases."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    fields = {"n_layers": 2, "d_model": 64, "n_ctx": 32, "d_head": 16, "n_heads": 4, "d_vocab": 512, "act_fn": "gelu", **fields}
    cfg = HookedTransformerConfig(normalization_type=normalization_type, attn_only=attn_only, seed=seed, **fields)
    model = HookedTransformer(cfg, _reloadable_tokenizer(tiny_tokenizer())).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".w", ".b")) or name.startswith("b_") or ".b_" in name:  # norms and biases, not 1 and 0
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model


# ------------------------------------------------------------------ an edge set of every kind (tiny 2-layer models)
OTHER = "After Alice and Bob went to the park, Bob gave a ball to"
OTHER_CORRUPTED = "After Alice and Bob went to the park, Alice gave a ball to"

# Every label, head → head through each path, two query heads of one key/value group (L1H0, L1H1), head → its
# own layer's MLP (not in parallel blocks), embed and MLP writers, and edges into the logit.
EDGES = [("embed", "L0H1", "q"), ("embed", "L0H2", "k"), ("embed", "L0H3", "v"), ("embed", "L0.mlp", "mlp"),
         ("L0H0", "L1H1", "q"), ("L0H1", "L1H0", "k"), ("L0H1", "L1H1", "k"), ("L0H3", "L1H2", "v"), ("L0H2", "L0.mlp", "mlp"),
         ("L0.mlp", "L1H3", "k"), ("L0.mlp", "L1.mlp", "mlp"), ("L0H2", "L1.mlp", "mlp"),
         ("embed", "logit", "logit"), ("L0H1", "logit", "logit"), ("L1H2", "logit", "logit"), ("L1.mlp", "logit", "logit")]


def edges_for(family: str) -> list[tuple[str, str, str]]:
    """`EDGES` that exist in a family's graph (a parallel block's heads do not feed its MLP)."""
    return [e for e in EDGES if not (family == "neox" and e == ("L0H2", "L0.mlp", "mlp"))]  # parallel block
