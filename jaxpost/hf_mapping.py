"""What a Hugging Face model directory means to jaxpost: `config.json` <-> `jaxpost.model.Config`
(per architecture), and the table from each jaxpost parameter to its HF tensor name and layout.

Architectures: `LlamaForCausalLM` (Llama 2, 3, 3.1, 3.2, with Llama-3 RoPE scaling),
`MistralForCausalLM` (sliding window), `Qwen2ForCausalLM` (QKV bias), `Qwen3ForCausalLM` (q/k
norms), tied or untied embeddings; and their `...ForSequenceClassification` with one label as
reward models (`jaxpost.model.RewardModel`). Each HF tensor is one reshape/transpose of one
jaxpost tensor, or of one layer of a stacked `[n_layers, ...]` one (`leaves`). Loading, export
(`jaxpost.hf`) and the GGUF converter all go through this table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import model as model_lib
from jaxpost import sharding
from jaxpost.safetensors_io import HFError, read_json

CAUSAL = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
REWARD = {name.replace("ForCausalLM", "ForSequenceClassification"): t for name, t in CAUSAL.items()}


# --- config ---------------------------------------------------------------------------------


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
    return config_from_hf(read_json(where), where)


# --- the name and layout mapping ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One jaxpost parameter and its HF tensor (one per layer for a stacked leaf). `to_hf` and
    `to_jax` only transpose and reshape: on a contiguous array they are views, copying nothing."""

    path: tuple[str, ...]  # in the jaxpost params tree
    hf_name: str  # "{i}" for the layer index
    to_jax: Callable[[np.ndarray], np.ndarray]  # one HF tensor -> one jaxpost tensor (a layer)
    to_hf: Callable[[np.ndarray], np.ndarray]
    per_layer: bool = True


def leaves(config: model_lib.Config, kind: str) -> list[Leaf]:
    """The table of `kind`'s ("causal_lm" or "reward") params for `config`, in export order."""
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
        Leaf(("layers", "attn", "q", "kernel"), pre + "self_attn.q_proj.weight", *qkv(H)),
        Leaf(("layers", "attn", "k", "kernel"), pre + "self_attn.k_proj.weight", *qkv(K)),
        Leaf(("layers", "attn", "v", "kernel"), pre + "self_attn.v_proj.weight", *qkv(K)),
        Leaf(
            ("layers", "attn", "o", "kernel"),
            pre + "self_attn.o_proj.weight",
            lambda w: w.T.reshape(H, Dh, D),
            lambda k: k.reshape(H * Dh, D).T,
        ),
        Leaf(("layers", "mlp", "gate", "kernel"), pre + "mlp.gate_proj.weight", *transpose),
        Leaf(("layers", "mlp", "up", "kernel"), pre + "mlp.up_proj.weight", *transpose),
        Leaf(("layers", "mlp", "down", "kernel"), pre + "mlp.down_proj.weight", *transpose),
        Leaf(("layers", "attn_norm", "scale"), pre + "input_layernorm.weight", *same),
        Leaf(("layers", "mlp_norm", "scale"), pre + "post_attention_layernorm.weight", *same),
        Leaf(("embedding",), "model.embed_tokens.weight", *same, per_layer=False),
        Leaf(("final_norm", "scale"), "model.norm.weight", *same, per_layer=False),
    ]
    if c.qkv_bias:
        for name, heads in (("q", H), ("k", K), ("v", K)):
            hf_name = pre + f"self_attn.{name}_proj.bias"
            out.append(Leaf(("layers", "attn", name, "bias"), hf_name, *bias(heads)))
    if c.qk_norm:
        for name in ("q", "k"):
            hf_name = pre + f"self_attn.{name}_norm.weight"
            out.append(Leaf(("layers", "attn", f"{name}_norm", "scale"), hf_name, *same))
    if kind == "reward":
        out = [dataclasses.replace(leaf, path=("decoder", *leaf.path)) for leaf in out]
        out.append(
            Leaf(
                ("score",),
                "score.weight",
                lambda w: w.reshape(D),
                lambda s: s.reshape(1, D),
                per_layer=False,
            )
        )
    elif not c.tie_embeddings:
        out.append(Leaf(("lm_head",), "lm_head.weight", *transpose, per_layer=False))
    return out


def hf_names(leaf: Leaf, n_layers: int) -> list[str]:
    if leaf.per_layer:
        return [leaf.hf_name.format(i=i) for i in range(n_layers)]
    return [leaf.hf_name]


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def jax_shape(leaf: Leaf, hf_shape) -> tuple[int, ...] | None:
    """The jaxpost shape (of one layer) an HF tensor of `hf_shape` maps to (None if none)."""
    try:
        return tuple(
            jax.eval_shape(leaf.to_jax, jax.ShapeDtypeStruct(tuple(hf_shape), np.float32)).shape
        )
    except (TypeError, ValueError):
        return None


def hf_shape(leaf: Leaf, shape) -> tuple[int, ...]:
    """The HF shape of a jaxpost tensor (of one layer) of `shape`."""
    return tuple(jax.eval_shape(leaf.to_hf, jax.ShapeDtypeStruct(tuple(shape), np.float32)).shape)


def abstract_params(config: model_lib.Config, kind: str):
    """Shapes and dtypes of `kind`'s params for `config` (nothing allocated)."""
    module = model_lib.RewardModel(config) if kind == "reward" else model_lib.Decoder(config)
    boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32))
    return sharding.strip_boxes(boxed)["params"]
