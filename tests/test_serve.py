"""`jaxpost export` and `jaxpost sample` on real runs: exported directories load back with the
run's exact weights and logits, also when two processes export it; sampling prints replies
through the chat template."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import cpu_env, free_port

from jaxpost import checkpoint, hf
from jaxpost import model as model_lib
from jaxpost.main import main

REPO = pathlib.Path(__file__).resolve().parents[1]
TOKENIZERS = REPO / "tests" / "fixtures" / "tokenizers"


LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # each new jit specialisation


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A short SFT run with evaluation, sampling and checkpoints interleaved; `events` records
    the log lines and every jit lowering (compilation or cache hit) in order."""
    workdir = tmp_path_factory.mktemp("serve") / "sft"
    events = []

    def lowered(event, duration, **kwargs):
        if event == LOWERED:
            events.append(("lowered", kwargs.get("fun_name", "")))

    class Lines(logging.Handler):
        def emit(self, record):
            events.append(("log", record.getMessage()))

    handler, logger = Lines(), logging.getLogger("jaxpost")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    jax.monitoring.register_event_duration_secs_listener(lowered)
    try:
        main(
            [
                "train",
                f"--config={REPO}/configs/sft.py:smoke",
                f"--workdir={workdir}",
                "--config.train.num_steps=6",
                "--config.eval.every_steps=2",
                "--config.checkpoint.every_steps=2",
                "--config.log.every_steps=1",
                "--config.data.max_eval_examples=8",
                '--config.eval.sample_prompts=["What is 2+3?", "Hi"]',
                "--config.eval.sample_max_tokens=5",
            ]
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(lowered)
        logger.removeHandler(handler)
        logger.setLevel(level)
    EVENTS[workdir] = events
    return workdir


EVENTS = {}  # sft_run's workdir -> its events


def test_training_logs_sample_replies_at_eval(sft_run):
    rows = [json.loads(line) for line in (sft_run / "samples.jsonl").read_text().splitlines()]
    # Before training, at every eval and at the end.
    assert [r["step"] for r in rows] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert [r["prompt"] for r in rows[:2]] == ["What is 2+3?", "Hi"]
    assert all(isinstance(r["reply"], str) for r in rows)


def test_nothing_compiles_after_the_first_steps_with_eval_sampling_and_checkpoints(sft_run):
    """Every jitted function of jaxpost (train step, eval step, sampler) is specialised by the
    first eval with sampling (step 2); steps 3-6 with two more evals, samples and checkpoints
    lower nothing new. (orbax slices replicated arrays eagerly at each save, `jit(slice)` in
    its replica-parallel writer: its own, counted apart.)"""
    events = EVENTS[sft_run]
    first = next(i for i, (kind, text) in enumerate(events) if text.startswith("eval at step 2"))
    assert any(kind == "lowered" for kind, _ in events[:first])
    later = [name for kind, name in events[first:] if kind == "lowered"]
    assert [name for name in later if name != "jit(slice)"] == [], later
    assert any(text.startswith("eval at step 6") for _, text in events[first:])


def test_export_cli_round_trips_the_run(sft_run, tmp_path, capsys):
    out = tmp_path / "hf"
    main(["export", f"--workdir={sft_run}", f"--out={out}"])
    config, params = hf.load_pretrained(str(out))
    saved = json.loads((sft_run / "config.json").read_text())
    assert config == model_lib.Config(**saved["model"])
    trained = checkpoint.load_params(str(sft_run))
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForCausalLM"] and hf_config["eos_token_id"] == 2
    with pytest.raises(FileExistsError, match="not empty"):
        main(["export", f"--workdir={sft_run}", f"--out={out}"])
    main(["export", f"--workdir={sft_run}", f"--out={out}", "--overwrite", "--dtype=bfloat16"])
    _, params16 = hf.load_pretrained(str(out))
    emb = np.asarray(trained["embedding"]).astype(jax.numpy.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params16["embedding"], emb)


def test_sample_cli_from_a_run(sft_run, capsys):
    summary = main(
        ["sample", f"--workdir={sft_run}", "--prompt=What is 2+3?", "--max_new_tokens=6"]
    )
    (reply,) = summary["replies"]
    assert isinstance(reply, str) and ">>> What is 2+3?" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--prompt TEXT"):
        main(["sample", f"--workdir={sft_run}"])


def test_sample_from_a_hugging_face_directory_with_its_chat_template(tmp_path):
    """A model exported with a real tokenizer directory (Llama 3 template): sampling renders
    the prompt with the template, stops at <|eot_id|>, and decodes without special tokens."""
    from jaxpost import sampling, serve
    from jaxpost.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZERS / "llama3"))
    config = model_lib.Config(
        vocab_size=768, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=64
    )
    params = model_lib.init_params(config)
    out = hf.save_pretrained(str(tmp_path / "m"), config, params, tokenizer_dir=str(tok.where))
    assert (pathlib.Path(out) / "tokenizer.json").exists()
    replies = serve.sample(["Hi there!"], hf_dir=out, max_new_tokens=5)
    prompt = tok.apply_chat_template([("user", "Hi there!")], add_generation_prompt=True)
    assert tok.decode(prompt, skip_special=False).endswith("<|end_header_id|>\n\n")
    ids = sampling.generate(config, params, [prompt], max_new_tokens=5, stop_ids=[tok.eos_id])
    assert replies == [tok.decode(ids[0])]
    with pytest.raises(ValueError, match="exactly one of"):
        serve.sample(["x"])


@pytest.mark.slow
def test_two_processes_export_what_one_process_exports(sft_run, tmp_path):
    """Two processes form one 8-device mesh, so each holds only part of every tensor: export
    gathers one tensor at a time across them and process 0 writes the same bytes as a
    one-process export."""
    one = tmp_path / "one"
    main(["export", f"--workdir={sft_run}", f"--out={one}"])
    two = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "jaxpost.main",
        "export",
        f"--workdir={sft_run}",
        f"--out={two}",
        "--distributed",
        f"--coordinator=127.0.0.1:{free_port()}",
        "--num_processes=2",
        "--init_timeout=60",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, f"--process_id={i}"],
            env=cpu_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert all("over 8 devices in 2 processes" in out for out in outs)
    files = sorted(os.listdir(one))
    assert sorted(os.listdir(two)) == files and "model.safetensors" in files
    for name in files:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]  # nothing partial left beside
    _, params = hf.load_pretrained(str(two))
    trained = checkpoint.load_params(str(sft_run))
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
