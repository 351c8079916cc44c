"""Training objectives: each a small record of pure functions and hooks, found by name.

See `jaxpost.objectives.base` for the `Objective` contract. Each objective module has
`make(objective_config, model_config, segments) -> Objective`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxpost import model as model_lib
from jaxpost.objectives import dpo, reference_free, rm, sft
from jaxpost.objectives.base import Objective

__all__ = ["Objective", "REGISTRY", "make_objective"]

REGISTRY: dict[str, Callable[[Any, model_lib.Config, int], Objective]] = {
    "sft": sft.make,
    "rm": rm.make,
    "dpo": dpo.make,
    "simpo": functools.partial(reference_free.make, "simpo"),
    "orpo": functools.partial(reference_free.make, "orpo"),
}


def make_objective(
    objective_config: Mapping[str, Any], model_config, *, segments_per_row: int = 1
) -> Objective:
    """Build the objective named by `config.objective.name` for a model `Config`.

    `segments_per_row` bounds how many sequences (SFT) or pairs (RM, DPO) one packed row holds;
    1 for unpacked rows.
    """
    name = objective_config["name"]
    if name not in REGISTRY:
        raise ValueError(f"config.objective.name={name!r} is not one of {sorted(REGISTRY)}")
    if isinstance(model_config, nn.Module):  # accept a Decoder for convenience
        model_config = model_config.config
    objective = REGISTRY[name](objective_config, model_config, int(segments_per_row))
    if objective_config["shared_prompt"]:
        if objective.data_kind not in ("pairs", "reward_pairs"):
            raise ValueError(
                f"config.objective.shared_prompt=True is for preference pairs (rm, dpo, simpo, "
                f"orpo); objective {name!r} reads {objective.data_kind!r} rows"
            )
        objective = dataclasses.replace(objective, data_kind="shared_" + objective.data_kind)
    return objective
