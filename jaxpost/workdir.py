"""Run-directory rules: what a workdir holds (`config.json`, `checkpoints/`) and who may use it.

A workdir with checkpoints is resumed only by a run with the same model, data and batch settings
(`check_resume`), never clobbered; `init.workdir` must hold a checkpoint of the same architecture
(`check_init_workdir`). Both checks run before any data is read or anything compiled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping

import jax
import ml_collections
from etils import epath

from jaxpost import checkpoint as ckpt
from jaxpost import model as model_lib
from jaxpost.data import pipeline

log = logging.getLogger("jaxpost")

# Settings a resumed run must share with the run that wrote the checkpoint: the data iterator's
# saved position counts batches of these examples, and the model must be the same one. Compute
# settings (model.dtype, model.remat, mesh, eval, log, checkpoint cadence) may change.
RESUME_KEYS = (
    "seed",
    "objective",
    "data.train_path",
    "data.tokenizer",
    "data.assistant_mask",
    "data.chat_template_kwargs",
    "data.seq_len",
    "data.truncation",
    "data.skip_invalid",
    "data.packing",
    "data.max_segments_per_row",
    "data.packing_bins",
    "data.num_workers",
    "train.global_batch",
    "train.accum_steps",
    "init.workdir",
    "init.hf_dir",
    "init.step",
)
# Model settings that change how, not what, is computed: they may differ on resume and between
# a run and the init.workdir it starts from.
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "attention")
_RESUME_MODEL_EXEMPT = ("dtype", "remat", "attention")
# Memory/placement settings of the objective that may change on resume (e.g. after an OOM).
_RESUME_OBJECTIVE_EXEMPT = ("logits_chunk_size", "reference_cache_dir")


def _get(tree: Mapping, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, Mapping) else None
    return tree


def _model_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(model_lib.Config)}


def check_resume(workdir: str, config: ml_collections.ConfigDict, data_kind: str) -> None:
    """A workdir's checkpoints may only be resumed by a compatible run (never clobbered).
    `data_kind` is the row layout the objective reads (`pipeline.KINDS`)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists() or not ckpt.saved_steps(workdir):
        return  # nothing to resume (a run that died before its first save locks nothing)
    saved = json.loads(path.read_text())
    current = config.to_dict()
    saved_objective = saved.get("objective", {})
    for tree in (saved, current):
        tree["objective"] = {
            k: v
            for k, v in tree.get("objective", {}).items()
            if k not in _RESUME_OBJECTIVE_EXEMPT and k in saved_objective
        }
    defaults = _model_defaults()
    saved_model = {**defaults, **saved.get("model", {})}
    current_model = {**defaults, **current["model"]}
    problems = [
        f"model.{k}: {saved_model.get(k)!r} there, {current_model.get(k)!r} here"
        for k in sorted(set(saved_model) | set(current_model))
        if k not in _RESUME_MODEL_EXEMPT and saved_model.get(k) != current_model.get(k)
    ]
    problems += [
        f"{k}: {_get(saved, k)!r} there, {_get(current, k)!r} here"
        for k in RESUME_KEYS
        if _get(saved, k) != _get(current, k)
    ]
    # Workdirs written before the row layout was recorded hold next-token rows (a reward model
    # then read its reward one token early).
    saved_kind = saved.get("_data_kind", data_kind if pipeline.next_token_rows(data_kind) else "")
    if saved_kind != data_kind:
        if not saved_kind:
            raise ValueError(
                f"{workdir} holds checkpoints of an earlier jaxpost whose rows were next-token "
                f"rows (a reward model read its reward one token before the end); this run "
                f"reads {data_kind} rows. Use a new --workdir (init.workdir can start from it)."
            )
        problems.append(f"row layout: {saved_kind} there, {data_kind} here")
    if problems:
        kind = "a different model" if problems[0].startswith("model.") else "a different run"
        raise ValueError(
            f"{workdir} holds checkpoints of {kind} ({'; '.join(problems)}). Resuming would "
            "train a different model or skip/replay data; use a new --workdir, or the same "
            "settings to resume."
        )
    if _get(saved, "train.num_steps") != current["train"]["num_steps"]:
        log.warning(
            "resuming with train.num_steps=%s (was %s): the learning-rate schedule is "
            "stretched from here on",
            current["train"]["num_steps"],
            _get(saved, "train.num_steps"),
        )


def data_shards(workdir: str, config: ml_collections.ConfigDict, micro_batch: int) -> int:
    """How many data shards the run's batches come from: the number of processes of the run
    that started the workdir (recorded in config.json), whatever the number now. Process `i` of
    `n` reads shards `[i*S/n, (i+1)*S/n)`, so a resume with 8, 4, 2 or 1 processes reads the
    same global batches from the same positions."""
    path = epath.Path(workdir) / "config.json"
    saved = json.loads(path.read_text()) if path.exists() and ckpt.saved_steps(workdir) else {}
    # (`_process_count`: workdirs written before shards were recorded: one shard per process)
    shards = int(saved.get("_data_shards", saved.get("_process_count", jax.process_count())))
    n = jax.process_count()
    if shards % n:
        raise ValueError(
            f"{workdir} was started with {shards} process(es), so its data position is {shards} "
            f"shard(s), which {n} processes cannot split evenly; resume with a number of "
            f"processes that divides {shards}."
        )
    if micro_batch % shards:
        raise ValueError(
            f"The micro-batch of {micro_batch} rows (train.global_batch / train.accum_steps) "
            f"does not split over the {shards} data shards of {workdir}."
        )
    return shards


def write_config(
    workdir: str, config: ml_collections.ConfigDict, data_kind: str, shards: int | None = None
) -> None:
    """WORKDIR/config.json (atomically, from process 0): what `jaxpost export`/`sample` and a
    resumed run read back."""
    if jax.process_index() != 0:
        return
    record = config.to_dict()
    record["_process_count"] = jax.process_count()  # for information
    record["_data_shards"] = shards or jax.process_count()  # kept across resumes
    record["_data_kind"] = data_kind  # the row layout, checked on resume
    path = epath.Path(workdir) / "config.json"
    tmp = epath.Path(workdir) / "config.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(path)


def check_init_workdir(config: ml_collections.ConfigDict) -> None:
    """`init.workdir` must be a jaxpost workdir with checkpoints of the same architecture."""
    src = config.init.workdir
    if not src:
        return
    path = epath.Path(src) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"config.init.workdir={src!r} holds no config.json: it is not a jaxpost workdir."
        )
    if not epath.Path(ckpt.checkpoint_dir(src)).exists():
        raise FileNotFoundError(f"config.init.workdir={src!r} holds no checkpoints.")
    saved = json.loads(path.read_text()).get("model", {})
    defaults = _model_defaults()
    diff = sorted(
        k
        for k in set(saved) | set(config.model)
        if saved.get(k, defaults.get(k)) != config.model.get(k, defaults.get(k))
    )
    diff = [k for k in diff if k not in COMPUTE_FIELDS]
    if diff:
        detail = ", ".join(
            f"model.{k}: {saved.get(k)!r} there, {config.model.get(k)!r} here" for k in diff
        )
        raise ValueError(
            f"config.init.workdir={src!r} holds a different architecture ({detail}); set the "
            "model config to match the checkpoint."
        )
