"""The one training loop, shared by every objective.

`make_train_step` builds a single `jax.jit` step with explicit shardings and donation; `train` is
one flat function with visible sections: checks, data, model and state, restore, loop, finish.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxpost import checkpoint as ckpt
from jaxpost import config as config_lib
from jaxpost import metrics as metrics_lib
from jaxpost import model as model_lib
from jaxpost import objectives, optim, sharding
from jaxpost.data import pipeline

log = logging.getLogger("jaxpost")


class NonFiniteLossError(FloatingPointError):
    pass


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


# --- state and step ------------------------------------------------------------------------------


def _init_state(rng, *, model, tx, seq_len) -> TrainState:
    """Boxed (logically annotated) state; `nn.meta.unbox` gives the plain pytree."""
    init_rng, state_rng = jax.random.split(rng)
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(init_rng, tokens)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )


def create_state(model, tx, mesh, *, seed: int, seq_len: int):
    """Create the train state directly in its sharded layout (never whole on one device).

    Returns `(state, state_shardings)`.
    """
    init = functools.partial(_init_state, model=model, tx=tx, seq_len=seq_len)
    rng = jax.random.PRNGKey(seed)
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(init, rng)
        shardings = sharding.logical_shardings(boxed, mesh)
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def abstract_state(state_shardings, model, tx, *, seq_len: int):
    """ShapeDtypeStructs (with shardings) of the state, for restoring without initialising."""
    init = functools.partial(_init_state, model=model, tx=tx, seq_len=seq_len)
    shapes = sharding.strip_boxes(jax.eval_shape(init, jax.random.PRNGKey(0)))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings
    )


def _zeros_like_sums(objective, params, micro_batch, frozen):
    _, aux = jax.eval_shape(objective.loss_fn, params, micro_batch, frozen)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux)


def _accumulate(objective, params, batch_A, frozen, *, with_grads: bool):
    """Sum loss, aux and (optionally) gradients over the leading micro-batch axis."""
    first = jax.tree.map(lambda x: x[0], batch_A)
    sums0 = _zeros_like_sums(objective, params, first, frozen)
    grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)

    def body(carry, micro_batch):
        loss_acc, sums, grads = carry
        if with_grads:
            (loss_sum, aux), g = grad_fn(params, micro_batch, frozen)
            grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
        else:
            loss_sum, aux = objective.loss_fn(params, micro_batch, frozen)
        sums = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), sums, aux)
        return (loss_acc + loss_sum.astype(jnp.float32), sums, grads), None

    grads0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params) if with_grads else None
    (loss_sum, sums, grads), _ = jax.lax.scan(body, (jnp.float32(0.0), sums0, grads0), batch_A)
    return loss_sum, sums, grads


def _report(loss_sum, sums) -> dict[str, jax.Array]:
    denominator = jnp.maximum(sums["denominator"], 1.0)
    out = {"loss": loss_sum / denominator}
    for name, (total, count) in sums["metrics"].items():
        out[name] = total / jnp.maximum(count, 1.0)
    out.update(sums["totals"])
    return out


def make_train_step(objective, tx, schedule, *, state_shardings, mesh, frozen_shardings=None):
    """`step(state, batch, frozen) -> (state, metrics)`, jitted over `mesh`.

    `batch` leaves are `[accum_steps, global_micro_batch, ...]`. Gradients of every micro-batch
    are summed and divided by the summed denominator (e.g. target tokens) of the whole batch, so
    accumulation over A micro-batches equals one step on the concatenated batch.
    """

    def step(state: TrainState, batch, frozen):
        loss_sum, sums, grads = _accumulate(objective, state.params, batch, frozen, with_grads=True)
        denominator = jnp.maximum(sums["denominator"], 1.0)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = _report(loss_sum, sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.fold_in(state.rng, state.step),
        )
        return new_state, metrics

    replicated = sharding.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh), frozen_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )


def make_eval_step(objective, *, params_shardings, mesh, frozen_shardings=None):
    """`eval_step(params, batch, frozen) -> (loss_sum, sums)` (unnormalised, summed on host)."""

    def eval_step(params, batch, frozen):
        loss_sum, sums, _ = _accumulate(objective, params, batch, frozen, with_grads=False)
        return loss_sum, sums

    return jax.jit(
        eval_step,
        in_shardings=(params_shardings, sharding.batch_sharding(mesh), frozen_shardings),
        out_shardings=sharding.replicated(mesh),
    )


def evaluate(eval_step, params, batches, frozen, mesh) -> dict[str, float]:
    """Metrics over a whole eval split (sums combined on host in float64)."""
    total_loss, total = 0.0, None
    for batch in batches:
        loss_sum, sums = jax.device_get(eval_step(params, to_global(batch, mesh), frozen))
        total_loss += float(loss_sum)
        sums = jax.tree.map(np.float64, sums)
        total = sums if total is None else jax.tree.map(np.add, total, sums)
    return {k: float(v) for k, v in _report(total_loss, total).items()}


def to_global(local_batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assemble each process's `[A, local_B, L]` arrays into global `[A, B, L]` arrays."""
    batch_sharding = sharding.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


