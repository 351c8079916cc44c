"""Preference optimisation on per-sequence log-probs: the DPO family (TRL 1.16 DPOTrainer's loss
types), SimPO and ORPO, and the chosen-completion NLL that RPO and ORPO add."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxpost.losses.tokens import compute_dtype

# --- direct preference optimization and its family -----------------------------------------------
#
# Inputs are per-sequence log-probability sums over completion tokens, `[B]` each; lengths are the
# completion token counts. Each variant is a small function of a `PreferenceTerms` record, found
# by TRL's `loss_type` name in `DPO_LOSSES`; the semantics are those of TRL 1.16's DPOTrainer.


@dataclasses.dataclass(frozen=True)
class PreferenceTerms:
    """Everything a DPO-family variant may read (all `[B]` arrays or Python floats)."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_logratios: jax.Array  # policy - reference, chosen
    rejected_logratios: jax.Array
    chosen_scores: jax.Array  # f'(policy / reference) for the chosen f-divergence
    rejected_scores: jax.Array
    chosen_lengths: jax.Array | None
    rejected_lengths: jax.Array | None
    beta: float
    label_smoothing: float
    discopop_tau: float
    valid: jax.Array | None = None  # [B] bool; False = a padding pair

    @property
    def delta(self) -> jax.Array:
        return self.chosen_scores - self.rejected_scores

    def lengths(self, loss_type: str) -> tuple[jax.Array, jax.Array]:
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths (completion "
                "token counts)"
            )
        one = jnp.ones((), self.chosen_scores.dtype)
        return (
            jnp.maximum(self.chosen_lengths.astype(one.dtype), one),
            jnp.maximum(self.rejected_lengths.astype(one.dtype), one),
        )


def _smoothed_sigmoid(z: jax.Array, eps: float) -> jax.Array:
    return -(1 - eps) * jax.nn.log_sigmoid(z) - eps * jax.nn.log_sigmoid(-z)


def _sigmoid(t: PreferenceTerms) -> jax.Array:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * delta)."""
    return -jax.nn.log_sigmoid(t.beta * t.delta)


def _cdpo(t: PreferenceTerms) -> jax.Array:
    """Conservative DPO (Mitchell 2023, 'A note on DPO with noisy preferences'): the sigmoid loss
    with labels smoothed by `label_smoothing` (TRL's pre-1.0 `sigmoid` with label smoothing)."""
    return _smoothed_sigmoid(t.beta * t.delta, t.label_smoothing)


def _hinge(t: PreferenceTerms) -> jax.Array:
    """SLiC (Zhao et al. 2023, eq. 2 with delta = 1/beta): relu(1 - beta * delta)."""
    return jax.nn.relu(1 - t.beta * t.delta)


def _ipo(t: PreferenceTerms) -> jax.Array:
    """IPO (Azar et al. 2023, eq. 17) on length-normalised scores: (delta_avg - 1/(2 beta))^2."""
    lc, lr = t.lengths("ipo")
    return (t.chosen_scores / lc - t.rejected_scores / lr - 1 / (2 * t.beta)) ** 2


def _sigmoid_norm(t: PreferenceTerms) -> jax.Array:
    """DPO on length-normalised scores: -log sigmoid(beta * (s_c/|y_c| - s_r/|y_r|))."""
    lc, lr = t.lengths("sigmoid_norm")
    return -jax.nn.log_sigmoid(t.beta * (t.chosen_scores / lc - t.rejected_scores / lr))


def _exo_pair(t: PreferenceTerms) -> jax.Array:
    """EXO (Ji et al. 2024, eq. 16, K=2): KL(softmax(beta * scores) || [1 - eps, eps])."""
    eps, z = t.label_smoothing, t.beta * t.delta
    log_qw, log_ql = jax.nn.log_sigmoid(z), jax.nn.log_sigmoid(-z)
    return jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))


