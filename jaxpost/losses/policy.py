"""Online policy optimisation (GRPO / RLOO family): advantages from grouped rewards and the
clipped importance-ratio surrogate, with TRL 1.16 GRPOTrainer's option names, defaults and
meaning (`grpo_trainer.py` `_compute_loss`, `_generate_and_score_completions`); `rloo_advantages`
follows RLOOTrainer's. Not here (yet): RLOOTrainer's own loss, whose ratio is per sequence
(`exp` of the summed token log-ratios) and whose KL is a k1 penalty taken from the reward.

Layout: N completions = P prompts x G generations, a prompt's G completions consecutive (TRL's
`repeat_interleave` order); per-token arrays are `[N, T]` over the completion tokens, with a 0/1
`mask` (padding after EOS, tool outputs).

Shape legend: N completions, T completion tokens, P prompts, G generations per prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpost.losses.tokens import compute_dtype

POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's `std + 1e-4` in the advantage denominators


def _std(x, axis=None):
    """NaN-ignoring, Bessel-corrected standard deviation (TRL's `nanstd`, torch.std's default);
    NaN with fewer than 2 values."""
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True)
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nansum((x - mean) ** 2, axis=axis, keepdims=True) / jnp.maximum(count - 1, 1)
    return jnp.where(count > 1, jnp.sqrt(var), jnp.nan)


def group_advantages(
    rewards_N: jax.Array, num_generations: int, *, scale_rewards: str = "group"
) -> tuple[jax.Array, jax.Array]:
    """GRPO advantages `(r - mean of its group) / (std + 1e-4)` and that std `[N]` (for the
    `frac_reward_zero_std` metric). `scale_rewards`: "group" (each group's std), "batch" (the
    std of all N rewards), "none" (no division: Dr. GRPO). A NaN reward (a completion no reward
    function could score) is left out of its group's mean and std and gets advantage 0, as in
    TRL; with one generation per prompt the std is 0 and the advantages 0."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {SCALE_REWARDS}")
    dtype = compute_dtype(rewards_N.dtype)
    r_PG = _grouped(rewards_N.astype(dtype), num_generations)
    centred_PG = r_PG - jnp.nanmean(r_PG, axis=1, keepdims=True)
    if num_generations == 1:
        std_PG = jnp.zeros_like(r_PG)
    elif scale_rewards == "batch":
        std_PG = jnp.broadcast_to(_std(r_PG), r_PG.shape)
    else:
        std_PG = jnp.broadcast_to(_std(r_PG, axis=1), r_PG.shape)
    advantages = centred_PG if scale_rewards == "none" else centred_PG / (std_PG + STD_EPS)
    return jnp.nan_to_num(advantages.reshape(-1), nan=0.0), std_PG.reshape(-1)


def rloo_advantages(
    rewards_N: jax.Array, num_generations: int, *, normalize_advantages: bool = False
) -> jax.Array:
    """RLOO advantages: each reward minus the mean of the other G - 1 rewards of its prompt
    (the leave-one-out baseline; Ahmadian et al. 2024), optionally standardised over the batch
    (`(a - mean) / (std + 1e-4)`, TRL's `normalize_advantages`). Needs G >= 2. NaN rewards
    (unscorable) are left out of their siblings' baselines and get advantage 0, as in TRL."""
    if num_generations < 2:
        raise ValueError(f"RLOO needs num_generations >= 2, got {num_generations}")
    dtype = compute_dtype(rewards_N.dtype)
    r_PG = _grouped(rewards_N.astype(dtype), num_generations)
    scorable_PG = ~jnp.isnan(r_PG)
    others_PG = jnp.sum(scorable_PG, axis=1, keepdims=True) - 1
    baseline_PG = (jnp.nansum(r_PG, axis=1, keepdims=True) - r_PG) / others_PG
    advantages = jnp.where(others_PG > 0, r_PG - baseline_PG, 0.0).reshape(-1)
    if normalize_advantages:
        advantages = (advantages - jnp.nanmean(advantages)) / (_std(advantages)[0] + STD_EPS)
    return jnp.nan_to_num(advantages, nan=0.0)


def _grouped(x_N, num_generations):
    if num_generations < 1 or x_N.shape[0] % num_generations:
        raise ValueError(
            f"{x_N.shape[0]} completions do not split into groups of "
            f"num_generations={num_generations}"
        )
    return x_N.reshape(-1, num_generations)


