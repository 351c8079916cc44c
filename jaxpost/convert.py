"""GGUF (llama.cpp) Llama-architecture files -> a Hugging Face directory jaxpost (and
transformers) can load: dequantised weights, config, and the tokenizer and chat template kept in
the GGUF metadata. No torch; the `gguf` package reads (memory-mapped) and dequantises, one tensor
at a time, streamed into (sharded) safetensors.

    jaxpost convert --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --out=models/smollm2

llama.cpp's converter reorders the rows of each head of the q and k projections (for its
interleaved rotary layout); `unpermute_rows` undoes that, so the result uses transformers'
`rotate_half` convention like every other jaxpost checkpoint.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from jaxpost import hf, safetensors_io

_TENSORS = {  # GGUF name (blk.{i}.) -> Hugging Face name (model.layers.{i}.)
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_BYTES = 16 * 2**20  # float32 rows dequantised at once
_CONTROL = 3  # llama.cpp token types: special (control) tokens, user-defined tokens
_USER_DEFINED = 4


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of a q/k projection `[n_heads * Dh, D]`: within each head, the
    rows of the two rotary halves are interleaved (row r of half h goes to 2r + h)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_rows`."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFError(ValueError):
    """A GGUF file jaxpost cannot convert; the message names the field or tensor."""


def _field(reader, name: str, default=None, *, where: str):
    field = reader.fields.get(name)
    if field is None:
        if default is None:
            raise GGUFError(f"{where}: metadata field {name!r} is missing")
        return default
    return field.contents()


def _tokenizer_json(tokens, merges, token_types, pre: str):
    """A Hugging Face byte-level BPE tokenizer from GGUF's gpt2-style vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=False))
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre in ("smollm", "starcoder", "refact"):  # digits one at a time, then GPT-2's regex
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif pre not in ("gpt-2", "default"):
        raise GGUFError(
            f"tokenizer.ggml.pre={pre!r} is not supported (gpt-2, smollm, starcoder, refact are)"
        )
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, t in enumerate(token_types) if t == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [tokens[i] for i, t in enumerate(token_types) if t == _USER_DEFINED]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def _dequantize(gguf, t, shape: tuple[int, ...], heads: int | None, where: str) -> np.ndarray:
    """GGUF tensor `t` as float32 of `shape`, dequantised a block of rows at a time into the
    result, so the intermediates stay small. For q/k projections (`heads` given) each block
    holds whole heads, whose rows are un-permuted in place."""
    out = np.empty(shape, np.float32)
    rows = out.reshape(-1, shape[-1])
    data = t.data.reshape(rows.shape[0], -1)  # one row of raw values or quantised blocks each
    group = rows.shape[0] // heads if heads else 1
    step = max(group, _BLOCK_BYTES // max(1, rows[0].nbytes) // group * group)
    for start in range(0, rows.shape[0], step):
        try:
            block = gguf.quants.dequantize(data[start : start + step], t.tensor_type)
        except NotImplementedError:
            raise GGUFError(
                f"{where}: tensor {t.name!r} uses {t.tensor_type.name}, which the gguf package "
                "cannot dequantise"
            ) from None
        block = np.asarray(block, np.float32).reshape(-1, shape[-1])
        rows[start : start + step] = unpermute_rows(block, len(block) // group) if heads else block
    return out


def convert(
    gguf_path: str, out: str, *, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30
) -> str:
    """Write the Hugging Face directory for a Llama-architecture GGUF file; returns `out`.

    Tensors are dequantised and written one at a time into files of at most `max_shard_bytes`
    (with `model.safetensors.index.json` when there are several), so memory holds about one
    float32 tensor, never the model."""
    import gguf

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite)")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as e:  # gguf raises several types for a corrupt file
        raise GGUFError(f"{gguf_path}: not a readable GGUF file ({e})") from None
    where = gguf_path
    arch = _field(reader, "general.architecture", where=where)
    if arch != "llama":
        raise GGUFError(f"{where}: general.architecture={arch!r}; only 'llama' is supported")
    heads = int(_field(reader, "llama.attention.head_count", where=where))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads, where=where))
    d_model = int(_field(reader, "llama.embedding_length", where=where))
    tokens = list(_field(reader, "tokenizer.ggml.tokens", where=where))
    n_layers = int(_field(reader, "llama.block_count", where=where))
    logging.getLogger("jaxpost").info(
        "converting %s: %d tensors, %d layers, dequantising to float32",
        gguf_path,
        len(reader.tensors),
        n_layers,
    )
    # Names and shapes first (for the files' headers); the values stream in when written.
    specs, sources = [], []
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if rest not in _TENSORS:
                raise GGUFError(f"{where}: tensor {t.name!r} has no Llama counterpart")
            name = f"model.layers.{i}.{_TENSORS[rest]}"
        elif t.name in _GLOBAL:
            name = _GLOBAL[t.name]
        elif t.name == "rope_freqs.weight":
            raise GGUFError(f"{where}: rope_freqs (Llama 3.1 RoPE scaling in GGUF) is unsupported")
        else:
            raise GGUFError(f"{where}: tensor {t.name!r} has no Llama counterpart")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest axis first
        specs.append(safetensors_io.Spec(name, np.dtype(np.float32), shape))
        permuted = {"q_proj.weight": heads, "k_proj.weight": kv_heads}  # llama.cpp's row order
        sources.append((t, next((n for k, n in permuted.items() if name.endswith(k)), None)))
    scaling = reader.fields.get("llama.rope.scaling.type")
    if scaling is not None and str(scaling.contents()) not in ("none", ""):
        raise GGUFError(f"{where}: llama.rope.scaling.type={scaling.contents()!r} is unsupported")
    rope_theta = float(_field(reader, "llama.rope.freq_base", 10000.0, where=where))
    head_dim = int(_field(reader, "llama.rope.dimension_count", d_model // heads, where=where))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": d_model,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length", where=where)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(
            _field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5, where=where)
        ),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(_field(reader, "llama.context_length", 4096, where=where)),
        "tie_word_embeddings": "lm_head.weight" not in {spec.name for spec in specs},
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    model = _field(reader, "tokenizer.ggml.model", where=where)
    if model != "gpt2":
        raise GGUFError(f"{where}: tokenizer.ggml.model={model!r}; only 'gpt2' (BPE) is supported")
    specials = {}
    for key in ("bos", "eos", "unknown", "padding"):
        i = reader.fields.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None:
            specials[key] = int(i.contents())
    tok = _tokenizer_json(
        tokens,
        list(_field(reader, "tokenizer.ggml.merges", where=where)),
        list(_field(reader, "tokenizer.ggml.token_type", where=where)),
        str(_field(reader, "tokenizer.ggml.pre", "gpt-2", where=where)),
    )
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False, where=where)),
        "model_max_length": config["max_position_embeddings"],
    }
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        if key in specials:
            tok_config[f"{name}_token"] = tokens[specials[key]]
    template = reader.fields.get("tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template.contents()
    config.update(
        bos_token_id=specials.get("bos"),
        eos_token_id=specials.get("eos"),
        pad_token_id=specials.get("padding"),
    )
    hf.config_from_hf(config, where)  # the same checks as any HF directory, before writing
    with safetensors_io.atomic_directory(out) as tmp:
        metadata = {"format": "pt"}
        with safetensors_io.ShardedWriter(
            tmp, specs, max_shard_bytes=max_shard_bytes, metadata=metadata
        ) as w:
            for spec, (t, n_heads) in zip(specs, sources, strict=True):
                w.write(spec.name, _dequantize(gguf, t, spec.shape, n_heads, where))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump(tok_config, f, indent=2, ensure_ascii=False)
        generation = {"bos_token_id": specials.get("bos"), "eos_token_id": specials.get("eos")}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(generation, f, indent=2)
        tok.save(os.path.join(tmp, "tokenizer.json"))
    return out
