"""The grain pipeline: validated, tokenised examples -> fixed-shape numpy batches.

Every record is read and tokenised once at startup, so a malformed record stops the run before
anything is compiled. Batches are dicts of int32 arrays shaped `[accum_steps, micro_batch, L]`
(per process); `L = seq_len` is fixed so the train step compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxpost.data import records as records_lib
from jaxpost.data import sources
from jaxpost.data.chat_template import MASK_METHODS
from jaxpost.data.tokenizer import load_tokenizer

SFT_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
TRUNCATIONS = ("keep_start", "keep_end", "drop")
PACKINGS = ("none", "first_fit", "best_fit")
_SEQ_FEATURES = ("inputs", "targets", "loss_mask")


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


# What rows an objective reads: "sft" (single sequences), "pairs" (preference pairs for
# log-prob objectives) -- both as next-token `inputs`/`targets` (`inputs = ids[:-1]`) -- and
# "reward_pairs": preference pairs of whole sequences (`inputs = ids`, no targets), so a reward
# model reads each sequence at its own last token, as transformers' sequence classifiers do.
KINDS = ("sft", "pairs", "reward_pairs")


def is_pairs(kind: str) -> bool:
    return kind in ("pairs", "reward_pairs")


def next_token_rows(kind: str) -> bool:
    """Whether rows of `kind` hold next-token `inputs`/`targets` (else whole sequences)."""
    return kind != "reward_pairs"


def _row_keys(shift: bool) -> tuple[str, ...]:
    return SFT_KEYS if shift else ("inputs", "loss_mask", "segment_ids", "positions")


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


@dataclasses.dataclass
class RunData:
    """What a run trains and evaluates on, loaded: one example list per train mixture component
    with its weight, the eval examples, and what loading counted."""

    train: list[list]
    weights: list[float]
    eval: list
    train_stats: DataStats | None = None
    eval_stats: DataStats | None = None


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside an absl app nobody parsed them, so
    mark them parsed (with their defaults)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_tokenizer(data_config: Mapping[str, Any]):
    """The tokenizer `config.data.tokenizer` names: "byte" or a tokenizer directory/file, with
    `data.assistant_mask` and `data.chat_template_kwargs` applied to its chat template."""
    method = data_config.get("assistant_mask", "auto")
    if method not in MASK_METHODS:
        raise ValueError(f"config.data.assistant_mask={method!r} is not one of {MASK_METHODS}")
    raw = data_config.get("chat_template_kwargs", "") or "{}"
    try:
        kwargs = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"config.data.chat_template_kwargs={raw!r} is not valid JSON ({e.msg})"
        ) from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"config.data.chat_template_kwargs={raw!r} must be a JSON object")
    tok = load_tokenizer(data_config["tokenizer"] or "byte")
    if hasattr(tok, "chat_template"):
        tok.mask_method = method
        tok.template_kwargs = kwargs
    elif method != "auto" or kwargs:
        raise ValueError(
            "config.data.assistant_mask and config.data.chat_template_kwargs apply to Hugging "
            "Face chat templates; the built-in byte tokenizer has its own chat format"
        )
    return tok


def _fit_length(ex: Example, limit: int, truncation: str) -> Example | None:
    if len(ex.ids) <= limit:
        return ex
    if truncation == "drop":
        return None
    keep = slice(None, limit) if truncation == "keep_start" else slice(-limit, None)
    ex = Example(ex.ids[keep], ex.mask[keep])
    return ex if ex.mask[1:].any() else None


def _fit_pair(prompt, chosen, rejected, limit: int, truncation: str):
    out = []
    for ids, mask in (chosen, rejected):
        ex = Example(
            np.asarray(prompt + ids, np.int32), np.asarray([0] * len(prompt) + mask, np.int32)
        )
        out.append(_fit_length(ex, limit, truncation))
    if out[0] is None or out[1] is None:
        return None
    return PairExample(out[0], out[1])


def _target_tokens(ex) -> int:
    if isinstance(ex, PairExample):
        return _target_tokens(ex.chosen) + _target_tokens(ex.rejected)
    return int(ex.mask[1:].sum())


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
    """Read, validate and tokenise every record of `spec`.

    `kind="sft"` gives `Example`s, the pair kinds give `PairExample`s. An example fits a row of
    `seq_len` when it has at most `seq_len + 1` tokens (next-token rows drop one), or `seq_len`
    tokens for "reward_pairs" (whole sequences). A bad record raises DataError naming its
    file:line, or with `skip_invalid` is skipped and counted by reason.
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"config.data.truncation={truncation!r} is not one of {TRUNCATIONS}")
    if kind not in KINDS:
        raise ValueError(f"data kind {kind!r} is not one of {KINDS}")
    examples, stats = [], DataStats()
    limit = seq_len + 1 if next_token_rows(kind) else seq_len
    for record, where in sources.read_records(spec, split, tfds_data_dir=tfds_data_dir):
        stats.records += 1
        try:
            if kind == "sft":
                ids, mask = records_lib.tokenize_sft(record, tokenizer, where)
                full = len(ids)
                ex = _fit_length(
                    Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32)),
                    limit,
                    truncation,
                )
            else:
                prompt, chosen, rejected = records_lib.tokenize_preference(record, tokenizer, where)
                full = len(prompt) + max(len(chosen[0]), len(rejected[0]))
                ex = _fit_pair(prompt, chosen, rejected, limit, truncation)
        except records_lib.DataError as e:
            if not skip_invalid:
                raise
            stats.skipped += 1
            reason = str(e).split(": ", 1)[-1]
            stats.skip_reasons[reason] = stats.skip_reasons.get(reason, 0) + 1
            continue
        if ex is None:
            stats.dropped += 1
            continue
        stats.truncated += int(full > limit)
        stats.target_tokens += _target_tokens(ex)
        examples.append(ex)
        if max_examples and len(examples) >= max_examples:
            break
    if not examples:
        raise ValueError(
            f"Dataset {spec!r} ({split}) has no usable examples ({stats.summary()}); check the "
            f"data, data.seq_len={seq_len} and data.truncation."
        )
    return examples, stats


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