def _nca_pair(t: PreferenceTerms) -> jax.Array:
    """NCA (Chen et al. 2024, eq. 12, pairwise): rewards r = beta * logratio;
    -log sigmoid(r_c) - 0.5 log sigmoid(-r_c) - 0.5 log sigmoid(-r_r)."""
    rc, rr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -jax.nn.log_sigmoid(rc) - 0.5 * jax.nn.log_sigmoid(-rc) - 0.5 * jax.nn.log_sigmoid(-rr)


def _robust(t: PreferenceTerms) -> jax.Array:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): unbiased under label-flip rate eps."""
    eps, z = t.label_smoothing, t.beta * t.delta
    return (-(1 - eps) * jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1 - 2 * eps)


def _bco_pair(t: PreferenceTerms) -> jax.Array:
    """BCO, pairwise (Jung et al. 2024), as TRL 1.16: -log sigmoid(r_c) - log sigmoid(-r_r)."""
    rc, rr = t.beta * t.chosen_logratios, t.beta * t.rejected_logratios
    return -jax.nn.log_sigmoid(rc) - jax.nn.log_sigmoid(-rr)


def _sppo_hard(t: PreferenceTerms) -> jax.Array:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 and 0."""
    half = 0.5 / t.beta
    return (t.chosen_logratios - half) ** 2 + (t.rejected_logratios + half) ** 2


