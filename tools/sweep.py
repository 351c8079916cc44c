"""Expand a config file's `get_sweep(arg)` into runs: print their commands, or run them here.

  python tools/sweep.py configs/dpo.py:loss_types --root=runs/sweep            # print commands
  python tools/sweep.py configs/dpo.py:loss_types --root=runs/sweep --run      # run one by one
  python tools/sweep.py configs/dpo.py:smoke --root=/tmp/s --set init.workdir=runs/sft

`get_sweep(arg)` returns a list of `{dotted.key: value}` override dicts; every point is checked
against the config (unknown keys and bad values are errors) before anything runs. Each point gets
its own workdir `ROOT/<name>` where name joins the overridden values.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import sys

from jaxpost import config as config_lib


def load_sweep(spec: str) -> list[dict]:
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SystemExit(f"{path} defines no get_sweep(arg)")
    return module.get_sweep(arg or None)


def point_name(point: dict) -> str:
    text = "_".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(point.items()))
    return re.sub(r"[^A-Za-z0-9_.=,-]", "-", text) or "base"


def expand(spec: str, root: str, fixed: list[str] = ()) -> list[tuple[str, list[str]]]:
    """`[(workdir, argv)]` for every sweep point; validates each point's config.

    `fixed` overrides (`KEY=VALUE`) apply to every point.
    """
    config_spec = spec  # the variant of the sweep is also the config variant
    runs = []
    for point in load_sweep(spec):
        overrides = list(fixed) + [f"{k}={v}" for k, v in point.items()]
        config = config_lib.load_config(config_spec)
        config_lib.apply_overrides(config, overrides)
        workdir = f"{root.rstrip('/')}/{point_name(point)}"
        argv = ["train", f"--config={config_spec}", f"--workdir={workdir}"]
        runs.append((workdir, argv + [f"--config.{o}" for o in overrides]))
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="path/to/config.py[:arg]")
    parser.add_argument("--root", required=True, help="parent directory of the runs' workdirs")
    parser.add_argument("--run", action="store_true", help="run the points here, one by one")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for every point, e.g. --set init.workdir=runs/sft",
    )
    args = parser.parse_args(argv)
    runs = expand(args.config, args.root, args.set)
    if not args.run:
        for _, cmd in runs:
            print("jaxpost " + " ".join(shlex.quote(c) for c in cmd))
        return runs
    from jaxpost.main import main as jaxpost_main

    for workdir, cmd in runs:
        print(f"=== {workdir}", file=sys.stderr)
        jaxpost_main(cmd)
    return runs


if __name__ == "__main__":
    main()
