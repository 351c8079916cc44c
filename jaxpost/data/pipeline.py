"""The grain pipeline: tokenised examples -> fixed-shape numpy batches.

A data spec opens as random-access examples (`jaxpost.data.examples`: raw records tokenised when
read; `jaxpost.data.prepared`: token-level datasets from `jaxpost data prepare`). Raw records
are validated first -- each process a share -- so a malformed record stops the run before
anything is compiled; a prepared dataset needs no pass at all. Batches are dicts of int32 arrays
shaped `[accum_steps, micro_batch, L]` (per process); `L = seq_len` is fixed so the train step
compiles once.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxpost.data import examples as ex_lib
from jaxpost.data import prepared, sources
from jaxpost.data.examples import (  # noqa: F401  (re-exported: the pipeline's vocabulary)
    KINDS,
    TRUNCATIONS,
    DataStats,
    Example,
    PairExample,
    Settings,
    TokenizerHandle,
    is_pairs,
    is_shared,
    make_tokenizer,
    next_token_rows,
    row_length,
)

log = logging.getLogger("jaxpost")

SFT_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
PACKINGS = ("none", "first_fit", "best_fit")
_SEQ_FEATURES = ("inputs", "targets", "loss_mask")
# A raw source this large is validated at every start; `jaxpost data prepare` does it once.
LARGE_RAW_SOURCE = 200_000


def _row_keys(shift: bool, shared: bool = False) -> tuple[str, ...]:
    keys = SFT_KEYS if shift else ("inputs", "loss_mask", "segment_ids", "positions")
    return keys + ("branch_ids",) if shared else keys


@dataclasses.dataclass
class RunData:
    """What a run trains and evaluates on: one random-access example source per train mixture
    component with its weight, the eval examples, and what loading counted."""

    train: list
    weights: list[float]
    eval: Sequence
    train_stats: DataStats | None = None
    eval_stats: DataStats | None = None


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them, so
    mark them parsed (with their defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def open_examples(
    spec: str,
    split: str,
    tokenizer: TokenizerHandle,
    settings: Settings,
    *,
    skip_invalid: bool = False,
    max_examples: int = 0,
    tfds_data_dir: str = sources.DEFAULT_TFDS_DIR,
    process_index: int = 0,
    process_count: int = 1,
    exchange: Callable[[bytes], list[bytes]] | None = None,
):
    """The examples of one data spec (random access, tokenised when read) and their stats.

    A prepared dataset (`jaxpost data prepare`) opens from its manifest and index. Raw records
    are validated first, process `i` of `n` taking records i, i+n, ... (`exchange` combines the
    shares); an invalid record raises DataError naming its file:line, or with `skip_invalid` is
    skipped and counted by reason.
    """
    if prepared.is_prepared(spec) or os.path.isdir(os.path.expanduser(spec)):
        examples, stats = prepared.open_examples(
            spec, split, settings, tokenizer.settings, max_examples=max_examples
        )
    else:
        records = sources.open_records(spec, split, tfds_data_dir=tfds_data_dir)
        if (
            isinstance(records, sources.ParquetSource)
            and len(records) > sources.PARQUET_CACHED_ROWS
            and not max_examples
        ):
            log.warning(
                "%s: %d Parquet rows are more than stay decoded in memory, so reading them in "
                "shuffled order decodes row groups again and again; run `jaxpost data prepare` "
                "once and train from its output.",
                spec,
                len(records),
            )
        elif len(records) > LARGE_RAW_SOURCE and not max_examples:
            log.warning(
                "%s holds %d records: every start validates all of them. Run `jaxpost data "
                "prepare` once and train from its output, which starts in time independent of "
                "the data's size.",
                spec,
                len(records),
            )
        examples, stats = ex_lib.scan_examples(
            records,
            tokenizer,
            settings,
            skip_invalid=skip_invalid,
            max_examples=max_examples,
            process_index=process_index,
            process_count=process_count,
            exchange=exchange,
        )
    if not len(examples):
        raise ValueError(
            f"Dataset {spec!r} ({split}) has no usable examples ({stats.summary()}); check the "
            f"data, data.seq_len={settings.seq_len} and data.truncation."
        )
    return examples, stats


def load_examples(
    spec: str,
    split: str,
    tokenizer,
    *,
    kind: str = "sft",
    seq_len: int,
    truncation: str = "keep_start",
    max_examples: int = 0,
    skip_invalid: bool = False,
    tfds_data_dir: str = sources.DEFAULT_TFDS_DIR,
) -> tuple[list, DataStats]:
    """Every example of `spec` tokenised into a list (for small data and tests; runs use
    `open_examples`). `kind="sft"` gives `Example`s, the pair kinds give `PairExample`s."""
    handle = tokenizer if isinstance(tokenizer, TokenizerHandle) else _handle(tokenizer)
    examples, stats = open_examples(
        spec,
        split,
        handle,
        Settings(kind, seq_len, truncation),
        skip_invalid=skip_invalid,
        max_examples=max_examples,
        tfds_data_dir=tfds_data_dir,
    )
    return list(examples), stats


class Concat:
    """Several example sources read as one (e.g. the components of an eval mixture)."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self._ends = np.cumsum([len(p) for p in self.parts]).tolist()
        digests = [getattr(p, "digest", "") for p in self.parts]
        # Without every part's digest, say none (callers then hash the tokens themselves).
        self.digest = hashlib.sha256("|".join(digests).encode()).hexdigest() if all(digests) else ""

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._ends, i)
        return self.parts[k][i - (self._ends[k - 1] if k else 0)]

    def __iter__(self):
        for part in self.parts:
            yield from part

    def with_ref_logps(self, ref_logps: np.ndarray) -> Concat:
        starts = [0, *self._ends[:-1]]
        return Concat(
            [
                p.with_ref_logps(ref_logps[a:b])
                for p, a, b in zip(self.parts, starts, self._ends, strict=True)
            ]
        )


