"""Data at scale: `jaxpost data prepare` speed, then time-to-first-step and peak host memory of
`jaxpost train` on the prepared data, for growing numbers of records.

  python tools/bench_data_scale.py --sizes 10000,100000,1000000 [--dir /tmp/jaxpost_scale]
  python tools/bench_data_scale.py --sizes 10000,100000 --raw   # also: raw JSONL, 1 vs 2 processes

Records are synthetic TRL conversations of about `--record_bytes` bytes (system, user and
assistant turns of random words). Each measurement runs in a fresh process: `startup_s` is the
wall time of a 1-step run (smoke model, rows of `--seq_len` tokens, records cut to
their last tokens) (setup, data, compile, one step, final checkpoint) -- what grows with
the data is the data part -- and `peak_rss_mb` the run's peak resident memory (ru_maxrss). With
`--raw`, the same run reads the raw JSONL (every record validated at startup, each process a
share), with one process and with two (`launch/local_multiprocess.sh`-style, 4 CPU devices
each). Results print as one JSON line per measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAXPOST = [sys.executable, "-m", "jaxpost.main"]
WORDS = [
    "".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2 + i % 8))
    for i in range(5000)
]


def write_records(path: str, n: int, record_bytes: int, seed: int = 0) -> float:
    rng = random.Random(seed)
    t0 = time.perf_counter()
    with open(path, "w") as f:
        for i in range(n):
            budget = record_bytes - 150

            def text(share, budget=budget):
                out, size = [], 0
                while size < budget * share:
                    w = WORDS[rng.randrange(len(WORDS))]
                    out.append(w)
                    size += len(w) + 1
                return " ".join(out)

            record = {
                "messages": [
                    {"role": "system", "content": text(0.1)},
                    {"role": "user", "content": f"{i}: " + text(0.3)},
                    {"role": "assistant", "content": text(0.6)},
                ]
            }
            f.write(json.dumps(record) + "\n")
    return time.perf_counter() - t0


def measured(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MB) of `cmd`, run from a fresh wrapper process."""
    wrapper = (
        "import json, resource, subprocess, sys, time; t = time.perf_counter(); "
        "p = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True); "
        "print(json.dumps([time.perf_counter() - t, "
        "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, p.returncode, "
        "p.stderr[-3000:]]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, json.dumps(cmd)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    seconds, rss, rc, err = json.loads(out.stdout)
    if rc:
        raise RuntimeError(f"{cmd} failed ({rc}):\n{err}")
    return seconds, rss, err


def train_cmd(workdir: str, train_path: str, seq_len: int, extra=()) -> list[str]:
    return [
        *JAXPOST,
        "train",
        f"--config={REPO}/configs/sft.py:smoke",
        f"--workdir={workdir}",
        f"--config.data.train_path={train_path}",
        "--config.data.eval_path=",
        f"--config.data.seq_len={seq_len}",
        "--config.data.truncation=keep_end",  # the assistant turn ends each record
        "--config.train.num_steps=1",
        "--config.log.tensorboard=false",
        *extra,
    ]


def two_processes(workdir: str, train_path: str, seq_len: int) -> tuple[float, float]:
    """Wall seconds and the larger peak RSS of a 2-process run (4 CPU devices each)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    t0 = time.perf_counter()
    procs = []
    for i in range(2):
        cmd = train_cmd(
            workdir,
            train_path,
            seq_len,
            [
                "--distributed",
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--init_timeout=120",
            ],
        )
        wrapper = (
            "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r)"
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", wrapper, *cmd],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
    rss = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"two-process run failed ({p.returncode})")
        rss.append(float(out.strip().splitlines()[-1]))
    return time.perf_counter() - t0, max(rss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dir", default="/tmp/jaxpost_scale")
    parser.add_argument("--record_bytes", type=int, default=1600)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="prepare workers (0: all cores)")
    parser.add_argument("--raw", action="store_true", help="also time runs on the raw JSONL")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    for n in (int(s) for s in args.sizes.split(",")):
        raw = os.path.join(args.dir, f"raw{n}.jsonl")
        if not os.path.exists(raw):
            write_records(raw, n, args.record_bytes)
        out = os.path.join(args.dir, f"prepared{n}")
        seconds, rss, _ = measured(
            [
                *JAXPOST,
                "data",
                "prepare",
                f"--config={REPO}/configs/sft.py:smoke",
                f"--input={raw}",
                f"--out={out}",
                "--overwrite",
                f"--workers={args.workers}",
            ]
        )
        size = os.path.getsize(raw)
        print(
            json.dumps(
                {
                    "what": "prepare",
                    "records": n,
                    "raw_mb": round(size / 2**20, 1),
                    "seconds": round(seconds, 1),
                    "records_per_s": round(n / seconds),
                    "peak_rss_mb": round(rss),
                    "workers": args.workers or os.cpu_count(),
                }
            ),
            flush=True,
        )
        runs = [("prepared", out)] + ([("raw", raw)] if args.raw else [])
        for what, path in runs:
            workdir = os.path.join(args.dir, f"run_{what}{n}")
            subprocess.run(["rm", "-rf", workdir], check=True)
            seconds, rss, _ = measured(train_cmd(workdir, path, args.seq_len))
            print(
                json.dumps(
                    {
                        "what": f"train 1 step, {what}",
                        "records": n,
                        "processes": 1,
                        "startup_s": round(seconds, 1),
                        "peak_rss_mb": round(rss),
                    }
                ),
                flush=True,
            )
            if what == "raw":
                subprocess.run(["rm", "-rf", workdir], check=True)
                seconds, rss = two_processes(workdir, path, args.seq_len)
                print(
                    json.dumps(
                        {
                            "what": f"train 1 step, {what}",
                            "records": n,
                            "processes": 2,
                            "startup_s": round(seconds, 1),
                            "peak_rss_mb_per_process": round(rss),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
