"""Evaluating a saved checkpoint is set up exactly as training sets up the same config."""

import json
import pathlib
import shutil

import pytest

from jaxpost import config as config_lib
from jaxpost import evaluation
from jaxpost import plan as plan_lib
from jaxpost import train as train_lib
from jaxpost import workdir as workdir_lib

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

    # A workdir written before config.json recorded the row layout still resumes (SFT rows
    # are next-token rows, as they always were).
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved.pop("_data_kind") == "sft"
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    plan = plan_lib.make_plan(config)
    workdir_lib.check_resume(str(tmp_path / "run"), plan.config, plan.objective.data_kind)


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
    run = tmp_path / "run"
    summary = train_lib.train(config, str(run))
    assert summary["eval_after"]["loss"] != pytest.approx(summary["eval_before"]["loss"])
    shutil.rmtree(run / "reference_logps")  # the run's own cache: evaluation must not rebuild it
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    got = evaluation.evaluate_checkpoint(config, str(run))
    assert got == pytest.approx(summary["eval_after"], rel=1e-6, abs=1e-7)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files  # nothing written there
    # The frozen reference (the frozen hook) is the same initial policy, run inside the step.
    config_lib.apply_overrides(config, ["objective.reference=frozen"])
    frozen = evaluation.evaluate_checkpoint(config, str(run))
    assert frozen == pytest.approx(summary["eval_after"], rel=1e-5, abs=1e-6)
