"""Supervised fine-tuning: masked next-token NLL, normalised by the target tokens of the batch."""

from __future__ import annotations

import functools

import jax.numpy as jnp

import jaxpost.objectives._tokens as _tokens
from jaxpost import losses
from jaxpost import model as model_lib
from jaxpost.objectives.base import Objective


def loss_fn(params, batch, frozen, *, model, segments, logits_chunk):
    """`({"nll": sum}, aux)` for one micro-batch; see `jaxpost.objectives` for the contract."""
    del frozen
    logps_BL, top1_BL, _ = _tokens.token_stats(
        params,
        model,
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        batch["targets"],
        logits_chunk,
        batch["loss_mask"],
    )
    mask_BL = batch["loss_mask"].astype(bool)
    nll_sum, _ = losses.nll_sum(logps_BL, mask_BL)
    n_targets = jnp.sum(mask_BL)
    correct_BL = top1_BL & mask_BL
    # A sequence is an exact match when greedy decoding would reproduce every target token.
    seg_BL = batch["segment_ids"]
    wrong_BS = losses.segment_sum(mask_BL & ~correct_BL, seg_BL, segments)
    has_targets_BS = losses.segment_sum(mask_BL, seg_BL, segments) > 0
    exact_BS = has_targets_BS & (wrong_BS == 0)
    aux = {
        "metrics": {
            "accuracy": (jnp.sum(correct_BL), n_targets),
            "exact_match": (jnp.sum(exact_BS), jnp.sum(has_targets_BS)),
        },
        "totals": {
            "num_tokens": jnp.sum(batch["segment_ids"] > 0),
            "num_target_tokens": n_targets,
        },
    }
    return {"nll": nll_sum}, aux


def denominators(batch):
    return {"nll": jnp.sum(batch["loss_mask"] > 0)}


def make(objective_config, model_config, segments=1) -> Objective:
    model = model_lib.Decoder(model_config)
    return Objective(
        name="sft",
        model=model,
        data_kind="sft",
        loss_fn=functools.partial(
            loss_fn,
            model=model,
            segments=segments,
            logits_chunk=int(objective_config["logits_chunk_size"]),
        ),
        denominators=denominators,
    )