# --- checks before any expensive work ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    accum_steps: int
    micro_batch: int  # global, per micro-step
    local_micro_batch: int  # per process


def batch_layout(config: ml_collections.ConfigDict, mesh) -> BatchLayout:
    gb, accum = int(config.train.global_batch), int(config.train.accum_steps)
    dp = sharding.data_parallel_size(mesh)
    if gb <= 0 or accum <= 0:
        raise ValueError("train.global_batch and train.accum_steps must be positive")
    if gb % accum:
        raise ValueError(
            f"train.global_batch={gb} is not divisible by train.accum_steps={accum}; each "
            "micro-batch must hold the same number of sequences."
        )
    micro = gb // accum
    if micro % dp:
        raise ValueError(
            f"The micro-batch (train.global_batch / train.accum_steps = {micro}) is not divisible "
            f"by the data-parallel size mesh.data x mesh.fsdp = {dp}; choose a global batch that "
            f"is a multiple of {dp * accum}."
        )
    eval_b = int(config.eval.batch_size)
    if eval_b % dp:
        raise ValueError(
            f"eval.batch_size={eval_b} is not divisible by the data-parallel size {dp}."
        )
    return BatchLayout(gb, accum, micro, micro // jax.process_count())


def _check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """A workdir holding a checkpoint of a different model must not be resumed (or clobbered)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path) or not os.path.isdir(ckpt.checkpoint_dir(workdir)):
        return
    with open(path) as f:
        saved = json.load(f)
    if saved.get("model") != config.model.to_dict():
        diff = sorted(
            k
            for k in set(saved.get("model", {})) | set(config.model)
            if saved.get("model", {}).get(k) != config.model.get(k)
        )
        raise ValueError(
            f"{workdir} holds checkpoints of a different model (config.json differs in model."
            f"{', model.'.join(diff)}); use a new --workdir or the same model config."
        )


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, "config.json"))


# --- the loop ------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with eval metrics before and after."""
    # Checks: config, mesh, batch layout, model, workdir -- all before reading data or compiling.
    config_lib.check_config(config)
    model_config = model_lib.Config(**config.model)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_model_fits_mesh(model_config, mesh)
    layout = batch_layout(config, mesh)
    num_steps = int(config.train.num_steps)
    seq_len = int(config.data.seq_len)
    os.makedirs(workdir, exist_ok=True)
    _check_workdir(workdir, config)

    # Data: every record validated and tokenised now, so bad data stops the run here.
    tokenizer = pipeline.make_tokenizer(config.data)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})."
        )
    train_examples, train_stats = pipeline.load_sft_examples(
        config.data.train_path,
        "train",
        tokenizer,
        seq_len=seq_len,
        truncation=config.data.truncation,
    )
    log.info("train data %s: %s", config.data.train_path, train_stats.summary())
    eval_batches = []
    if config.data.eval_path:
        eval_examples, eval_stats = pipeline.load_sft_examples(
            config.data.eval_path,
            "eval",
            tokenizer,
            seq_len=seq_len,
            truncation=config.data.truncation,
            max_examples=config.data.max_eval_examples,
        )
        log.info("eval data %s: %s", config.data.eval_path, eval_stats.summary())
        eval_batches = pipeline.make_eval_batches(
            eval_examples,
            seq_len=seq_len,
            micro_batch=int(config.eval.batch_size) // jax.process_count(),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    data_iter = pipeline.make_train_iterator(
        train_examples,
        seq_len=seq_len,
        micro_batch=layout.local_micro_batch,
        accum_steps=layout.accum_steps,
        seed=int(config.seed),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=int(config.data.num_workers),
    )
    _write_config(workdir, config)

    # Model, objective, optimizer, state (born sharded), checkpoint restore.
    model = model_lib.Decoder(model_config)
    objective = objectives.make_objective(config.objective, model)
    tx = optim.make_optimizer(config.optim, num_steps)
    schedule = optim.make_schedule(config.optim, num_steps)
    peak = metrics_lib.peak_flops(float(config.log.peak_flops_per_device))
    manager = ckpt.make_manager(
        workdir, keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save)
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        if manager.latest_step() is not None:
            _, state_shardings = _shardings_only(model, tx, mesh, seq_len)
            target = abstract_state(state_shardings, model, tx, seq_len=seq_len)
            state, data_iter = ckpt.restore(manager, target, data_iter)
            log.info("resumed from %s at step %d", ckpt.checkpoint_dir(workdir), int(state.step))
        else:
            state, state_shardings = create_state(
                model, tx, mesh, seed=int(config.seed), seq_len=seq_len
            )
        n_params = model_lib.count_params(state.params)
        log.info(
            "model: %s parameters; mesh %s over %d devices (%s)",
            f"{n_params:,}",
            dict(mesh.shape),
            mesh.size,
            jax.devices()[0].device_kind,
        )
        train_step = make_train_step(
            objective, tx, schedule, state_shardings=state_shardings, mesh=mesh
        )
        eval_step = make_eval_step(objective, params_shardings=state_shardings.params, mesh=mesh)
        try:
            summary = _loop(
                config,
                workdir,
                state,
                data_iter,
                train_step,
                eval_step,
                eval_batches,
                manager,
                mesh=mesh,
                model_config=model_config,
                num_steps=num_steps,
                layout=layout,
                peak_and_source=peak,
            )
        finally:
            # Let a save already under way finish (even when stopping on an error), so the
            # last good checkpoint is complete on disk.
            manager.wait_until_finished()
            manager.close()
    summary["train_data"] = dataclasses.asdict(train_stats)
    return summary


