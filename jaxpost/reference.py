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
from etils import epath
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

    `logps_fn(params, batch)` maps a `[1, B, 2, L]` batch to `[1, B, 2]` log-probs. Each row
    carries its example index through the computation, so the result is put back in order
    however the mesh lays processes' rows out; every process gets the whole result.
    """
    batches = pipeline.make_eval_batches(
        examples,
        seq_len=seq_len,
        micro_batch=batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        with_index=True,
    )
    batch_sharding = sharding.batch_sharding(mesh)

    def fn(p, batch):
        return logps_fn(p, batch), batch["example_index"]

    fn = jax.jit(fn, out_shardings=(batch_sharding, batch_sharding))
    out = np.full((len(examples), 2), np.nan, np.float32)
    for b in batches:
        logps, index = fn(params, sharding.to_global(b, mesh))
        logps = np.asarray(multihost_utils.process_allgather(logps, tiled=True))[0]
        index = np.asarray(multihost_utils.process_allgather(index, tiled=True))[0]
        real = index >= 0
        out[index[real]] = logps[real]
    if np.isnan(out).any():
        raise RuntimeError("reference pass left some examples without log-probs")
    return out


def precompute(
    logps_fn,
    params,
    data: pipeline.RunData,
    *,
    cache_dir: str,
    mesh,
    seq_len: int,
    batch_size: int,
    extra: str = "",
) -> pipeline.RunData:
    """`data` with reference log-probs attached to every train and eval pair: read from
    `cache_dir` when a run with the same reference params, examples and settings (`extra`)
    computed them before, else computed with `logps_fn` (see `compute`) and saved there.

    The train mixture's components are hashed and computed as one list (one cache file)."""
    sizes = [len(source) for source in data.train]
    splits = {"train": [ex for source in data.train for ex in source], "eval": list(data.eval)}
    for name, examples in splits.items():
        if not examples:
            continue
        key = cache_key(params, examples, seq_len=seq_len, extra=extra)
        logps = load_or_compute(
            cache_dir,
            key,
            what=name,
            compute_fn=lambda ex=examples: compute(
                logps_fn, params, ex, seq_len=seq_len, batch_size=batch_size, mesh=mesh
            ),
        )
        splits[name] = attach(examples, logps)
    train, start = [], 0
    for n in sizes:
        train.append(splits["train"][start : start + n])
        start += n
    return dataclasses.replace(data, train=train, eval=splits["eval"])


def attach(examples, logps: np.ndarray) -> list[pipeline.PairExample]:
    if len(logps) != len(examples):
        raise ValueError(f"{len(logps)} reference log-probs for {len(examples)} examples")
    return [dataclasses.replace(ex, ref_logps=lp) for ex, lp in zip(examples, logps, strict=True)]


def load_or_compute(cache_dir: str, key: str, compute_fn, *, what: str) -> np.ndarray:
    """Read `cache_dir/key.npy`, or compute and write it (atomically, from process 0).

    Process 0 decides whether the file exists and tells the others, so all processes take the
    same branch (the compute is a collective: one process alone would hang).
    """
    path = epath.Path(cache_dir) / f"{key}.npy"
    exists = path.exists()
    if jax.process_count() > 1:
        exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
    if exists:
        with path.open("rb") as f:
            logps = np.load(f)
        log.info("reference log-probs (%s): reused %s", what, path)
        return logps
    t0 = time.perf_counter()
    logps = compute_fn()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{key}.npy.tmp{os.getpid()}"
        with tmp.open("wb") as f:
            np.save(f, logps)
        tmp.replace(path)  # atomic: a reader never sees a partial file
    log.info(
        "reference log-probs (%s): %d pairs in %.1fs, saved to %s",
        what,
        len(logps),
        time.perf_counter() - t0,
        path,
    )
    return logps
