"""Hugging Face checkpoints in and out, with no torch: `config.json` + safetensors (one file, or
shards with `model.safetensors.index.json`) <-> a `jaxpost.model.Config` and a params pytree.

    config, params = jaxpost.hf.load_pretrained("path/to/Llama-3.2-1B-Instruct")
    logits = jaxpost.hf.logits(config, params, token_ids)          # [B, L, V]
    jaxpost.hf.save_pretrained("out/", config, params, tokenizer_dir="path/to/...")

Architectures: `LlamaForCausalLM` (Llama 2, 3, 3.1, 3.2, with Llama-3 RoPE scaling),
`MistralForCausalLM` (sliding window), `Qwen2ForCausalLM` (QKV bias), `Qwen3ForCausalLM` (q/k
norms), tied or untied embeddings; and their `...ForSequenceClassification` with one label as
reward models (`jaxpost.model.RewardModel`). One model, configured: each HF tensor is one
reshape/transpose of one jaxpost tensor (table in `jaxpost.model`).

Loading reads each tensor from a memory map, one at a time. With a `target` of shardings (what
training uses) every device receives only its own slice, so a model never has to fit whole in
one device's memory. Saving writes to a temporary directory that is renamed into place only when
complete, so a failure leaves nothing partial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from jaxpost import model as model_lib
from jaxpost import sharding
from jaxpost.data.tokenizer import load_tokenizer

CAUSAL = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
REWARD = {name.replace("ForCausalLM", "ForSequenceClassification"): t for name, t in CAUSAL.items()}
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


class HFError(ValueError):
    """A Hugging Face directory jaxpost cannot use; the message names the file and field/tensor."""


# --- config ---------------------------------------------------------------------------------


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        raise HFError(f"{path}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise HFError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def _rope_settings(hf: Mapping, where: str) -> dict:
    """RoPE theta and scaling from transformers 4 (`rope_theta`, `rope_scaling`) or
    transformers 5 (`rope_parameters`) style configs."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if kind in ("default", None):
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_position": int(params["original_max_position_embeddings"]),
        }
    raise HFError(f"{where}: rope type {kind!r} is not supported (default, linear, llama3 are)")


def config_from_hf(hf: Mapping, where: str = "config.json") -> tuple[model_lib.Config, str]:
    """`(Config, kind)` of a transformers config dict; kind is "causal_lm" or "reward"."""
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch in CAUSAL:
        family, kind = CAUSAL[arch], "causal_lm"
    elif arch in REWARD:
        family, kind = REWARD[arch], "reward"
        if hf.get("num_labels", len(hf.get("id2label") or {0: 0})) != 1:
            raise HFError(f"{where}: a reward model needs exactly one label (num_labels)")
    else:
        supported = ", ".join(sorted(CAUSAL) + sorted(REWARD))
        raise HFError(f"{where}: architectures={archs} is not supported (supported: {supported})")
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (only silu)")
    if family in ("llama", "mistral") and hf.get("attention_bias"):
        problems.append("attention_bias=true (a bias on o_proj too)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias=true")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        # Qwen's window applies only to layers from max_window_layers on; not modelled.
        problems.append("use_sliding_window=true")
    if problems:
        raise HFError(f"{where}: unsupported settings: " + "; ".join(problems))
    try:
        heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        # MistralConfig's default window is 4096; null means none.
        window = int(hf.get("sliding_window", 4096) or 0) if family == "mistral" else 0
        config = model_lib.Config(
            vocab_size=int(hf["vocab_size"]),
            d_model=d_model,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or d_model // heads),
            mlp_dim=int(hf["intermediate_size"]),
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=window,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
            **_rope_settings(hf, where),
        )
    except KeyError as e:
        raise HFError(f"{where}: missing field {e.args[0]!r}") from None
    except ValueError as e:
        raise HFError(f"{where}: {e}") from None
    return config, kind


