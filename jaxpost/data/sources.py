"""Where records come from: local (or `gs://`, through `etils.epath`) JSONL, Parquet or
ArrayRecord files (globs; an ArrayRecord record is one JSON object), TFDS datasets of JSON records
(`tfds:NAME[:SPLIT]`), or a built-in task (`builtin:NAME`).

Every source is random access (`len(source)`, `source[i] -> (record, where)`, `where` being
`path:line`, `path[row i]` or `builtin:NAME[split][i]`, so later errors name the record), and
opening one reads no record: a JSONL file is indexed by its line offsets (one pass over the
bytes, no parsing), a Parquet file by its row groups' metadata. Sources pickle cheaply (offsets
and paths, never records), so grain worker processes read them on their own.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import re
import threading
from collections.abc import Iterator

import numpy as np
from etils import epath

from jaxpost.data.builtin import BUILTIN_TASKS
from jaxpost.data.records import DataError

BUILTIN_PREFIX = "builtin:"
TFDS_PREFIX = "tfds:"
DEFAULT_TFDS_DIR = "~/tensorflow_datasets"
_OPEN_FILES = 16  # a source keeps at most this many files open
_INDEX_CHUNK = 1 << 24  # bytes read at a time while indexing a JSONL file (~5x in memory)
_INK = np.ones(256, bool)  # whether a byte is not JSON-line whitespace
_INK[[9, 10, 11, 12, 13, 32]] = False


def _is_remote(path: str) -> bool:
    return "://" in path


def expand_paths(pattern: str) -> list[str]:
    """Files matching `pattern` (a path or glob; `gs://...` through etils.epath), sorted."""
    if _is_remote(pattern):
        wild = min((pattern.find(c) for c in "*?[" if c in pattern), default=-1)
        if wild < 0:
            paths = [pattern] if epath.Path(pattern).exists() else []
        else:
            root, _, _ = pattern[:wild].rpartition("/")
            paths = sorted(str(p) for p in epath.Path(root).glob(pattern[len(root) + 1 :]))
    else:
        paths = sorted(glob.glob(os.path.expanduser(pattern)))
    if not paths:
        raise FileNotFoundError(
            f"No data file matches {pattern!r} (working directory {os.getcwd()}). Check the path "
            "in config.data.train_path / config.data.eval_path; globs like 'data/*.jsonl' work."
        )
    return paths


class _Source:
    """Random access to `(record, where)`; subclasses define `__len__` and `_get`."""

    def __getitem__(self, i: int) -> tuple[dict, str]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} of a source with {n} records")
        return self._get(i % n)

    def __iter__(self) -> Iterator[tuple[dict, str]]:
        for i in range(len(self)):
            yield self._get(i)

    def _get(self, i: int) -> tuple[dict, str]:
        raise NotImplementedError


def _line_index(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(starts, ends, line_numbers)` of the non-blank lines of a file, from its bytes alone."""
    starts, ends, numbers = [], [], []
    base, line_start, lineno, carry = 0, 0, 1, False
    with epath.Path(path).open("rb") as f:
        while buf := f.read(_INDEX_CHUNK):
            a = np.frombuffer(buf, np.uint8)
            ink = np.zeros(len(a) + 1, np.int32)  # ink[j]: non-blank bytes before j
            np.cumsum(_INK[a], dtype=np.int32, out=ink[1:])
            nl = np.flatnonzero(a == 10)
            if len(nl):
                rel_starts = np.concatenate([[0], nl[:-1] + 1])
                nonblank = ink[nl] - ink[rel_starts] > 0
                nonblank[0] |= carry
                abs_starts = base + rel_starts
                abs_starts[0] = line_start
                keep = np.flatnonzero(nonblank)
                starts.append(abs_starts[keep])
                ends.append(base + nl[keep])
                numbers.append(lineno + keep)
                lineno += len(nl)
                line_start = base + int(nl[-1]) + 1
                carry = bool(ink[-1] - ink[nl[-1] + 1] > 0)
            else:
                carry = carry or bool(ink[-1] > 0)
            base += len(a)
    if carry:  # a last line without a newline
        starts.append(np.array([line_start]))
        ends.append(np.array([base]))
        numbers.append(np.array([lineno]))

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return cat(starts, np.int64), cat(ends, np.int64), cat(numbers, np.int64)


