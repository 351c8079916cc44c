"""Reward modeling: a scalar head on the decoder, trained with the Bradley-Terry loss.

Batches are pairs `[B, 2, L]` (chosen, rejected); one forward pass over `2B` rows. Metrics carry
TRL RewardTrainer's names: `accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost import model as model_lib


def pair_rewards(params, batch, *, model):
    """Rewards `[B, 2]` read at the last real token of each sequence."""
    B, P, L = batch["inputs"].shape
    flat = {k: batch[k].reshape(B * P, L) for k in ("inputs", "positions", "segment_ids")}
    scores_NL = model.apply(
        {"params": params}, flat["inputs"], flat["positions"], flat["segment_ids"]
    )
    return model_lib.last_token_values(scores_NL, flat["segment_ids"]).reshape(B, P)


def loss_fn(params, batch, frozen, *, model, center_rewards_coefficient):
    del frozen
    rewards_BP = pair_rewards(params, batch, model=model)
    valid_B = (batch["segment_ids"] > 0).any(axis=(1, 2))  # padding pairs in eval batches
    n_pairs = jnp.sum(valid_B)
    rc, rr = rewards_BP[:, 0], rewards_BP[:, 1]
    # Per-pair terms of losses.reward_loss, summed so the loop normalises by all pairs of the batch.
    nll_B = -jax.nn.log_sigmoid(rc - rr)
    terms = {"pairs": jnp.sum(jnp.where(valid_B, nll_B, 0.0))}
    if center_rewards_coefficient:
        terms["center"] = center_rewards_coefficient * jnp.sum(
            jnp.where(valid_B, (rc + rr) ** 2, 0.0)
        )
    flat_valid = jnp.repeat(valid_B, 2)
    flat_rewards = rewards_BP.reshape(-1)
    aux = {
        "metrics": {
            "accuracy": (jnp.sum(valid_B & (rc > rr)), n_pairs),
            "margin": (jnp.sum(jnp.where(valid_B, rc - rr, 0.0)), n_pairs),
            "mean_reward": (jnp.sum(jnp.where(flat_valid, flat_rewards, 0.0)), 2 * n_pairs),
        },
        "totals": {"num_tokens": jnp.sum(batch["segment_ids"] > 0)},
        "minima": {"min_reward": jnp.min(jnp.where(flat_valid, flat_rewards, jnp.inf))},
        "maxima": {"max_reward": jnp.max(jnp.where(flat_valid, flat_rewards, -jnp.inf))},
    }
    return terms, aux


def denominators(batch, *, center):
    n_pairs = jnp.sum((batch["segment_ids"] > 0).any(axis=(-1, -2)))
    return {"pairs": n_pairs, **({"center": n_pairs} if center else {})}


def make(objective_config, model_config):
    from jaxpost.objectives import Objective

    model = model_lib.RewardModel(model_config)
    center = float(objective_config["center_rewards_coefficient"])
    # The summed terms equal losses.reward_loss (checked in tests/test_objectives.py).
    return Objective(
        name="rm",
        model=model,
        data_kind="pairs",
        loss_fn=functools.partial(loss_fn, model=model, center_rewards_coefficient=center),
        denominators=functools.partial(denominators, center=bool(center)),
    )
