"""What a run is, resolved and checked before any data is read or anything compiled.

`make_plan(config)` is the setup that `train` and `evaluate_checkpoint` share: the config checked,
`init.hf_dir`'s architecture and tokenizer taken in, `model.dtype="auto"` resolved, the
objective built, the mesh made, the batch layout checked against it, the tokenizer loaded. The
rest of this module turns a plan into data (`load_data`, `train_iterator`, `eval_batches`) and
starting parameters (`initial_params`) -- all without knowing which objective runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxpost import checkpoint as ckpt
from jaxpost import config as config_lib
from jaxpost import hf, objectives, sharding, workdir
from jaxpost import model as model_lib
from jaxpost.data import pipeline
from jaxpost.models import smollm2

log = logging.getLogger("jaxpost")

BUILTIN_MODELS = {"builtin:smollm2-135m-instruct": smollm2.hf_dir}


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    accum_steps: int
    micro_batch: int  # global, per micro-step
    local_micro_batch: int  # per process


@dataclasses.dataclass(frozen=True)
class Plan:
    config: ml_collections.ConfigDict  # resolved (architecture, tokenizer, dtype)
    model_config: model_lib.Config
    objective: objectives.Objective
    mesh: jax.sharding.Mesh
    layout: BatchLayout | None  # None for evaluation-only plans
    packing: dict[str, Any]  # packing, segments_per_row, packing_bins
    tokenizer: Any

    @property
    def seq_len(self) -> int:
        return int(self.config.data.seq_len)


def make_plan(
    config: ml_collections.ConfigDict,
    *,
    training: bool = True,
    devices: list | None = None,
    backend: str | None = None,
) -> Plan:
    """Check and resolve `config` into a `Plan`; every error a user can cause is raised here.
    `training=False` (evaluation) skips what only training needs: the train batch layout.
    `devices`/`backend` plan for other devices than this process's (`jaxpost plan --topology`:
    a TPU slice's abstract devices, `backend="tpu"`); default: `jax.devices()`, its backend."""
    config_lib.check_config(config)
    config = resolve_hf_dir(config)
    config = resolve_logits_chunk(resolve_dtype(config, backend), backend)
    model_config = model_lib.Config(**config.model)
    packing = packing_settings(config)
    objective = objectives.make_objective(
        config.objective, model_config, segments_per_row=packing["segments_per_row"]
    )
    if pipeline.is_shared(objective.data_kind):
        check_shared_prompt(config)
    if config.init.hf_dir:
        kind = hf.read_config(config.init.hf_dir)[1]
        if kind == "reward" and objective.params_kind != "reward":
            raise ValueError(
                f"config.init.hf_dir={config.init.hf_dir!r} is a reward model (sequence "
                f"classifier); objective {objective.name!r} needs a causal LM"
            )
    try:
        mesh = sharding.make_mesh(config.mesh, devices)
    except NotImplementedError as e:  # jax.make_mesh: axes that split a torus dimension
        raise ValueError(
            f"config.mesh {dict(config.mesh)} does not map onto the devices: {e}"
        ) from None
    sharding.check_model_fits_mesh(model_config, mesh)
    check_eval_batch(config, mesh)
    layout = batch_layout(config, mesh) if training else None
    if layout is not None and layout.accum_steps > 1 and not objective.accumulation_exact:
        log.warning(
            "config.objective (%s, loss_type=%s) couples the pairs of a micro-batch (it sorts "
            "them), so with train.accum_steps=%d a step is not the same as one step on the "
            "whole batch",
            objective.name,
            config.objective.loss_type,
            layout.accum_steps,
        )
    tokenizer = pipeline.make_tokenizer(config.data)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})."
        )
    return Plan(config, model_config, objective, mesh, layout, packing, tokenizer)


def check_shared_prompt(config: ml_collections.ConfigDict) -> None:
    """Shared-prompt pair rows need packing (a pair alone in a row of 2 x seq_len saves
    nothing) and an attention kernel that takes a mask."""
    if config.data.packing == "none":
        raise ValueError(
            "config.objective.shared_prompt=True packs pairs, each its prompt once, into rows "
            f"of 2 x data.seq_len={2 * int(config.data.seq_len)} tokens: set "
            "--config.data.packing=first_fit (or best_fit)"
        )
    if config.model.attention == "splash":
        raise ValueError(
            "config.objective.shared_prompt=True masks the rejected completion from the chosen "
            "one, which the splash kernel cannot express: set --config.model.attention=auto "
            "(blockwise attention for these rows on TPUs) or blockwise, or "
            "objective.shared_prompt=false"
        )


