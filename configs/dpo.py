"""Direct preference optimization (or any TRL DPO loss_type) on preference pairs.

Variants:
  (none)   the demo's DPO stage: from config.init.workdir (the demo's SFT run), precomputed
           reference log-probs, pairs of a correct word reversal vs a near miss.
  smoke    tiny and fast, from scratch (the reference is the initial policy), for tests.
Usage: jaxpost train --config=configs/dpo.py:smoke --workdir=/tmp/dpo \\
         [--config.objective.loss_type=ipo --config.objective.beta=0.5]
"""

import dataclasses

from jaxpost import config as config_lib
from jaxpost import model

VARIANTS = (None, "smoke")


def get_config(arg=None):
    c = config_lib.base_config()
    c.objective.update(name="dpo", loss_type="sigmoid", beta=0.1, reference="precomputed")
    c.data.train_path = "builtin:reverse_prefs"
    c.data.eval_path = "builtin:reverse_prefs"
    c.data.seq_len = 32
    if arg is None:
        c.model = dataclasses.asdict(model.preset("demo"))
        c.train.update(num_steps=150, global_batch=32)
        c.optim.update(lr=3e-4, warmup_steps=15, weight_decay=0.0)
        c.eval.update(every_steps=50, batch_size=64)
        c.checkpoint.every_steps = 0
        c.log.every_steps = 25
    elif arg == "smoke":
        c.model = dataclasses.asdict(model.preset("smoke"))
        c.train.update(num_steps=10, global_batch=16)
        c.data.max_eval_examples = 32
        c.optim.update(lr=1e-3, warmup_steps=2)
        c.eval.update(every_steps=5, batch_size=16)
        c.checkpoint.every_steps = 5
        c.log.every_steps = 5
    else:
        raise ValueError(f"configs/dpo.py has variants {VARIANTS}; not {arg!r}")
    return c