def _sort_valid(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    # Padding pairs sort last (a large finite value keeps gradients finite); the caller's mask
    # then drops the last positions, which are exactly the padding ones.
    if valid is None:
        return jnp.sort(x)
    return jnp.sort(jnp.where(valid, x, jnp.asarray(1e30, x.dtype)))


def _aot(t: PreferenceTerms) -> jax.Array:
    """AOT, paired (Melnyk et al. 2024): sigmoid loss on the sorted policy log-ratio
    differences minus the sorted reference ones (sorting is within the batch)."""
    delta = _sort_valid(t.policy_chosen - t.policy_rejected, t.valid) - _sort_valid(
        t.ref_chosen - t.ref_rejected, t.valid
    )
    return _smoothed_sigmoid(t.beta * delta, t.label_smoothing)


def _aot_unpaired(t: PreferenceTerms) -> jax.Array:
    """AOT, unpaired (Melnyk et al. 2024): sorted chosen log-ratios minus sorted rejected ones."""
    delta = _sort_valid(t.chosen_logratios, t.valid) - _sort_valid(t.rejected_logratios, t.valid)
    return _smoothed_sigmoid(t.beta * delta, t.label_smoothing)


def _apo_zero(t: PreferenceTerms) -> jax.Array:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise chosen, lower rejected likelihood."""
    return (
        1
        - jax.nn.sigmoid(t.beta * t.chosen_logratios)
        + jax.nn.sigmoid(t.beta * t.rejected_logratios)
    )


def _apo_down(t: PreferenceTerms) -> jax.Array:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): lower both, rejected more."""
    return (
        jax.nn.sigmoid(t.beta * t.chosen_logratios)
        + 1
        - jax.nn.sigmoid(t.beta * (t.chosen_logratios - t.rejected_logratios))
    )


def _discopop(t: PreferenceTerms) -> jax.Array:
    """DiscoPOP (Chris Lu et al. 2024, eq. 5): logistic/exponential blend modulated by
    sigmoid(beta * delta / tau)."""
    z = t.beta * t.delta
    w = jax.nn.sigmoid(z / t.discopop_tau)
    return -jax.nn.log_sigmoid(z) * (1 - w) + jnp.exp(-z) * w


def _sft(t: PreferenceTerms) -> jax.Array:
    """Token-mean NLL of the chosen completions over the batch, repeated per pair (RPO/MPO)."""
    t.lengths("sft")
    total, tokens = chosen_nll(t.policy_chosen, t.chosen_lengths, mask=t.valid)
    return jnp.broadcast_to(total / jnp.maximum(tokens, 1.0), t.policy_chosen.shape)


def chosen_nll(
    policy_chosen_logps: jax.Array, chosen_lengths: jax.Array, *, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """`(-sum of the chosen completions' log-probs, their token count)` over the real pairs:
    the parts of the token-mean NLL that RPO's "sft" term and ORPO add to a preference loss
    (divide by the tokens of the whole batch)."""
    dtype = compute_dtype(policy_chosen_logps.dtype)
    keep = jnp.ones(policy_chosen_logps.shape, bool) if mask is None else mask.astype(bool)
    total = -jnp.sum(jnp.where(keep, policy_chosen_logps.astype(dtype), 0.0))
    return total, jnp.sum(jnp.where(keep, chosen_lengths.astype(dtype), 0.0))


DPO_LOSSES = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "sigmoid_norm": _sigmoid_norm,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sft": _sft,
    "cdpo": _cdpo,
}
# Variants whose scores may come from an f-divergence other than reverse KL (as in TRL).
F_DIVERGENCE_LOSSES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "cdpo"}
)
LABEL_SMOOTHING_LOSSES = frozenset({"robust", "aot", "aot_unpaired", "exo_pair", "cdpo"})
SORTING_LOSSES = frozenset({"aot", "aot_unpaired"})  # per-example outputs are in sorted order
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def _f_scores(logratios: jax.Array, kind: str, alpha: float) -> jax.Array:
    """f'(u) at u = policy/reference probability ratio, from log u (Wang et al. 2023, table 1)."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - jnp.exp(-logratios)
    if kind == "js_divergence":
        return jnp.log(2.0).astype(logratios.dtype) + jax.nn.log_sigmoid(logratios)
    if abs(alpha - 1.0) < 1e-6:  # the limit is reverse KL
        return logratios
    # (u^(alpha-1) - 1) / (alpha-1); the exponent is capped so exp stays finite (as TRL does).
    cap = 11.0 if logratios.dtype == jnp.float16 else 80.0
    t = jnp.minimum((alpha - 1.0) * logratios, cap)
    return (jnp.exp(t) - 1.0) / (alpha - 1.0)


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DPO-family preference losses, with TRL 1.16 DPOTrainer's names and semantics.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: `[B]`
        log-probability sums over each completion's tokens.
      loss_type: a name in `DPO_LOSSES`, or a list of names combined with `loss_weights`
        (e.g. RPO = `["sigmoid", "sft"]`).
      beta: the KL-penalty temperature (IPO's tau).
      label_smoothing: the assumed label-flip rate; used only by robust, aot, aot_unpaired,
        exo_pair (which requires it > 0) and cdpo.
      chosen_lengths, rejected_lengths: completion token counts, needed by ipo, sigmoid_norm, sft.
      f_divergence_type: the divergence whose derivative turns log-ratios into scores
        (Wang et al. 2023, 'Beyond reverse KL'); only for the variants in F_DIVERGENCE_LOSSES.
      mask: optional `[B]` booleans, False for padding pairs: they get loss 0, are left out of
        the "sft" token mean and sort last in aot/aot_unpaired (whose outputs are in sorted
        order, so there the zeros are the last positions). The mean over real pairs is then
        `sum(losses) / sum(mask)`.

    Returns:
      `(per_example_losses, chosen_rewards, rejected_rewards)`, each `[B]`; the loss is the mean
      of the first; rewards are `beta * (policy - reference)` log-probs, as TRL logs them.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    if not types:
        raise ValueError("loss_type must name at least one loss")
    if len(weights) != len(types):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(types)} loss types")
    unknown = [t for t in types if t not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"Unknown loss_type {unknown}; known: {sorted(DPO_LOSSES)}")
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type={f_divergence_type!r} is not one of {F_DIVERGENCES}")
    if f_divergence_type != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} works only with {sorted(F_DIVERGENCE_LOSSES)}"
            f"; got loss_type {types}"
        )
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if label_smoothing and not set(types) & LABEL_SMOOTHING_LOSSES:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no effect on loss_type {types}: it is used "
            f"only by {sorted(LABEL_SMOOTHING_LOSSES)} (use 'cdpo' for a label-smoothed sigmoid)"
        )
    if "exo_pair" in types and not 0 < label_smoothing < 1:
        raise ValueError("loss_type 'exo_pair' needs 0 < label_smoothing < 1 (e.g. 1e-3)")
    if "robust" in types and not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"loss_type 'robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}"
        )

    dtype = compute_dtype(
        jnp.result_type(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
    )
    pc, pr, rc, rr = (
        x.astype(dtype)
        for x in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    )
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    terms = PreferenceTerms(
        policy_chosen=pc,
        policy_rejected=pr,
        ref_chosen=rc,
        ref_rejected=rr,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=_f_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef),
        rejected_scores=_f_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef),
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        valid=None if mask is None else mask.astype(bool),
    )
    total = 0.0
    for t, w in zip(types, weights, strict=True):
        per = DPO_LOSSES[t](terms)
        if mask is not None:
            keep = terms.valid
            if t in SORTING_LOSSES:  # sorted order: the real pairs come first
                keep = jnp.arange(keep.shape[0]) < jnp.sum(keep)
            per = jnp.where(keep, per, 0.0)
        total = total + w * per
    return total, beta * chosen_logratios, beta * rejected_logratios


# --- reference-free preference losses ------------------------------------------------------------


def simpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SimPO (Meng et al. 2024, eq. 6): no reference model, length-normalised rewards
    `r = beta * logp / |y|` and a target margin gamma:
    `-log sigmoid(r_c - r_r - gamma)` (label-smoothed as TRL's CPOTrainer when eps > 0).

    Returns `(per_example_losses, chosen_rewards, rejected_rewards)`, each `[B]`.
    """
    dtype = compute_dtype(jnp.result_type(policy_chosen_logps, policy_rejected_logps))
    one = jnp.ones((), dtype)
    rc = beta * policy_chosen_logps.astype(dtype) / jnp.maximum(chosen_lengths.astype(dtype), one)
    rr = (
        beta
        * policy_rejected_logps.astype(dtype)
        / jnp.maximum(rejected_lengths.astype(dtype), one)
    )
    return _smoothed_sigmoid(rc - rr - gamma, label_smoothing), rc, rr


def orpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ORPO (Hong et al. 2024, eqs. 4-7): the token-mean NLL of the chosen completions plus
    `beta * -log sigmoid(log odds(y_c) - log odds(y_r))`, where `odds(y) = P / (1 - P)` and
    `P = exp(logp / |y|)` (the per-token geometric mean probability). No reference model.

    Returns `(per_example_losses, chosen_rewards, rejected_rewards)`, each `[B]`; the mean of
    the first is the ORPO objective (the batch NLL is shared by every pair, as in TRL); rewards are
    `beta * logp / |y|`.
    """
    ratio_loss, _, ac, ar = orpo_odds_ratio_loss(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, beta=beta
    )
    total, tokens = chosen_nll(policy_chosen_logps, chosen_lengths)
    losses = total / jnp.maximum(tokens, 1.0) + ratio_loss
    return losses, beta * ac, beta * ar


def orpo_odds_ratio_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    *,
    beta: float = 0.1,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """ORPO's odds-ratio term per pair, `beta * -log sigmoid(log odds ratio)` `[B]`, with the
    log odds ratio and the mean chosen/rejected log-probs (see `orpo_log_odds_ratio`)."""
    log_odds, ac, ar = orpo_log_odds_ratio(
        policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths
    )
    return -beta * jax.nn.log_sigmoid(log_odds), log_odds, ac, ar


def orpo_log_odds_ratio(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(log odds(y_c) - log odds(y_r), mean logp chosen, mean logp rejected)`, each `[B]`
    (Hong et al. 2024, eq. 5), with `odds(y) = P / (1 - P)`, `P = exp(logp / |y|)`."""
    dtype = compute_dtype(jnp.result_type(policy_chosen_logps, policy_rejected_logps))
    one = jnp.ones((), dtype)
    lc = jnp.maximum(chosen_lengths.astype(dtype), one)
    lr = jnp.maximum(rejected_lengths.astype(dtype), one)
    ac, ar = policy_chosen_logps.astype(dtype) / lc, policy_rejected_logps.astype(dtype) / lr
    # log(1 - exp(a)) for a < 0, computed without cancellation.
    return (ac - ar) - (jnp.log(-jnp.expm1(ac)) - jnp.log(-jnp.expm1(ar))), ac, ar
