"""Shared helpers for pair objectives, in either row layout.

Unshared rows are `[B, 2, L]` (chosen, rejected), run as `2B` rows. Shared-prompt rows are
`[B, L]` with `branch_ids` (0 prompt, 1 chosen, 2 rejected; `pipeline.shared_features`): each
packed segment is one pair, its prompt encoded once. The helpers below give per-pair values in
the same order for both: `[B*S]` chosen and rejected, row b's segment k at `b*S + k`.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpost import losses

ROW_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids", "branch_ids")


def is_shared(batch) -> bool:
    """Whether `batch` holds shared-prompt rows (a static property: its keys)."""
    return "branch_ids" in batch


def flat_rows(batch):
    """The rows the model runs: `[B, L]` shared-prompt rows as they are; `[B, 2, L]` pairs as
    `[2B, L]` (chosen/rejected interleaved: row 2b is b's chosen)."""
    if is_shared(batch):
        return {k: batch[k] for k in ROW_KEYS if k in batch}
    B, P, L = batch["inputs"].shape
    return {k: batch[k].reshape(B * P, L) for k in ROW_KEYS if k in batch}


def _sequence_ids(rows):
    """`(ids, count)`: an id per token naming its sequence (segment k's chosen 2k+1, rejected
    2k+2; 0 = padding or a shared prompt) for shared rows, the segment ids otherwise."""
    seg = rows["segment_ids"].astype(jnp.int32)
    if "branch_ids" not in rows:
        return seg, 1
    branch = rows["branch_ids"].astype(jnp.int32)
    return jnp.where((seg > 0) & (branch > 0), 2 * (seg - 1) + branch, 0), 2


def _split(values, batch_size, shared):
    """`[N, n]` per-sequence values -> `(chosen [B*S], rejected [B*S])`."""
    if shared:
        v = values.reshape(batch_size, -1, 2)
        return v[..., 0].reshape(-1), v[..., 1].reshape(-1)
    v = values.reshape(batch_size, 2, -1)
    return v[:, 0].reshape(-1), v[:, 1].reshape(-1)


def per_pair_sum(values_NL, rows, batch_size, segments):
    """`(chosen, rejected)` `[B*S]`: `values` summed over each sequence's tokens (mask them
    first; shared prompt tokens count for neither)."""
    ids, per = _sequence_ids(rows)
    sums = losses.segment_sum(values_NL, ids, per * segments)
    return _split(sums, batch_size, per == 2)


def per_pair_last(values_NL, rows, batch_size, segments):
    """`(chosen, rejected)` `[B*S]`: each sequence's value at its last token."""
    ids, per = _sequence_ids(rows)
    last = losses.segment_last(values_NL, ids, per * segments)
    return _split(last, batch_size, per == 2)


def _pair_segments(batch):
    """`[..., L]` segment ids with one entry per pair (the chosen row's, when unshared)."""
    return batch["segment_ids"] if is_shared(batch) else batch["segment_ids"][..., 0, :]


def pair_mask(batch, segments):
    """`[B*S]` True where pair slot (row b, segment k) holds a real pair."""
    seg = _pair_segments(batch)
    present = losses.segment_sum(jnp.ones_like(seg), seg, segments) > 0
    return present.reshape(-1)


def count_pairs(batch, segments):
    """Number of real pairs in a batch with any leading dims: segments are numbered 1..k; a row
    counts at most `segments` (what the loss reads, so loss and denominator always agree)."""
    return jnp.sum(jnp.minimum(jnp.max(_pair_segments(batch), axis=-1), segments))


def chosen_tokens(batch):
    """The chosen completions' loss tokens in a batch with any leading dims."""
    if is_shared(batch):
        return jnp.sum((batch["loss_mask"] > 0) & (batch["branch_ids"] == 1))
    return jnp.sum(batch["loss_mask"][..., 0, :] > 0)


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
        # tokens as run (a shared prompt counts once) and pairs: with shared prompts the pairs
        # per step, not the tokens, compare with unshared runs
        "totals": {"num_tokens": jnp.sum(batch["segment_ids"] > 0), "num_pairs": jnp.sum(valid)},
    }
