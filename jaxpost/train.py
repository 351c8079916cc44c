"""`train(config, workdir)`: the one training loop, shared by every objective.

One flat function with visible sections: setup, data, state, loop, finish. What differs between
objectives comes from the objective's record (its loss, the rows it reads, and hooks for how its
params start, what stays frozen and what it prepares once); the loop knows no objective by name.
The pieces live in their own modules: `plan` (checked setup, data, initial params), `step` (the
jitted steps), `workdir` (resume rules), `evaluation`, `checkpoint`, `metrics`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxpost import checkpoint as ckpt
from jaxpost import evaluation, memory, optim, preemption, sharding
from jaxpost import metrics as metrics_lib
from jaxpost import model as model_lib
from jaxpost import plan as plan_lib
from jaxpost import step as step_lib
from jaxpost import workdir as workdir_lib

log = logging.getLogger("jaxpost")


class NonFiniteLossError(FloatingPointError):
    pass


def _check_finite(step: int, scalars: Mapping[str, float], workdir: str) -> None:
    if not math.isfinite(scalars["loss"]) or not math.isfinite(scalars.get("grad_norm", 0.0)):
        raise NonFiniteLossError(
            f"Non-finite loss at step {step} (loss={scalars['loss']}, grad_norm="
            f"{scalars.get('grad_norm')}). Stopped; checkpoints in {ckpt.checkpoint_dir(workdir)} "
            "hold the last finite state. Lower optim.lr or raise optim.warmup_steps."
        )


def _data_scalars(data) -> dict[str, int]:
    fields = ("records", "truncated", "dropped", "skipped", "target_tokens")
    return {
        f"data/{split}_{field}": getattr(stats, field)
        for split, stats in (("train", data.train_stats), ("eval", data.eval_stats))
        if stats is not None
        for field in fields
    }


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with eval metrics before and after.
    Raises `preemption.Preempted` after saving a checkpoint when asked to stop (SIGTERM, a
    Cloud TPU preemption notice); running it again resumes."""
    stop = preemption.StopSignal()  # before the loop a stop request ends the run at once
    try:
        return _train(config, workdir, stop)
    finally:
        stop.close()


