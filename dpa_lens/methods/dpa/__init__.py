"""Dual Path Attribution (DPA, arXiv 2603.19742) over a TransformerLens ``ActivationCache``.

DPA walks the target direction down the frozen network, layer by layer, and keeps an *effective
target* ``t`` at every residual position: the direction whose dot product with that residual
stream is the target's share carried there. Norm scales are frozen at their forward values;
the non-linearities are split into weighted paths (`Mu`):

* SwiGLU MLP ``post = silu(g) * u``: content (up) path ``μ_up·λ·silu(g)`` through ``W_in``,
  control (gate) path ``μ_gate·λ·u·sigmoid(g)`` through ``W_gate`` (the gate's secant), with
  ``λ = W_out t``;
* attention: value (content) path ``μ_v·Σ_i α_ij λ_i`` through ``W_V``; the softmax sensitivity
  ``δ_ij = α_ij (v_j − z_i)·λ_i`` feeds the query (``μ_q``) and key (``μ_k``) control paths,
  un-rotated by RoPE, through ``W_Q``/``W_K`` (grouped-query heads add up on their shared K/V head).

Other families follow the same rules (`dpa_lens.models.view.BlockRules`): a plain MLP (GPT-2, NeoX)
has one path, ``post = (act(s)/s)·s`` with the secant frozen; LayerNorm keeps its centring;
parallel blocks (NeoX) send the target through attention and MLP from the same stream; output
norms (Gemma) and query-key norms (Qwen3, Gemma 3) are linear with their scales frozen; soft caps
(Gemma 2) are replaced by their secant; partial rotary rotates only the first dimensions.

Every score is then activation · effective target: tokens against the target at ``resid_pre`` of
layer 0, heads against ``resid_mid``, neurons against ``resid_post`` (the paper; the authors'
code uses ``resid_mid``, available as ``neuron_target="mid"``).

Equivalently, DPA is the gradient of a re-wired forward pass (see the method doc): the tests check
this implementation against such an autograd oracle. The sweep costs about one backward pass and
never loops over heads, neurons or tokens.

Modules: `mu` (path weights), `hooks` (what DPA reads from the cache), `rules` (one block's
propagation), `attention_blocks` (the attention rule in query blocks), `root` (rerooting),
`checkpoint` (layers recomputed from a cache of the streams alone), `method` (the sweep and `dpa`),
`edges` (DPA's circuit edges from one sweep), `integrated` (contrastive edges averaged
along the corrupted → clean path), `paths` (DPA's exact paths, found by best-first search).
"""

from dpa_lens.methods.dpa.edges import dpa_edges
from dpa_lens.methods.dpa.hooks import dpa_hook_names, dpa_names_filter
from dpa_lens.methods.dpa.integrated import dpa_edges_ig
from dpa_lens.methods.dpa.method import dpa, start_target, sweep
from dpa_lens.methods.dpa.mu import Mu
from dpa_lens.methods.dpa.paths import dpa_paths

__all__ = ["Mu", "dpa", "dpa_edges", "dpa_edges_ig", "dpa_hook_names", "dpa_names_filter", "dpa_paths", "start_target", "sweep"]
