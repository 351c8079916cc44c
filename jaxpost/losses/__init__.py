"""Pure loss math on arrays, importable into any JAX code.

Only jax and numpy are imported here and in the submodules (`tokens`, `reward`, `preference`,
`policy`; everything public is importable from `jaxpost.losses`). Every function is jit- and
grad-safe and computes in the dtype of its inputs, except that half-precision inputs (bfloat16,
float16) are upcast to float32 for the reductions, so log-softmax never overflows.

Shape legend: B batch, L length (targets), V vocabulary, D model width.

Conventions:
  * `logits[:, t]` is the distribution of `targets[:, t]`; the caller shifts (inputs are
    `tokens[:, :-1]`, targets are `tokens[:, 1:]`).
  * masks are 0/1 (any numeric or boolean dtype); masked-out positions contribute exactly zero,
    also when their logits are not finite.
"""

from __future__ import annotations

from jaxpost.losses.policy import (
    POLICY_LOSS_TYPES,
    SCALE_REWARDS,
    group_advantages,
    policy_loss,
    policy_loss_terms,
    rloo_advantages,
)
from jaxpost.losses.preference import (
    DPO_LOSSES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LABEL_SMOOTHING_LOSSES,
    SORTING_LOSSES,
    PreferenceTerms,
    chosen_nll,
    dpo_loss,
    orpo_log_odds_ratio,
    orpo_loss,
    orpo_odds_ratio_loss,
    simpo_loss,
)
from jaxpost.losses.reward import reward_loss, reward_loss_terms
from jaxpost.losses.tokens import (
    chunked_token_logps,
    chunked_token_stats,
    compute_dtype,
    masked_chunked_token_stats,
    nll_sum,
    segment_last,
    segment_sum,
    sequence_logps,
    sft_loss,
    sft_loss_sum,
    token_logps,
    token_stats,
)

__all__ = [
    "POLICY_LOSS_TYPES",
    "SCALE_REWARDS",
    "group_advantages",
    "rloo_advantages",
    "policy_loss_terms",
    "policy_loss",
    "token_logps",
    "sequence_logps",
    "sft_loss",
    "sft_loss_sum",
    "nll_sum",
    "chunked_token_logps",
    "token_stats",
    "chunked_token_stats",
    "masked_chunked_token_stats",
    "segment_sum",
    "segment_last",
    "compute_dtype",
    "reward_loss",
    "reward_loss_terms",
    "dpo_loss",
    "DPO_LOSSES",
    "F_DIVERGENCE_LOSSES",
    "F_DIVERGENCES",
    "LABEL_SMOOTHING_LOSSES",
    "SORTING_LOSSES",
    "PreferenceTerms",
    "simpo_loss",
    "orpo_loss",
    "orpo_odds_ratio_loss",
    "orpo_log_odds_ratio",
    "chosen_nll",
]
