"""Evaluating a saved checkpoint is set up exactly as training sets up the same config."""

import pathlib

import pytest

from jaxpost import config as config_lib
from jaxpost import evaluation
from jaxpost import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf"


def _cfg(name, **overrides):
    config = config_lib.load_config(f"{REPO}/configs/{name}.py:smoke")
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config


def test_a_hugging_face_run_with_packing_is_evaluated_with_its_own_architecture(tmp_path):
    # The run takes its architecture from init.hf_dir (not the config's model section) and packs
    # several examples per row; evaluating its checkpoint must do the same and so reproduce the
    # run's final eval.
    config = _cfg(
        "sft",
        **{
            "init.hf_dir": str(FIXTURES / "llama"),
            "data.tokenizer": "byte",
            "data.packing": "first_fit",
            "data.max_segments_per_row": 4,
            "data.seq_len": 64,
            "train.num_steps": 2,
            "eval.every_steps": 0,
            "checkpoint.every_steps": 0,
        },
    )
    summary = train_lib.train(config, str(tmp_path / "run"))
    got = evaluation.evaluate_checkpoint(config, str(tmp_path / "run"))
    assert got == pytest.approx(summary["eval_after"], rel=1e-6)


def test_a_dpo_checkpoint_is_evaluated_against_the_configs_reference(tmp_path):
    # The precomputed reference (the prepare hook) comes from the config's initial params.
    config = _cfg(
        "dpo",
        **{
            "train.num_steps": 2,
            "eval.every_steps": 0,
            "checkpoint.every_steps": 0,
            "data.max_eval_examples": 16,
        },
    )
    summary = train_lib.train(config, str(tmp_path / "run"))
    assert summary["eval_after"]["loss"] != pytest.approx(summary["eval_before"]["loss"])
    before = set(p.name for p in (tmp_path / "run").iterdir())
    got = evaluation.evaluate_checkpoint(config, str(tmp_path / "run"))
    assert got == pytest.approx(summary["eval_after"], rel=1e-6, abs=1e-7)
    assert set(p.name for p in (tmp_path / "run").iterdir()) == before  # nothing written there