class JsonlSource(_Source):
    """The non-blank lines of JSONL files, each one JSON object (`path:line`)."""

    def __init__(self, pattern: str):
        self.paths = expand_paths(pattern)
        parts = [_line_index(p) for p in self.paths]
        self._file = np.concatenate(
            [np.full(len(s), k, np.int32) for k, (s, _, _) in enumerate(parts)]
        )
        self._start, self._end, self._line = (
            np.concatenate([p[j] for p in parts]) for j in range(3)
        )
        self._handles: dict[int, object] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._start)

    def _read(self, k: int, start: int, size: int) -> bytes:
        path = self.paths[k]
        with self._lock:  # few files open at once (datasets of thousands of shards)
            handle = self._handles.pop(k, None)
            if handle is None:
                if len(self._handles) >= _OPEN_FILES:
                    oldest = self._handles.pop(next(iter(self._handles)))
                    os.close(oldest) if isinstance(oldest, int) else oldest.close()
                handle = (
                    epath.Path(path).open("rb")
                    if _is_remote(path)
                    else os.open(os.path.expanduser(path), os.O_RDONLY)
                )
            self._handles[k] = handle  # most recently used last
            if not isinstance(handle, int):
                handle.seek(start)
                return handle.read(size)
        return os.pread(handle, size, start)  # no shared seek: safe from prefetch threads

    def _get(self, i: int) -> tuple[dict, str]:
        k, start = int(self._file[i]), int(self._start[i])
        where = f"{self.paths[k]}:{int(self._line[i])}"
        raw = self._read(k, start, int(self._end[i]) - start)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: invalid UTF-8 at byte {e.start}") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
        return record, where


def read_jsonl(pattern: str) -> Iterator[tuple[dict, str]]:
    """`(record, "path:line")` for each non-blank line of every file matching `pattern`."""
    yield from JsonlSource(pattern)


# Rows of Parquet row groups kept decoded: a small file is read once, a larger one in shuffled
# order reads row groups again and again (slow: `jaxpost data prepare` it).
PARQUET_CACHED_ROWS = 100_000


class ParquetSource(_Source):
    """Rows of Parquet files as records (`path[row i]`); a row group is read when one of its
    rows is asked for, and up to `PARQUET_CACHED_ROWS` rows stay cached."""

    def __init__(self, pattern: str):
        import pyarrow.parquet as pq  # heavy: only for Parquet sources

        self.paths = expand_paths(pattern)
        self._groups: list[tuple[int, int, int]] = []  # (file, group, first row in file)
        sizes = []
        for k, path in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(epath.Path(path).open("rb")).metadata
            except Exception as e:  # pyarrow's errors for a corrupt file vary
                raise DataError(f"{path}: cannot read as Parquet ({e})") from None
            first = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    self._groups.append((k, g, first))
                    sizes.append(n)
                first += n
        self._ends = np.cumsum(sizes, dtype=np.int64).tolist()
        self._cache: dict[int, list] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _rows(self, g: int) -> list:
        import pyarrow.parquet as pq

        with self._lock:
            rows = self._cache.get(g)
            if rows is None:
                k, group, _ = self._groups[g]
                try:
                    with epath.Path(self.paths[k]).open("rb") as f:
                        rows = pq.ParquetFile(f).read_row_group(group).to_pylist()
                except Exception as e:
                    raise DataError(
                        f"{self.paths[k]}: cannot read row group {group} ({e})"
                    ) from None
                while self._cache and self._cached_rows() + len(rows) > PARQUET_CACHED_ROWS:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[g] = rows
            return rows

    def _cached_rows(self) -> int:
        return sum(len(rows) for rows in self._cache.values())

    def _get(self, i: int) -> tuple[dict, str]:
        g = bisect.bisect_right(self._ends, i)
        k, _, first = self._groups[g]
        offset = i - (self._ends[g - 1] if g else 0)
        return self._rows(g)[offset], f"{self.paths[k]}[row {first + offset}]"


def read_parquet(pattern: str) -> Iterator[tuple[dict, str]]:
    """Rows of Parquet files as records (`path[row i]`), one row group in memory at a time."""
    yield from ParquetSource(pattern)


class ArrayRecordJsonSource(_Source):
    """Records of ArrayRecord files, each one JSON object in UTF-8 (`path[record i]`)."""

    def __init__(self, pattern: str):
        import grain

        self.paths = expand_paths(pattern)
        sizes = []
        for path in self.paths:
            try:
                sizes.append(len(grain.sources.ArrayRecordDataSource([path])))
            except Exception as e:  # array_record raises several types for a bad file
                raise DataError(f"{path}: cannot read as ArrayRecord ({e})") from None
        self._ends = np.cumsum(sizes, dtype=np.int64).tolist()
        self._data = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def _get(self, i: int) -> tuple[dict, str]:
        k = bisect.bisect_right(self._ends, i)
        where = f"{self.paths[k]}[record {i - (self._ends[k - 1] if k else 0)}]"
        try:
            return json.loads(self._data[i].decode("utf-8")), where
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DataError(
                f"{where}: not a UTF-8 JSON record (ArrayRecord sources hold one JSON object per "
                "record; for token-level datasets from `jaxpost data prepare` give the "
                "directory holding manifest.json)"
            ) from None


