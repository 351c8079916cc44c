"""Token-level prepared datasets: `jaxpost data prepare` writes them, training reads them.

A prepared dataset is a directory:

    manifest.json                        what it holds (below); written last, so a directory
                                         without one is incomplete
    train-00000-of-00008.array_record    one record per example: the tokenised record (ids,
    ...                                  loss masks, for pairs the prompt and both completions)
    train.index.npy                      int32 [N, k, 4] per example and sequence (k = 1, or 2
    eval-...                             for pairs): length, first and last target position,
                                         target tokens -- so a run decides which examples fit
                                         its `data.seq_len` without reading any

The manifest records counts (records, kept, tokens, skips by reason), a length histogram, each
shard's record count and bytes (a missing or truncated shard is an error naming it), a content
digest per split, and the tokenizer fingerprint (its settings and files' contents): a run whose
tokenizer or chat-template settings differ is refused. Sequence length and truncation are not
baked in; a run applies its own when it reads.

Preparing validates and tokenises once, with all CPU cores (worker processes, each writing its
own shards); training then opens the dataset in time independent of its size (random access
through grain's ArrayRecord source) and each process reads only the examples it trains on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxpost.data import examples as ex_lib
from jaxpost.data import records as records_lib
from jaxpost.data import sources

FORMAT = "jaxpost-tokens-v1"
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")
_HIST_EDGES = [0, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


class PreparedDataError(ValueError):
    """A prepared dataset that cannot be used as asked; the message names the file."""


# --- record encoding -----------------------------------------------------------------------------


def _runs(mask) -> np.ndarray:
    """A 0/1 mask as the lengths of its alternating runs, starting with zeros (maybe none)."""
    m = np.asarray(mask, np.int8)
    runs = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(m)) + 1, [len(m)]]))
    if len(m) and m[0]:
        runs = np.concatenate([[0], runs])
    return runs.astype(np.uint32)


def _encode(where: str, parts: Sequence, token_dtype: str) -> bytes:
    """`where` and `[ids, mask, ids, mask, ...]` as one ArrayRecord record: ids in
    `token_dtype`, masks as run lengths (a few numbers per sequence)."""
    w = where.encode()
    out = [np.uint32(len(parts)).tobytes(), np.uint32(len(w)).tobytes(), w]
    for k, a in enumerate(parts):
        if k % 2 == 0:
            if len(a) and int(np.max(a)) > np.iinfo(np.dtype(token_dtype)).max:
                raise ValueError(f"{where}: token id {int(np.max(a))} does not fit {token_dtype}")
            data = np.asarray(a, token_dtype)
        else:
            data = _runs(a)
        out += [np.uint32(len(data)).tobytes(), data.tobytes()]
    return b"".join(out)


def _decode(raw: bytes, token_dtype: str) -> tuple[str, list[np.ndarray]]:
    n_parts = int(np.frombuffer(raw, np.uint32, 1, 0)[0])
    size = int(np.frombuffer(raw, np.uint32, 1, 4)[0])
    where, offset = raw[8 : 8 + size].decode(), 8 + size
    parts = []
    for k in range(n_parts):
        n = int(np.frombuffer(raw, np.uint32, 1, offset)[0])
        dtype = np.dtype(token_dtype if k % 2 == 0 else np.uint32)
        data = np.frombuffer(raw, dtype, n, offset + 4)
        offset += 4 + n * dtype.itemsize
        if k % 2:
            data = np.repeat(np.arange(n) % 2, data)
        parts.append(data.astype(np.int32))
    return where, parts


def _sequence_index(ids_len: int, mask: np.ndarray) -> list[int]:
    """[length, first target position (>= 1), last target position, target tokens]."""
    hits = np.flatnonzero(mask[1:]) + 1
    if len(hits) == 0:
        return [ids_len, -1, -1, 0]
    return [ids_len, int(hits[0]), int(hits[-1]), len(hits)]


# --- writing (jaxpost data prepare) --------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(inputs, data_config, token_dtype, tmp_dir, held) -> None:
    _WORKER.update(
        inputs=inputs,
        tok=ex_lib.TokenizerHandle(data_config),
        token_dtype=token_dtype,
        tmp_dir=tmp_dir,
        held=held,
    )


def _record(index: int):
    for source, start in _WORKER["inputs"]:
        if index < start + len(source):
            return source[index - start]
    raise IndexError(index)


def _tokenize(record, where: str, tok) -> tuple[str, list[np.ndarray], np.ndarray]:
    """`(kind, arrays to store, index rows)` of one record; its kind from its fields."""

    def arrays(*lists):
        return [np.array(x, np.int32) for x in lists]

    if isinstance(record, dict) and ("chosen" in record or "rejected" in record):
        prompt, (c, cm), (r, rm) = records_lib.tokenize_preference(record, tok, where)
        prompt, c, cm, r, rm = arrays(prompt, c, cm, r, rm)
        zeros = np.zeros(len(prompt), np.int32)
        rows = [
            _sequence_index(len(prompt) + len(ids), np.concatenate([zeros, mask]))
            for ids, mask in ((c, cm), (r, rm))
        ]
        return "pairs", [prompt, zeros, c, cm, r, rm], np.asarray(rows, np.int32)
    ids, mask = arrays(*records_lib.tokenize_sft(record, tok, where))
    return "sft", [ids, mask], np.asarray([_sequence_index(len(ids), mask)], np.int32)


def _prepare_task(task: int, start: int, stop: int, skip_invalid: bool) -> dict:
    """Tokenise records `start..stop` into this task's shard of each split."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tok, held = _WORKER["tok"].get(), _WORKER["held"]
    writers, out = {}, {}
    for split in SPLITS:
        out[split] = {"index": [], "records": 0, "hist": np.zeros(len(_HIST_EDGES), np.int64)}
        out[split]["digest"] = np.zeros(4, np.uint64)
    kinds, stats = set(), ex_lib.DataStats()
    for i in range(start, stop):
        split = "eval" if held[i] else "train"
        stats.records += 1
        try:
            record, where = _record(i)
            kind, parts, rows = _tokenize(record, where, tok)
        except records_lib.DataError as e:
            if not skip_invalid:
                return {"error": str(e)}
            stats.count_skip(e)
            continue
        kinds.add(kind)
        if split not in writers:
            path = os.path.join(_WORKER["tmp_dir"], f"{split}-{task:05d}.array_record")
            writers[split] = ArrayRecordWriter(path, "group_size:1,uncompressed")
        raw = _encode(where, parts, _WORKER["token_dtype"])
        writers[split].write(raw)
        s = out[split]
        s["index"].append(rows)
        s["records"] += 1
        s["hist"][np.searchsorted(_HIST_EDGES, int(rows[:, 0].max()), side="right") - 1] += 1
        # Keyed by the record's position, so reordered inputs give another digest.
        h = hashlib.blake2b(np.int64(i).tobytes(), digest_size=32)
        h.update(raw)
        s["digest"] += np.frombuffer(h.digest(), np.uint64)
        stats.target_tokens += int(rows[:, 3].sum())
    for w in writers.values():
        w.close()
    for s in out.values():
        s["index"] = np.stack(s["index"]) if s["index"] else None
    return {"splits": out, "kinds": sorted(kinds), "stats": dataclasses.asdict(stats)}


