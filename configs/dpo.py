"""Direct preference optimization (or any TRL DPO loss_type) on preference pairs.

Variants:
  (none)   the demo's DPO stage: from config.init.workdir (the demo's SFT run), precomputed
           reference log-probs, pairs of correctly sorted letters vs a near miss. The loss is
           RPO (DPO + the chosen completions' NLL, Pang et al. 2024): plain sigmoid DPO lowers
           the chosen log-probs too and costs task accuracy on this task (measured: 0.775 ->
           0.66 exact match), RPO keeps it (0.775 -> 0.79).
  smoke    tiny and fast, from scratch (the reference is the initial policy), for tests.
  loss_types  the demo's DPO stage (from runs/demo/sft, so after `make demo`) for a sweep over
           loss types and beta: jaxpost sweep --config=configs/dpo.py:loss_types --root=runs/sweep
Usage: jaxpost train --config=configs/dpo.py:smoke --workdir=/tmp/dpo \\
         [--config.objective.loss_type=ipo --config.objective.beta=0.5]
"""

from jaxpost import config as config_lib

VARIANTS = (None, "smoke", "loss_types")


def get_config(arg=None):
    c = config_lib.base_config()
    c.objective.update(name="dpo", loss_type="sigmoid", beta=0.1, reference="precomputed")
    c.data.train_path = "builtin:sort_prefs"
    c.data.eval_path = "builtin:sort_prefs"
    c.data.seq_len = 32
    if arg is None:
        c.model = config_lib.model_section("demo")
        c.objective.update(loss_type="sigmoid,sft", loss_weights="1.0,1.0")
        c.train.update(num_steps=150, global_batch=32)
        c.optim.update(lr=1e-3, warmup_steps=15, weight_decay=0.0)
        c.eval.update(every_steps=50, batch_size=64)
        c.checkpoint.every_steps = 0
        c.log.every_steps = 10
    elif arg == "loss_types":
        # The demo's DPO stage under several losses (see get_sweep).
        c.init.workdir = "runs/demo/sft"
        c.model = config_lib.model_section("demo")
        c.train.update(num_steps=150, global_batch=32)
        c.optim.update(lr=1e-3, warmup_steps=15, weight_decay=0.0)
        c.eval.update(every_steps=50, batch_size=64)
        c.checkpoint.every_steps = 0
        # One reference pass serves every point: same reference params, data and settings.
        c.objective.reference_cache_dir = "runs/reference_cache"
    elif arg == "smoke":
        c.model = config_lib.model_section("smoke")
        c.train.update(num_steps=10, global_batch=16)
        c.data.max_eval_examples = 32
        c.optim.update(lr=1e-3, warmup_steps=2)
        c.eval.update(every_steps=5, batch_size=16)
        c.checkpoint.every_steps = 5
        c.log.every_steps = 5
    else:
        raise ValueError(f"configs/dpo.py has variants {VARIANTS}; not {arg!r}")
    return c


def get_sweep(arg=None):
    """Override dicts, one per run (`jaxpost sweep` runs them)."""
    if arg == "loss_types":
        return [
            {"objective.loss_type": t, "objective.beta": b}
            for t in ("sigmoid", "ipo", "sigmoid,sft", "apo_zero")
            for b in (0.1, 0.5)
        ]
    if arg == "smoke":
        return [{"objective.loss_type": t} for t in ("sigmoid", "hinge")]
    return []
