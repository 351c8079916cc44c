#!/usr/bin/env python3
"""Run a jaxpost training job on a cluster: GKE through xpk (TPU or GPU), or SLURM (GPU).

    python launch/cluster.py xpk --cluster=my-gke --zone=us-east5-a --tpu-type=v5p-64 \\
        --workload=sft1 --workdir=gs://bucket/runs/sft1 --config=configs/sft.py [--dry-run]
    python launch/cluster.py slurm --nodes=2 --gpus-per-node=8 --workdir=/shared/runs/sft1 \\
        --config=configs/sft.py --time=24:00:00 [--dry-run]     # writes and submits an sbatch

Both run one jaxpost process per host (`jaxpost train --distributed`; jax.distributed takes the
coordinator and process ids from the job environment: GKE's JobSet through xpk, SLURM's
variables), every process with all of its host's chips, and both restart the job after a
preemption until it completes; each restart resumes from the shared workdir:

* xpk: `--max-restarts` lets the JobSet restart the workload when a pod fails or its node is
  preempted (on a spot node pool, `xpk cluster create --spot`) -- any failure, a config error
  included, so check a config with a short run first. The image is built from this checkout by
  xpk (`--base-docker-image` + `--script-dir`, installing jaxpost with `jax[tpu]` or
  `jax[cuda12]`) unless `--docker-image` (jaxpost and jax installed) is given.
* SLURM: `--requeue` and `--signal=TERM@GRACE` (SIGTERM before the time limit; a preempting
  scheduler sends SIGTERM too): jaxpost saves and exits 75, and the batch script requeues
  itself on 75, so a long run continues across allocations.

Only the Python standard library is needed; `--dry-run` prints what would run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREEMPTED_EXIT = 75  # jaxpost.preemption.PREEMPTED_EXIT


def train_args(args) -> list[str]:
    return ["train", "--distributed", f"--config={args.config}", f"--workdir={args.workdir}",
            *args.overrides]  # fmt: skip


def xpk_command(args) -> list[str]:
    if not args.workdir.startswith("gs://"):
        raise ValueError(f"--workdir={args.workdir!r}: pods need a gs:// workdir")
    if bool(args.tpu_type) == bool(args.device_type):
        raise ValueError("give one of --tpu-type (e.g. v5p-64) or --device-type (e.g. h100-80gb-8)")
    cmd = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.workload}",
           f"--zone={args.zone}"]  # fmt: skip
    if args.project:
        cmd.append(f"--project={args.project}")
    if args.tpu_type:
        cmd += [f"--tpu-type={args.tpu_type}", f"--num-slices={args.num_slices}"]
    else:
        cmd += [f"--device-type={args.device_type}", f"--num-nodes={args.num_nodes}"]
    if args.docker_image:
        cmd.append(f"--docker-image={args.docker_image}")
    else:
        cmd += [f"--base-docker-image={args.base_docker_image}", f"--script-dir={REPO}"]
    jax_extra = "jax[tpu]" if args.tpu_type else "jax[cuda12]"
    install = f"pip install -q -e . '{jax_extra}' && " if not args.docker_image else ""
    cmd += [f"--command={install}jaxpost {shlex.join(train_args(args))}",
            f"--max-restarts={args.max_restarts}"]  # fmt: skip
    return cmd


def sbatch_script(args) -> str:
    env = f"source {args.venv}/bin/activate\n" if args.venv else ""
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={args.job_name}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1  # one jaxpost process per host, with all its GPUs",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={args.cpus_per_task}",
        f"#SBATCH --time={args.time}",
        "#SBATCH --requeue",
        f"#SBATCH --signal=TERM@{args.grace}  # jaxpost saves a checkpoint and exits 75",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={args.workdir}/slurm-%j.out",
        *(f"#SBATCH {extra}" for extra in args.sbatch),
        "set -uo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        env.rstrip("\n"),
        # (no --kill-on-bad-exit: exit 75 is a clean stop, and every process saves first)
        f"srun jaxpost {shlex.join(train_args(args))}",
        "status=$?",
        "# stopped with a checkpoint (75; stop.json stays until the next run resumes): requeue",
        f"if [ $status -eq {PREEMPTED_EXIT} ] || [ -f {shlex.quote(args.workdir)}/stop.json ]; "
        "then",
        '  echo "jaxpost stopped with a checkpoint: requeueing $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        "exit $status",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    x = sub.add_parser("xpk", help="GKE through xpk")
    x.add_argument("--cluster", required=True)
    x.add_argument("--workload", required=True)
    x.add_argument("--zone", required=True)
    x.add_argument("--project", default="")
    x.add_argument("--tpu-type", default="", help="e.g. v5p-64, v5litepod-256")
    x.add_argument("--num-slices", type=int, default=1)
    x.add_argument("--device-type", default="", help="GPU nodes, e.g. h100-80gb-8")
    x.add_argument("--num-nodes", type=int, default=1)
    x.add_argument("--docker-image", default="", help="an image with jaxpost installed")
    x.add_argument("--base-docker-image", default="python:3.11-slim")
    x.add_argument("--max-restarts", type=int, default=50)
    s = sub.add_parser("slurm", help="a SLURM batch job (GPU clusters)")
    s.add_argument("--nodes", type=int, default=1)
    s.add_argument("--gpus-per-node", type=int, default=8)
    s.add_argument("--cpus-per-task", type=int, default=32)
    s.add_argument("--time", default="24:00:00")
    s.add_argument("--grace", type=int, default=180, help="seconds between SIGTERM and the limit")
    s.add_argument("--job-name", default="jaxpost")
    s.add_argument("--venv", default=str(REPO / ".venv"), help="activated first ('' for none)")
    s.add_argument("--sbatch", action="append", default=[], help="an extra #SBATCH line")
    for q in (x, s):
        q.add_argument("--workdir", required=True, help="shared by every host")
        q.add_argument("--config", required=True)
        q.add_argument("--dry-run", action="store_true")
        q.add_argument("overrides", nargs="*", help="--config.KEY=VALUE overrides (after --)")
    args = p.parse_args(argv)
    if args.kind == "xpk":
        cmd = xpk_command(args)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        return subprocess.run(cmd).returncode
    script = sbatch_script(args)
    if args.dry_run:
        print(script, end="")
        print(f"# then: sbatch {args.workdir}/jaxpost.sbatch")
        return 0
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    path = Path(args.workdir) / "jaxpost.sbatch"
    path.write_text(script)
    return subprocess.run(["sbatch", str(path)]).returncode


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as e:
        print(f"launch/cluster.py: error: {e}", file=sys.stderr)
        sys.exit(2)
