"""Evaluation: metrics over a whole eval split, sample replies at eval time, and evaluating a
saved checkpoint with any config's objective and data (`evaluate_checkpoint`)."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath

from jaxpost import checkpoint as ckpt
from jaxpost import plan as plan_lib
from jaxpost import serve, sharding
from jaxpost import step as step_lib

log = logging.getLogger("jaxpost")


def evaluate(eval_step, params, batches, frozen, mesh) -> dict[str, float]:
    """Metrics over a whole eval split (sums combined on host in float64)."""
    results = (eval_step(params, sharding.to_global(b, mesh), frozen) for b in batches)
    terms, denoms, aux = step_lib.sum_results(results)
    loss = sum(terms[k] / max(denoms[k], 1.0) for k in terms)
    report = step_lib.report(aux, xp=np)
    return {"loss": float(loss), **{k: float(v) for k, v in report.items()}}


def make_sampler(plan: plan_lib.Plan, workdir: str) -> Callable | None:
    """A callback `(step, params)` that logs greedy replies to `eval.sample_prompts` and
    appends them to WORKDIR/samples.jsonl (None when there are no prompts)."""
    config = plan.config
    raw = config.eval.sample_prompts
    if not raw:
        return None
    try:
        prompts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"config.eval.sample_prompts is not valid JSON ({e.msg})") from None
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ValueError('config.eval.sample_prompts must be a JSON list of strings, e.g. ["Hi"]')
    if not plan.objective.generates_text:
        raise ValueError(
            f"config.eval.sample_prompts: objective {plan.objective.name!r} trains a "
            f"{plan.objective.params_kind} model, which does not generate text"
        )

    def sample(step, params):
        replies = serve.reply(
            plan.model_config,
            params,
            plan.tokenizer,
            prompts,
            tokenizer_spec=config.data.tokenizer,
            max_new_tokens=int(config.eval.sample_max_tokens),
        )
        for prompt, reply in zip(prompts, replies, strict=True):
            log.info("sample at step %d: %r -> %r", step, prompt, reply)
        if jax.process_index() == 0:
            path = epath.Path(workdir) / "samples.jsonl"
            rows = [
                json.dumps({"step": step, "prompt": p, "reply": r})
                for p, r in zip(prompts, replies, strict=True)
            ]
            with path.open("a") as f:
                f.write("\n".join(rows) + "\n")

    return sample


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, params_workdir: str, step: int | None = None
) -> dict[str, float]:
    """Evaluate the params of `params_workdir` (latest checkpoint, or `step`) with `config`'s
    objective on its eval split, set up exactly as `train` sets up that config (`init.hf_dir`'s
    architecture and tokenizer, packing, the objective's reference from its initial params).

    E.g. the task accuracy of a DPO policy measured with the SFT config's eval data.
    """
    plan = plan_lib.make_plan(config, training=False)
    if not plan.config.data.eval_path:
        raise ValueError("evaluate_checkpoint needs config.data.eval_path (an eval split)")
    data = plan_lib.load_data(plan, train=False)
    objective, mesh = plan.objective, plan.mesh
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        target = step_lib.abstract_params(objective.model, mesh, seq_len=plan.seq_len)
        try:
            params = ckpt.restore_params(params_workdir, target, step)
        except (ValueError, KeyError) as e:
            raise ValueError(
                f"{params_workdir}: its parameters do not fit the {objective.name} model of this "
                f"config ({e})"
            ) from None
        frozen, frozen_shardings = None, None
        if objective.frozen is not None or objective.prepare is not None:
            # The reference is the config's initial policy, as in training.
            fresh = step_lib.init_params(
                objective.model, mesh, seed=int(plan.config.seed), seq_len=plan.seq_len
            )
            initial = plan_lib.initial_params(plan, fresh)
            del fresh
            frozen, frozen_shardings = step_lib.make_frozen(objective, initial)
            if objective.prepare is not None:
                # Caches go where the config says (objective.reference_cache_dir), else to a
                # scratch directory: evaluating never writes into the evaluated run.
                with tempfile.TemporaryDirectory(prefix="jaxpost-eval-") as scratch:
                    data = objective.prepare(
                        initial,
                        data,
                        mesh=mesh,
                        workdir=scratch,
                        seq_len=plan.seq_len,
                        batch_size=int(plan.config.eval.batch_size),
                    )
            del initial
        eval_step = step_lib.make_eval_step(
            objective,
            params_shardings=jax.tree.map(lambda t: t.sharding, target),
            mesh=mesh,
            frozen_shardings=frozen_shardings,
        )
        return evaluate(eval_step, params, plan_lib.eval_batches(plan, data.eval), frozen, mesh)
