"""Safetensors files on disk: read lazily, written as a stream, in Hugging Face's layout (one
`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards + `model.safetensors.index.json`).

Reading memory-maps each tensor, so nothing is read until it is sliced. Writing declares every
tensor (name, dtype, shape) up front: the header, which holds all offsets, goes first, and each
tensor's bytes follow as the caller hands it over, so the writer holds at most one tensor (a
transposed view is copied out in small chunks). The `safetensors` package reads what this writes
(tested); its own writers take every tensor in one dict, which is what streaming avoids.

    specs = [Spec("a", np.dtype(np.float32), (2, 3)), ...]
    with ShardedWriter(directory, specs, max_shard_bytes=5 * 2**30) as writer:
        for spec in specs:
            writer.write(spec.name, compute(spec))     # one tensor at a time, in order
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import ml_dtypes
import numpy as np

CHUNK_BYTES = 16 * 2**20  # the most a non-contiguous tensor is copied at once while writing


class HFError(ValueError):
    """A Hugging Face directory jaxpost cannot use; the message names the file and field/tensor."""


def read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise HFError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HFError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


# --- dtypes -----------------------------------------------------------------------------------

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}


def np_dtype(code: str) -> np.dtype | None:
    """The numpy dtype of a safetensors dtype code (None if unknown)."""
    return np.dtype(_DTYPES[code]) if code in _DTYPES else None


def dtype_code(dtype) -> str:
    dtype = np.dtype(dtype)
    for code, known in _DTYPES.items():
        if dtype == np.dtype(known):
            return code
    raise HFError(f"dtype {dtype} cannot be written to safetensors")


# --- reading ----------------------------------------------------------------------------------


class SafetensorsFile:
    """The tensors of one .safetensors file as lazy read-only memory maps."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFError(f"{path}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.entries = header
        self.data_start = 8 + n
        self.size = os.path.getsize(path)

    def get(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        dtype = np_dtype(entry["dtype"])
        if dtype is None:
            raise HFError(f"{self.path}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
        start, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - start != math.prod(shape) * dtype.itemsize or self.data_start + end > self.size:
            raise HFError(f"{self.path}: tensor {name!r} has inconsistent offsets (truncated?)")
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype)
        return np.memmap(
            self.path, dtype=dtype, mode="r", offset=self.data_start + start, shape=shape
        )


class Tensors:
    """Every tensor of a model directory (single file or sharded with an index)."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        self.where: dict[str, str] = {}
        self.files: dict[str, SafetensorsFile] = {}
        if os.path.exists(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFError(f"{index}: no 'weight_map'")
            for name, file in weight_map.items():
                full = os.path.join(path, file)
                if not os.path.exists(full):
                    raise HFError(f"{index}: shard {file!r} (holding {name!r}) is missing")
                self.where[name] = full
        elif os.path.exists(single):
            self.where = {name: single for name in SafetensorsFile(single).entries}
        else:
            raise HFError(
                f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                "checkpoints are read; convert .bin files with transformers first)"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self):
        return self.where.keys()

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.where:
            raise HFError(f"tensor {name!r} is missing from the checkpoint")
        file = self.where[name]
        if file not in self.files:
            self.files[file] = SafetensorsFile(file)
        if name not in self.files[file].entries:
            raise HFError(f"{file}: tensor {name!r} is listed in the index but not in the file")
        return self.files[file]

    def entry(self, name: str) -> tuple[str, dict]:
        """`(file, header entry)` of a tensor: its dtype code and shape, nothing read."""
        file = self._file(name)
        return file.path, file.entries[name]

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)


# --- writing ----------------------------------------------------------------------------------


class Spec(NamedTuple):
    """A tensor declared before its bytes exist."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _write_bytes(f, array: np.ndarray, chunk_bytes: int) -> None:
    """`array`'s bytes in C order; a non-contiguous view (a transpose) is copied out in chunks
    of rows, so writing it never needs a whole contiguous copy."""
    if array.flags.c_contiguous:
        f.write(array.reshape(-1).view(np.uint8))
        return
    rows = max(1, chunk_bytes // max(1, array[0].nbytes))
    buffer = np.empty((min(rows, array.shape[0]), *array.shape[1:]), array.dtype)  # reused
    for start in range(0, array.shape[0], rows):
        chunk = buffer[: len(array[start : start + rows])]
        np.copyto(chunk, array[start : start + rows])
        f.write(chunk.reshape(-1).view(np.uint8))


class SafetensorsWriter:
    """One .safetensors file whose tensors are declared up front: the header is written on
    opening, then `write` appends each tensor's bytes, in the declared order."""

    def __init__(
        self,
        path: str,
        specs: Sequence[Spec],
        metadata: Mapping | None = None,
        *,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.path, self.specs, self.chunk_bytes = path, list(specs), chunk_bytes
        header, offset = {}, 0
        for spec in self.specs:
            header[spec.name] = {
                "dtype": dtype_code(spec.dtype),
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
        self._written = 0
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, array) -> None:
        if self._written == len(self.specs):
            raise ValueError(f"{self.path}: {name!r} was not declared")
        spec = self.specs[self._written]
        array = np.asarray(array)
        if name != spec.name or array.dtype != spec.dtype or array.shape != tuple(spec.shape):
            raise ValueError(
                f"{self.path}: expected {spec.name!r} {spec.dtype}{list(spec.shape)} next, got "
                f"{name!r} {array.dtype}{list(array.shape)}"
            )
        _write_bytes(self._f, array, self.chunk_bytes)
        self._written += 1

    def close(self) -> None:
        """Close the file; an error if a declared tensor was never written."""
        self._f.close()
        if self._written != len(self.specs):
            missing = [s.name for s in self.specs[self._written :]]
            raise ValueError(
                f"{self.path}: {len(missing)} tensors never written, e.g. {missing[0]}"
            )

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:  # the error in flight says what went wrong; the file is unfinished
            self._f.close()


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Write numpy arrays in the safetensors format (header JSON, then the raw bytes)."""
    arrays = {name: np.asarray(a) for name, a in tensors.items()}
    specs = [Spec(name, a.dtype, a.shape) for name, a in arrays.items()]
    with SafetensorsWriter(path, specs, metadata) as writer:
        for name, array in arrays.items():
            writer.write(name, array)


def plan_files(specs: Sequence[Spec], max_shard_bytes: int) -> list[tuple[str, list[Spec]]]:
    """Hugging Face's shard files for `specs` in order: a new file whenever the next tensor
    would take the current one past `max_shard_bytes` (a larger tensor gets a file alone)."""
    groups: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        if size and size + spec.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    n = len(groups)
    if n == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class ShardedWriter:
    """Declared tensors written in order into Hugging Face's shard files under `directory`
    (plus `model.safetensors.index.json` when there are several). Each file is opened when
    its first tensor arrives. `directory=None` writes nothing (the other processes of a
    multi-host job) but checks the same order."""

    def __init__(
        self,
        directory: str | None,
        specs: Sequence[Spec],
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: Mapping | None = None,
    ):
        self.directory, self.metadata = directory, metadata
        self.files = plan_files(specs, max_shard_bytes)
        self._order = [(i, spec) for i, (_, group) in enumerate(self.files) for spec in group]
        self._next = 0
        self._file: tuple[int, SafetensorsWriter] | None = None

    def write(self, name: str, array) -> None:
        if self._next == len(self._order):
            raise ValueError(f"{name!r} was not declared")
        i, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"expected {spec.name!r} next, got {name!r}")
        self._next += 1
        if self.directory is None:
            return
        if self._file is None or self._file[0] != i:
            if self._file is not None:
                self._file[1].close()
            file, group = self.files[i]
            self._file = (
                i,
                SafetensorsWriter(os.path.join(self.directory, file), group, self.metadata),
            )
        self._file[1].write(name, array)

    def close(self) -> None:
        """Finish the last file and write the index; an error if a tensor is missing."""
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} declared tensors never written")
        if self.directory is None:
            return
        if self._file is not None:
            self._file[1].close()
            self._file = None
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for _, s in self._order)},
                "weight_map": {s.name: f for f, group in self.files for s in group},
            }
            with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        elif self._file is not None:
            self._file[1].__exit__(kind)


@contextlib.contextmanager
def atomic_directory(path: str, *, enabled: bool = True):
    """Yield a temporary directory beside `path` that replaces `path` when the block ends
    without an error, and is removed when it raises: the result appears whole or not at all.
    With `enabled=False` (other processes of a multi-host job) yields None and does nothing."""
    if not enabled:
        yield None
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jaxpost-write-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        old = None
        if os.path.exists(path):  # move the old one aside: two renames, then delete it
            old = tempfile.mkdtemp(prefix=".jaxpost-old-", dir=parent)
            os.replace(path, os.path.join(old, "d"))
        os.replace(tmp, path)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
