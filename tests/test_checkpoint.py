"""Checkpoints: round trip of {state, data iterator}, exact resume, load_params."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import smoke_config
from etils import epath

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
        it = pipeline.make_train_iterator(
            examples, seq_len=32, micro_batch=4, accum_steps=1, seed=3
        )
        return pipeline.ShardedIterator({0: it}, 1)

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


def test_a_data_position_saved_by_one_process_resumes_on_two_and_back(tmp_path):
    """Shards, not processes, hold the data position: two shards saved by one process are
    restored by two processes holding one shard each (and a checkpoint of grain's
    per-process files, from before shards, restores too)."""
    examples, _ = pipeline.load_sft_examples(
        "builtin:arithmetic", "train", ByteTokenizer(), seq_len=32
    )

    def shard(s, n=2):
        return pipeline.make_train_iterator(
            examples, seq_len=32, micro_batch=2, accum_steps=1, seed=3, process_index=s,
            process_count=n,
        )  # fmt: skip

    both = pipeline.ShardedIterator({0: shard(0), 1: shard(1)}, 2)
    for _ in range(3):
        next(both)
    handler = ckpt.ShardStates()
    directory = epath.Path(tmp_path)
    handler.save(directory, both)
    assert sorted(p.name for p in directory.iterdir()) == ["shard_0-of-2.json", "shard_1-of-2.json"]
    want = next(both)  # rows of shard 0, then of shard 1
    halves = [
        handler.restore(directory, pipeline.ShardedIterator({s: shard(s)}, 2)) for s in (0, 1)
    ]
    got = [next(h) for h in halves]
    for k in want:
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got], axis=1), want[k])

    legacy = epath.Path(tmp_path / "legacy")
    legacy.mkdir()
    for s in (0, 1):
        (legacy / f"process_{s}-of-2.json").write_text(
            (directory / f"shard_{s}-of-2.json").read_text()
        )
    again = handler.restore(legacy, pipeline.ShardedIterator({0: shard(0), 1: shard(1)}, 2))
    np.testing.assert_array_equal(next(again)["inputs"], want["inputs"])
    with pytest.raises(FileNotFoundError, match="no position for data shard 1 of 4"):
        handler.restore(directory, pipeline.ShardedIterator({1: shard(1, 4)}, 4))
