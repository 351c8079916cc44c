"""An exported jaxpost reward model scores text in `transformers` exactly as training scored it.

Two halves, because jaxpost's environment has no torch and the checking one needs no jax:

  python tools/verify_reward_export.py prepare --dir /tmp/rm_check   # jaxpost's venv
  python tools/verify_reward_export.py check --dir /tmp/rm_check     # a venv with torch +
                                                                    # transformers
`prepare` trains the reward-model smoke config for a few steps, exports it with `jaxpost export`
and saves the held-out pairs' full token sequences (right-padded with the exported pad id) with
the rewards the training objective computed for them. `check` loads the export with
`AutoModelForSequenceClassification` (float32), scores the same sequences with their attention
mask, and prints the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def prepare(directory: str, steps: int) -> None:
    # jaxpost (and jax) only in this half.
    import jax
    import jax.numpy as jnp

    from jaxpost import checkpoint, objectives, serve
    from jaxpost import config as config_lib
    from jaxpost import model as model_lib
    from jaxpost import train as train_lib
    from jaxpost.data import pipeline
    from jaxpost.data.tokenizer import ByteTokenizer
    from jaxpost.objectives import rm

    config = config_lib.load_config(f"{REPO}/configs/rm.py:smoke")
    config_lib.apply_overrides(
        config,
        [
            f"train.num_steps={steps}",
            "checkpoint.every_steps=0",
            "eval.every_steps=0",
            "model.dtype=float32",  # as transformers checks it, also on an accelerator
        ],
    )
    run = os.path.join(directory, "run")
    train_lib.train(config, run)
    out = serve.export(run, os.path.join(directory, "hf"), overwrite=True)
    pad = json.load(open(os.path.join(out, "config.json")))["pad_token_id"]
    examples, _ = pipeline.load_examples(
        "builtin:sort_prefs",
        "eval",
        ByteTokenizer(),
        kind="reward_pairs",
        seq_len=32,
        max_examples=16,
    )
    objective = objectives.make_objective(config.objective, model_lib.Config(**config.model))
    batch = pipeline.make_eval_batches(
        examples, seq_len=32, micro_batch=len(examples), kind=objective.data_kind
    )[0]
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    rc, rr, _ = rm.pair_rewards(checkpoint.load_params(run), micro, model=objective.model)
    seqs = [s.ids for e in examples for s in (e.chosen, e.rejected)]
    ids = np.full((len(seqs), max(map(len, seqs))), pad, np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    rewards = np.stack([np.asarray(rc), np.asarray(rr)], axis=-1).reshape(-1)
    np.savez(os.path.join(directory, "expected.npz"), ids=ids, rewards=rewards, pad=pad)
    print(f"prepared {len(seqs)} sequences; export in {out}")


def check(directory: str) -> None:
    import torch
    import transformers

    expected = np.load(os.path.join(directory, "expected.npz"))
    ids = torch.tensor(expected["ids"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        os.path.join(directory, "hf"), torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        scores = model(ids, attention_mask=(ids != int(expected["pad"])).long()).logits[:, 0]
    diff = np.abs(scores.numpy() - expected["rewards"])
    spread = float(np.ptp(expected["rewards"]))
    print(
        f"transformers {transformers.__version__} {type(model).__name__}: {len(ids)} sequences, "
        f"reward spread {spread:.4f}, max |transformers - jaxpost training| = {diff.max():.3g}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["prepare", "check"])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    if args.what == "prepare":
        prepare(args.dir, args.steps)
    else:
        check(args.dir)


if __name__ == "__main__":
    main()
