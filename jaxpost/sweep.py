"""`jaxpost sweep`: a config file's `get_sweep(arg)` run point by point, then compared.

    jaxpost sweep --config=configs/dpo.py:loss_types --root=runs/sweep [--set KEY=VALUE ...]
    jaxpost sweep ... --dry_run                      # print each point's `jaxpost train` command
    jaxpost sweep ... --launch="launch/tpu.py --name=sweep-{name} --zone=... --"

`get_sweep(arg)` returns `{dotted.key: value}` override dicts; every point's config is checked
(unknown keys, bad values) before anything runs. Each point trains in its own workdir
`ROOT/<name>` (its overridden values). Here the points run one after another in this process;
with `--launch` each becomes one job: the command prefix (`{name}` and `{workdir}` filled in)
followed by the point's `train` arguments. A rerun skips finished points and resumes interrupted
ones (training resumes from a workdir's checkpoint by itself); a point that fails is recorded and
the sweep goes on. At the end, ROOT/summary.csv and ROOT/summary.md hold each point's overrides,
status and final eval metrics with the best point named, and ROOT/eval_curves.png compares the
points' eval curves.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import math
import re
import shlex
import signal
import subprocess
import sys
import traceback
from typing import Any

from etils import epath

from jaxpost import config as config_lib

log = logging.getLogger("jaxpost")


@dataclasses.dataclass
class Point:
    name: str
    overrides: dict[str, Any]  # the point's own (not the --set ones)
    workdir: str
    argv: list[str]  # `jaxpost` arguments: train --config=... --workdir=... --config.K=V ...
    num_steps: int
    spec: str = ""  # the config file[:arg]
    items: list[str] = dataclasses.field(default_factory=list)  # its overrides, KEY=VALUE
    status: str = "pending"  # pending, done, failed, incomplete
    error: str = ""
    eval: dict[str, float] = dataclasses.field(default_factory=dict)  # final eval metrics
    curves: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)


def load_sweep(spec: str) -> list[dict]:
    path, _, arg = spec.partition(":")
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"Config file {path!r} does not exist (from --config={spec}).")
    module_spec = importlib.util.spec_from_file_location("jaxpost_sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"{path} defines no get_sweep(arg): it is not a sweep")
    points = module.get_sweep(arg or None)
    if not points:
        raise ValueError(f"{path}: get_sweep({arg or None!r}) returned no points")
    return points


def point_name(point: dict) -> str:
    text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(point.items()))
    return re.sub(r"[^A-Za-z0-9_.=,-]", "-", text) or "base"


def expand(spec: str, root: str, fixed: list[str] = ()) -> list[Point]:
    """The sweep's points, each config checked; `fixed` (`KEY=VALUE`) apply to every point."""
    points, names = [], set()
    for i, overrides in enumerate(load_sweep(spec)):
        items = list(fixed) + [f"{k}={v}" for k, v in overrides.items()]
        config = config_lib.load_config(spec)
        try:
            config_lib.apply_overrides(config, items)
        except ValueError as e:
            raise ValueError(f"sweep point {i} ({overrides}): {e}") from None
        name = point_name(overrides)
        if name in names:
            raise ValueError(f"sweep points repeat {name!r}: each point needs its own values")
        names.add(name)
        workdir = f"{root.rstrip('/')}/{name}"
        argv = ["train", f"--config={spec}", f"--workdir={workdir}"]
        argv += [f"--config.{o}" for o in items]
        points.append(
            Point(name, dict(overrides), workdir, argv, int(config.train.num_steps), spec, items)
        )
    return points


def _finished(point: Point) -> bool:
    from jaxpost import checkpoint as ckpt

    steps = ckpt.saved_steps(point.workdir)
    stopped = (epath.Path(point.workdir) / "stop.json").exists()
    return bool(steps) and steps[-1] >= point.num_steps and not stopped