def resolve_hf_dir(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """With `init.hf_dir`: a copy of `config` whose model is that directory's architecture (the
    compute settings dtype/param_dtype/remat/attention stay) and whose tokenizer defaults to it.
    Without: the byte tokenizer unless `data.tokenizer` names one."""
    src = config.init.hf_dir
    if not src:
        if not config.data.tokenizer:
            config = config.copy_and_resolve_references()
            config.data.tokenizer = "byte"
        return config
    if src.startswith("builtin:"):
        if src not in BUILTIN_MODELS:
            raise ValueError(
                f"config.init.hf_dir={src!r}: built-in models are {sorted(BUILTIN_MODELS)}"
            )
        src = BUILTIN_MODELS[src]()  # fetched, converted and cached on first use
    hf_config, _ = hf.read_config(src)
    config = config.copy_and_resolve_references()
    config.init.hf_dir = src
    arch = dataclasses.asdict(hf_config)
    for k in workdir.COMPUTE_FIELDS:
        arch[k] = config.model[k]
    config.model = arch
    if not config.data.tokenizer:
        config.data.tokenizer = src
    return config


def resolve_dtype(
    config: ml_collections.ConfigDict, backend: str | None = None
) -> ml_collections.ConfigDict:
    """`model.dtype="auto"` made concrete for `backend` (default: this process's): bfloat16
    compute on accelerators, float32 on CPU; params stay in `model.param_dtype`, float32 by
    default (float32 master weights), so that WORKDIR/config.json records what ran."""
    if config.model.dtype != "auto":
        return config
    config = config.copy_and_resolve_references()
    config.model.dtype = model_lib.resolve_dtype("auto", backend)
    return config


# (backend: one row's float32 logits above this many bytes -> chunks of that many positions)
AUTO_CHUNKS = {"cpu": (4 << 20, 128), "accelerator": (128 << 20, 512)}


def resolve_logits_chunk(
    config: ml_collections.ConfigDict, backend: str | None = None
) -> ml_collections.ConfigDict:
    """`objective.logits_chunk_size=-1` (auto) made concrete for `backend` (default: this
    process's). On GPU/TPU, chunks of 512 positions when one row's `[seq_len, vocab]` float32
    logits would exceed 128 MiB (e.g. seq 2048 x a 32k vocabulary), so they never sit in device
    memory whole. On CPU, chunks of 128 above 4 MiB (e.g. seq 256 x an 8k vocabulary): there
    the chunked head, which also skips prompt positions, was 1.2x faster than full logits even
    with every position a target (bench-tiny SFT, tools/bench.py; docs/PERFORMANCE.md) -- the
    log-softmax over whole rows is memory-bound. Small vocabularies keep full logits."""
    if int(config.objective.logits_chunk_size) != -1:
        return config
    backend = backend or jax.default_backend()
    above, size = AUTO_CHUNKS["cpu" if backend == "cpu" else "accelerator"]
    row_bytes = 4 * int(config.data.seq_len) * int(config.model.vocab_size)
    chunk = size if row_bytes > above else 0
    config = config.copy_and_resolve_references()
    config.objective.logits_chunk_size = min(chunk, int(config.data.seq_len))
    return config


def packing_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    packing = config.data.packing
    if packing not in pipeline.PACKINGS:
        raise ValueError(f"config.data.packing={packing!r} is not one of {pipeline.PACKINGS}")
    segments = int(config.data.max_segments_per_row) if packing != "none" else 1
    if segments < 1:
        raise ValueError("config.data.max_segments_per_row must be at least 1")
    if packing != "none" and int(config.data.packing_bins) < 1:
        raise ValueError(
            f"config.data.packing_bins={config.data.packing_bins} must be at least 1 "
            "(rows filled at a time; 64 is a good default)"
        )
    return {
        "packing": packing,
        "segments_per_row": segments,
        "packing_bins": int(config.data.packing_bins),
    }


def batch_layout(config: ml_collections.ConfigDict, mesh) -> BatchLayout:
    """How `train.global_batch` splits into micro-batches, devices and processes (checked)."""
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
    return BatchLayout(gb, accum, micro, micro // jax.process_count())


def check_eval_batch(config: ml_collections.ConfigDict, mesh) -> None:
    """Eval batches split over the data-parallel devices, each process feeding its own rows."""
    eval_b, dp = int(config.eval.batch_size), sharding.data_parallel_size(mesh)
    if eval_b % dp:
        raise ValueError(
            f"eval.batch_size={eval_b} is not divisible by the data-parallel size {dp}."
        )
    n_proc = jax.process_count()
    if dp % n_proc:
        raise ValueError(
            f"The data-parallel size mesh.data x mesh.fsdp = {dp} is not a multiple of the "
            f"{n_proc} processes: every process must feed its own batch rows. Keep the tensor "
            "axis within a host (e.g. --config.mesh.tensor=<devices per host or fewer>)."
        )


def exchange(data: bytes) -> list[bytes]:
    """Every process's `data`, in process order (a collective: all processes call it)."""
    if jax.process_count() == 1:
        return [data]
    sizes = multihost_utils.process_allgather(np.array([len(data)], np.int64)).reshape(-1)
    buf = np.zeros(max(int(sizes.max()), 1), np.uint8)
    buf[: len(data)] = np.frombuffer(data, np.uint8)
    everything = np.asarray(multihost_utils.process_allgather(buf))
    return [everything[p, : int(sizes[p])].tobytes() for p in range(len(sizes))]


def agree_max(value: int) -> int:
    """The largest `value` over all processes (a collective)."""
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.array([value], np.int64))))


