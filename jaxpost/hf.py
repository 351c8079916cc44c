"""Hugging Face checkpoints in and out, with no torch: `config.json` + safetensors (one file, or
shards with `model.safetensors.index.json`) <-> a `jaxpost.model.Config` and a params pytree.

    config, params = jaxpost.hf.load_pretrained("path/to/Llama-3.2-1B-Instruct")
    logits = jaxpost.hf.logits(config, params, token_ids)          # [B, L, V]
    jaxpost.hf.save_pretrained("out/", config, params, tokenizer_dir="path/to/...")

The supported architectures and the name/layout table are `jaxpost.hf_mapping`'s, the file format
`jaxpost.safetensors_io`'s; their public names are importable from here too.

Loading reads each tensor from a memory map, one at a time. With a `target` of shardings (what
training uses) every device receives only its own slice, so a model never has to fit whole in
one device's memory. Saving moves one HF tensor at a time: one layer of a stacked parameter is
assembled on the host from the devices' shards (across processes: that slice alone is gathered),
cast, and appended to the file being written, so the host holds about the largest HF tensor,
never the model. The directory is written beside `path` and renamed into place when complete,
so a failure leaves nothing partial.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxpost import hf_mapping as mapping
from jaxpost import model as model_lib
from jaxpost.data.tokenizer import load_tokenizer
from jaxpost.hf_mapping import (
    CAUSAL,
    REWARD,
    config_from_hf,
    config_to_hf,
    get_path,
    hf_names,
    read_config,
    set_path,
)
from jaxpost.safetensors_io import (
    HFError,
    ShardedWriter,
    Spec,
    Tensors,
    atomic_directory,
    np_dtype,
    write_safetensors,
)

__all__ = [
    "CAUSAL",
    "REWARD",
    "TOKENIZER_FILES",
    "HFError",
    "Tensors",
    "atomic_directory",
    "config_from_hf",
    "config_to_hf",
    "load_params",
    "load_pretrained",
    "logits",
    "read_config",
    "reward_pad_id",
    "save_pretrained",
    "write_safetensors",
]

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
log = logging.getLogger("jaxpost")


# --- load -----------------------------------------------------------------------------------


def _check_leaf_shapes(leaves, tensors: Tensors, config, kind) -> None:
    """Every tensor present with the shape the config implies, before anything is loaded."""
    want_jax = mapping.abstract_params(config, kind)
    for leaf in leaves:
        target = tuple(get_path(want_jax, leaf.path).shape)
        if leaf.per_layer:
            target = target[1:]
        for name in hf_names(leaf, config.n_layers):
            file, entry = tensors.entry(name)
            if np_dtype(entry["dtype"]) is None:
                raise HFError(f"{file}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
            if mapping.jax_shape(leaf, entry["shape"]) != target:
                raise HFError(
                    f"{file}: tensor {name!r} has shape {entry['shape']}, but config.json "
                    f"implies one that maps to {list(target)}"
                )


def _unused(tensors: Tensors, leaves, config) -> list[str]:
    used = {name for leaf in leaves for name in hf_names(leaf, config.n_layers)}
    ignorable = ("rotary_emb.inv_freq", "lm_head.weight")  # tied checkpoints may keep lm_head
    return sorted(n for n in tensors.names() if n not in used and not n.endswith(ignorable))


def load_params(
    path: str,
    config: model_lib.Config,
    kind: str = "causal_lm",
    *,
    target: Any = None,
    dtype: Any = np.float32,
) -> Any:
    """The params of a Hugging Face directory in jaxpost's layout.

    Without `target`: numpy arrays of `dtype`. With `target` (a params-shaped tree of
    `jax.ShapeDtypeStruct`s with shardings, e.g. a train state's): sharded jax arrays built
    tensor by tensor, each device reading only its slice. A reward `kind` whose checkpoint is a
    causal LM keeps the target's (fresh) `score` head.
    """
    tensors = Tensors(path)
    leaves = mapping.leaves(config, kind)
    if kind == "reward" and "score.weight" not in tensors:
        leaves = [leaf for leaf in leaves if leaf.path != ("score",)]
        if target is None:
            raise HFError(f"{path}: no score.weight; a reward head needs a target to start from")
    _check_leaf_shapes(leaves, tensors, config, kind)
    extra = _unused(tensors, leaves, config)
    if extra:
        raise HFError(
            f"{path}: {len(extra)} tensors this config does not use, e.g. {extra[:3]} (an "
            "architecture feature jaxpost does not model?)"
        )
    n_tensors = sum(len(hf_names(leaf, config.n_layers)) for leaf in leaves)
    logging.getLogger("jaxpost").info(
        "loading %d tensors from %s (%s)",
        n_tensors,
        path,
        "into the training sharding" if target is not None else f"as numpy {np.dtype(dtype)}",
    )
    out: dict = {} if target is None else jax.tree.map(lambda x: x, target)
    for leaf in leaves:
        names = hf_names(leaf, config.n_layers)

        def read(i, names=names, leaf=leaf):
            return leaf.to_jax(np.asarray(tensors.get(names[i])))

        if target is None:
            if leaf.per_layer:
                value = np.stack([read(i).astype(dtype) for i in range(len(names))])
            else:
                value = read(0).astype(dtype)
            set_path(out, leaf.path, value)
            continue
        spec = get_path(target, leaf.path)

        def shard(index, leaf=leaf, spec=spec, read=read):
            if not leaf.per_layer:
                return np.asarray(read(0)[index], spec.dtype)
            layers = range(spec.shape[0])[index[0]]
            return np.stack([np.asarray(read(i)[index[1:]], spec.dtype) for i in layers])

        value = jax.make_array_from_callback(spec.shape, spec.sharding, shard)
        set_path(out, leaf.path, value)
    return out


def load_pretrained(path: str, *, dtype: Any = np.float32) -> tuple[model_lib.Config, Any]:
    """`(model_config, params)` of a Hugging Face directory: numpy params in `dtype`. For
    a reward model (`...ForSequenceClassification`) the params are `RewardModel`'s."""
    config, kind = read_config(path)
    return config, load_params(path, config, kind, dtype=dtype)


def logits(config: model_lib.Config, params: Any, tokens, positions=None, segment_ids=None):
    """Logits `[B, L, V]` (float32) of a causal LM for token ids `[B, L]`."""
    return model_lib.forward_logits(config, params, tokens, positions, segment_ids)


# --- export ---------------------------------------------------------------------------------


@jax.jit
def _take_layer(x, i):
    # `i` is traced: one compilation per stacked parameter, not per layer.
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _host_tensor(value, i: int | None, dtype) -> np.ndarray:
    """Layer `i` of a stacked parameter (the whole parameter when `i` is None), on the host in
    `dtype`. When `value` spans processes this is a collective that gathers only that slice:
    every process calls it, in the same order. Otherwise the tensor is assembled from the
    devices' shards, each distinct block once (on CPU, device buffers are viewed in place)."""
    if not isinstance(value, jax.Array):
        value = np.asarray(value)
        return (value if i is None else value[i]).astype(dtype, copy=False)
    if not value.is_fully_addressable:
        piece = value if i is None else _take_layer(value, i)
        return np.asarray(multihost_utils.process_allgather(piece, tiled=True)).astype(
            dtype, copy=False
        )
    blocks = []  # (where in the tensor, shard data, the layer's position in it)
    for shard in value.addressable_shards:
        if shard.replica_id:  # another device holds the same block
            continue
        index, k = shard.index, None
        if i is not None:
            layers = range(*index[0].indices(value.shape[0]))
            if i not in layers:
                continue
            index, k = index[1:], layers.index(i)
        blocks.append((index, shard.data, k))

    def block(data, k):
        if k is None:
            return np.asarray(data)
        if data.device.platform == "cpu":  # the buffer is host memory: view the layer in it
            return np.asarray(data)[k]
        return np.asarray(data[k])  # sliced on its device: only this layer's block moves

    if len(blocks) == 1:
        return block(*blocks[0][1:]).astype(dtype, copy=False)
    out = np.empty(value.shape if i is None else value.shape[1:], dtype)
    for index, data, k in blocks:
        out[index] = block(data, k)
    return out


def save_pretrained(
    path: str,
    config: model_lib.Config,
    params: Any,
    *,
    tokenizer_dir: str | None = None,
    kind: str | None = None,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    extra_config: Mapping | None = None,
) -> str:
    """Write a Hugging Face directory transformers loads as `AutoModelForCausalLM` (or, for
    RewardModel params, `AutoModelForSequenceClassification` with one label).

    `params` may be numpy or (sharded, also multi-process) jax arrays. One HF tensor at a time
    is gathered to the host, converted to `dtype` (e.g. "bfloat16"; default the params' own)
    and appended to its file; files hold at most `max_shard_bytes` each (transformers' 5 GB
    default). Tokenizer files of `tokenizer_dir` are copied. The directory appears complete or
    not at all; an existing non-empty `path` is refused unless `overwrite`. In a multi-process
    job every process must call this (the gathers are collectives); process 0 writes.
    """
    kind = kind or ("reward" if "score" in params else "causal_lm")
    if kind not in ("causal_lm", "reward"):
        raise ValueError(f"kind={kind!r} must be 'causal_lm' or 'reward'")
    path = os.path.abspath(os.path.expanduser(path))
    write = jax.process_index() == 0
    problem = None  # the file checks concern process 0 only: it alone writes
    if write and os.path.exists(path) and os.listdir(path) and not overwrite:
        problem = FileExistsError(
            f"{path} exists and is not empty (pass overwrite=True to replace it)"
        )
    elif write and tokenizer_dir and not os.path.isdir(tokenizer_dir):
        problem = FileNotFoundError(f"tokenizer_dir={tokenizer_dir!r} is not a directory")
    _raise_everywhere(problem, "export refused by process 0")
    leaves = mapping.leaves(config, kind)
    abstract = mapping.abstract_params(config, kind)
    for leaf in leaves:  # the params must be this config's before anything is written
        try:
            shape = tuple(get_path(params, leaf.path).shape)
        except KeyError:
            raise ValueError(f"params have no {'/'.join(leaf.path)} for this config") from None
        want = tuple(get_path(abstract, leaf.path).shape)
        if shape != want:
            raise ValueError(f"params {'/'.join(leaf.path)} has shape {shape}, config wants {want}")
    hf = config_to_hf(config, kind, **dict(extra_config or {}))  # raises if not exportable
    # Every tensor's name, dtype and shape is known before any is gathered, so each file's
    # header is written first and the tensors follow, one at a time.
    specs, sources = [], []
    for leaf in leaves:
        value = get_path(params, leaf.path)
        layer_shape = mapping.hf_shape(leaf, value.shape[1:] if leaf.per_layer else value.shape)
        out_dtype = jnp.dtype(dtype or value.dtype)
        for i, name in enumerate(hf_names(leaf, config.n_layers)):
            specs.append(Spec(name, out_dtype, layer_shape))
            sources.append((leaf, i if leaf.per_layer else None))
    log.info("exporting %d tensors to %s", len(specs), path)
    pending = iter(zip(specs, sources, strict=True))
    try:
        with atomic_directory(path, enabled=write) as tmp:
            metadata = {"format": "pt"}
            with ShardedWriter(
                tmp, specs, max_shard_bytes=max_shard_bytes, metadata=metadata
            ) as out:
                for spec, (leaf, i) in pending:
                    tensor = _host_tensor(get_path(params, leaf.path), i, spec.dtype)
                    out.write(spec.name, leaf.to_hf(tensor))
                    del tensor  # before the next one is gathered
            hf["torch_dtype"] = specs[-1].dtype.name
            if tokenizer_dir and write:
                for file in TOKENIZER_FILES:
                    src = os.path.join(tokenizer_dir, file)
                    if os.path.exists(src):
                        shutil.copy(src, os.path.join(tmp, file))
                tok_config = os.path.join(tmp, "tokenizer_config.json")
                if os.path.exists(tok_config):
                    _copy_token_ids(tok_config, tmp, hf, kind)
            if kind == "reward":
                hf["pad_token_id"] = reward_pad_id(hf)
            if write:
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(hf, f, indent=2)
        problem = None
    except Exception as e:  # process 0 failed writing (disk full, ...): tell the others
        if jax.process_count() == 1:
            raise
        problem = e
        for spec, (leaf, i) in pending:  # the gathers the others are waiting in
            _host_tensor(get_path(params, leaf.path), i, spec.dtype)
    # Nobody returns before process 0 has finished writing, and everybody learns how it went.
    _raise_everywhere(problem, "export failed on process 0")
    return path


def _raise_everywhere(problem: Exception | None, what: str) -> None:
    """Raise `problem` (process 0's) on every process of the job, not only where it happened,
    so no process waits in a collective for one that stopped."""
    if jax.process_count() > 1:
        text = f"{type(problem).__name__}: {problem}" if problem is not None else ""
        raw = np.zeros(2048, np.uint8)
        data = text.encode()[: len(raw)]
        raw[: len(data)] = np.frombuffer(data, np.uint8)
        got = np.asarray(multihost_utils.broadcast_one_to_all(raw)).tobytes().rstrip(b"\0")
        if got and problem is None:
            raise RuntimeError(f"{what}: {got.decode(errors='replace')}")
    if problem is not None:
        raise problem


def reward_pad_id(hf: Mapping) -> int | None:
    """The pad id to declare for an exported reward model. transformers' sequence classifiers
    score the last token that is not the pad id; jaxpost scores the last real token, the EOS.
    So the pad must not be the EOS: keep a distinct pad, else use unk, else BOS."""
    eos = hf.get("eos_token_id")
    eos = set(eos) if isinstance(eos, list) else {eos}
    for key in ("pad_token_id", "unk_token_id", "bos_token_id"):
        value = hf.get(key)
        if value is not None and value not in eos:
            return value
    return hf.get("pad_token_id")


def _copy_token_ids(tok_config_path: str, directory: str, hf: dict, kind: str) -> None:
    """bos/eos/pad token ids into config.json (transformers' sequence classifiers need pad)."""
    try:
        tok = load_tokenizer(directory)
    except Exception:  # an exotic tokenizer: the ids are optional
        return
    hf.setdefault("bos_token_id", tok.bos_id)
    hf.setdefault("eos_token_id", tok.eos_id)
    distinct_pad = "pad_token" in tok.special_tokens
    hf.setdefault("pad_token_id", tok.pad_id if distinct_pad else None)
    unk = tok.special_tokens.get("unk_token")
    if unk is not None:
        hf.setdefault("unk_token_id", tok.token_to_id(unk))
