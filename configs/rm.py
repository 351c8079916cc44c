"""Reward modeling (Bradley-Terry) on preference pairs.

Variants:
  (none)   the demo's reward model: pairs of correctly sorted letters vs a near miss; starts from
           config.init.workdir when set (the demo points it at its SFT run), else from scratch.
  smoke    tiny and fast, from scratch, for tests.
Usage: jaxpost train --config=configs/rm.py:smoke --workdir=/tmp/rm [--config.init.workdir=SFT]
"""

from jaxpost import config as config_lib

VARIANTS = (None, "smoke")


def get_config(arg=None):
    c = config_lib.base_config()
    c.objective.name = "rm"
    c.data.train_path = "builtin:sort_prefs"
    c.data.eval_path = "builtin:sort_prefs"
    c.data.seq_len = 32
    if arg is None:
        c.model = config_lib.model_section("demo")
        c.train.update(num_steps=150, global_batch=32)
        c.optim.update(lr=3e-3, warmup_steps=15)
        c.eval.update(every_steps=50, batch_size=64)
        c.checkpoint.every_steps = 0
        c.log.every_steps = 10
    elif arg == "smoke":
        c.model = config_lib.model_section("smoke")
        c.train.update(num_steps=10, global_batch=16)
        c.data.max_eval_examples = 32
        c.optim.update(lr=3e-3, warmup_steps=2)
        c.eval.update(every_steps=5, batch_size=16)
        c.checkpoint.every_steps = 5
        c.log.every_steps = 5
    else:
        raise ValueError(f"configs/rm.py has variants {VARIANTS}; not {arg!r}")
    return c
