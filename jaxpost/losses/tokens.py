"""Token-level loss math: log-probs (full or in chunks), masked NLL sums, per-segment reductions.

Shape legend: B batch, L length (targets), V vocabulary, D model width, S segments per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
    """float64 stays float64; everything narrower than float32 is computed in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def token_logps(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """Log-probability of each target token: `log softmax(logits)[b, t, targets[b, t]]`.

    Args:
      logits_BLV: unnormalised scores `[B, L, V]`.
      targets_BL: integer token ids `[B, L]`, each in `[0, V)`.

    Returns:
      `[B, L]` log-probabilities in the compute dtype (float32, or float64 for float64 logits).
    """
    logits_BLV = logits_BLV.astype(compute_dtype(logits_BLV.dtype))
    target_logits_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return target_logits_BL - jax.nn.logsumexp(logits_BLV, axis=-1)


def sequence_logps(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """Masked sum of token log-probabilities per sequence, `[B]`."""
    logps_BL = token_logps(logits_BLV, targets_BL)
    return jnp.sum(jnp.where(mask_BL.astype(bool), logps_BL, 0.0), axis=-1)


def segment_sum(values_BL: jax.Array, segment_ids_BL: jax.Array, num_segments: int) -> jax.Array:
    """Per-segment sums `[B, S]` of a packed row: entry `[b, k]` sums the positions of row b
    whose segment id is `k + 1`; segment id 0 (padding) and ids above `num_segments` are dropped.

    With `values = token_logps * mask` this gives the log-prob of every packed sequence
    (`S = 1` for unpacked rows, whose real tokens all have segment id 1).
    """
    B, L = values_BL.shape
    seg = segment_ids_BL.astype(jnp.int32) - 1
    keep = (seg >= 0) & (seg < num_segments)
    flat = jnp.where(keep, jnp.arange(B)[:, None] * num_segments + seg, B * num_segments)
    sums = jax.ops.segment_sum(
        jnp.where(keep, values_BL, 0).ravel(), flat.ravel(), num_segments=B * num_segments + 1
    )
    return sums[: B * num_segments].reshape(B, num_segments)


def segment_last(values_BL: jax.Array, segment_ids_BL: jax.Array, num_segments: int) -> jax.Array:
    """`[B, S]`: each segment's value at its last position (0 where a segment is absent)."""
    B, L = values_BL.shape
    pos_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
    seg = segment_ids_BL.astype(jnp.int32) - 1
    keep = (seg >= 0) & (seg < num_segments)
    flat = jnp.where(keep, jnp.arange(B)[:, None] * num_segments + seg, B * num_segments)
    last = jax.ops.segment_max(
        jnp.where(keep, pos_BL, -1).ravel(), flat.ravel(), num_segments=B * num_segments + 1
    )[: B * num_segments].reshape(B, num_segments)
    present = last >= 0
    gathered = jnp.take_along_axis(values_BL, jnp.maximum(last, 0), axis=1)
    return jnp.where(present, gathered, jnp.zeros((), values_BL.dtype))


def nll_sum(logps_BL: jax.Array, mask_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(-sum of the masked token log-probs, number of masked tokens)`: the parts of a token-mean
    negative log-likelihood, to be divided by the tokens of a whole (accumulated) batch."""
    keep_BL = mask_BL.astype(bool)
    return -jnp.sum(jnp.where(keep_BL, logps_BL, 0.0)), jnp.sum(keep_BL).astype(logps_BL.dtype)


def sft_loss_sum(
    logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL over masked tokens and the number of those tokens.

    The pair form lets callers normalise by the tokens of a whole (accumulated, multi-host)
    batch: `sum(nll_sums) / sum(counts)` over micro-batches equals `sft_loss` of the big batch.
    """
    return nll_sum(token_logps(logits_BLV, targets_BL), mask_BL)


def sft_loss(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """Masked next-token negative log-likelihood, averaged over the target tokens of the batch.

    `sum_{b,t} mask[b,t] * -log p(targets[b,t]) / sum_{b,t} mask[b,t]` -- a token mean over the
    whole batch, not a mean of per-sequence means, so long completions weigh by their length.
    A batch with no target tokens gives 0 (not NaN).
    """
    nll_sum, count = sft_loss_sum(logits_BLV, targets_BL, mask_BL)
    return nll_sum / jnp.maximum(count, 1.0)


def token_stats(logits_BLV: jax.Array, targets_BL: jax.Array):
    """`(token_logps, is_top1, mean_logits)`, each `[B, L]`: the log-prob of each target, whether
    it is the argmax (greedy decoding would emit it), and the mean logit over the vocabulary."""
    logps_BL = token_logps(logits_BLV, targets_BL)
    is_top1_BL = jnp.argmax(logits_BLV, axis=-1) == targets_BL
    mean_BL = jnp.mean(logits_BLV.astype(compute_dtype(logits_BLV.dtype)), axis=-1)
    return logps_BL, is_top1_BL, mean_BL


def chunked_token_stats(
    hidden_BLD: jax.Array,
    unembed_DV: jax.Array,
    targets_BL: jax.Array,
    *,
    chunk_size: int = 256,
):
    """`token_stats(hidden @ unembed, targets)` without materialising `[B, L, V]` logits.

    The sequence is processed in chunks of `chunk_size` positions under `jax.checkpoint`, so the
    forward and backward passes hold at most `[B, chunk_size, V]` logits at a time. Results equal
    the full computation up to float rounding.

    Args:
      hidden_BLD: final hidden states (after the last norm) `[B, L, D]`.
      unembed_DV: output projection `[D, V]`.
      targets_BL: `[B, L]` token ids.
      chunk_size: positions per chunk; `L` is padded up to a multiple of it internally.
    """
    B, L, D = hidden_BLD.shape
    n_chunks = -(-L // chunk_size)
    pad = n_chunks * chunk_size - L
    hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    # [n, B, C, ...] so lax.map walks the chunks.
    hidden_nBCD = hidden_BLD.reshape(B, n_chunks, chunk_size, D).swapaxes(0, 1)
    targets_nBC = targets_BL.reshape(B, n_chunks, chunk_size).swapaxes(0, 1)

    # Logits accumulate and stay in float32 (or wider) whatever the compute dtype: rounding
    # them to bfloat16 before the log-softmax would bias every log-prob (DPO sums those errors
    # over whole completions).
    logits_dtype = compute_dtype(jnp.result_type(hidden_BLD, unembed_DV))

    @jax.checkpoint
    def chunk_stats(args):
        h_BCD, t_BC = args
        logits_BCV = jnp.einsum(
            "bcd,dv->bcv", h_BCD, unembed_DV, preferred_element_type=logits_dtype
        )
        return token_stats(logits_BCV, t_BC)

    stats = jax.lax.map(chunk_stats, (hidden_nBCD, targets_nBC))
    return tuple(x.swapaxes(0, 1).reshape(B, n_chunks * chunk_size)[:, :L] for x in stats)


def chunked_token_logps(
    hidden_BLD: jax.Array,
    unembed_DV: jax.Array,
    targets_BL: jax.Array,
    *,
    chunk_size: int = 256,
) -> jax.Array:
    """`token_logps(hidden @ unembed, targets)` without materialising `[B, L, V]` logits
    (see `chunked_token_stats`)."""
    return chunked_token_stats(hidden_BLD, unembed_DV, targets_BL, chunk_size=chunk_size)[0]


def _target_order(mask_BL: jax.Array, chunk_size: int):
    """Each row's masked positions first (in order), padded with `L` to whole chunks; the
    number of masked positions per row; chunks to run (enough for the fullest row)."""
    B, L = mask_BL.shape
    keep_BL = mask_BL.astype(bool)
    order_BL = jnp.argsort(~keep_BL, axis=-1, stable=True).astype(jnp.int32)
    pad = -(-L // chunk_size) * chunk_size - L
    order_BL = jnp.pad(order_BL, ((0, 0), (0, pad)), constant_values=L)
    count_B = jnp.sum(keep_BL, axis=-1, dtype=jnp.int32)
    n_chunks = (jnp.max(count_B) + chunk_size - 1) // chunk_size
    return order_BL, count_B, n_chunks


def _chunk_at(c, order_BL, count_B, hidden_BLD, targets_BL, chunk_size):
    """Chunk `c` of the masked positions: `(pos_BC, valid_BC, hidden_BCD, targets_BC)`."""
    B, L, _ = hidden_BLD.shape
    pos_BC = jax.lax.dynamic_slice_in_dim(order_BL, c * chunk_size, chunk_size, axis=1)
    valid_BC = (c * chunk_size + jnp.arange(chunk_size))[None, :] < count_B[:, None]
    safe_BC = jnp.minimum(pos_BC, L - 1)
    h_BCD = jnp.take_along_axis(hidden_BLD, safe_BC[..., None], axis=1)
    t_BC = jnp.take_along_axis(targets_BL, safe_BC, axis=1)
    return pos_BC, valid_BC, h_BCD, t_BC


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def masked_chunked_token_stats(hidden_BLD, unembed_DV, targets_BL, mask_BL, chunk_size=256):
    """`token_stats(hidden @ unembed, targets)` at the positions where `mask` is set, 0 (False)
    elsewhere, computing the output projection only there.

    Each row's masked positions are gathered into chunks of `chunk_size`, and only as many
    chunks run as the row with the most masked positions needs (a `while_loop`, so the count
    may change from batch to batch without recompiling); no `[B, L, V]` logits are held. The
    backward pass recomputes each chunk's logits (a custom VJP), so the projection and the
    log-softmax cost time in proportion to the masked (target) tokens, not to the row length:
    prompts and padding are skipped. Values and gradients equal `chunked_token_stats` at the
    masked positions up to float rounding.
    """
    return _masked_fwd(hidden_BLD, unembed_DV, targets_BL, mask_BL, chunk_size)[0]


def _masked_fwd(hidden_BLD, unembed_DV, targets_BL, mask_BL, chunk_size):
    B, L, _ = hidden_BLD.shape
    order_BL, count_B, n_chunks = _target_order(mask_BL, chunk_size)
    logits_dtype = compute_dtype(jnp.result_type(hidden_BLD, unembed_DV))
    rows_B1 = jnp.arange(B)[:, None]

    def body(c, outs):
        logps_BL, top1_BL, mean_BL = outs
        pos_BC, valid_BC, h_BCD, t_BC = _chunk_at(
            c, order_BL, count_B, hidden_BLD, targets_BL, chunk_size
        )
        logits_BCV = jnp.einsum(
            "bcd,dv->bcv", h_BCD, unembed_DV, preferred_element_type=logits_dtype
        )
        lp_BC, top_BC, mean_BC = token_stats(logits_BCV, t_BC)
        put = pos_BC  # padding entries (index L) are dropped by the scatter
        logps_BL = logps_BL.at[rows_B1, put].set(jnp.where(valid_BC, lp_BC, 0), mode="drop")
        top1_BL = top1_BL.at[rows_B1, put].set(valid_BC & top_BC, mode="drop")
        mean_BL = mean_BL.at[rows_B1, put].set(jnp.where(valid_BC, mean_BC, 0), mode="drop")
        return logps_BL, top1_BL, mean_BL

    zeros = jnp.zeros((B, L), logits_dtype)
    outs = jax.lax.fori_loop(0, n_chunks, body, (zeros, jnp.zeros((B, L), bool), zeros))
    return outs, (hidden_BLD, unembed_DV, targets_BL, mask_BL)


def _masked_bwd(chunk_size, residuals, cotangents):
    hidden_BLD, unembed_DV, targets_BL, mask_BL = residuals
    g_logps_BL, _, g_mean_BL = cotangents
    B, L, D = hidden_BLD.shape
    V = unembed_DV.shape[1]
    order_BL, count_B, n_chunks = _target_order(mask_BL, chunk_size)
    logits_dtype = compute_dtype(jnp.result_type(hidden_BLD, unembed_DV))
    rows_B1 = jnp.arange(B)[:, None]

    def body(c, grads):
        d_hidden_BLD, d_unembed_DV = grads
        pos_BC, valid_BC, h_BCD, t_BC = _chunk_at(
            c, order_BL, count_B, hidden_BLD, targets_BL, chunk_size
        )
        safe_BC = jnp.minimum(pos_BC, L - 1)
        logits_BCV = jnp.einsum(
            "bcd,dv->bcv", h_BCD, unembed_DV, preferred_element_type=logits_dtype
        )
        probs_BCV = jax.nn.softmax(logits_BCV, axis=-1)
        g_lp_BC = jnp.where(valid_BC, jnp.take_along_axis(g_logps_BL, safe_BC, axis=1), 0)
        g_mean_BC = jnp.where(valid_BC, jnp.take_along_axis(g_mean_BL, safe_BC, axis=1), 0)
        # d logp[t] / d logits = onehot(t) - softmax; d mean / d logits = 1 / V
        d_logits_BCV = g_lp_BC[..., None] * (
            jax.nn.one_hot(t_BC, V, dtype=logits_dtype) - probs_BCV
        )
        d_logits_BCV = d_logits_BCV + g_mean_BC[..., None] / V
        d_h_BCD = jnp.einsum(
            "bcv,dv->bcd", d_logits_BCV, unembed_DV, preferred_element_type=logits_dtype
        )
        d_hidden_BLD = d_hidden_BLD.at[rows_B1, pos_BC].add(d_h_BCD, mode="drop")
        d_unembed_DV = d_unembed_DV + jnp.einsum(
            "bcd,bcv->dv", h_BCD, d_logits_BCV, preferred_element_type=logits_dtype
        )
        return d_hidden_BLD, d_unembed_DV

    init = (jnp.zeros((B, L, D), logits_dtype), jnp.zeros(unembed_DV.shape, logits_dtype))
    d_hidden_BLD, d_unembed_DV = jax.lax.fori_loop(0, n_chunks, body, init)
    return (
        d_hidden_BLD.astype(hidden_BLD.dtype),
        d_unembed_DV.astype(unembed_DV.dtype),
        None,
        None,
    )


masked_chunked_token_stats.defvjp(_masked_fwd, _masked_bwd)
