"""The built-in demo: SFT from scratch, then a reward model and DPO from the SFT checkpoint.

`jaxpost demo --workdir=W` runs the three stages of configs/{sft,rm,dpo}.py on the built-in
letter-sorting task (held-out words are never trained on), prints a before/after table and writes
the training curves of all three stages to W/curves.png. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

from jaxpost import config as config_lib
from jaxpost import evaluation, preemption
from jaxpost import train as train_lib

log = logging.getLogger("jaxpost")

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _config(name: str, variant: str | None, overrides: dict):
    path = CONFIGS / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the demo reads the repository's configs/ (install with "
            "`pip install -e .` from a checkout)."
        )
    config = config_lib.load_config(str(path) + (f":{variant}" if variant else ""))
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config


def stage_configs(workdir: str, *, quick: bool = False) -> dict:
    """The three stage configs; `quick` shrinks them for tests."""
    sft_dir = os.path.join(workdir, "sft")
    scale = {}
    later = {"init.workdir": sft_dir}
    if quick:
        scale = {
            "train.num_steps": 60,
            "eval.every_steps": 30,
            "checkpoint.every_steps": 0,
            "data.max_eval_examples": 64,
        }
        later = {
            **later,
            "train.num_steps": 40,
            "eval.every_steps": 20,
            "data.max_eval_examples": 64,
        }
    return {
        "sft": _config("sft", None, scale),
        "rm": _config("rm", None, later),
        "dpo": _config("dpo", None, later),
    }


def _curves(workdir: str, stages: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "sft": ("loss", "eval/exact_match"),
        "rm": ("loss", "eval/accuracy"),
        "dpo": ("loss", "eval/rewards/accuracies"),
    }
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6))
    for ax, stage in zip(axes, stages, strict=True):
        rows = [json.loads(x) for x in open(os.path.join(workdir, stage, "metrics.jsonl"))]
        train_key, eval_key = panels[stage]
        pts = [(r["step"], r[train_key]) for r in rows if train_key in r]
        ax.plot(*zip(*pts, strict=True), label=f"train {train_key}", color="tab:blue")
        ax.set_xlabel("step")
        ax.set_ylabel(train_key, color="tab:blue")
        ax2 = ax.twinx()
        pts = [(r["step"], r[eval_key]) for r in rows if eval_key in r]
        ax2.plot(*zip(*pts, strict=True), "o-", label=eval_key, color="tab:orange")
        ax2.set_ylabel(f"held-out {eval_key.removeprefix('eval/')}", color="tab:orange")
        ax2.set_ylim(-0.02, 1.02)
        ax.set_title(stage.upper())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(workdir: str, *, quick: bool = False) -> dict:
    """Run SFT -> RM -> DPO under `workdir`; returns the before/after numbers."""
    configs = stage_configs(workdir, quick=quick)
    summaries = {}
    for stage in ("sft", "rm", "dpo"):
        log.info("=== demo stage %s -> %s", stage, os.path.join(workdir, stage))
        summaries[stage] = train_lib.train(configs[stage], os.path.join(workdir, stage))
        if summaries[stage].get("stop_requested"):  # finished this stage; stop before the next
            raise preemption.Preempted(summaries[stage]["stop_requested"])
    # The DPO policy measured on the SFT task's held-out prompts.
    after_dpo = evaluation.evaluate_checkpoint(configs["sft"], os.path.join(workdir, "dpo"))
    s, r, d = summaries["sft"], summaries["rm"], summaries["dpo"]
    result = {
        "task_exact_match": {
            "before": s["eval_before"]["exact_match"],
            "after_sft": s["eval_after"]["exact_match"],
            "after_dpo": after_dpo["exact_match"],
        },
        "rm_pairwise_accuracy": {
            "before": r["eval_before"]["accuracy"],
            "after": r["eval_after"]["accuracy"],
        },
        "dpo_reward_accuracy": {
            "before": d["eval_before"]["rewards/accuracies"],
            "after": d["eval_after"]["rewards/accuracies"],
        },
        "seconds": {k: round(v["seconds"], 1) for k, v in summaries.items()},
    }
    plot = os.path.join(workdir, "curves.png")
    _curves(workdir, ["sft", "rm", "dpo"], plot)
    result["plot"] = plot
    with open(os.path.join(workdir, "demo.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    t, rm, dpo = (
        result["task_exact_match"],
        result["rm_pairwise_accuracy"],
        result["dpo_reward_accuracy"],
    )
    lines = [
        "",
        "jaxpost demo: sort the letters of held-out words (never trained on)",
        f"{'measure (held-out)':<44}{'before':>10}{'after':>10}",
        f"{'task exact match, SFT (from scratch)':<44}{t['before']:>10.3f}{t['after_sft']:>10.3f}",
        f"{'task exact match, DPO (from the SFT model)':<44}{t['after_sft']:>10.3f}"
        f"{t['after_dpo']:>10.3f}",
        f"{'reward model pairwise accuracy':<44}{rm['before']:>10.3f}{rm['after']:>10.3f}",
        f"{'DPO reward accuracy (rewards/accuracies)':<44}{dpo['before']:>10.3f}"
        f"{dpo['after']:>10.3f}",
        f"training curves: {result['plot']}",
        f"seconds per stage: {result['seconds']}",
    ]
    return "\n".join(lines)