class TfdsSource(_Source):
    """A TFDS dataset whose examples hold a JSON `record` and its `where` (`tfds:NAME[:SPLIT]`),
    read through `tfds.data_source` (random access, no TensorFlow)."""

    def __init__(self, spec: str, split: str, data_dir: str):
        import tensorflow_datasets as tfds

        name, _, explicit_split = spec[len(TFDS_PREFIX) :].partition(":")
        split = explicit_split or split
        data_dir = os.path.expanduser(data_dir)
        try:
            self._data = tfds.data_source(name, data_dir=data_dir, split=split)
        except Exception as e:  # tfds raises several types for a missing dataset or split
            raise FileNotFoundError(
                f"Cannot open TFDS dataset {name!r} split {split!r} in {data_dir} "
                f"(config.data.tfds_data_dir): {e}"
            ) from None

    def __len__(self) -> int:
        return len(self._data)

    def _get(self, i: int) -> tuple[dict, str]:
        example = self._data[i]
        where, text = example["where"], example["record"]
        where = where.decode() if isinstance(where, bytes) else str(where)
        return json.loads(text.decode() if isinstance(text, bytes) else text), where


class ListSource(_Source):
    def __init__(self, records: list[tuple[dict, str]]):
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def _get(self, i: int) -> tuple[dict, str]:
        return self._records[i]


class SliceSource(_Source):
    """Records `start..stop` of another source."""

    def __init__(self, base, start: int, stop: int):
        self.base, self.start, self.stop = base, start, max(start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def _get(self, i: int) -> tuple[dict, str]:
        return self.base[self.start + i]


_SLICE = re.compile(r"^(?P<path>.*)\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\]$")


def split_slice(spec: str) -> tuple[str, tuple[str, str] | None]:
    """`"data.jsonl[:90%]"` -> `("data.jsonl", ("", "90%"))`; no slice -> `(spec, None)`."""
    m = _SLICE.match(spec)
    if not m:
        return spec, None
    return m["path"], (m["start"], m["stop"])


def _bound(text: str, n: int, default: int) -> int:
    if not text:
        return default
    value = round(n * int(text[:-1]) / 100) if text.endswith("%") else int(text)
    return min(n, max(0, value + n if value < 0 else value))


def open_records(spec: str, split: str, *, tfds_data_dir: str = DEFAULT_TFDS_DIR) -> _Source:
    """The random-access source of a data spec: a JSONL/Parquet/ArrayRecord path or glob,
    `tfds:NAME[:SPLIT]`, or `builtin:NAME` (with `split` train/eval), optionally sliced by
    record index: `data.jsonl[:90%]`, `data.jsonl[90%:]`, `x[100:200]`."""
    path, bounds = split_slice(spec)
    source = _open_unsliced(path, split, tfds_data_dir)
    if bounds is None:
        return source
    n = len(source)
    return SliceSource(source, _bound(bounds[0], n, 0), _bound(bounds[1], n, n))


def read_records(
    spec: str, split: str, *, tfds_data_dir: str = DEFAULT_TFDS_DIR
) -> Iterator[tuple[dict, str]]:
    """The records of `open_records(spec, split)` in order."""
    yield from open_records(spec, split, tfds_data_dir=tfds_data_dir)


def _open_unsliced(spec: str, split: str, tfds_data_dir: str) -> _Source:
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_TASKS:
            raise ValueError(
                f"Unknown built-in dataset {spec!r}; known: "
                + ", ".join(BUILTIN_PREFIX + n for n in sorted(BUILTIN_TASKS))
            )
        records = BUILTIN_TASKS[name](split)
        return ListSource([(r, f"{spec}[{split}][{i}]") for i, r in enumerate(records)])
    if spec.startswith(TFDS_PREFIX):
        return TfdsSource(spec, split, tfds_data_dir)
    if spec.endswith(".parquet"):
        return ParquetSource(spec)
    if ".array_record" in os.path.basename(spec):
        return ArrayRecordJsonSource(spec)
    return JsonlSource(spec)
