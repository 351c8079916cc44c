"""Checkpoints under WORKDIR/checkpoints: {params, optimizer state, data iterator} per step.

Each step directory holds three orbax items: `params` (the model pytree, loadable alone with
`load_params`), `train` (step, optimizer state, rng) and `data` (the grain iterators' positions,
one file per data shard: `ShardStates`). Saves are asynchronous and atomic (orbax writes to a
temporary directory and renames), and older steps are deleted only after a newer one is
complete, so an interrupted run never loses the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import types
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
CHECK_MINUTES_EVERY = 10  # steps between two looks at the clock for checkpoint.every_minutes


def checkpoint_dir(workdir: str) -> str:
    if "://" in workdir:  # gs://... on Cloud TPU
        return workdir.rstrip("/") + "/" + CHECKPOINT_DIR
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


class _Manager(ocp.CheckpointManager):
    """orbax's manager, kept from JAX's preemption sync point: orbax would report checkpoint
    step numbers to it (from `should_save`, `save` and the thread that finalises an async save)
    where `preemption.StopSignal` reports its own count of steps; the two would disagree on
    which step every process stops at. Stop requests are `StopSignal`'s alone."""

    def reached_preemption(self, step: int) -> bool:
        return False


class _EveryMinutes(ocp.checkpoint_managers.ContinuousCheckpointingPolicy):
    """orbax's time-based policy, its clock starting when this run started (not at a checkpoint
    an earlier run wrote, which would make a resumed run save at once). The decision is made on
    the primary process and shared, so every process saves the same steps."""

    def __init__(self, minutes: float, started: datetime.datetime):
        super().__init__(minimum_interval_secs=max(1, round(60 * minutes)))
        self.started = started

    def should_save(self, step, previous_steps, *, context):
        # Asked at every 10th step only: in a multi-process job each answer is one exchange
        # through the coordination service (the primary decides, the others read its key).
        if step.step % CHECK_MINUTES_EVERY:
            return False
        latest = previous_steps[-1] if previous_steps else None
        if latest is None or latest.time < self.started:
            latest = types.SimpleNamespace(step=step.step, time=self.started, metrics=None)
        return super().should_save(step, [latest], context=context)


class ShardStates:
    """Orbax handler for a `pipeline.ShardedIterator`'s position: each process writes one file
    per data shard it holds (`shard_{s}-of-{S}.json`) and reads the files of the shards it holds
    now, so a checkpoint written by 8 processes resumes on 4 or 1. Checkpoints from before shards
    (`process_{i}-of-{n}.json`, grain's handler: one shard per process) read the same way."""

    def save(self, directory: epath.Path, item=None, args=None):
        item = item or args.item
        for s, state in item.get_state().items():
            path = directory / f"shard_{s}-of-{item.shards}.json"
            path.write_text(json.dumps(state, indent=1))

    def restore(self, directory: epath.Path, item=None, args=None):
        item = item or args.item
        states = {}
        for s in item.iterators:
            path = directory / f"shard_{s}-of-{item.shards}.json"
            if not path.exists():
                path = directory / f"process_{s}-of-{item.shards}.json"
            if not path.exists():
                found = sorted(p.name for p in directory.iterdir())
                raise FileNotFoundError(
                    f"{directory} holds no position for data shard {s} of {item.shards} "
                    f"(it has {found})"
                )
            states[s] = json.loads(path.read_text())
        item.set_state(states)
        return item

    def structure(self, directory):
        return None

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass

    @classmethod
    def typestr(cls):
        return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(ShardStates, for_save=True)
@dataclasses.dataclass
class ShardStatesSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(ShardStates, for_restore=True)
@dataclasses.dataclass
class ShardStatesRestore(ocp.args.CheckpointArgs):
    item: Any


def make_manager(
    workdir: str,
    *,
    keep: int = 2,
    async_save: bool = True,
    read_only: bool = False,
    every_steps: int = 0,
    every_minutes: float = 0.0,
) -> ocp.CheckpointManager:
    """The workdir's checkpoint manager. `manager.should_save(step)` is orbax's save decision:
    every `every_steps` steps, or when `every_minutes` have passed since this run started or
    last saved (either 0: off). Temporary directories a killed save left are removed here."""
    policies = []
    if every_steps > 0:
        policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every_steps))
    if every_minutes > 0:
        started = datetime.datetime.now(tz=datetime.UTC)
        policies.append(_EveryMinutes(every_minutes, started))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
    )
    return _Manager(
        checkpoint_dir(workdir),
        options=options,
        item_handlers={
            "params": ocp.StandardCheckpointHandler(),
            "train": ocp.StandardCheckpointHandler(),
            "data": ShardStates(),
        },
    )


