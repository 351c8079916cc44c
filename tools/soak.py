"""Kill a training run again and again; it must still end bit-identical to an uninterrupted run.

    python tools/soak.py --config=configs/dpo.py:smoke --root=/tmp/soak --kills=20 \\
        -- --config.train.num_steps=40 --config.checkpoint.every_steps=5

runs `jaxpost train` once without interruption (ROOT/uninterrupted), then again in ROOT/killed,
killing it `--kills` times and restarting it with the same command each time, and finally
compares the two workdirs: the final parameters (every tensor, bit for bit) and metrics.jsonl
(each step once; every loss, eval and data value equal; rates such as tokens/s excepted).

Each kill picks its moment from a cycle of kinds:
  time      SIGKILL at a random time within the uninterrupted run's duration
  save      SIGKILL as soon as a checkpoint is being written (orbax's temporary directory)
  step      SIGKILL just after a logged training step (log every step for many moments)
  eval      SIGKILL during an evaluation (just after the step that triggers one is logged)
  reference SIGKILL during the DPO reference pass (after one of its progress lines)
  term      SIGTERM just after a logged training step: the run must exit with status 75, the
            step named in `stop.json` saved
  term-any  SIGTERM at a random time (startup included): status 75, or 0 if it had finished
A kind that has no moment left (no reference pass, the run already past it) falls back to
`time`. A run that finishes before its kill ends the soak early (the summary says how many kills
it survived): give it enough steps for the kills asked for.

Prints a JSON summary; exit status 0 only when the two runs are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
KINDS = ("time", "save", "step", "eval", "reference", "term", "term-any")
PREEMPTED_EXIT = 75
RATES = ("tokens_per_sec", "mfu", "seconds_per_step")  # wall-clock dependent: not compared
_MARKERS = {
    "step": re.compile(r"\bstep \d+/\d+ \|"),
    "term": re.compile(r"\bstep \d+/\d+ \|"),
    "eval": re.compile(r"\bstep (\d+)/\d+ \|"),  # a step that evaluates: `eval_every` divides it
    "reference": re.compile(r"reference log-probs \(.*\): (chunk|resuming)"),
}


def _command(config: str, workdir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxpost.main", "train", f"--config={config}",
            f"--workdir={workdir}", *overrides]  # fmt: skip


class _Run:
    """One process of the run, its output collected line by line by a thread."""

    def __init__(self, cmd: list[str], env: dict, log_path: Path):
        self.lines: list[str] = []
        self.t0 = time.monotonic()
        self._log = open(log_path, "a")
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._log.write(line)
            self._log.flush()

    def wait(self, timeout: float | None = None) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        self._log.close()
        return rc

    def seen(self, pattern: re.Pattern, after: int) -> int | None:
        """Index of the first line at or after `after` matching `pattern`."""
        for i in range(after, len(self.lines)):
            if pattern.search(self.lines[i]):
                return i
        return None


def _saving(workdir: Path) -> set[str]:
    """Names of the temporary directories of checkpoints being written."""
    try:
        return {p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name}
    except FileNotFoundError:
        return set()


def _attempt(cmd, env, workdir, kind, duration, rng, log_path, timeout, eval_every, spread=1.0):
    """Start the run and kill it at a moment of `kind`; `(exit status, what happened)`.
    Timed kills come within `spread` x the uninterrupted run's duration."""
    run = _Run(cmd, env, log_path)
    deadline = run.t0 + timeout
    timed = kind in ("time", "term-any")
    kill_at = run.t0 + rng.uniform(0.05, 0.7) * spread * duration if timed else None
    marker = _MARKERS.get(kind)
    scanned = 0
    stale = _saving(workdir)  # left by an earlier kill (this run's manager removes them)
    while run.proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            run.proc.kill()
            raise TimeoutError(f"{' '.join(cmd)} ran past {timeout}s (log: {log_path})")
        fire = False
        if kill_at is not None:
            # (a SIGTERM before the interpreter has run jaxpost's first line is the default
            # death by signal: that is what SIGKILL tests; wait for the first line of output)
            fire = now >= kill_at and (kind != "term-any" or bool(run.lines))
        elif kind == "save":
            fire = bool(_saving(workdir) - stale)
        elif marker is not None:
            hit = run.seen(marker, scanned)
            scanned = len(run.lines)
            if hit is None and kind == "reference" and run.seen(_MARKERS["step"], 0) is not None:
                marker = _MARKERS["step"]  # no reference pass (left): kill after a step
                continue
            if hit is not None and kind == "eval":
                step = int(marker.search(run.lines[hit]).group(1))
                hit = hit if eval_every and step % eval_every == 0 else None
            if hit is not None:
                time.sleep(rng.uniform(0.0, 0.3))
                fire = True
        if kill_at is None and now - run.t0 > 0.5 * duration:
            kill_at = now + rng.uniform(0.0, 0.3 * duration)  # no such moment: a random time
        if fire and run.proc.poll() is None:
            sig = signal.SIGTERM if kind.startswith("term") else signal.SIGKILL
            run.proc.send_signal(sig)
            rc = run.wait(timeout)
            return rc, {"kind": kind, "signal": sig.name, "at_s": round(now - run.t0, 2),
                        "exit": rc, "last_line": run.lines[-1] if run.lines else ""}  # fmt: skip
        time.sleep(0.02)
    rc = run.wait()
    return rc, {"kind": kind, "signal": None, "exit": rc}