def read_results(point: Point) -> Point:
    """The point's status and eval metrics from its workdir."""
    path = epath.Path(point.workdir) / "metrics.jsonl"
    point.curves, point.eval = {}, {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for k, v in row.items():
                if k.startswith("eval/"):
                    point.curves.setdefault(k, []).append((int(row["step"]), float(v)))
    for k, curve in point.curves.items():
        point.eval[k] = curve[-1][1]
    if point.status != "failed":
        point.status = "done" if _finished(point) else "incomplete"
    return point


def _run_here(point: Point) -> None:
    from jaxpost import train as train_lib
    from jaxpost.preemption import Preempted

    config = config_lib.load_config(point.spec)
    config_lib.apply_overrides(config, point.items)
    summary = train_lib.train(config, point.workdir)
    if summary.get("stop_requested"):  # the point finished; the sweep stops here
        raise Preempted(summary["stop_requested"])


def _run_launched(point: Point, launch: str) -> None:
    """The point as a job; a stop request (SIGTERM) is passed on to it and waited for."""
    from jaxpost.preemption import PREEMPTED_EXIT, Preempted

    prefix = shlex.split(launch.format(name=point.name, workdir=point.workdir))
    proc = subprocess.Popen([*prefix, *point.argv])
    try:
        rc = proc.wait()
    except Preempted:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    if rc == PREEMPTED_EXIT:
        raise Preempted(f"the job's exit status {rc}")
    if rc != 0:
        raise RuntimeError(f"{shlex.join([*prefix, *point.argv])} exited with status {rc}")


def run(points: list[Point], *, launch: str = "") -> None:
    from jaxpost.preemption import Preempted

    for i, point in enumerate(points):
        if _finished(point):
            log.info("sweep point %d/%d %s: finished, skipped", i + 1, len(points), point.name)
            continue
        log.info("sweep point %d/%d %s: %s", i + 1, len(points), point.name, point.workdir)
        try:
            _run_launched(point, launch) if launch else _run_here(point)
        except Preempted:
            raise  # the whole sweep stops; rerunning it resumes this point
        except Exception as e:  # a failed point is recorded; the others still run
            point.status, point.error = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
            log.error("sweep point %s failed: %s", point.name, point.error)
            log.debug("%s", traceback.format_exc())


def best(points: list[Point], metric: str, mode: str) -> Point | None:
    """The finished point with the lowest (`min`) or highest `metric` at its last eval."""
    scored = [
        p for p in points if p.status == "done" and math.isfinite(p.eval.get(metric, math.nan))
    ]
    if not scored:
        return None
    key = (lambda p: p.eval[metric]) if mode == "min" else (lambda p: -p.eval[metric])
    return min(scored, key=key)


def write_summary(points: list[Point], root: str, metric: str, mode: str) -> dict[str, str]:
    """ROOT/summary.csv, summary.md and eval_curves.png; returns their paths."""
    root_path = epath.Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for p in points for k in p.overrides})
    metrics = sorted({k for p in points for k in p.eval})
    winner = best(points, metric, mode)
    rows = [
        {
            "point": p.name,
            **{k: p.overrides.get(k, "") for k in keys},
            "status": p.status,
            **{m: p.eval.get(m, "") for m in metrics},
            "best": "yes" if p is winner else "",
            "workdir": p.workdir,
        }
        for p in points
    ]
    csv_path = root_path / "summary.csv"
    with csv_path.open("w") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    header = ["point", *keys, "status", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p, row in zip(points, rows, strict=True):
        mark = " **(best)**" if p is winner else ""
        lines.append("| " + " | ".join(cell(row[h]) for h in header) + mark + " |")
    verdict = (
        f"Best by {metric} ({mode}): **{winner.name}** ({winner.eval[metric]:.4g})."
        if winner
        else f"No finished point has a finite {metric}."
    )
    md_path = root_path / "summary.md"
    md_path.write_text("\n".join(lines) + "\n\n" + verdict + "\n")
    png_path = root_path / "eval_curves.png"
    _plot(points, metrics, png_path)
    return {"csv": str(csv_path), "md": str(md_path), "png": str(png_path), "verdict": verdict}


def _plot(points: list[Point], metrics: list[str], path: epath.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(len(p.curves.get(m, [])) for p in points)][:6] or [""]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], shown, strict=True):
        for p in points:
            curve = p.curves.get(metric, [])
            if curve:
                ax.plot(*zip(*curve, strict=True), marker="o", markersize=3, label=p.name)
        ax.set_title(metric or "no eval metrics")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def sweep(
    spec: str,
    root: str,
    *,
    fixed: list[str] = (),
    dry_run: bool = False,
    launch: str = "",
    metric: str = "eval/loss",
    mode: str = "min",
) -> dict:
    if mode not in ("min", "max"):
        raise ValueError(f"--mode={mode!r}: expected min or max")
    points = expand(spec, root, list(fixed))
    if dry_run:
        for p in points:
            prefix = launch.format(name=p.name, workdir=p.workdir) + " " if launch else "jaxpost "
            print(prefix + " ".join(shlex.quote(a) for a in p.argv))
        return {"points": points}
    run(points, launch=launch)
    for p in points:
        read_results(p)
    paths = write_summary(points, root, metric, mode)
    print((epath.Path(paths["md"])).read_text(), file=sys.stdout)
    return {"points": points, **paths}
