"""Tokenised examples with random access: what the grain pipeline shuffles, shards and batches.

`RecordExamples` wraps a record source (`jaxpost.data.sources`) and tokenises a record when it
is read -- in the grain pipeline, inside `data.num_workers` worker processes when set -- so a
host holds the records' offsets, not their tokens. Before training, `scan` validates a share of
the records (process `i` of `n` takes records i, i+n, ...): it finds the invalid ones (an error
naming `file:line`, or counted under `data.skip_invalid`) and the ones too long to keep, and
sums an order-independent digest of the tokens, so the shares' results combine into the same
kept indices, stats and digest however many processes did the work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxpost.data import records as records_lib
from jaxpost.data.chat_template import MASK_METHODS
from jaxpost.data.tokenizer import load_tokenizer

TRUNCATIONS = ("keep_start", "keep_end", "drop")
# What rows an objective reads: "sft" (single sequences), "pairs" (preference pairs for
# log-prob objectives) -- both as next-token `inputs`/`targets` (`inputs = ids[:-1]`) -- and
# "reward_pairs": preference pairs of whole sequences (`inputs = ids`, no targets), so a reward
# model reads each sequence at its own last token, as transformers' sequence classifiers do.
# The "shared_" kinds hold the same pairs with one encoding of their common prompt: a pair is
# one span of a `[2 * seq_len]` row -- prompt, chosen, rejected -- whose `branch_ids` (0 prompt,
# 1 chosen, 2 rejected) keep the rejected tokens from attending to the chosen ones, and whose
# positions continue from the prompt in both branches (`shared_features`).
KINDS = ("sft", "pairs", "reward_pairs", "shared_pairs", "shared_reward_pairs")
KEPT, DROPPED, INVALID = 1, 2, 3  # `scan` status codes (0: not scanned by this process)


def is_pairs(kind: str) -> bool:
    return kind in ("pairs", "reward_pairs", "shared_pairs", "shared_reward_pairs")


def is_shared(kind: str | None) -> bool:
    """Whether rows of `kind` hold each pair's prompt once (see `KINDS`)."""
    return kind in ("shared_pairs", "shared_reward_pairs")


def next_token_rows(kind: str) -> bool:
    """Whether rows of `kind` hold next-token `inputs`/`targets` (else whole sequences)."""
    return kind not in ("reward_pairs", "shared_reward_pairs")


def row_length(kind: str | None, seq_len: int) -> int:
    """Tokens in one row: `seq_len`, or twice it for shared-prompt pair rows (the tokens of a
    `[2, seq_len]` unshared pair row, which every pair that fits `seq_len` fits)."""
    return 2 * seq_len if is_shared(kind) else seq_len


@dataclasses.dataclass
class Example:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # int32 [n]; 1 = token is a training target


@dataclasses.dataclass
class PairExample:
    """A preference pair; both sequences are prompt + completion."""

    chosen: Example
    rejected: Example
    ref_logps: np.ndarray | None = None  # float32 [2], when reference log-probs are precomputed


@dataclasses.dataclass
class DataStats:
    records: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: int = 0  # invalid records skipped under data.skip_invalid
    target_tokens: int = 0
    skip_reasons: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"{self.records} records, {self.truncated} truncated, {self.dropped} dropped as too "
            f"long, {self.skipped} invalid skipped, {self.target_tokens} target tokens"
        )
        if self.skip_reasons:
            text += (
                " (skipped: "
                + "; ".join(f"{n} x {r}" for r, n in sorted(self.skip_reasons.items()))
                + ")"
            )
        return text

    def add(self, other: DataStats) -> None:
        for field in ("records", "truncated", "dropped", "skipped", "target_tokens"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        for reason, n in other.skip_reasons.items():
            self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + n

    def count_skip(self, error: records_lib.DataError) -> None:
        self.skipped += 1
        reason = str(error).split(": ", 1)[-1]
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1


@dataclasses.dataclass(frozen=True)
class Settings:
    """What decides how a tokenised record becomes an example."""

    kind: str = "sft"
    seq_len: int = 0
    truncation: str = "keep_start"

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ValueError(
                f"config.data.truncation={self.truncation!r} is not one of {TRUNCATIONS}"
            )
        if self.kind not in KINDS:
            raise ValueError(f"data kind {self.kind!r} is not one of {KINDS}")

    @property
    def limit(self) -> int:
        """Most tokens an example may have: `seq_len + 1` for next-token rows (they drop one),
        `seq_len` for whole-sequence rows."""
        return self.seq_len + 1 if next_token_rows(self.kind) else self.seq_len


# --- tokenizers ----------------------------------------------------------------------------------


def _template_kwargs(data_config: Mapping[str, Any]) -> dict:
    raw = data_config.get("chat_template_kwargs", "") or "{}"
    try:
        kwargs = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"config.data.chat_template_kwargs={raw!r} is not valid JSON ({e.msg})"
        ) from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"config.data.chat_template_kwargs={raw!r} must be a JSON object")
    return kwargs


