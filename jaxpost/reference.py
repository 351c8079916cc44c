"""Precomputed reference log-probs for DPO: one pass of the reference model before training.

The result is cached under a key that hashes the reference parameters (fingerprints computed on
device, shard by shard, never gathering a parameter), the tokenised examples and the sequence
length, so a second run, a resumed run or every point of a sweep (with a
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
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxpost import sharding
from jaxpost.data import pipeline

log = logging.getLogger("jaxpost")


# Odd 32-bit constants: one per lane of a parameter fingerprint.
_LANES = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


def _mix(x: jax.Array) -> jax.Array:
    """A bijective 32-bit avalanche (murmur3's finaliser) on uint32 arrays."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The bit patterns of `x` as uint32 (64-bit values as two uint32 on a trailing axis)."""
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    narrow = {2: jnp.uint16, 1: jnp.uint8}[size]
    return jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """`[4]` uint32: per lane, the wrapping sum over elements of mix(value bits ^ mix(position
    ^ lane)). Integer sums are exact in any order, so the result does not depend on how `x` is
    sharded; any single changed or moved element changes every lane."""
    bits = _bits(x).reshape(-1) if x.ndim == 0 else _bits(x)
    position = jnp.zeros(bits.shape, jnp.uint32)
    for axis in range(bits.ndim):  # per-axis coordinates: no flat index to overflow 2^32
        position = _mix(position ^ jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis))
    return jnp.stack(
        [
            jnp.sum(_mix(bits ^ _mix(position ^ jnp.uint32(lane))), dtype=jnp.uint32)
            for lane in _LANES
        ]
    )


def params_fingerprint(params) -> np.ndarray:
    """`[n_leaves, 4]` uint32 fingerprints of a params pytree, computed where the params live:
    each device reduces its own shards and only the small sums cross devices and hosts (no
    parameter is ever gathered), and the same values give the same fingerprint however they are
    sharded."""
    leaves = jax.tree.leaves(params)
    mesh = getattr(getattr(leaves[0], "sharding", None), "mesh", None)
    out = sharding.replicated(mesh) if isinstance(mesh, jax.sharding.Mesh) else None

    def fingerprints(*xs):
        return jnp.stack([_leaf_fingerprint(x) for x in xs])

    return np.asarray(jax.jit(fingerprints, out_shardings=out)(*leaves))


def cache_key(
    params, examples: list[pipeline.PairExample], *, seq_len: int, extra: str = ""
) -> str:
    """sha256 over (parameter paths, dtypes, shapes, fingerprints), example tokens and masks,
    settings."""
    h = hashlib.sha256(f"v2|seq_len={seq_len}|{extra}".encode())
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), fingerprint in zip(flat, params_fingerprint(params), strict=True):
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
        h.update(fingerprint.tobytes())
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
