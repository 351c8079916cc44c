"""Launchers: the gcloud / xpk / sbatch commands they would run, and the TPU launcher's restart
loop against a scripted gcloud (preempted -> recreated and resumed; failed -> reported)."""

import importlib.util
import io
import shlex

import pytest
from conftest import REPO


def _load(name):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu = _load("tpu")
cluster = _load("cluster")

BASE = ["--name=sft1", "--zone=us-east5-a", "--workdir=gs://b/runs/sft1",
        f"--config={REPO}/configs/sft.py:smoke"]  # fmt: skip


def _dry(argv):
    out = io.StringIO()
    g = tpu.Gcloud(dry_run=True, out=out)
    assert tpu.launch(tpu.parse_args([*argv, "--dry-run"]), g) == 0
    return out.getvalue(), [shlex.join(c) for c in g.commands]


def test_slice_shapes():
    assert tpu.slice_shape("v4-8") == ("v4", 4, 1)
    assert tpu.slice_shape("v5p-64") == ("v5p", 32, 8)
    assert tpu.slice_shape("v5litepod-16") == tpu.slice_shape("v5e-16") == ("v5e", 16, 4)
    assert tpu.slice_shape("v6e-8") == ("v6e", 8, 1)
    assert tpu.slice_shape("v6e-256") == ("v6e", 256, 64)
    with pytest.raises(ValueError, match="expected e.g. v4-32"):
        tpu.slice_shape("v5p64")


def test_single_host_on_demand_tpu_vm_dry_run():
    out, cmds = _dry([*BASE, "--accelerator=v5litepod-8", "--", "--config.train.num_steps=7"])
    assert "8 chips on 1 host(s)" in out and "on-demand, TPU VM" in out
    create = [c for c in cmds if " create " in c]
    assert create[0] == (
        "gcloud compute tpus tpu-vm create sft1 --zone=us-east5-a "
        "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"
    )
    train = [c for c in cmds if "jaxpost train" in c]
    assert len(train) == 1 and "--worker=all" in train[0] and "setsid nohup" in train[0]
    follow = [c for c in cmds if "tail -n" in c]
    assert len(follow) == 1 and "--worker=0" in follow[0] and "exit_status" in follow[0]
    assert "--config=configs/sft.py:smoke" in train[0]  # the path on the workers
    assert "--distributed" in train[0] and "--config.train.num_steps=7" in train[0]
    assert "--workdir=gs://b/runs/sft1" in train[0]
    assert any(" scp " in c and "--worker=all" in c for c in cmds)
    assert any("uv venv --python 3.11" in c and "jax[tpu]" in c for c in cmds)


def test_multi_host_spot_queued_resource_dry_run():
    out, cmds = _dry([*BASE, "--accelerator=v5p-64", "--spot", "--project=p1"])
    assert "32 chips on 8 host(s)" in out and "spot, queued resource" in out
    assert cmds[1] == (
        "gcloud compute tpus queued-resources create sft1 --node-id=sft1 --zone=us-east5-a "
        "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot --project=p1"
    )
    assert all(c.endswith("--project=p1") for c in cmds)
    # what the launcher does when the spot TPU is reclaimed
    after = cmds[cmds.index(next(c for c in cmds if "jaxpost train" in c)) + 1 :]
    assert any("queued-resources delete sft1 --force" in c for c in after)
    assert any("queued-resources create sft1" in c for c in after)


def test_delete_and_bad_input():
    out, cmds = _dry(["--name=sft1", "--zone=z", "--delete"])  # a queued resource (dry: found)
    assert cmds[-1] == "gcloud compute tpus queued-resources delete sft1 --force --zone=z --quiet"
    with pytest.raises(ValueError, match="gs:// path"):
        _dry([*BASE[:2], "--workdir=/tmp/x", BASE[3]])
    with pytest.raises(ValueError, match="outside"):
        _dry([*BASE[:3], "--config=/etc/x.py"])


class ScriptedGcloud(tpu.Gcloud):
    """A gcloud whose state answers and train exit statuses follow a script."""

    def __init__(self, states, train_status):
        super().__init__(dry_run=False)
        self.states, self.train_status = list(states), list(train_status)
        self.log = []

    def run(self, args, *, check=False):
        if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "jaxpost train" in args[-1]:
            self.log.append("start")
            return 0
        if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "tail -n" in args[-1]:
            self.log.append("follow")
            return self.train_status.pop(0)
        self.log.append(" ".join(args[2:4]))  # e.g. "queued-resources create"
        return 0

    def output(self, args, dry_answer=""):
        self.log.append("state")
        return self.states.pop(0)