def make_tokenizer(data_config: Mapping[str, Any]):
    """The tokenizer `config.data.tokenizer` names: "byte" or a tokenizer directory/file, with
    `data.assistant_mask` and `data.chat_template_kwargs` applied to its chat template."""
    method = data_config.get("assistant_mask", "auto")
    if method not in MASK_METHODS:
        raise ValueError(f"config.data.assistant_mask={method!r} is not one of {MASK_METHODS}")
    kwargs = _template_kwargs(data_config)
    tok = load_tokenizer(data_config["tokenizer"] or "byte")
    if hasattr(tok, "chat_template"):
        tok.mask_method = method
        tok.template_kwargs = kwargs
    elif method != "auto" or kwargs:
        raise ValueError(
            "config.data.assistant_mask and config.data.chat_template_kwargs apply to Hugging "
            "Face chat templates; the built-in byte tokenizer has its own chat format"
        )
    tok.settings = tokenizer_settings(data_config)  # how to make it again (TokenizerHandle)
    return tok


def tokenizer_settings(data_config: Mapping[str, Any]) -> dict[str, str]:
    """The data settings that decide tokenisation, with defaults filled in."""
    return {
        "tokenizer": str(data_config.get("tokenizer") or "byte"),
        "assistant_mask": str(data_config.get("assistant_mask") or "auto"),
        "chat_template_kwargs": json.dumps(_template_kwargs(data_config), sort_keys=True),
    }


# The files a tokenizer is read from (`load_tokenizer`, `hf_tokenizer.read_tokenizer_config`).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def tokenizer_fingerprint(data_config: Mapping[str, Any]) -> str:
    """sha256 of what decides tokenisation: the settings and the contents of the files the
    tokenizer is read from (not their path, so a copied tokenizer directory matches)."""
    settings = tokenizer_settings(data_config)
    h = hashlib.sha256(json.dumps({**settings, "tokenizer": ""}, sort_keys=True).encode())
    spec = settings["tokenizer"]
    if spec == "byte":
        h.update(b"byte-tokenizer-v1")
        return h.hexdigest()
    path = os.path.expanduser(spec)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    files = [os.path.join(directory, f) for f in _TOKENIZER_FILES]
    if not os.path.isdir(path):
        files = [path] + [f for f in files[2:] if f != path]
    found = 0
    for f in files:
        if os.path.isfile(f):
            found += 1
            h.update(os.path.basename(f).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
    if not found:
        raise FileNotFoundError(f"config.data.tokenizer={spec!r}: no tokenizer files there")
    return h.hexdigest()


class TokenizerHandle:
    """A tokenizer that travels to grain worker processes as its settings (tokenizers holding
    compiled chat templates do not pickle) and is rebuilt there once per process."""

    _cache: dict[str, Any] = {}
    _lock = threading.Lock()

    def __init__(self, data_config: Mapping[str, Any], tokenizer=None):
        self.settings = tokenizer_settings(data_config)
        self._tok = tokenizer

    def __getstate__(self):
        return {"settings": self.settings, "_tok": None}

    def get(self):
        if self._tok is None:
            key = json.dumps(self.settings, sort_keys=True)
            with TokenizerHandle._lock:
                if key not in TokenizerHandle._cache:
                    TokenizerHandle._cache[key] = make_tokenizer(self.settings)
                self._tok = TokenizerHandle._cache[key]
        return self._tok


# --- records -> examples -------------------------------------------------------------------------


def fit_length(ex: Example, limit: int, truncation: str) -> Example | None:
    """`ex` cut to `limit` tokens as `truncation` says; None when dropped or nothing to train
    on is left."""
    if len(ex.ids) <= limit:
        return ex
    if truncation == "drop":
        return None
    keep = slice(None, limit) if truncation == "keep_start" else slice(-limit, None)
    ex = Example(ex.ids[keep], ex.mask[keep])
    return ex if ex.mask[1:].any() else None


def fit_pair(prompt, chosen, rejected, limit: int, truncation: str) -> PairExample | None:
    """A pair from tokenised `prompt` and `(ids, mask)` completions, each side fitted."""
    out = []
    for ids, mask in (chosen, rejected):
        ex = Example(
            np.concatenate([np.asarray(prompt, np.int32), np.asarray(ids, np.int32)]),
            np.concatenate([np.zeros(len(prompt), np.int32), np.asarray(mask, np.int32)]),
        )
        out.append(fit_length(ex, limit, truncation))
    if out[0] is None or out[1] is None:
        return None
    return PairExample(out[0], out[1])


def target_tokens(ex) -> int:
    if isinstance(ex, PairExample):
        return target_tokens(ex.chosen) + target_tokens(ex.rejected)
    return int(ex.mask[1:].sum())


def tokenize_record(record, where: str, tok, settings: Settings):
    """`(example or None when too long, whether it was cut)`; raises DataError naming `where`."""
    limit = settings.limit
    if settings.kind == "sft":
        ids, mask = records_lib.tokenize_sft(record, tok, where)
        ex = Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32))
        return fit_length(ex, limit, settings.truncation), len(ids) > limit
    prompt, chosen, rejected = records_lib.tokenize_preference(record, tok, where)
    full = len(prompt) + max(len(chosen[0]), len(rejected[0]))
    return fit_pair(prompt, chosen, rejected, limit, settings.truncation), full > limit


