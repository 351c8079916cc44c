"""Supervised fine-tuning.

Variants:
  (none)       the built-in demo's SFT stage: a 0.8M-parameter byte-level model learns to sort
               the letters of words (held-out words are never trained on); under a minute on
               2 CPU cores.
  smoke        tiny and fast, for tests.
  bench-tiny   the bench-tiny model on the demo task with longer rows, for throughput.
Usage: jaxpost train --config=configs/sft.py:smoke --workdir=/tmp/run [--config.optim.lr=1e-3]
"""

from jaxpost import config as config_lib

VARIANTS = (None, "smoke", "bench-tiny")


def get_config(arg=None):
    c = config_lib.base_config()
    c.objective.name = "sft"
    c.data.train_path = "builtin:sort"
    c.data.eval_path = "builtin:sort"
    c.data.seq_len = 32
    if arg is None:
        c.model = config_lib.model_section("demo")
        # Short on purpose: good but not perfect, so the DPO stage has something to fix.
        c.train.update(num_steps=150, global_batch=64)
        c.optim.update(lr=3e-3, warmup_steps=50)
        c.eval.update(every_steps=50, batch_size=64)
        c.checkpoint.every_steps = 0
        c.log.every_steps = 10
    elif arg == "smoke":
        c.model = config_lib.model_section("smoke")
        c.train.update(num_steps=20, global_batch=16)
        c.data.max_eval_examples = 64
        c.optim.update(lr=3e-3, warmup_steps=5)
        c.eval.update(every_steps=10, batch_size=16)
        c.checkpoint.every_steps = 10
        c.log.every_steps = 5
    elif arg == "bench-tiny":
        c.model = config_lib.model_section("bench-tiny")
        c.data.seq_len = 32
        c.train.update(num_steps=200, global_batch=64)
        c.eval.batch_size = 64
    else:
        raise ValueError(f"configs/sft.py has variants None, 'smoke', 'bench-tiny'; not {arg!r}")
    return c


def get_sweep(arg=None):
    """Override dicts, one per point (`jaxpost sweep --config=configs/sft.py:smoke`)."""
    if arg == "smoke":
        return [{"optim.lr": lr} for lr in (1e-3, 3e-3)]
    return []
