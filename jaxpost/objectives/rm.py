"""Reward modeling: a scalar head on the decoder, trained with the Bradley-Terry loss.

Batches are pairs `[B, 2, L]` (chosen, rejected); one forward pass over `2B` rows. Metrics carry
TRL RewardTrainer's names: `accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost import losses
from jaxpost import model as model_lib
from jaxpost.objectives import _pairs


def pair_rewards(params, batch, *, model, segments=1):
    """`(chosen, rejected)` rewards `[B*S]`, read at the last real token of each sequence
    (each packed segment), and the `[B*S]` mask of real pairs."""
    B = batch["inputs"].shape[0]
    flat = _pairs.flatten_pairs(batch)
    scores_NL = model.apply(
        {"params": params}, flat["inputs"], flat["positions"], flat["segment_ids"]
    )
    last_NS = losses.segment_last(scores_NL, flat["segment_ids"], segments)
    rc, rr = _pairs.per_pair(last_NS, B)
    return rc, rr, _pairs.pair_mask(batch, segments)


def loss_fn(params, batch, frozen, *, model, segments, center_rewards_coefficient):
    del frozen
    rc, rr, valid = pair_rewards(params, batch, model=model, segments=segments)
    n_pairs = jnp.sum(valid)
    # Per-pair terms of losses.reward_loss, summed so the loop normalises by all pairs of the batch.
    terms = {"pairs": jnp.sum(jnp.where(valid, -jax.nn.log_sigmoid(rc - rr), 0.0))}
    if center_rewards_coefficient:
        terms["center"] = center_rewards_coefficient * jnp.sum(
            jnp.where(valid, (rc + rr) ** 2, 0.0)
        )
    both = jnp.concatenate([rc, rr])
    both_valid = jnp.concatenate([valid, valid])
    aux = {
        "metrics": {
            "accuracy": (jnp.sum(valid & (rc > rr)), n_pairs),
            "margin": (jnp.sum(jnp.where(valid, rc - rr, 0.0)), n_pairs),
            "mean_reward": (jnp.sum(jnp.where(both_valid, both, 0.0)), 2 * n_pairs),
        },
        "totals": {"num_tokens": jnp.sum(batch["segment_ids"] > 0)},
        "minima": {"min_reward": jnp.min(jnp.where(both_valid, both, jnp.inf))},
        "maxima": {"max_reward": jnp.max(jnp.where(both_valid, both, -jnp.inf))},
    }
    return terms, aux


def denominators(batch, *, center, segments):
    n_pairs = _pairs.count_pairs(batch, segments)
    return {"pairs": n_pairs, **({"center": n_pairs} if center else {})}


def make(objective_config, model_config, segments=1):
    from jaxpost.objectives import Objective

    model = model_lib.RewardModel(model_config)
    center = float(objective_config["center_rewards_coefficient"])
    # The summed terms equal losses.reward_loss (checked in tests/test_objectives.py).
    return Objective(
        name="rm",
        model=model,
        data_kind="pairs",
        loss_fn=functools.partial(
            loss_fn, model=model, segments=segments, center_rewards_coefficient=center
        ),
        denominators=functools.partial(denominators, center=bool(center), segments=segments),
    )
