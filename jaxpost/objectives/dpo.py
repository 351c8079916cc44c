"""Direct preference optimization (and its family) on the shared loop.

Batches are pairs `[B, 2, L]`; the policy runs once over `2B` rows. The reference is either a
frozen copy of the initial policy passed as `frozen` (`objective.reference="frozen"`), or
log-probs computed once before training and carried in the batch as `ref_logps` `[B, 2]`
(`"precomputed"`: no reference parameters on device during training; see
`jaxpost/reference.py`). Metrics carry TRL DPOTrainer's names.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpost import losses
from jaxpost import model as model_lib

REFERENCES = ("frozen", "precomputed")


def pair_logps(params, batch, *, model):
    """`(logps [B, 2], completion lengths [B, 2], summed mean-logits [B, 2])`."""
    B, P, L = batch["inputs"].shape
    flat = {
        k: batch[k].reshape(B * P, L)
        for k in ("inputs", "targets", "loss_mask", "positions", "segment_ids")
    }
    logits_NLV = model.apply(
        {"params": params}, flat["inputs"], flat["positions"], flat["segment_ids"]
    )
    mask_NL = flat["loss_mask"] > 0
    token_NL = losses.token_logps(logits_NLV, flat["targets"])
    logps_N = jnp.sum(jnp.where(mask_NL, token_NL, 0.0), axis=-1)
    mean_logits_NL = jnp.mean(logits_NLV.astype(jnp.float32), axis=-1)
    logit_sums_N = jnp.sum(jnp.where(mask_NL, mean_logits_NL, 0.0), axis=-1)
    lengths_N = jnp.sum(mask_NL, axis=-1)
    return logps_N.reshape(B, P), lengths_N.reshape(B, P), logit_sums_N.reshape(B, P)


def loss_fn(params, batch, frozen, *, model, reference, loss_types, loss_weights, dpo_kwargs):
    policy_BP, lengths_BP, logit_sums_BP = pair_logps(params, batch, model=model)
    if reference == "frozen":
        ref_BP = jax.lax.stop_gradient(pair_logps(frozen, batch, model=model)[0])
    else:
        ref_BP = batch["ref_logps"].astype(policy_BP.dtype)
    valid_B = (batch["segment_ids"] > 0).any(axis=(1, 2))  # padding pairs in eval batches
    n_pairs = jnp.sum(valid_B)
    lc, lr = lengths_BP[:, 0], lengths_BP[:, 1]
    terms = {}
    pref = [(t, w) for t, w in zip(loss_types, loss_weights, strict=True) if t != "sft"]
    if pref:
        per_B, rew_c, rew_r = losses.dpo_loss(
            policy_BP[:, 0],
            policy_BP[:, 1],
            ref_BP[:, 0],
            ref_BP[:, 1],
            loss_type=[t for t, _ in pref],
            loss_weights=[w for _, w in pref],
            chosen_lengths=lc,
            rejected_lengths=lr,
            **dpo_kwargs,
        )
        terms["pairs"] = jnp.sum(jnp.where(valid_B, per_B, 0.0))
    else:
        rew_c = dpo_kwargs["beta"] * (policy_BP[:, 0] - ref_BP[:, 0])
        rew_r = dpo_kwargs["beta"] * (policy_BP[:, 1] - ref_BP[:, 1])
    if "sft" in loss_types:
        # The token-mean NLL of the chosen completions over the whole batch (TRL's "sft").
        w = loss_weights[list(loss_types).index("sft")]
        terms["sft"] = -w * jnp.sum(jnp.where(valid_B, policy_BP[:, 0], 0.0))

    def pair_mean(x_B):
        return jnp.sum(jnp.where(valid_B, x_B, 0.0)), n_pairs

    aux = {
        "metrics": {
            "rewards/chosen": pair_mean(rew_c),
            "rewards/rejected": pair_mean(rew_r),
            "rewards/margins": pair_mean(rew_c - rew_r),
            "rewards/accuracies": pair_mean((rew_c > rew_r).astype(jnp.float32)),
            "logps/chosen": pair_mean(policy_BP[:, 0]),
            "logps/rejected": pair_mean(policy_BP[:, 1]),
            "logits/chosen": (jnp.sum(logit_sums_BP[:, 0]), jnp.sum(lc)),
            "logits/rejected": (jnp.sum(logit_sums_BP[:, 1]), jnp.sum(lr)),
        },
        "totals": {"num_tokens": jnp.sum(batch["segment_ids"] > 0)},
    }
    return terms, aux


def denominators(batch, *, loss_types):
    out = {}
    if any(t != "sft" for t in loss_types):
        out["pairs"] = jnp.sum((batch["segment_ids"] > 0).any(axis=(-1, -2)))
    if "sft" in loss_types:
        out["sft"] = jnp.sum(batch["loss_mask"][..., 0, :] > 0)
    return out


def parse_loss_types(objective_config) -> tuple[tuple[str, ...], tuple[float, ...]]:
    types = tuple(t.strip() for t in str(objective_config["loss_type"]).split(",") if t.strip())
    weights_text = str(objective_config["loss_weights"]).strip()
    weights = (
        tuple(float(w) for w in weights_text.split(",")) if weights_text else (1.0,) * len(types)
    )
    if len(weights) != len(types):
        raise ValueError(
            f"objective.loss_weights={weights_text!r} has {len(weights)} weights for "
            f"{len(types)} loss types ({','.join(types)})"
        )
    return types, weights


def make(objective_config, model_config):
    from jaxpost.objectives import Objective

    reference = objective_config["reference"]
    if reference not in REFERENCES:
        raise ValueError(f"objective.reference={reference!r} is not one of {REFERENCES}")
    types, weights = parse_loss_types(objective_config)
    dpo_kwargs = dict(
        beta=float(objective_config["beta"]),
        label_smoothing=float(objective_config["label_smoothing"]),
        f_divergence_type=objective_config["f_divergence_type"],
        f_alpha_divergence_coef=float(objective_config["f_alpha_divergence_coef"]),
        discopop_tau=float(objective_config["discopop_tau"]),
    )
    # Validate the combination now (before any data or compile): a tiny call raises what the
    # loss would raise.
    pref = [t for t in types if t != "sft"] or ["sigmoid"]
    one = jnp.zeros((1,), jnp.float32)
    try:
        losses.dpo_loss(
            one,
            one,
            one,
            one,
            loss_type=pref,
            chosen_lengths=one + 1,
            rejected_lengths=one + 1,
            **dpo_kwargs,
        )
    except ValueError as e:
        raise ValueError(f"config.objective: {e}") from None
    model = model_lib.Decoder(model_config)
    return Objective(
        name="dpo",
        model=model,
        data_kind="pairs",
        loss_fn=functools.partial(
            loss_fn,
            model=model,
            reference=reference,
            loss_types=types,
            loss_weights=weights,
            dpo_kwargs=dpo_kwargs,
        ),
        denominators=functools.partial(denominators, loss_types=types),
        reference=reference,
    )