def load_mixture(spec: str, split: str, tokenizer, **kwargs):
    """Every component of a (possibly one-component) mixture spec, loaded with `load_examples`.

    Returns `(sources, weights, stats)`: one example list per component, their weights, and the
    stats of all components together.
    """
    sources, weights, total = [], [], DataStats()
    for path, weight in parse_mixture(spec):
        examples, stats = load_examples(path, split, tokenizer, **kwargs)
        sources.append(examples)
        weights.append(weight)
        for field in ("records", "truncated", "dropped", "skipped", "target_tokens"):
            setattr(total, field, getattr(total, field) + getattr(stats, field))
        for reason, n in stats.skip_reasons.items():
            total.skip_reasons[reason] = total.skip_reasons.get(reason, 0) + n
    return sources, weights, total


def load_sft_examples(spec: str, split: str, tokenizer, **kwargs):
    return load_examples(spec, split, tokenizer, kind="sft", **kwargs)


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


def to_row(
    ex: Example | PairExample, seq_len: int, kind: str | None = None
) -> dict[str, np.ndarray]:
    """One example as fixed-length arrays. Next-token rows (kinds "sft", "pairs"; the default):
    position t predicts `targets[t]` from `inputs[:t+1]`. "reward_pairs" rows hold the whole
    sequences in `inputs` (no `targets`).

    A `PairExample` gives `[2, seq_len]` arrays (chosen, rejected) and, when present,
    `ref_logps` `[1, 2]` (one segment).
    """
    shift = kind is None or next_token_rows(kind)
    if isinstance(ex, Example):
        return _sequence_row(ex, seq_len, shift)
    c, r = _sequence_row(ex.chosen, seq_len, shift), _sequence_row(ex.rejected, seq_len, shift)
    row = {k: np.stack([c[k], r[k]]) for k in _row_keys(shift)}
    if ex.ref_logps is not None:
        row["ref_logps"] = np.asarray(ex.ref_logps, np.float32).reshape(1, 2)  # [S=1, 2]
    return row


