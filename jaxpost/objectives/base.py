"""The `Objective` record: what the shared loop needs from a training objective.

Contract of the pure functions (what `jaxpost.step` relies on):
  * `loss_fn(params, batch, frozen) -> (terms, aux)` for one micro-batch:
      - `terms`: `{name: scalar sum}` -- the differentiated loss is `sum_t terms[t] / D[t]`;
      - `aux["metrics"]`: `{name: (sum, count)}`, reported as `sum / count` over the whole batch;
      - `aux["totals"]`: `{name: sum}`, reported summed (e.g. `num_tokens`);
      - `aux["minima"]` / `aux["maxima"]` (optional): `{name: value}`, reported as min / max.
  * `denominators(batch) -> {name: count}` with the keys of `terms`, from the batch alone (any
    leading dims). The step evaluates it on the whole accumulated global batch first, so gradient
    accumulation and multi-host training equal one large batch (e.g. SFT divides by the target
    tokens of all micro-batches, not by each micro-batch's own count) -- unless a loss couples
    the rows of a micro-batch (`accumulation_exact=False`).
  * `frozen` carries what is not trained (a DPO reference's params), or None.
  * Rows may be packed: `segment_ids` number the sequences of a row 1..k (0 = padding); for
    pairs, segment k of the chosen row and segment k of the rejected row are one pair, and
    precomputed reference log-probs come as `ref_logps [..., S, 2]`.
Hyperparameters are bound when the objective is made (`functools.partial`), never read from the
config inside the loss.

The hooks tell the loop what to do around the loss without the loop knowing which objective it
runs: what batches it reads (`data_kind`), how its params start (`params_kind`, `lm_subtree`),
what stays frozen (`frozen`) and what it prepares once before training (`prepare`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxpost import model as model_lib

PARAMS_KINDS = ("causal_lm", "reward")


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    model: nn.Module  # what `init` builds and `loss_fn` applies
    # The rows it reads (`jaxpost.data.pipeline.KINDS`): "sft" (single sequences), "pairs"
    # ([..., 2, L] chosen/rejected, next-token inputs/targets) or "reward_pairs" (pairs of whole
    # sequences: a reward is read at each sequence's own last token); "shared_pairs" and
    # "shared_reward_pairs" for the same pairs with each prompt once (`objective.shared_prompt`).
    data_kind: str
    loss_fn: Callable[[Any, Mapping[str, Any], Any], tuple[dict, dict]]
    denominators: Callable[[Mapping[str, Any]], dict]
    # What the params are as a Hugging Face model: "causal_lm" (generates text) or "reward" (a
    # sequence classifier). It decides how `init.hf_dir` is read, whether sample replies make
    # sense, how MFU counts the head, and what `jaxpost export` writes.
    params_kind: str = "causal_lm"
    # Where a causal LM's weights (from `init.workdir`) go inside these params: () = the whole
    # tree; ("decoder",) for a reward model's backbone. Everything else starts fresh.
    lm_subtree: tuple[str, ...] = ()
    # `frozen(initial_params) -> frozen`: what the step's `frozen` argument holds (e.g. a copy of
    # the initial policy as a DPO reference). None: the step gets None.
    frozen: Callable[[Any], Any] | None = None
    # `prepare(params, data, *, mesh, workdir, seq_len, batch_size) -> data`: one pass before
    # training, from the initial params, that may rewrite the examples (`pipeline.RunData`), e.g.
    # attach precomputed DPO reference log-probs. None: nothing to prepare.
    prepare: Callable[..., Any] | None = None
    # False when the loss couples the pairs of a micro-batch (aot sorts them): gradient
    # accumulation then differs from one large batch.
    accumulation_exact: bool = True
    reference: str = "none"  # how it uses a reference model: "none", "frozen", "precomputed"

    def __post_init__(self):
        if self.params_kind not in PARAMS_KINDS:
            raise ValueError(f"params_kind={self.params_kind!r} is not one of {PARAMS_KINDS}")

    @property
    def generates_text(self) -> bool:
        return self.params_kind == "causal_lm"

    def flops_per_row(self, seq_len: int) -> float:
        """Training FLOPs of one batch row (PaLM convention, see `model.flops_per_token`): both
        sequences of a pair (a shared-prompt row: one sequence of `2 * seq_len`), plus a frozen
        forward pass (2N of 6N) when there is one."""
        sequences = 1 if self.data_kind == "sft" else 2
        if self.data_kind.startswith("shared_"):
            seq_len, sequences = 2 * seq_len, 1
        per_token = model_lib.flops_per_token(
            self.model.config, seq_len, lm_head=self.params_kind == "causal_lm"
        )
        if self.frozen is not None:
            per_token *= 4 / 3
        return per_token * seq_len * sequences
