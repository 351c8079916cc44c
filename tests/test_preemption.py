"""Runs that are killed or told to stop: nothing lost, nothing repeated, the same result.

The integration tests run `tools/soak.py`'s short version: `jaxpost train` killed at chosen
moments and restarted with the same command must end with bit-identical parameters and the same
metrics.jsonl as an uninterrupted run.
"""

import json
import sys
import time

import pytest
from conftest import REPO, cpu_env

from jaxpost import checkpoint as ckpt
from jaxpost import metrics as metrics_lib
from jaxpost import preemption

sys.path.insert(0, str(REPO / "tools"))
import soak  # noqa: E402


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_resumed_run_drops_the_metrics_it_redoes_and_never_logs_a_step_twice(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in range(0, 9)] + [{"step": 5, "eval/loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')  # cut off

    writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False, start=5)
    assert writer.redone == 8
    writer.write(5, {"loss": 99.0, "eval/loss": 99.0, "data/train_records": 3.0})  # 5 is there
    writer.write(6, {"loss": 6.5})
    writer.close()
    got = _rows(path)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4, 5, 5, 5, 6]
    assert got[-2] == {"step": 5, "data/train_records": 3.0}  # only what step 5 did not hold
    assert got[-1] == {"step": 6, "loss": 6.5} and got[5] == {"step": 5, "loss": 5.0}

    # a run that starts over (no checkpoint was saved) redoes everything
    writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False, start=0)
    assert writer.redone == 6
    writer.write(0, {"loss": 0.5})
    writer.close()
    assert _rows(path) == [{"step": 0, "loss": 0.5}]


def test_checkpoints_are_due_by_steps_and_by_minutes_since_the_run_started(tmp_path):
    by_steps = ckpt.make_manager(str(tmp_path / "a"), every_steps=4)
    assert [s for s in range(1, 13) if by_steps.should_save(s)] == [4, 8, 12]
    never = ckpt.make_manager(str(tmp_path / "b"), every_steps=0, every_minutes=0)
    assert not any(never.should_save(s) for s in range(1, 13))
    by_time = ckpt.make_manager(str(tmp_path / "c"), every_steps=0, every_minutes=1 / 60)
    every = ckpt.CHECK_MINUTES_EVERY  # (the clock is read at every 10th step only)
    assert not by_time.should_save(every)  # the clock starts with this run, not at once
    time.sleep(1.1)
    assert not by_time.should_save(every + 1) and by_time.should_save(2 * every)
    # A resumed run whose last checkpoint is old: its clock starts now too, not at that save.
    by_steps.save(4, args=_args(), force=True)
    by_steps.wait_until_finished()
    time.sleep(1.1)
    resumed = ckpt.make_manager(str(tmp_path / "a"), every_steps=0, every_minutes=1 / 60)
    assert resumed.latest_step() == 4 and not resumed.should_save(every)
    time.sleep(1.1)
    assert resumed.should_save(2 * every)
    for m in (by_steps, never, by_time, resumed):
        m.close()


def _args():
    import numpy as np
    import orbax.checkpoint as ocp

    tree = {"w": np.zeros(2)}
    return ocp.args.Composite(params=ocp.args.StandardSave(tree), train=ocp.args.StandardSave(tree))


def test_a_stop_signal_before_the_loop_stops_at_once_and_in_the_loop_at_a_step():
    import os
    import signal

    stop = preemption.StopSignal()
    try:
        with pytest.raises(preemption.Preempted, match="stopped on SIGTERM; rerun"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs between bytecodes
        stop.reason, stop.deferred = None, True
        assert not stop.reached()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop.reached() and stop.reason == "SIGTERM"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


COMMON = [
    "--config.log.every_steps=1",
    "--config.log.tensorboard=false",
    "--config.data.max_eval_examples=8",
    "--config.checkpoint.every_steps=3",
    "--config.eval.every_steps=4",
]


@pytest.mark.slow
def test_killed_and_restarted_runs_end_bit_identical(tmp_path):
    """DPO with its precomputed reference: killed while a checkpoint is written, told to stop
    (SIGTERM: exit 75 with that step saved); restarted each time, it ends with the uninterrupted
    run's parameters, bit for bit, and its metrics. (Kills in the reference pass: the longer
    soak in the note; its resume from finished chunks: tests/test_reference.py.)"""
    env = cpu_env(8)
    # Its own compilation cache: a process killed while writing one leaves an entry that makes
    # jax's cache eviction fail on every later write (jax/_src/lru_cache.py), which would slow
    # the rest of the suite.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "xla_cache")
    kinds = ("save", "term")
    result = soak.soak(
        f"{REPO}/configs/dpo.py:smoke",
        tmp_path,
        ["--config.train.num_steps=10", *COMMON],
        kills=len(kinds),
        kinds=kinds,
        seed=1,
        timeout=300,
        env=env,
    )
    assert result["kills"] == len(kinds), result["events"]
    assert [e["kind"] for e in result["events"][:2]] == list(kinds)
    assert result["final_steps"] == [10, 10]
    assert result["params_identical"], result
    assert result["metrics_identical"], result
    assert result["clean"], result["leftovers"]
    term = result["events"][1]
    assert term["exit"] == preemption.PREEMPTED_EXIT, term
    log = (tmp_path / "killed.log").read_text()
    assert "reference log-probs" in log and "resumed at step" in log
