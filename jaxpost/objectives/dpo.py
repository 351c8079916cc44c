"""Direct preference optimization (and its family) on the shared loop.

Batches are pairs `[B, 2, L]`, run as `2B` rows, or shared-prompt rows `[B, 2L]`
(`objective.shared_prompt`, see `_pairs`); the policy runs once over them. The reference is either a
frozen copy of the initial policy passed as `frozen` (`objective.reference="frozen"`, the
objective's `frozen` hook), or log-probs computed once before training and carried in the batch
as `ref_logps` `[B, 2]` (`"precomputed"`, its `prepare` hook: no reference parameters on device
during training; see `jaxpost/reference.py`). Metrics carry TRL DPOTrainer's names.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
from etils import epath

import jaxpost.objectives._pairs as _pairs
import jaxpost.objectives._tokens as _tokens
from jaxpost import losses, reference
from jaxpost import model as model_lib
from jaxpost.objectives.base import Objective

REFERENCES = ("frozen", "precomputed")


def pair_logps(params, batch, *, model, segments=1, logits_chunk=0):
    """Per pair `[B*S]`: `(logps, lengths, summed mean-logits)` as `(chosen, rejected)` tuples,
    and the `[B*S]` mask of real pairs. Each packed segment is one sequence."""
    B = batch["inputs"].shape[0]
    flat = _pairs.flat_rows(batch)
    token_NL, _, mean_logits_NL = _tokens.token_stats(
        params,
        model,
        flat["inputs"],
        flat["positions"],
        flat["segment_ids"],
        flat["targets"],
        logits_chunk,
        flat["loss_mask"],
        flat.get("branch_ids"),
    )
    mask_NL = flat["loss_mask"] > 0

    def per_pair(values_NL):
        return _pairs.per_pair_sum(jnp.where(mask_NL, values_NL, 0.0), flat, B, segments)

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
        # The token-mean NLL of the chosen completions over the whole batch (TRL's "sft"): the
        # sum here, the chosen tokens of the whole batch as its denominator.
        w = loss_weights[list(loss_types).index("sft")]
        terms["sft"] = w * losses.chosen_nll(pc, lc, mask=valid)[0]

    aux = _pairs.preference_aux(batch, valid, (pc, pr), (lc, lr), (mc, mr), (rew_c, rew_r))
    return terms, aux


def denominators(batch, *, loss_types, segments):
    out = {}
    if any(t != "sft" for t in loss_types):
        out["pairs"] = _pairs.count_pairs(batch, segments)
    if "sft" in loss_types:
        out["sft"] = _pairs.chosen_tokens(batch)
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


def copy_params(params):
    """The frozen reference: a copy of the initial policy (no optimizer state, no gradients)."""
    return jax.tree.map(jnp.copy, params)


def _reference_logps(params, batch, *, model, logits_chunk):
    """`[1, B, 2, L]` unpacked pair rows -> `[1, B, 2]` (chosen, rejected) log-probs."""
    micro = jax.tree.map(lambda x: x[0], batch)
    chosen, rejected = pair_logps(params, micro, model=model, logits_chunk=logits_chunk)[0]
    return jnp.stack([chosen, rejected], axis=-1)[None]


def prepare_reference(
    params, data, *, mesh, workdir, seq_len, batch_size, model, logits_chunk, cache_dir
):
    """The `prepare` hook of a precomputed reference: the initial policy's log-probs attached to
    every train and eval pair, cached (by content hash) in `cache_dir`, default
    WORKDIR/reference_logps."""
    return reference.precompute(
        functools.partial(_reference_logps, model=model, logits_chunk=logits_chunk),
        params,
        data,
        cache_dir=cache_dir or str(epath.Path(workdir) / "reference_logps"),
        mesh=mesh,
        seq_len=seq_len,
        batch_size=batch_size,
        extra=json.dumps(dataclasses.asdict(model.config), sort_keys=True),
    )


def make(objective_config, model_config, segments=1) -> Objective:
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
    logits_chunk = int(objective_config["logits_chunk_size"])
    hooks = {}
    if reference == "frozen":
        hooks["frozen"] = copy_params
    else:
        hooks["prepare"] = functools.partial(
            prepare_reference,
            model=model,
            logits_chunk=logits_chunk,
            cache_dir=objective_config["reference_cache_dir"],
        )
    return Objective(
        name="dpo",
        model=model,
        data_kind="pairs",
        loss_fn=functools.partial(
            loss_fn,
            model=model,
            segments=segments,
            logits_chunk=logits_chunk,
            reference=reference,
            loss_types=types,
            loss_weights=weights,
            dpo_kwargs=dpo_kwargs,
        ),
        denominators=functools.partial(denominators, loss_types=types, segments=segments),
        reference=reference,
        accumulation_exact=not set(types) & losses.SORTING_LOSSES,
        **hooks,
    )
