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
from jaxpost.objectives import _pairs, _tokens

REFERENCES = ("frozen", "precomputed")


def pair_logps(params, batch, *, model, segments=1, logits_chunk=0):
    """Per pair `[B*S]`: `(logps, lengths, summed mean-logits)` as `(chosen, rejected)` tuples,
    and the `[B*S]` mask of real pairs. Each packed segment is one sequence."""
    B = batch["inputs"].shape[0]
    flat = _pairs.flatten_pairs(batch)
    token_NL, _, mean_logits_NL = _tokens.token_stats(
        params,
        model,
        flat["inputs"],
        flat["positions"],
        flat["segment_ids"],
        flat["targets"],
        logits_chunk,
    )
    mask_NL = flat["loss_mask"] > 0
    seg_NL = flat["segment_ids"]

    def per_pair(values_NL):
        return _pairs.per_pair(
            losses.segment_sum(jnp.where(mask_NL, values_NL, 0.0), seg_NL, segments), B
        )

    return (
        per_pair(token_NL),
        per_pair(mask_NL.astype(jnp.float32)),
        per_pair(mean_logits_NL),
        _pairs.pair_mask(batch, segments),
    )


def loss_fn(
    params,
    batch,
    frozen,
    *,
    model,
    segments,
    logits_chunk,
    reference,
    loss_types,
    loss_weights,
    dpo_kwargs,
):
    kw = dict(model=model, segments=segments, logits_chunk=logits_chunk)
    (pc, pr), (lc, lr), (mc, mr), valid = pair_logps(params, batch, **kw)
    if reference == "frozen":
        rc, rr = jax.lax.stop_gradient(pair_logps(frozen, batch, **kw)[0])
    else:
        ref_BS2 = batch["ref_logps"].astype(pc.dtype)  # [B, S, 2]
        rc, rr = ref_BS2[..., 0].reshape(-1), ref_BS2[..., 1].reshape(-1)
    terms = {}
    pref = [(t, w) for t, w in zip(loss_types, loss_weights, strict=True) if t != "sft"]
    if pref:
        per_pair, rew_c, rew_r = losses.dpo_loss(
            pc,
            pr,
            rc,
            rr,
            loss_type=[t for t, _ in pref],
            loss_weights=[w for _, w in pref],
            chosen_lengths=lc,
            rejected_lengths=lr,
            mask=valid,
            **dpo_kwargs,
        )
        terms["pairs"] = jnp.sum(per_pair)  # padding pairs are already zero
    else:
        rew_c = dpo_kwargs["beta"] * (pc - rc)
        rew_r = dpo_kwargs["beta"] * (pr - rr)
    if "sft" in loss_types:
        # The token-mean NLL of the chosen completions over the whole batch (TRL's "sft").
        w = loss_weights[list(loss_types).index("sft")]
        terms["sft"] = -w * jnp.sum(jnp.where(valid, pc, 0.0))

    aux = _pairs.preference_aux(batch, valid, (pc, pr), (lc, lr), (mc, mr), (rew_c, rew_r))
    return terms, aux


def denominators(batch, *, loss_types, segments):
    out = {}
    if any(t != "sft" for t in loss_types):
        out["pairs"] = _pairs.count_pairs(batch, segments)
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


def make(objective_config, model_config, segments=1):
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
            segments=segments,
            logits_chunk=int(objective_config["logits_chunk_size"]),
            reference=reference,
            loss_types=types,
            loss_weights=weights,
            dpo_kwargs=dpo_kwargs,
        ),
        denominators=functools.partial(denominators, loss_types=types, segments=segments),
        reference=reference,
    )
