"""Reward modeling: a scalar head on the decoder, trained with the Bradley-Terry loss.

Batches are pairs of whole sequences `[B, 2, L]` (chosen, rejected; data kind "reward_pairs":
`inputs` hold every token, the last one included); one forward pass over `2B` rows. A sequence's
reward is read at its own last token -- the EOS or end-of-turn token -- which is where
`transformers`' sequence classifiers (and TRL's RewardTrainer) read it, so an exported reward
model scores a text exactly as it scored it in training. Metrics carry TRL RewardTrainer's names:
`accuracy`, `margin`, `min_reward`, `mean_reward`, `max_reward`.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

import jaxpost.objectives._pairs as _pairs
from jaxpost import losses
from jaxpost import model as model_lib
from jaxpost.objectives.base import Objective


def pair_rewards(params, batch, *, model, segments=1):
    """`(chosen, rejected)` rewards `[B*S]`, read at the last real token of each sequence
    (each packed segment), and the `[B*S]` mask of real pairs."""
    B = batch["inputs"].shape[0]
    flat = _pairs.flat_rows(batch)
    scores_NL = model.apply(
        {"params": params},
        flat["inputs"],
        flat["positions"],
        flat["segment_ids"],
        flat.get("branch_ids"),
    )
    rc, rr = _pairs.per_pair_last(scores_NL, flat, B, segments)
    return rc, rr, _pairs.pair_mask(batch, segments)


def loss_fn(params, batch, frozen, *, model, segments, center_rewards_coefficient):
    del frozen
    rc, rr, valid = pair_rewards(params, batch, model=model, segments=segments)
    n_pairs = jnp.sum(valid)
    # losses.reward_loss per pair, summed: the loop divides by the pairs of the whole batch.
    pair_terms, center_terms = losses.reward_loss_terms(
        rc, rr, center_rewards_coefficient=center_rewards_coefficient, mask=valid
    )
    terms = {"pairs": jnp.sum(pair_terms)}
    if center_terms is not None:
        terms["center"] = jnp.sum(center_terms)
    both = jnp.concatenate([rc, rr])
    both_valid = jnp.concatenate([valid, valid])
    aux = {
        "metrics": {
            "accuracy": (jnp.sum(valid & (rc > rr)), n_pairs),
            "margin": (jnp.sum(jnp.where(valid, rc - rr, 0.0)), n_pairs),
            "mean_reward": (jnp.sum(jnp.where(both_valid, both, 0.0)), 2 * n_pairs),
        },
        "totals": {"num_tokens": jnp.sum(batch["segment_ids"] > 0), "num_pairs": n_pairs},
        "minima": {"min_reward": jnp.min(jnp.where(both_valid, both, jnp.inf))},
        "maxima": {"max_reward": jnp.max(jnp.where(both_valid, both, -jnp.inf))},
    }
    return terms, aux


def denominators(batch, *, center, segments):
    n_pairs = _pairs.count_pairs(batch, segments)
    return {"pairs": n_pairs, **({"center": n_pairs} if center else {})}


def make(objective_config, model_config, segments=1) -> Objective:
    model = model_lib.RewardModel(model_config)
    center = float(objective_config["center_rewards_coefficient"])
    return Objective(
        name="rm",
        model=model,
        data_kind="reward_pairs",
        loss_fn=functools.partial(
            loss_fn, model=model, segments=segments, center_rewards_coefficient=center
        ),
        denominators=functools.partial(denominators, center=bool(center), segments=segments),
        params_kind="reward",
        lm_subtree=("decoder",),
    )
