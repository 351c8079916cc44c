"""Run configs: the schema every config file starts from, loading `path:arg`, and overrides.

A config file defines `get_config(arg=None)` returning a ConfigDict built from `base_config()`.
`check_config` rejects unknown or missing keys (with a suggestion) before any work starts, so a
typo like `optim.learning_rate` never silently does nothing.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from jaxpost import model as model_lib


def base_config() -> ml_collections.ConfigDict:
    """Every key a run reads, with defaults. Sections mirror the modules."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # The architecture (jaxpost.model.Config's fields) plus how it computes:
    #   model.dtype: activations and matmuls; "auto" = bfloat16 on GPUs and TPUs, float32 on CPU.
    #   model.param_dtype: the stored params and optimizer state -- the master weights. The
    #     default float32 with bf16 compute is mixed precision (the default on accelerators);
    #     param_dtype=bfloat16 is pure-bf16 training: no float32 master copy, so updates smaller
    #     than a bf16 step of a weight are lost. Logits and rewards are float32 either way.
    c.model = model_section("smoke")
    c.data = dict(
        # JSONL or Parquet path/glob, tfds:NAME[:SPLIT], builtin:NAME; path@weight,... mixes;
        # path[:90%] slices
        train_path="builtin:arithmetic",
        eval_path="builtin:arithmetic",  # '' = no eval
        tfds_data_dir="~/tensorflow_datasets",  # where tfds:NAME datasets live
        # "byte" (built-in), or a Hugging Face tokenizer directory / tokenizer.json / a
        # SentencePiece .model; conversations use its Jinja chat template. '' = init.hf_dir's
        # tokenizer if set, else "byte"
        tokenizer="",
        # assistant tokens of a chat template: auto (its {% generation %} markers if it has
        # them, else prefix) | generation | prefix (see jaxpost.data.chat_template)
        assistant_mask="auto",
        chat_template_kwargs="",  # JSON object the template also sees, e.g. {"date_string": ...}
        seq_len=32,
        truncation="keep_start",  # keep_start | keep_end | drop (for too-long examples)
        max_eval_examples=0,  # 0 = the whole eval split
        num_workers=0,  # grain worker processes; 0 = in the main process
        skip_invalid=False,  # skip (and count) invalid records instead of stopping
        packing="none",  # none | first_fit | best_fit: several examples (or pairs) per row
        max_segments_per_row=16,  # with packing: at most this many examples (pairs) per row
        packing_bins=64,  # with packing: rows filled at a time (more = less padding)
    )
    c.objective = dict(
        name="sft",  # sft | rm | dpo | simpo | orpo
        # sft, dpo, simpo, orpo: >0 computes log-probs over this many positions at a time, never
        # holding the [batch, length, vocab] logits (for large vocabularies); 0 = full logits;
        # -1 = auto: 512 on GPU/TPU when one row's float32 logits exceed 128 MiB, else 0
        logits_chunk_size=-1,
        # dpo: TRL DPOTrainer's names and meanings (jaxpost.losses.dpo_loss)
        loss_type="sigmoid",  # one name, or several comma-separated (e.g. "sigmoid,sft")
        loss_weights="",  # comma-separated, one per loss type; '' = all 1.0
        beta=0.1,
        label_smoothing=0.0,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        discopop_tau=0.05,
        reference="precomputed",  # precomputed | frozen
        reference_cache_dir="",  # '' = WORKDIR/reference_logps; share it across a sweep
        simpo_gamma=0.5,  # simpo: target reward margin (beta is objective.beta, e.g. 2.0)
        # rm
        center_rewards_coefficient=0.0,
        # rm, dpo, simpo, orpo: one encoding of each pair's common prompt -- a pair is one span
        # of a packed row of 2 x data.seq_len tokens (prompt, chosen, rejected), so it costs
        # prompt + 2 completions instead of 2 x (prompt + completion). Needs data.packing and
        # an attention kernel with masks (blockwise, xla, cudnn; not splash)
        shared_prompt=False,
    )
    c.init = dict(
        # a Hugging Face model directory: its architecture replaces model.* (except dtype,
        # param_dtype, remat), its tokenizer is the default data.tokenizer, and its weights
        # start training unless init.workdir is also set
        hf_dir="",
        workdir="",  # start from the params of this run's checkpoint (e.g. an SFT workdir)
        step=-1,  # -1 = its latest checkpoint
    )
    c.optim = dict(
        lr=1e-3,
        warmup_steps=10,
        decay="cosine",  # cosine | linear | constant
        final_lr_fraction=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        clip_grad_norm=1.0,  # 0 disables clipping
    )
    c.train = dict(
        num_steps=100,
        global_batch=16,  # sequences per optimizer step, over all hosts and micro-batches
        accum_steps=1,  # micro-batches per step (gradient accumulation)
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: the remaining devices
    c.eval = dict(
        every_steps=50,  # 0: only before and after training
        batch_size=16,
        # SFT/DPO-family runs: a JSON list of user messages whose greedy replies are logged at
        # every eval (and appended to WORKDIR/samples.jsonl), e.g. '["Who are you?"]'
        sample_prompts="",
        sample_max_tokens=48,
    )
    c.checkpoint = dict(
        every_steps=50,  # 0: none by step count (still every_minutes, on a stop, at the end)
        every_minutes=30.0,  # also when this long has passed since the last save; 0: off
        keep=2,
        async_save=True,
    )
    c.log = dict(
        every_steps=10,
        peak_flops_per_device=0.0,  # 0 = look up the device kind (CPU: measured at start)
        tensorboard=True,
    )
    c = ml_collections.ConfigDict(c)
    c.lock()  # config files may change fields, not invent them
    return c


def model_section(preset: str, **overrides) -> dict[str, Any]:
    """A config's `model` section from a `jaxpost.model` preset, computing in `dtype="auto"`
    (bfloat16 on accelerators, float32 on CPU) with float32 params unless overridden."""
    return {**dataclasses.asdict(model_lib.preset(preset)), "dtype": "auto", **overrides}


def _keys(c: Any, prefix: str = "") -> set[str]:
    out = set()
    for k, v in c.items():
        out.add(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out |= _keys(v, prefix + k + ".")
    return out


def _suggest(key: str, known: set[str]) -> str:
    """' (did you mean X?; SECTION has: ...)' for an unknown dotted key."""
    section, _, _ = key.rpartition(".")
    siblings = sorted(k for k in known if k.rpartition(".")[0] == section)
    leaf = key.rpartition(".")[2]
    initials = "".join(w[:1] for w in leaf.split("_"))  # learning_rate -> lr
    close = [k for k in siblings if k.rpartition(".")[2] == initials]
    close = close or difflib.get_close_matches(key, siblings or known, n=1, cutoff=0.3)
    parts = [f"did you mean {close[0]!r}?"] if close else []
    if siblings:
        parts.append(
            f"{section or 'the config'} has: " + ", ".join(k.rpartition(".")[2] for k in siblings)
        )
    return f" ({'; '.join(parts)})" if parts else ""


def check_config(config: ml_collections.ConfigDict, source: str = "config") -> None:
    """Raise ValueError naming every unknown or missing key (with close matches)."""
    have, want = _keys(config), _keys(base_config())
    problems = []
    for key in sorted(have - want):
        problems.append(f"unknown key {key!r}{_suggest(key, want)}")
    for key in sorted(want - have):
        problems.append(f"missing key {key!r}")
    if problems:
        raise ValueError(f"Invalid config from {source}: " + "; ".join(problems))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/file.py[:arg]` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist (from --config={spec}).")
    module_spec = importlib.util.spec_from_file_location(
        "jaxpost_config_" + os.path.basename(path).removesuffix(".py"), path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"Config file {path!r} defines no get_config(arg=None).")
    config = module.get_config(arg or None)
    check_config(config, source=spec)
    return config


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError(f"--config.{key}={text}: expected true or false")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(
            f"--config.{key}={text}: cannot parse as {type(current).__name__}"
        ) from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(
            f"--config.{key}={text}: expected {type(current).__name__}, got {type(value).__name__}"
        )
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `a.b=value` overrides in place; unknown keys raise with a suggestion."""
    known = _keys(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--config.{item}: expected --config.KEY=VALUE")
        if key not in known:
            raise ValueError(f"--config.{key}: no such config key{_suggest(key, known)}")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ValueError(f"--config.{key} is a section; set one of its fields instead")
        with config.unlocked():
            node[leaf] = _parse_value(text, node[leaf], key)
