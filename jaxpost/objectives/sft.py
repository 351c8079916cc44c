"""Supervised fine-tuning: masked next-token NLL, normalised by the target tokens of the batch."""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jaxpost import losses
from jaxpost import model as model_lib


def loss_fn(params, batch, frozen, *, model):
    """`({"nll": sum}, aux)` for one micro-batch; see `jaxpost.objectives` for the contract."""
    del frozen
    logits_BLV = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    targets_BL, mask_BL = batch["targets"], batch["loss_mask"].astype(bool)
    nll_sum, n_targets = losses.sft_loss_sum(logits_BLV, targets_BL, mask_BL)
    correct_BL = (jnp.argmax(logits_BLV, axis=-1) == targets_BL) & mask_BL
    # A row is an exact match when greedy decoding would reproduce every target token.
    has_targets_B = mask_BL.any(axis=-1)
    exact_B = has_targets_B & ~jnp.any(mask_BL & ~correct_BL, axis=-1)
    aux = {
        "metrics": {
            "accuracy": (jnp.sum(correct_BL), n_targets),
            "exact_match": (jnp.sum(exact_B), jnp.sum(has_targets_B)),
        },
        "totals": {
            "num_tokens": jnp.sum(batch["segment_ids"] > 0),
            "num_target_tokens": n_targets,
        },
    }
    return {"nll": nll_sum}, aux


def denominators(batch):
    return {"nll": jnp.sum(batch["loss_mask"] > 0)}


def make(objective_config, model_config):
    from jaxpost.objectives import Objective

    model = model_lib.Decoder(model_config)
    return Objective(
        name="sft",
        model=model,
        data_kind="sft",
        loss_fn=functools.partial(loss_fn, model=model),
        denominators=denominators,
    )
