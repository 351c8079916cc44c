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


def examples_digest(examples) -> str:
    """What the examples are: their own digest (`examples.scan_examples`, prepared datasets:
    computed without reading them again), else a hash of every token (small lists)."""
    digest = getattr(examples, "digest", "")
    if digest:
        return digest
    h = hashlib.sha256(f"n={len(examples)}".encode())
    for ex in examples:
        for seq in (ex.chosen, ex.rejected):
            h.update(np.asarray(seq.ids, np.int32).tobytes())
            h.update(np.asarray(seq.mask, np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()


def cache_key(params, examples, *, seq_len: int, extra: str = "") -> str:
    """sha256 over (parameter paths, dtypes, shapes, fingerprints), the examples' digest,
    settings. Nothing is gathered: the fingerprints are reduced on device."""
    h = hashlib.sha256(f"v3|seq_len={seq_len}|{extra}".encode())
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), fingerprint in zip(flat, params_fingerprint(params), strict=True):
        h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
        h.update(fingerprint.tobytes())
    h.update(examples_digest(examples).encode())
    return h.hexdigest()[:32]


def _local_rows(*arrays: jax.Array) -> list[np.ndarray]:
    """This process's rows of `[1, B, ...]` batch-sharded arrays (each row once)."""
    out = []
    for arr in arrays:
        seen, parts = set(), []
        for shard in arr.addressable_shards:
            start = shard.index[1].start or 0
            if start not in seen:
                seen.add(start)
                parts.append((start, np.asarray(shard.data)[0]))
        out.append(np.concatenate([p for _, p in sorted(parts, key=lambda x: x[0])]))
    return out


def _gather_rows(index: np.ndarray, logps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every process's `(index, logps)` rows of a chunk (each process has the same count)."""
    if jax.process_count() == 1:
        return index, logps
    index = np.asarray(multihost_utils.process_allgather(index)).reshape(-1)
    logps = np.asarray(multihost_utils.process_allgather(logps)).reshape(-1, 2)
    return index, logps


def compute(
    logps_fn,
    params,
    examples,
    *,
    seq_len: int,
    batch_size: int,
    mesh,
    parts_dir: str | None = None,
    what: str = "",
) -> np.ndarray:
    """`[N, 2]` float32 reference log-probs (chosen, rejected) of `examples`, in order; every
    process gets the whole result.

    `logps_fn(params, batch)` maps a `[1, B, 2, L]` batch to `[1, B, 2]` log-probs. Batches
    stream from `examples` (each process builds only its rows); every row carries its example
    index, so results land in place however the mesh lays rows out. The processes exchange
    their results every chunk of batches (a few numbers per pair). With `parts_dir`, process
    0 saves each chunk as it finishes, and a pass that was interrupted continues after the
    chunks saved (no shared filesystem needed: process 0 sends them to the others).
    """
    P, pid = jax.process_count(), jax.process_index()
    micro = batch_size // P
    n = len(examples)
    n_batches = pipeline.eval_batch_count(n, micro, P)
    per_chunk = max(1, -(-n_batches // 100))
    n_chunks = -(-n_batches // per_chunk)
    out = np.full((n, 2), np.nan, np.float32)
    # Chunk files of one batch layout; a different layout (batch size) starts its own.
    parts = epath.Path(parts_dir) / f"b{batch_size}-k{per_chunk}" if parts_dir else None
    done = np.zeros(n_chunks, np.int32)
    if parts is not None and pid == 0:
        parts.mkdir(parents=True, exist_ok=True)
        names = {p.name for p in parts.iterdir()}
        for c in range(n_chunks):
            if f"c{c:06d}.npz" in names:
                with (parts / f"c{c:06d}.npz").open("rb") as f:
                    saved = np.load(f)
                    out[saved["index"]] = saved["logps"]
                done[c] = 1
    if parts is not None and P > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    if done.any():
        log.info(
            "reference log-probs (%s): resuming, %d of %d chunks already done",
            what,
            int(done.sum()),
            n_chunks,
        )
    batch_sharding = sharding.batch_sharding(mesh)

    def fn(p, batch):
        return logps_fn(p, batch), batch["example_index"]

    fn = jax.jit(fn, out_shardings=(batch_sharding, batch_sharding))
    template = pipeline.to_row(examples[0], seq_len)
    t0, rows_done, last_log = time.perf_counter(), 0, time.perf_counter()
    for c in range(n_chunks):
        if done[c]:
            continue
        got_index, got_logps = [], []
        for b in range(c * per_chunk, min(n_batches, (c + 1) * per_chunk)):
            batch = pipeline.eval_batch(
                examples,
                b,
                seq_len=seq_len,
                micro_batch=micro,
                process_index=pid,
                process_count=P,
                with_index=True,
                template=template,
            )
            logps, index = _local_rows(*fn(params, sharding.to_global(batch, mesh)))
            got_index.append(index)
            got_logps.append(logps)
        index, logps = _gather_rows(np.concatenate(got_index), np.concatenate(got_logps))
        real = index >= 0
        index, logps = index[real], logps[real].astype(np.float32)
        out[index] = logps
        if parts is not None and pid == 0:
            path = parts / f"c{c:06d}.npz"
            tmp = parts / f".{path.name}.tmp{os.getpid()}"
            with tmp.open("wb") as f:
                np.savez(f, index=index, logps=logps)
            tmp.replace(path)
        rows_done += len(index)
        now = time.perf_counter()
        if now - last_log > 30 or c == n_chunks - 1:
            rate = rows_done / (now - t0)
            remaining = int((n - rows_done - done.sum() * per_chunk * batch_size) / max(rate, 1e-9))
            log.info(
                "reference log-probs (%s): chunk %d/%d, %.0f pairs/s, ETA %ds",
                what,
                c + 1,
                n_chunks,
                rate,
                max(remaining, 0),
            )
            last_log = now
    if done.any() and P > 1:  # chunks saved before are on process 0
        out = np.asarray(multihost_utils.broadcast_one_to_all(out))
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

    The train mixture's components are keyed and computed as one sequence (one cache file)."""
    train = pipeline.Concat(data.train)
    splits = {"train": train, "eval": data.eval}
    for name, examples in list(splits.items()):
        if not len(examples):
            continue
        key = cache_key(params, examples, seq_len=seq_len, extra=extra)
        logps = load_or_compute(
            cache_dir,
            key,
            what=name,
            compute_fn=lambda parts, ex=examples, name=name: compute(
                logps_fn,
                params,
                ex,
                seq_len=seq_len,
                batch_size=batch_size,
                mesh=mesh,
                parts_dir=parts,
                what=name,
            ),
        )
        splits[name] = attach(examples, logps)
    return dataclasses.replace(data, train=splits["train"].parts, eval=splits["eval"])


def attach(examples, logps: np.ndarray):
    """`examples` with `ref_logps` attached (lists get new examples; sources a view)."""
    if len(logps) != len(examples):
        raise ValueError(f"{len(logps)} reference log-probs for {len(examples)} examples")
    if hasattr(examples, "with_ref_logps"):
        return examples.with_ref_logps(logps)
    return [dataclasses.replace(ex, ref_logps=lp) for ex, lp in zip(examples, logps, strict=True)]


def load_or_compute(cache_dir: str, key: str, compute_fn, *, what: str) -> np.ndarray:
    """Read `cache_dir/key.npy` (memory-mapped when local), or compute it and write it
    (atomically, from process 0). `compute_fn(parts_dir)` may keep partial results in
    `parts_dir` (so an interrupted pass resumes), removed once the file is written.

    Only process 0 touches `cache_dir`: it decides whether the file exists, and sends what it
    read to the others, so the processes need no shared filesystem and all take the same branch
    (the compute is a collective: one process alone would hang).
    """
    path = epath.Path(cache_dir) / f"{key}.npy"
    parts = epath.Path(cache_dir) / f"{key}.parts"
    pid, P = jax.process_index(), jax.process_count()
    size = np.int64(-1)
    if pid == 0 and path.exists():
        logps = _load(path)
        size = np.int64(len(logps))
    if P > 1:
        size = int(multihost_utils.broadcast_one_to_all(size))
    if size >= 0:
        if P > 1:
            mine = logps if pid == 0 else np.zeros((size, 2), np.float32)
            logps = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(mine)))
        log.info("reference log-probs (%s): reused %s", what, path)
        return logps
    t0 = time.perf_counter()
    logps = compute_fn(str(parts))
    if pid == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{key}.npy.tmp{os.getpid()}"
        with tmp.open("wb") as f:
            np.save(f, logps)
        tmp.replace(path)  # atomic: a reader never sees a partial file
        if parts.exists():
            parts.rmtree()
    log.info(
        "reference log-probs (%s): %d pairs in %.1fs, saved to %s",
        what,
        len(logps),
        time.perf_counter() - t0,
        path,
    )
    return logps


def _load(path: epath.Path) -> np.ndarray:
    if "://" not in str(path):
        return np.load(os.fspath(path), mmap_mode="r")
    with path.open("rb") as f:
        return np.load(f)
