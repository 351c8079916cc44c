#!/usr/bin/env python3
"""Run a jaxpost training job on Cloud TPU until it completes, through preemptions.

    python launch/tpu.py --name=sft1 --zone=us-east5-a --accelerator=v5p-64 --spot \\
        --workdir=gs://bucket/runs/sft1 --config=configs/sft.py -- --config.train.num_steps=2000
    python launch/tpu.py ... --dry-run     # print every gcloud command, run nothing
    python launch/tpu.py --name=sft1 --zone=us-east5-a --delete  # tear down (either kind)

One command: creates the TPU -- a queued resource (`--queued`, the default for `--spot`; spot
or on-demand) or a plain TPU VM (`--no-queued`) -- waits until it is ready, copies this checkout
to every worker, installs it with `jax[tpu]`, and runs `jaxpost train --distributed` on all
workers at once (jax.distributed finds the hosts by itself), streaming worker 0's log (process 0
logs; the others only warn). The workers install Python 3.11 through uv (TPU images may have an
older one). When the job ends:

* exit 0: done (the TPU is deleted with `--delete-when-done`);
* the TPU was preempted (spot reclaimed, queued resource SUSPENDED/FAILED, VM PREEMPTED or gone):
  it is deleted, created again, and the job rerun: it resumes from its gs:// workdir;
* exit 75 (jaxpost stopped on SIGTERM / a maintenance notice, checkpoint saved): the job is
  started again on the same TPU; a dropped ssh session with the TPU still READY: the launcher
  follows the job's log again (the job runs detached on the workers, `setsid nohup`, so neither
  a dropped session nor gcloud retrying a command kills or doubles it);
* any other exit status (a config error, a crash) on a healthy TPU: stop and report it.

Up to `--max-restarts` restarts. WORKDIR must be a gs:// path (every host writes it, and it
outlives the TPU). Only the Python standard library is needed here; `gcloud` must be installed
and logged in.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREEMPTED_EXIT = 75  # jaxpost.preemption.PREEMPTED_EXIT
SSH_LOST = 255  # ssh's status when the connection dropped
# Default TPU VM software per generation (Cloud TPU docs, "TPU software versions").
RUNTIMES = {
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
GCLOUD_TYPES = {"v4": "v4", "v5e": "v5litepod", "v5p": "v5p", "v6e": "v6e"}
READY = {"READY", "ACTIVE"}
GONE = {"PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED", "TERMINATED", "NOT_FOUND"}
# (DELETING and provisioning states are waited out)


def slice_shape(accelerator: str) -> tuple[str, int, int]:
    """`(generation, chips, hosts)` of an accelerator type such as v5p-64 (v4/v5p names count
    TensorCores, two per chip), v5litepod-16 / v5e-16 or v6e-256 (chips); 4 chips per host,
    except single-host v5e/v6e slices of up to 8 chips."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator)
    if not m:
        raise ValueError(
            f"--accelerator={accelerator!r}: expected e.g. v4-32, v5p-64, v5litepod-16 (v5e-16) "
            "or v6e-256"
        )
    gen = "v5e" if m[1] == "v5litepod" else m[1]
    count = int(m[2])
    chips = count // 2 if gen in ("v4", "v5p") else count
    if gen in ("v4", "v5p"):
        hosts = max(1, chips // 4)
    else:
        hosts = 1 if chips <= 8 else chips // 4
    return gen, chips, hosts


class Gcloud:
    """Runs (or, dry, prints) gcloud commands; `dry_states` answers state queries in a dry run."""

    def __init__(self, dry_run: bool, project: str = "", out=sys.stdout):
        self.dry_run, self.project, self.out = dry_run, project, out
        self.commands: list[list[str]] = []

    def _cmd(self, args: list[str]) -> list[str]:
        return ["gcloud", *args, *([f"--project={self.project}"] if self.project else [])]

    def run(self, args: list[str], *, check: bool = False) -> int:
        cmd = self._cmd(args)
        self.commands.append(cmd)
        if self.dry_run:
            print(shlex.join(cmd), file=self.out)
            return 0
        print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if check and rc != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed with status {rc}")
        return rc

    def output(self, args: list[str], dry_answer: str = "", tries: int = 5) -> str:
        """A describe command's output; "NOT_FOUND" when gcloud says the resource does not
        exist. Other failures (an expired token, the network) are retried, then raised."""
        cmd = self._cmd(args)
        self.commands.append(cmd)
        if self.dry_run:
            print(shlex.join(cmd), file=self.out)
            return dry_answer
        for attempt in range(tries):
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                return result.stdout.strip()
            if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
                return "NOT_FOUND"
            time.sleep(min(60, 5 * 2**attempt))
        raise RuntimeError(f"{shlex.join(cmd)} keeps failing: {result.stderr.strip()[-500:]}")


class TpuJob:
    def __init__(self, args, gcloud: Gcloud):
        self.a, self.g = args, gcloud
        self.gen, self.chips, self.hosts = slice_shape(args.accelerator)
        self.runtime = args.runtime or RUNTIMES[self.gen]
        self.accelerator = GCLOUD_TYPES[self.gen] + "-" + args.accelerator.split("-")[1]
        self.queued = args.queued if args.queued is not None else args.spot
        self.zone = [f"--zone={args.zone}"]

    # --- the TPU ---
    def state(self, dry_answer: str) -> str:
        if self.queued:
            args = ["compute", "tpus", "queued-resources", "describe", self.a.name]
            fmt = "--format=value(state.state)"
        else:
            args = ["compute", "tpus", "tpu-vm", "describe", self.a.name]
            fmt = "--format=value(state)"
        return self.g.output([*args, *self.zone, fmt], dry_answer) or "NOT_FOUND"

    def create(self) -> None:
        kind = ["--spot"] if self.a.spot else []
        if self.queued:
            self.g.run(
                [
                    "compute",
                    "tpus",
                    "queued-resources",
                    "create",
                    self.a.name,
                    f"--node-id={self.a.name}",
                    *self.zone,
                    f"--accelerator-type={self.accelerator}",
                    f"--runtime-version={self.runtime}",
                    *kind,
                ],  # fmt: skip
                check=True,
            )
        else:
            self.g.run(
                [
                    "compute",
                    "tpus",
                    "tpu-vm",
                    "create",
                    self.a.name,
                    *self.zone,
                    f"--accelerator-type={self.accelerator}",
                    f"--version={self.runtime}",
                    *kind,
                ],  # fmt: skip
                check=True,
            )

    def delete(self, queued: bool | None = None) -> None:
        queued = self.queued if queued is None else queued
        if queued:
            args = ["compute", "tpus", "queued-resources", "delete", self.a.name, "--force"]
        else:
            args = ["compute", "tpus", "tpu-vm", "delete", self.a.name]
        self.g.run([*args, *self.zone, "--quiet"])

    def delete_any(self) -> None:
        """`--delete`: the queued resource of that name if there is one (with its TPU), else
        the TPU VM, whichever way it was created."""
        args = ["compute", "tpus", "queued-resources", "describe", self.a.name, *self.zone,
                "--format=value(state.state)"]  # fmt: skip
        self.delete(queued=self.g.output(args, "ACTIVE") != "NOT_FOUND")

    def wait_ready(self) -> str:
        """Wait while the TPU is provisioned (or deleted); its state once READY/ACTIVE or gone."""
        deadline = time.monotonic() + self.a.ready_timeout
        while True:
            state = self.state("ACTIVE" if self.queued else "READY")
            if state in READY or state in GONE:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"TPU {self.a.name} not ready after {self.a.ready_timeout}s")
            time.sleep(self.a.poll_seconds)

    # --- the job ---
    def ssh(self, command: str, worker: str = "all") -> int:
        return self.g.run(
            [
                "compute",
                "tpus",
                "tpu-vm",
                "ssh",
                self.a.name,
                *self.zone,
                f"--worker={worker}",
                f"--command={command}",
            ]  # fmt: skip
        )

    def stage(self) -> None:
        tarball = Path(tempfile.gettempdir()) / "jaxpost-src.tgz"
        if not self.g.dry_run:
            subprocess.run(
                [
                    "tar",
                    "-C",
                    str(REPO),
                    "--exclude=.venv",
                    "--exclude=runs",
                    "--exclude=.git",
                    "--exclude=.cache",
                    "-czf",
                    str(tarball),
                    ".",
                ],  # fmt: skip
                check=True,
            )
        self.g.run(
            [
                "compute",
                "tpus",
                "tpu-vm",
                "scp",
                str(tarball),
                f"{self.a.name}:/tmp/",
                *self.zone,
                "--worker=all",
            ],  # fmt: skip
            check=True,
        )
        # The TPU images' Python may be older than jaxpost's 3.11: uv brings its own.
        setup = (
            "mkdir -p ~/jaxpost && tar -C ~/jaxpost -xzf /tmp/jaxpost-src.tgz && cd ~/jaxpost && "
            "{ [ -x .venv/bin/jaxpost ] || { "
            "{ [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; } && "
            "~/.local/bin/uv venv --python 3.11 .venv && "
            "~/.local/bin/uv pip install --python .venv/bin/python -e . 'jax[tpu]'; }; }"
        )
        if self.ssh(setup) != 0:
            raise RuntimeError(f"installing jaxpost on {self.a.name} failed")

    def train_command(self) -> str:
        path, sep, arg = self.a.config.partition(":")
        resolved = (Path.cwd() / path).resolve()
        if not resolved.is_relative_to(REPO):
            raise ValueError(
                f"--config={self.a.config!r} is outside {REPO}: put it in the checkout"
            )
        config = str(resolved.relative_to(REPO)) + sep + arg  # where it is on the workers
        args = ["--distributed", f"--config={config}", f"--workdir={self.a.workdir}"]
        args += list(self.a.overrides)
        return ".venv/bin/jaxpost train " + shlex.join(args)

    def start(self) -> int:
        """Start the job on every worker, detached from the ssh session (a dropped session,
        or gcloud retrying its command, must not kill or double it): an earlier job of this
        launcher is stopped first; the exit status lands in ~/jaxpost/exit_status."""
        run = shlex.quote(f"{self.train_command()} > train.log 2>&1; echo $? > exit_status")
        return self.ssh(
            "cd ~/jaxpost && { [ -f job.pid ] && kill -TERM -- -$(cat job.pid) 2>/dev/null; "
            "while [ -f job.pid ] && kill -0 -- -$(cat job.pid) 2>/dev/null; do sleep 2; done; "
            f"rm -f exit_status; setsid nohup sh -c {run} > /dev/null 2>&1 < /dev/null & "
            "echo $! > job.pid; }"
        )

    def follow(self, from_start: bool) -> int:
        """Stream worker 0's log until its job ends; the job's exit status (255: the ssh
        session dropped, the job may still be running)."""
        lines = "+1" if from_start else "0"
        return self.ssh(
            f"cd ~/jaxpost && {{ tail -n {lines} -F train.log & t=$!; "
            "while [ ! -f exit_status ]; do sleep 5; done; sleep 1; kill $t; "
            "exit $(cat exit_status); }",
            worker="0",
        )