def config_to_hf(config: model_lib.Config, kind: str = "causal_lm", **extra) -> dict:
    """A transformers config dict for `config` (the inverse of `config_from_hf`)."""
    c = config
    problems = []
    if c.qk_norm and c.qkv_bias:
        problems.append("qk_norm with qkv_bias (Qwen3 has no QKV bias)")
    if c.sliding_window and (c.qk_norm or c.qkv_bias):
        problems.append("sliding_window with qk_norm or qkv_bias (only Mistral has a window)")
    if problems:
        raise ValueError(
            "this model has no Hugging Face architecture to export to: " + "; ".join(problems)
        )
    if c.qk_norm:
        family, model_type = "Qwen3", "qwen3"
    elif c.qkv_bias:
        family, model_type = "Qwen2", "qwen2"
    elif c.sliding_window:
        family, model_type = "Mistral", "mistral"
    else:
        family, model_type = "Llama", "llama"
    head = "ForSequenceClassification" if kind == "reward" else "ForCausalLM"
    hf = {
        "architectures": [family + head],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    if model_type in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None)
    if model_type == "mistral":
        hf["sliding_window"] = c.sliding_window
    if model_type == "qwen3":
        hf["attention_bias"] = False
    if c.rope_scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_factor}
    elif c.rope_scaling == "llama3":
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": c.rope_factor,
            "low_freq_factor": c.rope_low_freq_factor,
            "high_freq_factor": c.rope_high_freq_factor,
            "original_max_position_embeddings": c.rope_original_max_position,
        }
    if kind == "reward":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    hf.update(extra)
    return hf


def read_config(path: str) -> tuple[model_lib.Config, str]:
    """`(Config, kind)` of a Hugging Face model directory."""
    where = os.path.join(path, "config.json")
    return config_from_hf(_read_json(where), where)


# --- safetensors ----------------------------------------------------------------------------

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
}


def _np_dtype(code: str):
    if code in _DTYPES:
        return np.dtype(_DTYPES[code])
    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn}
    extra["F8_E5M2"] = ml_dtypes.float8_e5m2
    return np.dtype(extra[code]) if code in extra else None


def _dtype_code(dtype) -> str:
    dtype = np.dtype(dtype)
    for code in ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"):
        if dtype == np.dtype(_DTYPES[code]):
            return code
    if dtype.name == "bfloat16":
        return "BF16"
    raise HFError(f"dtype {dtype} cannot be written to safetensors")