def load_sft_examples(spec: str, split: str, tokenizer, **kwargs):
    return load_examples(spec, split, tokenizer, kind="sft", **kwargs)


def _handle(tokenizer) -> TokenizerHandle:
    """A handle for a tokenizer object (its settings when `make_tokenizer` made it)."""
    return TokenizerHandle(getattr(tokenizer, "settings", {"tokenizer": "byte"}), tokenizer)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """`"a.jsonl@0.7,builtin:sort@0.3"` -> `[("a.jsonl", 0.7), ("builtin:sort", 0.3)]`.

    A component without `@weight` weighs 1. Weights are relative (they need not sum to 1).
    """
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        path, sep, weight = part.rpartition("@")
        if not sep:
            out.append((part, 1.0))
            continue
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(
                f"data mixture {spec!r}: weight {weight!r} of {path!r} is not a number"
            ) from None
        if not w > 0:
            raise ValueError(f"data mixture {spec!r}: weight of {path!r} must be positive")
        out.append((path, w))
    if not out:
        raise ValueError(f"empty data spec {spec!r}")
    return out


def load_mixture(spec: str, split: str, tokenizer: TokenizerHandle, settings: Settings, **kwargs):
    """Every component of a (possibly one-component) mixture spec, opened with `open_examples`.

    Returns `(sources, weights, stats)`: one example source per component, their weights, and
    the stats of all components together.
    """
    opened, weights, total = [], [], DataStats()
    for path, weight in parse_mixture(spec):
        examples, stats = open_examples(path, split, tokenizer, settings, **kwargs)
        opened.append(examples)
        weights.append(weight)
        total.add(stats)
    return opened, weights, total


def _sequence_row(ex: Example, seq_len: int, shift: bool = True) -> dict[str, np.ndarray]:
    features = _sequence_features(ex, shift)
    n = len(features["inputs"])
    row = {k: np.zeros(seq_len, np.int32) for k in _row_keys(shift)}
    for k, v in features.items():
        row[k][:n] = v
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n, dtype=np.int32)
    return row


def _sequence_features(e: Example, shift: bool, prefix: str = "") -> dict[str, np.ndarray]:
    """Next-token `inputs`/`targets`/`loss_mask` (`shift`), or the whole sequence as `inputs`."""
    if not shift:
        return {prefix + "inputs": e.ids, prefix + "loss_mask": e.mask}
    return {
        prefix + "inputs": e.ids[:-1],
        prefix + "targets": e.ids[1:],
        prefix + "loss_mask": e.mask[1:],
    }


