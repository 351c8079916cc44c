"""Shared helpers for pair objectives: flatten `[B, 2, L]` rows, per-pair (segment) views."""

from __future__ import annotations

import jax.numpy as jnp

from jaxpost import losses

ROW_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def flatten_pairs(batch):
    """`[B, 2, L]` arrays -> `[2B, L]` (chosen/rejected interleaved: row 2b is b's chosen)."""
    B, P, L = batch["inputs"].shape
    return {k: batch[k].reshape(B * P, L) for k in ROW_KEYS if k in batch}


def per_pair(values_NS, batch_size):
    """`[2B, S]` per-sequence values -> `(chosen [B*S], rejected [B*S])`."""
    v = values_NS.reshape(batch_size, 2, -1)
    return v[:, 0].reshape(-1), v[:, 1].reshape(-1)


def pair_mask(batch, segments):
    """`[B*S]` True where pair slot (row b, segment k) holds a real pair."""
    chosen_seg = batch["segment_ids"][:, 0, :]
    present = losses.segment_sum(jnp.ones_like(chosen_seg), chosen_seg, segments) > 0
    return present.reshape(-1)


def count_pairs(batch, segments):
    """Number of real pairs in a batch with any leading dims: segments are numbered 1..k; a row
    counts at most `segments` (what the loss reads, so loss and denominator always agree)."""
    return jnp.sum(jnp.minimum(jnp.max(batch["segment_ids"][..., 0, :], axis=-1), segments))


def pair_mean(x, valid):
    """`(sum over real pairs, number of real pairs)`: a metric reported as a pair mean."""
    return jnp.sum(jnp.where(valid, x, 0.0)), jnp.sum(valid)


def preference_aux(batch, valid, logps, lengths, logit_sums, rewards, extra=None):
    """TRL's preference metrics (`rewards/*`, `logps/*`, `logits/*`) and `num_tokens`.

    `logps`, `lengths`, `logit_sums` and `rewards` are `(chosen, rejected)` pairs of `[B*S]`.
    """
    (pc, pr), (lc, lr), (mc, mr), (rew_c, rew_r) = logps, lengths, logit_sums, rewards
    return {
        "metrics": {
            "rewards/chosen": pair_mean(rew_c, valid),
            "rewards/rejected": pair_mean(rew_r, valid),
            "rewards/margins": pair_mean(rew_c - rew_r, valid),
            "rewards/accuracies": pair_mean((rew_c > rew_r).astype(jnp.float32), valid),
            "logps/chosen": pair_mean(pc, valid),
            "logps/rejected": pair_mean(pr, valid),
            "logits/chosen": (jnp.sum(mc), jnp.sum(lc)),
            "logits/rejected": (jnp.sum(mr), jnp.sum(lr)),
            **(extra or {}),
        },
        "totals": {"num_tokens": jnp.sum(batch["segment_ids"] > 0)},
    }