class _SafetensorsFile:
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
        dtype = _np_dtype(entry["dtype"])
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
        self.files: dict[str, _SafetensorsFile] = {}
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise HFError(f"{index}: no 'weight_map'")
            for name, file in weight_map.items():
                full = os.path.join(path, file)
                if not os.path.exists(full):
                    raise HFError(f"{index}: shard {file!r} (holding {name!r}) is missing")
                self.where[name] = full
        elif os.path.exists(single):
            self.where = {name: single for name in _SafetensorsFile(single).entries}
        else:
            raise HFError(
                f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                "checkpoints are read; convert .bin files with transformers first)"
            )

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self):
        return self.where.keys()

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise HFError(f"tensor {name!r} is missing from the checkpoint")
        file = self.where[name]
        if file not in self.files:
            self.files[file] = _SafetensorsFile(file)
        if name not in self.files[file].entries:
            raise HFError(f"{file}: tensor {name!r} is listed in the index but not in the file")
        return self.files[file].get(name)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Write numpy arrays in the safetensors format (header JSON, then the raw bytes)."""
    header, offset = {}, 0
    for name, array in tensors.items():
        size = array.size * array.dtype.itemsize
        header[name] = {
            "dtype": _dtype_code(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


# --- the name and layout mapping ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]  # in the jaxpost params tree
    hf_name: str  # "{i}" for the layer index
    to_jax: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> one jaxpost tensor (a layer)
    to_hf: Callable[[np.ndarray], np.ndarray]
    per_layer: bool = True


def _leaves(config: model_lib.Config, kind: str) -> list[_Leaf]:
    c = config
    D, H, K, Dh = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim
    pre = "model.layers.{i}."

    def qkv(heads):  # HF [heads*Dh, D] <-> jaxpost [D, heads, Dh]
        return (lambda w: w.T.reshape(D, heads, Dh), lambda k: k.reshape(D, heads * Dh).T)

    def bias(heads):
        return (lambda b: b.reshape(heads, Dh), lambda b: b.reshape(heads * Dh))

    same = (lambda x: x, lambda x: x)
    transpose = (lambda w: w.T, lambda k: k.T)
    out = [
        _Leaf(("layers", "attn", "q", "kernel"), pre + "self_attn.q_proj.weight", *qkv(H)),
        _Leaf(("layers", "attn", "k", "kernel"), pre + "self_attn.k_proj.weight", *qkv(K)),
        _Leaf(("layers", "attn", "v", "kernel"), pre + "self_attn.v_proj.weight", *qkv(K)),
        _Leaf(
            ("layers", "attn", "o", "kernel"),
            pre + "self_attn.o_proj.weight",
            lambda w: w.T.reshape(H, Dh, D),
            lambda k: k.reshape(H * Dh, D).T,
        ),
        _Leaf(("layers", "mlp", "gate", "kernel"), pre + "mlp.gate_proj.weight", *transpose),
        _Leaf(("layers", "mlp", "up", "kernel"), pre + "mlp.up_proj.weight", *transpose),
        _Leaf(("layers", "mlp", "down", "kernel"), pre + "mlp.down_proj.weight", *transpose),
        _Leaf(("layers", "attn_norm", "scale"), pre + "input_layernorm.weight", *same),
        _Leaf(("layers", "mlp_norm", "scale"), pre + "post_attention_layernorm.weight", *same),
        _Leaf(("embedding",), "model.embed_tokens.weight", *same, per_layer=False),
        _Leaf(("final_norm", "scale"), "model.norm.weight", *same, per_layer=False),
    ]
    if c.qkv_bias:
        for name, heads in (("q", H), ("k", K), ("v", K)):
            hf_name = pre + f"self_attn.{name}_proj.bias"
            out.append(_Leaf(("layers", "attn", name, "bias"), hf_name, *bias(heads)))
    if c.qk_norm:
        for name in ("q", "k"):
            hf_name = pre + f"self_attn.{name}_norm.weight"
            out.append(_Leaf(("layers", "attn", f"{name}_norm", "scale"), hf_name, *same))
    if kind == "reward":
        out = [dataclasses.replace(leaf, path=("decoder", *leaf.path)) for leaf in out]
        out.append(
            _Leaf(
                ("score",),
                "score.weight",
                lambda w: w.reshape(D),
                lambda s: s.reshape(1, D),
                per_layer=False,
            )
        )
    elif not c.tie_embeddings:
        out.append(_Leaf(("lm_head",), "lm_head.weight", *transpose, per_layer=False))
    return out


def _hf_names(leaf: _Leaf, n_layers: int) -> list[str]:
    if leaf.per_layer:
        return [leaf.hf_name.format(i=i) for i in range(n_layers)]
    return [leaf.hf_name]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _expected_shape(leaf: _Leaf, hf_shape) -> tuple[int, ...] | None:
    """The jaxpost shape an HF tensor of `hf_shape` maps to (None if it cannot)."""
    try:
        return tuple(
            jax.eval_shape(leaf.to_jax, jax.ShapeDtypeStruct(tuple(hf_shape), np.float32)).shape
        )
    except (TypeError, ValueError):
        return None


def _check_leaf_shapes(leaves, tensors: Tensors, config, kind) -> None:
    """Every tensor present with the shape the config implies, before anything is loaded."""
    want_jax = _abstract_params(config, kind)
    for leaf in leaves:
        target = tuple(_get(want_jax, leaf.path).shape)
        if leaf.per_layer:
            target = target[1:]
        for name in _hf_names(leaf, config.n_layers):
            if name not in tensors:
                raise HFError(f"tensor {name!r} is missing from the checkpoint")
            entry_file = tensors.where[name]
            if entry_file not in tensors.files:
                tensors.files[entry_file] = _SafetensorsFile(entry_file)
            entry = tensors.files[entry_file].entries.get(name)
            if entry is None:
                raise HFError(f"{entry_file}: tensor {name!r} is listed but not in the file")
            if _np_dtype(entry["dtype"]) is None:
                raise HFError(f"{entry_file}: tensor {name!r} has unknown dtype {entry['dtype']!r}")
            if _expected_shape(leaf, entry["shape"]) != target:
                raise HFError(
                    f"{entry_file}: tensor {name!r} has shape {entry['shape']}, but config.json "
                    f"implies one that maps to {list(target)}"
                )


def _abstract_params(config: model_lib.Config, kind: str):
    module = model_lib.RewardModel(config) if kind == "reward" else model_lib.Decoder(config)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32))
    return sharding.strip_boxes(boxed)["params"]


def _unused(tensors: Tensors, leaves, config) -> list[str]:
    used = {name for leaf in leaves for name in _hf_names(leaf, config.n_layers)}
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
    leaves = _leaves(config, kind)
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
    n_tensors = sum(len(_hf_names(leaf, config.n_layers)) for leaf in leaves)
    logging.getLogger("jaxpost").info(
        "loading %d tensors from %s (%s)",
        n_tensors,
        path,
        "into the training sharding" if target is not None else f"as numpy {np.dtype(dtype)}",
    )
    out: dict = {} if target is None else jax.tree.map(lambda x: x, target)
    for leaf in leaves:
        names = _hf_names(leaf, config.n_layers)

        def read(i, names=names, leaf=leaf):
            return leaf.to_jax(np.asarray(tensors.get(names[i])))

        if target is None:
            if leaf.per_layer:
                value = np.stack([read(i).astype(dtype) for i in range(len(names))])
            else:
                value = read(0).astype(dtype)
            _set(out, leaf.path, value)
            continue
        spec = _get(target, leaf.path)

        def shard(index, leaf=leaf, spec=spec, read=read):
            if not leaf.per_layer:
                return np.asarray(read(0)[index], spec.dtype)
            layers = range(spec.shape[0])[index[0]]
            return np.stack([np.asarray(read(i)[index[1:]], spec.dtype) for i in layers])

        value = jax.make_array_from_callback(spec.shape, spec.sharding, shard)
        _set(out, leaf.path, value)
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


def _host(value) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(value)


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

    Tensors are gathered to the host one at a time; `dtype` (e.g. "bfloat16") converts them on
    the way, default the params' own. Tokenizer files of `tokenizer_dir` are copied. The
    directory appears complete or not at all; an existing non-empty `path` is refused unless
    `overwrite`. In a multi-process job every process must call this; process 0 writes.
    """
    kind = kind or ("reward" if "score" in params else "causal_lm")
    if kind not in ("causal_lm", "reward"):
        raise ValueError(f"kind={kind!r} must be 'causal_lm' or 'reward'")
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True to replace it)")
    if tokenizer_dir and not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer_dir={tokenizer_dir!r} is not a directory")
    leaves = _leaves(config, kind)
    abstract = _abstract_params(config, kind)
    for leaf in leaves:  # the params must be this config's before anything is written
        try:
            shape = tuple(_get(params, leaf.path).shape)
        except KeyError:
            raise ValueError(f"params have no {'/'.join(leaf.path)} for this config") from None
        want = tuple(_get(abstract, leaf.path).shape)
        if shape != want:
            raise ValueError(f"params {'/'.join(leaf.path)} has shape {shape}, config wants {want}")
    hf = config_to_hf(config, kind, **dict(extra_config or {}))  # raises if not exportable
    # Plan the shards from shapes alone, then gather and write one shard at a time, so the
    # host holds at most a shard plus one stacked tensor.
    plan, sizes = [[]], [0]
    for leaf in leaves:
        value = _get(params, leaf.path)
        itemsize = np.dtype(dtype or value.dtype).itemsize
        shape = value.shape[1:] if leaf.per_layer else value.shape
        nbytes = math.prod(shape) * itemsize
        for i, name in enumerate(_hf_names(leaf, config.n_layers)):
            if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                plan.append([])
                sizes.append(0)
            plan[-1].append((name, leaf, i))
            sizes[-1] += nbytes
    n = len(plan)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    write = jax.process_index() == 0
    with atomic_directory(path, enabled=write) as tmp:
        current = (None, None)  # (leaf, its host value)
        stored = None
        for file, entries in zip(names, plan, strict=True):
            shard = {}
            for name, leaf, i in entries:
                if current[0] is not leaf:  # every process joins the gather
                    value = _host(_get(params, leaf.path))
                    current = (leaf, value.astype(dtype) if dtype is not None else value)
                layer = current[1][i] if leaf.per_layer else current[1]
                shard[name] = np.ascontiguousarray(leaf.to_hf(np.asarray(layer)))
                stored = shard[name].dtype
            if write:
                write_safetensors(os.path.join(tmp, file), shard, {"format": "pt"})
        if n > 1 and write:
            index = {
                "metadata": {"total_size": sum(sizes)},
                "weight_map": {e[0]: f for f, es in zip(names, plan, strict=True) for e in es},
            }
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        hf["torch_dtype"] = stored.name
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
    if jax.process_count() > 1:  # nobody returns before process 0 has finished writing
        multihost_utils.sync_global_devices("jaxpost.hf.save_pretrained")
    return path


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