def _progress(done: int, total: int, t0: float) -> None:
    rate = done / max(time.perf_counter() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    line = f"prepared {done:,}/{total:,} records ({rate:,.0f}/s, ETA {eta:,.0f}s)"
    if sys.stderr.isatty():
        print("\r" + line, end="" if done < total else "\n", file=sys.stderr, flush=True)
    elif done == total or int(done * 10 / total) != int((done - 1) * 10 / total):
        print(line, file=sys.stderr, flush=True)


def prepare(
    inputs: Sequence[str],
    out: str,
    data_config: dict[str, Any],
    *,
    eval_fraction: float = 0.0,
    seed: int = 0,
    workers: int = 0,
    skip_invalid: bool = False,
    overwrite: bool = False,
    records_per_task: int = 20_000,
) -> dict[str, Any]:
    """Validate and tokenise every record of `inputs` (JSONL/Parquet/... specs, as in
    `data.train_path`) with the tokenizer of `data_config` into a prepared dataset at `out`.
    With `eval_fraction > 0`, a seeded random fraction of the records goes to split `eval`.
    `workers` processes (0: all CPU cores) tokenise; returns the manifest."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval_fraction={eval_fraction} must be in [0, 1)")
    out = os.path.expanduser(out)
    if "://" in out:
        raise ValueError(
            f"--out={out}: prepared datasets are written to and read from a local or mounted "
            "filesystem (e.g. gcsfuse for a bucket)"
        )
    if os.path.exists(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"--out={out} exists and is not empty (pass --overwrite)")
        if not os.path.isfile(os.path.join(out, MANIFEST)):
            raise FileExistsError(
                f"--out={out} is not a prepared dataset (no {MANIFEST}); --overwrite replaces "
                "only those"
            )
    tokenizer = ex_lib.make_tokenizer(data_config)  # a bad tokenizer fails here, not in workers
    opened, start = [], 0
    for spec in inputs:
        tfds_dir = data_config.get("tfds_data_dir") or sources.DEFAULT_TFDS_DIR
        source = sources.open_records(spec, "train", tfds_data_dir=tfds_dir)
        opened.append((source, start))
        start += len(source)
    total = start
    if not total:
        raise ValueError(f"no records in {list(inputs)}")
    held = np.zeros(total, bool)
    if eval_fraction > 0:
        rng = np.random.default_rng(seed)
        held[rng.permutation(total)[: max(1, round(eval_fraction * total))]] = True
    token_dtype = "<u2" if tokenizer.vocab_size <= 1 << 16 else "<i4"
    tmp = f"{out.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tasks = [
        (t, a, min(a + records_per_task, total))
        for t, a in enumerate(range(0, total, records_per_task))
    ]
    workers = workers or len(os.sched_getaffinity(0))
    initargs = (opened, dict(data_config), token_dtype, tmp, held)
    results: dict[int, dict] = {}
    t0, done = time.perf_counter(), 0
    try:
        if workers == 1 or len(tasks) == 1:
            _init_worker(*initargs)
            _WORKER["tok"] = ex_lib.TokenizerHandle(data_config, tokenizer)
            for t, a, b in tasks:
                results[t] = _prepare_task(t, a, b, skip_invalid)
                if "error" in results[t]:
                    raise records_lib.DataError(results[t]["error"])
                done += b - a
                _progress(done, total, t0)
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a (possibly) threaded parent
            with concurrent.futures.ProcessPoolExecutor(
                min(workers, len(tasks)),
                mp_context=ctx,
                initializer=_init_worker,
                initargs=initargs,
            ) as pool:
                futures = {pool.submit(_prepare_task, *task, skip_invalid): task for task in tasks}
                for future in concurrent.futures.as_completed(futures):
                    t, a, b = futures[future]
                    results[t] = future.result()
                    if "error" in results[t]:
                        for f in futures:
                            f.cancel()
                        raise records_lib.DataError(results[t]["error"])
                    done += b - a
                    _progress(done, total, t0)
        manifest = _finish(tmp, results, len(tasks), inputs, data_config, token_dtype)
        manifest["prepare_seconds"] = round(time.perf_counter() - t0, 3)
        _write_json(os.path.join(tmp, MANIFEST), manifest)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)


def _finish(tmp, results, n_tasks, inputs, data_config, token_dtype) -> dict[str, Any]:
    kinds = sorted({k for r in results.values() for k in r["kinds"]})
    if len(kinds) > 1:
        raise records_lib.DataError(
            f"{list(inputs)} mix SFT records and preference pairs; prepare them separately"
        )
    stats = ex_lib.DataStats()
    for r in results.values():
        stats.add(ex_lib.DataStats(**r["stats"]))
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "kind": kinds[0] if kinds else "sft",
        "token_dtype": token_dtype,
        "inputs": list(inputs),
        "tokenizer": ex_lib.tokenizer_settings(data_config),
        "tokenizer_fingerprint": ex_lib.tokenizer_fingerprint(data_config),
        "records_read": stats.records,
        "skipped": stats.skipped,
        "skip_reasons": stats.skip_reasons,
        "target_tokens": stats.target_tokens,
        "splits": {},
    }
    for split in SPLITS:
        parts = [results[t]["splits"][split] for t in range(n_tasks)]
        parts = [(t, p) for t, p in enumerate(parts) if p["records"]]
        if not parts:
            continue
        shards, digest = [], np.zeros(4, np.uint64)
        for k, (t, p) in enumerate(parts):
            name = f"{split}-{k:05d}-of-{len(parts):05d}.array_record"
            os.replace(os.path.join(tmp, f"{split}-{t:05d}.array_record"), os.path.join(tmp, name))
            shards.append(
                {
                    "file": name,
                    "records": p["records"],
                    "bytes": os.path.getsize(os.path.join(tmp, name)),
                }
            )
            digest += p["digest"]
        index = np.concatenate([p["index"] for _, p in parts])
        np.save(os.path.join(tmp, f"{split}.index.npy"), index)
        hist = sum(p["hist"] for _, p in parts)
        manifest["splits"][split] = {
            "records": int(len(index)),
            "tokens": int(index[:, :, 0].sum()),
            "target_tokens": int(index[:, :, 3].sum()),
            "max_length": int(index[:, :, 0].max()),
            "length_histogram": {
                f"<{_HIST_EDGES[i + 1]}" if i + 1 < len(_HIST_EDGES) else f">={edge}": int(n)
                for i, (edge, n) in enumerate(zip(_HIST_EDGES, hist, strict=True))
                if n
            },
            "shards": shards,
            "digest": hashlib.sha256(digest.tobytes()).hexdigest(),
        }
    if not manifest["splits"]:
        raise ValueError(f"no usable records in {list(inputs)} ({stats.summary()})")
    return manifest


# --- reading -------------------------------------------------------------------------------------


def is_prepared(path: str) -> bool:
    """Whether `path` (maybe with a `[a:b]` slice) is a prepared dataset or one of its splits
    (`DIR/train`, `DIR/eval`)."""
    path = os.path.expanduser(sources.split_slice(path)[0])
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return True
    parent, name = os.path.split(path.rstrip("/"))
    return name in SPLITS and os.path.isfile(os.path.join(parent, MANIFEST))


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise PreparedDataError(
            f"{directory}: no {MANIFEST} (not a prepared dataset, or `jaxpost data prepare` "
            "did not finish)"
        ) from None
    except json.JSONDecodeError as e:
        raise PreparedDataError(f"{path}: not valid JSON ({e.msg})") from None
    if manifest.get("format") != FORMAT:
        raise PreparedDataError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class PreparedExamples:
    """Random access to the examples of one split of a prepared dataset (same interface as
    `examples.RecordExamples`): record `indices[i]`, decoded and fitted when read."""

    def __init__(
        self, directory, shards, token_dtype, settings, indices, ref_logps=None, digest=""
    ):
        import grain

        self.directory, self.shards, self.token_dtype = directory, shards, token_dtype
        self.settings, self.indices, self.ref_logps, self.digest = (
            settings,
            indices,
            ref_logps,
            digest,
        )
        self._data = grain.sources.ArrayRecordDataSource(
            [os.path.join(directory, s) for s in shards]
        )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        where, parts = _decode(self._data[int(self.indices[i])], self.token_dtype)
        s = self.settings
        if len(parts) == 2:
            ex = ex_lib.fit_length(ex_lib.Example(parts[0], parts[1]), s.limit, s.truncation)
        else:
            prompt, _, c, cm, r, rm = parts
            ex = ex_lib.fit_pair(prompt, (c, cm), (r, rm), s.limit, s.truncation)
        if ex is None:
            raise records_lib.DataError(f"{where}: does not fit; {self.directory} changed")
        return ex_lib.with_ref(ex, None if self.ref_logps is None else self.ref_logps[i])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def with_ref_logps(self, ref_logps: np.ndarray) -> PreparedExamples:
        if len(ref_logps) != len(self):
            raise ValueError(f"{len(ref_logps)} reference log-probs for {len(self)} examples")
        return PreparedExamples(
            self.directory,
            self.shards,
            self.token_dtype,
            self.settings,
            self.indices,
            ref_logps,
            self.digest,
        )


def _kept(index: np.ndarray, settings: ex_lib.Settings) -> tuple[np.ndarray, np.ndarray]:
    """Per example: whether it is kept at `settings`, and whether it is cut (as
    `examples.fit_length` decides, from the index alone)."""
    length, first, last = index[..., 0], index[..., 1], index[..., 2]
    limit = settings.limit
    fits = length <= limit
    if settings.truncation == "drop":
        ok = fits
    elif settings.truncation == "keep_start":
        ok = fits | ((first >= 1) & (first < limit))
    else:
        ok = fits | (last >= length - limit + 1)
    return ok.all(axis=-1), ~fits.all(axis=-1)


def open_examples(
    spec: str,
    split: str,
    settings: ex_lib.Settings,
    data_config: dict[str, Any],
    *,
    max_examples: int = 0,
) -> tuple[PreparedExamples, ex_lib.DataStats]:
    """The examples of a prepared dataset's split that fit `settings` (nothing is read but the
    manifest and the index), and their stats. Refuses a dataset prepared with another tokenizer
    or chat-template settings, or of the wrong kind; checks every shard is whole."""
    path, bounds = sources.split_slice(spec)
    if "://" in path:
        raise PreparedDataError(
            f"{path}: prepared datasets are read from a local or mounted filesystem (e.g. gcsfuse "
            "for a bucket)"
        )
    directory = os.path.expanduser(path).rstrip("/")
    if not os.path.isfile(os.path.join(directory, MANIFEST)):
        directory, split = os.path.split(directory)
    manifest = read_manifest(directory)
    fingerprint = ex_lib.tokenizer_fingerprint(data_config)
    if manifest["tokenizer_fingerprint"] != fingerprint:
        ours = ex_lib.tokenizer_settings(data_config)
        raise PreparedDataError(
            f"{directory}/{MANIFEST} was prepared with tokenizer settings {manifest['tokenizer']} "
            f"(fingerprint {manifest['tokenizer_fingerprint'][:12]}), this run tokenises with "
            f"{ours} (fingerprint {fingerprint[:12]}): the token ids would not match. Prepare "
            "the data again with this run's config."
        )
    want = "pairs" if ex_lib.is_pairs(settings.kind) else "sft"
    if manifest["kind"] != want:
        raise PreparedDataError(
            f"{directory} holds {manifest['kind']} examples; this objective reads {want}"
        )
    if split not in manifest["splits"]:
        raise PreparedDataError(
            f"{directory} has no split {split!r} (it has {sorted(manifest['splits'])}); prepare "
            "with --eval_fraction, or slice the train split: DIR/train[95%:]"
        )
    info = manifest["splits"][split]
    for shard in info["shards"]:
        file = os.path.join(directory, shard["file"])
        if not os.path.isfile(file):
            raise PreparedDataError(f"{file}: missing shard of {directory}")
        if os.path.getsize(file) != shard["bytes"]:
            raise PreparedDataError(
                f"{file}: {os.path.getsize(file)} bytes, the manifest says {shard['bytes']} "
                "(truncated or replaced); prepare the data again"
            )
    index = np.load(os.path.join(directory, f"{split}.index.npy"), mmap_mode="r")
    if len(index) != info["records"]:
        raise PreparedDataError(f"{directory}/{split}.index.npy does not match the manifest")
    start, stop = 0, len(index)
    if bounds is not None:
        start = sources._bound(bounds[0], len(index), 0)
        stop = max(start, sources._bound(bounds[1], len(index), len(index)))
    index = np.asarray(index[start:stop])
    kept, cut = _kept(index, settings)
    if max_examples and kept.sum() > max_examples:  # the first `max_examples` that fit
        last = int(np.flatnonzero(kept)[max_examples - 1])
        index, kept, cut = index[: last + 1], kept[: last + 1], cut[: last + 1]
        stop = start + last + 1
    kept_ids = (np.flatnonzero(kept) + start).astype(np.int32 if stop < 2**31 else np.int64)
    stats = ex_lib.DataStats(
        records=len(index),
        truncated=int((kept & cut).sum()),
        dropped=int((~kept).sum()),
        target_tokens=int(index[kept][..., 3].sum()),  # before truncation of the cut ones
    )
    same = dataclasses.replace(settings, kind=settings.kind.removeprefix("shared_"))  # (layout)
    digest = hashlib.sha256(
        f"{info['digest']}|{start}:{stop}|{same}".encode() + kept_ids.tobytes()
    ).hexdigest()
    shards = [s["file"] for s in info["shards"]]
    examples = PreparedExamples(
        directory, shards, manifest["token_dtype"], settings, kept_ids, digest=digest
    )
    return examples, stats
