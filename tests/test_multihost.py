"""Two processes on localhost form one 8-device mesh (4 CPU devices each): the same run as one
process with 8 devices, per-process data shares and iterator files; a missing peer fails fast."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, cpu_env, free_port

from jaxpost import checkpoint as ckpt

SMOOTH = ["--config.optim.eps=1.0", "--config.optim.lr=0.1", "--config.optim.warmup_steps=0"]
COMMON = [
    "--config.train.num_steps=4",
    "--config.checkpoint.every_steps=2",
    "--config.log.every_steps=1",
    "--config.data.max_eval_examples=16",
    "--config.log.tensorboard=false",
    *SMOOTH,
]


def _cli(workdir, extra=(), config="sft"):
    return [
        sys.executable,
        "-m",
        "jaxpost.main",
        "train",
        f"--workdir={workdir}",
        f"--config={REPO}/configs/{config}.py:smoke",
        *COMMON,
        *extra,
    ]


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("config", ["dpo"])  # the loop, and the precomputed reference too
def test_two_processes_match_one_process(tmp_path, config):
    single = tmp_path / "single"
    subprocess.run(
        _cli(single, config=config), env=cpu_env(8), check=True, capture_output=True, timeout=300
    )

    multi = tmp_path / "multi"
    port = free_port()
    procs = [
        subprocess.Popen(
            _cli(
                multi,
                [
                    "--distributed",
                    f"--coordinator=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                    "--init_timeout=60",
                ],
                config=config,
            ),
            env=cpu_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]

    data_files = sorted(f for f in os.listdir(multi / "checkpoints" / "4" / "data") if "shard" in f)
    assert data_files == ["shard_0-of-2.json", "shard_1-of-2.json"]
    # The same global batches (rows in another order): equal losses and parameters up to
    # float32 summation order.
    a, b = _losses(single), _losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        np.testing.assert_allclose(b[step], a[step], rtol=1e-5)
    if config == "dpo":  # one reference pass each, under the same cache key (same params)
        names = [sorted(os.listdir(w / "reference_logps")) for w in (single, multi)]
        assert names[0] == names[1] and len(names[0]) == 2
        for name in names[0]:
            np.testing.assert_allclose(
                np.load(multi / "reference_logps" / name),
                np.load(single / "reference_logps" / name),
                rtol=1e-5,
            )
    pa, pb = ckpt.load_params(str(single)), ckpt.load_params(str(multi))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)

    # The two-process run's step-2 checkpoint resumed by ONE process (8 devices): it reads both
    # data shards, and steps 3 and 4 are the two-process run's steps 3 and 4.
    resumed = tmp_path / "resumed"
    shutil.copytree(multi, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    out = subprocess.run(
        _cli(resumed, config=config), env=cpu_env(8), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed at step 2" in out.stderr
    c = _losses(resumed)
    assert sorted(c) == [1, 2, 3, 4] and c[1] == b[1] and c[2] == b[2]
    np.testing.assert_allclose([c[3], c[4]], [b[3], b[4]], rtol=1e-6)
    pc = ckpt.load_params(str(resumed))
    for x, y in zip(jax.tree.leaves(pb), jax.tree.leaves(pc), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


def _start_two(workdir, extra=()):
    port = free_port()
    flags = ["--distributed", f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]
    return [
        subprocess.Popen(
            _cli(workdir, [*flags, f"--process_id={i}", "--init_timeout=60", *extra]),
            env=cpu_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step_and_the_rerun_resumes(
    tmp_path,
):
    """JAX's preemption sync: the notice reaches one host; every host saves the same step and
    exits 75 (none waits in a collective for one that left); the job resumes -- here on one
    process (capacity came back smaller), which reads both processes' data shards."""
    long = ["--config.train.num_steps=500", "--config.checkpoint.every_steps=0"]
    procs = _start_two(tmp_path, long)
    lines = []
    for line in procs[0].stdout:  # process 0 logs the steps
        lines.append(line)
        if "step 3/500" in line:
            procs[1].send_signal(signal.SIGTERM)
            break
    outs = ["".join(lines) + procs[0].communicate(timeout=120)[0], procs[1].communicate(120)[0]]
    assert [p.returncode for p in procs] == [75, 75], outs[0][-2000:] + outs[1][-2000:]
    stop = json.loads((tmp_path / "stop.json").read_text())
    assert "preemption notice" in stop["reason"] and 3 <= stop["step"] < 500
    assert ckpt.saved_steps(str(tmp_path)) == [stop["step"]]

    out = subprocess.run(
        _cli(tmp_path, ["--config.train.num_steps=" + str(stop["step"] + 1)]),
        env=cpu_env(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed at step {stop['step']}" in out.stderr and "stopped there on" in out.stderr
    assert ckpt.saved_steps(str(tmp_path))[-1] == stop["step"] + 1
    assert not (tmp_path / "stop.json").exists()


def test_a_missing_peer_fails_instead_of_hanging(tmp_path):
    t0 = time.time()
    result = subprocess.run(
        _cli(
            tmp_path,
            [
                "--distributed",
                f"--coordinator=127.0.0.1:{free_port()}",
                "--num_processes=2",
                "--process_id=0",
                "--init_timeout=5",
            ],
        ),
        env=cpu_env(4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert time.time() - t0 < 100