def _shardings_only(model, tx, mesh, seq_len):
    init = functools.partial(_init_state, model=model, tx=tx, seq_len=seq_len)
    boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
    return boxed, sharding.logical_shardings(boxed, mesh)


def _check_finite(step: int, scalars: Mapping[str, float], workdir: str) -> None:
    if not math.isfinite(scalars["loss"]) or not math.isfinite(scalars.get("grad_norm", 0.0)):
        raise NonFiniteLossError(
            f"Non-finite loss at step {step} (loss={scalars['loss']}, grad_norm="
            f"{scalars.get('grad_norm')}). Stopped; checkpoints in {ckpt.checkpoint_dir(workdir)} "
            "hold the last finite state. Lower optim.lr or raise optim.warmup_steps."
        )


def _loop(
    config,
    workdir,
    state,
    data_iter,
    train_step,
    eval_step,
    eval_batches,
    manager,
    *,
    mesh,
    model_config,
    num_steps,
    layout,
    peak_and_source,
):
    is_main = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(
        workdir, tensorboard=bool(config.log.tensorboard), enabled=is_main
    )
    peak, peak_source = peak_and_source
    flops_per_step = (
        model_lib.flops_per_token(model_config, int(config.data.seq_len))
        * layout.global_batch
        * int(config.data.seq_len)
    )
    log.info("MFU divides by %.3g FLOP/s (%s)", peak, peak_source)
    start = int(jax.device_get(state.step))
    every = {k: int(config[k].every_steps) for k in ("log", "eval", "checkpoint")}

    def run_eval(step):
        if not eval_batches:
            return {}
        result = evaluate(eval_step, state.params, eval_batches, None, mesh)
        scalars = {f"eval/{k}": v for k, v in result.items()}
        writer.write(step, scalars)
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    summary = {"start_step": start, "eval_before": run_eval(start) if start == 0 else {}}
    pending = None  # (step, device metrics) of the step dispatched last
    window_tokens, window_steps, t_window = 0.0, 0, time.perf_counter()
    t_start, last = time.perf_counter(), {}

    def restart_window():
        # Throughput excludes compilation, evaluation and checkpointing pauses.
        nonlocal window_tokens, window_steps, t_window
        window_tokens, window_steps, t_window = 0.0, 0, time.perf_counter()

    def drain(pending):
        nonlocal window_tokens, window_steps, last
        step, device_metrics = pending
        scalars = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        _check_finite(step, scalars, workdir)
        last = scalars
        if step == start + 1:
            restart_window()  # the first step's time is mostly compilation
            if step % every["log"] and step != num_steps:
                return
        else:
            window_tokens += scalars.get("num_tokens", 0.0)
            window_steps += 1
        if step % every["log"] == 0 or step == num_steps:
            elapsed = time.perf_counter() - t_window
            if window_steps:
                scalars["tokens_per_sec"] = window_tokens / elapsed
                scalars["mfu"] = flops_per_step * window_steps / elapsed / peak
            writer.write(step, scalars)
            per_step = elapsed / window_steps if window_steps else 0.0
            if is_main:
                eta = per_step * (num_steps - step)
                log.info(metrics_lib.console_line(step, num_steps, scalars, eta))
            restart_window()

    for step in range(start + 1, num_steps + 1):
        batch = to_global(next(data_iter), mesh)
        state, device_metrics = train_step(state, batch, None)
        if pending is not None:
            drain(pending)  # step N-1's metrics, fetched while step N runs
        pending = (step, device_metrics)
        if every["eval"] and step % every["eval"] == 0 and step != num_steps:
            drain(pending)
            pending = None
            run_eval(step)
            restart_window()
        if every["checkpoint"] and step % every["checkpoint"] == 0 and step != num_steps:
            if pending is not None:
                drain(pending)  # never save a state whose loss was not finite
                pending = None
            ckpt.save(manager, state, data_iter)
            restart_window()
    if pending is not None:
        drain(pending)
    summary["eval_after"] = run_eval(num_steps)
    if int(jax.device_get(state.step)) > start or manager.latest_step() is None:
        ckpt.save(manager, state, data_iter, force=True)
    writer.close()
    summary.update(final_step=num_steps, last_train_metrics=last)
    summary["seconds"] = time.perf_counter() - t_start
    return summary
