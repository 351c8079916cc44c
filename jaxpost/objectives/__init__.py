"""Training objectives: each a small record with a pure loss function, found by name.

An objective's `loss_fn(params, batch, frozen)` returns `(loss_sum, aux)`:
  * `loss_sum` -- a scalar *sum* over the micro-batch (differentiated);
  * `aux["denominator"]` -- what `loss_sum` is normalised by (target tokens for SFT). The loop
    divides the sum over all micro-batches (and hosts) by the summed denominator, so gradient
    accumulation equals one large batch;
  * `aux["metrics"]` -- `{name: (sum, count)}`, reported as `sum / count` over the whole batch;
  * `aux["totals"]` -- `{name: sum}`, reported as the sum over the whole batch (e.g. num_tokens).
`frozen` carries what is not trained (e.g. a reference model's params), or None.
Hyperparameters are bound when the objective is made, not read inside the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from jaxpost.objectives import sft


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    batch_keys: tuple[str, ...]  # int32 arrays of shape [..., L] the loss reads
    loss_fn: Callable[[Any, Mapping[str, Any], Any], tuple[Any, dict]]


REGISTRY: dict[str, Callable[..., Objective]] = {
    "sft": lambda objective_config, model: Objective(
        "sft", sft.BATCH_KEYS, sft.make_loss_fn(model)
    ),
}


def make_objective(objective_config: Mapping[str, Any], model) -> Objective:
    name = objective_config["name"]
    if name not in REGISTRY:
        raise ValueError(f"config.objective.name={name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[name](objective_config, model)
