"""Precomputed reference log-probs for DPO: one pass of the reference model before training.

The result is cached under a key that hashes the reference parameters (bytes), the tokenised
examples and the sequence length, so a second run, a resumed run or every point of a sweep (with a
shared `objective.reference_cache_dir`) reuses it. During training no reference parameters occupy
device memory: the log-probs travel in the batch as `ref_logps`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxpost import sharding
from jaxpost.data import pipeline

log = logging.getLogger("jaxpost")


def _host_bytes(x) -> bytes:
    if not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x)).tobytes()


def cache_key(
    params, examples: list[pipeline.PairExample], *, seq_len: int, extra: str = ""
) -> str:
    """sha256 over (parameter paths, dtypes, bytes), example tokens and masks, settings."""
    h = hashlib.sha256(f"v1|seq_len={seq_len}|{extra}".encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
        h.update(_host_bytes(leaf))  # one tensor at a time on the host
    for ex in examples:
        for seq in (ex.chosen, ex.rejected):
            h.update(seq.ids.tobytes())
            h.update(seq.mask.tobytes())
            h.update(b"|")
    return h.hexdigest()[:32]


def compute(logps_fn, params, examples, *, seq_len: int, batch_size: int, mesh) -> np.ndarray:
    """`[N, 2]` float32 reference log-probs (chosen, rejected) of `examples`, in order.

    `logps_fn(params, batch)` maps a `[1, B, 2, L]` batch to `[1, B, 2]` log-probs (jitted here).
    """
    batches = pipeline.make_eval_batches(
        examples,
        seq_len=seq_len,
        micro_batch=batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    fn = jax.jit(logps_fn, out_shardings=sharding.replicated(mesh))
    from jaxpost.train import to_global

    out = [np.asarray(jax.device_get(fn(params, to_global(b, mesh))))[0] for b in batches]
    return np.concatenate(out)[: len(examples)].astype(np.float32)


def attach(examples, logps: np.ndarray) -> list[pipeline.PairExample]:
    if len(logps) != len(examples):
        raise ValueError(f"{len(logps)} reference log-probs for {len(examples)} examples")
    return [dataclasses.replace(ex, ref_logps=lp) for ex, lp in zip(examples, logps, strict=True)]


def load_or_compute(cache_dir: str, key: str, compute_fn, *, what: str) -> np.ndarray:
    path = os.path.join(cache_dir, f"{key}.npy")
    if os.path.exists(path):
        logps = np.load(path)
        log.info("reference log-probs (%s): reused %s", what, path)
        return logps
    t0 = time.perf_counter()
    logps = compute_fn()
    if jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as f:
            np.save(f, logps)
        os.replace(tmp, path)  # atomic: a reader never sees a partial file
    log.info(
        "reference log-probs (%s): %d pairs in %.1fs, saved to %s",
        what,
        len(logps),
        time.perf_counter() - t0,
        path,
    )
    return logps
