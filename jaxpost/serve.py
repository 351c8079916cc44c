"""Using a trained run: export it as a Hugging Face directory, or sample from it.

    jaxpost export --workdir=runs/sft --out=exports/sft [--dtype=bfloat16]
    jaxpost sample --workdir=runs/sft --prompt "Sort: dcba"      # or --hf_dir=PATH

Both read the run's `config.json` (architecture, objective, tokenizer) and a checkpoint's params
(the latest, or `--step`), restored sharded over the devices (never whole on one host); export
gathers them one Hugging Face tensor at a time. `jaxpost export --distributed` runs on every host
of a multi-host job.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax

from jaxpost import checkpoint as ckpt
from jaxpost import hf, sampling, sharding
from jaxpost import model as model_lib
from jaxpost import step as step_lib
from jaxpost.data import pipeline
from jaxpost.data.tokenizer import ByteTokenizer

log = logging.getLogger("jaxpost")


def _run_config(workdir: str) -> dict:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{workdir} holds no config.json: it is not a jaxpost workdir")
    with open(path) as f:
        return json.load(f)


def tokenizer_dir(spec: str) -> str | None:
    """The directory of a tokenizer spec (None for the built-in byte tokenizer)."""
    if not spec or spec == "byte":
        return None
    path = os.path.expanduser(spec)
    return path if os.path.isdir(path) else os.path.dirname(path)


def params_target(
    model_config: model_lib.Config, kind: str, mesh: jax.sharding.Mesh | None = None, like=None
) -> Any:
    """A restore target: `kind`'s params as `jax.ShapeDtypeStruct`s with their training
    shardings over `mesh` (default: every device of every process on the `fsdp` axis), in
    the dtypes of `like` (a params tree of shapes, e.g. a checkpoint's) where it has the leaf."""
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = model_lib.RewardModel if kind == "reward" else model_lib.Decoder
    abstract = step_lib.abstract_params(model(model_config), mesh)
    dtypes = {}
    if like is not None:
        dtypes = {p: x.dtype for p, x in jax.tree_util.tree_flatten_with_path(like)[0]}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, dtypes.get(p, x.dtype), sharding=x.sharding),
        abstract,
    )


def load_run(
    workdir: str, step: int | None = None, mesh: jax.sharding.Mesh | None = None
) -> tuple[dict, model_lib.Config, str, Any]:
    """`(run config, model config, kind, params)` of a workdir's checkpoint. The params are
    restored sharded over `mesh` (see `params_target`), each process reading only its own
    shards: no tensor is whole on one device or host. Every process of a job must call it."""
    run = _run_config(workdir)
    model_config = model_lib.Config(**run["model"])
    saved = ckpt.params_shapes(workdir, step)
    # What the checkpoint holds decides (a reward model's params carry its score head), so
    # workdirs of any jaxpost version export alike.
    kind = "reward" if "score" in saved else "causal_lm"
    target = params_target(model_config, kind, mesh, like=saved)
    return run, model_config, kind, ckpt.restore_params(workdir, target, step)


def export(
    workdir: str,
    out: str,
    *,
    step: int | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write a run's checkpoint as a Hugging Face directory (tokenizer files copied). The params
    stay sharded over the devices and are gathered one HF tensor at a time
    (`hf.save_pretrained`); in a multi-process job every process calls this, process 0 writes."""
    run, model_config, kind, params = load_run(workdir, step)
    log.info(
        "exporting %s: params restored over %d devices in %d processes",
        workdir,
        len(jax.devices()),
        jax.process_count(),
    )
    if kind == "reward" and "_data_kind" not in run:
        log.warning(
            "%s was trained by an earlier jaxpost that read rewards one token before the end of "
            "each sequence; transformers reads them at the last token, so its scores of the "
            "export will differ from the training-time rewards",
            workdir,
        )
    tok_dir = tokenizer_dir(run.get("data", {}).get("tokenizer", "byte"))
    extra = {}
    if tok_dir is None:
        tok = ByteTokenizer()
        # No Hugging Face tokenizer files exist for the built-in tokenizer; its ids still go
        # into config.json so that the model's special tokens are known.
        extra = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return hf.save_pretrained(
        out,
        model_config,
        params,
        tokenizer_dir=tok_dir,
        kind=kind,
        dtype=dtype,
        overwrite=overwrite,
        extra_config=extra,
    )


def stop_ids(tok, directory: str | None = None) -> list[int]:
    """Token ids that end a reply: EOS, the byte tokenizer's end of turn, and the
    eos_token_id(s) of generation_config.json when there is one."""
    ids = {tok.eos_id}
    if getattr(tok, "end_of_turn_id", None) is not None:
        ids.add(tok.end_of_turn_id)
    if directory and os.path.exists(os.path.join(directory, "generation_config.json")):
        with open(os.path.join(directory, "generation_config.json")) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None)


def reply(
    model_config: model_lib.Config,
    params,
    tok,
    prompts: Sequence[str],
    *,
    tokenizer_spec: str = "byte",
    chat: bool = True,
    **sampling_kwargs,
) -> list[str]:
    """Decoded completions of `prompts`: each a user message through the chat template (or raw
    text with `chat=False`), stopping at the tokenizer's end-of-reply ids. `sampling_kwargs` go
    to `jaxpost.sampling.generate` (max_new_tokens, temperature, top_k, top_p, seed)."""
    ids = [
        tok.apply_chat_template([("user", p)], add_generation_prompt=True)
        if chat
        else list(tok.prefix_ids) + tok.encode(p)
        for p in prompts
    ]
    stops = stop_ids(tok, tokenizer_dir(tokenizer_spec))
    outs = sampling.generate(model_config, params, ids, stop_ids=stops, **sampling_kwargs)
    return [tok.decode(o) for o in outs]


def sample(
    prompts: Sequence[str],
    *,
    workdir: str | None = None,
    hf_dir: str | None = None,
    step: int | None = None,
    chat: bool = True,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Completions of `prompts` from a run's checkpoint or a Hugging Face directory."""
    if (workdir is None) == (hf_dir is None):
        raise ValueError("give exactly one of --workdir and --hf_dir")
    if workdir is not None:
        run, model_config, kind, params = load_run(workdir, step)
        data_config = run.get("data", {})
    else:
        model_config, kind = hf.read_config(hf_dir)
        params = None
        if kind == "causal_lm":
            target = params_target(model_config, kind)
            params = hf.load_params(hf_dir, model_config, kind, target=target)
        data_config = {"tokenizer": hf_dir}
    if kind != "causal_lm":
        raise ValueError("this is a reward model; it scores text but does not generate any")
    tok = pipeline.make_tokenizer(data_config)
    return reply(
        model_config,
        params,
        tok,
        prompts,
        tokenizer_spec=data_config.get("tokenizer") or "byte",
        chat=chat,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