def shared_features(ex: PairExample, shift: bool) -> dict[str, np.ndarray]:
    """A pair as one sequence that holds its common prompt once (the "shared_" kinds).

    The leading rows of the two sequences' features (`_sequence_features`) that agree and carry
    no loss -- the prompt, less its last token when `shift` (that one predicts each side's first
    completion token, so each branch holds its own copy) -- come once, branch 0; then the rest
    of the chosen sequence (branch 1), then the rest of the rejected one (branch 2), its
    positions continuing from the shared part. Each branch keeps at least one token. Attention
    within the span is causal and never from branch 2 to branch 1 (`model.attention_mask`), so
    every token sees exactly what it sees in its own sequence.
    """
    c = _sequence_features(ex.chosen, shift)
    r = _sequence_features(ex.rejected, shift)
    nc, nr = len(c["inputs"]), len(r["inputs"])
    m = max(min(nc, nr) - 1, 0)
    same = c["loss_mask"][:m] == 0
    for k in c:
        same &= c[k][:m] == r[k][:m]
    n = m if same.all() else int(np.argmin(same))
    out = {k: np.concatenate([c[k], r[k][n:]]).astype(np.int32) for k in c}
    out["positions"] = np.concatenate([np.arange(nc), np.arange(n, nr)]).astype(np.int32)
    out["branch_ids"] = np.repeat(np.int32([0, 1, 2]), [n, nc - n, nr - n])
    return out


def to_row(
    ex: Example | PairExample, seq_len: int, kind: str | None = None
) -> dict[str, np.ndarray]:
    """One example as fixed-length arrays. Next-token rows (kinds "sft", "pairs"; the default):
    position t predicts `targets[t]` from `inputs[:t+1]`. "reward_pairs" rows hold the whole
    sequences in `inputs` (no `targets`).

    A `PairExample` gives `[2, seq_len]` arrays (chosen, rejected) -- for the "shared_" kinds
    one `[2 * seq_len]` row (`shared_features`) -- and, when present, `ref_logps` `[1, 2]` (one
    segment).
    """
    shift = kind is None or next_token_rows(kind)
    if isinstance(ex, Example):
        return _sequence_row(ex, seq_len, shift)
    if is_shared(kind):
        features = shared_features(ex, shift)
        n = len(features["inputs"])
        row = {k: np.zeros(row_length(kind, seq_len), np.int32) for k in _row_keys(shift, True)}
        for k, v in features.items():
            row[k][:n] = v
        row["segment_ids"][:n] = 1
    else:
        c, r = _sequence_row(ex.chosen, seq_len, shift), _sequence_row(ex.rejected, seq_len, shift)
        row = {k: np.stack([c[k], r[k]]) for k in _row_keys(shift)}
    if ex.ref_logps is not None:
        row["ref_logps"] = np.asarray(ex.ref_logps, np.float32).reshape(1, 2)  # [S=1, 2]
    return row


def _split_accum(batch: dict[str, np.ndarray], accum_steps: int) -> dict[str, np.ndarray]:
    return {k: v.reshape(accum_steps, -1, *v.shape[1:]) for k, v in batch.items()}


def _features(ex, shift: bool = True, shared: bool = False) -> dict[str, np.ndarray]:
    """Variable-length features of one example, for grain's packers (pairs: chosen_*/rejected_*
    packed side by side, so segment k of both rows is the same pair; shared-prompt pairs: one
    sequence with its own positions and branch ids)."""
    if isinstance(ex, Example):
        return _sequence_features(ex, shift)
    if shared:
        out = shared_features(ex, shift)
    else:
        out = {
            **_sequence_features(ex.chosen, shift, "chosen_"),
            **_sequence_features(ex.rejected, shift, "rejected_"),
        }
    if ex.ref_logps is not None:
        out["ref_logps"] = np.asarray(ex.ref_logps, np.float32).reshape(1, 2)
    return out


def _packed_row(packed: dict[str, np.ndarray], pairs: bool, shared: bool) -> dict[str, np.ndarray]:
    def seq(prefix: str = "") -> dict[str, np.ndarray]:
        row = {
            k: packed[prefix + k].astype(np.int32) for k in _SEQ_FEATURES if prefix + k in packed
        }
        row["segment_ids"] = packed[prefix + "inputs_segment_ids"].astype(np.int32)
        row["positions"] = packed[prefix + "inputs_positions"].astype(np.int32)
        return row

    if not pairs:
        return seq()
    if shared:
        row = seq()
        # the pairs' own positions (continuing from the prompt in both branches)
        row["positions"] = packed["positions"].astype(np.int32)
        row["branch_ids"] = packed["branch_ids"].astype(np.int32)
    else:
        c, r = seq("chosen_"), seq("rejected_")
        row = {k: np.stack([c[k], r[k]]) for k in c}
    if "ref_logps" in packed:
        row["ref_logps"] = packed["ref_logps"].astype(np.float32)  # [S, 2]
    return row


