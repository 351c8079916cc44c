"""Causal attention in query blocks, with a backward pass that recomputes the attention weights.

`attention` computes what `jax.nn.dot_product_attention` computes for the decoder's training
and eval passes -- any boolean mask that never lets a query see a later key (causal, packed
segments, sliding windows, shared-prompt branches), grouped-query heads -- in plain XLA ops, so
it runs on every backend, but differently:

* The queries are split into `num_blocks(L)` blocks and block i only multiplies the keys up to
  its own end: the fully masked upper triangle is skipped (for 4 blocks, 5/8 of the square; for
  8, 9/16).
* It is a `jax.custom_vjp` whose residuals are q, k, v, the output and the softmax's log-sum-exp
  per query; the backward pass recomputes the weights block by block. Autodiff of the plain
  formulation instead keeps the `[B, H, L, L]` weights of every layer (inside the layer scan
  they are stacked for all layers), which costs memory and, on CPU, copying time.

It is the "blockwise" attention kernel (`model.attention`), the default on CPU, where it makes
bench-tiny's train step faster (docs/PERFORMANCE.md). Scores and the softmax run in float32 at
least (float64 for float64 models), the products with v in the compute dtype, as in
`jax.nn.dot_product_attention`.

Shape legend: B batch, L length, H query heads, K kv heads, G = H / K, D head dim, Q a query
block, S the keys a block sees.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# the fewest queries a block holds (smaller blocks give XLA too small matmuls)
MIN_BLOCK = 32
MAX_BLOCKS = 8
# masked scores: finite, so a fully masked row (the decoder's masks have none: the diagonal is
# always allowed) gives uniform weights over its block's keys instead of NaN
_NEG = -1e30


def num_blocks(length: int) -> int:
    """Query blocks for `length` tokens: the most of 8, 4, 2 that divide it into blocks of at
    least MIN_BLOCK queries, else 1 (no skipping)."""
    for n in (MAX_BLOCKS, 4, 2):
        if length % n == 0 and length // n >= MIN_BLOCK:
            return n
    return 1


def _spans(length: int) -> list[tuple[int, int]]:
    size = length // num_blocks(length)
    return [(start, start + size) for start in range(0, length, size)]


def _acc_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _scores(q_BQKGD, k_BSKD, mask_B1QS, scale):
    """Masked scores `[B, K, G, Q, S]` in the accumulation dtype."""
    acc = _acc_dtype(q_BQKGD.dtype)
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_BQKGD, k_BSKD, preferred_element_type=acc) * scale
    return jnp.where(mask_B1QS[:, :, None], s, _NEG)


def _forward(q_BLHD, k_BLKD, v_BLKD, mask_B1LL):
    B, L, H, D = q_BLHD.shape
    K = k_BLKD.shape[2]
    scale = 1.0 / math.sqrt(D)
    q = q_BLHD.reshape(B, L, K, H // K, D)
    outs, lses = [], []
    for start, end in _spans(L):
        s = _scores(q[:, start:end], k_BLKD[:, :end], mask_B1LL[:, :, start:end, :end], scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        total = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_BLKD.dtype), v_BLKD[:, :end],
                       preferred_element_type=p.dtype)  # fmt: skip
        outs.append(jnp.einsum("bkgqd->bqkgd", o / total).astype(q_BLHD.dtype))
        lses.append((m + jnp.log(total))[..., 0])
    out = jnp.concatenate(outs, axis=1).reshape(B, L, H, D)
    return out, jnp.concatenate(lses, axis=-1)  # lse: [B, K, G, L]


@jax.custom_vjp
def _attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL):
    return _forward(q_BLHD, k_BLKD, v_BLKD, mask_B1LL)[0]


def _attention_fwd(q_BLHD, k_BLKD, v_BLKD, mask_B1LL):
    out, lse = _forward(q_BLHD, k_BLKD, v_BLKD, mask_B1LL)
    return out, (q_BLHD, k_BLKD, v_BLKD, mask_B1LL, out, lse)


def _attention_bwd(residuals, dout_BLHD):
    q_BLHD, k_BLKD, v_BLKD, mask_B1LL, out_BLHD, lse_BKGL = residuals
    B, L, H, D = q_BLHD.shape
    K = k_BLKD.shape[2]
    G = H // K
    dtype, acc = q_BLHD.dtype, _acc_dtype(q_BLHD.dtype)
    scale = 1.0 / math.sqrt(D)
    q = q_BLHD.reshape(B, L, K, G, D)
    do = dout_BLHD.reshape(B, L, K, G, D)
    # softmax backward: ds = p * (dp - rowsum(dp * p)), and rowsum(dp * p) = rowsum(do * out)
    # (an elementwise product and a sum: XLA:CPU runs this as a dot with a [.., 1] output slowly)
    delta_BLKG = jnp.sum(do.astype(acc) * out_BLHD.reshape(B, L, K, G, D).astype(acc), axis=-1)
    delta_BKGL = jnp.transpose(delta_BLKG, (0, 2, 3, 1))
    dq_blocks = []
    dk_BLKD = jnp.zeros((B, L, K, D), acc)
    dv_BLKD = jnp.zeros((B, L, K, D), acc)
    for start, end in _spans(L):
        s = _scores(q[:, start:end], k_BLKD[:, :end], mask_B1LL[:, :, start:end, :end], scale)
        p = jnp.exp(s - lse_BKGL[..., start:end, None])
        do_i = do[:, start:end]
        dv = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dtype), do_i, preferred_element_type=acc)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_BLKD[:, :end], preferred_element_type=acc)
        ds = (p * (dp - delta_BKGL[..., start:end, None]) * scale).astype(dtype)
        dq_blocks.append(
            jnp.einsum("bkgqs,bskd->bqkgd", ds, k_BLKD[:, :end], preferred_element_type=acc)
        )
        dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q[:, start:end], preferred_element_type=acc)
        pad = ((0, 0), (0, L - end), (0, 0), (0, 0))
        dk_BLKD = dk_BLKD + jnp.pad(dk, pad)
        dv_BLKD = dv_BLKD + jnp.pad(dv, pad)
    dq = jnp.concatenate(dq_blocks, axis=1).reshape(B, L, H, D)
    return dq.astype(dtype), dk_BLKD.astype(dtype), dv_BLKD.astype(dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL):
    """Attention of `q_BLHD` over `k_BLKD`/`v_BLKD` (the same L; K divides H) under a boolean
    mask `[B or 1, 1, L, L]` that is False above the diagonal (no query sees a later key):
    what `jax.nn.dot_product_attention(q, k, v, mask=mask)` returns, blockwise (module doc)."""
    B, L, H, _ = q_BLHD.shape
    if k_BLKD.shape[1] != L or v_BLKD.shape != k_BLKD.shape or H % k_BLKD.shape[2]:
        raise ValueError(
            f"blockwise attention takes q [B, L, H, D] and k, v [B, L, K, D] with K dividing H; "
            f"got q {q_BLHD.shape}, k {k_BLKD.shape}, v {v_BLKD.shape}"
        )
    if mask_B1LL.ndim != 4 or mask_B1LL.shape[1:] != (1, L, L):
        want = f"[B, 1, {L}, {L}]"
        raise ValueError(f"blockwise attention takes a {want} mask, got {mask_B1LL.shape}")
    mask_B1LL = jnp.broadcast_to(mask_B1LL, (B, 1, L, L))
    return _attention(q_BLHD, k_BLKD, v_BLKD, mask_B1LL)