def _example_digest(index: int, ex) -> np.ndarray:
    """4 uint64 lanes of a keyed hash of (record index, tokens, masks)."""
    h = hashlib.blake2b(np.int64(index).tobytes(), digest_size=32)
    for seq in (ex.chosen, ex.rejected) if isinstance(ex, PairExample) else (ex,):
        h.update(np.asarray(seq.ids, np.int32).tobytes())
        h.update(np.asarray(seq.mask, np.int32).tobytes())
        h.update(b"|")
    return np.frombuffer(h.digest(), np.uint64)


def with_ref(ex, ref_logps: np.ndarray | None):
    if ref_logps is None:
        return ex
    return dataclasses.replace(ex, ref_logps=np.asarray(ref_logps, np.float32))


class RecordExamples:
    """The examples of a record source, tokenised when read.

    `indices` (default: every record) picks and orders the records; after `scan` they are the
    kept ones, so reading never meets an invalid or too-long record -- if it does, the file
    changed since, which is an error. `ref_logps` `[len, 2]` (may be a memory-mapped file)
    attaches precomputed reference log-probs to pairs.
    """

    def __init__(
        self,
        records,
        tokenizer: TokenizerHandle,
        settings: Settings,
        indices: np.ndarray | None = None,
        ref_logps: np.ndarray | None = None,
        digest: str = "",
    ):
        self.records, self.tokenizer, self.settings = records, tokenizer, settings
        self.indices = indices
        self.ref_logps = ref_logps
        self.digest = digest  # what the examples are, for cache keys (set by `scan_examples`)

    def __len__(self) -> int:
        return len(self.records) if self.indices is None else len(self.indices)

    def record_index(self, i: int) -> int:
        return i if self.indices is None else int(self.indices[i])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        record, where = self.records[self.record_index(i)]
        ex, _ = tokenize_record(record, where, self.tokenizer.get(), self.settings)
        if ex is None:
            raise records_lib.DataError(
                f"{where}: no longer fits data.seq_len={self.settings.seq_len}; the data file "
                "changed while the run was reading it"
            )
        return with_ref(ex, None if self.ref_logps is None else self.ref_logps[i])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def with_ref_logps(self, ref_logps: np.ndarray) -> RecordExamples:
        if len(ref_logps) != len(self):
            raise ValueError(f"{len(ref_logps)} reference log-probs for {len(self)} examples")
        return RecordExamples(
            self.records, self.tokenizer, self.settings, self.indices, ref_logps, self.digest
        )


@dataclasses.dataclass
class ScanResult:
    """What validating some records found: `status` per record index (`KEPT`, `DROPPED`,
    `INVALID`; 0 = not looked at), the stats, a digest of the kept examples (4 uint64 lanes,
    wrapping sums: the same for any split of the work), and the first error (when not
    skipping invalid records)."""

    status: np.ndarray
    stats: DataStats
    digest: np.ndarray
    error: str | None = None