def _scripted(monkeypatch, states, statuses, extra=()):
    g = ScriptedGcloud(states, statuses)
    monkeypatch.setattr(tpu.TpuJob, "stage", lambda self: g.log.append("stage"))  # no tarball
    args = tpu.parse_args([*BASE, "--accelerator=v5p-16", "--spot", "--poll-seconds=0", *extra])
    return tpu.launch(args, g), g.log


def test_a_preempted_tpu_is_recreated_and_the_job_rerun_until_it_completes(monkeypatch):
    rc, log = _scripted(
        monkeypatch,
        # absent; provisioning; ready | session dropped: reclaimed (x2) | deleting; gone;
        # recreated: ready
        [
            "NOT_FOUND",
            "WAITING_FOR_RESOURCES",
            "ACTIVE",
            "SUSPENDED",
            "SUSPENDED",
            "SUSPENDED",
            "DELETING",
            "NOT_FOUND",
            "ACTIVE",
        ],  # fmt: skip
        [tpu.SSH_LOST, 0],
    )
    assert rc == 0
    assert log == [
        "state", "queued-resources create", "state", "state", "stage", "start", "follow",
        "state",  # the session dropped: is the TPU up? SUSPENDED: no
        "state",  # after the job: SUSPENDED -> restart
        "state", "queued-resources delete", "state", "state",  # wait until it is gone
        "queued-resources create", "state", "stage", "start", "follow",
    ]  # fmt: skip


def test_a_dropped_session_on_a_healthy_tpu_follows_the_job_again(monkeypatch):
    rc, log = _scripted(monkeypatch, ["ACTIVE", "ACTIVE", "ACTIVE"], [tpu.SSH_LOST, 0])
    assert rc == 0 and log == ["state", "stage", "start", "follow", "state", "follow"]


def test_a_stopped_job_reruns_on_the_same_tpu_and_a_failed_one_is_reported(monkeypatch):
    rc, log = _scripted(monkeypatch, ["ACTIVE", "ACTIVE", "ACTIVE"], [tpu.PREEMPTED_EXIT, 0])
    assert rc == 0 and log == ["state", "stage", "start", "follow", "state", "state", "start",
                               "follow"]  # fmt: skip
    rc, log = _scripted(monkeypatch, ["ACTIVE", "ACTIVE"], [2])  # a config error: no retry loop
    assert rc == 2 and log.count("start") == 1
    rc, log = _scripted(monkeypatch, ["ACTIVE"] * 11, [75] * 4, ["--max-restarts=2"])
    assert rc == 75 and log.count("start") == 3


def test_xpk_command(capsys):
    argv = ["xpk", "--cluster=c1", "--workload=sft1", "--zone=us-east5-a", "--tpu-type=v5p-64",
            "--workdir=gs://b/r", "--config=configs/sft.py", "--dry-run", "--",
            "--config.train.num_steps=9"]  # fmt: skip
    assert cluster.main(argv) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[:3] == ["xpk", "workload", "create"]
    assert "--tpu-type=v5p-64" in cmd and "--num-slices=1" in cmd and "--max-restarts=50" in cmd
    command = next(c for c in cmd if c.startswith("--command="))
    assert "jaxpost train --distributed --config=configs/sft.py --workdir=gs://b/r" in command
    assert command.startswith("--command=pip install -q -e . 'jax[tpu]' && ")
    assert command.endswith("--config.train.num_steps=9")
    with pytest.raises(ValueError, match="gs:// workdir"):
        cluster.main([*argv[:5], "--workdir=/tmp/r", *argv[6:]])


def test_slurm_script(capsys):
    argv = ["slurm", "--nodes=2", "--gpus-per-node=8", "--workdir=/shared/r1",
            "--config=configs/sft.py", "--dry-run", "--", "--config.train.num_steps=9"]  # fmt: skip
    assert cluster.main(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --requeue\n" in script and "#SBATCH --signal=TERM@180" in script
    assert "\nsrun jaxpost train --distributed --config=configs/sft.py " in script
    assert "if [ $status -eq 75 ] || [ -f /shared/r1/stop.json ]; then" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