def _train(
    config: ml_collections.ConfigDict, workdir: str, stop: preemption.StopSignal
) -> dict[str, Any]:
    # --- Setup: config, mesh, batch layout, model, workdirs -- before reading data or compiling.
    plan = plan_lib.make_plan(config)
    config, objective, mesh, layout = plan.config, plan.objective, plan.mesh, plan.layout
    num_steps, seq_len = int(config.train.num_steps), plan.seq_len
    workdir_lib.check_init_workdir(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    workdir_lib.check_resume(workdir, config, objective.data_kind)
    shards = workdir_lib.data_shards(workdir, config, layout.micro_batch)
    sampler = evaluation.make_sampler(plan, workdir)

    # --- Data: every record read, validated and tokenised now, so bad data stops the run here.
    data = plan_lib.load_data(plan)
    workdir_lib.write_config(workdir, config, objective.data_kind, shards)

    # --- State: born sharded; the objective's initial params, frozen part, one-time preparation;
    # or everything (data position included) from the workdir's last checkpoint.
    tx = optim.make_optimizer(config.optim, num_steps)
    schedule = optim.make_schedule(config.optim, num_steps)
    peak, peak_source = metrics_lib.peak_flops(float(config.log.peak_flops_per_device))
    manager = ckpt.make_manager(
        workdir,
        keep=int(config.checkpoint.keep),
        async_save=bool(config.checkpoint.async_save),
        every_steps=int(config.checkpoint.every_steps),
        every_minutes=float(config.checkpoint.every_minutes),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, state_shardings = step_lib.create_state(
            objective.model, tx, mesh, seed=int(config.seed), seq_len=seq_len
        )
        # The initial params, never the resumed ones, make the frozen part and the preparation;
        # a resumed run needs them only for those.
        resuming = manager.latest_step() is not None
        uses_initial = objective.frozen is not None or objective.prepare is not None
        if not resuming or uses_initial:
            state = state.replace(params=plan_lib.initial_params(plan, state.params))
        frozen, frozen_shardings = step_lib.make_frozen(objective, state.params)
        if objective.prepare is not None:
            data = objective.prepare(
                state.params,
                data,
                mesh=mesh,
                workdir=workdir,
                seq_len=seq_len,
                batch_size=int(config.eval.batch_size),
            )
        data_iter = plan_lib.train_iterator(plan, data, shards)
        if resuming:
            target = step_lib.abstract_state(state_shardings, objective.model, tx, seq_len=seq_len)
            del state
            state, data_iter = ckpt.restore(manager, target, data_iter)
            stopped = preemption.pop_stop(workdir) if jax.process_index() == 0 else None
            why = (
                f"the previous run stopped there on {stopped['reason']}"
                if stopped and stopped.get("step") == int(state.step)
                else "its latest complete checkpoint"
            )
            log.info(
                "resumed at step %d from %s (%s)",
                int(state.step),
                ckpt.checkpoint_dir(workdir),
                why,
            )
        eval_batches = plan_lib.eval_batches(plan, data.eval)
        log.info(
            "%s: %s parameters; mesh %s over %d devices (%s); MFU divides by %.3g FLOP/s (%s)",
            objective.name,
            f"{model_lib.count_params(state.params):,}",
            dict(mesh.shape),
            mesh.size,
            jax.devices()[0].device_kind,
            peak,
            peak_source,
        )
        train_step = step_lib.make_train_step(
            objective,
            tx,
            schedule,
            state_shardings=state_shardings,
            mesh=mesh,
            frozen_shardings=frozen_shardings,
        )
        # Compiled here once (the loop's first call reuses it), so its memory is known now.
        log.info(memory.format_report(memory.train_step_report(train_step, state, frozen, plan)[1]))
        eval_step = step_lib.make_eval_step(
            objective,
            params_shardings=state_shardings.params,
            mesh=mesh,
            frozen_shardings=frozen_shardings,
        )

        # --- Loop: step N+1 is dispatched before step N's metrics are fetched (one lagged
        # host sync per step); every step's metrics are checked before any later save.
        is_main = jax.process_index() == 0
        start = int(jax.device_get(state.step))
        writer = metrics_lib.MetricWriter(
            workdir, tensorboard=bool(config.log.tensorboard), enabled=is_main, start=start
        )
        if writer.redone is not None:
            log.info(
                "metrics of steps %d..%d (not in a checkpoint) dropped: they are redone",
                start + 1,
                writer.redone,
            )
        every = {k: int(config[k].every_steps) for k in ("log", "eval")}
        meter = metrics_lib.Throughput(objective.flops_per_row(seq_len) * layout.global_batch, peak)
        summary: dict[str, Any] = {"start_step": start}
        last: dict[str, float] = {}

        def run_eval(step):
            if not eval_batches:
                return {}
            result = evaluation.evaluate(eval_step, state.params, eval_batches, frozen, mesh)
            if not math.isfinite(result["loss"]):
                raise NonFiniteLossError(
                    f"Non-finite eval loss at step {step} ({result['loss']}); stopped before "
                    "saving."
                )
            writer.write(step, {f"eval/{k}": v for k, v in result.items()})
            log.info(
                "eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items())
            )
            if sampler is not None:
                sampler(step, state.params)
            return result

        def record(step, device_metrics):
            nonlocal last
            scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            _check_finite(step, scalars, workdir)
            last = scalars
            if step == start + 1:
                meter.restart()  # the first step's time is mostly compilation
            else:
                meter.add(scalars.get("num_tokens", 0.0))
            if step % every["log"] == 0 or step == num_steps:
                scalars.update(meter.rates())
                writer.write(step, scalars)
                eta = meter.seconds_per_step() * (num_steps - step)
                if is_main:
                    log.info(metrics_lib.console_line(step, num_steps, scalars, eta))
                meter.restart()

        try:
            summary["eval_before"] = {}
            if start == 0:  # (a resumed run has them on record)
                writer.write(start, _data_scalars(data))  # what loading kept, cut and skipped
                summary["eval_before"] = run_eval(start)
            elif every["eval"] and start % every["eval"] == 0 and start < num_steps:
                # Due at the step it resumes from, but killed before it was logged (process 0
                # holds the metrics; every process must take part in an evaluation).
                missing = np.int32(is_main and not writer.has_at_start("eval/loss"))
                if jax.process_count() > 1:
                    missing = multihost_utils.broadcast_one_to_all(missing)
                if missing:
                    run_eval(start)
            t_start, pending = time.perf_counter(), None  # pending: (step, device metrics)
            stop.deferred = True  # from here a stop request saves the step it is at, then stops
            for step in range(start + 1, num_steps + 1):
                batch = sharding.to_global(next(data_iter), mesh)
                state, device_metrics = train_step(state, batch, frozen)
                if pending is not None:
                    record(*pending)  # step N-1's metrics, fetched while step N runs
                pending = (step, device_metrics)
                stop_now = stop.reached()  # every process agrees (one step for all)
                # (the last step's eval and save come after the loop, unless stopping)
                last_step = step == num_steps
                eval_now = every["eval"] and step % every["eval"] == 0 and not last_step
                save_now = stop_now or (not last_step and manager.should_save(step))
                if eval_now or save_now:
                    record(*pending)  # never evaluate or save a state whose loss was not finite
                    pending = None
                    if save_now and stop_now:  # the checkpoint first: the time left is short
                        writer.flush()  # (rows up to a checkpoint are on disk before it)
                        ckpt.save(manager, state, data_iter, force=True)
                    if eval_now:
                        run_eval(step)
                    if save_now and not stop_now:
                        writer.flush()
                        ckpt.save(manager, state, data_iter, force=True)
                    if stop_now:
                        manager.wait_until_finished()
                        writer.flush()
                        if is_main:
                            preemption.write_stop(workdir, step, stop.reason)
                        log.warning(
                            "stopped on %s: step %d saved in %s; rerun the same command to resume",
                            stop.reason,
                            step,
                            ckpt.checkpoint_dir(workdir),
                        )
                        raise preemption.Preempted(stop.reason, step)
                    meter.restart()
            if pending is not None:
                record(*pending)

            # --- Finish: the final evaluation and checkpoint.
            summary["eval_after"] = run_eval(num_steps)
            if int(jax.device_get(state.step)) > start or manager.latest_step() is None:
                writer.flush()
                ckpt.save(manager, state, data_iter, force=True)
            summary.update(final_step=num_steps, last_train_metrics=last)
            # A stop request during the final evaluation or save: the run is complete, but
            # whoever runs several trainings in one process (sweep, demo) must stop too.
            summary["stop_requested"] = stop.reason
            summary["seconds"] = time.perf_counter() - t_start
        finally:
            # Let a save already under way finish (even when stopping on an error), so the
            # last good checkpoint is complete on disk.
            manager.wait_until_finished()
            manager.close()
            writer.close()
    for split, stats in (("train", data.train_stats), ("eval", data.eval_stats)):
        if stats is not None:
            summary[f"{split}_data"] = dataclasses.asdict(stats)
    if data.train_stats.skipped:
        log.info("skipped invalid training records: %s", data.train_stats.summary())
    return summary
