"""DPA's attention rule, computed in blocks of query positions (linear memory in the sequence length).

For a layer with pattern ``α``, values ``v``, head outputs ``z``, and ``λ_i = W_O t_i`` per head, the
rule needs three things per head (see `dpa_lens.methods.dpa.rules`):

* the value path ``Σ_i α_ij λ_i`` at each key ``j``;
* the softmax sensitivity ``δ_ij = α_ij (v_j − z_i)·λ_i`` (times the soft cap's secant), and from it
  the query path ``Σ_j δ_ij k_j`` and the key path ``Σ_i δ_ij q_i`` (over ``√d_head``, or the model's
  attention scale).

Each is a sum over query rows, so a block of rows at a time gives the same result, in
``O(block · pos)`` memory per head instead of ``O(pos²)``: the block's pattern is read from the cache or
recomputed from the cached queries and keys (as a flash-attention backward does), and keys after the
block's last query are never touched (the mask is causal, so small blocks skip most of its zeros). A
recomputed pattern is checked against the cached head outputs ``z`` on `PATTERN_CHECK_ROWS` query rows
spread over the sequence. Results are per query head (a grouped key or value head's paths split by the
query head that pulled them); sum over the group for the shared head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from torch.profiler import record_function

from dpa_lens.errors import CacheError
from dpa_lens.forward import CachedForward
from dpa_lens.models import hooks
from dpa_lens.ops import softcap_ratio

BLOCK_ELEMENTS = 2**23  # at most this many floats per [batch, head, block, key] temporary
BLOCK_ROWS = 128  # query rows per block (small blocks skip most of the causal mask's zeros)
PATTERN_CHECK_ROWS = 256  # query rows of each layer whose recomputed pattern is checked against the cached head outputs


@dataclass
class HeadPaths:
    """Per query head, ``[batch, pos, head, d_head]`` each (``q``/``k`` None without the control paths)."""

    value: Float[Tensor, "batch pos head d_head"]
    query: Float[Tensor, "batch pos head d_head"] | None
    key: Float[Tensor, "batch pos head d_head"] | None
    heads: Float[Tensor, "batch pos head"]  # z_i·λ_i: each head's output dotted with its target
    head_keys: Float[Tensor, "batch head pos pos"] | None  # α_ij (v_j·λ_i): heads split by key (on request)


def _block_rows(n: int, heads: int) -> int:
    """Query rows per block: at most `BLOCK_ROWS`, and `BLOCK_ELEMENTS` floats per temporary over
    ``heads`` (batch × head); above 32, a whole multiple of 32 (the matrix kernels' tiles: on CPU, 113
    rows ran slower than 64)."""
    rows = max(1, min(n, BLOCK_ROWS, BLOCK_ELEMENTS // max(1, heads * n)))
    return rows - rows % 32 if rows > 32 else rows


def head_paths(
    fwd: CachedForward,
    layer: int,
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch pos kv_head d_head"],
    v: Float[Tensor, "batch pos kv_head d_head"],
    z: Float[Tensor, "batch pos head d_head"],
    lam: Float[Tensor, "batch pos head d_head"],
    *,
    control: bool,
    head_keys: bool = False,
    block: int | None = None,
) -> HeadPaths:
    """The value path and (with ``control``) the query and key paths of one layer, block by block.

    ``q``, ``k``: as the scores see them (after query-key norms and rotary); ``v``, ``z``: without
    the value bias; ``lam``: ``W_O t`` per head (zero for masked heads)."""
    view = fwd.view
    b, n, H, dh = lam.shape
    K = v.shape[2]
    G = H // K
    scale, cap = view.attn_scale(layer), view.rules.attn_softcap
    name = hooks.attn(layer, "pattern")
    cached = hooks.cached(fwd.cache, name)
    real = fwd.inputs.real.to(lam.device)
    padded = not bool(real.all())  # only then can a query row have no key to attend to
    split = lambda t: t.view(b, n, K, G, -1).permute(0, 2, 3, 1, 4)  # noqa: E731  [b, n, H, e] -> [b, K, G, n, e]
    qg, lg, zg = split(q), split(lam), split(z)
    q_scaled = qg / scale  # the scores' scale, applied once per layer (and to the keys, for the query path)
    heads = (z * lam).sum(-1)  # [b, n, H]: z_i·λ_i
    hs = heads.view(b, n, K, G).permute(0, 2, 3, 1)  # [b, K, G, n]
    kk, vv = k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)  # [b, K, n, dh]
    k_scaled = kk / scale if control else None  # the query path's keys
    value = lam.new_zeros(b, K, G, n, dh)
    query = lam.new_zeros(b, K, G, n, dh) if control else None
    key = lam.new_zeros(b, K, G, n, dh) if control else None
    keys = lam.new_zeros(b, K, G, n, n) if head_keys else None
    flat = lambda t: t.reshape(b * H, *t.shape[3:])  # noqa: E731  [b, K, G, r, c] -> [b·H, r, c]
    B = block or _block_rows(n, b * H)
    stride = -(-n // PATTERN_CHECK_ROWS)  # the rows checked: every stride-th, spread over the sequence
    err, zmax = 0.0, 0.0
    for i0 in range(0, n, B):
        i1 = min(n, i0 + B)
        qb, lb = q_scaled[:, :, :, i0:i1], lg[:, :, :, i0:i1]
        kb, vb = kk[:, :, :i1], vv[:, :, :i1]  # causal: keys up to the block's last query
        with record_function("dpa.attention.pattern"):
            raw = None
            if cached:
                alpha = fwd.cache[name][:, :, i0:i1, :i1].to(lam.device).float().reshape(b, K, G, i1 - i0, i1)
            else:
                raw = torch.einsum("bkgqe,bkje->bkgqj", qb, kb)
                s = raw if cap is None else cap * torch.tanh(raw / cap)  # raw is not read again without a cap
                future = torch.ones(i1 - i0, i1 - i0, dtype=torch.bool, device=lam.device).triu(1)
                s[..., i0:i1].masked_fill_(future, float("-inf"))  # the keys before the block are all in the past
                if padded:
                    s.masked_fill_(~real[:, None, None, None, :i1], float("-inf"))
                alpha = s.softmax(-1)
                if padded:
                    alpha = alpha.nan_to_num_(0.0)
                del s
                check = slice((-i0) % stride, None, stride)
                if check.start < i1 - i0:
                    z_hat = torch.einsum("bkgqj,bkje->bkgqe", alpha[:, :, :, check], vb)
                    z_ref = zg[:, :, :, i0:i1][:, :, :, check]
                    rows = real[:, i0:i1][:, check][:, None, None, :, None]
                    err = max(err, float(((z_hat - z_ref).abs() * rows).max()))
                    zmax = max(zmax, float(z_ref.abs().max()))
                    del z_hat
        with record_function("dpa.attention.value"):
            flat(value)[:, :i1].baddbmm_(flat(alpha).transpose(1, 2), flat(lb))
        if control or head_keys:
            with record_function("dpa.attention.softmax"):
                v_lam = torch.einsum("bkgqe,bkje->bkgqj", lb, vb)  # v_j·λ_i
                if keys is not None:
                    keys[:, :, :, i0:i1, :i1] = alpha * v_lam
                delta = v_lam.sub_(hs[:, :, :, i0:i1, None]).mul_(alpha)  # α (v_j − z_i)·λ_i, in place
                if cap is not None:  # the soft cap on the scores, by its secant
                    raw = torch.einsum("bkgqe,bkje->bkgqj", qb, kb) if raw is None else raw
                    delta.mul_(softcap_ratio(raw, cap))
            if control:
                with record_function("dpa.attention.query_key"):
                    query[:, :, :, i0:i1] = torch.einsum("bkgqj,bkje->bkgqe", delta, k_scaled[:, :, :i1])
                    flat(key)[:, :i1].baddbmm_(flat(delta).transpose(1, 2), flat(qb))
            del delta
        del alpha, raw
    if not cached:
        low = fwd.cache[hooks.attn(layer, "z")].dtype in (torch.float16, torch.bfloat16)
        if err > (3e-2 if low else 1e-3) * zmax + 1e-6:
            raise CacheError(f"layer {layer}'s attention pattern could not be recomputed from the cached queries and keys (its "
                             f"outputs differ by {err:.2e}): if the rows are padded, run the forward with their attention_mask and pass it "
                             "to the method too; otherwise cache the patterns, names_filter=dpa_lens.dpa_names_filter(model)")
    merge = lambda t: None if t is None else t.permute(0, 3, 1, 2, 4).reshape(b, n, H, -1)  # noqa: E731
    return HeadPaths(value=merge(value), query=merge(query), key=merge(key), heads=heads,
                     head_keys=None if keys is None else keys.reshape(b, H, n, n))
