"""Reward modeling: the Bradley-Terry pairwise loss with TRL RewardTrainer's options."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.tokens import compute_dtype


def reward_loss_terms(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_rewards_coefficient: float | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Per-pair terms `[B]` of `reward_loss`: the Bradley-Terry term
    `-log_sigmoid(r_c - r_r - margin)` and the centering term `c * (r_c + r_r) ** 2` (None
    without a coefficient); both 0 where `mask` is False (padding pairs)."""
    dtype = compute_dtype(jnp.result_type(chosen_rewards, rejected_rewards))
    rc, rr = chosen_rewards.astype(dtype), rejected_rewards.astype(dtype)
    diff = rc - rr
    if margin is not None:
        diff = diff - jnp.asarray(margin, dtype)
    keep = jnp.ones(rc.shape, bool) if mask is None else mask.astype(bool)
    pairs = jnp.where(keep, -jax.nn.log_sigmoid(diff), 0.0)
    center = None
    if center_rewards_coefficient:
        center = jnp.where(keep, center_rewards_coefficient * (rc + rr) ** 2, 0.0)
    return pairs, center


def reward_loss(
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    *,
    margin: jax.Array | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> jax.Array:
    """Bradley-Terry pairwise loss (Ouyang et al. 2022, eq. 1), with TRL RewardTrainer's options.

    `mean(-log_sigmoid(r_c - r_r - margin)) + c * mean((r_c + r_r) ** 2)`; the margin (Llama 2,
    Touvron et al. 2023, eq. 2) may be per pair; the centering term (Eisenstein et al. 2023) keeps
    rewards near zero.
    """
    pairs, center = reward_loss_terms(
        chosen_rewards,
        rejected_rewards,
        margin=margin,
        center_rewards_coefficient=center_rewards_coefficient,
    )
    return jnp.mean(pairs) + (0.0 if center is None else jnp.mean(center))
