"""Reference-free preference optimization on the shared loop: SimPO and ORPO.

Pairs `[B, 2, L]` as for DPO (packing included), but no reference model at all: SimPO uses
length-normalised log-probs with a target margin (`losses.simpo_loss`), ORPO adds an odds-ratio
term to the chosen completions' NLL (`losses.orpo_loss`). Hyperparameters: `objective.beta`,
`objective.simpo_gamma`, `objective.label_smoothing` (SimPO only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jaxpost.objectives._pairs as _pairs
from jaxpost import losses
from jaxpost import model as model_lib
from jaxpost.objectives.base import Objective
from jaxpost.objectives.dpo import pair_logps


def loss_fn(params, batch, frozen, *, model, segments, logits_chunk, kind, beta, gamma, smoothing):
    del frozen
    (pc, pr), (lc, lr), (mc, mr), valid = pair_logps(
        params, batch, model=model, segments=segments, logits_chunk=logits_chunk
    )
    metrics = {}
    if kind == "simpo":
        per, rew_c, rew_r = losses.simpo_loss(
            pc, pr, lc, lr, beta=beta, gamma=gamma, label_smoothing=smoothing
        )
        terms = {"pairs": jnp.sum(jnp.where(valid, per, 0.0))}
    else:
        # ORPO (losses.orpo_loss) in parts: the odds-ratio term per pair, and the NLL of the
        # chosen completions, divided by the chosen tokens of the whole batch.
        per, log_odds, ac, ar = losses.orpo_odds_ratio_loss(pc, pr, lc, lr, beta=beta)
        nll, chosen_tokens = losses.chosen_nll(pc, lc, mask=valid)
        terms = {"pairs": jnp.sum(jnp.where(valid, per, 0.0)), "nll": nll}
        rew_c, rew_r = beta * ac, beta * ar
        metrics = {
            "log_odds_ratio": _pairs.pair_mean(jax.nn.log_sigmoid(log_odds), valid),
            "log_odds_chosen": _pairs.pair_mean(log_odds, valid),
            "nll_loss": (nll, chosen_tokens),
        }
    aux = _pairs.preference_aux(
        batch, valid, (pc, pr), (lc, lr), (mc, mr), (rew_c, rew_r), extra=metrics
    )
    return terms, aux


def denominators(batch, *, kind, segments):
    out = {"pairs": _pairs.count_pairs(batch, segments)}
    if kind == "orpo":
        out["nll"] = _pairs.chosen_tokens(batch)
    return out


def make(kind, objective_config, model_config, segments=1) -> Objective:
    beta = float(objective_config["beta"])
    smoothing = float(objective_config["label_smoothing"])
    if beta <= 0:
        raise ValueError(f"config.objective.beta={beta} must be positive")
    if kind == "orpo" and smoothing:
        raise ValueError("config.objective.label_smoothing is not used by ORPO; set it to 0")
    model = model_lib.Decoder(model_config)
    return Objective(
        name=kind,
        model=model,
        data_kind="pairs",
        loss_fn=functools.partial(
            loss_fn,
            model=model,
            segments=segments,
            logits_chunk=int(objective_config["logits_chunk_size"]),
            kind=kind,
            beta=beta,
            gamma=float(objective_config["simpo_gamma"]),
            smoothing=smoothing,
        ),
        denominators=functools.partial(denominators, kind=kind, segments=segments),
    )
