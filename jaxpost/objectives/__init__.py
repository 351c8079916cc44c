"""Training objectives: each a small record with a pure loss function, found by name.

Contract (what `jaxpost.train` relies on):
  * `loss_fn(params, batch, frozen) -> (terms, aux)` for one micro-batch:
      - `terms`: `{name: scalar sum}` -- the differentiated loss is `sum_t terms[t] / D[t]`;
      - `aux["metrics"]`: `{name: (sum, count)}`, reported as `sum / count` over the whole batch;
      - `aux["totals"]`: `{name: sum}`, reported summed (e.g. `num_tokens`);
      - `aux["minima"]` / `aux["maxima"]` (optional): `{name: value}`, reported as min / max.
  * `denominators(batch) -> {name: count}` with the keys of `terms`, from the batch alone (any
    leading dims). The step evaluates it on the whole accumulated global batch first, so gradient
    accumulation and multi-host training equal one large batch (e.g. SFT divides by the target
    tokens of all micro-batches, not by each micro-batch's own count).
  * `frozen` carries what is not trained (a DPO reference's params), or None.
  * Rows may be packed: `segment_ids` number the sequences of a row 1..k (0 = padding); for
    pairs, segment k of the chosen row and segment k of the rejected row are one pair, and
    precomputed reference log-probs come as `ref_logps [..., S, 2]`.
Hyperparameters are bound when the objective is made (`functools.partial`), never read from the
config inside the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxpost import model as model_lib


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    model: nn.Module  # what `init` builds and `loss_fn` applies
    data_kind: str  # "sft" (single sequences) or "pairs" ([..., 2, L] chosen/rejected)
    loss_fn: Callable[[Any, Mapping[str, Any], Any], tuple[dict, dict]]
    denominators: Callable[[Mapping[str, Any]], dict]
    reference: str = "none"  # "none", "frozen" (params passed as `frozen`), "precomputed"


def _make_sft(config, model_config, segments):
    from jaxpost.objectives import sft

    return sft.make(config, model_config, segments)


def _make_rm(config, model_config, segments):
    from jaxpost.objectives import rm

    return rm.make(config, model_config, segments)


def _make_dpo(config, model_config, segments):
    from jaxpost.objectives import dpo

    return dpo.make(config, model_config, segments)


def _make_reference_free(kind):
    def make(config, model_config, segments):
        from jaxpost.objectives import reference_free

        return reference_free.make(kind, config, model_config, segments)

    return make


REGISTRY: dict[str, Callable[[Any, model_lib.Config, int], Objective]] = {
    "sft": _make_sft,
    "rm": _make_rm,
    "dpo": _make_dpo,
    "simpo": _make_reference_free("simpo"),
    "orpo": _make_reference_free("orpo"),
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
    return REGISTRY[name](objective_config, model_config, int(segments_per_row))