def _split(state) -> tuple[Any, dict]:
    return state.params, {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}


def save(manager: ocp.CheckpointManager, state, data_iterator, *, force: bool = False) -> bool:
    params, train = _split(state)
    step = int(jax.device_get(state.step))
    return manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            train=ocp.args.StandardSave(train),
            data=ShardStatesSave(data_iterator),
        ),
        force=force,
    )


def restore(manager: ocp.CheckpointManager, abstract_state, data_iterator, step: int | None = None):
    """Restore `(state, data_iterator)` into the shardings of `abstract_state`
    (a TrainState of `jax.ShapeDtypeStruct`s with `.sharding`)."""
    step = manager.latest_step() if step is None else step
    params, train = _split(abstract_state)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(params),
            train=ocp.args.StandardRestore(train),
            data=ShardStatesRestore(data_iterator),
        ),
    )
    t = restored["train"]
    state = abstract_state.replace(
        step=t["step"], params=restored["params"], opt_state=t["opt_state"], rng=t["rng"]
    )
    return state, restored["data"]


def saved_steps(workdir: str) -> list[int]:
    """The complete checkpoint steps of a workdir (empty if none)."""
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).exists():
        return []
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # "read only" notices
    try:
        # The manager knows which steps are complete (renamed locally, committed on GCS).
        manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
        )
        steps = sorted(manager.all_steps())
        manager.close()
    finally:
        absl_logger.setLevel(level)
    return steps


def _params_path(workdir: str, step: int | None) -> epath.Path:
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).exists():
        raise FileNotFoundError(f"No checkpoints in {workdir!r}: {directory} does not exist.")
    steps = saved_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{directory} holds no complete checkpoint.")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{directory} has no step {step}; available steps: {steps}")
    return epath.Path(directory) / str(step) / "params"


def _metadata_tree(path: epath.Path) -> Any:
    checkpointer = ocp.PyTreeCheckpointer()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that the step-level metadata is elsewhere
    try:
        metadata = checkpointer.metadata(path)
    finally:
        absl_logger.setLevel(level)
    return metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata


def params_shapes(workdir: str, step: int | None = None) -> Any:
    """The params pytree of the latest or given checkpoint as `jax.ShapeDtypeStruct`s (no
    sharding): what it holds, read from its metadata without loading a tensor."""
    tree = _metadata_tree(_params_path(workdir, step))
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
        tree,
        is_leaf=lambda m: hasattr(m, "shape"),
    )


def load_params(workdir: str, step: int | None = None) -> Any:
    """The params pytree (numpy arrays, host memory) of the latest or given checkpoint.

    Needs only the workdir: no config, mesh or CLI. Place the result on devices with
    `jax.device_put(params, shardings)` as your program needs; for large models prefer
    `restore_params`, which reads each device's shard straight into place.
    """
    path = _params_path(workdir, step)
    tree = _metadata_tree(path)
    restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
        tree,
        is_leaf=lambda m: hasattr(m, "shape"),
    )
    checkpointer = ocp.PyTreeCheckpointer()
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def restore_params(workdir: str, target: Any, step: int | None = None) -> Any:
    """Restore a checkpoint's params into `target`'s layout: a pytree of `jax.ShapeDtypeStruct`
    with `.sharding`. Each process reads only its devices' shards, casting to the target dtypes.
    Parameters in the checkpoint that `target` lacks (e.g. `lm_head` for a reward model's
    backbone) are not read."""
    path = _params_path(workdir, step)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
    # A partial restore leaves what the checkpoint lacks as it was: say so instead.
    missing = [
        jax.tree_util.keystr(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if missing:
        shown = ", ".join(missing[:4]) + (
            f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        )
        raise ValueError(f"{path} has no parameter {shown}")
    return restored