def _split_accum(batch: dict[str, np.ndarray], accum_steps: int) -> dict[str, np.ndarray]:
    return {k: v.reshape(accum_steps, -1, *v.shape[1:]) for k, v in batch.items()}


def _features(ex, shift: bool = True) -> dict[str, np.ndarray]:
    """Variable-length features of one example, for grain's packers (pairs: chosen_*/rejected_*
    packed side by side, so segment k of both rows is the same pair)."""
    if isinstance(ex, Example):
        return _sequence_features(ex, shift)
    out = {
        **_sequence_features(ex.chosen, shift, "chosen_"),
        **_sequence_features(ex.rejected, shift, "rejected_"),
    }
    if ex.ref_logps is not None:
        out["ref_logps"] = np.asarray(ex.ref_logps, np.float32).reshape(1, 2)
    return out


def _packed_row(packed: dict[str, np.ndarray], pairs: bool) -> dict[str, np.ndarray]:
    def seq(prefix: str = "") -> dict[str, np.ndarray]:
        row = {
            k: packed[prefix + k].astype(np.int32) for k in _SEQ_FEATURES if prefix + k in packed
        }
        row["segment_ids"] = packed[prefix + "inputs_segment_ids"].astype(np.int32)
        row["positions"] = packed[prefix + "inputs_positions"].astype(np.int32)
        return row

    if not pairs:
        return seq()
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
    shift: bool = True,
) -> grain.IterDataset:
    """Pack variable-length examples into rows of `seq_len` (at most `segments` per row)."""
    pairs = isinstance(example, PairExample)
    features = _features(example, shift)
    lengths = {k: seq_len for k in features if k != "ref_logps"}
    if "ref_logps" in features:
        lengths["ref_logps"] = segments
    cls = {
        "first_fit": grain.experimental.FirstFitPackIterDataset,
        "best_fit": grain.experimental.BestFitPackIterDataset,
    }[packing]
    ds = ds.map(functools.partial(_features, shift=shift))
    ds = cls(
        ds,
        length_struct=lengths,
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=True,
        max_sequences_per_bin=segments,
    )
    return ds.map(functools.partial(_packed_row, pairs=pairs))


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
    shift = kind is None or next_token_rows(kind)
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
            shift=shift,
        )
    ds = ds.batch(accum_steps * micro_batch, drop_remainder=True)
    ds = ds.map(functools.partial(_split_accum, accum_steps=accum_steps))
    if num_workers > 0:
        _absl_flags_ready()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


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
        shift=kind is None or next_token_rows(kind),
    )
    return list(ds)


def make_eval_batches(
    examples: list,
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
) -> list[dict[str, np.ndarray]]:
    """The whole eval split once, in order, as `[1, micro_batch, ...]` batches for this process.

    The last batch is padded with empty rows (no target tokens), so every example counts once.
    `with_index` adds `example_index` (`-1` for padding rows; unpacked rows only).
    """
    if packing != "none":
        if with_index:
            raise ValueError("example_index needs unpacked rows")
        rows = pack_examples(
            examples,
            seq_len=seq_len,
            packing=packing,
            segments_per_row=segments_per_row,
            packing_bins=packing_bins,
            kind=kind,
        )
    else:
        rows = [to_row(ex, seq_len, kind) for ex in examples]
    if with_index:
        for i, row in enumerate(rows):
            row["example_index"] = np.int32(i)
    global_batch = micro_batch * process_count
    n_batches = -(-len(rows) // global_batch)
    empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
    if with_index:
        empty["example_index"] = np.int32(-1)
    rows += [empty] * (n_batches * global_batch - len(rows))
    batches = []
    for b in range(n_batches):
        chunk = rows[b * global_batch : (b + 1) * global_batch]
        mine = chunk[process_index * micro_batch : (process_index + 1) * micro_batch]
        batches.append({k: np.stack([r[k] for r in mine])[None] for k in rows[0]})
    return batches
