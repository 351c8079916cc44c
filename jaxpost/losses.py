"""Pure loss math on arrays, importable into any JAX code.

Only jax and numpy are imported here. Every function is jit- and grad-safe and computes in the
dtype of its inputs, except that half-precision inputs (bfloat16, float16) are upcast to float32
for the reductions, so log-softmax never overflows.

Shape legend: B batch, L length (targets), V vocabulary, D model width.

Conventions:
  * `logits[:, t]` is the distribution of `targets[:, t]`; the caller shifts (inputs are
    `tokens[:, :-1]`, targets are `tokens[:, 1:]`).
  * masks are 0/1 (any numeric or boolean dtype); masked-out positions contribute exactly zero,
    also when their logits are not finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "token_logps",
    "sequence_logps",
    "sft_loss",
    "sft_loss_sum",
    "chunked_token_logps",
]


def _compute_dtype(dtype) -> jnp.dtype:
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
    logits_BLV = logits_BLV.astype(_compute_dtype(logits_BLV.dtype))
    target_logits_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    return target_logits_BL - jax.nn.logsumexp(logits_BLV, axis=-1)


def sequence_logps(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """Masked sum of token log-probabilities per sequence, `[B]`."""
    logps_BL = token_logps(logits_BLV, targets_BL)
    return jnp.sum(jnp.where(mask_BL.astype(bool), logps_BL, 0.0), axis=-1)


def sft_loss_sum(
    logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token NLL over masked tokens and the number of those tokens.

    The pair form lets callers normalise by the tokens of a whole (accumulated, multi-host)
    batch: `sum(nll_sums) / sum(counts)` over micro-batches equals `sft_loss` of the big batch.
    """
    logps_BL = token_logps(logits_BLV, targets_BL)
    keep_BL = mask_BL.astype(bool)
    nll_sum = -jnp.sum(jnp.where(keep_BL, logps_BL, 0.0))
    return nll_sum, jnp.sum(keep_BL).astype(logps_BL.dtype)


def sft_loss(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """Masked next-token negative log-likelihood, averaged over the target tokens of the batch.

    `sum_{b,t} mask[b,t] * -log p(targets[b,t]) / sum_{b,t} mask[b,t]` -- a token mean over the
    whole batch, not a mean of per-sequence means, so long completions weigh by their length.
    A batch with no target tokens gives 0 (not NaN).
    """
    nll_sum, count = sft_loss_sum(logits_BLV, targets_BL, mask_BL)
    return nll_sum / jnp.maximum(count, 1.0)


def chunked_token_logps(
    hidden_BLD: jax.Array,
    unembed_DV: jax.Array,
    targets_BL: jax.Array,
    *,
    chunk_size: int = 256,
) -> jax.Array:
    """`token_logps(hidden @ unembed, targets)` without materialising `[B, L, V]` logits.

    The sequence is processed in chunks of `chunk_size` positions under `jax.checkpoint`, so the
    forward and backward passes hold at most `[B, chunk_size, V]` logits at a time. Results equal
    `token_logps` on the full logits up to float rounding.

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

    @jax.checkpoint
    def chunk_logps(args):
        h_BCD, t_BC = args
        logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, unembed_DV)
        return token_logps(logits_BCV, t_BC)

    logps_nBC = jax.lax.map(chunk_logps, (hidden_nBCD, targets_nBC))
    return logps_nBC.swapaxes(0, 1).reshape(B, n_chunks * chunk_size)[:, :L]
