"""Checkpoints: round trip of {state, data iterator}, exact resume, load_params."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import smoke_config

from jaxpost import checkpoint as ckpt
from jaxpost import model as model_lib
from jaxpost import optim, sharding
from jaxpost import step as step_lib
from jaxpost import train as train_lib
from jaxpost.data import pipeline
from jaxpost.data.tokenizer import ByteTokenizer


def test_round_trip_restores_state_and_data_position(tmp_path):
    config = smoke_config()
    model = model_lib.Decoder(model_lib.Config(**config.model))
    tx = optim.make_optimizer(config.optim, 10)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    examples, _ = pipeline.load_sft_examples(
        "builtin:arithmetic", "train", ByteTokenizer(), seq_len=32
    )

    def iterator():
        return pipeline.make_train_iterator(
            examples, seq_len=32, micro_batch=4, accum_steps=1, seed=3
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, shardings = step_lib.create_state(model, tx, mesh, seed=1, seq_len=32)
        it = iterator()
        for _ in range(5):
            next(it)
        manager = ckpt.make_manager(str(tmp_path), async_save=True)
        ckpt.save(manager, state, it, force=True)
        manager.wait_until_finished()
        expected_next = [next(it) for _ in range(3)]

        target = step_lib.abstract_state(shardings, model, tx, seq_len=32)
        restored, it2 = ckpt.restore(manager, target, iterator())
        manager.close()
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    for want in expected_next:
        got = next(it2)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])

    loaded = ckpt.load_params(str(tmp_path))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(loaded), strict=True):
        assert isinstance(b, np.ndarray)
        np.testing.assert_array_equal(np.asarray(a), b)


def _losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_resume_after_interruption_is_exact(tmp_path):
    """A run that dies after step 3 and resumes ends bit-identical to an uninterrupted run."""
    overrides = {
        "train.num_steps": 6,
        "checkpoint.every_steps": 3,
        "checkpoint.keep": 5,
        "eval.every_steps": 0,
        "log.every_steps": 1,
        "data.max_eval_examples": 16,
    }
    straight = tmp_path / "straight"
    train_lib.train(smoke_config(**overrides), str(straight))
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "6")  # as if the process died after saving step 3
    (resumed / "metrics.jsonl").write_text("")
    summary = train_lib.train(smoke_config(**overrides), str(resumed))
    assert summary["start_step"] == 3
    a, b = ckpt.load_params(str(straight)), ckpt.load_params(str(resumed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    want, got = _losses(straight), _losses(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == want[step]


def test_load_params_reports_missing_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoints"):
        ckpt.load_params(str(tmp_path))