def launch(args, gcloud: Gcloud | None = None) -> int:
    g = gcloud or Gcloud(args.dry_run)
    g.project = g.project or args.project
    job = TpuJob(args, g)
    if args.delete:
        job.delete_any()
        return 0
    if not args.workdir.startswith("gs://") and not args.allow_local_workdir:
        raise ValueError(f"--workdir={args.workdir!r}: use a gs:// path every host can write")
    job.train_command()  # a config outside the checkout is an error before anything is created
    print(
        f"# {args.accelerator}: {job.chips} chips on {job.hosts} host(s), runtime {job.runtime}, "
        f"{'spot' if args.spot else 'on-demand'}, {'queued resource' if job.queued else 'TPU VM'}",
        file=g.out if g.dry_run else sys.stderr,
    )
    restarts, staged, rc = 0, False, 1
    while True:
        state = job.state("NOT_FOUND")
        if state in GONE:
            if state != "NOT_FOUND":
                job.delete()
                job.wait_ready()  # (until it is NOT_FOUND)
            job.create()
            staged = False
            state = job.wait_ready()
        elif state not in READY:
            state = job.wait_ready()
        if state in READY:
            if not staged:
                job.stage()
                staged = True
            rc = job.start()
            if rc == 0:
                rc = job.follow(from_start=True)
                # A dropped session while the TPU is up: the job may still run; follow again.
                while rc == SSH_LOST and job.state("READY") in READY and not g.dry_run:
                    rc = job.follow(from_start=False)
            if g.dry_run:
                print("# when preempted (the TPU is gone), the launcher runs:", file=g.out)
                job.state("PREEMPTED")
                job.delete()
                job.create()
                print("# ... then waits, stages, starts and follows the job again", file=g.out)
            if rc == 0:
                if args.delete_when_done:
                    job.delete()
                print(f"# {args.name}: the job completed", file=sys.stderr)
                return 0
            after = job.state("READY")
        else:
            after = state  # gone while waiting for it: create it again
        healthy = after in READY
        if healthy and rc not in (PREEMPTED_EXIT, SSH_LOST):
            print(f"# {args.name}: the job failed with status {rc}; not retrying", file=sys.stderr)
            return rc
        restarts += 1
        if restarts > args.max_restarts:
            print(f"# {args.name}: gave up after {args.max_restarts} restarts", file=sys.stderr)
            return rc or 1
        why = "stopped with a checkpoint" if rc == PREEMPTED_EXIT else f"status {rc}"
        print(f"# {args.name}: {why}, TPU {after}: restart {restarts}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="TPU (and queued resource) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--project", default="")
    p.add_argument("--accelerator", default="v5p-8", help="e.g. v4-32, v5p-64, v5litepod-16")
    p.add_argument("--runtime", default="", help="TPU software version (default per generation)")
    p.add_argument("--spot", action="store_true", help="spot capacity (default: on-demand)")
    p.add_argument("--queued", dest="queued", action="store_true", default=None,
                   help="create through a queued resource (default with --spot)")  # fmt: skip
    p.add_argument("--no-queued", dest="queued", action="store_false")
    p.add_argument("--workdir", default="")
    p.add_argument("--config", default="")
    p.add_argument("--allow-local-workdir", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-restarts", type=int, default=50)
    p.add_argument("--ready-timeout", type=float, default=6 * 3600)
    p.add_argument("--poll-seconds", type=float, default=30)
    p.add_argument("--delete", action="store_true", help="delete the TPU and exit")
    p.add_argument("--delete-when-done", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands only")
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides (after --)")
    args = p.parse_args(argv)
    if not args.delete and not (args.workdir and args.config):
        p.error("--workdir and --config are needed (or --delete)")
    return args


if __name__ == "__main__":
    try:
        sys.exit(launch(parse_args()))
    except (ValueError, RuntimeError, TimeoutError) as e:
        print(f"launch/tpu.py: error: {e}", file=sys.stderr)
        sys.exit(2)