def _check_stopped(workdir: Path, rc: int, event: dict) -> None:
    """A SIGTERM'd run exits 75, and when it was training, the step it names is saved."""
    from jaxpost import checkpoint as ckpt

    if rc not in (0, PREEMPTED_EXIT):
        raise RuntimeError(f"SIGTERM gave exit status {rc}, not 0 or {PREEMPTED_EXIT}: {event}")
    stop = workdir / "stop.json"
    event["stop"] = json.loads(stop.read_text()) if stop.exists() else None
    if event["stop"] is not None and event["stop"]["step"] not in ckpt.saved_steps(str(workdir)):
        raise RuntimeError(f"stop.json names step {event['stop']['step']}, not saved: {event}")


def _metrics(workdir: Path) -> tuple[dict[int, dict], list[int]]:
    rows: dict[int, dict] = {}
    repeated = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        values = {k: v for k, v in row.items() if k not in RATES}
        if set(values) & set(rows.get(step, {})):
            repeated.append(step)
        rows.setdefault(step, {}).update(values)
    return rows, repeated


def compare(reference: Path, killed: Path) -> dict:
    """Bit-identical final params and equal metrics, or what differs."""
    import jax

    from jaxpost import checkpoint as ckpt

    a, b = ckpt.load_params(str(reference)), ckpt.load_params(str(killed))
    flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    params_diff = [jax.tree_util.keystr(k) for k in flat_a
                   if k not in flat_b or not np.array_equal(flat_a[k], flat_b[k])]  # fmt: skip
    ma, _ = _metrics(reference)
    mb, repeated = _metrics(killed)
    metrics_diff = [step for step in sorted(set(ma) | set(mb)) if ma.get(step) != mb.get(step)]
    return {
        "final_steps": [ckpt.saved_steps(str(reference))[-1], ckpt.saved_steps(str(killed))[-1]],
        # what kills left behind, still there at the end (temporary checkpoint dirs, stop.json)
        "leftovers": sorted(_saving(killed)) + (["stop.json"] * (killed / "stop.json").exists()),
        "params_identical": not params_diff and len(flat_a) == len(flat_b),
        "params_differing": params_diff[:5],
        "metrics_identical": not metrics_diff and not repeated,
        "metrics_differing_steps": metrics_diff[:10],
        "metrics_repeated_steps": repeated[:10],
    }


def _eval_every(config: str, overrides: list[str]) -> int:
    from jaxpost import config as config_lib

    loaded = config_lib.load_config(config)
    config_lib.apply_overrides(loaded, [o.removeprefix("--config.") for o in overrides])
    return int(loaded.eval.every_steps)


def soak(config, root, overrides, *, kills, kinds=KINDS, seed=0, max_starts=None, timeout=900,
         env=None):  # fmt: skip
    eval_every = _eval_every(config, overrides)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env)
    rng = random.Random(seed)
    reference, killed = root / "uninterrupted", root / "killed"
    t0 = time.monotonic()
    rc = _Run(_command(config, reference, overrides), env, root / "uninterrupted.log").wait(timeout)
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed ({rc}); see {root}/uninterrupted.log")
    duration = time.monotonic() - t0
    events, starts = [], 0
    max_starts = max_starts or 4 * kills + 4
    cmd = _command(config, killed, overrides)
    while True:
        if starts >= max_starts:
            raise RuntimeError(f"no finish after {starts} starts: {events[-3:]}")
        starts += 1
        done_kills = sum(e["signal"] is not None for e in events)
        kind = kinds[done_kills % len(kinds)] if done_kills < kills else None
        if kind is None:
            rc = _Run(cmd, env, root / "killed.log").wait(timeout)
            events.append({"kind": "finish", "signal": None, "exit": rc})
        else:
            # Many kills: timed ones come early, so the run is still going for the last of them.
            spread = min(1.0, 4 / kills)
            rc, event = _attempt(
                cmd, env, killed, kind, duration, rng, root / "killed.log", timeout, eval_every,
                spread,
            )  # fmt: skip
            if event["signal"] == "SIGTERM":
                _check_stopped(killed, rc, event)
            elif event["signal"] is None and rc != 0:
                raise RuntimeError(f"the run failed on its own ({rc}); see {root}/killed.log")
            events.append(event)
        if events[-1]["signal"] is None and rc == 0:
            break
    result = {
        "kills": sum(e["signal"] is not None for e in events),
        "starts": starts,
        "uninterrupted_seconds": round(duration, 1),
        "events": events,
        **compare(reference, killed),
    }
    result["identical"] = result["params_identical"] and result["metrics_identical"]
    result["clean"] = not result["leftovers"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown --kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    result = soak(args.config, args.root, args.overrides, kills=args.kills, kinds=kinds,
                  seed=args.seed, timeout=args.timeout)  # fmt: skip
    print(json.dumps(result, indent=1))
    return 0 if result["identical"] and result["clean"] else 1


if __name__ == "__main__":
    sys.exit(main())
