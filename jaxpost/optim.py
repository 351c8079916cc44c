"""The optimizer: optax AdamW, warmup + cosine/linear/constant decay, global-norm clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

DECAYS = ("cosine", "linear", "constant")


def make_schedule(optim: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr` over `optim.warmup_steps`, then decay to
    `optim.lr * optim.final_lr_fraction` at `num_steps`."""
    lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
    final = lr * float(optim["final_lr_fraction"])
    decay_steps = max(num_steps - warmup, 1)
    kind = optim["decay"]
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=final / lr if lr else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, final, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.decay={kind!r} is not one of {DECAYS}")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def _decay_mask(params):
    """Weight decay on weight matrices (kernels, embeddings, heads), not norm scales or biases."""

    def decays(path, _):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return bool(names) and names[-1] not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    schedule = make_schedule(optim, num_steps)
    parts = []
    if float(optim["clip_grad_norm"]) > 0:
        parts.append(optax.clip_by_global_norm(float(optim["clip_grad_norm"])))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(optim["b1"]),
            b2=float(optim["b2"]),
            eps=float(optim["eps"]),
            weight_decay=float(optim["weight_decay"]),
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts)