def load_data(plan: Plan, *, train: bool = True) -> pipeline.RunData:
    """The run's data opened and validated now, so bad data stops the run here: raw records
    are tokenised once to check them (each process a share), a prepared dataset only has its
    manifest checked. Examples stay on disk and are tokenised again when the pipeline reads
    them. `train=False` opens only the eval split."""
    config = plan.config
    settings = pipeline.Settings(plan.objective.data_kind, plan.seq_len, config.data.truncation)
    common = dict(
        skip_invalid=bool(config.data.skip_invalid),
        tfds_data_dir=config.data.tfds_data_dir,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        exchange=exchange,
    )
    handle = pipeline.TokenizerHandle(config.data, plan.tokenizer)
    data = pipeline.RunData(train=[], weights=[], eval=[])
    if train:
        data.train, data.weights, data.train_stats = pipeline.load_mixture(
            config.data.train_path, "train", handle, settings, **common
        )
        log.info("train data %s: %s", config.data.train_path, data.train_stats.summary())
    if config.data.eval_path:
        eval_sources, _, data.eval_stats = pipeline.load_mixture(
            config.data.eval_path,
            "eval",
            handle,
            settings,
            max_examples=int(config.data.max_eval_examples),
            **common,
        )
        data.eval = eval_sources[0] if len(eval_sources) == 1 else pipeline.Concat(eval_sources)
        log.info("eval data %s: %s", config.data.eval_path, data.eval_stats.summary())
    return data


def train_iterator(plan: Plan, data: pipeline.RunData, shards: int | None = None):
    """This process's endless, checkpointable iterator of `[accum, micro_batch, ...]` batches:
    its block of the run's `shards` data shards (default: one per process), their rows side by
    side (`pipeline.ShardedIterator`)."""
    n, i = jax.process_count(), jax.process_index()
    shards = shards or n
    per_process = shards // n
    return pipeline.ShardedIterator(
        {
            s: pipeline.make_train_iterator(
                data.train,
                mixture_weights=data.weights,
                **plan.packing,
                kind=plan.objective.data_kind,
                seq_len=plan.seq_len,
                micro_batch=plan.layout.micro_batch // shards,
                accum_steps=plan.layout.accum_steps,
                seed=int(plan.config.seed),
                process_index=s,
                process_count=shards,
                num_workers=int(plan.config.data.num_workers),
            )
            for s in range(i * per_process, (i + 1) * per_process)
        },
        shards,
    )


def eval_batches(plan: Plan, examples: list) -> list:
    """The whole eval split once, as this process's `[1, micro_batch, ...]` batches."""
    if not examples:
        return []
    return pipeline.make_eval_batches(
        examples,
        seq_len=plan.seq_len,
        micro_batch=int(plan.config.eval.batch_size) // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        kind=plan.objective.data_kind,
        agree_max=agree_max,
        **plan.packing,
    )


def initial_params(plan: Plan, params):
    """The params training starts from: `params` (fresh, sharded), or those of `init.workdir`
    (e.g. an SFT run) or `init.hf_dir`, restored straight into `params`' sharded layout (each
    host reads its own shards). A causal LM's weights fill `objective.lm_subtree` (a reward
    model's backbone); what they do not cover (a new reward head) keeps its fresh values."""
    init, objective = plan.config.init, plan.objective
    if not (init.workdir or init.hf_dir):
        return params
    log.info("initial parameters from %s", init.workdir or init.hf_dir)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    if not init.workdir:
        loaded = hf.load_params(
            init.hf_dir, plan.model_config, objective.params_kind, target=target
        )
        # What the directory does not hold (a causal LM's missing reward head) stays fresh.
        return jax.tree.map(
            lambda new, old: old if isinstance(new, jax.ShapeDtypeStruct) else new, loaded, params
        )
    sub = target
    for key in objective.lm_subtree:
        sub = sub[key]
    step = int(init.step)
    try:
        restored = ckpt.restore_params(init.workdir, sub, None if step < 0 else step)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"config.init.workdir={init.workdir!r}: its parameters do not fit this "
            f"{objective.name} model ({e})"
        ) from None
    return _replace_subtree(params, objective.lm_subtree, restored)


def _replace_subtree(tree, path: tuple[str, ...], value):
    if not path:
        return value
    return {**tree, path[0]: _replace_subtree(tree[path[0]], path[1:], value)}
