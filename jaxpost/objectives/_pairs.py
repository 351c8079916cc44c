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