def _pack(
    ds: grain.IterDataset,
    example,
    *,
    seq_len: int,
    packing: str,
    segments: int,
    bins: int,
    seed: int,
    kind: str | None = None,
) -> grain.IterDataset:
    """Pack variable-length examples into rows of `row_length(kind, seq_len)` (at most
    `segments` per row)."""
    pairs = isinstance(example, PairExample)
    shift, shared = kind is None or next_token_rows(kind), is_shared(kind)
    features = _features(example, shift, shared)
    lengths = {k: row_length(kind, seq_len) for k in features if k != "ref_logps"}
    if "ref_logps" in features:
        lengths["ref_logps"] = segments
    cls = {
        "first_fit": grain.experimental.FirstFitPackIterDataset,
        "best_fit": grain.experimental.BestFitPackIterDataset,
    }[packing]
    ds = ds.map(functools.partial(_features, shift=shift, shared=shared))
    ds = cls(
        ds,
        length_struct=lengths,
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=True,
        max_sequences_per_bin=segments,
    )
    return ds.map(functools.partial(_packed_row, pairs=pairs, shared=shared))


def make_train_iterator(
    examples: list,
    *,
    seq_len: int,
    micro_batch: int,
    accum_steps: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_workers: int = 0,
    packing: str = "none",
    segments_per_row: int = 1,
    packing_bins: int = 64,
    mixture_weights: Sequence[float] | None = None,
    kind: str | None = None,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's batches `[accum, micro_batch, ...]`.

    Shuffles with `seed` (reshuffled every epoch); process `i` of `n` reads positions i, i+n, ...
    of each epoch's order (trimmed to a multiple of n), so processes never overlap. With
    `packing` ("first_fit" / "best_fit"), several examples share a row (each its own segment,
    positions restarting), `packing_bins` rows being filled at a time. With `mixture_weights`,
    `examples` is a list of sources (example lists) drawn from in those proportions, each
    shuffled and repeated on its own. `kind` (see `KINDS`) picks the row layout; the default
    is next-token rows.
    """
    if packing not in PACKINGS:
        raise ValueError(f"config.data.packing={packing!r} is not one of {PACKINGS}")
    sources = examples if mixture_weights is not None else [examples]
    streams = []
    for i, source in enumerate(sources):
        if len(source) < process_count:
            raise ValueError(
                f"{len(source)} examples cannot be split over {process_count} processes"
            )
        ds = grain.MapDataset.source(source).shuffle(seed=seed + i)
        # Every process takes the same number of examples per epoch (the remainder of N/P is
        # left out of that epoch), so their epochs stay aligned and never overlap.
        per_process = len(source) // process_count
        streams.append(ds[: per_process * process_count][process_index::process_count].repeat(None))
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, mixture_weights)
    if packing == "none":
        ds = ds.map(functools.partial(to_row, seq_len=seq_len, kind=kind)).to_iter_dataset()
    else:
        ds = _pack(
            ds.to_iter_dataset(),
            sources[0][0],
            seq_len=seq_len,
            packing=packing,
            segments=segments_per_row,
            bins=packing_bins,
            seed=seed,
            kind=kind,
        )
    ds = ds.batch(accum_steps * micro_batch, drop_remainder=True)
    ds = ds.map(functools.partial(_split_accum, accum_steps=accum_steps))
    if num_workers > 0:
        _absl_flags_ready()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


class ShardedIterator:
    """Batches `[accum, micro, ...]` of several data shards side by side (shard order), each
    shard an iterator from `make_train_iterator(process_index=s, process_count=shards)`.
    `get_state()` is per shard, so a run's data position does not depend on how many processes
    hold the shards (`checkpoint.ShardStates` saves and restores it shard by shard)."""

    def __init__(self, iterators: dict[int, Any], shards: int):
        self.iterators, self.shards = dict(sorted(iterators.items())), shards

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators.values()]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}

    def get_state(self) -> dict[int, Any]:
        return {s: it.get_state() for s, it in self.iterators.items()}

    def set_state(self, states: dict[int, Any]) -> None:
        for s, it in self.iterators.items():
            it.set_state(states[s])
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


def pack_examples(
    examples: list,
    *,
    seq_len: int,
    packing: str,
    segments_per_row: int,
    packing_bins: int = 64,
    kind: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """All `examples` once, in order, packed into rows (for evaluation)."""
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    ds = _pack(
        ds,
        examples[0],
        seq_len=seq_len,
        packing=packing,
        segments=segments_per_row,
        bins=packing_bins,
        seed=0,
        kind=kind,
    )
    return list(ds)


def make_eval_batches(
    examples: Sequence,
    *,
    seq_len: int,
    micro_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    with_index: bool = False,
    packing: str = "none",
    segments_per_row: int = 1,
    packing_bins: int = 64,
    kind: str | None = None,
    agree_max: Callable[[int], int] | None = None,
) -> Sequence[dict[str, np.ndarray]]:
    """The whole eval split once, as this process's `[1, micro_batch, ...]` batches; a process
    reads only its own examples.

    Unpacked, global batch `b` holds examples `b*G .. (b+1)*G` (`G = micro_batch *
    process_count`), process `i` its `i`-th block of them. Packed, each process packs its own
    contiguous share and the processes agree (`agree_max`: the largest of every process's
    value) on the number of batches. The last batches are padded with empty rows (no target
    tokens), so every example counts once. `with_index` adds `example_index` (`-1` for padding
    rows; unpacked rows only).
    """
    n = len(examples)
    template = to_row(examples[0], seq_len, kind)
    if packing != "none":
        if with_index:
            raise ValueError("example_index needs unpacked rows")
        per = -(-n // process_count)
        share = [examples[i] for i in range(process_index * per, min(n, (process_index + 1) * per))]
        rows = (
            pack_examples(
                share,
                seq_len=seq_len,
                packing=packing,
                segments_per_row=segments_per_row,
                packing_bins=packing_bins,
                kind=kind,
            )
            if share
            else []
        )
        template = rows[0] if rows else None
        n_batches = -(-len(rows) // micro_batch)
        if agree_max is not None and process_count > 1:
            n_batches = agree_max(n_batches)
        if template is None:  # this process's share is empty: pad with rows shaped as packed
            template = pack_examples(
                [examples[0]],
                seq_len=seq_len,
                packing=packing,
                segments_per_row=segments_per_row,
                packing_bins=1,
                kind=kind,
            )[0]
        empty = {k: np.zeros_like(v) for k, v in template.items()}
        rows += [empty] * (n_batches * micro_batch - len(rows))
        return [
            {
                k: np.stack([r[k] for r in rows[b * micro_batch : (b + 1) * micro_batch]])[None]
                for k in template
            }
            for b in range(n_batches)
        ]
    return EvalBatches(
        examples,
        dict(
            seq_len=seq_len,
            micro_batch=micro_batch,
            process_index=process_index,
            process_count=process_count,
            with_index=with_index,
            kind=kind,
            template=template,
        ),
    )


class EvalBatches(Sequence):
    """Unpacked eval batches built when read (`eval_batch`), so a large eval split is never
    held as padded rows."""

    def __init__(self, examples: Sequence, kwargs: dict):
        self.examples, self.kwargs = examples, kwargs
        self._n = eval_batch_count(len(examples), kwargs["micro_batch"], kwargs["process_count"])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, b: int) -> dict[str, np.ndarray]:
        if not -self._n <= b < self._n:
            raise IndexError(b)
        return eval_batch(self.examples, b % self._n, **self.kwargs)


def eval_batch_count(n: int, micro_batch: int, process_count: int) -> int:
    """Unpacked eval batches that hold `n` examples."""
    return -(-n // (micro_batch * process_count))


def eval_batch(
    examples: Sequence,
    b: int,
    *,
    seq_len: int,
    micro_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    with_index: bool = False,
    kind: str | None = None,
    template: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Unpacked eval batch `b`, this process's rows of it (see `make_eval_batches`); a pass
    over a large split streams these one at a time."""
    if template is None:
        template = to_row(examples[0], seq_len, kind)
    empty = {k: np.zeros_like(v) for k, v in template.items()}
    if with_index:
        empty["example_index"] = np.int32(-1)
    first = (b * process_count + process_index) * micro_batch
    rows = []
    for p in range(first, first + micro_batch):
        if p >= len(examples):
            rows.append(empty)
            continue
        row = to_row(examples[p], seq_len, kind)
        if with_index:
            row["example_index"] = np.int32(p)
        rows.append(row)
    return {k: np.stack([r[k] for r in rows])[None] for k in empty}
