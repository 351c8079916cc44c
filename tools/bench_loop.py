"""What the training loop adds to the bare jitted step (issue 12: at most 2%).

  JAX_PLATFORMS=cpu python tools/bench_loop.py [--config configs/sft.py:smoke] [--steps 60]
      [--repeats 2] [-- --config.X=... overrides]

Runs the same configuration two ways, alternately (`--repeats` times each, so drift on a noisy
machine hits both): `jaxpost.train` -- data pipeline, host-to-device batches, metrics fetched
one step late and written every `log.every_steps`, the stop check, the checkpoint policy -- with
evaluation and periodic checkpoints off, its `seconds_per_step` read from metrics.jsonl (the
first logging window left out: it holds the compile); and the bare step: the same plan, state
and compiled step called back to back on batches taken from the same pipeline beforehand and
already on device (after three warm-up calls, timed over windows of `log.every_steps`).
Prints one JSON line per run and the overhead of the loop's median over the bare median.

On a CPU backend the data pipeline (reading, tokenising, packing) runs on the cores that also
compute the step, so it shows up as loop time here, where on a GPU/TPU host it overlaps the
device's step. `--cached_data` separates the two: the loop then reads batches the pipeline made
beforehand, so what remains is the loop's own work (transfers, metrics, logging, the stop check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import flax.linen as nn
import jax

from jaxpost import config as config_lib
from jaxpost import optim, sharding
from jaxpost import plan as plan_lib
from jaxpost import step as step_lib
from jaxpost import train as train_lib

DEFAULTS = [
    "model=bench-tiny",
    "data.train_path=builtin:pirate",
    "data.eval_path=",
    "data.seq_len=256",
    "data.packing=first_fit",
    "train.global_batch=8",
    "eval.every_steps=0",
    "checkpoint.every_steps=0",
    "checkpoint.every_minutes=0",
    "log.every_steps=10",
    "log.tensorboard=false",
]


def make_config(spec: str, steps: int, overrides: list[str]):
    config = config_lib.load_config(spec)
    model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "bench-tiny")
    config.model = config_lib.model_section(model)
    rest = [o for o in [*DEFAULTS, *overrides] if not o.startswith("model=")]
    config_lib.apply_overrides(config, [*rest, f"train.num_steps={steps}"])
    return config


class _Cached:
    """The first batches of a train iterator, repeated; its state is the real iterator's."""

    def __init__(self, iterator, n: int = 8):
        self.iterator, self.batches, self.i = iterator, [next(iterator) for _ in range(n)], 0
        self.shards = iterator.shards

    def __next__(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def loop_seconds(config, cached: bool) -> float:
    """Median `seconds_per_step` of the loop's logging windows after the first."""
    real = plan_lib.train_iterator
    if cached:
        train_lib.plan_lib.train_iterator = lambda *a, **k: _Cached(real(*a, **k))
    try:
        with tempfile.TemporaryDirectory() as workdir:
            train_lib.train(config, workdir)
            with open(f"{workdir}/metrics.jsonl", encoding="utf-8") as f:
                rows = [json.loads(line) for line in f]
    finally:
        train_lib.plan_lib.train_iterator = real
    windows = [r["seconds_per_step"] for r in rows if "seconds_per_step" in r]
    return statistics.median(windows[1:])


def bare_seconds(config, steps: int) -> float:
    plan = plan_lib.make_plan(config)
    num_steps = int(config.train.num_steps)
    tx = optim.make_optimizer(config.optim, num_steps)
    schedule = optim.make_schedule(config.optim, num_steps)
    data = plan_lib.load_data(plan)
    iterator = plan_lib.train_iterator(plan, data)
    with jax.set_mesh(plan.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, shardings = step_lib.create_state(
            plan.objective.model, tx, plan.mesh, seed=int(config.seed), seq_len=plan.seq_len
        )
        step = step_lib.make_train_step(
            plan.objective, tx, schedule, state_shardings=shardings, mesh=plan.mesh
        )
        batches = [sharding.to_global(next(iterator), plan.mesh) for _ in range(8)]
        for i in range(3):  # compile, then warm up as the loop's first (unmeasured) window does
            state, m = step(state, batches[i], None)
        jax.block_until_ready(m)
        # the loop's statistic: the median over windows of `log.every_steps` steps
        window, times = int(config.log.every_steps), []
        for w in range(max(1, steps // window)):
            t0 = time.perf_counter()
            for i in range(window):
                state, m = step(state, batches[(w * window + i) % len(batches)], None)
            jax.block_until_ready((state, m))
            times.append((time.perf_counter() - t0) / window)
        return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sft.py:smoke")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--cached_data", action="store_true", help="the loop reads batches made beforehand"
    )
    parser.add_argument("overrides", nargs="*", help="key=value (model=PRESET picks a preset)")
    args = parser.parse_args()
    overrides = [o.removeprefix("--config.") for o in args.overrides]
    config = make_config(args.config, args.steps, overrides)
    loop, bare = [], []
    for r in range(args.repeats):
        loop.append(loop_seconds(config, args.cached_data))
        bare.append(bare_seconds(config, args.steps))
        print(json.dumps({"repeat": r, "loop_s": round(loop[-1], 5), "bare_s": round(bare[-1], 5)}))
    overhead = statistics.median(loop) / statistics.median(bare) - 1
    print(
        json.dumps(
            {
                "config": args.config,
                "cached_data": args.cached_data,
                "overrides": overrides,
                "steps": args.steps,
                "device": jax.devices()[0].device_kind,
                "n_devices": jax.device_count(),
                "loop_s_per_step": round(statistics.median(loop), 5),
                "bare_s_per_step": round(statistics.median(bare), 5),
                "overhead": round(overhead, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