def policy_loss_terms(
    logps_NT: jax.Array,
    old_logps_NT: jax.Array,
    advantages_N: jax.Array,
    mask_NT: jax.Array,
    *,
    ref_logps_NT: jax.Array | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
) -> dict[str, jax.Array]:
    """Per-token terms of the clipped surrogate (PPO, Schulman et al. 2017; GRPO, Shao et al.
    2024), all `[N, T]` (`[N, 1]`-broadcast for sequence-level ratios), zero where `mask` is 0:

    * `loss`: `-min(w A, clip(w, 1 - epsilon, 1 + epsilon_high) A) + beta * kl`, with
      `w = exp(logps - old_logps)` per token, or per sequence (the masked mean of the log-ratio,
      GSPO) for `importance_sampling_level="sequence"`; `delta` caps the unclipped `w` too
      (two-sided clipping, INTELLECT-2);
    * `kl`: the k3 estimator `exp(ref - logps) - (ref - logps) - 1` (Schulman 2020), present when
      `beta != 0` (it needs `ref_logps`);
    * `low_clipped`, `high_clipped`: where the ratio left the trust region on the side that
      stops the gradient (`w < 1 - epsilon` with A < 0; `w > 1 + epsilon_high` with A > 0), as
      0/1 in the loss dtype, for TRL's `clip_ratio/*` metrics.
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level={importance_sampling_level!r} is not one of "
            f"{IMPORTANCE_SAMPLING_LEVELS}"
        )
    if beta != 0.0 and ref_logps_NT is None:
        raise ValueError("beta != 0 needs ref_logps (the reference model's log-probs)")
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    dtype = compute_dtype(jnp.result_type(logps_NT, old_logps_NT))
    logps, old = logps_NT.astype(dtype), old_logps_NT.astype(dtype)
    mask = mask_NT.astype(dtype)
    adv = advantages_N.astype(dtype)[:, None]
    log_ratio = jnp.where(mask > 0, logps - old, 0.0)
    if importance_sampling_level == "sequence":
        count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0)
        log_ratio = jnp.sum(log_ratio * mask, axis=-1, keepdims=True) / count
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1 - epsilon, 1 + epsilon_high)
    unclipped = ratio if delta is None else jnp.minimum(ratio, delta)
    per_token = -jnp.minimum(unclipped * adv, clipped * adv)
    terms = {  # as TRL, on the ratio after the delta cap
        "low_clipped": ((unclipped < 1 - epsilon) & (adv < 0)).astype(dtype),
        "high_clipped": ((unclipped > 1 + epsilon_high) & (adv > 0)).astype(dtype),
    }
    if beta != 0.0:
        ref = ref_logps_NT.astype(dtype)
        diff = jnp.where(mask > 0, ref - logps, 0.0)
        terms["kl"] = (jnp.exp(diff) - diff - 1) * mask
        per_token = per_token + beta * terms["kl"]
    shape = jnp.broadcast_shapes(per_token.shape, mask.shape)
    terms = {k: jnp.broadcast_to(v, shape) * mask for k, v in terms.items()}
    terms["loss"] = jnp.broadcast_to(per_token, shape) * mask
    return terms


def policy_loss(
    logps_NT: jax.Array,
    old_logps_NT: jax.Array,
    advantages_N: jax.Array,
    mask_NT: jax.Array,
    *,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_items: jax.Array | float | None = None,
    **term_options,
) -> jax.Array:
    """The surrogate loss of `policy_loss_terms` (its keyword options pass through), reduced as
    TRL's `loss_type`:

    * "grpo": each sequence's masked token mean, averaged over sequences (length-biased);
    * "bnpo": masked sum / masked token count of this batch;
    * "dr_grpo": masked sum / (N x `max_completion_length`) (Liu et al. 2025);
    * "dapo" (TRL's default): masked sum / `num_items` (Yu et al. 2025): the completion tokens
      the loss is normalised by -- default this batch's count; TRL divides by the generation
      batch's count x accumulation steps / steps per generation, which is the tokens of one
      optimiser step's batch when the two step counts agree.
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {POLICY_LOSS_TYPES}")
    per_token = policy_loss_terms(logps_NT, old_logps_NT, advantages_N, mask_NT, **term_options)[
        "loss"
    ]
    mask = mask_NT.astype(per_token.dtype)
    if loss_type == "grpo":
        per_seq = jnp.sum(per_token, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.mean(per_seq)
    if loss_type == "bnpo":
        return jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type='dr_grpo' divides by max_completion_length: pass it")
        return jnp.sum(per_token) / (per_token.shape[0] * max_completion_length)
    total = jnp.sum(mask) if num_items is None else jnp.asarray(num_items, per_token.dtype)
    return jnp.sum(per_token) / jnp.maximum(total, 1.0)
