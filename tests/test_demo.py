"""A reduced run of the built-in demo (SFT -> RM -> DPO): every stage must learn."""

import os

import pytest

from jaxpost import demo


@pytest.mark.slow
def test_reduced_demo_learns_in_every_stage(tmp_path, capsys):
    result = demo.run(str(tmp_path), quick=True)
    task = result["task_exact_match"]
    assert task["after_sft"] > task["before"] + 0.1
    assert result["rm_pairwise_accuracy"]["after"] >= 0.75  # chance is 0.5
    dpo = result["dpo_reward_accuracy"]
    assert dpo["after"] >= 0.75 and dpo["after"] > dpo["before"]
    assert task["after_dpo"] >= task["after_sft"]
    assert os.path.getsize(result["plot"]) > 10_000
    out = capsys.readouterr().out
    assert "task exact match, DPO" in out and "reward model pairwise accuracy" in out