def scan(
    records,
    tokenizer: TokenizerHandle,
    settings: Settings,
    positions: Iterable[int],
    *,
    skip_invalid: bool,
    max_kept: int = 0,
) -> ScanResult:
    """Tokenise `records[p]` for each of `positions` (in order) to validate it, stopping early
    after `max_kept` kept examples (0: no limit) or at the first error unless `skip_invalid`."""
    tok = tokenizer.get()
    status = np.zeros(len(records), np.int8)
    stats, digest, kept = DataStats(), np.zeros(4, np.uint64), 0
    for p in positions:
        stats.records += 1
        try:
            record, where = records[p]
            ex, cut = tokenize_record(record, where, tok, settings)
        except Exception as e:  # reported to every process, then raised
            if not isinstance(e, records_lib.DataError):
                # Not a record problem (I/O, a bug): every process stops, naming the record.
                return ScanResult(
                    status, stats, digest, error=f"record {p}: {type(e).__name__}: {e}"
                )
            if not skip_invalid:
                return ScanResult(status, stats, digest, error=str(e))
            stats.count_skip(e)
            status[p] = INVALID
            continue
        if ex is None:
            stats.dropped += 1
            status[p] = DROPPED
            continue
        status[p] = KEPT
        stats.truncated += int(cut)
        stats.target_tokens += target_tokens(ex)
        digest += _example_digest(p, ex)
        kept += 1
        if max_kept and kept >= max_kept:
            break
    return ScanResult(status, stats, digest)


def encode_scan(result: ScanResult, start: int, step: int) -> bytes:
    """`result` as bytes to exchange between processes (its status of records start::step)."""
    header = json.dumps(
        {
            "stats": dataclasses.asdict(result.stats),
            "digest": result.digest.tolist(),
            "error": result.error,
            "start": start,
            "step": step,
        }
    ).encode()
    return np.int64(len(header)).tobytes() + header + result.status[start::step].tobytes()


def decode_scans(parts: Sequence[bytes], n_records: int) -> ScanResult:
    """The processes' `encode_scan` results combined into one; errors are raised (the first
    process's first)."""
    status = np.zeros(n_records, np.int8)
    stats, digest = DataStats(), np.zeros(4, np.uint64)
    for p, part in enumerate(parts):
        size = int(np.frombuffer(part[:8], np.int64)[0])
        header = json.loads(part[8 : 8 + size])
        if header["error"]:
            prefix = f"(found by process {p}) " if p else ""
            raise records_lib.DataError(prefix + header["error"])
        status[header["start"] :: header["step"]] = np.frombuffer(part[8 + size :], np.int8)
        stats.add(DataStats(**header["stats"]))
        digest += np.asarray(header["digest"], np.uint64)
    return ScanResult(status, stats, digest)


def scan_examples(
    records,
    tokenizer: TokenizerHandle,
    settings: Settings,
    *,
    skip_invalid: bool,
    max_examples: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    exchange: Callable[[bytes], list[bytes]] | None = None,
) -> tuple[RecordExamples, DataStats]:
    """Validate `records` and return their kept examples (read lazily) and stats.

    Process `i` of `n` validates records i, i+n, ... and `exchange` (bytes -> every process's
    bytes, in process order) combines the shares. With `max_examples` (the eval split's cap),
    every process reads the first records in order until that many are kept.
    """
    n = len(records)
    if max_examples:
        result = scan(
            records,
            tokenizer,
            settings,
            range(n),
            skip_invalid=skip_invalid,
            max_kept=max_examples,
        )
        if result.error:
            raise records_lib.DataError(result.error)
    else:
        mine = scan(
            records,
            tokenizer,
            settings,
            range(process_index, n, process_count),
            skip_invalid=skip_invalid,
        )
        payload = encode_scan(mine, process_index, process_count)
        parts = [payload] if exchange is None or process_count == 1 else exchange(payload)
        result = decode_scans(parts, n)
    kept = np.flatnonzero(result.status == KEPT)
    kept = kept.astype(np.int32 if n < 2**31 else np.int64)
    # (the examples, not their row layout: shared-prompt rows hold the same pairs)
    same = dataclasses.replace(settings, kind=settings.kind.removeprefix("shared_"))
    digest = hashlib.sha256(
        f"{n}|{same}|".encode() + result.digest.tobytes() + kept.tobytes()
    ).hexdigest()
    return RecordExamples(records, tokenizer, settings, kept, digest=digest), result.stats
