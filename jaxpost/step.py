"""The pure-JAX step machinery every objective shares: train state, accumulation, jitted steps.

`make_train_step` returns one `jax.jit` step with explicit shardings and donation. Each loss term
is divided by its denominator over the whole accumulated global batch, so gradient accumulation
and multi-host training equal one large batch -- for every loss whose per-pair terms do not
depend on the other pairs of the micro-batch (`Objective.accumulation_exact`; the DPO variants
`aot`/`aot_unpaired` sort within a micro-batch and are the exception).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpost import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _init_params(rng, *, model, seq_len):
    """Boxed (logically annotated) fresh params of `model` from the state's rng."""
    init_rng, _ = jax.random.split(rng)
    return model.init(init_rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def _init_state(rng, *, model, tx, seq_len) -> TrainState:
    """Boxed (logically annotated) state; `nn.meta.unbox` gives the plain pytree."""
    _, state_rng = jax.random.split(rng)
    params = _init_params(rng, model=model, seq_len=seq_len)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
    )


def create_state(model, tx, mesh, *, seed: int, seq_len: int):
    """Create the train state directly in its sharded layout (never whole on one device).

    Call under `nn.logical_axis_rules(sharding.LOGICAL_RULES)`. Returns `(state, shardings)`.
    """
    init = functools.partial(_init_state, model=model, tx=tx, seq_len=seq_len)
    rng = jax.random.PRNGKey(seed)
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(init, rng)
        shardings = sharding.logical_shardings(boxed, mesh)
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
    return state, shardings


def state_shardings(model, tx, mesh, *, seq_len: int):
    """The shardings `create_state` gives the state, without creating it."""
    init = functools.partial(_init_state, model=model, tx=tx, seq_len=seq_len)
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        return sharding.logical_shardings(jax.eval_shape(init, jax.random.PRNGKey(0)), mesh)


def abstract_state(state_shardings, model, tx, *, seq_len: int):
    """ShapeDtypeStructs (with shardings) of the state, for restoring without initialising."""
    init = functools.partial(_init_state, model=model, tx=tx, seq_len=seq_len)
    shapes = sharding.strip_boxes(jax.eval_shape(init, jax.random.PRNGKey(0)))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_shardings
    )


def init_params(model, mesh, *, seed: int, seq_len: int):
    """Fresh params, born sharded: exactly the params `create_state` makes from `seed`."""
    init = functools.partial(_init_params, model=model, seq_len=seq_len)
    rng = jax.random.PRNGKey(seed)
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        shardings = sharding.logical_shardings(jax.eval_shape(init, rng), mesh)
        return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def abstract_params(model, mesh, *, seq_len: int = 8):
    """ShapeDtypeStructs (with their training shardings) of `model`'s params: a restore target."""
    init = functools.partial(_init_params, model=model, seq_len=seq_len)
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(init, jax.random.PRNGKey(0))
        shardings = sharding.logical_shardings(boxed, mesh)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        sharding.strip_boxes(boxed),
        shardings,
    )


def combine(a, b, kind, xp=jnp):
    """Combine two partial aux values: min for minima, max for maxima, else a sum."""
    if kind == "minima":
        return xp.minimum(a, b)
    if kind == "maxima":
        return xp.maximum(a, b)
    return a + b


def _combine_aux(acc, aux):
    return {
        kind: jax.tree.map(
            lambda a, b, k=kind: combine(a, b.astype(jnp.float32), k), acc[kind], aux[kind]
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


def accumulate(objective, params, batch_A, frozen, *, with_grads: bool):
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


def report(aux, xp=jnp) -> dict[str, Any]:
    """Scalars of an aux tree: each `(sum, count)` metric as a mean, totals and extrema as is."""
    out = {}
    for name, (total, count) in aux["metrics"].items():
        out[name] = total / xp.maximum(count, 1.0)
    for kind in ("totals", "minima", "maxima"):
        out.update(aux.get(kind, {}))
    return out


def make_train_step(objective, tx, schedule, *, state_shardings, mesh, frozen_shardings=None):
    """`step(state, batch, frozen) -> (state, metrics)`, jitted over `mesh`.

    `batch` leaves are `[accum_steps, global_micro_batch, ...]`. Each loss term is divided by its
    denominator over the whole accumulated batch (e.g. all target tokens), so accumulation over A
    micro-batches equals one step on the concatenated batch (see the module docstring for the
    losses where it does not).
    """

    def step(state: TrainState, batch, frozen):
        loss, _, _, aux, grads = accumulate(objective, state.params, batch, frozen, with_grads=True)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, **report(aux)}
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
        _, term_sums, denoms, aux, _ = accumulate(
            objective, params, batch, frozen, with_grads=False
        )
        return term_sums, denoms, aux

    return jax.jit(
        eval_step,
        in_shardings=(params_shardings, sharding.batch_sharding(mesh), frozen_shardings),
        out_shardings=sharding.replicated(mesh),
    )


def make_frozen(objective, params):
    """The step's `frozen` argument and its shardings: `objective.frozen(params)` (e.g. a copy
    of the initial policy as a DPO reference) computed on device, where it keeps the layout of
    what it was made from; `(None, None)` when the objective has no frozen part."""
    if objective.frozen is None:
        return None, None
    frozen = jax.jit(objective.frozen)(params)
    return frozen, jax.tree.map(lambda x: x.sharding, frozen)


def sum_results(results) -> tuple[dict, dict, dict]:
    """Combine eval-step results `(term_sums, denominators, aux)` on the host in float64."""
    total = None
    for result in results:
        result = jax.tree.map(np.float64, jax.device_get(result))
        if total is None:
            total = result
            continue
        terms, denoms, aux = result
        total = (
            {k: total[0][k] + terms[k] for k in terms},
            {k: total[1][k] + denoms[k] for k in denoms},
            {
                kind: jax.tree.map(
                    lambda a, b, k=kind: combine(a, b, k, np), total[2][kind], aux[kind]
                )
                for kind in aux
            },
        )
    return total
